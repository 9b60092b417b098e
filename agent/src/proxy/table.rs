//! Sessions in flight: for `loopgate status`, and re-checked when a reload
//! changes the policy.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc, Mutex},
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    identity::Claims,
    kinds::Protocol,
    policy::{Operation, Request, Verdict},
    session::Counters,
};

#[derive(Default)]
pub struct SessionTable {
    inner: Mutex<HashMap<Uuid, ActiveSession>>,
}

pub(super) struct ActiveSession {
    pub workload: String,
    pub cgroup: String,
    pub uid: u32,
    pub exe: Option<String>,
    pub target: String,
    pub protocol: Protocol,
    /// The verified JWT claims, once a handler made the session decision
    /// with them.
    pub claims: Arc<Mutex<Option<Arc<Claims>>>>,
    /// The session decision waits for the first JWT (a token-carrying
    /// handler, a workload that requires one).
    pub awaiting_jwt: bool,
    pub pid: u32,
    pub started_at: String,
    pub counters: Arc<Counters>,
    /// Cancelled when a policy reload withdraws the permission.
    pub revoke: CancellationToken,
    pub revoked: Arc<Mutex<Option<String>>>,
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
                protocol: s.protocol.as_str().to_owned(),
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
            let claims = s.claims.lock().ok().and_then(|g| g.clone());
            let r = Request {
                workload: &s.workload,
                cgroup: &s.cgroup,
                uid: s.uid,
                exe: s.exe.as_deref(),
                target: &s.target,
                protocol: s.protocol,
                jwt: claims.as_deref(),
                op: Operation::Connect,
            };
            let withdrawn = match (&claims, policy.jwt_required(&r)) {
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

    pub(super) fn insert(&self, id: Uuid, s: ActiveSession) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(id, s);
        }
    }

    pub(super) fn remove(&self, id: &Uuid) {
        if let Ok(mut m) = self.inner.lock() {
            m.remove(id);
        }
    }
}
