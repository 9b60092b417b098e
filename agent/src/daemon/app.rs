//! The agent, built one concern at a time in start-up order:
//!
//! 1. [`App::build`]: policies, cgroups and attach points, targets,
//!    credentials, the audit (spool, retention, shipper), the listeners
//!    (proxy, DNS, admin socket, admin HTTP) — all bound before the kernel
//!    programs attach —, the session caps, the kernel programs, approvals,
//!    the DNS resolver, the proxy, and the background tasks;
//! 2. [`App::serve`]: signals (SIGHUP reloads), then the drain.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, UdpSocket},
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{denials::record_denial, hostname, status::Status, DaemonError, Signals};
use crate::{
    admin,
    approval::Approvals,
    audit::{
        self,
        clickhouse::{Ch, Shipper},
        AuditSink, Recorder,
    },
    cgroup::{self, WorkloadResolver},
    config::{Config, ConfigError, Egress, TargetAddress},
    ebpf::{self, AttachPoint, Kernel, LoadOptions},
    limits::SessionLimits,
    metrics::Metrics,
    policy::store::PolicyStore,
    protocol::{Registry, Settings},
    proxy::{self, Proxy, SessionTable},
    secrets::Secret,
    session::Services,
    targets::TargetTable,
};

/// The running agent.
pub(super) struct App {
    cfg: Config,
    stop: CancellationToken,
    policy: Arc<PolicyStore>,
    audit: Arc<Recorder>,
    shipper: Option<JoinHandle<()>>,
    proxy: Arc<Proxy>,
}

/// The sockets bound before the programs attach.
struct Listeners {
    proxy: Vec<TcpListener>,
    /// UDP on the proxy's addresses, for tagged loops' DNS (egress filtered).
    dns: Vec<UdpSocket>,
    admin: admin::Server,
    admin_http: Option<TcpListener>,
}

impl App {
    pub(super) async fn build(cfg: Config, started: Instant) -> Result<App, DaemonError> {
        let stop = CancellationToken::new();
        let approver_uids = cfg.approver_uids()?;
        let policy = Arc::new(PolicyStore::open(
            &cfg.agent.policies,
            cfg.targets.iter().map(|t| t.name.clone()).collect(),
        )?);
        let mount = cgroup::cgroup2_mount()?;
        let root = mount.join(cfg.agent.cgroup_root.trim_matches('/'));
        cgroup::create_dir(&root)?;
        let attach = attach_points(&cfg, &mount, &root)?;
        let targets = Arc::new(TargetTable::new(&cfg.targets));
        let t = targets.clone();
        let target_map = tokio::task::spawn_blocking(move || t.resolve())
            .await
            .unwrap_or_default();
        // Credentials are read (and checked) now: a missing one is a start-up
        // error, and so is a bad approver token, before anything is attached.
        let secrets = crate::secrets::target_secrets(&cfg)?;
        let credentials = crate::secrets::target_credentials(&cfg)?;
        let tokens = approver_tokens(&cfg)?;
        let host = hostname();
        let (audit, shipper) = start_audit(&cfg, &stop)?;
        let listeners = bind(&cfg).await?;
        let listener_addrs: Vec<String> = listeners
            .proxy
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .collect();
        let session_limits = session_limits(&cfg);

        let netns_cookie = ebpf::own_netns_cookie().map_err(DaemonError::NetnsCookie)?;
        let kernel = Arc::new(Kernel::load(&LoadOptions {
            pin_dir: &cfg.pin_dir(),
            attach: &attach,
            proxy_port: cfg.agent.proxy_port,
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
        let metrics = Arc::new(Metrics::new());
        let approvals = Arc::new(
            Approvals::new(approver_uids, audit.clone(), host.clone(), metrics.clone())
                .with_notifier(crate::notify::Notifier::new(
                    &cfg.approvals.webhooks,
                    cfg.approvals.page_url.clone(),
                ))
                .with_max_pending_per_workload(cfg.approvals.max_pending()),
        );
        tokio::spawn(policy.clone().watch(Duration::from_secs(2), stop.clone()));
        let dns = dns_resolver(&cfg, &audit, &workloads, &host)?;
        let services = Arc::new(Services {
            policy: policy.clone(),
            approvals: approvals.clone(),
            metrics: metrics.clone(),
            audit: audit.clone(),
            masker: Arc::new(crate::secrets::SecretMasker::new(&secrets)),
            abort: CancellationToken::new(),
            connect_timeout: Duration::from_secs(cfg.agent.connect_timeout_secs),
        });
        // The agent's CA, made on the first start: loops that ask for TLS
        // get a certificate for their target's name.
        let ca = match crate::ca::AgentCa::load_or_create(&cfg.agent.state_dir) {
            Ok(ca) => Some(Arc::new(ca)),
            Err(e) => {
                tracing::warn!(error = %e, "no agent CA: loops that ask for TLS are answered in plain");
                None
            }
        };
        // The SSH host CA, made on the first start when there are SSH
        // targets: the agent answers as them with certificates it signs.
        let ssh_ca = if cfg
            .targets
            .iter()
            .any(|t| t.protocol == crate::config::Protocol::Ssh)
        {
            match crate::ssh_ca::SshHostCa::load_or_create(&cfg.agent.state_dir) {
                Ok(ca) => Some(Arc::new(ca)),
                Err(e) => {
                    tracing::warn!(error = %e, "no SSH host CA: SSH sessions are refused");
                    None
                }
            }
        } else {
            None
        };
        let proxy = Arc::new(Proxy {
            services,
            flows: kernel.clone(),
            workloads: workloads.clone(),
            targets: targets.clone(),
            handlers: Registry::new(Settings {
                dns: dns.clone(),
                tcp_idle_timeout: Duration::from_secs(cfg.agent.tcp_idle_timeout_secs.max(1)),
                ca: ca.clone(),
                ssh_ca,
            }),
            capture_bytes: cfg.audit.capture_bytes,
            capture_budget: crate::limits::CaptureBudget::new(
                cfg.audit.capture_workload_bytes_per_hour,
                Duration::from_secs(3600),
            ),
            limits: session_limits.clone(),
            audit_refuse: cfg.audit.on_failure == crate::config::OnFailure::Refuse,
            credentials: credentials
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
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
        for l in listeners.proxy {
            tokio::spawn(proxy.clone().serve(l));
        }
        // DNS of tagged loops (egress deny/audit): UDP on the proxy's
        // addresses and port number; TCP arrives through the proxy.
        if let Some(resolver) = &dns {
            for s in listeners.dns {
                tokio::spawn(resolver.clone().serve_udp(s, kernel.clone(), stop.clone()));
            }
        }
        recheck_on_reload(&proxy, &policy);
        kernel_readers(&kernel, &audit, &workloads, &host);
        re_resolve_targets(&cfg, &targets, &kernel, &stop);

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
        tokio::spawn(listeners.admin.serve(status, stop.clone()));
        if let Some(http) = listeners.admin_http {
            serve_admin_http(
                http,
                &cfg,
                tokens,
                AdminHttpSources {
                    kernel: kernel.clone(),
                    audit: audit.clone(),
                    approvals,
                    metrics,
                    limits: session_limits,
                },
                &stop,
            )?;
        }
        tracing::info!(
            listeners = ?listener_addrs,
            cgroup_root = %root.display(),
            egress = cfg.agent.egress.as_str(),
            targets = cfg.targets.len(),
            startup_ms = started.elapsed().as_millis() as u64,
            "loopgate agent ready"
        );
        Ok(App {
            cfg,
            stop,
            policy,
            audit,
            shipper,
            proxy,
        })
    }

    /// Serves until SIGTERM/SIGINT (SIGHUP reloads the policies), then
    /// drains: the listeners stop, open sessions get `shutdown_grace_secs`,
    /// then are closed; the audit queue is flushed to disk.
    pub(super) async fn serve(self, mut signals: Signals) {
        loop {
            tokio::select! {
                _ = signals.term.recv() => { tracing::info!("SIGTERM: draining"); break }
                _ = signals.int.recv() => { tracing::info!("SIGINT: draining"); break }
                _ = signals.hup.recv() => {
                    tracing::info!("SIGHUP: reloading policies");
                    let p = self.policy.clone();
                    let _ = tokio::task::spawn_blocking(move || p.reload()).await;
                }
            }
        }
        self.stop.cancel();
        let proxy = &self.proxy;
        proxy.tracker.close();
        let grace = Duration::from_secs(self.cfg.agent.shutdown_grace_secs);
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
        let a = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || a.close()).await;
        if let Some(s) = self.shipper {
            // Records spooled just now are shipped at the next start.
            let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
        }
        tracing::info!(
            "agent stopped; programs stay attached, so tagged loops fail closed until it is back"
        );
    }
}

/// The cgroups the programs attach to: the agent's root and every named
/// workload cgroup (which must exist).
fn attach_points(
    cfg: &Config,
    mount: &std::path::Path,
    root: &std::path::Path,
) -> Result<Vec<AttachPoint>, DaemonError> {
    let mut attach = vec![AttachPoint {
        label: "root".into(),
        cgroup: root.to_owned(),
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
    Ok(attach)
}

/// Approver tokens (for the approval page), by approver name.
fn approver_tokens(cfg: &Config) -> Result<Vec<(Secret, String)>, DaemonError> {
    let mut tokens = Vec::new();
    for (i, a) in cfg.approvers.iter().enumerate() {
        if let Some(p) = &a.token_file {
            tokens.push((
                crate::secrets::read_file(cfg, &format!("approvers[{i}].token_file"), p)?,
                a.name.clone(),
            ));
        }
    }
    Ok(tokens)
}

/// The recorder (queue → spool), the local retention task when the spool
/// is the store, and the ClickHouse shipper when one is configured.
fn start_audit(
    cfg: &Config,
    stop: &CancellationToken,
) -> Result<(Arc<Recorder>, Option<JoinHandle<()>>), DaemonError> {
    let audit = Arc::new(Recorder::open(
        &cfg.agent.state_dir,
        cfg.audit.clickhouse_url.is_some(),
    )?);
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
    let shipper = Ch::from_config(cfg)?.map(|ch| {
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
    Ok((audit, shipper))
}

/// Binds every socket the agent serves on, before anything is attached.
async fn bind(cfg: &Config) -> Result<Listeners, DaemonError> {
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
    let listen = |port| move |source| DaemonError::Listen { port, source };
    let proxy = proxy::bind(port).await.map_err(listen(port))?;
    let mut dns = Vec::new();
    if cfg.agent.egress != Egress::Allow {
        for ip in [
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from(Ipv6Addr::LOCALHOST),
        ] {
            dns.push(
                UdpSocket::bind(SocketAddr::new(ip, port))
                    .await
                    .map_err(listen(port))?,
            );
        }
    }
    // Callers in any attach point are tagged loops (refused on the socket).
    let tagged: Vec<&str> = std::iter::once(cfg.agent.cgroup_root.as_str())
        .chain(cfg.workloads.iter().map(|w| w.cgroup.as_str()))
        .collect();
    let admin = admin::Server::bind(
        &cfg.agent.admin_socket,
        cfg.agent.admin_group.as_deref(),
        &tagged,
    )?;
    let admin_http = match cfg.agent.admin_http {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(listen(addr.port()))?),
        None => None,
    };
    Ok(Listeners {
        proxy,
        dns,
        admin,
        admin_http,
    })
}

/// Sessions are bounded by the open-file limit, less a reserve for the
/// admin socket and the spool: one loop cannot make the agent hit EMFILE.
fn session_limits(cfg: &Config) -> Arc<SessionLimits> {
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
    SessionLimits::new(max_sessions, cfg.agent.max_sessions_per_workload)
}

/// The resolver of tagged loops' DNS, when egress is filtered.
fn dns_resolver(
    cfg: &Config,
    audit: &Arc<Recorder>,
    workloads: &Arc<WorkloadResolver>,
    host: &str,
) -> Result<Option<Arc<crate::dns::Resolver>>, DaemonError> {
    if cfg.agent.egress == Egress::Allow {
        return Ok(None);
    }
    let names = cfg
        .targets
        .iter()
        .filter_map(|t| match TargetAddress::parse(&t.address) {
            Ok(TargetAddress::Host { host, .. }) => Some(host),
            _ => None,
        })
        .collect();
    let policy = crate::dns::Policy::new(
        cfg.agent.egress == Egress::Audit,
        names,
        &cfg.agent.dns_allow,
    )
    .map_err(|reason| {
        DaemonError::Config(ConfigError::Invalid {
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
    Ok(Some(Arc::new(crate::dns::Resolver {
        policy: arc_swap::ArcSwap::from_pointee(policy),
        upstreams,
        audit: audit.clone(),
        workloads: workloads.clone(),
        host: host.to_owned(),
    })))
}

/// A reload re-checks open sessions: withdrawn permissions close them.
fn recheck_on_reload(proxy: &Arc<Proxy>, policy: &Arc<PolicyStore>) {
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

/// The kernel's denials become audit rows; its log lines, agent logs.
fn kernel_readers(
    kernel: &Kernel,
    audit: &Arc<Recorder>,
    workloads: &Arc<WorkloadResolver>,
    host: &str,
) {
    if let Some(rb) = kernel.take_denials() {
        let (audit, workloads, host) = (audit.clone(), workloads.clone(), host.to_owned());
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
}

/// Targets named by host are resolved again every `resolve_interval_secs`.
fn re_resolve_targets(
    cfg: &Config,
    targets: &Arc<TargetTable>,
    kernel: &Arc<Kernel>,
    stop: &CancellationToken,
) {
    let (targets, kernel, stop) = (targets.clone(), kernel.clone(), stop.clone());
    let every = Duration::from_secs(cfg.agent.resolve_interval_secs);
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

/// What the metrics page reads its gauges from.
struct AdminHttpSources {
    kernel: Arc<Kernel>,
    audit: Arc<Recorder>,
    approvals: Arc<Approvals>,
    metrics: Arc<Metrics>,
    limits: Arc<SessionLimits>,
}

/// `/metrics` and the approval page.
fn serve_admin_http(
    http: TcpListener,
    cfg: &Config,
    tokens: Vec<(Secret, String)>,
    src: AdminHttpSources,
    stop: &CancellationToken,
) -> Result<(), DaemonError> {
    let listen = http
        .local_addr()
        .map_err(|e| DaemonError::AdminHttp(e.to_string()))?;
    let AdminHttpSources {
        kernel,
        audit,
        approvals,
        metrics,
        limits,
    } = src;
    let (ap, m) = (approvals.clone(), metrics.clone());
    let state = Arc::new(
        crate::admin_http::HttpState::new(
            approvals,
            metrics,
            tokens,
            Box::new(move || {
                let st = audit.stats();
                m.set_gauges(
                    st.spool_pending_bytes,
                    st.dropped,
                    ap.pending_count(),
                    &kernel.stats(),
                    st.failing.is_some(),
                    limits.open(),
                );
            }),
            listen,
            cfg.approvals.page_url.as_deref(),
        )
        .map_err(|_| DaemonError::AdminHttp("cannot draw the CSRF key".into()))?,
    );
    tokio::spawn(crate::admin_http::serve(http, state, stop.clone()));
    Ok(())
}
