//! The node agent: watches this node's instance metadata (IMDS) for rebalance and interruption
//! notices and records them on its own Node.
//!
//! Two tasks share one `watch` channel: the [`poller`] reads IMDS and publishes what it has seen;
//! the [`writer`] compares that with what the Node says and server-side applies the difference.
//! Each retries on its own with backoff, so a slow API server never delays reading IMDS, and a
//! notice seen while the API server is away is written when it comes back.
//!
//! Ready (`/readyz`) once the instance id is known from IMDS and the Node's annotations were read
//! from the API server; later trouble with either shows in the metrics and logs, not in readiness.
pub mod annotations;
pub mod metrics;
pub mod node;
pub mod policy_check;
pub mod poller;
pub mod writer;

use std::{path::PathBuf, time::Duration};

use clap::Args as ClapArgs;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{admin, cli::AdminArgs, imds};

/// The shortest poll interval: IMDS is rate limited per instance, and notices come minutes ahead.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Kubernetes API timeouts: the agent's calls are small; a hung connection must not hold a notice.
/// The deadline is per call ([`api_call`]), not a read timeout on the connection: hyper keeps
/// reading an idle pooled connection (to see the server close it), so a connection read timeout
/// dropped the pooled connection after 15 s idle, and `--api-keepalive` could not keep it open.
const API_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const API_CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub admin: AdminArgs,

    #[command(flatten)]
    pub policy_check: policy_check::PolicyCheckArgs,

    /// Name of the Node this agent runs on (from the downward API, `spec.nodeName`).
    #[arg(long, env = "NODE_NAME", value_parser = parse_node_name)]
    pub node_name: String,

    /// How often to read the notices from IMDS (e.g. `5s`, `1500ms`; at least 1s).
    #[arg(long, env = "POLL_INTERVAL", default_value = "5s", value_parser = parse_poll_interval)]
    pub poll_interval: Duration,

    /// Longest wait between attempts while IMDS or the API server keeps failing (never below the
    /// poll interval).
    #[arg(long, env = "BACKOFF_MAX", default_value = "30s", value_parser = parse_duration)]
    pub backoff_max: Duration,

    /// While idle, make a tiny request (`GET /version`) this often so the API server connection
    /// stays open and a notice's write needs no new TLS handshake (`0s`: never). The API server
    /// closes connections idle for 90 s, so keep it below that.
    #[arg(long, env = "API_KEEPALIVE", default_value = "60s", value_parser = parse_duration)]
    pub api_keepalive: Duration,

    /// Base URL of the instance metadata service: plain `http://`, as IMDS is (link-local HTTP).
    #[arg(
        long,
        env = "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        default_value = "http://169.254.169.254",
        value_parser = imds::validate_endpoint
    )]
    pub imds_endpoint: String,

    /// Kubeconfig file; without it, the in-cluster service account (or `~/.kube/config`).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Once ready, give the pages of the binary's code used only at start-up back to the kernel
    /// (`madvise(MADV_PAGEOUT)`), so they stop counting in the agent's resident memory.
    #[arg(long, env = "PAGE_OUT_START_UP_CODE", default_value_t = true, action = clap::ArgAction::Set)]
    pub page_out_start_up_code: bool,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    KubeConfig(#[from] crate::kube_config::Error),
    #[error("--imds-endpoint: {reason}")]
    ImdsEndpoint { reason: String },
    #[error("building the Kubernetes client: {0}")]
    KubeClient(#[source] kube::Error),
    #[error("reading Node {node}: {source}")]
    ReadNode {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    PolicyNotEnforced(#[from] policy_check::Error),
    #[error("annotating Node {node}: {source}")]
    AnnotateNode {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> crate::Result<()> {
    let Args {
        admin,
        policy_check: policy,
        node_name,
        poll_interval,
        backoff_max,
        api_keepalive,
        imds_endpoint,
        kubeconfig,
        page_out_start_up_code,
    } = args;
    let registry = admin::registry(admin::AGENT);
    let metrics = metrics::Metrics::register(&registry);
    let readiness = admin::Readiness::default();
    let client = kube_client(kubeconfig).await?;
    let imds = imds::Imds::new(&imds_endpoint).map_err(|reason| Error::ImdsEndpoint { reason })?;
    tracing::info!(
        node = %node_name,
        poll_interval = %humantime::format_duration(poll_interval),
        imds = %imds_endpoint,
        "agent starting"
    );

    let (seen, seen_by_writer) = watch::channel(None);
    let work = shutdown.child_token();
    let poller = poller::Poller {
        imds,
        interval: poll_interval,
        backoff_max,
        metrics: metrics.clone(),
        seen,
    };
    let writer = writer::Writer {
        node: node::OwnNode::new(client.clone(), node_name),
        interval: poll_interval,
        backoff_max,
        keepalive: (!api_keepalive.is_zero()).then_some(api_keepalive),
        metrics,
        readiness: readiness.clone(),
    };
    let served = async {
        let served = admin::serve(
            admin.admin_addr,
            admin::router(registry, readiness.clone()),
            shutdown.clone(),
        )
        .await;
        // The admin server ends on shutdown, or because it could not start: either way, stop.
        work.cancel();
        served
    };
    // Every line the agent logs names its node.
    let span = tracing::info_span!("agent", node = %writer.node.name());
    let (node, written) = (
        writer.node.name().to_owned(),
        writer.run(seen_by_writer, work.clone()),
    );
    let paged_out = async {
        if page_out_start_up_code {
            crate::code_pages::page_out_once_ready(&readiness, poll_interval, &work).await;
        }
    };
    let (served, (), proven, ()) = tokio::join!(
        served,
        poller.run(work.clone()).instrument(span.clone()),
        policy_check::then_run(policy, client, &node, written, &work, &shutdown).instrument(span.clone()),
        paged_out.instrument(span)
    );
    proven.map_err(Error::from)?;
    served?;
    Ok(())
}

async fn kube_client(kubeconfig: Option<PathBuf>) -> Result<kube::Client, Error> {
    let mut config = crate::kube_config::load(kubeconfig.as_deref()).await?;
    config.connect_timeout = Some(API_CONNECT_TIMEOUT);
    // No read or write timeout on the connection: see API_CALL_TIMEOUT.
    config.read_timeout = None;
    config.write_timeout = None;
    kube::Client::try_from(config).map_err(Error::KubeClient)
}

/// One Kubernetes API call of the agent, given up after [`API_CALL_TIMEOUT`] (its connection is
/// dropped with it), so a hung API server never holds a notice for longer.
pub(crate) async fn api_call<T>(
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    tokio::time::timeout(API_CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Service(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer from the API server within {}",
                    humantime::format_duration(API_CALL_TIMEOUT)
                ),
            ))))
        })
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|error| format!("{value:?} is not a duration like 5s: {error}"))
}

fn parse_poll_interval(value: &str) -> Result<Duration, String> {
    let interval = parse_duration(value)?;
    if interval < MIN_POLL_INTERVAL {
        return Err(format!(
            "{value} is below the minimum of {}",
            humantime::format_duration(MIN_POLL_INTERVAL)
        ));
    }
    Ok(interval)
}

/// A Node name is a DNS subdomain (RFC 1123): lower-case letters, digits, `-` and `.`.
fn parse_node_name(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not a Node name (a lower-case DNS subdomain)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Role};

    fn parse(args: &[&str]) -> Result<super::Args, clap::Error> {
        let argv = ["spot-rebalancer", "agent"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| match cli.role {
            Role::Agent(args) => args,
            other => panic!("parsed as another role: {other:?}"),
        })
    }

    #[test]
    fn defaults_poll_every_five_seconds_at_the_link_local_imds() {
        let args = parse(&["--node-name", "ip-10-0-0-1.ec2.internal"]).unwrap();
        assert_eq!(args.node_name, "ip-10-0-0-1.ec2.internal");
        assert_eq!(args.poll_interval, std::time::Duration::from_secs(5));
        assert_eq!(args.backoff_max, std::time::Duration::from_secs(30));
        assert_eq!(args.api_keepalive, std::time::Duration::from_secs(60));
        assert_eq!(args.imds_endpoint, "http://169.254.169.254");
    }

    #[test]
    fn durations_are_human_readable() {
        let args = parse(&[
            "--node-name",
            "n1",
            "--poll-interval",
            "1500ms",
            "--backoff-max",
            "2m",
        ])
        .unwrap();
        assert_eq!(args.poll_interval, std::time::Duration::from_millis(1500));
        assert_eq!(args.backoff_max, std::time::Duration::from_secs(120));
    }

    #[test]
    fn bad_values_fail_naming_the_flag() {
        for (args, flag) in [
            (
                &["--node-name", "n1", "--poll-interval", "500ms"][..],
                "--poll-interval",
            ),
            (
                &["--node-name", "n1", "--poll-interval", "often"][..],
                "--poll-interval",
            ),
            (
                &["--node-name", "n1", "--backoff-max", "soon"][..],
                "--backoff-max",
            ),
            (&["--node-name", "Node_1"][..], "--node-name"),
            (
                &["--node-name", "n1", "--imds-endpoint", "169.254.169.254"][..],
                "--imds-endpoint",
            ),
            (&[][..], "--node-name"),
        ] {
            let error = parse(args).expect_err("must be refused");
            assert!(error.to_string().contains(flag), "{args:?}: {error}");
        }
    }
}
