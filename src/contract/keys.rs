//! The contract with the cluster: every label, annotation and taint key spot-rebalancer reads or
//! writes lives here and nowhere else.

/// Prefix of every key this project owns.
pub const PREFIX: &str = "spot-rebalancer.io/";

/// Opt-in label: only nodes carrying `spot-rebalancer.io/enabled=true` are acted on.
pub const ENABLED_LABEL: &str = "spot-rebalancer.io/enabled";
/// Default node-group label (EKS managed node groups set it).
pub const DEFAULT_NODEGROUP_LABEL: &str = "eks.amazonaws.com/nodegroup";
/// Capacity type label EKS sets on managed node group nodes: `SPOT` or `ON_DEMAND`.
pub const CAPACITY_TYPE_LABEL: &str = "eks.amazonaws.com/capacityType";

/// Written by the agent: when IMDS first showed a rebalance recommendation (RFC 3339).
pub const REBALANCE_NOTICE_TIME: &str = "spot-rebalancer.io/rebalance-notice-time";
/// Written by the agent: when the spot instance will be interrupted (RFC 3339).
pub const INTERRUPTION_TIME: &str = "spot-rebalancer.io/interruption-time";
/// Written by the agent: the EC2 instance id of the node.
pub const INSTANCE_ID: &str = "spot-rebalancer.io/instance-id";

/// Label on each `SpotReplacement` naming the Node it was noticed on.
pub const RECORD_NODE_LABEL: &str = "spot-rebalancer.io/node";
/// Label on each `SpotReplacement` naming the controller (its lease name) that keeps it.
pub const RECORD_CONTROLLER_LABEL: &str = "spot-rebalancer.io/controller";
/// Field manager of the controller's writes (records, taints, Events' reporter).
pub const CONTROLLER_FIELD_MANAGER: &str = "spot-rebalancer-controller";

/// Written by the webhook: a NoExecute taint on this node was made NoSchedule because evicting its pods
/// at once would exceed a PodDisruptionBudget; drain it at the PDBs' pace (JSON: time, taints, reason).
pub const DRAIN_REQUESTED: &str = "spot-rebalancer.io/drain-requested";

/// Default termination taint, `spot-instance-terminating=true:NoSchedule`.
pub const DEFAULT_TAINT_KEY: &str = "spot-instance-terminating";
pub const DEFAULT_TAINT_VALUE: &str = "true";
pub const DEFAULT_TAINT_EFFECT: &str = "NoSchedule";

/// Tag on a spot ASG naming its on-demand fallback ASG.
pub const FALLBACK_ASG_TAG: &str = "spot-rebalancer.io/fallback-asg";

/// Tag EKS puts on the ASG of a managed node group, naming the node group (set by EKS, not the user).
pub const EKS_NODEGROUP_TAG: &str = "eks:nodegroup-name";
/// Tag EKS puts on the ASG of a managed node group, naming its cluster.
pub const EKS_CLUSTER_TAG: &str = "eks:cluster-name";

/// Field manager of the agent's server-side applies to its own Node.
pub const AGENT_FIELD_MANAGER: &str = "spot-rebalancer-agent";
