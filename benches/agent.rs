//! Benchmark of the node agent on the bed (run by `scripts/bench-agent`); prints figures, asserts none.
//!
//! 1. Detection latency: a notice becomes visible at IMDS (our controllable IMDSv2 server flips it on
//!    and records the instant) → the annotation is on the Node (the instant a watch on the bed's API
//!    server delivers it). `BENCH_NOTICES` notices (default 25) at a 1 s poll, each flipped on at a
//!    random phase of the agent's poll cycle.
//! 2. Cost: the agent's resident memory and CPU time, sampled from `/proc` over `BENCH_SOAK`
//!    (default 10m) at a 5 s poll; one notice is shown halfway so a write is part of the run.
//!
//! The agent is the release build of the binary (`cargo bench` builds it with the release profile).
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use support::{
    Bed,
    agent::{AgentConfig, AgentProcess, Answer, FakeImds, REBALANCE_NOTICE_TIME, TestNode},
};
use tokio::sync::mpsc;

const POLL_FOR_LATENCY: &str = "1s";
const REBALANCE_PATH: &str = "events/recommendations/rebalance";
const POLL_FOR_SOAK: &str = "5s";

fn env_or<T>(name: &str, default: T, parse: impl Fn(&str) -> Option<T>) -> T {
    match std::env::var(name) {
        Ok(value) => parse(&value).unwrap_or_else(|| panic!("{name}={value} is not valid")),
        Err(_) => default,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let notices: usize = env_or("BENCH_NOTICES", 25, |v| v.parse().ok());
    let soak: Duration = env_or("BENCH_SOAK", Duration::from_secs(600), |v| {
        humantime::parse_duration(v).ok()
    });
    let bed = Bed::connect().await;
    println!(
        "spot-rebalancer agent benchmark (binary: {})",
        std::env::var("BENCH_AGENT_BINARY").unwrap_or_else(|_| support::process::BINARY.to_owned())
    );

    let idle: Duration = env_or("BENCH_IDLE", Duration::from_secs(100), |v| {
        humantime::parse_duration(v).ok()
    });
    let side_by_side: Duration = env_or("BENCH_SIDE_BY_SIDE", Duration::from_secs(180), |v| {
        humantime::parse_duration(v).ok()
    });

    if notices > 0 {
        let latencies = detection_latency(&bed, notices).await;
        report_latency(&latencies);
    }

    if !idle.is_zero() {
        first_write_after_idle(&bed, idle).await;
    }

    if !soak.is_zero() {
        let cost = resource_use(&bed, soak).await;
        report_cost(&cost, soak);
    }

    match std::env::var("BENCH_NTH_BINARY") {
        Ok(nth) if !side_by_side.is_zero() => beside_nth(&bed, Path::new(&nth), side_by_side).await,
        _ => println!("\n== beside NTH: skipped (BENCH_NTH_BINARY not set; scripts/bench-agent sets it)"),
    }
}

/// The first write after an idle period, with and without `--api-keepalive`: the API server closes
/// connections idle for 90 s, so without a keep-alive the write pays a new TCP + TLS connection.
/// Both agents run at once (each with its own node and IMDS), idle for `idle`, then see a notice.
async fn first_write_after_idle(bed: &Bed, idle: Duration) {
    println!(
        "\n== first write after {} idle, with and without --api-keepalive",
        humantime::format_duration(idle)
    );
    let mut runs = Vec::new();
    for keepalive in ["60s", "0s"] {
        let node = TestNode::create(bed, "bench-idle").await;
        let imds = FakeImds::start().await;
        let seen = watch_annotation(bed, &node.name);
        let mut agent = AgentProcess::start(AgentConfig {
            node: &node.name,
            imds_endpoint: &imds.endpoint,
            kubeconfig: Path::new(&bed.vars["BED_KUBECONFIG"]),
            // As the bed's admin, whom the agent's admission policy does not cover: skip its check.
            extra: &[
                "--poll-interval",
                POLL_FOR_LATENCY,
                "--api-keepalive",
                keepalive,
                "--skip-admission-policy-check",
            ],
        });
        agent.wait_ready().await;
        runs.push((keepalive, node, imds, seen, agent));
    }
    tokio::time::sleep(idle).await;
    for (keepalive, _node, imds, seen, _agent) in &mut runs {
        let notice_time = jiff::Timestamp::now().to_string();
        let (visible, _) =
            imds.set(|serve| serve.rebalance = Answer::json(json!({"noticeTime": notice_time})));
        let arrived = loop {
            let (at, value) = tokio::time::timeout(Duration::from_secs(30), seen.recv())
                .await
                .expect("the annotation arrives within 30 s")
                .expect("the watch runs");
            if value == notice_time {
                break at;
            }
        };
        let read = imds
            .seen_at(REBALANCE_PATH)
            .into_iter()
            .find(|seen| seen.at >= visible)
            .map(|seen| seen.at)
            .expect("the agent read the notice");
        println!(
            "  --api-keepalive {keepalive:>3}: IMDS read -> annotation on the Node {:.1} ms",
            arrived.saturating_duration_since(read).as_secs_f64() * 1000.0
        );
    }
}

/// `/proc/<pid>/status` `RssAnon` and `RssFile` in KiB.
fn rss_breakdown_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// AWS Node Termination Handler (IMDS mode, built from its Go module by scripts/bench-agent) and our
/// agent side by side: the same IMDS mock (AWS's), the same API server, the same duration; each
/// process's resident memory sampled every 5 s. NTH polls every 2 s (fixed); ours at 5 s.
///
/// NTH reads its API server credentials only the in-cluster way (fixed paths under
/// `/var/run/secrets/kubernetes.io/serviceaccount`): it runs in a private mount namespace
/// (`unshare`, root) whose own tmpfs on `/run` holds the agent ServiceAccount's token and the bed's
/// CA, so nothing on the host changes.
async fn beside_nth(bed: &Bed, nth: &Path, duration: Duration) {
    use support::agent::ImdsMock;
    println!(
        "\n== beside NTH ({}): {} against one amazon-ec2-metadata-mock",
        nth.display(),
        humantime::format_duration(duration)
    );
    let mock = ImdsMock::start(
        bed,
        &["spot", "-I", "-d", "86400", "--rebalance-delay-sec", "86400"],
    )
    .await;
    // Each build of ours (BENCH_AGENT_BINARIES=label=path,... ; else the one binary) runs at once,
    // each on its own Node, beside NTH: one run, one machine state.
    let builds: Vec<(String, String)> = match std::env::var("BENCH_AGENT_BINARIES") {
        Ok(list) => list
            .split(',')
            .map(|entry| {
                let (label, path) = entry.split_once('=').unwrap_or((entry, entry));
                (label.to_owned(), path.to_owned())
            })
            .collect(),
        Err(_) => {
            let binary =
                std::env::var("BENCH_AGENT_BINARY").unwrap_or_else(|_| support::process::BINARY.to_owned());
            vec![("ours".to_owned(), binary)]
        }
    };
    let mut agents = Vec::new();
    for (label, binary) in &builds {
        let node = TestNode::create(bed, "bench-beside-ours").await;
        let mut agent = AgentProcess::start_binary(
            binary,
            AgentConfig {
                node: &node.name,
                imds_endpoint: &mock.endpoint(),
                kubeconfig: Path::new(&bed.vars["BED_KUBECONFIG"]),
                // As the bed's admin, whom the agent's admission policy does not cover.
                extra: &["--poll-interval", POLL_FOR_SOAK, "--skip-admission-policy-check"],
            },
        );
        agent.wait_ready().await;
        println!("  {label}: {binary}");
        agents.push((label.clone(), node, agent, Vec::new()));
    }
    let nth_node = TestNode::create(bed, "bench-beside-nth").await;

    // NTH's in-cluster identity: a token of the agent's ServiceAccount bound to NTH's node (the
    // rights our agent has), the bed's API server and CA.
    support::identity::apply_chart_identities(bed);
    let kubectl = |args: &[&str]| {
        let output = std::process::Command::new(&bed.vars["BED_KUBECTL"])
            .args(["--kubeconfig", &bed.vars["BED_KUBECONFIG"]])
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    let token = kubectl(&[
        "create",
        "token",
        "spot-rebalancer-agent",
        "-n",
        "spot-rebalancer-agent",
        "--bound-object-kind",
        "Node",
        "--bound-object-name",
        &nth_node.name,
        "--duration",
        "2h",
    ]);
    let server = kubectl(&[
        "config",
        "view",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ]);
    let (host, port) = server
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map(|(host, port)| (host.to_owned(), port.to_owned()))
        .expect("the API server as https://host:port");
    let ca_data = kubectl(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    let ca_file = kubectl(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority}",
    ]);
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("token"), token).unwrap();
    if ca_data.is_empty() {
        std::fs::copy(&ca_file, secrets.path().join("ca.crt")).expect("the bed's CA file");
    } else {
        std::fs::write(secrets.path().join("ca.b64"), ca_data).unwrap();
        let decoded = std::process::Command::new("base64")
            .args(["-d"])
            .arg(secrets.path().join("ca.b64"))
            .output()
            .expect("base64 -d");
        std::fs::write(secrets.path().join("ca.crt"), decoded.stdout).unwrap();
    }
    std::fs::write(secrets.path().join("namespace"), "spot-rebalancer").unwrap();
    let log = std::fs::File::create(secrets.path().join("nth.log")).unwrap();
    let script = format!(
        "mount -t tmpfs none /run && mkdir -p {sa} && cp {src}/token {src}/ca.crt {src}/namespace {sa}/ && exec {nth}",
        sa = "/run/secrets/kubernetes.io/serviceaccount",
        src = secrets.path().display(),
        nth = nth.display(),
    );
    let mut nth_process = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("KUBERNETES_SERVICE_HOST", &host)
        .env("KUBERNETES_SERVICE_PORT", &port)
        .env("NODE_NAME", &nth_node.name)
        .env("POD_NAME", "nth-bench")
        .env("POD_NAMESPACE", "spot-rebalancer")
        .env("INSTANCE_METADATA_URL", mock.endpoint())
        // Like our agent: both notice kinds read, and an HTTP server for health.
        .env("ENABLE_SPOT_INTERRUPTION_DRAINING", "true")
        .env("ENABLE_REBALANCE_MONITORING", "true")
        .env("ENABLE_SCHEDULED_EVENT_DRAINING", "false")
        .env("ENABLE_ASG_LIFECYCLE_DRAINING", "false")
        .env("ENABLE_PROBES_SERVER", "true")
        .env("PROBES_SERVER_PORT", support::agent::free_port().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start NTH under unshare");
    let nth_pid = nth_process.id();

    let started = Instant::now();
    let mut theirs = Vec::new();
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Ok(Some(status)) = nth_process.try_wait() {
            let log = std::fs::read_to_string(secrets.path().join("nth.log")).unwrap_or_default();
            panic!("NTH exited ({status}):\n{log}");
        }
        for (_, _, agent, samples) in &mut agents {
            samples.push(rss_kib(agent.pid()));
        }
        theirs.push(rss_kib(nth_pid));
    }
    let (nth_anon, nth_file) = rss_breakdown_kib(nth_pid);
    let _ = nth_process.kill();
    let _ = nth_process.wait();

    let mib = |kib: u64| kib as f64 / 1024.0;
    let mean = |samples: &[u64]| samples.iter().sum::<u64>() / samples.len().max(1) as u64;
    let peak = |samples: &[u64]| samples.iter().copied().max().unwrap_or(0);
    for (label, _node, agent, ours) in &mut agents {
        assert!(agent.is_running(), "{label} stopped");
        let (ours_anon, ours_file) = rss_breakdown_kib(agent.pid());
        println!(
            "  {label}: resident mean {:.1} MiB, peak {:.1} MiB (RssAnon {:.1}, RssFile {:.1} MiB at the end); \
             NTH / {label} (mean resident): {:.1}x   (goal: >= 3x; ours <= 8 MiB)",
            mib(mean(ours)),
            mib(peak(ours)),
            mib(ours_anon),
            mib(ours_file),
            mean(&theirs) as f64 / mean(ours).max(1) as f64
        );
    }
    println!(
        "  NTH:  resident mean {:.1} MiB, peak {:.1} MiB (RssAnon {:.1}, RssFile {:.1} MiB at the end)",
        mib(mean(&theirs)),
        mib(peak(&theirs)),
        mib(nth_anon),
        mib(nth_file)
    );
}

/// Annotation values on `node` as a watch sees them, with the instant each arrived.
fn watch_annotation(bed: &Bed, node: &str) -> mpsc::UnboundedReceiver<(Instant, String)> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let stream = watcher(bed.nodes(), config).applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut last = None;
        while let Ok(Some(node)) = stream.try_next().await {
            let node: Node = node;
            let value = node
                .metadata
                .annotations
                .and_then(|mut annotations| annotations.remove(REBALANCE_NOTICE_TIME));
            if let Some(value) = value
                && last.as_ref() != Some(&value)
            {
                last = Some(value.clone());
                if sender.send((Instant::now(), value)).is_err() {
                    return;
                }
            }
        }
    });
    receiver
}

async fn detection_latency(bed: &Bed, notices: usize) -> Vec<Duration> {
    let node = TestNode::create(bed, "bench-latency").await;
    let imds = FakeImds::start().await;
    let mut seen = watch_annotation(bed, &node.name);
    let mut agent = AgentProcess::start(AgentConfig {
        node: &node.name,
        imds_endpoint: &imds.endpoint,
        kubeconfig: Path::new(&bed.vars["BED_KUBECONFIG"]),
        // As the bed's admin, whom the agent's admission policy does not cover: skip its check.
        extra: &[
            "--poll-interval",
            POLL_FOR_LATENCY,
            "--skip-admission-policy-check",
        ],
    });
    agent.wait_ready().await;
    println!("\n== detection latency: {notices} notices at a {POLL_FOR_LATENCY} poll");

    let base = jiff::Timestamp::now();
    let mut latencies = Vec::with_capacity(notices);
    for round in 0..notices {
        // A random phase against the agent's poll cycle.
        tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(0..1000))).await;
        let notice_time = (base + jiff::SignedDuration::from_secs(round as i64 * 60)).to_string();
        let (visible, _) =
            imds.set(|serve| serve.rebalance = Answer::json(json!({"noticeTime": notice_time})));
        let arrived = loop {
            let (at, value) = tokio::time::timeout(Duration::from_secs(30), seen.recv())
                .await
                .expect("the annotation arrives within 30 s")
                .expect("the watch runs");
            if value == notice_time {
                break at;
            }
        };
        let latency = arrived.saturating_duration_since(visible);
        // Where the time went: waiting for the agent's next poll, then reading, writing, watching.
        let read = imds
            .seen_at(REBALANCE_PATH)
            .into_iter()
            .find(|seen| seen.at >= visible)
            .map(|seen| seen.at.saturating_duration_since(visible));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "  notice {:>2}: {:>7.1} ms  (polled {:>6.1} ms after it appeared, on the Node {:>5.1} ms later)",
            round + 1,
            ms(latency),
            read.map_or(f64::NAN, ms),
            read.map_or(f64::NAN, |read| ms(latency.saturating_sub(read))),
        );
        latencies.push(latency);
    }
    // The watch can deliver the annotation before the agent has counted its write.
    let writes = agent
        .wait_for_metric(
            "spot_rebalancer_agent_annotation_writes_total{result=\"ok\"}",
            notices as f64,
        )
        .await;
    println!("  annotation writes: {writes} for {notices} notices");
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn report_latency(latencies: &[Duration]) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    println!(
        "  detection latency over {} notices: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms, mean {:.0} ms, min {:.0} ms",
        sorted.len(),
        ms(percentile(&sorted, 50.0)),
        ms(percentile(&sorted, 99.0)),
        ms(sorted[sorted.len() - 1]),
        ms(mean),
        ms(sorted[0]),
    );
    println!("  goal: p99 <= poll interval + 100 ms = 1100 ms");
}

struct Cost {
    rss_kib: Vec<u64>,
    /// `/proc/<pid>/status` lines `RssAnon`, `RssFile`, `Threads` at the end of the run.
    breakdown: String,
    cpu_seconds: f64,
    wall: Duration,
    polls: f64,
}

/// Resident memory of `pid` in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent runs");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent runs");
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let after = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 11 and 12 after the command.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

async fn resource_use(bed: &Bed, soak: Duration) -> Cost {
    let node = TestNode::create(bed, "bench-soak").await;
    let imds = FakeImds::start().await;
    let mut agent = AgentProcess::start(AgentConfig {
        node: &node.name,
        imds_endpoint: &imds.endpoint,
        kubeconfig: Path::new(&bed.vars["BED_KUBECONFIG"]),
        extra: &["--poll-interval", POLL_FOR_SOAK, "--skip-admission-policy-check"],
    });
    agent.wait_ready().await;
    println!(
        "\n== resident memory and CPU: {} at a {POLL_FOR_SOAK} poll",
        humantime::format_duration(soak)
    );
    let pid = agent.pid();
    let ticks = clock_ticks_per_second();
    let started = Instant::now();
    let cpu_at_start = cpu_ticks(pid);
    let mut rss = vec![rss_kib(pid)];
    let mut noticed = false;
    let sample_every = Duration::from_secs(5).min(soak / 4);
    while started.elapsed() < soak {
        tokio::time::sleep(sample_every).await;
        if !noticed && started.elapsed() >= soak / 2 {
            imds.set(|serve| serve.rebalance = Answer::json(json!({"noticeTime": "2026-06-01T00:00:00Z"})));
            noticed = true;
        }
        rss.push(rss_kib(pid));
    }
    let cpu_seconds = (cpu_ticks(pid) - cpu_at_start) as f64 / ticks;
    let breakdown = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            ["RssAnon:", "RssFile:", "Threads:"]
                .iter()
                .any(|key| line.starts_with(key))
        })
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ");
    let polls = agent.metric("spot_rebalancer_agent_polls_total").await;
    let annotated = node.annotations().await.contains_key(REBALANCE_NOTICE_TIME);
    assert!(annotated, "the notice shown halfway was written");
    assert!(agent.is_running());
    Cost {
        rss_kib: rss,
        breakdown,
        cpu_seconds,
        wall: started.elapsed(),
        polls,
    }
}

fn report_cost(cost: &Cost, soak: Duration) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let peak = *cost.rss_kib.iter().max().unwrap();
    let mean = cost.rss_kib.iter().sum::<u64>() / cost.rss_kib.len() as u64;
    println!(
        "  resident memory: start {:.1} MiB, mean {:.1} MiB, peak {:.1} MiB, end {:.1} MiB ({} samples)",
        mib(cost.rss_kib[0]),
        mib(mean),
        mib(peak),
        mib(*cost.rss_kib.last().unwrap()),
        cost.rss_kib.len()
    );
    println!(
        "  at the end: {} (file pages are the binary's code, shared)",
        cost.breakdown
    );
    println!(
        "  CPU: {:.2} s over {:.0} s = {:.3} % of one core; {} polls, {:.1} ms CPU per poll",
        cost.cpu_seconds,
        cost.wall.as_secs_f64(),
        100.0 * cost.cpu_seconds / cost.wall.as_secs_f64(),
        cost.polls,
        1000.0 * cost.cpu_seconds / cost.polls.max(1.0),
    );
    println!(
        "  goal: resident memory <= 8 MiB (run: {})",
        humantime::format_duration(soak)
    );
}
