//! Every role starts, serves `/healthz`, `/readyz` and `/metrics` on its admin port, and stops cleanly
//! and promptly on SIGTERM — tested on the real binary over a loopback socket, each role as its own
//! ServiceAccount with the chart's RBAC.
mod support;

use support::identity::{Role, role_kubeconfig};

use std::{net::TcpListener, time::Duration};

use support::process::{RoleCommand, command, free_port as free_loopback_port};

async fn serves_admin_endpoints_and_stops_on_sigterm(role: &str, extra: &[&str]) {
    let mut process = RoleCommand::new(role).args(extra).spawn();
    let wait = Duration::from_secs(20);

    assert_eq!(process.wait_ok("/healthz", wait).await, "ok");
    assert_eq!(process.wait_ok("/readyz", wait).await, "ready");
    let metrics = process.wait_ok("/metrics", wait).await;
    assert!(
        metrics.contains("\nprocess_resident_memory_bytes "),
        "process metrics missing from /metrics:\n{metrics}"
    );

    let status = process.terminate();
    assert!(status.success(), "{role} exited with {status} after SIGTERM");
    assert!(
        process.get("/healthz").await.is_none(),
        "the admin port is still open"
    );
}

#[tokio::test]
async fn agent_serves_admin_endpoints_and_stops_on_sigterm() {
    // The agent is ready once it knows its instance id (from IMDS) and has read its own Node (from
    // the API server), so it gets both: AWS's IMDS mock and a Node on the bed.
    let bed = support::Bed::connect().await;
    let node = support::agent::TestNode::create(&bed, "roles-agent").await;
    let imds = support::agent::ImdsMock::start(
        &bed,
        &["spot", "-I", "-d", "86400", "--rebalance-delay-sec", "86400"],
    )
    .await;
    let kubeconfig = role_kubeconfig(&bed, Role::Agent { node: &node.name });
    let endpoint = imds.endpoint();
    let args = [
        "--node-name",
        &node.name,
        "--imds-endpoint",
        &endpoint,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    serves_admin_endpoints_and_stops_on_sigterm("agent", &args).await;
}

#[tokio::test]
async fn controller_serves_admin_endpoints_and_stops_on_sigterm() {
    // The controller is ready once it reaches the API server and takes part in leader election.
    let bed = support::Bed::connect().await;
    let lease = support::unique("roles-controller");
    // The records' CRD and the chart's grant to keep them.
    support::identity::install_records(&bed);
    let kubeconfig = role_kubeconfig(&bed, Role::Controller);
    let args = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--lease-name",
        &lease,
        "--lease-namespace",
        support::identity::NAMESPACE,
    ];
    serves_admin_endpoints_and_stops_on_sigterm("controller", &args).await;
}

#[tokio::test]
async fn webhook_serves_admin_endpoints_and_stops_on_sigterm() {
    // The webhook is ready once its caches of the cluster are synced and it serves HTTPS, so it gets
    // the bed's API server and a test certificate.
    let bed = support::Bed::connect().await;
    let certs = support::webhook::TestCerts::new();
    let listen = format!("127.0.0.1:{}", free_loopback_port());
    let (cert, key) = (certs.cert_path(), certs.key_path());
    let kubeconfig = role_kubeconfig(&bed, Role::Webhook);
    let args = [
        "--listen-addr",
        &listen,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        // Its Role on the controller's records is in the release namespace.
        "--records-namespace",
        support::identity::NAMESPACE,
    ];
    support::identity::install_records(&bed);
    serves_admin_endpoints_and_stops_on_sigterm("webhook", &args).await;
}

#[test]
fn a_bad_flag_value_fails_at_start_naming_the_flag() {
    let output = command()
        .args(["controller", "--admin-addr", "not-an-address"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--admin-addr"),
        "stderr does not name the flag: {stderr}"
    );
}

#[test]
fn a_bad_environment_value_fails_at_start_naming_the_flag() {
    let output = command()
        .arg("agent")
        .env("ADMIN_ADDR", "nowhere")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--admin-addr"),
        "stderr does not name the flag: {stderr}"
    );
}

#[test]
fn an_occupied_admin_port_is_a_clear_start_up_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = command()
        .args(["webhook", "--admin-addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on 127.0.0.1"), "{stderr}");
}

/// Environment that leaves the machine's CA store empty for the native loader (the AWS SDK's): a
/// bundle file that does not exist and an empty certificate directory.
fn without_ca_store(dir: &std::path::Path) -> [(&'static str, std::path::PathBuf); 2] {
    [
        ("SSL_CERT_FILE", dir.join("no-such-bundle.pem")),
        ("SSL_CERT_DIR", dir.to_owned()),
    ]
}

#[test]
fn the_controller_without_a_ca_store_stops_at_start_saying_what_is_missing() {
    let empty = tempfile::tempdir().unwrap();
    let mut controller = command();
    controller
        .args(["controller", "--admin-addr", "127.0.0.1:0"])
        .env_remove("AWS_ENDPOINT_URL")
        .envs(without_ca_store(empty.path()));
    let output = controller.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a start-up error, not a panic: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needed in ["no CA certificates found", "SSL_CERT_FILE=", "ca-certificates"] {
        assert!(stderr.contains(needed), "{needed:?} missing from: {stderr}");
    }
}

#[tokio::test]
async fn the_agent_needs_no_ca_store_to_poll_plain_http_imds() {
    // IMDS is plain HTTP and the API server's CA comes from the kubeconfig: a node without a CA
    // bundle (a minimal host or container image) still gets a working agent.
    let bed = support::Bed::connect().await;
    let node = support::agent::TestNode::create(&bed, "roles-agent-no-ca").await;
    let imds = support::agent::ImdsMock::start(
        &bed,
        &["spot", "-I", "-d", "86400", "--rebalance-delay-sec", "86400"],
    )
    .await;
    let kubeconfig = role_kubeconfig(&bed, Role::Agent { node: &node.name });
    let endpoint = imds.endpoint();
    let empty = tempfile::tempdir().unwrap();
    let mut agent = RoleCommand::new("agent").args([
        "--node-name",
        &node.name,
        "--imds-endpoint",
        &endpoint,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]);
    for (key, value) in without_ca_store(empty.path()) {
        agent = agent.env(key, value);
    }
    let mut agent = agent.spawn();
    let wait = Duration::from_secs(20);
    // Ready means it read its instance id from IMDS and its Node from the API server.
    assert_eq!(agent.wait_ok("/readyz", wait).await, "ready");
    let metrics = agent.wait_ok("/metrics", wait).await;
    assert!(
        metrics.lines().any(|line| line
            .starts_with("spot_rebalancer_agent_last_successful_poll_timestamp_seconds ")
            && !line.ends_with(" 0")),
        "no successful IMDS poll:\n{metrics}"
    );
    let status = agent.terminate();
    assert!(status.success(), "the agent exited with {status}");
}
