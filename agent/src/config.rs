//! Agent configuration: `agent.toml`.
//!
//! Parsing is strict: unknown keys, bad values and inconsistent settings are
//! errors that name the file, the key and the reason (and the line and column
//! when the TOML parser knows them). Credentials are only *references* (file
//! paths, environment variable names); this module never reads a secret, and
//! nothing here formats one.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/loopgate/agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {file}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {file}{location}: key `{key}`: {reason}")]
    Invalid {
        file: PathBuf,
        /// " line L, column C" when known.
        location: String,
        key: String,
        reason: String,
    },
}

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

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let location = inner
                .span()
                .map(|s| {
                    let (line, col) = line_col(text, s.start);
                    format!(" line {line}, column {col}")
                })
                .unwrap_or_default();
            ConfigError::Invalid {
                file: path.to_owned(),
                location,
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                reason: inner.message().trim().to_owned(),
            }
        })?;
        cfg.source = path.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.clone(),
            location: String::new(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.agent;
        if a.proxy_port == 0 {
            return Err(self.invalid("agent.proxy_port", "must be between 1 and 65535"));
        }
        validate_cgroup_path(&a.cgroup_root).map_err(|r| self.invalid("agent.cgroup_root", r))?;
        if !a.admin_socket.is_absolute() {
            return Err(self.invalid("agent.admin_socket", "must be an absolute path"));
        }
        if let Some(h) = a.admin_http {
            if !h.ip().is_loopback() {
                return Err(self.invalid(
                    "agent.admin_http",
                    "must be a loopback address (127.0.0.1:PORT or [::1]:PORT)",
                ));
            }
        }
        if !a.state_dir.is_absolute() {
            return Err(self.invalid("agent.state_dir", "must be an absolute path"));
        }
        if let Some(dir) = &a.bpf_pin_dir {
            if !dir.starts_with("/sys/fs/bpf") {
                return Err(self.invalid("agent.bpf_pin_dir", "must be below /sys/fs/bpf"));
            }
        }
        if a.shutdown_grace_secs > 3600 {
            return Err(self.invalid("agent.shutdown_grace_secs", "at most 3600"));
        }
        if a.resolve_interval_secs == 0 {
            return Err(self.invalid("agent.resolve_interval_secs", "must be at least 1"));
        }
        if a.connect_timeout_secs == 0 {
            return Err(self.invalid("agent.connect_timeout_secs", "must be at least 1"));
        }
        if parse_log_level(&a.ebpf_log).is_none() {
            return Err(self.invalid(
                "agent.ebpf_log",
                format!(
                    "`{}` is not one of off, error, warn, info, debug, trace",
                    a.ebpf_log
                ),
            ));
        }
        if let Some(url) = &self.audit.clickhouse_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(self.invalid(
                    "audit.clickhouse_url",
                    "must start with http:// or https://",
                ));
            }
        }
        let db = &self.audit.database;
        if db.is_empty() || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(self.invalid("audit.database", "may only contain letters, digits and '_'"));
        }
        if self.audit.retention_days == 0 {
            return Err(self.invalid("audit.retention_days", "must be at least 1"));
        }
        if !(10..=60_000).contains(&self.audit.flush_interval_ms) {
            return Err(self.invalid("audit.flush_interval_ms", "must be between 10 and 60000"));
        }
        if self.audit.capture_bytes > 1 << 30 {
            return Err(self.invalid("audit.capture_bytes", "at most 1 GiB per direction"));
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let key = |k: &str| format!("targets[{i}].{k}");
            validate_name(&t.name).map_err(|r| self.invalid(key("name"), r))?;
            if !names.insert(t.name.as_str()) {
                return Err(
                    self.invalid(key("name"), format!("duplicate target name `{}`", t.name))
                );
            }
            let addr =
                TargetAddress::parse(&t.address).map_err(|r| self.invalid(key("address"), r))?;
            if !addrs.insert(addr.to_string()) {
                return Err(self.invalid(
                    key("address"),
                    format!("`{}` is already registered by another target", t.address),
                ));
            }
            if let TargetAddress::Ip(sa) = addr {
                if sa.port() == a.proxy_port && sa.ip().is_loopback() {
                    return Err(self.invalid(key("address"), "is the proxy's own listen address"));
                }
            }
            if let Some(c) = &t.credential {
                if c.password_file.is_some() && c.password_env.is_some() {
                    return Err(self.invalid(
                        key("credential"),
                        "set password_file or password_env, not both",
                    ));
                }
                if c.token_file.is_some() && c.token_env.is_some() {
                    return Err(
                        self.invalid(key("credential"), "set token_file or token_env, not both")
                    );
                }
                let has_password = c.password_file.is_some() || c.password_env.is_some();
                if t.protocol == Protocol::Postgres && has_password && c.username.is_none() {
                    return Err(self.invalid(
                        key("credential"),
                        "a postgres password needs its username (the loop must not pick the role that gets it)",
                    ));
                }
            }
            if let Some(m) = &t.auth_methods {
                if t.protocol != Protocol::Postgres {
                    return Err(
                        self.invalid(key("auth_methods"), "applies to postgres targets only")
                    );
                }
                if let Some(bad) = m
                    .iter()
                    .find(|x| !["scram-sha-256", "md5", "password"].contains(&x.as_str()))
                {
                    return Err(self.invalid(
                        key("auth_methods"),
                        format!("`{bad}` is not scram-sha-256, md5 or password"),
                    ));
                }
            }
        }
        for (i, w) in self.approvals.webhooks.iter().enumerate() {
            // The reason never echoes the URL: it is a secret.
            crate::http_client::parse_url(w)
                .map_err(|r| self.invalid(format!("approvals.webhooks[{i}]"), r))?;
        }
        let mut approvers = HashSet::new();
        for (i, a) in self.approvers.iter().enumerate() {
            validate_name(&a.name).map_err(|r| self.invalid(format!("approvers[{i}].name"), r))?;
            if !approvers.insert(a.name.as_str()) {
                return Err(self.invalid(
                    format!("approvers[{i}].name"),
                    format!("duplicate approver `{}`", a.name),
                ));
            }
            if a.uid.is_some() == a.user.is_some() {
                return Err(
                    self.invalid(format!("approvers[{i}]"), "set exactly one of uid or user")
                );
            }
        }
        let mut wl = HashSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            validate_name(&w.name).map_err(|r| self.invalid(format!("workloads[{i}].name"), r))?;
            if !wl.insert(w.name.as_str()) {
                return Err(self.invalid(
                    format!("workloads[{i}].name"),
                    format!("duplicate workload name `{}`", w.name),
                ));
            }
            validate_cgroup_path(&w.cgroup)
                .map_err(|r| self.invalid(format!("workloads[{i}].cgroup"), r))?;
            let root = a.cgroup_root.trim_matches('/');
            let cg = w.cgroup.trim_matches('/');
            if cg == root
                || cg.starts_with(&format!("{root}/"))
                || root.starts_with(&format!("{cg}/"))
            {
                return Err(self.invalid(
                    format!("workloads[{i}].cgroup"),
                    format!("overlaps agent.cgroup_root `{}`", a.cgroup_root),
                ));
            }
        }
        Ok(())
    }

    /// Where programs, links and maps are pinned.
    pub fn pin_dir(&self) -> PathBuf {
        match &self.agent.bpf_pin_dir {
            Some(d) => d.clone(),
            None => PathBuf::from("/sys/fs/bpf/loopgate")
                .join(self.agent.cgroup_root.trim_matches('/').replace('/', "_")),
        }
    }
}

/// A workload or target name: used in cgroup directory names and audit rows.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        return Err(format!(
            "`{name}` may only contain letters, digits, '-', '_' and '.' (not first)"
        ));
    }
    Ok(())
}

fn validate_cgroup_path(p: &str) -> Result<(), String> {
    let trimmed = p.trim_matches('/');
    if trimmed.is_empty() {
        return Err("must name a cgroup below the cgroup2 mount, not the mount itself".into());
    }
    if trimmed
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!("`{p}` is not a plain relative cgroup path"));
    }
    Ok(())
}

/// 1-based line and column of a byte offset (for file:line:column messages).
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl Config {
    /// Approver uid → name, resolving `user` entries.
    pub fn approver_uids(&self) -> Result<std::collections::HashMap<u32, String>, ConfigError> {
        let mut m = std::collections::HashMap::new();
        for (i, a) in self.approvers.iter().enumerate() {
            let uid = match (a.uid, &a.user) {
                (Some(u), _) => u,
                (None, Some(user)) => {
                    let c = std::ffi::CString::new(user.as_str()).map_err(|_| {
                        self.invalid(format!("approvers[{i}].user"), "not a valid user name")
                    })?;
                    // SAFETY: getpwnam returns static storage or null; pw_uid is copied at once.
                    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
                    if pw.is_null() {
                        return Err(self.invalid(
                            format!("approvers[{i}].user"),
                            format!("no user `{user}` on this host"),
                        ));
                    }
                    unsafe { (*pw).pw_uid }
                }
                (None, None) => continue,
            };
            if let Some(other) = m.insert(uid, a.name.clone()) {
                return Err(self.invalid(
                    format!("approvers[{i}]"),
                    format!("uid {uid} is already approver `{other}`"),
                ));
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/loopgate/agent.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("[agent]\n").unwrap();
        assert_eq!(c.agent.proxy_port, 975);
        assert_eq!(c.agent.cgroup_root, "loopgate");
        assert_eq!(c.agent.egress, Egress::Allow);
        assert_eq!(c.pin_dir(), PathBuf::from("/sys/fs/bpf/loopgate/loopgate"));
    }

    #[test]
    fn unknown_key_names_file_key_and_line() {
        let e = parse("[agent]\nproxy_port = 15001\nproxy_prot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/loopgate/agent.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("proxy_prot"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let e = parse("[agent]\negress = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.egress"), "{e}");
        assert!(e.contains("sometimes"), "{e}");
        let e = parse("[agent]\n[[targets]]\nname = \"db\"\naddress = \"10.0.0.5\"\nprotocol = \"postgres\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("targets[0].address"), "{e}");
        assert!(e.contains("no port"), "{e}");
    }

    #[test]
    fn unknown_credential_key_is_an_error() {
        let e = parse(
            "[agent]\n[[targets]]\nname = \"db\"\naddress = \"10.0.0.5:5432\"\nprotocol = \"postgres\"\n[targets.credential]\npasword_file = \"/x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("targets[0].credential.pasword_file"), "{e}");
    }

    #[test]
    fn postgres_credentials_name_their_role_and_login_methods() {
        let t = |extra: &str| {
            parse(&format!(
                "[agent]\n[[targets]]\nname = \"db\"\naddress = \"10.0.0.5:5432\"\nprotocol = \"postgres\"\n{extra}"
            ))
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let e = t("[targets.credential]\npassword_file = \"/x\"\n").unwrap_err();
        assert!(
            e.contains("targets[0].credential") && e.contains("needs its username"),
            "{e}"
        );
        assert!(t("auth_methods = [\"scram-sha-256\", \"md5\"]\n").is_ok());
        let e = t("auth_methods = [\"trust\"]\n").unwrap_err();
        assert!(
            e.contains("`trust` is not scram-sha-256, md5 or password"),
            "{e}"
        );
    }

    #[test]
    fn webhooks_may_be_https_and_nothing_else() {
        let c =
            parse("[agent]\n[approvals]\nwebhooks = [\"https://hooks.example/T0/B0/secret\"]\n");
        assert!(c.is_ok(), "{:?}", c.err().map(|e| e.to_string()));
        let e = parse("[agent]\n[approvals]\nwebhooks = [\"ftp://hooks.example/secret\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("approvals.webhooks[0]"), "{e}");
        assert!(e.contains("must be an http:// or https:// URL"), "{e}");
        assert!(!e.contains("secret"), "the URL is a secret: {e}");
    }

    #[test]
    fn target_addresses() {
        assert_eq!(
            TargetAddress::parse("127.10.0.5:5432").unwrap(),
            TargetAddress::Ip("127.10.0.5:5432".parse().unwrap())
        );
        assert_eq!(
            TargetAddress::parse("[::1]:80").unwrap(),
            TargetAddress::Ip("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            TargetAddress::parse("db.internal:5432").unwrap(),
            TargetAddress::Host {
                host: "db.internal".into(),
                port: 5432
            }
        );
        assert!(TargetAddress::parse("::1:80").is_err());
        assert!(TargetAddress::parse("db:0").is_err());
        assert!(TargetAddress::parse("db:99999").is_err());
        assert!(TargetAddress::parse("bad host:1").is_err());
    }

    #[test]
    fn duplicate_targets_rejected() {
        let e = parse(
            "[agent]\n[[targets]]\nname = \"a\"\naddress = \"127.0.0.2:1\"\nprotocol = \"tcp\"\n[[targets]]\nname = \"a\"\naddress = \"127.0.0.3:1\"\nprotocol = \"tcp\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("targets[1].name"), "{e}");
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/agent.toml");
        let c = Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.agent.proxy_port, 975);
        assert_eq!(c.targets[0].name, "orders-db");
        assert_eq!(c.approvers[0].name, "alice");
    }

    #[test]
    fn credential_debug_hides_paths_and_values() {
        let c = CredentialConfig {
            username: Some("app".into()),
            password_file: Some("/etc/loopgate/secrets/hunter2".into()),
            ..Default::default()
        };
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2"), "{d}");
    }
}
