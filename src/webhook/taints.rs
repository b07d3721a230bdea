//! Taint facts for admission: which taints an update adds, which taint keys the PDB guard watches, and
//! whether a pod tolerates a taint (Kubernetes' own matching rules). Pure functions.
use k8s_openapi::api::core::v1::{Taint, Toleration};

/// Kubernetes' own taints (not-ready, unreachable, out-of-service, …): never touched, so taint-based
/// eviction from dead nodes keeps working.
pub const KUBERNETES_TAINT_PREFIX: &str = "node.kubernetes.io/";
/// AWS Node Termination Handler's taint keys (`…/spot-itn`, `…/rebalance-recommendation`, …).
pub const NTH_TAINT_KEYS: &str = "aws-node-termination-handler/*";

pub const NO_EXECUTE: &str = "NoExecute";
pub const NO_SCHEDULE: &str = "NoSchedule";

/// Taints in `new` whose (key, effect) pair is not in `old`, with their index in `new`. A taint whose
/// effect changed counts as added (a NoSchedule taint turned NoExecute is a new NoExecute taint).
pub fn added<'a>(old: &[Taint], new: &'a [Taint]) -> Vec<(usize, &'a Taint)> {
    new.iter()
        .enumerate()
        .filter(|(_, taint)| {
            !old.iter()
                .any(|before| before.key == taint.key && before.effect == taint.effect)
        })
        .collect()
}

/// A taint key, exact (`spot-instance-terminating`) or a prefix ending in `*`
/// (`aws-node-termination-handler/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPattern {
    Exact(String),
    Prefix(String),
}

impl KeyPattern {
    pub fn matches(&self, key: &str) -> bool {
        match self {
            KeyPattern::Exact(exact) => key == exact,
            KeyPattern::Prefix(prefix) => key.starts_with(prefix.as_str()),
        }
    }

    /// Whether some `node.kubernetes.io/…` key would match.
    fn reaches_kubernetes_taints(&self) -> bool {
        match self {
            KeyPattern::Exact(exact) => exact.starts_with(KUBERNETES_TAINT_PREFIX),
            KeyPattern::Prefix(prefix) => {
                KUBERNETES_TAINT_PREFIX.starts_with(prefix.as_str())
                    || prefix.starts_with(KUBERNETES_TAINT_PREFIX)
            }
        }
    }
}

impl std::str::FromStr for KeyPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (body, prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
        if body.is_empty() || !body.chars().all(valid) {
            return Err(format!(
                "{text:?} is not a taint key or a key prefix ending in `*`"
            ));
        }
        let pattern = if prefix {
            KeyPattern::Prefix(body.to_owned())
        } else {
            KeyPattern::Exact(body.to_owned())
        };
        if pattern.reaches_kubernetes_taints() {
            return Err(format!(
                "{text:?} would match Kubernetes' own {KUBERNETES_TAINT_PREFIX}* taints, which are never touched"
            ));
        }
        Ok(pattern)
    }
}

/// The taint keys whose NoExecute taints the PDB guard makes safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedKeys(Vec<KeyPattern>);

impl GuardedKeys {
    pub fn new(patterns: Vec<KeyPattern>) -> Self {
        GuardedKeys(patterns)
    }

    /// Whether a NoExecute taint with `key` is guarded. Kubernetes' own taints never are.
    pub fn guards(&self, key: &str) -> bool {
        !key.starts_with(KUBERNETES_TAINT_PREFIX) && self.0.iter().any(|pattern| pattern.matches(key))
    }
}

/// Whether `tolerations` let a pod stay on a node with `taint` for good. A NoExecute toleration with
/// `tolerationSeconds` only delays the eviction, so it does not count.
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|toleration| {
        toleration_matches(toleration, taint)
            && (taint.effect != NO_EXECUTE || toleration.toleration_seconds.is_none())
    })
}

/// Kubernetes' `Toleration.ToleratesTaint`: the effect (empty means all), the key (empty with
/// `Exists` means all keys) and the value (`Equal`) must match. Unknown operators match nothing.
fn toleration_matches(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" | "" => {
            !key.is_empty()
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some("true".into()),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn toleration(
        key: Option<&str>,
        operator: &str,
        value: Option<&str>,
        effect: Option<&str>,
    ) -> Toleration {
        Toleration {
            key: key.map(Into::into),
            operator: Some(operator.into()),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            toleration_seconds: None,
        }
    }

    #[test]
    fn a_taint_is_added_when_its_key_and_effect_pair_is_new() {
        let old = [taint("a", NO_SCHEDULE), taint("b", NO_SCHEDULE)];
        let new = [
            taint("a", NO_SCHEDULE),
            taint("b", NO_EXECUTE),
            taint("c", NO_EXECUTE),
        ];
        let added: Vec<_> = added(&old, &new)
            .into_iter()
            .map(|(i, t)| (i, t.key.as_str()))
            .collect();
        assert_eq!(added, [(1, "b"), (2, "c")]);
        assert!(
            super::added(&new, &old[..1]).is_empty(),
            "removals are not additions"
        );
    }

    #[test]
    fn guarded_keys_match_exact_keys_and_prefixes_but_never_kubernetes_taints() {
        let guarded = GuardedKeys::new(vec![
            "spot-instance-terminating".parse().unwrap(),
            NTH_TAINT_KEYS.parse().unwrap(),
        ]);
        assert!(guarded.guards("spot-instance-terminating"));
        assert!(guarded.guards("aws-node-termination-handler/spot-itn"));
        assert!(!guarded.guards("spot-instance-terminating-soon"));
        assert!(!guarded.guards("node.kubernetes.io/unreachable"));
    }

    #[test]
    fn patterns_reaching_kubernetes_taints_are_refused() {
        for bad in [
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/*",
            "node.*",
            "*",
            "",
            "a b",
        ] {
            assert!(bad.parse::<KeyPattern>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn tolerations_follow_kubernetes_matching() {
        let t = taint("spot-instance-terminating", NO_EXECUTE);
        let exists_all = toleration(None, "Exists", None, None);
        let equal = toleration(
            Some("spot-instance-terminating"),
            "Equal",
            Some("true"),
            Some(NO_EXECUTE),
        );
        let wrong_value = toleration(Some("spot-instance-terminating"), "Equal", Some("no"), None);
        let wrong_effect = toleration(
            Some("spot-instance-terminating"),
            "Exists",
            None,
            Some(NO_SCHEDULE),
        );
        let empty_key_equal = toleration(None, "Equal", Some("true"), None);
        assert!(tolerates(&[exists_all], &t));
        assert!(tolerates(std::slice::from_ref(&equal), &t));
        assert!(!tolerates(&[wrong_value], &t));
        assert!(!tolerates(&[wrong_effect], &t));
        assert!(!tolerates(&[empty_key_equal], &t));
        assert!(!tolerates(&[], &t));
    }

    #[test]
    fn a_no_execute_toleration_with_seconds_only_delays_eviction() {
        let t = taint("spot-instance-terminating", NO_EXECUTE);
        let mut timed = toleration(Some("spot-instance-terminating"), "Exists", None, None);
        timed.toleration_seconds = Some(300);
        assert!(!tolerates(std::slice::from_ref(&timed), &t));
        assert!(tolerates(
            &[timed],
            &taint("spot-instance-terminating", NO_SCHEDULE)
        ));
    }
}
