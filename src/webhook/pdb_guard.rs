//! The PDB guard's decision, in pure functions: a NoExecute taint evicts a node's pods at once without
//! asking their PodDisruptionBudgets. When an added, guarded NoExecute taint would evict more pods
//! than a covering PDB allows, the taint becomes NoSchedule (JSON patch), the node is marked for a
//! PDB-paced drain ([`keys::DRAIN_REQUESTED`]) and the answer carries a warning saying why.
use std::collections::BTreeSet;

use jiff::Timestamp;
use json_patch::{
    AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation, TestOperation,
    jsonptr::PointerBuf,
};
use k8s_openapi::api::{
    core::v1::{Pod, Taint},
    policy::v1::PodDisruptionBudget,
};
use kube::core::{Selector, SelectorExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    review::NodeUpdate,
    taints::{self, GuardedKeys, NO_EXECUTE, NO_SCHEDULE},
};
use crate::{keys, node};

/// Annotation the kubelet puts on mirror pods (static pods seen through the API): never evicted.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The value of [`keys::DRAIN_REQUESTED`]: when, for which taints, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainRequest {
    pub requested_at: Timestamp,
    /// Keys of the NoExecute taints that were made NoSchedule.
    pub taints: Vec<String>,
    pub reason: String,
}

/// A PDB that evicting the pods at once would exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub namespace: String,
    pub name: String,
    /// Pods the taint would evict at once that the PDB covers.
    pub evicted: usize,
    /// The PDB's `status.disruptionsAllowed` (0 when its status is missing or stale).
    pub allowed: i32,
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Breach {
            namespace,
            name,
            evicted,
            allowed,
        } = self;
        write!(
            f,
            "PDB {namespace}/{name} allows {allowed} disruption(s), {evicted} pod(s) would be evicted at once"
        )
    }
}

/// What the PDB guard answers.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Nothing to do: no guarded NoExecute taint was added, or evicting at once is within every PDB.
    Allow,
    /// Make the taints NoSchedule and ask for a PDB-paced drain.
    Soften {
        patch: Patch,
        warning: String,
        breaches: Vec<Breach>,
    },
}

/// The guarded NoExecute taints an update adds, with their index in the new taint list.
pub fn guarded_additions<'a>(update: &'a NodeUpdate, guarded: &GuardedKeys) -> Vec<(usize, &'a Taint)> {
    taints::added(node::taints(&update.old), node::taints(&update.new))
        .into_iter()
        .filter(|(_, taint)| taint.effect == NO_EXECUTE && guarded.guards(&taint.key))
        .collect()
}

/// Decides on an update of an opted-in node, given the pods bound to it and the PDBs of their
/// namespaces (from the caches).
pub fn decide(
    update: &NodeUpdate,
    guarded: &GuardedKeys,
    pods_on_node: &[&Pod],
    pdbs: &[&PodDisruptionBudget],
    now: Timestamp,
) -> Decision {
    let additions = guarded_additions(update, guarded);
    if additions.is_empty() {
        return Decision::Allow;
    }
    let added: Vec<&Taint> = additions.iter().map(|(_, taint)| *taint).collect();
    let evicted: Vec<&Pod> = pods_on_node
        .iter()
        .copied()
        .filter(|pod| evicted_by(pod, &added))
        .collect();
    let breaches = breaches(&evicted, pdbs);
    let Some(first) = breaches.first() else {
        return Decision::Allow;
    };
    let keys: Vec<String> = added.iter().map(|taint| taint.key.clone()).collect();
    let more = match breaches.len() {
        1 => String::new(),
        n => format!(" (and {} more PDB(s))", n - 1),
    };
    let warning = format!(
        "{} NoExecute made NoSchedule: {first}{more}; the node is marked for a PDB-paced drain",
        keys.join(", ")
    );
    let request = DrainRequest {
        requested_at: now,
        taints: keys,
        reason: format!("{first}{more}"),
    };
    let indices: Vec<usize> = additions.iter().map(|(index, _)| *index).collect();
    let patch = soften_patch(
        node::taints(&update.new),
        &indices,
        update.new.metadata.annotations.is_some(),
        &request,
    );
    Decision::Soften {
        patch,
        warning,
        breaches,
    }
}

/// Whether the taints would evict this pod: it is running or pending, is not a DaemonSet or mirror pod
/// (those stay, as in `kubectl drain`), is not already being deleted, and does not tolerate every one.
pub fn evicted_by(pod: &Pod, taints: &[&Taint]) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    let daemon = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.kind == "DaemonSet");
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|annotations| annotations.contains_key(MIRROR_POD_ANNOTATION));
    let deleting = pod.metadata.deletion_timestamp.is_some();
    if finished || daemon || mirror || deleting {
        return false;
    }
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.tolerations.as_deref())
        .unwrap_or_default();
    taints.iter().any(|taint| !taints::tolerates(tolerations, taint))
}

/// Every PDB that evicting `evicted` at once would exceed, sorted by namespace and name.
pub fn breaches(evicted: &[&Pod], pdbs: &[&PodDisruptionBudget]) -> Vec<Breach> {
    let namespaces: BTreeSet<&str> = evicted
        .iter()
        .filter_map(|pod| pod.metadata.namespace.as_deref())
        .collect();
    let mut found: Vec<Breach> = pdbs
        .iter()
        .filter(|pdb| {
            pdb.metadata
                .namespace
                .as_deref()
                .is_some_and(|ns| namespaces.contains(ns))
        })
        .filter_map(|pdb| {
            let selector = selector(pdb)?;
            let namespace = pdb.metadata.namespace.as_deref()?;
            let covered = evicted
                .iter()
                .filter(|pod| pod.metadata.namespace.as_deref() == Some(namespace))
                .filter(|pod| selector.matches(pod.metadata.labels.as_ref().unwrap_or(&Default::default())))
                .count();
            let allowed = disruptions_allowed(pdb);
            (covered > 0 && i64::try_from(covered).unwrap_or(i64::MAX) > i64::from(allowed)).then(|| Breach {
                namespace: namespace.to_owned(),
                name: pdb.metadata.name.clone().unwrap_or_default(),
                evicted: covered,
                allowed,
            })
        })
        .collect();
    found.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    found
}

/// The PDB's label selector; none (or one Kubernetes would not accept) selects no pod, while an
/// empty one selects every pod of its namespace (policy/v1).
fn selector(pdb: &PodDisruptionBudget) -> Option<Selector> {
    let label_selector = pdb.spec.as_ref()?.selector.clone()?;
    Selector::try_from(label_selector).ok()
}

/// `status.disruptionsAllowed`, or 0 when the disruption controller has not yet computed it for the
/// PDB's current generation (as the Eviction API treats it).
pub fn disruptions_allowed(pdb: &PodDisruptionBudget) -> i32 {
    let Some(status) = pdb.status.as_ref() else {
        return 0;
    };
    let current = match (status.observed_generation, pdb.metadata.generation) {
        (Some(observed), Some(generation)) => observed >= generation,
        (None, Some(_)) => false,
        _ => true,
    };
    if current {
        status.disruptions_allowed.unwrap_or(0).max(0)
    } else {
        0
    }
}

/// The JSON patch turning the taints at `indices` of `taints` (all NoExecute) into NoSchedule, and
/// recording the drain request. A taint whose key already has a NoSchedule taint is removed instead
/// (taints are unique by key and effect). Each change is guarded by `test` operations on the key and
/// effect, so a patch applied to a different list fails instead of changing the wrong taint.
pub fn soften_patch(
    taints: &[Taint],
    indices: &[usize],
    has_annotations: bool,
    request: &DrainRequest,
) -> Patch {
    let mut indices = indices.to_vec();
    // Highest index first: a removal never shifts a taint still to be changed.
    indices.sort_unstable_by(|a, b| b.cmp(a));
    indices.dedup();
    let mut operations = Vec::new();
    for index in indices {
        let Some(taint) = taints.get(index) else { continue };
        let at = |field: Option<&str>| {
            let index = index.to_string();
            let mut tokens = vec!["spec", "taints", index.as_str()];
            tokens.extend(field);
            PointerBuf::from_tokens(tokens)
        };
        operations.push(PatchOperation::Test(TestOperation {
            path: at(Some("key")),
            value: Value::String(taint.key.clone()),
        }));
        operations.push(PatchOperation::Test(TestOperation {
            path: at(Some("effect")),
            value: Value::String(NO_EXECUTE.to_owned()),
        }));
        let no_schedule_exists = taints
            .iter()
            .any(|other| other.key == taint.key && other.effect == NO_SCHEDULE);
        if no_schedule_exists {
            operations.push(PatchOperation::Remove(RemoveOperation { path: at(None) }));
        } else {
            operations.push(PatchOperation::Replace(ReplaceOperation {
                path: at(Some("effect")),
                value: Value::String(NO_SCHEDULE.to_owned()),
            }));
        }
    }
    if !has_annotations {
        operations.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations"]),
            value: Value::Object(Default::default()),
        }));
    }
    let value = serde_json::to_string(request).unwrap_or_else(|_| request.reason.clone());
    operations.push(PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(["metadata", "annotations", keys::DRAIN_REQUESTED]),
        value: Value::String(value),
    }));
    Patch(operations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::{review::Review, taints::NTH_TAINT_KEYS};
    use serde_json::json;

    fn guarded() -> GuardedKeys {
        GuardedKeys::new(vec![
            keys::DEFAULT_TAINT_KEY.parse().unwrap(),
            NTH_TAINT_KEYS.parse().unwrap(),
        ])
    }

    fn now() -> Timestamp {
        "2026-11-25T10:00:00Z".parse().unwrap()
    }

    fn update(old_taints: serde_json::Value, new_taints: serde_json::Value) -> NodeUpdate {
        let node = |taints| {
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": "n-1", "labels": {"spot-rebalancer.io/enabled": "true"}},
                   "spec": {"taints": taints}})
        };
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Node"},
                        "resource": {"group": "", "version": "v1", "resource": "nodes"},
                        "name": "n-1", "operation": "UPDATE", "userInfo": {"username": "alice"},
                        "object": node(new_taints), "oldObject": node(old_taints)}
        });
        match crate::webhook::review::parse(&serde_json::to_vec(&body).unwrap()).unwrap() {
            Review::Update(update) => *update,
            Review::Other(_) => unreachable!(),
        }
    }

    fn pod(name: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": {"nodeName": "n-1", "containers": []},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    fn pdb(name: &str, selector: serde_json::Value, allowed: i32) -> PodDisruptionBudget {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "generation": 1},
            "spec": {"selector": selector, "minAvailable": 2},
            "status": {"disruptionsAllowed": allowed, "observedGeneration": 1,
                       "currentHealthy": 2, "desiredHealthy": 2, "expectedPods": 2}
        }))
        .unwrap()
    }

    fn termination(effect: &str) -> serde_json::Value {
        json!({"key": "spot-instance-terminating", "value": "true", "effect": effect})
    }

    #[test]
    fn evicting_more_pods_than_the_pdb_allows_softens_the_taint() {
        let web = [
            pod("web-1", json!({"app": "web"})),
            pod("web-2", json!({"app": "web"})),
        ];
        let budget = pdb("web", json!({"matchLabels": {"app": "web"}}), 1);
        let update = update(json!([]), json!([termination("NoExecute")]));
        let Decision::Soften {
            patch,
            warning,
            breaches,
        } = decide(&update, &guarded(), &[&web[0], &web[1]], &[&budget], now())
        else {
            panic!("the taint was not softened");
        };
        assert_eq!(
            breaches,
            [Breach {
                namespace: "shop".into(),
                name: "web".into(),
                evicted: 2,
                allowed: 1
            }]
        );
        assert!(
            warning.contains("PDB shop/web allows 1 disruption(s), 2 pod(s)"),
            "{warning}"
        );
        let request = DrainRequest {
            requested_at: now(),
            taints: vec!["spot-instance-terminating".into()],
            reason: "PDB shop/web allows 1 disruption(s), 2 pod(s) would be evicted at once".into(),
        };
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            json!([
                {"op": "test", "path": "/spec/taints/0/key", "value": "spot-instance-terminating"},
                {"op": "test", "path": "/spec/taints/0/effect", "value": "NoExecute"},
                {"op": "replace", "path": "/spec/taints/0/effect", "value": "NoSchedule"},
                {"op": "add", "path": "/metadata/annotations", "value": {}},
                {"op": "add", "path": "/metadata/annotations/spot-rebalancer.io~1drain-requested",
                 "value": serde_json::to_string(&request).unwrap()},
            ])
        );
    }

    #[test]
    fn the_softening_patch_applies_to_the_node() {
        let web = pod("web-1", json!({"app": "web"}));
        let budget = pdb("web", json!({"matchLabels": {"app": "web"}}), 0);
        let kwok = json!({"key": "kwok", "effect": "NoSchedule"});
        let update = update(json!([kwok]), json!([kwok, termination("NoExecute")]));
        let Decision::Soften { patch, .. } = decide(&update, &guarded(), &[&web], &[&budget], now()) else {
            panic!("the taint was not softened");
        };
        let mut node = serde_json::to_value(&update.new).unwrap();
        json_patch::patch(&mut node, &patch.0).unwrap();
        assert_eq!(node["spec"]["taints"][1]["effect"], "NoSchedule");
        assert_eq!(node["spec"]["taints"][0]["key"], "kwok");
        let request: DrainRequest = serde_json::from_str(
            node["metadata"]["annotations"][keys::DRAIN_REQUESTED]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(request.taints, ["spot-instance-terminating"]);
    }

    #[test]
    fn a_pdb_that_allows_the_evictions_keeps_no_execute() {
        let web = pod("web-1", json!({"app": "web"}));
        let budget = pdb("web", json!({"matchLabels": {"app": "web"}}), 1);
        let update = update(json!([]), json!([termination("NoExecute")]));
        assert_eq!(
            decide(&update, &guarded(), &[&web], &[&budget], now()),
            Decision::Allow
        );
    }

    #[test]
    fn pods_that_stay_do_not_count() {
        let mut finished = pod("done", json!({"app": "web"}));
        finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let daemon: Pod = serde_json::from_value(json!({
            "metadata": {"name": "ds", "namespace": "shop", "labels": {"app": "web"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds",
                                              "uid": "1", "controller": true}]},
            "spec": {"containers": []}
        }))
        .unwrap();
        let mirror: Pod = serde_json::from_value(json!({
            "metadata": {"name": "static", "namespace": "shop", "labels": {"app": "web"},
                         "annotations": {MIRROR_POD_ANNOTATION: "x"}},
            "spec": {"containers": []}
        }))
        .unwrap();
        let tolerant: Pod = serde_json::from_value(json!({
            "metadata": {"name": "tolerant", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"containers": [], "tolerations": [{"operator": "Exists"}]}
        }))
        .unwrap();
        let budget = pdb("web", json!({"matchLabels": {"app": "web"}}), 0);
        let update = update(json!([]), json!([termination("NoExecute")]));
        let pods = [&finished, &daemon, &mirror, &tolerant];
        assert_eq!(
            decide(&update, &guarded(), &pods, &[&budget], now()),
            Decision::Allow
        );
    }

    #[test]
    fn only_added_guarded_no_execute_taints_are_softened() {
        let web = pod("web-1", json!({"app": "web"}));
        let budget = pdb("web", json!({}), 0);
        let cases = [
            // Already there before the update.
            (
                json!([termination("NoExecute")]),
                json!([termination("NoExecute")]),
            ),
            // NoSchedule evicts nothing.
            (json!([]), json!([termination("NoSchedule")])),
            // Kubernetes' own taints are never touched.
            (
                json!([]),
                json!([{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]),
            ),
            // Not a guarded key.
            (
                json!([]),
                json!([{"key": "dedicated", "value": "gpu", "effect": "NoExecute"}]),
            ),
        ];
        for (old, new) in cases {
            let update = update(old.clone(), new.clone());
            assert_eq!(
                decide(&update, &guarded(), &[&web], &[&budget], now()),
                Decision::Allow,
                "{old} -> {new}"
            );
        }
        let nth = update(
            json!([]),
            json!([{"key": "aws-node-termination-handler/spot-itn", "effect": "NoExecute"}]),
        );
        assert!(matches!(
            decide(&nth, &guarded(), &[&web], &[&budget], now()),
            Decision::Soften { .. }
        ));
    }

    #[test]
    fn a_taint_whose_key_already_has_no_schedule_is_removed_instead() {
        let web = pod("web-1", json!({"app": "web"}));
        let budget = pdb("web", json!({"matchLabels": {"app": "web"}}), 0);
        let update = update(
            json!([termination("NoSchedule")]),
            json!([termination("NoSchedule"), termination("NoExecute")]),
        );
        let Decision::Soften { patch, .. } = decide(&update, &guarded(), &[&web], &[&budget], now()) else {
            panic!("the taint was not softened");
        };
        let mut node = serde_json::to_value(&update.new).unwrap();
        json_patch::patch(&mut node, &patch.0).unwrap();
        assert_eq!(node["spec"]["taints"], json!([termination("NoSchedule")]));
    }

    #[test]
    fn pdb_arithmetic_counts_only_matching_pods_of_its_namespace() {
        let web = pod("web-1", json!({"app": "web", "tier": "front"}));
        let db = pod("db-1", json!({"app": "db"}));
        let mut elsewhere = pod("web-x", json!({"app": "web"}));
        elsewhere.metadata.namespace = Some("other".into());
        let exprs = pdb(
            "front",
            json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]}),
            0,
        );
        let web_pdb = pdb("web", json!({"matchLabels": {"app": "web"}}), 1);
        let found = breaches(&[&web, &db, &elsewhere], &[&exprs, &web_pdb]);
        assert_eq!(
            found,
            [Breach {
                namespace: "shop".into(),
                name: "front".into(),
                evicted: 1,
                allowed: 0
            }]
        );
    }

    #[test]
    fn a_missing_or_stale_pdb_status_allows_nothing() {
        let mut budget = pdb("web", json!({}), 3);
        assert_eq!(disruptions_allowed(&budget), 3);
        budget.metadata.generation = Some(2);
        assert_eq!(disruptions_allowed(&budget), 0, "status of an older generation");
        budget.status = None;
        assert_eq!(disruptions_allowed(&budget), 0);
    }

    #[test]
    fn a_pdb_without_a_selector_covers_nothing_and_an_empty_one_everything() {
        let web = pod("web-1", json!({"app": "web"}));
        let mut none = pdb("none", json!({}), 0);
        none.spec.as_mut().unwrap().selector = None;
        let all = pdb("all", json!({}), 0);
        let found = breaches(&[&web], &[&none, &all]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "all");
    }
}
