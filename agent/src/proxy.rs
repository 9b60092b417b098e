//! The local proxy: accepts redirected connections, finds out who made them
//! and where they were going, and hands them to a protocol handler.
//!
//! Each accepted connection's peer address is the loop's own socket address,
//! which the kernel's sockops program used as the key of its record; the proxy
//! takes that record (identity + original destination) and deletes it. A
//! connection without a record (someone dialled the proxy port directly) is
//! closed at once.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use std::os::fd::{AsRawFd, RawFd};

use loopgate_common::ConnRecord;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    approval::{Approvals, Held, Outcome as ApprovalOutcome},
    audit::{micros, now_micros, timestamp, AuditSink, EventRow, Record, SessionRow},
    cgroup::WorkloadResolver,
    ebpf::{comm, original_destination, Kernel},
    policy::{store::PolicyStore, Request, Verdict},
    protocol::{
        http, postgres,
        tcp::{self, Capture, Counters},
    },
    secrets::Masker,
    targets::TargetTable,
};

pub struct Proxy {
    pub kernel: Arc<Kernel>,
    pub workloads: Arc<WorkloadResolver>,
    pub targets: Arc<TargetTable>,
    pub audit: Arc<dyn AuditSink>,
    pub policy: Arc<PolicyStore>,
    pub approvals: Arc<Approvals>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Payload bytes captured per session and direction (0: none).
    pub capture_bytes: u64,
    /// ... and per workload and hour.
    pub capture_budget: crate::limits::CaptureBudget,
    /// Open-session caps (per workload, in all).
    pub limits: Arc<crate::limits::SessionLimits>,
    /// `audit.on_failure = "refuse"`: no new session while the spool cannot
    /// take records.
    pub audit_refuse: bool,
    /// Raw TCP sessions idle this long are closed.
    pub tcp_idle_timeout: Duration,
    /// The resolver for tagged loops' DNS (egress deny/audit).
    pub dns: Option<Arc<crate::dns::Resolver>>,
    pub masker: Arc<dyn Masker>,
    /// Stored credentials, by target name.
    pub credentials: HashMap<String, crate::secrets::StoredCredential>,
    /// This host's name, in every audit row.
    pub host: String,
    pub sessions: SessionTable,
    pub connect_timeout: Duration,
    /// The agent's network namespace: redirect records from any other are void.
    pub netns_cookie: u64,
    /// Refusals of unidentified connections recorded in the current second
    /// (bounded, so a loop hammering the proxy port cannot flood the audit).
    pub unidentified: UnidentifiedLimiter,
    /// Stops accepting (graceful shutdown begins).
    pub stop_accepting: CancellationToken,
    /// Closes open sessions (the grace period is over).
    pub abort: CancellationToken,
    pub tracker: TaskTracker,
}

/// The policy request of a session's identity (no JWT subject, no request
/// attributes): handlers add theirs.
pub(crate) fn session_request<'a>(
    row: &'a SessionRow,
    exe: Option<&'a str>,
    kind: &'a str,
) -> Request<'a> {
    Request {
        workload: &row.workload,
        cgroup: &row.cgroup,
        uid: row.uid,
        exe,
        target: &row.target,
        protocol: &row.protocol,
        kind,
        jwt_subject: None,
        method: None,
        path: None,
    }
}

#[derive(Clone, Copy)]
enum Handler {
    Tcp,
    Http,
    Postgres,
    /// DNS over TCP to the agent's resolver: each query is judged by name.
    Dns,
}

/// At most [`UNIDENTIFIED_PER_SEC`] refusals of unidentified connections are
/// recorded per second; the rest are counted and logged once a second.
#[derive(Default)]
pub struct UnidentifiedLimiter {
    inner: Mutex<(u64, u32, u64)>,
}

pub const UNIDENTIFIED_PER_SEC: u32 = 50;

impl UnidentifiedLimiter {
    /// Whether this refusal is recorded; the number suppressed in the
    /// previous second when a new second starts.
    fn admit(&self) -> (bool, u64) {
        let now = crate::ebpf::ktime_now() / 1_000_000_000;
        let Ok(mut g) = self.inner.lock() else {
            return (false, 0);
        };
        let (sec, n, dropped) = &mut *g;
        let mut report = 0;
        if *sec != now {
            report = *dropped;
            *sec = now;
            *n = 0;
            *dropped = 0;
        }
        if *n < UNIDENTIFIED_PER_SEC {
            *n += 1;
            (true, report)
        } else {
            *dropped += 1;
            (false, report)
        }
    }
}

/// Why the proxy would not serve an accepted connection as anyone.
struct Unidentified {
    rule_id: &'static str,
    reason: String,
}

/// Sessions in flight, for `loopgate status`.
#[derive(Default)]
pub struct SessionTable {
    inner: Mutex<HashMap<Uuid, ActiveSession>>,
}

struct ActiveSession {
    workload: String,
    cgroup: String,
    uid: u32,
    exe: Option<String>,
    target: String,
    protocol: String,
    /// The verified JWT subject, once a handler made the session decision
    /// with it.
    jwt_subject: Arc<Mutex<Option<String>>>,
    /// The session decision waits for the first JWT (a token-carrying
    /// handler, a workload that requires one).
    awaiting_jwt: bool,
    pid: u32,
    started_at: String,
    counters: Arc<Counters>,
    /// Cancelled when a policy reload withdraws the permission.
    revoke: CancellationToken,
    revoked: Arc<Mutex<Option<String>>>,
}

#[derive(Debug, Serialize)]
pub struct ActiveSessionStatus {
    pub session_id: Uuid,
    pub workload: String,
    pub target: String,
    pub protocol: String,
    pub pid: u32,
    pub started_at: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl SessionTable {
    pub fn len(&self) -> usize {
        self.inner.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn list(&self) -> Vec<ActiveSessionStatus> {
        let Ok(m) = self.inner.lock() else {
            return Vec::new();
        };
        let mut v: Vec<_> = m
            .iter()
            .map(|(id, s)| ActiveSessionStatus {
                session_id: *id,
                workload: s.workload.clone(),
                target: s.target.clone(),
                protocol: s.protocol.clone(),
                pid: s.pid,
                started_at: s.started_at.clone(),
                bytes_up: s.counters.up.load(Ordering::Relaxed),
                bytes_down: s.counters.down.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        v
    }

    /// Re-checks open sessions against a new policy: a session whose
    /// workload × target is now denied is closed (outcome `revoked`).
    pub fn recheck(&self, policy: &crate::policy::Policy) -> usize {
        let Ok(m) = self.inner.lock() else { return 0 };
        let mut n = 0;
        for (id, s) in m.iter() {
            let subject = s.jwt_subject.lock().ok().and_then(|g| g.clone());
            let r = Request {
                workload: &s.workload,
                cgroup: &s.cgroup,
                uid: s.uid,
                exe: s.exe.as_deref(),
                target: &s.target,
                protocol: &s.protocol,
                kind: crate::policy::CONNECT,
                jwt_subject: subject.as_deref(),
                method: None,
                path: None,
            };
            let withdrawn = match (&subject, policy.jwt_required(&r)) {
                // No session decision yet: the first token makes it.
                (None, _) if s.awaiting_jwt => continue,
                // Opened without a token, and one is required now.
                (None, Some((wl, _))) => Some((
                    format!("jwt-required:{wl}"),
                    format!("workload {wl} now requires a JWT second factor"),
                )),
                _ => {
                    let d = policy.evaluate(&r, None);
                    (d.verdict == Verdict::Deny).then_some((d.rule_id, d.reason))
                }
            };
            if let Some((rule_id, reason)) = withdrawn {
                if let Ok(mut r) = s.revoked.lock() {
                    *r = Some(format!(
                        "permission withdrawn by a policy reload: rule {rule_id}: {reason}"
                    ));
                }
                tracing::warn!(session_id = %id, workload = %s.workload, target = %s.target, rule = %rule_id, "closing a session whose permission was withdrawn");
                s.revoke.cancel();
                n += 1;
            }
        }
        n
    }

    fn insert(&self, id: Uuid, s: ActiveSession) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(id, s);
        }
    }

    fn remove(&self, id: &Uuid) {
        if let Ok(mut m) = self.inner.lock() {
            m.remove(id);
        }
    }
}

/// Resolves when the client hangs up (or the socket fails). Watches a
/// duplicate of the socket in tokio's (edge-triggered) epoll for
/// `EPOLLRDHUP`, which neither consumes the bytes the loop may already have
/// sent nor touches the readiness of the socket the relay uses.
async fn client_hung_up(fd: RawFd) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: dup(2) of a socket the caller keeps open; the copy is ours.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return std::future::pending().await;
    }
    // SAFETY: `dup` is a new descriptor owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
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

/// Accept backlog of both proxy listeners: a burst of loop connects must not
/// wait for SYN retransmits.
pub const BACKLOG: u32 = 4096;

/// Resolves once the session's byte counters have not moved for `limit`.
async fn idle_for(counters: &Counters, limit: Duration) -> Duration {
    let step = (limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let total = || counters.up.load(Ordering::Relaxed) + counters.down.load(Ordering::Relaxed);
    let mut last = total();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = total();
        if now != last {
            last = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= limit {
            return limit;
        }
    }
}

/// Binds the proxy listeners on 127.0.0.1 and ::1. Both are required: a
/// missing `[::1]` listener would leave IPv6 redirects to whoever binds it.
pub async fn bind(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let v4 = tokio::net::TcpSocket::new_v4().and_then(|s| {
        s.set_reuseaddr(true)?;
        s.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
        s.listen(BACKLOG)
    })?;
    let v6 = tokio::net::TcpSocket::new_v6()
        .and_then(|s| {
            socket2_v6only(&s)?;
            s.set_reuseaddr(true)?;
            s.bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)))?;
            s.listen(BACKLOG)
        })
        .map_err(|e| std::io::Error::new(e.kind(), format!("[::1]:{port}: {e}")))?;
    Ok(vec![v4, v6])
}

fn socket2_v6only(s: &tokio::net::TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a valid socket with an int option.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn event(
        &self,
        s: &SessionRow,
        kind: &str,
        request: &str,
        verdict: &str,
        rule_id: &str,
        reason: &str,
        attrs: Vec<(String, String)>,
    ) {
        self.audit.record(Record::Event(EventRow {
            event_id: Uuid::now_v7(),
            session_id: s.session_id,
            ts: now_micros(),
            host: s.host.clone(),
            workload: s.workload.clone(),
            target: s.target.clone(),
            protocol: s.protocol.clone(),
            kind: kind.to_owned(),
            request: request.to_owned(),
            verdict: verdict.to_owned(),
            rule_id: rule_id.to_owned(),
            reason: reason.to_owned(),
            pid: s.tgid,
            uid: s.uid,
            attr_keys: attrs.iter().map(|(k, _)| k.clone()).collect(),
            attr_values: attrs.into_iter().map(|(_, v)| v).collect(),
        }));
    }

    /// Makes one policy decision and records it: evaluates, counts, writes
    /// the `kind` event, and for `approve` holds the request until an approver
    /// decides, it times out, or the loop (socket `client_fd`) hangs up.
    /// `Ok` means go ahead; `Err` carries the refusal reason.
    pub(crate) async fn decide(
        &self,
        row: &SessionRow,
        req: &Request<'_>,
        request: &str,
        attrs: Vec<(String, String)>,
        client_fd: RawFd,
    ) -> Result<crate::policy::Decision, (crate::policy::Decision, String)> {
        let decision = self.policy.current().evaluate(req, None);
        self.metrics
            .decision(decision.verdict.as_str(), &decision.rule_id);
        self.event(
            row,
            req.kind,
            request,
            decision.verdict.as_str(),
            &decision.rule_id,
            &decision.reason,
            attrs.clone(),
        );
        let refusal = match decision.verdict {
            Verdict::Allow | Verdict::Mask => None,
            Verdict::Deny => Some(decision.reason.clone()),
            Verdict::Approve => {
                let spec = decision
                    .approval
                    .clone()
                    .unwrap_or(crate::policy::ApprovalSpec {
                        approvers: Vec::new(),
                        timeout: crate::policy::DEFAULT_APPROVAL_TIMEOUT,
                        grant: crate::policy::Grant::Once,
                    });
                let held = Held {
                    approval_id: Uuid::now_v7(),
                    session_id: row.session_id,
                    workload: row.workload.clone(),
                    target: row.target.clone(),
                    rule_id: decision.rule_id.clone(),
                    reason: decision.reason.clone(),
                    request: request.to_owned(),
                    pid: row.tgid,
                    uid: row.uid,
                    requested_at: String::new(),
                    expires_at: String::new(),
                    approvers: Vec::new(),
                    jwt_subject: req.jwt_subject.map(str::to_owned),
                };
                // Held requests end early when the loop hangs up (no grant is
                // created for a loop that is gone) or the agent shuts down.
                let cancel = self.abort.child_token();
                let request_fut = self.approvals.request(held, &spec, &cancel);
                tokio::pin!(request_fut);
                let mut hung_up = false;
                let outcome = loop {
                    tokio::select! {
                        o = &mut request_fut => break o,
                        _ = client_hung_up(client_fd), if !hung_up => {
                            hung_up = true;
                            cancel.cancel();
                        }
                    }
                };
                match outcome {
                    // The policy may have been reloaded while the request was held.
                    ApprovalOutcome::Approved { .. }
                        if self.policy.current().evaluate(req, None).verdict == Verdict::Deny =>
                    {
                        Some("approved, but a policy reload denied it meanwhile".into())
                    }
                    ApprovalOutcome::Approved { approver, reason } => {
                        self.event(
                            row,
                            "approval",
                            request,
                            "allow",
                            &decision.rule_id,
                            &format!("approved by {approver}: {reason}"),
                            attrs,
                        );
                        None
                    }
                    ApprovalOutcome::Denied { approver, reason } => {
                        Some(format!("approval denied by {approver}: {reason}"))
                    }
                    ApprovalOutcome::TimedOut => Some(format!(
                        "no approval within {}",
                        humantime::format_duration(spec.timeout)
                    )),
                    ApprovalOutcome::Cancelled if hung_up => {
                        Some("the loop hung up while its request was held".into())
                    }
                    ApprovalOutcome::Cancelled => {
                        Some("the agent shut down while the request was held".into())
                    }
                    ApprovalOutcome::TooManyPending { held } => Some(format!(
                        "workload {} already has {held} requests held for approval (approvals.max_pending_per_workload)",
                        row.workload
                    )),
                }
            }
        };
        match refusal {
            None => Ok(decision),
            Some(r) => Err((decision, r)),
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let local = listener.local_addr().ok();
        loop {
            let accepted = tokio::select! {
                _ = self.stop_accepting.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((sock, peer)) => {
                    let this = self.clone();
                    self.tracker
                        .spawn(async move { this.handle(sock, peer).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = ?local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tracing::debug!(listener = ?local, "stopped accepting");
    }

    /// The kernel's record of the loop socket behind an accepted connection,
    /// or why there is none. The record is keyed by the full 4-tuple and
    /// this namespace (a record from another namespace is never found), must be younger than the connect timeout, and must
    /// belong to the very socket at the other end (sock_diag cookie check).
    fn identify(&self, peer: SocketAddr, local: SocketAddr) -> Result<ConnRecord, Unidentified> {
        let Some(rec) = self.kernel.take_flow(peer, local, self.netns_cookie) else {
            return Err(Unidentified {
                rule_id: "identity:no-record",
                reason: "no redirect record for this connection: only a tagged loop's redirected connect is served".into(),
            });
        };
        let age = Duration::from_nanos(crate::ebpf::ktime_now().saturating_sub(rec.ktime_ns));
        if age > self.connect_timeout.max(Duration::from_secs(1)) {
            return Err(Unidentified {
                rule_id: "identity:stale",
                reason: format!(
                    "the redirect record is {} ms old, older than the connect timeout",
                    age.as_millis()
                ),
            });
        }
        match crate::sockdiag::peer_is(peer, local, rec.socket_cookie) {
            Ok(true) => Ok(rec),
            Ok(false) => Err(Unidentified {
                rule_id: "identity:peer",
                reason: "the redirect record belongs to another socket than this connection's peer"
                    .into(),
            }),
            Err(e) => Err(Unidentified {
                rule_id: "identity:peer",
                reason: format!(
                    "cannot check that the redirect record belongs to the peer socket: {e}"
                ),
            }),
        }
    }

    /// Records (rate-limited) and logs a connection served as no one.
    fn refuse_unidentified(&self, peer: SocketAddr, local: SocketAddr, why: Unidentified) {
        self.metrics.decision("deny", why.rule_id);
        let (record, suppressed) = self.unidentified.admit();
        if suppressed > 0 {
            tracing::warn!(
                suppressed,
                "more unidentified connections were refused than are recorded per second"
            );
        }
        tracing::warn!(%peer, rule = why.rule_id, reason = %why.reason, "connection to the proxy refused");
        if !record {
            return;
        }
        let now = now_micros();
        let session_id = Uuid::now_v7();
        let row = SessionRow {
            session_id,
            version: 2,
            host: self.host.clone(),
            workload: "(unidentified)".into(),
            cgroup: String::new(),
            target: "(proxy)".into(),
            protocol: "tcp".into(),
            destination: local.to_string(),
            pid: 0,
            tgid: 0,
            uid: 0,
            gid: 0,
            comm: String::new(),
            cgroup_id: 0,
            netns_cookie: self.netns_cookie,
            started_at: now,
            ended_at: now,
            bytes_up: 0,
            bytes_down: 0,
            outcome: "denied".into(),
            detail: why.reason.clone(),
        };
        self.event(
            &row,
            "connect",
            &format!("connect {local} from {peer}"),
            "deny",
            why.rule_id,
            &why.reason,
            Vec::new(),
        );
        self.audit.record(Record::Session(row));
    }

    async fn handle(self: Arc<Self>, sock: TcpStream, peer: SocketAddr) {
        let local = match sock.local_addr() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "accepted socket without a local address; closing");
                return;
            }
        };
        let rec = match self.identify(peer, local) {
            Ok(rec) => rec,
            Err(why) => {
                let _ = sock.set_zero_linger();
                drop(sock);
                self.refuse_unidentified(peer, local, why);
                return;
            }
        };
        let destination = original_destination(&rec);
        let wl = self.workloads.resolve(&crate::ebpf::cgroup_ids(&rec));
        let (workload, cgroup) = match wl {
            Some(w) => (w.workload, w.cgroup),
            None => (format!("(cgroup {})", rec.cgroup_id), String::new()),
        };
        let (target, protocol) = match self.targets.get(rec.target_id) {
            Some((name, p)) => (name.to_owned(), p.as_str()),
            None if rec.target_id == loopgate_common::TARGET_ID_DNS => ("(dns)".to_owned(), "dns"),
            None => ("(egress)".to_owned(), "tcp"),
        };
        let session_id = Uuid::now_v7();
        let started_at = micros(crate::ebpf::ktime_to_system(rec.ktime_ns));
        let counters = Arc::new(Counters::default());
        let span = tracing::info_span!("session", id = %session_id, %workload, %target);
        let mut row = SessionRow {
            session_id,
            version: 1,
            host: self.host.clone(),
            workload: workload.clone(),
            cgroup,
            target: target.clone(),
            protocol: protocol.to_owned(),
            destination: destination.to_string(),
            pid: rec.pid,
            tgid: rec.tgid,
            uid: rec.uid,
            gid: rec.gid,
            comm: comm(&rec),
            cgroup_id: rec.cgroup_id,
            netns_cookie: rec.netns_cookie,
            started_at,
            ended_at: 0,
            bytes_up: 0,
            bytes_down: 0,
            outcome: "open".into(),
            detail: String::new(),
        };
        self.audit.record(Record::Session(row.clone()));

        // L4 policy: this workload × this target, at connect time.
        let policy = self.policy.current();
        // The executable the kernel saw the process exec (never /proc at
        // accept time, which races with exec and exit).
        let exe = policy
            .needs_exe
            .then(|| self.kernel.exe_path(&rec.exe))
            .flatten();
        let exe_unknown = policy.needs_exe && exe.is_none();
        let l4 = session_request(&row, exe.as_deref(), crate::policy::CONNECT);
        // A workload that requires the JWT second factor is decided when the
        // token arrives, by a handler whose protocol carries one (HTTP). Raw
        // TCP carries none: such a loop is refused rather than let through on
        // the first factor alone.
        let jwt = policy.jwt_required(&l4).map(|(w, v)| (w.to_owned(), v));
        // Targets whose requests the agent cannot see yet (every handler but
        // HTTP): request rules that deny or hold could not be enforced, so
        // the session is refused.
        let unseen_request_rule = (protocol != "http")
            .then(|| policy.request_rule(&l4))
            .flatten();
        drop(policy);
        let handler = match protocol {
            "http" => Handler::Http,
            "postgres" => Handler::Postgres,
            "dns" if self.dns.is_some() => Handler::Dns,
            _ => Handler::Tcp,
        };
        self.metrics.session(protocol, &row.workload);
        // What one loop may take of the agent, and strict recording.
        let (slot, over_limit) = match self.limits.acquire(&row.workload) {
            Ok(s) => (Some(s), None),
            Err(full) => (None, Some(full.to_string())),
        };
        let audit_failing = self
            .audit_refuse
            .then(|| self.audit.failing())
            .flatten()
            .map(|why| {
                format!(
                    "{why}; audit.on_failure = \"refuse\" refuses new sessions until it recovers"
                )
            });
        let request = format!("connect {destination}");
        let client_fd = sock.as_raw_fd();
        // A refusal made here, before any policy evaluation: counted and recorded.
        let refuse = |rule_id: String, reason: String| {
            self.metrics.decision("deny", &rule_id);
            self.event(
                &row,
                "connect",
                &request,
                "deny",
                &rule_id,
                &reason,
                Vec::new(),
            );
            Some(reason)
        };
        // Refusals made before the policy, first match wins. The stored
        // credential goes only to the real server: a listener that a tagged
        // loop owns at the target's address (bound before it became a
        // target, or before the agent started) gets nothing; that lookup is
        // made only when nothing earlier refused.
        let injects = !matches!(handler, Handler::Tcp)
            && self
                .credentials
                .get(&row.target)
                .is_some_and(|c| c.password.is_some() || c.authorization.is_some());
        let early: Option<(&str, String)> = if exe_unknown {
            Some(("identity:exe", "policies select workloads by executable, and the kernel did not see this process's exec (it started before the agent first attached, or its path is longer than 255 bytes)".into()))
        } else if let Some(r) = over_limit {
            Some(("limit:sessions", r))
        } else if let Some(r) = audit_failing {
            Some(("audit:failing", r))
        } else if injects && !matches!(handler, Handler::Dns) {
            match crate::sockdiag::listener_cgroup(destination) {
                Ok(Some(cg)) if self.workloads.is_tagged(cg) => Some(("listener:tagged", format!(
                    "the listener at {destination} belongs to a tagged loop (cgroup {cg}); the stored credential is not sent to it"
                ))),
                Ok(_) => None,
                Err(e) => Some(("listener:tagged", format!(
                    "cannot check who listens at {destination}: {e}"
                ))),
            }
        } else {
            None
        };
        let refusal = match (&jwt, handler) {
            _ if early.is_some() => {
                let (rule_id, reason) = early.unwrap_or_default();
                refuse(rule_id.into(), reason)
            }
            (_, Handler::Dns) => None,
            _ if unseen_request_rule.is_some() => {
                let rule_id = unseen_request_rule.unwrap_or_default();
                let reason = format!(
                    "rule {rule_id} decides {protocol} requests, which loopgate cannot inspect on this target yet; the session is refused rather than let through unchecked"
                );
                refuse(rule_id, reason)
            }
            (Some(_), Handler::Http | Handler::Postgres) => None,
            (Some((wl, _)), Handler::Tcp) => refuse(
                format!("jwt-required:{wl}"),
                format!(
                    "workload {wl} requires a JWT second factor, and a {protocol} connection carries none"
                ),
            ),
            (None, _) => self
                .decide(&row, &l4, &request, Vec::new(), client_fd)
                .await
                .err()
                .map(|(_, reason)| reason),
        };
        if let Some(reason) = refusal {
            tracing::info!(%session_id, workload = %row.workload, target = %row.target, %reason, "connection refused by policy");
            // A reset tells the loop at once that the connection is refused.
            let _ = sock.set_zero_linger();
            drop(sock);
            row.version = 2;
            row.ended_at = now_micros();
            row.outcome = "denied".into();
            row.detail = reason;
            self.audit.record(Record::Session(row));
            return;
        }
        let revoke = self.abort.child_token();
        let revoked = Arc::new(Mutex::new(None));
        let jwt_subject = Arc::new(Mutex::new(None));
        self.sessions.insert(
            session_id,
            ActiveSession {
                workload,
                cgroup: row.cgroup.clone(),
                uid: rec.uid,
                exe: exe.clone(),
                target,
                protocol: protocol.to_owned(),
                jwt_subject: jwt_subject.clone(),
                awaiting_jwt: jwt.is_some(),
                pid: rec.tgid,
                started_at: timestamp(started_at),
                counters: counters.clone(),
                revoke: revoke.clone(),
                revoked: revoked.clone(),
            },
        );
        // Capture what the workload's hourly budget still allows (both
        // directions); what goes unused is given back at the end.
        let reserved = self
            .capture_budget
            .reserve(&row.workload, self.capture_bytes.saturating_mul(2));
        let per_direction = reserved / 2;
        let capture = (per_direction > 0).then(|| Capture {
            session_id,
            sink: self.audit.clone(),
            limit: per_direction,
            masker: self.masker.clone(),
        });
        let out = match handler {
            Handler::Tcp => {
                let relay = tcp::relay(
                    sock,
                    destination,
                    self.connect_timeout,
                    counters.clone(),
                    capture,
                    revoke,
                )
                .instrument(span.clone());
                tokio::select! {
                    out = relay => out,
                    idle = idle_for(&counters, self.tcp_idle_timeout) => tcp::Outcome {
                        outcome: "idle_timeout",
                        detail: Some(format!(
                            "no bytes either way for {} s (agent.tcp_idle_timeout_secs)",
                            idle.as_secs()
                        )),
                    },
                }
            }
            Handler::Dns => {
                let who = crate::dns::Asker {
                    workload: row.workload.clone(),
                    cgroup: row.cgroup.clone(),
                    cgroup_id: row.cgroup_id,
                    pid: row.tgid,
                    uid: row.uid,
                    gid: row.gid,
                    comm: row.comm.clone(),
                    netns_cookie: row.netns_cookie,
                    session_id: Some(session_id),
                };
                match &self.dns {
                    Some(r) => {
                        crate::dns::serve_tcp(r.clone(), sock, who, counters.clone())
                            .instrument(span.clone())
                            .await
                    }
                    None => tcp::Outcome {
                        outcome: "client_error",
                        detail: Some("no DNS resolver".into()),
                    },
                }
            }
            Handler::Http => {
                let authorization = self.credentials.get(&row.target).and_then(|c| {
                    let s = c.authorization.as_ref()?;
                    let mut v = hyper::header::HeaderValue::from_str(s.expose()).ok()?;
                    v.set_sensitive(true);
                    Some(v)
                });
                let s = Arc::new(http::Session::new(
                    self.clone(),
                    row.clone(),
                    self.targets.address(rec.target_id).cloned(),
                    exe,
                    jwt,
                    jwt_subject,
                    destination,
                    authorization,
                    capture,
                    self.connect_timeout,
                    client_fd,
                ));
                http::serve(s, sock, counters.clone(), revoke)
                    .instrument(span.clone())
                    .await
            }
            Handler::Postgres => {
                let s = postgres::Session {
                    proxy: self.clone(),
                    row: row.clone(),
                    address: self.targets.address(rec.target_id).cloned(),
                    exe,
                    jwt,
                    subject: jwt_subject,
                    upstream: destination,
                    credential: self
                        .credentials
                        .get(&row.target)
                        .cloned()
                        .unwrap_or_default(),
                    capture,
                    connect_timeout: self.connect_timeout,
                    client_fd,
                };
                postgres::serve(s, sock, counters.clone(), revoke)
                    .instrument(span.clone())
                    .await
            }
        };
        let out = match revoked.lock().ok().and_then(|r| r.clone()) {
            Some(reason) => tcp::Outcome {
                outcome: "revoked",
                detail: Some(reason),
            },
            None => out,
        };
        let (up, down) = (
            counters.up.load(Ordering::Relaxed),
            counters.down.load(Ordering::Relaxed),
        );
        self.sessions.remove(&session_id);
        self.approvals.end_session(session_id);
        drop(slot);
        let captured = up.min(per_direction) + down.min(per_direction);
        self.capture_budget
            .refund(&row.workload, reserved.saturating_sub(captured));
        let ended_at = now_micros();
        span.in_scope(|| {
            tracing::info!(
                outcome = out.outcome,
                detail = out.detail.as_deref().unwrap_or(""),
                bytes_up = up,
                bytes_down = down,
                duration_ms = (ended_at - started_at).max(0) / 1000,
                "session closed"
            )
        });
        row.version = 2;
        row.ended_at = ended_at;
        row.bytes_up = up;
        row.bytes_down = down;
        row.outcome = out.outcome.to_owned();
        row.detail = out.detail.unwrap_or_default();
        self.audit.record(Record::Session(row));
    }
}
