//! The replacement record's parts: what the controller decides from for one noticed instance. It is
//! held in the status of that instance's `SpotReplacement` (see [`super::spot_replacement`]), which
//! only the controller can write, so a restarted controller (or a new leader) resumes exactly where
//! the last one stopped and a node cannot forge it.
use jiff::Timestamp;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Where a noticed node is in the replacement state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// A notice was seen; the node's ASGs are known.
    Detected,
    /// The spot ASG was asked for one more instance.
    ScalingSpot,
    /// Spot capacity is gone; the on-demand fallback ASG was asked for one more instance.
    ScalingOnDemand,
    /// A new instance was claimed as this node's replacement; waiting for its Node to be Ready.
    AwaitingReady,
    /// The replacement is Ready (or an interruption notice came) and the node is tainted.
    Tainted,
    /// Evicting the node's pods through the Eviction API, at the pace its PDBs allow.
    Draining,
    /// Drained, and its instance removed from its ASG with the desired capacity decremented.
    Retired,
    /// Drained; no replacement of ours to retire it for, so the instance is left to its owner.
    Drained,
    /// No replacement could be had; the node is left untainted.
    Failed,
    /// The node is not in any ASG; nothing to do.
    Skipped,
}

/// Shown by its variant name, as on the Node.
impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::str::FromStr for Phase {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(text.to_owned()))
            .map_err(|_| format!("unknown phase {text:?}"))
    }
}

/// The phase of a scale-up of this capacity type.
impl From<CapacityType> for Phase {
    fn from(capacity_type: CapacityType) -> Phase {
        match capacity_type {
            CapacityType::Spot => Phase::ScalingSpot,
            CapacityType::OnDemand => Phase::ScalingOnDemand,
        }
    }
}

impl Phase {
    /// Waiting for a new instance of the ASG it scaled.
    pub fn is_scaling(self) -> bool {
        matches!(self, Phase::ScalingSpot | Phase::ScalingOnDemand)
    }

    /// This node's +1 is (or is on its way to being) in its ASG: scaling, claimed, tainted or draining.
    pub fn holds_a_scale_up(self) -> bool {
        matches!(
            self,
            Phase::ScalingSpot
                | Phase::ScalingOnDemand
                | Phase::AwaitingReady
                | Phase::Tainted
                | Phase::Draining
        )
    }

    /// The node was tainted by the state machine (its replacement Ready) and is on its way out.
    pub fn is_tainted(self) -> bool {
        matches!(
            self,
            Phase::Tainted | Phase::Draining | Phase::Retired | Phase::Drained
        )
    }

    /// Nothing more happens to the node: its scale-up no longer counts in a coalesced group.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Retired | Phase::Drained)
    }
}

/// What started a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DrainTrigger {
    /// The webhook made a NoExecute taint NoSchedule and asked for a PDB-paced drain.
    Requested,
    /// A spot interruption notice: the instance goes in about two minutes.
    Interruption,
    /// The node was tainted with its replacement Ready and `--after-replacement` is `retire` (the
    /// default). The serialized name predates the flag and stays, so existing records still parse.
    AfterTaint,
}

/// A drain in progress (or done) on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Drain {
    pub trigger: DrainTrigger,
    #[schemars(with = "String")]
    pub started_at: Timestamp,
    /// Set once `--drain-timeout` passed with pods left (the Warning Event was sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub timed_out_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub completed_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    Spot,
    OnDemand,
}

/// One scale-up this node asked of an ASG: the intent, written before the AWS call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleIntent {
    pub asg: String,
    pub capacity_type: CapacityType,
    /// The ASG's desired capacity before this group of coalesced scale-ups began.
    pub baseline: i32,
    /// The desired capacity this node's scale-up aims for (baseline + members of its group).
    pub target_desired: i32,
    /// Instances in the ASG before the scale-up: none of them can be the replacement.
    pub pre_scale_instances: Vec<String>,
    #[schemars(with = "String")]
    pub scale_requested_at: Timestamp,
    /// The scaling activities AWS reported for the launches this request caused (matched by time
    /// and cause), so a capacity failure is judged on them only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activity_ids: Vec<String>,
}

/// A scale-up given up (spot capacity gone, or everything failed) and how its +1 was undone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Abandoned {
    #[serde(flatten)]
    pub scale: ScaleIntent,
    pub undo: Undo,
    /// Set once the undo was carried out (or found unnecessary).
    pub undone: bool,
    /// Why the scale-up was given up.
    #[serde(default)]
    pub cause: AbandonCause,
}

/// Why a scale-up was given up: what decides whether the next attempt stays on spot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AbandonCause {
    /// A launch it caused failed for capacity, or nothing launched within `--capacity-timeout`.
    #[default]
    Capacity,
    /// The ASG is at its MaxSize (and surging above it is off): nothing was raised.
    MaxSize,
    /// The scale-up call kept failing (access denied, a validation error, a missing ASG, throttling)
    /// for `--capacity-timeout`.
    CallFailing,
    /// The claimed replacement had no Ready Node within `--replacement-ready-timeout`; it was
    /// released (terminated with a decrement: it was ours and ran no pods).
    NeverReady,
}

/// How an abandoned +1 is taken back without ever letting the ASG pick a busy instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Undo {
    /// Lower desired capacity from `from` to `to`: only while no instance beyond `to` exists.
    Lower { from: i32, to: i32 },
    /// Remove this specific (new, unclaimed) instance and decrement desired capacity with it.
    Terminate { instance: String },
    /// Nothing to take back (another actor changed the ASG since); say so and leave it.
    Leave { reason: String },
}

/// Everything the controller knows about one noticed node's replacement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replacement {
    pub spot_asg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_asg: Option<String>,
    #[schemars(with = "String")]
    pub detected_at: Timestamp,
    /// The scale-up in progress (or done), flattened so `asg`, `targetDesired`, … read at the top.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleIntent>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub abandoned: Vec<Abandoned>,
    /// The claimed replacement instance and its Node.
    #[serde(
        default,
        rename = "replacementInstance",
        skip_serializing_if = "Option::is_none"
    )]
    pub instance_id: Option<String>,
    #[serde(default, rename = "replacementNode", skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub claimed_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub ready_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub tainted_at: Option<Timestamp>,
    /// Since when a foreign scaling activity has held this node's scale-up back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub waiting_since: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The ASG the noticed instance itself belongs to (its seat), as DescribeAutoScalingInstances said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_asg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub retired_at: Option<Timestamp>,
    /// When the Warning that the claimed replacement is not Ready went out (once per claim, also
    /// across restarts and leader changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub not_ready_warned_at: Option<Timestamp>,
    /// When the current attempt began, if it is not the first: a `Failed` node tried again after a
    /// new notice. Scale-ups given up before it no longer decide the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub attempt_started_at: Option<Timestamp>,
    /// Since when the scale-up call of the current intent has been failing, and its last error (the
    /// controller's log has the whole text; this is what decides the give-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub failing_since: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Replacement {
    pub fn new(spot_asg: String, on_demand_asg: Option<String>, now: Timestamp) -> Self {
        Replacement {
            spot_asg,
            on_demand_asg,
            detected_at: now,
            scale: None,
            abandoned: Vec::new(),
            instance_id: None,
            node: None,
            claimed_at: None,
            ready_at: None,
            tainted_at: None,
            waiting_since: None,
            reason: None,
            instance_asg: None,
            drain: None,
            retired_at: None,
            not_ready_warned_at: None,
            attempt_started_at: None,
            failing_since: None,
            last_error: None,
        }
    }
}

/// The seat of one noticed instance: what this controller added for it and what it did about that
/// +1 since. It lives in the instance's record, which outlives the Node (see
/// [`super::spot_replacement`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Seat {
    /// The noticed Node and its instance.
    pub node: String,
    pub instance: String,
    /// The ASG the instance is in (its seat).
    pub instance_asg: String,
    /// That ASG's desired capacity and members before the notice, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seat_baseline: Option<i32>,
    #[serde(default)]
    pub seat_instances: Vec<String>,
    /// The ASG that holds this node's +1 (the seat's ASG, or the on-demand fallback).
    pub scaled_asg: String,
    /// The claimed replacement instance, never a candidate for removal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed: Option<String>,
    pub state: SeatState,
    #[schemars(with = "String")]
    pub updated_at: Timestamp,
}

/// Where a seat's +1 stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum SeatState {
    /// The +1 is in place (or being asked for); the old instance still has its seat.
    Active,
    /// The +1 was taken back by the replacement flow itself (no capacity): nothing to restore.
    Withdrawn,
    /// About to remove the drained instance with a decrement; the desired capacity seen just before.
    #[serde(rename_all = "camelCase")]
    Retiring { desired_before: i32 },
    /// The drained instance was removed with a decrement: capacity is back.
    Retired,
    /// The instance went without us; this is how its seat is being given back (intent before action).
    Restoring { undo: Undo },
    /// Done: the seat was given back (or left alone, with the reason in the undo).
    Restored { undo: Undo },
}

impl SeatState {
    /// Something is still to be done for this seat.
    pub fn is_open(&self) -> bool {
        matches!(
            self,
            SeatState::Active | SeatState::Retiring { .. } | SeatState::Restoring { .. }
        )
    }
}

/// An undo as one flat object (`kind` and the fields of that kind): the API server's structural
/// schemas take no tagged unions.
impl JsonSchema for Undo {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Undo".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "required": ["kind"],
            "properties": {
                "kind": {"type": "string", "enum": ["lower", "terminate", "leave"]},
                "from": {"type": "integer", "format": "int32"},
                "to": {"type": "integer", "format": "int32"},
                "instance": {"type": "string"},
                "reason": {"type": "string"}
            }
        })
    }
}

/// A seat's state as one flat object, like [`Undo`].
impl JsonSchema for SeatState {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SeatState".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let undo = Undo::json_schema(generator);
        json_schema!({
            "type": "object",
            "required": ["kind"],
            "properties": {
                "kind": {
                    "type": "string",
                    "enum": ["active", "withdrawn", "retiring", "retired", "restoring", "restored"]
                },
                "desiredBefore": {"type": "integer", "format": "int32"},
                "undo": undo
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn record_reads_flat_with_camel_case_keys() {
        let mut record = Replacement::new("spot".into(), Some("od".into()), at("2026-11-25T10:00:00Z"));
        record.scale = Some(ScaleIntent {
            asg: "spot".into(),
            capacity_type: CapacityType::Spot,
            baseline: 3,
            target_desired: 4,
            pre_scale_instances: vec!["i-1".into()],
            scale_requested_at: at("2026-11-25T10:00:01Z"),
            activity_ids: Vec::new(),
        });
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["asg"], "spot");
        assert_eq!(json["capacityType"], "spot");
        assert_eq!(json["targetDesired"], 4);
        assert_eq!(json["onDemandAsg"], "od");
        assert_eq!(json["preScaleInstances"][0], "i-1");
        let back: Replacement = serde_json::from_value(json).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn a_record_without_a_scale_up_has_none() {
        let record = Replacement::new("spot".into(), None, at("2026-11-25T10:00:00Z"));
        let back: Replacement = serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        assert_eq!(back.scale, None);
    }

    #[test]
    fn undos_and_seat_states_serialize_as_their_flat_schemas_say() {
        let undo = serde_json::to_value(Undo::Lower { from: 4, to: 3 }).unwrap();
        assert_eq!(undo, serde_json::json!({"kind": "lower", "from": 4, "to": 3}));
        let state = serde_json::to_value(SeatState::Retiring { desired_before: 4 }).unwrap();
        assert_eq!(state, serde_json::json!({"kind": "retiring", "desiredBefore": 4}));
        let state = serde_json::to_value(SeatState::Restored {
            undo: Undo::Terminate {
                instance: "i-1".into(),
            },
        })
        .unwrap();
        assert_eq!(state["undo"]["instance"], "i-1");
    }

    #[test]
    fn phases_parse_by_name() {
        assert_eq!("ScalingOnDemand".parse::<Phase>(), Ok(Phase::ScalingOnDemand));
        assert_eq!(Phase::AwaitingReady.to_string(), "AwaitingReady");
        assert!("Sleeping".parse::<Phase>().is_err());
    }
}
