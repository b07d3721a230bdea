//! The state machine's hands: each [`Act`] the machine asks for, made against AWS or the API
//! server, and each [`Report`] told as a log line, an Event and a metric. Every action here is
//! safe to repeat: a taint that is there is not added again, a raise never lowers and reads the
//! ASG fresh first, a termination checks its target against the records right before the call.
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::EventType,
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    context::{
        AsgState, Context, Error, MAX_BURST_WAIT, MAX_COALESCE_WAIT, PROTECTION_FIELD_MANAGER, Result,
        SCALE_DOWN_DISABLED, lock, members,
    },
    decide,
    machine::{Act, Report, Tick},
    record::{CapacityType, ScaleIntent, Undo},
};
use crate::node;

/// Whether an action was taken, or put off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Yes,
    /// Not yet: look again after this long.
    Deferred(Duration),
}

/// Takes one action for `node`.
pub async fn act(ctx: &Context, node: &Node, act: &Act) -> Result<Done> {
    match act {
        Act::Taint { why } => taint(ctx, node, why).await.map(|()| Done::Yes),
        Act::ProtectReplacement { node } => protect(ctx, node).await.map(|()| Done::Yes),
        Act::Ensure { intent } => {
            let state = ctx.asg(&intent.asg);
            if let Some(wait) = still_coalescing(ctx, &state) {
                return Ok(Done::Deferred(look_again(&state, wait)));
            }
            if let Some(target) = ensure_desired(ctx, intent).await? {
                let note = format!(
                    "asked {} ({:?}) for desired capacity {target}",
                    intent.asg, intent.capacity_type
                );
                info!(%note, "scaling");
                ctx.event(node, EventType::Normal, "ScalingUp", note).await;
            }
            Ok(Done::Yes)
        }
        Act::Undo { asg, undo } => {
            let _sending = ctx.sending_on(asg).await;
            if let Undo::Terminate { instance } = undo {
                refuse_serving_target(ctx, &node.name_any(), instance)?;
            }
            ctx.carry_out(asg, undo).await.map(|()| Done::Yes)
        }
    }
}

/// Right before a termination by id: the instance must not be another record's claimed
/// replacement, nor the noticed instance of any record (a serving node). The plan was made on
/// records that may have moved on since.
fn refuse_serving_target(ctx: &Context, node: &str, instance: &str) -> Result<()> {
    let serving = ctx.records.all().into_iter().find_map(|object| {
        let status = object.status.as_ref()?;
        let claims = status.record.instance_id.as_deref() == Some(instance)
            && object.spec.node_name != node
            && !status.phase.is_finished();
        (claims || object.spec.instance_id == instance).then(|| object.spec.node_name.clone())
    });
    match serving {
        Some(owner) => Err(Error::Refused(format!(
            "not terminating {instance}: the record of node {owner} names it; the undo is planned again"
        ))),
        None => Ok(()),
    }
}

/// Tells `report`: a log line, an Event on the node, and its metric.
pub async fn report(ctx: &Context, node: &Node, report: &Report) {
    let Report {
        warning,
        reason,
        note,
        tick,
    } = report;
    if *warning {
        warn!(%note, reason, "replacement");
    } else {
        info!(%note, reason, "replacement");
    }
    if let Some(tick) = tick {
        count(ctx, tick);
    }
    let type_ = if *warning {
        EventType::Warning
    } else {
        EventType::Normal
    };
    ctx.event(node, type_, reason, note.clone()).await;
}

fn count(ctx: &Context, tick: &Tick) {
    let metrics = &ctx.metrics;
    match tick {
        Tick::Notice => metrics.notices.inc(),
        Tick::Skipped => metrics.skipped.inc(),
        Tick::Failed => metrics.failed.inc(),
        Tick::Fallback { spot_asg } => metrics.fallbacks.with_label_values(&[spot_asg.as_str()]).inc(),
        Tick::DryRunScaleUp { asg, capacity_type } => metrics
            .scale_ups
            .with_label_values(&[asg.as_str(), capacity_label(*capacity_type), "dry_run"])
            .inc(),
        Tick::Ready { asg, seconds } => metrics
            .replacement_ready_seconds
            .with_label_values(&[asg.as_str()])
            .observe(*seconds),
        Tick::Released { asg } => metrics.released.with_label_values(&[asg.as_str()]).inc(),
        Tick::Retried => metrics.retried.inc(),
    }
}

pub fn capacity_label(capacity_type: CapacityType) -> &'static str {
    match capacity_type {
        CapacityType::Spot => "spot",
        CapacityType::OnDemand => "on-demand",
    }
}

/// Rule 2: before a call, let concurrent notices on the ASG write their intents (none still
/// detecting or deciding, none written for a coalesce window), so one call covers them all; but
/// never put a call off longer than [`MAX_COALESCE_WAIT`] after the first intent it covers, or
/// [`MAX_BURST_WAIT`] while notices the Node watch delivered are still waiting for their first
/// reconcile. The wait is a requeue, not a sleep: a sleeping reconcile would hold a worker the next
/// notices need.
fn still_coalescing(ctx: &Context, state: &AsgState) -> Option<Duration> {
    let window = ctx.settings.coalesce_window;
    let waited = lock(&state.uncalled_since).map(|since| since.elapsed());
    let busy = ctx.detecting.load(std::sync::atomic::Ordering::SeqCst) > 0
        || state.pending.load(std::sync::atomic::Ordering::SeqCst) > 0;
    let quiet = lock(&state.last_intent).is_none_or(|at| at.elapsed() >= window);
    hold_call(waited, busy, quiet, ctx.notices_arriving()).then_some(window.max(Duration::from_millis(10)))
}

/// Whether a call that `waited` since the first intent it covers is put off: while notices are on
/// their way to an intent (`busy`), intents are still coming in (not `quiet`), or notices seen by
/// the watch have not reached the reconciler (`arriving`), up to the longest wait for each.
fn hold_call(waited: Option<Duration>, busy: bool, quiet: bool, arriving: bool) -> bool {
    let waited = waited.unwrap_or_default();
    ((busy || !quiet) && waited < MAX_COALESCE_WAIT) || (arriving && waited < MAX_BURST_WAIT)
}

/// How long a put-off call waits before its next look: `wait` for the one reconcile that looks
/// again for the ASG; [`MAX_COALESCE_WAIT`] for the others, whose intents that look's call covers
/// (they look again in case it failed). Without this, each scale-up of a burst of a hundred came
/// back every coalesce window, and the reconciles of new notices waited behind them.
fn look_again(state: &AsgState, wait: Duration) -> Duration {
    let now = Instant::now();
    let mut next_look = lock(&state.next_look);
    match *next_look {
        Some(due) if due > now => MAX_COALESCE_WAIT,
        _ => {
            *next_look = Some(now + wait);
            wait
        }
    }
}

/// Makes the group's desired capacity cover every member's intent (also after a crash between
/// intent and call). Only ever raises, and reads the ASG fresh right before, under the ASG's send
/// lock, so a capacity another actor raised is never lowered and no call rests on a view from
/// before this process's last one. Returns the target it set, if it made a call.
async fn ensure_desired(ctx: &Context, intent: &ScaleIntent) -> Result<Option<i32>> {
    let asked = Instant::now();
    let _sending = ctx.sending_on(&intent.asg).await;
    // Every intent written so far is covered by what follows.
    *lock(&ctx.asg(&intent.asg).uncalled_since) = None;
    // A describe begun after this call was asked for, with no call of this process since, is as
    // fresh as one made now: the reconciles queued on the send lock share one instead of making
    // one each.
    let group = ctx.group_within(&intent.asg, asked.elapsed()).await?;
    let records = ctx.records();
    let members = members(&records);
    let target = decide::group_target(intent, &members, group.max, ctx.settings.surge_above_max);
    if group.desired >= target {
        return Ok(None);
    }
    set_desired(ctx, &intent.asg, intent.capacity_type, target, group.max).await?;
    Ok(Some(target))
}

/// Sets the desired capacity to `target`; above the group's `max` (only when surging is allowed) it
/// raises MaxSize with it, since AWS refuses a SetDesiredCapacity above MaxSize.
async fn set_desired(
    ctx: &Context,
    asg: &str,
    capacity_type: CapacityType,
    target: i32,
    max: i32,
) -> Result<()> {
    let label = capacity_label(capacity_type);
    ctx.forget_views(asg);
    let sent = if target > max {
        info!(asg, from = max, to = target, "raising MaxSize to surge above it");
        ctx.metrics
            .aws_calls
            .with_label_values(&["UpdateAutoScalingGroup"])
            .inc();
        ctx.aws.raise_max_and_desired(asg, target).await
    } else {
        ctx.metrics
            .aws_calls
            .with_label_values(&["SetDesiredCapacity"])
            .inc();
        ctx.aws.set_desired(asg, target).await
    };
    // Again once the call is answered: a describe that began after the first drop and ended
    // before AWS applied the call would otherwise be kept, and the next scale-up would read the
    // desired capacity from before this call and raise it again.
    ctx.forget_views(asg);
    let result = if sent.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .scale_ups
        .with_label_values(&[asg, label, result])
        .inc();
    Ok(sent?)
}

pub fn taint_text(taint: &Taint) -> String {
    format!(
        "{}={}:{}",
        taint.key,
        taint.value.as_deref().unwrap_or_default(),
        taint.effect
    )
}

/// Adds the termination taint, guarded by the node's resourceVersion so no other change is lost.
async fn taint(ctx: &Context, node: &Node, why: &'static str) -> Result<()> {
    let name = node.name_any();
    let api = ctx.nodes();
    let kube_error = |source| Error::Kube {
        action: "tainting",
        node: name.clone(),
        source,
    };
    let current = api.get(&name).await.map_err(kube_error)?;
    let wanted = &ctx.settings.taint;
    if node::has_taint(&current, &wanted.key, &wanted.effect) {
        return Ok(());
    }
    let mut taints = node::taints(&current).to_vec();
    taints.push(Taint {
        time_added: None,
        ..wanted.clone()
    });
    let patch = json!({
        "metadata": {"resourceVersion": current.resource_version()},
        "spec": {"taints": taints},
    });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube_error)?;
    ctx.metrics.taints.with_label_values(&[why]).inc();
    info!(taint = %taint_text(wanted), why, "tainted");
    Ok(())
}

/// Keeps cluster-autoscaler from scaling the replacement down while it takes the old node's pods.
async fn protect(ctx: &Context, replacement: &str) -> Result<()> {
    let patch = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": replacement, "annotations": {SCALE_DOWN_DISABLED: "true"}},
    });
    ctx.nodes()
        .patch(
            replacement,
            &PatchParams::apply(PROTECTION_FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Kube {
            action: "annotating the replacement",
            node: replacement.to_owned(),
            source,
        })?;
    Ok(())
}

/// Records that the scale-up call of `node`'s current intent failed, and since when: the machine
/// gives the scale-up up once it has failed for `--capacity-timeout`. Only the error's kind goes
/// into the record (readable by anyone who can read the controller's namespace); the whole text,
/// which may name an account or a role, stays in the log.
pub async fn note_failing_call(ctx: &Context, node: &Node, error: &Error) -> Result<()> {
    let Some(status) = ctx.status_of(node) else {
        return Ok(());
    };
    let mut record = status.record;
    record.failing_since.get_or_insert(Timestamp::now());
    record.last_error = Some(error.metric_label().to_owned());
    super::context::write_record(node, ctx, status.phase, &record).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_waits_for_notices_on_their_way_but_never_longer_than_its_limit() {
        let s = Duration::from_secs;
        // Nothing on its way, the last intent a coalesce window ago: call now.
        assert!(!hold_call(Some(s(0)), false, true, false));
        assert!(!hold_call(None, false, true, false));
        // Notices deciding or intents still coming: wait, up to MAX_COALESCE_WAIT.
        assert!(hold_call(Some(s(1)), true, true, false));
        assert!(hold_call(Some(s(1)), false, false, false));
        assert!(!hold_call(Some(MAX_COALESCE_WAIT), true, false, false));
        // Notices the watch delivered and no reconcile has reached yet: up to MAX_BURST_WAIT.
        assert!(hold_call(Some(MAX_COALESCE_WAIT), false, true, true));
        assert!(hold_call(Some(MAX_BURST_WAIT - s(1)), true, false, true));
        assert!(!hold_call(Some(MAX_BURST_WAIT), true, false, true));
    }
}
