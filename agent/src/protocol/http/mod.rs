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
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    body::Incoming,
    client::conn::http1::SendRequest,
    header::{self, HeaderValue},
    service::service_fn,
    Request as HttpRequest, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinHandle};

mod body;
mod head;
mod path;
mod upstream;

use body::{BodyError, Coding, MaskBody};
use head::{bearer, connection_names_end_to_end, strip_hop_by_hop, METHOD_OVERRIDES};
use path::normalize_path;
use upstream::{Tap, TapCapture};

use super::ProtocolHandler;
use crate::{
    kinds::{EventKind, OpKind, Outcome, Protocol, Refusal},
    policy::{HttpOp, Operation, Verdict},
    session::{Attempt, Event, SecondFactorError, Session},
};

type Body = Either<MaskBody, Full<Bytes>>;

/// A loop has this long to send a request's headers (slow clients are cut).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The event kind of an HTTP request.
const REQUEST: EventKind = EventKind::Op(OpKind::Http);

/// The HTTP/1.1 handler.
pub struct Http;

#[async_trait::async_trait]
impl ProtocolHandler for Http {
    fn protocol(&self) -> Protocol {
        Protocol::Http
    }

    fn sees_requests(&self) -> bool {
        true
    }

    fn carries_second_factor(&self) -> bool {
        true
    }

    fn sends_credential(&self) -> bool {
        true
    }

    async fn serve(&self, session: Arc<Session>, client: TcpStream) -> Outcome {
        // The stored credential, as an `Authorization` value (sensitive).
        let authorization = session.credential().and_then(|c| {
            let s = c.authorization.as_ref()?;
            let mut v = HeaderValue::from_str(s.expose()).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        let conn = Arc::new(Conn {
            capture: session
                .capture()
                .map(|c| Arc::new(Mutex::new(TapCapture::new(c)))),
            s: session,
            authorization,
            upstream_error: Mutex::new(None),
            body_error: Arc::new(Mutex::new(None)),
            sender: tokio::sync::Mutex::new(None),
            conn_tasks: Mutex::new(Vec::new()),
        });
        serve(conn, client).await
    }
}

/// One loop connection to an HTTP target.
struct Conn {
    s: Arc<Session>,
    /// The stored credential, as an `Authorization` value (sensitive).
    authorization: Option<HeaderValue>,
    /// Shared by every upstream connection of the session, so offsets and
    /// sequence numbers continue across reconnects.
    capture: Option<Arc<Mutex<TapCapture>>>,
    /// The last upstream failure, for the session outcome.
    upstream_error: Mutex<Option<Outcome>>,
    /// Why a response body was cut short (the connection ends with it).
    body_error: Arc<Mutex<Option<String>>>,
    sender: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
    conn_tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Serves the loop's connection until it closes, fails, or the session is
/// closed.
async fn serve(s: Arc<Conn>, client: TcpStream) -> Outcome {
    let _ = client.set_nodelay(true);
    let abort = s.s.closed().clone();
    // Bytes are counted on the loop's side; each side captures what the
    // agent writes to it (here: responses, as the loop gets them).
    let io = TokioIo::new(Tap::new(
        client,
        Some(s.s.counters().clone()),
        s.capture.clone(),
        true,
    ));
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
        return Outcome::Shutdown;
    };
    if let Some(r) = s.s.denied() {
        return Outcome::Denied(r);
    }
    let body_error = s.body_error.lock().ok().and_then(|mut b| b.take());
    match served {
        Err(_) if body_error.is_some() => Outcome::UpstreamError(body_error.unwrap_or_default()),
        Err(e) if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() => {
            Outcome::ClientError(format!("malformed HTTP from the loop: {e}"))
        }
        Err(e) if e.is_incomplete_message() => {
            Outcome::ClientError("the loop closed the connection in the middle of a request".into())
        }
        Err(e) => Outcome::ClientError(format!("HTTP connection: {e}")),
        Ok(()) => s
            .upstream_error
            .lock()
            .ok()
            .and_then(|mut u| u.take())
            .unwrap_or_else(Outcome::ok),
    }
}

impl Conn {
    async fn request(self: &Arc<Self>, mut req: HttpRequest<Incoming>) -> Response<Body> {
        let session_id = self.s.id();
        let method = req.method().as_str().to_owned();
        // TRACE echoes the request (with the stored credential) back; CONNECT
        // would open a tunnel past every request rule.
        if matches!(method.as_str(), "TRACE" | "CONNECT") {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({
                    "error": format!("loopgate: {method} is not allowed through loopgate"),
                    "session_id": session_id,
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
                    "session_id": session_id,
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
                        "session_id": session_id,
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
            self.s.masker().mask(&mut b);
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

        // 1. The second factor (the first token makes the session decision).
        let mut attrs = vec![
            ("method".to_owned(), method.clone()),
            ("path".to_owned(), shown_path.clone()),
        ];
        if !overrides.is_empty() {
            attrs.push(("method_override_stripped".into(), overrides.join(",")));
        }
        if self.s.requires_second_factor() {
            let attempt = Attempt {
                kind: REQUEST,
                text: text.clone(),
                attrs: attrs.clone(),
                how: "send it as Authorization: Bearer <token>",
                connect: format!("connect {}", self.s.row().destination),
            };
            match self.s.second_factor(bearer(req.headers()), &attempt).await {
                Ok(claims) => {
                    if let Some(c) = claims {
                        attrs.push(("jwt_sub".into(), c.sub.clone()));
                    }
                }
                Err(SecondFactorError::Invalid(r)) => return self.unauthorized(&r.reason),
                Err(SecondFactorError::Refused(r)) => {
                    return refusal(StatusCode::FORBIDDEN, &r, session_id, true)
                }
                Err(SecondFactorError::SubjectChanged(r)) => {
                    return self.unauthorized_close(&r.reason)
                }
            }
        }

        // 2. The request decision.
        let host = {
            let mut hosts = req.headers().get_all(header::HOST).iter();
            match (hosts.next(), hosts.next()) {
                (Some(h), None) => h.to_str().ok(),
                _ => None,
            }
        };
        let op = Operation::Http(HttpOp {
            method: &method,
            path: &path,
            host,
            headers: Some(req.headers()),
        });
        let decided = match self.s.decide(op, &text, attrs).await {
            Ok(d) => d,
            Err(r) => return refusal(StatusCode::FORBIDDEN, &r, session_id, false),
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
                        "session_id": session_id,
                    }),
                    false,
                );
            }
        }
        let h = req.headers_mut();
        strip_hop_by_hop(h);
        if self.s.requires_second_factor() || self.authorization.is_some() {
            h.remove(header::AUTHORIZATION);
        }
        if let Some(a) = &self.authorization {
            h.insert(header::AUTHORIZATION, a.clone());
        }
        // Responses are masked on their way to the loop: they must not come
        // compressed.
        if self.s.masker().max_len() > 0 {
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
            Err(failed) => {
                let detail = failed.detail().to_owned();
                tracing::warn!(upstream = %self.s.upstream(), error = %detail, "HTTP upstream failed");
                if let Ok(mut u) = self.upstream_error.lock() {
                    *u = Some(failed);
                }
                return json(
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({
                        "error": "loopgate: the upstream failed",
                        "reason": detail,
                        "session_id": session_id,
                    }),
                    false,
                );
            }
        };
        if let Ok(mut u) = self.upstream_error.lock() {
            *u = None;
        }
        let status = resp.status();
        let masker = self.s.masker().clone();
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
                tracing::warn!(upstream = %self.s.upstream(), reason = %why, "HTTP response refused");
                self.s
                    .metrics()
                    .http_response(StatusCode::BAD_GATEWAY.as_u16());
                self.s.record(Event {
                    kind: EventKind::Response,
                    text: text.clone(),
                    verdict: Verdict::Deny,
                    rule_id: String::new(),
                    reason: why.clone(),
                    attrs: vec![("status".into(), status.as_u16().to_string())],
                });
                return json(
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({
                        "error": "loopgate: the upstream's response cannot be masked",
                        "reason": why,
                        "session_id": session_id,
                    }),
                    false,
                );
            }
        };
        self.s.metrics().http_response(status.as_u16());
        self.s.record(Event {
            kind: EventKind::Response,
            text,
            verdict: decided.verdict,
            rule_id: decided.rule_id,
            reason: status.as_str().to_owned(),
            attrs: vec![("status".into(), status.as_u16().to_string())],
        });
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
        let upstream = self.s.upstream();
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
        let Some(addr) = self.s.address() else {
            return Ok(());
        };
        head::names_target(req, addr)
    }

    fn unauthorized(&self, reason: &str) -> Response<Body> {
        let mut r = refusal(
            StatusCode::UNAUTHORIZED,
            &Refusal::new("", reason),
            self.s.id(),
            false,
        );
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

/// A protocol-native refusal: a JSON body naming the rule and the reason.
fn refusal(status: StatusCode, r: &Refusal, session_id: uuid::Uuid, close: bool) -> Response<Body> {
    let (rule_id, reason) = (r.rule_id.as_str(), r.reason.as_str());
    let mut body = serde_json::json!({
        "error": if status == StatusCode::UNAUTHORIZED {
            "loopgate: the JWT second factor was refused"
        } else {
            "loopgate: refused by policy"
        },
        "reason": reason,
        "session_id": session_id,
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

/// The private functions above, for `crate::fuzzing`.
#[doc(hidden)]
pub(crate) mod fuzz;
