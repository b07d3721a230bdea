//! The IMDS documents the agent reads, parsed strictly: a rebalance recommendation, a spot instance
//! action and the instance id. Anything else is a [`MalformedNotice`] that carries the offending body.
use std::fmt;

use jiff::Timestamp;
use serde::Deserialize;

/// `/latest/meta-data/events/recommendations/rebalance`: EC2 recommends replacing this instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceRecommendation {
    /// When EC2 emitted the recommendation.
    pub notice_time: Timestamp,
}

/// What EC2 will do to an interrupted spot instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Terminate,
    Stop,
    Hibernate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Terminate => "terminate",
            Action::Stop => "stop",
            Action::Hibernate => "hibernate",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `/latest/meta-data/spot/instance-action`: the spot interruption notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceAction {
    pub action: Action,
    /// When the action will happen.
    pub time: Timestamp,
}

/// How much of an offending body a [`MalformedNotice`] keeps: enough to recognise it in a log line.
const BODY_EXCERPT_CHARS: usize = 200;

/// A document IMDS served that is not what AWS documents; logged with the offending value, ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {document}: {reason}; body: {body:?}")]
pub struct MalformedNotice {
    /// Which document: "rebalance recommendation", "spot instance action" or "instance id".
    pub document: &'static str,
    /// What is wrong with it, naming the offending field value where there is one.
    pub reason: String,
    /// The body as served, cut to a bounded excerpt.
    pub body: String,
}

impl MalformedNotice {
    fn new(document: &'static str, reason: impl Into<String>, body: &str) -> Self {
        let mut excerpt: String = body.chars().take(BODY_EXCERPT_CHARS).collect();
        if body.chars().nth(BODY_EXCERPT_CHARS).is_some() {
            excerpt.push('…');
        }
        MalformedNotice {
            document,
            reason: reason.into(),
            body: excerpt,
        }
    }
}

const REBALANCE: &str = "rebalance recommendation";
const INSTANCE_ACTION: &str = "spot instance action";
const INSTANCE_ID: &str = "instance id";

/// Parses `{"noticeTime": "2020-10-27T08:22:00Z"}`; fields AWS may add later are ignored.
pub fn parse_rebalance_recommendation(body: &str) -> Result<RebalanceRecommendation, MalformedNotice> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        notice_time: String,
    }
    let raw: Raw = serde_json::from_str(body)
        .map_err(|error| MalformedNotice::new(REBALANCE, error.to_string(), body))?;
    let notice_time = parse_time(&raw.notice_time)
        .map_err(|reason| MalformedNotice::new(REBALANCE, format!("noticeTime {reason}"), body))?;
    Ok(RebalanceRecommendation { notice_time })
}

/// Parses `{"action": "terminate"|"stop"|"hibernate", "time": "2020-10-27T08:22:00Z"}`.
pub fn parse_instance_action(body: &str) -> Result<InstanceAction, MalformedNotice> {
    #[derive(Deserialize)]
    struct Raw {
        action: String,
        time: String,
    }
    let raw: Raw = serde_json::from_str(body)
        .map_err(|error| MalformedNotice::new(INSTANCE_ACTION, error.to_string(), body))?;
    let action = match raw.action.as_str() {
        "terminate" => Action::Terminate,
        "stop" => Action::Stop,
        "hibernate" => Action::Hibernate,
        other => {
            return Err(MalformedNotice::new(
                INSTANCE_ACTION,
                format!("unknown action {other:?} (expected terminate, stop or hibernate)"),
                body,
            ));
        }
    };
    let time = parse_time(&raw.time)
        .map_err(|reason| MalformedNotice::new(INSTANCE_ACTION, format!("time {reason}"), body))?;
    Ok(InstanceAction { action, time })
}

/// Parses the body of `/latest/meta-data/instance-id`: `i-` followed by hex digits.
pub fn parse_instance_id(body: &str) -> Result<String, MalformedNotice> {
    let id = body.trim();
    let well_formed = id
        .strip_prefix("i-")
        .is_some_and(|hex| !hex.is_empty() && hex.len() <= 32 && hex.chars().all(|c| c.is_ascii_hexdigit()));
    if well_formed {
        Ok(id.to_owned())
    } else {
        Err(MalformedNotice::new(
            INSTANCE_ID,
            "expected i- followed by hex digits",
            body,
        ))
    }
}

/// An RFC 3339 instant with an explicit offset, as IMDS writes them (`2020-10-27T08:22:00Z`).
pub fn parse_time(value: &str) -> Result<Timestamp, String> {
    value
        .parse::<Timestamp>()
        .map_err(|error| format!("{value:?} is not an RFC 3339 time: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_rebalance_recommendation_is_parsed_with_its_notice_time() {
        let parsed =
            parse_rebalance_recommendation("{\n\t\"noticeTime\": \"2020-10-27T08:22:00Z\"\n}").unwrap();
        assert_eq!(parsed.notice_time, at("2020-10-27T08:22:00Z"));
    }

    #[test]
    fn fields_aws_may_add_later_are_ignored() {
        let parsed =
            parse_rebalance_recommendation(r#"{"noticeTime": "2020-10-27T08:22:00Z", "reason": "x"}"#)
                .unwrap();
        assert_eq!(parsed.notice_time, at("2020-10-27T08:22:00Z"));
    }

    #[test]
    fn times_with_fractions_and_offsets_are_the_same_instant() {
        let parsed =
            parse_rebalance_recommendation(r#"{"noticeTime": "2020-10-27T10:22:00.000+02:00"}"#).unwrap();
        assert_eq!(parsed.notice_time, at("2020-10-27T08:22:00Z"));
    }

    #[test]
    fn every_documented_action_is_parsed() {
        for (text, action) in [
            ("terminate", Action::Terminate),
            ("stop", Action::Stop),
            ("hibernate", Action::Hibernate),
        ] {
            let body = format!(r#"{{"action": "{text}", "time": "2017-09-18T08:22:00Z"}}"#);
            assert_eq!(
                parse_instance_action(&body).unwrap(),
                InstanceAction {
                    action,
                    time: at("2017-09-18T08:22:00Z")
                }
            );
        }
    }

    #[test]
    fn an_unknown_action_is_malformed_and_names_the_value() {
        let error =
            parse_instance_action(r#"{"action": "reboot", "time": "2017-09-18T08:22:00Z"}"#).unwrap_err();
        assert_eq!(error.document, "spot instance action");
        assert!(error.reason.contains("\"reboot\""), "{error}");
        assert!(error.to_string().contains("reboot"), "{error}");
    }

    #[test]
    fn a_bad_time_is_malformed_and_names_the_value() {
        let error = parse_rebalance_recommendation(r#"{"noticeTime": "yesterday"}"#).unwrap_err();
        assert!(error.reason.contains("noticeTime \"yesterday\""), "{error}");
        let error =
            parse_instance_action(r#"{"action": "stop", "time": "2017-13-45T08:22:00Z"}"#).unwrap_err();
        assert!(error.reason.contains("2017-13-45T08:22:00Z"), "{error}");
        let error =
            parse_instance_action(r#"{"action": "stop", "time": "2017-09-18T08:22:00"}"#).unwrap_err();
        assert!(
            error.reason.contains("time"),
            "a time without an offset is ambiguous: {error}"
        );
    }

    #[test]
    fn bad_json_is_malformed_and_keeps_the_body() {
        for body in [
            "",
            "not json",
            "{",
            "[]",
            "null",
            r#"{"noticeTime": 5}"#,
            r#"{"time": "x"}"#,
        ] {
            let error = parse_rebalance_recommendation(body).unwrap_err();
            assert_eq!(error.body, body);
            assert!(parse_instance_action(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn a_huge_body_is_kept_as_a_bounded_excerpt() {
        let body = "x".repeat(10_000);
        let error = parse_instance_action(&body).unwrap_err();
        assert_eq!(error.body.chars().count(), BODY_EXCERPT_CHARS + 1);
        assert!(error.body.ends_with('…'));
    }

    #[test]
    fn an_excerpt_never_splits_a_character() {
        let body = "é".repeat(BODY_EXCERPT_CHARS * 2);
        let error = parse_rebalance_recommendation(&body).unwrap_err();
        assert!(error.body.starts_with("éé"));
    }

    #[test]
    fn instance_ids_are_checked() {
        assert_eq!(
            parse_instance_id("i-1234567890abcdef0").unwrap(),
            "i-1234567890abcdef0"
        );
        assert_eq!(parse_instance_id("i-0abc\n").unwrap(), "i-0abc");
        for bad in ["", "i-", "1234", "i-xyz", "<html>404</html>", "i-0abc def"] {
            assert!(parse_instance_id(bad).is_err(), "{bad:?}");
        }
    }
}
