//! The end of a node's life on the bed: workloads on a node group (Deployment, DaemonSet, PDB), a
//! watch that checks a PDB is never violated at any change, the seat in the controller's record, and a
//! spot reclaim behind the controller's back.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::Pod,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::{Value, json};

use super::{
    Bed,
    controller::{Scenario, records_api},
    eventually,
};

/// Ledger states, as the controller writes them (`kind` of an entry's `state`).
pub mod seat {
    pub const ACTIVE: &str = "active";
    pub const RETIRED: &str = "retired";
    pub const RESTORED: &str = "restored";
}

impl Scenario {
    /// The seat of `instance` in the controller's record (what it added to which ASG), if any.
    pub async fn seat(&self, instance: &str) -> Option<Value> {
        let record = records_api(&self.bed)
            .get_opt(instance)
            .await
            .expect("read the record")?;
        Some(record.data["status"]["seat"].clone()).filter(|seat| !seat.is_null())
    }

    /// Deletes the record of `instance` (as a careless operator would).
    pub async fn delete_record(&self, instance: &str) {
        records_api(&self.bed)
            .delete(instance, &Default::default())
            .await
            .expect("delete the record");
    }

    /// Waits until the ledger entry of `instance` is in state `kind`; returns it.
    pub async fn wait_for_seat(&self, instance: &str, kind: &str, timeout: Duration) -> Value {
        eventually(
            &format!("seat of {instance} in state {kind}"),
            timeout,
            || async {
                let seat = self.seat(instance).await?;
                (seat["state"]["kind"] == kind).then_some(seat)
            },
        )
        .await
    }

    /// Adds label `key=value` to `node` (e.g. to open a node to a workload's nodeSelector).
    pub async fn label(&self, node: &str, key: &str, value: &str) {
        let patch = json!({"metadata": {"labels": {key: value}}});
        self.bed
            .nodes()
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("label Node {node}: {e}"));
    }

    /// EC2 terminates `instance` behind everyone's back (a spot reclaim): it leaves its ASG with the
    /// desired capacity unchanged, so the ASG launches a replacement of its own.
    pub async fn reclaim(&self, instance: &str) -> Value {
        self.bed
            .control(reqwest::Method::DELETE, &format!("instances/{instance}"), None)
            .await
    }
}

/// A Deployment of `replicas` pods labelled `app=<app>` on the nodes matching `node_selector`; waits
/// until they all run Ready.
pub async fn deployment(bed: &Bed, namespace: &str, app: &str, replicas: i32, node_selector: &Value) {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": app},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app}},
                "spec": {"nodeSelector": node_selector, "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": app, "image": "fake"}]},
            },
        },
    }))
    .unwrap();
    Api::<Deployment>::namespaced(bed.kube.clone(), namespace)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create the Deployment");
    wait_for_ready_pods(bed, namespace, app, replicas as usize).await;
}

/// A DaemonSet `app` on the nodes matching `node_selector`; waits until `count` pods run Ready.
pub async fn daemon_set(bed: &Bed, namespace: &str, app: &str, node_selector: &Value, count: usize) {
    let daemon_set: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": app},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app}},
                "spec": {"nodeSelector": node_selector, "containers": [{"name": app, "image": "fake"}]},
            },
        },
    }))
    .unwrap();
    Api::<DaemonSet>::namespaced(bed.kube.clone(), namespace)
        .create(&PostParams::default(), &daemon_set)
        .await
        .expect("create the DaemonSet");
    wait_for_ready_pods(bed, namespace, app, count).await;
}

/// The Ready, not terminating pods labelled `app=<app>`, with the node each runs on.
pub async fn ready_pods(bed: &Bed, namespace: &str, app: &str) -> Vec<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("list pods");
    list.items
        .iter()
        .filter(|pod| pod_is_serving(pod))
        .map(|pod| {
            (
                pod.metadata.name.clone().unwrap_or_default(),
                pod.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

async fn wait_for_ready_pods(bed: &Bed, namespace: &str, app: &str, count: usize) {
    eventually(
        &format!("{count} {app} pods Ready"),
        Duration::from_secs(90),
        || async { (ready_pods(bed, namespace, app).await.len() == count).then_some(()) },
    )
    .await;
}

fn pod_is_serving(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A PDB over `app=<app>` (`spec` is `{"maxUnavailable": 1}` or `{"minAvailable": 2}`, …), once the
/// disruption controller has computed its status for `expected` pods: returns `disruptionsAllowed`.
pub async fn pdb(bed: &Bed, namespace: &str, app: &str, spec: Value, expected: i32) -> i32 {
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(bed.kube.clone(), namespace);
    let mut full_spec = spec;
    full_spec["selector"] = json!({"matchLabels": {"app": app}});
    let pdb: PodDisruptionBudget =
        serde_json::from_value(json!({"metadata": {"name": app}, "spec": full_spec})).unwrap();
    pdbs.create(&PostParams::default(), &pdb)
        .await
        .expect("create the PDB");
    eventually(&format!("PDB {app} status"), Duration::from_secs(60), || async {
        let pdb = pdbs.get(app).await.ok()?;
        let status = pdb.status?;
        let current = status.observed_generation? >= pdb.metadata.generation?;
        (current && status.expected_pods == Some(expected) && status.current_healthy == Some(expected))
            .then_some(status.disruptions_allowed.unwrap_or(0))
    })
    .await
}

/// Watches the pods labelled `app=<app>` and the PDB `app` from before the drain on, and checks at
/// every change (watch events come in resourceVersion order): at least `min_serving` pods Ready and not
/// terminating, and the PDB's status never shows fewer healthy pods than it requires.
pub struct DisruptionWatch {
    state: Arc<Mutex<DisruptionState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct DisruptionState {
    pods: BTreeMap<String, Pod>,
    pods_synced: bool,
    pdb_synced: bool,
    observations: u64,
    fewest_serving: Option<usize>,
    violations: Vec<String>,
}

impl DisruptionWatch {
    pub async fn start(bed: &Bed, namespace: &str, app: &str, min_serving: usize) -> Self {
        let state = Arc::new(Mutex::new(DisruptionState::default()));
        let pods: Api<Pod> = Api::namespaced(bed.kube.clone(), namespace);
        let pods_task = {
            let state = state.clone();
            let config = watcher::Config::default().labels(&format!("app={app}"));
            tokio::spawn(async move {
                let mut events = watcher(pods, config).boxed();
                while let Some(Ok(event)) = events.next().await {
                    let mut state = state.lock().unwrap();
                    match event {
                        watcher::Event::Init => state.pods.clear(),
                        watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                            state
                                .pods
                                .insert(pod.metadata.name.clone().unwrap_or_default(), pod);
                        }
                        watcher::Event::Delete(pod) => {
                            state.pods.remove(&pod.metadata.name.clone().unwrap_or_default());
                        }
                        watcher::Event::InitDone => state.pods_synced = true,
                    }
                    if state.pods_synced {
                        state.observations += 1;
                        let serving = state.pods.values().filter(|p| pod_is_serving(p)).count();
                        state.fewest_serving = Some(state.fewest_serving.map_or(serving, |f| f.min(serving)));
                        if serving < min_serving {
                            let observation = state.observations;
                            state.violations.push(format!(
                                "observation {observation}: only {serving} {min_serving}+ pods serving"
                            ));
                        }
                    }
                }
            })
        };
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(bed.kube.clone(), namespace);
        let pdb_task = {
            let state = state.clone();
            let config = watcher::Config::default().fields(&format!("metadata.name={app}"));
            tokio::spawn(async move {
                let mut events = watcher(pdbs, config).boxed();
                while let Some(Ok(event)) = events.next().await {
                    let pdb = match event {
                        watcher::Event::InitApply(pdb) | watcher::Event::Apply(pdb) => pdb,
                        watcher::Event::InitDone => {
                            state.lock().unwrap().pdb_synced = true;
                            continue;
                        }
                        _ => continue,
                    };
                    let Some(status) = pdb.status else { continue };
                    let healthy = status.current_healthy.unwrap_or(0);
                    let required = status.desired_healthy.unwrap_or(0);
                    let allowed = status.disruptions_allowed.unwrap_or(0);
                    if healthy < required || allowed < 0 {
                        state.lock().unwrap().violations.push(format!(
                            "PDB status: {healthy} healthy of {required} required, {allowed} disruptions allowed"
                        ));
                    }
                }
            })
        };
        let watch = DisruptionWatch {
            state,
            tasks: vec![pods_task, pdb_task],
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let synced = {
                let state = watch.state.lock().unwrap();
                state.pods_synced && state.pdb_synced
            };
            if synced {
                return watch;
            }
            assert!(
                Instant::now() < deadline,
                "the pod and PDB watches did not sync within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts the PDB held at every observation so far.
    pub fn assert_never_violated(&self) {
        let state = self.state.lock().unwrap();
        assert!(
            state.violations.is_empty(),
            "the PDB was violated:\n{}",
            state.violations.join("\n")
        );
    }

    /// The fewest pods seen serving at once, and how many states were checked.
    pub fn fewest_serving(&self) -> (Option<usize>, u64) {
        let state = self.state.lock().unwrap();
        (state.fewest_serving, state.observations)
    }
}

impl Drop for DisruptionWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A Slack-compatible webhook on loopback (HTTPS, a certificate of a test CA) that keeps the `text`
/// of every post it gets.
pub struct NotificationSink {
    /// The URL to post to; its path stands for the secret token a real webhook URL carries.
    pub url: String,
    /// The test CA's certificate (PEM), for `--notify-ca-file`.
    pub ca_file: std::path::PathBuf,
    texts: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
    _certs: super::webhook::TestCerts,
    _dir: tempfile::TempDir,
}

impl NotificationSink {
    pub async fn start(token: &str) -> Self {
        let texts = Arc::new(Mutex::new(Vec::new()));
        let kept = texts.clone();
        let app = axum::Router::new().route(
            &format!("/services/{token}"),
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let kept = kept.clone();
                async move {
                    let text = body["text"].as_str().unwrap_or_default().to_owned();
                    kept.lock().unwrap().push(text);
                    "ok"
                }
            }),
        );
        let certs = super::webhook::TestCerts::new();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &certs.ca_pem).unwrap();
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(certs.cert_path(), certs.key_path())
            .await
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("https://{}/services/{token}", listener.local_addr().unwrap());
        let server = axum_server::from_tcp_rustls(listener, tls).unwrap();
        let task = tokio::spawn(async move {
            let _ = server.serve(app.into_make_service()).await;
        });
        NotificationSink {
            url,
            ca_file,
            texts,
            task,
            _certs: certs,
            _dir: dir,
        }
    }

    pub fn texts(&self) -> Vec<String> {
        self.texts.lock().unwrap().clone()
    }
}

impl Drop for NotificationSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
