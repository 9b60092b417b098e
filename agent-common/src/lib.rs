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
pub const MAPS_ABI: u32 = 1;

pub const MAX_TARGETS: u32 = 4096;
/// Ancestor cgroup levels recorded per connection (see `ConnRecord::ancestors`).
pub const ANCESTOR_LEVELS: usize = 8;
pub const MAX_CONNS: u32 = 65536;
pub const DENIALS_RING_BYTES: u32 = 256 * 1024;

/// `target_id` value recorded for a connection redirected by egress mode `audit`
/// (the destination is not a registered target).
pub const TARGET_ID_EGRESS: u32 = 0;

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
pub const STAT_COUNT: u32 = 8;

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
    pub _pad: u32,
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
}

/// Key of the `FLOWS` map: the client end of a redirected connection as the
/// proxy sees it in `accept()` (the peer address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr: [u32; 4],
    /// Local (client) port, host order.
    pub port: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for TargetKey {}
    unsafe impl aya::Pod for TargetValue {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for ConnRecord {}
    unsafe impl aya::Pod for FlowKey {}
}
