//! The controller decides on the right facts in a busy account: a baseline read fresh after another
//! actor scaled in, a partial capacity failure among coalesced notices, a scale-up call that is
//! refused for good, a replacement that never turns Ready, and a failed node tried again. Each on
//! the realistic bed (launches and terminations take time, capacity faults hit some launches only).
mod support;

use std::{collections::BTreeSet, time::Duration};

use serde_json::json;
use support::{
    controller::{Scenario, TaintOrderWatch, name_of, phase, record},
    instance_id,
};

const FLOW: Duration = Duration::from_secs(120);

/// What the controller's record holds on the given instance's abandoned scale-ups: (ASG, cause, undo kind).
async fn abandoned(t: &Scenario, node: &str) -> Vec<(String, String, String)> {
    let status = t
        .record_status(&t.node(node).await)
        .await
        .expect("a record for the noticed node");
    status["abandoned"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|a| {
                    (
                        a["asg"].as_str().unwrap_or_default().to_owned(),
                        a["cause"].as_str().unwrap_or_default().to_owned(),
                        a["undo"]["kind"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_scale_in_between_two_notices_is_not_scaled_over() {
    let t = Scenario::new("scale-in").await;
    let spot = t.spot_asg("spot", 3, 10).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let nodes = t.ready_nodes(&spot, 3).await;
    let (first, second) = (name_of(&nodes[0]), name_of(&nodes[1]));
    let third_instance = instance_id(&nodes[2]).unwrap();
    // The old nodes stay (tainted) until an interruption: the desired capacities stay readable.
    let mut controller =
        t.start_controller(&["--on-demand-asg-name", &on_demand, "--after-replacement", "keep"]);
    controller.wait_ready().await;

    t.notice(&first).await;
    t.wait_for_phase(&first, phase::TAINTED, FLOW).await;
    t.assert_desired_settles(&spot, 4, "3 + the first notice's replacement")
        .await;

    // cluster-autoscaler removes an empty node with a decrement: 4 → 3.
    let scaled_in = t.bed.neighbour_terminate(&spot, Some(&third_instance)).await;
    assert_eq!(scaled_in["instance"], json!(third_instance), "{scaled_in}");
    t.assert_desired_settles(&spot, 3, "after the foreign scale-in")
        .await;

    // The second notice starts from the desired capacity as it is now, not as this process last set it.
    t.notice(&second).await;
    let tainted = t.wait_for_phase(&second, phase::TAINTED, FLOW).await;
    let second_record = record(&tainted);
    assert_eq!(
        (second_record.baseline, second_record.target_desired),
        (Some(3), Some(4)),
        "{}",
        second_record.raw
    );
    t.assert_desired_settles(&spot, 4, "3 + the second notice's replacement, not 5")
        .await;
    let raised: Vec<Option<i64>> = t
        .set_desired_calls(&spot)
        .await
        .iter()
        .map(|call| call.desired_capacity)
        .collect();
    assert_eq!(
        raised,
        [Some(4), Some(4)],
        "one raise per notice, each to baseline + 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_capacity_failure_among_coalesced_notices_falls_back_for_the_failed_launch_only() {
    let t = Scenario::new("partial-ice").await;
    let spot = t.spot_asg("spot", 3, 10).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old: BTreeSet<String> = t.ready_nodes(&spot, 3).await.iter().map(name_of).collect();
    let old_instances: BTreeSet<String> = t.bed.in_service_instances(&spot).await.into_iter().collect();
    // The next launch on the spot ASG fails for capacity; the ones after it go through, and the ASG
    // does not retry the failed one for a minute (spot capacity in that pool stays gone).
    t.bed.set_timing(&spot, json!({"retry_delay": 60})).await;
    t.bed.arm_capacity_fault_with(&spot, json!({"count": 1})).await;
    let mut controller = t.start_controller(&[
        "--on-demand-asg-name",
        &on_demand,
        "--capacity-timeout",
        "60s",
        // A wide window, so the three notices share one call even on a loaded machine.
        "--coalesce-window",
        "1s",
        "--after-replacement",
        "keep",
    ]);
    controller.wait_ready().await;
    let watch = TaintOrderWatch::start(&t.bed, &[&spot, &on_demand]).await;

    futures::future::join_all(old.iter().map(|name| t.notice(name))).await;
    let mut capacity_types = Vec::new();
    for name in &old {
        let tainted = t.wait_for_phase(name, phase::TAINTED, FLOW).await;
        capacity_types.push(record(&tainted).capacity_type.unwrap_or_default());
    }
    capacity_types.sort();
    let raised: Vec<Option<i64>> = t
        .set_desired_calls(&spot)
        .await
        .iter()
        .map(|call| call.desired_capacity)
        .collect();
    assert_eq!(
        raised.first(),
        Some(&Some(6)),
        "one call for the three notices: {raised:?}"
    );
    assert_eq!(
        capacity_types,
        ["on-demand", "spot", "spot"],
        "one launch failed: one notice falls back, the two others keep their spot launches"
    );
    // Spot: 3 + the two launches that went through (a late retry of the failed one is taken back by
    // id); on-demand: the one fallback. No serving instance was ever terminated.
    t.assert_desired_settles(&spot, 5, "3 + two spot replacements")
        .await;
    t.assert_desired_settles(&on_demand, 1, "one on-demand replacement")
        .await;
    let terminated = t.terminated(&spot).await;
    let now_in_service: BTreeSet<String> = t.bed.in_service_instances(&spot).await.into_iter().collect();
    assert!(
        old_instances.is_subset(&now_in_service),
        "an old instance left the spot ASG: {old_instances:?} vs {now_in_service:?}; terminations {terminated:?}"
    );
    watch.assert_never_tainted_before_replacement_ready();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_up_refused_for_good_falls_back_with_the_reason_and_keeps_the_account_out_of_events() {
    let t = Scenario::new("denied").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    // Every SetDesiredCapacity on the spot ASG is denied (the role lacks the permission there).
    t.bed
        .arm_errors_on_asg("access-denied", &["SetDesiredCapacity"], &spot)
        .await;
    let mut controller = t.start_controller(&[
        "--on-demand-asg-name",
        &on_demand,
        "--capacity-timeout",
        "10s",
        "--retry-attempts",
        "1",
        "--after-replacement",
        "keep",
    ]);
    controller.wait_ready().await;

    t.notice(&old).await;
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;
    assert_eq!(record(&tainted).capacity_type.as_deref(), Some("on-demand"));
    assert_eq!(
        abandoned(&t, &old).await,
        // Nothing was raised on spot (every call was denied): nothing to take back.
        [(spot.clone(), "callFailing".to_owned(), "leave".to_owned())]
    );
    let events = t.events(&old).await;
    let fell_back = events
        .iter()
        .find(|e| e.reason == "SpotCapacityUnavailable")
        .expect("a SpotCapacityUnavailable Warning");
    assert!(
        fell_back.message.contains("has been failing"),
        "the Warning says why: {}",
        fell_back.message
    );
    for event in &events {
        assert!(
            !event.message.contains("123456789012") && !event.message.contains("arn:aws"),
            "an Event shows the account or a role: {event:?}"
        );
    }
    t.assert_desired_settles(&spot, 1, "nothing was raised on spot")
        .await;
    t.assert_desired_settles(&on_demand, 1, "the on-demand replacement")
        .await;
    t.bed.clear_errors().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_that_never_turns_ready_is_released_and_the_flow_falls_back() {
    let t = Scenario::new("released").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    // Every new spot Node registers but never turns Ready (a broken AMI, say).
    t.arm_not_ready(&spot).await;
    let mut controller = t.start_controller(&[
        "--on-demand-asg-name",
        &on_demand,
        "--replacement-ready-timeout",
        "8s",
        "--after-replacement",
        "keep",
    ]);
    controller.wait_ready().await;

    t.notice(&old).await;
    let tainted = t
        .wait_for_phase(&old, phase::TAINTED, Duration::from_secs(180))
        .await;
    assert_eq!(
        record(&tainted).capacity_type.as_deref(),
        Some("on-demand"),
        "two spot replacements never turned Ready: the third try is on-demand"
    );
    let released = abandoned(&t, &old).await;
    assert_eq!(
        released,
        [
            (spot.clone(), "neverReady".to_owned(), "terminate".to_owned()),
            (spot.clone(), "neverReady".to_owned(), "terminate".to_owned()),
        ]
    );
    // Each released instance was terminated by id with a decrement: spot is back at its baseline.
    assert_eq!(t.terminated(&spot).await.len(), 2, "the two released instances");
    t.assert_desired_settles(&spot, 1, "both releases decremented")
        .await;
    assert_eq!(
        controller
            .metric(
                "spot_rebalancer_replacements_released_total",
                &[("asg", spot.as_str())]
            )
            .await,
        2.0
    );
    assert!(
        t.events(&old)
            .await
            .iter()
            .any(|e| e.reason == "ReplacementReleased" && e.type_ == "Warning")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_node_is_tried_again_on_an_interruption_after_the_cool_down() {
    let t = Scenario::new("retried").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    t.bed.arm_capacity_fault(&spot).await;
    t.bed.arm_capacity_fault(&on_demand).await;
    let mut controller =
        t.start_controller(&["--on-demand-asg-name", &on_demand, "--failed-retry-after", "3s"]);
    controller.wait_ready().await;

    t.notice(&old).await;
    t.wait_for_phase(&old, phase::FAILED, FLOW).await;
    t.assert_desired_settles(&spot, 1, "the spot +1 taken back").await;

    // Capacity is back, and the instance gets its interruption notice: tainted at once, and the
    // replacement is tried again.
    t.bed.clear_capacity_fault(&spot).await;
    t.bed.clear_capacity_fault(&on_demand).await;
    t.interruption(&old).await;
    t.wait_for_event(&old, "a ReplacementRetried Event", |e| {
        e.reason == "ReplacementRetried"
    })
    .await;
    let replaced = t
        .wait_for_any_phase(
            &old,
            &[phase::TAINTED, phase::DRAINING, phase::DRAINED, phase::RETIRED],
            FLOW,
        )
        .await;
    let replacement = record(&replaced);
    assert_eq!(
        replacement.capacity_type.as_deref(),
        Some("spot"),
        "{}",
        replacement.raw
    );
    assert!(replacement.instance_id.is_some(), "{}", replacement.raw);
    assert_eq!(
        controller
            .metric("spot_rebalancer_replacements_retried_total", &[])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retirement_min_size_forbids_is_left_with_a_warning_not_retried() {
    let t = Scenario::new("min-size").await;
    // A fixed-size spot node group (MinSize = MaxSize = desired): the replacement comes from the
    // on-demand fallback, and retiring the old spot instance with a decrement would go below MinSize.
    let spot = t.spot_asg("spot", 2, 2).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 2).await[0]);
    support::autoscaling_client(&t.bed.aws_endpoint)
        .update_auto_scaling_group()
        .auto_scaling_group_name(&spot)
        .min_size(2)
        .send()
        .await
        .expect("MinSize 2");
    // Replace-then-retire is the default: no flag needed for the retirement.
    let mut controller = t.start_controller(&["--on-demand-asg-name", &on_demand]);
    controller.wait_ready().await;

    t.notice(&old).await;
    let drained = t.wait_for_any_phase(&old, &[phase::DRAINED], FLOW).await;
    let left = record(&drained);
    assert_eq!(left.capacity_type.as_deref(), Some("on-demand"), "{}", left.raw);
    assert!(
        left.reason.as_deref().is_some_and(|r| r.contains("MinSize")),
        "{}",
        left.raw
    );
    t.wait_for_event(&old, "a RetirementBelowMinSize Warning", |e| {
        e.type_ == "Warning" && e.reason == "RetirementBelowMinSize"
    })
    .await;
    assert_eq!(
        controller
            .metric(
                "spot_rebalancer_min_size_refusals_total",
                &[("asg", spot.as_str())]
            )
            .await,
        1.0
    );
    // No call AWS would refuse, now or a while later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        t.calls("TerminateInstanceInAutoScalingGroup", &spot)
            .await
            .is_empty()
    );
    assert_eq!(t.desired(&spot).await, 2);
}
