//! The webhook's e2e parts: test certificates (rcgen), the webhook process (as its own
//! ServiceAccount), its registration at the bed's API server (the chart's rendered webhook
//! configurations, pointed at 127.0.0.1 and scoped to one test's opt-in label), kwok Nodes with pods
//! and PDBs, and kubectl.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
        core::v1::{Namespace, Node, Pod},
        policy::v1::PodDisruptionBudget,
    },
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use tempfile::TempDir;

use spot_rebalancer::contract::{
    SpotReplacement, SpotReplacementSpec, SpotReplacementStatus,
    record::{Phase, Replacement},
};

use super::process::{RoleCommand, RoleProcess};
use super::{Bed, eventually, identity, unique};

/// Label key each test opts its own Nodes in with (the value is unique to the test).
pub const TEST_OPT_IN_KEY: &str = "spot-rebalancer.io/webhook-test";

pub use super::process::free_port as free_loopback_port;

// ----- certificates -----------------------------------------------------------------------------

/// A CA and a serving certificate for 127.0.0.1 and localhost, written as PEM files to a temporary
/// directory (removed when dropped).
pub struct TestCerts {
    dir: TempDir,
    ca: Issuer<'static, KeyPair>,
    pub ca_pem: String,
}

impl TestCerts {
    pub fn new() -> Self {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "spot-rebalancer test CA");
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        let certs = TestCerts {
            dir: tempfile::tempdir().unwrap(),
            ca: Issuer::new(params, key),
            ca_pem,
        };
        let (cert, key) = certs.serving(&[]);
        std::fs::write(certs.cert_path(), cert).unwrap();
        std::fs::write(certs.key_path(), key).unwrap();
        certs
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    /// A new serving certificate (new key) from the same CA, valid also for `extra_names`: (PEM
    /// certificate, PEM key).
    pub fn serving(&self, extra_names: &[&str]) -> (String, String) {
        let mut names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        names.extend(extra_names.iter().map(|name| (*name).to_owned()));
        let params = CertificateParams::new(names).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

// ----- the webhook process ----------------------------------------------------------------------

/// `spot-rebalancer webhook` on loopback ports, guarding Nodes with `opt_in` ([`RoleProcess`]:
/// killed when dropped, its log printed if the test failed).
pub struct WebhookProcess {
    process: RoleProcess,
    pub port: u16,
    pub admin_port: u16,
}

impl std::ops::Deref for WebhookProcess {
    type Target = RoleProcess;
    fn deref(&self) -> &RoleProcess {
        &self.process
    }
}

impl std::ops::DerefMut for WebhookProcess {
    fn deref_mut(&mut self) -> &mut RoleProcess {
        &mut self.process
    }
}

impl WebhookProcess {
    /// Starts the webhook and waits until it is ready (caches synced, HTTPS listening).
    pub async fn start(bed: &Bed, certs: &TestCerts, opt_in: &str) -> Self {
        let port = free_loopback_port();
        let mut process = RoleCommand::new("webhook")
            .args(["--listen-addr", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert-file")
            .arg(certs.cert_path())
            .arg("--tls-key-file")
            .arg(certs.key_path())
            .args(["--tls-reload-interval", "100ms"])
            .arg("--kubeconfig")
            .arg(identity::role_kubeconfig(bed, identity::Role::Webhook))
            .args(["--opt-in-label", opt_in])
            .args(["--records-namespace", identity::NAMESPACE])
            .spawn();
        process.wait_ready(Duration::from_secs(30)).await;
        let admin_port = process.admin_port;
        WebhookProcess {
            process,
            port,
            admin_port,
        }
    }

    /// Stops the process with SIGTERM and waits for it to exit (SIGKILL after 15 s).
    pub fn stop(&mut self) {
        if !self.process.is_running() {
            return;
        }
        self.process.sigterm();
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.process.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process.kill();
    }

    /// The value of one series of `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

// ----- registration at the API server -----------------------------------------------------------

/// The documents of the rendered chart (`manifests/rendered/`) whose `kind:` is one of `kinds`, as
/// JSON (kubectl converts them).
pub fn manifest_objects(bed: &Bed, kinds: &[&str]) -> Vec<Value> {
    let documents = identity::rendered_documents(kinds);
    assert!(!documents.is_empty(), "no {kinds:?} in {}", identity::RENDERED);
    documents
        .into_iter()
        .map(|doc| {
            let output = kubectl_with_input(
                bed,
                &["create", "--dry-run=client", "-o", "json", "-f", "-"],
                &doc,
            );
            assert!(
                output.success,
                "kubectl could not read {}: {}",
                identity::RENDERED,
                output.stderr
            );
            serde_json::from_str(&output.stdout).unwrap()
        })
        .collect()
}

/// The project's webhook configurations, registered under unique names with `clientConfig.url` on
/// 127.0.0.1 and an objectSelector on one test's opt-in label; deleted when dropped.
pub struct Registration {
    names: Vec<(&'static str, String)>,
    kubectl: String,
    kubeconfig: String,
}

impl Registration {
    pub async fn create(bed: &Bed, port: u16, certs: &TestCerts, opt_in_value: &str) -> Self {
        let ca_bundle = serde_json::to_value(ByteString(certs.ca_pem.as_bytes().to_vec())).unwrap();
        let name = unique("spot-rebalancer-test");
        let mut registration = Registration {
            names: Vec::new(),
            kubectl: bed.vars["BED_KUBECTL"].clone(),
            kubeconfig: bed.vars["BED_KUBECONFIG"].clone(),
        };
        let kinds = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"];
        for mut object in manifest_objects(bed, &kinds) {
            object["metadata"] = json!({"name": name});
            for webhook in object["webhooks"].as_array_mut().unwrap() {
                let path = webhook["clientConfig"]["service"]["path"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                webhook["clientConfig"] = json!({
                    "url": format!("https://127.0.0.1:{port}{path}"),
                    "caBundle": ca_bundle,
                });
                webhook["objectSelector"] = json!({"matchLabels": {TEST_OPT_IN_KEY: opt_in_value}});
            }
            match object["kind"].as_str().unwrap() {
                "MutatingWebhookConfiguration" => {
                    let config: MutatingWebhookConfiguration = serde_json::from_value(object).unwrap();
                    Api::all(bed.kube.clone())
                        .create(&PostParams::default(), &config)
                        .await
                        .unwrap();
                    registration
                        .names
                        .push(("mutatingwebhookconfiguration", name.clone()));
                }
                _ => {
                    let config: ValidatingWebhookConfiguration = serde_json::from_value(object).unwrap();
                    Api::all(bed.kube.clone())
                        .create(&PostParams::default(), &config)
                        .await
                        .unwrap();
                    registration
                        .names
                        .push(("validatingwebhookconfiguration", name.clone()));
                }
            }
        }
        registration
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        for (kind, name) in &self.names {
            let _ = Command::new(&self.kubectl)
                .args([
                    "--kubeconfig",
                    &self.kubeconfig,
                    "delete",
                    kind,
                    name,
                    "--wait=false",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The webhook serving one test: certificates, process, registration, and the test's opt-in label.
pub struct Guarded {
    pub certs: TestCerts,
    pub webhook: WebhookProcess,
    pub registration: Registration,
    pub opt_in_value: String,
}

impl Guarded {
    pub async fn start(bed: &Bed) -> Self {
        // The order guard reads the controller's records: their CRD and the webhook's Role on them.
        identity::install_records(bed);
        let certs = TestCerts::new();
        let opt_in_value = unique("t");
        let webhook = WebhookProcess::start(bed, &certs, &format!("{TEST_OPT_IN_KEY}={opt_in_value}")).await;
        let registration = Registration::create(bed, webhook.port, &certs, &opt_in_value).await;
        Guarded {
            certs,
            webhook,
            registration,
            opt_in_value,
        }
    }

    /// Waits until the API server calls both webhooks for `node`: dry-run taint changes (nothing is
    /// stored) until the webhook has answered both routes.
    pub async fn wait_until_registered(&self, bed: &Bed, node: &str) {
        let nodes: Api<Node> = bed.nodes();
        let params = PatchParams {
            dry_run: true,
            ..PatchParams::default()
        };
        let probe = json!({"spec": {"taints": [{"key": "spot-rebalancer.io/probe", "value": "x", "effect": "NoSchedule"}]}});
        eventually(
            "the API server to call both webhooks",
            Duration::from_secs(30),
            || async {
                nodes
                    .patch(node, &params, &Patch::Merge(&probe))
                    .await
                    .expect("a dry-run taint change");
                let mutate = self
                    .webhook
                    .metric("spot_rebalancer_admission_reviews_total{route=\"mutate\",verdict=\"allowed\"}")
                    .await;
                let validate = self
                    .webhook
                    .metric("spot_rebalancer_admission_reviews_total{route=\"validate\",verdict=\"allowed\"}")
                    .await;
                (mutate > 0.0 && validate > 0.0).then_some(())
            },
        )
        .await;
    }
}

// ----- the controller's records ----------------------------------------------------------------

/// Writes, as the bed's admin, what the controller would: the `SpotReplacement` of `node` (named by
/// a fresh instance id, created once) in `phase`, with `replacement` claimed. Returns the record's
/// name; a later call with that name moves the same record on.
pub async fn write_record(
    bed: &Bed,
    node: &str,
    existing: Option<&str>,
    phase: Phase,
    replacement: Option<&str>,
) -> String {
    let records: Api<SpotReplacement> = Api::namespaced(bed.kube.clone(), identity::NAMESPACE);
    let node_uid = bed
        .nodes()
        .get(node)
        .await
        .expect("read the Node")
        .metadata
        .uid
        .expect("a stored Node has a uid");
    let name = match existing {
        Some(name) => name.to_owned(),
        None => {
            let instance = format!("i-{:016x}", fastrand::u64(..));
            let record = SpotReplacement::new(
                &instance,
                SpotReplacementSpec {
                    node_name: node.to_owned(),
                    node_uid,
                    instance_id: instance.clone(),
                },
            );
            records
                .create(&PostParams::default(), &record)
                .await
                .expect("create a SpotReplacement");
            instance
        }
    };
    let mut record = records.get(&name).await.expect("read the SpotReplacement");
    let mut replacement_record = Replacement::new("spot-a".into(), None, jiff::Timestamp::now());
    replacement_record.node = replacement.map(str::to_owned);
    let status = SpotReplacementStatus {
        phase,
        record: replacement_record,
        seat: None,
        history: Vec::new(),
    }
    .entering(phase, jiff::Timestamp::now());
    record.status = Some(status);
    records
        .replace_status(&name, &PostParams::default(), &record)
        .await
        .expect("write the SpotReplacement's status");
    name
}

// ----- nodes, pods, PDBs ------------------------------------------------------------------------

/// A kwok Node (kwok keeps it Ready) opted in with the test's label and carrying `annotations`;
/// deleted when dropped.
pub struct KwokNode {
    pub name: String,
    kubectl: String,
    kubeconfig: String,
}

impl KwokNode {
    pub async fn create(
        bed: &Bed,
        prefix: &str,
        labels: BTreeMap<String, String>,
        annotations: Value,
    ) -> Self {
        let name = unique(prefix);
        let mut all_annotations = json!({"kwok.x-k8s.io/node": "fake"});
        for (key, value) in annotations.as_object().cloned().unwrap_or_default() {
            all_annotations[key] = value;
        }
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": all_annotations, "labels": labels},
            "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]},
        }))
        .unwrap();
        bed.nodes()
            .create(&PostParams::default(), &node)
            .await
            .expect("create a kwok Node");
        KwokNode {
            name,
            kubectl: bed.vars["BED_KUBECTL"].clone(),
            kubeconfig: bed.vars["BED_KUBECONFIG"].clone(),
        }
    }

    /// A Node opted in with the test's label.
    pub async fn opted_in(bed: &Bed, guarded: &Guarded, prefix: &str, annotations: Value) -> Self {
        let labels = BTreeMap::from([(TEST_OPT_IN_KEY.to_owned(), guarded.opt_in_value.clone())]);
        Self::create(bed, prefix, labels, annotations).await
    }

    pub async fn get(&self, bed: &Bed) -> Node {
        bed.nodes().get(&self.name).await.expect("read the test Node")
    }

    /// The effect of the node's taint with `key`, if any.
    pub async fn taint_effect(&self, bed: &Bed, key: &str) -> Option<String> {
        let node = self.get(bed).await;
        node.spec?
            .taints?
            .into_iter()
            .find(|taint| taint.key == key)
            .map(|taint| taint.effect)
    }

    pub async fn wait_until_ready(&self, bed: &Bed) {
        eventually(
            &format!("{} Ready", self.name),
            Duration::from_secs(30),
            || async { super::is_ready(&self.get(bed).await).then_some(()) },
        )
        .await;
    }
}

impl Drop for KwokNode {
    fn drop(&mut self) {
        let _ = Command::new(&self.kubectl)
            .args([
                "--kubeconfig",
                &self.kubeconfig,
                "delete",
                "node",
                &self.name,
                "--wait=false",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A namespace for one test's pods and PDBs; deleted (with them) when dropped.
pub struct TestNamespace {
    pub name: String,
    bed: Bed,
}

impl TestNamespace {
    pub async fn create(bed: &Bed, prefix: &str) -> Self {
        let name = unique(prefix);
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(bed.kube.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create the test namespace");
        TestNamespace {
            name,
            bed: bed.clone(),
        }
    }

    /// `count` pods labelled `app=<app>` bound to `node` (kwok runs them), Ready.
    pub async fn running_pods(&self, node: &str, app: &str, count: usize) {
        let pods: Api<Pod> = Api::namespaced(self.bed.kube.clone(), &self.name);
        for i in 0..count {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("{app}-{i}"), "labels": {"app": app}},
                "spec": {"nodeName": node, "containers": [{"name": app, "image": "fake"}],
                         "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]},
            }))
            .unwrap();
            pods.create(&PostParams::default(), &pod)
                .await
                .expect("create a test pod");
        }
        eventually(
            &format!("{count} {app} pods Ready"),
            Duration::from_secs(60),
            || async {
                let list = pods.list(&Default::default()).await.ok()?;
                let ready = list
                    .items
                    .iter()
                    .filter(|pod| {
                        pod.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get("app"))
                            .map(String::as_str)
                            == Some(app)
                    })
                    .filter(|pod| {
                        pod.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                    })
                    .count();
                (ready == count).then_some(())
            },
        )
        .await;
    }

    /// A PDB over `app=<app>` with `minAvailable`, once the disruption controller has computed its
    /// status: returns `disruptionsAllowed`.
    pub async fn pdb(&self, app: &str, min_available: i32) -> i32 {
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(self.bed.kube.clone(), &self.name);
        let pdb: PodDisruptionBudget = serde_json::from_value(json!({
            "metadata": {"name": app},
            "spec": {"minAvailable": min_available, "selector": {"matchLabels": {"app": app}}},
        }))
        .unwrap();
        pdbs.create(&PostParams::default(), &pdb)
            .await
            .expect("create the PDB");
        eventually(&format!("PDB {app} status"), Duration::from_secs(60), || async {
            let pdb = pdbs.get(app).await.ok()?;
            let status = pdb.status?;
            let current = status.observed_generation? >= pdb.metadata.generation?;
            (current && status.expected_pods.unwrap_or(0) > 0)
                .then_some(status.disruptions_allowed.unwrap_or(0))
        })
        .await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Pods first, at once: their kwok Node may be gone before kwok would finish them gracefully.
        let kubeconfig = &self.bed.vars["BED_KUBECONFIG"];
        let pods = [
            "delete",
            "pods",
            "--all",
            "-n",
            &self.name,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ];
        let namespace = ["delete", "namespace", &self.name, "--wait=false"];
        for args in [&pods[..], &namespace[..]] {
            let _ = Command::new(&self.bed.vars["BED_KUBECTL"])
                .args(["--kubeconfig", kubeconfig])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ----- kubectl ----------------------------------------------------------------------------------

pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the bed's kubectl with the bed's kubeconfig.
pub fn kubectl(bed: &Bed, args: &[&str]) -> KubectlOutput {
    kubectl_with_input(bed, args, "")
}

pub fn kubectl_with_input(bed: &Bed, args: &[&str], input: &str) -> KubectlOutput {
    use std::io::Write;
    let mut child = Command::new(&bed.vars["BED_KUBECTL"])
        .args(["--kubeconfig", &bed.vars["BED_KUBECONFIG"]])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    KubectlOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
