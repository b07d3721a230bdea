//! The controller on the real bed: spot ASGs in moto become Ready Nodes, a test writes the notice the
//! agent would write, and the real controller process must scale first, wait for the replacement to be
//! Ready, fall back to on-demand when spot capacity is gone, and only then taint. Each test has its own
//! opt-in label, lease and ASGs, and asserts on the cluster (phase, record, taint, Events) and on moto
//! (desired capacities, the calls the bed logged, activities).
//!
//! Injected AWS errors are global to the bed, so that scenario lives in `controller_aws_errors.rs`.
mod support;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use serde_json::json;
use support::{
    agent::{AgentConfig, AgentProcess, Answer, FakeImds},
    controller::{
        REBALANCE_NOTICE_TIME, SCALE_DOWN_DISABLED, Scenario, TaintOrderWatch, annotation, name_of, phase,
        phase_of, record, termination_taint,
    },
    identity::{Role, role_kubeconfig},
    instance_id, is_ready,
};

/// Generous bound for a whole replacement flow on a busy 2-core machine (it takes seconds).
const FLOW: Duration = Duration::from_secs(90);

const NOTICES: &str = "spot_rebalancer_controller_notices_total";
const SCALE_UPS: &str = "spot_rebalancer_scale_ups_total";
const FALLBACKS: &str = "spot_rebalancer_fallbacks_total";
const TAINTS: &str = "spot_rebalancer_taints_total";
const READY_SECONDS_COUNT: &str = "spot_rebalancer_replacement_ready_seconds_count";
const FAILED: &str = "spot_rebalancer_replacements_failed_total";
const NODES_IN_PHASE: &str = "spot_rebalancer_nodes";
const CAPACITY_REBALANCING: &str = "spot_rebalancer_asg_capacity_rebalancing";
const AWS_CALLS: &str = "spot_rebalancer_aws_calls_total";

/// A real spot launch failure that is not about capacity.
const SPOT_PRICE_TOO_LOW: &str = "Your Spot request price of 0.001 is lower than the minimum required Spot \
    request fulfillment price of 0.0375. Launching EC2 instance failed.";

/// Every phase from the first scale-up on.
const SCALING_OR_LATER: [&str; 6] = [
    phase::SCALING_SPOT,
    phase::SCALING_ON_DEMAND,
    phase::AWAITING_READY,
    phase::TAINTED,
    phase::FAILED,
    phase::SKIPPED,
];

fn ids(nodes: &[k8s_openapi::api::core::v1::Node]) -> BTreeSet<String> {
    nodes.iter().filter_map(instance_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_a_noticed_spot_node_before_tainting_it() {
    let t = Scenario::new("happy").await;
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
        "20s",
    ]);
    controller.wait_ready().await;
    let watch = TaintOrderWatch::start(&t.bed, &[&spot, &on_demand]).await;

    // The agent's notice arrives: the controller scales the node's own spot ASG first.
    t.notice(&old).await;
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;

    // The taint is there, and at no state the watch saw was it there before the replacement was Ready.
    let taint = termination_taint(&tainted).expect("a Tainted node carries the termination taint");
    assert_eq!(
        (taint.value.as_deref(), taint.effect.as_str()),
        (Some("true"), "NoSchedule")
    );
    support::eventually("the watch sees the taint", Duration::from_secs(10), || async {
        watch.tainted().contains(&old).then_some(())
    })
    .await;
    watch.assert_never_tainted_before_replacement_ready();
    assert!(
        watch.observations() >= 3,
        "the watch saw only {} states",
        watch.observations()
    );

    // The record tells the story: spot ASG, baseline 1, target 2, the claimed replacement.
    let record = record(&tainted);
    assert_eq!(record.spot_asg.as_deref(), Some(spot.as_str()), "{}", record.raw);
    assert_eq!(record.asg.as_deref(), Some(spot.as_str()), "{}", record.raw);
    assert_eq!(record.capacity_type.as_deref(), Some("spot"), "{}", record.raw);
    assert_eq!(
        (record.baseline, record.target_desired),
        (Some(1), Some(2)),
        "{}",
        record.raw
    );
    assert_eq!(
        record.pre_scale_instances.as_deref(),
        Some(&[old_instance.clone()][..]),
        "{}",
        record.raw
    );
    for (field, value) in [
        ("detectedAt", &record.detected_at),
        ("scaleRequestedAt", &record.scale_requested_at),
        ("readyAt", &record.ready_at),
        ("taintedAt", &record.tainted_at),
    ] {
        assert!(value.is_some(), "the record has no {field}: {}", record.raw);
    }
    let claimed = record.instance_id.clone().expect("a claimed instance");
    assert_ne!(
        claimed, old_instance,
        "the old node cannot be its own replacement"
    );

    // The replacement is a new InService instance of the spot ASG, its Node Ready and protected
    // from cluster-autoscaler's scale-down.
    let group = t.asg(&spot).await;
    assert_eq!(
        group.in_service(),
        BTreeSet::from([old_instance.clone(), claimed.clone()])
    );
    let replacement = t
        .node(record.node.as_deref().expect("the claimed node's name"))
        .await;
    assert_eq!(instance_id(&replacement).as_deref(), Some(claimed.as_str()));
    assert!(is_ready(&replacement));
    assert_eq!(
        annotation(&replacement, SCALE_DOWN_DISABLED),
        Some("true"),
        "the replacement must not be scaled down as empty"
    );

    // At moto: one idempotent target, desired +1 and staying there, the fallback untouched.
    let calls = t.set_desired_calls(&spot).await;
    assert!(!calls.is_empty(), "no SetDesiredCapacity reached moto");
    assert!(
        calls.iter().all(|call| call.desired_capacity == Some(2)),
        "every SetDesiredCapacity carries the target 2: {calls:?}"
    );
    t.assert_desired_settles(&spot, 2, "baseline + 1").await;
    assert!(t.calls("SetDesiredCapacity", &on_demand).await.is_empty());
    assert_eq!(t.desired(&on_demand).await, 0);

    // `kubectl describe node` tells the story; the metrics count it.
    let events = t.events(&old).await;
    let reasons: BTreeSet<&str> = events.iter().map(|event| event.reason.as_str()).collect();
    assert!(
        reasons.len() >= 3,
        "an Event per transition, got reasons {reasons:?}: {events:?}"
    );
    assert!(
        events.iter().all(|event| event.type_ != "Warning"),
        "no Warning on the happy path: {events:?}"
    );
    assert!(controller.metric(NOTICES, &[]).await >= 1.0);
    assert!(controller.metric(SCALE_UPS, &[("capacity_type", "spot")]).await >= 1.0);
    assert!(controller.metric(TAINTS, &[]).await >= 1.0);
    assert!(controller.metric(READY_SECONDS_COUNT, &[]).await >= 1.0);
    assert_eq!(controller.metric(FALLBACKS, &[]).await, 0.0);
    // The phase census (refreshed every 10 s from the Node cache) counts the node as Tainted.
    support::eventually(
        "the census counts the Tainted node",
        Duration::from_secs(25),
        || async {
            (controller
                .metric(NODES_IN_PHASE, &[("phase", phase::TAINTED)])
                .await
                == 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        controller
            .metric(NODES_IN_PHASE, &[("phase", phase::AWAITING_READY)])
            .await,
        0.0
    );

    let status = controller.terminate();
    assert!(status.success(), "the controller exited with {status} on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_on_demand_when_spot_capacity_is_gone() {
    let t = Scenario::new("fallback").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    t.bed.arm_capacity_fault(&spot).await;
    // A capacity timeout longer than the wait below: the fallback must come from the Failed activity.
    let mut controller = t.start_controller(&[
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        &on_demand,
        "--capacity-timeout",
        "10m",
    ]);
    controller.wait_ready().await;
    let watch = TaintOrderWatch::start(&t.bed, &[&spot, &on_demand]).await;

    t.notice(&old).await;
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;

    // Spot was tried (and failed for capacity), then on-demand gave the replacement.
    let spot_targets: Vec<_> = t
        .set_desired_calls(&spot)
        .await
        .iter()
        .map(|c| c.desired_capacity)
        .collect();
    assert!(
        spot_targets.contains(&Some(2)),
        "spot was tried first: {spot_targets:?}"
    );
    let failed = t.activities(&spot).await;
    assert!(
        failed.iter().any(|a| a.status == "Failed"),
        "the bed recorded the spot failure: {failed:?}"
    );
    let record = record(&tainted);
    assert_eq!(
        record.capacity_type.as_deref(),
        Some("on-demand"),
        "{}",
        record.raw
    );
    assert_eq!(record.asg.as_deref(), Some(on_demand.as_str()), "{}", record.raw);
    assert_eq!(record.spot_asg.as_deref(), Some(spot.as_str()), "{}", record.raw);
    assert_eq!(
        record.on_demand_asg.as_deref(),
        Some(on_demand.as_str()),
        "{}",
        record.raw
    );
    let claimed = record.instance_id.clone().expect("a claimed instance");
    assert_eq!(
        t.asg(&on_demand).await.in_service(),
        BTreeSet::from([claimed.clone()])
    );
    let replacement = t
        .node(record.node.as_deref().expect("the claimed node's name"))
        .await;
    assert_eq!(instance_id(&replacement).as_deref(), Some(claimed.as_str()));
    assert_eq!(annotation(&replacement, SCALE_DOWN_DISABLED), Some("true"));
    watch.assert_never_tainted_before_replacement_ready();

    // On-demand at baseline + 1; the abandoned spot scale-up undone, the serving node untouched.
    t.assert_desired_settles(&on_demand, 1, "on-demand baseline + 1")
        .await;
    t.assert_desired_settles(&spot, 1, "spot back at its baseline")
        .await;
    assert_eq!(t.asg(&spot).await.in_service(), BTreeSet::from([old_instance]));
    t.node(&old).await;

    assert!(controller.metric(FALLBACKS, &[]).await >= 1.0);
    assert!(
        controller
            .metric(SCALE_UPS, &[("capacity_type", "on-demand")])
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_capacity_returning_after_the_fallback_began_terminates_no_serving_node() {
    let t = Scenario::new("late").await;
    // Two serving nodes: if the spot ASG were shrunk by SetDesiredCapacity, it could pick either.
    let spot = t.spot_asg("spot", 2, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let serving = t.ready_nodes(&spot, 2).await;
    let serving_instances = ids(&serving);
    let old = name_of(&serving[0]);
    t.bed.arm_capacity_fault(&spot).await;
    let mut controller = t.start_controller(&[
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        &on_demand,
        "--capacity-timeout",
        "10m",
    ]);
    controller.wait_ready().await;

    t.notice(&old).await;
    // The moment the on-demand scale-up is sent, spot capacity comes back (watched every 10 ms, so
    // the spot ASG usually still asks for the abandoned +1 and launches it at once).
    let deadline = Instant::now() + FLOW;
    while t.set_desired_calls(&on_demand).await.is_empty() {
        assert!(Instant::now() < deadline, "no on-demand scale-up within {FLOW:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let spot_desired_then = t.desired(&spot).await;
    let response = t.clear_capacity_fault(&spot).await;
    eprintln!("spot capacity back while spot desired was {spot_desired_then}; launched: {response}");

    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;
    let record = record(&tainted);
    assert_eq!(
        record.capacity_type.as_deref(),
        Some("on-demand"),
        "{}",
        record.raw
    );

    // Both desired capacities end exactly where they should, and stay there.
    t.assert_desired_settles(&spot, 2, "spot at its baseline").await;
    t.assert_desired_settles(&on_demand, 1, "on-demand baseline + 1")
        .await;

    // No instance that was serving was terminated, whatever happened to the late one.
    let activities = t.activities(&spot).await;
    let terminated: Vec<_> = activities
        .iter()
        .filter(|a| a.description.starts_with("Terminating"))
        .filter(|a| {
            serving_instances
                .iter()
                .any(|id| a.description.contains(id.as_str()))
        })
        .collect();
    assert!(
        terminated.is_empty(),
        "a serving instance was terminated: {terminated:?}\nspot calls: {:?}\nactivities: {activities:?}",
        t.calls("SetDesiredCapacity", &spot).await
    );
    support::eventually(
        "only the serving instances left in spot",
        Duration::from_secs(30),
        || async { (t.asg(&spot).await.in_service() == serving_instances).then_some(()) },
    )
    .await;
    for node in &serving {
        t.node(&name_of(node)).await;
    }
    assert_eq!(t.asg(&on_demand).await.in_service().len(), 1);
    assert!(controller.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_without_tainting_when_neither_spot_nor_on_demand_has_capacity() {
    let t = Scenario::new("nocap").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    t.bed.arm_capacity_fault(&spot).await;
    t.bed.arm_capacity_fault(&on_demand).await;
    let mut controller =
        t.start_controller(&["--on-demand-asg-name", &on_demand, "--capacity-timeout", "20s"]);
    controller.wait_ready().await;
    let watch = TaintOrderWatch::start(&t.bed, &[&spot, &on_demand]).await;

    t.notice(&old).await;
    let failed = t
        .wait_for_phase(&old, phase::FAILED, Duration::from_secs(120))
        .await;

    let record = record(&failed);
    assert!(
        record.reason.as_deref().is_some_and(|reason| !reason.is_empty()),
        "a Failed record says why: {}",
        record.raw
    );
    assert!(termination_taint(&failed).is_none(), "no replacement, no taint");
    t.wait_for_event(&old, "a Warning Event", |event| event.type_ == "Warning")
        .await;
    assert!(controller.metric(FAILED, &[]).await >= 1.0);

    // Rule 10: what this controller added is undone, so nothing launches when capacity returns.
    t.assert_desired_settles(&spot, 1, "spot back at its baseline")
        .await;
    t.assert_desired_settles(&on_demand, 0, "on-demand back at its baseline")
        .await;
    let still = t.node(&old).await;
    assert_eq!(phase_of(&still).as_deref(), Some(phase::FAILED));
    assert!(termination_taint(&still).is_none());
    assert!(
        watch.tainted().is_empty(),
        "a node was tainted: {:?}",
        watch.tainted()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warns_at_start_about_an_asg_with_capacity_rebalancing_on() {
    let t = Scenario::new("rebalancing").await;
    let spot = t.spot_asg("spot", 2, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    t.capacity_rebalance_on(&spot).await;
    let nodes: Vec<String> = t.ready_nodes(&spot, 2).await.iter().map(name_of).collect();
    let mut controller = t.start_controller(&["--on-demand-asg-name", &on_demand]);
    controller.wait_ready().await;

    // No notice at all: the Warning comes from the look at the node groups on taking the lead.
    let warned = eventually_warned(&t, &nodes).await;
    assert!(warned.message.contains(&spot), "{warned:?}");
    support::eventually("the gauge shows the ASG", Duration::from_secs(20), || async {
        let gauge = controller
            .metric(CAPACITY_REBALANCING, &[("asg", spot.as_str())])
            .await;
        (gauge == 1.0).then_some(())
    })
    .await;
    assert!(
        t.set_desired_calls(&spot).await.is_empty(),
        "a check scales nothing"
    );
    for node in &nodes {
        assert_eq!(phase_of(&t.node(node).await), None, "a check writes no record");
    }
}

/// The first CapacityRebalancingEnabled Warning about any of `nodes`.
async fn eventually_warned(t: &Scenario, nodes: &[String]) -> support::controller::NodeEvent {
    support::eventually(
        "a CapacityRebalancingEnabled Warning",
        Duration::from_secs(30),
        || async {
            for node in nodes {
                if let Some(event) = t
                    .events(node)
                    .await
                    .into_iter()
                    .find(|e| e.type_ == "Warning" && e.reason == "CapacityRebalancingEnabled")
                {
                    return Some(event);
                }
            }
            None
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_asg_at_its_max_size_falls_back_or_surges_as_configured() {
    let t = Scenario::new("at-max").await;
    // Without surging, an ASG at MaxSize has no room: the on-demand fallback replaces the node.
    let full = t.spot_asg("full", 1, 1).await;
    let surging = t.spot_asg("surging", 1, 1).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let capped = name_of(&t.ready_nodes(&full, 1).await[0]);
    let mut controller =
        t.start_controller(&["--after-replacement", "keep", "--on-demand-asg-name", &on_demand]);
    controller.wait_ready().await;
    t.notice(&capped).await;
    let tainted = t.wait_for_phase(&capped, phase::TAINTED, FLOW).await;
    assert_eq!(record(&tainted).asg, Some(on_demand.clone()));
    assert_eq!(
        (t.asg(&full).await.desired, t.asg(&full).await.max),
        (1, 1),
        "the full ASG is untouched"
    );
    drop(controller);

    // With --surge-above-max the controller raises MaxSize with the desired capacity (AWS refuses,
    // and the bed too, a SetDesiredCapacity above MaxSize).
    let surged = name_of(&t.ready_nodes(&surging, 1).await[0]);
    let mut controller = t.start_controller(&[
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        &on_demand,
        "--surge-above-max",
    ]);
    controller.wait_ready().await;
    t.notice(&surged).await;
    let tainted = t.wait_for_phase(&surged, phase::TAINTED, FLOW).await;
    assert_eq!(record(&tainted).asg, Some(surging.clone()));
    let asg = t.asg(&surging).await;
    assert_eq!(
        (asg.desired, asg.max),
        (2, 2),
        "MaxSize raised with the desired capacity"
    );
    assert!(
        t.set_desired_calls(&surging).await.is_empty(),
        "no SetDesiredCapacity above MaxSize"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skips_a_node_whose_instance_is_in_no_asg() {
    let t = Scenario::new("noasg").await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let standalone = name_of(&t.standalone_instance().await);
    let mut controller =
        t.start_controller(&["--on-demand-asg-name", &on_demand, "--capacity-timeout", "20s"]);
    controller.wait_ready().await;

    t.notice(&standalone).await;
    let skipped = t.wait_for_phase(&standalone, phase::SKIPPED, FLOW).await;

    let record = record(&skipped);
    assert!(
        record.reason.as_deref().is_some_and(|reason| !reason.is_empty()),
        "a Skipped record says why: {}",
        record.raw
    );
    assert!(termination_taint(&skipped).is_none());
    t.wait_for_event(&standalone, "a Warning Event", |event| event.type_ == "Warning")
        .await;
    // It stays skipped: no taint later, and no fallback scale-up for a node that has no group.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = t.node(&standalone).await;
    assert_eq!(phase_of(&still).as_deref(), Some(phase::SKIPPED));
    assert!(termination_taint(&still).is_none());
    assert!(t.calls("SetDesiredCapacity", &on_demand).await.is_empty());
    assert_eq!(t.desired(&on_demand).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_notices_on_one_asg_coalesce_into_a_few_calls_and_ten_distinct_replacements() {
    let t = Scenario::new("ten").await;
    let spot = t.spot_asg("spot", 10, 30).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old_nodes = t.ready_nodes(&spot, 10).await;
    let old_instances = ids(&old_nodes);
    let old_names: BTreeSet<String> = old_nodes.iter().map(name_of).collect();
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

    // All ten at once (how long the writes take under load is not the behaviour under test; the
    // coalescing below is).
    futures::future::join_all(old_names.iter().map(|name| t.notice(name))).await;

    let mut records = Vec::new();
    for name in &old_names {
        records.push(record(
            &t.wait_for_phase(name, phase::TAINTED, Duration::from_secs(180))
                .await,
        ));
    }

    // Desired rose by exactly ten.
    t.assert_desired_settles(&spot, 20, "baseline 10 + 10").await;
    assert!(t.calls("SetDesiredCapacity", &on_demand).await.is_empty());

    // Ten replacements, each claimed once, none of them an old node.
    let claimed: Vec<String> = records
        .iter()
        .map(|r| {
            r.instance_id
                .clone()
                .unwrap_or_else(|| panic!("no claim in {}", r.raw))
        })
        .collect();
    let distinct: BTreeSet<String> = claimed.iter().cloned().collect();
    assert_eq!(distinct.len(), 10, "a replacement was claimed twice: {claimed:?}");
    assert!(
        distinct.is_disjoint(&old_instances),
        "an old node was claimed: {claimed:?}"
    );
    let in_service = t.asg(&spot).await.in_service();
    assert!(
        distinct.is_subset(&in_service),
        "claims {distinct:?}, InService {in_service:?}"
    );
    let claimed_nodes: BTreeSet<String> = records.iter().filter_map(|r| r.node.clone()).collect();
    assert_eq!(claimed_nodes.len(), 10, "claimed nodes: {claimed_nodes:?}");
    assert!(claimed_nodes.is_disjoint(&old_names));

    // Each old node was tainted only once its own claimed replacement was Ready.
    support::eventually("the watch sees ten taints", Duration::from_secs(10), || async {
        (watch.tainted() == old_names).then_some(())
    })
    .await;
    watch.assert_never_tainted_before_replacement_ready();
    assert!(controller.metric(NOTICES, &[]).await >= 10.0);
    assert!(controller.metric(TAINTS, &[]).await >= 10.0);

    // Coalesced: one target for the ten, in at most three calls, never above baseline + 10.
    let calls = t.calls("SetDesiredCapacity", &spot).await;
    let targets: Vec<_> = calls.iter().map(|call| call.desired_capacity).collect();
    assert!(targets.iter().all(|desired| *desired <= Some(20)), "{targets:?}");
    assert!(
        (1..=3).contains(&calls.len()),
        "ten notices made {} SetDesiredCapacity calls, targets {targets:?}",
        calls.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_in_each_phase_resumes_without_scaling_twice() {
    let t = Scenario::new("sigkill").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    let flags = [
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        on_demand.as_str(),
        "--capacity-timeout",
        "10m",
    ];
    // The same pod restarted each time (same identity, so it takes its lease back at once).
    let identity = format!("{}-pod", t.name);
    let watch = TaintOrderWatch::start(&t.bed, &[&spot, &on_demand]).await;
    // Spot has no capacity; the on-demand launch fails too, for a reason that is not capacity, so
    // the controller waits in each phase until the test lets it go on.
    t.bed.arm_capacity_fault(&spot).await;
    t.arm_launch_failure(&on_demand, "Instance launch failed: the test bed holds it back.")
        .await;

    // 1. Killed in ScalingSpot: the intent (target 2) is on the Node.
    let mut controller = t.start_controller_as(&identity, &flags);
    controller.wait_ready().await;
    t.notice(&old).await;
    let seen = t.wait_for_any_phase(&old, &SCALING_OR_LATER, FLOW).await;
    controller.kill();
    let intent = record(&seen);
    assert_eq!(
        phase_of(&seen).as_deref(),
        Some(phase::SCALING_SPOT),
        "{}",
        intent.raw
    );
    assert_eq!(
        intent.target_desired,
        Some(2),
        "intent before action: {}",
        intent.raw
    );
    drop(controller);

    // 2. Restarted, it falls back to on-demand; killed in ScalingOnDemand.
    let mut controller = t.start_controller_as(&identity, &flags);
    controller.wait_ready().await;
    let seen = t
        .wait_for_any_phase(
            &old,
            &[phase::SCALING_ON_DEMAND, phase::AWAITING_READY, phase::TAINTED],
            FLOW,
        )
        .await;
    controller.kill();
    let intent = record(&seen);
    assert_eq!(
        phase_of(&seen).as_deref(),
        Some(phase::SCALING_ON_DEMAND),
        "{}",
        intent.raw
    );
    assert_eq!(
        (intent.asg.as_deref(), intent.target_desired),
        (Some(on_demand.as_str()), Some(1)),
        "{}",
        intent.raw
    );
    drop(controller);

    // 3. On-demand capacity comes; restarted, it claims the instance; killed in AwaitingReady.
    t.clear_capacity_fault(&on_demand).await;
    let mut controller = t.start_controller_as(&identity, &flags);
    controller.wait_ready().await;
    let seen = t
        .wait_for_any_phase(&old, &[phase::AWAITING_READY, phase::TAINTED], FLOW)
        .await;
    controller.kill();
    eprintln!("third controller killed in {:?}", phase_of(&seen));
    drop(controller);

    // 4. Restarted once more: the flow completes.
    let mut controller = t.start_controller_as(&identity, &flags);
    controller.wait_ready().await;
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;
    watch.assert_never_tainted_before_replacement_ready();
    let record = record(&tainted);
    assert_eq!(record.asg.as_deref(), Some(on_demand.as_str()), "{}", record.raw);

    // No second scale-up anywhere: each ASG was only ever asked for its one target (spot's +1 then
    // taken back), and exactly one instance was added in all.
    let spot_targets: Vec<_> = t
        .set_desired_calls(&spot)
        .await
        .iter()
        .map(|c| c.desired_capacity)
        .collect();
    assert!(
        spot_targets
            .iter()
            .all(|desired| [Some(2), Some(1)].contains(desired)),
        "spot was asked for {spot_targets:?}"
    );
    let od_targets: Vec<_> = t
        .set_desired_calls(&on_demand)
        .await
        .iter()
        .map(|c| c.desired_capacity)
        .collect();
    assert!(
        !od_targets.is_empty() && od_targets.iter().all(|desired| *desired == Some(1)),
        "on-demand was asked for {od_targets:?}"
    );
    t.assert_desired_settles(&on_demand, 1, "on-demand baseline + 1")
        .await;
    t.assert_desired_settles(&spot, 1, "spot back at its baseline")
        .await;
    assert_eq!(t.asg(&spot).await.in_service(), BTreeSet::from([old_instance]));
    assert_eq!(t.asg(&on_demand).await.in_service().len(), 1);
    assert!(controller.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taints_at_once_on_an_interruption_notice_while_waiting_for_capacity() {
    let t = Scenario::new("interrupt").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    // The spot request goes unfulfilled with a failure that names no capacity (so no fallback yet):
    // the controller waits for capacity until --capacity-timeout.
    t.arm_launch_failure(&spot, SPOT_PRICE_TOO_LOW).await;
    let mut controller =
        t.start_controller(&["--on-demand-asg-name", &on_demand, "--capacity-timeout", "10m"]);
    controller.wait_ready().await;

    t.notice(&old).await;
    t.wait_for_phase(&old, phase::SCALING_SPOT, FLOW).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = t.node(&old).await;
    assert_eq!(
        phase_of(&held).as_deref(),
        Some(phase::SCALING_SPOT),
        "the controller waits for spot capacity; record {:?}",
        support::controller::raw_record(&held)
    );
    assert!(
        termination_taint(&held).is_none(),
        "no replacement, no taint (yet)"
    );

    // The interruption notice: two minutes left, so taint now, replacement or not.
    let noticed = Instant::now();
    t.interruption(&old).await;
    let tainted = t.wait_for_taint(&old, Duration::from_secs(10)).await;
    eprintln!("tainted {:?} after the interruption notice", noticed.elapsed());
    let taint = termination_taint(&tainted).unwrap();
    assert_eq!(
        (taint.value.as_deref(), taint.effect.as_str()),
        (Some("true"), "NoSchedule")
    );
    assert_eq!(
        t.asg(&on_demand).await.in_service().len() + t.asg(&spot).await.in_service().len(),
        1,
        "no replacement existed: the taint came from the interruption"
    );
    t.wait_for_event(&old, "an Event about the interruption taint", |event| {
        event.reason.contains("Interruption") || event.message.contains("interruption")
    })
    .await;
    assert!(controller.metric(TAINTS, &[]).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_that_never_turns_ready_is_warned_about_once_and_the_node_waits_untainted() {
    let t = Scenario::new("notready").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    // Spot capacity is there, but each new instance's kubelet registers and never turns Ready.
    t.arm_not_ready(&spot).await;
    let capacity_timeout = Duration::from_secs(5);
    let flags = [
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        &on_demand,
        "--capacity-timeout",
        "5s",
    ];
    let mut controller = t.start_controller(&flags);
    controller.wait_ready().await;
    let watch = TaintOrderWatch::start(&t.bed, &[&spot, &on_demand]).await;

    // The new spot instance is InService at once: the controller claims it and waits for its Node.
    t.notice(&old).await;
    let awaiting = t.wait_for_phase(&old, phase::AWAITING_READY, FLOW).await;
    let claim_seen = Instant::now();
    let claim = record(&awaiting);
    let claimed = claim.instance_id.clone().expect("a claimed instance");
    assert_ne!(claimed, old_instance, "{}", claim.raw);
    assert_eq!(claim.asg.as_deref(), Some(spot.as_str()), "{}", claim.raw);
    let replacement = support::eventually(
        "the claimed instance's Node registers",
        Duration::from_secs(30),
        || async {
            let nodes = t.nodes_of(&spot).await;
            nodes
                .into_iter()
                .find(|node| instance_id(node).as_deref() == Some(claimed.as_str()))
        },
    )
    .await;
    let ready = replacement
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"))
        .expect("the replacement's kubelet posts a Ready condition");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("False", Some("KubeletNotReady")),
        "{ready:?}"
    );

    // Within CAPACITY_TIMEOUT of the claim there is nothing to warn about (3 s after the test saw
    // the claim, which it sees well within the other 2 s: it polls every 100 ms).
    tokio::time::sleep((claim_seen + Duration::from_secs(3)).saturating_duration_since(Instant::now())).await;
    assert_eq!(
        t.event_occurrences(&old, "ReplacementNotReady").await,
        0,
        "warned before --capacity-timeout"
    );

    // After it: one Warning on the old node naming the claimed instance and how long it waited.
    let events = t
        .wait_for_event(&old, "a ReplacementNotReady Warning", |event| {
            event.reason == "ReplacementNotReady"
        })
        .await;
    let warned = events
        .iter()
        .find(|event| event.reason == "ReplacementNotReady")
        .unwrap();
    eprintln!(
        "ReplacementNotReady seen {:?} after the claim was: {}",
        claim_seen.elapsed(),
        warned.message
    );
    assert_eq!(warned.type_, "Warning", "{warned:?}");
    assert!(
        warned.message.contains(&claimed) && warned.message.contains(&old),
        "{warned:?}"
    );
    let waited: u64 = warned
        .message
        .split_once(" for ")
        .and_then(|(_, rest)| rest.split_once(" s"))
        .and_then(|(seconds, _)| seconds.parse().ok())
        .unwrap_or_else(|| panic!("no waited time in {warned:?}"));
    assert!(
        waited >= capacity_timeout.as_secs(),
        "warned after {waited} s, before --capacity-timeout: {warned:?}"
    );

    // Many poll intervals later (--asg-poll-interval 1s): still that one Warning, the node still
    // waits in AwaitingReady, never tainted, and nothing else was scaled. The wait reads the ASG at
    // most once per poll interval: at most 5 describes in 5 s, plus one for a look that straddles
    // the window's edges.
    let describes = || controller.metric(AWS_CALLS, &[("operation", "DescribeAutoScalingGroups")]);
    let describes_before = describes().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let describes_while_waiting = describes().await - describes_before;
    assert!(
        describes_while_waiting <= 6.0,
        "{describes_while_waiting} DescribeAutoScalingGroups in 5 s of waiting"
    );
    assert_eq!(
        t.event_occurrences(&old, "ReplacementNotReady").await,
        1,
        "the Warning was repeated: {:?}",
        t.events(&old).await
    );

    // A restarted controller (the same pod, so it takes the Lease back at once) reads from the
    // record that the Warning went out, and does not send it again.
    let identity = controller.identity.clone();
    controller.kill();
    drop(controller);
    let mut controller = t.start_controller_as(&identity, &flags);
    controller.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        t.event_occurrences(&old, "ReplacementNotReady").await,
        1,
        "warned again after a restart: {:?}",
        t.events(&old).await
    );
    let waiting = t.node(&old).await;
    assert_eq!(
        phase_of(&waiting).as_deref(),
        Some(phase::AWAITING_READY),
        "record {:?}",
        support::controller::raw_record(&waiting)
    );
    assert_eq!(
        record(&waiting).instance_id.as_deref(),
        Some(claimed.as_str()),
        "the claim stands"
    );
    assert!(
        termination_taint(&waiting).is_none(),
        "no Ready replacement, no taint"
    );
    assert!(
        watch.tainted().is_empty(),
        "a node was tainted while waiting: {:?}",
        watch.tainted()
    );
    let other_warnings: Vec<_> = t
        .events(&old)
        .await
        .into_iter()
        .filter(|event| event.type_ == "Warning" && event.reason != "ReplacementNotReady")
        .collect();
    assert!(other_warnings.is_empty(), "{other_warnings:?}");
    assert_eq!(
        t.asg(&spot).await.in_service(),
        BTreeSet::from([old_instance.clone(), claimed.clone()])
    );
    t.assert_desired_settles(&spot, 2, "baseline + 1, the claim kept")
        .await;
    assert!(
        t.calls("SetDesiredCapacity", &on_demand).await.is_empty(),
        "an InService replacement is not missing capacity: no fallback"
    );
    assert_eq!(controller.metric(FALLBACKS, &[]).await, 0.0);

    // The interruption notice: two minutes left, so taint now, replacement Ready or not.
    let noticed = Instant::now();
    t.interruption(&old).await;
    let tainted = t.wait_for_taint(&old, Duration::from_secs(10)).await;
    eprintln!("tainted {:?} after the interruption notice", noticed.elapsed());
    let taint = termination_taint(&tainted).unwrap();
    assert_eq!(
        (taint.value.as_deref(), taint.effect.as_str()),
        (Some("true"), "NoSchedule")
    );
    t.wait_for_event(&old, "a TaintedOnInterruption Warning", |event| {
        event.type_ == "Warning" && event.reason == "TaintedOnInterruption"
    })
    .await;
    let interrupted = record(&t.node(&old).await);
    assert!(interrupted.tainted_at.is_some(), "{}", interrupted.raw);
    assert!(interrupted.ready_at.is_none(), "{}", interrupted.raw);
    let replacement = t.node(&name_of(&replacement)).await;
    assert!(
        !is_ready(&replacement),
        "the taint did not wait for the replacement"
    );
    watch.assert_never_tainted_before_replacement_ready();

    // The kubelet comes up at last: the controller finishes the replacement without a second taint.
    // (Events outlive the Node: the interrupted node is drained and retired right after.)
    t.clear_not_ready(&spot).await;
    t.wait_for_event(&old, "the replacement's Tainted Event", |event| {
        event.reason == "Tainted" && event.message.contains(&claimed)
    })
    .await;
    assert_eq!(
        controller
            .metric(TAINTS, &[("reason", "interruption notice")])
            .await,
        1.0
    );
    assert_eq!(
        controller.metric(TAINTS, &[]).await,
        1.0,
        "the only taint came from the interruption"
    );
    assert_eq!(t.event_occurrences(&old, "ReplacementNotReady").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_foreign_scaling_activity_before_scaling() {
    let t = Scenario::new("foreign").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    let foreign = t.start_foreign_activity(&spot).await;
    let mut controller = t.start_controller(&[
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        &on_demand,
        "--capacity-timeout",
        "60s",
        "--foreign-activity-timeout",
        "10m",
    ]);
    controller.wait_ready().await;

    t.notice(&old).await;
    // Several poll intervals: no SetDesiredCapacity anywhere while someone else is scaling.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        for asg in [&spot, &on_demand] {
            let calls = t.calls("SetDesiredCapacity", asg).await;
            assert!(
                calls.is_empty(),
                "{asg} scaled during a foreign activity: {calls:?}"
            );
        }
        assert!(termination_taint(&t.node(&old).await).is_none());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("phase while waiting: {:?}", phase_of(&t.node(&old).await));

    // The foreign activity ends: now the controller acts.
    t.finish_foreign_activity(&foreign, "Successful").await;
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;
    assert_eq!(record(&tainted).capacity_type.as_deref(), Some("spot"));
    let calls = t.set_desired_calls(&spot).await;
    assert!(
        !calls.is_empty() && calls.iter().all(|call| call.desired_capacity == Some(2)),
        "{calls:?}"
    );
    t.assert_desired_settles(&spot, 2, "baseline + 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_group_scales_only_its_own_asgs() {
    let t = Scenario::new("groups").await;
    // Group a has spot capacity; group b has none and falls back to its own on-demand ASG (tag),
    // not to the --on-demand-asg-name default.
    let spot_a = t.spot_asg("spot-a", 1, 5).await;
    let on_demand_a = t.on_demand_asg("od-a", 0, 5).await;
    let spot_b = t.spot_asg("spot-b", 1, 5).await;
    let on_demand_b = t.on_demand_asg("od-b", 0, 5).await;
    let default_fallback = t.on_demand_asg("od-default", 0, 5).await;
    t.tag_fallback(&spot_a, &on_demand_a).await;
    t.tag_fallback(&spot_b, &on_demand_b).await;
    let node_a = name_of(&t.ready_nodes(&spot_a, 1).await[0]);
    let node_b = name_of(&t.ready_nodes(&spot_b, 1).await[0]);
    t.bed.arm_capacity_fault(&spot_b).await;
    let mut controller = t.start_controller(&[
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        &default_fallback,
        "--capacity-timeout",
        "60s",
    ]);
    controller.wait_ready().await;
    let all = [
        spot_a.as_str(),
        on_demand_a.as_str(),
        spot_b.as_str(),
        on_demand_b.as_str(),
        default_fallback.as_str(),
    ];
    let watch = TaintOrderWatch::start(&t.bed, &all).await;

    t.notice(&node_a).await;
    t.notice(&node_b).await;
    let a = record(&t.wait_for_phase(&node_a, phase::TAINTED, FLOW).await);
    let b = record(&t.wait_for_phase(&node_b, phase::TAINTED, FLOW).await);

    assert_eq!(
        (a.asg.as_deref(), a.capacity_type.as_deref()),
        (Some(spot_a.as_str()), Some("spot")),
        "{}",
        a.raw
    );
    assert_eq!(
        (b.asg.as_deref(), b.capacity_type.as_deref()),
        (Some(on_demand_b.as_str()), Some("on-demand")),
        "{}",
        b.raw
    );
    assert_eq!(
        b.on_demand_asg.as_deref(),
        Some(on_demand_b.as_str()),
        "{}",
        b.raw
    );
    t.assert_desired_settles(&spot_a, 2, "group a's spot ASG + 1")
        .await;
    t.assert_desired_settles(&on_demand_b, 1, "group b's fallback + 1")
        .await;
    t.assert_desired_settles(&spot_b, 1, "group b's spot ASG back at baseline")
        .await;
    for untouched in [&on_demand_a, &default_fallback] {
        assert!(
            t.calls("SetDesiredCapacity", untouched).await.is_empty(),
            "{untouched} was scaled"
        );
        assert_eq!(t.desired(untouched).await, 0);
    }
    watch.assert_never_tainted_before_replacement_ready();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_from_the_real_agent_drives_the_replacement() {
    let t = Scenario::new("agent").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    // The node's own IMDS, as the agent on it would see it: its instance id, no notice yet.
    let imds = FakeImds::start().await;
    imds.set(|serve| serve.instance_id = Answer::Body(old_instance.clone()));
    let mut agent = AgentProcess::start(AgentConfig {
        node: &old,
        imds_endpoint: &imds.endpoint,
        kubeconfig: &role_kubeconfig(&t.bed, Role::Agent { node: &old }),
        extra: &["--poll-interval", "1s"],
    });
    agent.wait_ready().await;
    let mut controller = t.start_controller(&["--after-replacement", "keep", "--capacity-timeout", "20s"]);
    controller.wait_ready().await;
    let watch = TaintOrderWatch::start(&t.bed, &[&spot]).await;

    // EC2 recommends a rebalance; the agent annotates its Node; the controller takes it from there.
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap();
    imds.set(|serve| serve.rebalance = Answer::json(json!({"noticeTime": now.to_string()})));
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;

    assert!(annotation(&tainted, REBALANCE_NOTICE_TIME).is_some());
    let record = record(&tainted);
    assert_eq!(record.asg.as_deref(), Some(spot.as_str()), "{}", record.raw);
    assert_ne!(
        record.instance_id.as_deref(),
        Some(old_instance.as_str()),
        "{}",
        record.raw
    );
    t.assert_desired_settles(&spot, 2, "baseline + 1").await;
    watch.assert_never_tainted_before_replacement_ready();
    assert!(agent.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_only_the_leader_acts_and_the_standby_takes_over_on_sigterm() {
    let t = Scenario::new("replicas").await;
    let spot = t.spot_asg("spot", 2, 6).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let nodes = t.ready_nodes(&spot, 2).await;
    let (first, second) = (name_of(&nodes[0]), name_of(&nodes[1]));
    let flags = [
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        on_demand.as_str(),
        "--capacity-timeout",
        "30s",
    ];
    let mut a = t.start_controller(&flags);
    a.wait_ready().await;
    let mut b = t.start_controller(&flags);
    b.wait_ready().await;
    let watch = TaintOrderWatch::start(&t.bed, &[&spot, &on_demand]).await;

    // One replacement, made by whichever replica holds the lease.
    t.notice(&first).await;
    t.wait_for_phase(&first, phase::TAINTED, FLOW).await;
    let holder = t.lease_holder().await;
    let (mut leader, mut standby) = if holder == a.identity { (a, b) } else { (b, a) };
    assert_eq!(holder, leader.identity, "the lease names one of the two replicas");
    assert!(leader.metric(NOTICES, &[]).await >= 1.0);
    assert_eq!(standby.metric(NOTICES, &[]).await, 0.0, "the standby acted too");
    let targets: Vec<_> = t
        .set_desired_calls(&spot)
        .await
        .iter()
        .map(|c| c.desired_capacity)
        .collect();
    assert!(targets.iter().all(|desired| *desired == Some(3)), "{targets:?}");

    // The leader stops cleanly; the standby takes the lease and handles the next notice.
    let status = leader.terminate();
    assert!(status.success(), "the leader exited with {status} on SIGTERM");
    support::eventually("the standby holds the lease", Duration::from_secs(30), || async {
        (t.lease_holder().await == standby.identity).then_some(())
    })
    .await;
    t.notice(&second).await;
    t.wait_for_phase(&second, phase::TAINTED, FLOW).await;
    assert!(standby.metric(NOTICES, &[]).await >= 1.0);
    t.assert_desired_settles(&spot, 4, "baseline 2 + two replacements")
        .await;
    watch.assert_never_tainted_before_replacement_ready();
    assert!(standby.is_running());
}
