//! The Kubernetes side of the agent: reads what its Node already says, then writes what IMDS has
//! shown whenever the two differ, retrying with backoff while the API server is away. What waits to
//! be written lives in memory here until a write succeeds: a notice is never lost, never written
//! twice.
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    Error,
    annotations::{AgentAnnotations, Observed, annotations_to_write},
    backoff,
    metrics::Metrics,
    node::OwnNode,
};
use crate::admin::Readiness;

pub struct Writer {
    pub node: OwnNode,
    pub interval: Duration,
    pub backoff_max: Duration,
    pub metrics: Metrics,
    pub readiness: Readiness,
}

impl Writer {
    /// Runs until `shutdown` is cancelled or the poller is gone.
    pub async fn run(self, mut seen: watch::Receiver<Option<Observed>>, shutdown: CancellationToken) {
        let Some(mut written) = self.read_node(&shutdown).await else {
            return;
        };
        while seen.borrow().is_none() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = seen.changed() => if changed.is_err() { return },
            }
        }
        self.readiness.set(true);
        tracing::info!("agent ready: instance id known, node read");

        let mut failures = 0u32;
        loop {
            let observed = seen.borrow_and_update().clone();
            let desired = observed
                .as_ref()
                .and_then(|observed| annotations_to_write(observed, &written, Timestamp::now()));
            if let Some(desired) = desired {
                self.metrics.annotation_write_pending.set(1);
                let applied = tokio::select! {
                    () = shutdown.cancelled() => return,
                    applied = self.node.apply(&desired) => applied,
                };
                match applied {
                    Ok(()) => {
                        self.metrics.annotation_writes.with_label_values(&["ok"]).inc();
                        tracing::info!(
                            annotations = ?desired.to_node(),
                            failed_attempts = failures,
                            "annotated the node"
                        );
                        written = desired;
                        failures = 0;
                    }
                    Err(error) => {
                        self.metrics.annotation_writes.with_label_values(&["error"]).inc();
                        failures = failures.saturating_add(1);
                        tracing::warn!(
                            %error,
                            consecutive_failures = failures,
                            "annotating the node failed; keeping the notice and retrying"
                        );
                        if !self.pause(failures, &shutdown).await {
                            return;
                        }
                    }
                }
                continue;
            }
            self.metrics.annotation_write_pending.set(0);
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = seen.changed() => if changed.is_err() { return },
            }
        }
    }

    /// The agent's annotations as the Node has them now, retried until the API server answers.
    async fn read_node(&self, shutdown: &CancellationToken) -> Option<AgentAnnotations> {
        let mut failures = 0u32;
        loop {
            let read = tokio::select! {
                () = shutdown.cancelled() => return None,
                read = self.node.annotations() => read,
            };
            match read {
                Ok(on_node) => {
                    let (annotations, unreadable) = AgentAnnotations::from_node(&on_node);
                    for bad in unreadable {
                        tracing::warn!(
                            key = bad.key,
                            offending_value = %bad.value,
                            reason = %bad.reason,
                            "ignoring an unreadable annotation on the node; the next notice rewrites it"
                        );
                    }
                    tracing::info!(annotations = ?annotations.to_node(), "read the node");
                    return Some(annotations);
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let hint = match &error {
                        Error::ReadNode {
                            source: kube::Error::Api(status),
                            ..
                        } if status.code == 404 => "; is --node-name (NODE_NAME) this node's name?",
                        _ => "",
                    };
                    tracing::warn!(%error, consecutive_failures = failures, "reading the node failed; retrying{hint}");
                }
            }
            if !self.pause(failures, shutdown).await {
                return None;
            }
        }
    }

    /// Waits out the backoff; `false` when shut down meanwhile.
    async fn pause(&self, failures: u32, shutdown: &CancellationToken) -> bool {
        let wait = backoff::jittered(self.interval, self.backoff_max, failures);
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }
}
