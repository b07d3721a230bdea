//! The controller's leadership when the API server goes away (DESIGN.md rule 13): a leader cut off
//! from the API server stops calling AWS before a standby can take its Lease over, and after an
//! API server outage the flow resumes within seconds of the API server's return.
//!
//! The controller under test reaches the API server through a TCP proxy in the test
//! ([`support::proxy`]); the bed's call log (`/_bed/calls`) says which AWS calls arrived when.
mod support;

use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use support::{
    controller::{CallRecord, Scenario, name_of},
    eventually,
    identity::{self, Role, role_kubeconfig},
    proxy::{TcpProxy, apiserver_addr, kubeconfig_through},
};

/// Generous bound for a whole replacement flow on a busy 2-core machine (it takes seconds).
const FLOW: Duration = Duration::from_secs(90);
/// The controller's fence closes this long after the last renewal the API server holds
/// (`spot_rebalancer::fence::FENCE_AFTER`, spelled out: the test pins the contract).
const FENCE_AFTER: SignedDuration = SignedDuration::from_secs(12);
/// Time for an attempt that passed the fence just before it closed to reach the bed and be logged.
const IN_FLIGHT: SignedDuration = SignedDuration::from_secs(1);

fn time_of(call: &CallRecord) -> Timestamp {
    call.time.parse().expect("the call log's times are RFC 3339")
}

/// The scenario's Lease as the API server holds it: (holder, renewTime, acquireTime).
async fn lease(t: &Scenario) -> (String, Timestamp, Timestamp) {
    let leases: Api<Lease> = Api::namespaced(t.bed.kube.clone(), identity::NAMESPACE);
    let spec = leases
        .get(&t.lease)
        .await
        .expect("read the Lease")
        .spec
        .expect("the Lease has a spec");
    (
        spec.holder_identity.unwrap_or_default(),
        spec.renew_time.expect("a held Lease has a renewTime").0,
        spec.acquire_time.expect("a held Lease has an acquireTime").0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_stops_calling_aws_before_the_standby_takes_over() {
    let t = Scenario::new("fenced").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    // Someone else is scaling the ASG: the flow waits for it and looks at the ASG every second, so
    // a leader that keeps acting keeps calling AWS.
    let foreign = t.start_foreign_activity(&spot).await;
    let proxy = TcpProxy::start(apiserver_addr(&t.bed)).await;
    let dir = tempfile::tempdir().unwrap();
    let through_proxy =
        kubeconfig_through(&role_kubeconfig(&t.bed, Role::Controller), proxy.addr, dir.path());
    let flags = [
        "--after-replacement",
        "keep",
        "--on-demand-asg-name",
        on_demand.as_str(),
        "--foreign-activity-timeout",
        "10m",
        "--capacity-timeout",
        "60s",
    ];
    let mut leader =
        t.start_controller(&[&["--kubeconfig", through_proxy.to_str().unwrap()], &flags[..]].concat());
    leader.wait_ready().await;
    eventually(
        "the first controller holds the lease",
        Duration::from_secs(30),
        || async { (t.lease_holder().await == leader.identity).then_some(()) },
    )
    .await;
    let mut standby = t.start_controller(&flags);
    standby.wait_ready().await;

    t.notice(&old).await;
    eventually("the leader looks at the ASG for the notice", FLOW, || async {
        (t.calls("DescribeScalingActivities", &spot).await.len() >= 3).then_some(())
    })
    .await;

    // The leader loses the API server; the standby still has it.
    proxy.cut();
    let cut_at = Timestamp::now();
    let (holder, renewed, _) = lease(&t).await;
    assert_eq!(holder, leader.identity);
    let fence_deadline = renewed + FENCE_AFTER;
    eventually(
        "the standby takes the lease over",
        Duration::from_secs(60),
        || async { (t.lease_holder().await == standby.identity).then_some(()) },
    )
    .await;
    let (_, _, taken_over) = lease(&t).await;
    assert!(
        fence_deadline < taken_over,
        "the fence ({fence_deadline}) closes before the standby may act ({taken_over})"
    );
    eventually("the standby looks at the ASG", FLOW, || async {
        let calls = t.calls("DescribeScalingActivities", &spot).await;
        calls.iter().any(|call| time_of(call) > taken_over).then_some(())
    })
    .await;

    let calls = t.all_calls(&spot).await;
    let before_cut = calls.iter().filter(|call| time_of(call) < cut_at).count();
    assert!(before_cut >= 3, "the leader was acting before the cut: {calls:?}");
    let after_fence: Vec<&CallRecord> = calls
        .iter()
        .filter(|call| time_of(call) > fence_deadline + IN_FLIGHT && time_of(call) < taken_over)
        .collect();
    assert!(
        after_fence.is_empty(),
        "the cut-off leader called AWS after its fence closed at {fence_deadline} (cut at {cut_at}, \
         standby from {taken_over}): {after_fence:?}"
    );

    // Back in touch, the old leader sees the Lease is another's and exits; the standby finishes
    // the one replacement.
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(60);
    while leader.is_running() {
        assert!(
            Instant::now() < deadline,
            "the old leader still runs: {}",
            leader.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(leader.log().contains("lost the leader lease"), "{}", leader.log());
    t.finish_foreign_activity(&foreign, "Successful").await;
    eventually("the standby scales up for the notice", FLOW, || async {
        (!t.set_desired_calls(&spot).await.is_empty()).then_some(())
    })
    .await;
    t.assert_desired_settles(&spot, 2, "baseline 1 + one replacement, scaled once")
        .await;
    assert!(standby.is_running());
}

/// How long the API server stays away: past the Lease's duration, and long enough that kube's
/// default watch backoff would have grown to its 30 s ceiling.
const OUTAGE: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_api_server_outage_the_flow_resumes_within_seconds_of_its_return() {
    let t = Scenario::new("outage").await;
    let spot = t.spot_asg("spot", 1, 5).await;
    let on_demand = t.on_demand_asg("od", 0, 5).await;
    let old = name_of(&t.ready_nodes(&spot, 1).await[0]);
    let proxy = TcpProxy::start(apiserver_addr(&t.bed)).await;
    let dir = tempfile::tempdir().unwrap();
    let through_proxy =
        kubeconfig_through(&role_kubeconfig(&t.bed, Role::Controller), proxy.addr, dir.path());
    let mut controller = t.start_controller(&[
        "--after-replacement",
        "keep",
        "--kubeconfig",
        through_proxy.to_str().unwrap(),
        "--on-demand-asg-name",
        &on_demand,
    ]);
    controller.wait_ready().await;
    eventually(
        "the controller holds the lease",
        Duration::from_secs(30),
        || async { (t.lease_holder().await == controller.identity).then_some(()) },
    )
    .await;
    // The outage starts once the controller runs its flows, not during its start.
    eventually("the controller reconciles", Duration::from_secs(30), || async {
        controller
            .log()
            .contains("reconciling opted-in nodes")
            .then_some(())
    })
    .await;

    // The notice arrives while the controller cannot see the API server.
    proxy.cut();
    tokio::time::sleep(OUTAGE / 2).await;
    t.notice(&old).await;
    tokio::time::sleep(OUTAGE / 2).await;
    assert!(
        t.set_desired_calls(&spot).await.is_empty(),
        "nothing was scaled while the controller was cut off"
    );
    let back = Instant::now();
    let back_at = Timestamp::now();
    proxy.restore();

    let scaled = eventually("the controller scales up for the notice", FLOW, || async {
        t.set_desired_calls(&spot).await.first().cloned()
    })
    .await;
    assert_eq!(scaled.desired_capacity, Some(2));
    assert!(controller.is_running(), "{}", controller.log());
    // A figure, not a limit: scripts/measure-recovery collects it.
    let resumed = time_of(&scaled).duration_since(back_at);
    eprintln!(
        "recovery: first SetDesiredCapacity {:.1} s after the API server came back (outage {} s; test saw it after {:.1} s)",
        resumed.as_secs_f64(),
        OUTAGE.as_secs(),
        back.elapsed().as_secs_f64(),
    );
    t.assert_desired_settles(&spot, 2, "baseline 1 + one replacement")
        .await;
}
