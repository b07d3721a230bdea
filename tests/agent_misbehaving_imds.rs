//! The node agent against an IMDS that misbehaves on purpose (a small IMDSv2 server of our own on
//! loopback): malformed documents, server errors, slow answers, failing and revoked session tokens.
//! Through all of it the agent keeps running, counts what went wrong by kind, and annotates its
//! Node (on the bed's real API server) as soon as IMDS tells it something it can read.
mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    Bed,
    agent::{
        AgentConfig, AgentProcess, Answer, FAKE_INSTANCE_ID, FakeImds, INSTANCE_ID, INTERRUPTION_TIME,
        REBALANCE_NOTICE_TIME, TestNode,
    },
    eventually,
    identity::{Role, role_kubeconfig},
};

const NOTICE_TIME: &str = "2026-03-01T10:00:00Z";
const SOON: Duration = Duration::from_secs(30);
const REBALANCE_PATH: &str = "events/recommendations/rebalance";
const POLLS: &str = "spot_rebalancer_agent_polls_total";

fn errors(kind: &str) -> String {
    format!("spot_rebalancer_agent_imds_errors_total{{kind=\"{kind}\"}}")
}

fn good_rebalance() -> Answer {
    Answer::json(json!({"noticeTime": NOTICE_TIME}))
}

async fn start(bed: &Bed, imds: &FakeImds, node: &TestNode, extra: &[&str]) -> AgentProcess {
    let mut args = vec!["--poll-interval", "1s"];
    args.extend_from_slice(extra);
    AgentProcess::start(AgentConfig {
        node: &node.name,
        imds_endpoint: &imds.endpoint,
        kubeconfig: &role_kubeconfig(bed, Role::Agent { node: &node.name }),
        extra: &args,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_documents_are_logged_with_the_offending_value_and_ignored() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-malformed").await;
    let imds = FakeImds::start().await;
    imds.set(|serve| {
        serve.rebalance = Answer::json(json!({"noticeTime": "yesterday"}));
        serve.instance_action = Answer::json(json!({"action": "reboot", "time": "2030-01-01T00:00:00Z"}));
    });
    let mut agent = start(&bed, &imds, &node, &[]).await;
    agent.wait_ready().await;
    agent.wait_for_metric(&errors("malformed"), 6.0).await;

    let log = agent.log();
    assert!(log.contains("yesterday"), "the bad time is logged:\n{log}");
    assert!(log.contains("reboot"), "the unknown action is logged:\n{log}");
    assert_eq!(
        log.lines()
            .filter(|line| line.contains("WARN") && line.contains("yesterday"))
            .count(),
        1,
        "the same bad body is warned about once, not every poll:\n{log}"
    );

    imds.set(|serve| {
        serve.rebalance = Answer::Body("{\"noticeTime\": ".to_owned());
        serve.instance_action = Answer::Bytes(vec![0xff, 0xfe, b'{', 0x80]);
    });
    agent.wait_for_metric(&errors("malformed"), 8.0).await;
    agent.wait_for_metric(&errors("unexpected"), 1.0).await;
    assert!(
        node.agent_annotations().await.is_empty(),
        "nothing malformed reached the Node"
    );
    assert!(agent.is_running(), "no panic on bad input");

    imds.set(|serve| {
        serve.rebalance = good_rebalance();
        serve.instance_action = Answer::not_found();
    });
    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await,
        NOTICE_TIME
    );
    assert_eq!(node.annotations().await[INSTANCE_ID], FAKE_INSTANCE_ID);
    assert!(!node.annotations().await.contains_key(INTERRUPTION_TIME));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_make_the_agent_back_off_then_it_recovers() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-5xx").await;
    let imds = FakeImds::start().await;
    let mut agent = start(&bed, &imds, &node, &["--backoff-max", "8s"]).await;
    agent.wait_ready().await;

    let polls_before = agent.metric(POLLS).await;
    imds.set(|serve| {
        serve.rebalance = Answer::Status(500);
        serve.instance_action = Answer::Status(503);
    });
    let before = imds.seen_at(REBALANCE_PATH).len();
    agent.wait_for_metric(&errors("status"), 10.0).await;
    assert_eq!(agent.healthz().await, Some((200, "ok".to_owned())));
    assert_eq!(agent.readyz().await, Some((200, "ready".to_owned())));

    let polls = agent.metric(POLLS).await - polls_before;
    let failing: Vec<_> = imds.seen_at(REBALANCE_PATH).into_iter().skip(before).collect();
    let gaps: Vec<Duration> = failing.windows(2).map(|pair| pair[1].at - pair[0].at).collect();
    // After three failures in a row the ceiling is 4 poll intervals, and the wait at least half of it.
    assert!(
        gaps.iter().skip(2).any(|gap| *gap >= Duration::from_millis(1900)),
        "polls back off while IMDS fails: {gaps:?}"
    );
    assert!(
        (failing.len() as f64 - polls).abs() <= 1.0,
        "one request per poll, no retry loop inside a poll: {} requests in {polls} polls",
        failing.len()
    );

    imds.set(|serve| {
        serve.rebalance = good_rebalance();
        serve.instance_action = Answer::not_found();
    });
    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await,
        NOTICE_TIME
    );
    assert!(agent.log().contains("IMDS answers again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_imds_times_out_and_the_agent_keeps_polling() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-slow").await;
    let imds = FakeImds::start().await;
    let mut agent = start(&bed, &imds, &node, &["--backoff-max", "3s"]).await;
    agent.wait_ready().await;

    imds.set(|serve| {
        let slow = Answer::Slow(Duration::from_secs(5), Box::new(good_rebalance()));
        serve.rebalance = slow.clone();
        serve.instance_action = slow;
    });
    agent.wait_for_metric(&errors("timeout"), 4.0).await;
    assert!(agent.is_running());
    assert_eq!(agent.healthz().await, Some((200, "ok".to_owned())));
    assert!(
        node.agent_annotations().await.is_empty(),
        "an answer that came too late was not used"
    );

    imds.set(|serve| {
        serve.rebalance = good_rebalance();
        serve.instance_action = Answer::not_found();
    });
    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await,
        NOTICE_TIME
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_failures_keep_the_agent_unready_until_it_gets_a_token() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-token").await;
    let imds = FakeImds::start().await;
    imds.set(|serve| {
        serve.token = Answer::Status(500);
        serve.rebalance = good_rebalance();
    });
    let mut agent = start(&bed, &imds, &node, &["--backoff-max", "2s"]).await;
    agent.wait_for_metric(&errors("token"), 2.0).await;
    assert_eq!(
        agent.readyz().await.map(|(status, _)| status),
        Some(503),
        "without a token there is no instance id"
    );

    imds.set(|serve| serve.token = Answer::Status(403));
    agent.wait_for_metric(&errors("token"), 4.0).await;
    assert!(node.agent_annotations().await.is_empty());

    imds.set(|serve| serve.token = Answer::Body(String::new()));
    agent.wait_ready().await;
    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await,
        NOTICE_TIME
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_token_is_renewed() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-revoked").await;
    let imds = FakeImds::start().await;
    let mut agent = start(&bed, &imds, &node, &[]).await;
    agent.wait_ready().await;
    agent.wait_for_metric(POLLS, 2.0).await;
    assert_eq!(imds.tokens_minted(), 1, "one session token serves every poll");

    imds.revoke_tokens();
    agent.wait_for_metric(&errors("token_rejected"), 1.0).await;
    eventually("a new session token", SOON, || async {
        (imds.tokens_minted() >= 2).then_some(())
    })
    .await;

    imds.set(|serve| serve.rebalance = good_rebalance());
    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await,
        NOTICE_TIME
    );
    assert!(imds.tokens_minted() <= 3, "renewed once, not on every poll");
}
