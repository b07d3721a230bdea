//! The controller's decisions as plain functions of plain data: which scale-up a notice joins and
//! what it aims for, whether spot capacity is gone, which new instance is whose replacement, and how
//! an abandoned scale-up is taken back. No I/O here; the reconciler acts on what these return.
use std::collections::HashSet;

use jiff::{SignedDuration, Timestamp};

use super::record::{CapacityType, Phase, ScaleIntent, Undo};
use crate::aws::{Activity, Group};

/// What a Failed activity says when EC2 had no capacity for the request.
const CAPACITY_MARKERS: &[&str] = &[
    "InsufficientInstanceCapacity",
    "UnfulfillableCapacity",
    "MaxSpotInstanceCountExceeded",
    "Could not launch Spot Instances",
];

/// Activities started this long before the scale-up was asked for still count: clocks differ.
const CLOCK_SLACK: SignedDuration = SignedDuration::from_secs(5);

/// A node's scale-up as others see it when coalescing: its phase and its intent.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub node: &'a str,
    pub phase: Phase,
    pub scale: &'a ScaleIntent,
}

/// Whether two scale-ups are one coalesced group: joined on the same ASG from the same baseline and
/// the same instances (a group started later from the same desired capacity, after another actor
/// scaled in, is a group of its own).
pub fn same_group(a: &ScaleIntent, b: &ScaleIntent) -> bool {
    a.asg == b.asg && a.baseline == b.baseline && a.pre_scale_instances == b.pre_scale_instances
}

/// The scale-up a new notice makes on `group`: it joins the group of scale-ups still waiting for
/// instances (same baseline, one more member), or starts a new one from the current desired
/// capacity. Ten notices at once are one group: baseline + 10, not ten read-add-write cycles.
pub fn coalesced_intent(
    me: &str,
    members: &[Member<'_>],
    group: &Group,
    capacity_type: CapacityType,
    now: Timestamp,
) -> ScaleIntent {
    let on_this_group = || {
        members
            .iter()
            .filter(|m| m.node != me && m.scale.asg == group.name)
    };
    let in_flight = on_this_group()
        .filter(|m| m.phase.is_scaling())
        .max_by_key(|m| m.scale.baseline);
    match in_flight {
        Some(joined) => {
            let baseline = joined.scale.baseline;
            let others = on_this_group()
                .filter(|m| same_group(m.scale, joined.scale))
                .count() as i32;
            ScaleIntent {
                asg: group.name.clone(),
                capacity_type,
                baseline,
                target_desired: baseline + others + 1,
                pre_scale_instances: joined.scale.pre_scale_instances.clone(),
                scale_requested_at: now,
                activity_ids: Vec::new(),
            }
        }
        None => ScaleIntent {
            asg: group.name.clone(),
            capacity_type,
            baseline: group.desired,
            target_desired: group.desired + 1,
            pre_scale_instances: group.instances.iter().map(|i| i.id.clone()).collect(),
            scale_requested_at: now,
            activity_ids: Vec::new(),
        },
    }
}

/// The desired capacity a group of coalesced scale-ups needs now: its baseline plus its members
/// (abandoned scale-ups are no longer members). Capped at the ASG's MaxSize unless surging is allowed.
pub fn group_target(intent: &ScaleIntent, members: &[Member<'_>], max: i32, surge_above_max: bool) -> i32 {
    let count = members
        .iter()
        .filter(|m| same_group(m.scale, intent))
        .count()
        .max(1) as i32;
    let target = intent.baseline + count;
    if surge_above_max { target } else { target.min(max) }
}

/// The desired capacities an activity's cause names, as AWS writes it: "… changing the desired
/// capacity from 3 to 4" or "… increasing the capacity from 3 to 4".
fn raise_in(cause: &str) -> Option<(i32, i32)> {
    let after = &cause[cause.find("capacity from ")? + "capacity from ".len()..];
    let (from, rest) = after.split_once(" to ")?;
    let to: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((from.trim().parse().ok()?, to.parse().ok()?))
}

/// Whether `activity` is a launch the scale-up `intent` caused: started after it was asked for, and
/// (when AWS says why) raising the group above the intent's baseline. A foreign scale-in, a refill
/// or a launch from before the request is not.
pub fn caused_by(activity: &Activity, intent: &ScaleIntent) -> bool {
    let since = intent.scale_requested_at - CLOCK_SLACK;
    if activity.start_time.is_some_and(|t| t < since) {
        return false;
    }
    match raise_in(&activity.cause) {
        Some((from, to)) => to > from && to > intent.baseline,
        None => activity.cause.is_empty(),
    }
}

/// The activities `intent` caused (rule 4), by id, in the order AWS listed them.
pub fn activities_of(activities: &[Activity], intent: &ScaleIntent) -> Vec<String> {
    activities
        .iter()
        .filter(|a| caused_by(a, intent))
        .map(|a| a.id.clone())
        .collect()
}

/// Why capacity counts as gone for the scale-up `intent`, if it does: a Failed launch it caused
/// whose message names capacity, or no replacement within `capacity_timeout`.
pub fn capacity_unavailable(
    activities: &[Activity],
    intent: &ScaleIntent,
    now: Timestamp,
    capacity_timeout: SignedDuration,
) -> Option<String> {
    let requested_at = intent.scale_requested_at;
    let failed = activities.iter().find(|a| {
        a.status == "Failed"
            && caused_by(a, intent)
            && CAPACITY_MARKERS
                .iter()
                .any(|m| a.status_message.contains(m) || a.description.contains(m))
    });
    if let Some(activity) = failed {
        return Some(format!(
            "scaling activity {} failed: {}",
            activity.id, activity.status_message
        ));
    }
    let waited = now.duration_since(requested_at);
    (waited >= capacity_timeout).then(|| {
        format!(
            "no new InService instance within {}",
            humantime::format_duration(unsigned(waited))
        )
    })
}

fn unsigned(duration: SignedDuration) -> std::time::Duration {
    std::time::Duration::try_from(duration.abs()).unwrap_or_default()
}

/// The statuses AWS gives a scaling activity that is over (`StatusCode` in the Auto Scaling API):
/// every other one (`PendingSpotBidPlacement`, `WaitingForSpotInstanceRequestId`,
/// `WaitingForSpotInstanceId`, `WaitingForInstanceId`, `PreInService`, `InProgress`,
/// `WaitingForELBConnectionDraining`, `MidLifecycleAction`, `WaitingForInstanceWarmup`,
/// `WaitingForConnectionDraining`, the in-place update ones, and any AWS adds) is still running.
const FINISHED_ACTIVITY: [&str; 3] = ["Successful", "Failed", "Cancelled"];

/// A scaling activity not finished and not caused by one of this controller's open scale-ups
/// (`ours`) is another actor's (rule 7): wait for it before a first scale-up. Unfinished means any
/// status but the finished ones, so a status AWS adds later counts as running rather than being
/// missed.
///
/// The termination of an instance in `taken_out` (one this controller retires or releases, or a
/// noticed instance AWS takes back) is not a reason to wait either: it changes no desired capacity
/// the next scale-up reads, and a real termination runs for minutes (shutdown, lifecycle hooks),
/// so under replace-then-retire every notice would otherwise wait for the last retirement.
pub fn foreign_activity_in_progress<'a>(
    activities: &'a [Activity],
    ours: &[&ScaleIntent],
    taken_out: &HashSet<String>,
) -> Option<&'a Activity> {
    activities.iter().find(|a| {
        !FINISHED_ACTIVITY.contains(&a.status.as_str())
            && !ours.iter().any(|intent| caused_by(a, intent))
            && !terminated_instance(a).is_some_and(|instance| taken_out.contains(instance))
    })
}

/// The instance a termination activity takes out: AWS describes one as
/// "Terminating EC2 instance: i-…".
pub fn terminated_instance(activity: &Activity) -> Option<&str> {
    let id = activity
        .description
        .strip_prefix("Terminating EC2 instance: ")?
        .split_whitespace()
        .next()?;
    id.starts_with("i-").then_some(id)
}

/// The new instance this node claims: InService, not in the pre-scale set, not claimed by another
/// node. Instances whose Node is already Ready go first; ties break by id, so the choice is stable.
pub fn pick_replacement<'a>(
    intent: &ScaleIntent,
    group: &'a Group,
    claimed: &HashSet<String>,
    node_ready: impl Fn(&str) -> Option<bool>,
) -> Option<&'a str> {
    let mut candidates: Vec<(&str, bool)> = group
        .instances
        .iter()
        .filter(|i| i.in_service() && !intent.pre_scale_instances.contains(&i.id) && !claimed.contains(&i.id))
        .map(|i| (i.id.as_str(), node_ready(&i.id).unwrap_or(false)))
        .collect();
    candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    candidates.first().map(|(id, _)| *id)
}

/// How to take back one abandoned +1 on `group` (rule 10), given the desired capacity the other
/// scale-ups on it still need (`needed_by_others`). Lower desired capacity only while no instance beyond
/// the new value exists, so the ASG never chooses a victim; otherwise remove a specific new,
/// unclaimed instance; never lower below what others raised.
pub fn plan_undo(
    intent: &ScaleIntent,
    group: &Group,
    needed_by_others: i32,
    claimed: &HashSet<String>,
) -> Undo {
    let ours_included = needed_by_others + 1;
    if group.desired < ours_included {
        return Undo::Leave {
            reason: format!(
                "desired capacity of {} is {} already, below the {} this controller set; left as it is",
                group.name, group.desired, ours_included
            ),
        };
    }
    if let Some(refusal) = super::lifecycle::below_min_size(group) {
        return refusal;
    }
    let lowered = group.desired - 1;
    if group.instances.len() as i32 <= lowered {
        return Undo::Lower {
            from: group.desired,
            to: lowered,
        };
    }
    let late = group
        .instances
        .iter()
        .filter(|i| !intent.pre_scale_instances.contains(&i.id) && !claimed.contains(&i.id))
        .map(|i| i.id.clone())
        .min();
    match late {
        Some(instance) => Undo::Terminate { instance },
        None => Undo::Leave {
            reason: format!(
                "{} has more instances than {lowered} and none of them is a new, unclaimed one",
                group.name
            ),
        },
    }
}

/// Whether an undo still has to be carried out against the group as it is now.
pub fn undo_pending(undo: &Undo, group: &Group) -> bool {
    match undo {
        Undo::Lower { from, .. } => group.desired == *from,
        Undo::Terminate { instance } => group.instances.iter().any(|i| &i.id == instance),
        Undo::Leave { .. } => false,
    }
}

/// The ASG carries the opt-in tag `spot-rebalancer.io/enabled=true`.
pub fn asg_opted_in(group: &Group) -> bool {
    group.tags.get(crate::keys::ENABLED_LABEL).map(String::as_str) == Some("true")
}

/// What an ASG with EC2 Capacity Rebalancing on costs, and what to do about it.
pub fn capacity_rebalancing_note(asg: &str) -> String {
    format!(
        "ASG {asg} has EC2 Capacity Rebalancing on: it launches its own replacement too, so a notice may \
         cost two instances; switch one of them off"
    )
}

/// Rule 5's exception: an interruption notice taints the node at once, whatever AWS is doing (no
/// record yet, a scale-up in flight, every AWS call failing), unless the state machine tainted it
/// already (`tainted_at`) or it is past the taint.
pub fn taint_on_interruption(interrupted: bool, phase: Option<Phase>, tainted_at: Option<Timestamp>) -> bool {
    interrupted && tainted_at.is_none() && !phase.is_some_and(Phase::is_tainted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_asg_tagged_enabled_true_is_opted_in() {
        let mut group = Group::for_tests("spot", 2, 10, &[]);
        assert!(!asg_opted_in(&group), "no tag");
        group
            .tags
            .insert(crate::keys::ENABLED_LABEL.into(), "false".into());
        assert!(!asg_opted_in(&group));
        group
            .tags
            .insert(crate::keys::ENABLED_LABEL.into(), "true".into());
        assert!(asg_opted_in(&group));
    }

    #[test]
    fn an_interruption_taints_at_once_in_any_phase_before_the_taint_even_with_no_record() {
        for phase in [
            None,
            Some(Phase::Detected),
            Some(Phase::ScalingSpot),
            Some(Phase::ScalingOnDemand),
            Some(Phase::AwaitingReady),
            Some(Phase::Failed),
        ] {
            assert!(taint_on_interruption(true, phase, None), "{phase:?}");
            assert!(
                !taint_on_interruption(false, phase, None),
                "no notice, no taint: {phase:?}"
            );
        }
        let at = Timestamp::from_second(1_800_000_000).unwrap();
        assert!(
            !taint_on_interruption(true, Some(Phase::AwaitingReady), Some(at)),
            "tainted already"
        );
        for phase in [Phase::Tainted, Phase::Draining, Phase::Retired, Phase::Drained] {
            assert!(!taint_on_interruption(true, Some(phase), None), "{phase:?}");
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn group(name: &str, desired: i32, max: i32, instances: &[(&str, &str)]) -> Group {
        Group::for_tests(name, desired, max, instances)
    }

    fn intent(asg: &str, baseline: i32, target: i32, pre: &[&str]) -> ScaleIntent {
        ScaleIntent {
            asg: asg.into(),
            capacity_type: CapacityType::Spot,
            baseline,
            target_desired: target,
            pre_scale_instances: pre.iter().map(|s| (*s).into()).collect(),
            scale_requested_at: at(0),
            activity_ids: Vec::new(),
        }
    }

    fn activity(status: &str, message: &str, start: i64) -> Activity {
        Activity {
            id: format!("act-{start}"),
            status: status.into(),
            description: "Launching a new EC2 instance".into(),
            status_message: message.into(),
            cause: format!(
                "At {} a user request explicitly set group desired capacity changing the desired capacity from 3 to 4.",
                at(start)
            ),
            start_time: Some(at(start)),
        }
    }

    fn requested(at_second: i64) -> ScaleIntent {
        ScaleIntent {
            scale_requested_at: at(at_second),
            ..intent("spot", 3, 4, &[])
        }
    }

    #[test]
    fn first_notice_starts_a_group_from_the_current_desired_capacity() {
        let asg = group(
            "spot",
            3,
            10,
            &[("i-1", "InService"), ("i-2", "InService"), ("i-3", "InService")],
        );
        let mine = coalesced_intent("n1", &[], &asg, CapacityType::Spot, at(0));
        assert_eq!((mine.baseline, mine.target_desired), (3, 4));
        assert_eq!(mine.pre_scale_instances, vec!["i-1", "i-2", "i-3"]);
    }

    #[test]
    fn concurrent_notices_coalesce_into_one_target() {
        let asg = group("spot", 4, 20, &[("i-1", "InService")]);
        let first = intent("spot", 3, 4, &["i-1"]);
        let second = intent("spot", 3, 5, &["i-1"]);
        let members = [
            Member {
                node: "n1",
                phase: Phase::ScalingSpot,
                scale: &first,
            },
            Member {
                node: "n2",
                phase: Phase::ScalingSpot,
                scale: &second,
            },
        ];
        let third = coalesced_intent("n3", &members, &asg, CapacityType::Spot, at(1));
        assert_eq!(
            (third.baseline, third.target_desired),
            (3, 6),
            "joins the in-flight group"
        );
        assert_eq!(
            third.pre_scale_instances,
            vec!["i-1"],
            "and shares its pre-scale set"
        );
        let with_third = [
            members[0],
            members[1],
            Member {
                node: "n3",
                phase: Phase::ScalingSpot,
                scale: &third,
            },
        ];
        assert_eq!(group_target(&third, &with_third, 20, false), 6);
    }

    #[test]
    fn a_finished_group_is_not_joined() {
        let asg = group("spot", 4, 20, &[("i-1", "InService"), ("i-9", "InService")]);
        let done = intent("spot", 3, 4, &["i-1"]);
        let members = [Member {
            node: "n1",
            phase: Phase::Tainted,
            scale: &done,
        }];
        let next = coalesced_intent("n2", &members, &asg, CapacityType::Spot, at(9));
        assert_eq!((next.baseline, next.target_desired), (4, 5));
    }

    #[test]
    fn the_group_target_is_capped_at_max_size_unless_surging() {
        let mine = intent("spot", 5, 6, &[]);
        let members = [Member {
            node: "n1",
            phase: Phase::ScalingSpot,
            scale: &mine,
        }];
        assert_eq!(group_target(&mine, &members, 5, false), 5);
        assert_eq!(group_target(&mine, &members, 5, true), 6);
    }

    #[test]
    fn a_failed_capacity_activity_means_capacity_is_gone() {
        let activities = [
            activity("Successful", "", -100),
            activity(
                "Failed",
                "Could not launch Spot Instances. InsufficientInstanceCapacity - none",
                1,
            ),
        ];
        let reason = capacity_unavailable(&activities, &requested(0), at(2), SignedDuration::from_secs(120));
        assert!(reason.unwrap().contains("InsufficientInstanceCapacity"));
    }

    #[test]
    fn a_capacity_failure_counts_only_for_a_launch_this_request_caused() {
        let mut foreign = activity("Failed", "InsufficientInstanceCapacity", 2);
        // Another actor's scale-in, or a raise that stays at or below our baseline, is not ours.
        foreign.cause =
            "At 2026-12-01T10:00:02Z a user request explicitly set group desired capacity changing \
                         the desired capacity from 5 to 3."
                .into();
        assert!(!caused_by(&foreign, &requested(0)));
        assert_eq!(
            capacity_unavailable(&[foreign], &requested(0), at(10), SignedDuration::from_secs(120)),
            None
        );
        let mut refill = activity("Failed", "InsufficientInstanceCapacity", 2);
        refill.cause =
            "an instance was started in response to a difference between desired and actual capacity, \
                        increasing the capacity from 2 to 3."
                .into();
        assert!(!caused_by(&refill, &requested(0)), "a refill up to the baseline");
        let ours = activity("Failed", "InsufficientInstanceCapacity", 2);
        assert!(caused_by(&ours, &requested(0)));
        assert_eq!(activities_of(&[ours], &requested(0)), ["act-2"]);
    }

    #[test]
    fn the_raise_is_read_from_the_cause_as_aws_writes_it() {
        assert_eq!(
            raise_in("changing the desired capacity from 3 to 4."),
            Some((3, 4))
        );
        assert_eq!(raise_in("increasing the capacity from 10 to 12"), Some((10, 12)));
        assert_eq!(raise_in("shrinking the capacity from 3 to 1."), Some((3, 1)));
        assert_eq!(raise_in("an instance was taken out of service"), None);
    }

    #[test]
    fn old_or_unrelated_failures_do_not_count() {
        let activities = [
            activity("Failed", "InsufficientInstanceCapacity", -600),
            activity("Failed", "Access denied to the launch template", 3),
        ];
        assert_eq!(
            capacity_unavailable(&activities, &requested(0), at(10), SignedDuration::from_secs(120)),
            None
        );
    }

    #[test]
    fn no_instance_within_the_capacity_timeout_means_capacity_is_gone() {
        let reason =
            capacity_unavailable(&[], &requested(0), at(121), SignedDuration::from_secs(120)).unwrap();
        assert!(reason.contains("no new InService instance within 2m"), "{reason}");
    }

    #[test]
    fn only_activities_in_progress_hold_a_scale_up_back() {
        let none = HashSet::new();
        let activities = [activity("InProgress", "", 5), activity("Successful", "", 1)];
        assert_eq!(
            foreign_activity_in_progress(&activities, &[], &none).map(|a| a.id.as_str()),
            Some("act-5")
        );
        assert!(foreign_activity_in_progress(&activities[1..], &[], &none).is_none());
        // A launch one of our own open scale-ups caused does not hold the next one back.
        assert!(foreign_activity_in_progress(&activities, &[&requested(0)], &none).is_none());
        for unfinished in [
            "PendingSpotBidPlacement",
            "WaitingForSpotInstanceRequestId",
            "WaitingForSpotInstanceId",
            "WaitingForInstanceId",
            "PreInService",
            "MidLifecycleAction",
            "WaitingForELBConnectionDraining",
            "WaitingForInstanceWarmup",
        ] {
            let activities = [activity("Successful", "", 1), activity(unfinished, "", 5)];
            assert!(
                foreign_activity_in_progress(&activities, &[], &none).is_some(),
                "{unfinished}"
            );
        }
        let over = [
            activity("Failed", "", 1),
            activity("Cancelled", "", 2),
            activity("Successful", "", 3),
        ];
        assert!(foreign_activity_in_progress(&over, &[], &none).is_none());
    }

    #[test]
    fn the_termination_of_an_instance_taken_out_by_us_holds_nothing_back() {
        let mut retiring = activity("InProgress", "", 5);
        retiring.description = "Terminating EC2 instance: i-0aa11bb22cc33dd44".to_owned();
        let mut other = activity("InProgress", "", 6);
        other.description = "Terminating EC2 instance: i-0ffffffffffffffff".to_owned();
        assert_eq!(terminated_instance(&retiring), Some("i-0aa11bb22cc33dd44"));
        let taken_out = HashSet::from(["i-0aa11bb22cc33dd44".to_owned()]);
        assert!(foreign_activity_in_progress(std::slice::from_ref(&retiring), &[], &taken_out).is_none());
        // Another actor's termination is still waited for, and so is ours while it is unknown.
        let both = [retiring.clone(), other];
        assert_eq!(
            foreign_activity_in_progress(&both, &[], &taken_out).map(|a| a.id.as_str()),
            Some("act-6")
        );
        assert!(foreign_activity_in_progress(&[retiring], &[], &HashSet::new()).is_some());
        // A launch is never a termination, whatever its description says after the prefix.
        let mut launch = activity("PreInService", "", 7);
        launch.description = "Launching a new EC2 instance: i-0aa11bb22cc33dd44".to_owned();
        assert_eq!(terminated_instance(&launch), None);
        assert!(foreign_activity_in_progress(&[launch], &[], &taken_out).is_some());
    }

    #[test]
    fn the_replacement_is_new_in_service_unclaimed_and_ready_first() {
        let asg = group(
            "spot",
            5,
            10,
            &[
                ("i-old", "InService"),
                ("i-a", "InService"),
                ("i-b", "InService"),
                ("i-c", "Pending"),
                ("i-d", "InService"),
            ],
        );
        let mine = intent("spot", 2, 3, &["i-old"]);
        let claimed: HashSet<String> = ["i-a".to_owned()].into();
        let ready = |id: &str| Some(id == "i-d");
        assert_eq!(
            pick_replacement(&mine, &asg, &claimed, ready),
            Some("i-d"),
            "Ready beats lower id"
        );
        let not_ready = |_: &str| None;
        assert_eq!(pick_replacement(&mine, &asg, &claimed, not_ready), Some("i-b"));
        let all: HashSet<String> = ["i-a", "i-b", "i-d"].map(String::from).into();
        assert_eq!(
            pick_replacement(&mine, &asg, &all, not_ready),
            None,
            "Pending never counts"
        );
    }

    #[test]
    fn an_abandoned_scale_up_is_lowered_while_nothing_launched_for_it() {
        let asg = group(
            "spot",
            4,
            10,
            &[("i-1", "InService"), ("i-2", "InService"), ("i-3", "InService")],
        );
        let mine = intent("spot", 3, 4, &["i-1", "i-2", "i-3"]);
        assert_eq!(
            plan_undo(&mine, &asg, 0, &HashSet::new()),
            Undo::Lower { from: 4, to: 3 }
        );
    }

    #[test]
    fn a_late_instance_is_removed_by_id_never_by_lowering() {
        let asg = group(
            "spot",
            4,
            10,
            &[
                ("i-1", "InService"),
                ("i-2", "InService"),
                ("i-3", "InService"),
                ("i-late", "Pending"),
            ],
        );
        let mine = intent("spot", 3, 4, &["i-1", "i-2", "i-3"]);
        assert_eq!(
            plan_undo(&mine, &asg, 0, &HashSet::new()),
            Undo::Terminate {
                instance: "i-late".into()
            }
        );
    }

    #[test]
    fn a_capacity_another_actor_lowered_is_left_alone() {
        let asg = group(
            "spot",
            3,
            10,
            &[("i-1", "InService"), ("i-2", "InService"), ("i-3", "InService")],
        );
        let mine = intent("spot", 3, 5, &["i-1", "i-2", "i-3"]);
        assert!(matches!(
            plan_undo(&mine, &asg, 1, &HashSet::new()),
            Undo::Leave { .. }
        ));
    }

    #[test]
    fn another_actors_raise_is_kept_when_undoing() {
        let asg = group("spot", 7, 10, &[("i-1", "InService")]);
        let mine = intent("spot", 3, 4, &["i-1"]);
        assert_eq!(
            plan_undo(&mine, &asg, 0, &HashSet::new()),
            Undo::Lower { from: 7, to: 6 }
        );
    }

    #[test]
    fn an_undo_is_pending_until_the_group_shows_it() {
        let asg = group("spot", 3, 10, &[("i-1", "InService")]);
        assert!(!undo_pending(&Undo::Lower { from: 4, to: 3 }, &asg));
        assert!(undo_pending(&Undo::Lower { from: 3, to: 2 }, &asg));
        assert!(undo_pending(
            &Undo::Terminate {
                instance: "i-1".into()
            },
            &asg
        ));
        assert!(!undo_pending(
            &Undo::Terminate {
                instance: "i-9".into()
            },
            &asg
        ));
    }
}
