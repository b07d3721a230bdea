//! Where every role finds the API server: a kubeconfig file when one is given, else the in-cluster
//! service account (or `~/.kube/config`). Each role then sets its own timeouts on the result.
use std::path::{Path, PathBuf};

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
}
