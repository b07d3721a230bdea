//! What every reconcile shares: the clients, the caches of Nodes and records, short-lived views of
//! the ASGs, the per-ASG locks that serialise decisions and calls, and the one way to write a
//! record and to publish an Event. No rule lives here: the rules are in [`super::machine`].
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
    runtime::{
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
};
use tracing::{info, warn};

use super::{
    decide::Member,
    lifecycle,
    metrics::Metrics,
    record::{Phase, Replacement, Seat, Undo},
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
pub(super) const AWS_CACHE_TTL: Duration = Duration::from_millis(500);
/// How often, and how many times, a lower looks whether the ASG chose the instance it takes.
const SCALE_IN_POLL: Duration = Duration::from_millis(250);
const SCALE_IN_POLLS: u32 = 40;
/// The longest a scale-up call waits for concurrent notices to write their intents.
pub(super) const MAX_COALESCE_WAIT: Duration = Duration::from_secs(2);
/// The longest a scale-up call waits while notices the Node watch delivered have not reached their
/// first reconcile: in a burst of a hundred on a loaded cluster, the last notices are reconciled
/// 10-20 s after the first (each first reconcile makes three writes), and each 2 s wait was a
/// call. A notice counts this long after the watch delivered it, at most: one that never makes a
/// record (a node that lies about its instance) holds calls back no longer than this.
pub(super) const MAX_BURST_WAIT: Duration = Duration::from_secs(10);
/// How long a notice that made no record is remembered as seen (see [`Context::watched`]).
const FORGET_ARRIVAL: Duration = Duration::from_secs(600);

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
    /// An action the records no longer allow (checked right before it).
    #[error("{0}")]
    Refused(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Aws(error) => error.metric_label(),
            Error::Kube { .. } => "kube",
            Error::Record(error) => error.metric_label(),
            Error::Refused(_) => "refused",
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
    /// A claimed replacement with no Ready Node this long is released.
    pub ready_timeout: SignedDuration,
    /// How long after a failure a new notice may try a `Failed` node again.
    pub retry_cooldown: SignedDuration,
    /// Seats of the routine lane (see [`super::lanes`]).
    pub max_concurrent_reconciles: usize,
}

impl Settings {
    /// The settings the state machine's rules read.
    pub fn rules(&self) -> super::machine::Rules {
        super::machine::Rules {
            capacity_timeout: self.capacity_timeout,
            foreign_activity_timeout: self.foreign_activity_timeout,
            poll: self.asg_poll_interval,
            surge_above_max: self.surge_above_max,
            dry_run: self.dry_run,
            ready_timeout: self.ready_timeout,
            retry_cooldown: self.retry_cooldown,
        }
    }
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
    pub(super) drain_rounds: Mutex<HashMap<String, lifecycle::DrainPace>>,
    asgs: Mutex<HashMap<String, Arc<AsgState>>>,
    /// Notices on their way to a scale-up intent (finding out their ASG, deciding): a call waits
    /// for them (rule 2).
    pub(super) detecting: AtomicUsize,
    /// Scale-up intents decided and being written, by Node name: the next decision on the ASG sees
    /// them as members while their write is on its way, so decisions need not wait for each
    /// other's writes. Calls never see them: a call counts written intents only.
    staged: Staging,
    pub(super) warned_rebalancing: Mutex<HashSet<String>>,
    /// Reconciles that failed in a row, per node: a streak long enough is worth a Warning.
    failing: Mutex<HashMap<String, Streak>>,
    /// Noticed nodes the watch delivered that have no record yet, and when the watch first showed
    /// the notice (see [`MAX_BURST_WAIT`]).
    arriving: Mutex<HashMap<String, Instant>>,
    /// The seats reconciles wait for, urgent ones first (see [`super::lanes`]).
    pub lanes: super::lanes::Lanes,
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
pub(super) fn retry_after(failures: u32) -> Duration {
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
pub(super) struct AsgState {
    pub(super) decide: Arc<tokio::sync::Mutex<()>>,
    pub(super) send: Arc<tokio::sync::Mutex<()>>,
    /// Scale-ups on the way to writing their intent, and when the last one was written: the call
    /// waits until they are in (rule 2).
    pub(super) pending: AtomicUsize,
    pub(super) last_intent: Mutex<Option<Instant>>,
    /// When the oldest intent not yet covered by a call was written: the call waits for more at
    /// most [`MAX_COALESCE_WAIT`] after it.
    pub(super) uncalled_since: Mutex<Option<Instant>>,
    /// When the one reconcile that looks again for the put-off call is due: the others put off
    /// their look longer instead of every scale-up of a burst polling every coalesce window.
    pub(super) next_look: Mutex<Option<Instant>>,
    /// The last describes. Dropped by every call this process makes on the ASG, so no decision
    /// reads a view from before its own last call.
    group: View<Group>,
    activities: View<Vec<Activity>>,
    /// Counts this process's calls on the ASG: a describe that began before one is not kept.
    calls: AtomicUsize,
}

/// A short-lived view of one describe, shared by concurrent reconciles: one describe at a time, and
/// a caller that waited for another's describe takes its answer when it began after the caller
/// asked (it is as fresh as one the caller would make). A burst of notices on one ASG makes one
/// describe per round instead of one each.
struct View<T> {
    /// The answer and when its describe began.
    last: Mutex<Option<(Instant, T)>>,
    describing: tokio::sync::Mutex<()>,
}

impl<T> Default for View<T> {
    fn default() -> Self {
        View {
            last: Mutex::new(None),
            describing: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T: Clone> View<T> {
    /// The answer of a describe begun at most `max_age` ago, or after this call began; else a new
    /// one. An answer whose describe overlapped a call of this process (`calls` moved) is not kept.
    async fn get<F>(&self, max_age: Duration, calls: &AtomicUsize, describe: F) -> Result<T>
    where
        F: AsyncFnOnce() -> Result<T>,
    {
        let asked = Instant::now();
        let usable = |last: &Option<(Instant, T)>| {
            last.as_ref()
                .filter(|(began, _)| *began >= asked || began.elapsed() < max_age)
                .map(|(_, answer)| answer.clone())
        };
        if let Some(answer) = usable(&lock(&self.last)) {
            return Ok(answer);
        }
        let _one_at_a_time = self.describing.lock().await;
        if let Some(answer) = usable(&lock(&self.last)) {
            return Ok(answer);
        }
        let began = Instant::now();
        let calls_before = calls.load(Ordering::SeqCst);
        let answer = describe().await?;
        if calls.load(Ordering::SeqCst) == calls_before {
            *lock(&self.last) = Some((began, answer.clone()));
        }
        Ok(answer)
    }

    fn forget(&self) {
        *lock(&self.last) = None;
    }

    /// The answer as last described, if it began at most `max_age` ago (no describe is made).
    fn peek(&self, max_age: Duration) -> Option<T> {
        lock(&self.last)
            .as_ref()
            .filter(|(began, _)| began.elapsed() < max_age)
            .map(|(_, answer)| answer.clone())
    }
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
        let lanes = super::lanes::Lanes::new(
            settings.max_concurrent_reconciles,
            metrics.reconciles_waiting.clone(),
        );
        Context {
            lanes,
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
            staged: Staging::default(),
            warned_rebalancing: Mutex::default(),
            failing: Mutex::default(),
            arriving: Mutex::default(),
        }
    }

    /// Called for each opted-in Node the watch delivers: a notice on a node whose instance has no
    /// record yet is on its way to a scale-up (see [`MAX_BURST_WAIT`]).
    pub fn watched(&self, node: &Node) {
        let annotations = node::annotations(node);
        let noticed = annotations.contains_key(keys::REBALANCE_NOTICE_TIME)
            || annotations.contains_key(keys::INTERRUPTION_TIME);
        if !noticed || node::instance_id(node).is_none_or(|id| self.records.has(id)) {
            return;
        }
        // Each node counts once, from the first event that shows its notice: a notice that never
        // makes a record (a node lying about its instance) holds calls back once, for
        // MAX_BURST_WAIT, not at every event of the node.
        let mut arriving = lock(&self.arriving);
        arriving.retain(|_, seen| seen.elapsed() < FORGET_ARRIVAL);
        arriving.entry(node.name_any()).or_insert_with(Instant::now);
    }

    /// Whether notices the watch delivered within [`MAX_BURST_WAIT`] have no record yet.
    pub(super) fn notices_arriving(&self) -> bool {
        lock(&self.arriving)
            .values()
            .any(|seen| seen.elapsed() < MAX_BURST_WAIT)
    }

    /// Counts a failed reconcile of `node`; returns the length of its streak (a new kind of error
    /// starts a new one).
    pub(super) fn failed(&self, node: &str, kind: &'static str) -> u32 {
        let mut failing = lock(&self.failing);
        failing.retain(|name, _| name == node || self.all_nodes.get(&ObjectRef::new(name)).is_some());
        count_failure(&mut failing, node, kind)
    }

    /// A reconcile of `node` went through: its failing streak, if any, is over.
    pub(super) fn succeeded(&self, node: &str) {
        lock(&self.failing).remove(node);
    }

    pub(super) fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    pub(super) fn asg(&self, name: &str) -> Arc<AsgState> {
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
    /// decrement (never letting the ASG pick which); `Leave` calls nothing. The caller holds the
    /// ASG's send lock.
    pub(super) async fn carry_out(&self, asg: &str, undo: &Undo) -> Result<()> {
        match undo {
            Undo::Lower { to, .. } => self.lower_shielded(asg, *to).await,
            Undo::Terminate { instance } => {
                self.forget_views(asg);
                self.terminate_with_decrement(instance).await
            }
            Undo::Leave { .. } => Ok(()),
        }
    }

    /// Lowers the desired capacity of `asg` to `to` so that the ASG can never pick a serving
    /// instance: the ones there now are protected from scale-in first, so if an instance launched
    /// since the plan, it is the only one the ASG may take; the protection is lifted once the group
    /// is within `to`. Instances someone else protected are left as they were.
    ///
    /// If the process stops between protecting and lifting, the instances stay protected from
    /// scale-in (never from a termination by id, which is how cluster-autoscaler removes nodes): a
    /// window of about a second, logged with the instance ids.
    async fn lower_shielded(&self, asg: &str, to: i32) -> Result<()> {
        let group = self.group(asg, true).await?;
        let shielded: Vec<String> = group
            .instances
            .iter()
            .filter(|i| !i.protected && !i.is_leaving())
            .map(|i| i.id.clone())
            .collect();
        let call = |operation: &'static str| {
            self.metrics.aws_calls.with_label_values(&[operation]).inc();
        };
        self.forget_views(asg);
        if !shielded.is_empty() {
            info!(asg, instances = ?shielded, "protecting the serving instances from scale-in while lowering");
            call("SetInstanceProtection");
            self.aws.protect(asg, &shielded, true).await?;
        }
        call("SetDesiredCapacity");
        let lowered = self.aws.set_desired(asg, to).await;
        if lowered.is_ok() && (group.instances.len() as i32) > to {
            // A late launch is being taken: wait (bounded) until the ASG has chosen it.
            for _ in 0..SCALE_IN_POLLS {
                tokio::time::sleep(SCALE_IN_POLL).await;
                let now = self.group(asg, true).await?;
                let live = now.instances.iter().filter(|i| !i.is_leaving()).count() as i32;
                if live <= to {
                    break;
                }
            }
        }
        if !shielded.is_empty() {
            call("SetInstanceProtection");
            self.aws.protect(asg, &shielded, false).await?;
        }
        self.forget_views(asg);
        Ok(lowered?)
    }

    /// Drops the views of `asg` read before a call this process just made on it: the next read
    /// is fresh.
    pub(super) fn forget_views(&self, asg: &str) {
        let state = self.asg(asg);
        state.calls.fetch_add(1, Ordering::SeqCst);
        state.group.forget();
        state.activities.forget();
    }

    /// The old node whose record claims `instance`, for waking it when its replacement turns Ready.
    /// Called for every Ready Node event the watch delivers (thousands a minute in a large
    /// cluster), so it copies no record: copying them all held the watch back by minutes during a
    /// burst of notices, and the notices with it.
    pub fn claimant_of(&self, instance: &str) -> Option<ObjectRef<Node>> {
        let mut claimant = None;
        self.records.visit(|object| {
            let claims = object.status.as_ref().is_some_and(|status| {
                status.phase == Phase::AwaitingReady && status.record.instance_id.as_deref() == Some(instance)
            });
            if claims && claimant.is_none() {
                claimant = Some(ObjectRef::new(&object.spec.node_name));
            }
        });
        claimant
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

    /// Every instance the records take out of their ASGs: each noticed instance (also of records
    /// whose Node is gone: a retirement's termination runs on after it), and each instance an undo
    /// terminates.
    pub(super) fn taken_out(&self) -> HashSet<String> {
        let mut taken_out = HashSet::new();
        self.records.visit(|object| {
            if let Some(status) = &object.status {
                taken_out.extend(status.record.abandoned.iter().filter_map(|a| match &a.undo {
                    Undo::Terminate { instance } => Some(instance.clone()),
                    _ => None,
                }));
            }
            taken_out.insert(object.spec.instance_id.clone());
        });
        taken_out
    }

    /// What a decision on an ASG reads: [`Self::records`] and the intents decided and being
    /// written (see [`Self::stage`]).
    pub(super) fn records_deciding(&self) -> HashMap<String, (Phase, Replacement)> {
        let mut records = self.records();
        self.staged.show_over(&mut records);
        records
    }

    /// The node, other than `node`, whose record (written or staged) claims `instance`, if any.
    pub(super) fn claimed_by_another(&self, node: &str, instance: &str) -> Option<String> {
        self.claims_of_others(node).remove(instance)
    }

    /// Every instance a record claims as its replacement, written or staged, with its node, except
    /// `node`'s claims: every record counts, also one whose Node is not (or no longer, or not yet)
    /// in the Node cache, unlike [`Self::records`]. A claim holds until its record says otherwise.
    pub(super) fn claims_of_others(&self, node: &str) -> HashMap<String, String> {
        let mut claims = HashMap::new();
        self.records.visit(|object| {
            let claimed = object
                .status
                .as_ref()
                .and_then(|status| status.record.instance_id.as_ref());
            if let Some(instance) = claimed
                && object.spec.node_name != node
            {
                claims.insert(instance.clone(), object.spec.node_name.clone());
            }
        });
        self.staged.add_claims(node, &mut claims);
        claims
    }

    /// Shows `node`'s decided record to the next decisions until the guard is dropped (after its
    /// write, which then shows it, or after the write failed, which leaves it unwritten).
    pub(super) fn stage(&self, node: &str, phase: Phase, record: &Replacement) -> Staged<'_> {
        self.staged.stage(node, phase, record)
    }

    /// The phase and record of `node`'s instance (named by its provider id), if it has one.
    pub(super) fn written(&self, node: &Node) -> Option<(Phase, Replacement)> {
        let instance = node::instance_id(node)?;
        let status = self.records.get(instance)?.status?;
        Some((status.phase, status.record))
    }

    /// The phase of `node`'s record, without copying the record.
    pub(super) fn phase_of(&self, node: &Node) -> Option<Phase> {
        self.records.phase(node::instance_id(node)?)
    }

    /// The whole record of `node`'s instance (named by its provider id), if it has one.
    pub(super) fn status_of(&self, node: &Node) -> Option<SpotReplacementStatus> {
        self.records.get(node::instance_id(node)?)?.status
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

    /// How many calls this process made on `asg`: a view read before a call no longer holds.
    pub(super) fn calls_on(&self, asg: &str) -> usize {
        self.asg(asg).calls.load(Ordering::SeqCst)
    }

    /// The ASG as described at most `max_age` ago (described now when older).
    pub(super) async fn group_within(&self, asg: &str, max_age: Duration) -> Result<Group> {
        let state = self.asg(asg);
        state
            .group
            .get(max_age, &state.calls, async || {
                self.metrics
                    .aws_calls
                    .with_label_values(&["DescribeAutoScalingGroups"])
                    .inc();
                let group = self.aws.group(asg).await?;
                self.metrics
                    .capacity_rebalancing
                    .with_label_values(&[asg])
                    .set(i64::from(group.capacity_rebalance));
                Ok(group)
            })
            .await
    }

    /// The ASG's recent scaling activities as described at most `max_age` ago.
    pub(super) async fn activities_within(&self, asg: &str, max_age: Duration) -> Result<Vec<Activity>> {
        let state = self.asg(asg);
        state
            .activities
            .get(max_age, &state.calls, async || {
                self.metrics
                    .aws_calls
                    .with_label_values(&["DescribeScalingActivities"])
                    .inc();
                Ok(self.aws.activities(asg).await?)
            })
            .await
    }

    /// The ASG that lists `instance` in a describe of this process made within `max_age`: during a
    /// burst of notices on one group, most find their instance there without a call.
    pub(super) fn described_group_of(&self, instance: &str, max_age: Duration) -> Option<String> {
        let asgs: Vec<Arc<AsgState>> = lock(&self.asgs).values().cloned().collect();
        asgs.iter().find_map(|state| {
            let group = state.group.peek(max_age)?;
            group
                .instances
                .iter()
                .any(|i| i.id == instance)
                .then(|| group.name.clone())
        })
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

    /// The Nodes of `instances`, by instance id, in one pass over the cache of all Nodes (a look-up
    /// per instance would read every Node once per instance: 200 × 5,000 on a large group).
    pub(super) fn nodes_of_instances(&self, instances: &HashSet<&str>) -> HashMap<String, Arc<Node>> {
        if instances.is_empty() {
            return HashMap::new();
        }
        self.all_nodes
            .state()
            .into_iter()
            .filter_map(|node| {
                let id = node::instance_id(&node)
                    .filter(|id| instances.contains(id))?
                    .to_owned();
                Some((id, node))
            })
            .collect()
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

/// Decisions made and being written, by Node name (see [`Context::stage`]).
#[derive(Default)]
struct Staging(Mutex<HashMap<String, (Phase, Replacement)>>);

impl Staging {
    fn stage(&self, node: &str, phase: Phase, record: &Replacement) -> Staged<'_> {
        lock(&self.0).insert(node.to_owned(), (phase, record.clone()));
        Staged {
            staging: self,
            node: node.to_owned(),
        }
    }

    /// Adds the instance each staged decision claims, with its node, except `node`'s.
    fn add_claims(&self, node: &str, claims: &mut HashMap<String, String>) {
        for (other, (_, record)) in lock(&self.0).iter() {
            if let Some(instance) = &record.instance_id
                && other != node
            {
                claims.insert(instance.clone(), other.clone());
            }
        }
    }

    /// Puts each staged decision over `records` (it is newer than what they hold for its Node).
    fn show_over(&self, records: &mut HashMap<String, (Phase, Replacement)>) {
        records.extend(
            lock(&self.0)
                .iter()
                .map(|(node, staged)| (node.clone(), staged.clone())),
        );
    }
}

/// A staged decision; dropping it takes it back.
pub(super) struct Staged<'a> {
    staging: &'a Staging,
    node: String,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        lock(&self.staging.0).remove(&self.node);
    }
}

/// Counts a piece of work in flight for as long as it lives.
pub(super) struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    pub(super) fn new(counter: &'a AtomicUsize) -> Self {
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
pub(super) fn members<'a>(records: &'a HashMap<String, (Phase, Replacement)>) -> Vec<Member<'a>> {
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
    lock(&ctx.arriving).remove(&subject.node);
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
    fn a_staged_claim_counts_for_every_other_node_until_its_guard_drops() {
        let mut claim = Replacement::new("spot-a".into(), None, Timestamp::UNIX_EPOCH);
        claim.instance_id = Some("i-new".into());
        let unclaimed = Replacement::new("spot-a".into(), None, Timestamp::UNIX_EPOCH);
        let staging = Staging::default();
        let guard = staging.stage("n3", Phase::AwaitingReady, &claim);
        let _other = staging.stage("n4", Phase::ScalingSpot, &unclaimed);
        let claims = |node| {
            let mut claims = HashMap::from([("i-written".to_owned(), "n1".to_owned())]);
            staging.add_claims(node, &mut claims);
            claims
        };
        assert_eq!(
            claims("n2"),
            HashMap::from([
                ("i-written".to_owned(), "n1".to_owned()),
                ("i-new".to_owned(), "n3".to_owned()),
            ])
        );
        assert!(!claims("n3").contains_key("i-new"), "its own claim");
        drop(guard);
        assert!(
            !claims("n2").contains_key("i-new"),
            "a write that failed claims nothing"
        );
    }

    #[test]
    fn a_staged_decision_shows_until_its_guard_drops_and_a_failed_write_takes_it_back() {
        let staging = Staging::default();
        let written = Replacement::new("spot-a".into(), None, Timestamp::UNIX_EPOCH);
        let mut decided = written.clone();
        decided.instance_id = Some("i-new".into());
        let records = || HashMap::from([("n1".to_owned(), (Phase::Detected, written.clone()))]);

        let guard = staging.stage("n1", Phase::ScalingSpot, &decided);
        let mut seen = records();
        staging.show_over(&mut seen);
        assert_eq!(
            seen["n1"],
            (Phase::ScalingSpot, decided.clone()),
            "the decision, over the record"
        );

        // The write failed: the guard drops and the next decision sees the record as written.
        drop(guard);
        let mut seen = records();
        staging.show_over(&mut seen);
        assert_eq!(seen["n1"], (Phase::Detected, written.clone()));
    }

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
