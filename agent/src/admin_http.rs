//! The admin HTTP port (`[agent] admin_http`, loopback only): Prometheus
//! `/metrics`, and a small approval page for approvers.
//!
//! The page authenticates approvers by their token (`[[approvers]]
//! token_file`): `GET /approvals?token=…` sets an `HttpOnly`, `SameSite=Strict`
//! cookie and redirects to `/approvals`, which lists the held requests with
//! Approve and Deny buttons. Decisions are posted as forms and recorded with the
//! approver's name, exactly like `loopgate approvals approve`.
//!
//! Against other local web pages (a loop can serve one on loopback and get an
//! approver to open it) and DNS rebinding:
//! - every request must name this listener in `Host` (its `ip:port`,
//!   `localhost:port`, or the host of `[approvals] page_url`), else 421;
//! - every decision must come from this page: `Origin` (or, without one, the
//!   `Referer`'s origin) must be one of those origins, and the form must carry
//!   the CSRF token the page embeds (an HMAC, under a key drawn at start, of the
//!   approver's cookie), else 403.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{approval::Approvals, metrics::Metrics, secrets::Secret};

const COOKIE: &str = "loopgate_approver";
const CSRF_FIELD: &str = "csrf";
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub struct HttpState {
    pub approvals: Arc<Approvals>,
    pub metrics: Arc<Metrics>,
    /// Approver tokens.
    pub tokens: Vec<(Secret, String)>,
    /// Refreshes scrape-time gauges.
    pub refresh: Box<dyn Fn() + Send + Sync>,
    /// Origins the page is served from (`http://127.0.0.1:15002`, ...).
    origins: Vec<String>,
    /// `Host` values naming this listener (the authorities of `origins`).
    hosts: Vec<String>,
    /// Signs CSRF tokens; drawn at start, so a restart invalidates open pages.
    csrf_key: ring::hmac::Key,
}

/// `scheme://host[:port]` as a browser writes it in `Origin` (lower case, no
/// default port), from a URL.
fn origin_of(url: &str) -> Option<String> {
    let uri: hyper::Uri = url.trim().parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let auth = uri.authority()?;
    let host = auth.host().to_ascii_lowercase();
    match (scheme.as_str(), auth.port_u16()) {
        ("http", Some(80)) | ("https", Some(443)) | (_, None) => Some(format!("{scheme}://{host}")),
        (_, Some(p)) => Some(format!("{scheme}://{host}:{p}")),
    }
}

impl HttpState {
    /// `listen`: the admin HTTP address; `page_url`: `[approvals] page_url`,
    /// the address approvers use (e.g. through a tunnel).
    pub fn new(
        approvals: Arc<Approvals>,
        metrics: Arc<Metrics>,
        tokens: Vec<(Secret, String)>,
        refresh: Box<dyn Fn() + Send + Sync>,
        listen: SocketAddr,
        page_url: Option<&str>,
    ) -> Result<Self, ring::error::Unspecified> {
        let port = listen.port();
        let mut origins = vec![
            format!("http://{listen}"),
            format!("http://localhost:{port}"),
        ];
        if let Some(o) = page_url.and_then(origin_of) {
            if !origins.contains(&o) {
                origins.push(o);
            }
        }
        let mut hosts = Vec::new();
        for o in &origins {
            let (scheme, auth) = o.split_once("://").unwrap_or(("http", o));
            hosts.push(auth.to_owned());
            // Without a port in the origin, a client may still write the default one.
            let after_host = auth.rsplit_once(']').map_or(auth, |(_, rest)| rest);
            if !after_host.contains(':') {
                hosts.push(format!(
                    "{auth}:{}",
                    if scheme == "https" { 443 } else { 80 }
                ));
            }
        }
        let rng = ring::rand::SystemRandom::new();
        Ok(Self {
            approvals,
            metrics,
            tokens,
            refresh,
            origins,
            hosts,
            csrf_key: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)?,
        })
    }

    fn approver(&self, token: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(t, _)| constant_time_eq(t.expose().as_bytes(), token.as_bytes()))
            .map(|(_, n)| n.as_str())
    }

    /// The CSRF token of a signed-in session (its cookie).
    fn csrf_token(&self, cookie: &str) -> String {
        use base64::Engine;
        let tag = ring::hmac::sign(&self.csrf_key, cookie.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    fn csrf_ok(&self, cookie: &str, presented: Option<&str>) -> bool {
        use base64::Engine;
        let Some(tag) = presented.and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        }) else {
            return false;
        };
        ring::hmac::verify(&self.csrf_key, cookie.as_bytes(), &tag).is_ok()
    }

    /// Does `Host` name this listener?
    fn host_ok(&self, req: &Request<Incoming>) -> bool {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        host.is_some_and(|h| self.hosts.iter().any(|a| a.eq_ignore_ascii_case(h.trim())))
    }

    /// Did the request come from this page? `Origin`, else the `Referer`'s
    /// origin; neither → no.
    fn same_origin(&self, req: &Request<Incoming>) -> bool {
        let h = req.headers();
        let origin = match h.get(header::ORIGIN) {
            Some(o) => o.to_str().ok().map(|o| o.trim().to_ascii_lowercase()),
            None => h
                .get(header::REFERER)
                .and_then(|r| r.to_str().ok())
                .and_then(origin_of),
        };
        origin.is_some_and(|o| self.origins.contains(&o))
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
        .header("Content-Security-Policy", CSP)
        .header("X-Content-Type-Options", "nosniff")
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
    // DNS rebinding: a page of another site resolved to loopback names its
    // own host here.
    if !state.host_ok(&req) {
        tracing::warn!(%peer, host = ?req.headers().get(header::HOST), "admin http: request for another host refused");
        return resp(
            StatusCode::MISDIRECTED_REQUEST,
            "text/plain",
            "this is loopgate's admin port: use its own address in Host\n".into(),
        );
    }
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
            let Some((cookie, name)) = signed_in(state, &req) else {
                return unauthorized(peer);
            };
            resp(
                StatusCode::OK,
                "text/html; charset=utf-8",
                list_page(state, &name, &state.csrf_token(&cookie)),
            )
        }
        (&Method::POST, p) if p.starts_with("/approvals/") => {
            let Some((cookie, name)) = signed_in(state, &req) else {
                return unauthorized(peer);
            };
            if !state.same_origin(&req) {
                tracing::warn!(approver = %name, %peer, origin = ?req.headers().get(header::ORIGIN), "approval page: cross-origin decision refused");
                return forbidden("The decision did not come from this page (Origin).");
            }
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
            let field = |name: &str| {
                form_urlencoded::parse(&body)
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.into_owned())
            };
            if !state.csrf_ok(&cookie, field(CSRF_FIELD).as_deref()) {
                tracing::warn!(approver = %name, %peer, "approval page: decision without a valid CSRF token refused");
                return forbidden("The decision did not come from this page (missing or stale form token): reload the page.");
            }
            let reason = field("reason").unwrap_or_default();
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

/// The cookie token and approver name of a signed-in request.
fn signed_in(state: &HttpState, req: &Request<Incoming>) -> Option<(String, String)> {
    let t = cookie_token(req)?;
    let name = state.approver(&t)?.to_owned();
    Some((t, name))
}

fn forbidden(why: &str) -> Response<Full<Bytes>> {
    resp(
        StatusCode::FORBIDDEN,
        "text/html; charset=utf-8",
        page(
            "Not decided",
            &format!("<p>{}</p><p><a href=\"/approvals\">Back</a></p>", esc(why)),
        ),
    )
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

fn list_page(state: &HttpState, approver: &str, csrf: &str) -> String {
    let csrf = format!(
        "<input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{}\">",
        esc(csrf)
    );
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
                 <form method=\"post\" action=\"/approvals/{id}/approve\">{csrf}<input name=\"reason\" placeholder=\"reason\">\
                 <button id=\"approve-{id}\" type=\"submit\">Approve</button></form> \
                 <form method=\"post\" action=\"/approvals/{id}/deny\">{csrf}<input name=\"reason\" placeholder=\"reason\" required>\
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_written_as_browsers_send_them() {
        assert_eq!(
            origin_of("http://127.0.0.1:15002/approvals").as_deref(),
            Some("http://127.0.0.1:15002")
        );
        assert_eq!(
            origin_of("HTTPS://Approvals.Example:443/x?y").as_deref(),
            Some("https://approvals.example")
        );
        assert_eq!(
            origin_of("http://[::1]:8080/").as_deref(),
            Some("http://[::1]:8080")
        );
        assert_eq!(origin_of("/approvals"), None);
        assert_eq!(origin_of("null"), None);
    }
}
