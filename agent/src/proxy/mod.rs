//! The local proxy: accepts redirected connections, finds out who made them
//! and where they were going, makes the refusals that come before any
//! protocol, and hands each session to its protocol handler.
//!
//! - [`identify`]: the kernel's redirect record of an accepted connection,
//!   bound to the socket at the other end (or a recorded refusal);
//! - this module: the listeners, the accept loop and the session's opening
//!   (its row, the refusals before the policy, the session decision);
//! - [`table`]: sessions in flight (`loopgate status`, reload re-checks);
//! - `guard`: the session's closing row, however it ends.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use std::os::fd::AsRawFd;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    audit::{micros, Record, SessionRow},
    cgroup::WorkloadResolver,
    ebpf::{comm, original_destination},
    kinds::{EventKind, OpKind, Outcome, Protocol, Refusal},
    policy::{Operation, Request},
    protocol::Registry,
    session::{Counters, Opening, Services, Session},
    targets::TargetTable,
};

mod guard;
pub mod identify;
pub mod table;
#[cfg(test)]
mod tests;

pub use identify::{Flows, UnidentifiedLimiter, UNIDENTIFIED_PER_SEC};
pub use table::{ActiveSessionStatus, SessionTable};

pub struct Proxy {
    /// What every session shares (policy, approvals, audit, metrics, ...).
    pub services: Arc<Services>,
    /// The kernel's records of redirected connections.
    pub flows: Arc<dyn Flows>,
    pub workloads: Arc<WorkloadResolver>,
    pub targets: Arc<TargetTable>,
    /// Protocol handlers.
    pub handlers: Registry,
    /// Payload bytes captured per session and direction (0: none).
    pub capture_bytes: u64,
    /// ... and per workload and hour.
    pub capture_budget: crate::limits::CaptureBudget,
    /// Open-session caps (per workload, in all).
    pub limits: Arc<crate::limits::SessionLimits>,
    /// `audit.on_failure = "refuse"`: no new session while the spool cannot
    /// take records.
    pub audit_refuse: bool,
    /// Stored credentials, by target name.
    pub credentials: HashMap<String, Arc<crate::secrets::StoredCredential>>,
    /// This host's name, in every audit row.
    pub host: String,
    pub sessions: SessionTable,
    /// The agent's network namespace: redirect records from any other are void.
    pub netns_cookie: u64,
    /// Refusals of unidentified connections recorded in the current second
    /// (bounded, so a loop hammering the proxy port cannot flood the audit).
    pub unidentified: UnidentifiedLimiter,
    /// Stops accepting (graceful shutdown begins).
    pub stop_accepting: CancellationToken,
    pub tracker: TaskTracker,
}

/// Accept backlog of both proxy listeners: a burst of loop connects must not
/// wait for SYN retransmits.
pub const BACKLOG: u32 = 4096;

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
    socket2::SockRef::from(s).set_only_v6(true)
}

impl Proxy {
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
                        .spawn(async move { this.handle(sock, peer, local).await });
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

    /// `listener`: the listener's own address, which every socket it
    /// accepts shares (it is bound to one address, not a wildcard), so no
    /// `getsockname` per connection.
    async fn handle(
        self: Arc<Self>,
        sock: TcpStream,
        peer: SocketAddr,
        listener: Option<SocketAddr>,
    ) {
        let local = match listener.map_or_else(|| sock.local_addr(), Ok) {
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
        let (workload, cgroup) = match self.workloads.resolve(&crate::ebpf::cgroup_ids(&rec)) {
            Some(w) => (w.workload, w.cgroup),
            None => (format!("(cgroup {})", rec.cgroup_id), String::new()),
        };
        let (target, protocol) = match self.targets.get(rec.target_id) {
            Some((name, p)) => (name.to_owned(), p),
            None if rec.target_id == loopgate_common::TARGET_ID_DNS => {
                ("(dns)".to_owned(), Protocol::Dns)
            }
            None => ("(egress)".to_owned(), Protocol::Tcp),
        };
        let handler = self.handlers.get(protocol).clone();
        let session_id = Uuid::now_v7();
        let started_at = micros(crate::ebpf::ktime_to_system(rec.ktime_ns));
        let counters = Arc::new(Counters::default());
        let span = tracing::info_span!("session", id = %session_id, %workload, %target);
        let row = SessionRow {
            session_id,
            version: 1,
            host: self.host.clone(),
            workload,
            cgroup,
            target,
            protocol: protocol.as_str().to_owned(),
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
        self.services.audit.record(Record::Session(row.clone()));
        // From here on, the guard writes the closing row however this ends.
        let mut closing =
            guard::Closing::new(self.clone(), row.clone(), counters.clone(), span.clone());

        // The identity's request at connect.
        let policy = self.services.policy.current();
        // The executable the kernel saw the process exec (never /proc at
        // accept time, which races with exec and exit).
        let exe = policy
            .needs_exe
            .then(|| self.flows.exe_path(&rec.exe))
            .flatten();
        let exe_unknown = policy.needs_exe && exe.is_none();
        let l4 = Request {
            workload: &row.workload,
            cgroup: &row.cgroup,
            uid: row.uid,
            exe: exe.as_deref(),
            target: &row.target,
            protocol,
            jwt: None,
            op: Operation::Connect,
        };
        // A workload that requires the JWT second factor is decided when the
        // token arrives, by a handler whose protocol carries one.
        let jwt = policy.jwt_required(&l4).map(|(w, v)| (w.to_owned(), v));
        // Rules that deny or hold operations a handler cannot see.
        let unseen_rule = (!handler.sees_requests())
            .then(|| policy.request_rule(&l4))
            .flatten();
        drop(policy);
        self.services
            .metrics
            .session(protocol.as_str(), &row.workload);
        // What one loop may take of the agent, and strict recording.
        let over_limit = match self.limits.acquire(&row.workload) {
            Ok(s) => {
                closing.slot = Some(s);
                None
            }
            Err(full) => Some(full.to_string()),
        };
        let credential = self.credentials.get(&row.target).cloned();
        // Capture what the workload's hourly budget still allows (both
        // directions); what goes unused is given back at the end.
        closing.reserved = self
            .capture_budget
            .reserve(&row.workload, self.capture_bytes.saturating_mul(2));
        closing.per_direction = closing.reserved / 2;
        let capture = (closing.per_direction > 0).then(|| crate::audit::capture::Capture {
            session_id,
            sink: self.services.audit.clone(),
            limit: closing.per_direction,
            masker: self.services.masker.clone(),
        });
        let session = Arc::new(Session::new(
            self.services.clone(),
            Opening {
                row: row.clone(),
                protocol,
                exe,
                address: self.targets.address(rec.target_id).cloned(),
                upstream: destination,
                jwt: jwt.clone(),
                credential: credential.clone(),
                capture,
                counters: counters.clone(),
                client_fd: sock.as_raw_fd(),
                closed: self.services.abort.child_token(),
            },
        ));

        // Refusals made before the policy, first match wins. The stored
        // credential goes only to the real server: a listener that a tagged
        // loop owns at the target's address (bound before it became a
        // target, or before the agent started) gets nothing; that lookup is
        // made only when nothing earlier refused.
        let sends_secret = handler.sends_credential()
            && credential
                .as_ref()
                .is_some_and(|c| c.password.is_some() || c.authorization.is_some());
        // A record names its target by id; its destination must be that
        // target's (a map entry recycled while it was read would pair one
        // target's id with another's address).
        let foreign = !matches!(protocol, Protocol::Dns)
            && rec.target_id != loopgate_common::TARGET_ID_EGRESS
            && !self.targets.owns(rec.target_id, destination);
        let early = if foreign {
            Some(Refusal::new(
                "identity:target",
                format!("the redirect record names target {} and its destination {destination} is not one of that target's addresses", row.target),
            ))
        } else if exe_unknown {
            Some(Refusal::new("identity:exe", "policies select workloads by executable, and the kernel did not see this process's exec (it started before the agent first attached, or its path is longer than 255 bytes)"))
        } else if let Some(r) = over_limit {
            Some(Refusal::new("limit:sessions", r))
        } else if let Some(why) = self
            .audit_refuse
            .then(|| self.services.audit.failing())
            .flatten()
        {
            Some(Refusal::new(
                "audit:failing",
                format!(
                    "{why}; audit.on_failure = \"refuse\" refuses new sessions until it recovers"
                ),
            ))
        } else if sends_secret {
            match self.flows.listener_cgroup(destination) {
                Ok(Some(cg)) if self.workloads.is_tagged(cg) => Some(Refusal::new("listener:tagged", format!(
                    "the listener at {destination} belongs to a tagged loop (cgroup {cg}); the stored credential is not sent to it"
                ))),
                Ok(_) => None,
                Err(e) => Some(Refusal::new("listener:tagged", format!(
                    "cannot check who listens at {destination}: {e}"
                ))),
            }
        } else {
            None
        };
        let request = format!("connect {destination}");
        let connect = EventKind::Op(OpKind::Connect);
        let refusal = if let Some(r) = early {
            session.refuse(connect, &request, &r, Vec::new());
            Some(r)
        } else if !handler.decided_at_connect() {
            None
        } else if let Some(rule_id) = unseen_rule {
            let r = Refusal {
                reason: format!(
                    "rule {rule_id} decides {protocol} requests, which loopgate cannot inspect on this target yet; the session is refused rather than let through unchecked"
                ),
                rule_id,
            };
            session.refuse(connect, &request, &r, Vec::new());
            Some(r)
        } else if let Some((wl, _)) = &jwt {
            if handler.carries_second_factor() {
                None
            } else {
                let r = Refusal::new(
                    format!("jwt-required:{wl}"),
                    format!(
                        "workload {wl} requires a JWT second factor, and a {protocol} connection carries none"
                    ),
                );
                session.refuse(connect, &request, &r, Vec::new());
                Some(r)
            }
        } else {
            session
                .decide(Operation::Connect, &request, Vec::new())
                .await
                .err()
        };
        if let Some(r) = refusal {
            tracing::info!(%session_id, workload = %row.workload, target = %row.target, reason = %r.reason, "connection refused by policy");
            // A reset tells the loop at once that the connection is refused.
            let _ = sock.set_zero_linger();
            drop(sock);
            closing.finish(Outcome::Denied(r.reason));
            return;
        }
        self.sessions.insert(
            session_id,
            table::ActiveSession {
                session: session.clone(),
                revoked: closing.revoked.clone(),
            },
        );
        let out = handler.serve(session, sock).instrument(span).await;
        closing.finish(out);
    }
}
