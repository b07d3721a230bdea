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
    metrics::Metrics,
    node::OwnNode,
};
use crate::{
    admin::Readiness,
    backoff::{self, Backoff},
};

pub struct Writer {
    pub node: OwnNode,
    pub interval: Duration,
    pub backoff_max: Duration,
    /// How often to touch the API server while idle (`None`: never); see `--api-keepalive`.
    pub keepalive: Option<Duration>,
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

        let mut backoff = self.backoff();
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
                            failed_attempts = backoff.failures(),
                            "annotated the node"
                        );
                        written = desired;
                        backoff.succeeded();
                    }
                    Err(error) => {
                        self.metrics.annotation_writes.with_label_values(&["error"]).inc();
                        let wait = backoff.failed();
                        tracing::warn!(
                            %error,
                            consecutive_failures = backoff.failures(),
                            "annotating the node failed; keeping the notice and retrying"
                        );
                        if !self.pause(wait, &shutdown).await {
                            return;
                        }
                    }
                }
                continue;
            }
            self.metrics.annotation_write_pending.set(0);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = seen.changed() => if changed.is_err() { return } else { break },
                    () = sleep_or_never(self.keepalive) => {
                        if let Err(error) = self.node.keep_connection_warm().await {
                            tracing::debug!(%error, "keeping the API connection warm failed");
                        }
                    }
                }
            }
        }
    }

    /// The agent's annotations as the Node has them now, retried until the API server answers.
    async fn read_node(&self, shutdown: &CancellationToken) -> Option<AgentAnnotations> {
        let mut backoff = self.backoff();
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
                    let hint = match &error {
                        Error::ReadNode {
                            source: kube::Error::Api(status),
                            ..
                        } if status.code == 404 => "; is --node-name (NODE_NAME) this node's name?",
                        _ => "",
                    };
                    let wait = backoff.failed();
                    tracing::warn!(%error, consecutive_failures = backoff.failures(), "reading the node failed; retrying{hint}");
                    if !self.pause(wait, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(backoff::exponential(self.interval, self.backoff_max))
    }

    /// Waits out one backoff step; `false` when shut down meanwhile.
    async fn pause(&self, wait: Option<Duration>, shutdown: &CancellationToken) -> bool {
        let wait = wait.unwrap_or(self.backoff_max);
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }
}

/// Sleeps for `wait`, or for ever when there is none.
async fn sleep_or_never(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}
