//! The agent's metrics (prefixed `spot_rebalancer_` by the admin registry): one per outcome, so a
//! dashboard shows whether IMDS is read, what it said, and whether the Node was told. Every name
//! starts `agent_`: no name means one thing on an agent and another on the controller.
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::imds;

/// Notice kinds, the `kind` label of `agent_notices_total`.
pub const REBALANCE: &str = "rebalance";
pub const INTERRUPTION: &str = "interruption";

#[derive(Clone)]
pub struct Metrics {
    /// IMDS polls attempted (one poll reads both notice documents).
    pub polls: IntCounter,
    /// New notices seen at IMDS, by kind; a notice seen again is not counted again.
    pub notices: IntCounterVec,
    /// Failed IMDS reads, by kind (see `imds::Error::kind`).
    pub imds_errors: IntCounterVec,
    /// Unix time of the last poll that read both documents.
    pub last_successful_poll: Gauge,
    /// Server-side applies of the agent's annotations to its Node, by result (`ok`, `error`).
    pub annotation_writes: IntCounterVec,
    /// 1 while IMDS has shown something the Node does not say yet.
    pub annotation_write_pending: IntGauge,
}

impl Metrics {
    /// Registers the agent's metrics; at start-up, on a fresh registry.
    pub fn register(registry: &Registry) -> Self {
        let metrics = Metrics {
            polls: IntCounter::new("agent_polls_total", "IMDS polls attempted").expect("valid metric"),
            notices: IntCounterVec::new(
                Opts::new("agent_notices_total", "New notices seen at IMDS, by kind"),
                &["kind"],
            )
            .expect("valid metric"),
            imds_errors: IntCounterVec::new(
                Opts::new("agent_imds_errors_total", "Failed IMDS reads, by kind"),
                &["kind"],
            )
            .expect("valid metric"),
            last_successful_poll: Gauge::new(
                "agent_last_successful_poll_timestamp_seconds",
                "Unix time of the last IMDS poll that read every notice document",
            )
            .expect("valid metric"),
            annotation_writes: IntCounterVec::new(
                Opts::new(
                    "agent_annotation_writes_total",
                    "Server-side applies of the agent's annotations to its Node, by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
            annotation_write_pending: IntGauge::new(
                "agent_annotation_write_pending",
                "1 while a notice seen at IMDS is not yet on the Node",
            )
            .expect("valid metric"),
        };
        // Every label value exists from the start, so rates and alerts see zeroes, not gaps.
        for kind in [REBALANCE, INTERRUPTION] {
            metrics.notices.with_label_values(&[kind]);
        }
        for kind in imds::Error::KINDS {
            metrics.imds_errors.with_label_values(&[kind]);
        }
        for result in ["ok", "error"] {
            metrics.annotation_writes.with_label_values(&[result]);
        }
        for collector in [
            Box::new(metrics.polls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.notices.clone()),
            Box::new(metrics.imds_errors.clone()),
            Box::new(metrics.last_successful_poll.clone()),
            Box::new(metrics.annotation_writes.clone()),
            Box::new(metrics.annotation_write_pending.clone()),
        ] {
            registry.register(collector).expect("agent metrics register once");
        }
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    #[test]
    fn every_label_shows_zero_before_anything_happens() {
        let registry = crate::admin::registry(crate::admin::AGENT);
        Metrics::register(&registry);
        let mut text = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            "spot_rebalancer_agent_polls_total 0",
            "spot_rebalancer_agent_notices_total{kind=\"rebalance\"} 0",
            "spot_rebalancer_agent_imds_errors_total{kind=\"timeout\"} 0",
            "spot_rebalancer_agent_annotation_writes_total{result=\"ok\"} 0",
            "spot_rebalancer_agent_last_successful_poll_timestamp_seconds 0",
            "spot_rebalancer_agent_annotation_write_pending 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
