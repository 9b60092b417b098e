//! The admin socket's answers: `status`, and the approvals list and
//! decisions.

use std::{path::PathBuf, sync::Arc, time::Instant};

use crate::{
    admin,
    approval::Approvals,
    audit::{AuditSink, Recorder},
    config::Config,
    ebpf::Kernel,
    policy::store::PolicyStore,
    proxy::Proxy,
};

pub(super) struct Status {
    pub started: Instant,
    pub policy: Arc<PolicyStore>,
    pub approvals: Arc<Approvals>,
    pub cfg: Config,
    pub mount: PathBuf,
    pub kernel: Arc<Kernel>,
    pub proxy: Arc<Proxy>,
    pub audit: Arc<Recorder>,
    pub listeners: Vec<String>,
}

impl admin::Handler for Status {
    fn is_approver(&self, uid: u32) -> bool {
        self.approvals.approver_name(uid).is_some()
    }

    fn handle(&self, req: admin::Request, caller: admin::Caller) -> serde_json::Value {
        let err = |m: String| serde_json::json!({ "error": m });
        match req {
            admin::Request::Status if caller.admin => self.status(),
            admin::Request::Status => err(format!(
                "permission denied: uid {} is an approver, not an administrator",
                caller.uid
            )),
            admin::Request::ApprovalsList => {
                serde_json::json!({ "pending": self.approvals.list() })
            }
            admin::Request::ApprovalsDecide {
                id,
                approve,
                reason,
            } => match self.approvals.decide(id, caller.uid, approve, reason) {
                Ok(held) => serde_json::json!({ "decided": held, "approved": approve }),
                Err(e) => {
                    tracing::warn!(uid = caller.uid, pid = ?caller.pid, error = %e, "approval decision refused");
                    err(e.to_string())
                }
            },
        }
    }
}

impl Status {
    fn status(&self) -> serde_json::Value {
        // One look at the spool directory per status.
        let audit = self.audit.stats();
        let stats: serde_json::Map<String, serde_json::Value> = self
            .kernel
            .stats()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "cgroup2_mount": self.mount.display().to_string(),
            "cgroup_root": self.mount.join(self.cfg.agent.cgroup_root.trim_matches('/')).display().to_string(),
            "pin_dir": self.kernel.pin_dir.display().to_string(),
            "proxy_listeners": self.listeners,
            "egress": self.cfg.agent.egress.as_str(),
            "programs": self.kernel.attached,
            "targets": self.proxy.targets.status(),
            "workloads": self.cfg.workloads.iter().map(|w| serde_json::json!({"name": w.name, "cgroup": w.cgroup})).collect::<Vec<_>>(),
            "active_sessions": self.proxy.sessions.len(),
            "sessions": self.proxy.sessions.list(),
            "kernel_counters": stats,
            "spool_depth": audit.spool_pending_bytes,
            "audit": audit,
            "policy": self.policy.status(),
            "approvals_pending": self.approvals.pending_count(),
        })
    }
}
