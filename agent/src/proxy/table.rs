//! Sessions in flight: for `loopgate status`, and re-checked when a reload
//! changes the policy.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc, Mutex},
};

use serde::Serialize;
use uuid::Uuid;

use crate::{
    audit::timestamp,
    policy::{Operation, Verdict},
    session::Session,
};

#[derive(Default)]
pub struct SessionTable {
    inner: Mutex<HashMap<Uuid, ActiveSession>>,
}

pub(super) struct ActiveSession {
    /// Who, where to, the verified claims, the counters and the close
    /// token: all read from the session itself.
    pub session: Arc<Session>,
    /// A reload's reason for closing it (read by the closing row's guard).
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
            .map(|(id, a)| {
                let row = a.session.row();
                let counters = a.session.counters();
                ActiveSessionStatus {
                    session_id: *id,
                    workload: row.workload.clone(),
                    target: row.target.clone(),
                    protocol: row.protocol.clone(),
                    pid: row.tgid,
                    started_at: timestamp(row.started_at),
                    bytes_up: counters.up.load(Ordering::Relaxed),
                    bytes_down: counters.down.load(Ordering::Relaxed),
                }
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
        for (id, a) in m.iter() {
            let s = &a.session;
            let claims = s.claims();
            let r = s.request(claims.as_deref(), Operation::Connect);
            let withdrawn = match (&claims, policy.jwt_required(&r)) {
                // No session decision yet: the first token makes it.
                (None, _) if s.requires_second_factor() => continue,
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
                if let Ok(mut r) = a.revoked.lock() {
                    *r = Some(format!(
                        "permission withdrawn by a policy reload: rule {rule_id}: {reason}"
                    ));
                }
                tracing::warn!(session_id = %id, workload = %s.workload(), target = %s.target(), rule = %rule_id, "closing a session whose permission was withdrawn");
                s.closed().cancel();
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
