//! The admission routes: `POST /mutate` (the PDB guard) and `POST /validate` (the order guard). Each
//! review is received whole ([`super::receive`]), parsed once, judged from the caches and answered; a
//! malformed, oversized, slow or wrong-kind review gets a 4xx with a message, never a panic.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    BoxError, Router,
    body::{Body, Bytes},
    error_handling::HandleErrorLayer,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use jiff::Timestamp;
use kube::core::admission::AdmissionResponse;
use tower::{ServiceBuilder, limit::GlobalConcurrencyLimitLayer, load_shed::error::Overloaded};
use tracing::{debug, info, warn};

use super::{
    Settings,
    cache::Caches,
    metrics::Metrics,
    order_guard,
    pdb_guard::{self, Decision},
    receive::{Limits, Receiver, Refusal},
    review::{self, NodeUpdate, Review},
};

/// Largest review body accepted. A review carries the Node twice (object and old object). A large
/// real Node (50 images, 39 attached volumes, 60 labels, 20 long annotations, five managers' fields)
/// makes a review of about 90 KiB (`large_node_review` in the tests, printed by
/// `scripts/bench-webhook`); this leaves five times that. A bigger body is answered 413 after reading
/// at most this much, or at once when its Content-Length says so (and, with `failurePolicy: Ignore`,
/// the update goes through unguarded rather than blocked).
pub const MAX_REVIEW_BYTES: usize = 512 * 1024;

/// Longest time from a request's headers to the last byte of its body. The API server sends a review
/// at once and waits `timeoutSeconds` (2 s in the chart, at most 30) for the answer; a client still
/// sending after this is answered 408 and its connection closed. While it sends, it holds its
/// connection and the bytes it sent, no decision slot.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of request bodies held at once, from their first byte until they are answered, across all
/// connections: the bound on the memory of bodies in flight, whatever the number of connections. A
/// body that would need more is answered 503 at once (shed). 64 bodies at the limit, or about 350 of
/// the largest realistic review; a half-sent body holds only what it sent. The chart's memory limit
/// is 256 MiB.
pub const MAX_BODY_BYTES_IN_FLIGHT: usize = 32 << 20;

/// Reviews judged at once; one more is answered 503 at once (shed) instead of queueing. A request
/// takes a slot only once its body is in memory, so slow clients never hold one; judging reads
/// only the caches' memory and does not wait, so a slot is held for well under a millisecond.
pub const MAX_CONCURRENT_DECISIONS: usize = 64;

/// Longest wait for a request's headers, on a new connection and between requests on a kept-alive
/// one: slow and idle connections are closed after this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How request bodies are received (see [`Receiver`]).
pub const BODY_LIMITS: Limits = Limits {
    max_bytes: MAX_REVIEW_BYTES,
    timeout: BODY_READ_TIMEOUT,
    budget_bytes: MAX_BODY_BYTES_IN_FLIGHT,
};

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
    /// The route served at `path`, if any.
    pub fn from_path(path: &str) -> Option<Route> {
        match path {
            "/mutate" => Some(Route::Mutate),
            "/validate" => Some(Route::Validate),
            _ => None,
        }
    }

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

/// The routes, without a socket, so tests drive them with `oneshot`. Each request first receives its
/// whole body (size, time and memory limits, no slot held), then takes one of the decision slots
/// (shed when all are taken), then is judged.
pub fn router(webhook: Arc<Webhook>) -> Router {
    let receiving = Arc::new(Receiving {
        receiver: Receiver::new(BODY_LIMITS),
        metrics: webhook.metrics.clone(),
    });
    let metrics = webhook.metrics.clone();
    let deciding = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(move |error: BoxError| {
            let answer = refused_by_a_limit(&error);
            metrics.refused("any", answer.verdict);
            async move { answer }
        }))
        .load_shed()
        // One limit for both routes (`concurrency_limit` would give each route its own).
        .layer(GlobalConcurrencyLimitLayer::new(MAX_CONCURRENT_DECISIONS));
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        // Route layers: only requests to the two routes, the last one added runs first.
        .route_layer(deciding)
        .route_layer(middleware::from_fn_with_state(receiving, receive_whole_body))
        .with_state(webhook)
}

/// The receiving stage of the routes: one [`Receiver`] (and its byte budget) for both.
struct Receiving {
    receiver: Receiver,
    metrics: Metrics,
}

/// Receives a request's whole body before it goes on to a decision slot, and answers 413, 408, 503
/// or 400 itself when the body is too large, too slow, over the budget or broken off. The body's
/// bytes count against the budget until the answer is made.
async fn receive_whole_body(
    State(receiving): State<Arc<Receiving>>,
    request: Request,
    next: Next,
) -> Response {
    let route = Route::from_path(request.uri().path()).map_or("any", Route::as_str);
    let (parts, body) = request.into_parts();
    let counted = receiving.metrics.receiving();
    let received = receiving.receiver.receive(body).await;
    drop(counted);
    match received {
        Ok(received) => {
            let request = Request::from_parts(parts, Body::from(received.bytes.clone()));
            let response = next.run(request).await;
            drop(received);
            response
        }
        Err(refusal) => {
            // Slow and shed requests are logged at debug only: a flood must not become a flood of
            // log lines (the metric counts them). A body too large or broken off may be a real
            // review the guards never see: warn.
            match refusal {
                Refusal::TooLarge { .. } | Refusal::Unreadable(_) => warn!(route, "{refusal}"),
                Refusal::TimedOut { .. } | Refusal::Shed { .. } => debug!(route, "{refusal}"),
            }
            receiving.metrics.refused(route, refusal.verdict());
            Answer::refuse(refusal.status(), &refusal.to_string(), refusal.verdict()).into_response()
        }
    }
}

/// The answer to a request the decision limit refused before any guard saw it. Logged at debug
/// only: a flood must not become a flood of log lines (the metric counts them).
fn refused_by_a_limit(error: &BoxError) -> Answer {
    let (status, message, verdict) = if error.is::<Overloaded>() {
        let message = format!("overloaded: {MAX_CONCURRENT_DECISIONS} reviews are being judged; try again");
        (StatusCode::SERVICE_UNAVAILABLE, message, "shed")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, error.to_string(), "error")
    };
    debug!(%status, "{message}");
    Answer::refuse(status, &message, verdict)
}

/// The HTTPS server of the routes, with the limits a hostile client meets below HTTP: a TLS
/// handshake timeout, HTTP/1.1 only with a header-read timeout that also closes idle kept-alive
/// connections (hyper's HTTP/2 server has neither), and a small read buffer.
pub fn https_server(
    listener: std::net::TcpListener,
    tls: RustlsConfig,
) -> std::io::Result<axum_server::Server<SocketAddr, RustlsAcceptor>> {
    let mut server = axum_server::from_tcp_rustls(listener, tls)?
        .map(|acceptor| acceptor.handshake_timeout(TLS_HANDSHAKE_TIMEOUT))
        .http1_only();
    server
        .http_builder()
        .http1()
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_READ_BUFFER_BYTES);
    Ok(server)
}

/// Largest read buffer of a connection, which must hold the request head (hyper's default is about
/// 400 KiB, which 1,000 slow clients sending an endless head would each fill). One TLS record.
const MAX_READ_BUFFER_BYTES: usize = 16 * 1024;

async fn mutate(State(webhook): State<Arc<Webhook>>, body: Bytes) -> Answer {
    handle(Route::Mutate, &webhook, &body)
}

async fn validate(State(webhook): State<Arc<Webhook>>, body: Bytes) -> Answer {
    handle(Route::Validate, &webhook, &body)
}

/// Judges a received body and counts the answer.
fn handle(route: Route, webhook: &Webhook, body: &[u8]) -> Answer {
    let started = Instant::now();
    let answer = admit(route, body, webhook, Timestamp::now());
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
    // The API server runs this mutating guard before the validating order guard. When the order
    // guard will refuse the update, softening it would only print a warning ("made NoSchedule …")
    // for an update that never happens: leave it to the order guard.
    if let order_guard::Decision::Deny(_) = order_decision(update, webhook) {
        return Answer::review(update.allow(), "left_to_order_guard");
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

fn order_decision(update: &NodeUpdate, webhook: &Webhook) -> order_guard::Decision {
    let settings = &webhook.settings.order;
    let record = webhook
        .caches
        .record_of(update.name(), update.new.metadata.uid.as_deref());
    order_guard::decide(update, settings, record.as_deref(), |name| {
        webhook.caches.node_is_ready(name)
    })
}

fn guard_order(update: &NodeUpdate, webhook: &Webhook) -> Answer {
    match order_decision(update, webhook) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_admission_paths_are_routes() {
        assert_eq!(Route::from_path("/mutate"), Some(Route::Mutate));
        assert_eq!(Route::from_path("/validate"), Some(Route::Validate));
        assert_eq!(Route::from_path("/validate/"), None);
        assert_eq!(Route::from_path("/"), None);
        for route in [Route::Mutate, Route::Validate] {
            assert_eq!(Route::from_path(&format!("/{}", route.as_str())), Some(route));
        }
    }
}
