//! The contract with the cluster, shared by every role without depending on any of them: the keys
//! spot-rebalancer reads and writes on Nodes ([`keys`]), the replacement record's types
//! ([`record`]) and the `SpotReplacement` custom resource that holds it ([`spot_replacement`]).
//!
//! Data flows one way: contract → the controller's pure machine → effects → flows → role wiring.
//! The webhook and `status` read the record through this module, never through `controller`.
pub mod keys;
pub mod record;
pub mod spot_replacement;

pub use spot_replacement::{
    PhaseChange, SpotReplacement, SpotReplacementSpec, SpotReplacementStatus, record_name, record_of,
};
