//! Whose node group an ASG is: an EKS managed node group's ASG (tagged by EKS) with Capacity
//! Rebalancing on already gets replace-then-drain from EKS on every rebalance recommendation, so
//! acting on it as well would launch a second replacement. Plain functions of the ASG as
//! DescribeAutoScalingGroups shows it. The controller warns about such a node group as soon as it
//! leads (`audit`); the replacement machine asks [`managed_conflict`] before acting on a notice.
use crate::{aws::Group, keys};

/// Reason of the Warning Event about such a node group.
pub const MANAGED_NODEGROUP_REASON: &str = "ManagedNodeGroupReplacesItself";

/// Who runs an ASG, as far as its tags tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// No EKS node group tag: an ASG the user runs (eksctl self-managed, Terraform, kOps, by hand).
    SelfManaged,
    /// The ASG of an EKS managed node group.
    EksManaged {
        nodegroup: String,
        cluster: Option<String>,
    },
}

/// Who runs `group`: EKS tags every managed node group's ASG with `eks:nodegroup-name` (and
/// `eks:cluster-name`); the `eks:` prefix is AWS's, so a user's own ASG does not carry it.
pub fn ownership(group: &Group) -> Ownership {
    let tag = |key: &str| {
        group
            .tags
            .get(key)
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    };
    match tag(keys::EKS_NODEGROUP_TAG) {
        Some(nodegroup) => Ownership::EksManaged {
            nodegroup,
            cluster: tag(keys::EKS_CLUSTER_TAG),
        },
        None => Ownership::SelfManaged,
    }
}

/// The Warning to give, once per ASG, when `group` belongs to an EKS managed node group with
/// Capacity Rebalancing on: EKS then launches a replacement for each rebalance recommendation,
/// waits until it is Ready and drains the old node itself, so a node of this group must not be
/// acted on as well (two replacements would race). `None`: nothing stands in the way.
///
/// A managed node group with Capacity Rebalancing off (an on-demand group, or one switched off by
/// hand) gets no such replacement from EKS, so it is not a conflict.
pub fn managed_conflict(group: &Group) -> Option<String> {
    let Ownership::EksManaged { nodegroup, cluster } = ownership(group) else {
        return None;
    };
    if !group.capacity_rebalance {
        return None;
    }
    let cluster = cluster.map_or_else(String::new, |cluster| format!(" of cluster {cluster}"));
    Some(format!(
        "ASG {asg} belongs to EKS managed node group {nodegroup}{cluster}, which has Capacity Rebalancing on: \
         EKS already replaces its spot nodes on a rebalance recommendation (replacement first, then drain), \
         so spot-rebalancer must not act on its nodes as well (two replacements would race). \
         To use spot-rebalancer (on-demand fallback, PDB-paced drain), run these nodes in a self-managed \
         node group; otherwise remove the spot-rebalancer.io/enabled label and ASG tag from this node group",
        asg = group.name,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(tags: &[(&str, &str)], capacity_rebalance: bool) -> Group {
        let mut group = Group::for_tests("eks-spot-workers-6ec5", 2, 5, &[]);
        group.tags = tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        group.capacity_rebalance = capacity_rebalance;
        group
    }

    #[test]
    fn an_asg_without_eks_tags_is_self_managed_and_never_a_conflict() {
        let plain = group(&[(keys::ENABLED_LABEL, "true")], true);
        assert_eq!(ownership(&plain), Ownership::SelfManaged);
        assert_eq!(managed_conflict(&plain), None);
    }

    #[test]
    fn the_eks_nodegroup_tag_makes_a_managed_node_group_with_its_cluster() {
        let managed = group(
            &[
                (keys::EKS_NODEGROUP_TAG, "spot-workers"),
                (keys::EKS_CLUSTER_TAG, "prod"),
            ],
            false,
        );
        assert_eq!(
            ownership(&managed),
            Ownership::EksManaged {
                nodegroup: "spot-workers".into(),
                cluster: Some("prod".into())
            }
        );
    }

    #[test]
    fn a_cluster_tag_alone_or_an_empty_nodegroup_tag_is_not_a_managed_node_group() {
        // eksctl and Terraform self-managed groups may carry the cluster's name in other tags; only
        // the node group tag, which EKS sets on the ASGs it creates, says "managed".
        assert_eq!(
            ownership(&group(&[(keys::EKS_CLUSTER_TAG, "prod")], true)),
            Ownership::SelfManaged
        );
        assert_eq!(
            ownership(&group(&[(keys::EKS_NODEGROUP_TAG, " ")], true)),
            Ownership::SelfManaged
        );
    }

    #[test]
    fn a_managed_node_group_with_capacity_rebalancing_is_a_conflict_that_says_what_to_do() {
        let managed = group(
            &[
                (keys::EKS_NODEGROUP_TAG, "spot-workers"),
                (keys::EKS_CLUSTER_TAG, "prod"),
            ],
            true,
        );
        let warning = managed_conflict(&managed).expect("a conflict");
        for needed in [
            "eks-spot-workers-6ec5",
            "managed node group spot-workers of cluster prod",
            "Capacity Rebalancing",
            "self-managed node group",
            "spot-rebalancer.io/enabled",
        ] {
            assert!(warning.contains(needed), "{needed:?} missing from: {warning}");
        }
    }

    #[test]
    fn a_managed_node_group_without_capacity_rebalancing_is_no_conflict() {
        let managed = group(&[(keys::EKS_NODEGROUP_TAG, "od-workers")], false);
        assert_eq!(managed_conflict(&managed), None);
    }

    #[test]
    fn a_conflict_without_a_cluster_tag_still_names_the_node_group() {
        let managed = group(&[(keys::EKS_NODEGROUP_TAG, "spot-workers")], true);
        let warning = managed_conflict(&managed).expect("a conflict");
        assert!(
            warning.contains("managed node group spot-workers, which"),
            "{warning}"
        );
    }
}
