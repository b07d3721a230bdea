//! The controller on the real bed meets an EKS managed node group: an opted-in ASG that carries the
//! tags EKS puts on a managed node group's ASG and has Capacity Rebalancing on (as EKS sets it for a
//! spot managed node group). EKS replaces those nodes itself, so the controller tells the operator
//! so, and what to do, as soon as it leads: a Warning Event on a node of the group and a gauge.
mod support;

use std::time::Duration;

use support::controller::{Scenario, name_of, phase_of};

const MANAGED_CONFLICT: &str = "spot_rebalancer_asg_managed_nodegroup_conflict";
const CAPACITY_REBALANCING: &str = "spot_rebalancer_asg_capacity_rebalancing";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opted_in_managed_node_group_replacing_its_own_spot_nodes_is_warned_about_at_start() {
    let t = Scenario::new("managed-ng").await;
    let spot = t.spot_asg("spot", 2, 5).await;
    let self_managed = t.spot_asg("self", 1, 5).await;
    // What EKS puts on a managed node group's ASG; Capacity Rebalancing on, as EKS sets it for spot.
    t.tag_asg(&spot, "eks:nodegroup-name", &spot).await;
    t.tag_asg(&spot, "eks:cluster-name", "prod").await;
    t.capacity_rebalance_on(&spot).await;
    // A self-managed group with Capacity Rebalancing on gets the generic Warning, not this one.
    t.capacity_rebalance_on(&self_managed).await;
    let nodes: Vec<String> = t.ready_nodes(&spot, 2).await.iter().map(name_of).collect();
    let self_managed_node = name_of(&t.ready_nodes(&self_managed, 1).await[0]);
    let mut controller = t.start_controller(&[]);
    controller.wait_ready().await;

    let warning = support::eventually(
        "a ManagedNodeGroupReplacesItself Warning on a node of the group",
        Duration::from_secs(30),
        || async {
            for node in &nodes {
                let events = t.events(node).await;
                if let Some(event) = events
                    .into_iter()
                    .find(|e| e.type_ == "Warning" && e.reason == "ManagedNodeGroupReplacesItself")
                {
                    return Some(event);
                }
            }
            None
        },
    )
    .await;
    for needed in [
        spot.as_str(),
        "managed node group",
        "of cluster prod",
        "self-managed node group",
    ] {
        assert!(warning.message.contains(needed), "{needed:?} in {warning:?}");
    }
    assert_eq!(
        controller
            .metric(MANAGED_CONFLICT, &[("asg", spot.as_str())])
            .await,
        1.0
    );
    // Said once, as what it is: no generic Capacity Rebalancing Warning on the managed group's nodes.
    for node in &nodes {
        let events = t.events(node).await;
        assert!(
            !events.iter().any(|e| e.reason == "CapacityRebalancingEnabled"),
            "{events:?}"
        );
        assert_eq!(phase_of(&t.node(node).await), None, "a check writes no record");
    }
    t.wait_for_event(&self_managed_node, "a CapacityRebalancingEnabled Warning", |e| {
        e.reason == "CapacityRebalancingEnabled"
    })
    .await;
    assert!(
        !t.events(&self_managed_node)
            .await
            .iter()
            .any(|e| e.reason == "ManagedNodeGroupReplacesItself"),
        "a self-managed group is no managed node group"
    );
    assert_eq!(
        controller
            .metric(MANAGED_CONFLICT, &[("asg", self_managed.as_str())])
            .await,
        0.0
    );
    assert_eq!(
        controller
            .metric(CAPACITY_REBALANCING, &[("asg", spot.as_str())])
            .await,
        1.0
    );
    assert!(
        t.set_desired_calls(&spot).await.is_empty(),
        "a check scales nothing"
    );
}
