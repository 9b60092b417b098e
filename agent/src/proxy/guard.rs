//! The end of a session, whatever ends it: the closing row, the access-log
//! line, and the bookkeeping (session table, held approvals, the session
//! slot, the unused capture budget), written when the guard is dropped, as
//! ztunnel writes its connection result. A handler that panics or a task
//! that is dropped still closes its session (outcome `agent_error`).

use std::sync::{atomic::Ordering, Arc, Mutex};

use super::Proxy;
use crate::{
    audit::{now_micros, Record, SessionRow},
    kinds::Outcome,
    limits::Slot,
    session::Counters,
};

pub(super) struct Closing {
    proxy: Arc<Proxy>,
    row: SessionRow,
    counters: Arc<Counters>,
    span: tracing::Span,
    /// Set when the session ended normally.
    outcome: Option<Outcome>,
    /// A reload's reason for closing the session (it overrides the outcome).
    pub revoked: Arc<Mutex<Option<String>>>,
    pub slot: Option<Slot>,
    /// Capture budget reserved for the session (both directions).
    pub reserved: u64,
    pub per_direction: u64,
}

impl Closing {
    pub fn new(
        proxy: Arc<Proxy>,
        row: SessionRow,
        counters: Arc<Counters>,
        span: tracing::Span,
    ) -> Self {
        Closing {
            proxy,
            row,
            counters,
            span,
            outcome: None,
            revoked: Arc::new(Mutex::new(None)),
            slot: None,
            reserved: 0,
            per_direction: 0,
        }
    }

    /// How the session ended.
    pub fn finish(mut self, out: Outcome) {
        self.outcome = Some(out);
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        let out = self.outcome.take().unwrap_or_else(|| {
            Outcome::AgentError("the session's handler ended without an outcome".into())
        });
        let out = match self.revoked.lock().ok().and_then(|r| r.clone()) {
            Some(reason) => Outcome::Revoked(reason),
            None => out,
        };
        let (up, down) = (
            self.counters.up.load(Ordering::Relaxed),
            self.counters.down.load(Ordering::Relaxed),
        );
        let id = self.row.session_id;
        self.proxy.sessions.remove(&id);
        self.proxy.services.approvals.end_session(id);
        drop(self.slot.take());
        let captured = up.min(self.per_direction) + down.min(self.per_direction);
        self.proxy
            .capture_budget
            .refund(&self.row.workload, self.reserved.saturating_sub(captured));
        let ended_at = now_micros();
        self.span.in_scope(|| {
            tracing::info!(
                outcome = out.as_str(),
                detail = out.detail(),
                bytes_up = up,
                bytes_down = down,
                duration_ms = (ended_at - self.row.started_at).max(0) / 1000,
                "session closed"
            )
        });
        let mut row = std::mem::take(&mut self.row);
        row.version = 2;
        row.ended_at = ended_at;
        row.bytes_up = up;
        row.bytes_down = down;
        row.outcome = out.as_str().to_owned();
        row.detail = out.detail().to_owned();
        self.proxy.services.audit.record(Record::Session(row));
    }
}
