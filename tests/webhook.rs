//! The admission webhook e2e on the bed: the real `spot-rebalancer webhook` process (as its own
//! ServiceAccount), registered at the real kube-apiserver with the chart's rendered webhook
//! configurations (`clientConfig.url` on 127.0.0.1, scoped to each test's own opt-in label), driven
//! the way users and other tools drive it: `kubectl taint`. Also the chart's agent
//! ValidatingAdmissionPolicy, under the agent ServiceAccount's token bound to a Node.
mod support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use spot_rebalancer::{
    contract::{
        keys::{self, DEFAULT_TAINT_KEY},
        record::Phase,
    },
    webhook::server::MAX_CONCURRENT_DECISIONS,
};
use support::{
    Bed, eventually,
    identity::{Role, role_kubeconfig},
    webhook::{Guarded, KwokNode, TestNamespace, kubectl, write_record},
};

const NTH_SPOT_ITN: &str = "aws-node-termination-handler/spot-itn";

fn taint_arg(node: &KwokNode, effect: &str) -> Vec<String> {
    vec![
        "taint".into(),
        "nodes".into(),
        node.name.clone(),
        format!("{DEFAULT_TAINT_KEY}=true:{effect}"),
    ]
}

fn run_kubectl(bed: &Bed, args: &[String]) -> support::webhook::KubectlOutput {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    kubectl(bed, &args)
}

#[tokio::test]
async fn a_no_execute_taint_the_pdb_cannot_absorb_ends_as_no_schedule_and_kubectl_shows_why() {
    let bed = Bed::connect().await;
    let guarded = Guarded::start(&bed).await;
    // The spot interruption notice is in: the order guard lets the termination taint through at once.
    let notice = json!({keys::INTERRUPTION_TIME: "2026-11-25T10:02:00Z"});
    let node = KwokNode::opted_in(&bed, &guarded, "wh-pdb-tight", notice).await;
    let namespace = TestNamespace::create(&bed, "wh-pdb-tight").await;
    namespace.running_pods(&node.name, "web", 2).await;
    assert_eq!(namespace.pdb("web", 2).await, 0, "the PDB allows no disruption");
    guarded.wait_until_registered(&bed, &node.name).await;

    let output = run_kubectl(&bed, &taint_arg(&node, "NoExecute"));

    assert!(output.success, "kubectl taint failed: {}", output.stderr);
    let expected = format!(
        "PDB {}/web allows 0 disruption(s), 2 pod(s) would be evicted at once",
        namespace.name
    );
    assert!(
        output.stderr.contains("Warning:") && output.stderr.contains(&expected),
        "kubectl did not show the warning: {}",
        output.stderr
    );
    assert_eq!(
        node.taint_effect(&bed, DEFAULT_TAINT_KEY).await.as_deref(),
        Some("NoSchedule")
    );
    let drain = node.get(&bed).await.metadata.annotations.unwrap_or_default()[keys::DRAIN_REQUESTED].clone();
    assert!(drain.contains(&expected), "drain request: {drain}");
}

#[tokio::test]
async fn a_no_execute_taint_the_pdb_allows_stays_no_execute() {
    let bed = Bed::connect().await;
    let guarded = Guarded::start(&bed).await;
    let node = KwokNode::opted_in(&bed, &guarded, "wh-pdb-loose", json!({})).await;
    let namespace = TestNamespace::create(&bed, "wh-pdb-loose").await;
    namespace.running_pods(&node.name, "web", 2).await;
    assert_eq!(namespace.pdb("web", 0).await, 2, "the PDB allows both pods to go");
    guarded.wait_until_registered(&bed, &node.name).await;

    // AWS Node Termination Handler's taint, as it sets it with `taintEffect: NoExecute`.
    let output = kubectl(
        &bed,
        &[
            "taint",
            "nodes",
            &node.name,
            &format!("{NTH_SPOT_ITN}=true:NoExecute"),
        ],
    );

    assert!(output.success, "kubectl taint failed: {}", output.stderr);
    assert!(!output.stderr.contains("Warning:"), "{}", output.stderr);
    assert_eq!(
        node.taint_effect(&bed, NTH_SPOT_ITN).await.as_deref(),
        Some("NoExecute")
    );
    let annotations = node.get(&bed).await.metadata.annotations.unwrap_or_default();
    assert!(!annotations.contains_key(keys::DRAIN_REQUESTED));
}

#[tokio::test]
async fn the_termination_taint_is_denied_until_the_replacement_is_ready() {
    let bed = Bed::connect().await;
    let guarded = Guarded::start(&bed).await;
    let old = KwokNode::opted_in(&bed, &guarded, "wh-order-old", json!({})).await;
    let record = write_record(&bed, &old.name, None, Phase::ScalingSpot, None).await;
    guarded.wait_until_registered(&bed, &old.name).await;

    let denied = run_kubectl(&bed, &taint_arg(&old, "NoSchedule"));

    assert!(
        !denied.success,
        "the taint went on before the replacement was Ready"
    );
    let expected = format!(
        "node {}: replacement not Ready (phase ScalingSpot); spot-rebalancer taints it once its replacement is Ready",
        old.name
    );
    assert!(denied.stderr.contains(&expected), "{}", denied.stderr);
    assert_eq!(old.taint_effect(&bed, DEFAULT_TAINT_KEY).await, None);

    // The controller claims a replacement and it turns Ready: now the taint may go on.
    let replacement = KwokNode::create(&bed, "wh-order-new", Default::default(), json!({})).await;
    replacement.wait_until_ready(&bed).await;
    write_record(
        &bed,
        &old.name,
        Some(&record),
        Phase::AwaitingReady,
        Some(&replacement.name),
    )
    .await;
    eventually("the taint to be allowed", Duration::from_secs(20), || async {
        run_kubectl(&bed, &taint_arg(&old, "NoSchedule"))
            .success
            .then_some(())
    })
    .await;
    assert_eq!(
        old.taint_effect(&bed, DEFAULT_TAINT_KEY).await.as_deref(),
        Some("NoSchedule")
    );
}

#[tokio::test]
async fn with_the_webhook_stopped_node_updates_still_succeed() {
    let bed = Bed::connect().await;
    let mut guarded = Guarded::start(&bed).await;
    let node = KwokNode::opted_in(&bed, &guarded, "wh-down", json!({})).await;
    guarded.wait_until_registered(&bed, &node.name).await;
    let denied = run_kubectl(&bed, &taint_arg(&node, "NoSchedule"));
    assert!(
        !denied.success,
        "the running webhook let an unreplaced node be tainted"
    );

    guarded.webhook.stop();
    let started = Instant::now();
    let output = run_kubectl(&bed, &taint_arg(&node, "NoSchedule"));

    assert!(
        output.success,
        "with the webhook down the update failed: {}",
        output.stderr
    );
    assert_eq!(
        node.taint_effect(&bed, DEFAULT_TAINT_KEY).await.as_deref(),
        Some("NoSchedule")
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the update waited {:?} for the missing webhook",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_served_while_reviews_keep_being_answered() {
    let bed = Bed::connect().await;
    let guarded = Guarded::start(&bed).await;
    let node = KwokNode::opted_in(&bed, &guarded, "wh-rotate", json!({})).await;
    guarded.wait_until_registered(&bed, &node.name).await;
    let nodes: Api<Node> = bed.nodes();
    let taint =
        json!({"spec": {"taints": [{"key": DEFAULT_TAINT_KEY, "value": "true", "effect": "NoSchedule"}]}});
    let (new_cert, new_key) = guarded.certs.serving(&["rotated.webhook.test"]);

    // Node updates the order guard must deny, for 4 s; the certificate is rotated after 1 s, the
    // certificate file first and its key half a second later (a pair briefly out of step).
    let started = Instant::now();
    let mut answered = 0;
    let mut rotation = 0;
    while started.elapsed() < Duration::from_secs(4) {
        if rotation == 0 && started.elapsed() > Duration::from_secs(1) {
            std::fs::write(guarded.certs.cert_path(), &new_cert).unwrap();
            rotation = 1;
        } else if rotation == 1 && started.elapsed() > Duration::from_millis(1500) {
            std::fs::write(guarded.certs.key_path(), &new_key).unwrap();
            rotation = 2;
        }
        match nodes
            .patch(&node.name, &PatchParams::default(), &Patch::Merge(&taint))
            .await
        {
            Err(kube::Error::Api(status))
                if status.code == 403 && status.message.contains("replacement not Ready") =>
            {
                answered += 1;
            }
            other => panic!("update {answered} was not answered by the webhook: {other:?}"),
        }
    }
    assert!(answered > 10, "only {answered} updates in 4 s");

    // New connections get the new certificate (it alone names rotated.webhook.test), trusted by the
    // same CA bundle.
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(guarded.certs.ca_pem.as_bytes()).unwrap()])
        .resolve(
            "rotated.webhook.test",
            ([127, 0, 0, 1], guarded.webhook.port).into(),
        )
        .build()
        .unwrap();
    let url = format!("https://rotated.webhook.test:{}/validate", guarded.webhook.port);
    let status = client
        .get(&url)
        .send()
        .await
        .expect("TLS with the rotated certificate")
        .status();
    assert_eq!(status, reqwest::StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        guarded
            .webhook
            .metric("spot_rebalancer_webhook_tls_reloads_total{result=\"ok\"}")
            .await
            >= 1.0
    );
}

/// kubectl with `kubeconfig` (one of a role's own identities) and nothing inherited.
fn kubectl_with(bed: &Bed, kubeconfig: &Path, args: &[&str]) -> support::webhook::KubectlOutput {
    let output = std::process::Command::new(&bed.vars["BED_KUBECTL"])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    support::webhook::KubectlOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test]
async fn the_agent_may_annotate_only_its_own_node_and_only_with_its_own_keys() {
    let bed = Bed::connect().await;
    let own = KwokNode::create(&bed, "wh-agent-own", Default::default(), json!({})).await;
    let other = KwokNode::create(&bed, "wh-agent-other", Default::default(), json!({})).await;
    // The chart's agent ServiceAccount, RBAC and admission policy; a token bound to its own Node.
    let agent = role_kubeconfig(&bed, Role::Agent { node: &own.name });
    let annotate = |node: &KwokNode, key: &str, value: &str| {
        kubectl_with(
            &bed,
            &agent,
            &[
                "annotate",
                "--overwrite",
                "node",
                &node.name,
                &format!("{key}={value}"),
            ],
        )
    };

    // Another node, even with the agent's own key: denied (once the policy is in force).
    let denied = eventually("the policy to be in force", Duration::from_secs(30), || async {
        let output = annotate(
            &other,
            keys::REBALANCE_NOTICE_TIME,
            &jiff::Timestamp::now().to_string(),
        );
        (!output.success).then_some(output.stderr)
    })
    .await;
    assert!(
        denied.contains(&format!(
            "the spot-rebalancer agent may annotate only its own node ({}), not {}",
            own.name, other.name
        )),
        "{denied}"
    );

    // Its own node with its own keys: allowed.
    for key in [keys::REBALANCE_NOTICE_TIME, keys::INTERRUPTION_TIME] {
        let output = annotate(&own, key, "2026-11-25T10:00:00Z");
        assert!(output.success, "{key} on its own node: {}", output.stderr);
    }
    let output = annotate(&own, keys::INSTANCE_ID, "i-0123456789abcdef0");
    assert!(output.success, "instance id on its own node: {}", output.stderr);

    // Its own keys, but values of another shape or size: denied (the controller reads them).
    for (key, value) in [
        (keys::INSTANCE_ID, "i-0abc"),
        (keys::INSTANCE_ID, "i-0123456789abcdef0 i-0fedcba9876543210"),
        (keys::REBALANCE_NOTICE_TIME, "soon"),
        (keys::INTERRUPTION_TIME, "2026-11-25T10:00:00.123456789012345678Z"),
    ] {
        let output = annotate(&own, key, value);
        assert!(
            !output.success && output.stderr.contains("must be an RFC 3339 time"),
            "{key}={value}: {}",
            output.stderr
        );
    }

    // Its own node, but someone else's annotation, a label or a taint: denied.
    let foreign = annotate(&own, "spot-rebalancer.io/phase", "Tainted");
    assert!(
        !foreign.success && foreign.stderr.contains("may change only its own annotations"),
        "{}",
        foreign.stderr
    );
    let label = kubectl_with(&bed, &agent, &["label", "node", &own.name, "team=payments"]);
    assert!(!label.success, "the agent relabelled its node");
    let taint = kubectl_with(&bed, &agent, &["taint", "node", &own.name, "evil=true:NoExecute"]);
    assert!(!taint.success, "the agent tainted its node");
}

/// A request body that sends its first bytes and then nothing, for ever: a client that stops
/// half-way through its request.
struct StallingBody(Option<axum::body::Bytes>);

impl http_body::Body for StallingBody {
    type Data = axum::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.0.take() {
            Some(first) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first)))),
            None => std::task::Poll::Pending,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(100_000)
    }
}

/// The AdmissionReview the API server sends when `alice` adds the termination taint to `node`.
fn termination_taint_review(node: &Node, uid: &str) -> serde_json::Value {
    let old = serde_json::to_value(node).unwrap();
    let mut new = old.clone();
    let taint = json!({"key": DEFAULT_TAINT_KEY, "value": "true", "effect": "NoSchedule"});
    match new["spec"]["taints"].as_array_mut() {
        Some(taints) => taints.push(taint),
        None => new["spec"]["taints"] = json!([taint]),
    }
    let node_kind = json!({"group": "", "version": "v1", "kind": "Node"});
    let nodes = json!({"group": "", "version": "v1", "resource": "nodes"});
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": node_kind, "resource": nodes, "requestKind": node_kind,
            "requestResource": nodes, "name": node.metadata.name, "operation": "UPDATE",
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": new, "oldObject": old, "dryRun": false,
            "options": {"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

#[tokio::test]
async fn the_webhook_survives_an_oversized_body_flood_and_slow_clients_and_still_guards_at_once() {
    let bed = Bed::connect().await;
    let guarded = Guarded::start(&bed).await;
    let old = KwokNode::opted_in(&bed, &guarded, "wh-flood", json!({})).await;
    write_record(&bed, &old.name, None, Phase::ScalingSpot, None).await;
    guarded.wait_until_registered(&bed, &old.name).await;
    let port = guarded.webhook.port;
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(guarded.certs.ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let url = |path: &str| format!("https://127.0.0.1:{port}{path}");

    // 200 connections that never start TLS.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }

    // A flood of 3 MiB bodies: every one refused, none judged.
    let oversized = axum::body::Bytes::from(vec![b' '; 3 << 20]);
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let request = client.post(url("/validate")).body(oversized.clone());
            tokio::spawn(async move { request.send().await.map(|response| response.status()) })
        })
        .collect();
    for sent in flood {
        // The webhook may answer and close before the client has sent it all: an error then.
        if let Ok(status) = sent.await.unwrap() {
            assert_eq!(status, reqwest::StatusCode::PAYLOAD_TOO_LARGE);
        }
    }

    // 100 requests that stop half-way through their body, more than there are decision slots. The
    // webhook holds each until its body timeout (5 s); until then they wait for their bodies
    // without a slot.
    let half_sent: Vec<_> = (0..100)
        .map(|_| {
            let request = client
                .post(url("/mutate"))
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap(StallingBody(Some(
                    axum::body::Bytes::from_static(b"{\"apiVersion\":"),
                ))));
            tokio::spawn(async move { request.send().await.map(|response| response.status()) })
        })
        .collect();
    let more_than_the_slots = MAX_CONCURRENT_DECISIONS + 1;
    eventually(
        "more half-sent requests being received than there are decision slots",
        Duration::from_secs(20),
        || async {
            let receiving = guarded
                .webhook
                .metric("spot_rebalancer_admission_bodies_receiving")
                .await;
            (receiving >= more_than_the_slots as f64).then_some(())
        },
    )
    .await;

    // Meanwhile a valid review is answered, and right: the termination taint is denied, the
    // replacement not being Ready.
    let review = termination_taint_review(&old.get(&bed).await, "7f1e2d3c-0000-4000-8000-00000000f100");
    let answer = client.post(url("/validate")).json(&review).send().await.unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::OK);
    let answer: serde_json::Value = answer.json().await.unwrap();
    let response = &answer["response"];
    assert_eq!(response["uid"], "7f1e2d3c-0000-4000-8000-00000000f100");
    assert_eq!(response["allowed"], false, "{answer}");
    let message = response["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("replacement not Ready"), "{answer}");
    // "At once": answered before the half-sent requests were cut at their body timeout, so while
    // more of them were open than there are decision slots.
    let still_open = half_sent.iter().filter(|request| !request.is_finished()).count();
    assert!(
        still_open >= more_than_the_slots,
        "the review was answered only once the half-sent requests ended ({still_open} still open)"
    );

    // And the API server's call still gets its answer within its 2 s: the termination taint is
    // denied, not let through by `failurePolicy: Ignore`.
    let denied = run_kubectl(&bed, &taint_arg(&old, "NoSchedule"));
    assert!(!denied.success, "the taint went on: the webhook did not answer");
    assert!(
        denied.stderr.contains("replacement not Ready"),
        "{}",
        denied.stderr
    );
    assert_eq!(old.taint_effect(&bed, DEFAULT_TAINT_KEY).await, None);

    // The slow clients are dropped: the half-sent requests end (408 or a closed connection), and the
    // silent connections are closed by the server (bounded waits; the timeouts are 5 s).
    for request in half_sent {
        let ended = tokio::time::timeout(Duration::from_secs(20), request)
            .await
            .expect("a half-sent request still open after 20 s")
            .unwrap();
        if let Ok(status) = ended {
            assert_eq!(status, reqwest::StatusCode::REQUEST_TIMEOUT);
        }
    }
    for mut connection in silent {
        use tokio::io::AsyncReadExt;
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(20), connection.read(&mut buffer))
            .await
            .expect("a connection that never started TLS still open after 20 s");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    let reviews = |labels: &str| {
        let webhook = &guarded.webhook;
        let series = format!("spot_rebalancer_admission_reviews_total{{{labels}}}");
        async move { webhook.metric(&series).await }
    };
    assert!(reviews("route=\"validate\",verdict=\"too_large\"").await >= 1.0);
    assert!(reviews("route=\"mutate\",verdict=\"timed_out\"").await >= 1.0);
    // Nothing was shed: neither the review's body nor its decision waited behind the slow clients.
    assert_eq!(reviews("route=\"validate\",verdict=\"shed\"").await, 0.0);
    assert_eq!(reviews("route=\"any\",verdict=\"shed\"").await, 0.0);
    assert_eq!(
        guarded
            .webhook
            .metric("spot_rebalancer_admission_bodies_receiving")
            .await,
        0.0
    );
}
