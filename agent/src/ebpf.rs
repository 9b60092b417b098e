//! The kernel side, seen from userspace: loading the programs, pinning their
//! links and maps in bpffs, and the only code that writes to the maps.
//!
//! Start-up is restart-safe. Maps are pinned under `<pin_dir>/maps-v<ABI>` and
//! re-used by the next agent; links are pinned under `<pin_dir>/links/<attach
//! point>/<program>`. When a link pin already exists the freshly loaded program
//! is swapped in with `BPF_LINK_UPDATE` (same link, no gap); otherwise the
//! program is attached and the link pinned. Because the links outlive the agent,
//! a tagged loop whose agent died keeps being redirected to a port nobody
//! listens on: its connections are refused (fail closed), never direct.

use std::{
    collections::HashMap as StdHashMap,
    ffi::CString,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{links::FdLink, links::PinnedLink, CgroupAttachMode, Program},
    Ebpf, EbpfLoader,
};
use loopgate_common::{
    ConnRecord, ExeKey, ExePath, FlowKey, PortKey, Settings, TargetKey, TargetValue, EGRESS_ALLOW,
    EGRESS_AUDIT, EGRESS_DENY, MAPS_ABI, STAT_COUNT, V4_MAPPED_WORD,
};
use serde::Serialize;

use crate::config::Egress;

/// The kernel object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loopgate-ebpf"));

/// Programs, in attach order: the getpeername, sockops and release hooks go in
/// before connect starts redirecting.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("lg_getpeername4", "cgroup/getpeername4"),
    ("lg_getpeername6", "cgroup/getpeername6"),
    ("lg_sock_release", "cgroup/sock_release"),
    ("lg_sockops", "sockops"),
    ("lg_bind4", "cgroup/bind4"),
    ("lg_bind6", "cgroup/bind6"),
    ("lg_sock_create", "cgroup/sock_create"),
    ("lg_recvmsg4", "cgroup/recvmsg4"),
    ("lg_recvmsg6", "cgroup/recvmsg6"),
    ("lg_sendmsg4", "cgroup/sendmsg4"),
    ("lg_sendmsg6", "cgroup/sendmsg6"),
    ("lg_connect4", "cgroup/connect4"),
    ("lg_connect6", "cgroup/connect6"),
];

/// Tracepoints (global, not per cgroup): the executable of each process,
/// recorded at exec and inherited at fork.
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("lg_fork", "sched", "sched_process_fork"),
    ("lg_exec", "sched", "sched_process_exec"),
];

pub const STAT_NAMES: &[&str] = &[
    "redirected",
    "denied",
    "denial_events_lost",
    "record_failed",
    "flows_rekeyed",
    "flows_dropped",
];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("mounting bpffs at /sys/fs/bpf: {0}")]
    MountBpffs(std::io::Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the kernel object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {0} is missing from the kernel object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the kernel object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("link {path}: {reason}")]
    Link { path: PathBuf, reason: String },
}

/// Where the programs are attached: the agent's cgroup root, and each SRE-named
/// workload cgroup.
#[derive(Debug, Clone)]
pub struct AttachPoint {
    /// Directory name under `<pin_dir>/links`.
    pub label: String,
    pub cgroup: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttachedProgram {
    pub program: &'static str,
    pub attach_type: &'static str,
    pub cgroup: String,
    pub link_id: u32,
    pub program_id: u32,
    /// `attached` (new link) or `updated` (existing pinned link re-used).
    pub how: &'static str,
}

/// Loaded programs and handles to their maps.
pub struct Kernel {
    /// Keeps the loaded programs' fds for the life of the agent.
    _ebpf: Ebpf,
    targets: Mutex<HashMap<MapData, TargetKey, TargetValue>>,
    target_ports: Mutex<HashMap<MapData, PortKey, u32>>,
    flows: Mutex<HashMap<MapData, FlowKey, ConnRecord>>,
    dns_orig: HashMap<MapData, u64, TargetKey>,
    exes: HashMap<MapData, ExeKey, ExePath>,
    stats: PerCpuArray<MapData, u64>,
    denials: Mutex<Option<RingBuf<MapData>>>,
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    pub attached: Vec<AttachedProgram>,
    pub pin_dir: PathBuf,
}

pub struct LoadOptions<'a> {
    pub pin_dir: &'a Path,
    pub attach: &'a [AttachPoint],
    pub proxy_port: u16,
    pub egress: Egress,
    pub targets: &'a StdHashMap<TargetKey, TargetValue>,
    /// The agent's network namespace cookie (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    pub log_level: u8,
}

pub fn egress_code(e: Egress) -> u32 {
    match e {
        Egress::Allow => EGRESS_ALLOW,
        Egress::Audit => EGRESS_AUDIT,
        Egress::Deny => EGRESS_DENY,
    }
}

impl Kernel {
    pub fn load(opts: &LoadOptions<'_>) -> Result<Self, EbpfError> {
        ensure_bpffs()?;
        let maps_dir = opts.pin_dir.join(format!("maps-v{MAPS_ABI}"));
        let links_dir = opts.pin_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(d).map_err(|source| EbpfError::Io {
                what: "creating",
                path: d.clone(),
                source,
            })?;
        }

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global(aya_log::LEVEL, &opts.log_level, false)
            .load(OBJECT)?;
        // The logger owns the only fd of the AYA_LOGS map: keep it for the life
        // of the agent (see EBPF.md).
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "kernel program logs unavailable");
                None
            }
        };

        let mut settings: Array<MapData, Settings> = take_map(&mut ebpf, "SETTINGS")?;
        let targets: HashMap<MapData, TargetKey, TargetValue> = take_map(&mut ebpf, "TARGETS")?;
        let target_ports: HashMap<MapData, PortKey, u32> = take_map(&mut ebpf, "TARGET_PORTS")?;
        let flows: HashMap<MapData, FlowKey, ConnRecord> = take_map(&mut ebpf, "FLOWS")?;
        let dns_orig: HashMap<MapData, u64, TargetKey> = take_map(&mut ebpf, "DNS_ORIG")?;
        let exes: HashMap<MapData, ExeKey, ExePath> = take_map(&mut ebpf, "EXES")?;
        let mut attach_points: HashMap<MapData, u64, u32> = take_map(&mut ebpf, "ATTACH_POINTS")?;
        let stale: Vec<u64> = attach_points.keys().filter_map(Result::ok).collect();
        for k in stale {
            let _ = attach_points.remove(&k);
        }
        for point in opts.attach {
            let id = crate::cgroup::cgroup_id(&point.cgroup).map_err(|e| EbpfError::Link {
                path: point.cgroup.clone(),
                reason: e.to_string(),
            })?;
            attach_points
                .insert(id, 1, 0)
                .map_err(|source| EbpfError::Map {
                    name: "ATTACH_POINTS",
                    source,
                })?;
        }
        let (exec_filename_off, fork_child_pid_off) = tracepoint_offsets()?;
        let stats: PerCpuArray<MapData, u64> = take_map(&mut ebpf, "STATS")?;
        let denials: RingBuf<MapData> = take_map(&mut ebpf, "DENIALS")?;

        // Settings and targets are in place before any program is attached, so a
        // loop never sees a half-configured redirect.
        settings
            .set(
                0,
                Settings {
                    proxy_port: opts.proxy_port,
                    _pad: 0,
                    egress: egress_code(opts.egress),
                    netns_cookie: opts.netns_cookie,
                    exec_filename_off,
                    fork_child_pid_off,
                    _pad2: 0,
                },
                0,
            )
            .map_err(|source| EbpfError::Map {
                name: "SETTINGS",
                source,
            })?;
        let kernel_targets = Mutex::new(targets);
        let target_ports = Mutex::new(target_ports);
        sync_targets(&kernel_targets, &target_ports, opts.targets)?;

        for (name, _) in PROGRAMS {
            let prog = ebpf
                .program_mut(name)
                .ok_or(EbpfError::MissingProgram(name))?;
            let r = match prog {
                Program::CgroupSockAddr(p) => p.load(),
                Program::SockOps(p) => p.load(),
                Program::CgroupSock(p) => p.load(),
                _ => return Err(EbpfError::MissingProgram(name)),
            };
            r.map_err(|source| EbpfError::Program { name, source })?;
        }
        // The executable tracepoints go in before any loop is redirected:
        // the new ones are attached before the old ones are detached, so no
        // exec goes unseen across a restart.
        let mut attached = attach_tracepoints(&mut ebpf, &links_dir.join("tracepoints"))?;

        for point in opts.attach {
            let cgroup = File::open(&point.cgroup).map_err(|source| EbpfError::Io {
                what: "opening cgroup",
                path: point.cgroup.clone(),
                source,
            })?;
            let dir = links_dir.join(&point.label);
            std::fs::create_dir_all(&dir).map_err(|source| EbpfError::Io {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
            for (name, attach_type) in PROGRAMS {
                let pin = dir.join(name);
                let how = attach_or_update(&mut ebpf, name, &cgroup, &pin)?;
                let info = PinnedLink::from_pin(&pin)
                    .map(FdLink::from)
                    .and_then(|l| l.info())
                    .map_err(|e| EbpfError::Link {
                        path: pin.clone(),
                        reason: e.to_string(),
                    })?;
                attached.push(AttachedProgram {
                    program: name,
                    attach_type,
                    cgroup: point.cgroup.display().to_string(),
                    link_id: info.id(),
                    program_id: info.program_id(),
                    how,
                });
            }
        }
        remove_stale_links(&links_dir, opts.attach);

        Ok(Self {
            _ebpf: ebpf,
            targets: kernel_targets,
            target_ports,
            flows: Mutex::new(flows),
            dns_orig,
            exes,
            stats,
            denials: Mutex::new(Some(denials)),
            logger: Mutex::new(logger),
            attached,
            pin_dir: opts.pin_dir.to_owned(),
        })
    }

    /// Replaces the registered destinations with `desired`.
    pub fn set_targets(
        &self,
        desired: &StdHashMap<TargetKey, TargetValue>,
    ) -> Result<(), EbpfError> {
        sync_targets(&self.targets, &self.target_ports, desired)
    }

    /// Takes (looks up and deletes) the record of an accepted connection:
    /// `peer` is the loop's socket address, `local` the proxy listener's, both
    /// as `accept()` reports them, in the namespace `netns_cookie`.
    pub fn take_flow(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        netns_cookie: u64,
    ) -> Option<ConnRecord> {
        let key = flow_key(peer, local, netns_cookie);
        let mut flows = self.flows.lock().ok()?;
        let rec = flows.get(&key, 0).ok()?;
        let _ = flows.remove(&key);
        Some(rec)
    }

    /// Where a UDP socket's DNS queries were going before the kernel sent
    /// them to the agent's resolver.
    pub fn dns_origin(&self, socket_cookie: u64) -> Option<SocketAddr> {
        let k = self.dns_orig.get(&socket_cookie, 0).ok()?;
        Some(SocketAddr::new(from_words(k.addr), k.port))
    }

    /// The path a connection's process was exec'd by, when the kernel saw
    /// that exec (`None`: started before the tracepoints were attached, or
    /// forgotten).
    pub fn exe_path(&self, key: &ExeKey) -> Option<String> {
        if key.seq == 0 {
            return None;
        }
        exe_path_of(&self.exes.get(key, 0).ok()?)
    }

    /// Kernel counters, summed over CPUs.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        STAT_NAMES
            .iter()
            .enumerate()
            .take(STAT_COUNT as usize)
            .map(|(i, name)| {
                let v = self
                    .stats
                    .get(&(i as u32), 0)
                    .map(|vals| vals.iter().sum())
                    .unwrap_or(0);
                (*name, v)
            })
            .collect()
    }

    pub fn take_denials(&self) -> Option<RingBuf<MapData>> {
        self.denials.lock().ok()?.take()
    }

    pub fn take_logger(&self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.lock().ok()?.take()
    }
}

/// Where tracefs is (mounted at /sys/kernel/tracing when it is not).
fn ensure_tracefs() -> Result<PathBuf, EbpfError> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events").is_dir() {
            return Ok(PathBuf::from(p));
        }
    }
    let target = Path::new("/sys/kernel/tracing");
    let c = |s: &str| CString::new(s).expect("static string");
    let (src, dst) = (c("tracefs"), c("/sys/kernel/tracing"));
    // SAFETY: plain mount(2) with valid C strings and no data.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(EbpfError::Io {
            what: "mounting tracefs at",
            path: target.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(target.to_owned())
}

/// Offset of `field` in a tracepoint's record, from its tracefs `format`.
pub fn field_offset(format: &str, field: &str) -> Option<u16> {
    format.lines().find_map(|l| {
        let l = l.trim();
        let decl = l.strip_prefix("field:")?.split(';').next()?;
        let name = decl.split_whitespace().last()?;
        if name != field {
            return None;
        }
        l.split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?
            .parse()
            .ok()
    })
}

fn tracepoint_offsets() -> Result<(u16, u16), EbpfError> {
    let root = ensure_tracefs()?;
    let read = |ev: &str| {
        let path = root.join("events/sched").join(ev).join("format");
        std::fs::read_to_string(&path).map_err(|source| EbpfError::Io {
            what: "reading",
            path,
            source,
        })
    };
    let exec = read("sched_process_exec")?;
    let fork = read("sched_process_fork")?;
    let missing = |what: &str| EbpfError::Link {
        path: root.join("events/sched"),
        reason: format!("no `{what}` field in the tracepoint format"),
    };
    Ok((
        field_offset(&exec, "filename").ok_or_else(|| missing("filename"))?,
        field_offset(&fork, "child_pid").ok_or_else(|| missing("child_pid"))?,
    ))
}

/// Attaches the tracepoints, pins their links as `<dir>/<name>-<program id>`,
/// then removes the links of an earlier agent (so the old and new programs
/// overlap instead of leaving a gap).
fn attach_tracepoints(ebpf: &mut Ebpf, dir: &Path) -> Result<Vec<AttachedProgram>, EbpfError> {
    std::fs::create_dir_all(dir).map_err(|source| EbpfError::Io {
        what: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    let mut keep = Vec::new();
    for (name, category, event) in TRACEPOINTS {
        let prog: &mut aya::programs::TracePoint = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()
            .map_err(|source| EbpfError::Program { name, source })?;
        prog.load()
            .map_err(|source| EbpfError::Program { name, source })?;
        let id = prog
            .attach(category, event)
            .map_err(|source| EbpfError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| EbpfError::Program { name, source })?;
        let link = FdLink::try_from(link).map_err(|e| EbpfError::Link {
            path: dir.to_owned(),
            reason: e.to_string(),
        })?;
        let info = link.info().map_err(|e| EbpfError::Link {
            path: dir.to_owned(),
            reason: e.to_string(),
        })?;
        let pin = dir.join(format!("{name}-{}", info.program_id()));
        let _ = std::fs::remove_file(&pin);
        link.pin(&pin).map_err(|e| EbpfError::Link {
            path: pin.clone(),
            reason: e.to_string(),
        })?;
        keep.push(pin);
        out.push(AttachedProgram {
            program: name,
            attach_type: "tracepoint",
            cgroup: format!("{category}/{event}"),
            link_id: info.id(),
            program_id: info.program_id(),
            how: "attached",
        });
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if !keep.contains(&e.path()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(out)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

fn sync_targets(
    map: &Mutex<HashMap<MapData, TargetKey, TargetValue>>,
    ports: &Mutex<HashMap<MapData, PortKey, u32>>,
    desired: &StdHashMap<TargetKey, TargetValue>,
) -> Result<(), EbpfError> {
    {
        // Ports first: the bind guard never lags behind the redirect.
        let mut p = ports
            .lock()
            .map_err(|_| EbpfError::MissingMap("TARGET_PORTS"))?;
        let want: std::collections::HashSet<PortKey> = desired
            .keys()
            .map(|k| PortKey {
                port: k.port as u32,
            })
            .collect();
        for k in want.iter() {
            p.insert(k, 1, 0).map_err(|source| EbpfError::Map {
                name: "TARGET_PORTS",
                source,
            })?;
        }
        let existing: Vec<PortKey> = p.keys().filter_map(Result::ok).collect();
        for k in existing {
            if !want.contains(&k) {
                let _ = p.remove(&k);
            }
        }
    }
    let mut m = map.lock().map_err(|_| EbpfError::MissingMap("TARGETS"))?;
    let existing: Vec<TargetKey> = m.keys().filter_map(Result::ok).collect();
    for k in existing {
        if !desired.contains_key(&k) {
            m.remove(&k).map_err(|source| EbpfError::Map {
                name: "TARGETS",
                source,
            })?;
        }
    }
    for (k, v) in desired {
        if m.get(k, 0).ok().as_ref() != Some(v) {
            m.insert(k, v, 0).map_err(|source| EbpfError::Map {
                name: "TARGETS",
                source,
            })?;
        }
    }
    Ok(())
}

fn attach_or_update(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    pin: &Path,
) -> Result<&'static str, EbpfError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?;
    let prog_fd = match &*prog {
        Program::CgroupSockAddr(p) => p.fd(),
        Program::SockOps(p) => p.fd(),
        Program::CgroupSock(p) => p.fd(),
        _ => return Err(EbpfError::MissingProgram(name)),
    }
    .map_err(|source| EbpfError::Program { name, source })?
    .as_fd()
    .as_raw_fd();

    if pin.exists() {
        match link_update(pin, prog_fd) {
            Ok(()) => return Ok("updated"),
            Err(e) => {
                // A link whose cgroup was removed cannot be updated: replace it.
                tracing::warn!(link = %pin.display(), error = %e, "pinned link unusable; attaching anew");
                let _ = std::fs::remove_file(pin);
            }
        }
    }
    let link: FdLink = match prog {
        Program::CgroupSockAddr(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|source| EbpfError::Program { name, source })?;
            let link = p
                .take_link(id)
                .map_err(|source| EbpfError::Program { name, source })?;
            FdLink::try_from(link).map_err(|e| EbpfError::Link {
                path: pin.to_owned(),
                reason: e.to_string(),
            })?
        }
        Program::SockOps(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|source| EbpfError::Program { name, source })?;
            let link = p
                .take_link(id)
                .map_err(|source| EbpfError::Program { name, source })?;
            FdLink::try_from(link).map_err(|e| EbpfError::Link {
                path: pin.to_owned(),
                reason: e.to_string(),
            })?
        }
        Program::CgroupSock(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|source| EbpfError::Program { name, source })?;
            let link = p
                .take_link(id)
                .map_err(|source| EbpfError::Program { name, source })?;
            FdLink::try_from(link).map_err(|e| EbpfError::Link {
                path: pin.to_owned(),
                reason: e.to_string(),
            })?
        }
        _ => return Err(EbpfError::MissingProgram(name)),
    };
    link.pin(pin).map_err(|e| EbpfError::Link {
        path: pin.to_owned(),
        reason: e.to_string(),
    })?;
    Ok("attached")
}

/// Unpins links of attach points that are no longer configured (which detaches them).
fn remove_stale_links(links_dir: &Path, keep: &[AttachPoint]) {
    let Ok(rd) = std::fs::read_dir(links_dir) else {
        return;
    };
    for e in rd.flatten() {
        let label = e.file_name().to_string_lossy().into_owned();
        if label == "tracepoints" || keep.iter().any(|p| p.label == label) {
            continue;
        }
        tracing::info!(attach_point = %label, "detaching programs of a removed workload cgroup");
        if let Err(err) = std::fs::remove_dir_all(e.path()) {
            tracing::warn!(path = %e.path().display(), error = %err, "could not remove stale links");
        }
    }
}

// --- raw bpf(2) for what aya 0.14 has no public API for -----------------------

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-initialised 128-byte union bpf_attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64; // pathname; bpf_fd = 0, file_flags = 0
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Swaps the program behind a pinned link (`BPF_LINK_UPDATE`).
fn link_update(pin: &Path, prog_fd: i32) -> std::io::Result<()> {
    let link = obj_get(pin)?;
    let mut attr = [0u64; 16];
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    attr[0] = (link.as_raw_fd() as u32 as u64) | ((prog_fd as u32 as u64) << 32);
    sys_bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted there.
pub fn ensure_bpffs() -> Result<(), EbpfError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(EbpfError::MountBpffs)?;
    let mounted = crate::cgroup::mount_points(&info, "bpf")
        .iter()
        .any(|p| p == Path::new("/sys/fs/bpf"));
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").map_err(EbpfError::MountBpffs)?;
    let src = CString::new("bpf").expect("static string");
    let target = CString::new("/sys/fs/bpf").expect("static string");
    // SAFETY: plain mount(2) with valid C strings and no data.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(EbpfError::MountBpffs(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

// --- conversions ------------------------------------------------------------

pub fn to_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

pub fn from_words(w: [u32; 4]) -> IpAddr {
    if w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD {
        return IpAddr::V4(Ipv4Addr::from(w[3].to_ne_bytes()));
    }
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(o))
}

pub fn target_key(addr: SocketAddr) -> TargetKey {
    TargetKey {
        addr: to_words(addr.ip()),
        port: addr.port(),
        _pad: 0,
    }
}

/// An address in the form the kernel programs key flows by: IPv4 and
/// IPv4-mapped IPv6 alike as `::ffff:a.b.c.d`.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

pub fn flow_key(peer: SocketAddr, local: SocketAddr, netns_cookie: u64) -> FlowKey {
    FlowKey {
        src: to_words(canonical_ip(peer.ip())),
        dst: to_words(canonical_ip(local.ip())),
        src_port: peer.port(),
        dst_port: local.port(),
        _pad: 0,
        netns_cookie,
    }
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`).
pub fn own_netns_cookie() -> std::io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt with a valid socket and an 8-byte out buffer.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

pub fn original_destination(rec: &ConnRecord) -> SocketAddr {
    SocketAddr::new(from_words(rec.orig_addr), rec.orig_port)
}

/// The cgroup ids to resolve a record's workload by: its own, then its
/// ancestors from the deepest up.
pub fn cgroup_ids(rec: &ConnRecord) -> Vec<u64> {
    let mut v = Vec::with_capacity(rec.ancestors.len() + 1);
    v.push(rec.cgroup_id);
    v.extend(
        rec.ancestors
            .iter()
            .rev()
            .filter(|&&a| a != 0 && a != rec.cgroup_id),
    );
    v
}

pub fn comm(rec: &ConnRecord) -> String {
    let end = rec
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(rec.comm.len());
    String::from_utf8_lossy(&rec.comm[..end]).into_owned()
}

/// `bpf_ktime_get_ns()` now (CLOCK_MONOTONIC).
pub fn ktime_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Converts a `bpf_ktime_get_ns()` timestamp to wall-clock time.
pub fn ktime_to_system(ktime_ns: u64) -> std::time::SystemTime {
    let mono_now = ktime_now();
    let now = std::time::SystemTime::now();
    now - std::time::Duration::from_nanos(mono_now.saturating_sub(ktime_ns))
}

pub(crate) fn register<T: AsRawFd>(inner: T) -> std::io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its fd and keeps it open for as long as the AsyncFd
    // (which owns `inner`) is registered.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}

/// Reads the ring buffer of denied connects, calling `f` for each.
pub async fn read_denials(
    rb: RingBuf<MapData>,
    mut f: impl FnMut(ConnRecord),
) -> std::io::Result<()> {
    let mut fd = register(rb)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let rb = guard.get_inner_mut();
        while let Some(item) = rb.next() {
            if item.len() >= std::mem::size_of::<ConnRecord>() {
                // SAFETY: the kernel wrote a ConnRecord; read_unaligned copes with alignment.
                let rec = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const ConnRecord) };
                f(rec);
            }
        }
        guard.clear_ready();
    }
}

/// Forwards the kernel programs' aya-log records to `tracing` (via `log`).
pub async fn pump_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> std::io::Result<()> {
    let mut fd = register(logger)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// The path an `EXES` value holds, or `None` when it may have been cut: the
/// kernel copies at most `EXE_PATH_LEN - 1` bytes and a NUL, and records the
/// length without the NUL, so a path of exactly 255 bytes cannot be told
/// from a longer one cut there (neither is trusted: an exe glob must not
/// match a prefix of the real path).
pub fn exe_path_of(p: &loopgate_common::ExePath) -> Option<String> {
    let n = p.len as usize;
    if n == 0 || n >= p.path.len() - 1 {
        return None;
    }
    String::from_utf8(p.path[..n].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn exe_paths_the_kernel_may_have_cut_are_not_trusted() {
        let mk = |p: &[u8]| {
            let mut path = [0u8; loopgate_common::EXE_PATH_LEN];
            path[..p.len()].copy_from_slice(p);
            loopgate_common::ExePath {
                len: p.len() as u32,
                _pad: 0,
                path,
            }
        };
        assert_eq!(
            super::exe_path_of(&mk(b"/usr/bin/psql")).as_deref(),
            Some("/usr/bin/psql")
        );
        // 254 bytes: whole. 255: the most the kernel copies, maybe cut.
        let long = format!("/{}", "a".repeat(253));
        assert_eq!(super::exe_path_of(&mk(long.as_bytes())), Some(long));
        let cut = format!("/{}", "a".repeat(254));
        assert_eq!(super::exe_path_of(&mk(cut.as_bytes())), None);
        assert_eq!(super::exe_path_of(&mk(b"")), None);
    }

    use super::*;

    #[test]
    fn address_words_round_trip() {
        for s in ["127.10.0.5", "::1", "fd00::5", "10.1.2.3"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(from_words(to_words(ip)), ip, "{s}");
        }
        // IPv4 is stored in its mapped form, as the kernel programs expect.
        let w = to_words("127.0.0.1".parse().unwrap());
        assert_eq!(w[2], V4_MAPPED_WORD);
        assert_eq!(w[3], u32::from_ne_bytes([127, 0, 0, 1]));
    }

    #[test]
    fn flow_key_of_mapped_peer_equals_v4() {
        let a = flow_key(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:901".parse().unwrap(),
            7,
        );
        let b = flow_key(
            "[::ffff:127.0.0.1]:40000".parse().unwrap(),
            "[::ffff:127.0.0.1]:901".parse().unwrap(),
            7,
        );
        assert_eq!(a, b);
        // Another namespace or another listener is another flow.
        let c = flow_key(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:901".parse().unwrap(),
            8,
        );
        assert_ne!(a, c);
    }

    #[test]
    fn tracepoint_field_offsets_from_format() {
        let fork = "name: sched_process_fork\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(fork, "child_pid"), Some(20));
        assert_eq!(field_offset(fork, "parent_pid"), Some(12));
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(old, "child_pid"), Some(44));
        let exec = "\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n";
        assert_eq!(field_offset(exec, "filename"), Some(8));
        assert_eq!(field_offset(exec, "pid"), None);
    }

    #[test]
    fn own_netns_cookie_is_known() {
        assert_ne!(own_netns_cookie().unwrap(), 0);
    }
}
