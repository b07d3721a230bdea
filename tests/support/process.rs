//! One wrapper for every role process the tests start: the real `spot-rebalancer <role>` binary on a
//! loopback admin port, with an environment cleared of every variable the command line reads (taken
//! from the CLI definition itself, so a stray `OPT_IN_LABEL` in the test's environment cannot leak
//! in), its stdout and stderr in a log file printed when the test fails, and the steps every test
//! needs: wait ready, read metrics, SIGTERM, SIGKILL, and a kill when dropped.
use std::{
    collections::BTreeSet,
    ffi::OsStr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use clap::CommandFactory;
use spot_rebalancer::cli::Cli;

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_spot-rebalancer");

/// A loopback TCP port for a process to listen on: below the kernel's ephemeral range, so no
/// outgoing connection (the tests', the bed's, a role's) can be given it between this choice and the
/// process's bind (a port from `bind(:0)` is an ephemeral one, and an agent's admin server once found
/// its port taken that way); free when asked (bound and let go); never handed out twice by this test
/// binary.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let (low, high) = (PRIVATE_PORTS_FROM, ephemeral_ports_from());
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..1_000 {
        let port = fastrand::u16(low..high);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// The lowest port free_port hands out (above the well-known and most registered services').
const PRIVATE_PORTS_FROM: u16 = 20_000;

/// The first port of the kernel's ephemeral range (`ip_local_port_range`; 32768 by default).
fn ephemeral_ports_from() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .filter(|&from| from > PRIVATE_PORTS_FROM + 1_000)
        .unwrap_or(32_768)
}

/// Every environment variable a flag of any role reads, from `Cli::command()`.
pub fn cli_env_vars() -> BTreeSet<String> {
    fn collect(command: &clap::Command, into: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(name) = arg.get_env() {
                into.insert(name.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            collect(sub, into);
        }
    }
    let mut names = BTreeSet::new();
    collect(&Cli::command(), &mut names);
    names
}

/// `spot-rebalancer` with none of the CLI's variables in its environment (for a one-shot run:
/// `.output()`).
pub fn command() -> Command {
    command_of(BINARY)
}

/// [`command`] for another build of the binary (the benches compare builds).
pub fn command_of(binary: &str) -> Command {
    let mut command = Command::new(binary);
    for name in cli_env_vars() {
        command.env_remove(name);
    }
    command
}

/// How a role is started; [`RoleCommand::spawn`] starts it.
pub struct RoleCommand {
    command: Command,
    label: String,
    admin_port: u16,
    dir: tempfile::TempDir,
}

impl RoleCommand {
    /// `spot-rebalancer <role> --admin-addr 127.0.0.1:<free port>`, with no variable of the CLI's in
    /// its environment, `RUST_LOG=info,spot_rebalancer=debug` and `NO_COLOR=1` unless overridden.
    pub fn new(role: &str) -> Self {
        Self::of(BINARY, role)
    }

    /// [`RoleCommand::new`] with another build of the binary.
    pub fn of(binary: &str, role: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin_port = free_port();
        let mut command = command_of(binary);
        command
            .arg(role)
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .env("RUST_LOG", "info,spot_rebalancer=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        RoleCommand {
            command,
            label: role.to_owned(),
            admin_port,
            dir,
        }
    }

    /// The name the process goes by in assertion messages and its printed log.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.command.env_remove(key);
        self
    }

    /// A directory that lives as long as the process (for files it is given).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn spawn(mut self) -> RoleProcess {
        let log_path = self.dir.path().join("role.log");
        let log = std::fs::File::create(&log_path).unwrap();
        self.command.stdout(log.try_clone().unwrap()).stderr(log);
        let child = self
            .command
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.label));
        RoleProcess {
            child: Some(child),
            label: self.label,
            admin: format!("http://127.0.0.1:{}", self.admin_port),
            admin_port: self.admin_port,
            log_path,
            _dir: self.dir,
            http: reqwest::Client::new(),
        }
    }
}

/// A running role, SIGKILLed when dropped; its log is printed when the test is failing (or always
/// with `E2E_SHOW_LOGS`).
pub struct RoleProcess {
    child: Option<Child>,
    pub label: String,
    /// `http://127.0.0.1:PORT` of its admin server.
    pub admin: String,
    pub admin_port: u16,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl RoleProcess {
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the process was started")
    }

    /// Everything it wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// GET on the admin server: (status, body), or `None` while nothing answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = self.http.get(format!("{}{path}", self.admin)).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// Waits until `path` answers 200 and returns its body; fails if the process exits first.
    pub async fn wait_ok(&mut self, path: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, body)) = self.get(path).await {
                return body;
            }
            assert!(
                self.is_running(),
                "{} exited before {path} answered 200:\n{}",
                self.label,
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "{} did not answer 200 on {path} within {timeout:?}",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> String {
        self.wait_ok("/readyz", timeout).await
    }

    /// The Prometheus text of `/metrics`, or `None` while the admin server is not up.
    pub async fn try_metrics(&self) -> Option<String> {
        match self.get("/metrics").await? {
            (200, text) => Some(text),
            _ => None,
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let (status, text) = self
            .get("/metrics")
            .await
            .unwrap_or_else(|| panic!("{} serves /metrics", self.label));
        assert_eq!(status, 200, "{} /metrics answered {status}: {text}", self.label);
        text
    }

    /// Sends SIGTERM (the process may still be running when this returns).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let label = self.label.clone();
        let child = self.child.as_mut().expect("the process was started");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{label} did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status (within 10 s).
    pub fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGKILL: no chance to clean up, as when a node dies under the pod.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() || std::env::var_os("E2E_SHOW_LOGS").is_some() {
            eprintln!(
                "----- {} log -----\n{}\n----- end of {} log -----",
                self.label,
                self.log(),
                self.label
            );
        }
    }
}
