//! `spot-rebalancer status` on the bed: kwok Nodes carrying notices, and `SpotReplacement` records
//! written as the controller writes them (the real types, through the API server and its schema),
//! read back by the real binary as a table, as JSON, and as a watch that follows a node through its
//! phases.
mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use spot_rebalancer::contract::{
    SpotReplacement, SpotReplacementSpec, SpotReplacementStatus, keys,
    record::{CapacityType, Phase, Replacement, ScaleIntent},
};
use support::{Bed, eventually, identity::NAMESPACE, is_ready, unique};

/// One test's Nodes: opted in with a label only this test uses, deleted when dropped, with their
/// records (deleted too).
struct Nodes {
    bed: Bed,
    opt_in_key: String,
    names: Vec<String>,
    /// Record name by Node name.
    records: std::collections::BTreeMap<String, String>,
}

impl Nodes {
    fn new(bed: &Bed) -> Self {
        support::identity::install_records(bed);
        Nodes {
            bed: bed.clone(),
            opt_in_key: format!("e2e.spot-rebalancer.io/{}", unique("status")),
            names: Vec::new(),
            records: Default::default(),
        }
    }

    fn records_api(&self) -> Api<SpotReplacement> {
        Api::namespaced(self.bed.kube.clone(), NAMESPACE)
    }

    /// Writes the controller's record of Node `name` (noticed on `instance`): created the first
    /// time, its status replaced after, as the controller does.
    async fn record(&mut self, name: &str, instance: &str, phase: Phase, record: &Replacement) {
        let api = self.records_api();
        let record_name = match self.records.get(name) {
            Some(existing) => existing.clone(),
            None => {
                let node = self.bed.nodes().get(name).await.expect("read the Node");
                // Unique per Node: every test uses the same few instance ids.
                let record_name = format!("i-{:016x}", fastrand::u64(..));
                let object = SpotReplacement::new(
                    &record_name,
                    SpotReplacementSpec {
                        node_name: name.to_owned(),
                        node_uid: node.metadata.uid.expect("a stored Node has a uid"),
                        instance_id: instance.to_owned(),
                    },
                );
                api.create(&PostParams::default(), &object)
                    .await
                    .expect("create a SpotReplacement");
                self.records.insert(name.to_owned(), record_name.clone());
                record_name
            }
        };
        let mut object = api.get(&record_name).await.expect("read the SpotReplacement");
        let previous = object
            .status
            .take()
            .map(|status| status.history)
            .unwrap_or_default();
        object.status = Some(
            SpotReplacementStatus {
                phase,
                record: record.clone(),
                seat: None,
                history: previous,
            }
            .entering(phase, Timestamp::now()),
        );
        api.replace_status(&record_name, &PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("write the status of {record_name}: {e}"));
    }

    fn opt_in_label(&self) -> String {
        format!("{}=true", self.opt_in_key)
    }

    /// A kwok Node (kwok makes it Ready) of node group `spot-a` on instance `instance`, with
    /// `annotations` and, when `tainted`, the termination taint; waits until it is Ready.
    async fn create(&mut self, prefix: &str, instance: &str, annotations: Value, tainted: bool) -> String {
        let name = unique(prefix);
        let mut all = json!({"kwok.x-k8s.io/node": "fake"});
        for (key, value) in annotations.as_object().unwrap() {
            all[key] = value.clone();
        }
        let mut taints = vec![json!({"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"})];
        if tainted {
            taints.push(json!({"key": keys::DEFAULT_TAINT_KEY, "value": "true", "effect": "NoSchedule"}));
        }
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": all, "labels": {
                self.opt_in_key.as_str(): "true", keys::DEFAULT_NODEGROUP_LABEL: "spot-a", "type": "kwok"}},
            "spec": {"providerID": format!("aws:///us-east-1a/{instance}"), "taints": taints},
        }))
        .unwrap();
        self.bed
            .nodes()
            .create(&PostParams::default(), &node)
            .await
            .expect("create a kwok Node");
        self.names.push(name.clone());
        eventually(&format!("{name} Ready"), Duration::from_secs(30), || async {
            is_ready(&self.bed.nodes().get(&name).await.ok()?).then_some(())
        })
        .await;
        name
    }

    /// Adds the termination taint to the Node.
    async fn taint(&self, name: &str) {
        let node = self.bed.nodes().get(name).await.unwrap();
        let mut taints = serde_json::to_value(node.spec.unwrap().taints.unwrap_or_default()).unwrap();
        taints
            .as_array_mut()
            .unwrap()
            .push(json!({"key": keys::DEFAULT_TAINT_KEY, "value": "true", "effect": "NoSchedule"}));
        let patch = json!({"spec": {"taints": taints}});
        self.bed
            .nodes()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("taint Node {name}: {e}"));
    }

    /// Runs `spot-rebalancer status` for this test's nodes with `args`.
    fn status(&self, args: &[&str]) -> Output {
        let output = status_command(&self.bed, &self.opt_in_label(), args)
            .output()
            .expect("run spot-rebalancer status");
        assert!(
            output.status.success(),
            "status {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for record in self.records.values() {
            let _ = Command::new(&self.bed.vars["BED_KUBECTL"])
                .args(["--kubeconfig", &self.bed.vars["BED_KUBECONFIG"]])
                .args([
                    "-n",
                    NAMESPACE,
                    "delete",
                    "spotreplacements.spot-rebalancer.io",
                    record,
                ])
                .args(["--wait=false"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for name in &self.names {
            let _ = Command::new(&self.bed.vars["BED_KUBECTL"])
                .args(["--kubeconfig", &self.bed.vars["BED_KUBECONFIG"]])
                .args(["delete", "node", name, "--wait=false"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn status_command(bed: &Bed, opt_in_label: &str, args: &[&str]) -> Command {
    // No variable any flag reads (from the CLI definition), nor kube's own KUBECONFIG.
    let mut command = support::process::command();
    command
        .arg("status")
        .args(["--kubeconfig", &bed.vars["BED_KUBECONFIG"]])
        .args(["--opt-in-label", opt_in_label])
        .args(["--namespace", NAMESPACE])
        .args(args)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .env_remove("KUBECONFIG");
    command
}

fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

/// A record as the controller writes it after a spot scale-up of `spot-a` from 2 to 3.
fn scaling_record() -> Replacement {
    let mut record = Replacement::new("spot-a".into(), Some("od-a".into()), at("2026-11-25T10:00:01Z"));
    record.scale = Some(ScaleIntent {
        asg: "spot-a".into(),
        capacity_type: CapacityType::Spot,
        baseline: 2,
        target_desired: 3,
        pre_scale_instances: vec!["i-0aaa".into(), "i-0bbb".into()],
        scale_requested_at: at("2026-11-25T10:00:02Z"),
        activity_ids: Vec::new(),
    });
    record
}

fn notice(at: &str) -> Value {
    json!({keys::REBALANCE_NOTICE_TIME: at})
}

/// The table's row for `node`, split into its cells (the REASON cell keeps its spaces).
fn row_cells(table: &str, node: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|line| line.starts_with(&format!("{node} ")))
        .unwrap_or_else(|| panic!("no row for {node} in\n{table}"));
    let mut cells: Vec<String> = line.split_whitespace().take(9).map(str::to_owned).collect();
    let reason = line.split_whitespace().skip(9).collect::<Vec<_>>().join(" ");
    cells.push(reason);
    cells
}

#[tokio::test]
async fn status_shows_each_noticed_node_with_its_phase_replacement_taint_and_reason() {
    let bed = Bed::connect().await;
    let mut nodes = Nodes::new(&bed);
    let notice_at = Timestamp::now().to_string();

    let mut done = scaling_record();
    done.instance_id = Some("i-0ccc".into());
    done.node = Some("ip-10-0-0-9.ec2.internal".into());
    done.ready_at = Some(at("2026-11-25T10:00:40Z"));
    done.tainted_at = Some(at("2026-11-25T10:00:41Z"));
    let tainted = nodes.create("tainted", "i-0aaa", notice(&notice_at), true).await;
    nodes.record(&tainted, "i-0aaa", Phase::Tainted, &done).await;

    let mut failed = scaling_record();
    failed.reason = Some("no spot or on-demand capacity: InsufficientInstanceCapacity".into());
    let failed_node = nodes.create("failed", "i-0bbb", notice(&notice_at), false).await;
    nodes.record(&failed_node, "i-0bbb", Phase::Failed, &failed).await;

    // A node that wrote a phase and a record on itself: only the controller's records count.
    let forged = json!({keys::REBALANCE_NOTICE_TIME: notice_at, "spot-rebalancer.io/phase": "Tainted",
                        "spot-rebalancer.io/replacement": "{\"replacementNode\": \"ip-10-0-0-66\"}"});
    let forging = nodes.create("forging", "i-0ddd", forged, false).await;
    let noticed = nodes.create("noticed", "i-0eee", notice(&notice_at), false).await;
    let quiet = nodes.create("quiet", "i-0fff", json!({}), false).await;

    let table = String::from_utf8(nodes.status(&[]).stdout).unwrap();
    eprintln!("{table}");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NODE",
            "INSTANCE",
            "NODEGROUP",
            "PHASE",
            "REPLACEMENT",
            "TAINTED",
            "AGE",
            "READY",
            "AGENT",
            "REASON"
        ]
    );
    assert_eq!(
        table.lines().count(),
        5,
        "a header and the four noticed nodes:\n{table}"
    );
    assert!(
        !table.contains(&quiet),
        "a node without a notice is left out:\n{table}"
    );

    let row = row_cells(&table, &tainted);
    assert_eq!(
        row[1..6],
        [
            "i-0aaa",
            "spot-a",
            "Tainted",
            "ip-10-0-0-9.ec2.internal",
            "NoSchedule"
        ]
    );
    assert!(row[6].ends_with('s'), "an age in seconds: {row:?}");
    // No agent pod runs on these test nodes: the AGENT column says so.
    assert_eq!(
        (row[7].as_str(), row[8].as_str(), row[9].as_str()),
        ("yes", "none", "")
    );

    let row = row_cells(&table, &failed_node);
    assert_eq!(row[3..6], ["Failed", "-", "no"]);
    assert_eq!(
        row[9],
        "no spot or on-demand capacity: InsufficientInstanceCapacity"
    );

    let row = row_cells(&table, &forging);
    assert_eq!(
        row[3..6],
        ["Noticed", "-", "no"],
        "a node's own phase annotation counts for nothing"
    );

    let row = row_cells(&table, &noticed);
    assert_eq!(row[1..6], ["i-0eee", "spot-a", "Noticed", "-", "no"]);

    let everything = String::from_utf8(nodes.status(&["--all"]).stdout).unwrap();
    assert_eq!(row_cells(&everything, &quiet)[3..6], ["-", "-", "no"]);

    let json: Value = serde_json::from_slice(&nodes.status(&["-o", "json"]).stdout).unwrap();
    let rows = json.as_array().expect("a JSON array");
    assert_eq!(rows.len(), 4);
    let tainted_row = rows.iter().find(|row| row["node"] == tainted.as_str()).unwrap();
    assert_eq!(tainted_row["phase"], "Tainted");
    assert_eq!(tainted_row["replacementInstance"], "i-0ccc");
    assert_eq!(tainted_row["taintEffect"], "NoSchedule");
    assert_eq!(tainted_row["record"]["targetDesired"], 3);
    assert_eq!(tainted_row["noticeTime"], notice_at.as_str());
}

#[tokio::test]
async fn status_watch_prints_each_step_of_a_replacement_and_stops_at_the_phase_asked_for() {
    let bed = Bed::connect().await;
    let mut nodes = Nodes::new(&bed);
    let notice_at = Timestamp::now().to_string();
    let name = nodes.create("watched", "i-0aaa", notice(&notice_at), false).await;

    let mut child = status_command(
        &bed,
        &nodes.opt_in_label(),
        &["--watch", "--until", "Tainted,Failed"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .expect("start status --watch");
    let (sender, lines) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("watch: {line}");
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let next_line = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the watch printed no line for {what}"))
    };

    let first = next_line("the notice");
    assert!(first.contains(&name) && first.contains("Noticed"), "{first}");
    assert!(first.contains("rebalance recommendation for i-0aaa"), "{first}");

    let mut record = scaling_record();
    record.detected_at = Timestamp::now();
    record.scale.as_mut().unwrap().scale_requested_at = Timestamp::now();
    nodes.record(&name, "i-0aaa", Phase::ScalingSpot, &record).await;
    let detected = next_line("the detection");
    assert!(
        detected.contains("Detected") && detected.contains("spot ASG spot-a, on-demand fallback od-a"),
        "{detected}"
    );
    let scaling = next_line("the scale-up");
    assert!(
        scaling.contains("ScalingSpot") && scaling.contains("spot scale-up sent: spot-a desired 2 → 3"),
        "{scaling}"
    );

    record.instance_id = Some("i-0ccc".into());
    record.node = Some("ip-10-0-0-9.ec2.internal".into());
    record.claimed_at = Some(Timestamp::now());
    nodes.record(&name, "i-0aaa", Phase::AwaitingReady, &record).await;
    let claimed = next_line("the claim");
    assert!(
        claimed.contains("AwaitingReady")
            && claimed.contains("replacement instance i-0ccc (node ip-10-0-0-9.ec2.internal) claimed"),
        "{claimed}"
    );

    record.ready_at = Some(Timestamp::now());
    record.tainted_at = Some(Timestamp::now());
    // The controller taints, then records it.
    nodes.taint(&name).await;
    nodes.record(&name, "i-0aaa", Phase::Tainted, &record).await;
    let ready = next_line("Ready");
    assert!(
        ready.contains("replacement node ip-10-0-0-9.ec2.internal Ready"),
        "{ready}"
    );
    let taint = next_line("the taint");
    assert!(
        taint.contains("Tainted") && taint.contains("tainted (NoSchedule)"),
        "{taint}"
    );

    let status = eventually("the watch to stop at Tainted", Duration::from_secs(30), || {
        let exited = child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "status --watch ended with {status}");
    assert_eq!(lines.try_recv().ok(), None, "nothing after the taint");
}
