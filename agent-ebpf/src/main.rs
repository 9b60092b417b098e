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
//! - `lg_sockops` (`BPF_SOCK_OPS_TCP_CONNECT_CB`): once the source port is bound,
//!   the record is copied to `FLOWS`, keyed by the client address the proxy will
//!   see as the peer in `accept()`.
//! - `lg_getpeername4|6`: the loop sees the original peer, not the proxy.
//! - `lg_sock_release`: drops the per-socket record.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, info};
use loopgate_common::{
    v4_mapped, ConnRecord, FlowKey, Settings, TargetKey, TargetValue, ANCESTOR_LEVELS,
    DENIALS_RING_BYTES, EGRESS_AUDIT, EGRESS_DENY, MAX_CONNS, MAX_TARGETS, STAT_COUNT,
    STAT_DENIAL_EVENTS_LOST, STAT_DENIED, STAT_FLOW_REKEYED, STAT_RECORD_FAILED, STAT_REDIRECTED,
    TARGET_ID_EGRESS, V4_MAPPED_WORD,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
/// cgroup/connect verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[map]
static TARGETS: HashMap<TargetKey, TargetValue> = HashMap::pinned(MAX_TARGETS, 0);
#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);
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
    Deny,
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
    // The proxy itself is never a redirect or a denial: a loop that connects to it
    // directly has no record, and the proxy refuses it.
    if port == settings.proxy_port && is_loopback(&addr) {
        return Verdict::Pass;
    }
    match settings.egress {
        EGRESS_DENY => Verdict::Deny,
        EGRESS_AUDIT => Verdict::Redirect(TARGET_ID_EGRESS),
        _ => Verdict::Pass,
    }
}

#[inline(always)]
fn is_loopback(addr: &[u32; 4]) -> bool {
    let v6_loopback = addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 1u32.to_be();
    let v4_loopback = addr[0] == 0
        && addr[1] == 0
        && addr[2] == V4_MAPPED_WORD
        && (u32::from_be(addr[3]) >> 24) == 127;
    v6_loopback || v4_loopback
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
        _pad: 0,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ancestors,
        netns_cookie: unsafe { bpf_get_netns_cookie(ptr) },
        socket_cookie: unsafe { bpf_get_socket_cookie(ptr) },
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
    }
}

/// A socket that connects again (after a failed redirect) must not keep the
/// record of its previous destination.
#[inline(always)]
fn forget(ctx: &SockAddrContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = BY_COOKIE.remove(cookie);
}

fn report_denial(ctx: &SockAddrContext, rec: &ConnRecord) {
    count(STAT_DENIED);
    if DENIALS.output::<ConnRecord>(rec, 0).is_err() {
        count(STAT_DENIAL_EVENTS_LOST);
    }
    info!(
        ctx,
        "egress denied: tgid {} port {}", rec.tgid, rec.orig_port
    );
}

#[cgroup_sock_addr(connect4)]
pub fn lg_connect4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the verifier guarantees `sock_addr` points at a valid context.
    let (sock_type, ip4, port_word) = unsafe { ((*sa).type_, (*sa).user_ip4, (*sa).user_port) };
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    let port = u16::from_be(port_word as u16);
    let addr = v4_mapped(ip4);
    match decide(addr, port) {
        Verdict::Pass => {
            forget(&ctx);
            ALLOW
        }
        Verdict::Deny => {
            forget(&ctx);
            let rec = make_record(&ctx, addr, port, AF_INET);
            report_denial(&ctx, &rec);
            REJECT
        }
        Verdict::Redirect(target_id) => {
            let mut rec = make_record(&ctx, addr, port, AF_INET);
            rec.target_id = target_id;
            rec.via_v4 = 1;
            if BY_COOKIE.insert(rec.socket_cookie, rec, 0).is_err() {
                // Without a record the proxy could not tell who this is: fail closed.
                count(STAT_RECORD_FAILED);
                return REJECT;
            }
            let proxy_port = match SETTINGS.get(0) {
                Some(s) => s.proxy_port,
                None => return REJECT,
            };
            unsafe {
                (*sa).user_ip4 = 0x7f00_0001u32.to_be();
                (*sa).user_port = proxy_port.to_be() as u32;
            }
            count(STAT_REDIRECTED);
            debug!(&ctx, "redirected tgid {} to target {}", rec.tgid, target_id);
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn lg_connect6(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // The verifier wants `user_ip6` read one word at a time.
    let (sock_type, w0, w1, w2, w3, port_word) = unsafe {
        (
            (*sa).type_,
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
            (*sa).user_port,
        )
    };
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    let port = u16::from_be(port_word as u16);
    let addr = [w0, w1, w2, w3];
    let mapped = w0 == 0 && w1 == 0 && w2 == V4_MAPPED_WORD;
    match decide(addr, port) {
        Verdict::Pass => {
            forget(&ctx);
            ALLOW
        }
        Verdict::Deny => {
            forget(&ctx);
            let rec = make_record(&ctx, addr, port, AF_INET6);
            report_denial(&ctx, &rec);
            REJECT
        }
        Verdict::Redirect(target_id) => {
            let mut rec = make_record(&ctx, addr, port, AF_INET6);
            rec.target_id = target_id;
            rec.via_v4 = mapped as u32;
            if BY_COOKIE.insert(rec.socket_cookie, rec, 0).is_err() {
                count(STAT_RECORD_FAILED);
                return REJECT;
            }
            let proxy_port = match SETTINGS.get(0) {
                Some(s) => s.proxy_port,
                None => return REJECT,
            };
            let last = if mapped {
                0x7f00_0001u32.to_be()
            } else {
                1u32.to_be()
            };
            unsafe {
                (*sa).user_ip6[0] = 0;
                (*sa).user_ip6[1] = 0;
                (*sa).user_ip6[2] = if mapped { V4_MAPPED_WORD } else { 0 };
                (*sa).user_ip6[3] = last;
                (*sa).user_port = proxy_port.to_be() as u32;
            }
            count(STAT_REDIRECTED);
            debug!(
                &ctx,
                "redirected tgid {} to target {} (v6)", rec.tgid, target_id
            );
            ALLOW
        }
    }
}

#[sock_ops]
pub fn lg_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 0;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(rec) = (unsafe { BY_COOKIE.get(cookie) }) else {
        return 0;
    };
    let ops = ctx.ops;
    // Read every source field unconditionally, with volatile loads, so the compiler
    // cannot fold the IPv4/IPv6 choice into one load at a computed context offset
    // (the verifier rejects that as "dereference of modified ctx ptr").
    let (ip4, a0, a1, a2, a3, port) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).local_ip4),
            core::ptr::read_volatile(&(*ops).local_ip6[0]),
            core::ptr::read_volatile(&(*ops).local_ip6[1]),
            core::ptr::read_volatile(&(*ops).local_ip6[2]),
            core::ptr::read_volatile(&(*ops).local_ip6[3]),
            core::ptr::read_volatile(&(*ops).local_port),
        )
    };
    let addr = if rec.via_v4 != 0 {
        v4_mapped(ip4)
    } else {
        [a0, a1, a2, a3]
    };
    let key = FlowKey { addr, port };
    if FLOWS.insert(key, rec, 0).is_ok() {
        count(STAT_FLOW_REKEYED);
    } else {
        count(STAT_RECORD_FAILED);
    }
    0
}

#[inline(always)]
fn original_peer(ctx: &SockAddrContext) -> Option<&'static ConnRecord> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { BY_COOKIE.get(cookie) }
}

#[cgroup_sock_addr(getpeername4)]
pub fn lg_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(rec) = original_peer(&ctx) {
        let sa = ctx.sock_addr;
        unsafe {
            (*sa).user_ip4 = rec.orig_addr[3];
            (*sa).user_port = rec.orig_port.to_be() as u32;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lg_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(rec) = original_peer(&ctx) {
        let sa = ctx.sock_addr;
        unsafe {
            (*sa).user_ip6[0] = rec.orig_addr[0];
            (*sa).user_ip6[1] = rec.orig_addr[1];
            (*sa).user_ip6[2] = rec.orig_addr[2];
            (*sa).user_ip6[3] = rec.orig_addr[3];
            (*sa).user_port = rec.orig_port.to_be() as u32;
        }
    }
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn lg_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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
