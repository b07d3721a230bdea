//! The end of a noticed node's life on the real bed: after the replacement is Ready and the old node
//! tainted, the controller drains it through the Eviction API at the pace its PDBs allow (never
//! forcing), retires its instance with a decrement so the spot ASG is back at its pre-notice size, and,
//! when the instance goes behind its back, gives its seat back exactly once, also across a SIGKILL.
//! Each test has its own opt-in label, lease (and ledger), ASGs and namespace.
mod support;

use std::{collections::BTreeSet, time::Duration};

use serde_json::json;
use support::{
    controller::{
        DRAIN_REQUESTED, NODEGROUP_LABEL, SCALE_DOWN_DISABLED, Scenario, annotation, name_of, phase,
        phase_of, record, records_api,
    },
    instance_id,
    lifecycle::{self, DisruptionWatch, NotificationSink, seat},
    webhook::TestNamespace,
};

/// Generous bound for a whole flow on a busy 2-core machine (it takes seconds).
const FLOW: Duration = Duration::from_secs(120);

const EVICTIONS: &str = "spot_rebalancer_evictions_total";
const DRAIN_TIMEOUTS: &str = "spot_rebalancer_drain_timeouts_total";
const RETIREMENTS: &str = "spot_rebalancer_retirements_total";
const RESTORES: &str = "spot_rebalancer_capacity_restores_total";
const DRAINS: &str = "spot_rebalancer_drains_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_at_the_pace_of_a_pdb_and_retires_the_node_back_to_the_pre_notice_size() {
    let t = Scenario::new("paced").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    // Three replicas on nodes labelled for them (only the old node so far), PDB maxUnavailable 1, and
    // a node agent (DaemonSet) on the node group.
    let ns = TestNamespace::create(&t.bed, "paced").await;
    let web_key = format!("{}-web", t.opt_in_key);
    t.label(&old, &web_key, "true").await;
    let on_group = json!({ NODEGROUP_LABEL: spot });
    let for_web = json!({ web_key.as_str(): "true" });
    lifecycle::daemon_set(&t.bed, &ns.name, "node-agent", &on_group, 1).await;
    lifecycle::deployment(&t.bed, &ns.name, "web", 3, &for_web).await;
    let allowed = lifecycle::pdb(&t.bed, &ns.name, "web", json!({"maxUnavailable": 1}), 3).await;
    assert_eq!(allowed, 1);
    let watch = DisruptionWatch::start(&t.bed, &ns.name, "web", 2).await;

    let mut controller = t.start_controller(&[]);
    controller.wait_ready().await;
    t.notice(&old).await;

    // Tainted once the replacement is Ready, then the drain: one replica evicted, and while it has
    // nowhere to run (the replacement is not labelled for it yet) the PDB refuses the next evictions
    // (429), which the controller keeps retrying.
    let tainted = t.wait_for_any_phase(&old, &[phase::DRAINING], FLOW).await;
    let replacement = record(&tainted).node.expect("the claimed replacement's Node");
    support::eventually("an eviction refused by the PDB", FLOW, || async {
        (controller.metric(EVICTIONS, &[("result", "blocked")]).await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(controller.metric(EVICTIONS, &[("result", "evicted")]).await, 1.0);
    let serving = lifecycle::ready_pods(&t.bed, &ns.name, "web").await;
    assert_eq!(serving.len(), 2, "one replica down at a time: {serving:?}");
    assert!(serving.iter().all(|(_, node)| *node == old));

    // Room on the replacement: the drain goes on at the PDB's pace, then the node is retired; the
    // ledger keeps the outcome after the Node is gone.
    t.label(&replacement, &web_key, "true").await;
    let retired = t.wait_for_seat(&old_instance, seat::RETIRED, FLOW).await;
    let replacement_instance = retired["claimed"]
        .as_str()
        .expect("a claimed replacement")
        .to_owned();

    // The PDB held at every change the watches saw.
    watch.assert_never_violated();
    let (fewest, observations) = watch.fewest_serving();
    assert_eq!(
        fewest,
        Some(2),
        "one replica down at a time ({observations} states seen)"
    );
    assert_eq!(
        controller.metric(EVICTIONS, &[("result", "evicted")]).await,
        3.0,
        "the three replicas, never the DaemonSet pod"
    );

    // The replicas run on the replacement; the old node was left with its DaemonSet pod only.
    let replacement = t.node(&replacement).await;
    assert_eq!(
        instance_id(&replacement).as_deref(),
        Some(replacement_instance.as_str())
    );
    let pods = lifecycle::ready_pods(&t.bed, &ns.name, "web").await;
    assert_eq!(pods.len(), 3);
    assert!(
        pods.iter().all(|(_, node)| *node == name_of(&replacement)),
        "{pods:?}"
    );
    let events = t.events(&old).await;
    let drained = events
        .iter()
        .find(|event| event.reason == "Drained")
        .unwrap_or_else(|| panic!("a Drained Event: {events:?}"));
    assert!(
        drained.message.contains("1 DaemonSet or mirror pod(s) stay"),
        "{drained:?}"
    );
    for reason in ["DrainStarted", "Evicted", "Retired"] {
        assert!(
            events.iter().any(|event| event.reason == reason),
            "an Event {reason}: {events:?}"
        );
    }

    // Capacity is back where it was: one spot instance, the replacement, and nothing more launches.
    t.assert_desired_settles(&spot, 1, "pre-notice size after the retirement")
        .await;
    assert_eq!(
        t.asg(&spot).await.in_service(),
        BTreeSet::from([replacement_instance])
    );
    // The protection goes last, after the Retired record (a busy machine may see it a moment later).
    let replacement_name = name_of(&replacement);
    support::eventually(
        "cluster-autoscaler may manage the replacement again (no scale-down-disabled)",
        FLOW,
        || async {
            let released = t.node(&replacement_name).await;
            annotation(&released, SCALE_DOWN_DISABLED).is_none().then_some(())
        },
    )
    .await;
    assert_eq!(controller.metric(RETIREMENTS, &[]).await, 1.0);
}

/// The default (`--after-replacement retire`): a rebalance recommendation alone, with no
/// interruption ever, ends with the old instance retired and the node group back at its size. No
/// extra node is held for a risk that may never come true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_rebalance_notice_alone_retires_the_old_node_and_restores_the_asg_size() {
    let t = Scenario::new("default-retire").await;
    let spot = t.spot_asg("spot", 2, 5).await;
    let nodes = t.ready_nodes(&spot, 2).await;
    let (old, old_instance) = (name_of(&nodes[0]), instance_id(&nodes[0]).unwrap());
    let other = instance_id(&nodes[1]).unwrap();
    let ns = TestNamespace::create(&t.bed, "default-retire").await;
    ns.running_pods(&old, "job", 1).await;

    let mut controller = t.start_controller(&[]);
    controller.wait_ready().await;
    t.notice(&old).await;

    let retired = t.wait_for_seat(&old_instance, seat::RETIRED, FLOW).await;
    let replacement = retired["claimed"]
        .as_str()
        .expect("a claimed replacement")
        .to_owned();
    assert!(
        t.terminated(&spot).await.contains(&old_instance),
        "the old instance left its ASG"
    );
    t.assert_desired_settles(&spot, 2, "pre-notice size after the retirement")
        .await;
    assert_eq!(
        t.asg(&spot).await.in_service(),
        BTreeSet::from([other, replacement]),
        "the untouched node and the replacement, nothing more"
    );
    let status = records_api(&t.bed)
        .get(&old_instance)
        .await
        .expect("the record outlives the Node")
        .data["status"]
        .clone();
    assert_eq!(status["phase"], "Retired", "{status}");
    assert_eq!(
        status["drain"]["trigger"], "afterTaint",
        "drained because its replacement was Ready, not for an interruption: {status}"
    );
    assert!(status["drain"]["completedAt"].is_string(), "{status}");
    assert_eq!(
        controller.metric(DRAINS, &[("trigger", "after-taint")]).await,
        1.0
    );
    assert_eq!(controller.metric(RETIREMENTS, &[]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_a_pdb_forbids_waits_warns_at_the_timeout_and_forces_nothing() {
    let t = Scenario::new("stuck").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    let ns = TestNamespace::create(&t.bed, "stuck").await;
    ns.running_pods(&old, "db", 2).await;
    let allowed = lifecycle::pdb(&t.bed, &ns.name, "db", json!({"minAvailable": 2}), 2).await;
    assert_eq!(allowed, 0, "the PDB allows no disruption");

    let mut controller = t.start_controller(&["--drain-timeout", "5s"]);
    controller.wait_ready().await;
    t.notice(&old).await;

    let warned = support::eventually("a DrainTimedOut Warning Event", FLOW, || async {
        let events = t.events(&old).await;
        events.into_iter().find(|event| event.reason == "DrainTimedOut")
    })
    .await;
    assert_eq!(warned.type_, "Warning");
    assert!(warned.message.contains("nothing is forced"), "{warned:?}");
    assert!(controller.metric(DRAIN_TIMEOUTS, &[]).await >= 1.0);

    // Nothing was forced: both pods still run, unevicted; the node stays Draining and its instance,
    // with the +1, stays until the PDB lets the pods go.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pods = lifecycle::ready_pods(&t.bed, &ns.name, "db").await;
    assert_eq!(pods.len(), 2, "{pods:?}");
    assert!(pods.iter().all(|(_, node)| *node == old));
    assert_eq!(controller.metric(EVICTIONS, &[("result", "evicted")]).await, 0.0);
    assert!(controller.metric(EVICTIONS, &[("result", "blocked")]).await >= 2.0);
    let node = t.node(&old).await;
    assert_eq!(
        phase_of(&node).as_deref(),
        Some(phase::DRAINING),
        "{:?}",
        record(&node)
    );
    assert_eq!(t.desired(&spot).await, 2);
    assert!(t.asg(&spot).await.in_service().contains(&old_instance));
    assert_eq!(
        t.seat(&old_instance).await.unwrap()["state"]["kind"],
        seat::ACTIVE
    );
    assert_eq!(controller.metric(RETIREMENTS, &[]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interruption_after_the_replacement_is_ready_drains_and_retires_the_node() {
    let t = Scenario::new("interrupted").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    let ns = TestNamespace::create(&t.bed, "interrupted").await;
    ns.running_pods(&old, "batch", 1).await;
    // With `--after-replacement keep`, the taint alone drains nothing.
    let mut controller = t.start_controller(&["--after-replacement", "keep"]);
    controller.wait_ready().await;
    t.notice(&old).await;
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;
    let replacement_instance = record(&tainted).instance_id.expect("a claimed replacement");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(phase_of(&t.node(&old).await).as_deref(), Some(phase::TAINTED));
    assert_eq!(lifecycle::ready_pods(&t.bed, &ns.name, "batch").await.len(), 1);
    assert_eq!(t.desired(&spot).await, 2);

    // The interruption notice: drain (the bare pod has no PDB) and retire.
    t.interruption(&old).await;
    t.wait_for_seat(&old_instance, seat::RETIRED, FLOW).await;
    assert!(lifecycle::ready_pods(&t.bed, &ns.name, "batch").await.is_empty());
    assert_eq!(controller.metric(EVICTIONS, &[("result", "evicted")]).await, 1.0);
    assert_eq!(
        t.terminated(&spot).await,
        vec![old_instance.clone()],
        "only the old instance was removed"
    );

    // The spot ASG is back at its pre-notice desired capacity with the replacement as its only
    // instance, and no further instance launches.
    t.assert_desired_settles(&spot, 1, "pre-notice size after the retirement")
        .await;
    let activities_then = t.activities(&spot).await.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let group = t.asg(&spot).await;
    assert_eq!(group.in_service(), BTreeSet::from([replacement_instance.clone()]));
    assert_eq!(group.instances.len(), 1, "{group:?}");
    let activities = t.activities(&spot).await;
    assert_eq!(
        activities.len(),
        activities_then,
        "no scaling activity after the retirement: {activities:?}"
    );
    let events = t.events(&old).await;
    assert!(events.iter().any(|event| event.reason == "Retired"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_reclaimed_behind_the_controllers_back_gives_its_seat_back_exactly_once() {
    let t = Scenario::new("reclaimed").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    let identity = format!("{}-pod", t.name);
    let mut controller = t.start_controller_as(&identity, &["--after-replacement", "keep"]);
    controller.wait_ready().await;
    t.notice(&old).await;
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;
    let replacement_instance = record(&tainted).instance_id.expect("a claimed replacement");
    assert_eq!(
        t.seat(&old_instance).await.unwrap()["state"]["kind"],
        seat::ACTIVE
    );

    // The controller dies; meanwhile EC2 reclaims the old instance without a decrement, the ASG
    // refills the seat (desired stays 2) and the node bridge removes the old Node.
    controller.kill();
    let reclaimed = t.reclaim(&old_instance).await;
    assert_eq!(reclaimed["asg"], spot.as_str(), "{reclaimed}");
    support::eventually("the old Node gone", FLOW, || async {
        t.nodes_of(&spot)
            .await
            .iter()
            .all(|node| name_of(node) != old)
            .then_some(())
    })
    .await;
    let refilled = support::eventually("the ASG refilling the seat", FLOW, || async {
        let group = t.asg(&spot).await;
        (group.instances.len() == 2).then_some(group)
    })
    .await;
    assert_eq!(refilled.desired, 2);
    let refill = refilled
        .instances
        .iter()
        .map(|i| i.id.clone())
        .find(|id| *id != replacement_instance)
        .unwrap();

    // Restarted, the controller finds the seat in its ledger and gives it back: the refill goes
    // (by id, with a decrement), the claimed replacement stays.
    let mut controller = t.start_controller_as(&identity, &["--after-replacement", "keep"]);
    controller.wait_ready().await;
    let restored = t.wait_for_seat(&old_instance, seat::RESTORED, FLOW).await;
    assert_eq!(restored["state"]["undo"]["kind"], "terminate", "{restored}");
    assert_eq!(
        restored["state"]["undo"]["instance"],
        refill.as_str(),
        "{restored}"
    );
    assert_eq!(t.terminated(&spot).await.len(), 2, "the reclaim and the refill");
    t.assert_desired_settles(&spot, 1, "pre-notice size after the reclaim")
        .await;
    assert_eq!(
        t.asg(&spot).await.in_service(),
        BTreeSet::from([replacement_instance.clone()])
    );
    assert_eq!(controller.metric(RESTORES, &[("how", "terminate")]).await, 1.0);

    // Killed and restarted once more: nothing is given back twice.
    controller.kill();
    let mut controller = t.start_controller_as(&identity, &["--after-replacement", "keep"]);
    controller.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    t.assert_desired_settles(&spot, 1, "still the pre-notice size")
        .await;
    let terminations: BTreeSet<String> = t.terminated(&spot).await.into_iter().collect();
    let lowered: Vec<_> = t
        .set_desired_calls(&spot)
        .await
        .into_iter()
        .filter(|call| call.desired_capacity < Some(2))
        .collect();
    assert_eq!(
        (terminations, lowered.len()),
        (BTreeSet::from([old_instance.clone(), refill]), 0),
        "the reclaim and one removal, no lowering: {lowered:?}"
    );
    assert_eq!(
        controller.metric(RESTORES, &[]).await,
        0.0,
        "the new process restores nothing"
    );
    assert_eq!(
        t.asg(&spot).await.in_service(),
        BTreeSet::from([replacement_instance])
    );
    assert!(
        t.events(&old)
            .await
            .iter()
            .any(|event| event.reason == "CapacityRestored")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_phase_is_posted_to_the_notification_webhook_whose_url_is_never_logged() {
    let t = Scenario::new("notify").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    let token = format!("T000-{}-secret", t.name);
    let sink = NotificationSink::start(&token).await;
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("notify-url");
    std::fs::write(&url_file, format!("{}\n", sink.url)).unwrap();

    let mut controller = t.start_controller(&[
        "--notify-url-file",
        url_file.to_str().unwrap(),
        "--notify-ca-file",
        sink.ca_file.to_str().unwrap(),
    ]);
    controller.wait_ready().await;
    t.notice(&old).await;
    t.wait_for_seat(&old_instance, seat::RETIRED, FLOW).await;

    let texts = support::eventually("a notification of the retirement", FLOW, || async {
        let texts = sink.texts();
        texts
            .iter()
            .any(|text| text.contains("is Retired"))
            .then_some(texts)
    })
    .await;
    for phase in [
        "Detected",
        "ScalingSpot",
        "AwaitingReady",
        "Tainted",
        "Draining",
        "Retired",
    ] {
        // `spot-rebalancer: node N (INSTANCE, ASG A) is PHASE[: reason]`
        let (node, wanted) = (
            format!("spot-rebalancer: node {old} ({old_instance}, ASG "),
            format!(" is {phase}"),
        );
        assert!(
            texts
                .iter()
                .any(|text| text.starts_with(&node) && text.contains(&wanted)),
            "no {node:?}…{wanted:?} in {texts:?}"
        );
    }
    assert!(
        !controller.log().contains(&token),
        "the webhook URL is a credential and must never be logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_reclaimed_while_the_controller_runs_gives_its_seat_back_once() {
    let t = Scenario::new("reclaimlive").await;
    let spot = t.spot_asg("spot", 2, 5).await;
    let nodes = t.ready_nodes(&spot, 2).await;
    let (old, old_instance) = (name_of(&nodes[0]), instance_id(&nodes[0]).unwrap());
    let other = instance_id(&nodes[1]).unwrap();
    let mut controller = t.start_controller(&["--after-replacement", "keep"]);
    controller.wait_ready().await;
    t.notice(&old).await;
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;
    let replacement_instance = record(&tainted).instance_id.expect("a claimed replacement");
    assert_eq!(t.desired(&spot).await, 3);

    t.reclaim(&old_instance).await;
    let restored = t.wait_for_seat(&old_instance, seat::RESTORED, FLOW).await;
    let undo = &restored["state"]["undo"];
    assert!(
        undo["kind"] == "terminate" || undo["kind"] == "lower",
        "{restored}"
    );
    t.assert_desired_settles(&spot, 2, "pre-notice size after the reclaim")
        .await;
    let group = t.asg(&spot).await;
    assert!(group.in_service().contains(&replacement_instance), "{group:?}");
    assert!(
        group.in_service().contains(&other),
        "a pre-notice instance is never taken: {group:?}"
    );
    assert_eq!(controller.metric(RESTORES, &[]).await, 1.0);
    assert!(controller.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_request_counts_only_once_the_record_says_the_node_was_tainted() {
    let t = Scenario::new("requested").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    let ns = TestNamespace::create(&t.bed, "requested").await;
    ns.running_pods(&old, "api", 2).await;
    let mut controller = t.start_controller(&["--after-replacement", "keep"]);
    controller.wait_ready().await;

    // What the webhook writes when it softens a NoExecute taint to NoSchedule; the node itself could
    // write the same. Without a record of ours saying it was tainted, nothing is evicted.
    let request = json!({"requestedAt": jiff::Timestamp::now().to_string(),
                         "taints": ["aws-node-termination-handler/spot-itn"], "reason": "PDB"});
    t.annotate(&old, json!({ DRAIN_REQUESTED: request.to_string() }))
        .await;
    t.wait_for_event(&old, "a DrainRequestIgnored Event", |e| {
        e.reason == "DrainRequestIgnored"
    })
    .await;
    assert_eq!(lifecycle::ready_pods(&t.bed, &ns.name, "api").await.len(), 2);
    assert_eq!(controller.metric(EVICTIONS, &[("result", "evicted")]).await, 0.0);
    assert!(t.seat(&old_instance).await.is_none(), "no +1, no seat");
    assert!(t.set_desired_calls(&spot).await.is_empty());

    // A notice: replaced and tainted by the controller, the standing request now drains the node
    // (even with `--after-replacement keep`) and it is retired.
    t.notice(&old).await;
    let retired = t.wait_for_any_phase(&old, &[phase::RETIRED], FLOW).await;
    assert!(lifecycle::ready_pods(&t.bed, &ns.name, "api").await.is_empty());
    assert_eq!(controller.metric(EVICTIONS, &[("result", "evicted")]).await, 2.0);
    assert!(record_of_drain_completed(&retired), "{:?}", record(&retired).raw);
}

fn record_of_drain_completed(node: &k8s_openapi::api::core::v1::Node) -> bool {
    let raw: serde_json::Value = serde_json::from_str(&record(node).raw).unwrap();
    raw["drain"]["trigger"] == "requested" && raw["drain"]["completedAt"].is_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_noticed_in_turn_keeps_its_scale_down_protection_while_it_stands_in() {
    let t = Scenario::new("chain").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    let mut controller = t.start_controller(&["--after-replacement", "keep"]);
    controller.wait_ready().await;
    t.notice(&old).await;
    let tainted = t.wait_for_phase(&old, phase::TAINTED, FLOW).await;
    let first = record(&tainted).node.expect("the replacement's node");
    assert_eq!(
        annotation(&t.node(&first).await, SCALE_DOWN_DISABLED),
        Some("true")
    );

    // The replacement gets a notice of its own while the old node still stands (tainted, not
    // drained): its own record is written, and cluster-autoscaler must still leave it alone.
    t.notice(&first).await;
    let first_tainted = t.wait_for_phase(&first, phase::TAINTED, FLOW).await;
    let second = record(&first_tainted)
        .node
        .expect("the second replacement's node");
    assert_ne!(second, first);
    let first_now = t.node(&first).await;
    assert_eq!(
        annotation(&first_now, SCALE_DOWN_DISABLED),
        Some("true"),
        "writing the replacement's own record dropped its scale-down protection"
    );
    assert_eq!(
        annotation(&t.node(&second).await, SCALE_DOWN_DISABLED),
        Some("true")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_deleted_under_the_controller_is_written_again_and_the_retirement_goes_on() {
    let t = Scenario::new("record-gone").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    let mut controller = t.start_controller(&["--after-replacement", "keep"]);
    controller.wait_ready().await;
    t.notice(&old).await;
    t.wait_for_phase(&old, phase::TAINTED, FLOW).await;
    let seat_before = t
        .seat(&old_instance)
        .await
        .expect("the seat of the noticed instance");
    assert_eq!(seat_before["state"]["kind"], seat::ACTIVE);

    // Someone deletes the record. The next write recreates it from the controller's copy: the seat
    // is not lost, and the retirement completes with the pre-notice size back.
    t.delete_record(&old_instance).await;
    assert!(t.seat(&old_instance).await.is_none());
    t.interruption(&old).await;
    let retired = t.wait_for_seat(&old_instance, seat::RETIRED, FLOW).await;
    assert_eq!(retired["node"], seat_before["node"], "{retired}");
    t.assert_desired_settles(&spot, 1, "pre-notice size after the retirement")
        .await;
    assert!(
        controller
            .log()
            .contains("is gone; writing it again from this controller's copy")
    );
    assert!(controller.is_running());
}
