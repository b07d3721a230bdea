//! The admission webhook: keeps taint-driven eviction PDB-safe ([`pdb_guard`], `POST /mutate`) and the
//! termination taint after the replacement is Ready ([`order_guard`], `POST /validate`).
//!
//! It serves HTTPS (axum over rustls, certificate files reloaded when they change, see [`tls`]) once
//! its watch caches of Pods, PDBs, Nodes and SpotReplacements are synced ([`cache`]); `/readyz` on the plain admin port
//! says so. The decisions are pure functions of the review and the caches; [`server`] wires them to
//! the routes.
pub mod cache;
pub mod metrics;
pub mod order_guard;
pub mod pdb_guard;
pub mod receive;
pub mod review;
pub mod server;
pub mod taints;
pub mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args as ClapArgs;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{admin, cli::AdminArgs, keys, node::OptInLabel};
use cache::Caches;
use order_guard::OrderSettings;
use taints::{GuardedKeys, KeyPattern};

/// The default identity of the controller (its service account in the Helm chart).
pub const DEFAULT_CONTROLLER_USERNAME: &str =
    "system:serviceaccount:spot-rebalancer:spot-rebalancer-controller";

#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub admin: AdminArgs,

    /// Address of the HTTPS admission server.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:9443")]
    pub listen_addr: SocketAddr,

    /// PEM certificate chain served on --listen-addr; reloaded when the file changes.
    #[arg(
        long,
        env = "TLS_CERT_FILE",
        default_value = "/etc/spot-rebalancer/tls/tls.crt"
    )]
    pub tls_cert_file: PathBuf,

    /// PEM private key of the certificate; reloaded when the file changes.
    #[arg(
        long,
        env = "TLS_KEY_FILE",
        default_value = "/etc/spot-rebalancer/tls/tls.key"
    )]
    pub tls_key_file: PathBuf,

    /// How often to look for a rotated certificate (e.g. `2s`).
    #[arg(long, env = "TLS_RELOAD_INTERVAL", default_value = "2s", value_parser = positive_duration)]
    pub tls_reload_interval: Duration,

    /// Kubeconfig file; without it, the in-cluster service account (or `~/.kube/config`).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Nodes carrying this `KEY=VALUE` label are guarded (the webhook configurations select them too).
    #[arg(long, env = "OPT_IN_LABEL", default_value = "spot-rebalancer.io/enabled=true")]
    pub opt_in_label: OptInLabel,

    /// Key of the termination taint: the order guard watches it (any effect), the PDB guard too.
    #[arg(long, env = "TAINT_KEY", default_value = keys::DEFAULT_TAINT_KEY, value_parser = termination_taint_key)]
    pub taint_key: String,

    /// Other taint keys whose NoExecute taints the PDB guard makes safe, comma-separated; a trailing
    /// `*` matches a prefix. Kubernetes' own `node.kubernetes.io/*` taints are refused.
    #[arg(long, env = "GUARDED_TAINT_KEYS", default_value = taints::NTH_TAINT_KEYS, value_delimiter = ',')]
    pub guarded_taint_keys: Vec<KeyPattern>,

    /// Usernames the controller runs as, comma-separated: they may add the termination taint at any
    /// time.
    #[arg(long = "controller-username", env = "CONTROLLER_USERNAMES",
          default_value = DEFAULT_CONTROLLER_USERNAME, value_delimiter = ',')]
    pub controller_usernames: Vec<String>,

    /// Namespace of the controller's `SpotReplacement` records (the release's, from the downward
    /// API): the order guard reads each node's phase and replacement there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub records_namespace: String,
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

fn termination_taint_key(text: &str) -> Result<String, String> {
    match text.parse::<KeyPattern>()? {
        KeyPattern::Exact(key) => Ok(key),
        KeyPattern::Prefix(_) => Err(format!(
            "{text:?}: the termination taint is one key, not a prefix"
        )),
    }
}

/// The webhook's settings, validated at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub opt_in: OptInLabel,
    /// NoExecute taint keys the PDB guard makes safe (the termination taint key among them).
    pub guarded: GuardedKeys,
    pub order: OrderSettings,
}

impl Settings {
    pub fn new(
        opt_in: OptInLabel,
        taint_key: String,
        guarded_taint_keys: Vec<KeyPattern>,
        controller_usernames: Vec<String>,
    ) -> Self {
        let mut guarded = vec![KeyPattern::Exact(taint_key.clone())];
        guarded.extend(guarded_taint_keys);
        Settings {
            opt_in,
            guarded: GuardedKeys::new(guarded),
            order: OrderSettings {
                taint_key,
                controller_usernames: controller_usernames
                    .into_iter()
                    .map(|name| name.trim().to_owned())
                    .filter(|name| !name.is_empty())
                    .collect(),
            },
        }
    }
}

/// Why the webhook could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    KubeConfig(#[from] crate::kube_config::Error),
    #[error("building the Kubernetes client: {0}")]
    KubeClient(#[source] kube::Error),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the watch caches stopped before they were synced")]
    CachesStopped,
    #[error("--listen-addr {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving admission reviews on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the webhook until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> crate::Result<()> {
    let Args {
        admin,
        listen_addr,
        tls_cert_file,
        tls_key_file,
        tls_reload_interval,
        kubeconfig,
        opt_in_label,
        taint_key,
        guarded_taint_keys,
        controller_usernames,
        records_namespace,
    } = args;
    let settings = Settings::new(opt_in_label, taint_key, guarded_taint_keys, controller_usernames);
    let registry = admin::registry(admin::WEBHOOK);
    let metrics = metrics::Metrics::register(&registry).map_err(Error::from)?;
    let readiness = admin::Readiness::default();
    let admin_server = async {
        admin::serve(
            admin.admin_addr,
            admin::router(registry, readiness.clone()),
            shutdown.clone(),
        )
        .await
        .map_err(crate::Error::from)
    };
    let files = tls::TlsFiles {
        cert: tls_cert_file,
        key: tls_key_file,
    };
    let webhook = async {
        serve(
            Start {
                listen_addr,
                files,
                tls_reload_interval,
                kubeconfig,
                records_namespace,
                settings,
            },
            metrics,
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .map_err(crate::Error::from)
    };
    // The admin server is polled first, so an occupied admin port is the error reported; either
    // failing stops the other.
    tokio::try_join!(admin_server, webhook)?;
    Ok(())
}

struct Start {
    listen_addr: SocketAddr,
    files: tls::TlsFiles,
    tls_reload_interval: Duration,
    kubeconfig: Option<PathBuf>,
    records_namespace: String,
    settings: Settings,
}

async fn serve(
    start: Start,
    metrics: metrics::Metrics,
    readiness: admin::Readiness,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let Start {
        listen_addr,
        files,
        tls_reload_interval,
        kubeconfig,
        records_namespace,
        settings,
    } = start;
    let tls = tls::ReloadingTls::load(files).await?;
    let client = kube_client(kubeconfig).await?;
    let (caches, watches) = Caches::watch(client, &records_namespace);
    let watches = tokio::spawn(watches);
    let stop = shutdown.child_token();
    let _stop_on_return = stop.clone().drop_guard();
    let _end_watches = AbortOnDrop(watches);

    info!(%records_namespace, "syncing the watch caches of pods, PodDisruptionBudgets, nodes and SpotReplacements");
    tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        synced = caches.wait_until_ready() => synced.map_err(|_| Error::CachesStopped)?,
    }
    info!(
        pods = caches.pods.len(),
        pdbs = caches.pdbs.len(),
        nodes = caches.nodes.len(),
        records = caches.records.len(),
        "caches synced"
    );

    let listener = std::net::TcpListener::bind(listen_addr).map_err(|source| Error::Bind {
        addr: listen_addr,
        source,
    })?;
    let addr = listener.local_addr().unwrap_or(listen_addr);
    let config = tls.config.clone();
    tokio::spawn(tls.follow_files(tls_reload_interval, metrics.clone(), stop.clone()));
    let server = server::https_server(listener, config).map_err(|source| Error::Bind { addr, source })?;
    let handle = axum_server::Handle::new();
    {
        let (handle, stop) = (handle.clone(), stop.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            handle.graceful_shutdown(Some(server::SHUTDOWN_GRACE));
        });
    }
    let router = server::router(Arc::new(server::Webhook {
        settings,
        caches,
        metrics,
    }));
    info!(%addr, "admission webhook listening (HTTPS)");
    readiness.set(true);
    let served = server
        .handle(handle)
        .serve(router.into_make_service())
        .await
        .map_err(|source| Error::Serve { addr, source });
    readiness.set(false);
    served
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A Kubernetes client from `--kubeconfig`, or inferred (in-cluster, then `~/.kube/config`).
async fn kube_client(kubeconfig: Option<PathBuf>) -> Result<kube::Client, Error> {
    let mut config = crate::kube_config::load(kubeconfig.as_deref()).await?;
    config.connect_timeout = Some(Duration::from_secs(5));
    kube::Client::try_from(config).map_err(Error::KubeClient)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn defaults_guard_the_termination_taint_and_nth_and_trust_the_controller() {
        let Cli { args } = Cli::try_parse_from(["webhook"]).unwrap();
        let settings = Settings::new(
            args.opt_in_label,
            args.taint_key,
            args.guarded_taint_keys,
            args.controller_usernames,
        );
        assert!(settings.guarded.guards("spot-instance-terminating"));
        assert!(
            settings
                .guarded
                .guards("aws-node-termination-handler/rebalance-recommendation")
        );
        assert_eq!(settings.order.controller_usernames, [DEFAULT_CONTROLLER_USERNAME]);
        assert_eq!(args.listen_addr.port(), 9443);
    }

    #[test]
    fn guarding_kubernetes_taints_fails_at_start_naming_the_flag() {
        let error =
            Cli::try_parse_from(["webhook", "--guarded-taint-keys", "node.kubernetes.io/*"]).unwrap_err();
        assert!(error.to_string().contains("--guarded-taint-keys"), "{error}");
        let error = Cli::try_parse_from(["webhook", "--taint-key", "evict-*"]).unwrap_err();
        assert!(error.to_string().contains("--taint-key"), "{error}");
    }

    #[test]
    fn several_controller_usernames_are_trusted() {
        let Cli { args } = Cli::try_parse_from([
            "webhook",
            "--controller-username",
            "kwok-admin,system:serviceaccount:a:b",
        ])
        .unwrap();
        assert_eq!(
            args.controller_usernames,
            ["kwok-admin", "system:serviceaccount:a:b"]
        );
    }
}
