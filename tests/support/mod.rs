//! The test bed as the e2e tests see it: a real Kubernetes API server (kwok nodes), moto's Auto
//! Scaling API behind the bed launcher (faults, recorded activities, call log) and the node bridge.
//! `bed/up.sh` starts it and writes `.bed/env`; these helpers read that file.
#![allow(dead_code)] // Each test binary uses its own subset of the helpers.

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    time::{Duration, Instant},
};

use aws_sdk_autoscaling::{
    config::{BehaviorVersion, Credentials, Region},
    types::{LaunchTemplateSpecification, Tag},
};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::Deserialize;
use serde_json::{Value, json};

/// Cluster-autoscaler's convention for node labels carried as ASG tags; the node bridge honours it.
pub const NODE_LABEL_TAG_PREFIX: &str = "k8s.io/cluster-autoscaler/node-template/label/";

/// Where the bed's env file is: `$BED_ENV_FILE`, else `.bed/env` in the repository.
fn env_file() -> PathBuf {
    std::env::var_os("BED_ENV_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".bed/env"))
}

#[derive(Clone)]
pub struct Bed {
    pub vars: HashMap<String, String>,
    pub kube: Client,
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub aws_endpoint: String,
    http: reqwest::Client,
}

impl Bed {
    /// Connects to the running bed, or fails with what to do about it.
    pub async fn connect() -> Bed {
        let path = env_file();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|error| {
            panic!(
                "the test bed is not up ({}: {error}). Run `make test`, or `bed/up.sh` then `cargo test`.",
                path.display()
            )
        });
        let vars: HashMap<String, String> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
            .collect();
        let kubeconfig = Kubeconfig::read_from(&vars["BED_KUBECONFIG"]).expect("read the bed's kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("a usable kubeconfig");
        let kube = Client::try_from(config).expect("a Kubernetes client");
        let aws_endpoint = vars["BED_AWS_ENDPOINT"].clone();
        Bed {
            autoscaling: autoscaling_client(&aws_endpoint),
            kube,
            aws_endpoint,
            http: reqwest::Client::new(),
            vars,
        }
    }

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.kube.clone())
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/_bed/{path}", self.aws_endpoint);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "{method} {url} answered {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Creates an EC2 launch template in moto; `spot` asks for spot instances.
    pub async fn create_launch_template(&self, name: &str, spot: bool) {
        self.control(
            reqwest::Method::POST,
            "launch-templates",
            Some(json!({"name": name, "instance_type": "m5.large", "spot": spot})),
        )
        .await;
    }

    /// Spot capacity failure on `asg`: desired capacity is accepted, nothing launches, and a Failed
    /// scaling activity names InsufficientInstanceCapacity.
    pub async fn arm_capacity_fault(&self, asg: &str) {
        self.control(
            reqwest::Method::POST,
            "faults/capacity",
            Some(json!({"asg": asg})),
        )
        .await;
    }

    pub async fn clear_capacity_fault(&self, asg: &str) {
        self.control(reqwest::Method::DELETE, &format!("faults/capacity/{asg}"), None)
            .await;
    }

    /// The next `count` AWS calls named in `actions` fail with `kind` (`throttling` or `server`).
    pub async fn arm_errors(&self, kind: &str, count: u32, actions: &[&str]) {
        let body = json!({"kind": kind, "rate": 1.0, "count": count, "actions": actions});
        self.control(reqwest::Method::POST, "faults/errors", Some(body))
            .await;
    }

    /// Every call named in `actions` on `asg` fails with `kind` (`throttling`, `server` or
    /// `access-denied`), until the rules are cleared.
    pub async fn arm_errors_on_asg(&self, kind: &str, actions: &[&str], asg: &str) {
        let body = json!({"kind": kind, "actions": actions, "asg": asg});
        self.control(reqwest::Method::POST, "faults/errors", Some(body))
            .await;
    }

    pub async fn clear_errors(&self) {
        self.control(reqwest::Method::DELETE, "faults/errors", None).await;
    }

    /// Timings of `asg` (seconds; any of `launch_delay`, `termination_delay`, `boot_delay`,
    /// `spot_wait`, `retry_delay`). May be set before the ASG is created.
    pub async fn set_timing(&self, asg: &str, timing: Value) -> Value {
        self.control(reqwest::Method::PUT, &format!("timing/{asg}"), Some(timing))
            .await
    }

    /// A capacity fault limited as `limits` says (`count`: the next N launches; `zone`: one AZ;
    /// `seconds`: clears itself; `message`): each launch it takes gets a Failed activity.
    pub async fn arm_capacity_fault_with(&self, asg: &str, limits: Value) {
        let mut body = json!({ "asg": asg });
        if let (Some(body), Some(limits)) = (body.as_object_mut(), limits.as_object()) {
            body.extend(limits.clone());
        }
        self.control(reqwest::Method::POST, "faults/capacity", Some(body))
            .await;
    }

    /// The neighbour (another actor in the account) sets `asg`'s desired capacity; AWS's bounds apply.
    pub async fn neighbour_set_desired(&self, asg: &str, desired: i64) -> Value {
        let body = json!({"asg": asg, "desired": desired});
        self.control(reqwest::Method::POST, "neighbour/desired", Some(body))
            .await
    }

    /// The neighbour scales `asg` in as cluster-autoscaler does: TerminateInstanceInAutoScalingGroup
    /// with a decrement, of `instance` or else the first unprotected InService instance. The answer
    /// names the instance and the activity.
    pub async fn neighbour_terminate(&self, asg: &str, instance: Option<&str>) -> Value {
        let body = json!({"asg": asg, "instance": instance});
        self.control(reqwest::Method::POST, "neighbour/terminate", Some(body))
            .await
    }

    /// AWS-like throttling: a token bucket of `burst` calls refilled at `rate` per second, for
    /// `action` (all when `None`) on `asg` (all when `None`).
    pub async fn throttle(&self, action: Option<&str>, asg: Option<&str>, burst: f64, rate: f64) {
        let body = json!({"action": action, "asg": asg, "burst": burst, "rate": rate});
        self.control(reqwest::Method::POST, "throttle", Some(body)).await;
    }

    pub async fn clear_throttle(&self) {
        self.control(reqwest::Method::DELETE, "throttle", None).await;
    }

    /// AWS calls the launcher saw, filtered by action and ASG.
    pub async fn calls(&self, action: &str, asg: &str) -> Vec<Call> {
        let value = self
            .control(
                reqwest::Method::GET,
                &format!("calls?action={action}&asg={asg}"),
                None,
            )
            .await;
        serde_json::from_value(value).expect("the call log is a list of calls")
    }

    /// Creates an ASG from a fresh launch template, with node labels carried as tags. Its instances
    /// start `Pending` (the bed's launch delay): wait for them with [`Bed::in_service_instances`] or
    /// for their Nodes.
    pub async fn create_asg(&self, spec: AsgSpec<'_>) {
        let template = format!("{}-lt", spec.name);
        self.create_launch_template(&template, spec.spot).await;
        let tags = spec.labels.iter().map(|(key, value)| {
            Tag::builder()
                .key(format!("{NODE_LABEL_TAG_PREFIX}{key}"))
                .value(*value)
                .propagate_at_launch(true)
                .resource_id(spec.name)
                .resource_type("auto-scaling-group")
                .build()
        });
        self.autoscaling
            .create_auto_scaling_group()
            .auto_scaling_group_name(spec.name)
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_name(&template)
                    .version("$Latest")
                    .build(),
            )
            .availability_zones("us-east-1a")
            .min_size(0)
            .max_size(spec.max)
            .desired_capacity(spec.desired)
            .set_tags(Some(tags.collect()))
            .send()
            .await
            .expect("CreateAutoScalingGroup");
    }

    /// Instance ids in `asg` that are InService.
    pub async fn in_service_instances(&self, asg: &str) -> Vec<String> {
        let groups = self
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(asg)
            .send()
            .await
            .expect("DescribeAutoScalingGroups");
        let group = groups.auto_scaling_groups().first().expect("the ASG exists");
        group
            .instances()
            .iter()
            .filter(|i| i.lifecycle_state().map(|s| s.as_str()) == Some("InService"))
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect()
    }

    /// Nodes carrying `label=value`.
    pub async fn nodes_labelled(&self, label: &str, value: &str) -> Vec<Node> {
        let params = ListParams::default().labels(&format!("{label}={value}"));
        self.nodes().list(&params).await.expect("list nodes").items
    }
}

pub struct AsgSpec<'a> {
    pub name: &'a str,
    pub spot: bool,
    pub desired: i32,
    pub max: i32,
    pub labels: &'a [(&'a str, &'a str)],
}

#[derive(Debug, Deserialize)]
pub struct Call {
    pub action: String,
    pub status: u16,
    #[serde(default)]
    pub desired_capacity: Option<i64>,
    /// The request's parameters (`InstanceId`, `ShouldDecrementDesiredCapacity`, ...).
    #[serde(default)]
    pub params: HashMap<String, String>,
    /// AWS's error code when the call failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The scaling activities the call produced.
    #[serde(default)]
    pub activity_ids: Vec<String>,
    /// `client` (an SDK through the endpoint) or `neighbour` (the bed's other actor).
    #[serde(default)]
    pub actor: Option<String>,
}

/// An Auto Scaling client for the bed's moto, as the controller will build one: endpoint override,
/// static test credentials, the SDK's standard retry configuration.
pub fn autoscaling_client(endpoint: &str) -> aws_sdk_autoscaling::Client {
    let config = aws_sdk_autoscaling::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "bed"))
        .build();
    aws_sdk_autoscaling::Client::from_conf(config)
}

/// A name unique to this test run, so tests share the bed without stepping on each other.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` until it returns `Some`, or fails the test saying what never happened.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The instance id at the end of a node's `aws:///<az>/<instance-id>` provider id.
pub fn instance_id(node: &Node) -> Option<String> {
    let provider_id = node.spec.as_ref()?.provider_id.as_deref()?;
    provider_id
        .strip_prefix("aws:///")?
        .split('/')
        .nth(1)
        .map(str::to_owned)
}

// ----- every role's process: start, ready, metrics, SIGTERM, SIGKILL, logs ------------------------
pub mod process;

// ----- cutting a role off from the API server ---------------------------------------------------
pub mod proxy;

// ----- the node agent (issue 3) ----------------------------------------------------------------
// The agent's own test parts live in their own file so these helpers stay the lead's.
pub mod agent;

// ----- the controller (issue 4) ------------------------------------------------------------------
// The controller's e2e parts: its process, scenarios on the bed, the Node contract, the order watch.
pub mod controller;

// ----- the end of a node's life (issue 7) -------------------------------------------------------
// Workloads and PDBs on a node group, a PDB watch, the capacity ledger, a spot reclaim.
pub mod lifecycle;

// ----- the admission webhook (issue 5) -----------------------------------------------------------
// The webhook's e2e parts: test certificates, its process, its registration, kwok nodes with pods and PDBs.
pub mod webhook;

// ----- the chart's identities (issue 6) -----------------------------------------------------------
// Each role process runs under a token of its own ServiceAccount, with the chart's rendered RBAC.
pub mod identity;
