//! The schema of `agent.toml`: what each key is, its type and its
//! default (serde, `deny_unknown_fields`).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Existing cgroups (for example a systemd unit's) that are treated as
    /// workloads in addition to `<cgroup_root>/<workload>/...`.
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// Who may decide approvals: the admin socket peer's uid → approver name.
    #[serde(default)]
    pub approvers: Vec<ApproverConfig>,
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// The file this was read from (for messages).
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Below the cgroup2 mount; loops live in `<root>/<workload>/<instance>`.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: String,
    /// Below `net.ipv4.ip_unprivileged_port_start` (usually 1024), so no
    /// other local user can bind it while the agent restarts.
    #[serde(default = "default_proxy_port")]
    pub proxy_port: u16,
    /// Allow a `proxy_port` any local user could bind (tests, development).
    #[serde(default)]
    pub allow_unprivileged_port: bool,
    /// Sessions open at once, over all workloads (also bounded by the open
    /// file limit, less a reserve for the admin socket and the spool).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Sessions open at once per workload: one loop cannot starve the others.
    #[serde(default = "default_max_sessions_per_workload")]
    pub max_sessions_per_workload: usize,
    /// Names (globs, e.g. `*.internal`) tagged loops may resolve under
    /// egress `deny`, besides the targets' host names.
    #[serde(default)]
    pub dns_allow: Vec<String>,
    /// Resolvers the agent asks for allowed names (default: the
    /// `nameserver`s of /etc/resolv.conf, port 53).
    #[serde(default)]
    pub dns_upstreams: Vec<SocketAddr>,
    /// A raw TCP session with no bytes either way for this long is closed.
    #[serde(default = "default_tcp_idle_timeout")]
    pub tcp_idle_timeout_secs: u64,
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Loopback address of the admin HTTP port (`/metrics`, the approval page).
    #[serde(default)]
    pub admin_http: Option<SocketAddr>,
    /// Group allowed to use the admin socket (mode 0660). Without it the socket
    /// is 0600 and only root (and the agent's own uid) may connect.
    #[serde(default)]
    pub admin_group: Option<String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_policies")]
    pub policies: PathBuf,
    #[serde(default)]
    pub egress: Egress,
    /// Where programs, links and maps are pinned in bpffs. Default:
    /// `/sys/fs/bpf/loopgate/<cgroup_root with '/' replaced by '_'>`.
    #[serde(default)]
    pub bpf_pin_dir: Option<PathBuf>,
    /// How long SIGTERM waits for open sessions before closing them.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// How often host names in target addresses are resolved again.
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval_secs: u64,
    /// Upstream connect timeout of the proxy.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Log level of the kernel programs' aya-log output (`off`, `error`, `warn`,
    /// `info`, `debug`, `trace`).
    #[serde(default = "default_ebpf_log")]
    pub ebpf_log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Connect fails with EPERM in the kernel; the denial is recorded.
    Deny,
    /// Redirected to the proxy and relayed as raw TCP, with a recorded session.
    Audit,
    /// Untouched.
    #[default]
    Allow,
}

impl Egress {
    pub fn as_str(self) -> &'static str {
        match self {
            Egress::Deny => "deny",
            Egress::Audit => "audit",
            Egress::Allow => "allow",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Absent: the local store (the spool in `state_dir`) only.
    #[serde(default)]
    pub clickhouse_url: Option<String>,
    #[serde(default = "default_database")]
    pub database: String,
    /// ClickHouse user (default: the server's `default` user).
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the ClickHouse password (never logged).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Days of audit kept in ClickHouse (TTL, or partition drops on 18.16).
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Payload bytes captured per session and direction for replay.
    #[serde(default = "default_capture_bytes")]
    pub capture_bytes: u64,
    /// Longest wait between INSERTs while the spool has records to ship.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// When the spool cannot take records (disk full): `refuse` new sessions
    /// (strict recording; open ones continue) or `continue` unrecorded.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Payload captured per workload and hour, over all its sessions.
    #[serde(default = "default_capture_workload_bytes")]
    pub capture_workload_bytes_per_hour: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Refuse,
    Continue,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            clickhouse_url: None,
            database: default_database(),
            user: None,
            password_file: None,
            retention_days: default_retention_days(),
            capture_bytes: default_capture_bytes(),
            flush_interval_ms: default_flush_interval_ms(),
            on_failure: OnFailure::default(),
            capture_workload_bytes_per_hour: default_capture_workload_bytes(),
        }
    }
}

pub use crate::kinds::Protocol;

/// `agent.ebpf_log`: the kernel programs' log level (aya-log), by name.
pub fn parse_log_level(s: &str) -> Option<u8> {
    Some(match s {
        "off" => 0,
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        "debug" => 4,
        "trace" => 5,
        _ => return None,
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// `ip:port`, `[ipv6]:port` or `host:port`.
    pub address: String,
    pub protocol: Protocol,
    #[serde(default)]
    pub credential: Option<CredentialConfig>,
    /// PostgreSQL targets: the login methods the agent will answer with the
    /// stored password (`scram-sha-256`, `md5`, `password`). Default: SCRAM
    /// only, so a server (or anyone in between) cannot downgrade the login
    /// and collect the password.
    #[serde(default)]
    pub auth_methods: Option<Vec<String>>,
    /// PostgreSQL targets: logged-in server connections kept per database,
    /// role and start-up settings for the next loop session (reset with
    /// `DISCARD ALL`); 0 turns pooling off. Default 4.
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// PostgreSQL targets: how long a kept connection waits for a session
    /// (default 60).
    #[serde(default)]
    pub pool_idle_timeout_secs: Option<u64>,
    /// PostgreSQL targets: the largest protocol message the agent reads from
    /// the loop (default 64 MiB); a larger one ends that session with a
    /// FATAL.
    #[serde(default)]
    pub max_message_bytes: Option<u64>,
    /// PostgreSQL targets: the largest message the agent reads from the
    /// server (a row; default 256 MiB).
    #[serde(default)]
    pub max_result_message_bytes: Option<u64>,
}

/// References to a stored credential. Only paths and variable names live here.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub known_hosts_file: Option<PathBuf>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for CredentialConfig {
    /// Names which references are set, never their contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialConfig")
            .field("username", &self.username)
            .field("password_file", &self.password_file.is_some())
            .field("password_env", &self.password_env.is_some())
            .field("key_file", &self.key_file.is_some())
            .field("token_file", &self.token_file.is_some())
            .field("token_env", &self.token_env.is_some())
            .field("cert_file", &self.cert_file.is_some())
            .finish_non_exhaustive()
    }
}

/// Notifications of held requests.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// `http://` or `https://` URLs that receive a Slack-compatible JSON POST
    /// for each held request (`https` verified against the system roots).
    /// Treated as secrets (a Slack webhook URL carries its token): only the
    /// host is ever logged.
    #[serde(default)]
    pub webhooks: Vec<String>,
    /// Link to the approval page put in notifications, e.g.
    /// `http://127.0.0.1:15002/approvals`.
    #[serde(default)]
    pub page_url: Option<String>,
    /// Requests one workload may have held at once (default 16); more are
    /// refused at once, so one loop cannot flood the approvers.
    #[serde(default)]
    pub max_pending_per_workload: Option<usize>,
}

impl ApprovalsConfig {
    pub fn max_pending(&self) -> usize {
        self.max_pending_per_workload
            .unwrap_or_else(default_max_pending_approvals)
    }
}

impl fmt::Debug for ApprovalsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApprovalsConfig")
            .field("webhooks", &self.webhooks.len())
            .field("page_url", &self.page_url)
            .field("max_pending_per_workload", &self.max_pending_per_workload)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    pub name: String,
    /// The approver's uid, or `user` (a login name resolved at start).
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    /// File holding this approver's token for the approval page.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    /// Path below the cgroup2 mount, e.g. `system.slice/nightly-etl.service`.
    pub cgroup: String,
}

/// A target address as written in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAddress {
    Ip(SocketAddr),
    Host { host: String, port: u16 },
}

impl fmt::Display for TargetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddress::Ip(a) => write!(f, "{a}"),
            TargetAddress::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl TargetAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err("port 0 is not a valid target port".into());
            }
            return Ok(TargetAddress::Ip(a));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` has no port (expected ip:port or host:port)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` is not a port number (1-65535)"))?;
        if port == 0 {
            return Err("port 0 is not a valid target port".into());
        }
        if host.is_empty() {
            return Err(format!("`{s}` has an empty host"));
        }
        if host.parse::<IpAddr>().is_ok() || host.contains(':') {
            return Err(format!(
                "`{s}`: write IPv6 addresses in brackets, e.g. [fd00::5]:5432"
            ));
        }
        let valid = host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
        if !valid || host.len() > 253 {
            return Err(format!("`{host}` is not a valid host name"));
        }
        Ok(TargetAddress::Host {
            host: host.to_owned(),
            port,
        })
    }
}

fn default_cgroup_root() -> String {
    "loopgate".into()
}
fn default_proxy_port() -> u16 {
    975
}
fn default_admin_socket() -> PathBuf {
    "/run/loopgate/admin.sock".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/loopgate".into()
}
fn default_policies() -> PathBuf {
    "/etc/loopgate/policies".into()
}
fn default_shutdown_grace() -> u64 {
    10
}
fn default_resolve_interval() -> u64 {
    30
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_ebpf_log() -> String {
    "info".into()
}
fn default_database() -> String {
    "loopgate".into()
}
fn default_retention_days() -> u32 {
    90
}
fn default_capture_bytes() -> u64 {
    1 << 20
}
fn default_capture_workload_bytes() -> u64 {
    1 << 30
}
fn default_max_sessions() -> usize {
    8192
}
fn default_max_sessions_per_workload() -> usize {
    1024
}
fn default_tcp_idle_timeout() -> u64 {
    3600
}
fn default_max_pending_approvals() -> usize {
    16
}
fn default_flush_interval_ms() -> u64 {
    1000
}
