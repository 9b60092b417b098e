//! The checks made on a parsed `agent.toml`: values in range, paths
//! absolute, names and cgroups well formed, credentials consistent with
//! their target's protocol. Each error names the key.

use std::collections::HashSet;

use super::{parse_log_level, Config, ConfigError, Protocol, TargetAddress};

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
            if (t.pool_size.is_some() || t.pool_idle_timeout_secs.is_some())
                && t.protocol != Protocol::Postgres
            {
                return Err(self.invalid(key("pool_size"), "applies to postgres targets only"));
            }
            for (k, v) in [
                ("max_message_bytes", t.max_message_bytes),
                ("max_result_message_bytes", t.max_result_message_bytes),
            ] {
                let Some(v) = v else { continue };
                if t.protocol != Protocol::Postgres {
                    return Err(self.invalid(key(k), "applies to postgres targets only"));
                }
                // PostgreSQL itself allocates no more than 1 GiB for one
                // message; below 64 KiB ordinary statements and rows fail.
                if !(64 << 10..=1 << 30).contains(&v) {
                    return Err(self.invalid(key(k), "between 65536 and 1073741824"));
                }
            }
            if t.pool_size.is_some_and(|n| n > 1000) {
                return Err(self.invalid(key("pool_size"), "at most 1000"));
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

pub(super) fn validate_cgroup_path(p: &str) -> Result<(), String> {
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
