//! The session seam: everything a protocol handler gets from the proxy, and
//! all it needs.
//!
//! The proxy identifies an accepted connection, opens its session row and
//! makes the refusals that come before any protocol (see `proxy`); then it
//! hands a [`Session`] and the loop's socket to the target's
//! [`ProtocolHandler`](crate::protocol::ProtocolHandler). Through the
//! session a handler
//!
//! - knows who is asking (identity, workload, target, protocol);
//! - checks the JWT second factor ([`Session::second_factor`]), which makes
//!   the session decision with the token's subject the first time;
//! - decides each operation ([`Session::decide`]): evaluate the policy,
//!   count, record the event, and for `approve` hold it until an approver
//!   decides, it times out, or the loop hangs up;
//! - records other events ([`Session::record`]);
//! - gets the stored credential, connects upstream, and captures payload.
//!
//! The session's closing row and access-log line are not the handler's
//! business: the proxy's guard writes them when the session ends, however
//! it ends.

use std::{
    net::SocketAddr,
    os::fd::RawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    approval::{Approvals, Held, Outcome as Approval},
    audit::{capture::Capture, now_micros, AuditSink, EventRow, Record, SessionRow},
    config::TargetAddress,
    identity::{Claims, JwtVerifier},
    kinds::{EventKind, OpKind, Outcome, Protocol, Refusal},
    metrics::Metrics,
    policy::{store::PolicyStore, ApprovalSpec, Decision, Grant, Operation, Request, Verdict},
    secrets::{Masker, StoredCredential},
};

/// What the proxy and every session share.
pub struct Services {
    pub policy: Arc<PolicyStore>,
    pub approvals: Arc<Approvals>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<dyn AuditSink>,
    pub masker: Arc<dyn Masker>,
    /// Fires when the agent's shutdown grace period is over.
    pub abort: CancellationToken,
    pub connect_timeout: Duration,
}

/// Live byte counters of a session (read by `loopgate status`).
#[derive(Debug, Default)]
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl Counters {
    pub fn total(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }
}

/// One audit event of a session, typed until the audit boundary.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// What the loop asked for, in words (`GET /orders`, `connect 10.0.0.5:5432`).
    pub text: String,
    pub verdict: Verdict,
    pub rule_id: String,
    pub reason: String,
    pub attrs: Vec<(String, String)>,
}

impl Event {
    /// An event that only reports (`allow`, no rule).
    pub fn note(kind: EventKind, text: impl Into<String>, reason: impl Into<String>) -> Self {
        Event {
            kind,
            text: text.into(),
            verdict: Verdict::Allow,
            rule_id: String::new(),
            reason: reason.into(),
            attrs: Vec::new(),
        }
    }

    pub fn with_attrs(mut self, attrs: Vec<(String, String)>) -> Self {
        self.attrs = attrs;
        self
    }
}

/// A decision made by [`Session::judge`], not yet recorded.
#[derive(Debug, Clone)]
pub struct Judged {
    pub decision: Decision,
    /// Denied, or held and not approved.
    pub refused: Option<Refusal>,
}

impl Judged {
    /// A decision made without holding it: refused when it denies (an
    /// `approve` is left for the caller to hold).
    pub fn unheld(decision: Decision) -> Self {
        let refused = (decision.verdict == Verdict::Deny).then(|| Refusal {
            rule_id: decision.rule_id.clone(),
            reason: decision.reason.clone(),
        });
        Judged { decision, refused }
    }

    /// A refusal the handler makes itself, before any rule (a protocol
    /// check), as a deny decision.
    pub fn refusal(r: Refusal) -> Self {
        Judged {
            decision: Decision {
                verdict: Verdict::Deny,
                rule_id: r.rule_id.clone(),
                reason: r.reason.clone(),
                approval: None,
                mask: Vec::new(),
            },
            refused: Some(r),
        }
    }

    /// The operation's event: the verdict (`deny` when refused, whatever
    /// the rule's action), the rule, and the reason.
    pub fn event(&self, kind: EventKind, text: String, attrs: Vec<(String, String)>) -> Event {
        let (verdict, reason) = match &self.refused {
            Some(r) => (Verdict::Deny, r.reason.clone()),
            None => (self.decision.verdict, self.decision.reason.clone()),
        };
        Event {
            kind,
            text,
            verdict,
            rule_id: self.decision.rule_id.clone(),
            reason,
            attrs,
        }
    }
}

/// What the loop was doing when its second factor was checked (the event
/// recorded when the token is refused).
#[derive(Debug, Clone)]
pub struct Attempt {
    pub kind: EventKind,
    pub text: String,
    pub attrs: Vec<(String, String)>,
    /// How this protocol carries the token, for a loop that sent none.
    pub how: &'static str,
    /// The session decision in words (`connect 10.0.0.5:5432 as app`), for
    /// the event (and a held request) when the first token makes it.
    pub connect: String,
}

/// Why the second factor did not let the loop through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondFactorError {
    /// No token, or a token that does not verify (HTTP 401, SQLSTATE 28P01).
    Invalid(Refusal),
    /// The token is valid and the session decision made with its subject
    /// refused the session (HTTP 403, SQLSTATE 28000).
    Refused(Refusal),
    /// The session belongs to another subject (a new connection is needed).
    SubjectChanged(Refusal),
}

/// Everything a protocol handler needs: see the module documentation.
pub struct Session {
    services: Arc<Services>,
    /// The session's row as it opened (events copy their identity from it).
    row: SessionRow,
    protocol: Protocol,
    exe: Option<String>,
    /// The target's configured address (TLS server name, `Host` checks).
    address: Option<TargetAddress>,
    /// The original destination: where the upstream connection goes.
    upstream: SocketAddr,
    /// The workload that requires a JWT, and its verifier.
    jwt: Option<(String, Arc<JwtVerifier>)>,
    /// The verified claims, once the session decision was made with them
    /// (reload re-checks read them through the session table).
    claims: Mutex<Option<Arc<Claims>>>,
    /// Why the session decision refused the session, once it did.
    denied: Mutex<Option<String>>,
    credential: Option<Arc<StoredCredential>>,
    capture: Option<Capture>,
    counters: Arc<Counters>,
    /// The loop's socket, watched for hang-ups while a request is held.
    client_fd: RawFd,
    /// Fires when a reload withdraws the permission or the agent stops.
    closed: CancellationToken,
}

/// What the proxy knows when it opens a session.
pub struct Opening {
    pub row: SessionRow,
    pub protocol: Protocol,
    pub exe: Option<String>,
    pub address: Option<TargetAddress>,
    pub upstream: SocketAddr,
    pub jwt: Option<(String, Arc<JwtVerifier>)>,
    pub credential: Option<Arc<StoredCredential>>,
    pub capture: Option<Capture>,
    pub counters: Arc<Counters>,
    pub client_fd: RawFd,
    pub closed: CancellationToken,
}

impl Session {
    pub fn new(services: Arc<Services>, o: Opening) -> Self {
        Session {
            services,
            row: o.row,
            protocol: o.protocol,
            exe: o.exe,
            address: o.address,
            upstream: o.upstream,
            jwt: o.jwt,
            claims: Mutex::new(None),
            denied: Mutex::new(None),
            credential: o.credential,
            capture: o.capture,
            counters: o.counters,
            client_fd: o.client_fd,
            closed: o.closed,
        }
    }

    pub fn id(&self) -> Uuid {
        self.row.session_id
    }

    pub fn workload(&self) -> &str {
        &self.row.workload
    }

    pub fn target(&self) -> &str {
        &self.row.target
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The row the session opened with (identity, destination).
    pub fn row(&self) -> &SessionRow {
        &self.row
    }

    pub fn address(&self) -> Option<&TargetAddress> {
        self.address.as_ref()
    }

    /// The names a loop may use for this target, for the certificates the
    /// agent answers with: its host name (if it has one), then the address
    /// the loop connected to.
    pub fn target_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Some(TargetAddress::Host { host, .. }) = self.address() {
            names.push(host.clone());
        }
        names.push(self.upstream.ip().to_string());
        names
    }

    /// Where upstream connections go (the loop's original destination).
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn connect_timeout(&self) -> Duration {
        self.services.connect_timeout
    }

    /// The target's stored credential, if it has one.
    pub fn credential(&self) -> Option<&StoredCredential> {
        self.credential.as_deref()
    }

    /// The same, shared (no copy of the secrets).
    pub fn shared_credential(&self) -> Option<Arc<StoredCredential>> {
        self.credential.clone()
    }

    pub fn masker(&self) -> &Arc<dyn Masker> {
        &self.services.masker
    }

    pub fn metrics(&self) -> &Metrics {
        &self.services.metrics
    }

    /// Payload capture, when this session's budget allows it.
    pub fn capture(&self) -> Option<Capture> {
        self.capture.clone()
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Fires when the session must close (a reload withdrew the permission,
    /// or the agent's shutdown grace period is over).
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// Whether the workload must present a JWT second factor.
    pub fn requires_second_factor(&self) -> bool {
        self.jwt.is_some()
    }

    /// The policy's workload selector that requires the JWT, if one does.
    pub fn second_factor_selector(&self) -> Option<&str> {
        self.jwt.as_ref().map(|(w, _)| w.as_str())
    }

    /// The verified JWT claims, once the second factor was checked.
    pub fn claims(&self) -> Option<Arc<Claims>> {
        self.claims.lock().ok().and_then(|g| g.clone())
    }

    /// Why the session decision refused the session (its outcome is then
    /// `denied`), once it did.
    pub fn denied(&self) -> Option<String> {
        self.denied.lock().ok().and_then(|g| g.clone())
    }

    /// The policy request of this session for `op`.
    pub fn request<'a>(&'a self, claims: Option<&'a Claims>, op: Operation<'a>) -> Request<'a> {
        Request {
            workload: &self.row.workload,
            cgroup: &self.row.cgroup,
            uid: self.row.uid,
            exe: self.exe.as_deref(),
            target: &self.row.target,
            protocol: self.protocol,
            jwt: claims,
            op,
        }
    }

    /// Writes an event row.
    pub fn record(&self, e: Event) {
        record_event(&*self.services.audit, &self.row, e);
    }

    /// Counts and records a refusal made outside the policy (a second
    /// factor, a limit, a protocol check).
    pub fn refuse(&self, kind: EventKind, text: &str, r: &Refusal, attrs: Vec<(String, String)>) {
        self.services.metrics.decision("deny", &r.rule_id);
        self.record(Event {
            kind,
            text: text.to_owned(),
            verdict: Verdict::Deny,
            rule_id: r.rule_id.clone(),
            reason: r.reason.clone(),
            attrs,
        });
    }

    /// Checks the loop's JWT (`token`, as the protocol carries it) when its
    /// workload requires one. The first valid token makes the session
    /// decision with its subject; a later one must name the same subject.
    /// `Ok(None)`: no second factor is required.
    pub async fn second_factor(
        &self,
        token: Option<&str>,
        attempt: &Attempt,
    ) -> Result<Option<Arc<Claims>>, SecondFactorError> {
        let Some((wl, verifier)) = &self.jwt else {
            return Ok(None);
        };
        let verified = match token {
            None => Err(format!("workload {wl} requires a JWT: {}", attempt.how)),
            Some(t) => verifier.verify(t).await.map_err(|e| e.to_string()),
        };
        let claims = match verified {
            Ok(c) => Arc::new(c),
            Err(reason) => {
                let r = Refusal::new(format!("jwt:{wl}"), reason);
                self.refuse(attempt.kind, &attempt.text, &r, attempt.attrs.clone());
                return Err(SecondFactorError::Invalid(r));
            }
        };
        let mut attrs = attempt.attrs.clone();
        attrs.push(("jwt_sub".into(), claims.sub.clone()));
        match self.claims() {
            // The session decision, now that the identity is complete.
            None => {
                let text = format!("{} (jwt sub {})", attempt.connect, claims.sub);
                if let Err(r) = self
                    .decide_as(Some(&claims), Operation::Connect, &text, attrs)
                    .await
                {
                    if let Ok(mut d) = self.denied.lock() {
                        *d = Some(r.reason.clone());
                    }
                    return Err(SecondFactorError::Refused(r));
                }
                if let Ok(mut g) = self.claims.lock() {
                    *g = Some(claims.clone());
                }
                Ok(Some(claims))
            }
            Some(known) if known.sub != claims.sub => {
                let r = Refusal::new(
                    "jwt:subject-changed",
                    format!(
                        "this connection belongs to JWT subject {}; a token for {} needs a new connection",
                        known.sub, claims.sub
                    ),
                );
                self.refuse(attempt.kind, &attempt.text, &r, attrs);
                Err(SecondFactorError::SubjectChanged(r))
            }
            Some(_) => Ok(Some(claims)),
        }
    }

    /// Decides one operation with the session's verified claims (if any):
    /// evaluates, counts, records the event, and holds an `approve` until
    /// an approver decides, it times out, or the loop hangs up.
    pub async fn decide(
        &self,
        op: Operation<'_>,
        text: &str,
        attrs: Vec<(String, String)>,
    ) -> Result<Decision, Refusal> {
        let claims = self.claims();
        self.decide_as(claims.as_deref(), op, text, attrs).await
    }

    async fn decide_as(
        &self,
        claims: Option<&Claims>,
        op: Operation<'_>,
        text: &str,
        attrs: Vec<(String, String)>,
    ) -> Result<Decision, Refusal> {
        let req = self.request(claims, op);
        let decision = self.evaluate(&req);
        self.record(Event {
            kind: EventKind::Op(op.kind()),
            text: text.to_owned(),
            verdict: decision.verdict,
            rule_id: decision.rule_id.clone(),
            reason: decision.reason.clone(),
            attrs: attrs.clone(),
        });
        let refusal = match decision.verdict {
            Verdict::Allow | Verdict::Mask => None,
            Verdict::Deny => Some(decision.reason.clone()),
            Verdict::Approve => self.hold(&req, &decision, text, attrs, None).await,
        };
        match refusal {
            None => Ok(decision),
            Some(reason) => Err(Refusal {
                rule_id: decision.rule_id,
                reason,
            }),
        }
    }

    /// The policy in force now (a reload replaces it).
    pub fn policy_now(&self) -> Arc<crate::policy::Policy> {
        self.services.policy.current()
    }

    /// The policy's decision on `op`, counted but neither recorded nor held
    /// (a second look at an operation already judged, with more attributes).
    pub fn verdict(&self, op: Operation<'_>) -> Decision {
        let claims = self.claims();
        self.evaluate(&self.request(claims.as_deref(), op))
    }

    fn evaluate(&self, req: &Request<'_>) -> Decision {
        let s = &self.services;
        let decision = s.policy.current().evaluate(req, None);
        s.metrics
            .decision(decision.verdict.as_str(), &decision.rule_id);
        decision
    }

    /// Like [`Session::decide`], holding an `approve` verdict the same way,
    /// but records no event: the handler records the operation's one event
    /// when its result is known ([`Judged::event`]; a SQL statement's rows,
    /// duration and SQLSTATE).
    pub async fn judge(
        &self,
        op: Operation<'_>,
        text: &str,
        attrs: &[(String, String)],
        scope: Option<&str>,
    ) -> Judged {
        let claims = self.claims();
        let req = self.request(claims.as_deref(), op);
        let decision = self.evaluate(&req);
        let refused = match decision.verdict {
            Verdict::Allow | Verdict::Mask => None,
            Verdict::Deny => Some(decision.reason.clone()),
            Verdict::Approve => {
                self.hold(&req, &decision, text, attrs.to_vec(), scope)
                    .await
            }
        }
        .map(|reason| Refusal {
            rule_id: decision.rule_id.clone(),
            reason,
        });
        Judged { decision, refused }
    }

    /// Holds an `approve` decision: `None` when approved.
    async fn hold(
        &self,
        req: &Request<'_>,
        decision: &Decision,
        text: &str,
        attrs: Vec<(String, String)>,
        scope: Option<&str>,
    ) -> Option<String> {
        let s = &self.services;
        let spec = decision.approval.clone().unwrap_or(ApprovalSpec {
            approvers: Vec::new(),
            timeout: crate::policy::DEFAULT_APPROVAL_TIMEOUT,
            grant: Grant::Once,
        });
        let held = Held {
            approval_id: Uuid::now_v7(),
            session_id: self.row.session_id,
            workload: self.row.workload.clone(),
            target: self.row.target.clone(),
            rule_id: decision.rule_id.clone(),
            reason: decision.reason.clone(),
            request: text.to_owned(),
            pid: self.row.tgid,
            uid: self.row.uid,
            requested_at: String::new(),
            expires_at: String::new(),
            approvers: Vec::new(),
            jwt_subject: req.jwt_subject().map(str::to_owned),
            scope: scope.map(str::to_owned),
        };
        // Held requests end early when the loop hangs up (no grant is
        // created for a loop that is gone) or the agent shuts down.
        let cancel = s.abort.child_token();
        let request_fut = s.approvals.request(held, &spec, &cancel);
        tokio::pin!(request_fut);
        let mut hung_up = false;
        let outcome = loop {
            tokio::select! {
                o = &mut request_fut => break o,
                _ = client_hung_up(self.client_fd), if !hung_up => {
                    hung_up = true;
                    cancel.cancel();
                }
            }
        };
        match outcome {
            // The policy may have been reloaded while the request was held.
            Approval::Approved { .. }
                if s.policy.current().evaluate(req, None).verdict == Verdict::Deny =>
            {
                Some("approved, but a policy reload denied it meanwhile".into())
            }
            Approval::Approved { approver, reason } => {
                self.record(Event {
                    kind: EventKind::Approval,
                    text: text.to_owned(),
                    verdict: Verdict::Allow,
                    rule_id: decision.rule_id.clone(),
                    reason: format!("approved by {approver}: {reason}"),
                    attrs,
                });
                None
            }
            Approval::Denied { approver, reason } => {
                Some(format!("approval denied by {approver}: {reason}"))
            }
            Approval::TimedOut => Some(format!(
                "no approval within {}",
                humantime::format_duration(spec.timeout)
            )),
            Approval::Cancelled if hung_up => {
                Some("the loop hung up while its request was held".into())
            }
            Approval::Cancelled => Some("the agent shut down while the request was held".into()),
            Approval::TooManyPending { held } => Some(format!(
                "workload {} already has {held} requests held for approval (approvals.max_pending_per_workload)",
                self.row.workload
            )),
        }
    }

    /// Connects to the upstream (the loop's original destination), within
    /// the connect timeout.
    pub async fn connect_upstream(&self) -> Result<TcpStream, Outcome> {
        connect(self.upstream, self.services.connect_timeout).await
    }
}

/// Connects to `upstream` within `timeout`; the failure as an outcome.
pub async fn connect(upstream: SocketAddr, timeout: Duration) -> Result<TcpStream, Outcome> {
    match tokio::time::timeout(timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(Outcome::UpstreamUnreachable(format!(
            "connect {upstream}: {e}"
        ))),
        Err(_) => Err(Outcome::UpstreamUnreachable(format!(
            "connect {upstream}: timed out after {timeout:?}"
        ))),
    }
}

/// Writes an event row of the session `row` (strings from here on).
pub fn record_event(audit: &dyn AuditSink, row: &SessionRow, e: Event) {
    audit.record(Record::Event(EventRow {
        event_id: Uuid::now_v7(),
        session_id: row.session_id,
        ts: now_micros(),
        host: row.host.clone(),
        workload: row.workload.clone(),
        target: row.target.clone(),
        protocol: row.protocol.clone(),
        kind: e.kind.as_str().to_owned(),
        request: e.text,
        verdict: e.verdict.as_str().to_owned(),
        rule_id: e.rule_id,
        reason: e.reason,
        pid: row.tgid,
        uid: row.uid,
        attr_keys: e.attrs.iter().map(|(k, _)| k.clone()).collect(),
        attr_values: e.attrs.into_iter().map(|(_, v)| v).collect(),
    }));
}

/// The event of a session decision (`connect`) refused before the policy.
pub fn connect_refusal(text: &str, r: &Refusal) -> Event {
    Event {
        kind: EventKind::Op(OpKind::Connect),
        text: text.to_owned(),
        verdict: Verdict::Deny,
        rule_id: r.rule_id.clone(),
        reason: r.reason.clone(),
        attrs: Vec::new(),
    }
}

/// Resolves when the client hangs up (or the socket fails). Watches a
/// duplicate of the socket in tokio's (edge-triggered) epoll for
/// `EPOLLRDHUP`, which neither consumes the bytes the loop may already have
/// sent nor touches the readiness of the socket the relay uses.
async fn client_hung_up(fd: RawFd) {
    use std::os::fd::BorrowedFd;
    // SAFETY: the session keeps the loop's socket open while it decides.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let Ok(owned) = borrowed.try_clone_to_owned() else {
        return std::future::pending().await;
    };
    let Ok(afd) = crate::ebpf::register(owned) else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut g) = afd.readable().await else {
            return;
        };
        if g.ready().is_read_closed() {
            return;
        }
        // Data the loop sent early, not a hang-up: wait for the next edge.
        g.clear_ready();
    }
}
