//! The controller's e2e parts: the real `spot-rebalancer controller` process, a scenario (a unique
//! opt-in label, lease and ASGs of its own on the shared bed, cleaned up afterwards), the node
//! annotations and taint the controller reads and writes, its Events and metrics, the bed's view of
//! each ASG, and a watch that checks "no taint before the claimed replacement is Ready" at every
//! change of every Node.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, Taint};
use k8s_openapi::api::events::v1::Event as EventsEvent;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
    runtime::watcher,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::process::{BINARY, RoleCommand, RoleProcess};
use super::{
    AsgSpec, Bed, NODE_LABEL_TAG_PREFIX, autoscaling_client, eventually, identity, instance_id, is_ready,
    unique,
};

// The contract with the cluster, spelled out here on purpose: the tests pin the strings.
pub const REBALANCE_NOTICE_TIME: &str = "spot-rebalancer.io/rebalance-notice-time";
pub const INTERRUPTION_TIME: &str = "spot-rebalancer.io/interruption-time";
pub const PHASE: &str = "spot-rebalancer.io/phase";
pub const REPLACEMENT: &str = "spot-rebalancer.io/replacement";
pub const FALLBACK_ASG_TAG: &str = "spot-rebalancer.io/fallback-asg";
/// The ASG tag that opts an ASG in (the controller acts only on instances of such ASGs).
pub const OPT_IN_TAG: &str = "spot-rebalancer.io/enabled";
pub const DRAIN_REQUESTED: &str = "spot-rebalancer.io/drain-requested";
pub const SCALE_DOWN_DISABLED: &str = "cluster-autoscaler.kubernetes.io/scale-down-disabled";
pub const TAINT_KEY: &str = "spot-instance-terminating";
pub const NODEGROUP_LABEL: &str = "eks.amazonaws.com/nodegroup";

/// Phases of the replacement state machine, as written in the `phase` annotation.
pub mod phase {
    pub const DETECTED: &str = "Detected";
    pub const SCALING_SPOT: &str = "ScalingSpot";
    pub const SCALING_ON_DEMAND: &str = "ScalingOnDemand";
    pub const AWAITING_READY: &str = "AwaitingReady";
    pub const TAINTED: &str = "Tainted";
    pub const DRAINING: &str = "Draining";
    pub const RETIRED: &str = "Retired";
    pub const DRAINED: &str = "Drained";
    pub const FAILED: &str = "Failed";
    pub const SKIPPED: &str = "Skipped";
}

// ----- the controller process -------------------------------------------------------------------

/// A running `spot-rebalancer controller` ([`RoleProcess`]: SIGKILLed when dropped, its log printed
/// when the test is failing).
pub struct ControllerProcess {
    process: RoleProcess,
    pub identity: String,
}

impl std::ops::Deref for ControllerProcess {
    type Target = RoleProcess;
    fn deref(&self) -> &RoleProcess {
        &self.process
    }
}

impl std::ops::DerefMut for ControllerProcess {
    fn deref_mut(&mut self) -> &mut RoleProcess {
        &mut self.process
    }
}

impl ControllerProcess {
    /// Starts the controller as its own ServiceAccount (the chart's RBAC, [`identity`]) with the bed's
    /// AWS endpoint, `--log-format plain`, and `args` (the opt-in label, lease, ASG names and
    /// timeouts are the caller's).
    pub fn start(bed: &Bed, identity: &str, args: &[String]) -> Self {
        Self::start_from(BINARY, bed, identity, args)
    }

    /// As [`ControllerProcess::start`], running `binary` (another build of `spot-rebalancer`).
    pub fn start_from(binary: &str, bed: &Bed, identity: &str, args: &[String]) -> Self {
        let command = RoleCommand::of(binary, "controller").label(format!("controller {identity}"));
        let dir = command.dir();
        let process = command
            .args(["--identity", identity])
            .args(["--log-format", "plain"])
            .args(args)
            .env(
                "KUBECONFIG",
                identity::role_kubeconfig(bed, identity::Role::Controller),
            )
            // The AWS SDK's own configuration: the bed's endpoint and dummy credentials, and nothing
            // from the test's environment or home directory.
            .env("AWS_ENDPOINT_URL", &bed.aws_endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-aws-credentials"))
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .spawn();
        ControllerProcess {
            process,
            identity: identity.to_owned(),
        }
    }

    /// Waits until `/readyz` answers 200: caches synced, and leader or follower.
    pub async fn wait_ready(&mut self) {
        self.process.wait_ready(Duration::from_secs(60)).await;
    }

    /// Waits until it leads and its fence is open (it logs "leading"): the moment it starts acting.
    /// A replica that is ready may still be waiting for the Lease.
    #[allow(dead_code)] // Used by the benchmarks, which share this module.
    pub async fn wait_leading(&mut self) {
        self.wait_ready().await;
        eventually("the controller leads", Duration::from_secs(60), || async {
            self.log()
                .lines()
                .any(|line| line.contains("spot_rebalancer::controller: leading"))
                .then_some(())
        })
        .await;
    }

    /// The sum of the samples of `name` whose labels include all of `labels` (0 when there is none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics().await, name, labels)
    }
}

/// The sum of the samples of metric `name` (exact name, so `_bucket`/`_count` are separate names)
/// whose label set includes every pair in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (sample_name, sample_labels) = match series.split_once('{') {
                Some((sample_name, rest)) => (sample_name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if sample_name != name {
                return None;
            }
            let pairs: Vec<(&str, &str)> = sample_labels
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(key, value)| (key.trim(), value.trim().trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|wanted| pairs.contains(wanted))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

// ----- a scenario on the shared bed -------------------------------------------------------------

/// One test's own corner of the bed: an opt-in label and a lease nobody else uses, the ASGs and
/// standalone instances it made (scaled to zero and removed when it is dropped, unless
/// `E2E_KEEP=1`), and the controller flags every test passes.
pub struct Scenario {
    pub bed: Bed,
    /// Unique name of this scenario; prefixes everything it makes.
    pub name: String,
    /// The opt-in label key, `e2e.spot-rebalancer.io/<name>`, with the value `true`.
    pub opt_in_key: String,
    pub lease: String,
    asgs: Mutex<Vec<String>>,
    instances: Mutex<Vec<String>>,
    started: Mutex<u32>,
}

impl Scenario {
    pub async fn new(prefix: &str) -> Self {
        let bed = connect_bed().await;
        let name = unique(prefix);
        Scenario {
            bed,
            opt_in_key: format!("e2e.spot-rebalancer.io/{name}"),
            lease: format!("{name}-lease"),
            name,
            asgs: Mutex::new(Vec::new()),
            instances: Mutex::new(Vec::new()),
            started: Mutex::new(0),
        }
    }

    /// `--opt-in-label` value.
    pub fn opt_in_label(&self) -> String {
        format!("{}=true", self.opt_in_key)
    }

    /// Creates a spot ASG whose nodes carry this scenario's opt-in label, at `desired`.
    pub async fn spot_asg(&self, suffix: &str, desired: i32, max: i32) -> String {
        let label = [(self.opt_in_key.as_str(), "true")];
        self.create_asg(suffix, true, desired, max, &label).await
    }

    /// Creates an on-demand ASG whose nodes are not opted in (a fallback), at `desired`.
    pub async fn on_demand_asg(&self, suffix: &str, desired: i32, max: i32) -> String {
        self.create_asg(suffix, false, desired, max, &[]).await
    }

    async fn create_asg(
        &self,
        suffix: &str,
        spot: bool,
        desired: i32,
        max: i32,
        labels: &[(&str, &str)],
    ) -> String {
        let name = format!("{}-{suffix}", self.name);
        assert!(
            name.len() <= 63,
            "{name} is too long to be a nodegroup label value"
        );
        self.bed
            .create_asg(AsgSpec {
                name: &name,
                spot,
                desired,
                max,
                labels,
            })
            .await;
        self.asgs.lock().unwrap().push(name.clone());
        if spot {
            // Opted in on the AWS side too: the controller acts only on ASGs with this tag.
            self.tag_asg(&name, OPT_IN_TAG, "true").await;
        }
        name
    }

    /// Sets the plain ASG tag `key=value` on `asg`.
    pub async fn tag_asg(&self, asg: &str, key: &str, value: &str) {
        self.bed
            .autoscaling
            .create_or_update_tags()
            .tags(
                aws_sdk_autoscaling::types::Tag::builder()
                    .resource_id(asg)
                    .resource_type("auto-scaling-group")
                    .key(key)
                    .value(value)
                    .propagate_at_launch(false)
                    .build(),
            )
            .send()
            .await
            .unwrap_or_else(|e| panic!("tag {asg} with {key}={value}: {e:?}"));
    }

    /// Tags `spot_asg` with `spot-rebalancer.io/fallback-asg=<on_demand_asg>` (a plain ASG tag).
    pub async fn tag_fallback(&self, spot_asg: &str, on_demand_asg: &str) {
        self.bed
            .autoscaling
            .create_or_update_tags()
            .tags(
                aws_sdk_autoscaling::types::Tag::builder()
                    .resource_id(spot_asg)
                    .resource_type("auto-scaling-group")
                    .key(FALLBACK_ASG_TAG)
                    .value(on_demand_asg)
                    .propagate_at_launch(false)
                    .build(),
            )
            .send()
            .await
            .expect("CreateOrUpdateTags");
    }

    /// Switches EC2 Capacity Rebalancing on for `asg` (the ASG launches its own replacements).
    pub async fn capacity_rebalance_on(&self, asg: &str) {
        self.bed
            .autoscaling
            .update_auto_scaling_group()
            .auto_scaling_group_name(asg)
            .capacity_rebalance(true)
            .send()
            .await
            .expect("switch Capacity Rebalancing on");
    }

    /// A spot instance in no ASG, opted in through its instance tag; returns its Ready Node.
    pub async fn standalone_instance(&self) -> Node {
        let tag = format!("{NODE_LABEL_TAG_PREFIX}{}", self.opt_in_key);
        let body = json!({"name_tag": self.name, "spot": true, "tags": {tag: "true"}});
        let created = self
            .bed
            .control(reqwest::Method::POST, "instances", Some(body))
            .await;
        let id = created["id"].as_str().expect("the instance's id").to_owned();
        self.instances.lock().unwrap().push(id.clone());
        eventually(
            &format!("a Ready Node for the standalone instance {id}"),
            Duration::from_secs(60),
            || async {
                let nodes = self.bed.nodes_labelled(&self.opt_in_key, "true").await;
                nodes
                    .into_iter()
                    .find(|node| instance_id(node).as_deref() == Some(id.as_str()) && is_ready(node))
            },
        )
        .await
    }

    /// Starts a controller for this scenario: its opt-in label, its lease, `--asg-poll-interval 1s`,
    /// plus `extra`. Each start gets a new identity (`<name>-1`, `<name>-2`, ...).
    pub fn start_controller(&self, extra: &[&str]) -> ControllerProcess {
        self.start_controller_from(BINARY, extra)
    }

    /// As [`Scenario::start_controller`], running another build of the binary (the benchmark
    /// measures the shipped profile with it).
    pub fn start_controller_from(&self, binary: &str, extra: &[&str]) -> ControllerProcess {
        let number = {
            let mut started = self.started.lock().unwrap();
            *started += 1;
            *started
        };
        self.start_build_as(binary, &format!("{}-{number}", self.name), extra)
    }

    /// As [`Scenario::start_controller`], with a given identity (a restart of the same pod).
    pub fn start_controller_as(&self, identity: &str, extra: &[&str]) -> ControllerProcess {
        self.start_build_as(BINARY, identity, extra)
    }

    fn start_build_as(&self, binary: &str, identity: &str, extra: &[&str]) -> ControllerProcess {
        let mut args: Vec<String> = vec![
            "--opt-in-label".into(),
            self.opt_in_label(),
            "--lease-name".into(),
            self.lease.clone(),
            // The chart lets the controller hold Leases in its own namespace only.
            "--lease-namespace".into(),
            identity::NAMESPACE.into(),
            "--asg-poll-interval".into(),
            "1s".into(),
        ];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        identity::install_records(&self.bed);
        ControllerProcess::start_from(binary, &self.bed, identity, &args)
    }

    /// The identity holding this scenario's Lease now (empty when nobody does).
    pub async fn lease_holder(&self) -> String {
        let leases: Api<Lease> = Api::namespaced(self.bed.kube.clone(), identity::NAMESPACE);
        leases
            .get_opt(&self.lease)
            .await
            .expect("read the Lease")
            .and_then(|lease| lease.spec?.holder_identity)
            .unwrap_or_default()
    }

    // ----- Nodes ------------------------------------------------------------------------------

    /// Waits until `asg` has exactly `count` Nodes, all Ready; returns them sorted by name.
    pub async fn ready_nodes(&self, asg: &str, count: usize) -> Vec<Node> {
        eventually(
            &format!("{count} Ready nodes in {asg}"),
            Duration::from_secs(90),
            || async {
                let mut nodes = self.bed.nodes_labelled(NODEGROUP_LABEL, asg).await;
                nodes.sort_by_key(name_of);
                (nodes.len() == count && nodes.iter().all(is_ready)).then_some(nodes)
            },
        )
        .await
    }

    /// The Nodes of `asg` now.
    pub async fn nodes_of(&self, asg: &str) -> Vec<Node> {
        self.bed.nodes_labelled(NODEGROUP_LABEL, asg).await
    }

    /// The Node `name` as the tests look at it: the Node, with its instance's record (the
    /// controller's `SpotReplacement`, found by the instance in the provider id) attached to this
    /// local copy as the [`PHASE`] and [`REPLACEMENT`] annotations, so [`phase_of`] and
    /// [`record_of`] read the record. The controller writes neither on the Node itself.
    pub async fn node(&self, name: &str) -> Node {
        let mut node = self
            .bed
            .nodes()
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("read Node {name}: {e}"));
        if let Some(status) = self.record_status(&node).await {
            let annotations = node.metadata.annotations.get_or_insert_with(Default::default);
            annotations.insert(PHASE.into(), status["phase"].as_str().unwrap_or_default().into());
            annotations.insert(REPLACEMENT.into(), status.to_string());
        }
        node
    }

    /// The status of the record of `node`'s instance, if the controller keeps one.
    pub async fn record_status(&self, node: &Node) -> Option<Value> {
        let instance = instance_id(node)?;
        let record = records_api(&self.bed)
            .get_opt(&instance)
            .await
            .unwrap_or_else(|e| panic!("read the record of {instance}: {e}"))?;
        Some(record.data["status"].clone()).filter(|status| !status.is_null())
    }

    pub async fn annotate(&self, node: &str, annotations: Value) {
        let patch = json!({"metadata": {"annotations": annotations}});
        self.bed
            .nodes()
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("annotate Node {node}: {e}"));
    }

    /// Writes a rebalance recommendation on `node`, as the agent would; returns the notice time.
    pub async fn notice(&self, node: &str) -> String {
        let now = jiff::Timestamp::now().to_string();
        self.annotate(node, json!({ REBALANCE_NOTICE_TIME: now })).await;
        now
    }

    /// Writes a spot interruption notice on `node` (interruption two minutes from now).
    pub async fn interruption(&self, node: &str) -> String {
        let at = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(120))
            .unwrap()
            .to_string();
        self.annotate(node, json!({ INTERRUPTION_TIME: at })).await;
        at
    }

    /// Polls `node` (every 100 ms) until its phase is `wanted`; fails at once if it reaches another
    /// phase that does not move on by itself (Failed, Skipped, Tainted), saying which.
    pub async fn wait_for_phase(&self, node: &str, wanted: &str, timeout: Duration) -> Node {
        let deadline = Instant::now() + timeout;
        loop {
            let current = self.node(node).await;
            let now = phase_of(&current);
            if now.as_deref() == Some(wanted) {
                return current;
            }
            if let Some(now) = now.as_deref()
                && now != wanted
                && [phase::FAILED, phase::SKIPPED, phase::TAINTED].contains(&now)
            {
                panic!(
                    "Node {node} reached phase {now} while the test waited for {wanted}; record: {}",
                    raw_record(&current).unwrap_or("none")
                );
            }
            assert!(
                Instant::now() < deadline,
                "Node {node} did not reach phase {wanted} within {timeout:?}; last phase {now:?}, record: {}",
                raw_record(&current).unwrap_or("none")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `node` every 20 ms until its phase is one of `phases`; returns that Node.
    pub async fn wait_for_any_phase(&self, node: &str, phases: &[&str], timeout: Duration) -> Node {
        let deadline = Instant::now() + timeout;
        loop {
            let current = self.node(node).await;
            if let Some(now) = phase_of(&current)
                && phases.contains(&now.as_str())
            {
                return current;
            }
            assert!(
                Instant::now() < deadline,
                "Node {node} reached none of {phases:?} within {timeout:?}; phase {:?}, record: {}",
                phase_of(&current),
                raw_record(&current).unwrap_or("none")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `node` carries the termination taint; returns the Node.
    pub async fn wait_for_taint(&self, node: &str, timeout: Duration) -> Node {
        eventually(&format!("the termination taint on {node}"), timeout, || async {
            let current = self.node(node).await;
            termination_taint(&current).is_some().then_some(current)
        })
        .await
    }

    /// Events about `node`, from core/v1 and events.k8s.io/v1 (the same events may show in both).
    pub async fn events(&self, node: &str) -> Vec<NodeEvent> {
        let core: Api<CoreEvent> = Api::all(self.bed.kube.clone());
        let params = ListParams::default().fields(&format!("involvedObject.name={node}"));
        let mut events: Vec<NodeEvent> = core
            .list(&params)
            .await
            .expect("list core/v1 Events")
            .items
            .into_iter()
            .map(|event| NodeEvent {
                type_: event.type_.unwrap_or_default(),
                reason: event.reason.unwrap_or_default(),
                message: event.message.unwrap_or_default(),
            })
            .collect();
        let modern: Api<EventsEvent> = Api::all(self.bed.kube.clone());
        let params = ListParams::default().fields(&format!("regarding.name={node}"));
        events.extend(
            modern
                .list(&params)
                .await
                .expect("list events.k8s.io/v1 Events")
                .items
                .into_iter()
                .map(|event| NodeEvent {
                    type_: event.type_.unwrap_or_default(),
                    reason: event.reason.unwrap_or_default(),
                    message: event.note.unwrap_or_default(),
                }),
        );
        events
    }

    /// Waits until some Event about `node` satisfies `matches`; returns all of them.
    pub async fn wait_for_event(
        &self,
        node: &str,
        what: &str,
        matches: impl Fn(&NodeEvent) -> bool,
    ) -> Vec<NodeEvent> {
        let matches = &matches;
        eventually(
            &format!("{what} about Node {node}"),
            Duration::from_secs(20),
            || async move {
                let events = self.events(node).await;
                events.iter().any(matches).then_some(events)
            },
        )
        .await
    }

    // ----- the bed's AWS side -----------------------------------------------------------------

    /// The ASG as moto holds it (`GET /_bed/asgs/NAME`; never subject to injected errors).
    pub async fn asg(&self, name: &str) -> AsgState {
        let value = self
            .bed
            .control(reqwest::Method::GET, &format!("asgs/{name}"), None)
            .await;
        serde_json::from_value(value).expect("an ASG description")
    }

    pub async fn desired(&self, asg: &str) -> i64 {
        self.asg(asg).await.desired
    }

    /// Waits until `asg`'s desired capacity is `desired` and then stays there for `stable`.
    pub async fn assert_desired_settles(&self, asg: &str, desired: i64, why: &str) {
        let state = eventually(
            &format!("{asg} at desired {desired} ({why})"),
            Duration::from_secs(60),
            || async {
                let state = self.asg(asg).await;
                (state.desired == desired).then_some(state)
            },
        )
        .await;
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.asg(asg).await;
            assert_eq!(
                now.desired, desired,
                "{asg} left desired {desired} ({why}); it was {state:?}, now {now:?}"
            );
        }
    }

    /// Every AWS call the bed saw for `action` on `asg`, oldest first.
    pub async fn calls(&self, action: &str, asg: &str) -> Vec<CallRecord> {
        let value = self
            .bed
            .control(
                reqwest::Method::GET,
                &format!("calls?action={action}&asg={asg}"),
                None,
            )
            .await;
        serde_json::from_value(value).expect("the call log is a list of calls")
    }

    /// Instances that left `asg`, oldest first, from the bed's scaling activities ("Terminating EC2
    /// instance: i-…"; the call log names no ASG for TerminateInstanceInAutoScalingGroup).
    pub async fn terminated(&self, asg: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .activities(asg)
            .await
            .iter()
            .filter_map(|a| a.description.strip_prefix("Terminating EC2 instance: "))
            .map(|id| id.split_whitespace().next().unwrap_or_default().to_owned())
            .collect();
        ids.reverse();
        ids
    }

    /// SetDesiredCapacity calls that reached moto (HTTP 200), oldest first.
    pub async fn set_desired_calls(&self, asg: &str) -> Vec<CallRecord> {
        let mut calls = self.calls("SetDesiredCapacity", asg).await;
        calls.retain(|call| call.status == 200);
        calls
    }

    /// Every call the bed saw on `asg` (any action).
    pub async fn all_calls(&self, asg: &str) -> Vec<CallRecord> {
        let value = self
            .bed
            .control(reqwest::Method::GET, &format!("calls?asg={asg}"), None)
            .await;
        serde_json::from_value(value).expect("the call log is a list of calls")
    }

    /// Scaling activities the bed recorded for `asg`, newest first.
    pub async fn activities(&self, asg: &str) -> Vec<ActivityRecord> {
        let value = self
            .bed
            .control(reqwest::Method::GET, &format!("activities?asg={asg}"), None)
            .await;
        serde_json::from_value(value).expect("a list of activities")
    }

    /// Adds an InProgress scaling activity on `asg` that this controller did not start.
    pub async fn start_foreign_activity(&self, asg: &str) -> String {
        let body = json!({
            "asg": asg,
            "status": "InProgress",
            "description": "Launching a new EC2 instance",
            "cause": "At 2026-01-01T00:00:00Z a user request update of AutoScalingGroup constraints.",
            "progress": 30,
        });
        let activity = self
            .bed
            .control(reqwest::Method::POST, "activities", Some(body))
            .await;
        activity["activity_id"]
            .as_str()
            .expect("an activity id")
            .to_owned()
    }

    /// Ends a foreign activity with `status` (Successful, Failed, Cancelled).
    pub async fn finish_foreign_activity(&self, activity_id: &str, status: &str) {
        self.bed
            .control(
                reqwest::Method::PATCH,
                &format!("activities/{activity_id}"),
                Some(json!({"status": status})),
            )
            .await;
    }

    /// Arms a launch failure on `asg` whose Failed activity says `message` (instead of the bed's
    /// capacity wording).
    pub async fn arm_launch_failure(&self, asg: &str, message: &str) {
        let body = json!({"asg": asg, "message": message});
        self.bed
            .control(reqwest::Method::POST, "faults/capacity", Some(body))
            .await;
    }

    /// Clears `asg`'s capacity fault; the answer says which instances launched at once.
    pub async fn clear_capacity_fault(&self, asg: &str) -> Value {
        self.bed
            .control(reqwest::Method::DELETE, &format!("faults/capacity/{asg}"), None)
            .await
    }

    /// The bed's not-Ready fault on `asg`: each new Node of it registers with a kubelet that never
    /// turns Ready (`Ready=False`, KubeletNotReady; the bed holds its Lease, so kwok keeps off).
    pub async fn arm_not_ready(&self, asg: &str) {
        let body = json!({ "asg": asg });
        self.bed
            .control(reqwest::Method::POST, "faults/not-ready", Some(body))
            .await;
    }

    /// Clears `asg`'s not-Ready fault: the Nodes it held post Ready at the bridge's next tick.
    pub async fn clear_not_ready(&self, asg: &str) {
        self.bed
            .control(reqwest::Method::DELETE, &format!("faults/not-ready/{asg}"), None)
            .await;
    }

    /// How often `reason` was reported about `node`: kube's Recorder folds a repeat (same reason, any
    /// note) within minutes into the first Event's `series.count`, so Event objects alone undercount.
    pub async fn event_occurrences(&self, node: &str, reason: &str) -> i32 {
        let api: Api<EventsEvent> = Api::all(self.bed.kube.clone());
        let params = ListParams::default().fields(&format!("regarding.name={node},reason={reason}"));
        api.list(&params)
            .await
            .expect("list events.k8s.io/v1 Events")
            .items
            .iter()
            .map(|event| event.series.as_ref().map_or(1, |series| series.count))
            .sum()
    }

    /// How many errors the bed's rules injected so far, in all.
    pub async fn injected_errors(&self) -> u64 {
        let faults = self.bed.control(reqwest::Method::GET, "faults", None).await;
        faults["errors"]
            .as_array()
            .map(|rules| rules.iter().filter_map(|rule| rule["injected"].as_u64()).sum())
            .unwrap_or(0)
    }

    /// Error rules on AWS calls, `rate` each, for every action (the bed's rules are global: only a
    /// test binary of its own may arm them).
    pub async fn arm_errors(&self, kind: &str, rate: f64, count: u32, seed: u64) {
        self.arm_errors_on(kind, rate, count, seed, None).await;
    }

    /// As [`Scenario::arm_errors`], for the calls named in `actions` only (all when `None`).
    pub async fn arm_errors_on(
        &self,
        kind: &str,
        rate: f64,
        count: u32,
        seed: u64,
        actions: Option<&[&str]>,
    ) {
        let body = json!({"kind": kind, "rate": rate, "count": count, "seed": seed, "actions": actions});
        self.bed
            .control(reqwest::Method::POST, "faults/errors", Some(body))
            .await;
    }
}

impl Drop for Scenario {
    /// Scales this scenario's ASGs to zero and terminates its standalone instances, so their Nodes
    /// go. Runs on a thread of its own, so it also works while a failed test unwinds.
    fn drop(&mut self) {
        if std::env::var_os("E2E_KEEP").is_some() {
            return;
        }
        let asgs = std::mem::take(&mut *self.asgs.lock().unwrap());
        let instances = std::mem::take(&mut *self.instances.lock().unwrap());
        let endpoint = self.bed.aws_endpoint.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let autoscaling = autoscaling_client(&endpoint);
                let http = reqwest::Client::new();
                for asg in &asgs {
                    let _ = autoscaling
                        .update_auto_scaling_group()
                        .auto_scaling_group_name(asg)
                        .min_size(0)
                        .desired_capacity(0)
                        .send()
                        .await;
                    for fault in ["capacity", "not-ready"] {
                        let _ = http
                            .delete(format!("{endpoint}/_bed/faults/{fault}/{asg}"))
                            .send()
                            .await;
                    }
                }
                for instance in &instances {
                    let _ = http
                        .delete(format!("{endpoint}/_bed/instances/{instance}"))
                        .send()
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Connects to the bed, waiting a while if it is being restarted (`.bed/env` briefly missing).
async fn connect_bed() -> Bed {
    let env = std::env::var_os("BED_ENV_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".bed/env"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !env.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Bed::connect().await
}

// ----- what the controller writes on a Node ------------------------------------------------------

pub fn name_of(node: &Node) -> String {
    node.metadata.name.clone().unwrap_or_default()
}

pub fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

pub fn phase_of(node: &Node) -> Option<String> {
    annotation(node, PHASE).map(str::to_owned)
}

pub fn raw_record(node: &Node) -> Option<&str> {
    annotation(node, REPLACEMENT)
}

/// The replacement record, parsed; fails the test if it is there but not the agreed JSON.
pub fn record_of(node: &Node) -> Option<Replacement> {
    let raw = raw_record(node)?;
    let mut record: Replacement = serde_json::from_str(raw).unwrap_or_else(|e| {
        panic!(
            "the replacement record on {} is not the agreed JSON ({e}): {raw}",
            name_of(node)
        )
    });
    record.raw = raw.to_owned();
    Some(record)
}

/// The replacement record of a Node that must have one.
pub fn record(node: &Node) -> Replacement {
    record_of(node).unwrap_or_else(|| {
        panic!(
            "Node {} has no {REPLACEMENT} annotation; phase {:?}",
            name_of(node),
            phase_of(node)
        )
    })
}

pub fn termination_taint(node: &Node) -> Option<&Taint> {
    node.spec
        .as_ref()?
        .taints
        .as_ref()?
        .iter()
        .find(|taint| taint.key == TAINT_KEY)
}

/// The controller's replacement record (the status of its `SpotReplacement`), camelCase JSON.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replacement {
    pub spot_asg: Option<String>,
    pub on_demand_asg: Option<String>,
    pub asg: Option<String>,
    pub capacity_type: Option<String>,
    pub baseline: Option<i64>,
    pub target_desired: Option<i64>,
    pub pre_scale_instances: Option<Vec<String>>,
    #[serde(rename = "replacementInstance")]
    pub instance_id: Option<String>,
    #[serde(rename = "replacementNode")]
    pub node: Option<String>,
    pub detected_at: Option<String>,
    pub scale_requested_at: Option<String>,
    pub ready_at: Option<String>,
    pub tainted_at: Option<String>,
    pub reason: Option<String>,
    /// The annotation as written, for failure messages.
    #[serde(skip)]
    pub raw: String,
}

/// One Event about a Node, from either Events API.
#[derive(Debug, Clone)]
pub struct NodeEvent {
    pub type_: String,
    pub reason: String,
    pub message: String,
}

// ----- the bed's AWS side ------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
pub struct AsgState {
    pub name: String,
    pub desired: i64,
    pub min: i64,
    pub max: i64,
    pub capacity_fault: bool,
    pub tags: BTreeMap<String, String>,
    pub instances: Vec<AsgInstance>,
}

impl AsgState {
    /// Ids of the InService instances.
    pub fn in_service(&self) -> BTreeSet<String> {
        self.instances
            .iter()
            .filter(|instance| instance.lifecycle_state == "InService")
            .map(|instance| instance.id.clone())
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AsgInstance {
    pub id: String,
    pub lifecycle_state: String,
}

/// One AWS call as the bed logged it.
#[derive(Debug, Clone, Deserialize)]
pub struct CallRecord {
    pub seq: u64,
    pub time: String,
    pub action: String,
    pub asg: Option<String>,
    pub desired_capacity: Option<i64>,
    pub status: u16,
    pub injected_error: Option<String>,
}

/// One scaling activity as the bed recorded it.
#[derive(Debug, Clone, Deserialize)]
pub struct ActivityRecord {
    pub activity_id: String,
    pub start_time: Option<String>,
    pub description: String,
    pub status: String,
    pub status_message: Option<String>,
}

// ----- the order invariant, checked at every change ----------------------------------------------

/// Watches the Nodes matching a label selector from before the notice on, and checks after every
/// change it sees (watch events arrive in resourceVersion order, so each check sees the cluster as
/// it was at that moment): a Node carrying the termination taint without an interruption notice
/// names a claimed replacement in its record, and that replacement's Node is there and Ready.
pub struct TaintOrderWatch {
    state: Arc<Mutex<WatchState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct WatchState {
    nodes: BTreeMap<String, Node>,
    /// The controller's records, by instance id.
    records: BTreeMap<String, Value>,
    synced: bool,
    observations: u64,
    /// Nodes seen tainted, with the observation number of the first time.
    tainted: BTreeMap<String, u64>,
    /// Nodes seen tainted whose record did not name a replacement yet (the record and the Node are
    /// two watches: the record written before the taint may arrive after it), with the Ready Nodes
    /// at that moment.
    pending: BTreeMap<String, ReadyAt>,
    violations: Vec<String>,
}

/// The Ready Nodes (names and instances) at one observation.
#[derive(Debug, Clone)]
struct ReadyAt {
    observation: u64,
    version: String,
    names: BTreeSet<String>,
    instances: BTreeSet<String>,
}

impl TaintOrderWatch {
    /// Starts watching Nodes labelled `eks.amazonaws.com/nodegroup` in `asgs`, and the records;
    /// returns once both initial lists are in.
    pub async fn start(bed: &Bed, asgs: &[&str]) -> Self {
        let selector = format!("{NODEGROUP_LABEL} in ({})", asgs.join(","));
        let state = Arc::new(Mutex::new(WatchState::default()));
        let nodes: Api<Node> = bed.nodes();
        let records: Api<DynamicObject> = records_api(bed);
        let watched = state.clone();
        let task = tokio::spawn(async move {
            enum Seen {
                Node(Box<watcher::Event<Node>>),
                Record(Box<watcher::Event<DynamicObject>>),
            }
            let node_events = watcher(nodes, watcher::Config::default().labels(&selector))
                .map(|e| e.map(|event| Seen::Node(Box::new(event))));
            let record_events = watcher(records, watcher::Config::default())
                .map(|e| e.map(|event| Seen::Record(Box::new(event))));
            let mut events = futures::stream::select(node_events, record_events).boxed();
            let (mut nodes_synced, mut records_synced) = (false, false);
            while let Some(event) = events.next().await {
                let Ok(event) = event else { continue };
                let mut state = watched.lock().unwrap();
                match event {
                    Seen::Node(event) => match *event {
                        watcher::Event::Init => state.nodes.clear(),
                        watcher::Event::InitApply(node) | watcher::Event::Apply(node) => {
                            state.nodes.insert(name_of(&node), node);
                        }
                        watcher::Event::Delete(node) => {
                            state.nodes.remove(&name_of(&node));
                        }
                        watcher::Event::InitDone => nodes_synced = true,
                    },
                    Seen::Record(event) => match *event {
                        watcher::Event::InitApply(record) | watcher::Event::Apply(record) => {
                            let name = record.metadata.name.clone().unwrap_or_default();
                            state.records.insert(name, record.data.clone());
                        }
                        watcher::Event::InitDone => records_synced = true,
                        _ => {}
                    },
                }
                state.synced = nodes_synced && records_synced;
                if state.synced {
                    state.check();
                }
            }
        });
        let watch = TaintOrderWatch { state, task };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !watch.state.lock().unwrap().synced {
            assert!(
                Instant::now() < deadline,
                "the Node watch did not sync within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        watch
    }

    /// Every time a Node was seen tainted without its claimed replacement Ready (empty is good),
    /// including a tainted Node whose record never named a replacement.
    pub fn violations(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        let mut violations = state.violations.clone();
        violations.extend(state.pending.iter().map(|(name, at)| {
            format!(
                "observation {} (Node {name} at resourceVersion {}): tainted, and its record names no replacement",
                at.observation, at.version
            )
        }));
        violations
    }

    /// Nodes seen tainted so far.
    pub fn tainted(&self) -> BTreeSet<String> {
        self.state.lock().unwrap().tainted.keys().cloned().collect()
    }

    /// How many states of the watched Nodes were checked.
    pub fn observations(&self) -> u64 {
        self.state.lock().unwrap().observations
    }

    /// Asserts the invariant held at every observation so far.
    pub fn assert_never_tainted_before_replacement_ready(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "a Node was tainted before its claimed replacement was Ready:\n{}",
            violations.join("\n")
        );
    }
}

impl WatchState {
    /// Judges each Node the first time it is seen tainted (without an interruption notice): its
    /// record's claimed replacement must have been Ready then. A record that names no replacement
    /// yet is judged when it does, against the Ready Nodes of that moment.
    fn check(&mut self) {
        self.observations += 1;
        let observation = self.observations;
        let ready = ReadyAt {
            observation,
            version: String::new(),
            names: self.nodes.values().filter(|n| is_ready(n)).map(name_of).collect(),
            instances: self
                .nodes
                .values()
                .filter(|n| is_ready(n))
                .filter_map(instance_id)
                .collect(),
        };
        let newly_tainted: Vec<(String, String)> = self
            .nodes
            .iter()
            .filter(|(name, node)| termination_taint(node).is_some() && !self.tainted.contains_key(*name))
            .map(|(name, node)| {
                (
                    name.clone(),
                    node.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect();
        for (name, version) in newly_tainted {
            self.tainted.insert(name.clone(), observation);
            if annotation(&self.nodes[&name], INTERRUPTION_TIME).is_some() {
                continue;
            }
            self.pending.insert(
                name,
                ReadyAt {
                    version,
                    ..ready.clone()
                },
            );
        }
        let judged: Vec<(String, Option<String>)> = self
            .pending
            .iter()
            .filter_map(|(name, at)| {
                let instance = self.nodes.get(name).and_then(instance_id)?;
                let record = self.records.get(&instance)?;
                let status = &record["status"];
                let (claimed_node, claimed_instance) =
                    (status["replacementNode"].as_str(), status["replacementInstance"].as_str());
                if claimed_node.is_none() && claimed_instance.is_none() {
                    return None;
                }
                let was_ready = claimed_node.is_some_and(|n| at.names.contains(n))
                    || claimed_instance.is_some_and(|i| at.instances.contains(i));
                let problem = (!was_ready).then(|| {
                    format!(
                        "observation {} (Node {name} at resourceVersion {}): tainted, its claimed replacement \
                         {claimed_node:?}/{claimed_instance:?} was not Ready; record {status}",
                        at.observation, at.version
                    )
                });
                Some((name.clone(), problem))
            })
            .collect();
        for (name, problem) in judged {
            self.pending.remove(&name);
            self.violations.extend(problem);
        }
    }
}

/// The records (`SpotReplacement`) in the controller's namespace, untyped: the tests pin the JSON.
pub fn records_api(bed: &Bed) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "spot-rebalancer.io".into(),
        version: "v1alpha1".into(),
        api_version: "spot-rebalancer.io/v1alpha1".into(),
        kind: "SpotReplacement".into(),
        plural: "spotreplacements".into(),
    };
    Api::namespaced_with(bed.kube.clone(), identity::NAMESPACE, &resource)
}

impl Drop for TaintOrderWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
