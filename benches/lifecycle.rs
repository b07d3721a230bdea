//! Benchmark of the end of a node's life on the bed (run by `scripts/bench-lifecycle`); prints
//! figures, asserts none.
//!
//! Every retirement measured here starts from the same state: a node with its replacement Ready and
//! the termination taint on (the controller runs with `--after-replacement keep`, so the taint alone
//! drains nothing), carrying workload pods of Deployments whose pods may land on the replacement
//! (their nodeSelector is the node group). Then the interruption-time annotation is written.
//!
//! 1. Interruption → Retired latency, `BENCH_RUNS` runs (default 5), `BENCH_PODS` pods (30) in three
//!    Deployments, each with a PDB `maxUnavailable: 1`: the interruption annotation written (the
//!    PATCH returned) → the first pod of the node seen terminating (a pod watch) → the drain recorded
//!    complete (`drain.completedAt` in the controller's record) → TerminateInstanceInAutoScalingGroup
//!    at moto (the bed's call log) → Retired (the record's `retiredAt`, else the ledger entry's
//!    `updatedAt`). One machine, one clock.
//! 2. Eviction pace: `BENCH_PODS` pods of one Deployment without a PDB, then with a PDB
//!    `maxUnavailable: 1`; evictions per second (first eviction → drained) from the controller's
//!    `spot_rebalancer_evictions_total{result}`, and the 429s (`result="blocked"`) per eviction.
//! 3. AWS calls per retirement, by operation, from the bed's call log (interruption → Retired).
//! 4. Memory: `BENCH_MEM_NODES` nodes (20) × `BENCH_MEM_PODS` bare pods (30) drained and retired at
//!    once, before and after `BENCH_OTHER_PODS` (2,000) unrelated pods are added on other nodes; the
//!    controller's resident memory sampled every 100 ms during each wave, and its VmHWM.
//!
//! The controller is the release build (`cargo bench` builds it with the release profile), under the
//! chart's RBAC identity.
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
    runtime::watcher,
};
use serde::Deserialize;
use serde_json::{Value, json};
use support::{
    Bed,
    controller::{ControllerProcess, NODEGROUP_LABEL, Scenario, name_of, phase, raw_record},
    instance_id,
    lifecycle::{self, seat},
    webhook::TestNamespace,
};

const EVICTIONS: &str = "spot_rebalancer_evictions_total";
/// Bound on any one wait of the bench (a whole drain at a PDB's pace included).
const LONG: Duration = Duration::from_secs(600);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(what: &str, mut millis: Vec<f64>) {
    if millis.is_empty() {
        println!("{what}: no sample");
        return;
    }
    millis.sort_by(f64::total_cmp);
    println!(
        "{what}: n={} p50={:.0} ms p99={:.0} ms max={:.0} ms",
        millis.len(),
        percentile(&millis, 50.0),
        percentile(&millis, 99.0),
        millis.last().copied().unwrap_or_default()
    );
}

fn epoch_ms(time: &str) -> f64 {
    let at: jiff::Timestamp = time.parse().expect("an RFC 3339 time");
    at.as_nanosecond() as f64 / 1e6
}

fn now_epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// `VmHWM` (peak) or `VmRSS` (now) of a process, in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ----- the bed's call log ---------------------------------------------------------------------------

/// One AWS call as the bed logged it (the fields this bench reads).
#[derive(Debug, Clone, Deserialize)]
struct Call {
    seq: u64,
    time: String,
    action: String,
    status: u16,
}

/// Every call the bed logged after `since` (any action, any ASG: TerminateInstanceInAutoScalingGroup
/// and DescribeAutoScalingInstances name none).
async fn calls_since(bed: &Bed, since: u64) -> Vec<Call> {
    let url = format!("{}/_bed/calls?since={since}", bed.aws_endpoint);
    reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .expect("the call log is a list of calls")
}

async fn last_call_seq(bed: &Bed) -> u64 {
    calls_since(bed, 0).await.iter().map(|c| c.seq).max().unwrap_or(0)
}

// ----- one retirement -------------------------------------------------------------------------------

/// The workload on the node to retire: `apps` Deployments sharing `pods` replicas, each with a PDB
/// `maxUnavailable: 1` when `pdb`.
#[derive(Clone, Copy)]
struct Workload {
    apps: usize,
    pods: usize,
    pdb: bool,
}

/// What one retirement took, in ms from the interruption annotation, and what it cost.
#[derive(Default)]
struct Retirement {
    first_eviction: f64,
    /// First eviction of each app's pods (the order of the Deployments).
    first_eviction_by_app: Vec<f64>,
    drained: f64,
    terminate_call: f64,
    retired: f64,
    evicted: f64,
    blocked: f64,
    /// Eviction answers other than evicted and blocked (`gone`, `error`).
    other: f64,
    /// Whether the Retired time is the record's `retiredAt` (else the ledger entry's `updatedAt`).
    retired_from_record: bool,
    calls: BTreeMap<String, usize>,
}

impl Retirement {
    /// Evictions per second between the first eviction and the drain's end.
    fn pace(&self) -> f64 {
        self.evicted / ((self.drained - self.first_eviction) / 1000.0)
    }
}

/// Per pod name: its app, and the first instant (epoch ms) it was seen terminating or gone.
type Evictions = Arc<Mutex<BTreeMap<String, (String, f64)>>>;

/// Watches the pods of `node` in `namespace` for evictions, until the task is aborted.
fn watch_evictions(bed: &Bed, namespace: &str, node: &str) -> (Evictions, tokio::task::JoinHandle<()>) {
    let seen = Evictions::default();
    let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), namespace);
    let sink = seen.clone();
    let node = node.to_owned();
    let task = tokio::spawn(async move {
        let mut events = watcher(pods, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let at = now_epoch_ms();
            let (pod, gone) = match event {
                Ok(watcher::Event::Apply(pod)) => (pod, false),
                Ok(watcher::Event::Delete(pod)) => (pod, true),
                _ => continue,
            };
            let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str());
            if on_node && (gone || pod.metadata.deletion_timestamp.is_some()) {
                let app = pod
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("app").cloned())
                    .unwrap_or_default();
                let name = pod.metadata.name.clone().unwrap_or_default();
                sink.lock().unwrap().entry(name).or_insert((app, at));
            }
        }
    });
    (seen, task)
}

/// Watches `node`'s record, merging its drain and retirement times as they are written (a watch sees
/// every write, also those the node bridge's removal of the Node would hide from a poll).
fn watch_record(bed: &Bed, node: &str) -> (Arc<Mutex<Value>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(json!({})));
    let sink = seen.clone();
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let nodes = bed.nodes();
    let task = tokio::spawn(async move {
        let mut events = watcher(nodes, config).boxed();
        while let Some(event) = events.next().await {
            let Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) = event else {
                continue;
            };
            let Some(record) = raw_record(&node).and_then(|raw| serde_json::from_str::<Value>(raw).ok())
            else {
                continue;
            };
            let mut seen = sink.lock().unwrap();
            if let Some(completed) = record["drain"]["completedAt"].as_str() {
                seen["drain"]["completedAt"] = json!(completed);
            }
            if let Some(retired) = record["retiredAt"].as_str() {
                seen["retiredAt"] = json!(retired);
            }
        }
    });
    (seen, task)
}

/// Makes a node carrying `workload` with its replacement Ready and tainted, writes its interruption
/// notice, and measures until it is Retired.
async fn retire_one(
    scenario: &Scenario,
    controller: &ControllerProcess,
    suffix: &str,
    workload: Workload,
) -> Retirement {
    let bed = &scenario.bed;
    let asg = scenario.spot_asg(suffix, 1, 3).await;
    let old_node = scenario.ready_nodes(&asg, 1).await.remove(0);
    let (old, old_instance) = (name_of(&old_node), instance_id(&old_node).unwrap());
    let ns = TestNamespace::create(bed, "life").await;
    // The node group is the pods' nodeSelector: the old node alone now, the replacement later.
    let on_group = json!({ NODEGROUP_LABEL: asg });
    let apps: Vec<String> = (0..workload.apps)
        .map(|i| format!("app-{}", (b'a' + i as u8) as char))
        .collect();
    for (i, app) in apps.iter().enumerate() {
        let replicas = workload.pods / workload.apps + usize::from(i < workload.pods % workload.apps);
        lifecycle::deployment(bed, &ns.name, app, replicas as i32, &on_group).await;
        if workload.pdb {
            lifecycle::pdb(bed, &ns.name, app, json!({"maxUnavailable": 1}), replicas as i32).await;
        }
    }
    scenario.notice(&old).await;
    scenario.wait_for_phase(&old, phase::TAINTED, LONG).await;

    let (evictions, watch) = watch_evictions(bed, &ns.name, &old);
    let (last_record, record_watch) = watch_record(bed, &old);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seq = last_call_seq(bed).await;
    let evicted_before = controller.metric(EVICTIONS, &[("result", "evicted")]).await;
    let blocked_before = controller.metric(EVICTIONS, &[("result", "blocked")]).await;
    let all_before = controller.metric(EVICTIONS, &[]).await;

    scenario.interruption(&old).await;
    let t0 = now_epoch_ms();
    let seat = scenario.wait_for_seat(&old_instance, seat::RETIRED, LONG).await;
    // The record's last write (Retired) races the node bridge removing the Node: give the watch a
    // moment; without it, the ledger entry's time stands in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    record_watch.abort();
    let record = last_record.lock().unwrap().clone();
    let retired_from_record = record["retiredAt"].is_string();
    let retired_at = record["retiredAt"]
        .as_str()
        .or_else(|| seat["updatedAt"].as_str())
        .map(epoch_ms)
        .expect("a retirement time");
    let drained_at = record["drain"]["completedAt"]
        .as_str()
        .map(epoch_ms)
        .unwrap_or(retired_at);

    let calls: Vec<Call> = calls_since(bed, seq)
        .await
        .into_iter()
        .filter(|c| epoch_ms(&c.time) <= retired_at)
        .collect();
    let terminate = calls
        .iter()
        .find(|c| c.action == "TerminateInstanceInAutoScalingGroup" && c.status == 200)
        .map(|c| epoch_ms(&c.time))
        .unwrap_or(f64::NAN);
    let mut by_operation = BTreeMap::new();
    for call in &calls {
        *by_operation.entry(call.action.clone()).or_insert(0) += 1;
    }
    watch.abort();
    let evictions = evictions.lock().unwrap().clone();
    let first = |app: Option<&str>| {
        evictions
            .values()
            .filter(|(a, _)| app.is_none_or(|app| a == app))
            .map(|(_, at)| *at - t0)
            .fold(f64::NAN, f64::min)
    };
    let evicted = controller.metric(EVICTIONS, &[("result", "evicted")]).await - evicted_before;
    let blocked = controller.metric(EVICTIONS, &[("result", "blocked")]).await - blocked_before;
    let all = controller.metric(EVICTIONS, &[]).await - all_before;
    Retirement {
        first_eviction: first(None),
        first_eviction_by_app: apps.iter().map(|app| first(Some(app))).collect(),
        drained: drained_at - t0,
        terminate_call: terminate - t0,
        retired: retired_at - t0,
        evicted,
        blocked,
        other: all - evicted - blocked,
        retired_from_record,
        calls: by_operation,
    }
}

// ----- the figures ----------------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = env_or("BENCH_RUNS", 5);
    let pods = env_or("BENCH_PODS", 30);
    let mem_nodes = env_or("BENCH_MEM_NODES", 20);
    let mem_pods = env_or("BENCH_MEM_PODS", 30);
    let other_pods = env_or("BENCH_OTHER_PODS", 2000);
    println!(
        "spot-rebalancer end-of-life benchmark (binary: {})",
        support::process::BINARY
    );
    let started = Instant::now();
    retirements(runs, pods).await;
    memory(mem_nodes, mem_pods, other_pods).await;
    println!("benchmark took {:.0} s", started.elapsed().as_secs_f64());
}

async fn retirements(runs: usize, pods: usize) {
    let scenario = Scenario::new("bench-life").await;
    let mut controller =
        scenario.start_controller(&["--after-replacement", "keep", "--capacity-timeout", "5m"]);
    controller.wait_ready().await;

    // 1. Interruption → Retired.
    let three_pdbs = Workload {
        apps: 3,
        pods,
        pdb: true,
    };
    let mut measured = Vec::new();
    for run in 0..runs {
        let retirement = retire_one(&scenario, &controller, &format!("r{run}"), three_pdbs).await;
        println!(
            "  run {run}: first eviction {:.0} ms (by Deployment: {}), drained {:.0} ms, terminate {:.0} ms, \
             retired {:.0} ms{}; {} evicted, {} refused (429), {} other answers",
            retirement.first_eviction,
            retirement
                .first_eviction_by_app
                .iter()
                .map(|ms| format!("{ms:.0}"))
                .collect::<Vec<_>>()
                .join("/"),
            retirement.drained,
            retirement.terminate_call,
            retirement.retired,
            if retirement.retired_from_record {
                ""
            } else {
                " (ledger)"
            },
            retirement.evicted,
            retirement.blocked,
            retirement.other
        );
        measured.push(retirement);
    }
    println!(
        "1. interruption -> Retired, {pods} pods in 3 Deployments, each with a PDB maxUnavailable 1 \
         ({runs} runs):"
    );
    let stage = |f: fn(&Retirement) -> f64| measured.iter().map(f).collect::<Vec<_>>();
    report("   interruption -> first eviction", stage(|r| r.first_eviction));
    report(
        "   interruption -> drained (drain.completedAt)",
        stage(|r| r.drained),
    );
    report(
        "   interruption -> TerminateInstanceInAutoScalingGroup at moto",
        stage(|r| r.terminate_call),
    );
    report("   interruption -> Retired", stage(|r| r.retired));
    for (i, app) in ["first", "second", "third"].iter().enumerate() {
        report(
            &format!("   interruption -> first eviction of the {app} Deployment's pods"),
            measured
                .iter()
                .filter_map(|r| r.first_eviction_by_app.get(i).copied())
                .filter(|ms| ms.is_finite())
                .collect(),
        );
    }
    let paces = stage(Retirement::pace);
    println!(
        "   eviction pace with 3 PDBs: {:.2} evictions/s (mean of runs); 429s per eviction: {:.1}",
        paces.iter().sum::<f64>() / paces.len() as f64,
        measured.iter().map(|r| r.blocked).sum::<f64>() / measured.iter().map(|r| r.evicted).sum::<f64>()
    );

    // 2. Eviction pace without and with a PDB.
    println!("2. eviction pace, {pods} pods of one Deployment:");
    let mut paced = Vec::new();
    for (label, pdb) in [("no PDB", false), ("PDB maxUnavailable 1", true)] {
        let workload = Workload { apps: 1, pods, pdb };
        let suffix = if pdb { "pdb" } else { "nopdb" };
        let r = retire_one(&scenario, &controller, suffix, workload).await;
        println!(
            "   {label}: {:.2} evictions/s ({} evicted in {:.1} s from the first eviction to drained); \
             {} refused (429), {:.1} per eviction, {} other answers; interruption -> Retired {:.1} s",
            r.pace(),
            r.evicted,
            (r.drained - r.first_eviction) / 1000.0,
            r.blocked,
            r.blocked / r.evicted,
            r.other,
            r.retired / 1000.0
        );
        paced.push(r);
    }

    // 3. AWS calls per retirement.
    println!("3. AWS calls per retirement (interruption -> Retired, by operation):");
    for (label, set) in [("3 PDBs", &measured[..]), ("one Deployment", &paced[..])] {
        let mut total: BTreeMap<&str, usize> = BTreeMap::new();
        for r in set {
            for (operation, count) in &r.calls {
                *total.entry(operation).or_insert(0) += count;
            }
        }
        let all: usize = total.values().sum();
        let parts: Vec<String> = total
            .iter()
            .map(|(op, n)| format!("{op} {:.1}", *n as f64 / set.len() as f64))
            .collect();
        println!(
            "   {label} ({} retirements): {:.1} calls: {}",
            set.len(),
            all as f64 / set.len() as f64,
            parts.join(", ")
        );
    }
    let _ = controller.terminate();
}

// ----- memory while draining several nodes ---------------------------------------------------------

/// Samples a process's resident memory every 100 ms; `take` returns the largest sample since the last.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(memory_kib(pid, "VmRSS"), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        RssSampler { peak, stop, task }
    }

    fn take(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// `count` bare pods labelled `group=<group>` bound to each of `nodes` (kwok runs them), created 16
/// at a time; waits (bounded) until they all run Ready.
async fn bound_pods(bed: &Bed, namespace: &str, group: &str, nodes: &[String], count: usize) {
    let api: Api<Pod> = Api::namespaced(bed.kube.clone(), namespace);
    let pods: Vec<(String, String)> = nodes
        .iter()
        .enumerate()
        .flat_map(|(n, node)| (0..count).map(move |i| (format!("{group}-{n}-{i}"), node.clone())))
        .collect();
    let total = pods.len();
    let started = Instant::now();
    stream::iter(pods)
        .for_each_concurrent(16, |(name, node)| {
            let api = api.clone();
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"group": group}},
                "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "app", "image": "fake"}],
                         "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]},
            }))
            .unwrap();
            async move {
                api.create(&PostParams::default(), &pod)
                    .await
                    .expect("create a bound pod");
            }
        })
        .await;
    let params = ListParams::default().labels(&format!("group={group}"));
    let ready = support::eventually(&format!("{total} {group} pods Ready"), LONG, || async {
        let list = api.list(&params).await.ok()?;
        let ready = list.items.iter().filter(|pod| pod_ready(pod)).count();
        (ready == total).then_some(ready)
    })
    .await;
    println!(
        "   {ready} pods ({group}) created and Ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `nodes` nodes of a new ASG, each with `pods` bare pods, noticed at once, tainted, interrupted at
/// once, drained and retired. Returns the seconds from the interruptions to the last retirement.
async fn wave(scenario: &Scenario, ns: &TestNamespace, suffix: &str, nodes: usize, pods: usize) -> f64 {
    let asg = scenario.spot_asg(suffix, nodes as i32, (2 * nodes) as i32).await;
    let old: Vec<Node> = scenario.ready_nodes(&asg, nodes).await;
    let names: Vec<String> = old.iter().map(name_of).collect();
    bound_pods(&scenario.bed, &ns.name, suffix, &names, pods).await;
    stream::iter(&names)
        .for_each_concurrent(nodes, |name| async move {
            scenario.notice(name).await;
        })
        .await;
    for name in &names {
        scenario.wait_for_phase(name, phase::TAINTED, LONG).await;
    }
    let started = Instant::now();
    stream::iter(&names)
        .for_each_concurrent(nodes, |name| async move {
            scenario.interruption(name).await;
        })
        .await;
    for node in &old {
        let instance = instance_id(node).unwrap();
        scenario.wait_for_seat(&instance, seat::RETIRED, LONG).await;
    }
    started.elapsed().as_secs_f64()
}

async fn memory(nodes: usize, pods: usize, other_pods: usize) {
    println!(
        "4. controller memory, {nodes} nodes x {pods} pods drained and retired at once, before and after \
         {other_pods} unrelated pods:"
    );
    let scenario = Scenario::new("bench-mem").await;
    let ns = TestNamespace::create(&scenario.bed, "mem").await;
    let others = TestNamespace::create(&scenario.bed, "others").await;
    let mut controller =
        scenario.start_controller(&["--after-replacement", "keep", "--capacity-timeout", "5m"]);
    controller.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = controller.pid();
    let sampler = RssSampler::start(pid);
    let idle = memory_kib(pid, "VmRSS");
    sampler.take();

    let took = wave(&scenario, &ns, "w1", nodes, pods).await;
    let first_peak = sampler.take();
    println!(
        "   wave 1 ({} pods in the cluster's test namespaces): all retired {took:.1} s after the interruptions",
        nodes * pods
    );

    // Unrelated pods on nodes of their own (kwok fake nodes, not in any ASG, not opted in).
    let filler_nodes = other_pods.div_ceil(100).max(1);
    let prefix = format!("{}-filler", scenario.name);
    let filler_names: Vec<String> = (0..filler_nodes).map(|i| format!("{prefix}-{i}")).collect();
    for name in &filler_names {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"bench.spot-rebalancer.io/filler": prefix},
                         "annotations": {"kwok.x-k8s.io/node": "fake"}},
        }))
        .unwrap();
        scenario
            .bed
            .nodes()
            .create(&PostParams::default(), &node)
            .await
            .expect("create a filler Node");
    }
    let per_node = other_pods.div_ceil(filler_nodes);
    bound_pods(&scenario.bed, &others.name, "other", &filler_names, per_node).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_others = memory_kib(pid, "VmRSS");
    sampler.take();

    let took = wave(&scenario, &ns, "w2", nodes, pods).await;
    let second_peak = sampler.take();
    println!(
        "   wave 2 (+{} unrelated pods): all retired {took:.1} s after the interruptions",
        filler_nodes * per_node
    );
    println!(
        "   controller resident memory: {:.1} MiB after start; wave 1 peak {:.1} MiB; {:.1} MiB once the \
         unrelated pods exist; wave 2 peak {:.1} MiB; VmHWM {:.1} MiB",
        mib(idle),
        mib(first_peak),
        mib(with_others),
        mib(second_peak),
        mib(memory_kib(pid, "VmHWM"))
    );
    drop(sampler);
    let _ = controller.terminate();

    drop(others);
    drop(ns);
    let filler = ListParams::default().labels(&format!("bench.spot-rebalancer.io/filler={prefix}"));
    let _ = scenario
        .bed
        .nodes()
        .delete_collection(&DeleteParams::default(), &filler)
        .await;
}
