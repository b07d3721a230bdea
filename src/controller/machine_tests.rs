//! The state machine's rules, one scenario each, on plain data.
use super::*;

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn secs(seconds: i64) -> SignedDuration {
    SignedDuration::from_secs(seconds)
}

fn rules() -> Rules {
    Rules {
        capacity_timeout: secs(60),
        foreign_activity_timeout: secs(120),
        poll: Duration::from_secs(2),
        surge_above_max: false,
        dry_run: false,
        ready_timeout: secs(600),
        retry_cooldown: secs(300),
    }
}

fn group(desired: i32, max: i32, instances: &[(&str, &str)]) -> Group {
    Group::for_tests("spot-a", desired, max, instances)
}

fn opted_in(mut group: Group) -> Group {
    group.tags.insert(keys::ENABLED_LABEL.into(), "true".into());
    group
}

fn node(rebalance: Option<i64>, interruption: Option<i64>) -> NodeFacts {
    NodeFacts {
        name: "old".into(),
        instance: Some("i-old".into()),
        rebalance: rebalance.map(at),
        interruption: interruption.map(at),
        tainted: false,
    }
}

fn intent(baseline: i32, target: i32, pre: &[&str], requested: i64) -> ScaleIntent {
    ScaleIntent {
        asg: "spot-a".into(),
        capacity_type: CapacityType::Spot,
        baseline,
        target_desired: target,
        pre_scale_instances: pre.iter().map(|s| (*s).into()).collect(),
        scale_requested_at: at(requested),
        activity_ids: Vec::new(),
    }
}

fn detected() -> Replacement {
    let mut record = Replacement::new("spot-a".into(), Some("od-a".into()), at(0));
    record.instance_asg = Some("spot-a".into());
    record
}

fn scaling(scale: ScaleIntent) -> Replacement {
    let mut record = detected();
    record.scale = Some(scale);
    record
}

fn failed_launch(start: i64, from: i32, to: i32) -> Activity {
    Activity {
        id: format!("act-{start}"),
        status: "Failed".into(),
        description: "Launching a new EC2 instance. Status Reason: Could not launch Spot Instances.".into(),
        status_message: "InsufficientInstanceCapacity - There is no Spot capacity available".into(),
        cause: format!(
            "At {} a user request explicitly set group desired capacity changing the desired capacity from {from} to {to}.",
            at(start)
        ),
        start_time: Some(at(start)),
    }
}

/// The world one step sees; `facts()` lends it out as [`Facts`].
struct World {
    now: Timestamp,
    rules: Rules,
    node: NodeFacts,
    record: Option<(Phase, Timestamp, Replacement)>,
    placement: Option<Placement>,
    group: Option<Group>,
    activities: Vec<Activity>,
    members: Vec<(String, Phase, ScaleIntent)>,
    claimed: HashSet<String>,
    taken_out: HashSet<String>,
    nodes: HashMap<String, (String, bool)>,
}

impl World {
    fn new(now: i64, node: NodeFacts) -> Self {
        World {
            now: at(now),
            rules: rules(),
            node,
            record: None,
            placement: None,
            group: None,
            activities: Vec::new(),
            members: Vec::new(),
            claimed: HashSet::new(),
            taken_out: HashSet::new(),
            nodes: HashMap::new(),
        }
    }

    fn record(mut self, phase: Phase, since: i64, replacement: Replacement) -> Self {
        self.record = Some((phase, at(since), replacement));
        self
    }

    fn group(mut self, group: Group) -> Self {
        self.group = Some(group);
        self
    }

    fn member(mut self, node: &str, phase: Phase, scale: ScaleIntent) -> Self {
        self.members.push((node.into(), phase, scale));
        self
    }

    fn node_of(mut self, instance: &str, name: &str, ready: bool) -> Self {
        self.nodes.insert(instance.into(), (name.into(), ready));
        self
    }

    fn next(&self) -> Transition {
        let members: Vec<Member<'_>> = self
            .members
            .iter()
            .map(|(node, phase, scale)| Member {
                node,
                phase: *phase,
                scale,
            })
            .collect();
        let facts = Facts {
            now: self.now,
            rules: &self.rules,
            node: &self.node,
            record: self.record.as_ref().map(|(phase, since, replacement)| Record {
                phase: *phase,
                since: *since,
                replacement,
            }),
            placement: self.placement.as_ref(),
            default_on_demand: None,
            group: self.group.as_ref(),
            activities: &self.activities,
            members: &members,
            claimed: &self.claimed,
            taken_out: &self.taken_out,
            nodes: &self.nodes,
        };
        next(&facts)
    }

    /// Whether the next step must be decided under the ASG's decision lock.
    fn next_needs_lock(&self) -> bool {
        let (phase, since, replacement) = self.record.as_ref().expect("a record");
        self.next().needs_decision_lock(&Record {
            phase: *phase,
            since: *since,
            replacement,
        })
    }
}

/// A Detected record whose raise `baseline` → `raised_to` was given up for capacity, the lower back
/// to `baseline` not yet made.
fn pending_lower(baseline: i32, raised_to: i32) -> Replacement {
    let mut record = detected();
    record.abandoned.push(Abandoned {
        scale: intent(baseline, raised_to, &["i-old"], 1),
        undo: Undo::Lower {
            from: raised_to,
            to: baseline,
        },
        undone: false,
        cause: AbandonCause::Capacity,
    });
    record
}

fn written(transition: &Transition) -> (Phase, &Replacement) {
    let (phase, record) = transition.write.as_ref().expect("a record write");
    (*phase, record)
}

fn reasons(transition: &Transition) -> Vec<&'static str> {
    transition.reports.iter().map(|r| r.reason).collect()
}

// --- detection and trust ---

#[test]
fn a_node_without_a_notice_or_record_is_left_alone() {
    let transition = World::new(0, node(None, None)).next();
    assert_eq!(transition, Transition::then(Then::Done));
}

#[test]
fn a_notice_on_an_opted_in_asg_is_detected_with_its_fallback_from_the_tag() {
    let mut spot = opted_in(group(3, 10, &[("i-old", "InService")]));
    spot.tags
        .insert(keys::FALLBACK_ASG_TAG.into(), "od-tagged".into());
    let mut world = World::new(5, node(Some(1), None));
    world.placement = Some(Placement::Found {
        instance: "i-old".into(),
        own: spot.clone(),
        spot,
    });
    let transition = world.next();
    let (phase, record) = written(&transition);
    assert_eq!(phase, Phase::Detected);
    assert_eq!(record.on_demand_asg.as_deref(), Some("od-tagged"));
    assert_eq!(record.instance_asg.as_deref(), Some("spot-a"));
    assert!(transition.acts.is_empty(), "detection calls nothing");
    assert_eq!(reasons(&transition), ["RebalanceNoticed"]);
}

#[test]
fn an_asg_without_the_opt_in_tag_is_skipped_whatever_the_node_label_says() {
    let spot = group(3, 10, &[("i-old", "InService")]);
    let mut world = World::new(5, node(Some(1), None));
    world.placement = Some(Placement::Found {
        instance: "i-old".into(),
        own: spot.clone(),
        spot,
    });
    let transition = world.next();
    assert_eq!(written(&transition).0, Phase::Skipped);
    assert!(transition.acts.is_empty());
    assert_eq!(transition.then, Then::Done);
}

#[test]
fn an_instance_in_no_asg_is_skipped_and_never_tainted() {
    let mut world = World::new(5, node(Some(1), Some(2)));
    world.placement = Some(Placement::NotInAsg {
        instance: "i-old".into(),
    });
    let transition = world.next();
    assert_eq!(written(&transition).0, Phase::Skipped);
    assert!(!transition.acts.iter().any(|a| matches!(a, Act::Taint { .. })));
}

#[test]
fn a_node_of_an_eks_managed_group_with_capacity_rebalancing_is_skipped_with_what_to_do() {
    let mut managed = opted_in(group(3, 10, &[("i-old", "InService")]));
    managed
        .tags
        .insert("eks:nodegroup-name".into(), "spot-workers".into());
    managed.capacity_rebalance = true;
    let mut world = World::new(5, node(Some(1), None));
    world.placement = Some(Placement::Found {
        instance: "i-old".into(),
        own: managed.clone(),
        spot: managed,
    });
    let transition = world.next();
    let (phase, record) = written(&transition);
    assert_eq!(phase, Phase::Skipped);
    assert!(
        record.reason.as_deref().unwrap().contains("self-managed"),
        "{record:?}"
    );
    assert!(transition.acts.is_empty());
}

// --- rule 5: an interruption taints at once ---

#[test]
fn an_interruption_taints_at_once_before_any_aws_fact_is_known() {
    let transition = on_interruption(&node(None, Some(3)), None, false).expect("a taint");
    assert_eq!(
        transition.acts,
        [Act::Taint {
            why: "interruption notice"
        }]
    );
    assert!(transition.write.is_none(), "no record yet to write");
}

#[test]
fn an_interruption_while_scaling_taints_and_records_it_first() {
    let record = scaling(intent(3, 4, &["i-old"], 1));
    let facts = node(Some(1), Some(3));
    let transition = on_interruption(
        &facts,
        Some(Record {
            phase: Phase::ScalingSpot,
            since: at(1),
            replacement: &record,
        }),
        false,
    )
    .expect("a taint");
    let (phase, written) = written(&transition);
    assert_eq!(phase, Phase::ScalingSpot);
    assert!(written.tainted_at.is_some());
    assert_eq!(transition.acts.len(), 1);
}

#[test]
fn an_interruption_on_a_tainted_node_adds_nothing_and_a_dry_run_only_says_it_would() {
    let mut tainted = node(None, Some(3));
    tainted.tainted = true;
    assert!(on_interruption(&tainted, None, false).is_none());
    let dry = on_interruption(&node(None, Some(3)), None, true).expect("a report");
    assert!(dry.acts.is_empty() && dry.write.is_none());
    assert_eq!(reasons(&dry), ["WouldTaint"]);
}

// --- scaling up: fresh baseline, coalescing, rule 7, MaxSize ---

#[test]
fn a_first_scale_up_starts_from_the_fresh_desired_capacity() {
    // A foreign scale-in took the group from 4 to 3 since the last notice: the baseline is 3.
    let world = World::new(10, node(Some(1), None))
        .record(Phase::Detected, 1, detected())
        .group(group(
            3,
            10,
            &[("i-old", "InService"), ("i-2", "InService"), ("i-3", "InService")],
        ));
    let transition = world.next();
    let (phase, record) = written(&transition);
    assert_eq!(phase, Phase::ScalingSpot);
    let scale = record.scale.as_ref().unwrap();
    assert_eq!((scale.baseline, scale.target_desired), (3, 4));
    assert_eq!(scale.pre_scale_instances, ["i-old", "i-2", "i-3"]);
    assert!(matches!(&transition.acts[..], [Act::Ensure { .. }]));
}

#[test]
fn a_notice_joins_the_scale_up_in_flight_on_its_asg() {
    let world = World::new(10, node(Some(1), None))
        .record(Phase::Detected, 1, detected())
        .group(group(4, 10, &[("i-old", "InService")]))
        .member("n2", Phase::ScalingSpot, intent(3, 4, &["i-old"], 5));
    let transition = world.next();
    let scale = written(&transition).1.scale.clone().unwrap();
    assert_eq!((scale.baseline, scale.target_desired), (3, 5));
}

#[test]
fn a_foreign_activity_holds_a_first_spot_scale_up_back_then_times_out() {
    let running = Activity {
        status: "PreInService".into(),
        cause: "At 2027 an instance was started in response to a difference between desired and actual capacity, increasing the capacity from 2 to 3.".into(),
        start_time: Some(at(0)),
        ..failed_launch(0, 2, 3)
    };
    let mut world = World::new(10, node(Some(1), None))
        .record(Phase::Detected, 1, detected())
        .group(group(3, 10, &[("i-old", "InService")]));
    world.activities = vec![running];
    let first = world.next();
    assert!(first.acts.is_empty());
    assert_eq!(written(&first).1.waiting_since, Some(at(10)));
    assert_eq!(reasons(&first), ["WaitingForScalingActivity"]);

    let mut waiting = detected();
    waiting.waiting_since = Some(at(10));
    world.record = Some((Phase::Detected, at(1), waiting.clone()));
    world.now = at(20);
    let still = world.next();
    assert!(still.write.is_none() && still.acts.is_empty(), "said once");

    world.now = at(10 + 121);
    let acting = world.next();
    assert!(matches!(&acting.acts[..], [Act::Ensure { .. }]));
}

#[test]
fn another_nodes_retirement_does_not_hold_a_first_scale_up_back() {
    // Replace-then-retire: the last noticed node's instance is being terminated (with a
    // decrement, minutes on real AWS). A new notice raises at once.
    let retiring = Activity {
        status: "InProgress".into(),
        description: "Terminating EC2 instance: i-retiring".into(),
        cause: "At 2027 an instance was taken out of service in response to a user request, shrinking the capacity from 4 to 3.".into(),
        start_time: Some(at(0)),
        ..failed_launch(0, 4, 3)
    };
    let mut world = World::new(10, node(Some(1), None))
        .record(Phase::Detected, 1, detected())
        .group(group(
            3,
            10,
            &[("i-old", "InService"), ("i-retiring", "Terminating")],
        ));
    world.activities = vec![retiring];
    world.taken_out.insert("i-retiring".into());
    let transition = world.next();
    assert!(
        matches!(&transition.acts[..], [Act::Ensure { .. }]),
        "{transition:?}"
    );
    assert_eq!(written(&transition).1.waiting_since, None);

    // The same termination by another actor is waited for.
    world.taken_out.clear();
    let waiting = world.next();
    assert!(waiting.acts.is_empty());
    assert_eq!(reasons(&waiting), ["WaitingForScalingActivity"]);
}

#[test]
fn an_asg_at_max_size_falls_back_without_raising_anything() {
    let world = World::new(10, node(Some(1), None))
        .record(Phase::Detected, 1, detected())
        .group(group(3, 3, &[("i-old", "InService")]));
    let transition = world.next();
    assert!(transition.acts.is_empty(), "no call above MaxSize");
    let (phase, record) = written(&transition);
    assert_eq!(phase, Phase::Detected);
    assert_eq!(record.abandoned[0].cause, AbandonCause::MaxSize);
    assert!(record.abandoned[0].undone, "nothing to take back");
    assert_eq!(next_capacity(record), Some(CapacityType::OnDemand));
    assert_eq!(reasons(&transition), ["SpotCapacityUnavailable"]);
}

#[test]
fn a_dry_run_reports_the_scale_up_and_calls_nothing() {
    let mut world = World::new(10, node(Some(1), None))
        .record(Phase::Detected, 1, detected())
        .group(group(3, 10, &[("i-old", "InService")]));
    world.rules.dry_run = true;
    let transition = world.next();
    assert!(transition.acts.is_empty());
    assert_eq!(reasons(&transition), ["WouldScaleUp"]);
    assert!(
        transition.reports[0].note.contains("3 → 4"),
        "{}",
        transition.reports[0].note
    );
    assert_eq!(transition.then, Then::Done);
}

// --- waiting for the instance ---

#[test]
fn a_scale_up_whose_call_did_not_happen_is_raised_again_to_the_group_target_only() {
    // A crash between the intent and the call: desired is still the baseline.
    let world = World::new(10, node(Some(1), None))
        .record(Phase::ScalingSpot, 2, scaling(intent(3, 4, &["i-old"], 2)))
        .group(group(3, 10, &[("i-old", "InService")]));
    let transition = world.next();
    assert!(transition.write.is_none());
    assert!(matches!(&transition.acts[..], [Act::Ensure { intent }] if intent.target_desired == 4));
}

#[test]
fn the_claim_takes_a_new_instance_preferring_a_ready_node_and_never_the_noticed_one() {
    let mut world = World::new(10, node(Some(1), None))
        .record(Phase::ScalingSpot, 2, scaling(intent(3, 4, &["i-2"], 2)))
        .group(group(
            4,
            10,
            &[
                ("i-old", "InService"),
                ("i-2", "InService"),
                ("i-a", "InService"),
                ("i-b", "InService"),
            ],
        ))
        .node_of("i-b", "new-b", true);
    world.claimed.insert("i-zzz".into());
    let transition = world.next();
    let (phase, record) = written(&transition);
    assert_eq!(phase, Phase::AwaitingReady);
    assert_eq!(record.instance_id.as_deref(), Some("i-b"));

    // i-old is not in the pre-scale set (another ASG listed it), yet it is never claimed.
    let world = World::new(10, node(Some(1), None))
        .record(Phase::ScalingSpot, 2, scaling(intent(3, 4, &["i-2"], 2)))
        .group(group(4, 10, &[("i-old", "InService"), ("i-2", "InService")]));
    assert!(world.next().write.is_none());
}

#[test]
fn a_capacity_failure_of_a_launch_this_request_did_not_cause_is_not_ours() {
    // A Failed launch from before the request (another actor's) does not give the scale-up up.
    let mut world = World::new(10, node(Some(1), None))
        .record(Phase::ScalingSpot, 5, scaling(intent(3, 4, &["i-old"], 5)))
        .group(group(4, 10, &[("i-old", "InService")]));
    world.activities = vec![failed_launch(-30, 2, 3)];
    let transition = world.next();
    assert!(transition.write.is_none() && transition.acts.is_empty());
    assert_eq!(transition.then, Then::After(Duration::from_secs(2)));
}

#[test]
fn a_partial_capacity_failure_gives_up_only_the_scale_ups_it_left_without_an_instance() {
    // Three coalesced notices (3 → 6); one launch failed, two are on their way.
    let scale = |requested| ScaleIntent {
        activity_ids: vec!["act-3".into()],
        ..intent(3, 6, &["i-old", "i-x", "i-y"], requested)
    };
    let world = |me_requested| {
        let mut world = World::new(8, node(Some(1), None))
            .record(Phase::ScalingSpot, 2, scaling(scale(me_requested)))
            .group(group(
                6,
                10,
                &[
                    ("i-old", "InService"),
                    ("i-x", "InService"),
                    ("i-y", "InService"),
                    ("i-a", "Pending"),
                    ("i-b", "Pending"),
                ],
            ));
        world.activities = vec![failed_launch(3, 3, 6)];
        world
    };
    // The first two by request time wait for i-a and i-b …
    let first = world(2)
        .member("n2", Phase::ScalingSpot, scale(3))
        .member("n3", Phase::ScalingSpot, scale(4))
        .next();
    assert!(first.write.is_none(), "{first:?}");
    // … the last one gives up and falls back, planning to take its +1 back.
    let last = world(4)
        .member("n2", Phase::ScalingSpot, scale(2))
        .member("n3", Phase::ScalingSpot, scale(3))
        .next();
    let (phase, record) = written(&last);
    assert_eq!(phase, Phase::Detected);
    assert_eq!(record.abandoned.len(), 1);
    assert_eq!(record.abandoned[0].cause, AbandonCause::Capacity);
    assert_eq!(reasons(&last), ["SpotCapacityUnavailable"]);
}

#[test]
fn no_instance_within_the_capacity_timeout_gives_up_and_plans_a_lower() {
    let world = World::new(70, node(Some(1), None))
        .record(Phase::ScalingSpot, 2, scaling(intent(3, 4, &["i-old"], 2)))
        .group(group(4, 10, &[("i-old", "InService")]));
    let transition = world.next();
    let (phase, record) = written(&transition);
    assert_eq!(phase, Phase::Detected);
    assert_eq!(record.abandoned[0].undo, Undo::Lower { from: 4, to: 3 });
    assert!(!record.abandoned[0].undone);
}

/// A scale-up 3 → 4 on a group of three (i-old, i-2, i-3) whose fourth instance is `fourth`
/// (id, lifecycle state), at time `now`.
fn scaled_to_four(now: i64, fourth: (&str, &str)) -> World {
    World::new(now, node(Some(1), None))
        .record(
            Phase::ScalingSpot,
            2,
            scaling(intent(3, 4, &["i-old", "i-2", "i-3"], 2)),
        )
        .group(group(
            4,
            10,
            &[
                ("i-old", "InService"),
                ("i-2", "InService"),
                ("i-3", "InService"),
                fourth,
            ],
        ))
}

#[test]
fn a_late_instance_is_taken_back_by_id_never_by_lowering() {
    // The launch arrived after all: lowering would let the ASG pick a victim.
    let world = scaled_to_four(70, ("i-late", "Pending"));
    let transition = world.next();
    assert_eq!(
        written(&transition).1.abandoned[0].undo,
        Undo::Terminate {
            instance: "i-late".into()
        }
    );
}

#[test]
fn a_scale_up_call_failing_past_the_capacity_timeout_falls_back_with_the_reason() {
    let mut record = scaling(intent(3, 4, &["i-old"], 2));
    record.failing_since = Some(at(3));
    record.last_error = Some("set_desired".into());
    let world = World::new(3 + 60, node(Some(1), None))
        .record(Phase::ScalingSpot, 2, record.clone())
        .group(group(3, 10, &[("i-old", "InService")]));
    let transition = world.next();
    let (phase, written) = written(&transition);
    assert_eq!(phase, Phase::Detected);
    assert_eq!(written.abandoned[0].cause, AbandonCause::CallFailing);
    assert!(transition.reports[0].note.contains("set_desired"));

    // Shorter than the timeout: the call is tried again.
    let world = World::new(3 + 30, node(Some(1), None))
        .record(Phase::ScalingSpot, 2, record)
        .group(group(3, 10, &[("i-old", "InService")]));
    assert!(matches!(&world.next().acts[..], [Act::Ensure { .. }]));
}

#[test]
fn on_demand_capacity_gone_too_ends_in_failed_with_the_reason() {
    let mut record = scaling(ScaleIntent {
        asg: "od-a".into(),
        capacity_type: CapacityType::OnDemand,
        ..intent(1, 2, &[], 2)
    });
    record.abandoned.push(Abandoned {
        scale: intent(3, 4, &["i-old"], 1),
        undo: Undo::Lower { from: 4, to: 3 },
        undone: true,
        cause: AbandonCause::Capacity,
    });
    let world = World::new(70, node(Some(1), None))
        .record(Phase::ScalingOnDemand, 2, record)
        .group(Group::for_tests("od-a", 2, 10, &[]));
    let transition = world.next();
    let (phase, written) = written(&transition);
    assert_eq!(phase, Phase::Failed);
    assert!(
        written
            .reason
            .as_deref()
            .unwrap()
            .contains("no new InService instance")
    );
    assert_eq!(reasons(&transition), ["ReplacementFailed"]);
}

// --- undo ---

#[test]
fn a_pending_undo_comes_first_and_is_marked_done_after_its_call() {
    let record = pending_lower(3, 4);
    let world = World::new(70, node(Some(1), None))
        .record(Phase::Detected, 2, record)
        .group(group(4, 10, &[("i-old", "InService")]));
    let transition = world.next();
    assert!(transition.write.is_none());
    assert_eq!(
        transition.acts,
        [Act::Undo {
            asg: "spot-a".into(),
            undo: Undo::Lower { from: 4, to: 3 }
        }]
    );
    assert!(transition.done.as_ref().unwrap().1.abandoned[0].undone);
}

#[test]
fn an_undo_another_actor_made_unnecessary_is_only_marked_done() {
    let record = pending_lower(3, 4);
    let world = World::new(70, node(Some(1), None))
        .record(Phase::Detected, 2, record)
        .group(group(3, 10, &[("i-old", "InService")]));
    let transition = world.next();
    assert!(transition.acts.is_empty());
    assert!(written(&transition).1.abandoned[0].undone);
}

#[test]
fn a_lower_planned_before_a_late_launch_is_planned_again_as_a_termination() {
    let record = pending_lower(1, 2);
    let world = World::new(70, node(Some(1), None))
        .record(Phase::Detected, 2, record)
        .group(group(2, 10, &[("i-old", "InService"), ("i-late", "Pending")]));
    let transition = world.next();
    assert!(transition.acts.is_empty(), "planned again before any call");
    assert_eq!(
        written(&transition).1.abandoned[0].undo,
        Undo::Terminate {
            instance: "i-late".into()
        }
    );
}

// --- the replacement turns Ready (or never does) ---

fn awaiting(claimed_at: i64) -> Replacement {
    let mut record = scaling(intent(3, 4, &["i-old"], 2));
    record.instance_id = Some("i-new".into());
    record.claimed_at = Some(at(claimed_at));
    record
}

#[test]
fn only_a_step_that_changes_nothing_counts_as_a_wait_needing_no_decision_lock() {
    // Waiting for the instance: the group is at its target and nothing new is InService.
    let waiting = scaled_to_four(10, ("i-4", "Pending"));
    assert!(waiting.next().is_only_a_wait(), "{:?}", waiting.next());
    // The same step once the launch is InService claims it: that is decided under the lock.
    let mut claiming = scaled_to_four(10, ("i-4", "InService"));
    assert!(!claiming.next().is_only_a_wait());
    // ... unless another record claimed it already.
    claiming.claimed.insert("i-4".into());
    assert!(claiming.next().is_only_a_wait());
    // Waiting for Ready, then Ready.
    let not_ready = World::new(30, node(Some(1), None))
        .record(Phase::AwaitingReady, 10, awaiting(10))
        .group(group(4, 10, &[("i-old", "InService"), ("i-new", "InService")]))
        .node_of("i-new", "new-node", false);
    assert!(not_ready.next().is_only_a_wait(), "{:?}", not_ready.next());
    let ready = not_ready.node_of("i-new", "new-node", true);
    assert!(!ready.next().is_only_a_wait());
    // A call to make is never a wait.
    let crashed = World::new(10, node(Some(1), None))
        .record(Phase::ScalingSpot, 2, scaling(intent(3, 4, &["i-old"], 2)))
        .group(group(3, 10, &[("i-old", "InService")]));
    assert!(!crashed.next().is_only_a_wait());
}

#[test]
fn only_a_ready_replacement_s_taint_is_applied_without_the_decision_lock() {
    // Ready: the record names the Node and turns Tainted, the node is tainted; claim, intent, undos
    // and the seat stay as they were, so no other decision on the ASG reads anything new.
    let ready = World::new(30, node(Some(1), None))
        .record(Phase::AwaitingReady, 10, awaiting(10))
        .group(group(4, 10, &[("i-old", "InService"), ("i-new", "InService")]))
        .node_of("i-new", "new-node", true);
    assert!(!ready.next_needs_lock(), "{:?}", ready.next());
    // The claimed instance left before it was Ready: the claim is given up (another may take it).
    let lost = World::new(30, node(Some(1), None))
        .record(Phase::AwaitingReady, 10, awaiting(10))
        .group(group(4, 10, &[("i-old", "InService")]));
    assert!(lost.next_needs_lock(), "{:?}", lost.next());
    // Never Ready in time: the instance is terminated (an undo) and the seat given back.
    let mut never = World::new(10_000, node(Some(1), None))
        .record(Phase::AwaitingReady, 10, awaiting(10))
        .group(group(4, 10, &[("i-old", "InService"), ("i-new", "InService")]))
        .node_of("i-new", "new-node", false);
    never.rules.ready_timeout = secs(60);
    assert!(never.next_needs_lock(), "{:?}", never.next());
    // A claim, and a call to make.
    let claiming = scaled_to_four(10, ("i-4", "InService"));
    assert!(claiming.next_needs_lock(), "{:?}", claiming.next());
    let crashed = World::new(10, node(Some(1), None))
        .record(Phase::ScalingSpot, 2, scaling(intent(3, 4, &["i-old"], 2)))
        .group(group(3, 10, &[("i-old", "InService")]));
    assert!(crashed.next_needs_lock(), "{:?}", crashed.next());
}

#[test]
fn a_ready_replacement_is_named_in_the_record_then_protected_and_the_node_tainted() {
    let world = World::new(30, node(Some(1), None))
        .record(Phase::AwaitingReady, 10, awaiting(10))
        .group(group(4, 10, &[("i-old", "InService"), ("i-new", "InService")]))
        .node_of("i-new", "new-node", true);
    let transition = world.next();
    let (phase, record) = written(&transition);
    assert_eq!(
        phase,
        Phase::AwaitingReady,
        "the taint comes before Tainted is written"
    );
    assert_eq!(record.node.as_deref(), Some("new-node"));
    let (done, record) = transition.done.as_ref().unwrap();
    assert_eq!(*done, Phase::Tainted);
    assert!(record.tainted_at.is_some());
    assert_eq!(
        transition.acts,
        [
            Act::ProtectReplacement {
                node: "new-node".into()
            },
            Act::Taint {
                why: "replacement Ready"
            }
        ]
    );
    assert_eq!(reasons(&transition), ["Tainted"]);
}

#[test]
fn a_node_tainted_on_its_interruption_is_not_tainted_twice() {
    let mut record = awaiting(10);
    record.tainted_at = Some(at(5));
    let world = World::new(30, node(Some(1), Some(4)))
        .record(Phase::AwaitingReady, 10, record)
        .group(group(4, 10, &[("i-new", "InService")]))
        .node_of("i-new", "new-node", true);
    let transition = world.next();
    assert!(!transition.acts.iter().any(|a| matches!(a, Act::Taint { .. })));
    assert!(transition.reports[0].note.contains("interruption"));
}

#[test]
fn a_claimed_instance_that_left_before_ready_is_claimed_again() {
    let world = World::new(30, node(Some(1), None))
        .record(Phase::AwaitingReady, 10, awaiting(10))
        .group(group(4, 10, &[("i-new", "Terminating")]));
    let transition = world.next();
    let (phase, record) = written(&transition);
    assert_eq!(phase, Phase::ScalingSpot);
    assert_eq!(record.instance_id, None);
    assert_eq!(reasons(&transition), ["ReplacementLost"]);
}

#[test]
fn a_replacement_slow_to_be_ready_is_warned_about_once() {
    let world = World::new(100, node(Some(1), None))
        .record(Phase::AwaitingReady, 10, awaiting(10))
        .group(group(4, 10, &[("i-new", "InService")]))
        .node_of("i-new", "new-node", false);
    let transition = world.next();
    assert_eq!(reasons(&transition), ["ReplacementNotReady"]);
    let mut warned = awaiting(10);
    warned.not_ready_warned_at = Some(at(100));
    let world = World::new(110, node(Some(1), None))
        .record(Phase::AwaitingReady, 10, warned)
        .group(group(4, 10, &[("i-new", "InService")]));
    assert!(world.next().reports.is_empty());
}

#[test]
fn a_replacement_never_ready_is_released_and_asked_for_again_then_falls_back() {
    let world = World::new(10 + 600, node(Some(1), None))
        .record(Phase::AwaitingReady, 10, awaiting(10))
        .group(group(4, 10, &[("i-new", "InService")]))
        .node_of("i-new", "new-node", false);
    let transition = world.next();
    let (phase, record) = written(&transition);
    assert_eq!(phase, Phase::Detected);
    let released = &record.abandoned[0];
    assert_eq!(released.cause, AbandonCause::NeverReady);
    assert_eq!(
        released.undo,
        Undo::Terminate {
            instance: "i-new".into()
        }
    );
    assert!(!released.undone, "the termination is the next step");
    assert_eq!(reasons(&transition), ["ReplacementReleased"]);
    assert_eq!(
        next_capacity(record),
        Some(CapacityType::Spot),
        "one more spot attempt"
    );

    let mut twice = record.clone();
    twice.abandoned.push(released.clone());
    assert_eq!(next_capacity(&twice), Some(CapacityType::OnDemand));
}

// --- after the taint; Failed ---

#[test]
fn a_tainted_record_on_an_untainted_node_taints_it_again() {
    let world = World::new(30, node(Some(1), None)).record(Phase::Tainted, 20, awaiting(10));
    let transition = world.next();
    assert!(matches!(&transition.acts[..], [Act::Taint { .. }]));
    let mut tainted = node(Some(1), None);
    tainted.tainted = true;
    let world = World::new(30, tainted).record(Phase::Tainted, 20, awaiting(10));
    assert_eq!(world.next(), Transition::then(Then::Done));
}

#[test]
fn a_failed_node_is_tried_again_on_a_newer_notice_after_the_cool_down() {
    let mut failed = detected();
    failed.reason = Some("no capacity".into());
    failed.abandoned.push(Abandoned {
        scale: intent(3, 4, &["i-old"], 2),
        undo: Undo::Lower { from: 4, to: 3 },
        undone: true,
        cause: AbandonCause::Capacity,
    });
    // No notice since the failure: nothing.
    let world = World::new(1000, node(Some(1), None)).record(Phase::Failed, 100, failed.clone());
    assert_eq!(world.next(), Transition::then(Then::Done));
    // An interruption 50 s after the failure: wait for the rest of the cool-down.
    let world = World::new(150, node(Some(1), Some(150))).record(Phase::Failed, 100, failed.clone());
    assert_eq!(world.next().then, Then::After(Duration::from_secs(250)));
    // After it: a new attempt, on spot again.
    let world = World::new(400, node(Some(1), Some(150))).record(Phase::Failed, 100, failed);
    let transition = world.next();
    let (phase, record) = written(&transition);
    assert_eq!(phase, Phase::Detected);
    assert_eq!(record.attempt_started_at, Some(at(400)));
    assert_eq!(record.reason, None);
    assert_eq!(next_capacity(record), Some(CapacityType::Spot));
    assert_eq!(reasons(&transition), ["ReplacementRetried"]);
}

#[test]
fn the_asg_a_step_reads_is_the_pending_undos_first() {
    let mut record = scaling(ScaleIntent {
        asg: "od-a".into(),
        capacity_type: CapacityType::OnDemand,
        ..intent(1, 2, &[], 2)
    });
    record.abandoned.push(Abandoned {
        scale: intent(3, 4, &["i-old"], 1),
        undo: Undo::Lower { from: 4, to: 3 },
        undone: false,
        cause: AbandonCause::Capacity,
    });
    let read = |phase| {
        asg_to_read(&Record {
            phase,
            since: at(0),
            replacement: &record,
        })
    };
    assert_eq!(read(Phase::ScalingOnDemand).unwrap().asg, "spot-a");
    record.abandoned[0].undone = true;
    let read = |phase| {
        asg_to_read(&Record {
            phase,
            since: at(0),
            replacement: &record,
        })
    };
    assert_eq!(read(Phase::ScalingOnDemand).unwrap().asg, "od-a");
    assert_eq!(read(Phase::Tainted), None);
}

#[test]
fn an_earlier_group_started_from_the_same_desired_capacity_does_not_count_in_a_new_one() {
    // Notice 1 raised 3 → 4 and is tainted; a foreign scale-in took the group back to 3; notice 2
    // starts a group of its own from 3. Its target is 4, not 5.
    let first = intent(3, 4, &["i-old", "i-2", "i-3"], 1);
    let second = intent(3, 4, &["i-old", "i-2", "i-r1"], 95);
    let members = [
        Member {
            node: "first",
            phase: Phase::Tainted,
            scale: &first,
        },
        Member {
            node: "second",
            phase: Phase::ScalingSpot,
            scale: &second,
        },
    ];
    assert_eq!(decide::group_target(&second, &members, 10, false), 4);
    assert_eq!(decide::group_target(&first, &members, 10, false), 4);
}
