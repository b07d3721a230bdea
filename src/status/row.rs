//! One opted-in Node as an operator sees it: its instance, node group, phase, replacement, taint,
//! readiness and what went wrong. Read from the Node (the agent's notice annotations, labels, taints,
//! conditions) and the controller's `SpotReplacement` record of it (phase and replacement); a
//! malformed annotation becomes a problem on the row.
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use serde::Serialize;

use crate::{
    contract::{
        SpotReplacement, keys,
        record::{Phase, Replacement},
    },
    node,
};

/// What the row shows in its PHASE column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No notice and no record: nothing is happening to this node.
    Quiet,
    /// A notice is on the node but the controller has not written a record yet.
    Noticed,
    /// The controller's phase.
    Phase(Phase),
}

impl State {
    pub fn label(&self) -> String {
        match self {
            State::Quiet => "-".to_owned(),
            State::Noticed => "Noticed".to_owned(),
            State::Phase(phase) => phase.to_string(),
        }
    }
}

/// Which labels and taint the rows are read with (the controller's settings).
#[derive(Debug, Clone)]
pub struct Keys {
    pub nodegroup_label: String,
    pub taint_key: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            nodegroup_label: keys::DEFAULT_NODEGROUP_LABEL.to_owned(),
            taint_key: keys::DEFAULT_TAINT_KEY.to_owned(),
        }
    }
}

/// The controller's replacement record of the node, if it has one.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordCell {
    Absent,
    Read(Box<Replacement>),
}

/// Whether a node has its agent: a pod of the agent DaemonSet on it, and whether that pod is Ready
/// (it knows its instance and has read its Node, so it polls IMDS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Agent {
    /// Not looked up (the pods could not be listed, or `--watch`).
    #[default]
    Unknown,
    Ready,
    NotReady,
    /// No agent pod on the node: a notice there would go unseen.
    Missing,
}

impl Agent {
    pub fn label(self) -> &'static str {
        match self {
            Agent::Unknown => "?",
            Agent::Ready => "yes",
            Agent::NotReady => "not-ready",
            Agent::Missing => "none",
        }
    }
}

/// One Node's status.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub node: String,
    /// From `spec.providerID`, else the agent's `instance-id` annotation.
    pub instance: Option<String>,
    pub nodegroup: Option<String>,
    pub state: State,
    pub record: RecordCell,
    /// Effect of the termination taint, when the node carries it.
    pub taint_effect: Option<String>,
    pub ready: bool,
    /// When the rebalance recommendation came (the agent's annotation).
    pub noticed_at: Option<Timestamp>,
    /// When the spot instance is to be interrupted (the agent's annotation).
    pub interruption_at: Option<Timestamp>,
    /// Annotations that could not be read, each saying which and why.
    pub problems: Vec<String>,
    /// The node's agent, once looked up among the pods.
    pub agent: Agent,
}

impl Row {
    /// Reads a Node and the controller's record of it (its `SpotReplacement`, if any); never fails:
    /// what cannot be read is a problem on the row.
    pub fn from_node(node: &Node, record: Option<&SpotReplacement>, keys: &Keys) -> Row {
        let annotations = node::annotations(node);
        let mut problems = Vec::new();
        let mut time = |key: &str| {
            let text = annotations.get(key)?;
            text.parse::<Timestamp>()
                .map_err(|_| problems.push(format!("{key} {text:?} is not an RFC 3339 time")))
                .ok()
        };
        let noticed_at = time(keys::REBALANCE_NOTICE_TIME);
        let interruption_at = time(keys::INTERRUPTION_TIME);
        let noticed = annotations.contains_key(keys::REBALANCE_NOTICE_TIME)
            || annotations.contains_key(keys::INTERRUPTION_TIME);

        let status = record.and_then(|record| record.status.as_ref());
        let (state, record) = match status {
            Some(status) => (
                State::Phase(status.phase),
                RecordCell::Read(Box::new(status.record.clone())),
            ),
            None if noticed => (State::Noticed, RecordCell::Absent),
            None => (State::Quiet, RecordCell::Absent),
        };

        let instance = node::instance_id(node)
            .map(str::to_owned)
            .or_else(|| annotations.get(keys::INSTANCE_ID).cloned());
        Row {
            node: node.name_any(),
            instance,
            nodegroup: node::labels(node).get(&keys.nodegroup_label).cloned(),
            state,
            record,
            taint_effect: node::taints(node)
                .iter()
                .find(|taint| taint.key == keys.taint_key)
                .map(|taint| taint.effect.clone()),
            ready: node::is_ready(node),
            noticed_at,
            interruption_at,
            problems,
            agent: Agent::Unknown,
        }
    }

    /// Anything to report: a notice, a record, or an annotation that cannot be read.
    pub fn is_active(&self) -> bool {
        self.state != State::Quiet || self.record != RecordCell::Absent || !self.problems.is_empty()
    }

    pub fn replacement(&self) -> Option<&Replacement> {
        match &self.record {
            RecordCell::Read(record) => Some(record),
            _ => None,
        }
    }

    /// The claimed replacement: its Node, else its instance.
    pub fn replacement_cell(&self) -> String {
        match &self.record {
            RecordCell::Absent => "-".to_owned(),
            RecordCell::Read(record) => record
                .node
                .clone()
                .or_else(|| record.instance_id.clone())
                .unwrap_or_else(|| "-".to_owned()),
        }
    }

    /// Since when this node is in trouble: the rebalance notice, else the controller's detection.
    pub fn since(&self) -> Option<Timestamp> {
        self.noticed_at
            .or_else(|| self.replacement().map(|record| record.detected_at))
    }

    /// The record's reason when the node is Failed or Skipped, then every problem reading it.
    pub fn reason(&self) -> Option<String> {
        let terminal = matches!(self.state, State::Phase(Phase::Failed | Phase::Skipped));
        let reason = self
            .replacement()
            .and_then(|record| record.reason.clone())
            .filter(|_| terminal);
        let parts: Vec<String> = reason.into_iter().chain(self.problems.iter().cloned()).collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// The row as `-o json` prints it.
    pub fn to_json(&self, now: Timestamp) -> JsonRow<'_> {
        let record = self.replacement();
        JsonRow {
            node: &self.node,
            instance: self.instance.as_deref(),
            nodegroup: self.nodegroup.as_deref(),
            phase: self.state.label(),
            replacement_node: record.and_then(|r| r.node.as_deref()),
            replacement_instance: record.and_then(|r| r.instance_id.as_deref()),
            taint_effect: self.taint_effect.as_deref(),
            ready: self.ready,
            agent: self.agent.label(),
            since: self.since(),
            age_seconds: self
                .since()
                .map(|since| now.duration_since(since).as_secs().max(0)),
            notice_time: self.noticed_at,
            interruption_time: self.interruption_at,
            reason: self.reason(),
            record,
        }
    }
}

/// One row of `-o json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JsonRow<'a> {
    pub node: &'a str,
    pub instance: Option<&'a str>,
    pub nodegroup: Option<&'a str>,
    pub phase: String,
    pub replacement_node: Option<&'a str>,
    pub replacement_instance: Option<&'a str>,
    pub taint_effect: Option<&'a str>,
    pub ready: bool,
    /// `yes`, `not-ready`, `none` or `?` (not looked up).
    pub agent: &'static str,
    pub since: Option<Timestamp>,
    pub age_seconds: Option<i64>,
    pub notice_time: Option<Timestamp>,
    pub interruption_time: Option<Timestamp>,
    pub reason: Option<String>,
    /// The controller's whole record, as in the status of its `SpotReplacement`.
    pub record: Option<&'a Replacement>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A Node from its name, labels, annotations and termination-taint effect; Ready unless `ready`
    /// is false.
    pub fn node(name: &str, annotations: Value, taint: Option<&str>, ready: bool) -> Node {
        let taints: Vec<Value> = taint
            .map(|effect| json!({"key": keys::DEFAULT_TAINT_KEY, "value": "true", "effect": effect}))
            .into_iter()
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations,
                         "labels": {keys::DEFAULT_NODEGROUP_LABEL: "spot-a", keys::ENABLED_LABEL: "true"}},
            "spec": {"providerID": "aws:///us-east-1a/i-0old", "taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .unwrap()
    }

    /// The controller's record of `node` in `phase`: `spotAsg` spot-a, detected at 10:00:01, plus
    /// the status fields in `extra` (camelCase, as the API server holds them).
    pub fn record(node: &str, phase: &str, extra: Value) -> SpotReplacement {
        let mut status = json!({"phase": phase, "spotAsg": "spot-a", "detectedAt": "2026-11-25T10:00:01Z"});
        for (key, value) in extra.as_object().unwrap() {
            status[key] = value.clone();
        }
        serde_json::from_value(json!({
            "apiVersion": "spot-rebalancer.io/v1alpha1", "kind": "SpotReplacement",
            "metadata": {"name": "i-0old0000", "namespace": "spot-rebalancer"},
            "spec": {"nodeName": node, "nodeUid": format!("uid-{node}"), "instanceId": "i-0old0000"},
            "status": status,
        }))
        .unwrap()
    }

    fn row(annotations: Value) -> Row {
        Row::from_node(&node("n1", annotations, None, true), None, &Keys::default())
    }

    fn row_with(phase: &str, extra: Value) -> Row {
        let record = record("n1", phase, extra);
        Row::from_node(
            &node("n1", json!({}), None, true),
            Some(&record),
            &Keys::default(),
        )
    }

    #[test]
    fn a_node_without_notice_or_record_is_quiet() {
        let row = row(json!({}));
        assert_eq!(row.state, State::Quiet);
        assert!(!row.is_active());
        assert_eq!(row.instance.as_deref(), Some("i-0old"));
        assert_eq!(row.nodegroup.as_deref(), Some("spot-a"));
        assert_eq!(row.since(), None);
    }

    #[test]
    fn a_notice_without_a_record_is_noticed_since_the_notice() {
        let row = row(json!({keys::REBALANCE_NOTICE_TIME: "2026-11-25T10:00:00Z"}));
        assert_eq!(row.state, State::Noticed);
        assert!(row.is_active());
        assert_eq!(row.since(), Some("2026-11-25T10:00:00Z".parse().unwrap()));
        assert_eq!(row.replacement_cell(), "-");
    }

    #[test]
    fn the_replacement_is_its_node_else_its_instance() {
        let claimed = row_with("AwaitingReady", json!({"replacementInstance": "i-0new"}));
        assert_eq!(claimed.replacement_cell(), "i-0new");
        let named = row_with(
            "Tainted",
            json!({"replacementInstance": "i-0new", "replacementNode": "ip-10-0-0-9"}),
        );
        assert_eq!(named.replacement_cell(), "ip-10-0-0-9");
        assert_eq!(named.state, State::Phase(Phase::Tainted));
        assert_eq!(
            named.since(),
            Some("2026-11-25T10:00:01Z".parse().unwrap()),
            "no notice: since detection"
        );
    }

    #[test]
    fn the_reason_shows_only_when_failed_or_skipped() {
        let failed = row_with("Failed", json!({"reason": "no capacity anywhere"}));
        assert_eq!(failed.reason().as_deref(), Some("no capacity anywhere"));
        let scaling = row_with("ScalingSpot", json!({"reason": "left over"}));
        assert_eq!(scaling.reason(), None);
    }

    #[test]
    fn phase_annotations_on_the_node_count_for_nothing() {
        let row = row(json!({"spot-rebalancer.io/phase": "Tainted",
                             "spot-rebalancer.io/replacement": "{\"spotAsg\": \"x\"}"}));
        assert_eq!(row.state, State::Quiet);
        assert_eq!(row.record, RecordCell::Absent);
    }

    #[test]
    fn a_bad_notice_time_is_a_problem() {
        let row = row(json!({keys::REBALANCE_NOTICE_TIME: "yesterday"}));
        assert_eq!(row.state, State::Noticed);
        assert_eq!(row.noticed_at, None);
        assert!(
            row.reason()
                .unwrap()
                .contains("\"yesterday\" is not an RFC 3339 time")
        );
    }

    #[test]
    fn taint_and_readiness_come_from_the_node() {
        let node = node("n1", json!({}), Some("NoExecute"), false);
        let row = Row::from_node(&node, None, &Keys::default());
        assert_eq!(row.taint_effect.as_deref(), Some("NoExecute"));
        assert!(!row.ready);
    }

    #[test]
    fn without_a_provider_id_the_instance_is_the_agents() {
        let mut node = node("n1", json!({keys::INSTANCE_ID: "i-0agent"}), None, true);
        node.spec.as_mut().unwrap().provider_id = None;
        let row = Row::from_node(&node, None, &Keys::default());
        assert_eq!(row.instance.as_deref(), Some("i-0agent"));
    }
}
