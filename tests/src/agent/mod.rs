//! The agent under test: [`Agent`] starts a real `loopgate agent` from an
//! [`AgentSpec`], talks to it through its CLI, and runs tagged loops through
//! `loopgate exec`.

pub mod cgroup;
pub mod loops;
pub mod spec;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use self::{
    cgroup::{cgroup2_mount, remove_cgroup_tree},
    spec::{free_privileged_port, AgentSpec},
};
use crate::util::set_mode;

/// The `loopgate` binary under test (`LOOPGATE_BIN`, set by `cargo xtask test`).
pub fn loopgate_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LOOPGATE_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/loopgate");
    assert!(
        p.exists(),
        "{} missing: run the end-to-end tests with `cargo xtask test`",
        p.display()
    );
    p
}

pub fn require_root() {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid,
        0,
        "end-to-end tests attach eBPF programs and create cgroups: run them as root (`cargo xtask test`)"
    );
}

pub struct Agent {
    pub name: String,
    pub root: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
    launcher: Vec<String>,
    child: Option<Child>,
}

impl Agent {
    pub fn start(spec: AgentSpec) -> Agent {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix(&format!("lgt-{}-", spec.name))
            .tempdir()
            .expect("tempdir");
        // Loops run as nobody and must be able to read their scripts here.
        set_mode(dir.path(), 0o755);
        let root = format!("lgt-{}", spec.name);
        let port = free_privileged_port();
        let config = spec.write(dir.path(), &root, port);
        let mut a = Agent {
            name: spec.name,
            root,
            dir,
            config,
            port,
            launcher: spec.launcher,
            child: None,
        };
        a.spawn();
        a
    }

    /// Starts the agent process (again) and waits until its admin socket answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("agent log");
        let mut cmd = match self.launcher.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(loopgate_bin());
                c
            }
            None => Command::new(loopgate_bin()),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .arg("agent")
            .env("LOOPGATE_LOG", "info,loopgate=debug,aya::bpf=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn loopgate agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited during start-up ({st}); log:\n{}", self.log());
            }
            if self.try_status().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after 30 s; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `loopgate --config <ours>`, to add a subcommand and its arguments to.
    pub fn command(&self) -> Command {
        let mut c = Command::new(loopgate_bin());
        c.arg("--config").arg(&self.config);
        c
    }

    /// `loopgate --config <ours> ARGS...` as another user (setpriv).
    pub fn cli_as(&self, user: &str, group: &str, args: &[&str]) -> Output {
        Command::new("setpriv")
            .arg(format!("--reuid={user}"))
            .arg(format!("--regid={group}"))
            .arg("--clear-groups")
            .arg(loopgate_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run loopgate as another user")
    }

    /// `loopgate --config <ours> ARGS...`
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run loopgate")
    }

    fn try_status(&self) -> Option<Value> {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Kernel counter from `status` (redirected, denied, ...).
    pub fn counter(&self, name: &str) -> u64 {
        self.status()["kernel_counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no kernel counter {name}"))
    }

    /// `loopgate sessions --json`, one object per line.
    pub fn sessions(&self) -> Vec<Value> {
        let out = self.cli(&["sessions", "--json"]);
        assert!(
            out.status.success(),
            "sessions failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("session JSON line"))
            .collect()
    }

    /// Waits until `pred` holds for the recorded sessions (records are written
    /// asynchronously, after the loop has already seen its connection close).
    pub fn wait_sessions(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.sessions();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for sessions: {what}; have {} rows: {s:#?}\nagent log:\n{}",
                s.len(),
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the recorder has written at least `n` records to the spool.
    pub fn wait_sessions_spooled(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.status();
            if st["audit"]["spooled"].as_u64().unwrap_or(0) >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} records spooled: {st}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The requests held for approval (`loopgate approvals list --json`, as
    /// root), one object each.
    pub fn approvals(&self) -> Vec<Value> {
        let out = self.cli(&["approvals", "list", "--json"]);
        assert!(
            out.status.success(),
            "approvals list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("approval JSON line"))
            .collect()
    }

    /// The first request held for approval, once there is one (15 s at most).
    pub fn wait_approval(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(p) = self.approvals().into_iter().next() {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "nothing held for approval:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The id of the first request held for approval, once there is one.
    pub fn wait_approval_id(&self) -> String {
        self.wait_approval()["approval_id"]
            .as_str()
            .expect("approval_id")
            .to_owned()
    }

    /// The records of session `id` as `loopgate replay --json` prints
    /// them (the session, events, chunks), one JSON value each.
    pub fn replay_json(&self, id: &str) -> Vec<Value> {
        let r = self.cli(&["replay", "--json", id]);
        String::from_utf8_lossy(&r.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("replay --json prints JSON lines"))
            .collect()
    }

    /// `loopgate trust install|uninstall`, one at a time across tests: it
    /// rewrites host-wide files (`update-ca-certificates`,
    /// `/etc/ssh/ssh_known_hosts`).
    pub fn trust(&self, action: &str) -> Output {
        use std::os::fd::AsRawFd;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/loopgate-e2e-trust.lock")
            .expect("trust lock");
        // SAFETY: flock(2) on a descriptor this function owns; the lock
        // goes with the descriptor when `lock` is dropped.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        self.cli(&["trust", action])
    }

    /// `loopgate exec --workload W -- ARGS...` (as nobody).
    pub fn exec(&self, workload: &str, args: &[&str]) -> Output {
        let mut a = vec!["exec", "--workload", workload, "--"];
        a.extend_from_slice(args);
        self.cli(&a)
    }

    /// A tagged Python loop (`/usr/bin/python3 -c SCRIPT ARGS...`).
    pub fn python(&self, workload: &str, script: &str, args: &[&str]) -> Output {
        self.python_with("/usr/bin/python3", workload, script, args)
    }

    /// A tagged Python loop run by the interpreter `python` (the PyPI loops'
    /// venv: [`crate::loops_python`]).
    pub fn python_with(&self, python: &str, workload: &str, script: &str, args: &[&str]) -> Output {
        let path = self.dir.path().join(format!("loop-{}.py", rand_suffix()));
        std::fs::write(&path, script).expect("write script");
        set_mode(&path, 0o644);
        let p = path.to_string_lossy().into_owned();
        let mut a = vec![python, p.as_str()];
        a.extend_from_slice(args);
        self.exec(workload, &a)
    }

    /// Spawns a long-running tagged process (stdin and stdout piped).
    pub fn spawn_exec(&self, workload: &str, args: &[&str]) -> Child {
        self.spawn_exec_with(workload, &[], args)
    }

    /// [`Agent::spawn_exec`] with more `loopgate exec` flags (`--user U`).
    pub fn spawn_exec_with(&self, workload: &str, exec_flags: &[&str], args: &[&str]) -> Child {
        self.command()
            .args(["exec", "--workload", workload])
            .args(exec_flags)
            .arg("--")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tagged loop")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGKILL: no clean-up at all, like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9 agent");
            c.wait().expect("reap agent");
        }
    }

    /// SIGTERM, then wait for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().expect("wait agent") {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/loopgate/{}", self.root));
        remove_cgroup_tree(&cgroup2_mount().join(&self.root));
        if thread::panicking() {
            eprintln!("---- agent {} log ----\n{}", self.name, self.log());
        }
    }
}

fn rand_suffix() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    (std::process::id() as u64) << 20 | N.fetch_add(1, Ordering::Relaxed) as u64
}

/// Whether `needle` occurs anywhere in the agent's state directory (spool
/// segments: every audit record) or its log.
pub fn agent_files_contain(agent: &Agent, needle: &str) -> bool {
    fn walk(p: &Path, needle: &[u8]) -> bool {
        let Ok(rd) = std::fs::read_dir(p) else {
            return std::fs::read(p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false);
        };
        rd.flatten().any(|e| walk(&e.path(), needle))
    }
    walk(&agent.path("state"), needle.as_bytes()) || agent.log().contains(needle)
}
