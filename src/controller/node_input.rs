//! What the controller takes from a Node, which it does not trust: a node's kubelet can write its
//! own Node's annotations and most labels. The instance comes from `spec.providerID` only; the
//! agent's notice times are the only annotations read, each bounded in size and parsed as RFC 3339;
//! the agent's `instance-id` annotation is only compared with the provider id. Pure functions.
use std::collections::BTreeMap;

use jiff::Timestamp;

use crate::keys;

/// The longest notice-time value read (an RFC 3339 time is about 30 bytes).
pub const MAX_NOTICE_LEN: usize = 64;

/// What a Node says, checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInput {
    /// The rebalance recommendation's time, if the annotation is there and valid.
    pub rebalance: Option<Timestamp>,
    /// The spot interruption's time, if the annotation is there and valid.
    pub interruption: Option<Timestamp>,
    /// Annotations that are there but not valid, with why (reported; treated as absent).
    pub problems: Vec<String>,
    /// The agent's `instance-id` annotation when it names another instance than the provider id:
    /// the node is lying or misconfigured, and nothing is done for it.
    pub disagreeing_instance: Option<String>,
}

impl NodeInput {
    /// Reads the notice annotations of a Node whose provider id names `instance`.
    pub fn read(annotations: &BTreeMap<String, String>, instance: Option<&str>) -> NodeInput {
        let mut input = NodeInput::default();
        input.rebalance = notice_time(annotations, keys::REBALANCE_NOTICE_TIME, &mut input.problems);
        input.interruption = notice_time(annotations, keys::INTERRUPTION_TIME, &mut input.problems);
        if let Some(claimed) = annotations.get(keys::INSTANCE_ID)
            && Some(claimed.as_str()) != instance
        {
            input.disagreeing_instance = Some(claimed.chars().take(MAX_NOTICE_LEN).collect());
        }
        input
    }

    /// A notice of either kind is on the node.
    pub fn noticed(&self) -> bool {
        self.rebalance.is_some() || self.interruption.is_some()
    }
}

fn notice_time(
    annotations: &BTreeMap<String, String>,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<Timestamp> {
    let value = annotations.get(key)?;
    if value.len() > MAX_NOTICE_LEN {
        problems.push(format!(
            "{key} is {} bytes long (at most {MAX_NOTICE_LEN})",
            value.len()
        ));
        return None;
    }
    match value.parse::<Timestamp>() {
        Ok(time) => Some(time),
        Err(_) => {
            problems.push(format!("{key} is not an RFC 3339 time: {value:?}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn valid_notice_times_are_read() {
        let input = NodeInput::read(
            &annotations(&[
                (keys::REBALANCE_NOTICE_TIME, "2026-12-01T10:00:00Z"),
                (keys::INTERRUPTION_TIME, "2026-12-01T10:02:00+00:00"),
                (keys::INSTANCE_ID, "i-0abc12345"),
            ]),
            Some("i-0abc12345"),
        );
        assert_eq!(input.rebalance, Some("2026-12-01T10:00:00Z".parse().unwrap()));
        assert_eq!(input.interruption, Some("2026-12-01T10:02:00Z".parse().unwrap()));
        assert!(input.problems.is_empty());
        assert_eq!(input.disagreeing_instance, None);
        assert!(input.noticed());
    }

    #[test]
    fn a_malformed_or_oversized_notice_is_a_problem_not_a_notice() {
        let long = format!("2026-12-01T10:00:00Z{}", " ".repeat(100));
        let input = NodeInput::read(
            &annotations(&[
                (keys::REBALANCE_NOTICE_TIME, "soon"),
                (keys::INTERRUPTION_TIME, &long),
            ]),
            Some("i-0abc12345"),
        );
        assert!(!input.noticed());
        assert_eq!(input.problems.len(), 2, "{:?}", input.problems);
        assert!(input.problems[0].contains("RFC 3339"));
        assert!(input.problems[1].contains("bytes long"));
    }

    #[test]
    fn an_instance_id_annotation_that_disagrees_with_the_provider_id_is_caught() {
        let forged = annotations(&[
            (keys::REBALANCE_NOTICE_TIME, "2026-12-01T10:00:00Z"),
            (keys::INSTANCE_ID, "i-0victim0000"),
        ]);
        let input = NodeInput::read(&forged, Some("i-0abc12345"));
        assert_eq!(input.disagreeing_instance.as_deref(), Some("i-0victim0000"));
        // A node with no provider id cannot vouch for any instance either.
        let input = NodeInput::read(&forged, None);
        assert_eq!(input.disagreeing_instance.as_deref(), Some("i-0victim0000"));
        // No annotation: nothing to compare.
        let input = NodeInput::read(&annotations(&[]), Some("i-0abc12345"));
        assert_eq!(input.disagreeing_instance, None);
    }
}
