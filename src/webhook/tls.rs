//! The serving certificate: loaded from PEM files at start, and reloaded whenever the files change
//! (cert-manager rotates the Secret, the kubelet swaps the mounted files). A reload swaps the rustls
//! configuration for new connections only; open connections and their requests finish undisturbed.
//! A half-written pair (a certificate whose key has not arrived yet) is refused and retried, never
//! served.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum_server::tls_rustls::RustlsConfig;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert-file {}: {source}", path.display())]
    ReadCert { path: PathBuf, source: std::io::Error },
    #[error("--tls-key-file {}: {source}", path.display())]
    ReadKey { path: PathBuf, source: std::io::Error },
    #[error("--tls-cert-file {} with --tls-key-file {}: {source}", cert.display(), key.display())]
    Invalid {
        cert: PathBuf,
        key: PathBuf,
        source: std::io::Error,
    },
}

/// Where the certificate chain and key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The PEM contents last looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl TlsFiles {
    async fn read(&self) -> Result<Pem, TlsError> {
        let cert = read(&self.cert).await.map_err(|source| TlsError::ReadCert {
            path: self.cert.clone(),
            source,
        })?;
        let key = read(&self.key).await.map_err(|source| TlsError::ReadKey {
            path: self.key.clone(),
            source,
        })?;
        Ok(Pem { cert, key })
    }

    fn invalid(&self, source: std::io::Error) -> TlsError {
        TlsError::Invalid {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        }
    }
}

/// A serving configuration of the pair that offers HTTP/1.1 only (ALPN): the server speaks nothing
/// else, because hyper's HTTP/2 server closes neither slow nor idle connections
/// (see `server::https_server`).
async fn http1_config(pem: &Pem) -> std::io::Result<RustlsConfig> {
    let parsed = RustlsConfig::from_pem(pem.cert.clone(), pem.key.clone()).await?;
    let mut config = (*parsed.get_inner()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(RustlsConfig::from_config(Arc::new(config)))
}

async fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    tokio::fs::read(path).await
}

/// A serving configuration that follows its files.
pub struct ReloadingTls {
    pub config: RustlsConfig,
    files: TlsFiles,
    loaded: Pem,
}

impl ReloadingTls {
    /// Loads the certificate and key, or fails naming the flag and the problem.
    pub async fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let loaded = files.read().await?;
        let config = http1_config(&loaded)
            .await
            .map_err(|source| files.invalid(source))?;
        Ok(ReloadingTls {
            config,
            files,
            loaded,
        })
    }

    /// Looks at the files every `interval` until `stop`, and serves a changed pair once it is
    /// complete and valid.
    pub async fn follow_files(mut self, interval: Duration, metrics: Metrics, stop: CancellationToken) {
        // The last pair refused, so a broken pair is reported once, not on every look.
        let mut refused: Option<Pem> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let pem = match self.files.read().await {
                Ok(pem) => pem,
                Err(error) => {
                    tracing::debug!(%error, "certificate files not readable right now; keeping the served one");
                    continue;
                }
            };
            if pem == self.loaded || refused.as_ref() == Some(&pem) {
                continue;
            }
            match http1_config(&pem).await {
                Ok(config) => {
                    self.config.reload_from_config(config.get_inner());
                    tracing::info!(cert = %self.files.cert.display(), "serving the rotated certificate");
                    metrics.tls_reload(true);
                    self.loaded = pem;
                    refused = None;
                }
                Err(source) => {
                    let error = self.files.invalid(source);
                    tracing::warn!(%error, "not serving the changed certificate files (yet); keeping the served one");
                    metrics.tls_reload(false);
                    refused = Some(pem);
                }
            }
        }
    }
}
