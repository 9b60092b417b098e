//! Who made an accepted connection: the kernel's redirect record, bound to
//! the very socket at the other end, or a refusal.
//!
//! The facts come from the kernel through [`Flows`] (the eBPF maps and
//! sock_diag in the agent; a fake in unit tests).

use std::{net::SocketAddr, sync::Mutex, time::Duration};

use loopgate_common::{ConnRecord, ExeKey};
use uuid::Uuid;

use super::Proxy;
use crate::{
    audit::{now_micros, Record, SessionRow},
    kinds::Refusal,
    session::{connect_refusal, record_event},
    sockdiag::DiagError,
};

/// The kernel facts the proxy decides identity on.
pub trait Flows: Send + Sync {
    /// Takes (looks up and deletes) the redirect record of an accepted
    /// connection (`peer`: the loop's socket address, `local`: the proxy
    /// listener's) in the namespace `netns_cookie`.
    fn take_flow(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        netns_cookie: u64,
    ) -> Option<ConnRecord>;
    /// The path the kernel saw the connection's process exec.
    fn exe_path(&self, key: &ExeKey) -> Option<String>;
    /// Whether the socket at `peer` (connected to `local`) has `cookie`.
    fn peer_is(&self, peer: SocketAddr, local: SocketAddr, cookie: u64) -> Result<bool, DiagError>;
    /// The cgroup of the listener a connection to `addr` would reach.
    fn listener_cgroup(&self, addr: SocketAddr) -> Result<Option<u64>, DiagError>;
}

impl Flows for crate::ebpf::Kernel {
    fn take_flow(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        netns_cookie: u64,
    ) -> Option<ConnRecord> {
        crate::ebpf::Kernel::take_flow(self, peer, local, netns_cookie)
    }

    fn exe_path(&self, key: &ExeKey) -> Option<String> {
        crate::ebpf::Kernel::exe_path(self, key)
    }

    fn peer_is(&self, peer: SocketAddr, local: SocketAddr, cookie: u64) -> Result<bool, DiagError> {
        crate::sockdiag::peer_is(peer, local, cookie)
    }

    fn listener_cgroup(&self, addr: SocketAddr) -> Result<Option<u64>, DiagError> {
        crate::sockdiag::listener_cgroup(addr)
    }
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

impl Proxy {
    /// The kernel's record of the loop socket behind an accepted connection,
    /// or why there is none. The record is keyed by the full 4-tuple and
    /// this namespace (a record from another namespace is never found),
    /// must be younger than the connect timeout, and must belong to the very
    /// socket at the other end (sock_diag cookie check).
    pub(super) fn identify(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<ConnRecord, Refusal> {
        let Some(rec) = self.flows.take_flow(peer, local, self.netns_cookie) else {
            return Err(Refusal::new(
                "identity:no-record",
                "no redirect record for this connection: only a tagged loop's redirected connect is served",
            ));
        };
        let age = Duration::from_nanos(crate::ebpf::ktime_now().saturating_sub(rec.ktime_ns));
        if age > self.services.connect_timeout.max(Duration::from_secs(1)) {
            return Err(Refusal::new(
                "identity:stale",
                format!(
                    "the redirect record is {} ms old, older than the connect timeout",
                    age.as_millis()
                ),
            ));
        }
        match self.flows.peer_is(peer, local, rec.socket_cookie) {
            Ok(true) => Ok(rec),
            Ok(false) => Err(Refusal::new(
                "identity:peer",
                "the redirect record belongs to another socket than this connection's peer",
            )),
            Err(e) => Err(Refusal::new(
                "identity:peer",
                format!("cannot check that the redirect record belongs to the peer socket: {e}"),
            )),
        }
    }

    /// Records (rate-limited) and logs a connection served as no one.
    pub(super) fn refuse_unidentified(&self, peer: SocketAddr, local: SocketAddr, why: Refusal) {
        self.services.metrics.decision("deny", &why.rule_id);
        let (record, suppressed) = self.unidentified.admit();
        if suppressed > 0 {
            tracing::warn!(
                suppressed,
                "more unidentified connections were refused than are recorded per second"
            );
        }
        tracing::warn!(%peer, rule = %why.rule_id, reason = %why.reason, "connection to the proxy refused");
        if !record {
            return;
        }
        let now = now_micros();
        let row = SessionRow {
            session_id: Uuid::now_v7(),
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
        let audit = &*self.services.audit;
        record_event(
            audit,
            &row,
            connect_refusal(&format!("connect {local} from {peer}"), &why),
        );
        audit.record(Record::Session(row));
    }
}
