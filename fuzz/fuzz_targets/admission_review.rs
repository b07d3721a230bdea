//! Fuzzes the webhook's whole decision, bytes to answer, on both routes: review parsing, the PDB
//! guard (arithmetic and patch) and the order guard, over caches holding pods and a PDB on the
//! fixtures' node. Never a panic; a 200 answer is an AdmissionReview; a patch applies to the object.
#![no_main]

use std::sync::OnceLock;

use k8s_openapi::api::{core::v1::Pod, policy::v1::PodDisruptionBudget};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use spot_rebalancer::webhook::{
    DEFAULT_CONTROLLER_USERNAME, Settings,
    cache::Caches,
    metrics::Metrics,
    server::{Route, Webhook, admit},
    taints::NTH_TAINT_KEYS,
};

fn webhook() -> &'static Webhook {
    static WEBHOOK: OnceLock<Webhook> = OnceLock::new();
    WEBHOOK.get_or_init(|| {
        let pod = |name: &str, tolerations: Value| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
                "spec": {"nodeName": "spot-1", "containers": [], "tolerations": tolerations},
                "status": {"phase": "Running"}
            }))
            .unwrap()
        };
        let pdb: PodDisruptionBudget = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "generation": 1},
            "spec": {"minAvailable": 1, "selector": {"matchExpressions": [
                {"key": "app", "operator": "In", "values": ["web", "api"]}]}},
            "status": {"disruptionsAllowed": 1, "observedGeneration": 1}
        }))
        .unwrap();
        let pods = vec![
            pod("web-1", json!([])),
            pod("web-2", json!([])),
            pod(
                "web-3",
                json!([{"key": "spot-instance-terminating", "operator": "Exists"}]),
            ),
        ];
        Webhook {
            settings: Settings::new(
                "spot-rebalancer.io/enabled=true".parse().unwrap(),
                "spot-instance-terminating".into(),
                vec![NTH_TAINT_KEYS.parse().unwrap()],
                vec![DEFAULT_CONTROLLER_USERNAME.into()],
            ),
            caches: Caches::from_objects(pods, vec![pdb], vec![]),
            metrics: Metrics::unregistered(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let now = jiff::Timestamp::UNIX_EPOCH;
    for route in [Route::Mutate, Route::Validate] {
        let answer = admit(route, data, webhook(), now);
        let review: Value = serde_json::from_slice(&answer.body).expect("every answer is JSON");
        match answer.status.as_u16() {
            200 => {
                let response = &review["response"];
                assert!(response["allowed"].is_boolean(), "{review}");
                if let Some(patch) = response.get("patch") {
                    let bytes: Vec<u8> = serde_json::from_value(patch.clone()).unwrap();
                    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
                    // The review parses while ignoring unknown fields; a generic Value is stricter
                    // (e.g. invalid UTF-8 in an ignored string), so check the patch only when it parses.
                    if let Ok(request) = serde_json::from_slice::<Value>(data) {
                        let mut object = request["request"]["object"].clone();
                        json_patch::patch(&mut object, &patch.0).expect("the patch applies to the object");
                    }
                }
            }
            400 => assert_eq!(review["response"]["allowed"], false),
            status => panic!("unexpected status {status}"),
        }
    }
});
