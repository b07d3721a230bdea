//! The instance metadata service (IMDS) boundary: reads the documents the agent needs with
//! `aws-config`'s IMDSv2 client (session tokens, timeouts) and turns every failure into an [`Error`]
//! whose [`Error::kind`] labels the metrics.
//!
//! Retries: the client is built with a single attempt. The agent polls anyway, so its poll loop is
//! the one retry loop (with exponential backoff and jitter); letting the SDK retry inside a poll as
//! well would only stretch a poll and hide failures from the metrics. The SDK caches the session
//! token but never drops it on a 401 (it retries with the same token), so a rejected token is
//! reported as [`Error::TokenRejected`] and the caller renews the session.
pub mod notice;

use std::{error::Error as StdError, time::Duration};

use aws_config::{
    imds::{self, client::error::ImdsError},
    provider_config::ProviderConfig,
};
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::client::result::ConnectorError;

pub use notice::{Action, InstanceAction, MalformedNotice, RebalanceRecommendation};

pub const REBALANCE_PATH: &str = "/latest/meta-data/events/recommendations/rebalance";
pub const INSTANCE_ACTION_PATH: &str = "/latest/meta-data/spot/instance-action";
pub const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";

/// IMDS on EC2 is link-local and answers in milliseconds; a second is already very slow.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// A whole read: the session token (when it needs renewing) and the document.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a read from IMDS failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("IMDS {path}: could not get a session token: {}", chain(source))]
    Token {
        path: &'static str,
        #[source]
        source: ImdsError,
    },
    #[error("IMDS {path}: the session token was rejected (HTTP 401)")]
    TokenRejected { path: &'static str },
    #[error("IMDS {path}: answered HTTP {status}")]
    Status { path: &'static str, status: u16 },
    #[error("IMDS {path}: timed out: {}", chain(source))]
    Timeout {
        path: &'static str,
        #[source]
        source: ImdsError,
    },
    #[error("IMDS {path}: unreachable: {}", chain(source))]
    Unreachable {
        path: &'static str,
        #[source]
        source: ImdsError,
    },
    #[error("IMDS {path}: {}", chain(source))]
    Unexpected {
        path: &'static str,
        #[source]
        source: ImdsError,
    },
    #[error("IMDS {path}: {source}")]
    Malformed {
        path: &'static str,
        #[source]
        source: MalformedNotice,
    },
}

impl Error {
    /// Every kind [`Error::kind`] returns, so metrics can show zeroes before the first failure.
    pub const KINDS: [&'static str; 7] = [
        "token",
        "token_rejected",
        "status",
        "timeout",
        "unreachable",
        "unexpected",
        "malformed",
    ];

    /// The metric label of this failure.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Token { .. } => "token",
            Error::TokenRejected { .. } => "token_rejected",
            Error::Status { .. } => "status",
            Error::Timeout { .. } => "timeout",
            Error::Unreachable { .. } => "unreachable",
            Error::Unexpected { .. } => "unexpected",
            Error::Malformed { .. } => "malformed",
        }
    }

    /// The IMDS answered, but with a body that is not what AWS documents.
    pub fn is_malformed(&self) -> bool {
        matches!(self, Error::Malformed { .. })
    }

    /// The cached session token is no longer accepted (IMDS restarted, or the token was revoked):
    /// only a new session helps, see [`Imds::renew_session`].
    pub fn needs_new_session(&self) -> bool {
        matches!(self, Error::TokenRejected { .. })
    }

    fn from_sdk(path: &'static str, error: ImdsError) -> Self {
        match &error {
            ImdsError::ErrorResponse(response) => match response.response().status().as_u16() {
                401 => Error::TokenRejected { path },
                status => Error::Status { path, status },
            },
            _ if is_timeout(&error) => Error::Timeout { path, source: error },
            ImdsError::FailedToLoadToken(token) if token.is_dispatch_failure() => {
                Error::Unreachable { path, source: error }
            }
            ImdsError::FailedToLoadToken(_) => Error::Token { path, source: error },
            _ if is_connection_failure(&error) => Error::Unreachable { path, source: error },
            _ => Error::Unexpected { path, source: error },
        }
    }
}

/// The error and its sources, joined, e.g. "failed to load IMDS session token: dispatch failure: io
/// error: Connection refused". The SDK's top-level messages alone say too little to act on.
fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether any of the error's sources satisfies `test`.
fn any_source(error: &ImdsError, test: impl Fn(&(dyn StdError + 'static)) -> bool) -> bool {
    let mut source = error.source();
    while let Some(cause) = source {
        if test(cause) {
            return true;
        }
        source = cause.source();
    }
    false
}

fn is_timeout(error: &ImdsError) -> bool {
    // A connect or read timeout is a `ConnectorError`, but the IMDS client unwraps it and keeps only
    // its (private) source, "HTTP read timeout occurred after 1s"; the whole-operation timeout says
    // "request has timed out". So the messages are what is left to go by.
    let says_timeout = |cause: &(dyn StdError + 'static)| {
        let text = cause.to_string();
        text.contains("timeout") || text.contains("timed out")
    };
    any_source(error, |cause| {
        cause
            .downcast_ref::<ConnectorError>()
            .is_some_and(ConnectorError::is_timeout)
            || cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || says_timeout(cause)
    })
}

fn is_connection_failure(error: &ImdsError) -> bool {
    any_source(error, |cause| {
        cause
            .downcast_ref::<ConnectorError>()
            .is_some_and(ConnectorError::is_io)
            || cause.downcast_ref::<std::io::Error>().is_some()
    })
}

/// Reads this instance's metadata over IMDSv2.
#[derive(Debug, Clone)]
pub struct Imds {
    endpoint: String,
    client: imds::Client,
}

impl Imds {
    /// A client for the IMDS at `endpoint` (e.g. `http://169.254.169.254`); see
    /// [`validate_endpoint`] for what is accepted.
    pub fn new(endpoint: &str) -> Result<Self, String> {
        Ok(Imds {
            client: build_client(endpoint)?,
            endpoint: endpoint.to_owned(),
        })
    }

    /// Drops the cached session token by building a fresh client; the next read gets a new token.
    pub fn renew_session(&mut self) {
        // The endpoint was accepted when this client was first built, so it still is.
        if let Ok(client) = build_client(&self.endpoint) {
            self.client = client;
        }
    }

    /// The EC2 instance id, e.g. `i-1234567890abcdef0`.
    pub async fn instance_id(&self) -> Result<String, Error> {
        let path = INSTANCE_ID_PATH;
        let body = self
            .client
            .get(path)
            .await
            .map_err(|e| Error::from_sdk(path, e))?;
        notice::parse_instance_id(body.as_ref()).map_err(|source| Error::Malformed { path, source })
    }

    /// The rebalance recommendation, if EC2 has made one (404 means none).
    pub async fn rebalance_recommendation(&self) -> Result<Option<RebalanceRecommendation>, Error> {
        let path = REBALANCE_PATH;
        let Some(body) = self.optional(path).await? else {
            return Ok(None);
        };
        notice::parse_rebalance_recommendation(&body)
            .map(Some)
            .map_err(|source| Error::Malformed { path, source })
    }

    /// The spot interruption notice, if EC2 has sent one (404 means none).
    pub async fn instance_action(&self) -> Result<Option<InstanceAction>, Error> {
        let path = INSTANCE_ACTION_PATH;
        let Some(body) = self.optional(path).await? else {
            return Ok(None);
        };
        notice::parse_instance_action(&body)
            .map(Some)
            .map_err(|source| Error::Malformed { path, source })
    }

    /// A document that may not exist: 404 is `None`, not an error.
    async fn optional(&self, path: &'static str) -> Result<Option<String>, Error> {
        match self.client.get(path).await {
            Ok(body) => Ok(Some(body.into())),
            Err(ImdsError::ErrorResponse(response)) if response.response().status().as_u16() == 404 => {
                Ok(None)
            }
            Err(error) => Err(Error::from_sdk(path, error)),
        }
    }
}

/// Checks an IMDS endpoint the way the client will use it: an absolute `http` or `https` URL.
pub fn validate_endpoint(endpoint: &str) -> Result<String, String> {
    build_client(endpoint).map(|_| endpoint.to_owned())
}

fn build_client(endpoint: &str) -> Result<imds::Client, String> {
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(format!("{endpoint:?} is not an http:// or https:// URL"));
    }
    let mut builder = imds::Client::builder()
        .endpoint(endpoint)
        .map_err(|error| format!("{endpoint:?} is not a valid URL: {error}"))?;
    if endpoint.starts_with("http://") {
        builder = builder.configure(&ProviderConfig::default().with_http_client(plain_http_client()));
    }
    Ok(builder
        .max_attempts(1)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .operation_attempt_timeout(OPERATION_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build())
}

/// The HTTP client for a plain `http://` IMDS (the real one is link-local HTTP): the SDK's rustls
/// client with no root certificates, so the machine's CA store is never read. The default client
/// loads it on the first request even for plain HTTP, and a node without one (a minimal host
/// image, a distroless container without `ca-certificates`) then got a panic in the SDK (debug
/// builds) instead of a poll. It also keeps ~150 parsed root certificates out of the agent's memory.
fn plain_http_client() -> SharedHttpClient {
    let no_roots = TlsContext::builder()
        .with_trust_store(TrustStore::empty().with_native_roots(false))
        .build()
        .expect("a TLS context with an empty trust store always builds");
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc))
        .tls_context(no_roots)
        .build_https()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_http_urls() {
        assert!(validate_endpoint("http://169.254.169.254").is_ok());
        assert!(validate_endpoint("http://127.0.0.1:1338/").is_ok());
        assert!(validate_endpoint("http://[fd00:ec2::254]").is_ok());
        for bad in ["169.254.169.254", "", "ftp://x", "http://exa mple"] {
            assert!(validate_endpoint(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_error_kind_is_listed_for_the_metrics() {
        let malformed = Error::Malformed {
            path: REBALANCE_PATH,
            source: notice::parse_instance_id("x").unwrap_err(),
        };
        let examples = [
            Error::TokenRejected { path: REBALANCE_PATH },
            Error::Status {
                path: REBALANCE_PATH,
                status: 500,
            },
            malformed,
        ];
        for error in examples {
            assert!(Error::KINDS.contains(&error.kind()), "{}", error.kind());
        }
    }

    #[tokio::test]
    async fn an_endpoint_nobody_listens_on_is_unreachable() {
        // Bind then drop: the port is free and refuses connections.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let imds = Imds::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let error = imds.rebalance_recommendation().await.unwrap_err();
        assert_eq!(error.kind(), "unreachable", "{error}");
        assert!(error.to_string().contains(REBALANCE_PATH), "{error}");
    }

    #[tokio::test]
    async fn an_endpoint_that_never_answers_times_out() {
        // Accepts connections (the backlog does) but never answers a byte.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let imds = Imds::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let error = imds.instance_action().await.unwrap_err();
        assert_eq!(error.kind(), "timeout", "{error}");
        drop(listener);
    }
}
