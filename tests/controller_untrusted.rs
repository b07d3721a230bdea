//! Nodes are untrusted: a node's kubelet can write its own Node's annotations, so a compromised node
//! will try to steer the controller. On the real bed, a node that names another instance, writes a
//! record of its own making, or asks for its own drain gets nothing scaled, terminated or evicted;
//! and a dry run decides and reports but calls nothing that changes AWS or the cluster.
mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    controller::{DRAIN_REQUESTED, PHASE, REPLACEMENT, Scenario, name_of, phase, termination_taint},
    instance_id,
};

/// Generous bound for a whole replacement flow on a busy 2-core machine (it takes seconds).
const FLOW: Duration = Duration::from_secs(90);

/// The Auto Scaling calls that change something.
const MUTATING: [&str; 4] = [
    "SetDesiredCapacity",
    "TerminateInstanceInAutoScalingGroup",
    "UpdateAutoScalingGroup",
    "CreateOrUpdateTags",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_names_another_instance_gets_a_warning_and_nothing_else() {
    let t = Scenario::new("forged-id").await;
    let spot = t.spot_asg("spot", 2, 5).await;
    let nodes = t.ready_nodes(&spot, 2).await;
    let (liar, victim) = (name_of(&nodes[0]), instance_id(&nodes[1]).unwrap());
    let mut controller = t.start_controller(&[]);
    controller.wait_ready().await;

    // The lying node writes a notice naming its neighbour's instance (the agent's annotation).
    t.annotate(
        &liar,
        json!({
            "spot-rebalancer.io/instance-id": victim,
            "spot-rebalancer.io/rebalance-notice-time": jiff::Timestamp::now().to_string(),
        }),
    )
    .await;
    let events = t
        .wait_for_event(&liar, "a Warning InstanceIdMismatch", |e| {
            e.type_ == "Warning" && e.reason == "InstanceIdMismatch"
        })
        .await;
    let warning = events.iter().find(|e| e.reason == "InstanceIdMismatch").unwrap();
    assert!(warning.message.contains(&victim), "{}", warning.message);

    // No record for either instance, no call that changes the ASG, no taint.
    let liar_node = t.node(&liar).await;
    assert_eq!(t.record_status(&liar_node).await, None);
    assert_eq!(t.record_status(&nodes[1]).await, None);
    for action in MUTATING {
        assert!(t.calls(action, &spot).await.is_empty(), "{action} on {spot}");
    }
    assert!(termination_taint(&liar_node).is_none());
    assert_eq!(t.desired(&spot).await, 2);
    assert!(controller.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_forges_its_record_or_a_drain_request_gets_nothing_evicted_or_terminated() {
    let t = Scenario::new("forged-rec").await;
    let spot = t.spot_asg("spot", 2, 6).await;
    let nodes = t.ready_nodes(&spot, 2).await;
    let (forger, honest) = (name_of(&nodes[0]), name_of(&nodes[1]));
    let forger_instance = instance_id(&nodes[0]).unwrap();
    let honest_instance = instance_id(&nodes[1]).unwrap();
    let mut controller = t.start_controller(&[]);
    controller.wait_ready().await;

    // The forger writes what used to be the record (Tainted, with the honest node's instance as its
    // "replacement") and the webhook's drain request, on its own Node.
    let forged_record =
        json!({"spotAsg": spot, "replacementInstance": honest_instance, "replacementNode": honest});
    t.annotate(
        &forger,
        json!({
            PHASE: "Tainted",
            REPLACEMENT: forged_record.to_string(),
            DRAIN_REQUESTED: json!({"reason": "forged"}).to_string(),
        }),
    )
    .await;
    // An honest notice on the other node goes all the way, so the controller has certainly looked
    // at the forger's change meanwhile (one watch, in order).
    t.notice(&honest).await;
    t.wait_for_any_phase(&honest, &[phase::RETIRED], FLOW).await;

    // Nothing for the forger: no record, no drain, no taint, its instance still in service.
    let forger_now = t.node(&forger).await;
    assert_eq!(t.record_status(&forger_now).await, None);
    let events = t.events(&forger).await;
    assert!(
        events.iter().any(|e| e.reason == "DrainRequestIgnored"),
        "the ignored request is reported: {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| ["DrainStarted", "Drained", "Evicted", "Retired"].contains(&e.reason.as_str())),
        "{events:?}"
    );
    assert!(termination_taint(&forger_now).is_none());
    let group = t.asg(&spot).await;
    assert!(
        group.in_service().contains(&forger_instance),
        "the forger's instance was removed: {group:?}"
    );
    // The honest node's instance was the one retired (its own record), and only it.
    assert_eq!(
        controller.metric("spot_rebalancer_retirements_total", &[]).await,
        1.0
    );
    assert!(!group.in_service().contains(&honest_instance));
    assert!(controller.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_what_it_would_do_and_changes_nothing() {
    let t = Scenario::new("dry-run").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let old_node = t.ready_nodes(&spot, 1).await.remove(0);
    let old = name_of(&old_node);
    let mut controller = t.start_controller(&["--dry-run"]);
    controller.wait_ready().await;

    t.notice(&old).await;
    let events = t
        .wait_for_event(&old, "a WouldScaleUp Event", |e| e.reason == "WouldScaleUp")
        .await;
    let would = events.iter().find(|e| e.reason == "WouldScaleUp").unwrap();
    assert!(
        would.message.contains(&format!("would raise {spot}")) && would.message.contains("1 → 2"),
        "{}",
        would.message
    );
    // The record says what was decided; an interruption notice is only reported too.
    let status = t.record_status(&old_node).await.expect("a record");
    assert_eq!(status["targetDesired"], 2, "{status}");
    assert!(status.get("seat").is_none(), "a dry run holds no seat: {status}");
    t.interruption(&old).await;
    t.wait_for_event(&old, "a WouldTaint Event", |e| e.reason == "WouldTaint")
        .await;

    for action in MUTATING {
        assert!(t.calls(action, &spot).await.is_empty(), "{action} on {spot}");
    }
    assert!(termination_taint(&t.node(&old).await).is_none());
    assert_eq!(t.desired(&spot).await, 1);
    let dry_runs = controller
        .metric("spot_rebalancer_scale_ups_total", &[("result", "dry_run")])
        .await;
    assert_eq!(dry_runs, 1.0);
    assert!(controller.is_running());
}
