//! Leader election on a Lease (kube-lease-manager), and the [`Fence`] it feeds.
//!
//! kube-lease-manager renews the Lease but tells only when leadership changes, and after a failed
//! renewal its own loop backs off up to 30 s. So this module runs the renewal loop itself (a failed
//! renewal closes the fence at once, the next try comes within [`RETRY_MAX`]) and watches the
//! Lease: each renewal the API server shows as ours reopens the fence until [`FENCE_AFTER`] later.
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, warn};

use crate::fence::{FENCE_AFTER, Fence, LEASE_DURATION, RENEW_BEFORE_EXPIRY};

/// First wait after a failed renewal or lock attempt; doubled up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between two renewal attempts while the API server fails: it bounds how long
/// after the API server's return the leader acts again.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// A renewal that takes longer than this has failed: the next attempt starts sooner than the
/// kube client's own timeouts would allow.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);

/// Whether this replica leads (`true`) as the election sees it, and the task running it; the task
/// ends, handing the manager back for a release, once every receiver is dropped.
pub type Election = (
    watch::Receiver<bool>,
    JoinHandle<Result<LeaseManager, LeaseManagerError>>,
);

/// Competes for the Lease `namespace/name` as `identity`, and returns the election with the fence
/// that says whether this replica may act right now.
pub async fn elect(
    config: &kube::Config,
    namespace: &str,
    name: &str,
    identity: &str,
) -> Result<(Election, Fence), LeaseManagerError> {
    // Lease writes get short timeouts, and go around the fenced writes of the controller's client.
    let mut renewals = config.clone();
    renewals.read_timeout = Some(REQUEST_TIMEOUT);
    renewals.reset_reader_on_write = true;
    renewals.connect_timeout = Some(REQUEST_TIMEOUT);
    renewals.write_timeout = Some(REQUEST_TIMEOUT);
    let manager = LeaseManagerBuilder::new(Client::try_from(renewals)?, name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_DURATION.as_secs())
        .with_grace(RENEW_BEFORE_EXPIRY.as_secs())
        .build()
        .await?;
    let fence = Fence::closed(FENCE_AFTER);
    let observer = tokio::spawn(observe_lease(
        Api::namespaced(Client::try_from(config.clone())?, namespace),
        name.to_owned(),
        identity.to_owned(),
        fence.clone(),
    ));
    let (leading, receiver) = watch::channel(false);
    let election = tokio::spawn(campaign(manager, leading, fence.clone(), observer));
    Ok(((receiver, election), fence))
}

/// Keeps the Lease (or keeps trying to get it), publishing each change of leadership.
async fn campaign(
    manager: LeaseManager,
    leading: watch::Sender<bool>,
    fence: Fence,
    observer: JoinHandle<()>,
) -> Result<LeaseManager, LeaseManagerError> {
    let mut retry = RETRY_MIN;
    loop {
        tokio::select! {
            biased;
            _ = leading.closed() => break,
            changed = manager.changed() => match changed {
                Ok(leads) => {
                    retry = RETRY_MIN;
                    if !leads {
                        fence.revoke();
                    }
                    if leading.send(leads).is_err() {
                        break;
                    }
                }
                Err(error) => {
                    if *leading.borrow() {
                        fence.revoke();
                        warn!(%error, retry_in = ?retry, "renewing the leader lease failed; no AWS call or cluster write until it is renewed");
                    } else {
                        debug!(%error, retry_in = ?retry, "trying for the leader lease failed");
                    }
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
    fence.revoke();
    observer.abort();
    Ok(manager)
}

/// Opens the fence for each renewal by `identity` the API server shows; closes it when the Lease
/// names another holder or is gone.
async fn observe_lease(leases: Api<Lease>, name: String, identity: String, fence: Fence) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(leases, config)
        .backoff(crate::kube_config::watch_backoff())
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => {
                match renewal_by(&lease, &identity) {
                    Some(renewed) => fence.renewed(renewed),
                    None => fence.revoke(),
                }
            }
            Ok(watcher::Event::Delete(_)) => fence.revoke(),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(error) => debug!(%error, "watching the leader lease"),
        }
    }
}

/// The renewal time of `lease` when `identity` holds it.
fn renewal_by(lease: &Lease, identity: &str) -> Option<SystemTime> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    Some(spec.renew_time.as_ref()?.0.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{api::coordination::v1::LeaseSpec, apimachinery::pkg::apis::meta::v1::MicroTime};

    fn lease(holder: Option<&str>, renewed: Option<jiff::Timestamp>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: renewed.map(MicroTime),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_lease_held_by_us_gives_its_renewal_time() {
        let at: jiff::Timestamp = "2026-12-01T10:00:00.5Z".parse().unwrap();
        let renewed = renewal_by(&lease(Some("me"), Some(at)), "me");
        assert_eq!(renewed, Some(SystemTime::from(at)));
    }

    #[test]
    fn a_lease_held_by_another_or_by_nobody_gives_nothing() {
        let at = jiff::Timestamp::now();
        assert_eq!(renewal_by(&lease(Some("other"), Some(at)), "me"), None);
        assert_eq!(renewal_by(&lease(None, None), "me"), None);
        assert_eq!(renewal_by(&lease(Some("me"), None), "me"), None);
        assert_eq!(renewal_by(&Lease::default(), "me"), None);
    }
}
