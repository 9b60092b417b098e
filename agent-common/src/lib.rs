//! Types shared by the kernel programs (`loopgate-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy` and free of padding holes that the
//! kernel could leave uninitialised, so it can be used as a BPF map key or value.
//! With the `user` feature the types implement `aya::Pod` for userspace maps.
//!
//! Addresses are always stored in IPv6 form, as the four 32-bit words of the
//! address in network byte order; IPv4 addresses use the IPv4-mapped form
//! `::ffff:a.b.c.d`. Ports are in host byte order.
#![no_std]

/// Pinned-map layout version. Bump whenever a map key or value changes, so a new
/// agent never reuses a pinned map of another layout.
pub const MAPS_ABI: u32 = 4;

pub const MAX_TARGETS: u32 = 4096;
/// Ancestor cgroup levels recorded per connection (see `ConnRecord::ancestors`).
pub const ANCESTOR_LEVELS: usize = 8;
pub const MAX_CONNS: u32 = 65536;
pub const DENIALS_RING_BYTES: u32 = 256 * 1024;

/// `target_id` value recorded for a connection redirected by egress mode `audit`
/// (the destination is not a registered target).
pub const TARGET_ID_EGRESS: u32 = 0;
/// `target_id` of a TCP connect to port 53 sent to the agent's DNS resolver
/// (egress `deny` and `audit`).
pub const TARGET_ID_DNS: u32 = u32::MAX;
/// The DNS port: UDP and TCP queries of tagged loops go to the agent.
pub const DNS_PORT: u16 = 53;

/// Egress modes for destinations that are not registered targets.
pub const EGRESS_ALLOW: u32 = 0;
pub const EGRESS_AUDIT: u32 = 1;
pub const EGRESS_DENY: u32 = 2;

/// Indexes into the `STATS` per-CPU counter array.
pub const STAT_REDIRECTED: u32 = 0;
pub const STAT_DENIED: u32 = 1;
pub const STAT_DENIAL_EVENTS_LOST: u32 = 2;
pub const STAT_RECORD_FAILED: u32 = 3;
pub const STAT_FLOW_REKEYED: u32 = 4;
/// A flow record removed by the kernel because its socket's connect failed
/// or the socket was released before the proxy took the record.
pub const STAT_FLOW_DROPPED: u32 = 5;
pub const STAT_COUNT: u32 = 8;

/// Why the kernel refused an operation (`ConnRecord::reason`).
/// A TCP connect to a destination that is not a target (egress deny).
pub const DENY_EGRESS_TCP: u16 = 1;
/// A connect or send from a network namespace other than the agent's.
pub const DENY_NETNS: u16 = 2;
/// A UDP datagram (connect or sendmsg) to a destination that is not allowed
/// (egress deny).
pub const DENY_EGRESS_UDP: u16 = 3;
/// A bind to a registered target's address and port, or to the proxy port.
pub const DENY_BIND: u16 = 4;
/// A raw or ICMP socket (egress deny).
pub const DENY_SOCKET: u16 = 5;

/// Socket types as the kernel numbers them.
pub const SOCK_STREAM: u8 = 1;
pub const SOCK_DGRAM: u8 = 2;
pub const SOCK_RAW: u8 = 3;

/// Third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`): the bytes
/// `00 00 ff ff` as the kernel stores them, read as a native `u32`.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Builds the IPv4-mapped form of an IPv4 address given in network order.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4_be]
}

/// Key of the `TARGETS` map: a registered destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TargetKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Value of the `TARGETS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetValue {
    /// Index of the target in the agent's config, plus one (0 is egress audit).
    pub target_id: u32,
    pub flags: u32,
}

/// The single entry of the `SETTINGS` array: where to redirect and what to do
/// with destinations that are not targets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Proxy port, host order. 0 means "not configured": nothing is redirected.
    pub proxy_port: u16,
    pub _pad: u16,
    /// One of `EGRESS_*`.
    pub egress: u32,
    /// Cookie of the agent's network namespace. Tagged connects and sends
    /// from any other namespace are refused: redirect records are only valid
    /// in the namespace where the proxy listens.
    pub netns_cookie: u64,
    /// Offsets in the `sched_process_exec` and `sched_process_fork`
    /// tracepoint records (read from tracefs at start: they vary between
    /// kernels) of `filename` (a `__data_loc`) and `child_pid`; 0: unknown.
    pub exec_filename_off: u16,
    pub fork_child_pid_off: u16,
    pub _pad2: u32,
}

/// Longest executable path kept (longer ones are cut, and never match).
pub const EXE_PATH_LEN: usize = 256;
/// Executables remembered (processes that exec'd, and their forks).
pub const MAX_EXES: u32 = 16384;

/// An executable image of a process: its tgid and the time of the exec.
/// Forked children share their parent's key until they exec themselves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExeKey {
    pub tgid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` at exec; 0: unknown.
    pub seq: u64,
}

/// The path a process was exec'd by (as given to execve).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExePath {
    /// Bytes of `path` used, not counting the terminating NUL (at most
    /// `EXE_PATH_LEN - 1`: a longer path is cut there).
    pub len: u32,
    pub _pad: u32,
    pub path: [u8; EXE_PATH_LEN],
}

/// What the kernel knows about a redirected (or denied) connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    /// Original destination (IPv6 form).
    pub orig_addr: [u32; 4],
    /// Original destination port, host order.
    pub orig_port: u16,
    /// Address family of the socket that connected (AF_INET = 2, AF_INET6 = 10).
    pub family: u16,
    /// Registered target id, or `TARGET_ID_EGRESS`.
    pub target_id: u32,
    /// 1 when the connection was redirected to the proxy's IPv4 listener
    /// (AF_INET sockets and IPv4-mapped destinations), 0 for IPv6.
    pub via_v4: u32,
    /// Thread id and process id (tgid) of the caller.
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `DENY_*` for a denial (0 for a redirect).
    pub reason: u16,
    /// Socket type (`SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_RAW`).
    pub sock_type: u8,
    /// IP protocol of the socket (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    pub protocol: u8,
    pub cgroup_id: u64,
    /// Ids of the caller's ancestor cgroups at levels 1..=ANCESTOR_LEVELS (0 when
    /// shallower). An instance cgroup can be gone by the time userspace looks
    /// at a record; its workload's cgroup is still there.
    pub ancestors: [u64; ANCESTOR_LEVELS],
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    /// `bpf_ktime_get_ns()` at connect.
    pub ktime_ns: u64,
    pub comm: [u8; 16],
    /// The `FLOWS` key of this socket once its source port is bound (all
    /// zero before), so the record can be removed with the socket.
    pub flow: FlowKey,
    /// The caller's executable image when it connected (`EXES` key).
    pub exe: ExeKey,
}

/// Key of the `FLOWS` map: the full 4-tuple of a redirected connection, from
/// the loop's side (`src` = the loop's socket, `dst` = the proxy listener),
/// and the network namespace it lives in. IPv4 and IPv4-mapped connections
/// use the mapped form for both addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Ports in host order.
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
    pub netns_cookie: u64,
}

impl FlowKey {
    pub const EMPTY: FlowKey = FlowKey {
        src: [0; 4],
        dst: [0; 4],
        src_port: 0,
        dst_port: 0,
        _pad: 0,
        netns_cookie: 0,
    };
}

/// Key of the `TARGET_PORTS` map: a port some registered target uses. A
/// tagged loop may not bind the wildcard address on such a port (it would
/// receive connections meant for a local target).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub port: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // Each type below is `#[repr(C)]` with integer and integer-array fields
    // only, and every padding byte is an explicit field (the maps' ABI):
    // any bit pattern is a valid value, and none is left uninitialised.
    // SAFETY: as above.
    unsafe impl aya::Pod for TargetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TargetValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExePath {}
}
