//! Fenced leadership (DESIGN.md rule 13): the controller acts only while the Lease is its own and
//! was renewed recently enough that no standby can have taken it over.
//!
//! A [`Fence`] holds the time of the last renewal confirmed by the API server (see [`crate::lease`]).
//! It closes by itself [`FENCE_AFTER`] later, before the Lease can expire, so a leader cut off from
//! the API server stops acting without being told; and it closes at once when a renewal fails.
//! Every AWS call ([`crate::aws`]) and every write through a [`FencedWrites`] client checks it
//! first, so no call site can forget.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

/// How long a Lease stays valid after a renewal: a standby may take it over after this.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// The holder renews this long before its Lease would expire (every 9 s with a 15 s Lease).
pub const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(6);
/// The fence closes this long after the last confirmed renewal: 3 s after a renewal was due (time
/// for it to land and be seen) and 3 s before a standby may take the Lease (time for a call that
/// passed the fence to reach AWS, and for clock skew between replicas).
pub const FENCE_AFTER: Duration = Duration::from_secs(12);

/// Why the controller may not act right now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not acting: the leader lease {} (acting needs one renewed within {}s); no AWS call or cluster write until it is renewed",
    describe_renewal(*.last_renewed_ago),
    .fence_after.as_secs()
)]
pub struct Fenced {
    /// Time since the last renewal confirmed by the API server; `None` if none since the fence
    /// was (re)closed.
    pub last_renewed_ago: Option<Duration>,
    pub fence_after: Duration,
}

fn describe_renewal(ago: Option<Duration>) -> String {
    match ago {
        Some(ago) => format!("was last renewed {:.1}s ago", ago.as_secs_f64()),
        None => "is not confirmed as ours".to_owned(),
    }
}

/// The `Fenced` in an error's source chain, if the error is one.
pub fn fenced_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Fenced> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(fenced) = error.downcast_ref::<Fenced>() {
            return Some(fenced);
        }
        current = error.source();
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Standing {
    /// The renewal time written in the Lease (this replica's clock), once the API server showed it.
    renewed: Option<SystemTime>,
    /// When the fence was last closed on purpose; a renewal from before then does not reopen it.
    revoked: Option<SystemTime>,
    /// Tests of other parts: always open.
    always_open: bool,
}

/// The leader's permission to act. Cheap to clone; every clone sees the same state.
#[derive(Debug, Clone)]
pub struct Fence {
    standing: Arc<watch::Sender<Standing>>,
    fence_after: Duration,
}

impl Fence {
    /// A closed fence, opened by the first renewal it is told of.
    pub fn closed(fence_after: Duration) -> Fence {
        let (standing, _) = watch::channel(Standing {
            renewed: None,
            revoked: None,
            always_open: false,
        });
        Fence {
            standing: Arc::new(standing),
            fence_after,
        }
    }

    /// A fence that never closes, for tests of the parts that check it.
    pub fn open_for_tests() -> Fence {
        let fence = Fence::closed(FENCE_AFTER);
        fence.standing.send_modify(|s| s.always_open = true);
        fence
    }

    /// The API server shows the Lease held by us, renewed at `at` (our clock, as written by us).
    /// A renewal older than the last one seen, or from before a revocation, changes nothing.
    pub fn renewed(&self, at: SystemTime) {
        self.standing.send_if_modified(|standing| {
            let newer = standing.renewed.is_none_or(|seen| at > seen);
            let after_revocation = standing.revoked.is_none_or(|revoked| at > revoked);
            if newer && after_revocation {
                standing.renewed = Some(at);
            }
            newer && after_revocation
        });
    }

    /// Closes the fence now: a renewal failed, or the Lease is not ours.
    pub fn revoke(&self) {
        self.revoke_at(SystemTime::now());
    }

    fn revoke_at(&self, now: SystemTime) {
        self.standing.send_modify(|standing| {
            standing.renewed = None;
            standing.revoked = Some(now);
        });
    }

    /// `Ok` while acting is allowed.
    pub fn check(&self) -> Result<(), Fenced> {
        self.check_at(SystemTime::now())
    }

    fn check_at(&self, now: SystemTime) -> Result<(), Fenced> {
        check(&self.standing.borrow(), self.fence_after, now)
    }

    /// Resolves once the fence is open (at once if it is).
    pub async fn opened(&self) {
        let mut standing = self.standing.subscribe();
        let fence_after = self.fence_after;
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = standing
            .wait_for(|standing| check(standing, fence_after, SystemTime::now()).is_ok())
            .await;
    }
}

fn check(standing: &Standing, fence_after: Duration, now: SystemTime) -> Result<(), Fenced> {
    if standing.always_open {
        return Ok(());
    }
    // A renewal "in the future" (a clock stepped back) counts as just now: the Lease's own expiry
    // for the standby is computed from the same written time.
    let ago = standing
        .renewed
        .map(|renewed| now.duration_since(renewed).unwrap_or(Duration::ZERO));
    match ago {
        Some(ago) if ago < fence_after => Ok(()),
        _ => Err(Fenced {
            last_renewed_ago: ago,
            fence_after,
        }),
    }
}

/// A tower layer for the controller's Kubernetes client: every request that writes (anything but
/// GET, HEAD and OPTIONS) is refused while the fence is closed, without reaching the API server.
/// Taints, evictions and the record are written through it; the Lease is not (see [`crate::lease`]).
#[derive(Debug, Clone)]
pub struct FencedWrites(pub Fence);

impl<S> tower::Layer<S> for FencedWrites {
    type Service = FencedWritesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FencedWritesService {
            inner,
            fence: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FencedWritesService<S> {
    inner: S,
    fence: Fence,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<B>> for FencedWritesService<S>
where
    S: tower::Service<http::Request<B>, Error = BoxError>,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let reads = matches!(
            *request.method(),
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        if !reads && let Err(fenced) = self.fence.check() {
            return Box::pin(std::future::ready(Err(fenced.into())));
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1_800_000_000);

    fn at(seconds: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs_f64(seconds)
    }

    #[test]
    fn a_fence_is_closed_until_a_renewal_is_seen() {
        let fence = Fence::closed(FENCE_AFTER);
        let error = fence.check_at(at(0.0)).expect_err("closed");
        assert_eq!(error.last_renewed_ago, None);
        assert!(error.to_string().contains("not confirmed as ours"), "{error}");
    }

    #[test]
    fn a_renewal_opens_the_fence_until_fence_after_has_passed() {
        let fence = Fence::closed(FENCE_AFTER);
        fence.renewed(at(0.0));
        assert_eq!(fence.check_at(at(0.0)), Ok(()));
        assert_eq!(fence.check_at(at(11.9)), Ok(()));
        let error = fence
            .check_at(at(12.0))
            .expect_err("a renewal 12 s old is too old");
        assert_eq!(error.last_renewed_ago, Some(Duration::from_secs(12)));
        assert!(
            error.to_string().contains("was last renewed 12.0s ago"),
            "{error}"
        );
    }

    #[test]
    fn each_renewal_pushes_the_deadline_out_and_an_older_one_does_not_pull_it_back() {
        let fence = Fence::closed(FENCE_AFTER);
        fence.renewed(at(0.0));
        fence.renewed(at(9.0));
        fence.renewed(at(5.0));
        assert_eq!(fence.check_at(at(20.0)), Ok(()));
        assert!(fence.check_at(at(21.0)).is_err());
    }

    #[test]
    fn the_fence_closes_before_a_standby_may_take_the_lease_and_after_the_next_renewal_is_due() {
        assert!(FENCE_AFTER < LEASE_DURATION);
        assert!(FENCE_AFTER > LEASE_DURATION - RENEW_BEFORE_EXPIRY);
    }

    #[test]
    fn a_revocation_closes_the_fence_at_once_and_only_a_later_renewal_reopens_it() {
        let fence = Fence::closed(FENCE_AFTER);
        fence.renewed(at(0.0));
        fence.revoke_at(at(3.0));
        assert!(fence.check_at(at(3.0)).is_err());
        // The watch reports the renewal it saw before the failure: still closed.
        fence.renewed(at(0.0));
        fence.renewed(at(2.5));
        assert!(fence.check_at(at(3.5)).is_err());
        fence.renewed(at(4.0));
        assert_eq!(fence.check_at(at(4.5)), Ok(()));
    }

    #[test]
    fn a_renewal_stamped_ahead_of_the_clock_counts_as_just_now() {
        let fence = Fence::closed(FENCE_AFTER);
        fence.renewed(at(10.0));
        assert_eq!(fence.check_at(at(5.0)), Ok(()));
    }

    #[test]
    fn the_fenced_error_is_found_in_a_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Fenced);
        let outer = Outer(Fenced {
            last_renewed_ago: None,
            fence_after: FENCE_AFTER,
        });
        assert!(fenced_cause(&outer).is_some());
        assert!(fenced_cause(&std::io::Error::other("no")).is_none());
    }

    #[tokio::test]
    async fn opened_waits_for_a_renewal() {
        let fence = Fence::closed(FENCE_AFTER);
        let waiter = tokio::spawn({
            let fence = fence.clone();
            async move { fence.opened().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        fence.renewed(SystemTime::now());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("opened resolves after a renewal")
            .expect("no panic");
    }

    #[tokio::test]
    async fn writes_are_refused_while_the_fence_is_closed_and_reads_pass() {
        use tower::{Layer, ServiceExt};
        let fence = Fence::closed(FENCE_AFTER);
        let service = FencedWrites(fence.clone()).layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>("sent")
        }));
        let request = |method: http::Method| http::Request::builder().method(method).body(()).unwrap();
        let read = service.clone().oneshot(request(http::Method::GET)).await;
        assert_eq!(read.ok(), Some("sent"));
        let write = service.clone().oneshot(request(http::Method::PATCH)).await;
        let error = write.expect_err("a write while fenced is refused");
        assert!(fenced_cause(error.as_ref()).is_some(), "{error}");
        fence.renewed(SystemTime::now());
        let write = service.oneshot(request(http::Method::PATCH)).await;
        assert_eq!(write.ok(), Some("sent"));
    }
}
