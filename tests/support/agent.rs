//! The node agent's test parts: the real agent process, AWS's IMDS mock (amazon-ec2-metadata-mock)
//! from the bed, a fake IMDS that misbehaves on demand, a Node for the agent to own, and a TCP proxy
//! that cuts the agent off from the API server and lets it back. Loopback only.
use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    body::Body,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, put},
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::process::{BINARY, RoleCommand, RoleProcess};
use super::{Bed, eventually};

/// The instance id amazon-ec2-metadata-mock serves.
pub const MOCK_INSTANCE_ID: &str = "i-1234567890abcdef0";
/// The instance id [`FakeImds`] serves.
pub const FAKE_INSTANCE_ID: &str = "i-0fa4e000000000001";

pub const REBALANCE_NOTICE_TIME: &str = "spot-rebalancer.io/rebalance-notice-time";
pub const INTERRUPTION_TIME: &str = "spot-rebalancer.io/interruption-time";
pub const INSTANCE_ID: &str = "spot-rebalancer.io/instance-id";

pub use super::process::free_port;

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, what: &str) {
    eventually(
        &format!("{what} listens on {port}"),
        Duration::from_secs(15),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(drop)
        },
    )
    .await;
}

/// Whether process `pid` holds the IPv4 socket listening on `port`: the inodes of the listening
/// sockets on that port in /proc/net/tcp, matched against the process's open files.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!(":{port:04X}");
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(1)?.ends_with(&local) && *fields.get(3)? == "0A";
            let inode = fields.get(9)?;
            listening.then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| sockets.iter().any(|socket| target.as_os_str() == socket.as_str()))
    })
}

// ----- the agent process -----------------------------------------------------------------------

/// What an agent is started with; `extra` holds further flags (`--poll-interval 1s`, ...).
pub struct AgentConfig<'a> {
    pub node: &'a str,
    pub imds_endpoint: &'a str,
    pub kubeconfig: &'a Path,
    pub extra: &'a [&'a str],
}

/// A running `spot-rebalancer agent` ([`RoleProcess`]: killed when dropped, its log printed if the
/// test failed).
pub struct AgentProcess {
    process: RoleProcess,
}

impl std::ops::Deref for AgentProcess {
    type Target = RoleProcess;
    fn deref(&self) -> &RoleProcess {
        &self.process
    }
}

impl std::ops::DerefMut for AgentProcess {
    fn deref_mut(&mut self) -> &mut RoleProcess {
        &mut self.process
    }
}

impl AgentProcess {
    pub fn start(config: AgentConfig<'_>) -> Self {
        // The benches compare builds (an agent-only binary, another profile) by pointing here.
        let binary = std::env::var("BENCH_AGENT_BINARY").unwrap_or_else(|_| BINARY.to_owned());
        Self::start_binary(&binary, config)
    }

    /// As [`AgentProcess::start`], with this build of the binary (the benches compare builds).
    pub fn start_binary(binary: &str, config: AgentConfig<'_>) -> Self {
        let process = RoleCommand::of(binary, "agent")
            .label(format!("agent {}", config.node))
            .args(["--node-name", config.node])
            .args(["--imds-endpoint", config.imds_endpoint])
            .arg("--kubeconfig")
            .arg(config.kubeconfig)
            .args(config.extra)
            // The flag's environment variable: the agent must use the endpoint it is given.
            .env_remove("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .spawn();
        AgentProcess { process }
    }

    /// `/readyz` said ready.
    pub async fn wait_ready(&mut self) {
        let body = self.process.wait_ready(Duration::from_secs(30)).await;
        assert_eq!(body, "ready");
    }

    pub async fn readyz(&self) -> Option<(u16, String)> {
        self.get("/readyz").await
    }

    pub async fn healthz(&self) -> Option<(u16, String)> {
        self.get("/healthz").await
    }

    /// One sample, e.g. `metric("spot_rebalancer_agent_imds_errors_total{kind=\"timeout\"}")`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, sample).unwrap_or_else(|| panic!("{sample} is not in /metrics:\n{text}"))
    }

    /// Waits until `sample` reaches at least `value`.
    pub async fn wait_for_metric(&mut self, sample: &str, value: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self
                .try_metrics()
                .await
                .and_then(|text| metric_value(&text, sample))
                .unwrap_or(f64::NAN);
            if now >= value {
                return now;
            }
            assert!(self.is_running(), "the agent exited:\n{}", self.log());
            assert!(
                Instant::now() < deadline,
                "{sample} stayed at {now}, below {value}, for 60 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status, once the agent exits by itself (at most `within`).
    pub async fn wait_for_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        self.process.wait_exit(within)
    }
}

/// The value of one sample line in Prometheus text.
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

// ----- AWS's IMDS mock ------------------------------------------------------------------------

/// amazon-ec2-metadata-mock on a loopback port, killed when dropped; it can be stopped and started
/// again on the same port.
pub struct ImdsMock {
    binary: String,
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl ImdsMock {
    /// Starts the mock with `args` (e.g. `["spot", "-I", "--rebalance-delay-sec", "3"]`).
    ///
    /// The port is free when chosen but may be taken before the mock binds it (another test's
    /// process, or a connection's local port): then the mock exits while `wait_for_port` may be
    /// answered by whoever took it, and the test would talk to a stranger that goes away (seen
    /// twice in `make test`, once after a check that only waited 300 ms for an exit). The mock is
    /// used only once /proc shows its own process listening on the port; otherwise it is started
    /// again on another port.
    pub async fn start(bed: &Bed, args: &[&str]) -> Self {
        let mut mock = ImdsMock {
            binary: bed.vars["BED_IMDS_MOCK"].clone(),
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        for _ in 0..5 {
            mock.restart(args).await;
            if mock.holds_its_port().await {
                return mock;
            }
            mock.stop();
            mock.port = free_port();
        }
        panic!(
            "amazon-ec2-metadata-mock exited at start five times (log in {:?})",
            mock.dir.path()
        );
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether the mock itself listens on its port (its own socket, read from /proc), within 10 s;
    /// false as soon as it exits. A connection that succeeds proves only that someone listens.
    async fn holds_its_port(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let Some(child) = self.child.as_mut() else {
                return false;
            };
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if listens_on(child.id(), self.port) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the mock if it runs, then starts it with `args` on the same port.
    pub async fn restart(&mut self, args: &[&str]) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("mock.log")).unwrap();
        let child = Command::new(&self.binary)
            .args(args)
            .args(["-n", "127.0.0.1", "-p", &self.port.to_string()])
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start amazon-ec2-metadata-mock");
        self.child = Some(child);
        wait_for_port(self.port, "amazon-ec2-metadata-mock").await;
    }
}

impl Drop for ImdsMock {
    fn drop(&mut self) {
        self.stop();
    }
}

// ----- a Node for the agent -------------------------------------------------------------------

/// A fake Node (kwok keeps it Ready) with a unique name; deleted when dropped.
pub struct TestNode {
    pub name: String,
    api: Api<Node>,
    kubectl: String,
    kubeconfig: String,
}

impl TestNode {
    pub async fn create(bed: &Bed, prefix: &str) -> Self {
        let name = super::unique(prefix);
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake"},
                "labels": {"type": "kwok", "spot-rebalancer.io/test": "agent"},
            },
            // Nothing real is scheduled onto it.
            "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]},
        }))
        .unwrap();
        let api = bed.nodes();
        api.create(&PostParams::default(), &node)
            .await
            .expect("create the test Node");
        TestNode {
            name,
            api,
            kubectl: bed.vars["BED_KUBECTL"].clone(),
            kubeconfig: bed.vars["BED_KUBECONFIG"].clone(),
        }
    }

    pub async fn get(&self) -> Node {
        self.api.get(&self.name).await.expect("read the test Node")
    }

    pub async fn annotations(&self) -> BTreeMap<String, String> {
        self.get().await.metadata.annotations.unwrap_or_default()
    }

    /// The agent's annotations only.
    pub async fn agent_annotations(&self) -> BTreeMap<String, String> {
        let mut annotations = self.annotations().await;
        annotations
            .retain(|key, _| [REBALANCE_NOTICE_TIME, INTERRUPTION_TIME, INSTANCE_ID].contains(&key.as_str()));
        annotations
    }

    /// Waits until the Node carries `key`, and returns its value.
    pub async fn wait_for_annotation(&self, key: &str, timeout: Duration) -> String {
        eventually(&format!("annotation {key} on {}", self.name), timeout, || async {
            self.annotations().await.remove(key)
        })
        .await
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // Synchronous, so it also runs when the test's runtime is gone (e.g. after a panic).
        let _ = Command::new(&self.kubectl)
            .args([
                "--kubeconfig",
                &self.kubeconfig,
                "delete",
                "node",
                &self.name,
                "--wait=false",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ----- a fake IMDS that misbehaves on demand --------------------------------------------------

/// How the fake IMDS answers one document.
#[derive(Clone, Debug)]
pub enum Answer {
    /// 200 with this body.
    Body(String),
    /// 200 with these bytes (e.g. invalid UTF-8).
    Bytes(Vec<u8>),
    /// An empty response with this status (404 = no notice).
    Status(u16),
    /// Waits this long, then answers as `then`.
    Slow(Duration, Box<Answer>),
}

impl Answer {
    pub fn not_found() -> Self {
        Answer::Status(404)
    }

    pub fn json(value: serde_json::Value) -> Self {
        Answer::Body(value.to_string())
    }
}

/// What the fake IMDS serves; change it with [`FakeImds::set`].
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// The answer to `PUT /latest/api/token`; a `Body` answer is replaced by a fresh token.
    pub token: Answer,
    pub instance_id: Answer,
    pub rebalance: Answer,
    pub instance_action: Answer,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            token: Answer::Body(String::new()),
            instance_id: Answer::Body(FAKE_INSTANCE_ID.to_owned()),
            rebalance: Answer::not_found(),
            instance_action: Answer::not_found(),
        }
    }
}

/// One request the fake IMDS saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub method: &'static str,
    pub path: String,
    pub status: u16,
}

#[derive(Default)]
struct FakeState {
    behaviour: Behaviour,
    tokens: Vec<String>,
    minted: u64,
    seen: Vec<Seen>,
}

/// An IMDSv2 server on loopback (session tokens required) whose answers the test controls.
pub struct FakeImds {
    pub endpoint: String,
    state: Arc<Mutex<FakeState>>,
    stop: CancellationToken,
}

impl FakeImds {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = Router::new()
            .route("/latest/api/token", put(token))
            .route("/latest/meta-data/{*path}", get(document))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        FakeImds {
            endpoint,
            state,
            stop,
        }
    }

    /// Changes what is served; returns when the change took effect, for latency measurements.
    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) -> (Instant, SystemTime) {
        let mut state = self.state.lock().unwrap();
        change(&mut state.behaviour);
        (Instant::now(), SystemTime::now())
    }

    /// Invalidates every session token handed out so far (as an IMDS restart does).
    pub fn revoke_tokens(&self) {
        self.state.lock().unwrap().tokens.clear();
    }

    /// Tokens handed out so far.
    pub fn tokens_minted(&self) -> u64 {
        self.state.lock().unwrap().minted
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Requests to one metadata path (e.g. `spot/instance-action`).
    pub fn seen_at(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|seen| seen.path == path).collect()
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn record(state: &Mutex<FakeState>, method: &'static str, path: &str, status: u16) {
    state.lock().unwrap().seen.push(Seen {
        at: Instant::now(),
        method,
        path: path.to_owned(),
        status,
    });
}

async fn answer(answer: Answer) -> Response {
    let mut answer = answer;
    while let Answer::Slow(wait, then) = answer {
        tokio::time::sleep(wait).await;
        answer = *then;
    }
    match answer {
        Answer::Body(body) => (StatusCode::OK, body).into_response(),
        Answer::Bytes(bytes) => (StatusCode::OK, Body::from(bytes)).into_response(),
        Answer::Status(status) => StatusCode::from_u16(status).unwrap().into_response(),
        Answer::Slow(..) => unreachable!("unwrapped above"),
    }
}

fn final_status(answer: &Answer) -> u16 {
    match answer {
        Answer::Body(_) | Answer::Bytes(_) => 200,
        Answer::Status(status) => *status,
        Answer::Slow(_, then) => final_status(then),
    }
}

async fn token(State(state): State<Arc<Mutex<FakeState>>>, headers: HeaderMap) -> Response {
    let Some(ttl) = headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        record(&state, "PUT", "api/token", 400);
        return StatusCode::BAD_REQUEST.into_response();
    };
    let configured = state.lock().unwrap().behaviour.token.clone();
    let status = final_status(&configured);
    record(&state, "PUT", "api/token", status);
    let response = answer(configured).await;
    if status != 200 {
        return response;
    }
    let token = {
        let mut state = state.lock().unwrap();
        state.minted += 1;
        let token = format!("fake-token-{}", state.minted);
        state.tokens.push(token.clone());
        token
    };
    ([("x-aws-ec2-metadata-token-ttl-seconds", ttl)], token).into_response()
}

async fn document(
    State(state): State<Arc<Mutex<FakeState>>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let token_ok = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|token| state.lock().unwrap().tokens.iter().any(|t| t == token));
    if !token_ok {
        record(&state, "GET", &path, 401);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let configured = {
        let state = state.lock().unwrap();
        match path.as_str() {
            "instance-id" => Some(state.behaviour.instance_id.clone()),
            "events/recommendations/rebalance" => Some(state.behaviour.rebalance.clone()),
            "spot/instance-action" => Some(state.behaviour.instance_action.clone()),
            _ => None,
        }
    };
    let configured = configured.unwrap_or(Answer::not_found());
    record(&state, "GET", &path, final_status(&configured));
    answer(configured).await
}
