//! Proof at start that the agent's admission policy is enforced. RBAC lets the agent patch every
//! Node; only the chart's ValidatingAdmissionPolicy narrows that to its own Node's three notice
//! annotations. A policy that is missing, disabled or not yet loaded leaves every node's agent able
//! to rewrite every Node, so the agent asks the API server for a change the policy must refuse (a
//! dry run: nothing is written) and refuses to write notices until it is refused.
use std::time::Duration;

use clap::Args as ClapArgs;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::backoff::{self, Backoff};

/// An annotation key the policy does not let the agent write: the probe tries to set it.
pub const PROBE_KEY: &str = "spot-rebalancer.io/admission-policy-probe";

/// Waits between probes: first 1 s, growing to 10 s while the API server cannot be asked.
const RETRY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, ClapArgs)]
pub struct PolicyCheckArgs {
    /// Do not check at start that the agent's ValidatingAdmissionPolicy is enforced. Only for
    /// clusters that cannot run the policy (before Kubernetes 1.30) and accept that any node's
    /// agent can then change any Node.
    #[arg(long, env = "SKIP_ADMISSION_POLICY_CHECK")]
    pub skip_admission_policy_check: bool,

    /// How long the API server may keep allowing the check's probe before the agent exits: a policy
    /// installed together with the agent takes a moment to be enforced.
    #[arg(long, env = "ADMISSION_POLICY_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub admission_policy_wait: Duration,
}

/// The policy could not be shown to be enforced.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the agent's ValidatingAdmissionPolicy is not enforced: a dry-run change of annotation \
         {PROBE_KEY} on Node {node} was {outcome} for {}. Without the policy, every node's agent \
         may change every Node. Install the chart with agentAdmissionPolicy.enabled=true (the policy \
         `<release>-agent-own-node` and its binding; Kubernetes 1.30+), or start the agent with \
         --skip-admission-policy-check (SKIP_ADMISSION_POLICY_CHECK=true) to run without it",
        humantime::format_duration(*waited)
    )]
    NotEnforced {
        node: String,
        outcome: String,
        waited: Duration,
    },
}

/// What the API server said to one probe.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Refused by a ValidatingAdmissionPolicy: the proof.
    RefusedByThePolicy,
    /// Allowed: nothing stops the agent from changing other keys.
    Allowed,
    /// Refused, but not by an admission policy (RBAC, another admission plugin): no proof.
    RefusedOtherwise(String),
    /// No answer about the policy (the Node is missing, the API server is unreachable): ask again.
    Unanswered(String),
}

/// Reads the API server's answer to a probe.
pub fn outcome(answer: Result<(), kube::Error>) -> Outcome {
    match answer {
        Ok(()) => Outcome::Allowed,
        Err(kube::Error::Api(status)) if status.message.contains("ValidatingAdmissionPolicy") => {
            Outcome::RefusedByThePolicy
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Outcome::Unanswered(format!(
            "{}; is --node-name (NODE_NAME) this node's name?",
            status.message
        )),
        Err(kube::Error::Api(status)) if matches!(status.code, 403 | 422) => {
            Outcome::RefusedOtherwise(format!("refused, but not by the policy ({})", status.message))
        }
        Err(error) => Outcome::Unanswered(error.to_string()),
    }
}

/// Runs `then` once the policy is proven enforced (at once with `--skip-admission-policy-check`).
/// Returns the error, and cancels `shutdown` so the whole agent stops, when the API server still
/// allows the probe `--admission-policy-wait` after it first answered it; returns `Ok` without running
/// `then` when `work` is cancelled first.
pub async fn then_run(
    args: PolicyCheckArgs,
    client: Client,
    node: &str,
    then: impl Future<Output = ()>,
    work: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    if args.skip_admission_policy_check {
        tracing::warn!(
            "not checking that the agent's admission policy is enforced (--skip-admission-policy-check)"
        );
    } else {
        let proven = tokio::select! {
            _ = work.cancelled() => return Ok(()),
            proven = prove(Api::all(client), node, args.admission_policy_wait) => proven,
        };
        if let Err(error) = proven {
            shutdown.cancel();
            return Err(error);
        }
    }
    then.await;
    Ok(())
}

async fn prove(nodes: Api<Node>, node: &str, wait: Duration) -> Result<(), Error> {
    let params = PatchParams {
        dry_run: true,
        field_manager: Some("spot-rebalancer-agent-probe".to_owned()),
        ..PatchParams::default()
    };
    let probe = json!({"metadata": {"annotations": {PROBE_KEY: "must be refused"}}});
    let mut first_answered = None;
    let mut unanswered = Backoff::new(backoff::exponential(RETRY, RETRY_MAX));
    loop {
        let answer = super::api_call(nodes.patch(node, &params, &Patch::Merge(&probe))).await;
        let not_refused = match outcome(answer.map(drop)) {
            Outcome::RefusedByThePolicy => {
                tracing::info!(
                    node,
                    "the agent's admission policy is enforced (a change of another key was refused)"
                );
                return Ok(());
            }
            Outcome::Allowed => "allowed".to_owned(),
            Outcome::RefusedOtherwise(why) => why,
            Outcome::Unanswered(why) => {
                let wait = unanswered.failed().unwrap_or(RETRY_MAX);
                tracing::warn!(node, error = %why, consecutive_failures = unanswered.failures(),
                               "cannot check the agent's admission policy yet; retrying");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        unanswered.succeeded();
        let since = *first_answered.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= wait {
            return Err(Error::NotEnforced {
                node: node.to_owned(),
                outcome: not_refused,
                waited: wait,
            });
        }
        tracing::warn!(node, outcome = %not_refused, "the agent's admission policy is not enforced (yet); asking again");
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn refused(code: u16, message: &str) -> Result<(), kube::Error> {
        let mut status = Status::failure(message, "Forbidden");
        status.code = code;
        Err(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn only_a_refusal_by_an_admission_policy_proves_it() {
        let by_policy = "nodes \"n1\" is forbidden: ValidatingAdmissionPolicy 'sr-agent-own-node' with \
                         binding 'sr-agent-own-node' denied request: the spot-rebalancer agent may change only its own annotations";
        assert_eq!(outcome(refused(403, by_policy)), Outcome::RefusedByThePolicy);
        assert_eq!(outcome(Ok(())), Outcome::Allowed);
        let by_rbac = "nodes \"n1\" is forbidden: User \"x\" cannot patch resource \"nodes\"";
        assert!(
            matches!(outcome(refused(403, by_rbac)), Outcome::RefusedOtherwise(why) if why.contains("cannot patch"))
        );
    }

    #[test]
    fn a_missing_node_is_asked_again_naming_the_flag() {
        let Outcome::Unanswered(why) = outcome(refused(404, "nodes \"n1\" not found")) else {
            panic!("a missing Node is no answer");
        };
        assert!(why.contains("NODE_NAME"), "{why}");
    }

    #[test]
    fn the_error_names_the_policy_and_the_opt_out() {
        let error = Error::NotEnforced {
            node: "n1".into(),
            outcome: "allowed".into(),
            waited: Duration::from_secs(30),
        };
        let text = error.to_string();
        for part in [
            "ValidatingAdmissionPolicy",
            "agent-own-node",
            "--skip-admission-policy-check",
            "n1",
            "allowed for 30s",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
    }
}
