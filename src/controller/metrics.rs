//! The controller's metrics, prefix `spot_rebalancer_` (from the admin registry).
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub notices: IntCounter,
    pub scale_ups: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub replacement_ready_seconds: HistogramVec,
    pub taints: IntCounterVec,
    pub failed: IntCounter,
    pub skipped: IntCounter,
    pub reconcile_errors: IntCounterVec,
    pub aws_calls: IntCounterVec,
    pub capacity_rebalancing: IntGaugeVec,
    pub managed_nodegroup_conflict: IntGaugeVec,
    pub nodes_in_phase: IntGaugeVec,
    pub oldest_in_phase_seconds: GaugeVec,
    pub drains: IntCounterVec,
    pub evictions: IntCounterVec,
    pub drain_timeouts: IntCounter,
    pub retirements: IntCounter,
    pub capacity_restores: IntCounterVec,
    pub seats_held: IntGaugeVec,
    pub released: IntCounterVec,
    pub retried: IntCounter,
    pub min_size_refusals: IntCounterVec,
    pub reconciles_waiting: IntGaugeVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = Metrics {
            // Not `notices_total`: the agent exports that name, counting IMDS notices by kind.
            notices: IntCounter::new(
                "controller_notices_total",
                "Rebalance or interruption notices the controller took up (one per noticed instance)",
            )?,
            scale_ups: IntCounterVec::new(
                Opts::new(
                    "scale_ups_total",
                    "SetDesiredCapacity calls by ASG, capacity type and result",
                ),
                &["asg", "capacity_type", "result"],
            )?,
            fallbacks: IntCounterVec::new(
                Opts::new(
                    "fallbacks_total",
                    "Replacements moved to the on-demand ASG, by the spot ASG that had no capacity",
                ),
                &["asg"],
            )?,
            replacement_ready_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "replacement_ready_seconds",
                    "From notice to replacement Node Ready, by the ASG the replacement came from",
                )
                .buckets(vec![5.0, 15.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0]),
                &["asg"],
            )?,
            taints: IntCounterVec::new(
                Opts::new("taints_total", "Termination taints applied"),
                &["reason"],
            )?,
            failed: IntCounter::new(
                "replacements_failed_total",
                "Nodes for which no replacement could be had",
            )?,
            skipped: IntCounter::new(
                "replacements_skipped_total",
                "Noticed nodes in no Auto Scaling group",
            )?,
            reconcile_errors: IntCounterVec::new(
                Opts::new("reconcile_errors_total", "Reconcile errors by kind"),
                &["kind"],
            )?,
            aws_calls: IntCounterVec::new(
                Opts::new("aws_calls_total", "Auto Scaling API operations by name"),
                &["operation"],
            )?,
            capacity_rebalancing: IntGaugeVec::new(
                Opts::new(
                    "asg_capacity_rebalancing",
                    "1 when an ASG acted on has EC2 Capacity Rebalancing on (a notice may cost two instances)",
                ),
                &["asg"],
            )?,
            managed_nodegroup_conflict: IntGaugeVec::new(
                Opts::new(
                    "asg_managed_nodegroup_conflict",
                    "1 when an opted-in ASG belongs to an EKS managed node group with Capacity Rebalancing on \
                     (EKS replaces its spot nodes itself)",
                ),
                &["asg"],
            )?,
            nodes_in_phase: IntGaugeVec::new(
                Opts::new(
                    "nodes",
                    "Opted-in nodes by phase (leader only, from its Node cache)",
                ),
                &["phase"],
            )?,
            oldest_in_phase_seconds: GaugeVec::new(
                Opts::new(
                    "oldest_in_phase_seconds",
                    "Since when the longest-waiting node in each phase was noticed",
                ),
                &["phase"],
            )?,
            drains: IntCounterVec::new(
                Opts::new("drains_total", "Drains started, by what started them"),
                &["trigger"],
            )?,
            evictions: IntCounterVec::new(
                Opts::new(
                    "evictions_total",
                    "Eviction API calls by result: evicted, blocked (429 from a PDB), gone, error",
                ),
                &["result"],
            )?,
            drain_timeouts: IntCounter::new(
                "drain_timeouts_total",
                "Drains not done within --drain-timeout (nothing is forced)",
            )?,
            retirements: IntCounter::new(
                "retirements_total",
                "Drained nodes whose instance was removed with a decrement",
            )?,
            capacity_restores: IntCounterVec::new(
                Opts::new(
                    "capacity_restores_total",
                    "Seats of instances that went without us given back, by how: lower, terminate, leave",
                ),
                &["how"],
            )?,
            seats_held: IntGaugeVec::new(
                Opts::new(
                    "seats_held",
                    "Instances this controller added and still holds (scale-ups not yet given back), by ASG",
                ),
                &["asg"],
            )?,
            released: IntCounterVec::new(
                Opts::new(
                    "replacements_released_total",
                    "Claimed replacements with no Ready Node within --replacement-ready-timeout, \
                     terminated with a decrement, by ASG",
                ),
                &["asg"],
            )?,
            retried: IntCounter::new(
                "replacements_retried_total",
                "Failed replacements tried again on a newer notice",
            )?,
            min_size_refusals: IntCounterVec::new(
                Opts::new(
                    "min_size_refusals_total",
                    "Retirements or give-backs MinSize forbade (the instance is left; a Warning says so), by ASG",
                ),
                &["asg"],
            )?,
            reconciles_waiting: IntGaugeVec::new(
                Opts::new(
                    "reconciles_waiting",
                    "Reconciles waiting for a seat, by lane (urgent: first notices, interruptions, Ready replacements; routine: every other look)",
                ),
                &["lane"],
            )?,
        };
        registry.register(Box::new(metrics.notices.clone()))?;
        registry.register(Box::new(metrics.scale_ups.clone()))?;
        registry.register(Box::new(metrics.fallbacks.clone()))?;
        registry.register(Box::new(metrics.replacement_ready_seconds.clone()))?;
        registry.register(Box::new(metrics.taints.clone()))?;
        registry.register(Box::new(metrics.failed.clone()))?;
        registry.register(Box::new(metrics.skipped.clone()))?;
        registry.register(Box::new(metrics.reconcile_errors.clone()))?;
        registry.register(Box::new(metrics.aws_calls.clone()))?;
        registry.register(Box::new(metrics.capacity_rebalancing.clone()))?;
        registry.register(Box::new(metrics.managed_nodegroup_conflict.clone()))?;
        registry.register(Box::new(metrics.nodes_in_phase.clone()))?;
        registry.register(Box::new(metrics.oldest_in_phase_seconds.clone()))?;
        registry.register(Box::new(metrics.drains.clone()))?;
        registry.register(Box::new(metrics.evictions.clone()))?;
        registry.register(Box::new(metrics.drain_timeouts.clone()))?;
        registry.register(Box::new(metrics.retirements.clone()))?;
        registry.register(Box::new(metrics.capacity_restores.clone()))?;
        registry.register(Box::new(metrics.seats_held.clone()))?;
        registry.register(Box::new(metrics.released.clone()))?;
        registry.register(Box::new(metrics.retried.clone()))?;
        registry.register(Box::new(metrics.min_size_refusals.clone()))?;
        registry.register(Box::new(metrics.reconciles_waiting.clone()))?;
        Ok(metrics)
    }
}
