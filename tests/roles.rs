//! Every role starts, serves `/healthz`, `/readyz` and `/metrics` on its admin port, and stops cleanly
//! and promptly on SIGTERM — tested on the real binary over a loopback socket, each role as its own
//! ServiceAccount with the chart's RBAC.
mod support;

use support::identity::{Role, role_kubeconfig};

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BINARY: &str = env!("CARGO_BIN_EXE_spot-rebalancer");

fn free_loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A role process that is killed if the test fails before it stops it.
struct RoleProcess(Child);

impl Drop for RoleProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(role: &str, admin_port: u16, extra: &[&str]) -> RoleProcess {
    let child = Command::new(BINARY)
        .arg(role)
        .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the spot-rebalancer binary");
    RoleProcess(child)
}

async fn wait_for_ok(url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = reqwest::get(url).await
            && response.status().is_success()
        {
            return response.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "{url} did not answer 200 within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sigterm(process: &RoleProcess) {
    let status = Command::new("kill")
        .args(["-TERM", &process.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_for_exit(process: &mut RoleProcess) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = process.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn serves_admin_endpoints_and_stops_on_sigterm(role: &str, extra: &[&str]) {
    let port = free_loopback_port();
    let mut process = start(role, port, extra);
    let base = format!("http://127.0.0.1:{port}");

    assert_eq!(wait_for_ok(&format!("{base}/healthz")).await, "ok");
    assert_eq!(wait_for_ok(&format!("{base}/readyz")).await, "ready");
    let metrics = wait_for_ok(&format!("{base}/metrics")).await;
    assert!(
        metrics.contains("spot_rebalancer_process_resident_memory_bytes"),
        "process metrics missing from /metrics:\n{metrics}"
    );

    sigterm(&process);
    let status = wait_for_exit(&mut process);
    assert!(status.success(), "{role} exited with {status} after SIGTERM");
    assert!(
        reqwest::get(format!("{base}/healthz")).await.is_err(),
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
    ];
    serves_admin_endpoints_and_stops_on_sigterm("webhook", &args).await;
}

#[test]
fn a_bad_flag_value_fails_at_start_naming_the_flag() {
    let output = Command::new(BINARY)
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
    let output = Command::new(BINARY)
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
    let output = Command::new(BINARY)
        .args(["webhook", "--admin-addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on 127.0.0.1"), "{stderr}");
}
