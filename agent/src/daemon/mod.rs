//! `loopgate agent`: assembles the pieces ([`app`]: one step per concern,
//! in start-up order) and runs until SIGTERM/SIGINT, then drains.
//!
//! Order matters: the proxy listeners and the admin socket are bound before the
//! kernel programs are attached, so a redirected loop never meets a closed
//! port while the agent is healthy; and the programs stay attached (pinned)
//! after the agent exits, so loops fail closed while it is down.

use std::{path::PathBuf, time::Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::{admin, cgroup, config::Config, ebpf};

mod app;
mod denials;
mod status;

use app::App;

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

/// Runs the agent until SIGTERM/SIGINT, then drains.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let started = Instant::now();
    // Handlers first: a SIGTERM that arrives while starting must drain, not kill.
    let signals = Signals::install()?;
    let agent = App::build(cfg, started).await?;
    agent.serve(signals).await;
    Ok(())
}

/// The signals the agent acts on.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Result<Self, DaemonError> {
        let on = |k| signal(k).map_err(DaemonError::Signal);
        Ok(Signals {
            term: on(SignalKind::terminate())?,
            int: on(SignalKind::interrupt())?,
            hup: on(SignalKind::hangup())?,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}
