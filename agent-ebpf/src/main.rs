//! loopgate kernel programs.
//!
//! Attached (as BPF links) to the agent's cgroup subtree, so only tagged loops
//! run them:
//!
//! - `lg_connect4` / `lg_connect6` (`cgroup/connect4|6`): a TCP connect to a
//!   registered target is rewritten to the local proxy, after the original
//!   destination and the caller's identity are stored by socket cookie. Other
//!   destinations follow the egress mode: allow, audit (redirect too) or deny
//!   (the caller gets EPERM and the denial goes to the `DENIALS` ring buffer).
//!   A connect from a network namespace other than the agent's is refused
//!   (EPERM, recorded): redirect records only mean something in the
//!   namespace where the proxy listens. Connected UDP follows the egress mode.
//! - `lg_sendmsg4|6`: unconnected UDP under egress deny (only the host's
//!   configured resolvers on port 53 pass).
//! - `lg_bind4|6`: a tagged loop may not bind a registered target's address
//!   and port (nor the wildcard address on a target's port), nor the proxy port.
//! - `lg_sock_create`: raw and ICMP sockets are refused under egress deny.
//! - `lg_sockops`: `BPF_SOCK_OPS_TCP_CONNECT_CB` (source port bound): the
//!   record is copied to `FLOWS`, keyed by the full 4-tuple and the netns, and
//!   the socket asks for state callbacks; `BPF_SOCK_OPS_STATE_CB` to
//!   `TCP_CLOSE`: the `FLOWS` entry goes (a failed connect leaves nothing).
//! - `lg_getpeername4|6`: the loop sees the original peer, not the proxy.
//! - `lg_sock_release`: drops the per-socket record, and its `FLOWS` entry
//!   unless the connection is established and waits in the proxy's accept
//!   queue (the proxy takes that one, and checks it belongs to the peer).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext, SockOpsContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, info};
use loopgate_common::{
    v4_mapped, ConnRecord, ExeKey, ExePath, FlowKey, PortKey, Settings, TargetKey, TargetValue,
    ANCESTOR_LEVELS, DENIALS_RING_BYTES, DENY_BIND, DENY_EGRESS_TCP, DENY_EGRESS_UDP, DENY_NETNS,
    DENY_SOCKET, DNS_PORT, EGRESS_ALLOW, EGRESS_AUDIT, EGRESS_DENY, MAX_CONNS, MAX_EXES,
    MAX_TARGETS, SOCK_DGRAM, SOCK_RAW, SOCK_STREAM, STAT_COUNT, STAT_DENIAL_EVENTS_LOST,
    STAT_DENIED, STAT_FLOW_DROPPED, STAT_FLOW_REKEYED, STAT_RECORD_FAILED, STAT_REDIRECTED,
    TARGET_ID_DNS, TARGET_ID_EGRESS, V4_MAPPED_WORD,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;
/// TCP states (include/net/tcp_states.h).
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;
/// cgroup/connect verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[map]
static TARGETS: HashMap<TargetKey, TargetValue> = HashMap::pinned(MAX_TARGETS, 0);
/// Ports of registered targets (bind guard for wildcard addresses).
#[map]
static TARGET_PORTS: HashMap<PortKey, u32> = HashMap::pinned(MAX_TARGETS, 0);
/// Original destination of a UDP socket's DNS queries, by socket cookie: the
/// queries go to the agent's resolver, and replies must look as if they came
/// from where the loop sent them.
#[map]
static DNS_ORIG: LruHashMap<u64, TargetKey> = LruHashMap::pinned(MAX_CONNS, 0);
#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);
/// Executable paths by image (tgid, exec time).
#[map]
static EXES: LruHashMap<ExeKey, ExePath> = LruHashMap::pinned(MAX_EXES, 0);
/// The current image of each process (tgid → `EXES` key).
#[map]
static CURRENT_EXE: LruHashMap<u32, ExeKey> = LruHashMap::pinned(MAX_CONNS, 0);
/// cgroup ids of the attach points (the agent's root and named workload
/// cgroups): the exec/fork tracepoints, which run host-wide, only record
/// processes below one of them.
#[map]
static ATTACH_POINTS: HashMap<u64, u32> = HashMap::pinned(256, 0);
/// Room to read a path into (too large for the BPF stack).
#[map]
static EXE_SCRATCH: PerCpuArray<ExePath> = PerCpuArray::with_max_entries(1, 0);
#[map]
static BY_COOKIE: LruHashMap<u64, ConnRecord> = LruHashMap::pinned(MAX_CONNS, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, ConnRecord> = LruHashMap::pinned(MAX_CONNS, 0);
#[map]
static DENIALS: RingBuf = RingBuf::pinned(DENIALS_RING_BYTES, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

#[inline(always)]
fn count(stat: u32) {
    if let Some(p) = STATS.get_ptr_mut(stat) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *p += 1 };
    }
}

/// What connect4/6 decided for a TCP destination.
enum Verdict {
    Pass,
    Redirect(u32),
    Deny(u16),
}

#[inline(always)]
fn decide(addr: [u32; 4], port: u16) -> Verdict {
    let Some(settings) = SETTINGS.get(0) else {
        return Verdict::Pass;
    };
    if settings.proxy_port == 0 {
        return Verdict::Pass;
    }
    let key = TargetKey {
        addr,
        port,
        _pad: 0,
    };
    if let Some(t) = unsafe { TARGETS.get(key) } {
        return Verdict::Redirect(t.target_id);
    }
    // The proxy's own listeners are never a redirect or a denial: a loop that
    // connects to them directly has no record, and the proxy refuses it. Only
    // the exact listen addresses are exempt, not every loopback address.
    if port == settings.proxy_port && is_proxy_address(&addr) {
        return Verdict::Pass;
    }
    // DNS over TCP goes to the agent's resolver (through the proxy).
    if port == DNS_PORT && settings.egress != EGRESS_ALLOW {
        return Verdict::Redirect(TARGET_ID_DNS);
    }
    match settings.egress {
        EGRESS_DENY => Verdict::Deny(DENY_EGRESS_TCP),
        EGRESS_AUDIT => Verdict::Redirect(TARGET_ID_EGRESS),
        _ => Verdict::Pass,
    }
}

/// 127.0.0.1 (also as `::ffff:127.0.0.1`) or ::1: where the proxy listens.
#[inline(always)]
fn is_proxy_address(addr: &[u32; 4]) -> bool {
    *addr == proxy_address(true) || *addr == proxy_address(false)
}

/// The unspecified address (0.0.0.0 in either form, or ::).
#[inline(always)]
fn is_wildcard(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && (addr[2] == 0 || addr[2] == V4_MAPPED_WORD) && addr[3] == 0
}

/// Whether the socket lives in the agent's network namespace.
#[inline(always)]
fn in_agent_netns<C: EbpfContext>(ctx: &C) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        return true;
    };
    // Not configured yet (0): nothing is redirected either.
    settings.netns_cookie == 0
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == settings.netns_cookie
}

#[inline(always)]
fn egress_mode() -> u32 {
    SETTINGS.get(0).map(|s| s.egress).unwrap_or(0)
}

#[inline(always)]
fn make_record<C: EbpfContext>(ctx: &C, addr: [u32; 4], port: u16, family: u16) -> ConnRecord {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let ptr = ctx.as_ptr();
    let mut ancestors = [0u64; ANCESTOR_LEVELS];
    for (i, a) in ancestors.iter_mut().enumerate() {
        *a = unsafe { bpf_get_current_ancestor_cgroup_id(i as i32 + 1) };
    }
    ConnRecord {
        orig_addr: addr,
        orig_port: port,
        family,
        target_id: 0,
        via_v4: 0,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        reason: 0,
        sock_type: SOCK_STREAM,
        protocol: 6,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ancestors,
        netns_cookie: unsafe { bpf_get_netns_cookie(ptr) },
        socket_cookie: unsafe { bpf_get_socket_cookie(ptr) },
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        flow: FlowKey::EMPTY,
        exe: current_exe((pid_tgid >> 32) as u32),
    }
}

#[inline(always)]
fn current_exe(tgid: u32) -> ExeKey {
    match unsafe { CURRENT_EXE.get(tgid) } {
        Some(k) => *k,
        None => ExeKey {
            tgid,
            _pad: 0,
            seq: 0,
        },
    }
}

/// Whether the current task is a tagged loop's (below an attach point).
#[inline(always)]
fn current_is_tagged() -> bool {
    let own = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { ATTACH_POINTS.get(own) }.is_some() {
        return true;
    }
    for level in 1..=ANCESTOR_LEVELS as i32 {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        if unsafe { ATTACH_POINTS.get(id) }.is_some() {
            return true;
        }
    }
    false
}

/// `sched/sched_process_exec`: the path the process was exec'd by becomes
/// its current image. Read here, at exec, so a later connect names the
/// image that made it, whatever the process does afterwards.
#[tracepoint]
pub fn lg_exec(ctx: TracePointContext) -> u32 {
    let Some(off) = SETTINGS.get(0).map(|s| s.exec_filename_off) else {
        return 0;
    };
    if off == 0 || !current_is_tagged() {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // __data_loc: the low 16 bits are the offset of the string in the record.
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(off as usize) }) else {
        return 0;
    };
    let Some(buf) = EXE_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a per-CPU slot, ours while this program runs.
    let buf = unsafe { &mut *buf };
    let src = unsafe { (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize) };
    let n = match unsafe { aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(src, &mut buf.path) }
    {
        Ok(s) => s.len() as u32,
        Err(_) => return 0,
    };
    buf.len = n;
    let key = ExeKey {
        tgid,
        _pad: 0,
        seq: unsafe { bpf_ktime_get_ns() },
    };
    if EXES.insert(key, buf, 0).is_ok() {
        let _ = CURRENT_EXE.insert(tgid, key, 0);
    } else {
        let _ = CURRENT_EXE.remove(tgid);
    }
    0
}

/// `sched/sched_process_fork`: a child runs its parent's image until it execs.
#[tracepoint]
pub fn lg_fork(ctx: TracePointContext) -> u32 {
    let Some(off) = SETTINGS.get(0).map(|s| s.fork_child_pid_off) else {
        return 0;
    };
    if off == 0 || !current_is_tagged() {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Ok(child) = (unsafe { ctx.read_at::<u32>(off as usize) }) else {
        return 0;
    };
    if let Some(k) = unsafe { CURRENT_EXE.get(parent) } {
        let k = *k;
        let _ = CURRENT_EXE.insert(child, k, 0);
    }
    0
}

/// A socket that connects again (after a failed redirect) must not keep the
/// record of its previous destination.
#[inline(always)]
fn forget(ctx: &SockAddrContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = BY_COOKIE.remove(cookie);
}

/// Records a refusal in the ring buffer (the agent writes the audit rows)
/// and returns the verdict that refuses.
#[inline(always)]
fn deny<C: EbpfContext>(
    ctx: &C,
    addr: [u32; 4],
    port: u16,
    family: u16,
    sock_type: u8,
    protocol: u8,
    reason: u16,
) -> i32 {
    let mut rec = make_record(ctx, addr, port, family);
    rec.reason = reason;
    rec.sock_type = sock_type;
    rec.protocol = protocol;
    count(STAT_DENIED);
    if DENIALS.output::<ConnRecord>(&rec, 0).is_err() {
        count(STAT_DENIAL_EVENTS_LOST);
    }
    info!(
        ctx,
        "denied (reason {}): tgid {} port {}", reason, rec.tgid, port
    );
    REJECT
}

/// UDP that is not DNS: refused under egress deny.
#[inline(always)]
fn udp_allowed() -> bool {
    egress_mode() != EGRESS_DENY
}

/// Whether a UDP datagram to `port` is a DNS query the agent answers.
#[inline(always)]
fn is_dns(port: u16) -> bool {
    port == DNS_PORT && egress_mode() != EGRESS_ALLOW
}

/// Sends a UDP socket's DNS traffic to the agent's resolver (the proxy's
/// address and port number, in UDP), remembering where it was going.
#[inline(always)]
fn redirect_dns(ctx: &SockAddrContext, addr: [u32; 4], port: u16, v6: bool) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = TargetKey {
        addr,
        port,
        _pad: 0,
    };
    let Some(proxy_port) = SETTINGS.get(0).map(|s| s.proxy_port) else {
        return REJECT;
    };
    if DNS_ORIG.insert(cookie, key, 0).is_err() {
        count(STAT_RECORD_FAILED);
        return REJECT;
    }
    if v6 {
        set_user_addr6(ctx, proxy_address(is_mapped(&addr)), proxy_port);
    } else {
        set_user_addr4(ctx, proxy_address(true), proxy_port);
    }
    ALLOW
}

/// Shared by connect4 and connect6 once the destination is known.
#[inline(always)]
fn connect(
    ctx: &SockAddrContext,
    addr: [u32; 4],
    port: u16,
    family: u16,
    sock_type: u32,
    protocol: u32,
) -> Result<Option<u32>, i32> {
    if !in_agent_netns(ctx) {
        forget(ctx);
        return Err(deny(
            ctx,
            addr,
            port,
            family,
            sock_type as u8,
            protocol as u8,
            DENY_NETNS,
        ));
    }
    if sock_type != SOCK_STREAM as u32 {
        if sock_type == SOCK_DGRAM as u32 && is_dns(port) {
            return Err(redirect_dns(ctx, addr, port, family == AF_INET6));
        }
        if sock_type == SOCK_DGRAM as u32 && !udp_allowed() {
            return Err(deny(
                ctx,
                addr,
                port,
                family,
                sock_type as u8,
                protocol as u8,
                DENY_EGRESS_UDP,
            ));
        }
        return Ok(None);
    }
    match decide(addr, port) {
        Verdict::Pass => {
            forget(ctx);
            Ok(None)
        }
        Verdict::Deny(reason) => {
            forget(ctx);
            Err(deny(ctx, addr, port, family, SOCK_STREAM, 6, reason))
        }
        Verdict::Redirect(target_id) => Ok(Some(target_id)),
    }
}

#[inline(always)]
fn store_redirect(ctx: &SockAddrContext, rec: &ConnRecord) -> Option<u16> {
    if BY_COOKIE.insert(rec.socket_cookie, rec, 0).is_err() {
        // Without a record the proxy could not tell who this is: fail closed.
        count(STAT_RECORD_FAILED);
        return None;
    }
    let proxy_port = SETTINGS.get(0)?.proxy_port;
    count(STAT_REDIRECTED);
    debug!(
        ctx,
        "redirected tgid {} to target {}", rec.tgid, rec.target_id
    );
    Some(proxy_port)
}

#[cgroup_sock_addr(connect4)]
pub fn lg_connect4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the verifier guarantees `sock_addr` points at a valid context.
    let (sock_type, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    let (addr, port) = user_addr4(&ctx);
    let target_id = match connect(&ctx, addr, port, AF_INET, sock_type, protocol) {
        Ok(Some(t)) => t,
        Ok(None) => return ALLOW,
        Err(v) => return v,
    };
    let mut rec = make_record(&ctx, addr, port, AF_INET);
    rec.target_id = target_id;
    rec.via_v4 = 1;
    let Some(proxy_port) = store_redirect(&ctx, &rec) else {
        return REJECT;
    };
    set_user_addr4(&ctx, proxy_address(true), proxy_port);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lg_connect6(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (sock_type, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    let (addr, port) = user_addr6(&ctx);
    let mapped = is_mapped(&addr);
    let target_id = match connect(&ctx, addr, port, AF_INET6, sock_type, protocol) {
        Ok(Some(t)) => t,
        Ok(None) => return ALLOW,
        Err(v) => return v,
    };
    let mut rec = make_record(&ctx, addr, port, AF_INET6);
    rec.target_id = target_id;
    rec.via_v4 = mapped as u32;
    let Some(proxy_port) = store_redirect(&ctx, &rec) else {
        return REJECT;
    };
    set_user_addr6(&ctx, proxy_address(mapped), proxy_port);
    ALLOW
}

/// Unconnected UDP (`sendto`/`sendmsg` with an address).
#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, addr: [u32; 4], port: u16, family: u16) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (sock_type, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    if !in_agent_netns(ctx) {
        return deny(
            ctx,
            addr,
            port,
            family,
            sock_type as u8,
            protocol as u8,
            DENY_NETNS,
        );
    }
    if is_dns(port) {
        return redirect_dns(ctx, addr, port, family == AF_INET6);
    }
    if !udp_allowed() {
        return deny(
            ctx,
            addr,
            port,
            family,
            sock_type as u8,
            protocol as u8,
            DENY_EGRESS_UDP,
        );
    }
    ALLOW
}

/// The address an AF_INET `bpf_sock_addr` names (mapped form, host-order port).
#[inline(always)]
fn user_addr4(ctx: &SockAddrContext) -> ([u32; 4], u16) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (ip4, port_word) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    (v4_mapped(ip4), u16::from_be(port_word as u16))
}

/// The address an AF_INET6 `bpf_sock_addr` names. The verifier wants
/// `user_ip6` read one word at a time.
#[inline(always)]
fn user_addr6(ctx: &SockAddrContext) -> ([u32; 4], u16) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (w0, w1, w2, w3, port_word) = unsafe {
        (
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
            (*sa).user_port,
        )
    };
    ([w0, w1, w2, w3], u16::from_be(port_word as u16))
}

/// Makes an AF_INET `bpf_sock_addr` name `addr` (mapped form) and `port`.
#[inline(always)]
fn set_user_addr4(ctx: &SockAddrContext, addr: [u32; 4], port: u16) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    unsafe {
        (*sa).user_ip4 = addr[3];
        (*sa).user_port = port.to_be() as u32;
    }
}

/// Makes an AF_INET6 `bpf_sock_addr` name `addr` and `port`, word by word.
#[inline(always)]
fn set_user_addr6(ctx: &SockAddrContext, addr: [u32; 4], port: u16) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    unsafe {
        (*sa).user_ip6[0] = addr[0];
        (*sa).user_ip6[1] = addr[1];
        (*sa).user_ip6[2] = addr[2];
        (*sa).user_ip6[3] = addr[3];
        (*sa).user_port = port.to_be() as u32;
    }
}

/// Where the proxy (and the resolver) listens for a socket of this kind:
/// `::ffff:127.0.0.1` for IPv4 and IPv4-mapped destinations, else `::1`.
#[inline(always)]
fn proxy_address(v4: bool) -> [u32; 4] {
    if v4 {
        v4_mapped(0x7f00_0001u32.to_be())
    } else {
        [0, 0, 0, 1u32.to_be()]
    }
}

/// IPv4-mapped (`::ffff:a.b.c.d`)?
#[inline(always)]
fn is_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lg_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_addr4(&ctx);
    sendmsg(&ctx, addr, port, AF_INET)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lg_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_addr6(&ctx);
    sendmsg(&ctx, addr, port, AF_INET6)
}

/// A DNS reply from the agent's resolver (source: the proxy's address and
/// port) shows the address the query went to.
#[inline(always)]
fn restore_dns_source(ctx: &SockAddrContext, addr: &[u32; 4], port: u16) -> Option<TargetKey> {
    let proxy_port = SETTINGS.get(0).map(|s| s.proxy_port).unwrap_or(0);
    if proxy_port == 0 || port != proxy_port || !is_proxy_address(addr) {
        return None;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { DNS_ORIG.get(cookie) }.copied()
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lg_recvmsg4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_addr4(&ctx);
    if let Some(orig) = restore_dns_source(&ctx, &addr, port) {
        set_user_addr4(&ctx, orig.addr, orig.port);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lg_recvmsg6(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_addr6(&ctx);
    if let Some(orig) = restore_dns_source(&ctx, &addr, port) {
        set_user_addr6(&ctx, orig.addr, orig.port);
    }
    ALLOW
}

/// A bind a tagged loop may not make: the proxy port, a registered target's
/// address and port, or the wildcard address on a target's port. A listener
/// there would receive connections (and stored credentials) meant for the target.
#[inline(always)]
fn bind(ctx: &SockAddrContext, addr: [u32; 4], port: u16, family: u16) -> i32 {
    if port == 0 {
        return ALLOW;
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (sock_type, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    let proxy_port = SETTINGS.get(0).map(|s| s.proxy_port).unwrap_or(0);
    // The proxy port is the agent's in TCP (proxy) and UDP (resolver).
    if sock_type != SOCK_STREAM as u32 {
        if proxy_port != 0 && port == proxy_port {
            return deny(
                ctx,
                addr,
                port,
                family,
                sock_type as u8,
                protocol as u8,
                DENY_BIND,
            );
        }
        return ALLOW;
    }
    let key = TargetKey {
        addr,
        port,
        _pad: 0,
    };
    let taken = (proxy_port != 0 && port == proxy_port)
        || unsafe { TARGETS.get(key) }.is_some()
        || (is_wildcard(&addr)
            && unsafe { TARGET_PORTS.get(PortKey { port: port as u32 }) }.is_some());
    if taken {
        return deny(
            ctx,
            addr,
            port,
            family,
            sock_type as u8,
            protocol as u8,
            DENY_BIND,
        );
    }
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn lg_bind4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_addr4(&ctx);
    bind(&ctx, addr, port, AF_INET)
}

#[cgroup_sock_addr(bind6)]
pub fn lg_bind6(ctx: SockAddrContext) -> i32 {
    let (addr, port) = user_addr6(&ctx);
    bind(&ctx, addr, port, AF_INET6)
}

/// Raw and ICMP sockets are refused under egress deny (ping, traceroute and
/// hand-made packets would leave unseen).
#[cgroup_sock(sock_create)]
pub fn lg_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    if egress_mode() != EGRESS_DENY {
        return ALLOW;
    }
    let icmp =
        sock_type == SOCK_DGRAM as u32 && (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6);
    if sock_type == SOCK_RAW as u32 || icmp {
        return deny(
            &ctx,
            [0; 4],
            0,
            family as u16,
            sock_type as u8,
            protocol as u8,
            DENY_SOCKET,
        );
    }
    ALLOW
}

#[sock_ops]
pub fn lg_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => rekey(&ctx),
        // args: old state, new state. A socket that reaches TCP_CLOSE (its
        // connect failed, it was reset, or it is done) can never be accepted
        // by the proxy again: its flow record goes.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if let Some(rec) = unsafe { BY_COOKIE.get(cookie) } {
                if FLOWS.remove(rec.flow).is_ok() {
                    count(STAT_FLOW_DROPPED);
                }
            }
        }
        _ => {}
    }
    0
}

#[inline(always)]
fn rekey(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(rec) = BY_COOKIE.get_ptr_mut(cookie) else {
        return;
    };
    let ops = ctx.ops;
    // Read every address field unconditionally, with volatile loads, so the
    // compiler cannot fold the IPv4/IPv6 choice into one load at a computed
    // context offset (the verifier rejects that as "dereference of modified
    // ctx ptr").
    let (l4, l0, l1, l2, l3, lport) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).local_ip4),
            core::ptr::read_volatile(&(*ops).local_ip6[0]),
            core::ptr::read_volatile(&(*ops).local_ip6[1]),
            core::ptr::read_volatile(&(*ops).local_ip6[2]),
            core::ptr::read_volatile(&(*ops).local_ip6[3]),
            core::ptr::read_volatile(&(*ops).local_port),
        )
    };
    let (r4, r0, r1, r2, r3, rport) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).remote_ip4),
            core::ptr::read_volatile(&(*ops).remote_ip6[0]),
            core::ptr::read_volatile(&(*ops).remote_ip6[1]),
            core::ptr::read_volatile(&(*ops).remote_ip6[2]),
            core::ptr::read_volatile(&(*ops).remote_ip6[3]),
            core::ptr::read_volatile(&(*ops).remote_port),
        )
    };
    // SAFETY: a pointer into the map value, valid while this program runs.
    let rec = unsafe { &mut *rec };
    let v4 = rec.via_v4 != 0;
    rec.flow = FlowKey {
        src: if v4 { v4_mapped(l4) } else { [l0, l1, l2, l3] },
        dst: if v4 { v4_mapped(r4) } else { [r0, r1, r2, r3] },
        src_port: lport as u16,
        // remote_port: the network-order port in the upper 16 bits (the
        // kernel shifts it there on little-endian machines).
        dst_port: u16::from_be((rport >> 16) as u16),
        _pad: 0,
        netns_cookie: rec.netns_cookie,
    };
    let key = rec.flow;
    if FLOWS.insert(key, *rec, 0).is_ok() {
        count(STAT_FLOW_REKEYED);
    } else {
        count(STAT_RECORD_FAILED);
    }
    // TCP_CLOSE (a failed connect) must remove the flow record again.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[inline(always)]
fn original_peer(ctx: &SockAddrContext) -> Option<&'static ConnRecord> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { BY_COOKIE.get(cookie) }
}

#[cgroup_sock_addr(getpeername4)]
pub fn lg_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(rec) = original_peer(&ctx) {
        set_user_addr4(&ctx, rec.orig_addr, rec.orig_port);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lg_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(rec) = original_peer(&ctx) {
        set_user_addr6(&ctx, rec.orig_addr, rec.orig_port);
    }
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn lg_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DNS_ORIG.remove(cookie);
    let state = unsafe { (*ctx.sock).state };
    if let Some(rec) = unsafe { BY_COOKIE.get(cookie) } {
        // A connection still being set up (or already closed) never reaches
        // the proxy: its flow record goes with the socket. An established one
        // may sit in the proxy's accept queue, its data already sent; the proxy
        // takes that record and checks that its peer is still this socket.
        if (state == TCP_SYN_SENT || state == TCP_CLOSE) && FLOWS.remove(rec.flow).is_ok() {
            count(STAT_FLOW_DROPPED);
        }
    }
    let _ = BY_COOKIE.remove(cookie);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
