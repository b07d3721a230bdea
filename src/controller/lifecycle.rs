//! The end of a noticed node's life as plain functions of plain data: when a drain starts, which pods
//! a drain step evicts and which it leaves, how long it backs off, whether the drained node is ours to
//! retire, what a record's seat holds for a node, and how the seat of an instance that went
//! without us is given back. No I/O here; [`super::drain`] and [`super::records`] act on the answers.
use std::{collections::BTreeMap, collections::HashSet, time::Duration};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Pod;

use super::record::{DrainTrigger, Phase, Replacement, Seat, SeatState, Undo};
use crate::{aws::Group, keys};

/// Annotation the kubelet puts on mirror pods (static pods seen through the API): never evicted.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The first and the longest wait between eviction rounds that PDBs blocked entirely.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Whether the node should be drained now, and why: an interruption notice on a noticed node, then
/// the webhook's request, then replace-then-retire (`--after-replacement retire`, the default: the
/// node is tainted with its replacement Ready). The webhook's request is an annotation, which
/// the node itself can write too: it counts only on a node the record says this controller tainted
/// (replacement Ready), where it only makes a drain come sooner. A node that forges it gets nothing
/// evicted.
pub fn drain_trigger(
    annotations: &BTreeMap<String, String>,
    phase: Option<Phase>,
    drain_after_taint: bool,
) -> Option<DrainTrigger> {
    if phase.is_some_and(Phase::is_finished) {
        return None;
    }
    let tainted = matches!(phase, Some(Phase::Tainted | Phase::Draining));
    if annotations.contains_key(keys::DRAIN_REQUESTED) && tainted {
        return Some(DrainTrigger::Requested);
    }
    if annotations.contains_key(keys::INTERRUPTION_TIME) && phase.is_some() {
        return Some(DrainTrigger::Interruption);
    }
    (drain_after_taint && tainted).then_some(DrainTrigger::AfterTaint)
}

/// What a drain needs to know about one pod on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    /// Owned by a DaemonSet: it would come straight back, and it is the node's own plumbing.
    pub daemon_set: bool,
    /// A static pod's mirror: the API cannot remove it.
    pub mirror: bool,
    /// Succeeded or Failed: holds nothing.
    pub finished: bool,
    /// Already has a deletionTimestamp: going, at its own terminationGracePeriod.
    pub terminating: bool,
}

impl PodFacts {
    pub fn of(pod: &Pod) -> PodFacts {
        let metadata = &pod.metadata;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        PodFacts {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            name: metadata.name.clone().unwrap_or_default(),
            daemon_set: metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.kind == "DaemonSet"),
            mirror: metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION)),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
            terminating: metadata.deletion_timestamp.is_some(),
        }
    }

    /// A pod a drain must see gone before the node counts as empty.
    pub fn is_workload(&self) -> bool {
        !self.daemon_set && !self.mirror && !self.finished
    }
}

/// One drain step: the pods to evict now (at most `limit`), and what else is on the node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DrainPlan {
    /// `(namespace, name)` of the pods to ask the Eviction API about, in a stable order.
    pub evict: Vec<(String, String)>,
    /// Workload pods left for a later step (beyond `limit`).
    pub deferred: usize,
    /// Workload pods already terminating: waited for, never evicted again.
    pub terminating: usize,
    /// DaemonSet and mirror pods: left on the node.
    pub left: usize,
}

impl DrainPlan {
    /// No workload pod is left on the node, not even a terminating one.
    pub fn is_done(&self) -> bool {
        self.evict.is_empty() && self.deferred == 0 && self.terminating == 0
    }
}

/// Which pods a drain step evicts: every running workload pod not already terminating, `limit` at a
/// time so one step stays short; DaemonSet, mirror and finished pods are left. Step `step` starts
/// `step × limit` pods further along the (sorted) list, so pods a PDB blocks at the front never keep
/// the rest from being tried.
pub fn plan_drain(pods: &[PodFacts], limit: usize, step: usize) -> DrainPlan {
    let mut plan = DrainPlan::default();
    let mut candidates: Vec<&PodFacts> = Vec::new();
    for pod in pods {
        if pod.daemon_set || pod.mirror {
            plan.left += 1;
        } else if pod.terminating && !pod.finished {
            plan.terminating += 1;
        } else if !pod.finished {
            candidates.push(pod);
        }
    }
    candidates.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    if !candidates.is_empty() {
        let start = step.wrapping_mul(limit) % candidates.len();
        candidates.rotate_left(start);
    }
    plan.deferred = candidates.len().saturating_sub(limit);
    plan.evict = candidates
        .into_iter()
        .take(limit)
        .map(|p| (p.namespace.clone(), p.name.clone()))
        .collect();
    plan
}

/// How a node's drain is paced between reconciles (in memory: a restart just starts the backoff over).
#[derive(Debug, Clone, Copy)]
pub struct DrainPace {
    /// Steps taken so far: each starts further along the node's pods.
    pub steps: usize,
    pub blocked_rounds: u32,
    pub next_at: std::time::Instant,
}

/// The wait before the next eviction round after `blocked_rounds` rounds in a row in which every
/// eviction was refused (429 from a PDB): a ceiling of 1 s, doubling, at most 30 s, with jitter
/// ([`crate::backoff`]).
pub fn eviction_backoff(blocked_rounds: u32) -> Duration {
    crate::backoff::nth_wait(BACKOFF_FIRST, BACKOFF_MAX, blocked_rounds)
}

/// Whether a drain started at `started_at` has run past `timeout`.
pub fn drain_overdue(started_at: Timestamp, now: Timestamp, timeout: SignedDuration) -> bool {
    now.duration_since(started_at) >= timeout
}

/// A drained node is ours to retire when this controller added a replacement for it and that
/// replacement became Ready: then removing its instance with a decrement gives back exactly the +1.
pub fn retirable(record: &Replacement) -> bool {
    record.scale.is_some() && record.instance_id.is_some() && record.ready_at.is_some()
}

/// Where an instance stands in its ASG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A member that is not on its way out.
    Serving,
    /// A member in a `Terminating*` lifecycle state.
    Leaving,
    /// Not a member any more.
    Gone,
}

pub fn membership(group: &Group, instance: &str) -> Membership {
    match group.instances.iter().find(|i| i.id == instance) {
        None => Membership::Gone,
        Some(i) if i.lifecycle_state.starts_with("Terminating") => Membership::Leaving,
        Some(_) => Membership::Serving,
    }
}

/// The seat a node's record calls for, given the entry already there (`None`: nothing to
/// write). An entry starts with the node's first scale-up intent, so it is in the record before the
/// Auto Scaling call (the caller writes it before the record); it follows the claimed replacement and
/// a fallback; it becomes `Withdrawn` when the replacement flow took its +1 back. States the drain
/// and the sweeper own (Retiring, Retired, Restoring, Restored) are never overwritten from here.
pub fn tracked_seat(
    existing: Option<&Seat>,
    node: &str,
    instance: &str,
    phase: Phase,
    record: &Replacement,
    now: Timestamp,
) -> Option<Seat> {
    if existing.is_some_and(|seat| !matches!(seat.state, SeatState::Active | SeatState::Withdrawn)) {
        return None;
    }
    let live = phase.holds_a_scale_up() && record.scale.is_some();
    let Some(existing) = existing else {
        let scale = record.scale.as_ref().filter(|_| live)?;
        let instance_asg = record
            .instance_asg
            .clone()
            .unwrap_or_else(|| record.spot_asg.clone());
        let mut seat = Seat {
            node: node.to_owned(),
            instance: instance.to_owned(),
            instance_asg,
            seat_baseline: None,
            seat_instances: Vec::new(),
            scaled_asg: scale.asg.clone(),
            claimed: record.instance_id.clone(),
            state: SeatState::Active,
            updated_at: now,
        };
        fill_seat_baseline(&mut seat, record);
        return Some(seat);
    };
    let mut seat = existing.clone();
    match (&record.scale, live) {
        (Some(scale), true) => {
            seat.state = SeatState::Active;
            seat.scaled_asg = scale.asg.clone();
            seat.claimed = record.instance_id.clone();
        }
        _ => seat.state = SeatState::Withdrawn,
    }
    fill_seat_baseline(&mut seat, record);
    seat.updated_at = existing.updated_at;
    if &seat == existing {
        return None;
    }
    seat.updated_at = now;
    Some(seat)
}

/// The seat's ASG as it was before the notice: from the intent (or the abandoned intent) on it.
fn fill_seat_baseline(seat: &mut Seat, record: &Replacement) {
    if seat.seat_baseline.is_some() {
        return;
    }
    let on_seat = record
        .abandoned
        .iter()
        .map(|a| &a.scale)
        .chain(record.scale.as_ref())
        .find(|scale| scale.asg == seat.instance_asg);
    if let Some(scale) = on_seat {
        seat.seat_baseline = Some(scale.baseline);
        seat.seat_instances = scale.pre_scale_instances.clone();
    }
}

/// How to give back the seat of an instance that left its ASG without us (reclaimed, or terminated
/// by someone else without a decrement), so that the node count is what it was before the notice.
///
/// The ASG refills a seat lost without a decrement, so "back to the pre-notice value" means: take one
/// off the seat's ASG, exactly once. While nothing launched beyond the lowered value, lower the desired
/// capacity by one (the ASG has no instance to pick); otherwise remove one specific instance with a
/// decrement: one that launched since the notice, is not a claimed replacement and runs no workload
/// (`busy`). Never go below the seat's pre-notice desired capacity (less one when the +1 went to
/// another ASG): below that, another actor already lowered it.
pub fn plan_restore(seat: &Seat, group: &Group, claimed: &HashSet<String>, busy: &HashSet<String>) -> Undo {
    let Some(baseline) = seat.seat_baseline else {
        return Undo::Leave {
            reason: format!(
                "the desired capacity of {} before the notice is not known; left as it is",
                group.name
            ),
        };
    };
    let floor = if seat.scaled_asg == seat.instance_asg {
        baseline
    } else {
        baseline - 1
    };
    let lowered = group.desired - 1;
    if let Some(refusal) = below_min_size(group) {
        return refusal;
    }
    if lowered < floor {
        return Undo::Leave {
            reason: format!(
                "desired capacity of {} is {} already, at or below the {} it had before the notice; left as it is",
                group.name,
                group.desired,
                floor + 1
            ),
        };
    }
    let staying: Vec<_> = group
        .instances
        .iter()
        .filter(|i| !i.lifecycle_state.starts_with("Terminating"))
        .collect();
    if staying.len() as i32 <= lowered {
        return Undo::Lower {
            from: group.desired,
            to: lowered,
        };
    }
    let mut candidates: Vec<_> = staying
        .iter()
        .filter(|i| {
            i.id != seat.instance
                && !seat.seat_instances.contains(&i.id)
                && seat.claimed.as_deref() != Some(i.id.as_str())
                && !claimed.contains(&i.id)
                && !busy.contains(&i.id)
        })
        .collect();
    // An instance still launching carries the least; then by id, so the choice is stable.
    candidates.sort_by_key(|i| (i.in_service(), i.id.clone()));
    match candidates.first() {
        Some(instance) => Undo::Terminate {
            instance: instance.id.clone(),
        },
        None => Undo::Leave {
            reason: format!(
                "every instance of {} that launched since the notice is claimed or runs pods; none is \
                 terminated, so the desired capacity stays at {}",
                group.name, group.desired
            ),
        },
    }
}

/// AWS refuses to take the desired capacity of `group` below its MinSize (a lower, or a
/// termination with a decrement): the plan is to leave it, with the reason, instead of a call that
/// fails again at every try. The MinSize is the operator's; changing it is theirs too.
pub fn below_min_size(group: &Group) -> Option<Undo> {
    (group.desired - 1 < group.min).then(|| Undo::Leave {
        reason: format!(
            "{} is at its MinSize of {} (desired {}); taking one off would go below it, so the instance is \
             left (lower the MinSize to let it go)",
            group.name, group.min, group.desired
        ),
    })
}

/// Whether `undo` is the plan [`below_min_size`] makes for `group`: leaving it because of MinSize.
pub fn left_for_min_size(undo: &Undo, group: &Group) -> bool {
    matches!(undo, Undo::Leave { .. }) && below_min_size(group).is_some()
}

/// Whether a recorded restore still has to be carried out against the group as it is now.
pub fn restore_pending(undo: &Undo, group: &Group) -> bool {
    match undo {
        Undo::Lower { from, .. } => group.desired == *from,
        Undo::Terminate { instance } => membership(group, instance) == Membership::Serving,
        Undo::Leave { .. } => false,
    }
}

/// What became of a retirement whose intent was recorded (the process may have stopped right after).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetireOutcome {
    /// The instance still serves: make the call (again; it is safe).
    Pending,
    /// The instance left and the desired capacity went down with it: our call did it.
    Done,
    /// The instance left but the desired capacity did not drop: it went without us, so its seat must be
    /// given back like any instance reclaimed behind our back.
    WentWithoutUs,
    /// The instance serves, and removing it with a decrement would take the ASG below its MinSize:
    /// AWS would refuse, so it is left, with this plan (a Warning says why).
    BelowMinSize(Undo),
}

pub fn retire_outcome(desired_before: i32, group: &Group, instance: &str) -> RetireOutcome {
    match membership(group, instance) {
        Membership::Serving => {
            below_min_size(group).map_or(RetireOutcome::Pending, RetireOutcome::BelowMinSize)
        }
        _ if group.desired < desired_before => RetireOutcome::Done,
        _ => RetireOutcome::WentWithoutUs,
    }
}

/// Finished records are kept this long after their Node went, for `kubectl get` and restarts.
pub const FINISHED_SEAT_KEPT: SignedDuration = SignedDuration::from_hours(1);

/// Whether a finished entry whose Node is gone may be deleted.
pub fn prunable(seat: &Seat, node_present: bool, now: Timestamp) -> bool {
    !seat.state.is_open() && !node_present && now.duration_since(seat.updated_at) >= FINISHED_SEAT_KEPT
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::record::{Abandoned, CapacityType, ScaleIntent};

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn group(name: &str, desired: i32, instances: &[(&str, &str)]) -> Group {
        Group::for_tests(name, desired, 10, instances)
    }

    fn intent(asg: &str, baseline: i32, pre: &[&str]) -> ScaleIntent {
        ScaleIntent {
            asg: asg.into(),
            capacity_type: CapacityType::Spot,
            baseline,
            target_desired: baseline + 1,
            pre_scale_instances: pre.iter().map(|s| (*s).into()).collect(),
            scale_requested_at: at(0),
            activity_ids: Vec::new(),
        }
    }

    fn annotations(keys: &[&str]) -> BTreeMap<String, String> {
        keys.iter().map(|k| ((*k).to_owned(), "x".to_owned())).collect()
    }

    fn pod(name: &str) -> PodFacts {
        PodFacts {
            namespace: "ns".into(),
            name: name.into(),
            daemon_set: false,
            mirror: false,
            finished: false,
            terminating: false,
        }
    }

    fn seat(instance_asg: &str, scaled_asg: &str, baseline: i32, known: &[&str]) -> Seat {
        Seat {
            node: "old".into(),
            instance: "i-old".into(),
            instance_asg: instance_asg.into(),
            seat_baseline: Some(baseline),
            seat_instances: known.iter().map(|s| (*s).into()).collect(),
            scaled_asg: scaled_asg.into(),
            claimed: Some("i-new".into()),
            state: SeatState::Active,
            updated_at: at(0),
        }
    }

    #[test]
    fn a_drain_starts_on_request_on_interruption_or_after_the_taint_when_asked() {
        let none = annotations(&[]);
        assert_eq!(drain_trigger(&none, Some(Phase::Tainted), false), None);
        assert_eq!(
            drain_trigger(&none, Some(Phase::Tainted), true),
            Some(DrainTrigger::AfterTaint)
        );
        assert_eq!(
            drain_trigger(&none, Some(Phase::AwaitingReady), true),
            None,
            "after the taint only"
        );
        let interrupted = annotations(&[keys::INTERRUPTION_TIME]);
        assert_eq!(
            drain_trigger(&interrupted, Some(Phase::ScalingSpot), false),
            Some(DrainTrigger::Interruption)
        );
        let requested = annotations(&[keys::DRAIN_REQUESTED]);
        assert_eq!(
            drain_trigger(&requested, Some(Phase::Tainted), false),
            Some(DrainTrigger::Requested)
        );
        assert_eq!(
            drain_trigger(&requested, None, false),
            None,
            "a node can write the request itself: without a record of ours it drains nothing"
        );
        assert_eq!(
            drain_trigger(&requested, Some(Phase::AwaitingReady), false),
            None,
            "nor before the replacement is Ready"
        );
        assert_eq!(drain_trigger(&requested, Some(Phase::Retired), true), None);
    }

    #[test]
    fn a_drain_step_evicts_workload_pods_and_leaves_daemon_set_and_mirror_pods() {
        let pods = [
            pod("web-b"),
            PodFacts {
                daemon_set: true,
                ..pod("logs")
            },
            PodFacts {
                mirror: true,
                ..pod("kube-proxy")
            },
            PodFacts {
                finished: true,
                ..pod("job")
            },
            PodFacts {
                terminating: true,
                ..pod("web-c")
            },
            pod("web-a"),
        ];
        let plan = plan_drain(&pods, 10, 0);
        assert_eq!(
            plan.evict,
            vec![("ns".into(), "web-a".into()), ("ns".into(), "web-b".into())]
        );
        assert_eq!((plan.terminating, plan.left, plan.deferred), (1, 2, 0));
        assert!(!plan.is_done());
    }

    #[test]
    fn a_drain_step_is_bounded_and_done_only_when_no_workload_pod_is_left() {
        let pods = [pod("a"), pod("b"), pod("c")];
        let plan = plan_drain(&pods, 2, 0);
        assert_eq!((plan.evict.len(), plan.deferred), (2, 1));
        let left = [PodFacts {
            daemon_set: true,
            ..pod("logs")
        }];
        assert!(plan_drain(&left, 2, 0).is_done());
        let going = [PodFacts {
            terminating: true,
            ..pod("a")
        }];
        assert!(!plan_drain(&going, 2, 0).is_done(), "waits for terminating pods");
    }

    #[test]
    fn later_steps_try_the_pods_further_along_so_blocked_ones_hold_no_one_back() {
        let pods = [pod("a"), pod("b"), pod("c"), pod("d"), pod("e")];
        let names = |step| -> Vec<String> {
            plan_drain(&pods, 2, step)
                .evict
                .into_iter()
                .map(|(_, name)| name)
                .collect()
        };
        assert_eq!(names(0), ["a", "b"]);
        assert_eq!(names(1), ["c", "d"]);
        assert_eq!(names(2), ["e", "a"]);
        assert_eq!(plan_drain(&pods, 2, 2).deferred, 3);
        // Fewer candidates than the limit: every step tries them all.
        assert_eq!(plan_drain(&pods[..1], 2, 7).evict.len(), 1);
    }

    #[test]
    fn blocked_evictions_back_off_doubling_up_to_thirty_seconds() {
        let second = Duration::from_secs(1);
        for (rounds, ceiling) in [(0, 1), (1, 1), (3, 4), (10, 30), (u32::MAX, 30)] {
            let wait = eviction_backoff(rounds);
            let ceiling = ceiling * second;
            assert!((ceiling / 2..=ceiling).contains(&wait), "{rounds}: {wait:?}");
        }
    }

    #[test]
    fn a_drain_is_overdue_at_its_timeout() {
        let timeout = SignedDuration::from_mins(10);
        assert!(!drain_overdue(at(0), at(599), timeout));
        assert!(drain_overdue(at(0), at(600), timeout));
    }

    #[test]
    fn only_a_node_with_a_ready_replacement_of_ours_is_retired() {
        let mut record = Replacement::new("spot".into(), None, at(0));
        assert!(!retirable(&record));
        record.scale = Some(intent("spot", 1, &["i-old"]));
        record.instance_id = Some("i-new".into());
        assert!(!retirable(&record), "claimed but not Ready");
        record.ready_at = Some(at(5));
        assert!(retirable(&record));
    }

    #[test]
    fn membership_tells_serving_leaving_and_gone_apart() {
        let asg = group("spot", 2, &[("i-1", "InService"), ("i-2", "Terminating:Wait")]);
        assert_eq!(membership(&asg, "i-1"), Membership::Serving);
        assert_eq!(membership(&asg, "i-2"), Membership::Leaving);
        assert_eq!(membership(&asg, "i-3"), Membership::Gone);
    }

    #[test]
    fn the_ledger_tracks_a_seat_from_the_first_intent_and_follows_the_claim() {
        let mut record = Replacement::new("spot".into(), None, at(0));
        record.instance_asg = Some("spot".into());
        assert_eq!(
            tracked_seat(None, "old", "i-old", Phase::Detected, &record, at(1)),
            None
        );
        record.scale = Some(intent("spot", 3, &["i-old", "i-2", "i-3"]));
        let first = tracked_seat(None, "old", "i-old", Phase::ScalingSpot, &record, at(1)).unwrap();
        assert_eq!(first.state, SeatState::Active);
        assert_eq!((first.seat_baseline, first.seat_instances.len()), (Some(3), 3));
        assert_eq!(
            tracked_seat(Some(&first), "old", "i-old", Phase::ScalingSpot, &record, at(2)),
            None,
            "nothing new, no write"
        );
        record.instance_id = Some("i-new".into());
        let claimed =
            tracked_seat(Some(&first), "old", "i-old", Phase::AwaitingReady, &record, at(3)).unwrap();
        assert_eq!(claimed.claimed.as_deref(), Some("i-new"));
        assert_eq!(claimed.updated_at, at(3));
    }

    #[test]
    fn a_fallback_keeps_the_seat_baseline_of_the_spot_asg() {
        let mut record = Replacement::new("spot".into(), Some("od".into()), at(0));
        record.instance_asg = Some("spot".into());
        record.abandoned.push(Abandoned {
            scale: intent("spot", 2, &["i-old", "i-2"]),
            undo: Undo::Lower { from: 3, to: 2 },
            undone: true,
            cause: Default::default(),
        });
        record.scale = Some(intent("od", 0, &[]));
        let seat = tracked_seat(None, "old", "i-old", Phase::ScalingOnDemand, &record, at(1)).unwrap();
        assert_eq!((seat.scaled_asg.as_str(), seat.seat_baseline), ("od", Some(2)));
    }

    #[test]
    fn a_withdrawn_scale_up_marks_the_seat_and_retirements_are_never_overwritten() {
        let mut record = Replacement::new("spot".into(), None, at(0));
        record.instance_asg = Some("spot".into());
        record.scale = Some(intent("spot", 1, &["i-old"]));
        let seat = tracked_seat(None, "old", "i-old", Phase::ScalingSpot, &record, at(1)).unwrap();
        record.scale = None;
        let failed = tracked_seat(Some(&seat), "old", "i-old", Phase::Failed, &record, at(2)).unwrap();
        assert_eq!(failed.state, SeatState::Withdrawn);
        let retiring = Seat {
            state: SeatState::Retiring { desired_before: 2 },
            ..seat
        };
        assert_eq!(
            tracked_seat(Some(&retiring), "old", "i-old", Phase::Failed, &record, at(3)),
            None
        );
    }

    #[test]
    fn a_reclaimed_seat_is_given_back_by_removing_the_refill_never_the_replacement() {
        // Before: desired 1 (i-old). +1 → i-new (claimed). i-old reclaimed → the ASG refilled i-refill.
        let asg = group("spot", 2, &[("i-new", "InService"), ("i-refill", "Pending")]);
        let undo = plan_restore(
            &seat("spot", "spot", 1, &["i-old"]),
            &asg,
            &HashSet::new(),
            &HashSet::new(),
        );
        assert_eq!(
            undo,
            Undo::Terminate {
                instance: "i-refill".into()
            }
        );
    }

    #[test]
    fn a_reclaimed_seat_not_refilled_yet_is_given_back_by_lowering() {
        let asg = group("spot", 2, &[("i-new", "InService")]);
        let undo = plan_restore(
            &seat("spot", "spot", 1, &["i-old"]),
            &asg,
            &HashSet::new(),
            &HashSet::new(),
        );
        assert_eq!(undo, Undo::Lower { from: 2, to: 1 });
    }

    #[test]
    fn a_busy_refill_is_never_terminated() {
        let asg = group("spot", 2, &[("i-new", "InService"), ("i-refill", "InService")]);
        let busy: HashSet<String> = ["i-refill".to_owned()].into();
        let undo = plan_restore(&seat("spot", "spot", 1, &["i-old"]), &asg, &HashSet::new(), &busy);
        assert!(matches!(undo, Undo::Leave { .. }), "{undo:?}");
    }

    #[test]
    fn a_seat_is_never_given_back_below_its_pre_notice_capacity() {
        // Someone already took the +1 back: desired 1 with i-new and a refill.
        let asg = group("spot", 1, &[("i-new", "InService")]);
        let undo = plan_restore(
            &seat("spot", "spot", 1, &["i-old"]),
            &asg,
            &HashSet::new(),
            &HashSet::new(),
        );
        assert!(matches!(undo, Undo::Leave { .. }), "{undo:?}");
        // Another actor raised it meanwhile: only our one comes off.
        let raised = group("spot", 5, &[("i-new", "InService"), ("i-a", "InService")]);
        let undo = plan_restore(
            &seat("spot", "spot", 1, &["i-old"]),
            &raised,
            &HashSet::new(),
            &HashSet::new(),
        );
        assert_eq!(undo, Undo::Lower { from: 5, to: 4 });
    }

    #[test]
    fn a_seat_whose_replacement_came_from_on_demand_gives_back_the_spot_seat() {
        // Spot had 2 (i-old, i-2); the replacement is on-demand; i-old reclaimed, spot refilled i-refill.
        let spot = group("spot", 2, &[("i-2", "InService"), ("i-refill", "InService")]);
        let undo = plan_restore(
            &seat("spot", "od", 2, &["i-old", "i-2"]),
            &spot,
            &HashSet::new(),
            &HashSet::new(),
        );
        assert_eq!(
            undo,
            Undo::Terminate {
                instance: "i-refill".into()
            }
        );
    }

    #[test]
    fn a_seat_with_an_unknown_baseline_is_left_alone() {
        let asg = group("spot", 2, &[("i-new", "InService")]);
        let unknown = Seat {
            seat_baseline: None,
            ..seat("spot", "spot", 1, &[])
        };
        assert!(matches!(
            plan_restore(&unknown, &asg, &HashSet::new(), &HashSet::new()),
            Undo::Leave { .. }
        ));
    }

    #[test]
    fn min_size_forbids_a_retirement_a_restore_and_an_undo_instead_of_failing_at_every_try() {
        let mut fixed = group("spot", 2, &[("i-old", "InService"), ("i-2", "InService")]);
        fixed.min = 2;
        assert!(matches!(
            retire_outcome(2, &fixed, "i-old"),
            RetireOutcome::BelowMinSize(Undo::Leave { reason }) if reason.contains("MinSize of 2")
        ));
        assert!(
            matches!(below_min_size(&fixed), Some(Undo::Leave { reason }) if reason.contains("MinSize of 2"))
        );
        let seat = seat("spot", "spot", 1, &[]);
        assert!(matches!(
            plan_restore(&seat, &fixed, &HashSet::new(), &HashSet::new()),
            Undo::Leave { .. }
        ));
        fixed.min = 1;
        assert_eq!(below_min_size(&fixed), None);
        assert_eq!(retire_outcome(2, &fixed, "i-old"), RetireOutcome::Pending);
    }

    #[test]
    fn a_restore_is_pending_until_the_group_shows_it() {
        let asg = group("spot", 1, &[("i-new", "InService"), ("i-refill", "Terminating")]);
        assert!(!restore_pending(&Undo::Lower { from: 2, to: 1 }, &asg));
        assert!(restore_pending(&Undo::Lower { from: 1, to: 0 }, &asg));
        assert!(!restore_pending(
            &Undo::Terminate {
                instance: "i-refill".into()
            },
            &asg
        ));
        assert!(restore_pending(
            &Undo::Terminate {
                instance: "i-new".into()
            },
            &asg
        ));
    }

    #[test]
    fn a_recorded_retirement_is_told_apart_from_an_instance_that_went_without_us() {
        let serving = group("spot", 2, &[("i-old", "InService"), ("i-new", "InService")]);
        assert_eq!(retire_outcome(2, &serving, "i-old"), RetireOutcome::Pending);
        let decremented = group("spot", 1, &[("i-new", "InService")]);
        assert_eq!(retire_outcome(2, &decremented, "i-old"), RetireOutcome::Done);
        let reclaimed = group("spot", 2, &[("i-new", "InService"), ("i-refill", "Pending")]);
        assert_eq!(
            retire_outcome(2, &reclaimed, "i-old"),
            RetireOutcome::WentWithoutUs
        );
    }

    #[test]
    fn finished_entries_are_pruned_an_hour_after_their_node_went() {
        let mut done = seat("spot", "spot", 1, &[]);
        done.state = SeatState::Retired;
        assert!(!prunable(&done, false, at(60)));
        assert!(!prunable(&done, true, at(7200)));
        assert!(prunable(&done, false, at(3600)));
        done.state = SeatState::Active;
        assert!(!prunable(&done, false, at(7200)));
    }
}
