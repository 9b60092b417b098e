//! Approval notifications: a Slack-compatible JSON POST to each configured
//! webhook, retried with backoff. Webhook URLs are secrets (a Slack URL
//! carries its token): messages name only the host.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use crate::approval::Held;

const ATTEMPTS: u32 = 5;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Notifier {
    webhooks: Vec<hyper::Uri>,
    page_url: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// The Slack-compatible message (`text` is what Slack shows; the other fields
/// are for other receivers).
pub fn message(h: &Held, page_url: Option<&str>) -> serde_json::Value {
    let how = match page_url {
        Some(u) => format!(
            "approve on {u} or run `loopgate approvals approve {}`",
            h.approval_id
        ),
        None => format!(
            "run `loopgate approvals approve {}` (or `deny {} --reason ...`)",
            h.approval_id, h.approval_id
        ),
    };
    serde_json::json!({
        "text": format!(
            ":lock: loopgate is holding `{}` from workload *{}* to *{}* (rule `{}`: {}). Expires {}. To decide, {how}.",
            h.request, h.workload, h.target, h.rule_id, h.reason, h.expires_at
        ),
        "approval_id": h.approval_id,
        "workload": h.workload,
        "target": h.target,
        "rule_id": h.rule_id,
        "request": h.request,
        "reason": h.reason,
        "pid": h.pid,
        "uid": h.uid,
        "expires_at": h.expires_at,
        "approvers": h.approvers,
    })
}

impl Notifier {
    pub fn new(webhooks: &[String], page_url: Option<String>) -> Self {
        Self {
            webhooks: webhooks.iter().filter_map(|w| w.parse().ok()).collect(),
            page_url,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.webhooks.is_empty()
    }

    /// Sends the notification to every webhook in the background.
    pub fn held(&self, h: &Held) {
        let body = Bytes::from(message(h, self.page_url.as_deref()).to_string());
        for uri in &self.webhooks {
            let (client, uri, body) = (self.client.clone(), uri.clone(), body.clone());
            let id = h.approval_id;
            tokio::spawn(async move {
                let host = uri.host().unwrap_or("?").to_owned();
                let mut delay = Duration::from_millis(250);
                for attempt in 1..=ATTEMPTS {
                    let req = hyper::Request::post(uri.clone())
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(body.clone()));
                    let Ok(req) = req else { return };
                    let status = match tokio::time::timeout(TIMEOUT, client.request(req)).await {
                        Ok(Ok(r)) => Ok(r.status()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".into()),
                    };
                    match status {
                        Ok(s) if s.is_success() => {
                            tracing::debug!(approval_id = %id, webhook_host = %host, attempt, "approval notification delivered");
                            return;
                        }
                        Ok(s) => {
                            tracing::warn!(approval_id = %id, webhook_host = %host, attempt, status = %s, "approval webhook refused the notification")
                        }
                        Err(e) => {
                            tracing::warn!(approval_id = %id, webhook_host = %host, attempt, error = %e, "approval webhook unreachable")
                        }
                    }
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                tracing::error!(approval_id = %id, webhook_host = %host, attempts = ATTEMPTS, "approval notification not delivered");
            });
        }
    }
}
