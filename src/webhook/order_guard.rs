//! The order guard's decision, a pure function: the termination taint goes on an opted-in node only
//! once its replacement is Ready — unless the controller itself adds it (it knows the order) or an
//! interruption notice is present (the node dies in two minutes anyway).
//!
//! Phase and replacement come from the controller's `SpotReplacement` record of the node (from the
//! webhook's watch cache), never from the Node: a node may write its own annotations.
use super::{review::NodeUpdate, taints};
use crate::{
    contract::{SpotReplacement, keys},
    node,
};

/// What the order guard needs to know besides the review.
#[derive(Debug, Clone)]
pub struct OrderSettings {
    /// Key of the termination taint; any effect counts.
    pub taint_key: String,
    /// Usernames the controller runs as; their updates are trusted.
    pub controller_usernames: Vec<String>,
}

/// Why an update was let through (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    NoTerminationTaintAdded,
    ByTheController,
    InterruptionNotice,
    PhaseTainted,
    ReplacementReady(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Allowed),
    Deny(String),
}

/// Decides on an update of an opted-in node. `record` is the controller's record of the node, if
/// any; `is_ready` tells whether a Node (by name) is Ready, from the node cache. The interruption
/// notice is read from the node as the update would leave it.
pub fn decide(
    update: &NodeUpdate,
    settings: &OrderSettings,
    record: Option<&SpotReplacement>,
    is_ready: impl Fn(&str) -> bool,
) -> Decision {
    let adds_termination_taint = taints::added(node::taints(&update.old), node::taints(&update.new))
        .iter()
        .any(|(_, taint)| taint.key == settings.taint_key);
    if !adds_termination_taint {
        return Decision::Allow(Allowed::NoTerminationTaintAdded);
    }
    if settings
        .controller_usernames
        .iter()
        .any(|name| name == update.username())
    {
        return Decision::Allow(Allowed::ByTheController);
    }
    let annotations = node::annotations(&update.new);
    if annotations.contains_key(keys::INTERRUPTION_TIME) {
        return Decision::Allow(Allowed::InterruptionNotice);
    }
    let status = record.and_then(|record| record.status.as_ref());
    let phase = status.map(|status| status.phase);
    if phase.is_some_and(|phase| phase.is_tainted()) {
        return Decision::Allow(Allowed::PhaseTainted);
    }
    let replacement = status.and_then(|status| status.record.node.clone());
    if let Some(replacement) = &replacement
        && is_ready(replacement)
    {
        return Decision::Allow(Allowed::ReplacementReady(replacement.clone()));
    }
    let name = update.name();
    let phase = match phase {
        Some(phase) => format!("phase {phase}"),
        None => "no phase: no rebalance notice handled yet".to_owned(),
    };
    let what = match &replacement {
        Some(replacement) => format!("replacement {replacement} not Ready"),
        None => "replacement not Ready".to_owned(),
    };
    Decision::Deny(format!(
        "node {name}: {what} ({phase}); spot-rebalancer taints it once its replacement is Ready"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{
        SpotReplacementSpec, SpotReplacementStatus,
        record::{Phase, Replacement},
    };
    use crate::webhook::review::{Review, parse};
    use serde_json::{Value, json};

    const CONTROLLER: &str = "system:serviceaccount:spot-rebalancer:spot-rebalancer-controller";

    fn settings() -> OrderSettings {
        OrderSettings {
            taint_key: keys::DEFAULT_TAINT_KEY.into(),
            controller_usernames: vec![CONTROLLER.into()],
        }
    }

    fn update(user: &str, annotations: Value, new_taint_effect: &str) -> NodeUpdate {
        let node = |taints: Value| {
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": "old-1", "annotations": annotations},
                   "spec": {"taints": taints}})
        };
        let taint = json!({"key": keys::DEFAULT_TAINT_KEY, "value": "true", "effect": new_taint_effect});
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Node"},
                        "resource": {"group": "", "version": "v1", "resource": "nodes"},
                        "name": "old-1", "operation": "UPDATE", "userInfo": {"username": user},
                        "object": node(json!([taint])), "oldObject": node(json!([]))}
        });
        match parse(&serde_json::to_vec(&body).unwrap()).unwrap() {
            Review::Update(update) => *update,
            Review::Other(_) => unreachable!(),
        }
    }

    /// The controller's record of `old-1` in `phase`, with `replacement` claimed.
    fn record(phase: Phase, replacement: Option<&str>) -> SpotReplacement {
        let mut record = Replacement::new("spot".into(), None, "2026-11-25T10:00:00Z".parse().unwrap());
        record.node = replacement.map(Into::into);
        let mut object = SpotReplacement::new(
            "i-0000000a",
            SpotReplacementSpec {
                node_name: "old-1".into(),
                node_uid: "uid-1".into(),
                instance_id: "i-0000000a".into(),
            },
        );
        object.status = Some(SpotReplacementStatus {
            phase,
            record,
            seat: None,
            history: Vec::new(),
        });
        object
    }

    #[test]
    fn the_taint_before_the_replacement_is_ready_is_denied_naming_node_and_phase() {
        let update = update("alice", json!({}), "NoSchedule");
        let record = record(Phase::ScalingSpot, None);
        assert_eq!(
            decide(&update, &settings(), Some(&record), |_| false),
            Decision::Deny(
                "node old-1: replacement not Ready (phase ScalingSpot); spot-rebalancer taints it once \
                 its replacement is Ready"
                    .into()
            )
        );
    }

    #[test]
    fn a_claimed_but_unready_replacement_is_named() {
        let update = update("alice", json!({}), "NoExecute");
        let record = record(Phase::AwaitingReady, Some("new-1"));
        let Decision::Deny(message) = decide(&update, &settings(), Some(&record), |_| false) else {
            panic!("allowed");
        };
        assert!(
            message.starts_with("node old-1: replacement new-1 not Ready (phase AwaitingReady)"),
            "{message}"
        );
    }

    #[test]
    fn a_ready_replacement_allows_the_taint() {
        let update = update("alice", json!({}), "NoSchedule");
        let record = record(Phase::AwaitingReady, Some("new-1"));
        assert_eq!(
            decide(&update, &settings(), Some(&record), |name| name == "new-1"),
            Decision::Allow(Allowed::ReplacementReady("new-1".into()))
        );
    }

    #[test]
    fn the_controller_a_tainted_phase_or_an_interruption_notice_allow_the_taint() {
        let tainted = record(Phase::Tainted, Some("new-1"));
        let draining = record(Phase::Draining, Some("new-1"));
        let cases = [
            (CONTROLLER, json!({}), None, Allowed::ByTheController),
            ("alice", json!({}), Some(&tainted), Allowed::PhaseTainted),
            ("alice", json!({}), Some(&draining), Allowed::PhaseTainted),
            (
                "alice",
                json!({keys::INTERRUPTION_TIME: "2026-11-25T10:02:00Z"}),
                None,
                Allowed::InterruptionNotice,
            ),
        ];
        for (user, annotations, record, why) in cases {
            let update = update(user, annotations, "NoSchedule");
            assert_eq!(
                decide(&update, &settings(), record, |_| false),
                Decision::Allow(why)
            );
        }
    }

    #[test]
    fn phase_annotations_a_node_wrote_itself_count_for_nothing() {
        let forged = json!({"spot-rebalancer.io/phase": "Tainted",
                            "spot-rebalancer.io/replacement": "{\"replacementNode\":\"new-1\"}"});
        let update = update("system:node:old-1", forged, "NoSchedule");
        let Decision::Deny(message) = decide(&update, &settings(), None, |_| true) else {
            panic!("a forged phase annotation let the taint through");
        };
        assert!(message.contains("(no phase"), "{message}");
    }

    #[test]
    fn a_node_never_noticed_is_denied_saying_so() {
        let update = update("alice", json!({}), "NoSchedule");
        let Decision::Deny(message) = decide(&update, &settings(), None, |_| false) else {
            panic!("allowed");
        };
        assert!(
            message.contains("(no phase: no rebalance notice handled yet)"),
            "{message}"
        );
    }
}
