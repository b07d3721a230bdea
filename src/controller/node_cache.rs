//! What the controller keeps of each Node in its watch cache: only the fields it reads, so a cluster
//! of thousands of Nodes costs a few MiB. Every Node is cached (a replacement may come from any node
//! group), and a Node as the API server sends it is mostly managed fields, images, addresses,
//! capacity and four conditions nobody here reads.
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus};

use crate::keys;

use super::context::SCALE_DOWN_DISABLED;

/// Slims `node` in place to what the controller reads:
/// - metadata: name, uid, resourceVersion, deletionTimestamp, every label (the opt-in label, the
///   node-group label and the capacity type are configurable), and of the annotations only
///   spot-rebalancer's own (`spot-rebalancer.io/*`: the notices, the drain request) and
///   cluster-autoscaler's scale-down-disabled (set on a claimed replacement, removed at retirement);
/// - spec: providerID (the instance), taints, unschedulable;
/// - status: the `Ready` condition's type and status.
pub fn slim_node(node: &mut Node) {
    let meta = &mut node.metadata;
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| key.starts_with(keys::PREFIX) || key == SCALE_DOWN_DISABLED);
    }
    let spec = node.spec.take().unwrap_or_default();
    node.spec = Some(NodeSpec {
        provider_id: spec.provider_id,
        taints: spec.taints,
        unschedulable: spec.unschedulable,
        ..NodeSpec::default()
    });
    let ready = node
        .status
        .take()
        .and_then(|status| status.conditions)
        .map(|conditions| {
            conditions
                .into_iter()
                .filter(|condition| condition.type_ == "Ready")
                .map(|condition| NodeCondition {
                    type_: condition.type_,
                    status: condition.status,
                    ..NodeCondition::default()
                })
                .collect()
        });
    node.status = Some(NodeStatus {
        conditions: ready,
        ..NodeStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node;
    use serde_json::json;

    /// A Node as kwok and the kubelet write it, with a notice, a drain request, cluster-autoscaler's
    /// annotation and someone else's.
    fn full_node() -> Node {
        serde_json::from_value(json!({
            "metadata": {
                "name": "ip-10-0-1-17.ec2.internal",
                "uid": "6b1c7c1e-0000-0000-0000-000000000001",
                "resourceVersion": "4711",
                "generateName": "ip-",
                "finalizers": ["example.com/keep"],
                "ownerReferences": [{"apiVersion": "v1", "kind": "Thing", "name": "t", "uid": "u"}],
                "labels": {
                    "spot-rebalancer.io/enabled": "true",
                    "eks.amazonaws.com/nodegroup": "spot-workers",
                    "eks.amazonaws.com/capacityType": "SPOT",
                    "kubernetes.io/arch": "amd64"
                },
                "annotations": {
                    "spot-rebalancer.io/rebalance-notice-time": "2026-12-01T13:00:00Z",
                    "spot-rebalancer.io/drain-requested": "2026-12-01T13:01:00Z",
                    "cluster-autoscaler.kubernetes.io/scale-down-disabled": "true",
                    "node.alpha.kubernetes.io/ttl": "0",
                    "kwok.x-k8s.io/node": "fake",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true"
                },
                "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]
            },
            "spec": {
                "providerID": "aws:///us-east-1a/i-0abc12345",
                "podCIDR": "10.244.1.0/24",
                "podCIDRs": ["10.244.1.0/24"],
                "unschedulable": true,
                "taints": [{"key": "spot-instance-terminating", "value": "true", "effect": "NoSchedule"}]
            },
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.1.17"}],
                "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
                "conditions": [
                    {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                     "lastHeartbeatTime": "2026-12-01T13:00:00Z", "lastTransitionTime": "2026-12-01T12:00:00Z"},
                    {"type": "Ready", "status": "True", "reason": "KubeletReady",
                     "message": "kubelet is posting ready status",
                     "lastHeartbeatTime": "2026-12-01T13:00:00Z", "lastTransitionTime": "2026-12-01T12:00:00Z"}
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "images": [{"names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 320368}],
                "nodeInfo": {"architecture": "amd64", "bootID": "", "containerRuntimeVersion": "containerd://1.7",
                             "kernelVersion": "6.1", "kubeProxyVersion": "", "kubeletVersion": "v1.33.0",
                             "machineID": "", "operatingSystem": "linux", "osImage": "Bottlerocket",
                             "systemUUID": ""}
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_slimmed_node_keeps_exactly_what_the_controller_reads() {
        let mut node = full_node();
        slim_node(&mut node);
        assert_eq!(
            serde_json::to_value(&node).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {
                    "name": "ip-10-0-1-17.ec2.internal",
                    "uid": "6b1c7c1e-0000-0000-0000-000000000001",
                    "resourceVersion": "4711",
                    "labels": {
                        "spot-rebalancer.io/enabled": "true",
                        "eks.amazonaws.com/nodegroup": "spot-workers",
                        "eks.amazonaws.com/capacityType": "SPOT",
                        "kubernetes.io/arch": "amd64"
                    },
                    "annotations": {
                        "spot-rebalancer.io/rebalance-notice-time": "2026-12-01T13:00:00Z",
                        "spot-rebalancer.io/drain-requested": "2026-12-01T13:01:00Z",
                        "cluster-autoscaler.kubernetes.io/scale-down-disabled": "true"
                    }
                },
                "spec": {
                    "providerID": "aws:///us-east-1a/i-0abc12345",
                    "unschedulable": true,
                    "taints": [{"key": "spot-instance-terminating", "value": "true", "effect": "NoSchedule"}]
                },
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}
            })
        );
    }

    #[test]
    fn the_node_facts_read_the_same_before_and_after_slimming() {
        let full = full_node();
        let mut slim = full.clone();
        slim_node(&mut slim);
        assert_eq!(node::instance_id(&slim), node::instance_id(&full));
        assert_eq!(node::is_ready(&slim), node::is_ready(&full));
        assert_eq!(node::taints(&slim), node::taints(&full));
        assert_eq!(node::labels(&slim), node::labels(&full));
        for key in [
            keys::REBALANCE_NOTICE_TIME,
            keys::DRAIN_REQUESTED,
            SCALE_DOWN_DISABLED,
        ] {
            assert_eq!(
                node::annotations(&slim).get(key),
                node::annotations(&full).get(key)
            );
        }
        assert_eq!(slim.metadata.uid, full.metadata.uid);
        assert_eq!(slim.metadata.resource_version, full.metadata.resource_version);
    }

    #[test]
    fn a_node_not_ready_stays_not_ready_and_one_without_status_stays_unready() {
        let mut not_ready: Node = serde_json::from_value(json!({
            "metadata": {"name": "n"},
            "status": {"conditions": [{"type": "Ready", "status": "False"},
                                      {"type": "DiskPressure", "status": "True"}]}
        }))
        .unwrap();
        slim_node(&mut not_ready);
        assert!(!node::is_ready(&not_ready));
        assert_eq!(not_ready.status.unwrap().conditions.unwrap().len(), 1);

        let mut bare: Node = serde_json::from_value(json!({"metadata": {"name": "n"}})).unwrap();
        slim_node(&mut bare);
        assert!(!node::is_ready(&bare));
        assert_eq!(node::instance_id(&bare), None);
    }
}
