//! Exponential backoff with jitter for the agent's two retry loops (IMDS polls, Node writes).
use std::time::Duration;

/// How long to wait before the next attempt after `failures` consecutive failures.
///
/// No failure: `interval`. Then the ceiling doubles from `interval` with each failure, up to `max`,
/// and the wait is drawn from the upper half of it ("equal jitter", `unit_random` in `[0, 1)`), so
/// many agents that lost IMDS or the API server together do not come back in step, and a single
/// failure is retried no later than the regular poll would have been.
pub fn delay(interval: Duration, max: Duration, failures: u32, unit_random: f64) -> Duration {
    if failures == 0 {
        return interval;
    }
    let doublings = (failures - 1).min(20);
    let ceiling = interval.saturating_mul(1 << doublings).min(max.max(interval));
    ceiling.mul_f64(0.5 + 0.5 * unit_random.clamp(0.0, 1.0))
}

/// [`delay`] with a fresh random draw.
pub fn jittered(interval: Duration, max: Duration, failures: u32) -> Duration {
    delay(interval, max, failures, fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn without_failures_the_regular_interval_applies() {
        assert_eq!(delay(5 * SECOND, 30 * SECOND, 0, 0.7), 5 * SECOND);
    }

    #[test]
    fn the_ceiling_doubles_with_each_failure_up_to_the_maximum() {
        let ceilings: Vec<Duration> = (1..=7).map(|n| delay(SECOND, 30 * SECOND, n, 1.0)).collect();
        let expected = [1, 2, 4, 8, 16, 30, 30].map(|s| s * SECOND);
        assert_eq!(ceilings, expected);
    }

    #[test]
    fn jitter_draws_from_the_upper_half_of_the_ceiling() {
        assert_eq!(delay(SECOND, 30 * SECOND, 3, 0.0), 2 * SECOND);
        assert_eq!(delay(SECOND, 30 * SECOND, 3, 0.5), 3 * SECOND);
        for _ in 0..1000 {
            let wait = jittered(SECOND, 30 * SECOND, 3);
            assert!((2 * SECOND..=4 * SECOND).contains(&wait), "{wait:?}");
        }
    }

    #[test]
    fn a_very_long_outage_does_not_overflow() {
        assert_eq!(delay(SECOND, 30 * SECOND, u32::MAX, 1.0), 30 * SECOND);
    }

    #[test]
    fn a_maximum_below_the_interval_never_polls_faster_than_the_interval() {
        assert_eq!(delay(5 * SECOND, SECOND, 4, 1.0), 5 * SECOND);
    }
}
