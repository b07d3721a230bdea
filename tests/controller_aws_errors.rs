//! The controller through a flaky AWS: throttling and 5xx on about 30 % of all AWS calls, and a look
//! at the ASGs at start that fails. The bed's error rules apply to every call it answers, so these
//! scenarios have a test binary of their own (cargo runs test binaries one after another) and take
//! turns within it.
mod support;

use std::{collections::BTreeSet, time::Duration};

use support::{
    controller::{Scenario, TaintOrderWatch, name_of, phase, record},
    instance_id,
};

/// The armed rules are global, so the tests in this binary take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_through_throttling_and_server_errors_without_doubling() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let t = Scenario::new("flaky").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    let mut controller = t.start_controller(&[
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        &on_demand,
        "--capacity-timeout",
        "60s",
    ]);
    controller.wait_ready().await;
    let watch = TaintOrderWatch::start(&t.bed, &[&spot, &on_demand]).await;

    // The scale-up itself first meets two 5xx (the SDK retries the same target); then throttling
    // on 15 % of all calls and 5xx on 18 % of the rest: about 30 % fail. Seed 1 makes the very first
    // call of the random rules a throttle.
    t.arm_errors_on("server", 1.0, 2, 3, Some(&["SetDesiredCapacity"]))
        .await;
    t.arm_errors("throttling", 0.15, 60, 1).await;
    t.arm_errors("server", 0.18, 60, 2).await;
    t.notice(&old).await;
    let tainted = t
        .wait_for_phase(&old, phase::TAINTED, Duration::from_secs(180))
        .await;
    let injected = t.injected_errors().await;
    t.bed.clear_errors().await;
    let spot_calls = t.all_calls(&spot).await;
    eprintln!(
        "{injected} errors injected in all; calls on {spot}: {:?}",
        spot_calls
            .iter()
            .map(|c| (c.action.as_str(), c.status, c.injected_error.as_deref()))
            .collect::<Vec<_>>()
    );
    assert!(
        injected >= 1,
        "no error was injected: the scenario tested nothing"
    );

    // Nothing doubled: one target, desired + 1, one new instance, spot (errors are not capacity).
    let record = record(&tainted);
    assert_eq!(record.capacity_type.as_deref(), Some("spot"), "{}", record.raw);
    let targets: Vec<_> = t
        .set_desired_calls(&spot)
        .await
        .iter()
        .map(|c| c.desired_capacity)
        .collect();
    assert!(
        !targets.is_empty() && targets.iter().all(|desired| *desired == Some(2)),
        "scale-ups that reached moto: {targets:?}"
    );
    t.assert_desired_settles(&spot, 2, "baseline + 1").await;
    t.assert_desired_settles(&on_demand, 0, "the fallback untouched")
        .await;
    let claimed = record.instance_id.clone().expect("a claimed instance");
    assert_eq!(
        t.asg(&spot).await.in_service(),
        BTreeSet::from([old_instance, claimed])
    );
    watch.assert_never_tainted_before_replacement_ready();
    assert!(controller.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_look_at_the_asgs_at_start_is_logged_and_the_first_notice_still_warns() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let t = Scenario::new("audit-fails").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    t.capacity_rebalance_on(&spot).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);

    // Every attempt of the start-up DescribeAutoScalingInstances fails (3 attempts: the SDK's retries).
    t.arm_errors_on("server", 1.0, 3, 4, Some(&["DescribeAutoScalingInstances"]))
        .await;
    let mut controller = t.start_controller(&[
        "--on-demand-asg-name",
        &on_demand,
        "--retry-attempts",
        "3",
        "--after-replacement",
        "keep",
    ]);
    controller.wait_ready().await;
    let logged = support::eventually(
        "the start-up check's error in the log",
        Duration::from_secs(30),
        || {
            let log = controller.log();
            async move {
                log.contains("could not look up the opted-in node groups' ASGs at start")
                    .then_some(log)
            }
        },
    )
    .await;
    assert!(
        logged.contains("DescribeAutoScalingInstances"),
        "the error names the failing call: {logged}"
    );
    t.bed.clear_errors().await;
    assert!(
        t.events(&old)
            .await
            .iter()
            .all(|e| e.reason != "CapacityRebalancingEnabled"),
        "no Warning from a check that could not look"
    );

    // Nothing is lost: the first notice on the ASG still warns, and the replacement goes through.
    t.notice(&old).await;
    t.wait_for_event(&old, "a CapacityRebalancingEnabled Warning", |e| {
        e.type_ == "Warning" && e.reason == "CapacityRebalancingEnabled"
    })
    .await;
    t.wait_for_phase(&old, phase::TAINTED, Duration::from_secs(90))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_up_failing_again_and_again_warns_on_the_node_once_and_goes_on_when_aws_recovers() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let t = Scenario::new("keeps-failing").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    let mut controller = t.start_controller(&[
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        &on_demand,
        "--retry-attempts",
        "1",
        "--capacity-timeout",
        "60s",
    ]);
    controller.wait_ready().await;

    // Four SetDesiredCapacity calls in a row fail (one attempt each, retried after up to 2, 4, 8 s): a
    // streak past the threshold of three, then AWS is back.
    t.arm_errors_on("server", 1.0, 4, 5, Some(&["SetDesiredCapacity"]))
        .await;
    t.notice(&old).await;
    let events = t
        .wait_for_event(&old, "a ReconcileFailing Warning", |e| {
            e.type_ == "Warning" && e.reason == "ReconcileFailing"
        })
        .await;
    let warning = events.iter().find(|e| e.reason == "ReconcileFailing").unwrap();
    assert!(
        warning.message.contains("SetDesiredCapacity") && warning.message.contains(&spot),
        "the Warning names the failing call and its ASG: {}",
        warning.message
    );

    // The errors run out: the replacement goes through, scaled once to baseline + 1.
    t.wait_for_phase(&old, phase::TAINTED, Duration::from_secs(120))
        .await;
    t.bed.clear_errors().await;
    t.assert_desired_settles(&spot, 2, "baseline + 1").await;
    assert!(
        controller
            .metric(
                "spot_rebalancer_reconcile_errors_total",
                &[("kind", "set_desired")]
            )
            .await
            >= 3.0
    );
    // The retries backed off (the shared backoff: each wait drawn from the upper half of a ceiling
    // doubling from 2 s): 2 to 4 s after the second failure, 4 to 8 s after the third. (The first
    // one may come at once: the record written before the call is a change, reconciled straight away.)
    let failed: Vec<jiff::Timestamp> = t
        .all_calls(&spot)
        .await
        .iter()
        .filter(|call| call.action == "SetDesiredCapacity" && call.injected_error.is_some())
        .map(|call| call.time.parse().expect("a call's time"))
        .collect();
    assert_eq!(failed.len(), 4, "{failed:?}");
    let gap = |i: usize| failed[i + 1].duration_since(failed[i]).as_secs_f64();
    assert!(
        gap(1) >= 1.9 && gap(2) >= 3.9,
        "retried after {:.1} s, {:.1} s, {:.1} s",
        gap(0),
        gap(1),
        gap(2)
    );
    let warnings: BTreeSet<String> = t
        .events(&old)
        .await
        .into_iter()
        .filter(|e| e.reason == "ReconcileFailing")
        .map(|e| e.message)
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one Warning for one streak of failures: {warnings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interruption_taints_at_once_while_every_aws_call_fails() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let t = Scenario::new("aws-down").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let old = name_of(&old_node);
    let mut controller = t.start_controller(&[]);
    controller.wait_ready().await;

    // AWS answers every call with a 5xx; then the spot interruption notice arrives. The node dies in
    // two minutes whatever AWS does, so it is tainted at once, before any AWS call succeeds.
    t.arm_errors("server", 1.0, 100_000, 4).await;
    t.interruption(&old).await;
    let tainted = t.wait_for_taint(&old, Duration::from_secs(30)).await;
    t.wait_for_event(&old, "a TaintedOnInterruption Event", |e| {
        e.reason == "TaintedOnInterruption"
    })
    .await;
    let injected = t.injected_errors().await;
    t.bed.clear_errors().await;
    assert!(
        injected >= 1,
        "no AWS call was refused: the scenario tested nothing"
    );
    assert!(support::controller::termination_taint(&tainted).is_some());
    assert!(
        t.set_desired_calls(&spot).await.is_empty(),
        "a scale-up went through while every call failed"
    );
    assert!(controller.is_running());
}
