//! The test bed is real: ASGs created through the Auto Scaling API at moto become Ready Nodes in a
//! real Kubernetes API server, capacity faults launch nothing until cleared, and injected AWS errors
//! reach the SDK as AWS would send them.
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use support::{AsgSpec, Bed, eventually, instance_id, is_ready, unique};

const NODEGROUP: &str = "eks.amazonaws.com/nodegroup";
const CAPACITY_TYPE: &str = "eks.amazonaws.com/capacityType";

/// Ready nodes of `nodegroup`, once there are exactly `count` of them.
async fn ready_nodes(bed: &Bed, nodegroup: &str, count: usize) -> Vec<Node> {
    eventually(
        &format!("{count} Ready nodes in {nodegroup}"),
        Duration::from_secs(60),
        || async {
            let nodes = bed.nodes_labelled(NODEGROUP, nodegroup).await;
            (nodes.len() == count && nodes.iter().all(is_ready)).then_some(nodes)
        },
    )
    .await
}

#[tokio::test]
async fn spot_and_on_demand_asgs_become_ready_nodes() {
    let bed = Bed::connect().await;
    let spot = unique("spot");
    let on_demand = unique("od");
    let enabled = [("spot-rebalancer.io/enabled", "true")];
    bed.create_asg(AsgSpec {
        name: &spot,
        spot: true,
        desired: 0,
        max: 5,
        labels: &enabled,
    })
    .await;
    bed.create_asg(AsgSpec {
        name: &on_demand,
        spot: false,
        desired: 0,
        max: 5,
        labels: &[],
    })
    .await;

    for (asg, desired) in [(&spot, 2), (&on_demand, 1)] {
        bed.autoscaling
            .set_desired_capacity()
            .auto_scaling_group_name(asg.as_str())
            .desired_capacity(desired)
            .send()
            .await
            .expect("SetDesiredCapacity");
    }

    let spot_nodes = ready_nodes(&bed, &spot, 2).await;
    let on_demand_nodes = ready_nodes(&bed, &on_demand, 1).await;

    let mut spot_instances = bed.in_service_instances(&spot).await;
    let mut spot_node_instances: Vec<String> = spot_nodes.iter().filter_map(instance_id).collect();
    spot_instances.sort();
    spot_node_instances.sort();
    assert_eq!(
        spot_node_instances, spot_instances,
        "each spot instance is exactly one node"
    );
    for node in &spot_nodes {
        let labels = node.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[CAPACITY_TYPE], "SPOT");
        assert_eq!(
            labels["spot-rebalancer.io/enabled"], "true",
            "ASG label tags become node labels"
        );
        let provider_id = node.spec.as_ref().unwrap().provider_id.as_deref().unwrap();
        assert!(provider_id.starts_with("aws:///us-east-1a/i-"), "{provider_id}");
    }
    let labels = on_demand_nodes[0].metadata.labels.as_ref().unwrap();
    assert_eq!(labels[CAPACITY_TYPE], "ON_DEMAND");
    assert!(!labels.contains_key("spot-rebalancer.io/enabled"));
    assert_eq!(
        bed.in_service_instances(&on_demand).await,
        vec![instance_id(&on_demand_nodes[0]).unwrap()]
    );
}

#[tokio::test]
async fn a_node_goes_when_its_instance_goes() {
    let bed = Bed::connect().await;
    let asg = unique("shrink");
    bed.create_asg(AsgSpec {
        name: &asg,
        spot: true,
        desired: 1,
        max: 2,
        labels: &[],
    })
    .await;
    ready_nodes(&bed, &asg, 1).await;

    bed.autoscaling
        .set_desired_capacity()
        .auto_scaling_group_name(&asg)
        .desired_capacity(0)
        .send()
        .await
        .unwrap();

    eventually(
        "the node of the removed instance is deleted",
        Duration::from_secs(30),
        || async { bed.nodes_labelled(NODEGROUP, &asg).await.is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn spot_capacity_fault_launches_nothing_until_cleared() {
    let bed = Bed::connect().await;
    let asg = unique("nocap");
    bed.create_asg(AsgSpec {
        name: &asg,
        spot: true,
        desired: 0,
        max: 3,
        labels: &[],
    })
    .await;
    bed.arm_capacity_fault(&asg).await;

    bed.autoscaling
        .set_desired_capacity()
        .auto_scaling_group_name(&asg)
        .desired_capacity(1)
        .send()
        .await
        .expect("SetDesiredCapacity is accepted even when no capacity is there");

    let activities = eventually("a Failed scaling activity", Duration::from_secs(20), || async {
        let response = bed
            .autoscaling
            .describe_scaling_activities()
            .auto_scaling_group_name(&asg)
            .send()
            .await
            .unwrap();
        let failed: Vec<_> = response
            .activities()
            .iter()
            .filter(|a| a.status_code().map(|s| s.as_str()) == Some("Failed"))
            .cloned()
            .collect();
        (!failed.is_empty()).then_some(failed)
    })
    .await;
    let message = activities[0].status_message().unwrap_or_default();
    assert!(
        message.contains("InsufficientInstanceCapacity"),
        "the failure names capacity: {message}"
    );

    // Longer than the bridge's boot delay and several sync ticks: still nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        bed.in_service_instances(&asg).await.is_empty(),
        "no instance launches without capacity"
    );
    assert!(
        bed.nodes_labelled(NODEGROUP, &asg).await.is_empty(),
        "no node appears without capacity"
    );
    let group = bed
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(&asg)
        .send()
        .await
        .unwrap();
    assert_eq!(
        group.auto_scaling_groups()[0].desired_capacity(),
        Some(1),
        "the desired value is kept"
    );

    bed.clear_capacity_fault(&asg).await;
    let nodes = ready_nodes(&bed, &asg, 1).await;
    assert_eq!(
        bed.in_service_instances(&asg).await,
        vec![instance_id(&nodes[0]).unwrap()]
    );
}
