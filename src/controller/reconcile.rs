//! One reconcile of a noticed node: check what the node says about itself, then step the
//! replacement state machine until it waits: gather the facts the step needs, ask
//! [`machine::next`], apply the answer (record, then action, then report). The end of the node's
//! life (drain, retirement) goes on next to it in [`super::drain`].
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::{
    ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use tracing::{instrument, warn};

use super::{
    context::{Context, Counted, Error, Result, lock, members, old_instance, write_record},
    drain, effects,
    lanes::{self, Arrival},
    machine::{self, Act, Facts, NodeFacts, Placement, Record, Then, Transition},
    node_input::NodeInput,
    record::Phase,
};
use crate::{
    aws::{Activity, Group},
    contract::{SpotReplacementStatus, record::Replacement},
    keys, node,
};

/// Steps one reconcile takes at most before it asks to be requeued (a flow needs about eight; a
/// bound keeps a rule that never settles from spinning).
const MAX_STEPS: usize = 32;

#[instrument(skip_all, fields(node = %node.name_any()))]
pub async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action> {
    let input = NodeInput::read(node::annotations(&node), old_instance(&node));
    let taint = &ctx.settings.taint;
    let arrival = Arrival {
        noticed: input.noticed(),
        interrupted: input.interruption.is_some(),
        tainted: node::has_taint(&node, &taint.key, &taint.effect),
        lying: input.disagreeing_instance.is_some(),
        phase: ctx.phase_of(&node),
    };
    let _seat = ctx.lanes.enter(&node.name_any(), lanes::lane_of(&arrival)).await;
    if let Some(claimed) = &input.disagreeing_instance {
        // The node names another instance than its provider id: it is lying (or misconfigured).
        // Nothing is scaled, tainted, evicted or terminated for it.
        let note = format!(
            "the node's {} annotation says {claimed:?}, its provider id says {:?}; nothing is done for this node",
            keys::INSTANCE_ID,
            old_instance(&node).unwrap_or("nothing"),
        );
        warn!(%note, "untrusted node input");
        ctx.metrics
            .reconcile_errors
            .with_label_values(&["instance_mismatch"])
            .inc();
        ctx.event(&node, EventType::Warning, "InstanceIdMismatch", note)
            .await;
        return Ok(Action::await_change());
    }
    if !input.problems.is_empty() {
        let note = format!(
            "ignored malformed notice annotations: {}",
            input.problems.join("; ")
        );
        warn!(%note, "untrusted node input");
        ctx.event(&node, EventType::Warning, "MalformedNotice", note)
            .await;
    }
    let replacing = replace(&node, &ctx, &input).await;
    // The end of the node's life (drain, retire) goes on next to the replacement flow, also while
    // that fails: an interruption's drain, or one the webhook promised, must not wait for AWS.
    let ending = drain::lifecycle(&node, &ctx).await;
    let (replacing, ending) = (replacing?, ending?);
    ctx.succeeded(&node.name_any());
    Ok(match replacing.into_iter().chain(ending).min() {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

pub fn error_policy(node: Arc<Node>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(node = %node.name_any(), %error, "reconcile failed; retrying");
    let kind = error.metric_label();
    ctx.metrics.reconcile_errors.with_label_values(&[kind]).inc();
    let failures = ctx.failed(&node.name_any(), kind);
    let wait = super::context::retry_after(failures);
    if failures == super::context::FAILURES_BEFORE_WARNING {
        // Operators look at the node, not at the controller's log: say there what keeps failing.
        // The error's text without the account and role AWS names in it (the log has those).
        let note = format!(
            "{failures} attempts in a row failed, retrying with backoff (at most every 30 s): {}",
            crate::aws::redacted(&error.to_string())
        );
        tokio::spawn(async move {
            ctx.event(&node, EventType::Warning, "ReconcileFailing", note)
                .await;
        });
    }
    Action::requeue(wait)
}

/// Steps the replacement state machine until it waits: the wait until the next look, if any.
async fn replace(node: &Node, ctx: &Context, input: &NodeInput) -> Result<Option<Duration>> {
    let rules = ctx.settings.rules();
    let taint = &ctx.settings.taint;
    let mut facts = NodeFacts {
        name: node.name_any(),
        instance: old_instance(node).map(str::to_owned),
        rebalance: input.rebalance,
        interruption: input.interruption,
        tainted: node::has_taint(node, &taint.key, &taint.effect),
    };
    // A notice on its way to its scale-up intent holds calls back (rule 2) from its first step to
    // the intent's write, also between steps (while an Event is published).
    let mut on_the_way = None;
    for step_number in 0..MAX_STEPS {
        let status = ctx.status_of(node);
        let record = status.as_ref().map(record_of);
        let noticed = facts.rebalance.is_some() || facts.interruption.is_some();
        if noticed && record.is_none_or(|r| r.phase == Phase::Detected) {
            on_the_way.get_or_insert_with(|| Counted::new(&ctx.detecting));
        }
        // Before anything is read from AWS: an interruption taints at once.
        let interruption = (step_number == 0)
            .then(|| machine::on_interruption(&facts, record, rules.dry_run))
            .flatten();
        let transition = match interruption {
            Some(transition) => {
                apply(ctx, node, &transition, Held::default()).await?;
                transition
            }
            None => match step(ctx, node, &facts, record, &rules, &mut on_the_way).await? {
                (_, Some(deferred)) => return Ok(Some(deferred)),
                (transition, None) => transition,
            },
        };
        if transition.acts.iter().any(|act| matches!(act, Act::Taint { .. })) {
            facts.tainted = true;
        }
        match transition.then {
            Then::Next => continue,
            Then::After(wait) => return Ok(Some(wait)),
            Then::Done => return Ok(None),
        }
    }
    Ok(Some(rules.poll))
}

/// The record's phase, since when, and its flow.
fn record_of(status: &SpotReplacementStatus) -> Record<'_> {
    let since = status
        .history
        .iter()
        .rev()
        .find(|change| change.phase == status.phase)
        .map_or(status.record.detected_at, |change| change.at);
    Record {
        phase: status.phase,
        since,
        replacement: &status.record,
    }
}

/// Locks and counters a step holds until its record is written: the ASG's decision lock (no two
/// decisions on one ASG at once), and the counts of scale-ups on their way to writing an intent.
#[derive(Default)]
struct Held<'a> {
    decision: Option<tokio::sync::OwnedMutexGuard<()>>,
    _pending: Option<Counted<'a>>,
    _on_the_way: Option<Counted<'a>>,
    asg: Option<String>,
}

/// Gathers what the next step needs, decides it, and applies it.
async fn step<'a>(
    ctx: &'a Context,
    node: &Node,
    facts: &NodeFacts,
    record: Option<Record<'_>>,
    rules: &machine::Rules,
    on_the_way: &mut Option<Counted<'a>>,
) -> Result<(Transition, Option<Duration>)> {
    let now = Timestamp::now();
    let none = HashMap::new();
    let nobody = HashSet::new();
    let mut fact = Facts {
        now,
        rules,
        node: facts,
        record,
        placement: None,
        default_on_demand: ctx.settings.on_demand_asg.as_deref(),
        group: None,
        activities: &[],
        members: &[],
        claimed: &nobody,
        taken_out: &nobody,
        nodes: &none,
    };
    let Some(record) = record else {
        if facts.rebalance.is_none() && facts.interruption.is_none() {
            return Ok((machine::next(&fact), None));
        }
        // A first notice: find where the instance is (concurrent scale-up calls wait: `on_the_way`).
        let placement = placement(ctx, node, facts.instance.as_deref()).await?;
        fact.placement = Some(&placement);
        let transition = machine::next(&fact);
        let deferred = apply(ctx, node, &transition, Held::default()).await?;
        return Ok((transition, deferred));
    };
    let Some(read) = machine::asg_to_read(&record) else {
        let transition = machine::next(&fact);
        let deferred = apply(ctx, node, &transition, Held::default()).await?;
        return Ok((transition, deferred));
    };
    let state = ctx.asg(&read.asg);
    let pending = (record.phase == Phase::Detected).then(|| Counted::new(&state.pending));
    // Only a first scale-up waits for others' activities (rule 7); read outside the lock, since a
    // decision made meanwhile changes nothing a termination says.
    let taken_out = if record.phase == Phase::Detected {
        ctx.taken_out()
    } else {
        HashSet::new()
    };
    // The ASG is read before the decision lock, so a describe never holds the decisions of others
    // back; it is read again under the lock only when it no longer fits: this process called the
    // ASG since, or the step turned out to need a fresh view after all.
    let wanted = |records: &HashMap<String, (Phase, Replacement)>| {
        // A scale-up joining one in flight takes its baseline from it: no fresh read needed.
        let joining = members(records)
            .iter()
            .any(|m| m.node != facts.name && m.scale.asg == read.asg && m.phase.is_scaling());
        match record.phase {
            _ if read.fresh && !joining => Duration::ZERO,
            // Waiting for an instance or for Ready: the ASG as read within the poll interval. A
            // view never outlives a call of this process on the ASG, a claim is decided again
            // under the lock, and a call reads the ASG fresh before it is made.
            Phase::AwaitingReady | Phase::ScalingSpot | Phase::ScalingOnDemand => rules.poll,
            _ => super::context::AWS_CACHE_TTL,
        }
    };
    let calls = ctx.calls_on(&read.asg);
    let asked = Instant::now();
    let seen = ctx.records_deciding();
    let max_age = wanted(&seen);
    let mut group = ctx.group_within(&read.asg, max_age).await?;
    let mut activities = if read.activities {
        ctx.activities_within(&read.asg, max_age).await?
    } else {
        Vec::new()
    };
    let mut nodes = nodes_of(ctx, &group);
    fact.taken_out = &taken_out;
    // A step that changes nothing on what it read (a scale-up still waiting for its instance, a
    // replacement not Ready yet) waits without the decision lock: in a burst, a hundred waiting
    // records queued for it one after the other, holding every reconcile worker while new notices
    // waited for one. What they read was true a moment ago; anything that acts on it and changes
    // what other decisions read (a claim, an intent, a call) is decided again under the lock.
    if ctx.calls_on(&read.asg) == calls {
        let claimed = ctx.claims_of_others(&facts.name).into_keys().collect();
        let look = decide_on(&fact, &seen, &claimed, &group, &activities, &nodes);
        if look.is_only_a_wait() {
            return Ok((look, None));
        }
        // Nothing another decision reads changes (a replacement turned Ready): no lock either.
        if !look.needs_decision_lock(&record) {
            drop(seen);
            let deferred = apply(ctx, node, &look, Held::default()).await?;
            return Ok((look, deferred));
        }
    }
    drop(seen);
    let decision = state.decide.clone().lock_owned().await;
    let records = ctx.records_deciding();
    let stale =
        ctx.calls_on(&read.asg) != calls || (wanted(&records) == Duration::ZERO && max_age != Duration::ZERO);
    if stale {
        group = ctx.group_within(&read.asg, asked.elapsed()).await?;
        if read.activities {
            activities = ctx.activities_within(&read.asg, asked.elapsed()).await?;
        }
        nodes = nodes_of(ctx, &group);
    }
    // Every record's claim, also of one whose Node the cache does not show (`records` leaves
    // those out): bursts showed two records claiming one replacement when only those counted.
    let claimed = ctx.claims_of_others(&facts.name).into_keys().collect();
    let transition = decide_on(&fact, &records, &claimed, &group, &activities, &nodes);
    let held = Held {
        decision: Some(decision),
        _pending: pending,
        // Counted until this step's record is written: a first scale-up's intent, or a wait.
        _on_the_way: on_the_way.take(),
        asg: Some(read.asg.clone()),
    };
    let deferred = apply(ctx, node, &transition, held).await?;
    Ok((transition, deferred))
}

/// The step on `fact` with the other records (written or staged), their claims and the ASG as read.
fn decide_on(
    fact: &Facts<'_>,
    records: &HashMap<String, (Phase, Replacement)>,
    claimed: &HashSet<String>,
    group: &Group,
    activities: &[Activity],
    nodes: &HashMap<String, (String, bool)>,
) -> Transition {
    let me = fact.node.name.as_str();
    let others: Vec<_> = members(records).into_iter().filter(|m| m.node != me).collect();
    machine::next(&Facts {
        group: Some(group),
        activities,
        members: &others,
        claimed,
        nodes,
        ..*fact
    })
}

/// The Nodes of the group's instances: name and readiness, by instance id.
fn nodes_of(ctx: &Context, group: &Group) -> HashMap<String, (String, bool)> {
    let instances = group.instances.iter().map(|i| i.id.as_str()).collect();
    ctx.nodes_of_instances(&instances)
        .into_iter()
        .map(|(id, node)| (id, (node.name_any(), node::is_ready(&node))))
        .collect()
}

/// Where the noticed instance is: its ASG and the spot ASG to scale, described.
async fn placement(ctx: &Context, node: &Node, instance: Option<&str>) -> Result<Placement> {
    let Some(instance) = instance else {
        return Ok(Placement::NoInstance);
    };
    // Only names and tags are read from these views: a describe within the poll interval will do
    // (in a burst, a hundred first notices share one).
    let max_age = ctx.settings.asg_poll_interval;
    let own_asg = match ctx.described_group_of(instance, max_age) {
        Some(asg) => asg,
        None => {
            ctx.metrics
                .aws_calls
                .with_label_values(&["DescribeAutoScalingInstances"])
                .inc();
            let Some(asg) = ctx.aws.group_of_instance(instance).await? else {
                return Ok(Placement::NotInAsg {
                    instance: instance.to_owned(),
                });
            };
            asg
        }
    };
    let own = ctx.group_within(&own_asg, max_age).await?;
    let spot = match &ctx.settings.spot_asg {
        Some(spot) if *spot != own_asg => ctx.group_within(spot, max_age).await?,
        _ => own.clone(),
    };
    if super::decide::asg_opted_in(&own) {
        warn_capacity_rebalancing(node, ctx, &spot).await;
    }
    Ok(Placement::Found {
        instance: instance.to_owned(),
        own,
        spot,
    })
}

async fn warn_capacity_rebalancing(node: &Node, ctx: &Context, group: &Group) {
    if group.capacity_rebalance && lock(&ctx.warned_rebalancing).insert(group.name.clone()) {
        let note = super::decide::capacity_rebalancing_note(&group.name);
        ctx.event(node, EventType::Warning, "CapacityRebalancingEnabled", note)
            .await;
    }
}

/// Applies a transition in the fixed order: the record (while the step's locks are held), then the
/// actions, then the record's `done` mark, then the reports. Returns a wait when an action was
/// deferred (a scale-up call waiting for more notices to join it).
async fn apply(
    ctx: &Context,
    node: &Node,
    transition: &Transition,
    mut held: Held<'_>,
) -> Result<Option<Duration>> {
    if let Some((phase, record)) = &transition.write {
        // A decision made under the ASG's decision lock is shown to the next decisions on the ASG
        // while it is written, so they need not wait for the write: a burst of notices decides
        // one after the other and writes side by side. (A call waits for the intents on their way:
        // `pending`; a failed write takes its decision back.)
        let _staged = held.decision.is_some().then(|| {
            let staged = ctx.stage(&node.name_any(), *phase, record);
            held.decision = None;
            staged
        });
        // A replacement is claimed by one record only: checked again once this claim is staged,
        // against every record's claim, written or staged (the decision read the same set under
        // the lock, so this fires only if something bypassed it); when two claims meet here both
        // step back and claim again on their next look.
        if *phase == Phase::AwaitingReady
            && let Some(instance) = record.instance_id.as_deref()
            && let Some(other) = ctx.claimed_by_another(&node.name_any(), instance)
        {
            warn!(instance, other = %other, "two records claimed one replacement; claiming again");
            return Err(Error::Refused(format!(
                "instance {instance} is claimed by node {other}'s record too; this claim is made again"
            )));
        }
        write_record(node, ctx, *phase, record).await?;
        let intent_written = transition
            .acts
            .iter()
            .any(|act| matches!(act, Act::Ensure { .. }));
        if intent_written && let Some(asg) = &held.asg {
            let state = ctx.asg(asg);
            *lock(&state.last_intent) = Some(Instant::now());
            lock(&state.uncalled_since).get_or_insert_with(Instant::now);
        }
    }
    drop(held);
    for act in &transition.acts {
        match effects::act(ctx, node, act).await {
            Ok(effects::Done::Yes) => {}
            // More notices are on their way to the same call: look again shortly, holding no worker.
            Ok(effects::Done::Deferred(wait)) => return Ok(Some(wait)),
            Err(error) => {
                if matches!(act, Act::Ensure { .. }) && !matches!(&error, Error::Aws(aws) if aws.is_fenced())
                {
                    effects::note_failing_call(ctx, node, &error).await?;
                }
                return Err(error);
            }
        }
    }
    if let Some((phase, record)) = &transition.done {
        write_record(node, ctx, *phase, record).await?;
    }
    for report in &transition.reports {
        effects::report(ctx, node, report).await;
    }
    Ok(None)
}
