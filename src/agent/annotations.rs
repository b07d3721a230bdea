//! What the agent records on its Node, and the one decision it makes: given what IMDS has shown and
//! what is already on the Node, which annotations (if any) to write. Plain data, plain functions.
use std::collections::BTreeMap;

use jiff::Timestamp;

use crate::{
    imds::{InstanceAction, RebalanceRecommendation, notice::parse_time},
    keys,
};

/// The agent's annotations on its Node. Server-side apply replaces the whole set the agent's field
/// manager owns, so a write always carries all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentAnnotations {
    pub instance_id: Option<String>,
    pub rebalance_notice_time: Option<Timestamp>,
    pub interruption_time: Option<Timestamp>,
}

/// An annotation on the Node whose value the agent cannot read; it is treated as absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableAnnotation {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

impl AgentAnnotations {
    /// Reads the agent's annotations from a Node's annotations, ignoring every other key.
    pub fn from_node(annotations: &BTreeMap<String, String>) -> (Self, Vec<UnreadableAnnotation>) {
        let mut unreadable = Vec::new();
        let mut time = |key: &'static str| {
            let value = annotations.get(key)?;
            parse_time(value)
                .map_err(|reason| {
                    unreadable.push(UnreadableAnnotation {
                        key,
                        value: value.clone(),
                        reason,
                    })
                })
                .ok()
        };
        let rebalance_notice_time = time(keys::REBALANCE_NOTICE_TIME);
        let interruption_time = time(keys::INTERRUPTION_TIME);
        let annotations = AgentAnnotations {
            instance_id: annotations.get(keys::INSTANCE_ID).cloned(),
            rebalance_notice_time,
            interruption_time,
        };
        (annotations, unreadable)
    }

    /// The annotations as they go on the Node; times in RFC 3339 UTC (`2020-10-27T08:22:00Z`).
    pub fn to_node(&self) -> BTreeMap<String, String> {
        let mut annotations = BTreeMap::new();
        if let Some(id) = &self.instance_id {
            annotations.insert(keys::INSTANCE_ID.to_owned(), id.clone());
        }
        if let Some(time) = self.rebalance_notice_time {
            annotations.insert(keys::REBALANCE_NOTICE_TIME.to_owned(), time.to_string());
        }
        if let Some(time) = self.interruption_time {
            annotations.insert(keys::INTERRUPTION_TIME.to_owned(), time.to_string());
        }
        annotations
    }

    fn has_notice(&self) -> bool {
        self.rebalance_notice_time.is_some() || self.interruption_time.is_some()
    }
}

/// What IMDS has shown this agent so far: its instance id and the latest notice of each kind.
/// Notices are sticky: a notice that later reads as 404 (or cannot be read) is still a notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub instance_id: String,
    pub rebalance: Option<RebalanceRecommendation>,
    pub interruption: Option<InstanceAction>,
}

impl Observed {
    pub fn new(instance_id: String) -> Self {
        Observed {
            instance_id,
            rebalance: None,
            interruption: None,
        }
    }
}

/// The annotations to write, or `None` when the Node already says everything IMDS has shown.
///
/// - A notice is written once; seeing it again writes nothing.
/// - A rebalance recommendation is written once per instance: a later `noticeTime` does not
///   replace the written one. EC2 issues one recommendation per instance and IMDS keeps serving it,
///   but some metadata proxies and mocks serve a `noticeTime` that moves at every poll, and each
///   rewrite would be a Node update every Node watcher in the cluster receives. (A recommendation
///   for the same instance after the first was handled is therefore not recorded again; the
///   interruption notice and queue mode's events still are.)
/// - An interruption keeps the time first written while that time is still to come (the notice
///   does not move); once it has passed, a new interruption notice (after a stop and start) is
///   written.
/// - Notices are never withdrawn: what is written stays, even when IMDS no longer shows it.
/// - Annotations written for another instance (a Node name reused by a new instance) are stale and
///   are replaced by this instance's.
pub fn annotations_to_write(
    observed: &Observed,
    written: &AgentAnnotations,
    now: Timestamp,
) -> Option<AgentAnnotations> {
    let stale = written
        .instance_id
        .as_deref()
        .is_some_and(|id| id != observed.instance_id);
    let kept = if stale {
        AgentAnnotations::default()
    } else {
        written.clone()
    };

    let rebalance_notice_time = kept
        .rebalance_notice_time
        .or(observed.rebalance.map(|notice| notice.notice_time));
    let interruption_time = match (observed.interruption, kept.interruption_time) {
        (Some(_), Some(written_time)) if written_time > now => Some(written_time),
        (Some(notice), _) => Some(notice.time),
        (None, written_time) => written_time,
    };
    let mut desired = AgentAnnotations {
        instance_id: kept.instance_id,
        rebalance_notice_time,
        interruption_time,
    };
    if desired.has_notice() || stale {
        desired.instance_id = Some(observed.instance_id.clone());
    }
    (desired != *written).then_some(desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::Action;

    const ID: &str = "i-1234567890abcdef0";

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn now() -> Timestamp {
        at("2026-01-01T12:00:00Z")
    }

    fn observed() -> Observed {
        Observed::new(ID.to_owned())
    }

    fn rebalance(time: &str) -> Option<RebalanceRecommendation> {
        Some(RebalanceRecommendation {
            notice_time: at(time),
        })
    }

    fn interruption(time: &str) -> Option<InstanceAction> {
        Some(InstanceAction {
            action: Action::Terminate,
            time: at(time),
        })
    }

    fn written(rebalance: Option<&str>, interruption: Option<&str>) -> AgentAnnotations {
        AgentAnnotations {
            instance_id: Some(ID.to_owned()),
            rebalance_notice_time: rebalance.map(at),
            interruption_time: interruption.map(at),
        }
    }

    #[test]
    fn no_notice_and_nothing_written_writes_nothing() {
        assert_eq!(
            annotations_to_write(&observed(), &AgentAnnotations::default(), now()),
            None
        );
    }

    #[test]
    fn a_first_rebalance_recommendation_writes_its_time_and_the_instance_id() {
        let seen = Observed {
            rebalance: rebalance("2026-01-01T11:59:00Z"),
            ..observed()
        };
        assert_eq!(
            annotations_to_write(&seen, &AgentAnnotations::default(), now()),
            Some(written(Some("2026-01-01T11:59:00Z"), None))
        );
    }

    #[test]
    fn the_same_notice_seen_again_writes_nothing() {
        let seen = Observed {
            rebalance: rebalance("2026-01-01T11:59:00Z"),
            interruption: interruption("2026-01-01T12:02:00Z"),
            ..observed()
        };
        let already = written(Some("2026-01-01T11:59:00Z"), Some("2026-01-01T12:02:00Z"));
        assert_eq!(annotations_to_write(&seen, &already, now()), None);
    }

    #[test]
    fn an_interruption_after_a_rebalance_keeps_the_rebalance_time() {
        let seen = Observed {
            rebalance: rebalance("2026-01-01T11:59:00Z"),
            interruption: interruption("2026-01-01T12:02:00Z"),
            ..observed()
        };
        let already = written(Some("2026-01-01T11:59:00Z"), None);
        assert_eq!(
            annotations_to_write(&seen, &already, now()),
            Some(written(
                Some("2026-01-01T11:59:00Z"),
                Some("2026-01-01T12:02:00Z")
            ))
        );
    }

    #[test]
    fn notices_written_before_a_restart_are_kept_when_imds_no_longer_shows_them() {
        let already = written(Some("2026-01-01T11:00:00Z"), None);
        assert_eq!(annotations_to_write(&observed(), &already, now()), None);
        let seen = Observed {
            interruption: interruption("2026-01-01T12:02:00Z"),
            ..observed()
        };
        assert_eq!(
            annotations_to_write(&seen, &already, now()),
            Some(written(
                Some("2026-01-01T11:00:00Z"),
                Some("2026-01-01T12:02:00Z")
            )),
            "the rebalance time written earlier is carried into the new write"
        );
    }

    #[test]
    fn a_rebalance_notice_time_that_moves_at_every_poll_is_written_once() {
        let first = Observed {
            rebalance: rebalance("2026-01-01T11:59:00Z"),
            ..observed()
        };
        let written_once = annotations_to_write(&first, &AgentAnnotations::default(), now())
            .expect("the first recommendation is written");
        for moved in [
            "2026-01-01T11:59:05Z",
            "2026-01-01T11:59:10Z",
            "2026-01-01T12:30:00Z",
        ] {
            let seen = Observed {
                rebalance: rebalance(moved),
                ..observed()
            };
            assert_eq!(
                annotations_to_write(&seen, &written_once, now()),
                None,
                "noticeTime {moved} rewrote the Node"
            );
        }
    }

    #[test]
    fn a_later_rebalance_time_after_a_restart_keeps_the_written_one() {
        let seen = Observed {
            rebalance: rebalance("2026-01-01T11:59:00Z"),
            ..observed()
        };
        let already = written(Some("2026-01-01T10:00:00Z"), None);
        assert_eq!(annotations_to_write(&seen, &already, now()), None);
    }

    #[test]
    fn a_pending_interruption_time_is_not_moved() {
        // Some IMDS implementations (and AWS's mock by default) report "now + 2 minutes" afresh.
        let seen = Observed {
            interruption: interruption("2026-01-01T12:02:05Z"),
            ..observed()
        };
        let already = written(None, Some("2026-01-01T12:02:00Z"));
        assert_eq!(annotations_to_write(&seen, &already, now()), None);
    }

    #[test]
    fn an_interruption_after_a_past_one_is_written() {
        let seen = Observed {
            interruption: interruption("2026-01-01T12:02:00Z"),
            ..observed()
        };
        let already = written(None, Some("2025-12-01T00:00:00Z"));
        assert_eq!(
            annotations_to_write(&seen, &already, now()),
            Some(written(None, Some("2026-01-01T12:02:00Z")))
        );
    }

    #[test]
    fn annotations_of_another_instance_are_replaced() {
        let previous = AgentAnnotations {
            instance_id: Some("i-0000000000000000a".to_owned()),
            rebalance_notice_time: Some(at("2025-06-01T00:00:00Z")),
            interruption_time: Some(at("2025-06-01T00:02:00Z")),
        };
        assert_eq!(
            annotations_to_write(&observed(), &previous, now()),
            Some(written(None, None)),
            "without a notice of its own, the instance id alone replaces the stale notices"
        );
        let seen = Observed {
            rebalance: rebalance("2026-01-01T11:59:00Z"),
            ..observed()
        };
        assert_eq!(
            annotations_to_write(&seen, &previous, now()),
            Some(written(Some("2026-01-01T11:59:00Z"), None))
        );
    }

    #[test]
    fn a_missing_instance_id_next_to_a_notice_is_restored() {
        let already = AgentAnnotations {
            instance_id: None,
            ..written(Some("2026-01-01T11:59:00Z"), None)
        };
        assert_eq!(
            annotations_to_write(&observed(), &already, now()),
            Some(written(Some("2026-01-01T11:59:00Z"), None))
        );
    }

    #[test]
    fn annotations_round_trip_through_the_node() {
        let annotations = written(Some("2020-10-27T08:22:00Z"), Some("2020-10-27T08:24:00Z"));
        let on_node = annotations.to_node();
        assert_eq!(on_node[keys::REBALANCE_NOTICE_TIME], "2020-10-27T08:22:00Z");
        assert_eq!(on_node[keys::INTERRUPTION_TIME], "2020-10-27T08:24:00Z");
        assert_eq!(on_node[keys::INSTANCE_ID], ID);
        assert_eq!(AgentAnnotations::from_node(&on_node), (annotations, vec![]));
    }

    #[test]
    fn other_keys_on_the_node_are_ignored_and_unreadable_values_reported() {
        let on_node: BTreeMap<String, String> = [
            ("node.alpha.kubernetes.io/ttl", "0"),
            (keys::REBALANCE_NOTICE_TIME, "soon"),
            (keys::INTERRUPTION_TIME, "2020-10-27T08:24:00Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let (annotations, unreadable) = AgentAnnotations::from_node(&on_node);
        assert_eq!(
            annotations,
            AgentAnnotations {
                instance_id: None,
                rebalance_notice_time: None,
                interruption_time: Some(at("2020-10-27T08:24:00Z")),
            }
        );
        assert_eq!(unreadable.len(), 1);
        assert_eq!(unreadable[0].key, keys::REBALANCE_NOTICE_TIME);
        assert_eq!(unreadable[0].value, "soon");
    }

    #[test]
    fn an_empty_set_goes_on_the_node_as_no_annotations() {
        assert!(AgentAnnotations::default().to_node().is_empty());
    }
}
