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
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).expect("policies dir");
        for (name, text) in &spec.policies {
            std::fs::write(policies.join(name), text).expect("write policy");
        }
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\ncgroup_root = \"{root}\"\nproxy_port = {port}\nadmin_socket = \"{d}/admin.sock\"\nstate_dir = \"{d}/state\"\npolicies = \"{d}/policies\"\negress = \"{e}\"\nshutdown_grace_secs = 2\n{a}{x}",
                d = dir.path().display(),
                e = spec.egress,
                a = spec.agent_extra,
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
    /// Each request's line and headers, as received.
    pub heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl HttpServer {
    pub fn start(ip: &str, body: &'static str) -> HttpServer {
        let l =
            TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind http server on {ip}: {e}"));
        let addr = l.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = requests.clone();
        let h = heads.clone();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let r = r.clone();
                let h = h.clone();
                thread::spawn(move || {
                    let mut reader = BufReader::new(s.try_clone().unwrap());
                    let mut line = String::new();
                    let mut head = String::new();
                    // Request line and headers up to the blank line.
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" || line == "\n" => break,
                            Ok(_) => head.push_str(&line),
                        }
                    }
                    h.lock().unwrap().push(head);
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
        HttpServer {
            addr,
            requests,
            heads,
        }
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

/// A real ClickHouse server (Debian's 18.16) on loopback ports, with its data
/// in a temporary directory; stopped on drop. Users: `default` (read-write)
/// and `reader` (profile `readonly`).
pub struct ClickHouse {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    child: Option<Child>,
}

impl ClickHouse {
    pub fn start() -> ClickHouse {
        let dir = tempfile::Builder::new()
            .prefix("lgt-ch-")
            .tempdir()
            .expect("tempdir");
        let http_port = free_port();
        let tcp_port = free_port();
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("log")).unwrap();
        std::fs::write(
            dir.path().join("users.xml"),
            r#"<?xml version="1.0"?>
<yandex>
  <profiles>
    <default><max_memory_usage>4000000000</max_memory_usage></default>
    <readonly><readonly>1</readonly></readonly>
  </profiles>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default>
    <reader><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>readonly</profile><quota>default</quota></reader>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/log/server.log</log><errorlog>{d}/log/server.err.log</errorlog><size>100M</size><count>2</count></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/data/tmp/</tmp_path>
  <user_files_path>{d}/data/user_files/</user_files_path>
  <format_schema_path>{d}/data/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <mark_cache_size>536870912</mark_cache_size>
</yandex>
"#
            ),
        )
        .unwrap();
        let mut ch = ClickHouse {
            dir,
            http_port,
            child: None,
        };
        ch.spawn();
        ch
    }

    /// Starts the server (again, on the same data).
    pub fn spawn(&mut self) {
        let child = Command::new("/usr/sbin/clickhouse-server")
            .arg(format!(
                "--config-file={}",
                self.dir.path().join("config.xml").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start clickhouse-server (cargo xtask setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.try_query("SELECT 1").is_err() {
            assert!(Instant::now() < deadline, "clickhouse-server did not start");
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// POSTs `sql` with curl; `out` receives the raw answer when given.
    fn curl(&self, sql: &str, out: Option<&Path>) -> Output {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail-with-body", "--data-binary", "@-"]);
        if let Some(p) = out {
            cmd.arg("-o").arg(p);
        }
        let mut child = cmd
            .arg(format!(
                "{}/?output_format_json_quote_64bit_integers=0",
                self.url()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        let out = self.curl(sql, None);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|e| panic!("query failed: {sql}\n{e}"))
    }

    /// A single number.
    pub fn count(&self, sql: &str) -> u64 {
        self.try_query(sql)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `sql` returns `want`.
    pub fn wait_count(&self, sql: &str, want: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let n = self.count(sql);
            if n == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out: `{sql}` is {n}, want {want}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl AgentSpec {
    /// An `[audit]` section pointing at `ch` (plus extra keys).
    pub fn clickhouse(self, ch: &ClickHouse, extra: &str) -> Self {
        self.raw(&format!(
            "\n[audit]\nclickhouse_url = \"{}\"\ndatabase = \"loopgate\"\n{extra}\n",
            ch.url()
        ))
    }
}

impl ClickHouse {
    /// Runs a query and writes its raw output to `path`.
    pub fn query_to_file(&self, sql: &str, path: &Path) {
        let out = self.curl(sql, Some(path));
        assert!(
            out.status.success(),
            "export failed: {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The chdb-core venv python (`cargo xtask setup` creates it).
pub fn chdb_python() -> PathBuf {
    let p = std::env::var("LOOPGATE_CHDB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(
                std::env::var("LOOPGATE_DEV_CACHE")
                    .unwrap_or_else(|_| "/var/cache/loopgate-dev".into()),
            )
            .join("chdb-venv/bin/python")
        });
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// The fenced ```sql blocks of a Markdown file.
pub fn sql_blocks(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in markdown.lines() {
        match (&mut cur, line.trim()) {
            (None, "```sql") => cur = Some(String::new()),
            (Some(q), "```") => {
                out.push(q.trim().to_owned());
                cur = None;
            }
            (Some(q), _) => {
                q.push_str(line);
                q.push('\n');
            }
            _ => {}
        }
    }
    out
}

/// playwright-core's directory (`cargo xtask setup` installs it).
pub fn playwright_core() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("LOOPGATE_DEV_CACHE").unwrap_or_else(|_| "/var/cache/loopgate-dev".into()),
    )
    .join("playwright/node_modules/playwright-core");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// A real PostgreSQL server (Debian's, run as `postgres`) on `ip`, with its
/// data in a temporary directory; stopped on drop. Host logins use
/// SCRAM-SHA-256; `postgres` logs in over the unix socket for set-up.
pub struct PgServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// With [`PgServer::start_tls`]: the CA (PEM) that signed the server's
    /// certificate.
    pub ca: Option<PathBuf>,
    child: Option<Child>,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (cargo xtask setup installs it)")
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("no PostgreSQL version")
        .join("bin")
        .join(name)
}

impl PgServer {
    pub fn start(ip: &str) -> PgServer {
        Self::start_with(ip, false)
    }

    /// A server with TLS on (a certificate for `ip` from a test CA, rcgen)
    /// that refuses logins without TLS.
    pub fn start_tls(ip: &str) -> PgServer {
        let pg = Self::start_with(ip, true);
        pg.prepend_hba("hostnossl all all 0.0.0.0/0 reject");
        pg
    }

    fn start_with(ip: &str, tls: bool) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("lgt-pg-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().display().to_string();
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres", &d])
            .status()
            .unwrap();
        assert!(chown.success());
        let as_pg = |cmd: &Path, args: &[&str]| {
            let out = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(cmd)
                .args(args)
                .output()
                .expect("runuser postgres");
            assert!(
                out.status.success(),
                "{}: {}",
                cmd.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        as_pg(
            &pg_bin("initdb"),
            &[
                "-D",
                &format!("{d}/data"),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
        );
        let mut ssl_args = Vec::new();
        let mut ca = None;
        if tls {
            use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
            let ca_key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "loopgate test database CA");
            let ca_cert = params.self_signed(&ca_key).unwrap();
            let issuer = Issuer::new(params, ca_key);
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![ip.to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let data = dir.path().join("data");
            std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
            std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
            set_mode(&data.join("server.key"), 0o600);
            let chown = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.crt"))
                .arg(data.join("server.key"))
                .status()
                .unwrap();
            assert!(chown.success());
            let ca_path = dir.path().join("ca.pem");
            std::fs::write(&ca_path, ca_cert.pem()).unwrap();
            set_mode(&ca_path, 0o644);
            ca = Some(ca_path);
            ssl_args = vec!["-c".to_owned(), "ssl=on".to_owned()];
        }
        let port = free_port();
        // setpriv execs (no forking wrapper): the child is the postmaster.
        let child = Command::new("setpriv")
            .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(pg_bin("postgres"))
            .args([
                "-D",
                &format!("{d}/data"),
                "-p",
                &port.to_string(),
                "-k",
                &d,
                "-c",
                &format!("listen_addresses={ip}"),
                "-c",
                "fsync=off",
            ])
            .args(&ssl_args)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("postgres.log"))
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .spawn()
            .expect("start postgres");
        let pg = PgServer {
            addr: format!("{ip}:{port}").parse().unwrap(),
            dir,
            ca,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(pg_bin("pg_isready"))
                .args(["-h", &d, "-p", &port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                std::fs::read_to_string(pg.dir.path().join("postgres.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    /// Puts an `pg_hba.conf` line first (first match wins) and reloads.
    pub fn prepend_hba(&self, line: &str) {
        let path = self.dir.path().join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&path).expect("read pg_hba.conf");
        std::fs::write(&path, format!("{line}\n{old}")).expect("write pg_hba.conf");
        self.admin("SELECT pg_reload_conf()");
    }

    /// Runs SQL as the `postgres` superuser over the unix socket.
    pub fn admin(&self, sql: &str) -> String {
        let out = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "psql",
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-h", &self.dir.path().display().to_string()])
            .args([
                "-p",
                &self.addr.port().to_string(),
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: fast shutdown.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The issuer of [`Idp`] tokens.
pub const ISSUER: &str = "https://idp.loopgate.test";

/// A test identity provider: a real P-256 key (rcgen), its JWKS file, and
/// signed tokens.
pub struct Idp {
    key: jsonwebtoken::EncodingKey,
    pub jwks: PathBuf,
}

impl Idp {
    pub fn new(dir: &Path) -> Idp {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        let jwks = dir.join("jwks.json");
        std::fs::write(
            &jwks,
            serde_json::json!({"keys": [{
                "kty": "EC", "crv": "P-256", "kid": "test-1", "alg": "ES256", "use": "sig",
                "x": b64url(&raw[1..33]),
                "y": b64url(&raw[33..65]),
            }]})
            .to_string(),
        )
        .unwrap();
        Idp {
            key: jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwks,
        }
    }

    /// A policy: workloads `signed-*` must present a JWT for `audience`, and
    /// only they may use `target` (its default is deny).
    pub fn signed_bots_policy(&self, target: &str, audience: &str, rule: &str) -> String {
        format!(
            r#"
[[workloads]]
name = "signed-bots"
workload = "signed-*"
jwt = {{ issuer = "{ISSUER}", audience = "{audience}", jwks_file = "{}" }}

[[targets]]
name = "{target}"
default = "deny"
reason = "{target} is open to signed bots only"

[[rules]]
id = "{rule}"
workloads = ["signed-bots"]
targets = ["{target}"]
action = "allow"
"#,
            self.jwks.display()
        )
    }

    pub fn token(&self, sub: &str, aud: &str, exp_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("test-1".into());
        jsonwebtoken::encode(
            &h,
            &serde_json::json!({"sub": sub, "iss": ISSUER, "aud": aud, "iat": now, "exp": now + exp_in}),
            &self.key,
        )
        .unwrap()
    }
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// An HTTP/1.1 upstream on a loopback address that answers each request
/// with the raw bytes `respond(head)` returns (a hostile upstream: any status
/// line, encoding or trailer), then closes the connection.
pub struct RawHttpServer {
    pub addr: SocketAddr,
    /// Each request's line and headers, as received.
    pub heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RawHttpServer {
    pub fn start(ip: &str, respond: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> Self {
        let l = TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("bind raw http server on {ip}: {e}"));
        let addr = l.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = heads.clone();
        let respond = Arc::new(respond);
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (h, respond) = (h.clone(), respond.clone());
                thread::spawn(move || {
                    let mut reader = BufReader::new(s.try_clone().unwrap());
                    let mut head = String::new();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" || line == "\n" => break,
                            Ok(_) => head.push_str(&line),
                        }
                    }
                    // Read a request body, so closing does not reset.
                    let len = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    let _ = reader.read_exact(&mut body);
                    let answer = respond(&head);
                    h.lock().unwrap().push(head);
                    let mut s = s;
                    let _ = s.write_all(&answer);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    // Let the agent read to the end before the socket closes.
                    let _ = reader.read_to_end(&mut Vec::new());
                });
            }
        });
        RawHttpServer { addr, heads }
    }
}

/// `data` gzip-compressed.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `data` zlib-compressed (HTTP's `deflate`).
pub fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
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
