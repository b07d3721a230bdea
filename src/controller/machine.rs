//! The replacement state machine as one pure step: [`next`] takes what a reconcile gathered (the
//! Node, its record, a fresh view of the ASG the step works on, the other open records, readiness
//! of candidate Nodes, the time) and says what to do: the record to write, the actions to take
//! (an Auto Scaling call, a taint), what to report, and when to look again. Nothing here does I/O;
//! [`super::reconcile`] gathers the facts and applies the answer, always in the same order: record,
//! then action, then report.
//!
//! The rules are DESIGN.md's; the helpers that compute a single answer (which scale-up a notice
//! joins, whether capacity is gone, which instance is whose, how a +1 is taken back) are in
//! [`super::decide`].
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};

use super::{
    decide::{self, Member},
    record::{AbandonCause, Abandoned, CapacityType, Phase, Replacement, ScaleIntent, Undo},
};
use crate::{
    aws::{Activity, Group},
    keys,
};

/// Scale-ups on spot given up because their replacement never turned Ready before the next attempt
/// falls back to on-demand: a launch template or AMI that does not join the cluster will not
/// start joining on the third try.
const NEVER_READY_ATTEMPTS: usize = 2;

/// The settings the rules read.
#[derive(Debug, Clone)]
pub struct Rules {
    /// No new InService instance (or a failing scale-up call) this long means the capacity is gone.
    pub capacity_timeout: SignedDuration,
    /// Longest wait for another actor's scaling activity before a first scale-up.
    pub foreign_activity_timeout: SignedDuration,
    /// How often a scaling ASG is looked at.
    pub poll: Duration,
    pub surge_above_max: bool,
    /// Detect, decide and report only.
    pub dry_run: bool,
    /// A claimed replacement with no Ready Node this long is released.
    pub ready_timeout: SignedDuration,
    /// A `Failed` node is tried again on a notice newer than its failure, at the earliest this long
    /// after it.
    pub retry_cooldown: SignedDuration,
}

/// What the Node says about itself (read as untrusted input, see [`super::node_input`]) and whether
/// it carries the termination taint.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub name: String,
    /// From `spec.providerID` only.
    pub instance: Option<String>,
    pub rebalance: Option<Timestamp>,
    pub interruption: Option<Timestamp>,
    pub tainted: bool,
}

impl NodeFacts {
    fn noticed(&self) -> bool {
        self.rebalance.is_some() || self.interruption.is_some()
    }

    /// The newest notice's time.
    fn latest_notice(&self) -> Option<Timestamp> {
        self.rebalance.max(self.interruption)
    }
}

/// The node's record: its phase, since when, and the replacement flow.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub phase: Phase,
    pub since: Timestamp,
    pub replacement: &'a Replacement,
}

/// Where a first notice's instance is, as Auto Scaling says.
#[derive(Debug, Clone)]
pub enum Placement {
    /// The provider id names no EC2 instance.
    NoInstance,
    /// The instance is in no Auto Scaling group.
    NotInAsg { instance: String },
    /// `own` is the instance's ASG; `spot` the one to scale (the same, unless `--spot-asg-name`).
    Found {
        instance: String,
        own: Group,
        spot: Group,
    },
}

/// Everything one step decides from. What is not needed for the record's phase is left empty
/// (see [`asg_to_read`]).
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub now: Timestamp,
    pub rules: &'a Rules,
    pub node: &'a NodeFacts,
    pub record: Option<Record<'a>>,
    /// A first notice only: where its instance is.
    pub placement: Option<&'a Placement>,
    /// The on-demand ASG set by flag, used when the spot ASG names none by tag.
    pub default_on_demand: Option<&'a str>,
    /// The ASG [`asg_to_read`] names, read after this process's last call on it.
    pub group: Option<&'a Group>,
    /// Its recent scaling activities, when the step needs them.
    pub activities: &'a [Activity],
    /// The scale-ups of the other open records (coalesced groups, baselines).
    pub members: &'a [Member<'a>],
    /// Instances the other records claimed as replacements.
    pub claimed: &'a HashSet<String>,
    /// Instances this controller's records take out of their ASGs: every noticed instance, and
    /// every instance an undo terminates. Their terminations are not another actor's (rule 7).
    pub taken_out: &'a HashSet<String>,
    /// The Node of an instance (its name, and whether it is Ready), by instance id; absent while
    /// the instance has no Node.
    pub nodes: &'a HashMap<String, (String, bool)>,
}

/// What to do, in this order: write the record, take the actions, write `done`, report.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The record to write before any action (intent before action).
    pub write: Option<(Phase, Replacement)>,
    pub acts: Vec<Act>,
    /// The record to write once the actions succeeded (an undo marked done).
    pub done: Option<(Phase, Replacement)>,
    pub reports: Vec<Report>,
    pub then: Then,
}

/// An action on AWS or the API server.
#[derive(Debug, Clone, PartialEq)]
pub enum Act {
    /// Add the termination taint to the noticed node (idempotent).
    Taint { why: &'static str },
    /// Keep cluster-autoscaler from scaling the replacement's Node down.
    ProtectReplacement { node: String },
    /// Raise the intent's ASG so that it covers every open scale-up of its coalesced group. Never
    /// lowers; read fresh before the call, so it is safe to repeat.
    Ensure { intent: ScaleIntent },
    /// Carry out an undo on `asg`: lower, or terminate one instance by id with a decrement.
    Undo { asg: String, undo: Undo },
}

/// One thing to tell: a log line and an Event on the node, with a metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
    pub tick: Option<Tick>,
}

/// The metric a report moves.
#[derive(Debug, Clone, PartialEq)]
pub enum Tick {
    Notice,
    Skipped,
    Failed,
    Fallback {
        spot_asg: String,
    },
    DryRunScaleUp {
        asg: String,
        capacity_type: CapacityType,
    },
    Ready {
        asg: String,
        seconds: f64,
    },
    Released {
        asg: String,
    },
    Retried,
}

/// When to look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// At once: the record moved on.
    Next,
    /// After this long (or when the Node changes).
    After(Duration),
    /// Only when the Node changes.
    Done,
}

impl Transition {
    /// Nothing to write, do or report: only a later look. Such a step needs no decision lock.
    pub fn is_only_a_wait(&self) -> bool {
        self.write.is_none()
            && self.acts.is_empty()
            && self.done.is_none()
            && self.reports.is_empty()
            && matches!(self.then, Then::After(_))
    }

    /// Whether the step changes what the next decisions on the ASG read (see [`Context`]'s decision
    /// lock): a claim, an intent or an undo written, a phase moving in or out of scaling, holding a
    /// scale-up or being finished, or a call to make. A step that changes none of these (a claimed
    /// replacement turned Ready: the record says so and the old node is tainted) is applied without
    /// the lock, so a burst's Ready replacements do not queue for it one after the other.
    ///
    /// [`Context`]: super::context::Context
    pub fn needs_decision_lock(&self, read: &Record<'_>) -> bool {
        let was = read.replacement;
        let decides = |(phase, record): &(Phase, Replacement)| {
            record.instance_id != was.instance_id
                || record.scale != was.scale
                || record.abandoned != was.abandoned
                || phase.is_scaling() != read.phase.is_scaling()
                || phase.holds_a_scale_up() != read.phase.holds_a_scale_up()
                || phase.is_finished() != read.phase.is_finished()
        };
        self.write.iter().chain(&self.done).any(decides)
            || self
                .acts
                .iter()
                .any(|act| matches!(act, Act::Ensure { .. } | Act::Undo { .. }))
    }

    fn then(then: Then) -> Self {
        Transition {
            write: None,
            acts: Vec::new(),
            done: None,
            reports: Vec::new(),
            then,
        }
    }

    fn write(phase: Phase, record: Replacement) -> Self {
        Transition {
            write: Some((phase, record)),
            ..Transition::then(Then::Next)
        }
    }

    fn act(mut self, act: Act) -> Self {
        self.acts.push(act);
        self
    }

    fn report(mut self, report: Report) -> Self {
        self.reports.push(report);
        self
    }

    fn and_then(mut self, then: Then) -> Self {
        self.then = then;
        self
    }
}

impl Report {
    fn normal(reason: &'static str, note: String) -> Self {
        Report {
            warning: false,
            reason,
            note,
            tick: None,
        }
    }

    fn warning(reason: &'static str, note: String) -> Self {
        Report {
            warning: true,
            ..Report::normal(reason, note)
        }
    }

    fn tick(mut self, tick: Tick) -> Self {
        self.tick = Some(tick);
        self
    }
}

/// What a step needs read from Auto Scaling: the ASG and whether its activities count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsgRead {
    pub asg: String,
    pub activities: bool,
    /// Read now, not from a describe another reconcile made a moment ago: a baseline or an undo
    /// is planned on it.
    pub fresh: bool,
}

/// The ASG the next step of `record` works on, if any: a pending undo's first, then the current
/// scale-up's.
pub fn asg_to_read(record: &Record<'_>) -> Option<AsgRead> {
    let replacement = record.replacement;
    if let Some(pending) = replacement.abandoned.iter().find(|a| !a.undone) {
        return Some(AsgRead {
            asg: pending.scale.asg.clone(),
            activities: false,
            fresh: true,
        });
    }
    match record.phase {
        Phase::Detected => {
            let asg = match next_capacity(replacement)? {
                CapacityType::Spot => replacement.spot_asg.clone(),
                CapacityType::OnDemand => replacement.on_demand_asg.clone()?,
            };
            Some(AsgRead {
                asg,
                activities: true,
                fresh: true,
            })
        }
        Phase::ScalingSpot | Phase::ScalingOnDemand => replacement.scale.as_ref().map(|scale| AsgRead {
            asg: scale.asg.clone(),
            activities: true,
            fresh: false,
        }),
        Phase::AwaitingReady => replacement.scale.as_ref().map(|scale| AsgRead {
            asg: scale.asg.clone(),
            activities: false,
            fresh: false,
        }),
        _ => None,
    }
}

/// The capacity type of the next scale-up of the current attempt: spot, unless spot was given up
/// (for capacity, MaxSize or a failing call, or its replacements never turned Ready twice); then
/// on-demand; `None` once on-demand was given up too.
pub fn next_capacity(record: &Replacement) -> Option<CapacityType> {
    let attempt = record.attempt_started_at.unwrap_or(record.detected_at);
    let given_up = |capacity_type: CapacityType| {
        let abandoned: Vec<&Abandoned> = record
            .abandoned
            .iter()
            .filter(|a| a.scale.capacity_type == capacity_type && a.scale.scale_requested_at >= attempt)
            .collect();
        let never_ready = abandoned
            .iter()
            .filter(|a| a.cause == AbandonCause::NeverReady)
            .count();
        never_ready >= NEVER_READY_ATTEMPTS || abandoned.iter().any(|a| a.cause != AbandonCause::NeverReady)
    };
    if !given_up(CapacityType::Spot) {
        Some(CapacityType::Spot)
    } else if !given_up(CapacityType::OnDemand) {
        Some(CapacityType::OnDemand)
    } else {
        None
    }
}

/// Rule 5's exception, decided once per reconcile before anything is read from AWS: an interrupted
/// node dies in two minutes, replacement or not, so it is tainted at once even while every AWS call
/// fails. The taint goes into the record, if there is one. A dry run only says it would.
pub fn on_interruption(node: &NodeFacts, record: Option<Record<'_>>, dry_run: bool) -> Option<Transition> {
    let tainted_at = record.and_then(|r| r.replacement.tainted_at);
    let phase = record.map(|r| r.phase);
    if !decide::taint_on_interruption(node.interruption.is_some(), phase, tainted_at) || node.tainted {
        return None;
    }
    if dry_run {
        return Some(Transition::then(Then::Next).report(Report::normal(
            "WouldTaint",
            "dry run: would taint the node at once on its interruption notice".to_owned(),
        )));
    }
    let mut transition = Transition::then(Then::Next)
        .act(Act::Taint {
            why: "interruption notice",
        })
        .report(Report::warning(
            "TaintedOnInterruption",
            "interruption notice: tainted at once".to_owned(),
        ));
    if let Some(record) = record {
        let mut replacement = record.replacement.clone();
        replacement.tainted_at = Some(Timestamp::now());
        transition.write = Some((record.phase, replacement));
    }
    Some(transition)
}

/// The next step for the node.
pub fn next(facts: &Facts<'_>) -> Transition {
    let Some(record) = facts.record else {
        if !facts.node.noticed() {
            return Transition::then(Then::Done);
        }
        return detect(facts);
    };
    if let Some(step) = undo_step(facts, &record) {
        return step;
    }
    match record.phase {
        Phase::Detected => match next_capacity(record.replacement) {
            Some(capacity_type) => start_scale(facts, &record, capacity_type),
            None => fail(
                &record,
                "spot and on-demand capacity were both given up".to_owned(),
            ),
        },
        Phase::ScalingSpot | Phase::ScalingOnDemand => await_instance(facts, &record),
        Phase::AwaitingReady => await_ready(facts, &record),
        Phase::Tainted | Phase::Draining if !facts.node.tainted && !facts.rules.dry_run => {
            // Tainted in the record, not on the Node: the taint after the record write failed, or
            // someone took it off. The decision stands.
            Transition::then(Then::Done).act(Act::Taint {
                why: "replacement Ready",
            })
        }
        Phase::Failed => retry_failed(facts, &record),
        Phase::Tainted | Phase::Draining | Phase::Retired | Phase::Drained | Phase::Skipped => {
            Transition::then(Then::Done)
        }
    }
}

/// A first notice: find the node's ASGs and write the record, or skip a node this controller
/// must not act on.
fn detect(facts: &Facts<'_>) -> Transition {
    let skip = |reason: String| {
        let mut record = Replacement::new(String::new(), None, facts.now);
        record.reason = Some(reason.clone());
        Transition::write(Phase::Skipped, record)
            .report(
                Report::warning("ReplacementSkipped", format!("{reason}; the node is not tainted"))
                    .tick(Tick::Skipped),
            )
            .and_then(Then::Done)
    };
    let (instance, own, spot) = match facts.placement {
        None | Some(Placement::NoInstance) => {
            // No record can be kept without an instance: say so, and do nothing.
            return Transition::then(Then::Done).report(
                Report::warning(
                    "ReplacementSkipped",
                    "notice on a node with no EC2 instance in its provider id (aws:///<zone>/<instance-id>); \
                     nothing is done"
                        .to_owned(),
                )
                .tick(Tick::Skipped),
            );
        }
        Some(Placement::NotInAsg { instance }) => {
            return skip(format!("instance {instance} is not in any Auto Scaling group"));
        }
        Some(Placement::Found { instance, own, spot }) => (instance, own, spot),
    };
    // Only instances of opted-in ASGs are acted on (the IAM policy requires the tag for scaling
    // anyway): a node's label alone, which the node can write, is not enough.
    if !decide::asg_opted_in(own) {
        return skip(format!(
            "instance {instance}'s ASG {} does not carry the tag {}=true",
            own.name,
            keys::ENABLED_LABEL
        ));
    }
    // EKS already replaces a managed node group's spot nodes: two replacements would race.
    if let Some(conflict) = super::nodegroup::managed_conflict(own) {
        return skip(conflict);
    }
    let on_demand = spot
        .tags
        .get(keys::FALLBACK_ASG_TAG)
        .cloned()
        .or_else(|| facts.default_on_demand.map(str::to_owned));
    let mut record = Replacement::new(spot.name.clone(), on_demand.clone(), facts.now);
    record.instance_asg = Some(own.name.clone());
    if facts.node.interruption.is_some() && !facts.rules.dry_run {
        // Tainted on its interruption notice before this detection (see `on_interruption`).
        record.tainted_at = Some(facts.now);
    }
    let fallback = on_demand.map_or("no on-demand fallback".to_owned(), |asg| {
        format!("fallback {asg}")
    });
    Transition::write(Phase::Detected, record).report(
        Report::normal(
            "RebalanceNoticed",
            format!(
                "notice on instance {instance}: replacing from spot ASG {} ({fallback})",
                spot.name
            ),
        )
        .tick(Tick::Notice),
    )
}

/// Ask `capacity_type`'s ASG for one more instance: join the coalesced scale-up in flight on it or
/// start one from its fresh desired capacity, write the intent, then make the (idempotent) call.
fn start_scale(facts: &Facts<'_>, record: &Record<'_>, capacity_type: CapacityType) -> Transition {
    let mut replacement = record.replacement.clone();
    let phase = Phase::from(capacity_type);
    if capacity_type == CapacityType::OnDemand && replacement.on_demand_asg.is_none() {
        return fail(
            record,
            "spot capacity is gone and no on-demand fallback ASG is set".to_owned(),
        );
    }
    let Some(group) = facts.group else {
        return Transition::then(Then::After(facts.rules.poll));
    };
    let me = facts.node.name.as_str();
    // Rule 7 (a foreign activity in progress: wait, bounded) holds back a first spot scale-up only;
    // joining our own in-flight scale-up, or falling back, must not wait.
    let joining = facts
        .members
        .iter()
        .any(|m| m.node != me && m.scale.asg == group.name && m.phase.is_scaling());
    if !joining && capacity_type == CapacityType::Spot {
        let ours: Vec<&ScaleIntent> = facts
            .members
            .iter()
            .filter(|m| m.scale.asg == group.name)
            .map(|m| m.scale)
            .collect();
        if let Some(activity) = decide::foreign_activity_in_progress(facts.activities, &ours, facts.taken_out)
        {
            let since = replacement.waiting_since.unwrap_or(facts.now);
            if facts.now.duration_since(since) < facts.rules.foreign_activity_timeout {
                let wait = Then::After(facts.rules.poll);
                if replacement.waiting_since.is_some() {
                    return Transition::then(wait);
                }
                replacement.waiting_since = Some(since);
                let note = format!(
                    "waiting for scaling activity {} on {}: {}",
                    activity.id, group.name, activity.description
                );
                return Transition::write(Phase::Detected, replacement)
                    .report(Report::normal("WaitingForScalingActivity", note))
                    .and_then(wait);
            }
        }
    }
    let intent = decide::coalesced_intent(me, facts.members, group, capacity_type, facts.now);
    if intent.target_desired > group.max && !facts.rules.surge_above_max {
        let reason = format!("{} is at its MaxSize of {}", group.name, group.max);
        // Nothing was raised: the give-up has nothing to take back.
        replacement.abandoned.push(Abandoned {
            scale: intent,
            undo: Undo::Leave {
                reason: "nothing was raised".to_owned(),
            },
            undone: true,
            cause: AbandonCause::MaxSize,
        });
        return after_give_up(record, replacement, capacity_type, reason);
    }
    replacement.scale = Some(intent.clone());
    replacement.waiting_since = None;
    replacement.failing_since = None;
    replacement.last_error = None;
    if facts.rules.dry_run {
        // Detected and decided; the call is only reported. Nothing will launch, so the flow ends
        // here (the record keeps what would have been asked).
        let mut members = facts.members.to_vec();
        members.push(Member {
            node: me,
            phase,
            scale: &intent,
        });
        let target = decide::group_target(&intent, &members, group.max, facts.rules.surge_above_max);
        let note = format!(
            "dry run: would raise {} ({capacity_type:?}) {} → {target}; no Auto Scaling call, no taint, no eviction",
            group.name, intent.baseline
        );
        return Transition::write(phase, replacement)
            .report(Report::normal("WouldScaleUp", note).tick(Tick::DryRunScaleUp {
                asg: group.name.clone(),
                capacity_type,
            }))
            .and_then(Then::Done);
    }
    Transition::write(phase, replacement).act(Act::Ensure { intent })
}

/// Waiting for a new instance: make sure the call covers this scale-up, claim an instance, or find
/// that the capacity is gone.
fn await_instance(facts: &Facts<'_>, record: &Record<'_>) -> Transition {
    let Some(intent) = record.replacement.scale.as_ref() else {
        // Scaling with no intent cannot happen from this code; start the scale-up again.
        return Transition::write(Phase::Detected, record.replacement.clone());
    };
    if facts.rules.dry_run {
        return Transition::then(Then::Done);
    }
    let Some(group) = facts.group else {
        return Transition::then(Then::After(facts.rules.poll));
    };
    let poll = Then::After(facts.rules.poll);
    if let Some(since) = record.replacement.failing_since
        && facts.now.duration_since(since) >= facts.rules.capacity_timeout
    {
        let reason = format!(
            "the scale-up call on {} has been failing for {}: {}",
            intent.asg,
            seconds(facts.now.duration_since(since)),
            record
                .replacement
                .last_error
                .as_deref()
                .unwrap_or("unknown error")
        );
        return give_up(facts, record, AbandonCause::CallFailing, reason);
    }
    let me = facts.node.name.as_str();
    let mut members = facts.members.to_vec();
    members.push(Member {
        node: me,
        phase: record.phase,
        scale: intent,
    });
    let target = decide::group_target(intent, &members, group.max, facts.rules.surge_above_max);
    if group.desired < target {
        // The call did not happen (a crash between intent and call) or another actor lowered the
        // group since: raise it again, to the group's target only.
        return Transition::then(Then::Next).act(Act::Ensure {
            intent: intent.clone(),
        });
    }
    let ready = |id: &str| facts.nodes.get(id).map(|(_, ready)| *ready);
    // Never the noticed node's own instance, whatever the ASG lists.
    let mut taken = facts.claimed.clone();
    taken.extend(facts.node.instance.clone());
    if let Some(instance) = decide::pick_replacement(intent, group, &taken, ready) {
        let mut replacement = record.replacement.clone();
        replacement.instance_id = Some(instance.to_owned());
        replacement.node = None;
        replacement.claimed_at = Some(facts.now);
        replacement.not_ready_warned_at = None;
        replacement.failing_since = None;
        replacement.last_error = None;
        let note = format!(
            "claimed new instance {instance} of {} as the replacement",
            intent.asg
        );
        return Transition::write(Phase::AwaitingReady, replacement)
            .report(Report::normal("ReplacementClaimed", note));
    }
    // Keep the ActivityIds of the launches this request caused in the record.
    let caused = decide::activities_of(facts.activities, intent);
    if !caused.is_empty() && caused != intent.activity_ids {
        let mut replacement = record.replacement.clone();
        if let Some(scale) = replacement.scale.as_mut() {
            scale.activity_ids = caused;
        }
        return Transition::write(record.phase, replacement).and_then(poll);
    }
    let waiting: Vec<Member<'_>> = members
        .iter()
        .filter(|m| m.phase.is_scaling() && decide::same_group(m.scale, intent))
        .copied()
        .collect();
    let coming = launches_coming(intent, group, facts.claimed);
    // A launch this request caused failed for capacity: only the scale-ups it left without an
    // instance give up. No new instance within the timeout: every one waiting does.
    let failed = decide::capacity_unavailable(facts.activities, intent, facts.now, SignedDuration::MAX);
    let timed_out = decide::capacity_unavailable(&[], intent, facts.now, facts.rules.capacity_timeout);
    match (failed, timed_out) {
        (_, Some(reason)) => give_up(facts, record, AbandonCause::Capacity, reason),
        (Some(reason), None) if short_of_capacity(me, &waiting, coming) => {
            give_up(facts, record, AbandonCause::Capacity, reason)
        }
        _ => Transition::then(poll),
    }
}

/// New instances of the group (not there before the scale-up, not claimed, not leaving) that may
/// still become a replacement: launching or InService.
fn launches_coming(intent: &ScaleIntent, group: &Group, claimed: &HashSet<String>) -> usize {
    group
        .instances
        .iter()
        .filter(|i| {
            !i.is_leaving() && !intent.pre_scale_instances.contains(&i.id) && !claimed.contains(&i.id)
        })
        .count()
}

/// Among the scale-ups of one coalesced group still waiting for an instance, the first `coming`
/// (by request time, then node name) get the instances that are on their way; a capacity failure
/// gives up the rest only. So a partial capacity failure among coalesced notices gives up as many
/// scale-ups as launches failed, not all of them.
fn short_of_capacity(me: &str, waiting: &[Member<'_>], coming: usize) -> bool {
    let mut order: Vec<(Timestamp, &str)> = waiting
        .iter()
        .map(|m| (m.scale.scale_requested_at, m.node))
        .collect();
    order.sort();
    let rank = order
        .iter()
        .position(|(_, node)| *node == me)
        .unwrap_or(order.len());
    rank >= coming
}

/// A replacement was claimed: taint once its Node is Ready; release it if it never is.
fn await_ready(facts: &Facts<'_>, record: &Record<'_>) -> Transition {
    let replacement = record.replacement;
    let (Some(instance), Some(intent)) = (replacement.instance_id.as_deref(), replacement.scale.as_ref())
    else {
        return Transition::write(Phase::Detected, replacement.clone());
    };
    let poll = Then::After(facts.rules.poll);
    let Some(group) = facts.group else {
        return Transition::then(poll);
    };
    if let Some((name, true)) = facts.nodes.get(instance) {
        return tainted(facts, record, intent, instance, name);
    }
    let mut next = replacement.clone();
    if !group
        .instances
        .iter()
        .any(|i| i.id == instance && !i.is_leaving())
    {
        // The claimed instance went away before it was Ready: claim another.
        next.instance_id = None;
        next.node = None;
        next.claimed_at = None;
        next.not_ready_warned_at = None;
        let note = format!(
            "claimed instance {instance} left {} before it was Ready",
            intent.asg
        );
        return Transition::write(Phase::from(intent.capacity_type), next)
            .report(Report::warning("ReplacementLost", note));
    }
    let Some(claimed_at) = replacement.claimed_at else {
        return Transition::then(poll);
    };
    let waited = facts.now.duration_since(claimed_at);
    if waited >= facts.rules.ready_timeout {
        // Ours, and it runs no pods: terminate it with a decrement (the +1 it was), then try again
        // or fall back.
        let undo = Undo::Terminate {
            instance: instance.to_owned(),
        };
        next.scale = None;
        next.instance_id = None;
        next.node = None;
        next.claimed_at = None;
        next.not_ready_warned_at = None;
        next.abandoned.push(Abandoned {
            scale: intent.clone(),
            undo,
            undone: false,
            cause: AbandonCause::NeverReady,
        });
        let again = match next_capacity(&next) {
            Some(CapacityType::Spot) => "another spot instance is asked for".to_owned(),
            Some(CapacityType::OnDemand) => "falling back to on-demand".to_owned(),
            None => "no capacity left to try".to_owned(),
        };
        let note = format!(
            "claimed replacement {instance} had no Ready Node after {}; released it (terminated with a \
             decrement) and {again}",
            seconds(waited)
        );
        return Transition::write(Phase::Detected, next).report(
            Report::warning("ReplacementReleased", note).tick(Tick::Released {
                asg: intent.asg.clone(),
            }),
        );
    }
    if waited > facts.rules.capacity_timeout && replacement.not_ready_warned_at.is_none() {
        // Once per claim (the record says it was sent, so a new leader does not send it again).
        next.not_ready_warned_at = Some(facts.now);
        let note = format!(
            "claimed replacement {instance} has had no Ready Node for {}; {} stays untainted until it has \
             one, and it is released after {} (an interruption notice still taints at once)",
            seconds(waited),
            facts.node.name,
            seconds(facts.rules.ready_timeout),
        );
        return Transition::write(Phase::AwaitingReady, next)
            .report(Report::warning("ReplacementNotReady", note))
            .and_then(poll);
    }
    Transition::then(poll)
}

/// The replacement is Ready: write its name and readiness (the webhook's order guard reads them),
/// protect it and taint the node, then write `Tainted`.
fn tainted(
    facts: &Facts<'_>,
    record: &Record<'_>,
    intent: &ScaleIntent,
    instance: &str,
    replacement_node: &str,
) -> Transition {
    let mut ready = record.replacement.clone();
    ready.node = Some(replacement_node.to_owned());
    ready.ready_at = Some(facts.now);
    let tainted_before = ready.tainted_at.is_some();
    let mut done = ready.clone();
    done.tainted_at.get_or_insert(facts.now);
    let latency = facts.now.duration_since(ready.detected_at).as_secs_f64();
    let how = if tainted_before {
        "it was tainted before, on its interruption notice"
    } else {
        "tainted"
    };
    let note = format!("replacement {replacement_node} ({instance}) is Ready after {latency:.1} s; {how}");
    let mut acts = vec![Act::ProtectReplacement {
        node: replacement_node.to_owned(),
    }];
    if !facts.node.tainted && !tainted_before {
        acts.push(Act::Taint {
            why: "replacement Ready",
        });
    }
    Transition {
        write: Some((Phase::AwaitingReady, ready)),
        acts,
        done: Some((Phase::Tainted, done)),
        reports: vec![Report::normal("Tainted", note).tick(Tick::Ready {
            asg: intent.asg.clone(),
            seconds: latency,
        })],
        then: Then::Next,
    }
}

/// Capacity for the current scale-up is gone (or its call keeps failing): plan the undo of its +1
/// (written before the call that carries it out), then fall back or fail.
fn give_up(facts: &Facts<'_>, record: &Record<'_>, cause: AbandonCause, reason: String) -> Transition {
    let mut next = record.replacement.clone();
    let capacity_type = next
        .scale
        .as_ref()
        .map_or(CapacityType::Spot, |s| s.capacity_type);
    if let (Some(intent), Some(group)) = (next.scale.take(), facts.group) {
        let still_needed = facts
            .members
            .iter()
            .filter(|m| decide::same_group(m.scale, &intent))
            .count() as i32;
        let mut claimed = facts.claimed.clone();
        claimed.extend(next.instance_id.clone());
        let undo = decide::plan_undo(&intent, group, intent.baseline + still_needed, &claimed);
        next.abandoned.push(Abandoned {
            scale: intent,
            undo,
            undone: false,
            cause,
        });
    }
    next.instance_id = None;
    next.node = None;
    next.claimed_at = None;
    next.failing_since = None;
    next.last_error = None;
    after_give_up(record, next, capacity_type, reason)
}

/// After a scale-up of `capacity_type` was given up (recorded in `next`): fall back, or fail.
fn after_give_up(
    record: &Record<'_>,
    next: Replacement,
    capacity_type: CapacityType,
    reason: String,
) -> Transition {
    let falls_back = capacity_type == CapacityType::Spot
        && next.on_demand_asg.is_some()
        && next_capacity(&next) == Some(CapacityType::OnDemand);
    if falls_back {
        let on_demand = next.on_demand_asg.clone().unwrap_or_default();
        let note = format!("spot capacity unavailable ({reason}); falling back to on-demand ASG {on_demand}");
        let spot_asg = next.spot_asg.clone();
        // The undo of the spot +1 comes first (it is pending in the record), then the on-demand
        // scale-up from `Detected`.
        return Transition::write(Phase::Detected, next)
            .report(Report::warning("SpotCapacityUnavailable", note).tick(Tick::Fallback { spot_asg }));
    }
    if next_capacity(&next).is_some() {
        // Another attempt on the same capacity type (a replacement that never turned Ready).
        return Transition::write(Phase::Detected, next);
    }
    let record = Record {
        replacement: &next,
        ..*record
    };
    fail(&record, reason)
}

fn fail(record: &Record<'_>, reason: String) -> Transition {
    let mut next = record.replacement.clone();
    next.reason = Some(reason.clone());
    let note = format!("no replacement capacity: {reason}; the node is not tainted");
    Transition::write(Phase::Failed, next)
        .report(Report::warning("ReplacementFailed", note).tick(Tick::Failed))
}

/// A `Failed` node is tried again when a notice newer than the failure arrives (an interruption,
/// or a later queue event), at the earliest a cool-down after the failure.
fn retry_failed(facts: &Facts<'_>, record: &Record<'_>) -> Transition {
    let Some(notice) = facts.node.latest_notice() else {
        return Transition::then(Then::Done);
    };
    if notice <= record.since {
        return Transition::then(Then::Done);
    }
    let ready_at = record
        .since
        .saturating_add(facts.rules.retry_cooldown)
        .unwrap_or(record.since);
    if facts.now < ready_at {
        let left = facts.now.duration_since(ready_at).abs();
        return Transition::then(Then::After(Duration::try_from(left).unwrap_or(facts.rules.poll)));
    }
    let mut next = record.replacement.clone();
    next.attempt_started_at = Some(facts.now);
    next.scale = None;
    next.reason = None;
    next.waiting_since = None;
    let note = format!(
        "a new notice {} after the replacement failed: trying again",
        seconds(notice.duration_since(record.since))
    );
    Transition::write(Phase::Detected, next)
        .report(Report::normal("ReplacementRetried", note).tick(Tick::Retried))
}

/// The first abandoned scale-up whose undo is not done yet, as the step that does it: re-planned
/// when the group changed since the plan, carried out when still pending, else marked done.
fn undo_step(facts: &Facts<'_>, record: &Record<'_>) -> Option<Transition> {
    let index = record.replacement.abandoned.iter().position(|a| !a.undone)?;
    let Some(group) = facts.group else {
        return Some(Transition::then(Then::After(facts.rules.poll)));
    };
    let mut next = record.replacement.clone();
    let abandoned = &next.abandoned[index];
    let asg = abandoned.scale.asg.clone();
    // Planned on an older view: an instance beyond the lowered value appeared since (capacity came
    // back late), or the instance to remove was claimed by another node. Plan again.
    let stale = match &abandoned.undo {
        Undo::Lower { to, .. } => group.desired > *to && live(group) as i32 > *to,
        Undo::Terminate { instance } => facts.claimed.contains(instance),
        Undo::Leave { .. } => false,
    };
    if stale && abandoned.cause != AbandonCause::NeverReady {
        let replanned = decide::plan_undo(&abandoned.scale, group, group.desired - 1, facts.claimed);
        next.abandoned[index].undo = replanned;
        return Some(Transition::write(record.phase, next));
    }
    let pending = decide::undo_pending(&abandoned.undo, group)
        && !matches!(&abandoned.undo, Undo::Terminate { instance } if group.instances.iter().any(|i| &i.id == instance && i.is_leaving()));
    let undo = abandoned.undo.clone();
    next.abandoned[index].undone = true;
    let note = match &undo {
        Undo::Lower { from, to } => format!("took back the scale-up on {asg}: desired {from} → {to}"),
        Undo::Terminate { instance } => {
            format!("took back the scale-up on {asg}: removed instance {instance} and decremented")
        }
        Undo::Leave { reason } => format!("left {asg} as it is: {reason}"),
    };
    let report = Report::normal("ScaleUpWithdrawn", note);
    if !pending {
        return Some(Transition::write(record.phase, next).report(report));
    }
    Some(Transition {
        write: None,
        acts: vec![Act::Undo { asg, undo }],
        done: Some((record.phase, next)),
        reports: vec![report],
        then: Then::Next,
    })
}

/// Instances of the group not on their way out.
fn live(group: &Group) -> usize {
    group.instances.iter().filter(|i| !i.is_leaving()).count()
}

fn seconds(duration: SignedDuration) -> String {
    format!("{:.0} s", duration.as_secs_f64().max(0.0))
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
