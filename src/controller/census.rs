//! How many opted-in nodes are in each phase, and how long ago the oldest of them was noticed:
//! gauges refreshed from the records of the Nodes still there, so "a node stuck in a phase" is an exact alert.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::context::Context;

/// How often the gauges are refreshed.
pub const EVERY: Duration = Duration::from_secs(10);

/// One phase's count and its oldest detection time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InPhase {
    pub nodes: i64,
    pub oldest: Timestamp,
}

/// Counts each phase among `(phase, detected_at)` pairs, keeping the oldest detection.
pub fn census(records: impl IntoIterator<Item = (String, Timestamp)>) -> BTreeMap<String, InPhase> {
    let mut phases: BTreeMap<String, InPhase> = BTreeMap::new();
    for (phase, detected_at) in records {
        phases
            .entry(phase)
            .and_modify(|seen| {
                seen.nodes += 1;
                seen.oldest = seen.oldest.min(detected_at);
            })
            .or_insert(InPhase {
                nodes: 1,
                oldest: detected_at,
            });
    }
    phases
}

/// Refreshes the gauges every [`EVERY`] until `stop`.
pub async fn keep_counting(ctx: Arc<Context>, stop: CancellationToken) {
    loop {
        refresh(&ctx);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

fn refresh(ctx: &Context) {
    // Seats held: every open seat (also of a Node that is gone), by the ASG that holds the +1.
    ctx.metrics.seats_held.reset();
    for seat in ctx.seats().iter().filter(|seat| seat.state.is_open()) {
        ctx.metrics
            .seats_held
            .with_label_values(&[seat.scaled_asg.as_str()])
            .inc();
    }
    let records = ctx
        .records()
        .into_values()
        .map(|(phase, record)| (phase.to_string(), record.detected_at));
    let phases = census(records);
    let now = Timestamp::now();
    ctx.metrics.nodes_in_phase.reset();
    ctx.metrics.oldest_in_phase_seconds.reset();
    for (phase, seen) in phases {
        ctx.metrics
            .nodes_in_phase
            .with_label_values(&[phase.as_str()])
            .set(seen.nodes);
        ctx.metrics
            .oldest_in_phase_seconds
            .with_label_values(&[phase.as_str()])
            .set(now.duration_since(seen.oldest).as_secs_f64().max(0.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn counts_each_phase_and_keeps_its_oldest_notice() {
        let phases = census([
            ("AwaitingReady".to_owned(), at("2026-11-25T10:05:00Z")),
            ("Tainted".to_owned(), at("2026-11-25T09:00:00Z")),
            ("AwaitingReady".to_owned(), at("2026-11-25T10:01:00Z")),
        ]);
        assert_eq!(
            phases["AwaitingReady"],
            InPhase {
                nodes: 2,
                oldest: at("2026-11-25T10:01:00Z")
            }
        );
        assert_eq!(phases["Tainted"].nodes, 1);
        assert_eq!(phases.len(), 2);
    }

    #[test]
    fn no_records_no_phases() {
        assert!(census([]).is_empty());
    }
}
