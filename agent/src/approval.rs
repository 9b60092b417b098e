//! Just-in-time approvals: a request held by an `approve` decision waits here
//! until a named approver consents or refuses, or the timeout refuses it.
//!
//! Approvers are identified by the admin socket peer's uid (`SO_PEERCRED`),
//! mapped to a name by `[[approvers]]` in the agent config; nobody else can
//! decide. A grant can outlive the request (`grant = "10m"`: the same workload
//! × target × rule is approved for that long). Every request, decision,
//! approver and wait is recorded in the `approvals` table.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::{
    audit::{now_micros, timestamp, ApprovalRow, AuditSink, Record},
    policy::{ApprovalSpec, Grant},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    #[error("uid {0} is not an approver (see [[approvers]] in the agent config)")]
    NotApprover(u32),
    #[error("no pending approval {0}")]
    Unknown(Uuid),
    #[error("{0} may not decide a request made by their own uid")]
    OwnRequest(String),
    #[error("approval {0} timed out or was cancelled before the decision arrived")]
    TooLate(Uuid),
    #[error("{approver} may not decide {id}: rule {rule_id} names the approvers {allowed:?}")]
    NotAllowed {
        approver: String,
        id: Uuid,
        rule_id: String,
        allowed: Vec<String>,
    },
}

/// What is being held.
#[derive(Debug, Clone, Serialize)]
pub struct Held {
    pub approval_id: Uuid,
    pub session_id: Uuid,
    pub workload: String,
    pub target: String,
    pub rule_id: String,
    pub reason: String,
    pub request: String,
    pub pid: u32,
    pub uid: u32,
    pub requested_at: String,
    pub expires_at: String,
    pub approvers: Vec<String>,
    /// The verified JWT subject, when the loop presented one (the approver
    /// sees who; grants are per subject).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_subject: Option<String>,
    /// What a duration grant covers besides the rule (a SQL statement's
    /// fingerprint: statements of the same shape); `None`: the rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Approved {
        approver: String,
        reason: String,
    },
    Denied {
        approver: String,
        reason: String,
    },
    TimedOut,
    /// The agent is shutting down.
    Cancelled,
    /// The workload already has as many requests held as it may.
    TooManyPending {
        held: usize,
    },
}

/// (workload, target, rule, JWT subject, session for `grant = "session"`,
/// scope for a duration grant)
type GrantKey = (
    String,
    String,
    String,
    Option<String>,
    Option<Uuid>,
    Option<String>,
);

struct Pending {
    held: Held,
    spec: ApprovalSpec,
    tx: oneshot::Sender<Outcome>,
}

/// Tells approvers that a request is held (the webhooks of
/// `crate::notify`); implemented outside this module so that approvals do
/// not depend on how people are told.
pub trait Announce: Send + Sync {
    fn held(&self, h: &Held);
    /// Whether it would tell anyone at all.
    fn is_empty(&self) -> bool {
        false
    }
}

pub struct Approvals {
    approvers: HashMap<u32, String>,
    pending: Mutex<HashMap<Uuid, Pending>>,
    /// (workload, target, rule, subject, session) → (until, approver)
    grants: Mutex<HashMap<GrantKey, (Instant, String)>>,
    audit: Arc<dyn AuditSink>,
    host: String,
    metrics: Arc<crate::metrics::Metrics>,
    notifier: Option<Box<dyn Announce>>,
    /// Requests one workload may have held at once.
    max_pending_per_workload: usize,
}

/// The approval request as recorded.
fn row(
    h: &Held,
    version: u8,
    decided_at: i64,
    decision: &str,
    approver: &str,
    reason: &str,
    requested_at: i64,
) -> Record {
    Record::Approval(ApprovalRow {
        approval_id: h.approval_id,
        version,
        session_id: h.session_id,
        host: String::new(),
        workload: h.workload.clone(),
        target: h.target.clone(),
        rule_id: h.rule_id.clone(),
        request: h.request.clone(),
        requested_at,
        decided_at,
        decision: decision.to_owned(),
        approver: approver.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Withdraws a pending request whose caller went away (see `request`).
struct Withdraw<'a> {
    approvals: &'a Approvals,
    held: Option<Held>,
    requested_at: i64,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else { return };
        let was_pending = self
            .approvals
            .pending
            .lock()
            .map(|mut p| p.remove(&held.approval_id).is_some())
            .unwrap_or(false);
        let reason = if was_pending {
            "the session was closed before a decision"
        } else {
            // An approver's decision was sent, but the session closed before
            // it arrived: nothing was let through.
            "decided, but the session was closed before the decision reached it"
        };
        self.approvals.record(row(
            &held,
            2,
            now_micros(),
            "cancelled",
            "",
            reason,
            self.requested_at,
        ));
        tracing::info!(approval_id = %held.approval_id, "held request withdrawn: its session was closed");
    }
}

impl Approvals {
    pub fn new(
        approvers: HashMap<u32, String>,
        audit: Arc<dyn AuditSink>,
        host: String,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            approvers,
            pending: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashMap::new()),
            audit,
            host,
            metrics,
            notifier: None,
            max_pending_per_workload: 16,
        }
    }

    pub fn with_max_pending_per_workload(mut self, n: usize) -> Self {
        self.max_pending_per_workload = n.max(1);
        self
    }

    /// Announces held requests (webhooks: `crate::notify`).
    pub fn with_notifier(mut self, n: impl Announce + 'static) -> Self {
        self.notifier = (!n.is_empty()).then(|| Box::new(n) as Box<dyn Announce>);
        self
    }

    pub fn approver_name(&self, uid: u32) -> Option<&str> {
        self.approvers.get(&uid).map(String::as_str)
    }

    fn record(&self, mut rec: Record) {
        if let Record::Approval(a) = &mut rec {
            a.host = self.host.clone();
        }
        self.audit.record(rec);
    }

    /// Holds the caller until a decision, the timeout, or `cancel`.
    pub async fn request(
        &self,
        mut held: Held,
        spec: &ApprovalSpec,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Outcome {
        let key = (
            held.workload.clone(),
            held.target.clone(),
            held.rule_id.clone(),
            held.jwt_subject.clone(),
            None,
            held.scope.clone(),
        );
        let mut session_key = key.clone();
        session_key.4 = Some(held.session_id);
        session_key.5 = None;
        if let Some(approver) = self
            .active_grant(&key)
            .or_else(|| self.active_grant(&session_key))
        {
            return Outcome::Approved {
                approver: approver.clone(),
                reason: format!("within a grant by {approver}"),
            };
        }
        let held_now = self
            .pending
            .lock()
            .map(|p| {
                p.values()
                    .filter(|x| x.held.workload == held.workload)
                    .count()
            })
            .unwrap_or(0);
        if held_now >= self.max_pending_per_workload {
            tracing::warn!(workload = %held.workload, held = held_now, "approval request refused: too many held for this workload");
            return Outcome::TooManyPending { held: held_now };
        }
        let requested_at = now_micros();
        held.requested_at = timestamp(requested_at);
        held.expires_at = timestamp(requested_at + spec.timeout.as_micros() as i64);
        held.approvers = spec.approvers.clone();
        let id = held.approval_id;
        let (tx, rx) = oneshot::channel();
        self.record(row(&held, 1, 0, "pending", "", "", requested_at));
        tracing::warn!(approval_id = %id, workload = %held.workload, target = %held.target,
            rule = %held.rule_id, request = %held.request,
            "held for approval: `loopgate approvals approve {id}` or `loopgate approvals deny {id} --reason ...`");
        if let Some(n) = &self.notifier {
            n.held(&held);
        }
        if let Ok(mut p) = self.pending.lock() {
            p.insert(
                id,
                Pending {
                    held: held.clone(),
                    spec: spec.clone(),
                    tx,
                },
            );
        }
        // If the caller is dropped while waiting (its session was closed),
        // the request is withdrawn and recorded as cancelled.
        let mut guard = Withdraw {
            approvals: self,
            held: Some(held.clone()),
            requested_at,
        };
        let outcome = tokio::select! {
            r = rx => r.unwrap_or(Outcome::Cancelled),
            _ = tokio::time::sleep(spec.timeout) => Outcome::TimedOut,
            _ = cancel.cancelled() => Outcome::Cancelled,
        };
        guard.held = None;
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
        let decided_at = now_micros();
        let (decision, approver, reason) = match &outcome {
            Outcome::Approved { approver, reason } => {
                ("approved", approver.as_str(), reason.clone())
            }
            Outcome::Denied { approver, reason } => ("denied", approver.as_str(), reason.clone()),
            Outcome::TimedOut => (
                "timeout",
                "",
                format!(
                    "no decision within {}",
                    humantime::format_duration(spec.timeout)
                ),
            ),
            Outcome::Cancelled => (
                "cancelled",
                "",
                "the loop hung up or the agent shut down before a decision".to_owned(),
            ),
            Outcome::TooManyPending { .. } => ("refused", "", String::new()),
        };
        self.record(row(
            &held,
            2,
            decided_at,
            decision,
            approver,
            &reason,
            requested_at,
        ));
        tracing::info!(approval_id = %id, decision, approver, wait_ms = (decided_at - requested_at) / 1000, "approval decided");
        self.metrics
            .approval_waited(decision, (decided_at - requested_at) as f64 / 1e6);
        if let Outcome::Approved { approver, .. } = &outcome {
            let grant = match spec.grant {
                Grant::Once => None,
                Grant::For(d) => Some((key, Instant::now() + d)),
                // Until the session ends (`end_session`).
                Grant::Session => Some((
                    session_key,
                    Instant::now() + Duration::from_secs(366 * 86_400),
                )),
            };
            if let (Some((k, until)), Ok(mut g)) = (grant, self.grants.lock()) {
                g.insert(k, (until, approver.clone()));
            }
        }
        outcome
    }

    /// Drops the session's `grant = "session"` grants.
    pub fn end_session(&self, session_id: Uuid) {
        if let Ok(mut g) = self.grants.lock() {
            g.retain(|k, _| k.4 != Some(session_id));
        }
    }

    fn active_grant(&self, key: &GrantKey) -> Option<String> {
        let mut g = self.grants.lock().ok()?;
        match g.get(key) {
            Some((until, who)) if *until > Instant::now() => Some(who.clone()),
            Some(_) => {
                g.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn list(&self) -> Vec<Held> {
        let mut v: Vec<Held> = self
            .pending
            .lock()
            .map(|p| p.values().map(|x| x.held.clone()).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.requested_at.cmp(&b.requested_at));
        v
    }

    /// An approver (by uid) decides a pending request.
    pub fn decide(
        &self,
        id: Uuid,
        uid: u32,
        approve: bool,
        reason: String,
    ) -> Result<Held, ApprovalError> {
        let name = self
            .approver_name(uid)
            .ok_or(ApprovalError::NotApprover(uid))?
            .to_owned();
        self.decide_as(id, &name, approve, reason)
    }

    fn approver_uid(&self, name: &str) -> Option<u32> {
        self.approvers
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(u, _)| *u)
    }

    /// A named approver (already authenticated) decides a pending request.
    pub fn decide_as(
        &self,
        id: Uuid,
        name: &str,
        approve: bool,
        reason: String,
    ) -> Result<Held, ApprovalError> {
        let name = name.to_owned();
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| ApprovalError::Unknown(id))?;
        let p = pending.get(&id).ok_or(ApprovalError::Unknown(id))?;
        // A loop runs as some user; that user approving its own request would
        // make the approval meaningless.
        if self.approver_uid(&name) == Some(p.held.uid) {
            return Err(ApprovalError::OwnRequest(name));
        }
        if !p.spec.approvers.is_empty() && !p.spec.approvers.contains(&name) {
            return Err(ApprovalError::NotAllowed {
                approver: name,
                id,
                rule_id: p.held.rule_id.clone(),
                allowed: p.spec.approvers.clone(),
            });
        }
        let p = pending.remove(&id).ok_or(ApprovalError::Unknown(id))?;
        let outcome = if approve {
            Outcome::Approved {
                approver: name,
                reason,
            }
        } else {
            Outcome::Denied {
                approver: name,
                reason,
            }
        };
        if p.tx.send(outcome).is_err() {
            return Err(ApprovalError::TooLate(id));
        }
        Ok(p.held)
    }

    pub fn pending_count(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }
}

/// How long an approval waits, for messages.
pub fn describe_timeout(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditSink, SinkStats};
    use tokio_util::sync::CancellationToken;

    #[derive(Default)]
    struct Rows(Mutex<Vec<ApprovalRow>>);

    impl AuditSink for Rows {
        fn record(&self, rec: Record) {
            if let Record::Approval(a) = rec {
                self.0.lock().unwrap().push(a);
            }
        }
        fn stats(&self) -> SinkStats {
            SinkStats::default()
        }
    }

    fn approvals(rows: Arc<Rows>) -> Arc<Approvals> {
        Arc::new(
            Approvals::new(
                HashMap::from([(0, "root-operator".into()), (1001, "alice".into())]),
                rows,
                "h".into(),
                Arc::new(crate::metrics::Metrics::new()),
            )
            .with_max_pending_per_workload(2),
        )
    }

    fn held(session: Uuid) -> Held {
        Held {
            approval_id: Uuid::now_v7(),
            session_id: session,
            workload: "etl".into(),
            target: "db".into(),
            rule_id: "hold".into(),
            reason: "needs a human".into(),
            request: "connect 10.0.0.5:5432".into(),
            pid: 42,
            uid: 1001,
            requested_at: String::new(),
            expires_at: String::new(),
            approvers: Vec::new(),
            jwt_subject: None,
            scope: None,
        }
    }

    fn spec(grant: Grant, timeout_ms: u64) -> ApprovalSpec {
        ApprovalSpec {
            approvers: Vec::new(),
            timeout: Duration::from_millis(timeout_ms),
            grant,
        }
    }

    /// Waits until `n` requests are held.
    async fn held_now(a: &Approvals, n: usize) -> Vec<Held> {
        for _ in 0..500 {
            let l = a.list();
            if l.len() == n {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} held, want {n}", a.list().len());
    }

    #[tokio::test]
    async fn approvers_decide_and_grants_last_as_long_as_they_say() {
        let rows = Arc::new(Rows::default());
        let a = approvals(rows.clone());
        let cancel = CancellationToken::new();
        let session = Uuid::now_v7();
        // Once: approved, and the next identical request is held again.
        let once = spec(Grant::Once, 10_000);
        let (a2, c2) = (a.clone(), cancel.clone());
        let t = tokio::spawn(async move { a2.request(held(session), &once, &c2).await });
        let h = held_now(&a, 1).await;
        // The loop's own user may not approve its request (uid 1001 is alice).
        assert!(matches!(
            a.decide(h[0].approval_id, 1001, true, "mine".into()),
            Err(ApprovalError::OwnRequest(_))
        ));
        // Someone who is no approver at all may not either.
        assert!(matches!(
            a.decide(h[0].approval_id, 4242, true, "".into()),
            Err(ApprovalError::NotApprover(4242))
        ));
        a.decide(h[0].approval_id, 0, true, "ok".into()).unwrap();
        assert_eq!(
            t.await.unwrap(),
            Outcome::Approved {
                approver: "root-operator".into(),
                reason: "ok".into()
            }
        );
        let t = {
            let (a2, c2) = (a.clone(), cancel.clone());
            let s = spec(Grant::For(Duration::from_secs(600)), 10_000);
            tokio::spawn(async move { a2.request(held(session), &s, &c2).await })
        };
        let h = held_now(&a, 1).await;
        a.decide(h[0].approval_id, 0, true, "for ten minutes".into())
            .unwrap();
        t.await.unwrap();
        // Within the grant: no hold, whatever the session.
        let within = a
            .request(held(Uuid::now_v7()), &spec(Grant::Once, 10_000), &cancel)
            .await;
        assert_eq!(
            within,
            Outcome::Approved {
                approver: "root-operator".into(),
                reason: "within a grant by root-operator".into()
            }
        );
        // The rows: pending then approved, twice (the grant's use is no row).
        let decisions: Vec<String> = rows
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.decision.clone())
            .collect();
        assert_eq!(decisions, ["pending", "approved", "pending", "approved"]);
    }

    #[tokio::test]
    async fn session_grants_end_with_the_session() {
        let a = approvals(Arc::new(Rows::default()));
        let cancel = CancellationToken::new();
        let session = Uuid::now_v7();
        let (a2, c2) = (a.clone(), cancel.clone());
        let t = tokio::spawn(async move {
            a2.request(held(session), &spec(Grant::Session, 10_000), &c2)
                .await
        });
        let h = held_now(&a, 1).await;
        a.decide(h[0].approval_id, 0, true, "this session".into())
            .unwrap();
        t.await.unwrap();
        let again = a
            .request(held(session), &spec(Grant::Once, 10_000), &cancel)
            .await;
        assert!(matches!(again, Outcome::Approved { .. }));
        // Another session of the same workload is held.
        let other = a
            .request(held(Uuid::now_v7()), &spec(Grant::Once, 20), &cancel)
            .await;
        assert_eq!(other, Outcome::TimedOut);
        a.end_session(session);
        let after = a
            .request(held(session), &spec(Grant::Once, 20), &cancel)
            .await;
        assert_eq!(after, Outcome::TimedOut);
    }

    #[tokio::test]
    async fn named_approvers_timeouts_caps_and_cancellation() {
        let a = approvals(Arc::new(Rows::default()));
        let cancel = CancellationToken::new();
        // Only the rule's approvers may decide.
        let mut only_bob = spec(Grant::Once, 10_000);
        only_bob.approvers = vec!["bob".into()];
        let (a2, c2) = (a.clone(), cancel.clone());
        let t = tokio::spawn(async move { a2.request(held(Uuid::now_v7()), &only_bob, &c2).await });
        let h = held_now(&a, 1).await;
        assert!(matches!(
            a.decide(h[0].approval_id, 0, true, "".into()),
            Err(ApprovalError::NotAllowed { .. })
        ));
        // A second request fills the workload's cap of 2; a third is refused.
        let (a3, c3) = (a.clone(), cancel.clone());
        let t2 = tokio::spawn(async move {
            a3.request(held(Uuid::now_v7()), &spec(Grant::Once, 10_000), &c3)
                .await
        });
        held_now(&a, 2).await;
        let third = a
            .request(held(Uuid::now_v7()), &spec(Grant::Once, 10_000), &cancel)
            .await;
        assert_eq!(third, Outcome::TooManyPending { held: 2 });
        // The agent shuts down: both held requests end as cancelled.
        cancel.cancel();
        assert_eq!(t.await.unwrap(), Outcome::Cancelled);
        assert_eq!(t2.await.unwrap(), Outcome::Cancelled);
        assert_eq!(a.pending_count(), 0);
        // No decision in time.
        let fresh = CancellationToken::new();
        let out = a
            .request(held(Uuid::now_v7()), &spec(Grant::Once, 30), &fresh)
            .await;
        assert_eq!(out, Outcome::TimedOut);
    }
}
