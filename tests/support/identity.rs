//! Each role's own identity on the bed, as the Helm chart gives it in a cluster: the chart's rendered
//! ServiceAccounts, RBAC and agent admission policy (`manifests/rendered/spot-rebalancer.yaml`, kept
//! up to date with the chart by `scripts/check-chart`) applied to the bed's API server once per test
//! process, and a kubeconfig holding a token of the role's own ServiceAccount (TokenRequest API).
//! A role process started with it can do exactly what the chart allows: a permission the code needs
//! and the chart lacks fails the e2e tests, and so does one the chart grants and should not.
//!
//! The rendered file, not `helm template` at test time: the tests need no helm, and they exercise
//! the very YAML users `kubectl apply`.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
};

use kube::config::Kubeconfig;

use super::webhook::KubectlOutput;
use super::{Bed, unique};

/// The chart's release namespace in the rendered manifests: the controller's and the webhook's.
pub const NAMESPACE: &str = "spot-rebalancer";
/// The agent's own namespace in the rendered manifests (the chart's `agent.namespace` default,
/// `<release namespace>-agent`): the host network needs Pod Security `privileged`, which the
/// release namespace does not allow.
pub const AGENT_NAMESPACE: &str = "spot-rebalancer-agent";
/// The rendered chart, relative to the repository.
pub const RENDERED: &str = "manifests/rendered/spot-rebalancer.yaml";
/// The kinds of the rendered chart that give the roles their identities and limits.
const IDENTITY_KINDS: [&str; 8] = [
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];
/// Long enough for any test; a bound agent token also ends when its Node is deleted.
const TOKEN_SECONDS: &str = "7200s";

/// Whose identity a process runs with.
#[derive(Debug, Clone, Copy)]
pub enum Role<'a> {
    /// The agent on `node`: its token is bound to that Node, as a pod's projected token names the
    /// pod's node, so the admission policy lets it annotate that Node only.
    Agent {
        node: &'a str,
    },
    /// The agent's ServiceAccount with a token bound to no Node (an agent whose Node is missing).
    UnboundAgent,
    Controller,
    Webhook,
}

impl Role<'_> {
    /// The namespace of the role's ServiceAccount (the chart's defaults).
    pub fn namespace(&self) -> &'static str {
        match self {
            Role::Agent { .. } | Role::UnboundAgent => AGENT_NAMESPACE,
            Role::Controller | Role::Webhook => NAMESPACE,
        }
    }

    /// The role's ServiceAccount in [`Role::namespace`] (the chart's defaults).
    pub fn service_account(&self) -> &'static str {
        match self {
            Role::Agent { .. } | Role::UnboundAgent => "spot-rebalancer-agent",
            Role::Controller => "spot-rebalancer-controller",
            Role::Webhook => "spot-rebalancer-webhook",
        }
    }

    /// The username the API server sees for this role.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace(),
            self.service_account()
        )
    }
}

/// The documents of the rendered chart whose top-level `kind:` is one of `kinds` (all of them when
/// `kinds` is empty), as YAML text.
pub fn rendered_documents(kinds: &[&str]) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(RENDERED);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.split("\n---\n")
        .filter(|doc| {
            kinds.is_empty()
                || kinds
                    .iter()
                    .any(|kind| doc.contains(&format!("\nkind: {kind}\n")))
        })
        .map(str::to_owned)
        .collect()
}

/// Applies the chart's ServiceAccounts, RBAC and agent admission policy to the bed (server-side
/// apply: idempotent, so every test process may do it; each does it once).
pub fn apply_chart_identities(bed: &Bed) {
    static APPLIED: OnceLock<()> = OnceLock::new();
    APPLIED.get_or_init(|| {
        let documents = rendered_documents(&IDENTITY_KINDS);
        assert!(documents.len() >= 15, "too few identity objects in {RENDERED}");
        apply(bed, &documents, "the chart's RBAC");
        // The API server's authorizer follows RBAC objects through a watch: wait until it knows the
        // last binding, so a role started next is not refused for a moment.
        let webhook = Role::Webhook.username();
        wait_until_allowed(
            bed,
            &["watch", "poddisruptionbudgets.policy", "-A", "--as", &webhook],
            "the chart's RBAC",
        );
    });
}

/// The controller's records: the `SpotReplacement` CRD (from the type itself,
/// `SpotReplacement::crd()`, as the chart's manifest must match it) and the chart's RBAC, applied
/// once per test process. Returns when the CRD is established and the API server's authorizer lets
/// the controller write a record's status.
pub fn install_records(bed: &Bed) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        use kube::CustomResourceExt;
        apply_chart_identities(bed);
        let crd = serde_json::to_string(&spot_rebalancer::contract::SpotReplacement::crd()).unwrap();
        apply(bed, &[crd], "the SpotReplacement CRD");
        let established = kubectl(
            bed,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                "crd/spotreplacements.spot-rebalancer.io",
            ],
            "",
        );
        assert!(
            established.success,
            "the CRD is not established: {}",
            established.stderr
        );
        let controller = Role::Controller.username();
        wait_until_allowed(
            bed,
            &[
                "update",
                "spotreplacements.spot-rebalancer.io",
                "--subresource=status",
                "-n",
                NAMESPACE,
                "--as",
                &controller,
            ],
            "the controller's records grant",
        );
    });
}

/// Server-side applies `documents` as the bed's admin (field manager `e2e-chart`, taking over
/// fields a demo or an earlier run applied).
fn apply(bed: &Bed, documents: &[String], what: &str) {
    let output = kubectl(
        bed,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "e2e-chart",
            "-f",
            "-",
        ],
        &documents.join("\n---\n"),
    );
    assert!(output.success, "applying {what}: {}", output.stderr);
}

/// Waits (at most 30 s) until `kubectl auth can-i ARGS` says yes: the API server's authorizer
/// learns of new RBAC objects through a watch.
fn wait_until_allowed(bed: &Bed, can_i: &[&str], what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let args: Vec<&str> = ["auth", "can-i"]
        .into_iter()
        .chain(can_i.iter().copied())
        .collect();
    while kubectl(bed, &args, "").stdout != "yes\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} is not in force after 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A token of `role`'s ServiceAccount (applying the chart's identities first).
pub fn token(bed: &Bed, role: Role<'_>) -> String {
    apply_chart_identities(bed);
    let account = role.service_account();
    let mut args = vec![
        "create",
        "token",
        account,
        "-n",
        role.namespace(),
        "--duration",
        TOKEN_SECONDS,
    ];
    if let Role::Agent { node } = role {
        args.extend(["--bound-object-kind", "Node", "--bound-object-name", node]);
    }
    let output = kubectl(bed, &args, "");
    assert!(output.success, "a token for {role:?}: {}", output.stderr);
    output.stdout.trim().to_owned()
}

/// A kubeconfig for the bed's API server that authenticates as `role` (and nothing else: no client
/// certificate). Controller and webhook share one per test process; each agent gets its own.
pub fn role_kubeconfig(bed: &Bed, role: Role<'_>) -> PathBuf {
    static SHARED: Mutex<Vec<(&'static str, PathBuf)>> = Mutex::new(Vec::new());
    let shared = matches!(role, Role::Controller | Role::Webhook);
    if shared
        && let Some((_, path)) = SHARED
            .lock()
            .unwrap()
            .iter()
            .find(|(account, _)| *account == role.service_account())
    {
        return path.clone();
    }
    let path = write_kubeconfig(bed, role.service_account(), &token(bed, role));
    if shared {
        SHARED
            .lock()
            .unwrap()
            .push((role.service_account(), path.clone()));
    }
    path
}

/// A kubeconfig for ServiceAccount `account` of [`NAMESPACE`] (which must exist) with a token bound
/// to Node `node`, as an agent pod's projected token is.
pub fn node_bound_kubeconfig(bed: &Bed, account: &str, node: &str) -> PathBuf {
    let output = kubectl(
        bed,
        &[
            "create",
            "token",
            account,
            "-n",
            NAMESPACE,
            "--duration",
            TOKEN_SECONDS,
            "--bound-object-kind",
            "Node",
            "--bound-object-name",
            node,
        ],
        "",
    );
    assert!(output.success, "a token for {account}: {}", output.stderr);
    write_kubeconfig(bed, account, output.stdout.trim())
}

/// Writes a kubeconfig with the bed's server and CA and `token` (in the bed's state folder, which
/// `bed/down.sh` removes).
fn write_kubeconfig(bed: &Bed, user: &str, token: &str) -> PathBuf {
    let admin = Path::new(&bed.vars["BED_KUBECONFIG"]);
    let config = Kubeconfig::read_from(admin).expect("the bed's kubeconfig");
    let cluster = config
        .clusters
        .first()
        .and_then(|named| named.cluster.clone())
        .expect("the bed's kubeconfig names a cluster");
    let server = cluster.server.expect("the bed's API server URL");
    let ca = match (
        &cluster.certificate_authority,
        &cluster.certificate_authority_data,
    ) {
        (Some(file), _) => format!("certificate-authority: {file}"),
        (None, Some(data)) => format!("certificate-authority-data: {data}"),
        (None, None) => panic!("the bed's kubeconfig has no CA"),
    };
    let dir = admin.parent().unwrap().join("identities");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.kubeconfig", unique(user)));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: bed\n  cluster:\n    server: {server}\n    {ca}\n\
         users:\n- name: {user}\n  user:\n    token: {token}\n\
         contexts:\n- name: {user}\n  context:\n    cluster: bed\n    user: {user}\n\
         current-context: {user}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// kubectl authenticated as `role` (its own kubeconfig, nothing inherited).
pub fn kubectl_as(bed: &Bed, role: Role<'_>, args: &[&str]) -> std::process::Output {
    let kubeconfig = role_kubeconfig(bed, role);
    Command::new(&bed.vars["BED_KUBECTL"])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run kubectl")
}

/// `kubectl auth can-i` as `role` (a SelfSubjectAccessReview with its own token); `resource` may
/// name a subresource (`pods/eviction`).
pub fn can_i(bed: &Bed, role: Role<'_>, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
    let mut args = vec!["auth", "can-i", verb];
    match resource.split_once('/') {
        Some((resource, subresource)) => args.extend([resource, "--subresource", subresource]),
        None => args.push(resource),
    }
    match namespace {
        Some(namespace) => args.extend(["-n", namespace]),
        None => args.push("--all-namespaces"),
    }
    answer(&kubectl_as(bed, role, &args), || {
        format!("{verb} {resource} as {role:?}")
    })
}

/// `kubectl auth can-i` as `role` on one named object (`resource` such as `configmaps`).
pub fn can_i_named(
    bed: &Bed,
    role: Role<'_>,
    verb: &str,
    resource: &str,
    name: &str,
    namespace: &str,
) -> bool {
    let object = format!("{resource}/{name}");
    let output = kubectl_as(bed, role, &["auth", "can-i", verb, &object, "-n", namespace]);
    answer(&output, || format!("{verb} {object} as {role:?}"))
}

/// The yes or no of `kubectl auth can-i`; anything else fails the test, saying what was asked.
fn answer(output: &std::process::Output, asked: impl Fn() -> String) -> bool {
    match String::from_utf8_lossy(&output.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {}: {other} {}", asked(), stderr(output)),
    }
}

/// The bed's kubectl as the bed's admin, `input` on its standard input.
fn kubectl(bed: &Bed, args: &[&str], input: &str) -> KubectlOutput {
    super::webhook::kubectl_with_input(bed, args, input)
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
