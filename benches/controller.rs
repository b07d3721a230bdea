//! Benchmark of the controller on the bed (run by `scripts/bench-controller`); prints figures,
//! asserts none.
//!
//! 1. Reaction latency: the notice annotation is written (the PATCH returned) → moto received the
//!    SetDesiredCapacity (the bed's call log, same clock). `BENCH_RUNS` notices (default 20), one at
//!    a time.
//! 2. Ready → taint latency: one watch on the bed's API server sees the replacement Node turn Ready,
//!    then the termination taint on the old Node; the difference, per run.
//! 3. AWS calls per notice, from the bed's call log, for those runs and for a burst.
//! 4. Scale: `BENCH_EXTRA_NODES` (default 1,000) kwok Nodes the controller must watch, then
//!    `BENCH_BURST` (default 100) simultaneous notices on one ASG; the controller's peak resident
//!    memory (VmHWM) and its AWS calls per notice.
//!
//! The controller runs with `--after-replacement keep`: the figures are of the replacement up to the
//! taint (retirement is measured by `scripts/bench-lifecycle`), as they were before retiring became
//! the default.
//!
//! The controller is the release build (`cargo bench` builds it with the release profile).
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Node;
use kube::{
    api::{DeleteParams, ListParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use support::{
    controller::{NODEGROUP_LABEL, Scenario, name_of, phase, record, termination_taint},
    eventually, is_ready,
};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// First instant a watch saw each Node Ready, and each Node tainted.
#[derive(Default)]
struct Seen {
    ready: HashMap<String, Instant>,
    tainted: HashMap<String, Instant>,
}

fn watch_group(scenario: &Scenario, asg: &str) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let config = watcher::Config::default().labels(&format!("{NODEGROUP_LABEL}={asg}"));
    let stream = watcher(scenario.bed.nodes(), config)
        .default_backoff()
        .applied_objects();
    let sink = seen.clone();
    tokio::spawn(stream.try_for_each(move |node| {
        let now = Instant::now();
        let mut seen = sink.lock().unwrap();
        if is_ready(&node) {
            seen.ready.entry(name_of(&node)).or_insert(now);
        }
        if termination_taint(&node).is_some() {
            seen.tainted.entry(name_of(&node)).or_insert(now);
        }
        futures::future::ready(Ok(()))
    }));
    seen
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(what: &str, mut millis: Vec<f64>) {
    millis.sort_by(f64::total_cmp);
    println!(
        "{what}: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        millis.len(),
        percentile(&millis, 50.0),
        percentile(&millis, 99.0),
        millis.last().copied().unwrap_or_default()
    );
}

fn since_epoch_ms(time: &str) -> f64 {
    let at: jiff::Timestamp = time.parse().expect("an RFC 3339 time in the call log");
    at.as_millisecond() as f64
}

fn now_epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = env_or("BENCH_RUNS", 20);
    let extra_nodes = env_or("BENCH_EXTRA_NODES", 1000);
    let burst = env_or("BENCH_BURST", 100);
    println!(
        "spot-rebalancer controller benchmark (binary: {})",
        support::process::BINARY
    );
    latency(runs).await;
    scale(extra_nodes, burst).await;
}

async fn latency(runs: usize) {
    let scenario = Scenario::new("bench-lat").await;
    let asg = scenario.spot_asg("spot", runs as i32, (2 * runs) as i32).await;
    let old_nodes = scenario.ready_nodes(&asg, runs).await;
    let seen = watch_group(&scenario, &asg);
    let mut controller =
        scenario.start_controller(&["--after-replacement", "keep", "--capacity-timeout", "5m"]);
    controller.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut reactions = Vec::new();
    let mut ready_to_taint = Vec::new();
    let mut last_seq = 0;
    for old in &old_nodes {
        let name = name_of(old);
        let before = scenario
            .set_desired_calls(&asg)
            .await
            .iter()
            .map(|c| c.seq)
            .max()
            .unwrap_or(0);
        last_seq = last_seq.max(before);
        scenario.notice(&name).await;
        let written = now_epoch_ms();
        let tainted = scenario
            .wait_for_phase(&name, phase::TAINTED, Duration::from_secs(60))
            .await;
        let call = scenario
            .set_desired_calls(&asg)
            .await
            .into_iter()
            .find(|c| c.seq > last_seq)
            .expect("a SetDesiredCapacity call for the notice");
        last_seq = call.seq;
        reactions.push(since_epoch_ms(&call.time) - written);
        let replacement = record(&tainted).node.expect("the claimed replacement node");
        let observed = eventually("the watch saw the taint", Duration::from_secs(10), || async {
            let seen = seen.lock().unwrap();
            Some((*seen.ready.get(&replacement)?, *seen.tainted.get(&name)?))
        })
        .await;
        ready_to_taint.push(observed.1.saturating_duration_since(observed.0).as_secs_f64() * 1000.0);
    }
    report(
        "reaction (notice written -> SetDesiredCapacity at moto)",
        reactions,
    );
    report(
        "replacement Ready -> taint on the old node (one watch)",
        ready_to_taint,
    );
    let calls = scenario.all_calls(&asg).await.len();
    println!(
        "AWS calls per notice, one at a time: {:.2} ({calls} calls / {runs} notices)",
        calls as f64 / runs as f64
    );
    controller.terminate();
}

async fn scale(extra_nodes: usize, burst: usize) {
    let scenario = Scenario::new("bench-scale").await;
    let asg = scenario.spot_asg("spot", burst as i32, (2 * burst) as i32).await;
    let old_nodes = scenario.ready_nodes(&asg, burst).await;
    let nodes = scenario.bed.nodes();
    let prefix = format!("{}-filler", scenario.name);
    let started = Instant::now();
    stream::iter(0..extra_nodes)
        .for_each_concurrent(16, |i| {
            let nodes = nodes.clone();
            let node: Node = serde_json::from_value(json!({
                "metadata": {
                    "name": format!("{prefix}-{i}"),
                    "labels": {"bench.spot-rebalancer.io/filler": prefix.clone()},
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                },
            }))
            .unwrap();
            async move {
                nodes
                    .create(&PostParams::default(), &node)
                    .await
                    .expect("create a filler Node");
            }
        })
        .await;
    println!(
        "created {extra_nodes} filler Nodes in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut controller =
        scenario.start_controller(&["--after-replacement", "keep", "--capacity-timeout", "5m"]);
    controller.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_kib = peak_rss_kib(controller.pid());

    let started = Instant::now();
    stream::iter(&old_nodes)
        .for_each_concurrent(burst, |node| {
            let scenario = &scenario;
            async move {
                scenario.notice(&name_of(node)).await;
            }
        })
        .await;
    for node in &old_nodes {
        scenario
            .wait_for_phase(&name_of(node), phase::TAINTED, Duration::from_secs(300))
            .await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let peak_kib = peak_rss_kib(controller.pid());
    let set_calls = scenario.set_desired_calls(&asg).await.len();
    let calls = scenario.all_calls(&asg).await.len();
    println!(
        "{burst} simultaneous notices with {} Nodes watched: all tainted in {elapsed:.1} s; \
         SetDesiredCapacity calls: {set_calls}; AWS calls per notice: {:.2}",
        extra_nodes + 2 * burst,
        calls as f64 / burst as f64
    );
    println!(
        "controller resident memory: {:.1} MiB after start, {:.1} MiB peak (VmHWM)",
        idle_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0
    );
    controller.terminate();

    let filler = ListParams::default().labels(&format!("bench.spot-rebalancer.io/filler={prefix}"));
    let _ = nodes.delete_collection(&DeleteParams::default(), &filler).await;
}
