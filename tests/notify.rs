//! Notifications end to end: the controller's `Notifier` posting to a real HTTPS receiver on
//! loopback (a certificate from a test CA made with rcgen, trusted through `--notify-ca-file`).
//! Retries after server errors, no redirect followed, the phase filter, the body formats and the
//! counters a dashboard reads. Needs no bed.
mod support;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use axum_server::tls_rustls::RustlsConfig;
use prometheus::Registry;
use serde_json::Value;
use spot_rebalancer::controller::notify::{Format, Notification, Notifier, NotifyArgs};
use support::webhook::TestCerts;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Value,
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    /// Answers to give, in order; once used up, 200.
    answers: Vec<Response>,
}

/// An HTTPS server on 127.0.0.1 that records every POST and answers as scripted.
struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    async fn start(certs: &TestCerts, answers: Vec<Response>) -> Self {
        let state = Arc::new(Mutex::new(ReceiverState {
            received: Vec::new(),
            answers,
        }));
        let app = Router::new()
            .route("/{*path}", post(record))
            .with_state(state.clone());
        let tls = RustlsConfig::from_pem_file(certs.cert_path(), certs.key_path())
            .await
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = axum_server::from_tcp_rustls(listener, tls).unwrap();
        tokio::spawn(server.serve(app.into_make_service()));
        Receiver { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}/{path}", self.addr.port())
    }

    fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }
}

async fn record(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = state.lock().unwrap();
    state.received.push(Received {
        path: uri.path().to_owned(),
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    });
    if state.answers.is_empty() {
        StatusCode::OK.into_response()
    } else {
        state.answers.remove(0)
    }
}

/// A notifier posting to `url` in `format`, trusting the test CA; with its registry.
fn notifier(
    certs: &TestCerts,
    dir: &tempfile::TempDir,
    url: &str,
    format: Format,
    phases: &[&str],
) -> (Notifier, Registry) {
    let url_file: PathBuf = dir.path().join("url");
    std::fs::write(&url_file, url).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &certs.ca_pem).unwrap();
    let registry = Registry::new();
    let args = NotifyArgs {
        notify_url_file: Some(url_file),
        notify_format: format,
        notify_phases: phases.iter().map(|phase| (*phase).to_owned()).collect(),
        notify_ca_file: Some(ca_file),
    };
    (Notifier::new(&args, &registry).unwrap(), registry)
}

fn count(registry: &Registry, result: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == "notifications_total")
        .flat_map(|family| family.get_metric())
        .find(|metric| {
            metric
                .get_label()
                .iter()
                .any(|label| label.name() == "result" && label.value() == result)
        })
        .map(|metric| metric.get_counter().get_value() as u64)
        .unwrap_or_else(|| panic!("notifications_total{{result={result:?}}} is not registered"))
}

fn tainted() -> Notification {
    Notification {
        node: "ip-10-0-0-1.ec2.internal".into(),
        instance: Some("i-0123456789abcdef0".into()),
        asg: Some("spot-a".into()),
        phase: "Tainted".into(),
        reason: Some("replacement ip-10-0-0-9 is Ready".into()),
    }
}

#[tokio::test]
async fn a_teams_card_reaches_the_receiver_after_two_server_errors() {
    let certs = TestCerts::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(
        &certs,
        vec![
            StatusCode::SERVICE_UNAVAILABLE.into_response(),
            StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        ],
    )
    .await;
    let (notifier, registry) = notifier(
        &certs,
        &dir,
        &receiver.url("workflows/secret"),
        Format::Teams,
        &[],
    );

    notifier.send_and_wait(&tainted()).await;

    let received = receiver.received();
    assert_eq!(received.len(), 3, "two failures, then delivered: {received:#?}");
    let card = &received[2].body["attachments"][0]["content"];
    assert_eq!(card["type"], "AdaptiveCard");
    let facts: Vec<(String, String)> = card["body"][1]["facts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|fact| {
            (
                fact["title"].as_str().unwrap().to_owned(),
                fact["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (title, value) in [
        ("Node", "ip-10-0-0-1.ec2.internal"),
        ("Instance", "i-0123456789abcdef0"),
        ("ASG", "spot-a"),
        ("Phase", "Tainted"),
        ("Reason", "replacement ip-10-0-0-9 is Ready"),
    ] {
        assert!(
            facts.contains(&(title.to_owned(), value.to_owned())),
            "{title} missing: {facts:?}"
        );
    }
    assert!(received.iter().all(|r| !r.headers.contains_key(header::REFERER)));
    assert_eq!(received[0].headers[header::CONTENT_TYPE], "application/json");
    assert_eq!((count(&registry, "sent"), count(&registry, "failed")), (1, 0));
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_counts_as_a_failure() {
    let certs = TestCerts::new();
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = Receiver::start(&certs, vec![]).await;
    let moved = Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(header::LOCATION, elsewhere.url("collect"))
        .body(axum::body::Body::empty())
        .unwrap();
    let receiver = Receiver::start(&certs, vec![moved]).await;
    let (notifier, registry) = notifier(&certs, &dir, &receiver.url("hooks/secret"), Format::Slack, &[]);

    notifier.send_and_wait(&tainted()).await;

    assert_eq!(receiver.received().len(), 1, "a redirect is not retried");
    assert!(elsewhere.received().is_empty(), "the redirect was followed");
    assert_eq!((count(&registry, "sent"), count(&registry, "failed")), (0, 1));
}

#[tokio::test]
async fn only_the_listed_phases_are_posted_as_plain_json() {
    let certs = TestCerts::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&certs, vec![]).await;
    let (notifier, registry) = notifier(
        &certs,
        &dir,
        &receiver.url("spot/events"),
        Format::Json,
        &["Failed", "Retired"],
    );

    notifier.send_and_wait(&tainted()).await;
    let failed = Notification {
        phase: "Failed".into(),
        reason: Some("no spot and no on-demand capacity".into()),
        ..tainted()
    };
    notifier.send_and_wait(&failed).await;

    let received = receiver.received();
    assert_eq!(received.len(), 1, "{received:#?}");
    assert_eq!(received[0].path, "/spot/events");
    let body = &received[0].body;
    assert_eq!(body["node"], "ip-10-0-0-1.ec2.internal");
    assert_eq!(body["instance"], "i-0123456789abcdef0");
    assert_eq!(body["asg"], "spot-a");
    assert_eq!(body["phase"], "Failed");
    assert_eq!(body["reason"], "no spot and no on-demand capacity");
    assert_eq!(
        (
            count(&registry, "sent"),
            count(&registry, "filtered"),
            count(&registry, "failed")
        ),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn a_receiver_whose_certificate_is_not_trusted_gets_nothing() {
    let certs = TestCerts::new();
    let other_ca = TestCerts::new();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&certs, vec![]).await;
    // Trusts another CA only: the TLS handshake fails, every attempt.
    let (notifier, registry) = notifier(&other_ca, &dir, &receiver.url("hooks/secret"), Format::Slack, &[]);

    notifier.send_and_wait(&tainted()).await;

    assert!(receiver.received().is_empty());
    assert_eq!((count(&registry, "sent"), count(&registry, "failed")), (0, 1));
}
