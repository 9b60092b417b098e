//! [`AgentSpec`]: what a test agent is configured with, and the `agent.toml`
//! and policy files written for it.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

/// A free port below 1024 on 127.0.0.1 and ::1: the proxy port of a test
/// agent (the agent refuses ports any local user could bind).
pub fn free_privileged_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let start = (std::process::id() as usize * 7919) % 400;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 600 + ((start + n * 37) % 420) as u16;
        let Ok(l) = TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        if TcpListener::bind(("::1", port)).is_ok() {
            drop(l);
            return port;
        }
    }
}

/// Config of a test agent; `extra` is appended verbatim (targets, workloads).
pub struct AgentSpec {
    pub name: String,
    pub egress: &'static str,
    /// More `[agent]` keys.
    pub agent_extra: String,
    pub extra: String,
    /// Policy files (name, text) written to the agent's policy directory.
    pub policies: Vec<(String, String)>,
    /// A command the agent runs under (e.g. `prlimit --nofile=512:512`).
    pub launcher: Vec<String>,
}

impl AgentSpec {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            egress: "allow",
            agent_extra: String::new(),
            extra: String::new(),
            policies: Vec::new(),
            launcher: Vec::new(),
        }
    }

    pub fn policy(mut self, file: &str, text: &str) -> Self {
        self.policies.push((file.to_owned(), text.to_owned()));
        self
    }

    /// An extra `[agent]` key line.
    pub fn agent_key(mut self, line: &str) -> Self {
        self.agent_extra.push_str(line);
        self.agent_extra.push('\n');
        self
    }

    /// Runs the agent under `cmd` (its arguments, then the agent's).
    pub fn launcher(mut self, cmd: &[&str]) -> Self {
        self.launcher = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn egress(mut self, e: &'static str) -> Self {
        self.egress = e;
        self
    }

    pub fn target(mut self, name: &str, address: &str, protocol: &str) -> Self {
        self.extra.push_str(&format!(
            "\n[[targets]]\nname = \"{name}\"\naddress = \"{address}\"\nprotocol = \"{protocol}\"\n"
        ));
        self
    }

    pub fn raw(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// Writes the policy files to `dir/policies` and the config to
    /// `dir/agent.toml` (cgroup root `root`, proxy port `port`, admin socket,
    /// state and policies under `dir`); returns the config's path.
    pub(crate) fn write(&self, dir: &Path, root: &str, port: u16) -> PathBuf {
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).expect("policies dir");
        for (name, text) in &self.policies {
            std::fs::write(policies.join(name), text).expect("write policy");
        }
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\ncgroup_root = \"{root}\"\nproxy_port = {port}\nadmin_socket = \"{d}/admin.sock\"\nstate_dir = \"{d}/state\"\npolicies = \"{d}/policies\"\negress = \"{e}\"\nshutdown_grace_secs = 2\n{a}{x}",
                d = dir.display(),
                e = self.egress,
                a = self.agent_extra,
                x = self.extra
            ),
        )
        .expect("write config");
        config
    }
}
