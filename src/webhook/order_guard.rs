//! The order guard's decision, a pure function: the termination taint goes on an opted-in node only
//! once its replacement is Ready — unless the controller itself adds it (it knows the order) or an
//! interruption notice is present (the node dies in two minutes anyway).
use super::{review::NodeUpdate, taints};
use crate::{
    controller::record::{Phase, Replacement},
    keys, node,
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

/// Decides on an update of an opted-in node. `is_ready` tells whether a Node (by name) is Ready, from
/// the node cache. Phase, record and notice are read from the node as the update would leave it.
pub fn decide(update: &NodeUpdate, settings: &OrderSettings, is_ready: impl Fn(&str) -> bool) -> Decision {
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
    let phase = annotations.get(keys::PHASE).map(String::as_str);
    if phase
        .and_then(|text| text.parse::<Phase>().ok())
        .is_some_and(Phase::is_tainted)
    {
        return Decision::Allow(Allowed::PhaseTainted);
    }
    let replacement = annotations
        .get(keys::REPLACEMENT)
        .and_then(|json| serde_json::from_str::<Replacement>(json).ok())
        .and_then(|record| record.node);
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

    fn record(node: Option<&str>) -> String {
        let mut record = Replacement::new("spot".into(), None, "2026-11-25T10:00:00Z".parse().unwrap());
        record.node = node.map(Into::into);
        serde_json::to_string(&record).unwrap()
    }

    #[test]
    fn the_taint_before_the_replacement_is_ready_is_denied_naming_node_and_phase() {
        let update = update(
            "alice",
            json!({keys::PHASE: "ScalingSpot", keys::REPLACEMENT: record(None)}),
            "NoSchedule",
        );
        assert_eq!(
            decide(&update, &settings(), |_| false),
            Decision::Deny(
                "node old-1: replacement not Ready (phase ScalingSpot); spot-rebalancer taints it once \
                 its replacement is Ready"
                    .into()
            )
        );
    }

    #[test]
    fn a_claimed_but_unready_replacement_is_named() {
        let update = update(
            "alice",
            json!({keys::PHASE: "AwaitingReady", keys::REPLACEMENT: record(Some("new-1"))}),
            "NoExecute",
        );
        let Decision::Deny(message) = decide(&update, &settings(), |_| false) else {
            panic!("allowed");
        };
        assert!(
            message.starts_with("node old-1: replacement new-1 not Ready (phase AwaitingReady)"),
            "{message}"
        );
    }

    #[test]
    fn a_ready_replacement_allows_the_taint() {
        let update = update(
            "alice",
            json!({keys::PHASE: "AwaitingReady", keys::REPLACEMENT: record(Some("new-1"))}),
            "NoSchedule",
        );
        assert_eq!(
            decide(&update, &settings(), |name| name == "new-1"),
            Decision::Allow(Allowed::ReplacementReady("new-1".into()))
        );
    }

    #[test]
    fn the_controller_a_tainted_phase_or_an_interruption_notice_allow_the_taint() {
        let cases = [
            (CONTROLLER, json!({}), Allowed::ByTheController),
            ("alice", json!({keys::PHASE: "Tainted"}), Allowed::PhaseTainted),
            ("alice", json!({keys::PHASE: "Draining"}), Allowed::PhaseTainted),
            (
                "alice",
                json!({keys::INTERRUPTION_TIME: "2026-11-25T10:02:00Z"}),
                Allowed::InterruptionNotice,
            ),
        ];
        for (user, annotations, why) in cases {
            let update = update(user, annotations, "NoSchedule");
            assert_eq!(decide(&update, &settings(), |_| false), Decision::Allow(why));
        }
    }

    #[test]
    fn a_node_never_noticed_is_denied_saying_so() {
        let update = update("alice", json!({}), "NoSchedule");
        let Decision::Deny(message) = decide(&update, &settings(), |_| false) else {
            panic!("allowed");
        };
        assert!(
            message.contains("(no phase: no rebalance notice handled yet)"),
            "{message}"
        );
    }
}
