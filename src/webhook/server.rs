//! The admission routes: `POST /mutate` (the PDB guard) and `POST /validate` (the order guard). Each
//! review is parsed, judged from the caches and answered; a malformed, oversized or wrong-kind review
//! gets a 4xx with a message (and a log line), never a panic.
use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use jiff::Timestamp;
use kube::core::admission::AdmissionResponse;
use tracing::{info, warn};

use super::{
    Settings,
    cache::Caches,
    metrics::Metrics,
    order_guard,
    pdb_guard::{self, Decision},
    review::{self, NodeUpdate, Review},
};

/// Largest review body accepted. A review carries the Node twice (object and old object); real Nodes
/// are tens of KiB. A bigger body is answered 413 (and, with `failurePolicy: Ignore`, the update
/// goes through unguarded rather than blocked).
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;

/// Everything a review is judged with.
pub struct Webhook {
    pub settings: Settings,
    pub caches: Caches,
    pub metrics: Metrics,
}

/// Which guard a route runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Mutate,
    Validate,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Mutate => "mutate",
            Route::Validate => "validate",
        }
    }
}

/// The answer to one review: an HTTP status, a JSON body and the verdict counted in the metrics.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub verdict: &'static str,
}

impl Answer {
    fn review(response: AdmissionResponse, verdict: &'static str) -> Self {
        Answer::json(StatusCode::OK, &response.into_review(), verdict)
    }

    /// A client error: the message as an AdmissionReview whose response is `invalid`, so a human
    /// (or an API server log) sees why.
    fn refuse(status: StatusCode, message: &str, verdict: &'static str) -> Self {
        Answer::json(
            status,
            &AdmissionResponse::invalid(message).into_review(),
            verdict,
        )
    }

    fn json(status: StatusCode, value: &impl serde::Serialize, verdict: &'static str) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Answer {
                status,
                body,
                verdict,
            },
            Err(error) => Answer {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: format!("{{\"error\":\"encoding the answer: {error}\"}}").into_bytes(),
                verdict: "error",
            },
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body,
        )
            .into_response()
    }
}

/// The routes, without a socket, so tests drive them with `oneshot`.
pub fn router(webhook: Arc<Webhook>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(webhook)
}

async fn mutate(State(webhook): State<Arc<Webhook>>, body: Result<Bytes, BytesRejection>) -> Answer {
    handle(Route::Mutate, &webhook, body)
}

async fn validate(State(webhook): State<Arc<Webhook>>, body: Result<Bytes, BytesRejection>) -> Answer {
    handle(Route::Validate, &webhook, body)
}

fn handle(route: Route, webhook: &Webhook, body: Result<Bytes, BytesRejection>) -> Answer {
    let started = Instant::now();
    let answer = match body {
        Ok(body) => admit(route, &body, webhook, Timestamp::now()),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let message = format!(
                "the AdmissionReview is larger than {} MiB",
                MAX_REVIEW_BYTES >> 20
            );
            warn!(route = route.as_str(), "{message}");
            Answer::refuse(StatusCode::PAYLOAD_TOO_LARGE, &message, "too_large")
        }
        Err(rejection) => {
            let message = format!("reading the AdmissionReview: {}", rejection.body_text());
            warn!(route = route.as_str(), "{message}");
            Answer::refuse(rejection.status(), &message, "bad_request")
        }
    };
    webhook
        .metrics
        .review(route.as_str(), answer.verdict, started.elapsed());
    answer
}

/// Judges one review body: the whole webhook decision, from bytes to answer, with no I/O but the
/// caches' memory. `now` stamps a drain request.
pub fn admit(route: Route, body: &[u8], webhook: &Webhook, now: Timestamp) -> Answer {
    let update = match review::parse(body) {
        Ok(Review::Update(update)) => update,
        Ok(Review::Other(response)) => return Answer::review(*response, "allowed"),
        Err(error) => {
            warn!(route = route.as_str(), %error, "refusing a review");
            return Answer::refuse(StatusCode::BAD_REQUEST, &error.to_string(), "bad_request");
        }
    };
    if !webhook.settings.opt_in.matches(&update.new) {
        return Answer::review(update.allow(), "allowed");
    }
    match route {
        Route::Mutate => guard_pdbs(&update, webhook, now),
        Route::Validate => guard_order(&update, webhook),
    }
}

fn guard_pdbs(update: &NodeUpdate, webhook: &Webhook, now: Timestamp) -> Answer {
    let settings = &webhook.settings;
    if pdb_guard::guarded_additions(update, &settings.guarded).is_empty() {
        return Answer::review(update.allow(), "allowed");
    }
    let pods = webhook.caches.pods_on(update.name());
    let namespaces: BTreeSet<&str> = pods
        .iter()
        .filter_map(|pod| pod.metadata.namespace.as_deref())
        .collect();
    let pdbs = webhook.caches.pdbs_in(&namespaces);
    let pods: Vec<_> = pods.iter().map(Arc::as_ref).collect();
    let pdbs: Vec<_> = pdbs.iter().map(Arc::as_ref).collect();
    match pdb_guard::decide(update, &settings.guarded, &pods, &pdbs, now) {
        Decision::Allow => Answer::review(update.allow(), "allowed"),
        Decision::Soften {
            patch,
            warning,
            breaches,
        } => {
            info!(node = update.name(), user = update.username(), breaches = breaches.len(), %warning,
                  "NoExecute taint made NoSchedule");
            match update.allow().with_patch(patch) {
                Ok(mut response) => {
                    response.warnings = Some(vec![warning]);
                    Answer::review(response, "patched")
                }
                Err(error) => {
                    warn!(node = update.name(), %error, "cannot encode the patch; letting the update through");
                    Answer::review(update.allow(), "allowed")
                }
            }
        }
    }
}

fn guard_order(update: &NodeUpdate, webhook: &Webhook) -> Answer {
    let settings = &webhook.settings.order;
    match order_guard::decide(update, settings, |name| webhook.caches.node_is_ready(name)) {
        order_guard::Decision::Allow(_) => Answer::review(update.allow(), "allowed"),
        order_guard::Decision::Deny(message) => {
            info!(node = update.name(), user = update.username(), %message, "termination taint denied");
            let mut response = update.allow().deny(message);
            response.result.code = StatusCode::FORBIDDEN.as_u16();
            response.result.reason = "Forbidden".to_owned();
            Answer::review(response, "denied")
        }
    }
}

/// How long in-flight reviews get to finish on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
