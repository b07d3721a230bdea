//! Optional notifications: each phase a noticed node enters, and each seat given back, posted as a
//! Slack-compatible `{"text": …}` to a webhook URL read once from a file (a mounted Secret). The URL
//! is a credential: it is never logged, and errors are reported without it. Sending never holds a
//! reconcile: each post runs on its own task, bounded by a timeout.
use std::{path::Path, time::Duration};

use serde_json::{Value, json};
use tracing::warn;

/// How long one post may take.
const POST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--notify-url-file {path}: {reason}")]
    UrlFile { path: String, reason: String },
}

/// Where notifications go, if anywhere. Cheap to clone.
#[derive(Clone, Default)]
pub struct Notifier {
    target: Option<(reqwest::Client, String)>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("enabled", &self.target.is_some())
            .finish()
    }
}

impl Notifier {
    /// Reads the URL from `path` (surrounding whitespace ignored); `None` turns notifications off.
    pub fn from_file(path: Option<&Path>) -> Result<Self, Error> {
        let Some(path) = path else {
            return Ok(Notifier::default());
        };
        let fail = |reason: String| Error::UrlFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let url = text.trim();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(fail("the file must hold one http(s) URL".into()));
        }
        let client = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .build()
            .map_err(|e| fail(e.without_url().to_string()))?;
        Ok(Notifier {
            target: Some((client, url.to_owned())),
        })
    }

    /// Posts `text` in the background (no-op when notifications are off).
    pub fn send(&self, text: String) {
        let Some((client, url)) = self.target.clone() else {
            return;
        };
        tokio::spawn(async move {
            let result = client.post(url).json(&body(&text)).send().await;
            match result.and_then(|response| response.error_for_status()) {
                Ok(_) => {}
                Err(error) => warn!(error = %error.without_url(), "posting a notification failed"),
            }
        });
    }
}

/// The Slack-compatible body of one notification.
pub fn body(text: &str) -> Value {
    json!({ "text": text })
}

/// The text for a node entering `phase`.
pub fn phase_text(node: &str, phase: &str, detail: Option<&str>) -> String {
    match detail {
        Some(detail) => format!("spot-rebalancer: node {node} is {phase}: {detail}"),
        None => format!("spot-rebalancer: node {node} is {phase}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_is_a_slack_text_naming_node_and_phase() {
        let text = phase_text("ip-10-0-0-1", "Retired", Some("desired 2 → 1"));
        assert_eq!(
            text,
            "spot-rebalancer: node ip-10-0-0-1 is Retired: desired 2 → 1"
        );
        assert_eq!(body(&text), json!({"text": text}));
        assert_eq!(
            phase_text("n", "Draining", None),
            "spot-rebalancer: node n is Draining"
        );
    }

    #[test]
    fn the_url_file_must_hold_a_url_and_errors_never_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("url");
        std::fs::write(&path, "hooks.example/secret-token\n").unwrap();
        let error = Notifier::from_file(Some(&path)).unwrap_err().to_string();
        assert!(error.contains("--notify-url-file"), "{error}");
        assert!(!error.contains("secret-token"), "{error}");
        std::fs::write(&path, " https://hooks.example/secret-token \n").unwrap();
        let notifier = Notifier::from_file(Some(&path)).unwrap();
        assert!(!format!("{notifier:?}").contains("secret-token"));
        assert!(Notifier::from_file(None).unwrap().target.is_none());
    }
}
