//! The webhook's routes, driven with `oneshot` (no socket, no cluster) with AdmissionReview fixtures
//! as the API server sends them: allowed, patched (the JSON patch checked), denied, and the malformed,
//! oversized and wrong-kind requests that get a 4xx; a review judged while slow clients send.
use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use k8s_openapi::api::{core::v1::Pod, policy::v1::PodDisruptionBudget};
use serde_json::{Value, json};
use spot_rebalancer::{
    contract::SpotReplacement,
    keys,
    node::OptInLabel,
    webhook::{
        DEFAULT_CONTROLLER_USERNAME, Settings,
        cache::Caches,
        metrics::Metrics,
        server::{self, Webhook},
        taints::NTH_TAINT_KEYS,
    },
};
use tower::ServiceExt;

#[path = "fixtures/webhook/large_node.rs"]
mod large_node;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/webhook/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Two `app=web` pods on `spot-1` (the fixtures' node) covered by a PDB allowing `allowed` disruptions.
fn router(allowed: i32) -> Router {
    let web = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "spot-1", "containers": [{"name": "web", "image": "nginx"}]},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    };
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop", "generation": 1},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}},
        "status": {"disruptionsAllowed": allowed, "observedGeneration": 1,
                   "currentHealthy": 2, "desiredHealthy": 1, "expectedPods": 2}
    }))
    .unwrap();
    let settings = Settings::new(
        "spot-rebalancer.io/enabled=true".parse::<OptInLabel>().unwrap(),
        keys::DEFAULT_TAINT_KEY.into(),
        vec![NTH_TAINT_KEYS.parse().unwrap()],
        vec![DEFAULT_CONTROLLER_USERNAME.into()],
    );
    server::router(Arc::new(Webhook {
        settings,
        caches: Caches::from_objects(vec![web("web-1"), web("web-2")], vec![pdb], vec![])
            .with_records(vec![scaling_record()]),
        metrics: Metrics::unregistered(),
    }))
}

/// The controller's record of `spot-1` (the fixtures' node, by its uid): a spot scale-up sent, no
/// replacement yet.
fn scaling_record() -> SpotReplacement {
    serde_json::from_value(json!({
        "apiVersion": "spot-rebalancer.io/v1alpha1", "kind": "SpotReplacement",
        "metadata": {"name": "i-0abc0000", "namespace": "spot-rebalancer"},
        "spec": {"nodeName": "spot-1", "nodeUid": "5d2c1c1e-0f44-4a39-9d1e-0d7b5f1a8e01",
                 "instanceId": "i-0abc0000"},
        "status": {"phase": "ScalingSpot", "spotAsg": "spot-a", "detectedAt": "2026-11-25T10:00:01Z",
                   "asg": "spot-a", "capacityType": "spot", "baseline": 3, "targetDesired": 4,
                   "preScaleInstances": ["i-0abc", "i-0def", "i-0123"],
                   "scaleRequestedAt": "2026-11-25T10:00:02Z"}
    }))
    .unwrap()
}

async fn post(router: Router, path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, body)
}

fn patch_of(response: &Value) -> Value {
    // kube serialises the patch bytes as a JSON array of numbers (the API server accepts both that
    // and base64).
    let bytes: Vec<u8> = serde_json::from_value(response["patch"].clone()).expect("a patch");
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn a_no_execute_taint_the_pdb_cannot_absorb_is_patched_to_no_schedule_with_a_warning() {
    let (status, review) = post(router(0), "/mutate", fixture("taint-no-execute.json")).await;
    assert_eq!(status, StatusCode::OK);
    let response = &review["response"];
    assert_eq!(response["uid"], "3c3f1a52-1111-4a4e-9b9e-000000000001");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = patch_of(response);
    assert_eq!(
        patch[0],
        json!({"op": "test", "path": "/spec/taints/0/key", "value": "spot-instance-terminating"})
    );
    assert_eq!(
        patch[1],
        json!({"op": "test", "path": "/spec/taints/0/effect", "value": "NoExecute"})
    );
    assert_eq!(
        patch[2],
        json!({"op": "replace", "path": "/spec/taints/0/effect", "value": "NoSchedule"})
    );
    assert_eq!(patch[3]["op"], "add");
    assert_eq!(
        patch[3]["path"],
        "/metadata/annotations/spot-rebalancer.io~1drain-requested"
    );
    let drain: Value = serde_json::from_str(patch[3]["value"].as_str().unwrap()).unwrap();
    assert_eq!(drain["taints"], json!(["spot-instance-terminating"]));
    assert_eq!(patch.as_array().unwrap().len(), 4, "{patch}");
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("PDB shop/web allows 0 disruption(s), 2 pod(s) would be evicted at once"),
        "{warning}"
    );
}

#[tokio::test]
async fn a_no_execute_taint_within_the_pdb_is_allowed_unchanged() {
    let (status, review) = post(router(2), "/mutate", fixture("taint-no-execute.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(review["response"]["allowed"], true);
    assert!(review["response"].get("patch").is_none(), "{review}");
    assert!(review["response"].get("warnings").is_none(), "{review}");
}

#[tokio::test]
async fn a_no_execute_taint_the_order_guard_refuses_gets_no_pdb_warning() {
    // No interruption notice and no phase: the order guard denies the termination taint, so the PDB
    // guard neither softens it nor warns about a drain that will not happen.
    let mut review: Value = serde_json::from_slice(&fixture("taint-no-execute.json")).unwrap();
    for object in ["object", "oldObject"] {
        let annotations = review["request"][object]["metadata"]["annotations"]
            .as_object_mut()
            .unwrap();
        annotations.remove(keys::INTERRUPTION_TIME);
    }
    let body = serde_json::to_vec(&review).unwrap();
    let (status, mutated) = post(router(0), "/mutate", body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mutated["response"]["allowed"], true);
    assert!(mutated["response"].get("patch").is_none(), "{mutated}");
    assert!(mutated["response"].get("warnings").is_none(), "{mutated}");
    let (_, validated) = post(router(0), "/validate", body).await;
    assert_eq!(validated["response"]["allowed"], false, "{validated}");
}

#[tokio::test]
async fn a_review_of_a_large_real_node_fits_the_body_limit_and_is_judged() {
    let body = large_node::review();
    assert!(body.len() > 64 << 10, "{} bytes: not large", body.len());
    assert!(
        body.len() * 4 < server::MAX_REVIEW_BYTES,
        "{} bytes: too close to the limit",
        body.len()
    );
    for path in ["/mutate", "/validate"] {
        let (status, review) = post(router(0), path, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{path}: {review}");
        assert_eq!(review["response"]["allowed"], true, "{path}");
    }
}

#[tokio::test]
async fn an_update_that_adds_no_taint_is_allowed_by_both_guards() {
    for path in ["/mutate", "/validate"] {
        let (status, review) = post(router(0), path, fixture("label-change.json")).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(review["response"]["allowed"], true, "{path}");
        assert!(review["response"].get("patch").is_none(), "{path}");
    }
}

#[tokio::test]
async fn the_termination_taint_while_still_scaling_is_denied_naming_node_and_phase() {
    let (status, review) = post(
        router(0),
        "/validate",
        fixture("taint-termination-while-scaling.json"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let response = &review["response"];
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 403);
    assert_eq!(
        response["status"]["message"],
        "node spot-1: replacement not Ready (phase ScalingSpot); spot-rebalancer taints it once its \
         replacement is Ready"
    );
}

#[tokio::test]
async fn a_node_that_is_not_opted_in_is_left_alone() {
    let mut review: Value = serde_json::from_slice(&fixture("taint-termination-while-scaling.json")).unwrap();
    for object in ["object", "oldObject"] {
        review["request"][object]["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove(keys::ENABLED_LABEL);
    }
    let (_, answer) = post(router(0), "/validate", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(answer["response"]["allowed"], true);
}

#[tokio::test]
async fn malformed_json_is_a_bad_request_saying_so() {
    let (status, review) = post(router(0), "/mutate", "{\"apiVersion\": \"admission.k8s.io/v1\", ").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("the body is not an AdmissionReview"),
        "{message}"
    );
}

#[tokio::test]
async fn an_oversized_review_is_refused_with_413() {
    let mut review: Value = serde_json::from_slice(&fixture("taint-no-execute.json")).unwrap();
    review["request"]["object"]["metadata"]["annotations"]["padding"] = Value::String("x".repeat(4 << 20));
    let (status, answer) = post(router(0), "/mutate", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        answer["response"]["status"]["message"],
        "the AdmissionReview is larger than 512 KiB"
    );
}

/// A request body that sends its first bytes and then nothing: a client that stopped half-way.
fn half_sent_body() -> Body {
    use futures::StreamExt;
    let first = futures::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from_static(
        b"{\"apiVersion\":",
    ))]);
    Body::from_stream(first.chain(futures::stream::pending()))
}

#[tokio::test]
async fn a_review_is_judged_at_once_while_more_half_sent_requests_than_decision_slots_wait() {
    let router = router(0);
    let mut half_sent: Vec<_> = (0..=server::MAX_CONCURRENT_DECISIONS)
        .map(|_| {
            let request = Request::post("/mutate").body(half_sent_body()).unwrap();
            Box::pin(router.clone().oneshot(request))
        })
        .collect();
    // Each goes as far as it can: it waits for the rest of its body.
    for request in &mut half_sent {
        assert!(futures::poll!(request).is_pending());
    }

    let (status, review) = post(
        router.clone(),
        "/validate",
        fixture("taint-termination-while-scaling.json"),
    )
    .await;

    assert_eq!(status, StatusCode::OK, "{review}");
    assert_eq!(review["response"]["allowed"], false);
    assert_eq!(review["response"]["status"]["code"], 403);
    for request in &mut half_sent {
        assert!(futures::poll!(request).is_pending());
    }
}

#[tokio::test]
async fn a_review_of_another_resource_is_a_bad_request_naming_it() {
    for path in ["/mutate", "/validate"] {
        let (status, review) = post(router(0), path, fixture("pod-update.json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(
            review["response"]["status"]["message"],
            "this webhook reviews nodes (core/v1, no subresource); got core/v1/pods"
        );
    }
}

#[tokio::test]
async fn something_that_is_not_an_admission_review_is_a_bad_request() {
    let (status, review) = post(router(0), "/validate", r#"{"apiVersion": "v1", "kind": "Node"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(message.starts_with("expected kind AdmissionReview"), "{message}");
}

#[tokio::test]
async fn only_post_on_the_two_routes_is_served() {
    let get = Request::get("/mutate").body(Body::empty()).unwrap();
    assert_eq!(
        router(0).oneshot(get).await.unwrap().status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    let elsewhere = Request::post("/admit").body(Body::empty()).unwrap();
    assert_eq!(
        router(0).oneshot(elsewhere).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}
