//! Prometheus metrics, served on the admin HTTP port at `/metrics`.

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    sessions: Family<Labels, Counter>,
    decisions: Family<Labels, Counter>,
    approval_wait: Family<Labels, Histogram>,
    spool_pending: Gauge,
    audit_failing: Gauge,
    sessions_open: Gauge,
    audit_dropped: Gauge,
    kernel: Family<Labels, Gauge>,
    pending_approvals: Gauge,
    http_responses: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("loopgate");
        let sessions = Family::<Labels, Counter>::default();
        registry.register(
            "sessions",
            "Sessions accepted by the proxy, by protocol and workload",
            sessions.clone(),
        );
        let decisions = Family::<Labels, Counter>::default();
        registry.register(
            "decisions",
            "Policy decisions, by verdict and rule",
            decisions.clone(),
        );
        let approval_wait = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.25, 2.0, 14))
        });
        registry.register(
            "approval_wait_seconds",
            "Time a request waited for an approval decision, by decision",
            approval_wait.clone(),
        );
        let spool_pending = Gauge::default();
        registry.register(
            "spool_pending_bytes",
            "Audit bytes in the spool not yet delivered to ClickHouse",
            spool_pending.clone(),
        );
        let audit_dropped = Gauge::default();
        registry.register(
            "audit_dropped_records",
            "Audit records dropped (queue full or spool write failure) since start",
            audit_dropped.clone(),
        );
        let audit_failing = Gauge::default();
        registry.register(
            "audit_failing",
            "1 while the audit spool cannot take records (disk full, queue full); the reason is in `loopgate status`",
            audit_failing.clone(),
        );
        let sessions_open = Gauge::default();
        registry.register(
            "sessions_open",
            "Sessions open now (capped by agent.max_sessions and the open-file limit)",
            sessions_open.clone(),
        );
        let kernel = Family::<Labels, Gauge>::default();
        registry.register(
            "kernel_connects",
            "Counters of the kernel programs (redirected, denied, ...), since the maps were created",
            kernel.clone(),
        );
        let pending_approvals = Gauge::default();
        registry.register(
            "approvals_pending",
            "Requests currently held for approval",
            pending_approvals.clone(),
        );
        let http_responses = Family::<Labels, Counter>::default();
        registry.register(
            "http_responses",
            "Upstream HTTP responses relayed to loops, by status code",
            http_responses.clone(),
        );
        Self {
            http_responses,
            registry,
            sessions,
            decisions,
            approval_wait,
            spool_pending,
            audit_dropped,
            audit_failing,
            sessions_open,
            kernel,
            pending_approvals,
        }
    }

    pub fn session(&self, protocol: &str, workload: &str) {
        self.sessions
            .get_or_create(&vec![
                ("protocol".into(), protocol.into()),
                ("workload".into(), workload.into()),
            ])
            .inc();
    }

    pub fn decision(&self, verdict: &str, rule: &str) {
        self.decisions
            .get_or_create(&vec![
                ("verdict".into(), verdict.into()),
                ("rule".into(), rule.into()),
            ])
            .inc();
    }

    pub fn http_response(&self, code: u16) {
        self.http_responses
            .get_or_create(&vec![("code".into(), code.to_string())])
            .inc();
    }

    pub fn approval_waited(&self, decision: &str, secs: f64) {
        self.approval_wait
            .get_or_create(&vec![("decision".into(), decision.into())])
            .observe(secs);
    }

    /// Values read at scrape time.
    pub fn set_gauges(
        &self,
        spool_pending: u64,
        audit_dropped: u64,
        pending_approvals: usize,
        kernel: &[(&str, u64)],
        audit_failing: bool,
        sessions_open: usize,
    ) {
        self.spool_pending.set(spool_pending as i64);
        self.audit_failing.set(audit_failing as i64);
        self.sessions_open.set(sessions_open as i64);
        self.audit_dropped.set(audit_dropped as i64);
        self.pending_approvals.set(pending_approvals as i64);
        for (name, v) in kernel {
            self.kernel
                .get_or_create(&vec![("counter".into(), (*name).into())])
                .set(*v as i64);
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }
}
