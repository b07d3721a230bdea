//! The end of a noticed node's life while its Node is there: a PDB-paced drain through the Eviction
//! API (never a delete), then retiring its instance with a decrement so the node group is back at its
//! pre-notice size. Each reconcile does one bounded step and asks to be requeued, so a long drain
//! holds no worker. The decisions come from [`super::lifecycle`]; this file fetches, acts and records.
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, ResourceExt,
    api::{EvictParams, ListParams, Patch, PatchParams},
    runtime::events::EventType,
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    context::{Context, Error, Result, SCALE_DOWN_DISABLED, lock, old_instance, write_record},
    lifecycle::{self, DrainPace, PodFacts, RetireOutcome},
    record::{Drain, DrainTrigger, Phase, Replacement, SeatState},
};
use crate::{keys, node};

/// Evictions asked per reconcile at most, so one step stays short.
const MAX_EVICTIONS_PER_STEP: usize = 20;
/// Evictions of one node's step in flight at once.
const EVICTIONS_IN_FLIGHT: usize = 5;
/// How often to look again while evicted pods terminate (at their own grace period).
const TERMINATING_POLL: Duration = Duration::from_secs(1);

/// Drains the node when a trigger holds (webhook request, interruption notice, or the taint with
/// `--after-replacement retire`, the default), then retires it. Returns when to look again, if anything is left to do.
pub async fn lifecycle(node: &Node, ctx: &Context) -> Result<Option<Duration>> {
    if ctx.settings.dry_run {
        // A dry run never tainted the node, so there is nothing to drain or retire.
        return Ok(None);
    }
    let stored = ctx.written(node);
    let phase = stored.as_ref().map(|(phase, _)| *phase);
    let annotations = node::annotations(node);
    let Some(trigger) = lifecycle::drain_trigger(annotations, phase, ctx.settings.drain_after_taint) else {
        if annotations.contains_key(keys::DRAIN_REQUESTED) && !phase.is_some_and(Phase::is_finished) {
            // The node itself can write the request: without a record saying this controller
            // tainted it (its replacement Ready), it evicts nothing.
            let note = format!(
                "{} ignored: the node is not tainted by spot-rebalancer with a Ready replacement (phase {}); \
                 nothing is evicted",
                keys::DRAIN_REQUESTED,
                phase.map_or("none".to_owned(), |p| p.to_string())
            );
            ctx.event(node, EventType::Normal, "DrainRequestIgnored", note)
                .await;
        }
        return Ok(None);
    };
    let now = Timestamp::now();
    let Some((mut phase, mut record)) = stored else {
        return Ok(None);
    };
    let starting = record.drain.is_none();
    if starting {
        record.drain = Some(Drain {
            trigger,
            started_at: now,
            timed_out_at: None,
            completed_at: None,
        });
    }
    let draining_now = phase == Phase::Tainted;
    if draining_now {
        phase = Phase::Draining;
    }
    if starting || draining_now {
        write_record(node, ctx, phase, &record).await?;
    }
    if starting {
        let trigger_label = trigger_label(trigger);
        ctx.metrics.drains.with_label_values(&[trigger_label]).inc();
        let note = format!(
            "draining through the Eviction API at the pace of its PodDisruptionBudgets ({trigger_label})"
        );
        info!(%note, "drain started");
        ctx.event(node, EventType::Normal, "DrainStarted", note).await;
    }
    // Drained before this reconcile: pods may have landed since, so retiring looks once more.
    let drained_before = record.drain.as_ref().is_some_and(|d| d.completed_at.is_some());
    if !drained_before && let Some(wait) = drain_step(node, ctx, phase, &mut record).await? {
        return Ok(Some(wait));
    }
    if phase != Phase::Draining {
        // Drained early (an interruption notice before the replacement was Ready): the replacement
        // flow goes on, and retiring waits until it reaches Tainted.
        return Ok(None);
    }
    retire(node, ctx, record, drained_before).await
}

fn trigger_label(trigger: DrainTrigger) -> &'static str {
    match trigger {
        DrainTrigger::Requested => "requested",
        DrainTrigger::Interruption => "interruption",
        DrainTrigger::AfterTaint => "after-taint",
    }
}

/// One bounded drain step: evict up to [`MAX_EVICTIONS_PER_STEP`] pods, each at its own grace period.
/// Returns when to look again, or `None` once no workload pod is left (recorded).
async fn drain_step(
    node: &Node,
    ctx: &Context,
    phase: Phase,
    record: &mut Replacement,
) -> Result<Option<Duration>> {
    let name = node.name_any();
    let pace = lock(&ctx.drain_rounds).get(&name).copied();
    if let Some(pace) = pace {
        let left = pace.next_at.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            return Ok(Some(left));
        }
    }
    let pods = pods_on(ctx, &name).await?;
    let step = pace.map_or(0, |pace| pace.steps);
    let plan = lifecycle::plan_drain(&pods, MAX_EVICTIONS_PER_STEP, step);
    let now = Timestamp::now();
    let Some(drain) = record.drain.as_mut() else {
        return Ok(None);
    };
    if plan.is_done() {
        lock(&ctx.drain_rounds).remove(&name);
        drain.completed_at = Some(now);
        let took = now.duration_since(drain.started_at).as_secs_f64();
        write_record(node, ctx, phase, record).await?;
        let note = format!(
            "drained in {took:.1} s: no workload pod left ({} DaemonSet or mirror pod(s) stay)",
            plan.left
        );
        info!(%note, "drained");
        ctx.event(node, EventType::Normal, "Drained", note).await;
        return Ok(None);
    }

    // A few evictions in flight at once: each waits on the API server's PDB check, and a step over
    // 20 pods one by one would spend seconds on round trips. PDBs stay safe: the API server admits
    // each eviction against the budget atomically.
    let answers: Vec<(String, Eviction)> = futures::stream::iter(plan.evict.clone())
        .map(|(namespace, pod)| {
            let api: Api<Pod> = Api::namespaced(ctx.evictions.clone(), &namespace);
            async move { evict(&api, &namespace, &pod).await }
        })
        .buffer_unordered(EVICTIONS_IN_FLIGHT)
        .collect()
        .await;
    let mut evicted = Vec::new();
    let mut refused = 0;
    for (pod, answer) in answers {
        ctx.metrics.evictions.with_label_values(&[answer.label()]).inc();
        match answer {
            Eviction::Evicted => evicted.push(pod),
            Eviction::Blocked | Eviction::Failed => refused += 1,
            Eviction::Gone => {}
        }
    }
    evicted.sort();

    let all_refused = evicted.is_empty() && refused > 0 && plan.terminating == 0;
    let wait = {
        let mut paces = lock(&ctx.drain_rounds);
        let pace = paces.entry(name.clone()).or_insert(DrainPace {
            steps: 0,
            blocked_rounds: 0,
            next_at: Instant::now(),
        });
        pace.steps += 1;
        pace.blocked_rounds = if all_refused { pace.blocked_rounds + 1 } else { 0 };
        let wait = if all_refused {
            lifecycle::eviction_backoff(pace.blocked_rounds)
        } else {
            TERMINATING_POLL
        };
        pace.next_at = Instant::now() + wait;
        wait
    };

    if !evicted.is_empty() {
        let note = format!(
            "evicted {} pod(s): {}{}",
            evicted.len(),
            evicted.join(", "),
            if refused > 0 {
                format!("; {refused} wait for their PodDisruptionBudgets")
            } else {
                String::new()
            }
        );
        info!(%note, "evicted");
        ctx.event(node, EventType::Normal, "Evicted", note).await;
    }
    if drain.timed_out_at.is_none()
        && lifecycle::drain_overdue(drain.started_at, now, ctx.settings.drain_timeout)
    {
        drain.timed_out_at = Some(now);
        let started_at = drain.started_at;
        write_record(node, ctx, phase, record).await?;
        ctx.metrics.drain_timeouts.inc();
        let remaining = plan.evict.len() + plan.deferred + plan.terminating;
        let note = format!(
            "drain started at {started_at} is not done after {}: {remaining} pod(s) left, {refused} refused by \
             PodDisruptionBudgets; nothing is forced, evictions go on at the PDBs' pace",
            humantime::format_duration(ctx.settings.drain_timeout.unsigned_abs())
        );
        warn!(%note, "drain timed out");
        ctx.event(node, EventType::Warning, "DrainTimedOut", note).await;
    }
    Ok(Some(wait))
}

/// How the Eviction API answered for one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eviction {
    Evicted,
    /// 429: a PodDisruptionBudget has no disruption left to give now.
    Blocked,
    /// The pod was gone already.
    Gone,
    Failed,
}

impl Eviction {
    /// The `result` label of `evictions_total`.
    fn label(self) -> &'static str {
        match self {
            Eviction::Evicted => "evicted",
            Eviction::Blocked => "blocked",
            Eviction::Gone => "gone",
            Eviction::Failed => "error",
        }
    }
}

/// Evicts one pod through the Eviction API; returns `namespace/pod` and how it went.
async fn evict(api: &Api<Pod>, namespace: &str, pod: &str) -> (String, Eviction) {
    let answer = match api.evict(pod, &EvictParams::default()).await {
        Ok(_) => Eviction::Evicted,
        Err(kube::Error::Api(status)) if status.code == 429 => Eviction::Blocked,
        Err(kube::Error::Api(status)) if status.is_not_found() => Eviction::Gone,
        Err(error) => {
            warn!(pod = %format!("{namespace}/{pod}"), %error, "eviction failed; retrying later");
            Eviction::Failed
        }
    };
    (format!("{namespace}/{pod}"), answer)
}

/// The node's pods, listed by field selector `spec.nodeName` (the API server indexes it): drains are
/// rare and short, so a list per step costs less than a watch cache of every pod in the cluster.
pub(super) async fn pods_on(ctx: &Context, node: &str) -> Result<Vec<PodFacts>> {
    let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let pods = Api::<Pod>::all(ctx.client.clone())
        .list(&params)
        .await
        .map_err(|source| Error::Kube {
            action: "listing the pods",
            node: node.to_owned(),
            source,
        })?;
    Ok(pods.items.iter().map(PodFacts::of).collect())
}

/// The node is drained: remove its instance with a decrement when a replacement of ours stands in for
/// it (phase Retired), else leave the instance to its owner (phase Drained).
async fn retire(
    node: &Node,
    ctx: &Context,
    mut record: Replacement,
    look_again: bool,
) -> Result<Option<Duration>> {
    let (Some(instance), true) = (old_instance(node), lifecycle::retirable(&record)) else {
        write_record(node, ctx, Phase::Drained, &record).await?;
        let note = "drained; no replacement of this controller stands in for it, so its instance is left to \
                    its owner"
            .to_owned();
        ctx.event(node, EventType::Normal, "DrainedNotRetired", note)
            .await;
        return Ok(None);
    };
    let asg = record
        .instance_asg
        .clone()
        .unwrap_or_else(|| record.spot_asg.clone());
    let _sending = ctx.sending_on(&asg).await;
    let group = ctx.group(&asg, true).await?;
    let seat = ctx.seat(instance);
    let desired_before = match seat.as_ref().map(|s| &s.state) {
        Some(SeatState::Retiring { desired_before }) => *desired_before,
        _ => group.desired,
    };
    match lifecycle::retire_outcome(desired_before, &group, instance) {
        RetireOutcome::Pending => {
            // The drain ended in an earlier reconcile (it waited for the taint, or for AWS): a pod
            // that tolerates the taint may have landed since. Evict it first; never terminate under
            // it. (A drain that ended just now has just listed the pods.)
            let landed = if look_again {
                pods_on(ctx, &node.name_any())
                    .await?
                    .iter()
                    .filter(|pod| pod.is_workload())
                    .count()
            } else {
                0
            };
            if landed > 0 {
                info!(node = %node.name_any(), landed, "pods landed on the drained node; draining again");
                if let Some(drain) = record.drain.as_mut() {
                    drain.completed_at = None;
                }
                write_record(node, ctx, Phase::Draining, &record).await?;
                return Ok(Some(TERMINATING_POLL));
            }
            if let Some(mut seat) = seat.filter(|s| !matches!(s.state, SeatState::Retiring { .. })) {
                seat.state = SeatState::Retiring { desired_before };
                seat.updated_at = Timestamp::now();
                ctx.put_seat(seat).await?;
            }
            ctx.terminate_with_decrement(instance).await?;
        }
        RetireOutcome::Done => {}
        RetireOutcome::BelowMinSize(leave) => {
            return left_at_min_size(node, ctx, record, instance, &group.name, leave).await;
        }
        RetireOutcome::WentWithoutUs => {
            // Someone else removed it without a decrement: the capacity sweeper gives its seat
            // back once the Node is gone.
            return Ok(Some(ctx.settings.asg_poll_interval));
        }
    }
    ctx.forget_views(&asg);
    if let Some(mut seat) = ctx.seat(instance) {
        seat.state = SeatState::Retired;
        seat.updated_at = Timestamp::now();
        ctx.put_seat(seat).await?;
    }
    ctx.metrics.retirements.inc();
    let note = format!(
        "retired: removed instance {instance} from {asg} with a decrement (desired capacity {desired_before} → {})",
        desired_before - 1
    );
    info!(%note, "retired");
    ctx.event(node, EventType::Normal, "Retired", note).await;
    record.retired_at = Some(Timestamp::now());
    match write_record(node, ctx, Phase::Retired, &record).await {
        Err(Error::Record(crate::controller::records::Error::Missing { .. })) => {}
        other => other?,
    }
    release_replacement(ctx, record.instance_id.as_deref()).await;
    Ok(None)
}

/// The drained instance cannot be removed with a decrement: its ASG is at MinSize. It is left
/// running (drained and tainted), its seat marked as left with the reason, and a Warning and a
/// metric say so: no call is made that AWS would refuse at every try.
async fn left_at_min_size(
    node: &Node,
    ctx: &Context,
    mut record: Replacement,
    instance: &str,
    asg: &str,
    leave: super::record::Undo,
) -> Result<Option<Duration>> {
    let reason = match &leave {
        super::record::Undo::Leave { reason } => reason.clone(),
        other => format!("{other:?}"),
    };
    if let Some(mut seat) = ctx.seat(instance) {
        seat.state = SeatState::Restored { undo: leave };
        seat.updated_at = Timestamp::now();
        ctx.put_seat(seat).await?;
    }
    record.reason = Some(reason.clone());
    write_record(node, ctx, Phase::Drained, &record).await?;
    ctx.metrics.min_size_refusals.with_label_values(&[asg]).inc();
    let note = format!("drained but not retired: {reason}");
    warn!(%note, "retirement refused by MinSize");
    ctx.event(node, EventType::Warning, "RetirementBelowMinSize", note)
        .await;
    release_replacement(ctx, record.instance_id.as_deref()).await;
    Ok(None)
}

/// The replacement no longer stands in for a node about to go: cluster-autoscaler may manage it again.
pub(super) async fn release_replacement(ctx: &Context, instance: Option<&str>) {
    let Some(replacement) = instance.and_then(|i| ctx.node_of_instance(i)) else {
        return;
    };
    if !node::annotations(&replacement).contains_key(SCALE_DOWN_DISABLED) {
        return;
    }
    let name = replacement.name_any();
    let patch = json!({"metadata": {"annotations": {SCALE_DOWN_DISABLED: null}}});
    if let Err(error) = ctx
        .nodes()
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        warn!(node = %name, %error, "removing the scale-down-disabled annotation failed");
    }
}
