//! The replacement controller: for each noticed, opted-in node, scales the node group up first, waits
//! for the replacement to be Ready, falls back to on-demand capacity, and only then taints.
//!
//! Then it ends the old node's life: a PDB-paced drain, retiring its instance with a decrement, and
//! giving back the seat of an instance that went without us, so the node group ends at its pre-notice
//! size.
//!
//! Two replicas run; the one holding the Lease acts (the other waits, ready to take over). State
//! lives in one `SpotReplacement` per noticed instance ([`records`]), which only the controller
//! writes and which outlives the Node.
//!
//! The layers, data flowing one way:
//! - pure rules: [`machine`] (the replacement state machine's one step, `next(facts)`), with
//!   [`decide`] (coalescing, capacity, claims, undos) and [`lifecycle`] (drain, retirement, seats);
//! - effects: [`context`] (clients, caches, locks, the record write), [`effects`] (each action and
//!   report the machine asks for);
//! - flows: [`reconcile`] (gather facts, step, apply), [`drain`] (the PDB-paced drain and the
//!   retirement), [`reclaim`] (giving back seats of instances that went without us);
//! - wiring: this file (leadership, watches, the admin server).
pub mod audit;
pub mod census;
pub mod context;
pub mod decide;
pub mod drain;
pub mod effects;
pub mod lanes;
pub mod lifecycle;
pub mod machine;
pub mod metrics;
pub mod node_cache;
pub mod node_input;
pub mod nodegroup;
pub mod notify;
pub mod reclaim;
pub mod reconcile;
pub mod records;
/// The record's types live in the shared contract; kept here at their old path.
pub use crate::contract::record;

use std::{sync::Arc, time::Duration};

use clap::Args as ClapArgs;
use futures::{StreamExt, TryStreamExt};
use jiff::SignedDuration;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    Api, Client,
    runtime::{
        Controller, WatchStreamExt, controller,
        events::{Recorder, Reporter},
        reflector, watcher,
    },
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    admin,
    aws::AutoScaling,
    cli::AdminArgs,
    contract::SpotReplacement,
    fence::{Fence, FencedWrites},
    keys,
    node::OptInLabel,
};
use context::{Context, Settings};

/// How long a SIGTERM waits for in-flight work and the lease hand-back.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a standby waits for the lease before its start-up counts as over (see
/// `--page-out-start-up-code`).
const STANDBY_SETTLES_AFTER: Duration = Duration::from_secs(10);

/// How long after the Node cache's first full list a leader's start-up counts as over.
const LEADER_SETTLES_AFTER_SYNC: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error(transparent)]
    KubeConfig(#[from] crate::kube_config::Error),
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("lost the leader lease {0}; exiting so a fresh process can compete for it")]
    LostLease(String),
    #[error(transparent)]
    Notify(#[from] notify::Error),
    #[error(transparent)]
    CaStore(#[from] crate::ca_store::MissingCaStore),
}

#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub admin: AdminArgs,

    /// Kubeconfig file; without it, the in-cluster service account (or `~/.kube/config`).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,

    /// Spot ASG to scale for every noticed node (default: the node's own ASG).
    #[arg(long, env = "SPOT_ASG_NAME")]
    pub spot_asg_name: Option<String>,

    /// On-demand fallback ASG (overridden per node group by the spot ASG's tag
    /// `spot-rebalancer.io/fallback-asg`).
    #[arg(long, env = "ON_DEMAND_ASG_NAME")]
    pub on_demand_asg_name: Option<String>,

    /// Time limit of each Auto Scaling call, per attempt (e.g. `30s`).
    #[arg(long, env = "SCALE_UP_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub scale_up_timeout: Duration,

    /// No new InService instance within this long means spot capacity is gone.
    #[arg(long, env = "CAPACITY_TIMEOUT", default_value = "2m", value_parser = positive_duration)]
    pub capacity_timeout: Duration,

    /// Attempts per Auto Scaling call (the SDK's standard retry: exponential backoff, jitter).
    #[arg(long, env = "RETRY_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub retry_attempts: u32,

    /// How often to look at a scaling ASG's instances and activities.
    #[arg(long, env = "ASG_POLL_INTERVAL", default_value = "2s", value_parser = positive_duration)]
    pub asg_poll_interval: Duration,

    /// Longest wait for a scaling activity this controller did not start before acting anyway.
    #[arg(long, env = "FOREIGN_ACTIVITY_TIMEOUT", default_value = "2m", value_parser = positive_duration)]
    pub foreign_activity_timeout: Duration,

    /// Quiet time (no new notice on the ASG) before a scale-up call, so concurrent notices share it.
    #[arg(long, env = "COALESCE_WINDOW", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub coalesce_window: Duration,

    /// Raise desired capacity above the ASG's MaxSize when needed, raising MaxSize with it through
    /// UpdateAutoScalingGroup (off: capped at MaxSize, and an ASG at MaxSize falls back to on-demand).
    #[arg(long, env = "SURGE_ABOVE_MAX", default_value_t = false)]
    pub surge_above_max: bool,

    /// Key of the termination taint.
    #[arg(long, env = "TAINT_KEY", default_value = keys::DEFAULT_TAINT_KEY)]
    pub taint_key: String,

    /// Value of the termination taint.
    #[arg(long, env = "TAINT_VALUE", default_value = keys::DEFAULT_TAINT_VALUE)]
    pub taint_value: String,

    /// Effect of the termination taint.
    #[arg(long, env = "TAINT_EFFECT", default_value = keys::DEFAULT_TAINT_EFFECT,
          value_parser = ["NoSchedule", "PreferNoSchedule", "NoExecute"])]
    pub taint_effect: String,

    /// What becomes of the old node once its replacement is Ready and it is tainted: `retire` drains
    /// it (PDB-paced) and terminates its instance with a decrement, so the node group is back at its
    /// pre-notice size; `keep` leaves it serving, tainted, until an interruption notice arrives or
    /// the webhook asks for a drain (the node group stays one above its size until then).
    #[arg(long, env = "AFTER_REPLACEMENT", value_enum, default_value_t = AfterReplacement::Retire)]
    pub after_replacement: AfterReplacement,

    /// Detect, decide and report what would be done ("would raise spot-a 3 → 4") as Events, logs,
    /// metrics and records, with no Auto Scaling call, no taint and no eviction: to pilot the
    /// controller next to another tool.
    #[arg(long, env = "DRY_RUN", default_value_t = false)]
    pub dry_run: bool,

    /// A claimed replacement whose Node is not Ready after this long is released: terminated with a
    /// decrement (it is this controller's and runs no pods), then another instance is asked for, or
    /// the on-demand fallback after two such releases.
    #[arg(long, env = "REPLACEMENT_READY_TIMEOUT", default_value = "10m", value_parser = positive_duration)]
    pub replacement_ready_timeout: Duration,

    /// A node whose replacement failed is tried again when a notice newer than the failure arrives
    /// (an interruption notice), at the earliest this long after the failure.
    #[arg(long, env = "FAILED_RETRY_AFTER", default_value = "5m", value_parser = positive_duration)]
    pub failed_retry_after: Duration,

    /// A drain not done after this long raises a Warning Event (evictions go on; nothing is forced).
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "10m", value_parser = positive_duration)]
    pub drain_timeout: Duration,

    /// Notifications of each phase a noticed node enters (see `notify`).
    #[command(flatten)]
    pub notify: notify::NotifyArgs,

    /// Nodes carrying this `KEY=VALUE` label are acted on; others only serve as replacements.
    #[arg(long, env = "OPT_IN_LABEL", default_value = "spot-rebalancer.io/enabled=true")]
    pub opt_in_label: OptInLabel,

    /// Label naming a node's node group: the look at Capacity Rebalancing at start checks one node
    /// per group.
    #[arg(long, env = "NODEGROUP_LABEL", default_value = keys::DEFAULT_NODEGROUP_LABEL,
          value_parser = crate::node::label_key)]
    pub nodegroup_label: String,

    /// Most routine looks at once (a record waiting for its instance or for Ready, a drain round);
    /// each holds an API and maybe an AWS connection while it works. Urgent steps (a notice's first,
    /// an interruption, a replacement just Ready) have as many seats again, of their own. Both
    /// lanes serve in order of arrival; more notices queue and still share a scale-up.
    #[arg(long, env = "MAX_CONCURRENT_RECONCILES", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_reconciles: u16,

    /// Once settled (leading with its caches filled, or standing by), give the pages of the binary's
    /// code used only at start-up back to the kernel (`madvise(MADV_PAGEOUT)`), so they stop
    /// counting in the controller's resident memory; code in use is read back on its next use.
    #[arg(long, env = "PAGE_OUT_START_UP_CODE", default_value_t = true, action = clap::ArgAction::Set)]
    pub page_out_start_up_code: bool,

    /// Name of the Lease used for leader election.
    #[arg(long, env = "LEASE_NAME", default_value = "spot-rebalancer-controller")]
    pub lease_name: String,

    /// Namespace of the Lease (the controller's own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// This replica's identity in the Lease (the pod name, from the downward API).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

/// What becomes of a tainted node whose replacement is Ready (`--after-replacement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AfterReplacement {
    /// Replace-then-retire, as EKS managed node groups and ASG Capacity Rebalancing do: no capacity
    /// is held for a risk that may never come true.
    Retire,
    /// Keep the old node (tainted, still serving) until its interruption notice: a rebalance
    /// recommendation is only a risk; the extra seat is held meanwhile (`seats_held`).
    Keep,
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

impl Args {
    fn settings(&self) -> Settings {
        let signed = |d: Duration| SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
        Settings {
            spot_asg: self.spot_asg_name.clone(),
            on_demand_asg: self.on_demand_asg_name.clone(),
            capacity_timeout: signed(self.capacity_timeout),
            foreign_activity_timeout: signed(self.foreign_activity_timeout),
            asg_poll_interval: self.asg_poll_interval,
            coalesce_window: self.coalesce_window,
            surge_above_max: self.surge_above_max,
            taint: Taint {
                key: self.taint_key.clone(),
                value: Some(self.taint_value.clone()),
                effect: self.taint_effect.clone(),
                time_added: None,
            },
            opt_in: self.opt_in_label.clone(),
            nodegroup_label: self.nodegroup_label.clone(),
            drain_after_taint: self.after_replacement == AfterReplacement::Retire,
            drain_timeout: signed(self.drain_timeout),
            dry_run: self.dry_run,
            ready_timeout: signed(self.replacement_ready_timeout),
            retry_cooldown: signed(self.failed_retry_after),
            max_concurrent_reconciles: usize::from(self.max_concurrent_reconciles),
        }
    }
}

/// Runs the controller until `shutdown` is cancelled (or the lease is lost).
pub async fn run(args: Args, shutdown: CancellationToken) -> crate::Result<()> {
    // Checked before anything starts: the AWS SDK reads the CA store only at its first call.
    let aws_endpoint = std::env::var("AWS_ENDPOINT_URL").ok();
    if crate::ca_store::aws_needs_ca_store(aws_endpoint.as_deref()) {
        crate::ca_store::require_native_roots().map_err(Error::from)?;
    }
    let settings = args.settings();
    let registry = admin::registry(admin::CONTROLLER);
    let notifier = notify::Notifier::new(&args.notify, &registry).map_err(Error::from)?;
    let metrics = metrics::Metrics::register(&registry).map_err(Error::from)?;
    let readiness = admin::Readiness::default();
    let admin_server = tokio::spawn(admin::serve(
        args.admin.admin_addr,
        admin::router(registry, readiness.clone()),
        shutdown.clone(),
    ));
    // Cancelled once start-up is over: leading with the caches filled, or standing by a while.
    let settled = CancellationToken::new();
    let paged_out = args.page_out_start_up_code.then(|| {
        let (settled, shutdown) = (settled.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = settled.cancelled() => crate::code_pages::page_out_and_report(),
                _ = shutdown.cancelled() => {}
            }
        })
    });
    // A stop is graceful (in-flight reconciles finish, the lease is handed back) but bounded.
    let work = lead_and_reconcile(
        args,
        settings,
        notifier,
        metrics,
        readiness,
        shutdown.clone(),
        settled,
    );
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        result = work => result,
        _ = deadline => {
            warn!(grace = ?SHUTDOWN_GRACE, "graceful stop took too long; exiting (the lease expires by itself)");
            Ok(())
        }
    };
    shutdown.cancel();
    if let Some(paged_out) = paged_out {
        let _ = paged_out.await;
    }
    match admin_server.await {
        Ok(served) => served?,
        Err(join) => warn!(%join, "admin server task ended abnormally"),
    }
    result
}

async fn lead_and_reconcile(
    args: Args,
    settings: Settings,
    notifier: notify::Notifier,
    metrics: metrics::Metrics,
    readiness: admin::Readiness,
    shutdown: CancellationToken,
    settled: CancellationToken,
) -> crate::Result<()> {
    let config = crate::kube_config::load(args.kubeconfig.as_deref())
        .await
        .map_err(Error::from)?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    // Rule 13: the fence is open only while the Lease is ours and freshly renewed; the clients below
    // write nothing and AWS is sent nothing while it is closed.
    let ((mut leader, lease_task), fence) =
        crate::lease::elect(&config, &args.lease_namespace, &args.lease_name, &identity)
            .await
            .map_err(Error::from)?;
    let (client, evictions) = kube_clients(config, &fence)?;
    readiness.set(true);
    info!(lease = %args.lease_name, %identity, "waiting for the leader lease");
    // A standby's start-up is over once it has waited a while (a leader's, once its caches fill).
    let standing_by = {
        let settled = settled.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STANDBY_SETTLES_AFTER).await;
            settled.cancel();
        })
    };
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return release(leader, lease_task).await,
            changed = leader.changed() => if changed.is_err() { return Err(Error::LostLease(args.lease_name).into()) },
        }
    }
    tokio::select! {
        _ = fence.opened() => {}
        _ = shutdown.cancelled() => return release(leader, lease_task).await,
    }
    info!(lease = %args.lease_name, "leading");
    standing_by.abort();

    // Stop reconciling on SIGTERM or when the lease is lost, whichever comes first. The task owns
    // the lease receiver and hands it back, so nothing keeps the lease task alive after a stop.
    let stop = shutdown.child_token();
    let lost = CancellationToken::new();
    let lease_watch = {
        let (stop, lost) = (stop.clone(), lost.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async {
                    while leader.changed().await.is_ok() && *leader.borrow() {}
                } => {
                    lost.cancel();
                    stop.cancel();
                }
            }
            leader
        })
    };

    // Loading AWS configuration may probe IMDS for a region; a SIGTERM meanwhile must not wait.
    let aws = tokio::select! {
        aws = AutoScaling::from_env(args.retry_attempts, args.scale_up_timeout, fence.clone()) => aws,
        _ = stop.cancelled() => {
            let leader = lease_watch.await.map_err(|_| Error::LostLease(args.lease_name.clone()))?;
            if lost.is_cancelled() {
                return Err(Error::LostLease(args.lease_name).into());
            }
            return release(leader, lease_task).await;
        }
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: context::FIELD_MANAGER.into(),
            instance: Some(identity.clone()),
        },
    );
    // One watch of every Node: the cache finds replacements in any node group (rule 11) and the
    // opted-in ones drive the controller.
    let nodes: Api<Node> = Api::all(client.clone());
    let (all_nodes, writer) = reflector::store();
    // The records (one SpotReplacement per noticed instance, in the controller's namespace): a
    // watch cache of this controller's, filled before any decision is taken from it.
    let (records_cache, records_writer) = reflector::store();
    let records_api: Api<SpotReplacement> = Api::namespaced(client.clone(), &args.lease_namespace);
    let records_watch = watcher(
        records_api,
        watcher::Config::default().labels(&records::selector(&args.lease_name)),
    )
    .backoff(crate::kube_config::watch_backoff())
    .reflect(records_writer)
    .applied_objects();
    let (records_failed, mut records_error) = tokio::sync::watch::channel(None::<String>);
    let records_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            futures::pin_mut!(records_watch);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    next = records_watch.next() => match next {
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            warn!(%error, "watching the SpotReplacement records");
                            let _ = records_failed.send(Some(error.to_string()));
                        }
                        None => return,
                    }
                }
            }
        })
    };
    tokio::select! {
        _ = records_cache.wait_until_ready() => {}
        _ = stop.cancelled() => {}
        _ = records_error.changed() => {
            warn!("the SpotReplacement records cannot be read yet (is the CRD installed?); still trying");
            let _ = records_cache.wait_until_ready().await;
        }
    }
    let records = records::Records::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        records_cache,
    );
    let ctx = Arc::new(Context::new(
        client,
        evictions,
        aws,
        settings,
        recorder,
        metrics,
        all_nodes.clone(),
        records,
        notifier,
    ));
    // Set when the Node cache has its first full list. (`Store::wait_until_ready` is no use here:
    // the Controller already waits on it, and its one-shot channel wakes only the last waiter.)
    let synced = CancellationToken::new();
    // Once the Node cache is filled, warn about ASGs that would double every replacement.
    let audit = {
        let (ctx, stop, synced) = (ctx.clone(), stop.clone(), synced.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async {
                    synced.cancelled().await;
                    audit::capacity_rebalancing(ctx).await;
                } => {}
            }
        })
    };
    // The lists that fill the caches are start-up work too: page the code out after them.
    {
        let (synced, stop) = (synced.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = synced.cancelled() => {
                    tokio::time::sleep(LEADER_SETTLES_AFTER_SYNC).await;
                    settled.cancel();
                }
                _ = stop.cancelled() => {}
            }
        });
    }
    let census = tokio::spawn(census::keep_counting(ctx.clone(), stop.clone()));
    // A dry run adds no capacity, so it has no seat to give back.
    let sweeper = tokio::spawn(reclaim::sweep_until(ctx.clone(), stop.clone(), synced.clone()));
    let (wake, woken) = futures::channel::mpsc::unbounded();
    let waker_ctx = ctx.clone();
    let opt_in = ctx.settings.opt_in.clone();
    let opted_in_nodes = watcher(nodes, watcher::Config::default())
        .backoff(crate::kube_config::watch_backoff())
        // Only what the controller reads is cached: thousands of Nodes cost a few MiB.
        .modify(node_cache::slim_node)
        .reflect(writer)
        .inspect_ok({
            let synced = synced.clone();
            move |event| {
                if matches!(event, watcher::Event::InitDone) {
                    synced.cancel();
                }
            }
        })
        .applied_objects()
        .inspect_ok(move |node| {
            // Wake a waiting node the moment its claimed replacement turns Ready.
            if crate::node::is_ready(node)
                && let Some(instance) = crate::node::instance_id(node)
                && let Some(claimant) = waker_ctx.claimant_of(instance)
            {
                waker_ctx.lanes.woken_for_ready(&claimant.name);
                let _ = wake.unbounded_send(claimant);
            }
        })
        .try_filter(move |node| futures::future::ready(opt_in.matches(node)))
        .inspect_ok({
            let ctx = ctx.clone();
            move |node| ctx.watched(node)
        });
    info!(selector = %ctx.settings.opt_in.selector(), "reconciling opted-in nodes");

    Controller::for_stream(opted_in_nodes, all_nodes)
        // No limit here: kube-runtime starts each reconcile as it comes due, and the reconcile
        // waits for a seat in its lane (`lanes`), in order of arrival. The runtime's own limit,
        // once full, starts waiting nodes in hash order, and new notices starved behind records.
        .with_config(controller::Config::default().concurrency(0))
        .reconcile_on(woken)
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile");
            }
            futures::future::ready(())
        })
        .await;
    stop.cancel();
    let _ = audit.await;
    let _ = census.await;
    let _ = sweeper.await;
    let _ = records_task.await;
    let leader = lease_watch
        .await
        .map_err(|_| Error::LostLease(args.lease_name.clone()))?;
    if lost.is_cancelled() {
        return Err(Error::LostLease(args.lease_name).into());
    }
    release(leader, lease_task).await
}

/// Hands the lease back on a clean stop, so the standby takes over at once.
async fn release(
    leader: tokio::sync::watch::Receiver<bool>,
    lease_task: tokio::task::JoinHandle<
        Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError>,
    >,
) -> crate::Result<()> {
    drop(leader);
    if let Ok(Ok(manager)) = lease_task.await
        && let Err(error) = manager.release().await
    {
        warn!(%error, "releasing the lease failed; the standby takes over when it expires");
    }
    Ok(())
}

/// The controller's client, and one for the Eviction API: kube's default retry layer retries a 429
/// up to 15 times (backing off up to 1000 s), which would hold a drain step inside one refused
/// eviction; the drain must see the 429 and requeue instead. Both refuse writes while `fence` is
/// closed.
fn kube_clients(config: kube::Config, fence: &Fence) -> Result<(Client, Client), Error> {
    let mut evictions = config.clone();
    evictions.default_retry = false;
    let fenced = |config: kube::Config| -> Result<Client, Error> {
        Ok(kube::client::ClientBuilder::try_from(config)
            .map_err(Error::Kube)?
            .with_layer(&FencedWrites(fence.clone()))
            .build())
    };
    Ok((fenced(config)?, fenced(evictions)?))
}

fn default_identity() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| format!("spot-rebalancer-{}", std::process::id()))
}
