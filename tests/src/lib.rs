//! Harness for loopgate's end-to-end tests: real agent processes with real eBPF
//! programs attached to real cgroups, real servers on loopback aliases
//! (127.10.0.0/16), and real clients (curl, /usr/bin/python3) run as tagged
//! loops through `loopgate exec`.
//!
//! Every test agent gets its own cgroup root (`lgt-<name>`), pin directory,
//! proxy port, admin socket and state directory, so tests run in parallel. The
//! [`Agent`] guard stops the agent and detaches everything on drop; `cargo xtask
//! test` also removes leftovers of an interrupted run first.
//!
//! Tests `panic!` with context rather than returning errors (backtraces).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

pub use serde_json::Value;

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
    // SAFETY: geteuid has no failure mode.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests attach eBPF programs and create cgroups: run them as root (`cargo xtask test`)"
    );
}

pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .expect("a cgroup2 mount")
}

/// A free TCP port on 127.0.0.1 (and, in practice, ::1).
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().unwrap().port();
        drop(l);
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
}

/// Config of a test agent; `extra` is appended verbatim (targets, workloads).
pub struct AgentSpec {
    pub name: String,
    pub egress: &'static str,
    pub extra: String,
}

impl AgentSpec {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            egress: "allow",
            extra: String::new(),
        }
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
}

pub struct Agent {
    pub name: String,
    pub root: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
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
        let port = free_port();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\ncgroup_root = \"{root}\"\nproxy_port = {port}\nadmin_socket = \"{d}/admin.sock\"\nstate_dir = \"{d}/state\"\negress = \"{e}\"\nshutdown_grace_secs = 2\n{x}",
                d = dir.path().display(),
                e = spec.egress,
                x = spec.extra
            ),
        )
        .expect("write config");
        let mut a = Agent {
            name: spec.name,
            root,
            dir,
            config,
            port,
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
        let child = Command::new(loopgate_bin())
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

    /// `loopgate --config <ours> ARGS...`
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(loopgate_bin())
            .arg("--config")
            .arg(&self.config)
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

    /// `loopgate exec --workload W -- ARGS...` (as nobody).
    pub fn exec(&self, workload: &str, args: &[&str]) -> Output {
        let mut a = vec!["exec", "--workload", workload, "--"];
        a.extend_from_slice(args);
        self.cli(&a)
    }

    /// A tagged Python loop (`/usr/bin/python3 -c SCRIPT ARGS...`).
    pub fn python(&self, workload: &str, script: &str, args: &[&str]) -> Output {
        let path = self.dir.path().join(format!("loop-{}.py", rand_suffix()));
        std::fs::write(&path, script).expect("write script");
        set_mode(&path, 0o644);
        let p = path.to_string_lossy().into_owned();
        let mut a = vec!["/usr/bin/python3", p.as_str()];
        a.extend_from_slice(args);
        self.exec(workload, &a)
    }

    /// Spawns a long-running tagged process (for restart tests).
    pub fn spawn_exec(&self, workload: &str, args: &[&str]) -> Child {
        Command::new(loopgate_bin())
            .arg("--config")
            .arg(&self.config)
            .args(["exec", "--workload", workload, "--"])
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

pub fn remove_cgroup_tree(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn rand_suffix() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    (std::process::id() as u64) << 20 | N.fetch_add(1, Ordering::Relaxed) as u64
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A TCP echo server on a loopback address, counting accepted connections.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl EchoServer {
    pub fn start(ip: &str) -> EchoServer {
        let l =
            TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind echo server on {ip}: {e}"));
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        EchoServer { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A minimal HTTP/1.1 server on a loopback address: answers every request with
/// `body`, closing the connection.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
}

impl HttpServer {
    pub fn start(ip: &str, body: &'static str) -> HttpServer {
        let l =
            TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind http server on {ip}: {e}"));
        let addr = l.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let r = requests.clone();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let r = r.clone();
                thread::spawn(move || {
                    let mut reader = BufReader::new(s.try_clone().unwrap());
                    let mut line = String::new();
                    // Request line and headers up to the blank line.
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" || line == "\n" => break,
                            Ok(_) => {}
                        }
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    let mut s = s;
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        body.len(),
                        body
                    );
                });
            }
        });
        HttpServer { addr, requests }
    }
}

/// Connects directly (from the test process, which is not tagged).
pub fn direct_roundtrip(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("direct connect");
    s.write_all(payload).unwrap();
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).unwrap();
    got
}
