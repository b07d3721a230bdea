//! The AWS Auto Scaling boundary: the few calls the controller makes, turned into plain data.
//!
//! Retries (exponential backoff with jitter) and per-call timeouts come from the SDK's own retry and
//! timeout configuration, set once in [`AutoScaling::from_env`]; nothing here loops.
//!
//! Every attempt of every call passes the leader's [`Fence`] first (an SDK interceptor, so no call
//! site can forget): a leader whose Lease is not freshly renewed sends nothing to AWS.
use std::{collections::BTreeMap, time::Duration};

use aws_config::{BehaviorVersion, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_autoscaling::{
    Client,
    config::{ConfigBag, Intercept, RuntimeComponents, interceptors::BeforeTransmitInterceptorContextRef},
    error::{BoxError, DisplayErrorContext},
};
use jiff::Timestamp;

use crate::fence::{Fence, Fenced, fenced_cause};

/// DescribeAutoScalingInstances takes at most this many instance ids a call.
pub const DESCRIBE_INSTANCES_BATCH: usize = 50;

/// Why an Auto Scaling call failed, after the SDK's retries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("DescribeAutoScalingInstances for {instance}: {message}")]
    DescribeInstance { instance: String, message: String },
    #[error("DescribeAutoScalingGroups for {asg}: {message}")]
    DescribeGroup { asg: String, message: String },
    #[error("Auto Scaling group {0} does not exist")]
    NoSuchGroup(String),
    #[error("SetDesiredCapacity of {asg} to {desired}: {message}")]
    SetDesired {
        asg: String,
        desired: i32,
        message: String,
    },
    #[error("UpdateAutoScalingGroup of {asg} to MaxSize and desired capacity {desired}: {message}")]
    RaiseMax {
        asg: String,
        desired: i32,
        message: String,
    },
    #[error("DescribeScalingActivities for {asg}: {message}")]
    Activities { asg: String, message: String },
    #[error("TerminateInstanceInAutoScalingGroup for {instance}: {message}")]
    Terminate { instance: String, message: String },
    #[error("SetInstanceProtection on {asg}: {message}")]
    Protect { asg: String, message: String },
    /// Nothing was sent: this replica may not act now. Transient: try again once the Lease is renewed
    /// (or stop, when another replica leads); never a reason to fall back or fail a flow.
    #[error(transparent)]
    Fenced(Fenced),
}

impl Error {
    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::DescribeInstance { .. } => "describe_instance",
            Error::DescribeGroup { .. } => "describe_group",
            Error::NoSuchGroup(_) => "no_such_group",
            Error::SetDesired { .. } => "set_desired",
            Error::RaiseMax { .. } => "raise_max",
            Error::Activities { .. } => "activities",
            Error::Terminate { .. } => "terminate",
            Error::Protect { .. } => "protect",
            Error::Fenced(_) => "fenced",
        }
    }

    /// The call was stopped by the fence before it was sent.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced(_))
    }
}

/// `Error::Fenced` when the fence stopped the call, else the error `failed` makes of the SDK's message.
fn failure(error: impl std::error::Error + 'static, failed: impl FnOnce(String) -> Error) -> Error {
    match fenced_cause(&error) {
        Some(fenced) => Error::Fenced(fenced.clone()),
        None => failed(DisplayErrorContext(error).to_string()),
    }
}

/// Checks the fence right before each attempt is sent, retries included.
#[derive(Debug)]
struct FenceCheck(Fence);

impl Intercept for FenceCheck {
    fn name(&self) -> &'static str {
        "FenceCheck"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        Ok(self.0.check()?)
    }
}

/// An Auto Scaling group as the controller needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub desired: i32,
    pub min: i32,
    pub max: i32,
    pub instances: Vec<GroupInstance>,
    pub tags: BTreeMap<String, String>,
    /// EC2 Auto Scaling Capacity Rebalancing: the ASG launches its own replacement on a notice.
    pub capacity_rebalance: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupInstance {
    pub id: String,
    /// `Pending`, `InService`, `Terminating`, …
    pub lifecycle_state: String,
    /// Protected from scale-in: a lowered desired capacity never picks it.
    pub protected: bool,
}

#[cfg(test)]
impl Group {
    /// A group for unit tests: MinSize 0, no tags, `instances` as `(id, lifecycle state)`.
    pub fn for_tests(name: &str, desired: i32, max: i32, instances: &[(&str, &str)]) -> Group {
        Group {
            name: name.into(),
            desired,
            min: 0,
            max,
            instances: instances
                .iter()
                .map(|(id, state)| GroupInstance {
                    id: (*id).into(),
                    lifecycle_state: (*state).into(),
                    protected: false,
                })
                .collect(),
            tags: Default::default(),
            capacity_rebalance: false,
        }
    }
}

impl GroupInstance {
    pub fn in_service(&self) -> bool {
        self.lifecycle_state == "InService"
    }

    /// On its way out of the group (terminating, terminated or detached): it never counts as
    /// capacity, and a lower never needs to protect it.
    pub fn is_leaving(&self) -> bool {
        self.lifecycle_state.starts_with("Terminat") || self.lifecycle_state == "Detached"
    }
}

/// A scaling activity of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct Activity {
    pub id: String,
    /// `InProgress`, `Successful`, `Failed`, `Cancelled`, …
    pub status: String,
    pub description: String,
    pub status_message: String,
    /// Why AWS started it, e.g. "… changing the desired capacity from 3 to 4 …".
    pub cause: String,
    pub start_time: Option<Timestamp>,
}

/// The Auto Scaling API, through the SDK.
#[derive(Clone)]
pub struct AutoScaling {
    client: Client,
}

impl AutoScaling {
    /// Credentials and region from the default chain (IRSA, EKS Pod Identity, environment), the
    /// endpoint from `AWS_ENDPOINT_URL` when set; `attempts` tries per call with the SDK's standard
    /// backoff and jitter, each attempt bounded by `attempt_timeout`; each attempt sent only while
    /// `fence` is open.
    pub async fn from_env(attempts: u32, attempt_timeout: Duration, fence: Fence) -> Self {
        let config = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(attempt_timeout)
                    .operation_timeout(attempt_timeout * attempts)
                    .build(),
            )
            .load()
            .await;
        AutoScaling::new(&config, fence)
    }

    fn new(config: &aws_config::SdkConfig, fence: Fence) -> Self {
        let config = aws_sdk_autoscaling::config::Builder::from(config)
            .interceptor(FenceCheck(fence))
            .build();
        AutoScaling {
            client: Client::from_conf(config),
        }
    }

    /// The ASG an instance belongs to, or `None` when it is in none.
    pub async fn group_of_instance(&self, instance: &str) -> Result<Option<String>, Error> {
        let response = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(instance)
            .send()
            .await
            .map_err(|e| {
                failure(e, |message| Error::DescribeInstance {
                    instance: instance.to_owned(),
                    message,
                })
            })?;
        Ok(response
            .auto_scaling_instances()
            .first()
            .and_then(|i| i.auto_scaling_group_name())
            .map(str::to_owned))
    }

    /// The ASGs of many instances in as few calls as the API allows ([`DESCRIBE_INSTANCES_BATCH`] a call);
    /// instances in no ASG are absent from the map.
    pub async fn groups_of_instances(&self, instances: &[String]) -> Result<BTreeMap<String, String>, Error> {
        let mut groups = BTreeMap::new();
        for batch in instances.chunks(DESCRIBE_INSTANCES_BATCH) {
            let response = self
                .client
                .describe_auto_scaling_instances()
                .set_instance_ids(Some(batch.to_vec()))
                .send()
                .await
                .map_err(|e| {
                    failure(e, |message| Error::DescribeInstance {
                        instance: batch.join(","),
                        message,
                    })
                })?;
            for instance in response.auto_scaling_instances() {
                if let (Some(id), Some(asg)) = (instance.instance_id(), instance.auto_scaling_group_name()) {
                    groups.insert(id.to_owned(), asg.to_owned());
                }
            }
        }
        Ok(groups)
    }

    pub async fn group(&self, asg: &str) -> Result<Group, Error> {
        let response = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(asg)
            .send()
            .await
            .map_err(|e| {
                failure(e, |message| Error::DescribeGroup {
                    asg: asg.to_owned(),
                    message,
                })
            })?;
        let group = response
            .auto_scaling_groups()
            .first()
            .ok_or_else(|| Error::NoSuchGroup(asg.to_owned()))?;
        Ok(Group {
            name: asg.to_owned(),
            desired: group.desired_capacity().unwrap_or_default(),
            min: group.min_size().unwrap_or_default(),
            max: group.max_size().unwrap_or_default(),
            instances: group
                .instances()
                .iter()
                .map(|i| GroupInstance {
                    id: i.instance_id().unwrap_or_default().to_owned(),
                    lifecycle_state: i
                        .lifecycle_state()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default(),
                    protected: i.protected_from_scale_in().unwrap_or(false),
                })
                .collect(),
            tags: group
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or_default().to_owned())))
                .collect(),
            capacity_rebalance: group.capacity_rebalance().unwrap_or(false),
        })
    }

    /// Sets the desired capacity to exactly `desired`: idempotent, safe to repeat after a crash.
    pub async fn set_desired(&self, asg: &str, desired: i32) -> Result<(), Error> {
        self.client
            .set_desired_capacity()
            .auto_scaling_group_name(asg)
            .desired_capacity(desired)
            .honor_cooldown(false)
            .send()
            .await
            .map_err(|e| {
                failure(e, |message| Error::SetDesired {
                    asg: asg.to_owned(),
                    desired,
                    message,
                })
            })?;
        Ok(())
    }

    /// Raises MaxSize and the desired capacity to exactly `desired` in one call (AWS refuses a
    /// SetDesiredCapacity above MaxSize): idempotent, used only when surging above MaxSize is allowed.
    pub async fn raise_max_and_desired(&self, asg: &str, desired: i32) -> Result<(), Error> {
        self.client
            .update_auto_scaling_group()
            .auto_scaling_group_name(asg)
            .max_size(desired)
            .desired_capacity(desired)
            .send()
            .await
            .map_err(|e| {
                failure(e, |message| Error::RaiseMax {
                    asg: asg.to_owned(),
                    desired,
                    message,
                })
            })?;
        Ok(())
    }

    /// The group's most recent scaling activities, newest first.
    pub async fn activities(&self, asg: &str) -> Result<Vec<Activity>, Error> {
        let response = self
            .client
            .describe_scaling_activities()
            .auto_scaling_group_name(asg)
            .max_records(50)
            .send()
            .await
            .map_err(|e| {
                failure(e, |message| Error::Activities {
                    asg: asg.to_owned(),
                    message,
                })
            })?;
        Ok(response
            .activities()
            .iter()
            .map(|a| Activity {
                id: a.activity_id().unwrap_or_default().to_owned(),
                status: a.status_code().map(|s| s.as_str().to_owned()).unwrap_or_default(),
                description: a.description().unwrap_or_default().to_owned(),
                status_message: a.status_message().unwrap_or_default().to_owned(),
                cause: a.cause().unwrap_or_default().to_owned(),
                start_time: a
                    .start_time()
                    .and_then(|t| Timestamp::new(t.secs(), t.subsec_nanos() as i32).ok()),
            })
            .collect())
    }

    /// Protects `instances` of `asg` from scale-in (or lifts the protection), 50 at a time (the
    /// API's limit per call).
    pub async fn protect(&self, asg: &str, instances: &[String], protected: bool) -> Result<(), Error> {
        for chunk in instances.chunks(50) {
            self.client
                .set_instance_protection()
                .auto_scaling_group_name(asg)
                .set_instance_ids(Some(chunk.to_vec()))
                .protected_from_scale_in(protected)
                .send()
                .await
                .map_err(|e| {
                    failure(e, |message| Error::Protect {
                        asg: asg.to_owned(),
                        message,
                    })
                })?;
        }
        Ok(())
    }

    /// Removes one specific instance and lowers desired capacity with it, so the ASG never picks a
    /// busy instance to terminate.
    pub async fn terminate_and_decrement(&self, instance: &str) -> Result<(), Error> {
        self.client
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance)
            .should_decrement_desired_capacity(true)
            .send()
            .await
            .map_err(|e| {
                failure(e, |message| Error::Terminate {
                    instance: instance.to_owned(),
                    message,
                })
            })?;
        Ok(())
    }
}

/// `text` with every ARN and AWS account id in it replaced. AWS error messages name the caller's
/// role and account: the controller's log keeps them, Events (readable by anyone who can read the
/// namespace) get this.
pub fn redacted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (index, word) in text.split(' ').enumerate() {
        if index > 0 {
            out.push(' ');
        }
        let core = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != ':' && c != '/');
        let start = word.find(core).unwrap_or(0);
        let (before, after) = (&word[..start], &word[start + core.len()..]);
        if let Some(arn) = core.find("arn:aws") {
            out.push_str(before);
            out.push_str(&core[..arn]);
            out.push_str("arn:(redacted)");
            out.push_str(after);
        } else if core.len() == 12 && core.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(before);
            out.push_str("(account)");
            out.push_str(after);
        } else {
            out.push_str(word);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_config::Region;

    #[test]
    fn an_error_text_loses_its_arns_and_account_ids_for_events() {
        let text = "AccessDenied: User: arn:aws:sts::123456789012:assumed-role/sr/controller is not \
                    authorized to perform: autoscaling:SetDesiredCapacity on resource: \
                    \"arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:x\", account 123456789012.";
        let shown = redacted(text);
        assert!(
            !shown.contains("123456789012") && !shown.contains("arn:aws"),
            "{shown}"
        );
        assert!(shown.contains("autoscaling:SetDesiredCapacity"), "{shown}");
        assert!(shown.contains("\"arn:(redacted)\","), "{shown}");
        assert!(shown.ends_with("account (account)."), "{shown}");
        assert_eq!(redacted("desired 3 → 4 in spot-a"), "desired 3 → 4 in spot-a");
    }
    use aws_sdk_autoscaling::config::{Credentials, SharedCredentialsProvider};

    /// An AWS endpoint on loopback that counts the connections it is sent.
    async fn counting_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        (url, connections)
    }

    #[tokio::test]
    async fn a_closed_fence_stops_every_call_before_anything_is_sent() {
        let (endpoint, connections) = counting_endpoint().await;
        let config = aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(SharedCredentialsProvider::new(Credentials::for_tests()))
            .build();
        let aws = AutoScaling::new(&config, Fence::closed(crate::fence::FENCE_AFTER));
        let error = aws.set_desired("spot", 3).await.expect_err("fenced");
        assert!(error.is_fenced(), "{error}");
        assert_eq!(error.metric_label(), "fenced");
        assert!(aws.group("spot").await.expect_err("fenced").is_fenced());
        assert!(
            aws.terminate_and_decrement("i-0abc")
                .await
                .expect_err("fenced")
                .is_fenced()
        );
        assert_eq!(
            connections.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "nothing reached AWS"
        );

        // The same client with the fence open does reach the endpoint (which hangs up on it).
        let open = AutoScaling::new(&config, Fence::open_for_tests());
        let error = open
            .set_desired("spot", 3)
            .await
            .expect_err("the endpoint hangs up");
        assert!(!error.is_fenced(), "{error}");
        assert!(connections.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }
}
