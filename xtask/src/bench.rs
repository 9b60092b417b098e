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
    let (mode, addr, n) = match args {
        [m, a, n] => (m.as_str(), a.parse::<SocketAddr>()?, n.parse::<usize>()?),
        _ => bail!("usage: xtask bench-client short|bulk ADDR N"),
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
        _ => bail!("unknown mode {mode}"),
    }
    Ok(())
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
    pin_dir: PathBuf,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(m) = env::cgroup2_mount() {
            env::remove_cgroup_tree(&m.join(ROOT));
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

pub fn redirect(conns: usize, mib: usize) -> Result<()> {
    setup()?;
    if Command::new("haproxy").arg("-v").output().is_err() {
        run(Command::new("apt-get").args(["install", "-y", "-qq", "haproxy"])).or_else(|_| {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(Command::new("apt-get").args(["install", "-y", "-qq", "haproxy"]))
        })?;
    }
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace())
            .args(["build", "--release", "-p", "loopgate", "-p", "xtask"]),
    )?;
    let lg = workspace().join("target/release/loopgate");
    let client = workspace().join("target/release/xtask");
    env::clean_leftovers();

    let listener = TcpListener::bind("127.10.0.90:0").context("bind bench server")?;
    let server = listener.local_addr()?;
    thread::spawn(move || serve(listener));

    let dir = std::env::temp_dir().join(format!("loopgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ncgroup_root = \"{ROOT}\"\nproxy_port = {port}\nadmin_socket = \"{d}/admin.sock\"\nstate_dir = \"{d}/state\"\n\n[[targets]]\nname = \"bench\"\naddress = \"{server}\"\nprotocol = \"tcp\"\n",
            d = dir.display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = Command::new(&lg)
        .arg("--config")
        .arg(&config)
        .arg("agent")
        .env("LOOPGATE_LOG", "warn")
        .stderr(log)
        .stdout(Stdio::null())
        .spawn()?;
    let _guard = AgentGuard {
        child,
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/loopgate/{ROOT}")),
    };
    env::wait_ready(&lg, &config)?;

    // HAProxy as the plain-relay baseline.
    let haproxy_port = {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let hcfg = dir.join("haproxy.cfg");
    std::fs::write(
        &hcfg,
        format!(
            "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nlisten relay\n  bind 127.0.0.1:{haproxy_port}\n  server s1 {server}\n"
        ),
    )?;
    let haproxy = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&hcfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting haproxy")?;
    let _haproxy = KillOnDrop(haproxy);
    let relay: SocketAddr = format!("127.0.0.1:{haproxy_port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(relay).is_err() {
        if Instant::now() > deadline {
            bail!("haproxy did not start");
        }
        thread::sleep(Duration::from_millis(50));
    }

    let side = |s: Side, mode: &str, n: usize| -> Result<Vec<u64>> {
        let (mut cmd, addr) = match s {
            Side::Loopgate => {
                let mut c = Command::new(&lg);
                c.arg("--config")
                    .arg(&config)
                    .args(["exec", "--workload", "bench", "--"])
                    .arg(&client);
                (c, server)
            }
            Side::Direct => (Command::new(&client), server),
            Side::Haproxy => (Command::new(&client), relay),
        };
        let out = cmd
            .args(["bench-client", mode, &addr.to_string(), &n.to_string()])
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
    };

    println!("== (a) short connections: {conns} per side, {ROUNDS} alternating rounds");
    let per_round = conns.div_ceil(ROUNDS);
    let mut lat: Vec<Vec<u64>> = vec![Vec::new(); SIDES.len()];
    for s in SIDES {
        side(s, "short", 200)?; // warm-up
    }
    for _ in 0..ROUNDS {
        for (i, s) in SIDES.iter().enumerate() {
            lat[i].extend(side(*s, "short", per_round)?);
        }
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    println!("| side | connections | median µs | p99 µs | added median µs | ratio |");
    println!("|---|---|---|---|---|---|");
    let mut med = Vec::new();
    for (i, s) in SIDES.iter().enumerate() {
        lat[i].sort_unstable();
        let (m, p) = (percentile(&lat[i], 0.5), percentile(&lat[i], 0.99));
        med.push(m);
        println!(
            "| {} | {} | {:.1} | {:.1} | {:+.1} | {:.2} |",
            s.name(),
            lat[i].len(),
            us(m),
            us(p),
            us(m) - us(med[0]),
            m as f64 / med[0].max(1) as f64
        );
    }

    println!("\n== (b) bulk: {mib} MiB per side, 3 alternating rounds (median)");
    let mut bulk: Vec<Vec<u64>> = vec![Vec::new(); SIDES.len()];
    for _ in 0..3 {
        for (i, s) in SIDES.iter().enumerate() {
            bulk[i].extend(side(*s, "bulk", mib)?);
        }
    }
    let mibs = |ns: u64| mib as f64 / (ns as f64 / 1e9);
    println!("| side | MiB/s (median of 3) | ratio to direct |");
    println!("|---|---|---|");
    let mut base = 0.0;
    for (i, s) in SIDES.iter().enumerate() {
        bulk[i].sort_unstable();
        let v = mibs(percentile(&bulk[i], 0.5));
        if i == 0 {
            base = v;
        }
        println!("| {} | {v:.0} | {:.3} |", s.name(), v / base);
    }
    let sessions = Command::new(&lg)
        .arg("--config")
        .arg(&config)
        .args(["sessions", "--json"])
        .output()?;
    println!(
        "\nsessions recorded by the agent during the run: {}",
        String::from_utf8_lossy(&sessions.stdout).lines().count()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[derive(Clone, Copy)]
enum Side {
    Direct,
    Haproxy,
    Loopgate,
}

const SIDES: [Side; 3] = [Side::Direct, Side::Haproxy, Side::Loopgate];

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Direct => "direct",
            Side::Haproxy => "haproxy (tcp mode, plain relay)",
            Side::Loopgate => "through loopgate (tagged)",
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
