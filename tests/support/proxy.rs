//! Cutting a role off from the API server: a loopback TCP proxy between it and the bed's API server,
//! and a kubeconfig that points through it. Used by the agent's and the controller's tests.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

use super::Bed;

/// A loopback TCP proxy in front of the API server. `cut` closes every connection and refuses new
/// ones (as if the API server were gone); `restore` lets them through again. TLS passes through
/// untouched: the API server's certificate is valid for 127.0.0.1 on any port. `connections`
/// counts the connections it let through.
pub struct TcpProxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    connections: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (accept_open, accept_count, accept_connections, accept_stop) =
            (open.clone(), accepted.clone(), connections.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    () = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                if !accept_open.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                accept_count.fetch_add(1, Ordering::SeqCst);
                let cut = accept_connections.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        TcpProxy {
            addr,
            open,
            accepted,
            connections,
            stop,
        }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        let mut connections = self.connections.lock().unwrap();
        connections.cancel();
        *connections = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// How many connections the proxy has let through so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.connections.lock().unwrap().cancel();
    }
}

/// The API server's address, from the bed's kubeconfig (`https://127.0.0.1:PORT`).
pub fn apiserver_addr(bed: &Bed) -> SocketAddr {
    let text = std::fs::read_to_string(&bed.vars["BED_KUBECONFIG"]).unwrap();
    let server = server_url(&text);
    let host_port = server.strip_prefix("https://").expect("an https server URL");
    host_port
        .trim_end_matches('/')
        .parse()
        .expect("a loopback IP:port server")
}

fn server_url(kubeconfig: &str) -> String {
    kubeconfig
        .lines()
        .find_map(|line| line.trim().strip_prefix("server:"))
        .expect("the kubeconfig names a server")
        .trim()
        .to_owned()
}

/// `kubeconfig` (one of the bed's) with its server URL pointed at `addr` (a [`TcpProxy`]), written
/// into `dir`.
pub fn kubeconfig_through(kubeconfig: &Path, addr: SocketAddr, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    let rewritten = text.replace(&server_url(&text), &format!("https://{addr}"));
    for line in rewritten.lines().map(str::trim) {
        if let Some((key, file)) = line.split_once(": ")
            && ["certificate-authority", "client-certificate", "client-key"].contains(&key)
        {
            assert!(
                Path::new(file).is_absolute(),
                "{key} {file} would not resolve from {}",
                dir.display()
            );
        }
    }
    let path = dir.join("kubeconfig-through-proxy");
    std::fs::write(&path, rewritten).unwrap();
    path
}
