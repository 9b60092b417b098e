//! Approval notifications: a Slack-compatible JSON POST to each configured
//! `http://` or `https://` webhook, retried with backoff. Webhook URLs are
//! secrets (a Slack URL carries its token): messages name only the host.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use http_body_util::Full;

use crate::{
    approval::{Announce, Held},
    http_client::{self, HttpClient, HttpClientError},
};

const ATTEMPTS: u32 = 5;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Notifier {
    webhooks: Vec<hyper::Uri>,
    page_url: Option<String>,
    client: HttpClient,
}

/// Text a loop controls (its request, the names and reasons around it) made
/// inert in Slack mrkdwn: `&`, `<`, `>` escaped as Slack requires (so
/// `<!channel>` or `<https://evil|click>` cannot become a mention or a link),
/// backticks (which would end the code span) and control characters replaced.
pub fn slack_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '`' => out.push('\''),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

/// The Slack-compatible message (`text` is what Slack shows, with every
/// loop-influenced part escaped; the other fields are raw, for other
/// receivers).
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
            slack_escape(&h.request),
            slack_escape(&h.workload),
            slack_escape(&h.target),
            slack_escape(&h.rule_id),
            slack_escape(&h.reason),
            slack_escape(&h.expires_at)
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
    /// `https` webhooks are verified against the system roots.
    pub fn new(webhooks: &[String], page_url: Option<String>) -> Self {
        Self::with_ca_file(webhooks, page_url, None)
            .expect("without a CA file, building the client cannot fail")
    }

    /// `https` webhooks are verified against `ca_file` when given (else the
    /// system roots). URLs that are not `http(s)://` are skipped (the config
    /// validation refuses them).
    pub fn with_ca_file(
        webhooks: &[String],
        page_url: Option<String>,
        ca_file: Option<&Path>,
    ) -> Result<Self, HttpClientError> {
        Ok(Self {
            webhooks: webhooks
                .iter()
                .filter_map(|w| http_client::parse_url(w).ok())
                .collect(),
            page_url,
            client: http_client::build(ca_file)?,
        })
    }
}

impl Announce for Notifier {
    fn is_empty(&self) -> bool {
        self.webhooks.is_empty()
    }

    /// Sends the notification to every webhook in the background.
    fn held(&self, h: &Held) {
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
                        Ok(Err(e)) => Err(http_client::error_chain(&e)),
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

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
        time::Instant,
    };

    use hyper::StatusCode;

    use super::*;
    use crate::http_client::test_support::{pki, serve};

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl Write for Log {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Log {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    fn held() -> Held {
        Held {
            approval_id: uuid::Uuid::now_v7(),
            session_id: uuid::Uuid::now_v7(),
            workload: "nightly-etl".into(),
            target: "orders-db".into(),
            rule_id: "writes".into(),
            reason: "writes need a human".into(),
            request: "DELETE FROM orders".into(),
            pid: 42,
            uid: 1000,
            requested_at: "2026-01-01T00:00:00Z".into(),
            expires_at: "2026-01-01T00:05:00Z".into(),
            approvers: vec!["alice".into()],
            jwt_subject: None,
            scope: None,
        }
    }

    #[test]
    fn loop_text_cannot_mention_or_link_in_slack() {
        let mut h = held();
        h.request = "connect x as <!channel> <https://evil.example|click> & `rm`\nApproved".into();
        let v = message(&h, None);
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains("`connect x as &lt;!channel&gt; &lt;https://evil.example|click&gt; &amp; 'rm'\\nApproved`"),
            "{text}"
        );
        assert!(!text.contains('<') && !text.contains('>'), "{text}");
        // Other receivers get the raw value.
        assert_eq!(v["request"], h.request.as_str());
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs on the test's single thread, so the spawned senders log into `log`.
    #[tokio::test]
    async fn https_webhook_with_a_private_ca_and_no_url_in_logs() {
        let log = Log::default();
        let w = log.clone();
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || w.clone())
                .finish(),
        );
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let srv = serve(
            Some(pki.server.clone()),
            vec![
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "busy".into(),
                ),
                (StatusCode::OK, "text/plain", "ok".into()),
            ],
        )
        .await;
        let url = format!(
            "https://{}/services/T0/B0/SECRETTOKEN?x=QUERYSECRET",
            srv.addr
        );
        let h = held();
        let n = Notifier::with_ca_file(
            std::slice::from_ref(&url),
            Some("http://127.0.0.1:15002/approvals".into()),
            Some(&ca),
        )
        .unwrap();
        assert!(!n.is_empty());
        n.held(&h);
        wait_for("two POSTs", || srv.hits() == 2).await;
        {
            let st = srv.state.lock().unwrap();
            let (path, body) = &st.requests[1];
            assert_eq!(path, "/services/T0/B0/SECRETTOKEN?x=QUERYSECRET");
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["approval_id"], h.approval_id.to_string());
            assert_eq!(v["workload"], "nightly-etl");
        }

        // Without the CA, the system roots do not know the server.
        let untrusting = Notifier::new(std::slice::from_ref(&url), None);
        untrusting.held(&h);
        wait_for("a TLS failure logged", || {
            log.text().contains("approval webhook unreachable")
        })
        .await;
        assert_eq!(srv.hits(), 2);
        let text = log.text();
        assert!(
            text.contains("approval webhook refused the notification"),
            "{text}"
        );
        assert!(text.contains("invalid peer certificate"), "{text}");
        assert!(text.contains("webhook_host=127.0.0.1"), "{text}");
        assert!(!text.contains("SECRETTOKEN"), "{text}");
        assert!(!text.contains("QUERYSECRET"), "{text}");
    }
}
