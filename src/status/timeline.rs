//! `status --watch`: a noticed node's story as steps (notice, detection, each scale-up, the claimed
//! replacement, its Ready, the taint, the drain, the retirement, a terminal phase), read from the
//! node's notice annotations and its `SpotReplacement` record, and dated by the record's own timestamps. The watch prints each step once, with the time since the notice.
use std::collections::{BTreeSet, HashMap};

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::row::{RecordCell, Row, State};
use crate::contract::record::{CapacityType, DrainTrigger, Phase, ScaleIntent, Undo};

/// One thing that happened to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Identifies the step, so a watch prints it once.
    pub key: String,
    /// When it happened, if the node says; else it is dated when first seen.
    pub at: Option<Timestamp>,
    /// The node's phase once this step happened.
    pub phase: String,
    pub text: String,
}

impl Step {
    fn new(key: impl Into<String>, at: Option<Timestamp>, phase: impl ToString, text: String) -> Self {
        Step {
            key: key.into(),
            at,
            phase: phase.to_string(),
            text,
        }
    }
}

/// Every step the row tells of, dated ones in time order first, then the undated ones.
pub fn steps(row: &Row) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(at) = row.noticed_at {
        let instance = row.instance.as_deref().unwrap_or("unknown instance");
        steps.push(Step::new(
            "notice",
            Some(at),
            "Noticed",
            format!("rebalance recommendation for {instance} (agent)"),
        ));
    }
    if let Some(at) = row.interruption_at {
        steps.push(Step::new(
            "interruption",
            None,
            "Noticed",
            format!("spot interruption notice: the instance stops at {at}"),
        ));
    }
    if let RecordCell::Read(record) = &row.record {
        let fallback = record.on_demand_asg.as_deref().unwrap_or("none");
        steps.push(Step::new(
            "detected",
            Some(record.detected_at),
            Phase::Detected,
            // A node skipped before its ASG was known (no ASG, an ASG not opted in) has none to name.
            if record.spot_asg.is_empty() {
                "controller looked at it".to_owned()
            } else {
                format!(
                    "controller took it: spot ASG {}, on-demand fallback {fallback}",
                    record.spot_asg
                )
            },
        ));
        for (index, abandoned) in record.abandoned.iter().enumerate() {
            steps.push(scale_step(index, &abandoned.scale));
            let undo = match &abandoned.undo {
                Undo::Lower { from, to } => format!("lower desired {from} → {to}"),
                Undo::Terminate { instance } => format!("terminate the late {instance}"),
                Undo::Leave { reason } => format!("leave it: {reason}"),
            };
            steps.push(Step::new(
                format!("abandoned-{index}"),
                None,
                scaling_phase(abandoned.scale.capacity_type),
                format!(
                    "no capacity on {}; taking the +1 back ({undo})",
                    abandoned.scale.asg
                ),
            ));
        }
        if let Some(scale) = &record.scale {
            steps.push(scale_step(record.abandoned.len(), scale));
        }
        if let Some(since) = record.waiting_since {
            steps.push(Step::new(
                "waiting",
                Some(since),
                Phase::Detected,
                "waiting for a scaling activity this controller did not start".to_owned(),
            ));
        }
        if let Some(instance) = &record.instance_id {
            let node = record.node.as_deref().map(|node| format!(" (node {node})"));
            steps.push(Step::new(
                "claimed",
                record.claimed_at,
                Phase::AwaitingReady,
                format!(
                    "replacement instance {instance}{} claimed",
                    node.unwrap_or_default()
                ),
            ));
        }
        if let Some(at) = record.ready_at {
            let name = record.node.as_deref().unwrap_or("the replacement");
            steps.push(Step::new(
                "ready",
                Some(at),
                Phase::AwaitingReady,
                format!("replacement node {name} Ready"),
            ));
        }
        if let Some(at) = record.tainted_at {
            let effect = row.taint_effect.as_deref().unwrap_or("taint");
            steps.push(Step::new(
                "tainted",
                Some(at),
                Phase::Tainted,
                format!("tainted ({effect})"),
            ));
        }
        if let Some(drain) = &record.drain {
            let why = match drain.trigger {
                DrainTrigger::Requested => "the webhook asked for it",
                DrainTrigger::Interruption => "interruption notice",
                DrainTrigger::AfterTaint => "replacement Ready",
            };
            steps.push(Step::new(
                "drain-started",
                Some(drain.started_at),
                Phase::Draining,
                format!("drain started ({why}): evictions at the pace of the PodDisruptionBudgets"),
            ));
            if let Some(at) = drain.timed_out_at {
                steps.push(Step::new(
                    "drain-timed-out",
                    Some(at),
                    Phase::Draining,
                    "drain past its timeout: evictions go on, nothing is forced".to_owned(),
                ));
            }
            if let Some(at) = drain.completed_at {
                steps.push(Step::new(
                    "drained",
                    Some(at),
                    Phase::Draining,
                    "drained: no workload pod left".to_owned(),
                ));
            }
        }
        if let Some(at) = record.retired_at {
            let instance = row.instance.as_deref().unwrap_or("its instance");
            let asg = record.instance_asg.as_deref().unwrap_or(&record.spot_asg);
            steps.push(Step::new(
                "retired",
                Some(at),
                Phase::Retired,
                format!("retired: {instance} left {asg} with a decrement"),
            ));
        }
    }
    // A phase no step above stands for (Failed, Skipped, a malformed record, phases to come) gets a
    // step of its own, with the reason.
    let phase = row.state.label();
    if !matches!(row.state, State::Quiet | State::Noticed) && !steps.iter().any(|step| step.phase == phase) {
        let text = row.reason().unwrap_or_else(|| format!("phase {phase}"));
        steps.push(Step::new(format!("phase-{phase}"), None, phase, text));
    }
    let (mut dated, undated): (Vec<Step>, Vec<Step>) = steps.into_iter().partition(|s| s.at.is_some());
    dated.sort_by_key(|step| step.at);
    dated.extend(undated);
    dated
}

fn scaling_phase(capacity: CapacityType) -> Phase {
    match capacity {
        CapacityType::Spot => Phase::ScalingSpot,
        CapacityType::OnDemand => Phase::ScalingOnDemand,
    }
}

fn scale_step(index: usize, scale: &ScaleIntent) -> Step {
    let kind = match scale.capacity_type {
        CapacityType::Spot => "spot",
        CapacityType::OnDemand => "on-demand",
    };
    Step::new(
        format!("scale-{index}"),
        Some(scale.scale_requested_at),
        scaling_phase(scale.capacity_type),
        format!(
            "{kind} scale-up sent: {} desired {} → {}",
            scale.asg, scale.baseline, scale.target_desired
        ),
    )
}

/// One printed line of the watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    pub at: Timestamp,
    /// Since the node's notice (or, without one, its detection or the first step seen).
    pub elapsed_ms: i64,
    pub node: String,
    pub phase: String,
    pub text: String,
}

impl Line {
    /// `10:00:04.120  +4.12s  NODE  PHASE  TEXT`, columns padded for the usual names.
    pub fn to_text(&self) -> String {
        let time = self.at.strftime("%H:%M:%S%.3f");
        let elapsed = SignedDuration::from_millis(self.elapsed_ms).as_secs_f64();
        format!(
            "{time}  {:>+8.2}s  {:<28}  {:<15}  {}",
            elapsed, self.node, self.phase, self.text
        )
    }
}

/// What a watch has printed so far, per node.
#[derive(Debug, Default)]
pub struct Watch {
    printed: HashMap<String, BTreeSet<String>>,
    /// Per node, the time elapsed is counted from.
    origin: HashMap<String, Timestamp>,
}

impl Watch {
    /// The lines for steps of `row` not printed yet; undated steps are dated `now`.
    pub fn update(&mut self, row: &Row, now: Timestamp) -> Vec<Line> {
        let steps = steps(row);
        let Some(first) = steps.first() else {
            return Vec::new();
        };
        let origin = *self
            .origin
            .entry(row.node.clone())
            .or_insert_with(|| row.since().or(first.at).unwrap_or(now));
        let printed = self.printed.entry(row.node.clone()).or_default();
        steps
            .into_iter()
            .filter(|step| printed.insert(step.key.clone()))
            .map(|step| {
                let at = step.at.unwrap_or(now);
                Line {
                    at,
                    elapsed_ms: at.duration_since(origin).as_millis() as i64,
                    node: row.node.clone(),
                    phase: step.phase,
                    text: step.text,
                }
            })
            .collect()
    }

    /// The line for a node deleted while watched (none for a node never printed).
    pub fn deleted(&mut self, node: &str, now: Timestamp) -> Option<Line> {
        self.printed.remove(node)?;
        let origin = self.origin.remove(node).unwrap_or(now);
        Some(Line {
            at: now,
            elapsed_ms: now.duration_since(origin).as_millis() as i64,
            node: node.to_owned(),
            phase: "-".to_owned(),
            text: "Node deleted".to_owned(),
        })
    }
}

/// Whether a watch told to stop at `until` phases is done: some node is noticed (or a noticed node
/// was deleted: `any_gone`, a retired node's instance is gone), and every noticed node left is in
/// one of them.
pub fn settled<'a>(rows: impl IntoIterator<Item = &'a Row>, until: &[Phase], any_gone: bool) -> bool {
    let mut any = any_gone;
    for row in rows.into_iter().filter(|row| row.is_active()) {
        any = true;
        match row.state {
            State::Phase(phase) if until.contains(&phase) => {}
            _ => return false,
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::super::row::{
        Keys,
        tests::{node, record},
    };
    use super::*;
    use crate::contract::keys;
    use serde_json::{Value, json};

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn row_of(annotations: Value, taint: Option<&str>) -> Row {
        Row::from_node(&node("n1", annotations, taint, true), None, &Keys::default())
    }

    /// A row of `n1` with its record in `phase` (status fields `status`).
    fn recorded(annotations: Value, phase: &str, status: Value, taint: Option<&str>) -> Row {
        let record = record("n1", phase, status);
        Row::from_node(
            &node("n1", annotations, taint, true),
            Some(&record),
            &Keys::default(),
        )
    }

    const NOTICE: &str = "2026-11-25T10:00:00Z";

    fn scaling() -> Value {
        json!({"asg": "spot-a", "capacityType": "spot", "baseline": 2, "targetDesired": 3,
               "preScaleInstances": ["i-0old"], "scaleRequestedAt": "2026-11-25T10:00:01.5Z"})
    }

    fn with(mut base: Value, extra: Value) -> Value {
        for (key, value) in extra.as_object().unwrap() {
            base[key] = value.clone();
        }
        base
    }

    #[test]
    fn the_whole_flow_reads_in_order_with_times_since_the_notice() {
        let record = with(
            scaling(),
            json!({"onDemandAsg": "od-a", "replacementInstance": "i-0new", "replacementNode": "n9",
                   "claimedAt": "2026-11-25T10:00:05Z", "readyAt": "2026-11-25T10:00:07Z",
                   "taintedAt": "2026-11-25T10:00:07.25Z"}),
        );
        let row = recorded(
            json!({keys::REBALANCE_NOTICE_TIME: NOTICE}),
            "Tainted",
            record,
            Some("NoSchedule"),
        );
        let lines = Watch::default().update(&row, at("2026-11-25T10:00:08Z"));
        let summary: Vec<(i64, &str, &str)> = lines
            .iter()
            .map(|line| (line.elapsed_ms, line.phase.as_str(), line.text.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (0, "Noticed", "rebalance recommendation for i-0old (agent)"),
                (
                    1000,
                    "Detected",
                    "controller took it: spot ASG spot-a, on-demand fallback od-a"
                ),
                (1500, "ScalingSpot", "spot scale-up sent: spot-a desired 2 → 3"),
                (
                    5000,
                    "AwaitingReady",
                    "replacement instance i-0new (node n9) claimed"
                ),
                (7000, "AwaitingReady", "replacement node n9 Ready"),
                (7250, "Tainted", "tainted (NoSchedule)"),
            ]
        );
        assert_eq!(
            lines[5].to_text(),
            "10:00:07.250     +7.25s  n1                            Tainted          tainted (NoSchedule)"
        );
    }

    #[test]
    fn the_end_of_life_follows_the_taint() {
        let record = with(
            scaling(),
            json!({"replacementInstance": "i-0new", "claimedAt": "2026-11-25T10:00:05Z", "taintedAt": "2026-11-25T10:00:07Z",
                   "instanceAsg": "spot-a",
                   "drain": {"trigger": "interruption", "startedAt": "2026-11-25T10:00:20Z",
                             "completedAt": "2026-11-25T10:00:24.5Z"},
                   "retiredAt": "2026-11-25T10:00:25Z"}),
        );
        let row = recorded(
            json!({keys::REBALANCE_NOTICE_TIME: NOTICE}),
            "Retired",
            record,
            Some("NoSchedule"),
        );
        let lines = Watch::default().update(&row, at("2026-11-25T10:00:26Z"));
        let tail: Vec<(i64, &str, &str)> = lines
            .iter()
            .skip_while(|line| line.phase != "Draining")
            .map(|line| (line.elapsed_ms, line.phase.as_str(), line.text.as_str()))
            .collect();
        assert_eq!(
            tail,
            [
                (
                    20000,
                    "Draining",
                    "drain started (interruption notice): evictions at the pace of the PodDisruptionBudgets"
                ),
                (24500, "Draining", "drained: no workload pod left"),
                (25000, "Retired", "retired: i-0old left spot-a with a decrement"),
            ]
        );
    }

    #[test]
    fn a_line_in_json_names_its_fields() {
        let row = row_of(json!({keys::REBALANCE_NOTICE_TIME: NOTICE}), None);
        let line = Watch::default().update(&row, at(NOTICE)).remove(0);
        let value = serde_json::to_value(&line).unwrap();
        assert_eq!(
            value,
            json!({"at": NOTICE, "elapsedMs": 0, "node": "n1", "phase": "Noticed",
                   "text": "rebalance recommendation for i-0old (agent)"})
        );
    }

    #[test]
    fn a_watch_prints_each_step_once_as_the_node_moves_on() {
        let mut watch = Watch::default();
        let noticed = row_of(json!({keys::REBALANCE_NOTICE_TIME: NOTICE}), None);
        let first = watch.update(&noticed, at("2026-11-25T10:00:01Z"));
        assert_eq!(first.len(), 1);
        assert!(watch.update(&noticed, at("2026-11-25T10:00:02Z")).is_empty());
        let scaling = recorded(
            json!({keys::REBALANCE_NOTICE_TIME: NOTICE}),
            "ScalingSpot",
            scaling(),
            None,
        );
        let next: Vec<String> = watch
            .update(&scaling, at("2026-11-25T10:00:03Z"))
            .into_iter()
            .map(|line| line.phase)
            .collect();
        assert_eq!(next, ["Detected", "ScalingSpot"]);
        let gone = watch.deleted("n1", at("2026-11-25T10:00:09Z")).unwrap();
        assert_eq!((gone.elapsed_ms, gone.text.as_str()), (9000, "Node deleted"));
        assert_eq!(watch.deleted("never-seen", at("2026-11-25T10:00:09Z")), None);
    }

    #[test]
    fn a_fallback_shows_both_scale_ups_and_the_undo() {
        let record = json!({"onDemandAsg": "od-a",
            "asg": "od-a", "capacityType": "on-demand", "baseline": 1, "targetDesired": 2,
            "preScaleInstances": [], "scaleRequestedAt": "2026-11-25T10:02:05Z",
            "abandoned": [with(scaling(), json!({"undo": {"kind": "lower", "from": 3, "to": 2}, "undone": true}))]});
        let row = recorded(json!({}), "ScalingOnDemand", record, None);
        let texts: Vec<String> = steps(&row).into_iter().map(|step| step.text).collect();
        assert_eq!(
            texts,
            [
                "controller took it: spot ASG spot-a, on-demand fallback od-a",
                "spot scale-up sent: spot-a desired 2 → 3",
                "on-demand scale-up sent: od-a desired 1 → 2",
                "no capacity on spot-a; taking the +1 back (lower desired 3 → 2)",
            ]
        );
    }

    #[test]
    fn a_terminal_phase_shows_its_reason() {
        let row = recorded(
            json!({keys::REBALANCE_NOTICE_TIME: NOTICE}),
            "Skipped",
            json!({"reason": "i-0old is in no ASG"}),
            None,
        );
        let last = steps(&row).pop().unwrap();
        assert_eq!(
            (last.phase.as_str(), last.text.as_str(), last.at),
            ("Skipped", "i-0old is in no ASG", None)
        );
    }

    #[test]
    fn a_node_skipped_before_its_asg_was_known_names_no_asg() {
        let row = recorded(
            json!({keys::REBALANCE_NOTICE_TIME: NOTICE}),
            "Skipped",
            json!({"spotAsg": "", "reason": "its ASG is not opted in"}),
            None,
        );
        let texts: Vec<String> = steps(&row).into_iter().map(|step| step.text).collect();
        assert_eq!(texts[1..], ["controller looked at it", "its ASG is not opted in"]);
    }

    #[test]
    fn settled_waits_for_every_noticed_node() {
        let quiet = row_of(json!({}), None);
        let tainted = recorded(json!({}), "Tainted", json!({}), Some("NoSchedule"));
        let scaling = recorded(json!({}), "ScalingSpot", scaling(), None);
        let until = [Phase::Tainted, Phase::Failed];
        assert!(!settled([&quiet], &until, false), "nothing noticed yet");
        assert!(settled([&quiet, &tainted], &until, false));
        assert!(!settled([&tainted, &scaling], &until, false));
        // A noticed node that is gone (retired: its instance left) ends the wait for it.
        assert!(settled([&quiet], &until, true));
        assert!(!settled([&scaling], &until, true));
    }
}
