//! HTTP/1.1 targets (`protocol = "http"`): the agent terminates the loop's
//! connection with hyper and, for each request,
//!
//! 1. verifies the JWT second factor when the workload requires one (taken
//!    from `Authorization: Bearer`), and makes the session decision with the
//!    token's subject on the first request (a later request must carry the
//!    same subject);
//! 2. decides the request (`kind = "request"`, `methods`, `paths` rules):
//!    denied requests get a 403 JSON body, `approve` holds the request;
//! 3. strips the loop's own credentials and adds the target's stored one
//!    (`token_*` → `Bearer`, `username` + `password_*` → `Basic`), so the
//!    upstream only ever sees the stored credential and the loop never does;
//! 4. forwards it on the session's own upstream connection, and records the
//!    response status;
//! 5. sends the response on with the canonical reason phrase, every stored
//!    credential masked in header values (a header whose name holds one is
//!    dropped) and in the body, decoded first when the upstream compressed it
//!    anyway (gzip, deflate; other encodings are refused with a 502), and
//!    trailers dropped ([`body`]).
//!
//! Requests whose `Connection` header names an end-to-end header the agent
//! relies on (`Connection: host` would strip `Host` after the Host check)
//! are refused with a 400; method-override headers (`X-HTTP-Method-Override`
//! and its variants) are stripped, so the method the rules judged is the one
//! the upstream acts on.
//!
//! Payload capture records what the agent writes: the request on the
//! upstream side (after rewriting, so a loop's token never reaches the
//! audit) and the response on the loop's side (decoded and masked, so a
//! compressed credential does not reach it either).
//! Protocol upgrades (WebSocket) are not supported yet: the upgrade headers
//! are hop-by-hop and are not forwarded.

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::fd::RawFd,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    body::Incoming,
    client::conn::http1::SendRequest,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    service::service_fn,
    Request as HttpRequest, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

mod body;

use body::{BodyError, Coding, MaskBody};

use super::tcp::{Capture, CaptureStream, Counters, Outcome, Side};
use crate::{
    audit::SessionRow,
    config::TargetAddress,
    identity::JwtVerifier,
    policy::{Request, CONNECT},
    proxy::{session_request, Proxy},
};

type Body = Either<MaskBody, Full<Bytes>>;

/// A loop has this long to send a request's headers (slow clients are cut).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Request kind of an HTTP request, for `kinds` globs.
pub const REQUEST: &str = "request";

/// Headers that describe one hop, not the request (RFC 9110 §7.6.1), plus
/// the loop's proxy credentials.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// End-to-end headers a `Connection` header may not name: the agent checks
/// or sets them (Host, credentials, framing, codings), and a hop-by-hop
/// strip after the check would undo it.
const END_TO_END: &[&str] = &[
    "host",
    "authorization",
    "content-length",
    "transfer-encoding",
    "content-encoding",
    "content-type",
    "accept-encoding",
    "cookie",
    "expect",
];

/// Headers some frameworks read as the request's real method: a `POST` with
/// `X-HTTP-Method-Override: DELETE` would act as a DELETE the rules never
/// saw. They are stripped.
const METHOD_OVERRIDES: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// One loop connection to an HTTP target.
pub(crate) struct Session {
    pub proxy: Arc<Proxy>,
    pub row: SessionRow,
    /// The target's configured address: the `Host` a request must name
    /// before the stored credential is added to it.
    pub address: Option<TargetAddress>,
    pub exe: Option<String>,
    /// The workload that requires a JWT, and its verifier.
    pub jwt: Option<(String, Arc<JwtVerifier>)>,
    /// The verified subject, once the session decision was made with it
    /// (shared with the session table, for re-checks on reload).
    pub subject: Arc<Mutex<Option<String>>>,
    pub upstream: SocketAddr,
    /// The stored credential, as an `Authorization` value (sensitive).
    pub authorization: Option<HeaderValue>,
    /// Shared by every upstream connection of the session, so offsets and
    /// sequence numbers continue across reconnects.
    capture: Option<Arc<Mutex<TapCapture>>>,
    pub connect_timeout: Duration,
    /// The loop's socket, watched for hang-ups while a request is held.
    pub client_fd: RawFd,
    /// The session decision refused the loop (outcome `denied`).
    refused: Mutex<Option<String>>,
    /// The last upstream failure, for the session outcome.
    upstream_error: Mutex<Option<(&'static str, String)>>,
    /// Why a response body was cut short (the connection ends with it).
    body_error: Arc<Mutex<Option<String>>>,
    sender: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
    conn_tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        proxy: Arc<Proxy>,
        row: SessionRow,
        address: Option<TargetAddress>,
        exe: Option<String>,
        jwt: Option<(String, Arc<JwtVerifier>)>,
        subject: Arc<Mutex<Option<String>>>,
        upstream: SocketAddr,
        authorization: Option<HeaderValue>,
        capture: Option<Capture>,
        connect_timeout: Duration,
        client_fd: RawFd,
    ) -> Self {
        Self {
            proxy,
            row,
            address,
            exe,
            jwt,
            subject,
            upstream,
            authorization,
            capture: capture.map(|c| Arc::new(Mutex::new(TapCapture::new(c)))),
            connect_timeout,
            client_fd,
            refused: Mutex::new(None),
            upstream_error: Mutex::new(None),
            body_error: Arc::new(Mutex::new(None)),
            sender: tokio::sync::Mutex::new(None),
            conn_tasks: Mutex::new(Vec::new()),
        }
    }
}

/// Serves the loop's connection until it closes, fails, or `abort` fires.
pub(crate) async fn serve(
    s: Arc<Session>,
    client: TcpStream,
    counters: Arc<Counters>,
    abort: CancellationToken,
) -> Outcome {
    let _ = client.set_nodelay(true);
    // Bytes are counted on the loop's side; each side captures what the
    // agent writes to it (here: responses, as the loop gets them).
    let io = TokioIo::new(Tap::new(client, Some(counters), s.capture.clone(), true));
    let svc = {
        let s = s.clone();
        service_fn(move |req| {
            let s = s.clone();
            async move { Ok::<_, Infallible>(s.request(req).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let served = tokio::select! {
        r = &mut conn => Some(r),
        _ = abort.cancelled() => None,
    };
    for t in s
        .conn_tasks
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default()
    {
        t.abort();
    }
    let Some(served) = served else {
        return Outcome::new("shutdown", Some("closed by agent shutdown".into()));
    };
    if let Some(r) = s.refused.lock().ok().and_then(|mut r| r.take()) {
        return Outcome::new("denied", Some(r));
    }
    let body_error = s.body_error.lock().ok().and_then(|mut b| b.take());
    match served {
        Err(_) if body_error.is_some() => Outcome::new("upstream_error", body_error),
        Err(e) if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() => Outcome::new(
            "client_error",
            Some(format!("malformed HTTP from the loop: {e}")),
        ),
        Err(e) if e.is_incomplete_message() => Outcome::new(
            "client_error",
            Some("the loop closed the connection in the middle of a request".into()),
        ),
        Err(e) => Outcome::new("client_error", Some(format!("HTTP connection: {e}"))),
        Ok(()) => match s.upstream_error.lock().ok().and_then(|mut u| u.take()) {
            Some((outcome, detail)) => Outcome::new(outcome, Some(detail)),
            None => Outcome::new("ok", None),
        },
    }
}

impl Session {
    async fn request(self: &Arc<Self>, mut req: HttpRequest<Incoming>) -> Response<Body> {
        let method = req.method().as_str().to_owned();
        // TRACE echoes the request (with the stored credential) back; CONNECT
        // would open a tunnel past every request rule.
        if matches!(method.as_str(), "TRACE" | "CONNECT") {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({
                    "error": format!("loopgate: {method} is not allowed through loopgate"),
                    "session_id": self.row.session_id,
                }),
                false,
            );
        }
        // `Connection: host` would strip Host after the Host check.
        if let Some(named) = connection_names_end_to_end(req.headers()) {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({
                    "error": format!("loopgate: the Connection header names {named}, an end-to-end header"),
                    "session_id": self.row.session_id,
                }),
                false,
            );
        }
        // Rules see, and the upstream gets, one spelling of the path.
        let path = match normalize_path(req.uri().path()) {
            Ok(p) => p,
            Err(why) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({
                        "error": format!("loopgate: ambiguous request path: {why}"),
                        "session_id": self.row.session_id,
                    }),
                    false,
                )
            }
        };
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        // A stored credential pasted into a URL stays out of the audit.
        let masked = |t: String| {
            let mut b = t.into_bytes();
            self.proxy.masker.mask(&mut b);
            String::from_utf8_lossy(&b).into_owned()
        };
        let text = masked(format!("{method} {path}{query}"));
        let shown_path = masked(path.clone());
        // The method the rules judge is the one the upstream gets.
        let mut overrides = Vec::new();
        for name in METHOD_OVERRIDES {
            for v in req.headers().get_all(*name) {
                overrides.push(masked(String::from_utf8_lossy(v.as_bytes()).into_owned()));
            }
            req.headers_mut().remove(*name);
        }

        // 1. The second factor.
        let subject = match &self.jwt {
            None => None,
            Some((wl, verifier)) => {
                let verified = match bearer(req.headers()) {
                    None => Err(format!(
                        "workload {wl} requires a JWT: send it as Authorization: Bearer <token>"
                    )),
                    Some(token) => verifier.verify(token).await.map_err(|e| e.to_string()),
                };
                match verified {
                    Ok(claims) => Some(claims.sub),
                    Err(reason) => {
                        let rule_id = format!("jwt:{wl}");
                        self.proxy.metrics.decision("deny", &rule_id);
                        self.proxy.event(
                            &self.row,
                            REQUEST,
                            &text,
                            "deny",
                            &rule_id,
                            &reason,
                            vec![
                                ("method".into(), method.clone()),
                                ("path".into(), shown_path.clone()),
                            ],
                        );
                        return self.unauthorized(&reason);
                    }
                }
            }
        };
        let identity = |kind, method, path| Request {
            jwt_subject: subject.as_deref(),
            method,
            path,
            ..session_request(&self.row, self.exe.as_deref(), kind)
        };
        let mut attrs = vec![
            ("method".to_owned(), method.clone()),
            ("path".to_owned(), shown_path.clone()),
        ];
        if !overrides.is_empty() {
            attrs.push(("method_override_stripped".into(), overrides.join(",")));
        }
        if let Some(sub) = &subject {
            attrs.push(("jwt_sub".into(), sub.clone()));
            let known = self.subject.lock().ok().and_then(|g| g.clone());
            match known {
                // The session decision, now that the identity is complete.
                None => {
                    let l4 = identity(CONNECT, None, None);
                    let request = format!("connect {} (jwt sub {sub})", self.row.destination);
                    if let Err((d, reason)) = self
                        .proxy
                        .decide(&self.row, &l4, &request, attrs.clone(), self.client_fd)
                        .await
                    {
                        if let Ok(mut r) = self.refused.lock() {
                            *r = Some(reason.clone());
                        }
                        return refusal(
                            StatusCode::FORBIDDEN,
                            &d.rule_id,
                            &reason,
                            &self.row,
                            true,
                        );
                    }
                    if let Ok(mut g) = self.subject.lock() {
                        *g = Some(sub.clone());
                    }
                }
                Some(k) if k != *sub => {
                    let reason = format!(
                        "this connection belongs to JWT subject {k}; a token for {sub} needs a new connection"
                    );
                    let rule_id = "jwt:subject-changed";
                    self.proxy.metrics.decision("deny", rule_id);
                    self.proxy
                        .event(&self.row, REQUEST, &text, "deny", rule_id, &reason, attrs);
                    return self.unauthorized_close(&reason);
                }
                Some(_) => {}
            }
        }

        // 2. The request decision.
        let r = identity(REQUEST, Some(&method), Some(&path));
        let decided = match self
            .proxy
            .decide(&self.row, &r, &text, attrs, self.client_fd)
            .await
        {
            Ok(d) => d,
            Err((d, reason)) => {
                return refusal(StatusCode::FORBIDDEN, &d.rule_id, &reason, &self.row, false)
            }
        };

        // 3. Credentials: the loop's never reach the upstream, and the stored
        //    one only goes to the target's own host name.
        if self.authorization.is_some() {
            if let Err(why) = self.check_host(&req) {
                return json(
                    StatusCode::MISDIRECTED_REQUEST,
                    serde_json::json!({
                        "error": "loopgate: the request is not addressed to this target",
                        "reason": why,
                        "session_id": self.row.session_id,
                    }),
                    false,
                );
            }
        }
        let h = req.headers_mut();
        strip_hop_by_hop(h);
        if self.jwt.is_some() || self.authorization.is_some() {
            h.remove(header::AUTHORIZATION);
        }
        if let Some(a) = &self.authorization {
            h.insert(header::AUTHORIZATION, a.clone());
        }
        // Responses are masked on their way to the loop: they must not come
        // compressed.
        if self.proxy.masker.max_len() > 0 {
            h.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        // Origin-form, with the normalized path, on the upstream connection.
        match format!("{path}{query}").parse() {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "loopgate: invalid request target"}),
                    false,
                )
            }
        }

        // 4. Forward.
        let resp = match self.send(req).await {
            Ok(r) => r,
            Err((outcome, detail)) => {
                tracing::warn!(upstream = %self.upstream, error = %detail, "HTTP upstream failed");
                if let Ok(mut u) = self.upstream_error.lock() {
                    *u = Some((outcome, detail.clone()));
                }
                return json(
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({
                        "error": "loopgate: the upstream failed",
                        "reason": detail,
                        "session_id": self.row.session_id,
                    }),
                    false,
                );
            }
        };
        if let Ok(mut u) = self.upstream_error.lock() {
            *u = None;
        }
        let status = resp.status();
        let masker = self.proxy.masker.clone();
        // A body the masker could not read is not sent at all.
        let coding = match masker.max_len() {
            0 => Ok(Coding::Identity),
            _ => body::coding(resp.headers()),
        };
        let coding = match coding {
            Ok(c) => c,
            Err(why) => {
                // It may quote the upstream's header.
                let why = masked(why);
                tracing::warn!(upstream = %self.upstream, reason = %why, "HTTP response refused");
                self.proxy
                    .metrics
                    .http_response(StatusCode::BAD_GATEWAY.as_u16());
                self.proxy.event(
                    &self.row,
                    "response",
                    &text,
                    "deny",
                    "",
                    &why,
                    vec![("status".into(), status.as_u16().to_string())],
                );
                return json(
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({
                        "error": "loopgate: the upstream's response cannot be masked",
                        "reason": why,
                        "session_id": self.row.session_id,
                    }),
                    false,
                );
            }
        };
        self.proxy.metrics.http_response(status.as_u16());
        self.proxy.event(
            &self.row,
            "response",
            &text,
            decided.verdict.as_str(),
            &decided.rule_id,
            status.as_str(),
            vec![("status".into(), status.as_u16().to_string())],
        );
        let (mut parts, body) = resp.into_parts();
        // The upstream's reason phrase (kept by hyper as an extension) could
        // carry anything: the loop gets the canonical one.
        parts.extensions.clear();
        strip_hop_by_hop(&mut parts.headers);
        if coding != Coding::Identity {
            // The loop gets the decoded body, chunked.
            for h in [
                header::CONTENT_ENCODING,
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
            ] {
                parts.headers.remove(h);
            }
        }
        // A stored credential the upstream echoes back never reaches the loop.
        let masked = self.capture_masked();
        let mut any = false;
        let mut leaky_names = Vec::new();
        for (name, v) in parts.headers.iter_mut() {
            let mut n = name.as_str().as_bytes().to_vec();
            if masker.mask(&mut n) {
                leaky_names.push(name.clone());
            }
            let mut b = v.as_bytes().to_vec();
            if masker.mask(&mut b) {
                any = true;
                if let Ok(m) = HeaderValue::from_bytes(&b) {
                    *v = m;
                }
            }
        }
        for n in leaky_names {
            any = true;
            parts.headers.remove(n);
        }
        if any {
            if let Some(m) = masked.as_ref().and_then(|m| m.lock().ok()).as_mut() {
                **m = true;
            }
        }
        let failed = self.body_error.clone();
        let upstream = self.upstream;
        let on_error: body::OnError = Arc::new(move |e: &BodyError| {
            tracing::warn!(%upstream, error = %e, "HTTP response body cut short");
            if let Ok(mut f) = failed.lock() {
                *f = Some(e.to_string());
            }
        });
        Response::from_parts(
            parts,
            Either::Left(MaskBody::new(body, masker, coding, masked, Some(on_error))),
        )
    }

    /// The flag that marks the next captured response chunk as masked.
    fn capture_masked(&self) -> Option<Arc<Mutex<bool>>> {
        self.capture
            .as_ref()
            .and_then(|c| c.lock().ok().map(|c| c.down_masked.clone()))
    }

    /// The request's `Host` (or absolute-form authority) must name the
    /// target's configured address, so the stored credential cannot be
    /// steered to another virtual host behind the same upstream.
    fn check_host(&self, req: &HttpRequest<Incoming>) -> Result<(), String> {
        let Some(addr) = &self.address else {
            return Ok(());
        };
        Self::names_target(req, addr)
    }

    /// [`Session::check_host`] for a target with an address (pure; fuzzed).
    fn names_target<B>(req: &HttpRequest<B>, addr: &TargetAddress) -> Result<(), String> {
        let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
        let host = match hosts.as_slice() {
            [h] => h
                .to_str()
                .map_err(|_| "the Host header is not text".to_owned())?,
            [] => return Err("the request names no Host".to_owned()),
            _ => return Err("the request has more than one Host header".to_owned()),
        };
        // Both the Host header and an absolute-form authority must name it.
        for named in std::iter::once(host).chain(req.uri().authority().map(|a| a.as_str())) {
            if !host_matches(named, addr) {
                return Err(format!("Host {named} is not the target's address {addr}"));
            }
        }
        Ok(())
    }

    /// Sends on the session's upstream connection, (re)connecting when there
    /// is none or the upstream closed it. A request the connection never
    /// took (the upstream closed an idle keep-alive connection just then) is
    /// sent once more on a new connection.
    async fn send(
        &self,
        mut req: HttpRequest<Incoming>,
    ) -> Result<Response<Incoming>, (&'static str, String)> {
        let mut guard = self.sender.lock().await;
        let mut retried = false;
        loop {
            let reusable = match guard.as_mut() {
                Some(s) => !s.is_closed() && s.ready().await.is_ok(),
                None => false,
            };
            let sender = match guard.take() {
                Some(s) if reusable => s,
                _ => self.connect().await?,
            };
            let sender = guard.insert(sender);
            match sender.try_send_request(req).await {
                Ok(r) => return Ok(r),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !retried => {
                        retried = true;
                        req = unsent;
                        *guard = None;
                    }
                    _ => {
                        return Err((
                            "upstream_error",
                            format!("HTTP request to {}: {}", self.upstream, e.error()),
                        ))
                    }
                },
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, (&'static str, String)> {
        let up = self.upstream;
        let sock = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(up)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(("upstream_unreachable", format!("connect {up}: {e}"))),
            Err(_) => {
                return Err((
                    "upstream_unreachable",
                    format!("connect {up}: timed out after {:?}", self.connect_timeout),
                ))
            }
        };
        let _ = sock.set_nodelay(true);
        let io = TokioIo::new(Tap::new(sock, None, self.capture.clone(), false));
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| ("upstream_error", format!("HTTP handshake with {up}: {e}")))?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %up, error = %e, "upstream HTTP connection ended");
            }
        });
        if let Ok(mut t) = self.conn_tasks.lock() {
            t.retain(|t| !t.is_finished());
            t.push(task);
        }
        Ok(sender)
    }

    fn unauthorized(&self, reason: &str) -> Response<Body> {
        let mut r = refusal(StatusCode::UNAUTHORIZED, "", reason, &self.row, false);
        let challenge = format!(
            "Bearer realm=\"loopgate\", error=\"invalid_token\", error_description=\"{}\"",
            reason.replace(['"', '\\'], "'")
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        r
    }

    fn unauthorized_close(&self, reason: &str) -> Response<Body> {
        let mut r = self.unauthorized(reason);
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

/// The loop's bearer token, if it sent one.
fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The first end-to-end header a `Connection` header names, if any.
fn connection_names_end_to_end(h: &HeaderMap) -> Option<String> {
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .find(|t| END_TO_END.contains(&t.as_str()))
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

/// A protocol-native refusal: a JSON body naming the rule and the reason.
fn refusal(
    status: StatusCode,
    rule_id: &str,
    reason: &str,
    row: &SessionRow,
    close: bool,
) -> Response<Body> {
    let mut body = serde_json::json!({
        "error": if status == StatusCode::UNAUTHORIZED {
            "loopgate: the JWT second factor was refused"
        } else {
            "loopgate: refused by policy"
        },
        "reason": reason,
        "session_id": row.session_id,
    });
    if !rule_id.is_empty() {
        body["rule"] = rule_id.into();
    }
    json(status, body, close)
}

fn json(status: StatusCode, body: serde_json::Value, close: bool) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(
        body.to_string() + "\n",
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Whether a `Host` value (`name[:port]`, `[v6][:port]`) names `addr`.
fn host_matches(named: &str, addr: &TargetAddress) -> bool {
    let (host, port) = match named.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            // `host:` or a port out of range names nothing.
            Err(_) => return false,
        },
        _ => (named, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let (want_host, want_port) = match addr {
        TargetAddress::Ip(a) => (a.ip().to_string(), a.port()),
        TargetAddress::Host { host, port } => (host.clone(), *port),
    };
    host.trim_end_matches('.').eq_ignore_ascii_case(&want_host)
        && port.is_none_or(|p| p == want_port)
}

/// One spelling of a request path: unreserved `%XX` decoded, `.`/`..`
/// resolved, repeated `/` collapsed. Encodings whose meaning upstreams
/// disagree on (`%2F`, `%5C`, `%2E`, `%00`, a backslash) are refused.
fn normalize_path(raw: &str) -> Result<String, &'static str> {
    if raw == "*" {
        return Ok(raw.to_owned());
    }
    if !raw.starts_with('/') {
        return Err("the path does not start with /");
    }
    if raw.contains('\\') {
        return Err("a backslash in the path");
    }
    if raw.contains(';') {
        // Path parameters: `/public/..;/admin` is `/admin` to some servers.
        return Err("a ; in the path");
    }
    let b = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or("a truncated %-escape")?;
            // Two hex digits (from_str_radix alone takes a sign: `%+d`).
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err("a bad %-escape");
            }
            let v = u8::from_str_radix(hex, 16).map_err(|_| "a bad %-escape")?;
            match v {
                b'/' | b'\\' | b'.' | b';' | 0 => {
                    return Err("an encoded /, \\, ., ; or NUL in the path")
                }
                // Characters a path may hold literally (RFC 3986 pchar).
                c if c.is_ascii_alphanumeric() || b"-_~!$&'()*+,=:@".contains(&c) => {
                    decoded.push(c as char)
                }
                c => decoded.push_str(&format!("%{c:02X}")),
            }
            i += 3;
        } else {
            // A whole character: past ASCII, the path is UTF-8 (not one
            // Latin-1 character per byte).
            let c = raw
                .get(i..)
                .and_then(|r| r.chars().next())
                .ok_or("a broken path")?;
            decoded.push(c);
            i += c.len_utf8();
        }
    }
    let trailing = decoded.ends_with('/') && decoded.len() > 1;
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut p = format!("/{}", out.join("/"));
    if trailing && p.len() > 1 {
        p.push('/');
    }
    Ok(p)
}

/// A socket that counts what passes and captures what the agent writes to
/// it. `reads_are_up`: reads are the loop → upstream direction (the loop's
/// side of the proxy).
struct Tap {
    inner: TcpStream,
    counters: Option<Arc<Counters>>,
    capture: Option<Arc<Mutex<TapCapture>>>,
    reads_are_up: bool,
}

struct TapCapture {
    up: CaptureStream,
    down: CaptureStream,
    limit: u64,
    seen: [u64; 2],
    /// Set when a response was masked before it was written (the capture
    /// sees it masked already): the next down chunk is marked masked.
    down_masked: Arc<Mutex<bool>>,
}

impl TapCapture {
    fn new(c: Capture) -> Self {
        Self {
            limit: c.limit,
            up: CaptureStream::new(c.clone(), Side::Client),
            down: CaptureStream::new(c, Side::Upstream),
            seen: [0, 0],
            down_masked: Arc::new(Mutex::new(false)),
        }
    }
}

impl Tap {
    fn new(
        inner: TcpStream,
        counters: Option<Arc<Counters>>,
        capture: Option<Arc<Mutex<TapCapture>>>,
        reads_are_up: bool,
    ) -> Self {
        Self {
            inner,
            counters,
            capture,
            reads_are_up,
        }
    }

    fn saw(&mut self, read: bool, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let up = read == self.reads_are_up;
        if let Some(c) = &self.counters {
            let ctr = if up { &c.up } else { &c.down };
            ctr.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if read {
            return;
        }
        if let Some(mut c) = self.capture.as_ref().and_then(|c| c.lock().ok()) {
            if !up
                && c.down_masked
                    .lock()
                    .map(|mut m| std::mem::take(&mut *m))
                    .unwrap_or(false)
            {
                c.down.mark_masked();
            }
            let i = usize::from(!up);
            let left = c.limit.saturating_sub(c.seen[i]) as usize;
            if left > 0 {
                let part = &bytes[..bytes.len().min(left)];
                if up {
                    c.up.push(part);
                } else {
                    c.down.push(part);
                }
                c.seen[i] += part.len() as u64;
            }
        }
    }
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.saw(true, &buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.saw(false, &buf[..n]);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_and_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  tok.en "),
        );
        assert_eq!(bearer(&h), Some("tok.en"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-trace"),
        );
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-trace").is_none() && h.get("upgrade").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn connection_may_not_name_end_to_end_headers() {
        let named = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
            h.append(header::CONNECTION, HeaderValue::from_static(v));
            connection_names_end_to_end(&h)
        };
        assert_eq!(named("close"), None);
        assert_eq!(named("te, x-trace"), None);
        assert_eq!(named("Host").as_deref(), Some("host"));
        assert_eq!(
            named("x-a ,  Authorization").as_deref(),
            Some("authorization")
        );
        assert_eq!(named("content-length").as_deref(), Some("content-length"));
        assert_eq!(
            named("transfer-encoding").as_deref(),
            Some("transfer-encoding")
        );
    }

    #[test]
    fn paths_have_one_spelling() {
        for (raw, want) in [
            ("/admin/x", "/admin/x"),
            ("//admin//x", "/admin/x"),
            ("/./admin/./x", "/admin/x"),
            ("/items/../admin/x", "/admin/x"),
            ("/../../admin", "/admin"),
            ("/%61dmin/%7Euser", "/admin/~user"),
            ("/a%20b/", "/a%20b/"),
            ("/q%3fx", "/q%3Fx"),
            ("/a%21b", "/a!b"),
            ("/", "/"),
            // UTF-8 stays as sent (found by the http_path fuzz target: it
            // came out as one Latin-1 character per byte, and changed again
            // on every pass).
            ("/caf\u{e9}/./x", "/caf\u{e9}/x"),
            ("/..\u{59e}dmin", "/..\u{59e}dmin"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
        for bad in [
            "/admin%2Fx",
            "/%2e%2e/admin",
            "/a\\b",
            "/a%00",
            "/a%zz",
            "/a%4",
            "admin",
            // A sign is not a hex digit (found by the http_path fuzz target:
            // `%+d` went upstream as `%0D`).
            "/admin%+d",
            "/a%-1",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_must_name_the_target() {
        let by_name = TargetAddress::Host {
            host: "orders.internal".into(),
            port: 8080,
        };
        assert!(host_matches("orders.internal:8080", &by_name));
        assert!(host_matches("ORDERS.internal", &by_name));
        assert!(!host_matches("orders.internal:9090", &by_name));
        assert!(!host_matches("attacker.example", &by_name));
        let by_ip = TargetAddress::Ip("127.10.4.1:80".parse().unwrap());
        assert!(host_matches("127.10.4.1", &by_ip));
        assert!(host_matches("127.10.4.1:80", &by_ip));
        assert!(!host_matches("orders.internal", &by_ip));
        let v6 = TargetAddress::Ip("[::1]:8080".parse().unwrap());
        assert!(host_matches("[::1]:8080", &v6));
        assert!(!host_matches("127.10.4.1:99999", &by_ip));
        assert!(!host_matches("127.10.4.1:", &by_ip));
    }
}

/// The private functions above, for `crate::fuzzing`.
#[doc(hidden)]
pub(crate) mod fuzz;
