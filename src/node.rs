//! Plain facts read off a Node: its instance, readiness, taints, opt-in. Pure functions, shared by
//! the roles.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Taint};

/// The EC2 instance id in a provider id `aws:///<availability-zone>/<instance-id>`.
pub fn instance_id_from_provider_id(provider_id: &str) -> Option<&str> {
    let id = provider_id.strip_prefix("aws:///")?.split('/').nth(1)?;
    id.starts_with("i-").then_some(id)
}

/// The node's instance id, from its provider id.
pub fn instance_id(node: &Node) -> Option<&str> {
    node.spec
        .as_ref()?
        .provider_id
        .as_deref()
        .and_then(instance_id_from_provider_id)
}

pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

pub fn taints(node: &Node) -> &[Taint] {
    node.spec
        .as_ref()
        .and_then(|spec| spec.taints.as_deref())
        .unwrap_or_default()
}

pub fn has_taint(node: &Node, key: &str, effect: &str) -> bool {
    taints(node).iter().any(|t| t.key == key && t.effect == effect)
}

pub fn annotations(node: &Node) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    node.metadata.annotations.as_ref().unwrap_or(&EMPTY)
}

pub fn labels(node: &Node) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    node.metadata.labels.as_ref().unwrap_or(&EMPTY)
}

/// A `key=value` label selector of exactly one label: the opt-in label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptInLabel {
    pub key: String,
    pub value: String,
}

impl OptInLabel {
    pub fn matches(&self, node: &Node) -> bool {
        labels(node).get(&self.key) == Some(&self.value)
    }

    pub fn selector(&self) -> String {
        format!("{}={}", self.key, self.value)
    }
}

/// Characters of a label key or value (a loose check: the API server has the last word).
fn label_text(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// A label key given on the command line (`--nodegroup-label`).
pub fn label_key(text: &str) -> Result<String, String> {
    if label_text(text) {
        Ok(text.to_owned())
    } else {
        Err(format!("{text:?} is not a valid label key"))
    }
}

impl std::str::FromStr for OptInLabel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
        if !label_text(key) || !(value.is_empty() || label_text(value)) {
            return Err(format!("{text:?} is not a valid label KEY=VALUE"));
        }
        Ok(OptInLabel {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_comes_from_an_aws_provider_id() {
        assert_eq!(
            instance_id_from_provider_id("aws:///us-east-1a/i-0abc"),
            Some("i-0abc")
        );
        assert_eq!(instance_id_from_provider_id("aws:///us-east-1a/"), None);
        assert_eq!(instance_id_from_provider_id("gce://project/zone/name"), None);
        assert_eq!(
            instance_id_from_provider_id("aws:///us-east-1a/fargate-ip-10"),
            None
        );
    }

    #[test]
    fn opt_in_label_parses_key_and_value() {
        let label: OptInLabel = "spot-rebalancer.io/enabled=true".parse().unwrap();
        assert_eq!(label.selector(), "spot-rebalancer.io/enabled=true");
        assert!("no-equals-sign".parse::<OptInLabel>().is_err());
        assert!("bad key=true".parse::<OptInLabel>().is_err());
    }
}
