//! A look at the opted-in node groups as soon as this replica leads: an ASG with EC2 Capacity
//! Rebalancing switched on launches a replacement of its own on every notice, so it gets a Warning
//! Event (and a log line and a gauge) now, before the first notice doubles a replacement. When that
//! ASG is an EKS managed node group's, the Warning says so and what to do instead ([`nodegroup`]).
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Node;
use kube::{ResourceExt, runtime::events::EventType};
use tracing::{debug, info, warn};

use super::{context::Context, nodegroup};
use crate::{aws, node};

/// One opted-in node per node group (by `nodegroup_label`; a node without one stands for itself), so
/// that finding the groups' ASGs costs one lookup per group, not per node.
pub fn representatives<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    nodegroup_label: &str,
) -> BTreeMap<String, (String, String)> {
    let mut chosen = BTreeMap::new();
    for node in nodes {
        let Some(instance) = node::instance_id(node) else {
            continue;
        };
        let group = match node::labels(node).get(nodegroup_label) {
            Some(group) => format!("group/{group}"),
            None => format!("node/{}", node.name_any()),
        };
        chosen
            .entry(group)
            .or_insert_with(|| (instance.to_owned(), node.name_any()));
    }
    chosen
}

/// The ASGs to look at, each with the opted-in node its Warning goes to (`None` for a configured
/// ASG no opted-in node belongs to: it is warned about in the log only).
pub fn asgs_to_check(
    found: &BTreeMap<String, String>,
    representatives: &BTreeMap<String, (String, String)>,
    configured: &[Option<String>],
) -> BTreeMap<String, Option<String>> {
    let mut asgs: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (instance, node) in representatives.values() {
        if let Some(asg) = found.get(instance) {
            asgs.entry(asg.clone()).or_insert_with(|| Some(node.clone()));
        }
    }
    for asg in configured.iter().flatten() {
        asgs.entry(asg.clone()).or_insert(None);
    }
    asgs
}

/// Checks every opted-in node group's ASG (and the configured ones) once; errors are logged, never
/// fatal: the same check runs again when a notice first uses the ASG.
pub async fn capacity_rebalancing(ctx: Arc<Context>) {
    let opted_in = ctx.opted_in_nodes();
    let representatives = representatives(opted_in.iter().map(|n| n.as_ref()), &ctx.settings.nodegroup_label);
    debug!(
        nodes = opted_in.len(),
        groups = representatives.len(),
        "checking the opted-in node groups' ASGs"
    );
    let instances: Vec<String> = representatives.values().map(|(i, _)| i.clone()).collect();
    let found = if instances.is_empty() {
        BTreeMap::new()
    } else {
        ctx.metrics
            .aws_calls
            .with_label_values(&["DescribeAutoScalingInstances"])
            .inc_by(instances.len().div_ceil(aws::DESCRIBE_INSTANCES_BATCH) as u64);
        match ctx.aws.groups_of_instances(&instances).await {
            Ok(found) => found,
            Err(error) => {
                warn!(%error, "could not look up the opted-in node groups' ASGs at start");
                return;
            }
        }
    };
    let configured = [ctx.settings.spot_asg.clone(), ctx.settings.on_demand_asg.clone()];
    for (asg, node_name) in asgs_to_check(&found, &representatives, &configured) {
        let group = match ctx.group(&asg, true).await {
            Ok(group) => group,
            Err(error) => {
                warn!(%error, %asg, "could not read the ASG at start");
                continue;
            }
        };
        if !group.capacity_rebalance {
            continue;
        }
        let node = node_name.and_then(|name| ctx.all_nodes.find(|n| n.name_any() == name));
        // An EKS managed node group replaces its own spot nodes: that is the Warning to give (what
        // to do about it), not the generic one about Capacity Rebalancing.
        if let Some(conflict) = nodegroup::managed_conflict(&group) {
            ctx.metrics
                .managed_nodegroup_conflict
                .with_label_values(&[asg.as_str()])
                .set(1);
            warn!(%asg, "{conflict}");
            if let Some(node) = &node {
                ctx.event(
                    node,
                    EventType::Warning,
                    nodegroup::MANAGED_NODEGROUP_REASON,
                    conflict,
                )
                .await;
            }
            continue;
        }
        warn!(%asg, "EC2 Capacity Rebalancing is on: each notice may cost two replacement instances");
        if let Some(node) = &node {
            ctx.event(
                node,
                EventType::Warning,
                "CapacityRebalancingEnabled",
                super::decide::capacity_rebalancing_note(&asg),
            )
            .await;
        }
    }
    info!("checked the opted-in node groups' ASGs");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use k8s_openapi::api::core::v1::NodeSpec;
    use kube::api::ObjectMeta;

    fn node(name: &str, group: Option<&str>, instance: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: group.map(|g| [(keys::DEFAULT_NODEGROUP_LABEL.to_owned(), g.to_owned())].into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                provider_id: instance.map(|i| format!("aws:///us-east-1a/{i}")),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn one_node_stands_for_its_group_and_unlabelled_nodes_for_themselves() {
        let nodes = [
            node("a1", Some("a"), Some("i-a1")),
            node("a2", Some("a"), Some("i-a2")),
            node("b1", Some("b"), Some("i-b1")),
            node("loose", None, Some("i-loose")),
            node("no-provider", Some("c"), None),
        ];
        let chosen = representatives(&nodes, keys::DEFAULT_NODEGROUP_LABEL);
        let instances: Vec<&str> = chosen.values().map(|(i, _)| i.as_str()).collect();
        assert_eq!(instances, ["i-a1", "i-b1", "i-loose"]);
    }

    #[test]
    fn another_node_group_label_groups_by_that_label() {
        let mut nodes = [
            node("a1", Some("a"), Some("i-a1")),
            node("a2", Some("a"), Some("i-a2")),
        ];
        // Under a self-managed group's label, the EKS label means nothing: each node stands alone.
        assert_eq!(representatives(&nodes, "alpha.eksctl.io/nodegroup-name").len(), 2);
        for node in &mut nodes {
            node.labels_mut()
                .insert("alpha.eksctl.io/nodegroup-name".into(), "workers".into());
        }
        assert_eq!(representatives(&nodes, "alpha.eksctl.io/nodegroup-name").len(), 1);
    }

    #[test]
    fn configured_asgs_are_checked_even_without_a_node_and_found_ones_keep_their_node() {
        let representatives = BTreeMap::from([
            ("group/a".to_owned(), ("i-a1".to_owned(), "a1".to_owned())),
            ("node/x".to_owned(), ("i-x".to_owned(), "x".to_owned())),
        ]);
        let found = BTreeMap::from([("i-a1".to_owned(), "spot-a".to_owned())]);
        let asgs = asgs_to_check(
            &found,
            &representatives,
            &[Some("spot-a".into()), Some("od".into())],
        );
        assert_eq!(
            asgs,
            BTreeMap::from([
                ("od".to_owned(), None),
                ("spot-a".to_owned(), Some("a1".to_owned()))
            ])
        );
    }
}
