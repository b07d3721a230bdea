//! Where every role finds the API server: a kubeconfig file when one is given, else the in-cluster
//! service account (or `~/.kube/config`). Each role then sets its own timeouts on the result.
//! Also how every watch retries when the API server fails ([`watch_backoff`]).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (neither in-cluster nor a kubeconfig): {0}")]
    Infer(#[source] kube::config::InferConfigError),
}

/// The client configuration from `kubeconfig`, or inferred from the environment without one.
pub async fn load(kubeconfig: Option<&Path>) -> Result<kube::Config, Error> {
    let Some(path) = kubeconfig else {
        return kube::Config::infer().await.map_err(Error::Infer);
    };
    let kubeconfig_error = |source| Error::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_error)
}

/// First wait before a failed watch is tried again.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between two tries of a failing watch, before jitter (which adds up to as much
/// again: 3 s at most). kube's default (client-go's 30 s, reset only after 2 quiet minutes) left
/// flows waiting 21-67 s after the API server was back; a few watches per process retrying every
/// few seconds cost a recovering API server little.
const WATCH_RETRY_MAX: Duration = Duration::from_millis(1500);

/// The backoff of every watch in this project: exponential with jitter, from 250 ms up to 3 s, and
/// back to the start at the first event (`StreamBackoff` resets on every success).
pub fn watch_backoff() -> kube::runtime::watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(WATCH_RETRY_MIN)
        .with_max_delay(WATCH_RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_kubeconfig_is_an_error_naming_the_file() {
        let error = load(Some(Path::new("/nonexistent/kubeconfig")))
            .await
            .expect_err("no such file");
        assert!(error.to_string().contains("/nonexistent/kubeconfig"), "{error}");
    }

    #[test]
    fn a_failing_watch_is_retried_within_three_seconds_and_forever() {
        let waits: Vec<Duration> = watch_backoff().take(50).collect();
        assert_eq!(waits.len(), 50, "never gives up");
        // Jitter adds up to one more delay on top, so allow twice the cap.
        assert!(waits.iter().all(|wait| *wait <= 2 * WATCH_RETRY_MAX), "{waits:?}");
        assert!(waits[0] < Duration::from_secs(1), "{waits:?}");
    }
}
