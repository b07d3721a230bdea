//! The admin server every role runs on a plain-HTTP port: `/healthz` (the process is alive),
//! `/readyz` (the role has done what it needs before it can be trusted, e.g. synced its caches) and
//! `/metrics` (Prometheus text format).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Whether the role is ready to be trusted; starts not ready. Cheap to clone and share.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AdminState {
    /// The role's own metrics, prefixed `spot_rebalancer_`.
    registry: Registry,
    /// The process collector, unprefixed: `process_*` as stock dashboards expect.
    process: Registry,
    readiness: Readiness,
}

/// The admin routes, without a socket, so tests can drive them with `oneshot`.
pub fn router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            registry,
            process: process_registry(),
            readiness,
        })
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    let mut families = state.process.gather();
    families.extend(state.registry.gather());
    match encoder.encode(&families, &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(error) => {
            tracing::warn!(%error, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain".to_owned())],
                Vec::new(),
            )
        }
    }
}

/// How long a client may take to send a request's headers: a connection that dribbles them (or
/// sends nothing) is closed instead of held.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After accepting failed (e.g. out of file descriptors), the wait before accepting again.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

/// Serves `router` on `addr` over HTTP/1.1 until `shutdown` is cancelled, then finishes in-flight
/// requests. HTTP/1.1 only (hyper's HTTP/1 server connection, not axum's `serve`, which speaks
/// HTTP/2 as well): kubelet probes and Prometheus use HTTP/1.1, and the HTTP/2 server would be code
/// pages resident in the agent on every node.
pub async fn serve(addr: SocketAddr, router: Router, shutdown: CancellationToken) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "admin server listening");
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%addr, %error, "admin server: accepting a connection failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        connections.spawn(serve_connection(stream, router.clone(), shutdown.clone()));
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One client's connection, until it closes; asked to close after its current request once
/// `shutdown` is cancelled.
async fn serve_connection(stream: tokio::net::TcpStream, router: Router, shutdown: CancellationToken) {
    // One request per connection: the header timeout also closes a connection waiting idle for its
    // next request, and a client reusing it at that moment lost its request ("connection closed
    // before message completed"; seen in an e2e test reading /metrics 10 s after /readyz). Scrapes
    // and probes are seconds apart, so a new connection each costs nothing that matters.
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "admin server: a connection ended with an error");
    }
}

/// The role names of `build_info`'s `role` label.
pub const AGENT: &str = "agent";
pub const CONTROLLER: &str = "controller";
pub const WEBHOOK: &str = "webhook";

/// A role's registry: every metric name prefixed `spot_rebalancer_`, starting with
/// `spot_rebalancer_build_info{version, role}` (always 1), so a dashboard sees which version runs
/// where and an alert can tell a role that is gone from one that is quiet. The router adds the
/// process metrics (resident memory, CPU seconds, open fds) under their standard `process_*` names.
pub fn registry(role: &'static str) -> Registry {
    let registry = Registry::new_custom(Some("spot_rebalancer".to_owned()), None)
        .expect("a static prefix is a valid metric prefix");
    let build_info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "build_info",
            "Always 1; the labels say which build runs, and in which role",
        ),
        &["version", "role"],
    )
    .expect("valid metric");
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), role])
        .set(1);
    registry
        .register(Box::new(build_info))
        .expect("build_info registers once on a fresh registry");
    registry
}

/// The process collector on a registry of its own: a prefix would rename `process_*`.
fn process_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registers once on a fresh registry");
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// A connection that sends nothing is closed at the header timeout (the clock is paused and
    /// jumps ahead while everything waits), and the server stops when asked.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_at_the_header_timeout_and_the_server_stops_when_asked() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            addr,
            router(registry(AGENT), Readiness::default()),
            shutdown.clone(),
        ));
        let mut silent = loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => break stream,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let connected = tokio::time::Instant::now();
        let mut buffer = [0; 64];
        let read = tokio::time::timeout(3 * HEADER_READ_TIMEOUT, silent.read(&mut buffer))
            .await
            .expect("a silent connection is closed by the server, not held");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the server closes the connection: {read:?}"
        );
        assert!(
            connected.elapsed() >= HEADER_READ_TIMEOUT,
            "closed after {:?}",
            connected.elapsed()
        );

        // A well-behaved client is still served, then the server stops when asked.
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        // A client that would keep the connection for its next request gets its answer and the
        // connection closed at once, not left idle until the header timeout closes it under a
        // reused request.
        let mut keeping = tokio::net::TcpStream::connect(addr).await.unwrap();
        let asked = tokio::time::Instant::now();
        keeping
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        keeping.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        assert!(
            asked.elapsed() < HEADER_READ_TIMEOUT,
            "closed after {:?}",
            asked.elapsed()
        );
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn readyz_follows_readiness() {
        let readiness = Readiness::default();
        let router = router(registry(WEBHOOK), readiness.clone());
        assert_eq!(
            get(router.clone(), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        readiness.set(true);
        assert_eq!(get(router.clone(), "/readyz").await.0, StatusCode::OK);
        assert_eq!(get(router, "/healthz").await, (StatusCode::OK, "ok".to_owned()));
    }

    #[tokio::test]
    async fn metrics_are_prefixed_prometheus_text() {
        let registry = registry(AGENT);
        let counter = prometheus::IntCounter::new("probes_total", "test counter").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.inc();
        let (status, body) = get(router(registry, Readiness::default()), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("spot_rebalancer_probes_total 1"), "{body}");
    }

    #[tokio::test]
    async fn every_role_says_its_build_and_process_metrics_keep_their_standard_names() {
        for role in [AGENT, CONTROLLER, WEBHOOK] {
            let (_, body) = get(router(registry(role), Readiness::default()), "/metrics").await;
            let build_info = format!(
                "spot_rebalancer_build_info{{role=\"{role}\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            );
            assert!(body.contains(&build_info), "{build_info} missing from\n{body}");
            #[cfg(target_os = "linux")]
            for name in ["process_resident_memory_bytes ", "process_cpu_seconds_total "] {
                assert!(
                    body.lines().any(|line| line.starts_with(name)),
                    "{name} missing from\n{body}"
                );
            }
            assert!(!body.contains("spot_rebalancer_process_"), "{body}");
        }
    }
}
