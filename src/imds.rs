//! The instance metadata service (IMDS) boundary: reads the documents the agent needs over IMDSv2
//! (a session token from `PUT /latest/api/token`, sent with every read) and turns every failure into
//! an [`Error`] whose [`Error::kind`] labels the metrics.
//!
//! The client is hyper's HTTP/1.1 client connection, one connection per read, with a connect
//! timeout, a timeout on each request and one on the whole read (token and document). It replaced
//! `aws-config`'s IMDS client in the agent: that client brings the SDK's orchestrator, its HTTP
//! client and HTTP/2 into the binary that every node keeps resident, to send three kinds of
//! plain-HTTP request to a link-local address.
//!
//! Retries: none here. The agent polls anyway, so its poll loop is the one retry loop (with
//! exponential backoff and jitter); retrying inside a poll as well would only stretch a poll and hide
//! failures from the metrics. The session token is cached until shortly before it expires; a 401 is
//! reported as [`Error::TokenRejected`] and the caller renews the session.
pub mod notice;

use std::{
    error::Error as StdError,
    time::{Duration, Instant},
};

use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

pub use notice::{Action, InstanceAction, MalformedNotice, RebalanceRecommendation};

pub const REBALANCE_PATH: &str = "/latest/meta-data/events/recommendations/rebalance";
pub const INSTANCE_ACTION_PATH: &str = "/latest/meta-data/spot/instance-action";
pub const INSTANCE_ID_PATH: &str = "/latest/meta-data/instance-id";
const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

/// How long a session token is asked to live: six hours, the most IMDS grants (as the AWS SDKs).
const TOKEN_TTL: Duration = Duration::from_secs(6 * 60 * 60);
/// A cached token is renewed this long before it expires, so no read uses one about to expire.
const TOKEN_RENEW_BEFORE: Duration = Duration::from_secs(2 * 60);

/// IMDS on EC2 is link-local and answers in milliseconds; a second is already very slow.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One request: from sending it to the end of the response's body.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// A whole read: the session token (when it needs renewing) and the document.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest body read from IMDS. The documents the agent reads are tens of bytes; an endpoint
/// that streams more is not IMDS, and the agent must not hold what it sends.
const BODY_LIMIT: usize = 64 * 1024;

/// Why a read from IMDS failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("IMDS {path}: could not get a session token: {}", chain(source))]
    Token {
        path: &'static str,
        #[source]
        source: Failure,
    },
    #[error("IMDS {path}: the session token was rejected (HTTP 401)")]
    TokenRejected { path: &'static str },
    #[error("IMDS {path}: answered HTTP {status}")]
    Status { path: &'static str, status: u16 },
    #[error("IMDS {path}: timed out: {}", chain(source))]
    Timeout {
        path: &'static str,
        #[source]
        source: Failure,
    },
    #[error("IMDS {path}: unreachable: {}", chain(source))]
    Unreachable {
        path: &'static str,
        #[source]
        source: Failure,
    },
    #[error("IMDS {path}: {}", chain(source))]
    Unexpected {
        path: &'static str,
        #[source]
        source: Failure,
    },
    #[error("IMDS {path}: {source}")]
    Malformed {
        path: &'static str,
        #[source]
        source: MalformedNotice,
    },
}

/// What went wrong below the HTTP status: the connection, the clock or the body.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("connecting to {authority}: {source}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    #[error("the body is larger than {BODY_LIMIT} bytes")]
    BodyTooLarge,
    #[error("the body is not UTF-8")]
    NotUtf8,
    #[error("the session token answered HTTP {0}")]
    TokenStatus(u16),
    #[error("the session token is not a valid header value")]
    TokenNotAHeader,
}

impl Failure {
    /// The connection could not be made or broke: nothing, or not IMDS, answers there.
    fn is_connection(&self) -> bool {
        match self {
            Failure::Connect { .. } => true,
            Failure::Http(error) => {
                error.is_closed()
                    || error.is_incomplete_message()
                    || error.is_canceled()
                    || has_io_source(error)
            }
            _ => false,
        }
    }

    fn is_timeout(&self) -> bool {
        match self {
            Failure::TimedOut(_) => true,
            Failure::Connect { source, .. } => source.kind() == std::io::ErrorKind::TimedOut,
            Failure::Http(error) => error.is_timeout(),
            _ => false,
        }
    }
}

fn has_io_source(error: &hyper::Error) -> bool {
    let mut source = error.source();
    while let Some(cause) = source {
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        source = cause.source();
    }
    false
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

    /// A failure while getting the session token. Nothing listening is `unreachable` and a
    /// timeout is a `timeout`, whichever request met them; an answer that gives no token is `token`.
    fn from_token(path: &'static str, source: Failure) -> Self {
        if source.is_timeout() {
            Error::Timeout { path, source }
        } else if source.is_connection() {
            Error::Unreachable { path, source }
        } else {
            Error::Token { path, source }
        }
    }

    /// A failure while reading the document itself.
    fn from_read(path: &'static str, source: Failure) -> Self {
        if source.is_timeout() {
            Error::Timeout { path, source }
        } else if source.is_connection() {
            Error::Unreachable { path, source }
        } else {
            Error::Unexpected { path, source }
        }
    }
}

/// The error and its sources, joined, e.g. "connecting to 127.0.0.1:1: Connection refused". The
/// top-level messages alone say too little to act on.
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

/// A session token and when to stop using it.
#[derive(Debug, Clone)]
struct Session {
    token: http::HeaderValue,
    renew_at: Instant,
}

/// Reads this instance's metadata over IMDSv2.
#[derive(Debug)]
pub struct Imds {
    endpoint: Endpoint,
    /// The cached session token. Held while a token is fetched, so the reads of one poll (which run
    /// concurrently) share one token instead of each minting its own.
    session: tokio::sync::Mutex<Option<Session>>,
}

/// Where IMDS listens: the address to connect to, the `Host` header, and a path prefix.
#[derive(Debug, Clone)]
struct Endpoint {
    host: String,
    port: u16,
    authority: String,
    base_path: String,
}

impl Endpoint {
    fn parse(endpoint: &str) -> Result<Self, String> {
        if !endpoint.starts_with("http://") {
            return Err(format!(
                "{endpoint:?} is not an http:// URL (IMDS is plain HTTP on a link-local address)"
            ));
        }
        let uri: Uri = endpoint
            .parse()
            .map_err(|error| format!("{endpoint:?} is not a valid URL: {error}"))?;
        let authority = uri
            .authority()
            .filter(|authority| !authority.host().is_empty())
            .ok_or_else(|| format!("{endpoint:?} has no host"))?;
        if uri.query().is_some() {
            return Err(format!("{endpoint:?} has a query; IMDS paths are appended to it"));
        }
        Ok(Endpoint {
            // An IPv6 literal is bracketed in the URL, not in the address to connect to.
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

impl Imds {
    /// A client for the IMDS at `endpoint` (e.g. `http://169.254.169.254`); see
    /// [`validate_endpoint`] for what is accepted.
    pub fn new(endpoint: &str) -> Result<Self, String> {
        Ok(Imds {
            endpoint: Endpoint::parse(endpoint)?,
            session: tokio::sync::Mutex::new(None),
        })
    }

    /// Drops the cached session token; the next read gets a new one.
    pub fn renew_session(&mut self) {
        *self.session.get_mut() = None;
    }

    /// The EC2 instance id, e.g. `i-1234567890abcdef0`.
    pub async fn instance_id(&self) -> Result<String, Error> {
        let path = INSTANCE_ID_PATH;
        match self.read(path).await? {
            Some(body) => {
                notice::parse_instance_id(&body).map_err(|source| Error::Malformed { path, source })
            }
            None => Err(Error::Status { path, status: 404 }),
        }
    }

    /// The rebalance recommendation, if EC2 has made one (404 means none).
    pub async fn rebalance_recommendation(&self) -> Result<Option<RebalanceRecommendation>, Error> {
        let path = REBALANCE_PATH;
        let Some(body) = self.read(path).await? else {
            return Ok(None);
        };
        notice::parse_rebalance_recommendation(&body)
            .map(Some)
            .map_err(|source| Error::Malformed { path, source })
    }

    /// The spot interruption notice, if EC2 has sent one (404 means none).
    pub async fn instance_action(&self) -> Result<Option<InstanceAction>, Error> {
        let path = INSTANCE_ACTION_PATH;
        let Some(body) = self.read(path).await? else {
            return Ok(None);
        };
        notice::parse_instance_action(&body)
            .map(Some)
            .map_err(|source| Error::Malformed { path, source })
    }

    /// A document: its body, or `None` for 404 (a document that does not exist yet), within
    /// [`OPERATION_TIMEOUT`] for the token and the document together.
    async fn read(&self, path: &'static str) -> Result<Option<String>, Error> {
        let read = async {
            let token = self.token(path).await?;
            let (status, body) = self
                .send(Method::GET, path, (TOKEN_HEADER, token))
                .await
                .map_err(|failure| Error::from_read(path, failure))?;
            match status {
                StatusCode::OK => Ok(Some(body)),
                StatusCode::NOT_FOUND => Ok(None),
                StatusCode::UNAUTHORIZED => Err(Error::TokenRejected { path }),
                status => Err(Error::Status {
                    path,
                    status: status.as_u16(),
                }),
            }
        };
        tokio::time::timeout(OPERATION_TIMEOUT, read)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    path,
                    source: Failure::TimedOut(OPERATION_TIMEOUT),
                })
            })
    }

    /// The cached session token, or a new one.
    async fn token(&self, path: &'static str) -> Result<http::HeaderValue, Error> {
        let mut session = self.session.lock().await;
        if let Some(cached) = session.as_ref().filter(|cached| Instant::now() < cached.renew_at) {
            return Ok(cached.token.clone());
        }
        let ttl = http::HeaderValue::from(TOKEN_TTL.as_secs());
        let (status, body) = self
            .send(Method::PUT, TOKEN_PATH, (TOKEN_TTL_HEADER, ttl))
            .await
            .map_err(|failure| Error::from_token(path, failure))?;
        if status != StatusCode::OK {
            return Err(Error::from_token(path, Failure::TokenStatus(status.as_u16())));
        }
        let token = http::HeaderValue::from_str(body.trim())
            .map_err(|_| Error::from_token(path, Failure::TokenNotAHeader))?;
        *session = Some(Session {
            token: token.clone(),
            renew_at: Instant::now() + TOKEN_TTL - TOKEN_RENEW_BEFORE,
        });
        Ok(token)
    }

    /// One request on a new connection: the status and the body (at most [`BODY_LIMIT`] bytes of
    /// UTF-8), within [`CONNECT_TIMEOUT`] to connect and [`READ_TIMEOUT`] for the exchange.
    /// Dropping it (a timeout) closes the connection.
    async fn send(
        &self,
        method: Method,
        path: &str,
        (name, value): (&'static str, http::HeaderValue),
    ) -> Result<(StatusCode, String), Failure> {
        let endpoint = &self.endpoint;
        let connect = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| Failure::TimedOut(CONNECT_TIMEOUT))?
            .map_err(|source| Failure::Connect {
                authority: endpoint.authority.clone(),
                source,
            })?;
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", endpoint.base_path))
            .header(header::HOST, &endpoint.authority)
            .header(name, value)
            .body(Empty::<&'static [u8]>::new())
            .expect("a request of valid parts always builds");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(Failure::Http)?;
        let exchange = async {
            let response = sender.send_request(request).await.map_err(Failure::Http)?;
            let status = response.status();
            let body = Limited::new(response.into_body(), BODY_LIMIT)
                .collect()
                .await
                .map_err(|error| match error.downcast::<hyper::Error>() {
                    Ok(error) => Failure::Http(*error),
                    Err(_) => Failure::BodyTooLarge,
                })?
                .to_bytes();
            let body = String::from_utf8(body.to_vec()).map_err(|_| Failure::NotUtf8)?;
            Ok((status, body))
        };
        // The connection is driven here, not spawned: a read that times out drops it, so a server
        // that never answers holds no socket after the read gave up.
        let exchange = async {
            tokio::pin!(connection);
            tokio::select! {
                result = exchange => result,
                // The connection ends (or fails) before the answer: the exchange saw it too.
                Err(error) = &mut connection => Err(Failure::Http(error)),
            }
        };
        tokio::time::timeout(READ_TIMEOUT, exchange)
            .await
            .map_err(|_| Failure::TimedOut(READ_TIMEOUT))?
    }
}

/// Checks an IMDS endpoint the way the client will use it: an absolute `http` URL with a host.
pub fn validate_endpoint(endpoint: &str) -> Result<String, String> {
    Endpoint::parse(endpoint).map(|_| endpoint.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_http_urls() {
        assert!(validate_endpoint("http://169.254.169.254").is_ok());
        assert!(validate_endpoint("http://127.0.0.1:1338/").is_ok());
        assert!(validate_endpoint("http://[fd00:ec2::254]").is_ok());
        let https = validate_endpoint("https://169.254.169.254").unwrap_err();
        assert!(https.contains("plain HTTP"), "{https}");
        for bad in [
            "169.254.169.254",
            "",
            "ftp://x",
            "http://exa mple",
            "http://x/?a=b",
        ] {
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

    /// A loopback server answering every connection's request with the response `answer` gives
    /// for its request line.
    async fn serve(answer: fn(&str) -> String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buffer = [0; 1024];
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&request);
                let response = answer(request.lines().next().unwrap_or_default());
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        endpoint
    }

    fn ok(body: &str) -> String {
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
    }

    #[tokio::test]
    async fn a_document_is_read_with_a_session_token() {
        let endpoint = serve(|request_line| match request_line {
            "PUT /latest/api/token HTTP/1.1" => ok("a-token"),
            "GET /latest/meta-data/instance-id HTTP/1.1" => ok("i-0123456789abcdef0"),
            _ => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned(),
        })
        .await;
        let imds = Imds::new(&endpoint).unwrap();
        assert_eq!(imds.instance_id().await.unwrap(), "i-0123456789abcdef0");
        assert!(
            imds.rebalance_recommendation().await.unwrap().is_none(),
            "404 is no notice"
        );
    }

    #[tokio::test]
    async fn a_body_beyond_the_limit_is_refused_with_a_clear_error() {
        let endpoint = serve(|request_line| {
            if request_line.starts_with("PUT ") {
                ok("a-token")
            } else {
                ok(&"x".repeat(BODY_LIMIT + 1))
            }
        })
        .await;
        let imds = Imds::new(&endpoint).unwrap();
        let error = imds.instance_action().await.unwrap_err();
        assert_eq!(error.kind(), "unexpected", "{error}");
        assert!(error.to_string().contains("larger than"), "{error}");
    }

    #[tokio::test]
    async fn a_token_that_is_refused_is_a_token_error() {
        let endpoint = serve(|_| "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n".to_owned()).await;
        let imds = Imds::new(&endpoint).unwrap();
        let error = imds.rebalance_recommendation().await.unwrap_err();
        assert_eq!(error.kind(), "token", "{error}");
        assert!(error.to_string().contains("403"), "{error}");
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
