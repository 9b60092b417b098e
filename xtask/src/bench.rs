//! `cargo xtask bench redirect`: direct vs through loopgate, in one run,
//! against the same echo/sink server on a loopback alias.
//!
//! (a) short connections: connect, 64-byte round trip, close; per-connection
//!     latency, median and p99, and the added microseconds;
//! (b) bulk: one connection sends N MiB to a sink; throughput ratio.
//!
//! The client is this binary (`xtask bench-client`), run untagged for the
//! baseline and under `loopgate exec` (as nobody) for the redirected side. A
//! third side goes through HAProxy in TCP mode (a plain L4 relay, from apt):
//! the cost of any user-space relay on this machine, next to loopgate's.
//! Rounds alternate between the two sides so drift on a noisy machine hits
//! both equally.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{env, run, setup, workspace};

const ROOT: &str = "lgt-bench";
const ROUNDS: usize = 5;

pub fn client(args: &[String]) -> Result<()> {
    let (mode, addr, n, rest) = match args {
        [m, a, n, rest @ ..] => (m.as_str(), a.parse::<SocketAddr>()?, n.parse::<usize>()?, rest),
        _ => bail!("usage: xtask bench-client short|bulk|http|http-conn|pg-conn|pg-query|ssh-exec ADDR N [PGPASSWORD | SSH OPTIONS...]"),
    };
    let mut out = std::io::stdout().lock();
    match mode {
        "short" => {
            let msg = [7u8; 64];
            let mut buf = [0u8; 64];
            for _ in 0..n {
                let t = Instant::now();
                let mut s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                s.write_all(&msg)?;
                s.read_exact(&mut buf)?;
                drop(s);
                writeln!(out, "{}", t.elapsed().as_nanos())?;
            }
        }
        "bulk" => {
            let chunk = vec![0x5au8; 256 * 1024];
            let total = (n as u64) << 20;
            let t = Instant::now();
            let mut s = TcpStream::connect(addr)?;
            let mut sent = 0u64;
            while sent < total {
                let k = chunk.len().min((total - sent) as usize);
                s.write_all(&chunk[..k])?;
                sent += k as u64;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack)?;
            let got = u64::from_le_bytes(ack);
            if got != total {
                bail!("sink received {got} of {total} bytes");
            }
            writeln!(out, "{}", t.elapsed().as_nanos())?;
        }
        // HTTP/1.1 GETs: `http` on one keep-alive connection, `http-conn`
        // with a new connection per request (as curl loops do).
        "http" | "http-conn" => {
            let req = format!("GET /bench HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
            let mut conn: Option<std::io::BufReader<TcpStream>> = None;
            for _ in 0..n {
                let t = Instant::now();
                if conn.is_none() || mode == "http-conn" {
                    let s = TcpStream::connect(addr)?;
                    s.set_nodelay(true)?;
                    conn = Some(std::io::BufReader::new(s));
                }
                let Some(c) = conn.as_mut() else {
                    unreachable!()
                };
                c.get_mut().write_all(req.as_bytes())?;
                let body = read_http_response(c)?;
                if body != HTTP_BODY_LEN {
                    bail!("response body of {body} bytes, want {HTTP_BODY_LEN}");
                }
                writeln!(out, "{}", t.elapsed().as_nanos())?;
            }
        }
        // PostgreSQL (user `app`, database `postgres`): `pg-conn` connects,
        // runs `SELECT 1` and closes per operation; `pg-query` runs
        // `SELECT 1` on one connection. Through loopgate no password is given.
        "pg-conn" | "pg-query" => {
            let mut cfg = postgres::Config::new();
            cfg.host(&addr.ip().to_string())
                .port(addr.port())
                .user("app")
                .dbname("postgres");
            if let Some(pw) = rest.first() {
                cfg.password(pw);
            }
            let mut conn = None;
            for _ in 0..n {
                let t = Instant::now();
                if conn.is_none() || mode == "pg-conn" {
                    conn = Some(cfg.connect(postgres::NoTls)?);
                }
                let Some(c) = conn.as_mut() else {
                    unreachable!()
                };
                let v: i32 = c.query_one("SELECT 1", &[])?.get(0);
                if v != 1 {
                    bail!("SELECT 1 returned {v}");
                }
                if mode == "pg-conn" {
                    if let Some(c) = conn.take() {
                        c.close()?;
                    }
                }
                writeln!(out, "{}", t.elapsed().as_nanos())?;
            }
        }
        // `ssh ... true` per operation (the rest of the arguments are ssh's
        // options: a key and known_hosts, or a config with a jump host).
        "ssh-exec" => {
            for _ in 0..n {
                let t = Instant::now();
                let o = std::process::Command::new("ssh")
                    .args(["-o", "BatchMode=yes"])
                    .args(rest)
                    .args(["-p", &addr.port().to_string()])
                    .arg(format!("{}@{}", loopgate_e2e::SSH_USER, addr.ip()))
                    .arg("true")
                    .stdin(std::process::Stdio::null())
                    .output()?;
                if !o.status.success() {
                    bail!("ssh failed: {}", String::from_utf8_lossy(&o.stderr));
                }
                writeln!(out, "{}", t.elapsed().as_nanos())?;
            }
        }
        _ => bail!("unknown mode {mode}"),
    }
    Ok(())
}

const HTTP_BODY_LEN: usize = 1024;

/// Reads one response (status 200, `Content-Length` framing); returns the
/// body length.
fn read_http_response(c: &mut std::io::BufReader<TcpStream>) -> Result<usize> {
    use std::io::BufRead;
    let mut line = String::new();
    let mut len = None;
    let mut first = true;
    loop {
        line.clear();
        if c.read_line(&mut line)? == 0 {
            bail!("connection closed before the response");
        }
        if first {
            if !line.starts_with("HTTP/1.1 200") {
                bail!("unexpected status line {line:?}");
            }
            first = false;
        } else if line == "\r\n" {
            break;
        } else if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = Some(v.trim().parse::<usize>()?);
            }
        }
    }
    let len = len.context("no Content-Length")?;
    let mut body = vec![0u8; len];
    c.read_exact(&mut body)?;
    Ok(len)
}

/// A keep-alive HTTP/1.1 server answering every request with 1 KiB.
fn serve_http(l: TcpListener) {
    use std::io::BufRead;
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let Ok(mut w) = s.try_clone() else { return };
            let mut r = std::io::BufReader::new(s);
            let mut resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {HTTP_BODY_LEN}\r\n\r\n"
            )
            .into_bytes();
            resp.extend(std::iter::repeat_n(b'x', HTTP_BODY_LEN));
            let mut line = String::new();
            loop {
                // Headers up to the blank line (GETs carry no body).
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                if w.write_all(&resp).is_err() {
                    return;
                }
            }
        });
    }
}

/// Echo for short connections (first byte 7), sink with a byte-count ack otherwise.
fn serve(l: TcpListener) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            let mut echo = None;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if echo.is_none() {
                            echo = Some(buf[0] == 7 && n <= 64);
                        }
                        total += n as u64;
                        if echo == Some(true) && s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            if echo == Some(false) {
                let _ = s.write_all(&total.to_le_bytes());
            }
        });
    }
}

struct AgentGuard {
    child: Child,
    root: String,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/loopgate/{}", self.root));
        if let Some(m) = env::cgroup2_mount() {
            env::remove_cgroup_tree(&m.join(&self.root));
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// How a side of a benchmark reaches the server.
enum Side {
    Direct,
    /// Through a plain relay listening at this address.
    Relay(&'static str, SocketAddr),
    /// Tagged with `loopgate exec` under this agent config.
    Tagged(&'static str, PathBuf),
}

impl Side {
    fn name(&self) -> &'static str {
        match self {
            Side::Direct => "direct",
            Side::Relay(n, _) | Side::Tagged(n, _) => n,
        }
    }
}

struct Bench {
    lg: PathBuf,
    client: PathBuf,
    server: SocketAddr,
    dir: PathBuf,
    agents: Vec<AgentGuard>,
    relays: Vec<KillOnDrop>,
    /// Policy files for the agents started after they are set.
    policies: Vec<(String, String)>,
}

impl Bench {
    fn new() -> Result<Self> {
        setup()?;
        run(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(workspace())
                .args(["build", "--release", "-p", "loopgate", "-p", "xtask"]),
        )?;
        env::clean_leftovers();
        let listener = TcpListener::bind("127.10.0.90:0").context("bind bench server")?;
        let server = listener.local_addr()?;
        thread::spawn(move || serve(listener));
        let dir = std::env::temp_dir().join(format!("loopgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            lg: workspace().join("target/release/loopgate"),
            client: workspace().join("target/release/xtask"),
            server,
            dir,
            agents: Vec::new(),
            relays: Vec::new(),
            policies: Vec::new(),
        })
    }

    /// Starts an agent with the bench server as its target; returns its config.
    fn agent(&mut self, root: &str, extra: &str) -> Result<PathBuf> {
        let target = format!(
            "[[targets]]\nname = \"bench\"\naddress = \"{}\"\nprotocol = \"tcp\"\n",
            self.server
        );
        self.agent_with(root, &target, extra)
    }

    /// Starts an agent with these `[[targets]]`; returns its config.
    fn agent_with(&mut self, root: &str, targets: &str, extra: &str) -> Result<PathBuf> {
        let port = free_port()?;
        let d = self.dir.join(root);
        std::fs::create_dir_all(&d)?;
        let config = d.join("agent.toml");
        std::fs::create_dir_all(d.join("policies"))?;
        for (name, text) in &self.policies {
            std::fs::write(d.join("policies").join(name), text)?;
        }
        std::fs::write(
            &config,
            format!(
                "[agent]\ncgroup_root = \"{root}\"\nproxy_port = {port}\nallow_unprivileged_port = true\nadmin_socket = \"{d}/admin.sock\"\nstate_dir = \"{d}/state\"\npolicies = \"{d}/policies\"\n\n{targets}\n{extra}\n",
                d = d.display(),
            ),
        )?;
        let log = std::fs::File::create(d.join("agent.log"))?;
        let child = Command::new(&self.lg)
            .arg("--config")
            .arg(&config)
            .arg("agent")
            .env("LOOPGATE_LOG", "warn")
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()?;
        self.agents.push(AgentGuard {
            child,
            root: root.to_owned(),
        });
        env::wait_ready(&self.lg, &config)?;
        Ok(config)
    }

    fn haproxy(&mut self) -> Result<SocketAddr> {
        let server = self.server;
        self.haproxy_to("tcp", server)
    }

    /// HAProxy in `mode` (tcp | http) in front of `server`.
    fn haproxy_to(&mut self, mode: &str, server: SocketAddr) -> Result<SocketAddr> {
        if Command::new("haproxy").arg("-v").output().is_err() {
            apt_install("haproxy")?;
        }
        let port = free_port()?;
        let hcfg = self.dir.join(format!("haproxy-{mode}.cfg"));
        std::fs::write(
            &hcfg,
            format!(
                "global\n  maxconn 4000\ndefaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nlisten relay\n  bind 127.0.0.1:{port}\n  server s1 {server}\n",
            ),
        )?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&hcfg);
        self.relay(cmd, port, "haproxy", None)
    }

    /// Starts a relay listening on 127.0.0.1:`port` and waits until it
    /// accepts; `log` is shown if it does not.
    fn relay(
        &mut self,
        mut cmd: Command,
        port: u16,
        name: &str,
        log: Option<PathBuf>,
    ) -> Result<SocketAddr> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.relays.push(KillOnDrop(child));
        let relay: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(relay).is_err() {
            if Instant::now() > deadline {
                let log = log
                    .and_then(|l| std::fs::read_to_string(l).ok())
                    .unwrap_or_default();
                bail!("{name} did not start: {log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(relay)
    }

    fn side(&self, s: &Side, mode: &str, n: usize) -> Result<Vec<u64>> {
        self.side_to(s, mode, n, self.server)
    }

    /// A side run against `server` (direct and tagged sides dial it).
    fn side_to(&self, s: &Side, mode: &str, n: usize, server: SocketAddr) -> Result<Vec<u64>> {
        self.side_args(s, mode, n, server, &[])
    }

    /// A side with extra client arguments (the per-side password).
    fn side_args(
        &self,
        s: &Side,
        mode: &str,
        n: usize,
        server: SocketAddr,
        extra: &[&str],
    ) -> Result<Vec<u64>> {
        let (mut cmd, addr) = match s {
            Side::Tagged(_, config) => {
                let mut c = Command::new(&self.lg);
                c.arg("--config")
                    .arg(config)
                    .args(["exec", "--workload", "bench", "--"])
                    .arg(&self.client);
                (c, server)
            }
            Side::Direct => (Command::new(&self.client), server),
            Side::Relay(_, a) => (Command::new(&self.client), *a),
        };
        let out = cmd
            .args(["bench-client", mode, &addr.to_string(), &n.to_string()])
            .args(extra)
            .output()?;
        if !out.status.success() {
            bail!(
                "bench client ({}) failed: {}",
                s.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Short connections, rounds alternating between the sides.
    fn short(&self, sides: &[Side], conns: usize) -> Result<()> {
        println!("== short connections: {conns} per side, {ROUNDS} alternating rounds");
        self.latency(sides, "short", conns, self.server)
    }

    /// Per-operation latency of `mode`, rounds alternating between the sides.
    fn latency(&self, sides: &[Side], mode: &str, n: usize, server: SocketAddr) -> Result<()> {
        self.latency_args(sides, mode, n, server, &vec![Vec::new(); sides.len()])
    }

    /// [`Bench::latency`] with extra client arguments per side.
    fn latency_args(
        &self,
        sides: &[Side],
        mode: &str,
        n: usize,
        server: SocketAddr,
        extra: &[Vec<&str>],
    ) -> Result<()> {
        let per_round = n.div_ceil(ROUNDS);
        let mut lat: Vec<Vec<u64>> = vec![Vec::new(); sides.len()];
        for (i, s) in sides.iter().enumerate() {
            self.side_args(s, mode, 100, server, &extra[i])?; // warm-up
        }
        for _ in 0..ROUNDS {
            for (i, s) in sides.iter().enumerate() {
                lat[i].extend(self.side_args(s, mode, per_round, server, &extra[i])?);
            }
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        println!("| side | operations | median µs | p99 µs | added median µs | ratio |");
        println!("|---|---|---|---|---|---|");
        let mut base = 0;
        for (i, s) in sides.iter().enumerate() {
            lat[i].sort_unstable();
            let (m, p) = (percentile(&lat[i], 0.5), percentile(&lat[i], 0.99));
            if i == 0 {
                base = m;
            }
            println!(
                "| {} | {} | {:.1} | {:.1} | {:+.1} | {:.3} |",
                s.name(),
                lat[i].len(),
                us(m),
                us(p),
                us(m) - us(base),
                m as f64 / base.max(1) as f64
            );
        }
        Ok(())
    }

    fn bulk(&self, sides: &[Side], mib: usize) -> Result<()> {
        println!("\n== bulk: {mib} MiB per side, 3 alternating rounds (median)");
        let mut bulk: Vec<Vec<u64>> = vec![Vec::new(); sides.len()];
        for _ in 0..3 {
            for (i, s) in sides.iter().enumerate() {
                bulk[i].extend(self.side(s, "bulk", mib)?);
            }
        }
        let mibs = |ns: u64| mib as f64 / (ns as f64 / 1e9);
        println!("| side | MiB/s (median of 3) | ratio to direct |");
        println!("|---|---|---|");
        let mut base = 0.0;
        for (i, s) in sides.iter().enumerate() {
            bulk[i].sort_unstable();
            let v = mibs(percentile(&bulk[i], 0.5));
            if i == 0 {
                base = v;
            }
            println!("| {} | {v:.0} | {:.3} |", s.name(), v / base);
        }
        Ok(())
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.agents.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Debian package only a benchmark needs (the package lists refreshed
/// when the first attempt fails).
fn apt_install(pkg: &str) -> Result<()> {
    let install = || run(Command::new("apt-get").args(["install", "-y", "-qq", pkg]));
    install().or_else(|_| {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        install()
    })
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cargo xtask bench redirect`: direct vs HAProxy vs loopgate.
pub fn redirect(conns: usize, mib: usize) -> Result<()> {
    let mut b = Bench::new()?;
    let config = b.agent(ROOT, "")?;
    let relay = b.haproxy()?;
    let sides = [
        Side::Direct,
        Side::Relay("haproxy (tcp mode, plain relay)", relay),
        Side::Tagged("through loopgate (tagged)", config),
    ];
    b.short(&sides, conns)?;
    println!();
    b.bulk(&sides, mib)
}

/// `cargo xtask bench audit`: recorder throughput into a local ClickHouse, and
/// the redirect latency with recording to ClickHouse on vs off.
pub fn audit(conns: usize, events: u64) -> Result<()> {
    let mut b = Bench::new()?;
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace())
            .args([
                "build",
                "--release",
                "-p",
                "loopgate",
                "--example",
                "recorder_bench",
            ]),
    )?;
    let ch = loopgate_e2e::ClickHouse::start();
    println!("== recorder throughput: {events} events (16 columns, 247-byte records) into ClickHouse {}, 3 runs",
        ch.query("SELECT version()").trim());
    let bench = workspace().join("target/release/examples/recorder_bench");
    let mut runs = Vec::new();
    for i in 0..3 {
        let out = Command::new(&bench)
            .args([
                &ch.url(),
                &events.to_string(),
                &format!("loopgate_bench_{i}"),
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "recorder bench failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!("{line}");
        let v: serde_json::Value = serde_json::from_str(&line)?;
        runs.push((
            v["events_per_s"].as_f64().unwrap_or(0.0),
            v["mb_per_s"].as_f64().unwrap_or(0.0),
        ));
    }
    runs.sort_by(|a, c| a.0.total_cmp(&c.0));
    println!("median: {:.0} events/s, {:.1} MB/s\n", runs[1].0, runs[1].1);

    let local = b.agent(ROOT, "")?;
    let with_ch = b.agent(
        "lgt-bench-ch",
        &format!(
            "[audit]\nclickhouse_url = \"{}\"\ndatabase = \"loopgate_redirect\"\n",
            ch.url()
        ),
    )?;
    let sides = [
        Side::Direct,
        Side::Tagged("loopgate, recording to the local spool only", local),
        Side::Tagged("loopgate, recording to ClickHouse", with_ch),
    ];
    b.short(&sides, conns)?;
    let want = (conns.div_ceil(ROUNDS) * ROUNDS + 200) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut shipped = 0;
    while Instant::now() < deadline {
        shipped = ch.count("SELECT count() FROM loopgate_redirect.sessions FINAL");
        if shipped >= want {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    println!("\nsessions of the ClickHouse side delivered to ClickHouse: {shipped} of {want}");
    Ok(())
}

/// `cargo xtask bench ssh`: `ssh host true` direct (the client holds the
/// key), through an OpenSSH bastion (`ProxyJump` through a second sshd),
/// and through loopgate (no key; the agent's host certificate trusted
/// through `/etc/ssh/ssh_known_hosts`).
pub fn ssh(n: usize) -> Result<()> {
    let mut b = Bench::new()?;
    let target = loopgate_e2e::SshServer::start("127.10.0.93");
    let bastion = loopgate_e2e::SshServer::start("127.10.0.94");
    let config = b.agent_with(
        ROOT,
        &format!(
            "[[targets]]\nname = \"bench-ssh\"\naddress = \"{}\"\nprotocol = \"ssh\"\n[targets.credential]\nusername = \"{}\"\nkey_file = \"{}\"\nknown_hosts_file = \"{}\"\n",
            target.addr,
            loopgate_e2e::SSH_USER,
            target.stored_key().display(),
            target.known_hosts().display()
        ),
        "",
    )?;
    run(Command::new(&b.lg)
        .arg("--config")
        .arg(&config)
        .args(["trust", "install"]))?;
    // The client's own config for the direct and bastion sides (a jump
    // host's ssh reads -F too).
    let cfg = b.dir.join("ssh_config");
    let host = |s: &loopgate_e2e::SshServer, alias: &str| {
        format!(
            "Host {alias}\n  HostName {}\n  Port {}\n  User {}\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  GlobalKnownHostsFile /dev/null\n  BatchMode yes\n",
            s.addr.ip(),
            s.addr.port(),
            loopgate_e2e::SSH_USER,
            s.stored_key().display(),
            s.known_hosts().display()
        )
    };
    std::fs::write(
        &cfg,
        format!(
            "{}{}",
            host(&bastion, "bench-bastion"),
            host(&target, &target.addr.ip().to_string())
        ),
    )?;
    let cfg_s = cfg.display().to_string();
    let sides = [
        Side::Direct,
        Side::Relay("openssh bastion (ProxyJump)", target.addr),
        Side::Tagged("through loopgate (ssh handler)", config.clone()),
    ];
    let extra = vec![
        vec!["-F", cfg_s.as_str()],
        vec!["-F", cfg_s.as_str(), "-J", "bench-bastion"],
        vec![],
    ];
    println!("== ssh host true: {n} per side, {ROUNDS} alternating rounds");
    let r = b.latency_args(&sides, "ssh-exec", n, target.addr, &extra);
    let _ = Command::new(&b.lg)
        .arg("--config")
        .arg(&config)
        .args(["trust", "uninstall"])
        .output();
    r
}

/// `cargo xtask bench http`: HTTP/1.1 requests direct vs HAProxy (http mode)
/// vs loopgate's HTTP handler (per-request policy, credential injection,
/// request/response events).
pub fn http(requests: usize) -> Result<()> {
    let mut b = Bench::new()?;
    let listener = TcpListener::bind("127.10.0.91:0").context("bind bench HTTP server")?;
    let server = listener.local_addr()?;
    thread::spawn(move || serve_http(listener));
    let token = b.dir.join("bench.token");
    std::fs::write(&token, "bench-stored-token-0123456789\n")?;
    let config = b.agent_with(
        ROOT,
        &format!(
            "[[targets]]\nname = \"bench-http\"\naddress = \"{server}\"\nprotocol = \"http\"\n[targets.credential]\ntoken_file = \"{}\"\n",
            token.display()
        ),
        "",
    )?;
    let relay = b.haproxy_to("http", server)?;
    let sides = [
        Side::Direct,
        Side::Relay("haproxy (http mode)", relay),
        Side::Tagged("through loopgate (http handler)", config),
    ];
    println!("== HTTP GET, 1 KiB responses, one keep-alive connection: {requests} per side, {ROUNDS} alternating rounds");
    b.latency(&sides, "http", requests, server)?;
    let conns = (requests / 5).max(200);
    println!("\n== HTTP GET, a new connection per request: {conns} per side, {ROUNDS} alternating rounds");
    b.latency(&sides, "http-conn", conns, server)
}

/// `cargo xtask bench postgres`: PostgreSQL connections and queries direct
/// (SCRAM by the client) vs PgBouncer (session pooling) vs loopgate (the
/// agent logs in upstream with the stored credential; the loop gives none).
pub fn postgres(conns: usize, pgbench_only: bool) -> Result<()> {
    const PW: &str = "pg-bench-pw-5b1d";
    let mut b = Bench::new()?;
    // The shipped policies: statements parsed, judged by the guardrails,
    // results scanned by the e-mail/card mask, every statement recorded.
    for f in ["default.toml", "postgres.toml"] {
        b.policies.push((
            f.to_owned(),
            std::fs::read_to_string(workspace().join("policies").join(f))?,
        ));
    }
    let pg = loopgate_e2e::PgServer::start("127.10.0.92");
    pg.admin(&format!("CREATE ROLE app LOGIN PASSWORD '{PW}'"));
    let server = pg.addr;
    let pw_file = b.dir.join("app.pw");
    std::fs::write(&pw_file, format!("{PW}\n"))?;
    let config = b.agent_with(
        ROOT,
        &format!(
            "[[targets]]\nname = \"bench-pg\"\naddress = \"{server}\"\nprotocol = \"postgres\"\n[targets.credential]\nusername = \"app\"\npassword_file = \"{}\"\n",
            pw_file.display()
        ),
        "",
    )?;
    let bouncer = b.pgbouncer(server, PW)?;
    let sides = [
        Side::Direct,
        Side::Relay("pgbouncer (session pool)", bouncer),
        Side::Tagged("through loopgate (postgres handler)", config.clone()),
    ];
    let extra = vec![vec![PW], vec![PW], vec![]];
    if !pgbench_only {
        println!(
            "== PostgreSQL: connect, SELECT 1, close: {conns} per side, {ROUNDS} alternating rounds"
        );
        b.latency_args(&sides, "pg-conn", conns, server, &extra)?;
        let queries = conns * 10;
        println!("\n== PostgreSQL: SELECT 1 on one connection: {queries} per side, {ROUNDS} alternating rounds");
        b.latency_args(&sides, "pg-query", queries, server, &extra)?;
    }

    // pgbench: select-only and the TPC-B-like script, 1 and 16 clients,
    // simple and prepared, against PgBouncer in transaction pooling (1.18
    // has no prepared statements in that mode: session pooling there).
    let scale = 10;
    pg.pgbench_init(scale);
    pg.admin(
        "GRANT ALL ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO app",
    );
    let tx_bouncer = b.pgbouncer_mode(server, PW, "transaction")?;
    let secs = 5;
    println!("\n== pgbench (scale {scale}, {secs} s runs, 3 alternating rounds, median tps; -j 2)");
    println!("| script | clients | mode | direct tps | pgbouncer tps (ratio) | loopgate tps (ratio) | loopgate / pgbouncer |");
    println!("|---|---|---|---|---|---|---|");
    for select_only in [true, false] {
        for clients in [1, 16] {
            for mode in ["simple", "prepared"] {
                let bouncer = if mode == "prepared" {
                    bouncer
                } else {
                    tx_bouncer
                };
                let sides = [
                    (Side::Direct, Some(PW)),
                    (Side::Relay("pgbouncer", bouncer), Some(PW)),
                    (Side::Tagged("loopgate", config.clone()), None),
                ];
                let mut tps: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
                for _ in 0..3 {
                    for (i, (side, pw)) in sides.iter().enumerate() {
                        tps[i].push(b.pgbench(
                            side,
                            server,
                            *pw,
                            select_only,
                            clients,
                            mode,
                            secs,
                        )?);
                    }
                }
                let med: Vec<f64> = tps
                    .iter_mut()
                    .map(|v| {
                        v.sort_by(|a, b| a.total_cmp(b));
                        v[v.len() / 2]
                    })
                    .collect();
                println!(
                    "| {} | {clients} | {mode}{} | {:.0} | {:.0} ({:.2}) | {:.0} ({:.2}) | {:.2} |",
                    if select_only { "-S" } else { "TPC-B" },
                    if mode == "prepared" {
                        " (bouncer: session)"
                    } else {
                        ""
                    },
                    med[0],
                    med[1],
                    med[1] / med[0],
                    med[2],
                    med[2] / med[0],
                    med[2] / med[1],
                );
            }
        }
    }
    Ok(())
}

impl Bench {
    /// PgBouncer 1.18 (Debian) in front of `server`, session pooling, SCRAM
    /// from clients; run as `postgres` (it refuses root).
    fn pgbouncer(&mut self, server: SocketAddr, pw: &str) -> Result<SocketAddr> {
        self.pgbouncer_mode(server, pw, "session")
    }

    /// One pgbench run of `secs` seconds through `side`; its tps (without
    /// the initial connections).
    #[expect(clippy::too_many_arguments, reason = "one benchmark case, spelled out")]
    fn pgbench(
        &self,
        side: &Side,
        server: SocketAddr,
        pw: Option<&str>,
        select_only: bool,
        clients: usize,
        mode: &str,
        secs: u64,
    ) -> Result<f64> {
        let addr = match side {
            Side::Relay(_, a) => *a,
            _ => server,
        };
        let mut cmd = match side {
            Side::Tagged(_, config) => {
                let mut c = Command::new(&self.lg);
                // `loopgate exec` clears the environment but for what
                // `--env` names.
                c.arg("--config").arg(config).args([
                    "exec",
                    "--workload",
                    "bench",
                    "--env",
                    "PGSSLMODE",
                    "--",
                    "pgbench",
                ]);
                c
            }
            _ => Command::new("pgbench"),
        };
        cmd.args(["-n", "-j", "2", "-M", mode, "-c", &clients.to_string()])
            .args(["-T", &secs.to_string()])
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-U", "app", "postgres"]);
        if select_only {
            cmd.arg("-S");
        }
        if let Some(pw) = pw {
            cmd.env("PGPASSWORD", pw);
        }
        // Plain on every side (the agent would answer TLS, the server and
        // PgBouncer here would not).
        cmd.env("PGSSLMODE", "disable");
        let out = cmd.output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "pgbench ({}) failed: {text}{}",
                side.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        text.lines()
            .find_map(|l| {
                l.strip_prefix("tps = ")
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .with_context(|| format!("no tps in pgbench output: {text}"))
    }

    /// PgBouncer in `pool_mode` (`session` or `transaction`).
    fn pgbouncer_mode(
        &mut self,
        server: SocketAddr,
        pw: &str,
        pool_mode: &str,
    ) -> Result<SocketAddr> {
        if !std::path::Path::new("/usr/sbin/pgbouncer").exists() {
            apt_install("pgbouncer")?;
        }
        let port = free_port()?;
        let d = self.dir.join(format!("pgbouncer-{pool_mode}"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("userlist.txt"), format!("\"app\" \"{pw}\"\n"))?;
        std::fs::write(
            d.join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host={} port={} dbname=postgres\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {d}/userlist.txt\npool_mode = {pool_mode}\nmax_client_conn = 1000\ndefault_pool_size = 20\nlogfile = {d}/pgbouncer.log\n",
                server.ip(),
                server.port(),
                d = d.display()
            ),
        )?;
        run(Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&d))?;
        run(Command::new("chmod").arg("0755").arg(&self.dir))?;
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg("/usr/sbin/pgbouncer")
            .arg(d.join("pgbouncer.ini"));
        self.relay(cmd, port, "pgbouncer", Some(d.join("pgbouncer.log")))
    }
}
