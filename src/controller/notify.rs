//! Optional notifications: each phase a noticed node enters, and each seat given back, posted to a
//! webhook URL read once from a file (a mounted Secret), in the body a chat tool expects (Slack,
//! Microsoft Teams workflows, or plain JSON for anything else), filtered by phase.
//!
//! The URL is a credential: it is never logged, errors are reported without it, and it must be
//! `https` (no token in clear text on the wire). A redirect is not followed (a receiver that moved
//! is a configuration error to see, not a reason to send the body somewhere else), and no Referer
//! is sent. Sending never holds a reconcile: each post runs on its own task, retried with the
//! project's backoff on a network error, a 429 or a 5xx, bounded by a timeout per attempt; what
//! could not be delivered counts in `spot_rebalancer_notifications_total{result="failed"}`.
use std::{collections::BTreeSet, path::Path, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use prometheus::{IntCounterVec, Opts, Registry};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::backoff::{self, Retryable};

/// How long one post may take.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per notification, the first included.
const ATTEMPTS: usize = 4;
/// Backoff between attempts: about 1 s, 2 s, 4 s, so a notification is settled within ~30 s.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(8);

/// What happened to a node, as a notification says it. Plain data: the caller fills it in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification {
    /// The Node's name.
    pub node: String,
    /// Its EC2 instance id, when known.
    pub instance: Option<String>,
    /// Its Auto Scaling group, when known.
    pub asg: Option<String>,
    /// The phase the node entered (`Tainted`, `Failed`, …) or the outcome (`CapacityRestored`);
    /// what `--notify-phases` filters on.
    pub phase: String,
    /// Why, in a few words, when there is more to say.
    pub reason: Option<String>,
}

impl Notification {
    /// One line for people: `spot-rebalancer: node n1 (i-0abc, ASG spot-a) is Tainted: replacement n9 Ready`.
    pub fn text(&self) -> String {
        let mut text = format!("spot-rebalancer: node {}", self.node);
        let context: Vec<String> = [
            self.instance.clone(),
            self.asg.as_ref().map(|asg| format!("ASG {asg}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !context.is_empty() {
            text.push_str(&format!(" ({})", context.join(", ")));
        }
        text.push_str(&format!(" is {}", self.phase));
        if let Some(reason) = &self.reason {
            text.push_str(&format!(": {reason}"));
        }
        text
    }
}

/// The body shape the receiver expects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Slack incoming webhook (and compatible: Mattermost, Rocket.Chat): `{"text": …}`.
    #[default]
    Slack,
    /// Microsoft Teams workflow "when a Teams webhook request is received": an Adaptive Card.
    Teams,
    /// Plain JSON with one field per fact, for your own receiver.
    Json,
}

/// The body of one notification in `format`.
pub fn body(format: Format, notification: &Notification) -> Value {
    let Notification {
        node,
        instance,
        asg,
        phase,
        reason,
    } = notification;
    let text = notification.text();
    match format {
        Format::Slack => json!({ "text": text }),
        Format::Json => json!({
            "source": "spot-rebalancer",
            "node": node,
            "instance": instance,
            "asg": asg,
            "phase": phase,
            "reason": reason,
            "text": text,
        }),
        Format::Teams => {
            let facts: Vec<Value> = [
                ("Node", Some(node)),
                ("Instance", instance.as_ref()),
                ("ASG", asg.as_ref()),
                ("Phase", Some(phase)),
                ("Reason", reason.as_ref()),
            ]
            .into_iter()
            .filter_map(|(title, value)| value.map(|value| json!({"title": title, "value": value})))
            .collect();
            json!({
                "type": "message",
                "attachments": [{
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": null,
                    "content": {
                        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                        "type": "AdaptiveCard",
                        "version": "1.4",
                        "body": [
                            {"type": "TextBlock", "text": text, "wrap": true, "weight": "Bolder"},
                            {"type": "FactSet", "facts": facts},
                        ],
                    },
                }],
            })
        }
    }
}

/// The controller's notification flags (flattened into its command line).
#[derive(Debug, Clone, Default, Args)]
pub struct NotifyArgs {
    /// File holding the webhook URL (a mounted Secret), `https://` only; without it, no
    /// notifications. The URL is never logged.
    #[arg(long, env = "NOTIFY_URL_FILE")]
    pub notify_url_file: Option<PathBuf>,

    /// The body the receiver expects: `slack` (`{"text": …}`), `teams` (an Adaptive Card for a
    /// Teams workflow) or `json` (node, instance, asg, phase, reason, text).
    #[arg(long, env = "NOTIFY_FORMAT", value_enum, default_value_t = Format::Slack)]
    pub notify_format: Format,

    /// Only these phases or outcomes, comma-separated (e.g. `Tainted,Failed,Retired`); empty: all.
    #[arg(long, env = "NOTIFY_PHASES", value_delimiter = ',', num_args = 0..)]
    pub notify_phases: Vec<String>,

    /// Extra CA certificates (PEM) to trust for the receiver, next to the system's (a private CA).
    #[arg(long, env = "NOTIFY_CA_FILE")]
    pub notify_ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--notify-url-file {path}: {reason}")]
    UrlFile { path: String, reason: String },
    #[error("--notify-ca-file {path}: {reason}")]
    CaFile { path: String, reason: String },
}

/// Which notifications go out: all, or only the listed phases (matched without regard to case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    phases: BTreeSet<String>,
}

impl Filter {
    pub fn new<S: AsRef<str>>(phases: &[S]) -> Self {
        Filter {
            phases: phases
                .iter()
                .map(|phase| phase.as_ref().trim().to_ascii_lowercase())
                .filter(|phase| !phase.is_empty())
                .collect(),
        }
    }

    pub fn passes(&self, notification: &Notification) -> bool {
        self.phases.is_empty() || self.phases.contains(&notification.phase.to_ascii_lowercase())
    }
}

/// Where notifications go, if anywhere. Cheap to clone.
#[derive(Clone, Default)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Clone)]
struct Target {
    client: reqwest::Client,
    url: reqwest::Url,
    format: Format,
    filter: Filter,
    retry: backoff::ExponentialBuilder,
    results: IntCounterVec,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("enabled", &self.target.is_some())
            .finish()
    }
}

/// Why one attempt failed; `retry` when trying again may help.
struct Failure {
    retry: bool,
    error: String,
}

impl Notifier {
    /// Reads the URL (and any extra CA) once, at start; registers `notifications_total` on
    /// `registry`. Without a URL file, notifications are off (and nothing is registered).
    pub fn new(args: &NotifyArgs, registry: &Registry) -> Result<Self, Error> {
        let NotifyArgs {
            notify_url_file,
            notify_format,
            notify_phases,
            notify_ca_file,
        } = args;
        let Some(path) = notify_url_file else {
            return Ok(Notifier::default());
        };
        let url = read_url(path)?;
        let mut client = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .referer(false);
        if let Some(ca) = notify_ca_file {
            let fail = |reason: String| Error::CaFile {
                path: ca.display().to_string(),
                reason,
            };
            let pem = std::fs::read(ca).map_err(|e| fail(e.to_string()))?;
            let certificates =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| fail(e.to_string()))?;
            if certificates.is_empty() {
                return Err(fail("no PEM certificate in the file".into()));
            }
            for certificate in certificates {
                client = client.add_root_certificate(certificate);
            }
        }
        let client = client.build().map_err(|e| Error::UrlFile {
            path: path.display().to_string(),
            reason: e.without_url().to_string(),
        })?;
        let results = IntCounterVec::new(
            Opts::new(
                "notifications_total",
                "Notifications by result: sent, failed (after every retry), filtered out",
            ),
            &["result"],
        )
        .expect("valid metric");
        for result in ["sent", "failed", "filtered"] {
            results.with_label_values(&[result]);
        }
        registry
            .register(Box::new(results.clone()))
            .expect("notification metrics register once");
        Ok(Notifier {
            target: Some(Target {
                client,
                url,
                format: *notify_format,
                filter: Filter::new(notify_phases),
                retry: backoff::exponential(RETRY_FIRST, RETRY_MAX).with_max_times(ATTEMPTS - 1),
                results,
            }),
        })
    }

    /// Posts `notification` in the background, with retries (no-op when notifications are off or
    /// the filter leaves it out). Needs a Tokio runtime.
    pub fn send(&self, notification: &Notification) {
        if let Some(delivery) = self.delivery(notification) {
            tokio::spawn(delivery);
        }
    }

    /// `send`, awaited: resolves once the notification is delivered or given up.
    pub async fn send_and_wait(&self, notification: &Notification) {
        if let Some(delivery) = self.delivery(notification) {
            delivery.await;
        }
    }

    fn delivery(&self, notification: &Notification) -> Option<impl Future<Output = ()> + use<>> {
        let target = self.target.clone()?;
        if !target.filter.passes(notification) {
            target.results.with_label_values(&["filtered"]).inc();
            return None;
        }
        let body = body(target.format, notification);
        let node = notification.node.clone();
        let phase = notification.phase.clone();
        Some(async move {
            let attempt = || target.post(&body);
            let delivered = attempt
                .retry(target.retry)
                .when(|failure: &Failure| failure.retry)
                .notify(|failure: &Failure, wait| {
                    debug!(error = %failure.error, ?wait, "posting a notification failed; retrying");
                })
                .await;
            match delivered {
                Ok(()) => target.results.with_label_values(&["sent"]).inc(),
                Err(failure) => {
                    target.results.with_label_values(&["failed"]).inc();
                    warn!(%node, %phase, error = %failure.error, "posting a notification failed");
                }
            }
        })
    }
}

impl Target {
    async fn post(&self, body: &Value) -> Result<(), Failure> {
        let response = self
            .client
            .post(self.url.clone())
            .json(body)
            .send()
            .await
            .map_err(|error| Failure {
                retry: true,
                error: error.without_url().to_string(),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(Failure {
            retry: status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
            error: if status.is_redirection() {
                format!("the receiver answered HTTP {status}, a redirect (not followed)")
            } else {
                format!("the receiver answered HTTP {status}")
            },
        })
    }
}

/// The URL in `path` (surrounding whitespace ignored), which must be `https`.
fn read_url(path: &Path) -> Result<reqwest::Url, Error> {
    let fail = |reason: &str| Error::UrlFile {
        path: path.display().to_string(),
        reason: reason.to_owned(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(&e.to_string()))?;
    // The parse error is not shown: it could quote part of the secret URL.
    let url = reqwest::Url::parse(text.trim()).map_err(|_| fail("the file must hold one https URL"))?;
    if url.scheme() != "https" || url.host_str().is_none() {
        return Err(fail(
            "the file must hold one https URL (http would send the URL's token in clear)",
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tainted() -> Notification {
        Notification {
            node: "ip-10-0-0-1".into(),
            instance: Some("i-0abc".into()),
            asg: Some("spot-a".into()),
            phase: "Tainted".into(),
            reason: Some("replacement ip-10-0-0-9 Ready".into()),
        }
    }

    #[test]
    fn the_text_names_node_instance_asg_phase_and_reason() {
        assert_eq!(
            tainted().text(),
            "spot-rebalancer: node ip-10-0-0-1 (i-0abc, ASG spot-a) is Tainted: replacement ip-10-0-0-9 Ready"
        );
        let bare = Notification {
            node: "n".into(),
            phase: "Draining".into(),
            ..Notification::default()
        };
        assert_eq!(bare.text(), "spot-rebalancer: node n is Draining");
    }

    #[test]
    fn a_slack_body_is_one_text() {
        assert_eq!(body(Format::Slack, &tainted()), json!({"text": tainted().text()}));
    }

    #[test]
    fn a_json_body_has_one_field_per_fact() {
        let body = body(Format::Json, &tainted());
        assert_eq!(body["node"], "ip-10-0-0-1");
        assert_eq!(body["instance"], "i-0abc");
        assert_eq!(body["asg"], "spot-a");
        assert_eq!(body["phase"], "Tainted");
        assert_eq!(body["reason"], "replacement ip-10-0-0-9 Ready");
        let unknown = Notification {
            asg: None,
            ..tainted()
        };
        assert_eq!(super::body(Format::Json, &unknown)["asg"], Value::Null);
    }

    #[test]
    fn a_teams_body_is_an_adaptive_card_with_the_facts() {
        let body = body(Format::Teams, &tainted());
        assert_eq!(body["type"], "message");
        let attachment = &body["attachments"][0];
        assert_eq!(
            attachment["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        let card = &attachment["content"];
        assert_eq!(card["type"], "AdaptiveCard");
        assert_eq!(card["body"][0]["text"], tainted().text());
        let facts = card["body"][1]["facts"].as_array().unwrap();
        let titles: Vec<&str> = facts.iter().map(|f| f["title"].as_str().unwrap()).collect();
        assert_eq!(titles, ["Node", "Instance", "ASG", "Phase", "Reason"]);
        assert_eq!(facts[2]["value"], "spot-a");
    }

    #[test]
    fn the_filter_passes_listed_phases_whatever_their_case_and_everything_when_empty() {
        let filter = Filter::new(&["failed", " Retired "]);
        let with_phase = |phase: &str| Notification {
            phase: phase.into(),
            ..tainted()
        };
        assert!(filter.passes(&with_phase("Failed")));
        assert!(filter.passes(&with_phase("Retired")));
        assert!(!filter.passes(&with_phase("Tainted")));
        assert!(Filter::new::<&str>(&[]).passes(&with_phase("Tainted")));
        assert!(Filter::new(&[""]).passes(&with_phase("Tainted")));
    }

    #[test]
    fn the_url_file_must_hold_an_https_url_and_errors_never_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("url");
        let args = NotifyArgs {
            notify_url_file: Some(path.clone()),
            ..NotifyArgs::default()
        };
        for bad in [
            "hooks.example/secret-token\n",
            "http://hooks.example/secret-token",
            "ftp://hooks.example/secret-token",
        ] {
            std::fs::write(&path, bad).unwrap();
            let error = Notifier::new(&args, &Registry::new()).unwrap_err().to_string();
            assert!(error.contains("--notify-url-file"), "{error}");
            assert!(error.contains("https"), "{error}");
            assert!(!error.contains("secret-token"), "{error}");
        }
        std::fs::write(&path, " https://hooks.example/secret-token \n").unwrap();
        let notifier = Notifier::new(&args, &Registry::new()).unwrap();
        assert!(!format!("{notifier:?}").contains("secret-token"));
        let off = Notifier::new(&NotifyArgs::default(), &Registry::new()).unwrap();
        assert!(off.target.is_none());
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("url");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&url, "https://hooks.example/x").unwrap();
        std::fs::write(&ca, "not a certificate").unwrap();
        let args = NotifyArgs {
            notify_url_file: Some(url),
            notify_ca_file: Some(ca),
            ..NotifyArgs::default()
        };
        let error = Notifier::new(&args, &Registry::new()).unwrap_err().to_string();
        assert!(error.contains("--notify-ca-file"), "{error}");
    }
}
