//! The project's one retry backoff: exponential with jitter, built on `backon` (the crate
//! kube-runtime's watchers already use). The agent's IMDS polls and Node writes, notification posts,
//! and the controller's reconcile requeues and evictions all wait the same way, so a fleet of
//! processes that lost a dependency together does not come back in step.
//!
//! The wait after the n-th consecutive failure is drawn from `[ceiling / 2, ceiling)`, where the
//! ceiling doubles from `first` with each failure up to `max` ("equal jitter"): never longer than
//! the ceiling, never shorter than half of it.
use std::time::Duration;

pub use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};

/// The builder for [`Backoff`] and for `backon`'s [`Retryable::retry`]: ceilings `first`, `2·first`,
/// … up to `max` (never below `first`), each wait drawn from the upper half of its ceiling, and no
/// limit on the number of attempts (add one with `.with_max_times(n)`).
pub fn exponential(first: Duration, max: Duration) -> ExponentialBuilder {
    // backon's jitter adds `[0, delay)` to the delay: with the delay at half the ceiling, the wait
    // lands in `[ceiling / 2, ceiling)`.
    ExponentialBuilder::default()
        .with_factor(2.0)
        .with_min_delay(first / 2)
        .with_max_delay(max.max(first) / 2)
        .with_jitter()
        .without_max_times()
}

/// The wait after the `failures`-th consecutive failure (the first counts as 1), for callers that
/// keep the count themselves: drawn as [`exponential`]`(first, max)` draws it.
pub fn nth_wait(first: Duration, max: Duration, failures: u32) -> Duration {
    // Past 32 doublings every ceiling is `max` anyway.
    let index = failures.clamp(1, 32) as usize - 1;
    exponential(first, max)
        .build()
        .nth(index)
        .unwrap_or(max.max(first))
}

/// A retry loop's state: the next wait after each consecutive failure, back to the start on success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    failures: u32,
}

impl Backoff {
    pub fn new(builder: ExponentialBuilder) -> Self {
        Backoff {
            delays: builder.build(),
            builder,
            failures: 0,
        }
    }

    /// Counts a failure and returns how long to wait before the next attempt (`None` once a
    /// builder's `with_max_times` is used up).
    pub fn failed(&mut self) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        self.delays.next()
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure waits the shortest time again.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            self.delays = self.builder.build();
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// The lowest and highest of many draws of the n-th wait.
    fn range_of_nth_wait(first: Duration, max: Duration, n: usize) -> (Duration, Duration) {
        let draws: Vec<Duration> = (0..400)
            .map(|_| exponential(first, max).build().nth(n - 1).unwrap())
            .collect();
        (*draws.iter().min().unwrap(), *draws.iter().max().unwrap())
    }

    #[test]
    fn each_wait_is_drawn_from_the_upper_half_of_a_doubling_ceiling() {
        for (n, ceiling) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 30), (9, 30)] {
            let ceiling = ceiling * SECOND;
            let (low, high) = range_of_nth_wait(SECOND, 30 * SECOND, n);
            assert!(
                low >= ceiling / 2,
                "failure {n}: {low:?} below half of {ceiling:?}"
            );
            assert!(high <= ceiling, "failure {n}: {high:?} above {ceiling:?}");
            assert!(
                high - low > ceiling / 4,
                "failure {n}: no jitter ({low:?}..{high:?})"
            );
        }
    }

    #[test]
    fn a_maximum_below_the_first_wait_never_waits_less_than_half_the_first() {
        let (low, high) = range_of_nth_wait(5 * SECOND, SECOND, 4);
        assert!(low >= 5 * SECOND / 2 && high <= 5 * SECOND, "{low:?}..{high:?}");
    }

    #[test]
    fn a_very_long_outage_stays_at_the_maximum() {
        let mut backoff = Backoff::new(exponential(SECOND, 30 * SECOND));
        let last = (0..10_000).map(|_| backoff.failed().unwrap()).last().unwrap();
        assert!((15 * SECOND..=30 * SECOND).contains(&last), "{last:?}");
        assert_eq!(backoff.failures(), 10_000);
    }

    #[test]
    fn the_nth_wait_is_drawn_like_the_nth_of_a_loop() {
        for (failures, ceiling) in [(0, 2), (1, 2), (2, 4), (4, 16), (5, 30), (u32::MAX, 30)] {
            let ceiling = ceiling * SECOND;
            for _ in 0..50 {
                let wait = nth_wait(2 * SECOND, 30 * SECOND, failures);
                assert!(
                    (ceiling / 2..=ceiling).contains(&wait),
                    "failure {failures}: {wait:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
        }
    }

    #[test]
    fn success_starts_the_ceiling_again_from_the_first_wait() {
        let mut backoff = Backoff::new(exponential(SECOND, 30 * SECOND));
        for _ in 0..6 {
            backoff.failed();
        }
        backoff.succeeded();
        assert_eq!(backoff.failures(), 0);
        assert!(backoff.failed().unwrap() <= SECOND);
    }

    #[test]
    fn a_bounded_backoff_ends_after_its_attempts() {
        let mut backoff = Backoff::new(exponential(SECOND, 30 * SECOND).with_max_times(3));
        assert_eq!(
            (0..5).map(|_| backoff.failed().is_some()).collect::<Vec<_>>(),
            [true, true, true, false, false]
        );
    }
}
