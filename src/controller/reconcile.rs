//! The reconciler: reads a noticed node's record, takes the next step of the state machine against
//! AWS and the API server, and writes the record back (intent before action). The decisions come
//! from [`super::decide`]; this file only fetches, acts and records.
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::{
    decide::{self, Member},
    drain, lifecycle,
    metrics::Metrics,
    node_input::NodeInput,
    record::{Abandoned, CapacityType, Phase, Replacement, ScaleIntent, Seat, Undo},
    records::{self, Records, Subject},
};
use crate::{
    aws::{self, Activity, AutoScaling, Group},
    contract::SpotReplacementStatus,
    keys,
    node::{self, OptInLabel},
};

/// Field manager of the controller's writes (and the reporter of its Events).
pub const FIELD_MANAGER: &str = keys::CONTROLLER_FIELD_MANAGER;
/// Field manager of the scale-down protection on a claimed replacement. A manager of its own: a
/// replacement noticed in turn gets a record applied by [`FIELD_MANAGER`], and an apply drops every
/// field its manager set before and left out this time.
pub const PROTECTION_FIELD_MANAGER: &str = "spot-rebalancer-controller-protection";
/// cluster-autoscaler leaves a node with this annotation alone (the claimed replacement).
pub const SCALE_DOWN_DISABLED: &str = "cluster-autoscaler.kubernetes.io/scale-down-disabled";
/// How long a describe answer is reused by concurrent reconciles of one ASG.
const AWS_CACHE_TTL: Duration = Duration::from_millis(500);
/// How soon to look again at a claimed replacement whose scale-up intent is missing from the record.
const READY_POLL: Duration = Duration::from_millis(200);
/// The longest a scale-up call waits for concurrent notices to write their intents.
const MAX_COALESCE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Aws(#[from] aws::Error),
    #[error("{action} on node {node}: {source}")]
    Kube {
        action: &'static str,
        node: String,
        source: kube::Error,
    },
    #[error(transparent)]
    Record(#[from] records::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Aws(error) => error.metric_label(),
            Error::Kube { .. } => "kube",
            Error::Record(error) => error.metric_label(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The controller's settings, validated at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub spot_asg: Option<String>,
    pub on_demand_asg: Option<String>,
    pub capacity_timeout: SignedDuration,
    pub foreign_activity_timeout: SignedDuration,
    pub asg_poll_interval: Duration,
    /// How long a scale-up waits for concurrent notices on its ASG before the call (rule 2).
    pub coalesce_window: Duration,
    pub surge_above_max: bool,
    pub taint: Taint,
    pub opt_in: OptInLabel,
    /// The label naming a node's node group.
    pub nodegroup_label: String,
    /// Drain a node once it is tainted with its replacement Ready (not only on request or interruption).
    pub drain_after_taint: bool,
    /// A drain still not done after this long raises a Warning Event (and goes on; nothing is forced).
    pub drain_timeout: SignedDuration,
    /// Detect, decide and report only: no Auto Scaling call, no taint, no eviction.
    pub dry_run: bool,
}

/// What a reconcile shares with every other: clients, caches, the records this process wrote.
pub struct Context {
    pub client: Client,
    /// For the Eviction API only: no automatic retry of a 429 (a drain requeues instead).
    pub evictions: Client,
    pub aws: AutoScaling,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Every Node (opted in or not): replacements may come from a node group that is not opted in.
    pub all_nodes: Store<Node>,
    /// One `SpotReplacement` per noticed instance: the state machine's record, outliving the Nodes.
    pub records: Records,
    /// Posts each phase to the configured webhook URL, if any.
    pub notifier: super::notify::Notifier,
    /// Eviction rounds in a row that PDBs blocked entirely, per draining node (for the backoff).
    pub(super) drain_rounds: Mutex<HashMap<String, drain::Pace>>,
    asgs: Mutex<HashMap<String, Arc<AsgState>>>,
    /// Reconciles finding out which ASG a new notice belongs to: a call waits for them (rule 2).
    detecting: AtomicUsize,
    warned_rebalancing: Mutex<HashSet<String>>,
    /// Reconciles that failed in a row, per node: a streak long enough is worth a Warning.
    failing: Mutex<HashMap<String, Streak>>,
}

/// Reconciles of one node failing in a row with errors of one kind.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Streak {
    kind: &'static str,
    failures: u32,
}

/// Counts a failure of `kind` on `node` in `streaks`; returns the streak's length (a different kind
/// of error starts the count over).
fn count_failure(streaks: &mut HashMap<String, Streak>, node: &str, kind: &'static str) -> u32 {
    let streak = streaks
        .entry(node.to_owned())
        .and_modify(|streak| {
            if streak.kind == kind {
                streak.failures += 1;
            } else {
                *streak = Streak { kind, failures: 1 };
            }
        })
        .or_insert(Streak { kind, failures: 1 });
    streak.failures
}

/// The wait before retrying a node whose reconciles failed `failures` times in a row: a ceiling of
/// 2 s, doubling, at most 30 s, with jitter (the project's one backoff, [`crate::backoff`]), so a
/// lasting failure (a missing permission, AWS throttling) is not hammered and nodes that failed
/// together do not retry in step. A change of the Node (an interruption notice) still reconciles it
/// at once.
fn retry_after(failures: u32) -> Duration {
    crate::backoff::nth_wait(Duration::from_secs(2), Duration::from_secs(30), failures)
}

/// Failed reconciles in a row (each after the AWS SDK's own retries) before a Warning Event: a
/// throttle or a blip heals within one or two, a missing permission or a broken ASG does not.
pub const FAILURES_BEFORE_WARNING: u32 = 3;

/// Per-ASG state. `decide` serialises the decisions on the group's records (joining a scale-up,
/// claiming an instance, planning an undo); `send` serialises the Auto Scaling calls, so that
/// intents written meanwhile ride on the next call; short-lived caches let concurrent reconciles
/// share one describe.
#[derive(Default)]
struct AsgState {
    decide: tokio::sync::Mutex<()>,
    send: Arc<tokio::sync::Mutex<()>>,
    /// Scale-ups on the way to writing their intent, and when the last one was written: the call
    /// waits until they are in (rule 2).
    pending: AtomicUsize,
    last_intent: Mutex<Option<Instant>>,
    /// The desired capacity this process last set or saw; `None` until it knows.
    known_desired: Mutex<Option<i32>>,
    group: Mutex<Option<(Instant, Group)>>,
    activities: Mutex<Option<(Instant, Vec<Activity>)>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        evictions: Client,
        aws: AutoScaling,
        settings: Settings,
        recorder: Recorder,
        metrics: Metrics,
        all_nodes: Store<Node>,
        records: Records,
        notifier: super::notify::Notifier,
    ) -> Self {
        Context {
            client,
            evictions,
            aws,
            settings,
            recorder,
            metrics,
            all_nodes,
            records,
            notifier,
            drain_rounds: Mutex::default(),
            asgs: Mutex::default(),
            detecting: AtomicUsize::new(0),
            warned_rebalancing: Mutex::default(),
            failing: Mutex::default(),
        }
    }

    /// Counts a failed reconcile of `node`; returns the length of its streak (a new kind of error
    /// starts a new one).
    fn failed(&self, node: &str, kind: &'static str) -> u32 {
        let mut failing = lock(&self.failing);
        failing.retain(|name, _| name == node || self.all_nodes.get(&ObjectRef::new(name)).is_some());
        count_failure(&mut failing, node, kind)
    }

    /// A reconcile of `node` went through: its failing streak, if any, is over.
    fn succeeded(&self, node: &str) {
        lock(&self.failing).remove(node);
    }

    pub(super) fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn asg(&self, name: &str) -> Arc<AsgState> {
        lock(&self.asgs).entry(name.to_owned()).or_default().clone()
    }

    /// Serialises an Auto Scaling call on `asg` with every other (scale-ups, undos, retirements).
    pub(super) async fn sending_on(&self, asg: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let state = self.asg(asg);
        state.send.clone().lock_owned().await
    }

    /// Removes `instance` from its ASG with a decrement (counted in `aws_calls_total`): a
    /// retirement, or taking back a +1 or a refill by id, never letting the ASG pick.
    pub(super) async fn terminate_with_decrement(&self, instance: &str) -> Result<()> {
        self.metrics
            .aws_calls
            .with_label_values(&["TerminateInstanceInAutoScalingGroup"])
            .inc();
        Ok(self.aws.terminate_and_decrement(instance).await?)
    }

    /// Carries out `undo` on `asg`: lowers its desired capacity, or removes one instance by id with a
    /// decrement (never letting the ASG pick which); `Leave` calls nothing.
    pub(super) async fn carry_out(&self, asg: &str, undo: &Undo) -> Result<()> {
        match undo {
            Undo::Lower { to, .. } => {
                self.metrics
                    .aws_calls
                    .with_label_values(&["SetDesiredCapacity"])
                    .inc();
                Ok(self.aws.set_desired(asg, *to).await?)
            }
            Undo::Terminate { instance } => self.terminate_with_decrement(instance).await,
            Undo::Leave { .. } => Ok(()),
        }
    }

    /// Forgets the desired capacity this process last set on `asg`: a retirement or a restore
    /// lowered it, so the next scale-up reads it fresh.
    pub(super) fn forget_desired(&self, asg: &str) {
        *lock(&self.asg(asg).known_desired) = None;
    }

    /// The old node whose record claims `instance`, for waking it when its replacement turns Ready.
    pub fn claimant_of(&self, instance: &str) -> Option<ObjectRef<Node>> {
        self.records
            .all()
            .into_iter()
            .find(|object| {
                object.status.as_ref().is_some_and(|status| {
                    status.phase == Phase::AwaitingReady
                        && status.record.instance_id.as_deref() == Some(instance)
                })
            })
            .map(|object| ObjectRef::new(&object.spec.node_name))
    }

    /// Every noticed node's phase and record, by Node name: the records whose Node is still there
    /// (with the record's instance in its provider id). A record whose Node went stays for the
    /// capacity sweeper ([`super::reclaim`]) but no longer counts here.
    pub(super) fn records(&self) -> HashMap<String, (Phase, Replacement)> {
        self.records
            .all()
            .into_iter()
            .filter_map(|object| {
                let status = object.status?;
                let present = self
                    .all_nodes
                    .get(&ObjectRef::new(&object.spec.node_name))
                    .is_some_and(|node| node::instance_id(&node) == Some(object.spec.instance_id.as_str()));
                present.then_some((object.spec.node_name, (status.phase, status.record)))
            })
            .collect()
    }

    /// The phase and record of `node`'s instance (named by its provider id), if it has one.
    pub(super) fn written(&self, node: &Node) -> Option<(Phase, Replacement)> {
        let instance = node::instance_id(node)?;
        let status = self.records.get(instance)?.status?;
        Some((status.phase, status.record))
    }

    /// The seat (what this controller added for it) of `instance`'s record.
    pub(super) fn seat(&self, instance: &str) -> Option<Seat> {
        self.records
            .get(instance)
            .as_ref()
            .and_then(records::seat_of)
            .cloned()
    }

    /// Every record's seat, also of records whose Node is gone.
    pub(super) fn seats(&self) -> Vec<Seat> {
        self.records
            .all()
            .iter()
            .filter_map(records::seat_of)
            .cloned()
            .collect()
    }

    /// Writes `seat` into its instance's record (intent before action, like every record write).
    pub(super) async fn put_seat(&self, seat: Seat) -> Result<()> {
        let instance = seat.instance.clone();
        self.records
            .update(&instance, move |status| SpotReplacementStatus {
                seat: Some(seat),
                ..status.clone()
            })
            .await?;
        Ok(())
    }

    /// The ASG as described now (`fresh`), or as described by anyone within [`AWS_CACHE_TTL`].
    pub(super) async fn group(&self, asg: &str, fresh: bool) -> Result<Group> {
        let max_age = if fresh { Duration::ZERO } else { AWS_CACHE_TTL };
        self.group_within(asg, max_age).await
    }

    /// The ASG as described at most `max_age` ago (described now when older).
    pub(super) async fn group_within(&self, asg: &str, max_age: Duration) -> Result<Group> {
        let state = self.asg(asg);
        if let Some((at, group)) = lock(&state.group).as_ref()
            && at.elapsed() < max_age
        {
            return Ok(group.clone());
        }
        self.metrics
            .aws_calls
            .with_label_values(&["DescribeAutoScalingGroups"])
            .inc();
        let group = self.aws.group(asg).await?;
        self.metrics
            .capacity_rebalancing
            .with_label_values(&[asg])
            .set(i64::from(group.capacity_rebalance));
        *lock(&state.group) = Some((Instant::now(), group.clone()));
        Ok(group)
    }

    async fn activities(&self, asg: &str) -> Result<Vec<Activity>> {
        let state = self.asg(asg);
        if let Some((at, activities)) = lock(&state.activities).as_ref()
            && at.elapsed() < AWS_CACHE_TTL
        {
            return Ok(activities.clone());
        }
        self.metrics
            .aws_calls
            .with_label_values(&["DescribeScalingActivities"])
            .inc();
        let activities = self.aws.activities(asg).await?;
        *lock(&state.activities) = Some((Instant::now(), activities.clone()));
        Ok(activities)
    }

    /// The opted-in Nodes in the cache: the ones this controller acts on.
    pub fn opted_in_nodes(&self) -> Vec<Arc<Node>> {
        self.all_nodes
            .state()
            .into_iter()
            .filter(|n| self.settings.opt_in.matches(n))
            .collect()
    }

    /// Readiness of the Node of `instance`, from the cache of all Nodes; `None` when it has none.
    pub(super) fn node_of_instance(&self, instance: &str) -> Option<Arc<Node>> {
        self.all_nodes.find(|n| node::instance_id(n) == Some(instance))
    }

    pub(super) async fn event(&self, node: &Node, type_: EventType, reason: &str, note: String) {
        self.event_on(&node.object_ref(&()), type_, reason, note).await;
    }

    /// An Event about any object (also a Node that is gone: its Events stay readable).
    pub(super) async fn event_on(
        &self,
        object: &k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(fit_note(note)),
            action: reason.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, object).await {
            warn!(%error, reason, "publishing an event failed");
        }
    }
}

/// The API server refuses an Event whose note is over 1024 bytes (an eviction list, an AWS error
/// with its whole response): cut it at a character boundary, marked with an ellipsis.
fn fit_note(mut note: String) -> String {
    const NOTE_LIMIT: usize = 1024;
    const ELLIPSIS: &str = "…";
    if note.len() <= NOTE_LIMIT {
        return note;
    }
    let mut end = NOTE_LIMIT - ELLIPSIS.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note.truncate(end);
    note.push_str(ELLIPSIS);
    note
}

/// Counts a piece of work in flight for as long as it lives.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Members of coalesced scale-ups: every record with a scale-up in flight or done (and not retired).
fn members<'a>(records: &'a HashMap<String, (Phase, Replacement)>) -> Vec<Member<'a>> {
    records
        .iter()
        .filter(|(_, (phase, _))| !phase.is_finished())
        .filter_map(|(node, (phase, record))| {
            Some(Member {
                node: node.as_str(),
                phase: *phase,
                scale: record.scale.as_ref()?,
            })
        })
        .collect()
}

/// What the next step of one reconcile is.
enum Step {
    /// The record moved on; take the next step now.
    Continue(Phase, Replacement),
    /// Spot capacity is gone (the abandoned scale-up is in the record): scale the on-demand ASG.
    FallBack(Replacement),
    /// Nothing to do until then (or until the node changes).
    Wait(Duration),
    /// Nothing more to do for this node.
    Done,
}

#[instrument(skip_all, fields(node = %node.name_any()))]
pub async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action> {
    let input = NodeInput::read(node::annotations(&node), old_instance(&node));
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
    let replacing = replace(node.clone(), ctx.clone(), &input).await;
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

/// The replacement state machine up to `Tainted`: the wait until the next look, if any.
async fn replace(node: Arc<Node>, ctx: Arc<Context>, input: &NodeInput) -> Result<Option<Duration>> {
    let noticed = input.rebalance.is_some();
    let interrupted = input.interruption.is_some();
    let mut state = ctx.written(&node);
    if state.is_none() && !noticed && !interrupted {
        return Ok(None);
    }
    // Rule 5's exception, before anything else and before any AWS call: an interrupted node dies
    // in two minutes, replacement or not, so it is tainted at once even while every AWS call fails.
    let phase_now = state.as_ref().map(|(phase, _)| *phase);
    let tainted_at = state.as_ref().and_then(|(_, record)| record.tainted_at);
    if decide::taint_on_interruption(interrupted, phase_now, tainted_at)
        && !node::has_taint(&node, &ctx.settings.taint.key, &ctx.settings.taint.effect)
        && ctx.settings.dry_run
    {
        let note = format!(
            "dry run: would taint {} at once on its interruption notice",
            taint_text(&ctx.settings.taint)
        );
        ctx.event(&node, EventType::Normal, "WouldTaint", note).await;
    } else if decide::taint_on_interruption(interrupted, phase_now, tainted_at)
        && !node::has_taint(&node, &ctx.settings.taint.key, &ctx.settings.taint.effect)
    {
        taint(&node, &ctx, "interruption notice").await?;
        let note = format!(
            "interruption notice: tainted at once, {}",
            taint_text(&ctx.settings.taint)
        );
        ctx.event(&node, EventType::Warning, "TaintedOnInterruption", note)
            .await;
    }
    let mut fallback = None;
    loop {
        let step = match (state.take(), fallback.take()) {
            (_, Some(record)) => {
                let step = start_scale(&node, &ctx, record, CapacityType::OnDemand).await?;
                match step {
                    Step::Continue(phase, mut record) => {
                        finish_undos(&node, &ctx, phase, &mut record).await?;
                        Step::Continue(phase, record)
                    }
                    other => other,
                }
            }
            (None, None) => {
                let _detecting = Counted::new(&ctx.detecting);
                detect(&node, &ctx, interrupted).await?
            }
            (Some((phase, mut record)), None) => {
                // The taint made above (or in an earlier reconcile) goes into the record.
                if decide::taint_on_interruption(interrupted, Some(phase), record.tainted_at)
                    && !ctx.settings.dry_run
                {
                    record.tainted_at = Some(Timestamp::now());
                    write_record(&node, &ctx, phase, &record).await?;
                }
                finish_undos(&node, &ctx, phase, &mut record).await?;
                match phase {
                    Phase::Detected => start_scale(&node, &ctx, record, CapacityType::Spot).await?,
                    Phase::ScalingSpot | Phase::ScalingOnDemand => {
                        await_instance(&node, &ctx, record).await?
                    }
                    Phase::AwaitingReady => await_ready(&node, &ctx, record).await?,
                    Phase::Tainted
                    | Phase::Draining
                    | Phase::Retired
                    | Phase::Drained
                    | Phase::Failed
                    | Phase::Skipped => Step::Done,
                }
            }
        };
        match step {
            Step::Continue(phase, record) => state = Some((phase, record)),
            Step::FallBack(record) => fallback = Some(record),
            Step::Wait(after) => return Ok(Some(after)),
            Step::Done => return Ok(None),
        }
    }
}

pub fn error_policy(node: Arc<Node>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(node = %node.name_any(), %error, "reconcile failed; retrying");
    let kind = error.metric_label();
    ctx.metrics.reconcile_errors.with_label_values(&[kind]).inc();
    let failures = ctx.failed(&node.name_any(), kind);
    let wait = retry_after(failures);
    if failures == FAILURES_BEFORE_WARNING {
        // Operators look at the node, not at the controller's log: say there what keeps failing.
        let note = format!(
            "{failures} attempts in a row failed, retrying with backoff (at most every 30 s): {error}"
        );
        tokio::spawn(async move {
            ctx.event(&node, EventType::Warning, "ReconcileFailing", note)
                .await;
        });
    }
    Action::requeue(wait)
}

/// A notice arrived: find the node's ASGs and record them (or skip a node in no ASG).
async fn detect(node: &Node, ctx: &Context, interrupted: bool) -> Result<Step> {
    let now = Timestamp::now();
    ctx.metrics.notices.inc();
    let Some(instance) = old_instance(node) else {
        // No record can be kept without an instance: say so, and do nothing.
        let note = "notice on a node with no EC2 instance in its provider id (aws:///<zone>/<instance-id>); \
                    nothing is done"
            .to_owned();
        warn!(%note, "skipped");
        ctx.metrics.skipped.inc();
        ctx.event(node, EventType::Warning, "ReplacementSkipped", note)
            .await;
        return Ok(Step::Done);
    };
    ctx.metrics
        .aws_calls
        .with_label_values(&["DescribeAutoScalingInstances"])
        .inc();
    let Some(own_asg) = ctx.aws.group_of_instance(instance).await? else {
        return skip(
            node,
            ctx,
            format!("instance {instance} is not in any Auto Scaling group"),
        )
        .await;
    };
    // Only instances of opted-in ASGs are acted on (the IAM policy requires the tag for scaling
    // anyway): a node's label alone, which the node can write, is not enough.
    let own_group = ctx.group(&own_asg, false).await?;
    if !decide::asg_opted_in(&own_group) {
        return skip(
            node,
            ctx,
            format!(
                "instance {instance}'s ASG {own_asg} does not carry the tag {}=true",
                keys::ENABLED_LABEL
            ),
        )
        .await;
    }
    let spot_asg = ctx.settings.spot_asg.clone().unwrap_or_else(|| own_asg.clone());
    let group = ctx.group(&spot_asg, false).await?;
    warn_capacity_rebalancing(node, ctx, &group).await;
    let on_demand_asg = group
        .tags
        .get(keys::FALLBACK_ASG_TAG)
        .cloned()
        .or_else(|| ctx.settings.on_demand_asg.clone());
    let mut record = Replacement::new(spot_asg.clone(), on_demand_asg.clone(), now);
    record.instance_asg = Some(own_asg.clone());
    if interrupted && !ctx.settings.dry_run {
        // Tainted on its interruption notice before this detection (see `replace`).
        record.tainted_at = Some(now);
    }
    write_record(node, ctx, Phase::Detected, &record).await?;
    let fallback = on_demand_asg.map_or("no on-demand fallback".to_owned(), |asg| {
        format!("fallback {asg}")
    });
    let note = format!("notice on instance {instance}: replacing from spot ASG {spot_asg} ({fallback})");
    info!(%note, "detected");
    ctx.event(node, EventType::Normal, "RebalanceNoticed", note).await;
    Ok(Step::Continue(Phase::Detected, record))
}

async fn skip(node: &Node, ctx: &Context, reason: String) -> Result<Step> {
    let mut record = Replacement::new(String::new(), None, Timestamp::now());
    record.reason = Some(reason.clone());
    write_record(node, ctx, Phase::Skipped, &record).await?;
    ctx.metrics.skipped.inc();
    warn!(%reason, "skipped");
    ctx.event(
        node,
        EventType::Warning,
        "ReplacementSkipped",
        format!("{reason}; the node is not tainted"),
    )
    .await;
    Ok(Step::Done)
}

pub fn capacity_rebalancing_note(asg: &str) -> String {
    format!(
        "ASG {asg} has EC2 Capacity Rebalancing on: it launches its own replacement too, so a notice may \
         cost two instances; switch one of them off"
    )
}

async fn warn_capacity_rebalancing(node: &Node, ctx: &Context, group: &Group) {
    if group.capacity_rebalance && lock(&ctx.warned_rebalancing).insert(group.name.clone()) {
        let note = capacity_rebalancing_note(&group.name);
        ctx.event(node, EventType::Warning, "CapacityRebalancingEnabled", note)
            .await;
    }
}

/// Ask `capacity_type`'s ASG for one more instance: join or start a coalesced scale-up, write the
/// intent, then make the (idempotent) call.
async fn start_scale(
    node: &Node,
    ctx: &Context,
    mut record: Replacement,
    capacity_type: CapacityType,
) -> Result<Step> {
    let asg = match capacity_type {
        CapacityType::Spot => record.spot_asg.clone(),
        CapacityType::OnDemand => match record.on_demand_asg.clone() {
            Some(asg) => asg,
            None => {
                return fail(
                    node,
                    ctx,
                    record,
                    "spot capacity is gone and no on-demand fallback ASG is set",
                )
                .await;
            }
        },
    };
    let phase = match capacity_type {
        CapacityType::Spot => Phase::ScalingSpot,
        CapacityType::OnDemand => Phase::ScalingOnDemand,
    };
    let name = node.name_any();
    let state = ctx.asg(&asg);
    let pending = Counted::new(&state.pending);
    let mut group = ctx.group(&asg, false).await?;
    let decision = state.decide.lock().await;
    let now = Timestamp::now();
    // A cached describe may predate this process's own last call.
    group.desired = group.desired.max(lock(&state.known_desired).unwrap_or(0));

    let records = ctx.records();
    let others = members(&records);
    // Rule 7 (a foreign activity in progress: wait, bounded) holds back a first spot scale-up only;
    // joining our own in-flight scale-up, or falling back, must not wait.
    let joining = others
        .iter()
        .any(|m| m.node != name && m.scale.asg == asg && m.phase.is_scaling());
    if !joining && capacity_type == CapacityType::Spot {
        let activities = ctx.activities(&asg).await?;
        let ours: Vec<&ScaleIntent> = others
            .iter()
            .filter(|m| m.scale.asg == asg)
            .map(|m| m.scale)
            .collect();
        if let Some(activity) = decide::foreign_activity_in_progress(&activities, &ours) {
            let since = *record.waiting_since.get_or_insert(now);
            if now.duration_since(since) < ctx.settings.foreign_activity_timeout {
                if since == now {
                    let note = format!(
                        "waiting for scaling activity {} on {asg}: {}",
                        activity.id, activity.description
                    );
                    write_record(node, ctx, Phase::Detected, &record).await?;
                    ctx.event(node, EventType::Normal, "WaitingForScalingActivity", note)
                        .await;
                }
                return Ok(Step::Wait(ctx.settings.asg_poll_interval));
            }
            warn!(asg, activity = %activity.id, "foreign scaling activity still in progress; acting anyway");
        }
    }
    let intent = decide::coalesced_intent(&name, &others, &group, capacity_type, now);
    if intent.target_desired > group.max && !ctx.settings.surge_above_max {
        drop(decision);
        let reason = format!("{asg} is at its MaxSize of {}", group.max);
        return give_up_on(node, ctx, record, capacity_type, reason).await;
    }
    record.scale = Some(intent.clone());
    record.waiting_since = None;
    write_record(node, ctx, phase, &record).await?;
    *lock(&state.last_intent) = Some(Instant::now());
    drop(pending);
    drop(decision);

    wait_for_concurrent_intents(ctx, &state).await;
    if ctx.settings.dry_run {
        // Detected and decided; the call is only reported. Nothing will launch, so the flow ends
        // here (the record keeps what would have been asked).
        let records = ctx.records();
        let target = decide::group_target(
            &intent,
            &members(&records),
            group.max,
            ctx.settings.surge_above_max,
        );
        let note = format!(
            "dry run: would raise {asg} ({capacity_type:?}) {} → {target}; no Auto Scaling call, no taint, no eviction",
            intent.baseline
        );
        info!(%note, "dry run");
        ctx.metrics
            .scale_ups
            .with_label_values(&[asg.as_str(), capacity_label(capacity_type), "dry_run"])
            .inc();
        ctx.event(node, EventType::Normal, "WouldScaleUp", note).await;
        return Ok(Step::Done);
    }
    if let Some(target) = ensure_desired(ctx, &intent).await? {
        let note = format!("asked {asg} ({capacity_type:?}) for desired capacity {target}");
        info!(%note, "scaling");
        ctx.event(node, EventType::Normal, "ScalingUp", note).await;
    }
    Ok(Step::Continue(phase, record))
}

fn capacity_label(capacity_type: CapacityType) -> &'static str {
    match capacity_type {
        CapacityType::Spot => "spot",
        CapacityType::OnDemand => "on-demand",
    }
}

/// Rule 2: before a call, let concurrent notices on the ASG write their intents (none still
/// detecting or deciding, none written for a coalesce window), so one call covers them all.
async fn wait_for_concurrent_intents(ctx: &Context, state: &AsgState) {
    let deadline = Instant::now() + MAX_COALESCE_WAIT;
    loop {
        let busy = ctx.detecting.load(Ordering::SeqCst) > 0 || state.pending.load(Ordering::SeqCst) > 0;
        let quiet = lock(&state.last_intent).is_none_or(|at| at.elapsed() >= ctx.settings.coalesce_window);
        if (!busy && quiet) || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    match sent {
        Ok(()) => {
            ctx.metrics.scale_ups.with_label_values(&[asg, label, "ok"]).inc();
            Ok(())
        }
        Err(error) => {
            ctx.metrics
                .scale_ups
                .with_label_values(&[asg, label, "error"])
                .inc();
            Err(error.into())
        }
    }
}

/// Makes the group's desired capacity cover every member's intent (also after a crash between
/// intent and call). Only ever raises; reads the ASG fresh before a call so a capacity another
/// actor raised is never lowered. Returns the target it set, if it made a call.
async fn ensure_desired(ctx: &Context, intent: &ScaleIntent) -> Result<Option<i32>> {
    let state = ctx.asg(&intent.asg);
    let _sending = state.send.lock().await;
    let records = ctx.records();
    let members = members(&records);
    let known = *lock(&state.known_desired);
    let max = lock(&state.group)
        .as_ref()
        .map_or(i32::MAX, |(_, group)| group.max);
    let target = decide::group_target(intent, &members, max, ctx.settings.surge_above_max);
    if known.is_some_and(|known| known >= target) {
        return Ok(None);
    }
    let group = ctx.group(&intent.asg, true).await?;
    let target = decide::group_target(intent, &members, group.max, ctx.settings.surge_above_max);
    if group.desired >= target {
        *lock(&state.known_desired) = Some(group.desired);
        return Ok(None);
    }
    set_desired(ctx, &intent.asg, intent.capacity_type, target, group.max).await?;
    *lock(&state.known_desired) = Some(target);
    Ok(Some(target))
}

/// Waiting for a new instance: claim one, or detect that capacity is gone.
async fn await_instance(node: &Node, ctx: &Context, mut record: Replacement) -> Result<Step> {
    let Some(intent) = record.scale.clone() else {
        return Ok(Step::Continue(Phase::Detected, record));
    };
    if ctx.settings.dry_run {
        return Ok(Step::Done);
    }
    let name = node.name_any();
    ensure_desired(ctx, &intent).await?;
    let group = ctx.group(&intent.asg, false).await?;

    let state = ctx.asg(&intent.asg);
    let guard = state.decide.lock().await;
    let records = ctx.records();
    let claimed: HashSet<String> = records
        .iter()
        .filter(|(other, _)| **other != name)
        .filter_map(|(_, (_, r))| r.instance_id.clone())
        .collect();
    let ready = |id: &str| ctx.node_of_instance(id).map(|n| node::is_ready(&n));
    if let Some(instance) = decide::pick_replacement(&intent, &group, &claimed, ready) {
        record.instance_id = Some(instance.to_owned());
        record.node = ctx.node_of_instance(instance).map(|n| n.name_any());
        record.claimed_at = Some(Timestamp::now());
        record.not_ready_warned_at = None;
        write_record(node, ctx, Phase::AwaitingReady, &record).await?;
        drop(guard);
        let note = format!(
            "claimed new instance {instance} of {} as the replacement",
            intent.asg
        );
        info!(%note, "claimed");
        ctx.event(node, EventType::Normal, "ReplacementClaimed", note)
            .await;
        return Ok(Step::Continue(Phase::AwaitingReady, record));
    }
    drop(guard);

    let activities = ctx.activities(&intent.asg).await?;
    let now = Timestamp::now();
    // Keep the ActivityIds of the launches this request caused in the record.
    let caused = decide::activities_of(&activities, &intent);
    if !caused.is_empty() && caused != intent.activity_ids {
        if let Some(scale) = record.scale.as_mut() {
            scale.activity_ids = caused;
        }
        write_record(node, ctx, Phase::from(intent.capacity_type), &record).await?;
    }
    match decide::capacity_unavailable(&activities, &intent, now, ctx.settings.capacity_timeout) {
        Some(reason) => give_up_on(node, ctx, record, intent.capacity_type, reason).await,
        None => Ok(Step::Wait(ctx.settings.asg_poll_interval)),
    }
}

/// Capacity of `capacity_type` is gone: take this node's +1 back (planned and recorded first), then
/// fall back to on-demand, or fail.
async fn give_up_on(
    node: &Node,
    ctx: &Context,
    mut record: Replacement,
    capacity_type: CapacityType,
    reason: String,
) -> Result<Step> {
    let name = node.name_any();
    if let Some(intent) = record.scale.take() {
        let group = ctx.group(&intent.asg, true).await?;
        let state = ctx.asg(&intent.asg);
        let _deciding = state.decide.lock().await;
        let records = ctx.records();
        let others: Vec<Member<'_>> = members(&records).into_iter().filter(|m| m.node != name).collect();
        let still_needed = others
            .iter()
            .filter(|m| m.scale.asg == intent.asg && m.scale.baseline == intent.baseline)
            .count() as i32;
        let claimed: HashSet<String> = records
            .values()
            .filter_map(|(_, r)| r.instance_id.clone())
            .collect();
        let undo = decide::plan_undo(&intent, &group, intent.baseline + still_needed, &claimed);
        record.abandoned.push(Abandoned {
            scale: intent,
            undo,
            undone: false,
        });
        drop(_deciding);
        // Take the +1 back (plan recorded first) before asking another ASG: the shorter the time
        // between the fresh read and the call, the smaller the chance a late launch slips in.
        let phase = match capacity_type {
            CapacityType::Spot => Phase::ScalingSpot,
            CapacityType::OnDemand => Phase::ScalingOnDemand,
        };
        write_record(node, ctx, phase, &record).await?;
        finish_undos(node, ctx, phase, &mut record).await?;
    }
    let fallback = capacity_type == CapacityType::Spot && record.on_demand_asg.is_some();
    if fallback {
        ctx.metrics
            .fallbacks
            .with_label_values(&[record.spot_asg.as_str()])
            .inc();
        let on_demand = record.on_demand_asg.clone().unwrap_or_default();
        let note = format!("spot capacity unavailable ({reason}); falling back to on-demand ASG {on_demand}");
        warn!(%note, "falling back");
        ctx.event(node, EventType::Warning, "SpotCapacityUnavailable", note)
            .await;
        // The abandoned intent is written together with the on-demand intent; the undo follows.
        return Ok(Step::FallBack(record));
    }
    fail(node, ctx, record, &reason).await
}

async fn fail(node: &Node, ctx: &Context, mut record: Replacement, reason: &str) -> Result<Step> {
    record.reason = Some(reason.to_owned());
    ctx.metrics.failed.inc();
    write_record(node, ctx, Phase::Failed, &record).await?;
    warn!(reason, "replacement failed");
    let note = format!("no replacement capacity: {reason}; the node is not tainted");
    ctx.event(node, EventType::Warning, "ReplacementFailed", note)
        .await;
    finish_undos(node, ctx, Phase::Failed, &mut record).await?;
    Ok(Step::Done)
}

/// Carries out recorded undos that are not done yet (also after a restart), then marks them done.
/// Right before a `Lower`, the ASG is read again: if an instance beyond the lowered value has
/// appeared since the plan (spot capacity came back late), lowering would let the ASG pick a
/// victim, so the plan becomes removing that late instance by id.
async fn finish_undos(node: &Node, ctx: &Context, phase: Phase, record: &mut Replacement) -> Result<()> {
    let name = node.name_any();
    let mut changed = false;
    for index in 0..record.abandoned.len() {
        if record.abandoned[index].undone {
            continue;
        }
        let asg = record.abandoned[index].scale.asg.clone();
        let state = ctx.asg(&asg);
        let _sending = state.send.lock().await;
        let group = ctx.group(&asg, true).await?;
        let records = ctx.records();
        let claimed: HashSet<String> = records
            .iter()
            .filter(|(other, _)| **other != name)
            .filter_map(|(_, (_, r))| r.instance_id.clone())
            .collect();
        let stale = match &record.abandoned[index].undo {
            Undo::Lower { to, .. } => group.desired > *to && group.instances.len() as i32 > *to,
            Undo::Terminate { instance } => claimed.contains(instance),
            Undo::Leave { .. } => false,
        };
        if stale {
            let needed_by_others = group.desired - 1;
            let replanned =
                decide::plan_undo(&record.abandoned[index].scale, &group, needed_by_others, &claimed);
            info!(
                asg,
                ?replanned,
                "the group changed since the undo was planned; re-planned"
            );
            record.abandoned[index].undo = replanned;
            write_record(node, ctx, phase, record).await?;
        }
        let abandoned = &mut record.abandoned[index];
        if decide::undo_pending(&abandoned.undo, &group) {
            ctx.carry_out(&asg, &abandoned.undo).await?;
            match &abandoned.undo {
                Undo::Lower { to, .. } => *lock(&state.known_desired) = Some(*to),
                Undo::Terminate { .. } => *lock(&state.known_desired) = Some(group.desired - 1),
                Undo::Leave { .. } => {}
            }
        }
        abandoned.undone = true;
        changed = true;
        let note = match &abandoned.undo {
            Undo::Lower { from, to } => format!("took back the scale-up on {asg}: desired {from} → {to}"),
            Undo::Terminate { instance } => {
                format!("took back the scale-up on {asg}: removed late instance {instance} and decremented")
            }
            Undo::Leave { reason } => format!("left {asg} as it is: {reason}"),
        };
        info!(%note, "undo");
        ctx.event(node, EventType::Normal, "ScaleUpWithdrawn", note).await;
    }
    if changed {
        write_record(node, ctx, phase, record).await?;
    }
    Ok(())
}

/// A replacement was claimed: taint once its Node is Ready.
async fn await_ready(node: &Node, ctx: &Context, mut record: Replacement) -> Result<Step> {
    let Some(instance) = record.instance_id.clone() else {
        return Ok(Step::Continue(Phase::Detected, record));
    };
    let replacement = ctx.node_of_instance(&instance);
    match replacement {
        Some(replacement) if node::is_ready(&replacement) => {
            let now = Timestamp::now();
            let replacement_name = replacement.name_any();
            mark_scale_down_disabled(ctx, &replacement_name).await?;
            if record.node.as_deref() != Some(replacement_name.as_str()) {
                // The webhook's order guard finds the replacement through the record: name it
                // before the taint, so the taint stands on its own, not only on a trusted username.
                record.node = Some(replacement_name.clone());
                write_record(node, ctx, Phase::AwaitingReady, &record).await?;
            }
            let tainted_before = record.tainted_at.is_some();
            if !tainted_before {
                taint(node, ctx, "replacement Ready").await?;
                record.tainted_at = Some(now);
            }
            record.ready_at = Some(now);
            write_record(node, ctx, Phase::Tainted, &record).await?;
            let latency = now.duration_since(record.detected_at).as_secs_f64();
            let from = record
                .scale
                .as_ref()
                .map_or(record.spot_asg.as_str(), |s| s.asg.as_str());
            ctx.metrics
                .replacement_ready_seconds
                .with_label_values(&[from])
                .observe(latency);
            let tainted = if tainted_before {
                "it was tainted before, on its interruption notice".to_owned()
            } else {
                format!("tainted {}", taint_text(&ctx.settings.taint))
            };
            let note = format!(
                "replacement {} ({instance}) is Ready after {latency:.1} s; {tainted}",
                replacement.name_any(),
            );
            info!(%note, "tainted");
            ctx.event(node, EventType::Normal, "Tainted", note).await;
            Ok(Step::Done)
        }
        _ => {
            let Some(intent) = record.scale.clone() else {
                return Ok(Step::Wait(READY_POLL));
            };
            // Waiting may last (a kubelet that never joins): look again at the poll interval. The
            // Node turning Ready wakes this node at once (the claimant waker in `controller`).
            let poll = ctx.settings.asg_poll_interval;
            let group = ctx.group_within(&intent.asg, poll).await?;
            if group.instances.iter().any(|i| i.id == instance) {
                warn_if_slow_to_be_ready(node, ctx, &mut record, &instance).await?;
                return Ok(Step::Wait(poll));
            }
            // The claimed instance went away before it was Ready: claim another.
            let phase = match intent.capacity_type {
                CapacityType::Spot => Phase::ScalingSpot,
                CapacityType::OnDemand => Phase::ScalingOnDemand,
            };
            record.instance_id = None;
            record.node = None;
            record.claimed_at = None;
            record.not_ready_warned_at = None;
            write_record(node, ctx, phase, &record).await?;
            let note = format!(
                "claimed instance {instance} left {} before it was Ready",
                intent.asg
            );
            ctx.event(node, EventType::Warning, "ReplacementLost", note).await;
            Ok(Step::Continue(phase, record))
        }
    }
}

/// A claimed instance whose Node is still not Ready after `CAPACITY_TIMEOUT` (it failed to join the
/// cluster, say) is worth a Warning, once per claim: the old node stays untainted and keeps waiting,
/// since tainting without Ready capacity is what this controller exists to avoid. The record says it
/// was sent (written first), so a restarted or new leader does not send it again.
async fn warn_if_slow_to_be_ready(
    node: &Node,
    ctx: &Context,
    record: &mut Replacement,
    instance: &str,
) -> Result<()> {
    let Some(claimed_at) = record.claimed_at else {
        return Ok(());
    };
    let now = Timestamp::now();
    let waited = now.duration_since(claimed_at);
    if waited > ctx.settings.capacity_timeout && record.not_ready_warned_at.is_none() {
        record.not_ready_warned_at = Some(now);
        write_record(node, ctx, Phase::AwaitingReady, record).await?;
        let note = format!(
            "claimed replacement {instance} has had no Ready Node for {:.0} s; {} stays untainted until it \
             has one (an interruption notice still taints it at once)",
            waited.as_secs_f64(),
            node.name_any()
        );
        ctx.event(node, EventType::Warning, "ReplacementNotReady", note)
            .await;
    }
    Ok(())
}

fn taint_text(taint: &Taint) -> String {
    format!(
        "{}={}:{}",
        taint.key,
        taint.value.as_deref().unwrap_or_default(),
        taint.effect
    )
}

/// Adds the termination taint, guarded by the node's resourceVersion so no other change is lost.
async fn taint(node: &Node, ctx: &Context, why: &str) -> Result<()> {
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
    Ok(())
}

async fn mark_scale_down_disabled(ctx: &Context, replacement: &str) -> Result<()> {
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

/// The noticed node's own instance: from its provider id only (an annotation is the node's word).
pub(super) fn old_instance(node: &Node) -> Option<&str> {
    node::instance_id(node)
}

/// The record's subject for `node`: its name, uid and instance (from the provider id).
fn subject(node: &Node) -> Option<Subject> {
    Some(Subject {
        node: node.name_any(),
        node_uid: node.uid().unwrap_or_default(),
        instance: old_instance(node)?.to_owned(),
    })
}

/// Writes phase and record into the node's `SpotReplacement` (with its resourceVersion, so a write
/// based on an older read fails), together with the seat it holds in its ASG, so the seat is known
/// before the Auto Scaling call it announces. A new phase is posted to the notifier.
pub(super) async fn write_record(
    node: &Node,
    ctx: &Context,
    phase: Phase,
    record: &Replacement,
) -> Result<()> {
    let Some(subject) = subject(node) else {
        let what = format!("the provider id of node {}", node.name_any());
        return Err(records::Error::BadInstance(what).into());
    };
    let now = Timestamp::now();
    let mut before = None;
    ctx.records
        .write(&subject, |current| {
            before = current.map(|status| status.phase);
            let existing_seat = current.and_then(|status| status.seat.as_ref());
            // A dry run holds no seat: it added nothing.
            let seat = if ctx.settings.dry_run {
                None
            } else {
                lifecycle::tracked_seat(
                    existing_seat,
                    &subject.node,
                    &subject.instance,
                    phase,
                    record,
                    now,
                )
                .or_else(|| existing_seat.cloned())
            };
            let base = current.cloned().unwrap_or_else(|| SpotReplacementStatus {
                phase,
                record: record.clone(),
                seat: None,
                history: Vec::new(),
            });
            SpotReplacementStatus {
                record: record.clone(),
                seat,
                ..base
            }
            .entering(phase, now)
        })
        .await?;
    if before != Some(phase) {
        ctx.notifier.send(&super::notify::Notification {
            node: subject.node.clone(),
            instance: Some(subject.instance.clone()),
            asg: Some(
                record
                    .instance_asg
                    .clone()
                    .unwrap_or_else(|| record.spot_asg.clone()),
            ),
            phase: phase.to_string(),
            reason: record.reason.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_note_is_cut_to_what_the_api_server_takes() {
        assert_eq!(fit_note("short".into()), "short");
        let exact = "x".repeat(1024);
        assert_eq!(fit_note(exact.clone()), exact);
        let long = fit_note("é".repeat(800)); // 1600 bytes, two per character
        assert!(long.len() <= 1024 && long.ends_with('…'), "{} bytes", long.len());
        assert!(long.starts_with("éé"));
    }

    #[test]
    fn a_streak_counts_up_and_reaches_the_warning_threshold_once() {
        let mut streaks = HashMap::new();
        let counts: Vec<_> = (0..5)
            .map(|_| count_failure(&mut streaks, "n1", "set_desired"))
            .collect();
        assert_eq!(counts, [1, 2, 3, 4, 5]);
        assert_eq!(
            counts.iter().filter(|n| **n == FAILURES_BEFORE_WARNING).count(),
            1
        );
    }

    #[test]
    fn retries_back_off_from_2_s_to_at_most_30_s() {
        let ceilings = [2, 4, 8, 16, 30, 30, 30];
        for (failures, ceiling) in (1..=7).zip(ceilings) {
            let wait = retry_after(failures);
            let ceiling = Duration::from_secs(ceiling);
            assert!((ceiling / 2..=ceiling).contains(&wait), "{failures}: {wait:?}");
        }
        assert!(retry_after(u32::MAX) <= Duration::from_secs(30));
    }

    #[test]
    fn another_kind_of_error_starts_a_new_streak_and_nodes_count_apart() {
        let mut streaks = HashMap::new();
        let mut fail = |node, kind| count_failure(&mut streaks, node, kind);
        assert_eq!(fail("n1", "set_desired"), 1);
        assert_eq!(fail("n1", "set_desired"), 2);
        assert_eq!(fail("n2", "set_desired"), 1);
        // A kube error after two AWS ones: the AWS streak is over, this one starts at 1.
        assert_eq!(fail("n1", "kube"), 1);
        assert_eq!(fail("n1", "kube"), 2);
        assert_eq!(fail("n2", "set_desired"), 2);
    }
}
