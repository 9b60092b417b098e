//! Refusals made in the kernel (the denial ring buffer) as audit rows.

use uuid::Uuid;

use crate::{
    audit::{self, AuditSink, EventRow, Record, SessionRow},
    cgroup::WorkloadResolver,
    ebpf,
};

/// A refusal made in the kernel becomes a `sessions` row (outcome `denied`)
/// and an `events` row naming the rule: `egress:deny` (TCP, UDP, raw/ICMP
/// sockets), `identity:netns` (a loop in its own network namespace),
/// `bind:target` (a listener on a target's address or the proxy port).
pub(super) fn record_denial(
    audit: &dyn AuditSink,
    workloads: &WorkloadResolver,
    host: &str,
    rec: &loopgate_common::ConnRecord,
) {
    use loopgate_common::{
        DENY_BIND, DENY_EGRESS_UDP, DENY_NETNS, DENY_SOCKET, SOCK_DGRAM, SOCK_RAW,
    };
    let wl = workloads.resolve(&ebpf::cgroup_ids(rec));
    let destination = ebpf::original_destination(rec);
    let workload = wl
        .as_ref()
        .map(|w| w.workload.clone())
        .unwrap_or_else(|| format!("(cgroup {})", rec.cgroup_id));
    let at = audit::micros(ebpf::ktime_to_system(rec.ktime_ns));
    let protocol = match (rec.sock_type, rec.protocol) {
        (SOCK_DGRAM, 1 | 58) => "icmp",
        (SOCK_DGRAM, _) => "udp",
        (SOCK_RAW, _) => "raw",
        _ => "tcp",
    };
    let (kind, rule_id, request, reason) = match rec.reason {
        DENY_NETNS => (
            "connection_denied",
            "identity:netns",
            format!("connect {protocol} {destination}"),
            "the loop runs in a network namespace other than the agent's; loopgate does not support loops in their own network namespaces yet",
        ),
        DENY_EGRESS_UDP => (
            "connection_denied",
            "egress:deny",
            format!("send udp {destination}"),
            "egress deny: UDP may only reach the host's resolvers on port 53",
        ),
        DENY_BIND => (
            "bind_denied",
            "bind:target",
            format!("bind {destination}"),
            "a tagged loop may not listen on a registered target's address and port or on the proxy port",
        ),
        DENY_SOCKET => (
            "socket_denied",
            "egress:deny",
            format!("socket {protocol} (ip protocol {})", rec.protocol),
            "egress deny: raw and ICMP sockets are refused to tagged loops",
        ),
        // DENY_EGRESS_TCP, and any reason a newer kernel object may add.
        _ => (
            "connection_denied",
            "egress:deny",
            format!("connect {destination}"),
            "egress deny: destination is not a registered target",
        ),
    };
    tracing::info!(%workload, %request, rule = rule_id, pid = rec.tgid, comm = %ebpf::comm(rec), "denied in the kernel");
    let id = Uuid::now_v7();
    audit.record(Record::Session(SessionRow {
        session_id: id,
        version: 2,
        host: host.to_owned(),
        workload: workload.clone(),
        cgroup: wl.map(|w| w.cgroup).unwrap_or_default(),
        target: "(egress)".into(),
        protocol: protocol.into(),
        destination: destination.to_string(),
        pid: rec.pid,
        tgid: rec.tgid,
        uid: rec.uid,
        gid: rec.gid,
        comm: ebpf::comm(rec),
        cgroup_id: rec.cgroup_id,
        netns_cookie: rec.netns_cookie,
        started_at: at,
        ended_at: at,
        bytes_up: 0,
        bytes_down: 0,
        outcome: "denied".into(),
        detail: reason.into(),
    }));
    audit.record(Record::Event(EventRow {
        event_id: Uuid::now_v7(),
        session_id: id,
        ts: at,
        host: host.to_owned(),
        workload,
        target: "(egress)".into(),
        protocol: protocol.into(),
        kind: kind.into(),
        request,
        verdict: "deny".into(),
        rule_id: rule_id.into(),
        reason: reason.into(),
        pid: rec.tgid,
        uid: rec.uid,
        attr_keys: vec!["comm".into()],
        attr_values: vec![ebpf::comm(rec)],
    }));
}
