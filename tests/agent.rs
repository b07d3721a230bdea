//! The node agent against the real parts: AWS's own IMDS mock (amazon-ec2-metadata-mock) and the
//! bed's Kubernetes API server. Each test runs its own mock, its own Node and a real agent process;
//! it asserts what a user would check: the annotations on the Node and the agent's metrics.
mod support;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use support::{
    Bed,
    agent::{
        AgentConfig, AgentProcess, INSTANCE_ID, INTERRUPTION_TIME, ImdsMock, MOCK_INSTANCE_ID,
        REBALANCE_NOTICE_TIME, TestNode,
    },
    eventually,
    identity::{NAMESPACE, Role, node_bound_kubeconfig, rendered_documents, role_kubeconfig},
    proxy::{TcpProxy, apiserver_addr, kubeconfig_through},
    webhook::{kubectl, kubectl_with_input},
};

/// The rebalance recommendation's notice time, pinned (`-r`) so the annotation can be checked.
const NOTICE_TIME: &str = "2020-10-27T08:22:00Z";
/// The interruption time, pinned (`-t`); in the future, as a real notice's is.
const INTERRUPTION_AT: &str = "2030-01-01T00:00:00Z";
/// Long enough that the mock never shows that notice during a test.
const NEVER: &str = "86400";
/// Generous functional timeout for something that takes a poll or two.
const SOON: Duration = Duration::from_secs(30);

const NOTICES_REBALANCE: &str = "spot_rebalancer_agent_notices_total{kind=\"rebalance\"}";
const WRITES_OK: &str = "spot_rebalancer_agent_annotation_writes_total{result=\"ok\"}";
const WRITES_FAILED: &str = "spot_rebalancer_agent_annotation_writes_total{result=\"error\"}";
const WRITE_PENDING: &str = "spot_rebalancer_agent_annotation_write_pending";
const POLLS: &str = "spot_rebalancer_agent_polls_total";

fn start_agent(node: &TestNode, imds: &str, kubeconfig: &Path, extra: &[&str]) -> AgentProcess {
    AgentProcess::start(AgentConfig {
        node: &node.name,
        imds_endpoint: imds,
        kubeconfig,
        extra,
    })
}

/// The agent's own identity on `node` (the chart's ServiceAccount, a token bound to the Node).
fn agent_kubeconfig(bed: &Bed, node: &TestNode) -> PathBuf {
    role_kubeconfig(bed, Role::Agent { node: &node.name })
}

/// A ready agent on a new Node whose API connections go through a [`TcpProxy`] (to cut them, or
/// count them), polling a metadata mock that shows no notice yet.
struct ProxiedAgent {
    node: TestNode,
    proxy: TcpProxy,
    mock: ImdsMock,
    agent: AgentProcess,
    /// Holds the kubeconfig through the proxy.
    _dir: tempfile::TempDir,
}

impl ProxiedAgent {
    async fn start(node_name: &str, extra: &[&str]) -> Self {
        let bed = Bed::connect().await;
        let node = TestNode::create(&bed, node_name).await;
        let proxy = TcpProxy::start(apiserver_addr(&bed)).await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = kubeconfig_through(&agent_kubeconfig(&bed, &node), proxy.addr, dir.path());
        let mock = ImdsMock::start(&bed, &["spot", "-I", "-d", NEVER, "--rebalance-delay-sec", NEVER]).await;
        let mut agent = start_agent(&node, &mock.endpoint(), &kubeconfig, extra);
        agent.wait_ready().await;
        ProxiedAgent {
            node,
            proxy,
            mock,
            agent,
            _dir: dir,
        }
    }
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// When the agent's field manager last wrote to the Node (from `managedFields`).
async fn last_agent_write(node: &TestNode) -> Option<String> {
    node.get()
        .await
        .metadata
        .managed_fields?
        .into_iter()
        .find(|entry| entry.manager.as_deref() == Some("spot-rebalancer-agent"))
        .and_then(|entry| entry.time)
        .map(|time| format!("{:?}", time.0))
}

#[tokio::test]
async fn a_rebalance_notice_is_annotated_on_the_first_poll_that_sees_it() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-rebalance").await;
    let delay = Duration::from_secs(5);
    let mock = ImdsMock::start(
        &bed,
        &[
            "spot",
            "-d",
            NEVER,
            "--rebalance-delay-sec",
            "5",
            "-r",
            NOTICE_TIME,
        ],
    )
    .await;
    let visible_at = Instant::now() + delay;
    let mut agent = start_agent(
        &node,
        &mock.endpoint(),
        &agent_kubeconfig(&bed, &node),
        &["--poll-interval", "1s"],
    );
    agent.wait_ready().await;
    if Instant::now() + Duration::from_secs(1) < visible_at {
        assert!(
            node.agent_annotations().await.is_empty(),
            "nothing is written before the notice"
        );
    }

    let written = node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await;
    eprintln!(
        "annotation seen {:?} after the mock began to show the notice (poll interval 1 s)",
        Instant::now().saturating_duration_since(visible_at)
    );
    assert_eq!(written, NOTICE_TIME);
    assert_eq!(
        node.agent_annotations().await,
        annotations(&[
            (REBALANCE_NOTICE_TIME, NOTICE_TIME),
            (INSTANCE_ID, MOCK_INSTANCE_ID)
        ])
    );
    assert_eq!(agent.metric(NOTICES_REBALANCE).await, 1.0);
    assert_eq!(agent.metric(WRITES_OK).await, 1.0, "one notice, one write");
    assert_eq!(
        agent.metric(WRITES_FAILED).await,
        0.0,
        "written straight after the poll that saw it, not on a retry"
    );
}

#[tokio::test]
async fn the_same_notice_seen_again_writes_nothing() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-again").await;
    let mock = ImdsMock::start(&bed, &["spot", "-d", NEVER, "-r", NOTICE_TIME]).await;
    let mut agent = start_agent(
        &node,
        &mock.endpoint(),
        &agent_kubeconfig(&bed, &node),
        &["--poll-interval", "1s"],
    );
    node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await;
    agent.wait_for_metric(WRITES_OK, 1.0).await;
    let first_write = last_agent_write(&node)
        .await
        .expect("the agent's field manager wrote");

    // Managed-field times have a one-second resolution: wait well past it, over several polls.
    let polls = agent.metric(POLLS).await;
    agent.wait_for_metric(POLLS, polls + 4.0).await;

    assert_eq!(agent.metric(WRITES_OK).await, 1.0);
    assert_eq!(
        agent.metric(NOTICES_REBALANCE).await,
        1.0,
        "the same notice is counted once"
    );
    assert_eq!(
        last_agent_write(&node).await.as_deref(),
        Some(first_write.as_str()),
        "the Node was not written again"
    );
}

#[tokio::test]
async fn a_rebalance_notice_time_that_moves_at_every_poll_is_written_once() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-moving").await;
    // Without `-r`, AWS's mock answers each request with the time of that request.
    let mock = ImdsMock::start(&bed, &["spot", "-I", "-d", NEVER, "--rebalance-delay-sec", "0"]).await;
    let mut agent = start_agent(
        &node,
        &mock.endpoint(),
        &agent_kubeconfig(&bed, &node),
        &["--poll-interval", "1s"],
    );
    let written = node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await;
    agent.wait_for_metric(WRITES_OK, 1.0).await;
    let first_write = last_agent_write(&node)
        .await
        .expect("the agent's field manager wrote");

    // Each of these polls reads another noticeTime (one-second resolution, one poll a second).
    let polls = agent.metric(POLLS).await;
    agent.wait_for_metric(POLLS, polls + 4.0).await;

    assert_eq!(
        node.annotations().await.get(REBALANCE_NOTICE_TIME),
        Some(&written),
        "the first notice time stays"
    );
    assert_eq!(agent.metric(WRITES_OK).await, 1.0, "one write, not one per poll");
    assert_eq!(agent.metric(NOTICES_REBALANCE).await, 1.0);
    assert_eq!(
        last_agent_write(&node).await.as_deref(),
        Some(first_write.as_str()),
        "the Node was not written again"
    );
}

#[tokio::test]
async fn the_chart_places_an_agent_on_an_opted_in_node_with_an_unrelated_taint() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams, Patch, PatchParams};
    use support::webhook::{kubectl, kubectl_with_input};

    let bed = Bed::connect().await;
    support::identity::apply_chart_identities(&bed);
    // A kwok Node carries the taint `kwok.x-k8s.io/node=fake:NoSchedule`, which the chart knows
    // nothing about: its node group's own taint, as far as the agent is concerned.
    let node = TestNode::create(&bed, "agent-tainted").await;
    let placement = support::unique("placement");
    bed.nodes()
        .patch(
            &node.name,
            &PatchParams::default(),
            // `kubernetes.io/os` is what a real kubelet puts on its Node (the chart selects on it).
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "kubernetes.io/os": "linux",
                "spot-rebalancer.io/enabled": "true",
                "spot-rebalancer.io/e2e-placement": placement,
            }}})),
        )
        .await
        .unwrap();

    // The chart's DaemonSet as rendered with its defaults, renamed and narrowed to this test's node
    // (so it places no pod on other tests' nodes); tolerations, host network and the rest untouched.
    let rendered = support::identity::rendered_documents(&["DaemonSet"]).remove(0);
    let opt_in = "        spot-rebalancer.io/enabled: \"true\"\n";
    assert!(rendered.contains(opt_in), "{rendered}");
    let daemonset_name = support::unique("agent-placement");
    let daemonset = rendered
        .replace(
            "  name: spot-rebalancer-agent\n",
            &format!("  name: {daemonset_name}\n"),
        )
        .replace(
            opt_in,
            &format!("{opt_in}        spot-rebalancer.io/e2e-placement: {placement}\n"),
        );
    let applied = kubectl_with_input(&bed, &["apply", "-f", "-"], &daemonset);
    assert!(applied.success, "{}", applied.stderr);

    let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), support::identity::AGENT_NAMESPACE);
    let on_node = ListParams::default().fields(&format!("spec.nodeName={}", node.name));
    let phase = eventually("an agent pod running on the tainted node", SOON, || async {
        let pod = pods.list(&on_node).await.ok()?.items.into_iter().next()?;
        let phase = pod.status?.phase?;
        (phase == "Running").then_some(phase)
    })
    .await;
    let deleted = kubectl(
        &bed,
        &[
            "delete",
            "daemonset",
            "-n",
            support::identity::AGENT_NAMESPACE,
            &daemonset_name,
            "--wait=false",
        ],
    );
    assert_eq!(phase, "Running");
    assert!(deleted.success, "{}", deleted.stderr);
}

#[tokio::test]
async fn an_imdsv2_only_imds_is_read_with_session_tokens() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-v2").await;
    // -I: every metadata request without a valid session token is refused with 401.
    let mock = ImdsMock::start(&bed, &["spot", "-I", "-d", NEVER, "-r", NOTICE_TIME]).await;
    let mut agent = start_agent(
        &node,
        &mock.endpoint(),
        &agent_kubeconfig(&bed, &node),
        &["--poll-interval", "1s"],
    );
    agent.wait_ready().await;

    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await,
        NOTICE_TIME
    );
    assert_eq!(node.annotations().await[INSTANCE_ID], MOCK_INSTANCE_ID);
    assert_eq!(
        agent
            .metric("spot_rebalancer_agent_imds_errors_total{kind=\"token_rejected\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_spot_interruption_notice_is_annotated() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-itn").await;
    let mock = ImdsMock::start(
        &bed,
        &[
            "spot",
            "-I",
            "-a",
            "terminate",
            "-t",
            INTERRUPTION_AT,
            "-d",
            "2",
            "--rebalance-delay-sec",
            NEVER,
        ],
    )
    .await;
    let mut agent = start_agent(
        &node,
        &mock.endpoint(),
        &agent_kubeconfig(&bed, &node),
        &["--poll-interval", "1s"],
    );

    assert_eq!(
        node.wait_for_annotation(INTERRUPTION_TIME, SOON).await,
        INTERRUPTION_AT
    );
    assert_eq!(
        node.agent_annotations().await,
        annotations(&[
            (INTERRUPTION_TIME, INTERRUPTION_AT),
            (INSTANCE_ID, MOCK_INSTANCE_ID)
        ]),
        "no rebalance recommendation was shown, so none is written"
    );
    assert_eq!(
        agent
            .metric("spot_rebalancer_agent_notices_total{kind=\"interruption\"}")
            .await,
        1.0
    );
    agent.wait_ready().await;
}

#[tokio::test]
async fn the_agent_recovers_when_imds_stops_and_comes_back() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-imds-gone").await;
    let no_notice = ["spot", "-I", "-d", NEVER, "--rebalance-delay-sec", NEVER];
    let mut mock = ImdsMock::start(&bed, &no_notice).await;
    let mut agent = start_agent(
        &node,
        &mock.endpoint(),
        &agent_kubeconfig(&bed, &node),
        &["--poll-interval", "1s", "--backoff-max", "4s"],
    );
    agent.wait_ready().await;
    let last_good = agent
        .wait_for_metric(
            "spot_rebalancer_agent_last_successful_poll_timestamp_seconds",
            1.0,
        )
        .await;

    mock.stop();
    agent
        .wait_for_metric(
            "spot_rebalancer_agent_imds_errors_total{kind=\"unreachable\"}",
            2.0,
        )
        .await;
    assert_eq!(
        agent.healthz().await,
        Some((200, "ok".to_owned())),
        "alive while IMDS is gone"
    );
    assert!(agent.is_running());

    // The restarted mock has forgotten the old session token; it shows a notice now.
    mock.restart(&["spot", "-I", "-d", NEVER, "-r", NOTICE_TIME])
        .await;
    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await,
        NOTICE_TIME
    );
    assert!(
        agent
            .metric("spot_rebalancer_agent_last_successful_poll_timestamp_seconds")
            .await
            > last_good,
        "polls succeed again"
    );
    assert!(
        agent
            .metric("spot_rebalancer_agent_imds_errors_total{kind=\"token_rejected\"}")
            .await
            >= 1.0,
        "the stale session token was rejected, and renewed"
    );
    assert!(agent.log().contains("IMDS answers again"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_seen_while_the_api_server_is_unreachable_is_written_once_it_is_back() {
    let ProxiedAgent {
        node,
        proxy,
        mut mock,
        mut agent,
        _dir,
    } = ProxiedAgent::start(
        "agent-api-gone",
        &["--poll-interval", "1s", "--backoff-max", "2s"],
    )
    .await;

    proxy.cut();
    mock.restart(&["spot", "-I", "-d", NEVER, "-r", NOTICE_TIME])
        .await;
    agent.wait_for_metric(NOTICES_REBALANCE, 1.0).await;
    agent.wait_for_metric(WRITES_FAILED, 2.0).await;
    assert_eq!(
        agent.metric(WRITE_PENDING).await,
        1.0,
        "the notice waits to be written"
    );
    assert!(
        node.agent_annotations().await.is_empty(),
        "nothing reached the Node while the API server was away"
    );

    proxy.restore();
    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await,
        NOTICE_TIME
    );
    eventually("the pending flag clears", SOON, || async {
        (agent.metric(WRITE_PENDING).await == 0.0).then_some(())
    })
    .await;
    assert_eq!(agent.metric(WRITES_OK).await, 1.0, "written exactly once");
    assert_eq!(
        node.agent_annotations().await,
        annotations(&[
            (REBALANCE_NOTICE_TIME, NOTICE_TIME),
            (INSTANCE_ID, MOCK_INSTANCE_ID)
        ])
    );
}

/// `--api-keepalive` keeps the agent's one API connection open while it idles between keep-alives
/// for longer than the agent's 15 s API call deadline (a connection read timeout of that length used
/// to drop the idle pooled connection): the keep-alive and then the notice's write go over it, with
/// no new TCP and TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_keeps_its_api_connection_warm_and_writes_the_notice_over_it() {
    let ProxiedAgent {
        node,
        proxy,
        mut mock,
        agent,
        _dir,
    } = ProxiedAgent::start("agent-warm", &["--poll-interval", "1s", "--api-keepalive", "20s"]).await;
    let after_start = proxy.connections();

    // Past the first keep-alive (20 s), which came after more than 15 s of silence.
    tokio::time::sleep(Duration::from_secs(25)).await;
    mock.restart(&["spot", "-I", "-d", NEVER, "-r", NOTICE_TIME])
        .await;
    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await,
        NOTICE_TIME
    );
    assert_eq!(agent.metric(WRITES_OK).await, 1.0);
    assert_eq!(
        proxy.connections(),
        after_start,
        "no new API connection while idle nor for the write"
    );
}

#[tokio::test]
async fn a_restarted_agent_reads_what_its_node_says_and_writes_nothing_new() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-restart").await;
    let mock = ImdsMock::start(&bed, &["spot", "-I", "-d", NEVER, "-r", NOTICE_TIME]).await;
    let mut first = start_agent(
        &node,
        &mock.endpoint(),
        &agent_kubeconfig(&bed, &node),
        &["--poll-interval", "1s"],
    );
    node.wait_for_annotation(REBALANCE_NOTICE_TIME, SOON).await;
    first.wait_for_metric(WRITES_OK, 1.0).await;
    assert!(first.terminate().success());

    let mut second = start_agent(
        &node,
        &mock.endpoint(),
        &agent_kubeconfig(&bed, &node),
        &["--poll-interval", "1s"],
    );
    second.wait_ready().await;
    second.wait_for_metric(NOTICES_REBALANCE, 1.0).await;
    let polls = second.metric(POLLS).await;
    second.wait_for_metric(POLLS, polls + 2.0).await;
    assert_eq!(
        second.metric(WRITES_OK).await,
        0.0,
        "the notice was already on the Node"
    );
    assert_eq!(node.annotations().await[REBALANCE_NOTICE_TIME], NOTICE_TIME);
}

#[tokio::test]
async fn an_agent_whose_node_does_not_exist_is_alive_but_not_ready() {
    let bed = Bed::connect().await;
    let mock = ImdsMock::start(&bed, &["spot", "-I", "-d", NEVER, "--rebalance-delay-sec", NEVER]).await;
    let mut agent = AgentProcess::start(AgentConfig {
        node: &support::unique("no-such-node"),
        imds_endpoint: &mock.endpoint(),
        kubeconfig: &role_kubeconfig(&bed, Role::UnboundAgent),
        extra: &["--poll-interval", "1s", "--backoff-max", "2s"],
    });
    eventually("the agent polls IMDS", SOON, || async {
        agent
            .healthz()
            .await
            .filter(|(status, _)| *status == 200)
            .map(|_| ())
    })
    .await;
    agent.wait_for_metric(POLLS, 2.0).await;
    eventually("the agent says why it is not ready", SOON, || async {
        agent.log().contains("NODE_NAME").then_some(())
    })
    .await;
    assert_eq!(agent.readyz().await.map(|(status, _)| status), Some(503));
    assert!(agent.is_running());
}

/// A twin of the agent's identity: its own ServiceAccount bound to the chart's agent ClusterRole,
/// which the chart's admission policy does not match (it names the agent's username). Optionally
/// the chart's policy and binding, copied for the twin. All removed when dropped.
struct AgentTwin<'a> {
    bed: &'a Bed,
    account: String,
    policy_copied: bool,
}

impl<'a> AgentTwin<'a> {
    fn create(bed: &'a Bed) -> Self {
        support::identity::apply_chart_identities(bed);
        let account = support::unique("agent-twin");
        let username = format!("system:serviceaccount:{NAMESPACE}:{account}");
        for args in [
            vec!["create", "serviceaccount", &account, "-n", NAMESPACE],
            vec![
                "create",
                "clusterrolebinding",
                &account,
                "--clusterrole",
                "spot-rebalancer-agent",
                "--serviceaccount",
                &format!("{NAMESPACE}:{account}"),
            ],
        ] {
            let output = kubectl(bed, &args);
            assert!(output.success, "{args:?}: {}", output.stderr);
        }
        let deadline = Instant::now() + SOON;
        while kubectl(bed, &["auth", "can-i", "patch", "nodes", "--as", &username]).stdout != "yes\n" {
            assert!(Instant::now() < deadline, "the twin's RBAC is not in force");
            std::thread::sleep(Duration::from_millis(100));
        }
        AgentTwin {
            bed,
            account,
            policy_copied: false,
        }
    }

    /// The chart's policy and binding with the twin's name and username in place of the agent's.
    fn copy_the_chart_policy(&mut self) {
        let documents: Vec<String> =
            rendered_documents(&["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"])
                .into_iter()
                .map(|doc| {
                    doc.replace("spot-rebalancer-agent-own-node", &self.account)
                        .replace(
                            &Role::UnboundAgent.username(),
                            &format!("system:serviceaccount:{NAMESPACE}:{}", self.account),
                        )
                })
                .collect();
        assert_eq!(documents.len(), 2, "the chart's agent policy and binding");
        let output = kubectl_with_input(self.bed, &["apply", "-f", "-"], &documents.join("\n---\n"));
        assert!(output.success, "{}", output.stderr);
        self.policy_copied = true;
    }
}

impl Drop for AgentTwin<'_> {
    fn drop(&mut self) {
        let account = self.account.as_str();
        let mut deletions = vec![
            vec!["delete", "clusterrolebinding", account, "--ignore-not-found"],
            vec![
                "delete",
                "serviceaccount",
                account,
                "-n",
                NAMESPACE,
                "--ignore-not-found",
            ],
        ];
        if self.policy_copied {
            deletions.push(vec![
                "delete",
                "validatingadmissionpolicybinding",
                account,
                "--ignore-not-found",
            ]);
            deletions.push(vec![
                "delete",
                "validatingadmissionpolicy",
                account,
                "--ignore-not-found",
            ]);
        }
        for args in deletions {
            kubectl(self.bed, &args);
        }
    }
}

#[tokio::test]
async fn an_agent_whose_admission_policy_is_not_enforced_exits_naming_it_and_writes_nothing() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-unguarded").await;
    let mock = ImdsMock::start(
        &bed,
        &[
            "spot",
            "-d",
            NEVER,
            "--rebalance-delay-sec",
            "1",
            "-r",
            NOTICE_TIME,
        ],
    )
    .await;
    let mut twin = AgentTwin::create(&bed);
    let kubeconfig = node_bound_kubeconfig(&bed, &twin.account, &node.name);
    let args = ["--poll-interval", "1s", "--admission-policy-wait", "3s"];

    // No policy matches the twin: RBAC alone would let it change any Node.
    let mut agent = start_agent(&node, &mock.endpoint(), &kubeconfig, &args);
    let status = agent.wait_for_exit(SOON).await;
    let log = agent.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("the agent's ValidatingAdmissionPolicy is not enforced"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "annotation spot-rebalancer.io/admission-policy-probe on Node {}",
            node.name
        )),
        "{log}"
    );
    assert!(log.contains("--skip-admission-policy-check"), "{log}");
    assert_eq!(
        node.agent_annotations().await,
        BTreeMap::new(),
        "it wrote before the proof"
    );
    assert!(
        !node
            .annotations()
            .await
            .contains_key("spot-rebalancer.io/admission-policy-probe"),
        "the probe was written"
    );

    // The chart's policy bound for the twin: the same agent proves it, starts and writes the notice.
    twin.copy_the_chart_policy();
    let mut agent = start_agent(&node, &mock.endpoint(), &kubeconfig, &args);
    agent.wait_ready().await;
    assert!(
        agent.log().contains("the agent's admission policy is enforced"),
        "{}",
        agent.log()
    );
    eventually("the notice on the Node", SOON, || async {
        let written = node.agent_annotations().await;
        (written.get(REBALANCE_NOTICE_TIME).map(String::as_str) == Some(NOTICE_TIME)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_agent_told_to_skip_the_policy_check_runs_without_the_policy() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "agent-skip-check").await;
    let mock = ImdsMock::start(&bed, &["spot", "-d", NEVER, "--rebalance-delay-sec", NEVER]).await;
    let twin = AgentTwin::create(&bed);
    let kubeconfig = node_bound_kubeconfig(&bed, &twin.account, &node.name);
    let mut agent = start_agent(
        &node,
        &mock.endpoint(),
        &kubeconfig,
        &["--skip-admission-policy-check"],
    );
    agent.wait_ready().await;
    assert!(
        agent
            .log()
            .contains("not checking that the agent's admission policy is enforced"),
        "{}",
        agent.log()
    );
}
