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
        support::process::BINARY
    );

    let latencies = detection_latency(&bed, notices).await;
    report_latency(&latencies);

    let cost = resource_use(&bed, soak).await;
    report_cost(&cost, soak);
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
            "spot_rebalancer_annotation_writes_total{result=\"ok\"}",
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
    let polls = agent.metric("spot_rebalancer_polls_total").await;
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
        "  goal: resident memory < 15 MiB (run: {})",
        humantime::format_duration(soak)
    );
}
