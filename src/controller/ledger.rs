//! The capacity ledger: one ConfigMap in the controller's namespace (`<lease>-capacity`), one key per
//! noticed instance holding its [`Seat`] (JSON). A Node's record goes with the Node; the ledger does
//! not, so a controller (also one restarted after a SIGKILL) still knows which +1 it owes back when
//! an instance went behind its back. Entries are written before the Auto Scaling call they announce
//! (intent before action), only by the leader, with JSON merge patches of one key each.
use std::{collections::BTreeMap, sync::Mutex};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use super::record::Seat;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the capacity ledger {namespace}/{name}: {source}")]
    Load {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("writing entry {key} of the capacity ledger {name}: {source}")]
    Write {
        name: String,
        key: String,
        source: kube::Error,
    },
}

/// The ledger: the ConfigMap and this process's copy of it (only the leader writes, so the copy is
/// never older than the ConfigMap).
pub struct Ledger {
    api: Api<ConfigMap>,
    name: String,
    seats: Mutex<BTreeMap<String, Seat>>,
}

impl Ledger {
    /// Reads the ledger (creating an empty one the first time). Entries that do not parse are kept
    /// in the ConfigMap and ignored, with a warning.
    pub async fn load(client: Client, namespace: &str, name: &str) -> Result<Self, Error> {
        let api: Api<ConfigMap> = Api::namespaced(client, namespace);
        let load_error = |source| Error::Load {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        };
        let existing = api.get_opt(name).await.map_err(load_error)?;
        let config_map = match existing {
            Some(config_map) => config_map,
            None => {
                let empty: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": super::reconcile::FIELD_MANAGER}},
                }))
                .expect("a ConfigMap");
                match api.create(&PostParams::default(), &empty).await {
                    Ok(created) => created,
                    Err(kube::Error::Api(status)) if status.is_already_exists() => {
                        api.get(name).await.map_err(load_error)?
                    }
                    Err(source) => return Err(load_error(source)),
                }
            }
        };
        let seats = config_map
            .data
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(key, value)| match serde_json::from_str::<Seat>(&value) {
                Ok(seat) => Some((key, seat)),
                Err(error) => {
                    tracing::warn!(key, %error, "ignoring a capacity ledger entry that does not parse");
                    None
                }
            })
            .collect();
        Ok(Ledger {
            api,
            name: name.to_owned(),
            seats: Mutex::new(seats),
        })
    }

    pub fn get(&self, instance: &str) -> Option<Seat> {
        lock(&self.seats).get(instance).cloned()
    }

    pub fn seats(&self) -> Vec<Seat> {
        lock(&self.seats).values().cloned().collect()
    }

    /// Writes one entry (keyed by its instance id) to the ConfigMap, then to the copy.
    pub async fn put(&self, seat: Seat) -> Result<(), Error> {
        let value = serde_json::to_string(&seat).expect("a seat serialises");
        self.patch(&seat.instance, Value::String(value)).await?;
        lock(&self.seats).insert(seat.instance.clone(), seat);
        Ok(())
    }

    /// Drops one entry.
    pub async fn remove(&self, instance: &str) -> Result<(), Error> {
        self.patch(instance, Value::Null).await?;
        lock(&self.seats).remove(instance);
        Ok(())
    }

    /// Merge-patches one key. A ConfigMap deleted under a running controller is created again from
    /// this process's copy (the leader's copy is the whole ledger), then patched.
    async fn patch(&self, key: &str, value: Value) -> Result<(), Error> {
        let patch = json!({"data": {key: value}});
        let write_error = |source| Error::Write {
            name: self.name.clone(),
            key: key.to_owned(),
            source,
        };
        let params = PatchParams::default();
        match self.api.patch(&self.name, &params, &Patch::Merge(&patch)).await {
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                tracing::warn!(name = %self.name, "the capacity ledger ConfigMap is gone; writing it again");
                self.recreate().await.map_err(write_error)?;
                self.api
                    .patch(&self.name, &params, &Patch::Merge(&patch))
                    .await
                    .map_err(write_error)?;
            }
            other => {
                other.map_err(write_error)?;
            }
        }
        Ok(())
    }

    async fn recreate(&self) -> Result<(), kube::Error> {
        let data: BTreeMap<String, String> = lock(&self.seats)
            .iter()
            .map(|(key, seat)| {
                (
                    key.clone(),
                    serde_json::to_string(seat).expect("a seat serialises"),
                )
            })
            .collect();
        let config_map: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": self.name, "labels": {"app.kubernetes.io/managed-by": super::reconcile::FIELD_MANAGER}},
            "data": data,
        }))
        .expect("a ConfigMap");
        match self.api.create(&PostParams::default(), &config_map).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
            Err(error) => Err(error),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
