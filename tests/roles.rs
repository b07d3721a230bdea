//! Every role starts, serves `/healthz`, `/readyz` and `/metrics` on its admin port, and stops cleanly
//! and promptly on SIGTERM — tested on the real binary over a loopback socket.
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

async fn serves_admin_endpoints_and_stops_on_sigterm(role: &str) {
    let port = free_loopback_port();
    let mut process = start(role, port, &[]);
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
    serves_admin_endpoints_and_stops_on_sigterm("agent").await;
}

#[tokio::test]
async fn controller_serves_admin_endpoints_and_stops_on_sigterm() {
    serves_admin_endpoints_and_stops_on_sigterm("controller").await;
}

#[tokio::test]
async fn webhook_serves_admin_endpoints_and_stops_on_sigterm() {
    serves_admin_endpoints_and_stops_on_sigterm("webhook").await;
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
