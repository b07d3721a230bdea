//! The Helm chart's identities on the real API server: each role's ServiceAccount may do exactly what
//! its code needs (the chart's rendered RBAC, `manifests/rendered/`), and nothing more. The role e2e
//! tests prove the "needs" side by running every role under its own token; these prove the "nothing
//! more" side, asking the API server as each role (SelfSubjectAccessReview) and trying the writes
//! a compromised or buggy role would attempt.
mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    Bed, eventually,
    identity::{AGENT_NAMESPACE, NAMESPACE, Role, can_i, kubectl_as},
    webhook::KwokNode,
};

/// (verb, resource, namespace (None: cluster-wide), allowed?)
type Expectation = (&'static str, &'static str, Option<&'static str>, bool);

fn check(bed: &Bed, role: Role<'_>, expectations: &[Expectation]) {
    // `can-i` asks discovery for a resource's API group: the records' CRD must be there (with the
    // chart's identities) before any row about `spotreplacements` can be answered.
    support::identity::install_records(bed);
    let wrong: Vec<String> = expectations
        .iter()
        .filter(|(verb, resource, namespace, allowed)| {
            can_i(bed, role, verb, resource, *namespace) != *allowed
        })
        .map(|(verb, resource, namespace, allowed)| {
            let scope = namespace.unwrap_or("all namespaces");
            let should = if *allowed { "may" } else { "must not" };
            format!("{role:?} {should} {verb} {resource} in {scope}")
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "RBAC differs from the code's needs:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test]
async fn the_agent_may_read_and_patch_nodes_and_nothing_else() {
    let bed = Bed::connect().await;
    let node = KwokNode::create(&bed, "chart-agent", Default::default(), json!({})).await;
    check(
        &bed,
        Role::Agent { node: &node.name },
        &[
            ("get", "nodes", None, true),
            ("patch", "nodes", None, true),
            ("list", "nodes", None, false),
            ("watch", "nodes", None, false),
            ("update", "nodes", None, false),
            ("delete", "nodes", None, false),
            ("patch", "nodes/status", None, false),
            ("get", "pods", None, false),
            ("get", "secrets", Some(NAMESPACE), false),
            // Its own namespace gives it nothing either: it holds only the agent's pods.
            ("get", "secrets", Some(AGENT_NAMESPACE), false),
            ("get", "pods", Some(AGENT_NAMESPACE), false),
            ("create", "pods", Some(AGENT_NAMESPACE), false),
            ("create", "events.events.k8s.io", Some("default"), false),
            // The records are the controller's alone: a node's agent neither reads nor writes them.
            (
                "get",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
            (
                "list",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
            (
                "create",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
            (
                "update",
                "spotreplacements.spot-rebalancer.io/status",
                Some(NAMESPACE),
                false,
            ),
            (
                "delete",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
        ],
    );
}

#[tokio::test]
async fn the_controller_may_do_what_replacing_and_draining_needs_and_nothing_else() {
    let bed = Bed::connect().await;
    check(
        &bed,
        Role::Controller,
        &[
            ("get", "nodes", None, true),
            ("list", "nodes", None, true),
            ("watch", "nodes", None, true),
            ("patch", "nodes", None, true),
            ("update", "nodes", None, false),
            ("delete", "nodes", None, false),
            ("patch", "nodes/status", None, false),
            // The PDB-paced drain: read pods, evict them through the Eviction API, never delete.
            ("list", "pods", None, true),
            ("create", "pods/eviction", None, true),
            ("delete", "pods", None, false),
            // Leader election in its own namespace only.
            ("get", "leases.coordination.k8s.io", Some(NAMESPACE), true),
            ("create", "leases.coordination.k8s.io", Some(NAMESPACE), true),
            ("patch", "leases.coordination.k8s.io", Some(NAMESPACE), true),
            ("watch", "leases.coordination.k8s.io", Some(NAMESPACE), true),
            ("delete", "leases.coordination.k8s.io", Some(NAMESPACE), false),
            ("get", "leases.coordination.k8s.io", Some("kube-system"), false),
            // Events about Nodes, which go to `default`.
            ("create", "events.events.k8s.io", Some("default"), true),
            ("patch", "events.events.k8s.io", Some("default"), true),
            ("create", "events.events.k8s.io", Some("kube-system"), false),
            ("get", "secrets", Some(NAMESPACE), false),
            ("list", "poddisruptionbudgets.policy", None, false),
            // The records: SpotReplacements in its own namespace only; the status written with its
            // resourceVersion (update), never patched; no other namespace; no ConfigMaps at all.
            (
                "create",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                true,
            ),
            (
                "list",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                true,
            ),
            (
                "watch",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                true,
            ),
            (
                "delete",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                true,
            ),
            (
                "update",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
            (
                "patch",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
            (
                "create",
                "spotreplacements.spot-rebalancer.io",
                Some("kube-system"),
                false,
            ),
            ("list", "spotreplacements.spot-rebalancer.io", None, false),
            (
                "get",
                "spotreplacements.spot-rebalancer.io/status",
                Some(NAMESPACE),
                true,
            ),
            (
                "update",
                "spotreplacements.spot-rebalancer.io/status",
                Some(NAMESPACE),
                true,
            ),
            (
                "patch",
                "spotreplacements.spot-rebalancer.io/status",
                Some(NAMESPACE),
                false,
            ),
            ("create", "configmaps", Some(NAMESPACE), false),
            ("get", "configmaps", None, false),
        ],
    );
}

#[tokio::test]
async fn the_webhook_may_only_watch_pods_pdbs_nodes_and_the_records() {
    let bed = Bed::connect().await;
    check(
        &bed,
        Role::Webhook,
        &[
            ("list", "pods", None, true),
            ("watch", "pods", None, true),
            ("list", "poddisruptionbudgets.policy", None, true),
            ("watch", "poddisruptionbudgets.policy", None, true),
            ("list", "nodes", None, true),
            ("watch", "nodes", None, true),
            ("patch", "nodes", None, false),
            ("update", "nodes", None, false),
            ("get", "secrets", Some(NAMESPACE), false),
            ("create", "pods/eviction", None, false),
            ("create", "events.events.k8s.io", Some("default"), false),
            // The order guard reads each node's phase from the controller's records, and only reads.
            (
                "get",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                true,
            ),
            (
                "list",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                true,
            ),
            (
                "watch",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                true,
            ),
            (
                "create",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
            (
                "update",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
            (
                "patch",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
            (
                "delete",
                "spotreplacements.spot-rebalancer.io",
                Some(NAMESPACE),
                false,
            ),
            (
                "update",
                "spotreplacements.spot-rebalancer.io/status",
                Some(NAMESPACE),
                false,
            ),
            ("list", "spotreplacements.spot-rebalancer.io", None, false),
        ],
    );
}

#[tokio::test]
async fn a_node_can_neither_read_nor_write_the_records() {
    let bed = Bed::connect().await;
    // A kubelet's own identity (what a compromised node holds), not the agent's ServiceAccount.
    for (verb, resource) in [
        ("get", "spotreplacements.spot-rebalancer.io"),
        ("list", "spotreplacements.spot-rebalancer.io"),
        ("create", "spotreplacements.spot-rebalancer.io"),
        ("update", "spotreplacements.spot-rebalancer.io"),
        ("delete", "spotreplacements.spot-rebalancer.io"),
    ] {
        let output = support::webhook::kubectl(
            &bed,
            &[
                "auth",
                "can-i",
                verb,
                resource,
                "-n",
                NAMESPACE,
                "--as",
                "system:node:chart-node",
                "--as-group",
                "system:nodes",
            ],
        );
        assert_eq!(
            output.stdout.trim(),
            "no",
            "a node may {verb} {resource}: {}",
            output.stderr
        );
    }
    let status = support::webhook::kubectl(
        &bed,
        &[
            "auth",
            "can-i",
            "update",
            "spotreplacements.spot-rebalancer.io",
            "--subresource",
            "status",
            "-n",
            NAMESPACE,
            "--as",
            "system:node:chart-node",
            "--as-group",
            "system:nodes",
        ],
    );
    assert_eq!(
        status.stdout.trim(),
        "no",
        "a node may write a record's status: {}",
        status.stderr
    );
}

#[tokio::test]
async fn the_webhook_cannot_change_a_node() {
    let bed = Bed::connect().await;
    let node = KwokNode::create(&bed, "chart-webhook", Default::default(), json!({})).await;

    let output = kubectl_as(
        &bed,
        Role::Webhook,
        &["annotate", "node", &node.name, "spot-rebalancer.io/phase=Tainted"],
    );

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the webhook annotated a node");
    assert!(
        stderr.contains("forbidden") && stderr.contains(&Role::Webhook.username()),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_agent_cannot_patch_another_node_nor_delete_its_own() {
    let bed = Bed::connect().await;
    let own = KwokNode::create(&bed, "chart-agent-own", Default::default(), json!({})).await;
    let other = KwokNode::create(&bed, "chart-agent-other", Default::default(), json!({})).await;
    let agent = Role::Agent { node: &own.name };
    let notice = "spot-rebalancer.io/rebalance-notice-time=2026-11-25T10:00:00Z";

    // RBAC lets the agent patch Nodes; the chart's admission policy narrows that to its own.
    let denied = eventually(
        "the agent policy to be in force",
        Duration::from_secs(30),
        || async {
            let output = kubectl_as(
                &bed,
                agent,
                &["annotate", "--overwrite", "node", &other.name, notice],
            );
            (!output.status.success()).then(|| String::from_utf8_lossy(&output.stderr).into_owned())
        },
    )
    .await;
    assert!(denied.contains("may annotate only its own node"), "{denied}");
    let own_node = kubectl_as(
        &bed,
        agent,
        &["annotate", "--overwrite", "node", &own.name, notice],
    );
    assert!(
        own_node.status.success(),
        "{}",
        String::from_utf8_lossy(&own_node.stderr)
    );

    let delete = kubectl_as(&bed, agent, &["delete", "node", &own.name, "--wait=false"]);
    let stderr = String::from_utf8_lossy(&delete.stderr);
    assert!(!delete.status.success(), "the agent deleted its node");
    assert!(stderr.contains("forbidden"), "{stderr}");
}

#[tokio::test]
async fn the_rendered_chart_is_accepted_by_the_api_server() {
    let bed = Bed::connect().await;
    // The namespaces exist with the chart's Pod Security labels (a dry run creates none), so the
    // dry run below is judged as an install into them: the release namespace warns on `restricted`.
    support::identity::apply_chart_identities(&bed);
    // Every object but cert-manager's (the bed has no cert-manager CRDs), server-side dry run: the
    // API server's own validation, CEL compilation of the admission policy and webhook conditions.
    let documents: Vec<String> = support::identity::rendered_documents(&[])
        .into_iter()
        .filter(|doc| !doc.contains("\napiVersion: cert-manager.io/"))
        .collect();
    assert!(documents.len() >= 20, "{} documents", documents.len());
    let output = support::webhook::kubectl_with_input(
        &bed,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager",
            "e2e-chart",
            "-f",
            "-",
        ],
        &documents.join("\n---\n"),
    );
    assert!(output.success, "{}", output.stderr);
    // The release namespace enforces and warns on `restricted` (the controller's and the webhook's
    // Deployments), the agent's namespace enforces `privileged` (its host network): any warning here
    // is a defect of the chart.
    assert!(!output.stderr.contains("Warning"), "{}", output.stderr);

    // The agent policy as applied (support::identity): its CEL type-checks without warnings.
    support::identity::apply_chart_identities(&bed);
    let status = eventually("the policy's type check", Duration::from_secs(30), || async {
        let output = support::webhook::kubectl(
            &bed,
            &[
                "get",
                "validatingadmissionpolicy",
                "spot-rebalancer-agent-own-node",
                "-o",
                "jsonpath={.status}",
            ],
        );
        let status: serde_json::Value = serde_json::from_str(&output.stdout).ok()?;
        status.get("typeChecking").is_some().then_some(status)
    })
    .await;
    assert_eq!(
        status["typeChecking"]["expressionWarnings"],
        serde_json::Value::Null,
        "{status}"
    );
}

/// The pod a rendered workload (Deployment or DaemonSet) would create, as JSON: its template's
/// metadata and spec (kubectl turns the YAML into JSON; the bed's API server validates nothing yet).
fn pod_of(bed: &Bed, workload: &str, name: &str) -> serde_json::Value {
    let output = support::webhook::kubectl_with_input(
        bed,
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        workload,
    );
    assert!(output.success, "{}", output.stderr);
    let workload: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    let template = &workload["spec"]["template"];
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    })
}

/// Creates `pod` in `namespace` as a server-side dry run: Pod Security admission judges it against
/// the namespace's `enforce` level as it would the workload's real pods.
fn dry_run_create(bed: &Bed, namespace: &str, pod: &serde_json::Value) -> support::webhook::KubectlOutput {
    support::webhook::kubectl_with_input(
        bed,
        &["create", "--dry-run=server", "-n", namespace, "-f", "-"],
        &pod.to_string(),
    )
}

fn namespace_label(bed: &Bed, namespace: &str, label: &str) -> String {
    let path = format!("jsonpath={{.metadata.labels.{}}}", label.replace('.', "\\."));
    let output = support::webhook::kubectl(bed, &["get", "namespace", namespace, "-o", &path]);
    assert!(output.success, "{}", output.stderr);
    output.stdout
}

#[tokio::test]
async fn the_controller_and_webhook_pods_meet_restricted_and_the_agent_runs_in_its_own_namespace() {
    let bed = Bed::connect().await;
    // The chart's namespaces, ServiceAccounts and RBAC as `kubectl apply` installs them.
    support::identity::apply_chart_identities(&bed);
    let enforce = "pod-security.kubernetes.io/enforce";
    assert_eq!(namespace_label(&bed, NAMESPACE, enforce), "restricted");
    assert_eq!(namespace_label(&bed, AGENT_NAMESPACE, enforce), "privileged");

    // Every Deployment of the chart (the controller's and the webhook's) runs in the release
    // namespace, whose `restricted` level the API server enforces on their pods.
    let deployments = support::identity::rendered_documents(&["Deployment"]);
    assert_eq!(
        deployments.len(),
        2,
        "the controller's and the webhook's Deployments"
    );
    for deployment in &deployments {
        assert!(
            deployment.contains(&format!("\n  namespace: {NAMESPACE}\n")),
            "{deployment}"
        );
        let pod = pod_of(&bed, deployment, &support::unique("restricted-probe"));
        let created = dry_run_create(&bed, NAMESPACE, &pod);
        assert!(created.success, "{}\n{pod}", created.stderr);
        assert!(!created.stderr.contains("Warning"), "{}", created.stderr);
    }

    // The agent, on the host network, is admitted in its own namespace and refused where
    // `restricted` is enforced (with the `default` ServiceAccount there: its own lives apart).
    let daemonset = rendered_agent_daemonset();
    assert!(
        daemonset.contains(&format!("\n  namespace: {AGENT_NAMESPACE}\n")),
        "{daemonset}"
    );
    let mut agent = pod_of(&bed, &daemonset, &support::unique("agent-probe"));
    let admitted = dry_run_create(&bed, AGENT_NAMESPACE, &agent);
    assert!(admitted.success, "{}", admitted.stderr);
    agent["spec"]["serviceAccountName"] = json!("default");
    let refused = dry_run_create(&bed, NAMESPACE, &agent);
    assert!(
        !refused.success,
        "the agent's pod was admitted where restricted is enforced"
    );
    assert!(
        refused.stderr.contains("violates PodSecurity \"restricted")
            && refused.stderr.contains("hostNetwork"),
        "{}",
        refused.stderr
    );
}

/// The agent's DaemonSet as `kubectl apply -f manifests/rendered/…` installs it (chart defaults).
fn rendered_agent_daemonset() -> String {
    let documents = support::identity::rendered_documents(&["DaemonSet"]);
    assert_eq!(documents.len(), 1, "one DaemonSet, the agent's");
    documents.into_iter().next().unwrap()
}

/// The lines of the block under `key:` (more indented than it), trimmed.
fn block(document: &str, key: &str) -> Vec<String> {
    let mut lines = document.lines().skip_while(|line| line.trim() != key);
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no `{key}` in\n{document}"));
    let indent = header.len() - header.trim_start().len();
    lines
        .take_while(|line| line.len() - line.trim_start().len() > indent)
        .map(|line| line.trim().to_owned())
        .filter(|line| !line.starts_with('#'))
        .collect()
}

#[test]
fn by_default_the_agent_runs_on_the_host_network_on_a_port_clear_of_node_daemons() {
    let daemonset = rendered_agent_daemonset();
    let spec_lines: Vec<&str> = daemonset.lines().map(str::trim).collect();
    assert!(spec_lines.contains(&"hostNetwork: true"), "{daemonset}");
    assert!(
        spec_lines.contains(&"dnsPolicy: ClusterFirstWithHostNet"),
        "{daemonset}"
    );
    assert!(spec_lines.contains(&"value: \"0.0.0.0:24090\""), "{daemonset}");
    assert!(spec_lines.contains(&"containerPort: 24090"), "{daemonset}");
}

#[test]
fn by_default_the_agent_tolerates_every_taint() {
    let tolerations = block(&rendered_agent_daemonset(), "tolerations:");
    assert_eq!(tolerations, ["- operator: Exists"]);
}
