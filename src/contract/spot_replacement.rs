//! `SpotReplacement` (`spot-rebalancer.io/v1alpha1`): the controller's record of one noticed
//! instance, one object per instance in the controller's namespace.
//!
//! Only the controller's ServiceAccount may write it (a namespaced Role), so nothing a node can
//! write decides what is scaled, terminated or evicted. The spec names the noticed instance (its id
//! taken from the Node's `spec.providerID` only) and the Node it was noticed on; the status holds
//! everything decided since. Every status write carries the object's resourceVersion: a write
//! based on an older read (a stale leader's) fails with a conflict, and the writer reads again and
//! decides again.
use std::{borrow::Borrow, collections::BTreeMap};

use jiff::Timestamp;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::record::{Phase, Replacement, Seat};

/// The noticed instance and the Node it was noticed on; set at creation and never changed.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "spot-rebalancer.io",
    version = "v1alpha1",
    kind = "SpotReplacement",
    plural = "spotreplacements",
    shortname = "spr",
    namespaced,
    status = "SpotReplacementStatus",
    derive = "PartialEq",
    doc = "spot-rebalancer's record of one noticed spot instance: its replacement, the capacity \
           it asked for and what became of it. Written only by the controller.",
    printcolumn = r#"{"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"}"#,
    printcolumn = r#"{"name": "Instance", "type": "string", "jsonPath": ".spec.instanceId"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Replacement", "type": "string", "jsonPath": ".status.replacementNode"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SpotReplacementSpec {
    /// The Node the notice was seen on.
    pub node_name: String,
    /// That Node's uid: a new Node reusing the name (EKS names nodes by IP) is another node.
    pub node_uid: String,
    /// The noticed EC2 instance, from the Node's `spec.providerID` (never from an annotation).
    pub instance_id: String,
}

/// Everything the controller decided for the instance, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpotReplacementStatus {
    /// Where the instance is in the replacement state machine.
    pub phase: Phase,
    /// The replacement flow: ASGs, the scale-up intent (`asg`, `targetDesired`, …), undos, the
    /// claimed replacement (`replacementInstance`, `replacementNode`), drain and retirement.
    #[serde(flatten)]
    pub record: Replacement,
    /// What this controller added to which ASG for the instance and what became of it; it outlives
    /// the Node (the former capacity ledger entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seat: Option<Seat>,
    /// Each phase the instance entered, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<PhaseChange>,
}

/// One entry of the history: the instance entered `phase` at `at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseChange {
    pub phase: Phase,
    #[schemars(with = "String")]
    pub at: Timestamp,
}

impl SpotReplacementStatus {
    /// The status after entering `phase` at `now`: the history gains an entry when the phase changes.
    pub fn entering(mut self, phase: Phase, now: Timestamp) -> Self {
        if self.history.last().map(|change| change.phase) != Some(phase) {
            self.history.push(PhaseChange { phase, at: now });
        }
        self.phase = phase;
        self
    }
}

/// The object's name for an instance: the instance id itself (`i-` and hex digits, a valid name).
/// `None` for anything else: the id comes from a Node, and a Node is not trusted.
pub fn record_name(instance: &str) -> Option<String> {
    let digits = instance.strip_prefix("i-")?;
    let valid = (8..=32).contains(&digits.len())
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    valid.then(|| instance.to_owned())
}

/// The chart's copy of the CRD (`charts/spot-rebalancer/crds/`, relative to the repository).
pub const CRD_MANIFEST_PATH: &str = "charts/spot-rebalancer/crds/spotreplacements.spot-rebalancer.io.yaml";

/// The CRD manifest the chart ships: [`SpotReplacement::crd`] as JSON (which is YAML) under a
/// comment saying where it comes from. A unit test keeps the chart's file equal to it.
pub fn crd_manifest() -> String {
    use kube::CustomResourceExt;
    // A CRD of plain strings, numbers and maps always serializes.
    let json = serde_json::to_string_pretty(&SpotReplacement::crd()).unwrap_or_default();
    format!(
        "# Generated from SpotReplacement::crd() (src/contract/spot_replacement.rs): do not edit.\n\
         # Regenerate: UPDATE_CRD=1 cargo test --lib the_charts_crd_is_the_types\n{json}\n"
    )
}

/// The record of the Node `name` (with uid `uid`, when known) among `records`: one naming that uid,
/// else, without a uid to compare, the newest naming the Node. A record of an older Node that had
/// the same name (EKS names nodes by IP) is not this Node's.
pub fn record_of<R: Borrow<SpotReplacement>>(
    records: impl IntoIterator<Item = R>,
    name: &str,
    uid: Option<&str>,
) -> Option<R> {
    records
        .into_iter()
        .filter(|record| {
            let spec = &record.borrow().spec;
            spec.node_name == name && uid.is_none_or(|uid| spec.node_uid == uid)
        })
        .max_by_key(|record| {
            let record = record.borrow();
            (
                record.status.as_ref().map(|status| status.record.detected_at),
                record.metadata.creation_timestamp.as_ref().map(|time| time.0),
            )
        })
}

/// Labels put on every record: the controller that keeps it (its lease name: two installations in
/// one namespace keep apart), and the Node, for `kubectl get spr -l spot-rebalancer.io/node=…`.
pub fn record_labels(node: &str, controller: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            super::keys::CONTROLLER_FIELD_MANAGER.to_owned(),
        ),
        (
            super::keys::RECORD_CONTROLLER_LABEL.to_owned(),
            controller.to_owned(),
        ),
    ]);
    // A label value is at most 63 characters; a longer node name is left out of the labels.
    if node.len() <= 63 {
        labels.insert(super::keys::RECORD_NODE_LABEL.to_owned(), node.to_owned());
    }
    labels
}

#[cfg(test)]
mod tests {
    use kube::{CustomResourceExt, Resource};

    use super::*;

    #[test]
    fn the_crd_is_namespaced_with_a_status_subresource_and_the_printer_columns() {
        let crd = SpotReplacement::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("spotreplacements.spot-rebalancer.io")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| (c.name.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(
            columns,
            [
                ("Node", ".spec.nodeName"),
                ("Instance", ".spec.instanceId"),
                ("Phase", ".status.phase"),
                ("Replacement", ".status.replacementNode"),
                ("Age", ".metadata.creationTimestamp"),
            ]
        );
        assert_eq!(SpotReplacement::api_version(&()), "spot-rebalancer.io/v1alpha1");
    }

    #[test]
    fn a_record_is_named_by_its_instance_id_and_nothing_else() {
        assert_eq!(
            record_name("i-0abc1234def567890").as_deref(),
            Some("i-0abc1234def567890")
        );
        assert_eq!(record_name("i-12345678").as_deref(), Some("i-12345678"));
        for bad in [
            "",
            "i-",
            "i-0ABC12345",
            "i-0abc/../x",
            "node-1",
            "i-1234567",
            &format!("i-{}", "a".repeat(33)),
        ] {
            assert_eq!(record_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_history_gains_an_entry_only_when_the_phase_changes() {
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        let status = SpotReplacementStatus {
            phase: Phase::Detected,
            record: Replacement::new("spot".into(), None, at("2026-12-01T10:00:00Z")),
            seat: None,
            history: Vec::new(),
        };
        let status = status
            .entering(Phase::Detected, at("2026-12-01T10:00:00Z"))
            .entering(Phase::ScalingSpot, at("2026-12-01T10:00:01Z"))
            .entering(Phase::ScalingSpot, at("2026-12-01T10:00:02Z"));
        let phases: Vec<_> = status.history.iter().map(|c| c.phase).collect();
        assert_eq!(phases, [Phase::Detected, Phase::ScalingSpot]);
        assert_eq!(status.phase, Phase::ScalingSpot);
    }

    #[test]
    fn the_status_reads_flat_with_camel_case_keys() {
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        let mut record = Replacement::new("spot".into(), Some("od".into()), at("2026-12-01T10:00:00Z"));
        record.instance_id = Some("i-0new00000".into());
        record.node = Some("n9".into());
        let status = SpotReplacementStatus {
            phase: Phase::Tainted,
            record,
            seat: None,
            history: Vec::new(),
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["phase"], "Tainted");
        assert_eq!(json["spotAsg"], "spot");
        assert_eq!(json["replacementInstance"], "i-0new00000");
        assert_eq!(json["replacementNode"], "n9");
        let back: SpotReplacementStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }

    fn record(name: &str, node: &str, uid: &str, detected: &str) -> SpotReplacement {
        let mut record = SpotReplacement::new(
            name,
            SpotReplacementSpec {
                node_name: node.into(),
                node_uid: uid.into(),
                instance_id: name.into(),
            },
        );
        record.status = Some(SpotReplacementStatus {
            phase: Phase::Detected,
            record: Replacement::new("spot".into(), None, detected.parse().unwrap()),
            seat: None,
            history: Vec::new(),
        });
        record
    }

    #[test]
    fn a_nodes_record_is_the_one_with_its_uid_else_the_newest_with_its_name() {
        let records = [
            record("i-00000001", "n1", "uid-old", "2026-12-01T10:00:00Z"),
            record("i-00000002", "n1", "uid-new", "2026-12-01T11:00:00Z"),
            record("i-00000003", "n2", "uid-2", "2026-12-01T12:00:00Z"),
        ];
        let name = |found: Option<&SpotReplacement>| found.map(|r| r.metadata.name.clone().unwrap());
        assert_eq!(
            name(record_of(&records, "n1", Some("uid-old"))).as_deref(),
            Some("i-00000001")
        );
        assert_eq!(
            name(record_of(&records, "n1", None)).as_deref(),
            Some("i-00000002")
        );
        assert_eq!(name(record_of(&records, "n1", Some("uid-other"))), None);
        assert_eq!(name(record_of(&records, "n3", None)), None);
    }

    #[test]
    fn the_charts_crd_is_the_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CRD_MANIFEST_PATH);
        let expected = crd_manifest();
        if std::env::var_os("UPDATE_CRD").is_some() {
            std::fs::write(&path, &expected).unwrap();
        }
        let chart = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            chart == expected,
            "{} differs from SpotReplacement::crd(); regenerate it with \
             `UPDATE_CRD=1 cargo test --lib the_charts_crd_is_the_types`",
            path.display()
        );
    }
}
