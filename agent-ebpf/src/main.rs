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
//!
//! # Unsafe code
//!
//! Every `unsafe` block says why it is sound in a `SAFETY:` comment
//! (`clippy::undocumented_unsafe_blocks` is denied). The comments rest on what
//! the kernel checks when it loads the object (a check that fails refuses the
//! load; it never fails a running program):
//!
//! - Context fields (`*ctx.sock_addr`, `*ctx.sock`, `*ctx.ops`): the pointer is
//!   the context the kernel passes to the program; it is never null and never
//!   changed here. The verifier checks each load and store through it against
//!   the program type and attach type (`sock_addr_is_valid_access`,
//!   `bpf_sock_is_valid_access`, `sock_ops_is_valid_access` in
//!   net/core/filter.c): an offset inside the UAPI struct, a field this hook
//!   may read (or write), an allowed size. It then rewrites the access into a
//!   load or store on the kernel's own socket or socket address.
//! - Helpers (`aya_ebpf::helpers::generated::*` are `unsafe fn`s that call a
//!   kernel helper by number): the verifier checks each call against the
//!   helper's prototype for this program type: the helper must be offered to
//!   this type, and an argument declared as the context must be the context
//!   pointer itself, at offset 0. Helpers without pointer arguments only
//!   return a value.
//! - `HashMap::get` / `LruHashMap::get` (unsafe in aya): the reference points
//!   at the entry's value, `size_of::<V>()` bytes the verifier lets the
//!   program read once the lookup's null check is done; the memory stays
//!   valid until the program returns (these maps are preallocated and never
//!   free an element while in use). What is not guaranteed: an entry deleted,
//!   replaced or evicted (by the agent, a program on another CPU, or the LRU)
//!   goes back to the free list at once and may be refilled for another key
//!   while this program reads it. Each block copies what it needs at once,
//!   and says what a value of another entry would cost there.
#![no_std]
#![no_main]
// Every unsafe block says why it is sound (see "Unsafe code" above).
#![deny(clippy::undocumented_unsafe_blocks)]

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
        // SAFETY: `p` (checked non-null) is this CPU's u64 at index `stat` of
        // STATS, an array map: the verifier bounds the access to the 8-byte
        // value, and array elements are never freed. Programs on other CPUs
        // have their own slot. A program that interrupts this one on the same
        // CPU (sockops from softirq, or a task that preempts this one: cgroup
        // programs run with only migration disabled) can increment the same
        // slot between this load and store; one increment is then lost, the
        // access stays in bounds.
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
    // SAFETY: see "Unsafe code": a value of TARGETS, read at once (one u32).
    // Only the agent writes TARGETS, when targets change; a connect racing
    // with such a change could read the id of the target whose entry took
    // this one's slot.
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
        // SAFETY: bpf_get_netns_cookie takes the context (its sock_addr and
        // sock variants; callers pass a SockAddrContext); the verifier checks
        // that `ctx.as_ptr()` is that context, unmodified. It returns a u64.
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
        // SAFETY: no pointer argument: the helper returns the id of the
        // current task's cgroup ancestor at that level, or 0 past its depth.
        // Offered to cgroup sock and sock_addr programs (make_record's callers).
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
        // SAFETY: no argument; returns the current task's cgroup v2 id.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ancestors,
        // SAFETY: `ptr` is `ctx.as_ptr()`, the program's context (sock_addr,
        // or sock for lg_sock_create), which the sock_addr and sock variants
        // of this helper take; the verifier checks it. Returns a u64.
        netns_cookie: unsafe { bpf_get_netns_cookie(ptr) },
        // SAFETY: as above: the context, checked by the verifier against the
        // sock_addr / sock variant of bpf_get_socket_cookie. Returns a u64.
        socket_cookie: unsafe { bpf_get_socket_cookie(ptr) },
        // SAFETY: no argument; returns CLOCK_MONOTONIC in ns.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        flow: FlowKey::EMPTY,
        exe: current_exe((pid_tgid >> 32) as u32),
    }
}

#[inline(always)]
fn current_exe(tgid: u32) -> ExeKey {
    // SAFETY: see "Unsafe code": a value of CURRENT_EXE, copied at once (16
    // bytes). A slot refilled meanwhile (the exec/fork tracepoints, LRU) could
    // name another image: audit data, not a permission.
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
    // SAFETY: no argument; returns the current task's cgroup v2 id.
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: only whether the key is present is used; the value is not read.
    if unsafe { ATTACH_POINTS.get(own) }.is_some() {
        return true;
    }
    for level in 1..=ANCESTOR_LEVELS as i32 {
        // SAFETY: no pointer argument; 0 past the task's cgroup depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        // SAFETY: only whether the key is present is used; the value is not read.
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
    // SAFETY: `read_at` copies 4 bytes from ctx + off with
    // bpf_probe_read_kernel, which returns an error on a bad address instead
    // of faulting. The context is the raw sched_process_exec record; `off` is
    // the offset of its `__data_loc char[] filename` field (4 bytes: a u32),
    // which the agent reads from the event's tracefs format file.
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(off as usize) }) else {
        return 0;
    };
    let Some(buf) = EXE_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `buf` (checked non-null) is this CPU's ExePath in EXE_SCRATCH,
    // an array map value (never freed); lg_exec is its only user. Tracepoint
    // programs run from trace_call_bpf, which starts no second kprobe or
    // tracepoint program on a CPU while one runs there (bpf_prog_active), so
    // nothing else touches this slot until we return: the `&mut` is unique.
    let buf = unsafe { &mut *buf };
    // SAFETY: the string lies `loc & 0xffff` bytes into the record the
    // context points at (`__data_loc` offsets count from the record's start,
    // below 64 KiB). `src` is only handed to bpf_probe_read_kernel_str below,
    // never dereferenced here.
    let src = unsafe { (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize) };
    // SAFETY: bpf_probe_read_kernel_str copies at most `buf.path.len()` bytes
    // (NUL included) into `buf.path` (the verifier checks that this size fits
    // in the map value) and fails instead of faulting on a bad `src`; aya
    // checks the returned length against the buffer before making the slice.
    let n = match unsafe { aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(src, &mut buf.path) }
    {
        Ok(s) => s.len() as u32,
        Err(_) => return 0,
    };
    buf.len = n;
    let key = ExeKey {
        tgid,
        _pad: 0,
        // SAFETY: no argument; returns CLOCK_MONOTONIC in ns.
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
    // SAFETY: `read_at` copies 4 bytes from ctx + off with
    // bpf_probe_read_kernel (an error, not a fault, on a bad address). The
    // context is the raw sched_process_fork record; `off` is the offset of its
    // `pid_t child_pid` field (4 bytes), read by the agent from tracefs.
    let Ok(child) = (unsafe { ctx.read_at::<u32>(off as usize) }) else {
        return 0;
    };
    // SAFETY: see "Unsafe code": a value of CURRENT_EXE, copied at once
    // (`*k`). A slot refilled meanwhile could give the child another image's
    // key: audit data, not a permission.
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
    // SAFETY: the sock_addr variant of bpf_get_socket_cookie takes the
    // context; the verifier checks `ctx.as_ptr()` is it. Returns a u64.
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
    // SAFETY: the sock_addr variant of bpf_get_socket_cookie takes the
    // context; the verifier checks `ctx.as_ptr()` is it. Returns a u64.
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
    // SAFETY: `sa` is the program's context. `type` and `protocol` are
    // read-only u32 fields of every sock_addr hook, read whole (4 bytes, the
    // only size the verifier accepts for them).
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
    // SAFETY: `sa` is the program's context. `type` and `protocol` are
    // read-only u32 fields of every sock_addr hook, read whole (4 bytes).
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
    // SAFETY: `sa` is the program's context. `type` and `protocol` are
    // read-only u32 fields of every sock_addr hook, read whole (4 bytes).
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
    // SAFETY: `sa` is the program's context. Called only from IPv4 hooks
    // (connect4, sendmsg4, recvmsg4, bind4), the attach types for which the
    // verifier lets a program read `user_ip4`; `user_port` is readable from
    // every sock_addr hook. Both are 4-byte reads of u32 fields; the kernel
    // loads the 2-byte network-order port into the low 16 bits.
    let (ip4, port_word) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    (v4_mapped(ip4), u16::from_be(port_word as u16))
}

/// The address an AF_INET6 `bpf_sock_addr` names. The verifier wants
/// `user_ip6` read one word at a time.
#[inline(always)]
fn user_addr6(ctx: &SockAddrContext) -> ([u32; 4], u16) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the program's context. Called only from IPv6 hooks
    // (connect6, sendmsg6, recvmsg6, bind6), the attach types for which the
    // verifier lets a program read `user_ip6`; each word is one aligned 4-byte
    // read inside the array, plus the 4-byte `user_port` read as above.
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
    // SAFETY: `sa` is the program's context. Called only from IPv4 hooks
    // (connect4, sendmsg4, recvmsg4, getpeername4), attach types for which
    // the verifier accepts stores to `user_ip4` and `user_port`. Both stores
    // are 4 bytes, the size it requires for a store; the kernel writes the
    // low 16 bits of `user_port` as the network-order port.
    unsafe {
        (*sa).user_ip4 = addr[3];
        (*sa).user_port = port.to_be() as u32;
    }
}

/// Makes an AF_INET6 `bpf_sock_addr` name `addr` and `port`, word by word.
#[inline(always)]
fn set_user_addr6(ctx: &SockAddrContext, addr: [u32; 4], port: u16) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the program's context. Called only from IPv6 hooks
    // (connect6, sendmsg6, recvmsg6, getpeername6), attach types for which
    // the verifier accepts stores to `user_ip6` and `user_port`. Each store is
    // one aligned 4-byte word of `user_ip6`, then the 4-byte `user_port`.
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
    // SAFETY: the sock_addr variant of bpf_get_socket_cookie takes the
    // context; the verifier checks `ctx.as_ptr()` is it. Returns a u64.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: see "Unsafe code": this socket's DNS_ORIG value, copied at once
    // (24 bytes). A slot refilled meanwhile (a query from another thread on
    // this socket, LRU) could show the reply as coming from another address.
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
    // SAFETY: `sa` is the program's context. `type` and `protocol` are
    // read-only u32 fields of every sock_addr hook, read whole (4 bytes).
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
        // SAFETY: only whether the key is present is used; the value is not read.
        || unsafe { TARGETS.get(key) }.is_some()
        || (is_wildcard(&addr)
            // SAFETY: only whether the key is present is used; the value is not read.
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
    // SAFETY: `sk` is the program's context (a cgroup/sock program's
    // `bpf_sock`). `family`, `type` and `protocol` are u32 fields this program
    // type may read, each read whole (4 bytes).
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
            // SAFETY: the sock_ops variant of bpf_get_socket_cookie takes the
            // context; the verifier checks `ctx.as_ptr()` is it. Returns a u64.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: see "Unsafe code": this socket's BY_COOKIE value; only
            // `rec.flow` is read, copied at once. If sock_release on another
            // CPU removed it and the slot was refilled meanwhile, another
            // connection's flow could be removed: its proxy lookup then fails
            // closed.
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
    // SAFETY: the sock_ops variant of bpf_get_socket_cookie takes the
    // context; the verifier checks `ctx.as_ptr()` is it. Returns a u64.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(rec) = BY_COOKIE.get_ptr_mut(cookie) else {
        return;
    };
    let ops = ctx.ops;
    // Read every address field unconditionally, with volatile loads, so the
    // compiler cannot fold the IPv4/IPv6 choice into one load at a computed
    // context offset (the verifier rejects that as "dereference of modified
    // ctx ptr").
    // SAFETY: `ops` is the program's context (`bpf_sock_ops`). The local
    // address and port fields are u32s any sock_ops program may read, each
    // read whole (4 bytes, the size the verifier requires), at a constant
    // offset. The kernel reads them from the socket's `sock_common`, present
    // whatever the family (for an IPv4 socket the IPv6 words are unused).
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
    // SAFETY: as above, for the remote address and port fields.
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
    // SAFETY: `rec` (checked non-null) is this socket's BY_COOKIE value, a
    // whole ConnRecord that stays valid until we return. Its other writers run
    // for this socket: connect4/6 stored it earlier in this same connect()
    // (the connect hook runs before tcp_connect), and sock_release cannot run
    // while connect() holds the socket. A getpeername() from another thread
    // may read `orig_addr`/`orig_port` meanwhile; this block writes only
    // `flow`. An LRU eviction refilling the slot meanwhile could only misfile
    // records, which the proxy's peer check refuses.
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
    // SAFETY: the sock_addr variant of bpf_get_socket_cookie takes the
    // context; the verifier checks `ctx.as_ptr()` is it. Returns a u64.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: see "Unsafe code": this socket's BY_COOKIE value. The
    // `'static` is wider than the truth (valid until the program returns):
    // both callers copy `orig_addr`/`orig_port` into the context at once and
    // return. A slot refilled meanwhile (the socket connecting again from
    // another thread, LRU) could show another connection's original peer.
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
    // SAFETY: the cgroup/sock variant of bpf_get_socket_cookie takes the
    // context; the verifier checks `ctx.as_ptr()` is it. Returns a u64.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DNS_ORIG.remove(cookie);
    // SAFETY: `ctx.sock` is the program's context (`bpf_sock`); `state` is a
    // u32 field this program type may read, read whole (4 bytes).
    let state = unsafe { (*ctx.sock).state };
    // SAFETY: see "Unsafe code": this socket's BY_COOKIE value; only
    // `rec.flow` is read, copied at once. A slot refilled meanwhile (a
    // TCP_CLOSE callback on another CPU, then a new insert) could remove
    // another connection's flow: its proxy lookup then fails closed.
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
