//! Receiving a review's body whole before anything judges it: within a size limit, a time limit, and
//! a budget of bytes shared by every request being received. A slow or half-sent body costs its
//! connection and the bytes it has sent, never a decision slot; the budget bounds the memory of all
//! bodies in flight, whatever the number of connections.
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use futures::StreamExt;
use http::StatusCode;
use tokio::sync::{Semaphore, SemaphorePermit};

/// How a body may arrive.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted.
    pub max_bytes: usize,
    /// Longest time from the request's headers to the last byte of its body.
    pub timeout: Duration,
    /// Bytes all requests being received (and then judged) may hold at once.
    pub budget_bytes: usize,
}

/// Receives bodies within [`Limits`]; one per server, shared by all connections.
pub struct Receiver {
    limits: Limits,
    /// One permit per byte of buffer held by a request, from its first byte until it is answered.
    budget: Semaphore,
}

/// A whole body, and its share of the budget: the bytes count against the budget until this is
/// dropped, so hold it until the answer is sent.
pub struct Received<'a> {
    pub bytes: Bytes,
    _held: SemaphorePermit<'a>,
}

/// Why a body was not received.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the AdmissionReview is larger than {} KiB", .max_bytes >> 10)]
    TooLarge { max_bytes: usize },
    #[error("the AdmissionReview was not received within {} s", .timeout.as_secs())]
    TimedOut { timeout: Duration },
    #[error("overloaded: {} MiB of request bodies are being received; try again", .budget_bytes >> 20)]
    Shed { budget_bytes: usize },
    #[error("reading the AdmissionReview: {0}")]
    Unreadable(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::TimedOut { .. } => StatusCode::REQUEST_TIMEOUT,
            Refusal::Shed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Unreadable(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The verdict counted in the metrics.
    pub fn verdict(&self) -> &'static str {
        match self {
            Refusal::TooLarge { .. } => "too_large",
            Refusal::TimedOut { .. } => "timed_out",
            Refusal::Shed { .. } => "shed",
            Refusal::Unreadable(_) => "bad_request",
        }
    }
}

impl Receiver {
    pub fn new(limits: Limits) -> Self {
        Receiver {
            limits,
            budget: Semaphore::new(limits.budget_bytes),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Reads `body` whole. A body that declares (Content-Length) or reaches more than the limit is
    /// refused at once, without reading the rest; one that needs more buffer than the budget has
    /// left is shed (503) rather than waiting.
    pub async fn receive(&self, body: Body) -> Result<Received<'_>, Refusal> {
        let Limits {
            max_bytes, timeout, ..
        } = self.limits;
        let too_large = Refusal::TooLarge { max_bytes };
        if body.size_hint().lower() > max_bytes as u64 {
            return Err(too_large);
        }
        let read = async {
            let mut held = self.budget.try_acquire_many(0).map_err(|_| self.shed())?;
            let mut buffer = Vec::new();
            let mut chunks = body.into_data_stream();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|error| Refusal::Unreadable(error.to_string()))?;
                let needed = buffer.len() + chunk.len();
                if needed > max_bytes {
                    return Err(too_large);
                }
                let capacity = grown_capacity(held.num_permits(), needed, max_bytes);
                if capacity > held.num_permits() {
                    let more = u32::try_from(capacity - held.num_permits()).map_err(|_| self.shed())?;
                    held.merge(self.budget.try_acquire_many(more).map_err(|_| self.shed())?);
                    buffer.reserve_exact(capacity - buffer.len());
                }
                // Copied out of the connection's read buffer, so a trickle of tiny chunks cannot
                // pin many of those buffers.
                buffer.extend_from_slice(&chunk);
            }
            Ok(Received {
                bytes: Bytes::from(buffer),
                _held: held,
            })
        };
        tokio::time::timeout(timeout, read)
            .await
            .unwrap_or(Err(Refusal::TimedOut { timeout }))
    }

    fn shed(&self) -> Refusal {
        Refusal::Shed {
            budget_bytes: self.limits.budget_bytes,
        }
    }
}

/// The buffer a body needs to hold `needed` bytes, given it holds `capacity` now: unchanged while it
/// fits, else doubled (so a large body is copied a few times, not once per chunk), but never less
/// than `needed` nor more than `max_bytes` (`needed` is at most `max_bytes`).
pub fn grown_capacity(capacity: usize, needed: usize, max_bytes: usize) -> usize {
    if needed <= capacity {
        capacity
    } else {
        needed.max(capacity.saturating_mul(2)).min(max_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;

    const LIMITS: Limits = Limits {
        max_bytes: 100,
        timeout: Duration::from_millis(200),
        budget_bytes: 150,
    };

    /// A body sent in `chunks`, with no Content-Length, that ends.
    fn chunked(chunks: &[&'static [u8]]) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            chunks.iter().map(|chunk| Ok(Bytes::from_static(chunk))).collect();
        Body::from_stream(stream::iter(chunks))
    }

    /// A body that sends `first` and then nothing, for ever: a client that stopped half-way.
    fn half_sent(first: &'static [u8]) -> Body {
        let first = stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(first))]);
        Body::from_stream(first.chain(stream::pending()))
    }

    #[test]
    fn a_buffer_grows_by_doubling_but_to_no_less_than_needed_and_no_more_than_the_limit() {
        assert_eq!(grown_capacity(0, 14, 100), 14);
        assert_eq!(grown_capacity(14, 20, 100), 28);
        assert_eq!(grown_capacity(14, 60, 100), 60);
        assert_eq!(grown_capacity(60, 70, 100), 100);
        assert_eq!(
            grown_capacity(60, 60, 100),
            60,
            "a body that fits keeps its buffer"
        );
        assert_eq!(grown_capacity(100, 100, 100), 100);
    }

    #[tokio::test]
    async fn a_body_sent_in_chunks_is_received_whole() {
        let receiver = Receiver::new(LIMITS);
        let received = receiver
            .receive(chunked(&[b"{\"apiVersion\":", b" \"admission.k8s.io/v1\"}"]))
            .await
            .unwrap();
        assert_eq!(&received.bytes[..], b"{\"apiVersion\": \"admission.k8s.io/v1\"}");
    }

    #[tokio::test]
    async fn a_body_that_declares_more_than_the_limit_is_refused_unread() {
        let receiver = Receiver::new(LIMITS);
        let refusal = receiver.receive(Body::from(vec![b' '; 101])).await.err().unwrap();
        assert_eq!(refusal, Refusal::TooLarge { max_bytes: 100 });
        assert_eq!(refusal.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(receiver.receive(Body::from(vec![b' '; 100])).await.is_ok());
    }

    #[tokio::test]
    async fn a_body_that_grows_past_the_limit_is_refused_and_gives_its_bytes_back() {
        let receiver = Receiver::new(LIMITS);
        let refusal = receiver
            .receive(chunked(&[&[b' '; 60], &[b' '; 41]]))
            .await
            .err()
            .unwrap();
        assert_eq!(refusal, Refusal::TooLarge { max_bytes: 100 });
        assert_eq!(receiver.budget.available_permits(), 150);
    }

    #[tokio::test]
    async fn a_half_sent_body_times_out() {
        let receiver = Receiver::new(LIMITS);
        let refusal = receiver
            .receive(half_sent(b"{\"apiVersion\":"))
            .await
            .err()
            .unwrap();
        assert_eq!(
            refusal,
            Refusal::TimedOut {
                timeout: Duration::from_millis(200)
            }
        );
        assert_eq!(refusal.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(receiver.budget.available_permits(), 150);
    }

    #[tokio::test]
    async fn half_sent_bodies_hold_only_the_bytes_they_sent() {
        let receiver = Receiver::new(LIMITS);
        // Ten clients stalled after 14 bytes hold 140 of the 150 bytes, no more.
        let stalled: Vec<_> = (0..10)
            .map(|_| Box::pin(receiver.receive(half_sent(b"{\"apiVersion\":"))))
            .collect();
        let mut stalled = futures::future::select_all(stalled);
        // Poll them all once: each has read its first chunk and waits for more.
        let poll_once = futures::future::poll_fn(|cx| {
            let _ = std::pin::Pin::new(&mut stalled).poll(cx);
            std::task::Poll::Ready(())
        });
        poll_once.await;
        assert_eq!(receiver.budget.available_permits(), 10);
        // A review of 10 bytes is still received; one of 11 is shed.
        let received = receiver.receive(chunked(&[b"0123456789"])).await.unwrap();
        assert_eq!(received.bytes.len(), 10);
        drop(received);
        let refusal = receiver.receive(chunked(&[b"0123456789a"])).await.err().unwrap();
        assert_eq!(refusal, Refusal::Shed { budget_bytes: 150 });
        assert_eq!(refusal.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn a_received_body_holds_its_bytes_until_dropped() {
        let receiver = Receiver::new(LIMITS);
        let received = receiver.receive(chunked(&[&[b' '; 100]])).await.unwrap();
        assert_eq!(receiver.budget.available_permits(), 50);
        assert_eq!(
            receiver.receive(chunked(&[&[b' '; 51]])).await.err().unwrap(),
            Refusal::Shed { budget_bytes: 150 }
        );
        drop(received);
        assert_eq!(receiver.budget.available_permits(), 150);
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_unreadable() {
        let receiver = Receiver::new(LIMITS);
        let broken = stream::iter([
            Ok(Bytes::from_static(b"{")),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset by peer",
            )),
        ]);
        let refusal = receiver.receive(Body::from_stream(broken)).await.err().unwrap();
        assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
        assert!(refusal.to_string().contains("reset by peer"), "{refusal}");
    }
}
