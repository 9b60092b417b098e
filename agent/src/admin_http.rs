//! The admin HTTP port (`[agent] admin_http`, loopback only): Prometheus
//! `/metrics`, and a small approval page for approvers.
//!
//! The page authenticates approvers by their token (`[[approvers]]
//! token_file`): `GET /approvals?token=…` sets an `HttpOnly`, `SameSite=Strict`
//! cookie and redirects to `/approvals`, which lists the held requests with
//! Approve and Deny buttons. Decisions are posted as forms and recorded with the
//! approver's name, exactly like `loopgate approvals approve`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{approval::Approvals, metrics::Metrics, secrets::Secret};

const COOKIE: &str = "loopgate_approver";

pub struct HttpState {
    pub approvals: Arc<Approvals>,
    pub metrics: Arc<Metrics>,
    /// Approver tokens.
    pub tokens: Vec<(Secret, String)>,
    /// Refreshes scrape-time gauges.
    pub refresh: Box<dyn Fn() + Send + Sync>,
}

impl HttpState {
    fn approver(&self, token: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(t, _)| constant_time_eq(t.expose().as_bytes(), token.as_bytes()))
            .map(|(_, n)| n.as_str())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn serve(listener: TcpListener, state: Arc<HttpState>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin http accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req, peer).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin http connection error");
            }
        });
    }
}

fn resp(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ctype)
        .header("X-Frame-Options", "DENY")
        .header("Cache-Control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn redirect(to: &str, cookie: Option<String>) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, to);
    if let Some(c) = cookie {
        b = b.header(header::SET_COOKIE, c);
    }
    b.body(Full::new(Bytes::new())).unwrap_or_default()
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.4em;text-align:left}}form{{display:inline}}</style>\
         </head><body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn cookie_token(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

async fn route(
    state: &HttpState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            (state.refresh)();
            resp(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.render(),
            )
        }
        (&Method::GET, "/approvals") => {
            if let Some(token) = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
            {
                return match state.approver(&token) {
                    Some(name) => {
                        tracing::info!(approver = name, %peer, "approver signed in to the approval page");
                        redirect(
                            "/approvals",
                            Some(format!(
                                "{COOKIE}={token}; Path=/approvals; HttpOnly; SameSite=Strict"
                            )),
                        )
                    }
                    None => unauthorized(peer),
                };
            }
            let Some(name) = cookie_token(&req).and_then(|t| state.approver(&t).map(str::to_owned))
            else {
                return unauthorized(peer);
            };
            resp(
                StatusCode::OK,
                "text/html; charset=utf-8",
                list_page(state, &name),
            )
        }
        (&Method::POST, p) if p.starts_with("/approvals/") => {
            let Some(name) = cookie_token(&req).and_then(|t| state.approver(&t).map(str::to_owned))
            else {
                return unauthorized(peer);
            };
            let mut parts = p.trim_start_matches("/approvals/").split('/');
            let (Some(id), Some(action), None) = (parts.next(), parts.next(), parts.next()) else {
                return resp(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
            };
            let Ok(id) = id.parse::<uuid::Uuid>() else {
                return resp(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "bad approval id\n".into(),
                );
            };
            let approve = match action {
                "approve" => true,
                "deny" => false,
                _ => return resp(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
            };
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let reason = form_urlencoded::parse(&body)
                .find(|(k, _)| k == "reason")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            match state.approvals.decide_as(id, &name, approve, reason) {
                Ok(_) => redirect("/approvals", None),
                Err(e) => {
                    tracing::warn!(approver = %name, error = %e, "approval page decision refused");
                    resp(
                        StatusCode::FORBIDDEN,
                        "text/html; charset=utf-8",
                        page(
                            "Not decided",
                            &format!(
                                "<p>{}</p><p><a href=\"/approvals\">Back</a></p>",
                                esc(&e.to_string())
                            ),
                        ),
                    )
                }
            }
        }
        _ => resp(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn unauthorized(peer: SocketAddr) -> Response<Full<Bytes>> {
    tracing::warn!(%peer, "approval page: missing or unknown approver token");
    resp(
        StatusCode::UNAUTHORIZED,
        "text/html; charset=utf-8",
        page(
            "Approver token required",
            "<p>Open <code>/approvals?token=&lt;your approver token&gt;</code>.</p>",
        ),
    )
}

fn list_page(state: &HttpState, approver: &str) -> String {
    let pending = state.approvals.list();
    let mut body = format!("<p>Signed in as <b>{}</b>.</p>", esc(approver));
    if pending.is_empty() {
        body.push_str("<p id=\"empty\">Nothing is waiting for approval.</p>");
    } else {
        body.push_str("<table><tr><th>Workload</th><th>Target</th><th>Request</th><th>Rule</th><th>Why</th><th>Expires</th><th>Decision</th></tr>");
        for h in pending {
            let id = h.approval_id;
            body.push_str(&format!(
                "<tr id=\"req-{id}\"><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>\
                 <form method=\"post\" action=\"/approvals/{id}/approve\"><input name=\"reason\" placeholder=\"reason\">\
                 <button id=\"approve-{id}\" type=\"submit\">Approve</button></form> \
                 <form method=\"post\" action=\"/approvals/{id}/deny\"><input name=\"reason\" placeholder=\"reason\" required>\
                 <button id=\"deny-{id}\" type=\"submit\">Deny</button></form></td></tr>",
                esc(&h.workload),
                esc(&h.target),
                esc(&h.request),
                esc(&h.rule_id),
                esc(&h.reason),
                esc(&h.expires_at),
            ));
        }
        body.push_str("</table>");
    }
    page("loopgate approvals", &body)
}
