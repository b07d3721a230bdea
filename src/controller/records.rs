//! The controller's records: one `SpotReplacement` per noticed instance in the controller's
//! namespace (see [`crate::contract::spot_replacement`]), read from a watch cache and written with
//! their resourceVersion.
//!
//! A write is read-modify-write on the newest object this process knows: the one it wrote last (the
//! cache shows it only later), else the cache's. The status is replaced with that object's
//! resourceVersion, so a write based on an older read (a stale leader's, or one racing another
//! writer) fails with a conflict instead of overwriting; the object is then read again and the
//! caller decides again at its next reconcile. Nothing here reads a Node: the instance id is the
//! caller's, taken from `spec.providerID` only.
use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::reflector::{ObjectRef, Store},
};
use tracing::{debug, warn};

use crate::contract::{
    SpotReplacement, SpotReplacementSpec, SpotReplacementStatus,
    record::{Phase, Seat},
    spot_replacement::{record_labels, record_name},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not an EC2 instance id; no record is kept for it")]
    BadInstance(String),
    #[error(
        "record {name} changed since it was read (another writer, or this process lost the lead); read again"
    )]
    Conflict { name: String },
    #[error("{action} record {name}: {source}")]
    Api {
        action: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("record {name} does not exist")]
    Missing { name: String },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::BadInstance(_) => "bad_instance",
            Error::Conflict { .. } => "record_conflict",
            Error::Api { .. } => "record_write",
            Error::Missing { .. } => "record_missing",
        }
    }
}

/// The Node a record is about (its spec, set when the record is made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub node: String,
    pub node_uid: String,
    pub instance: String,
}

/// The records: the API, the watch cache, and the objects this process wrote since.
pub struct Records {
    api: Api<SpotReplacement>,
    cache: Store<SpotReplacement>,
    namespace: String,
    /// The controller's name (its lease): the label every record of this controller carries.
    controller: String,
    written: Mutex<HashMap<String, SpotReplacement>>,
    /// Records this process deleted (finished, their Node gone): the cache may show them a moment
    /// longer, and they must not be written again.
    deleted: Mutex<HashSet<String>>,
}

impl Records {
    pub fn new(client: Client, namespace: &str, controller: &str, cache: Store<SpotReplacement>) -> Self {
        Records {
            api: Api::namespaced(client, namespace),
            cache,
            namespace: namespace.to_owned(),
            controller: controller.to_owned(),
            written: Mutex::default(),
            deleted: Mutex::default(),
        }
    }

    /// The newest record known for `instance`.
    pub fn get(&self, instance: &str) -> Option<SpotReplacement> {
        self.read(instance, SpotReplacement::clone)
    }

    /// Whether `instance` has a record, without copying it (called for Node watch events).
    pub fn has(&self, instance: &str) -> bool {
        self.read(instance, |_| ()).is_some()
    }

    /// The phase of `instance`'s record, if it has one with a status, without copying it.
    pub fn phase(&self, instance: &str) -> Option<Phase> {
        self.read(instance, |record| {
            record.status.as_ref().map(|status| status.phase)
        })
        .flatten()
    }

    /// `read` of the newest record known for `instance`: none if this process deleted it, else
    /// what this process wrote last, else the cache's.
    fn read<T>(&self, instance: &str, read: impl FnOnce(&SpotReplacement) -> T) -> Option<T> {
        let name = record_name(instance)?;
        if lock(&self.deleted).contains(&name) {
            return None;
        }
        if let Some(written) = lock(&self.written).get(&name) {
            return Some(read(written));
        }
        self.cache
            .get(&ObjectRef::new(&name).within(&self.namespace))
            .map(|object| read(&object))
    }

    /// Every record: the cache's, each replaced by what this process wrote since.
    pub fn all(&self) -> Vec<SpotReplacement> {
        let written = lock(&self.written);
        let mut all: HashMap<String, SpotReplacement> = self
            .cache
            .state()
            .iter()
            .map(|object| (object.name_any(), (**object).clone()))
            .collect();
        all.extend(
            written
                .iter()
                .map(|(name, object)| (name.clone(), object.clone())),
        );
        let deleted = lock(&self.deleted);
        all.into_iter()
            .filter(|(name, _)| !deleted.contains(name))
            .map(|(_, object)| object)
            .collect()
    }

    /// Calls `visit` with every record, as [`Self::all`] lists them, without copying any.
    pub fn visit(&self, mut visit: impl FnMut(&SpotReplacement)) {
        let written = lock(&self.written);
        let deleted = lock(&self.deleted);
        for object in self.cache.state() {
            let name = object.name_any();
            if !written.contains_key(&name) && !deleted.contains(&name) {
                visit(&object);
            }
        }
        for (name, object) in written.iter() {
            if !deleted.contains(name) {
                visit(object);
            }
        }
    }

    /// Writes the record of `subject`: `change` gets its status as it stands (`None` for a new
    /// record) and returns the status to write. The record is made first when there is none.
    /// Returns the status as written.
    pub async fn write(
        &self,
        subject: &Subject,
        change: impl FnOnce(Option<&SpotReplacementStatus>) -> SpotReplacementStatus,
    ) -> Result<SpotReplacementStatus, Error> {
        let name =
            record_name(&subject.instance).ok_or_else(|| Error::BadInstance(subject.instance.clone()))?;
        let mut object = match self.get(&subject.instance) {
            Some(object) => object,
            None => self.create(&name, subject).await?,
        };
        let status = change(object.status.as_ref());
        object.status = Some(status.clone());
        self.replace_status(&name, &object).await?;
        Ok(status)
    }

    /// Changes the status of an existing record only (the sweeper's writes for a gone Node).
    pub async fn update(
        &self,
        instance: &str,
        change: impl FnOnce(&SpotReplacementStatus) -> SpotReplacementStatus,
    ) -> Result<(), Error> {
        let name = record_name(instance).ok_or_else(|| Error::BadInstance(instance.to_owned()))?;
        let mut object = self
            .get(instance)
            .ok_or_else(|| Error::Missing { name: name.clone() })?;
        let current = object
            .status
            .as_ref()
            .ok_or_else(|| Error::Missing { name: name.clone() })?;
        object.status = Some(change(current));
        self.replace_status(&name, &object).await
    }

    /// Deletes the record of `instance` (nothing left to do for it).
    pub async fn delete(&self, instance: &str) -> Result<(), Error> {
        let name = record_name(instance).ok_or_else(|| Error::BadInstance(instance.to_owned()))?;
        match self.api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(source) => {
                return Err(Error::Api {
                    action: "deleting",
                    name,
                    source,
                });
            }
        }
        lock(&self.written).remove(&name);
        lock(&self.deleted).insert(name);
        Ok(())
    }

    async fn create(&self, name: &str, subject: &Subject) -> Result<SpotReplacement, Error> {
        let object = SpotReplacement {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                labels: Some(record_labels(&subject.node, &self.controller)),
                ..ObjectMeta::default()
            },
            spec: SpotReplacementSpec {
                node_name: subject.node.clone(),
                node_uid: subject.node_uid.clone(),
                instance_id: subject.instance.clone(),
            },
            status: None,
        };
        lock(&self.deleted).remove(name);
        match self.api.create(&PostParams::default(), &object).await {
            Ok(created) => Ok(created),
            // Made meanwhile (the cache had not shown it yet): read it and write on top of it.
            Err(kube::Error::Api(status)) if status.is_already_exists() => self.refresh(name).await,
            Err(source) => Err(Error::Api {
                action: "creating",
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// Replaces the status, guarded by the object's resourceVersion.
    async fn replace_status(&self, name: &str, object: &SpotReplacement) -> Result<(), Error> {
        match self
            .api
            .replace_status(name, &PostParams::default(), object)
            .await
        {
            Ok(written) => {
                lock(&self.written).insert(name.to_owned(), written);
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.is_conflict() => {
                warn!(
                    record = name,
                    "record changed since it was read; reading it again"
                );
                if let Err(error) = self.refresh(name).await {
                    debug!(%error, record = name, "reading the record again failed");
                }
                Err(Error::Conflict {
                    name: name.to_owned(),
                })
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                // Deleted under us (an operator's `kubectl delete`): only the leader writes records,
                // so its copy is the record. Make it again and write the status on it.
                warn!(
                    record = name,
                    "record {name} is gone; writing it again from this controller's copy"
                );
                lock(&self.written).remove(name);
                let subject = Subject {
                    node: object.spec.node_name.clone(),
                    node_uid: object.spec.node_uid.clone(),
                    instance: object.spec.instance_id.clone(),
                };
                let mut again = self.create(name, &subject).await?;
                again.status = object.status.clone();
                match self
                    .api
                    .replace_status(name, &PostParams::default(), &again)
                    .await
                {
                    Ok(written) => {
                        lock(&self.written).insert(name.to_owned(), written);
                        Ok(())
                    }
                    Err(source) => Err(Error::Api {
                        action: "writing the status of",
                        name: name.to_owned(),
                        source,
                    }),
                }
            }
            Err(source) => Err(Error::Api {
                action: "writing the status of",
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// Reads the record from the API server and keeps it as the newest known.
    async fn refresh(&self, name: &str) -> Result<SpotReplacement, Error> {
        let object = self.api.get(name).await.map_err(|source| Error::Api {
            action: "reading",
            name: name.to_owned(),
            source,
        })?;
        lock(&self.written).insert(name.to_owned(), object.clone());
        Ok(object)
    }
}

/// The label selector of one controller's records.
pub fn selector(controller: &str) -> String {
    format!("{}={controller}", crate::contract::keys::RECORD_CONTROLLER_LABEL)
}

/// The seat of a record, if it has one.
pub fn seat_of(object: &SpotReplacement) -> Option<&Seat> {
    object.status.as_ref()?.seat.as_ref()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
