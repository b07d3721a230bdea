//! Instances that went without us: AWS reclaimed the spot instance, or someone terminated it without a
//! decrement, and its Node (with its record) went with it. The ASG refills such a seat, on top of the
//! +1 this controller added, so a sweeper reads the seats in the records and gives each such seat back:
//! exactly once (the plan is written to the record before the call, and re-checked against the ASG
//! after a restart), never below the pre-notice size, never by letting the ASG pick a busy instance.
use std::{collections::HashSet, sync::Arc};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::{events::EventType, reflector::ObjectRef};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    context::{Context, Result, old_instance},
    drain::{pods_on, release_replacement},
    lifecycle::{self, Membership, RetireOutcome},
    record::{Seat, SeatState, Undo},
};

/// Runs until `stop`: once the Node cache is `synced` (a Node missing from an unsynced cache is not
/// gone), looks at the seats every `--asg-poll-interval`.
pub async fn sweep_until(ctx: Arc<Context>, stop: CancellationToken, synced: CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = synced.cancelled() => {}
    }
    loop {
        sweep(&ctx).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ctx.settings.asg_poll_interval) => {}
        }
    }
}

/// One look at every seat. A seat that fails (its ASG deleted, a call AWS refuses) is
/// logged and counted, and the others are still looked after.
async fn sweep(ctx: &Context) {
    if ctx.settings.dry_run {
        return;
    }
    for seat in ctx.seats() {
        let instance = seat.instance.clone();
        if let Err(error) = look_after(ctx, seat).await {
            warn!(%error, instance, "giving back a seat failed; retrying at the next sweep");
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[error.metric_label()])
                .inc();
        }
    }
}

async fn look_after(ctx: &Context, seat: Seat) -> Result<()> {
    let present = ctx
        .all_nodes
        .get(&ObjectRef::new(&seat.node))
        .is_some_and(|node| old_instance(&node) == Some(seat.instance.as_str()));
    if lifecycle::prunable(&seat, present, Timestamp::now()) {
        return Ok(ctx.records.delete(&seat.instance).await?);
    }
    // While the Node is there, its own reconcile drains and retires it.
    if !present && seat.state.is_open() {
        give_back(ctx, seat).await?;
    }
    Ok(())
}

/// The Node of an open seat is gone: find out what happened to its instance and act on it.
async fn give_back(ctx: &Context, seat: Seat) -> Result<()> {
    let asg = seat.instance_asg.clone();
    let _sending = ctx.sending_on(&asg).await;
    // Read again under the ASG's lock: a retirement may have moved the seat on meanwhile.
    let Some(mut seat) = ctx.seat(&seat.instance).filter(|s| s.state.is_open()) else {
        return Ok(());
    };
    let group = ctx.group(&asg, true).await?;
    let node = node_reference(&seat.node);
    let membership = lifecycle::membership(&group, &seat.instance);
    let undo = match seat.state.clone() {
        SeatState::Active => {
            if membership == Membership::Serving {
                // The Node went but the instance serves on: nothing was reclaimed (yet).
                return Ok(());
            }
            plan(ctx, &seat, &group).await?
        }
        SeatState::Retiring { desired_before } => {
            match lifecycle::retire_outcome(desired_before, &group, &seat.instance) {
                RetireOutcome::Pending => {
                    ctx.terminate_with_decrement(&seat.instance).await?;
                    return retired(ctx, seat, &node, desired_before).await;
                }
                RetireOutcome::Done => return retired(ctx, seat, &node, desired_before).await,
                RetireOutcome::BelowMinSize(leave) => leave,
                RetireOutcome::WentWithoutUs => plan(ctx, &seat, &group).await?,
            }
        }
        SeatState::Restoring { undo } => undo,
        SeatState::Withdrawn | SeatState::Retired | SeatState::Restored { .. } => return Ok(()),
    };
    if !matches!(seat.state, SeatState::Restoring { .. }) {
        seat.state = SeatState::Restoring { undo: undo.clone() };
        seat.updated_at = Timestamp::now();
        ctx.put_seat(seat.clone()).await?;
    }
    if lifecycle::restore_pending(&undo, &group) {
        ctx.carry_out(&asg, &undo).await?;
        ctx.forget_views(&asg);
    }
    let (how, type_, reason, note) = match &undo {
        Undo::Lower { from, to } => (
            "lower",
            EventType::Normal,
            "CapacityRestored",
            format!(
                "instance {} left {asg} without us; gave its seat back: desired capacity {from} → {to}",
                seat.instance
            ),
        ),
        Undo::Terminate { instance } => (
            "terminate",
            EventType::Normal,
            "CapacityRestored",
            format!(
                "instance {} left {asg} without us and the ASG refilled its seat; removed the refill {instance} \
                 with a decrement",
                seat.instance
            ),
        ),
        Undo::Leave { reason } => (
            "leave",
            EventType::Warning,
            "CapacityLeft",
            format!(
                "instance {} left {asg} without us; its seat is not given back: {reason}",
                seat.instance
            ),
        ),
    };
    ctx.metrics.capacity_restores.with_label_values(&[how]).inc();
    if lifecycle::left_for_min_size(&undo, &group) {
        ctx.metrics
            .min_size_refusals
            .with_label_values(&[asg.as_str()])
            .inc();
    }
    let claimed = seat.claimed.clone();
    let gone_node = seat.node.clone();
    let (seat_instance, seat_asg) = (seat.instance.clone(), seat.instance_asg.clone());
    seat.state = SeatState::Restored { undo };
    seat.updated_at = Timestamp::now();
    ctx.put_seat(seat).await?;
    info!(%note, "capacity restored");
    ctx.notifier.send(&super::notify::Notification {
        node: gone_node,
        instance: Some(seat_instance),
        asg: Some(seat_asg),
        phase: reason.to_owned(),
        reason: Some(note.clone()),
    });
    ctx.event_on(&node, type_, reason, note).await;
    release_replacement(ctx, claimed.as_deref()).await;
    Ok(())
}

/// Plans how to give the seat back, from the group as it is and the pods on the candidate Nodes.
async fn plan(ctx: &Context, seat: &Seat, group: &crate::aws::Group) -> Result<Undo> {
    let mut claimed: HashSet<String> = ctx
        .records()
        .values()
        .filter_map(|(_, record)| record.instance_id.clone())
        .collect();
    claimed.extend(
        ctx.seats()
            .into_iter()
            .filter(|s| s.state.is_open())
            .filter_map(|s| s.claimed),
    );
    let mut busy = HashSet::new();
    for instance in &group.instances {
        if seat.seat_instances.contains(&instance.id) || claimed.contains(&instance.id) {
            continue;
        }
        if let Some(node) = ctx.node_of_instance(&instance.id) {
            let pods = pods_on(ctx, &kube::ResourceExt::name_any(node.as_ref())).await?;
            if pods.iter().any(lifecycle::PodFacts::is_workload) {
                busy.insert(instance.id.clone());
            }
        }
    }
    Ok(lifecycle::plan_restore(seat, group, &claimed, &busy))
}

async fn retired(ctx: &Context, mut seat: Seat, node: &ObjectReference, desired_before: i32) -> Result<()> {
    ctx.forget_views(&seat.instance_asg);
    let note = format!(
        "retired: removed instance {} from {} with a decrement (desired capacity {desired_before} → {})",
        seat.instance,
        seat.instance_asg,
        desired_before - 1
    );
    let claimed = seat.claimed.clone();
    seat.state = SeatState::Retired;
    seat.updated_at = Timestamp::now();
    ctx.put_seat(seat).await?;
    ctx.metrics.retirements.inc();
    ctx.event_on(node, EventType::Normal, "Retired", note).await;
    release_replacement(ctx, claimed.as_deref()).await;
    Ok(())
}

fn node_reference(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.to_owned()),
        ..ObjectReference::default()
    }
}
