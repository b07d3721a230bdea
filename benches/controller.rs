//! Benchmark of the controller on the bed (run by `scripts/bench-controller`); prints figures,
//! asserts none.
//!
//! 1. Reaction latency: the notice annotation is written (the PATCH returned) → moto received the
//!    SetDesiredCapacity (the bed's call log, same clock). `BENCH_RUNS` notices (default 20), one at
//!    a time.
//! 2. Ready → taint latency: one watch on the bed's API server sees the replacement Node turn Ready,
//!    then the termination taint on the old Node; the difference, per run.
//! 3. AWS calls per notice, from the bed's call log, for those runs and for a burst.
//! 4. Scale: kwok filler Nodes until the cluster holds `BENCH_NODES` (default 5,000) Nodes the
//!    controller must watch (the count is listed from the API server, not assumed), then
//!    `BENCH_BURST` (default 100) simultaneous notices on one ASG; the controller's resident memory
//!    idle (VmRSS) and at its peak (VmHWM), its SetDesiredCapacity calls and AWS calls per notice,
//!    and each notice's reaction and Ready → taint latency within the burst.
//!
//! The controller runs with `--after-replacement keep`: the figures are of the replacement up to the
//! taint (retirement is measured by `scripts/bench-lifecycle`), as they were before retiring became
//! the default.
//!
//! The controller is the release build (`cargo bench` builds it with the release profile), or the
//! binary `BENCH_CONTROLLER_BINARY` names. With `BENCH_LOG_DIR` set, its log of each phase is
//! written there.
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

/// The controller measured: `BENCH_CONTROLLER_BINARY` (another build, e.g. the `image` profile the
/// image ships, `cargo build --profile image --bin spot-rebalancer`), else the release build.
fn binary() -> String {
    std::env::var("BENCH_CONTROLLER_BINARY").unwrap_or_else(|_| support::process::BINARY.to_owned())
}

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

/// A memory figure of `/proc/<pid>/status` in KiB: `VmRSS:` (resident now) or `VmHWM:` (peak).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How many Nodes the API server holds (what the controller's watch sees).
async fn cluster_node_count(nodes: &kube::Api<Node>) -> usize {
    let mut count = 0;
    let mut params = ListParams::default().limit(500);
    loop {
        let page = nodes
            .list_metadata(&params)
            .await
            .expect("list the cluster's Nodes");
        count += page.items.len();
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return count,
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = env_or("BENCH_RUNS", 20);
    let cluster_nodes = env_or("BENCH_NODES", 5000);
    let burst = env_or("BENCH_BURST", 100);
    println!("spot-rebalancer controller benchmark (binary: {})", binary());
    latency(runs).await;
    scale(cluster_nodes, burst).await;
}

async fn latency(runs: usize) {
    let scenario = Scenario::new("bench-lat").await;
    let asg = scenario.spot_asg("spot", runs as i32, (2 * runs) as i32).await;
    let old_nodes = scenario.ready_nodes(&asg, runs).await;
    let seen = watch_group(&scenario, &asg);
    let mut controller = scenario.start_controller_from(
        &binary(),
        &["--after-replacement", "keep", "--capacity-timeout", "5m"],
    );
    controller.wait_leading().await;
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
    keep_log("latency", &controller);
    controller.terminate();
}

/// With `BENCH_LOG_DIR` set, the controller's log of a phase is kept there (to explain an outlier).
fn keep_log(phase: &str, controller: &support::process::RoleProcess) {
    if let Ok(dir) = std::env::var("BENCH_LOG_DIR") {
        let path = std::path::Path::new(&dir).join(format!("controller-{phase}.log"));
        std::fs::write(&path, controller.log()).expect("write the controller's log");
        println!("the controller's log: {}", path.display());
    }
}

async fn scale(cluster_nodes: usize, burst: usize) {
    let scenario = Scenario::new("bench-scale").await;
    let asg = scenario.spot_asg("spot", burst as i32, (2 * burst) as i32).await;
    let old_nodes = scenario.ready_nodes(&asg, burst).await;
    let nodes = scenario.bed.nodes();
    let prefix = format!("{}-filler", scenario.name);
    // The replacements (one per notice) join later: fill up to the target without them.
    let present = cluster_node_count(&nodes).await;
    let fillers = cluster_nodes.saturating_sub(present + burst);
    let started = Instant::now();
    stream::iter(0..fillers)
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
        "created {fillers} filler Nodes in {:.1} s (the cluster had {present})",
        started.elapsed().as_secs_f64()
    );

    let seen = watch_group(&scenario, &asg);
    let mut controller = scenario.start_controller_from(
        &binary(),
        &["--after-replacement", "keep", "--capacity-timeout", "5m"],
    );
    controller.wait_leading().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let watched_at_start = cluster_node_count(&nodes).await;
    let idle_rss_kib = status_kib(controller.pid(), "VmRSS:");
    let idle_peak_kib = status_kib(controller.pid(), "VmHWM:");

    let first_written = now_epoch_ms();
    let started = Instant::now();
    stream::iter(&old_nodes)
        .for_each_concurrent(burst, |node| {
            let scenario = &scenario;
            async move {
                scenario.notice(&name_of(node)).await;
            }
        })
        .await;
    let last_written = now_epoch_ms();
    let mut tainted = Vec::with_capacity(burst);
    for node in &old_nodes {
        tainted.push(
            scenario
                .wait_for_phase(&name_of(node), phase::TAINTED, Duration::from_secs(300))
                .await,
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let peak_kib = status_kib(controller.pid(), "VmHWM:");
    let rss_kib = status_kib(controller.pid(), "VmRSS:");
    let watched_at_end = cluster_node_count(&nodes).await;
    let set_calls = scenario.set_desired_calls(&asg).await;
    let calls = scenario.all_calls(&asg).await.len();
    println!(
        "{burst} simultaneous notices, {watched_at_start} Nodes in the cluster at the start \
         ({watched_at_end} at the end, with the replacements): all tainted in {elapsed:.1} s (notices written in {:.0} ms)",
        last_written - first_written
    );
    let targets: Vec<String> = set_calls
        .iter()
        .map(|call| call.desired_capacity.map_or("?".to_owned(), |d| d.to_string()))
        .collect();
    println!(
        "SetDesiredCapacity calls for the {burst}: {} (desired capacities {}); AWS calls per notice: {:.2} ({calls} calls)",
        set_calls.len(),
        targets.join(" → "),
        calls as f64 / burst as f64
    );
    let call_times: Vec<f64> = set_calls.iter().map(|call| since_epoch_ms(&call.time)).collect();
    let full = set_calls
        .iter()
        .find(|call| call.desired_capacity >= Some(2 * burst as i64))
        .map(|call| since_epoch_ms(&call.time));
    println!(
        "burst reaction: first SetDesiredCapacity {:.0} ms after the first notice was written; desired capacity \
         covering all {burst} {} after the last was written",
        call_times.first().map_or(f64::NAN, |first| first - first_written),
        full.map_or("never reached".to_owned(), |at| format!(
            "{:.0} ms",
            at - last_written
        )),
    );
    let mut ready_to_taint = Vec::with_capacity(burst);
    for (old, node) in old_nodes.iter().zip(&tainted) {
        let replacement = record(node).node.expect("the claimed replacement node");
        let name = name_of(old);
        let observed = eventually("the watch saw the taint", Duration::from_secs(10), || async {
            let seen = seen.lock().unwrap();
            Some((*seen.ready.get(&replacement)?, *seen.tainted.get(&name)?))
        })
        .await;
        ready_to_taint.push(observed.1.saturating_duration_since(observed.0).as_secs_f64() * 1000.0);
    }
    report(
        "burst: replacement Ready -> taint on the old node (one watch)",
        ready_to_taint,
    );
    println!(
        "controller resident memory: {:.1} MiB idle after start (peak so far {:.1} MiB), {:.1} MiB after the burst, \
         {:.1} MiB peak (VmHWM)",
        idle_rss_kib as f64 / 1024.0,
        idle_peak_kib as f64 / 1024.0,
        rss_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
    );
    keep_log("burst", &controller);
    controller.terminate();

    let filler = ListParams::default().labels(&format!("bench.spot-rebalancer.io/filler={prefix}"));
    let _ = nodes.delete_collection(&DeleteParams::default(), &filler).await;
}
