//! `loopgate agent`: assembles the pieces and runs until SIGTERM/SIGINT.
//!
//! Order matters: the proxy listeners and the admin socket are bound before the
//! kernel programs are attached, so a redirected loop never meets a closed
//! port while the agent is healthy; and the programs stay attached (pinned)
//! after the agent exits, so loops fail closed while it is down.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::{
    admin,
    approval::Approvals,
    audit::{
        self,
        clickhouse::{Ch, Shipper},
        AuditSink, EventRow, Record, Recorder, SessionRow,
    },
    cgroup::{self, WorkloadResolver},
    config::Config,
    ebpf::{self, AttachPoint, Kernel, LoadOptions},
    policy::store::PolicyStore,
    proxy::{self, Proxy, SessionTable},
    session::Services,
    targets::TargetTable,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("proxy listener on port {port}: {source}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("config {file}: key `workloads[{index}].cgroup`: {path} does not exist")]
    MissingWorkloadCgroup {
        file: PathBuf,
        index: usize,
        path: PathBuf,
    },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("agent.proxy_port = {port} is at or above net.ipv4.ip_unprivileged_port_start ({start}): any local user could bind it while the agent is down and receive the tagged loops' connections. Choose a port below {start}, or set [agent] allow_unprivileged_port = true")]
    UnprivilegedPort { port: u16, start: u32 },
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): {0}")]
    NetnsCookie(std::io::Error),
    #[error("admin http: {0}")]
    AdminHttp(String),
    #[error("policies refused at start:\n{0}")]
    Policy(#[from] crate::policy::PolicyErrors),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

struct Status {
    started: Instant,
    policy: Arc<PolicyStore>,
    approvals: Arc<Approvals>,
    cfg: Config,
    mount: PathBuf,
    kernel: Arc<Kernel>,
    proxy: Arc<Proxy>,
    audit: Arc<Recorder>,
    listeners: Vec<String>,
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

/// Each session holds two sockets: raise the soft fd limit to the hard one.
fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            let old = r.rlim_cur;
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) == 0 {
                tracing::debug!(from = old, to = r.rlim_max, "raised the open file limit");
            }
        }
    }
}

pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let started = Instant::now();
    // Handlers first: a SIGTERM that arrives while starting must drain, not kill.
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
    raise_fd_limit();
    let approver_uids = cfg.approver_uids()?;
    let policy = Arc::new(PolicyStore::open(
        &cfg.agent.policies,
        cfg.targets.iter().map(|t| t.name.clone()).collect(),
    )?);
    let mount = cgroup::cgroup2_mount()?;
    let root = mount.join(cfg.agent.cgroup_root.trim_matches('/'));
    cgroup::create_dir(&root)?;
    let mut attach = vec![AttachPoint {
        label: "root".into(),
        cgroup: root.clone(),
    }];
    for (index, w) in cfg.workloads.iter().enumerate() {
        let path = mount.join(w.cgroup.trim_matches('/'));
        if !path.is_dir() {
            return Err(DaemonError::MissingWorkloadCgroup {
                file: cfg.source.clone(),
                index,
                path,
            });
        }
        attach.push(AttachPoint {
            label: format!("workload-{}", w.name),
            cgroup: path,
        });
    }

    let targets = Arc::new(TargetTable::new(&cfg.targets));
    let t = targets.clone();
    let target_map = tokio::task::spawn_blocking(move || t.resolve())
        .await
        .unwrap_or_default();

    // Credentials are read (and checked) now: a missing one is a start-up error.
    let secrets = crate::secrets::target_secrets(&cfg)?;
    let credentials = crate::secrets::target_credentials(&cfg)?;
    // Approver tokens too: a bad one stops the agent before anything is attached.
    let mut tokens = Vec::new();
    for (i, a) in cfg.approvers.iter().enumerate() {
        if let Some(p) = &a.token_file {
            tokens.push((
                crate::secrets::read_file(&cfg, &format!("approvers[{i}].token_file"), p)?,
                a.name.clone(),
            ));
        }
    }
    let masker = Arc::new(crate::secrets::SecretMasker::new(&secrets));
    let host = hostname();
    let audit = Arc::new(Recorder::open(
        &cfg.agent.state_dir,
        cfg.audit.clickhouse_url.is_some(),
    )?);
    let stop = CancellationToken::new();
    if cfg.audit.clickhouse_url.is_none() {
        // The spool is the store: keep audit.retention_days of it.
        let dir = audit.spool_dir.clone();
        let max_age = Duration::from_secs(u64::from(cfg.audit.retention_days) * 86_400);
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let d = dir.clone();
                match tokio::task::spawn_blocking(move || audit::spool::expire(&d, max_age)).await {
                    Ok(Ok(n)) if n > 0 => {
                        tracing::info!(segments = n, "removed local audit segments past retention")
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "local audit retention failed"),
                    _ => {}
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                }
            }
        });
    }
    let shipper = Ch::from_config(&cfg)?.map(|ch| {
        tokio::spawn(
            Shipper {
                ch,
                spool_dir: audit.spool_dir.clone(),
                counters: audit.counters.clone(),
                notify: audit.spooled_notify.clone(),
                retention_days: cfg.audit.retention_days,
                batch: 50_000,
                interval: Duration::from_millis(cfg.audit.flush_interval_ms),
            }
            .run(stop.clone()),
        )
    });

    let port = cfg.agent.proxy_port;
    // A proxy port any local user may bind could be taken while the agent
    // restarts, and that user would then receive every tagged loop's
    // redirected connections.
    let unprivileged_start =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(1024);
    if u32::from(port) >= unprivileged_start && !cfg.agent.allow_unprivileged_port {
        return Err(DaemonError::UnprivilegedPort {
            port,
            start: unprivileged_start,
        });
    }
    let listeners = proxy::bind(port)
        .await
        .map_err(|source| DaemonError::Listen { port, source })?;
    let dns_sockets = if cfg.agent.egress == crate::config::Egress::Allow {
        Vec::new()
    } else {
        let mut v = Vec::new();
        for ip in [
            std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ] {
            let s = tokio::net::UdpSocket::bind(std::net::SocketAddr::new(ip, port))
                .await
                .map_err(|source| DaemonError::Listen { port, source })?;
            v.push(s);
        }
        v
    };
    let listener_addrs: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    // Callers in any attach point are tagged loops (refused on the socket).
    let tagged: Vec<&str> = std::iter::once(cfg.agent.cgroup_root.as_str())
        .chain(cfg.workloads.iter().map(|w| w.cgroup.as_str()))
        .collect();
    let admin_server = admin::Server::bind(
        &cfg.agent.admin_socket,
        cfg.agent.admin_group.as_deref(),
        &tagged,
    )?;
    let admin_http = match cfg.agent.admin_http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Listen {
                    port: addr.port(),
                    source,
                })?,
        ),
        None => None,
    };

    // Sessions are bounded by the open-file limit, less a reserve for the
    // admin socket and the spool: one loop cannot make the agent hit EMFILE.
    let nofile = crate::limits::raise_nofile();
    let max_sessions = cfg
        .agent
        .max_sessions
        .min(crate::limits::sessions_for_fds(nofile));
    if max_sessions < cfg.agent.max_sessions {
        tracing::warn!(
            nofile,
            max_sessions,
            configured = cfg.agent.max_sessions,
            "the open-file limit allows fewer sessions than agent.max_sessions"
        );
    }
    let session_limits =
        crate::limits::SessionLimits::new(max_sessions, cfg.agent.max_sessions_per_workload);
    let netns_cookie = ebpf::own_netns_cookie().map_err(DaemonError::NetnsCookie)?;
    let kernel = Arc::new(Kernel::load(&LoadOptions {
        pin_dir: &cfg.pin_dir(),
        attach: &attach,
        proxy_port: port,
        egress: cfg.agent.egress,
        targets: &target_map,
        netns_cookie,
        log_level: crate::config::parse_log_level(&cfg.agent.ebpf_log).unwrap_or(3),
    })?);
    for p in &kernel.attached {
        tracing::info!(program = p.program, cgroup = %p.cgroup, link_id = p.link_id, program_id = p.program_id, how = p.how, "program attached");
    }

    let workloads = Arc::new(WorkloadResolver::new(
        mount.clone(),
        &cfg.agent.cgroup_root,
        cfg.workloads
            .iter()
            .map(|w| (w.name.clone(), w.cgroup.clone()))
            .collect(),
    ));
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let approvals = Arc::new(
        Approvals::new(approver_uids, audit.clone(), host.clone(), metrics.clone())
            .with_notifier(crate::notify::Notifier::new(
                &cfg.approvals.webhooks,
                cfg.approvals.page_url.clone(),
            ))
            .with_max_pending_per_workload(cfg.approvals.max_pending()),
    );
    tokio::spawn(policy.clone().watch(Duration::from_secs(2), stop.clone()));
    let dns = if cfg.agent.egress == crate::config::Egress::Allow {
        None
    } else {
        let names = cfg
            .targets
            .iter()
            .filter_map(|t| match crate::config::TargetAddress::parse(&t.address) {
                Ok(crate::config::TargetAddress::Host { host, .. }) => Some(host),
                _ => None,
            })
            .collect();
        let policy = crate::dns::Policy::new(
            cfg.agent.egress == crate::config::Egress::Audit,
            names,
            &cfg.agent.dns_allow,
        )
        .map_err(|reason| {
            DaemonError::Config(crate::config::ConfigError::Invalid {
                file: cfg.source.clone(),
                location: String::new(),
                key: "agent.dns_allow".into(),
                reason,
            })
        })?;
        let upstreams = if cfg.agent.dns_upstreams.is_empty() {
            std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| crate::dns::upstreams_from_resolv_conf(&t))
                .unwrap_or_default()
        } else {
            cfg.agent.dns_upstreams.clone()
        };
        if upstreams.is_empty() {
            tracing::warn!("no nameserver in /etc/resolv.conf: allowed names get SERVFAIL");
        }
        Some(Arc::new(crate::dns::Resolver {
            policy: arc_swap::ArcSwap::from_pointee(policy),
            upstreams,
            audit: audit.clone(),
            workloads: workloads.clone(),
            host: host.clone(),
        }))
    };
    let services = Arc::new(Services {
        policy: policy.clone(),
        approvals: approvals.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
        masker,
        abort: CancellationToken::new(),
        connect_timeout: Duration::from_secs(cfg.agent.connect_timeout_secs),
    });
    let proxy = Arc::new(Proxy {
        services: services.clone(),
        flows: kernel.clone(),
        workloads: workloads.clone(),
        targets: targets.clone(),
        handlers: crate::protocol::Registry::new(crate::protocol::Settings {
            dns: dns.clone(),
            tcp_idle_timeout: Duration::from_secs(cfg.agent.tcp_idle_timeout_secs.max(1)),
        }),
        capture_bytes: cfg.audit.capture_bytes,
        capture_budget: crate::limits::CaptureBudget::new(
            cfg.audit.capture_workload_bytes_per_hour,
            Duration::from_secs(3600),
        ),
        limits: session_limits.clone(),
        audit_refuse: cfg.audit.on_failure == crate::config::OnFailure::Refuse,
        credentials,
        host: host.clone(),
        sessions: SessionTable::default(),
        netns_cookie,
        unidentified: Default::default(),
        stop_accepting: stop.clone(),
        tracker: TaskTracker::new(),
    });
    for (name, proto) in targets.protocols() {
        if !proxy.handlers.handles(proto) {
            tracing::warn!(target_name = name, protocol = %proto, "no {proto} handler yet: sessions to this target are relayed and recorded as raw TCP");
        }
    }
    for l in listeners {
        tokio::spawn(proxy.clone().serve(l));
    }
    // DNS of tagged loops (egress deny/audit): UDP on the proxy's addresses
    // and port number; TCP arrives through the proxy.
    if let Some(resolver) = &dns {
        for s in dns_sockets {
            tokio::spawn(resolver.clone().serve_udp(s, kernel.clone(), stop.clone()));
        }
    }
    {
        // A reload re-checks open sessions: withdrawn permissions close them.
        let (proxy, policy) = (proxy.clone(), policy.clone());
        let mut changes = policy.subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let n = proxy.sessions.recheck(&policy.current());
                if n > 0 {
                    tracing::info!(
                        sessions = n,
                        "closed sessions whose permission was withdrawn"
                    );
                }
            }
        });
    }

    if let Some(rb) = kernel.take_denials() {
        let audit = audit.clone();
        let workloads = workloads.clone();
        let host = host.clone();
        tokio::spawn(async move {
            let r = ebpf::read_denials(rb, |rec| {
                record_denial(&*audit, &workloads, &host, &rec);
            })
            .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "denial reader stopped");
            }
        });
    }
    if let Some(logger) = kernel.take_logger() {
        tokio::spawn(async move {
            if let Err(e) = ebpf::pump_logs(logger).await {
                tracing::warn!(error = %e, "kernel log reader stopped");
            }
        });
    }
    {
        let targets = targets.clone();
        let kernel = kernel.clone();
        let every = Duration::from_secs(cfg.agent.resolve_interval_secs);
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let t = targets.clone();
                let Ok(map) = tokio::task::spawn_blocking(move || t.resolve()).await else {
                    continue;
                };
                if let Err(e) = kernel.set_targets(&map) {
                    tracing::error!(error = %e, "updating the target map failed");
                }
            }
        });
    }

    let status = Arc::new(Status {
        started,
        policy: policy.clone(),
        approvals: approvals.clone(),
        cfg: cfg.clone(),
        mount,
        kernel: kernel.clone(),
        proxy: proxy.clone(),
        audit: audit.clone(),
        listeners: listener_addrs.clone(),
    });
    tokio::spawn(admin_server.serve(status, stop.clone()));
    if let Some(http) = admin_http {
        let (k, au, ap, m, lim) = (
            kernel.clone(),
            audit.clone(),
            approvals.clone(),
            metrics.clone(),
            session_limits.clone(),
        );
        let listen = http
            .local_addr()
            .map_err(|e| DaemonError::AdminHttp(e.to_string()))?;
        let state = Arc::new(
            crate::admin_http::HttpState::new(
                approvals.clone(),
                metrics.clone(),
                tokens,
                Box::new(move || {
                    let st = au.stats();
                    m.set_gauges(
                        st.spool_pending_bytes,
                        st.dropped,
                        ap.pending_count(),
                        &k.stats(),
                        st.failing.is_some(),
                        lim.open(),
                    );
                }),
                listen,
                cfg.approvals.page_url.as_deref(),
            )
            .map_err(|_| DaemonError::AdminHttp("cannot draw the CSRF key".into()))?,
        );
        tokio::spawn(crate::admin_http::serve(http, state, stop.clone()));
    }

    tracing::info!(
        listeners = ?listener_addrs,
        cgroup_root = %root.display(),
        egress = cfg.agent.egress.as_str(),
        targets = cfg.targets.len(),
        startup_ms = started.elapsed().as_millis() as u64,
        "loopgate agent ready"
    );

    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading policies");
                let p = policy.clone();
                let _ = tokio::task::spawn_blocking(move || p.reload()).await;
            }
        }
    }
    stop.cancel();
    proxy.tracker.close();
    let grace = Duration::from_secs(cfg.agent.shutdown_grace_secs);
    if tokio::time::timeout(grace, proxy.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = proxy.sessions.len(),
            "grace period over; closing open sessions"
        );
        proxy.services.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), proxy.tracker.wait()).await;
    }
    let a = audit.clone();
    let _ = tokio::task::spawn_blocking(move || a.close()).await;
    if let Some(s) = shipper {
        // Records spooled just now are shipped at the next start.
        let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
    }
    tracing::info!(
        "agent stopped; programs stay attached, so tagged loops fail closed until it is back"
    );
    Ok(())
}

/// A refusal made in the kernel becomes a `sessions` row (outcome `denied`)
/// and an `events` row naming the rule: `egress:deny` (TCP, UDP, raw/ICMP
/// sockets), `identity:netns` (a loop in its own network namespace),
/// `bind:target` (a listener on a target's address or the proxy port).
fn record_denial(
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}
