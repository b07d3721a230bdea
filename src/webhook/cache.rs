//! The webhook's watch caches (kube-runtime reflectors) of Pods, PodDisruptionBudgets, Nodes and the
//! controller's `SpotReplacement` records: every review is judged from memory, never with an API call. Objects are slimmed to the fields the guards
//! read before they are stored, so thousands of pods cost a few MiB.
use std::{collections::BTreeSet, sync::Arc};

use futures::{StreamExt, future};
use k8s_openapi::api::{
    core::v1::{Node, NodeCondition, NodeStatus, Pod, PodSpec, PodStatus},
    policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus},
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::WriterDropped},
        watcher,
    },
};

use super::pdb_guard::MIRROR_POD_ANNOTATION;
use crate::contract::{self, SpotReplacement};

/// Finished pods are never evicted: the API server leaves them out of the watch.
const UNFINISHED_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Read handles on the four caches. Cheap to clone.
#[derive(Clone)]
pub struct Caches {
    pub pods: Store<Pod>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub nodes: Store<Node>,
    /// The controller's records, in its namespace (only the controller may write there).
    pub records: Store<SpotReplacement>,
}

impl Caches {
    /// Starts watching the cluster. The returned future drives the watches (retrying with backoff,
    /// logging failures) and never ends on its own: run it next to the server, drop it to stop.
    pub fn watch(
        client: Client,
        records_namespace: &str,
    ) -> (Caches, impl Future<Output = ()> + Send + 'static) {
        let (pods, pods_writer) = reflector::store();
        let (records, records_writer) = reflector::store();
        let records_watch = watcher(
            Api::<SpotReplacement>::namespaced(client.clone(), records_namespace),
            watcher::Config::default(),
        )
        .backoff(crate::kube_config::watch_backoff())
        .modify(slim_record)
        .reflect(records_writer);
        let (pdbs, pdbs_writer) = reflector::store();
        let (nodes, nodes_writer) = reflector::store();
        let pods_config = watcher::Config::default().fields(UNFINISHED_PODS);
        let pods_watch = watcher(Api::<Pod>::all(client.clone()), pods_config)
            .backoff(crate::kube_config::watch_backoff())
            .modify(slim_pod)
            .reflect(pods_writer);
        let pdbs_watch = watcher(
            Api::<PodDisruptionBudget>::all(client.clone()),
            watcher::Config::default(),
        )
        .backoff(crate::kube_config::watch_backoff())
        .modify(slim_pdb)
        .reflect(pdbs_writer);
        let nodes_watch = watcher(Api::<Node>::all(client), watcher::Config::default())
            .backoff(crate::kube_config::watch_backoff())
            .modify(slim_node)
            .reflect(nodes_writer);
        let driven = async move {
            futures::join!(
                pods_watch.for_each(|event| log_failure("pods", event)),
                pdbs_watch.for_each(|event| log_failure("poddisruptionbudgets", event)),
                nodes_watch.for_each(|event| log_failure("nodes", event)),
                records_watch.for_each(|event| log_failure("spotreplacements", event)),
            );
        };
        (
            Caches {
                pods,
                pdbs,
                nodes,
                records,
            },
            driven,
        )
    }

    /// Caches holding the given objects (slimmed as the watches would), ready at once: for tests,
    /// fuzzing and benchmarks.
    pub fn from_objects(pods: Vec<Pod>, pdbs: Vec<PodDisruptionBudget>, nodes: Vec<Node>) -> Caches {
        Caches {
            pods: filled(pods, slim_pod),
            pdbs: filled(pdbs, slim_pdb),
            nodes: filled(nodes, slim_node),
            records: filled(Vec::new(), slim_record),
        }
    }

    /// The same caches with these records (for tests).
    pub fn with_records(mut self, records: Vec<SpotReplacement>) -> Caches {
        self.records = filled(records, slim_record);
        self
    }

    /// Resolves once every cache has listed its objects.
    pub async fn wait_until_ready(&self) -> Result<(), WriterDropped> {
        self.pods.wait_until_ready().await?;
        self.pdbs.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        self.records.wait_until_ready().await
    }

    /// The controller's record of the Node `name` with uid `uid` (see [`contract::record_of`]).
    pub fn record_of(&self, name: &str, uid: Option<&str>) -> Option<Arc<SpotReplacement>> {
        contract::record_of(self.records.state(), name, uid)
    }

    /// Pods bound to the node.
    pub fn pods_on(&self, node: &str) -> Vec<Arc<Pod>> {
        self.pods
            .state_filter(|pod| pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref()) == Some(node))
    }

    /// PDBs of the given namespaces.
    pub fn pdbs_in(&self, namespaces: &BTreeSet<&str>) -> Vec<Arc<PodDisruptionBudget>> {
        self.pdbs.state_filter(|pdb| {
            pdb.metadata
                .namespace
                .as_deref()
                .is_some_and(|ns| namespaces.contains(ns))
        })
    }

    /// Whether the Node exists and is Ready.
    pub fn node_is_ready(&self, name: &str) -> bool {
        self.nodes
            .get(&reflector::ObjectRef::new(name))
            .is_some_and(|node| crate::node::is_ready(&node))
    }
}

fn log_failure<T>(kind: &'static str, event: Result<T, watcher::Error>) -> future::Ready<()> {
    if let Err(error) = event {
        tracing::warn!(%error, kind, "watch failed; retrying with backoff");
    }
    future::ready(())
}

fn filled<K>(objects: Vec<K>, slim: fn(&mut K)) -> Store<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for mut object in objects {
        slim(&mut object);
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

/// Keeps what the PDB guard reads: name, namespace, labels, owners, the mirror annotation, the node,
/// tolerations, phase and deletion.
pub fn slim_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| key == MIRROR_POD_ANNOTATION);
    }
    let spec = pod.spec.take().unwrap_or_default();
    pod.spec = Some(PodSpec {
        node_name: spec.node_name,
        tolerations: spec.tolerations,
        ..PodSpec::default()
    });
    let phase = pod.status.take().and_then(|status| status.phase);
    pod.status = Some(PodStatus {
        phase,
        ..PodStatus::default()
    });
}

/// Keeps the selector, generation and `disruptionsAllowed`.
pub fn slim_pdb(pdb: &mut PodDisruptionBudget) {
    pdb.metadata.managed_fields = None;
    pdb.metadata.annotations = None;
    if let Some(status) = pdb.status.take() {
        pdb.status = Some(PodDisruptionBudgetStatus {
            disruptions_allowed: status.disruptions_allowed,
            observed_generation: status.observed_generation,
            current_healthy: status.current_healthy,
            desired_healthy: status.desired_healthy,
            expected_pods: status.expected_pods,
            ..PodDisruptionBudgetStatus::default()
        });
    }
}

/// Keeps the spec and the status but the history (the order guard reads phase and replacement).
pub fn slim_record(record: &mut SpotReplacement) {
    record.metadata.managed_fields = None;
    record.metadata.annotations = None;
    if let Some(status) = record.status.as_mut() {
        status.history = Vec::new();
    }
}

/// Keeps the name and the Ready condition.
pub fn slim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.metadata.labels = None;
    node.spec = None;
    let ready: Option<Vec<NodeCondition>> = node
        .status
        .take()
        .and_then(|status| status.conditions)
        .map(|conditions| conditions.into_iter().filter(|c| c.type_ == "Ready").collect());
    node.status = Some(NodeStatus {
        conditions: ready,
        ..NodeStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slimmed_objects_keep_what_the_guards_read() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web"},
                         "annotations": {"big": "x".repeat(1000), MIRROR_POD_ANNOTATION: "m"}},
            "spec": {"nodeName": "n", "containers": [{"name": "c", "image": "i"}],
                     "tolerations": [{"operator": "Exists"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        }))
        .unwrap();
        slim_pod(&mut pod);
        let slim = serde_json::to_value(&pod).unwrap();
        assert_eq!(
            slim,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web"},
                             "annotations": {MIRROR_POD_ANNOTATION: "m"}},
                "spec": {"nodeName": "n", "containers": [], "tolerations": [{"operator": "Exists"}]},
                "status": {"phase": "Running"}
            })
        );
    }

    #[test]
    fn caches_from_objects_answer_the_guards_questions() {
        let pod = |name: &str, node: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns"},
                                          "spec": {"nodeName": node, "containers": []}}))
            .unwrap()
        };
        let node = |name: &str, ready: &str| -> Node {
            serde_json::from_value(json!({"metadata": {"name": name},
                                          "status": {"conditions": [{"type": "Ready", "status": ready}]}}))
            .unwrap()
        };
        let caches = Caches::from_objects(
            vec![pod("a", "n-1"), pod("b", "n-2")],
            vec![],
            vec![node("n-1", "True"), node("n-2", "False")],
        );
        let on_n1: Vec<_> = caches
            .pods_on("n-1")
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(on_n1, ["a"]);
        assert!(caches.node_is_ready("n-1"));
        assert!(!caches.node_is_ready("n-2"));
        assert!(!caches.node_is_ready("absent"));
    }
}
