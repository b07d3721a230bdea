//! The IMDS side of the agent: learns the instance id once, then reads both notice documents every
//! poll interval, backs off while IMDS fails, and publishes what it has seen to the writer.
use std::{collections::HashMap, time::Duration};

use tokio::{
    sync::watch,
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;

use super::{annotations::Observed, metrics};
use crate::{
    backoff::{self, Backoff},
    imds::{self, Imds},
};

pub struct Poller {
    pub imds: Imds,
    pub interval: Duration,
    pub backoff_max: Duration,
    pub metrics: metrics::Metrics,
    /// `None` until the instance id is known.
    pub seen: watch::Sender<Option<Observed>>,
}

/// What one poll read. A malformed body means IMDS answered: it is not a reason to back off.
struct PollOutcome {
    /// Both documents were read and understood (present or 404).
    clean: bool,
    /// IMDS could not be read at all: back off.
    unavailable: bool,
}

impl Poller {
    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut log = ErrorLog::default();
        let Some(instance_id) = self.learn_instance_id(&mut log, &shutdown).await else {
            return;
        };
        self.seen.send_replace(Some(Observed::new(instance_id)));

        let mut backoff = Backoff::new(backoff::exponential(self.interval, self.backoff_max));
        let mut next = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = sleep_until(next) => {}
            }
            let started = Instant::now();
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.poll_once(&mut log, backoff.failures()) => outcome,
            };
            if outcome.clean {
                self.metrics
                    .last_successful_poll
                    .set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
            }
            // Measured from the start of this poll, so polls keep a steady cadence.
            let wait = if outcome.unavailable {
                backoff.failed().unwrap_or(self.backoff_max)
            } else {
                if backoff.failures() > 0 {
                    tracing::info!(failed_polls = backoff.failures(), "IMDS answers again");
                }
                backoff.succeeded();
                self.interval
            };
            next = started + wait;
        }
    }

    async fn learn_instance_id(
        &mut self,
        log: &mut ErrorLog,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let mut backoff = Backoff::new(backoff::exponential(self.interval, self.backoff_max));
        loop {
            let read = tokio::select! {
                () = shutdown.cancelled() => return None,
                read = self.imds.instance_id() => read,
            };
            let wait = match read {
                Ok(instance_id) => {
                    tracing::info!(%instance_id, "learned the instance id from IMDS");
                    return Some(instance_id);
                }
                Err(error) => {
                    let wait = backoff.failed().unwrap_or(self.backoff_max);
                    self.record(log, &error, backoff.failures());
                    if error.needs_new_session() {
                        self.imds.renew_session();
                    }
                    wait
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn poll_once(&mut self, log: &mut ErrorLog, failures: u32) -> PollOutcome {
        self.metrics.polls.inc();
        let (rebalance, interruption) =
            tokio::join!(self.imds.rebalance_recommendation(), self.imds.instance_action());
        let mut outcome = PollOutcome {
            clean: true,
            unavailable: false,
        };

        let mut renew = false;
        for error in [rebalance.as_ref().err(), interruption.as_ref().err()]
            .into_iter()
            .flatten()
        {
            outcome.clean = false;
            outcome.unavailable |= !error.is_malformed();
            renew |= error.needs_new_session();
            self.record(log, error, failures + 1);
        }
        if renew {
            tracing::info!("renewing the IMDS session token");
            self.imds.renew_session();
        }
        if rebalance.is_ok() {
            log.forget_malformed(imds::REBALANCE_PATH);
        }
        if interruption.is_ok() {
            log.forget_malformed(imds::INSTANCE_ACTION_PATH);
        }

        let metrics = &self.metrics;
        self.seen.send_if_modified(|seen| {
            let Some(seen) = seen.as_mut() else {
                return false;
            };
            let mut changed = false;
            // The first recommendation is the one: some IMDS proxies and mocks move `noticeTime`
            // at every poll, and a moving time is not a new notice (see `annotations_to_write`).
            if let Ok(Some(notice)) = rebalance
                && seen.rebalance.is_none()
            {
                tracing::info!(notice_time = %notice.notice_time, "rebalance recommendation seen at IMDS");
                metrics.notices.with_label_values(&[metrics::REBALANCE]).inc();
                seen.rebalance = Some(notice);
                changed = true;
            }
            if let Ok(Some(notice)) = interruption
                && seen.interruption != Some(notice)
            {
                tracing::info!(action = %notice.action, time = %notice.time, "spot interruption notice seen at IMDS");
                metrics.notices.with_label_values(&[metrics::INTERRUPTION]).inc();
                seen.interruption = Some(notice);
                changed = true;
            }
            changed
        });
        outcome
    }

    fn record(&self, log: &mut ErrorLog, error: &imds::Error, consecutive_failures: u32) {
        self.metrics.imds_errors.with_label_values(&[error.kind()]).inc();
        match error {
            imds::Error::Malformed { path, source } => {
                // The same bad body every poll is logged once, not every few seconds.
                if log.first_time_malformed(path, &source.body) {
                    tracing::warn!(%error, offending_value = %source.body, "ignoring a malformed IMDS document");
                } else {
                    tracing::debug!(%error, "ignoring a malformed IMDS document (again)");
                }
            }
            _ => tracing::warn!(
                %error,
                kind = error.kind(),
                consecutive_failures,
                "IMDS read failed; backing off"
            ),
        }
    }
}

/// The last malformed body logged per document.
#[derive(Default)]
struct ErrorLog {
    malformed: HashMap<&'static str, String>,
}

impl ErrorLog {
    fn first_time_malformed(&mut self, path: &'static str, body: &str) -> bool {
        if self.malformed.get(path).is_some_and(|last| last == body) {
            return false;
        }
        self.malformed.insert(path, body.to_owned());
        true
    }

    fn forget_malformed(&mut self, path: &'static str) {
        self.malformed.remove(path);
    }
}
