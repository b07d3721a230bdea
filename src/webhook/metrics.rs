//! The webhook's metrics: admission reviews by route and verdict, their latency, the bodies being
//! received, certificate reloads.
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    reviews: IntCounterVec,
    latency: HistogramVec,
    receiving: IntGauge,
    tls_reloads: IntCounterVec,
}

/// One request counted in `admission_bodies_receiving` until dropped.
pub struct Receiving(IntGauge);

impl Drop for Receiving {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Registers the webhook's metrics (prefixed `spot_rebalancer_` by the registry).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reviews = IntCounterVec::new(
            Opts::new(
                "admission_reviews_total",
                "Admission reviews answered, by route and verdict (allowed, patched, denied, left_to_order_guard, bad_request, too_large, timed_out, shed).",
            ),
            &["route", "verdict"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "admission_review_duration_seconds",
                "Time from receiving an admission review's body to the answer, by route.",
            )
            .buckets(vec![
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["route"],
        )?;
        let receiving = IntGauge::new(
            "admission_bodies_receiving",
            "Admission requests whose body is still being received (slow or half-sent clients among them).",
        )?;
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "webhook_tls_reloads_total",
                "Serving certificate reloads after the files changed, by result (ok, error).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reviews.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(receiving.clone()))?;
        registry.register(Box::new(tls_reloads.clone()))?;
        Ok(Metrics {
            reviews,
            latency,
            receiving,
            tls_reloads,
        })
    }

    /// Metrics registered nowhere, for tests, fuzzing and benchmarks.
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry accepts the webhook's metrics")
    }

    pub fn review(&self, route: &str, verdict: &str, elapsed: Duration) {
        self.reviews.with_label_values(&[route, verdict]).inc();
        self.latency
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a request refused before any guard judged it (too large, too slow, shed); its time is
    /// not a review's latency.
    pub fn refused(&self, route: &str, verdict: &str) {
        self.reviews.with_label_values(&[route, verdict]).inc();
    }

    /// Counts a request whose body is being received, until the returned guard is dropped.
    pub fn receiving(&self) -> Receiving {
        self.receiving.inc();
        Receiving(self.receiving.clone())
    }

    pub fn tls_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.tls_reloads.with_label_values(&[result]).inc();
    }
}
