//! Benchmark of the admission webhook (run by `scripts/bench-webhook`); prints figures, asserts none.
//!
//! A child process (this binary, `--serve`) runs the webhook's router over rustls on loopback with its
//! caches filled in memory, as the watches would fill them: `BENCH_PODS` pods (default 5,000) on
//! `BENCH_NODES` nodes (100) in 50 namespaces, and `BENCH_PDBS` PodDisruptionBudgets (500). This
//! process sends it AdmissionReviews at `BENCH_RATE` per second (500) for `BENCH_SECONDS` (20),
//! open loop, half `/mutate` (a NoExecute termination taint: the full PDB arithmetic over the node's
//! pods) and half `/validate` (the termination taint while the controller is scaling: denied), and
//! prints latency percentiles (client side: TLS, HTTP, JSON and decision) and the server's resident
//! memory. The in-process cost of one decision (no network) is printed too. Then hostile load: 1,000
//! slow connections and a flood of 3 MiB bodies, with the server's memory and the latency of the
//! valid reviews sent meanwhile (`BENCH_FLOOD_SECONDS=0` skips it: the latency phase only).
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::body::Bytes;
use k8s_openapi::api::{
    core::v1::{Node, Pod},
    policy::v1::PodDisruptionBudget,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use spot_rebalancer::webhook::{
    DEFAULT_CONTROLLER_USERNAME, Settings,
    cache::{Caches, slim_pod},
    metrics::Metrics,
    server::{self, Route, Webhook},
    taints::NTH_TAINT_KEYS,
    tls::{ReloadingTls, TlsFiles},
};

#[path = "../tests/fixtures/webhook/large_node.rs"]
mod large_node;

const NAMESPACES: usize = 50;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn node_name(i: usize) -> String {
    format!("ip-10-0-{}-{}.ec2.internal", i / 250, i % 250)
}

/// A pod as the API server stores it (containers, env, resources, managed fields), before the
/// cache slims it.
fn pod(i: usize, nodes: usize) -> Pod {
    let namespace = format!("team-{}", (i / 7) % NAMESPACES);
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("app-{i}-7d9c5b8f6-x2k4q"), "namespace": namespace,
            "uid": format!("00000000-0000-0000-0000-{i:012}"), "resourceVersion": "123456",
            "labels": {"app": format!("app-{}", i % 10), "pod-template-hash": "7d9c5b8f6", "tier": "backend"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-01T00:00:00Z",
                            "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "app-7d9c5b8f6",
                                 "uid": "11111111-0000-0000-0000-000000000000", "controller": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-11-01T00:00:00Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}, "f:tier": {}}}}}]
        },
        "spec": {
            "nodeName": node_name(i % nodes),
            "containers": [{"name": "app", "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/app:v1.2.3",
                            "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}],
                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                          "limits": {"memory": "256Mi"}},
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ]
        },
        "status": {"phase": "Running", "podIP": "10.0.3.4", "hostIP": "10.0.1.17",
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap()
}

fn pdb(i: usize) -> PodDisruptionBudget {
    let namespace = format!("team-{}", i % NAMESPACES);
    serde_json::from_value(json!({
        "metadata": {"name": format!("app-{}", i / NAMESPACES), "namespace": namespace, "generation": 1},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": format!("app-{}", (i / NAMESPACES) % 10)}}},
        "status": {"disruptionsAllowed": (i % 4) as i32, "observedGeneration": 1, "currentHealthy": 5,
                   "desiredHealthy": 2, "expectedPods": 5}
    }))
    .unwrap()
}

fn node(i: usize) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": node_name(i), "labels": {"spot-rebalancer.io/enabled": "true"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "images": [{"names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 320368}]}
    }))
    .unwrap()
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/webhook/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A review of node `i` from a fixture (its node renamed).
fn review_for(fixture: &Value, i: usize) -> Vec<u8> {
    let mut review = fixture.clone();
    let name = node_name(i);
    review["request"]["name"] = json!(name);
    review["request"]["object"]["metadata"]["name"] = json!(name);
    review["request"]["oldObject"]["metadata"]["name"] = json!(name);
    serde_json::to_vec(&review).unwrap()
}

fn webhook(pods: usize, pdbs: usize, nodes: usize) -> Webhook {
    let settings = Settings::new(
        "spot-rebalancer.io/enabled=true".parse().unwrap(),
        "spot-instance-terminating".into(),
        vec![NTH_TAINT_KEYS.parse().unwrap()],
        vec![DEFAULT_CONTROLLER_USERNAME.into()],
    );
    // Slimmed one by one as they are made, as the watch slims each page of its list: the full
    // objects never all sit in memory at once.
    let slim = |mut pod: Pod| {
        slim_pod(&mut pod);
        pod
    };
    let caches = Caches::from_objects(
        (0..pods).map(|i| slim(pod(i, nodes))).collect(),
        (0..pdbs).map(pdb).collect(),
        (0..nodes).map(node).collect(),
    );
    Webhook {
        settings,
        caches,
        metrics: Metrics::unregistered(),
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// The child: serve the router over TLS on an ephemeral loopback port, print it, run until killed.
async fn serve(cert: String, key: String, pods: usize, pdbs: usize, nodes: usize) {
    let webhook = webhook(pods, pdbs, nodes);
    let files = TlsFiles {
        cert: cert.into(),
        key: key.into(),
    };
    let tls = ReloadingTls::load(files).await.expect("the bench certificate");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = server::router(Arc::new(webhook));
    println!("READY {port}");
    server::https_server(listener, tls.config.clone())
        .unwrap()
        .serve(router.into_make_service())
        .await
        .unwrap();
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pods = env_or("BENCH_PODS", 5000);
    let pdbs = env_or("BENCH_PDBS", 500);
    let nodes = env_or("BENCH_NODES", 100);
    if let Some(at) = args.iter().position(|a| a == "--serve") {
        serve(args[at + 1].clone(), args[at + 2].clone(), pods, pdbs, nodes).await;
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for the list of benchmarks: there are none to list.
    }
    let rate = env_or("BENCH_RATE", 500);
    let seconds = env_or("BENCH_SECONDS", 20);

    // Certificates for the child's TLS port.
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let ca = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();

    println!(
        "webhook benchmark: {pods} pods on {nodes} nodes, {pdbs} PDBs, {rate} reviews/s for {seconds} s"
    );

    // 1. One decision in process (parse, caches, arithmetic, answer), no network.
    let local = webhook(pods, pdbs, nodes);
    let mutate_fixture = fixture("taint-no-execute.json");
    let validate_fixture = fixture("taint-termination-while-scaling.json");
    let bodies: Vec<(Route, Vec<u8>)> = (0..nodes)
        .flat_map(|i| {
            [
                (Route::Mutate, review_for(&mutate_fixture, i)),
                (Route::Validate, review_for(&validate_fixture, i)),
            ]
        })
        .collect();
    let mut decisions = Vec::new();
    let mut verdicts = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..20 {
        for (route, body) in &bodies {
            let started = Instant::now();
            let answer = server::admit(*route, body, &local, jiff::Timestamp::now());
            decisions.push(started.elapsed());
            if round == 0 {
                *verdicts
                    .entry(format!("{}:{}", route.as_str(), answer.verdict))
                    .or_default() += 1;
            }
        }
    }
    drop(local);
    decisions.sort();
    println!(
        "in-process decision ({} runs): p50 {}  p99 {}  max {}   verdicts per {} reviews: {verdicts:?}",
        decisions.len(),
        ms(percentile(&decisions, 0.5)),
        ms(percentile(&decisions, 0.99)),
        ms(*decisions.last().unwrap()),
        bodies.len(),
    );

    // 2. Over loopback TLS against the child process.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .arg(&cert)
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("READY ")
        .expect("the server's port")
        .parse()
        .unwrap();
    let pid = child.id();
    println!(
        "server resident memory with the caches filled, before load: {:.1} MiB",
        rss_kib(pid, "VmRSS:") as f64 / 1024.0
    );

    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{port}");
    let bodies: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        bodies
            .into_iter()
            .map(|(route, body)| (format!("{base}/{}", route.as_str()), body))
            .collect(),
    );
    // Warm up the connections.
    for (url, body) in bodies.iter().take(20) {
        client.post(url).body(body.clone()).send().await.unwrap();
    }
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(rate * seconds)));
    let failures = Arc::new(Mutex::new(0usize));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(rate * seconds);
    for n in 0..rate * seconds {
        ticker.tick().await;
        let (client, bodies, latencies, failures) = (
            client.clone(),
            bodies.clone(),
            latencies.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (url, body) = &bodies[n % bodies.len()];
            let sent = Instant::now();
            let ok = match client.post(url).body(body.clone()).send().await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            let elapsed = sent.elapsed();
            if ok {
                latencies.lock().unwrap().push(elapsed);
            } else {
                *failures.lock().unwrap() += 1;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let wall = started.elapsed();
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    let failures = *failures.lock().unwrap();
    println!(
        "over loopback TLS: {} reviews in {:.1} s ({:.0}/s), {failures} failed",
        latencies.len(),
        wall.as_secs_f64(),
        latencies.len() as f64 / wall.as_secs_f64()
    );
    println!(
        "admission latency: p50 {}  p90 {}  p99 {}  max {}",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO)),
    );
    println!(
        "server resident memory: now {:.1} MiB, peak {:.1} MiB",
        rss_kib(pid, "VmRSS:") as f64 / 1024.0,
        rss_kib(pid, "VmHWM:") as f64 / 1024.0
    );

    // 3. Hostile load: 1,000 slow connections (900 that never start TLS, 100 requests that stop
    // half-way through their body) and a flood of 3 MiB bodies from 32 senders for
    // BENCH_FLOOD_SECONDS (10), while valid reviews keep coming at 50/s. 0 skips this phase.
    let flood_seconds = env_or("BENCH_FLOOD_SECONDS", 10);
    if flood_seconds == 0 {
        let _ = child.kill();
        let _ = child.wait();
        return;
    }
    let large = large_node::review();
    println!(
        "largest realistic Node review: {:.1} KiB (body limit {} KiB)",
        large.len() as f64 / 1024.0,
        server::MAX_REVIEW_BYTES >> 10
    );
    let before = rss_kib(pid, "VmRSS:");
    let mut silent = Vec::with_capacity(900);
    for _ in 0..900 {
        if let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            silent.push(stream);
        }
    }
    let half_sent: Vec<_> = (0..100)
        .map(|_| {
            let request = client
                .post(format!("{base}/mutate"))
                .body(reqwest::Body::wrap(StallingBody(Some(Bytes::from_static(
                    b"{\"apiVersion\":",
                )))));
            tokio::spawn(async move { request.send().await.map(|response| response.status().as_u16()) })
        })
        .collect();
    let oversized = Bytes::from(vec![b' '; 3 << 20]);
    let stop = Instant::now() + Duration::from_secs(flood_seconds as u64);
    let flood_answers = Arc::new(Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
    let senders: Vec<_> = (0..32)
        .map(|_| {
            let (client, url, body, answers) = (
                client.clone(),
                format!("{base}/validate"),
                oversized.clone(),
                flood_answers.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < stop {
                    let answer = match client.post(&url).body(body.clone()).send().await {
                        Ok(response) => response.status().as_u16().to_string(),
                        Err(_) => "closed".to_owned(),
                    };
                    *answers.lock().unwrap().entry(answer).or_default() += 1;
                }
            })
        })
        .collect();
    let mut peak = before;
    let mut valid = Vec::new();
    let mut valid_failed = 0usize;
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    let mut n = 0;
    while Instant::now() < stop {
        ticker.tick().await;
        let (url, body) = &bodies[n % bodies.len()];
        n += 1;
        let sent = Instant::now();
        match client.post(url).body(body.clone()).send().await {
            Ok(response) if response.status().is_success() => valid.push(sent.elapsed()),
            _ => valid_failed += 1,
        }
        peak = peak.max(rss_kib(pid, "VmRSS:"));
    }
    for sender in senders {
        let _ = sender.await;
    }
    let during = rss_kib(pid, "VmRSS:");
    valid.sort();
    println!(
        "under attack ({flood_seconds} s, 900 silent connections + 100 half-sent requests + 32 senders of 3 MiB bodies): \
         3 MiB bodies answered {:?}",
        flood_answers.lock().unwrap()
    );
    println!(
        "valid reviews meanwhile: {} answered, {valid_failed} failed, p50 {}  p99 {}  max {}",
        valid.len(),
        ms(percentile(&valid, 0.5)),
        ms(percentile(&valid, 0.99)),
        ms(*valid.last().unwrap_or(&Duration::ZERO)),
    );
    let mut half_sent_answers = std::collections::BTreeMap::<String, usize>::new();
    for request in half_sent {
        let answer = match tokio::time::timeout(Duration::from_secs(30), request).await {
            Ok(Ok(Ok(status))) => status.to_string(),
            Ok(_) => "closed".to_owned(),
            Err(_) => "still open after 30 s".to_owned(),
        };
        *half_sent_answers.entry(answer).or_default() += 1;
    }
    let mut silent_closed = 0usize;
    for mut stream in silent {
        use tokio::io::AsyncReadExt;
        let mut buffer = [0u8; 16];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buffer)).await
        {
            silent_closed += 1;
        }
    }
    println!(
        "half-sent requests ended with {half_sent_answers:?}; silent connections closed by the server: {silent_closed} of 900"
    );
    let half_sent_open = half_sent_answers
        .get("still open after 30 s")
        .copied()
        .unwrap_or(0);
    println!(
        "slow connections still open after the timeouts (TLS handshake {} s, header read {} s, body {} s): {} of 1000",
        server::TLS_HANDSHAKE_TIMEOUT.as_secs(),
        server::HEADER_READ_TIMEOUT.as_secs(),
        server::BODY_READ_TIMEOUT.as_secs(),
        (900 - silent_closed) + half_sent_open
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "server resident memory: before the attack {:.1} MiB, peak during {:.1} MiB, at its end {:.1} MiB, \
         after {:.1} MiB",
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        during as f64 / 1024.0,
        rss_kib(pid, "VmRSS:") as f64 / 1024.0
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A request body that sends its first bytes and then nothing: a client that stops half-way.
struct StallingBody(Option<Bytes>);

impl http_body::Body for StallingBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        match self.0.take() {
            Some(first) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first)))),
            None => std::task::Poll::Pending,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(100_000)
    }
}
