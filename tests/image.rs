//! The shipped image against the bed: each role runs from the image built by the `Dockerfile`
//! (`$SPOT_REBALANCER_IMAGE`, made by `scripts/image`) in a container with the chart's security
//! context — user 65532, a read-only root file system, every capability dropped, no privilege
//! escalation, Docker's default seccomp profile — and its own ServiceAccount under the chart's RBAC
//! (the tests' [`identity`](support::identity) tokens). Each role must come up (`/readyz`) and stop
//! cleanly on SIGTERM; the agent must annotate its Node from AWS's metadata mock.
//!
//! The containers share the host's network (`--network host`): the bed's API server and moto listen
//! on loopback only. Their files (kubeconfig, CA, the webhook's certificate) are mounted read-only.
//!
//! Not part of `cargo test --tests` (`test = false` in Cargo.toml: it needs Docker and a built
//! image); `scripts/test` runs it with `cargo test --test image` after building the image.
mod support;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use support::{
    Bed,
    agent::{INSTANCE_ID, ImdsMock, MOCK_INSTANCE_ID, REBALANCE_NOTICE_TIME, TestNode},
    identity::{NAMESPACE, Role, install_records, role_kubeconfig},
    unique,
    webhook::{TestCerts, free_loopback_port},
};

/// The rebalance recommendation's notice time the mock shows, pinned (`-r`).
const NOTICE_TIME: &str = "2020-10-27T08:22:00Z";
/// Where the staged files appear inside the container.
const CONFIG_DIR: &str = "/etc/spot-rebalancer";
/// How long a role may take to answer `/readyz` (the first one also waits for the chart's RBAC).
const READY_WITHIN: Duration = Duration::from_secs(60);

fn image() -> String {
    std::env::var("SPOT_REBALANCER_IMAGE").unwrap_or_else(|_| {
        panic!("SPOT_REBALANCER_IMAGE names no image: build one with scripts/image and set it")
    })
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker")
}

/// Files for one container, in a folder the container's user can read (a test's temporary folders
/// are 0700 and belong to whoever runs the tests).
struct Staged {
    dir: tempfile::TempDir,
}

impl Staged {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Staged { dir }
    }

    /// Copies `text` into the folder as `name`, readable by the container; returns its path inside
    /// the container.
    fn put(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        format!("{CONFIG_DIR}/{name}")
    }

    /// A role's kubeconfig, with the CA file it names staged beside it.
    fn kubeconfig(&self, path: &Path) -> String {
        let text = std::fs::read_to_string(path).unwrap();
        let text = match text
            .lines()
            .find_map(|line| line.trim().strip_prefix("certificate-authority: "))
        {
            Some(ca) => {
                let inside = self.put("ca.crt", &std::fs::read_to_string(ca).unwrap());
                text.replace(
                    &format!("certificate-authority: {ca}"),
                    &format!("certificate-authority: {inside}"),
                )
            }
            None => text,
        };
        self.put("kubeconfig", &text)
    }
}

/// A role running from the image; removed (with its log printed) when dropped.
struct Container {
    name: String,
    admin: String,
    _staged: Staged,
}

impl Container {
    /// `docker run` of `role` with the chart's security context, its admin port on loopback.
    fn start(role: &str, staged: Staged, env: &[(&str, &str)], args: &[&str]) -> Self {
        let name = unique(&format!("image-{role}"));
        let admin_port = free_loopback_port();
        let mount = format!("{}:{CONFIG_DIR}:ro", staged.dir.path().display());
        let admin_addr = format!("127.0.0.1:{admin_port}");
        let mut run: Vec<&str> = vec![
            "run",
            "--detach",
            "--name",
            &name,
            "--network",
            "host",
            "--read-only",
            "--user",
            "65532:65532",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--volume",
            &mount,
        ];
        let env: Vec<String> = env.iter().map(|(key, value)| format!("{key}={value}")).collect();
        for pair in &env {
            run.extend(["--env", pair]);
        }
        let image = image();
        run.extend([&image, role, "--admin-addr", &admin_addr, "--log-format", "plain"]);
        run.extend(args);
        let output = docker(&run);
        assert!(
            output.status.success(),
            "docker run {role}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Container {
            name,
            admin: format!("http://{admin_addr}"),
            _staged: staged,
        }
    }

    fn logs(&self) -> String {
        let output = docker(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// The process as Docker sees it: whether it runs, and its exit code once it stopped.
    fn state(&self) -> (bool, i64) {
        let output = docker(&[
            "inspect",
            "--format",
            "{{.State.Running}} {{.State.ExitCode}}",
            &self.name,
        ]);
        let text = String::from_utf8_lossy(&output.stdout);
        let (running, code) = text.trim().split_once(' ').expect("docker inspect's state");
        (running == "true", code.parse().unwrap())
    }

    /// Waits until `/readyz` answers `ready`; fails with the container's log if it stops first.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(response) = reqwest::get(format!("{}/readyz", self.admin)).await
                && response.status().is_success()
            {
                assert_eq!(response.text().await.unwrap(), "ready");
                return;
            }
            let (running, code) = self.state();
            assert!(running, "{} exited with {code}:\n{}", self.name, self.logs());
            assert!(
                Instant::now() < deadline,
                "{} was not ready within {READY_WITHIN:?}:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `docker stop` (SIGTERM, SIGKILL after 10 s) and the exit code.
    fn stop(&self) -> i64 {
        let output = docker(&["stop", "--time", "10", &self.name]);
        assert!(
            output.status.success(),
            "docker stop: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (running, code) = self.state();
        assert!(!running);
        code
    }

    /// Ready, then a clean exit (0) on SIGTERM.
    async fn comes_up_and_stops_cleanly(&self) {
        self.wait_ready().await;
        let metrics = reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            // `spot_rebalancer_process_…` today, `process_…` once the registry serves it unprefixed.
            metrics.contains("process_resident_memory_bytes"),
            "process metrics missing from /metrics:\n{metrics}"
        );
        let code = self.stop();
        assert_eq!(
            code,
            0,
            "{} exited with {code} after SIGTERM:\n{}",
            self.name,
            self.logs()
        );
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.name, self.logs());
        }
        let _ = docker(&["rm", "--force", &self.name]);
    }
}

#[tokio::test]
async fn the_image_runs_the_binary_as_user_65532_and_has_no_shell() {
    let output = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}} {{json .Config.Entrypoint}}",
        &image(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        r#"65532:65532 ["/usr/local/bin/spot-rebalancer"]"#
    );
    // No shell: nothing in the image but the binaries, libc and the CA bundle.
    let shell = docker(&["run", "--rm", "--entrypoint", "/bin/sh", &image(), "-c", "true"]);
    assert!(!shell.status.success(), "the image has a shell");
    let refusal = String::from_utf8_lossy(&shell.stderr);
    assert!(
        refusal.contains("/bin/sh") && refusal.contains("no such file"),
        "docker run failed otherwise: {refusal}"
    );
}

#[tokio::test]
async fn the_agent_in_the_image_annotates_its_node_from_the_metadata_mock() {
    let bed = Bed::connect().await;
    let node = TestNode::create(&bed, "image-agent").await;
    // -I: IMDSv2 only; a rebalance recommendation from the start, pinned; no interruption notice.
    let mock = ImdsMock::start(&bed, &["spot", "-I", "-d", "86400", "-r", NOTICE_TIME]).await;
    let staged = Staged::new();
    let kubeconfig = staged.kubeconfig(&role_kubeconfig(&bed, Role::Agent { node: &node.name }));
    let endpoint = mock.endpoint();
    let agent = Container::start(
        "agent",
        staged,
        &[],
        &[
            "--node-name",
            &node.name,
            "--imds-endpoint",
            &endpoint,
            "--kubeconfig",
            &kubeconfig,
            "--poll-interval",
            "1s",
        ],
    );
    agent.wait_ready().await;
    assert_eq!(
        node.wait_for_annotation(REBALANCE_NOTICE_TIME, Duration::from_secs(30))
            .await,
        NOTICE_TIME
    );
    assert_eq!(node.annotations().await[INSTANCE_ID], MOCK_INSTANCE_ID);
    agent.comes_up_and_stops_cleanly().await;
}

#[tokio::test]
async fn the_controller_in_the_image_comes_up_and_stops_cleanly() {
    let bed = Bed::connect().await;
    let lease = unique("image-controller");
    install_records(&bed);
    let staged = Staged::new();
    let kubeconfig = staged.kubeconfig(&role_kubeconfig(&bed, Role::Controller));
    let controller = Container::start(
        "controller",
        staged,
        &[
            ("AWS_ENDPOINT_URL", &bed.aws_endpoint),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
        &[
            "--kubeconfig",
            &kubeconfig,
            "--lease-name",
            &lease,
            "--lease-namespace",
            NAMESPACE,
        ],
    );
    controller.comes_up_and_stops_cleanly().await;
}

#[tokio::test]
async fn the_webhook_in_the_image_comes_up_and_stops_cleanly() {
    let bed = Bed::connect().await;
    // The webhook is ready once its cache of the controller's records is filled.
    install_records(&bed);
    let certs = TestCerts::new();
    let staged = Staged::new();
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap();
    let cert = staged.put("tls.crt", &read(certs.cert_path()));
    let key = staged.put("tls.key", &read(certs.key_path()));
    let kubeconfig = staged.kubeconfig(&role_kubeconfig(&bed, Role::Webhook));
    let port = free_loopback_port();
    let listen = format!("127.0.0.1:{port}");
    let webhook = Container::start(
        "webhook",
        staged,
        &[],
        &[
            "--listen-addr",
            &listen,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--kubeconfig",
            &kubeconfig,
            "--records-namespace",
            NAMESPACE,
        ],
    );
    webhook.wait_ready().await;
    // Its HTTPS port answers with the staged certificate (rustls in the image, from the CA file).
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let response = client
        .get(format!("https://127.0.0.1:{port}/"))
        .send()
        .await
        .expect("the webhook's HTTPS port answers");
    assert!(
        response.status().is_client_error(),
        "GET / answered {}",
        response.status()
    );
    webhook.comes_up_and_stops_cleanly().await;
}
