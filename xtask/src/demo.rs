//! `cargo xtask demo`: the main job, end to end, on loopback.
//!
//! Starts a real HTTP server (python3 http.server) on the loopback alias
//! 127.10.0.80, a ClickHouse server (Debian's 18.16) on loopback ports with its
//! data in a temporary directory, and the loopgate agent with the HTTP server
//! registered as a target, egress mode `deny` and the audit going to
//! ClickHouse. The target has a stored token (added by the agent; the loop
//! never has it) and a policy that refuses DELETE. Then it runs `curl` as a
//! tagged loop three times: a GET to the target (redirected through the proxy
//! and recorded), a DELETE (refused with a 403 JSON body naming the rule), and
//! one to an address that is not a target (refused in the kernel and recorded). It prints what the loop
//! saw and what loopgate recorded (sessions, a replay, an analyst query), then
//! stops everything and detaches.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{build_debug, env, setup};

const ROOT: &str = "loopgate-demo";
const PORT: u16 = 991;
const SERVER: &str = "127.10.0.80";

struct Guard {
    children: Vec<Child>,
    pin_dir: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc_kill(c.id() as i32, 15) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Detach: removing the pins removes the links.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(m) = env::cgroup2_mount() {
            env::remove_cgroup_tree(&m.join(ROOT));
        }
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub fn run() -> Result<()> {
    setup()?;
    let bin = build_debug()?;
    let dir = std::env::temp_dir().join(format!("loopgate-demo-{}", std::process::id()));
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(
        www.join("orders.json"),
        "{\"orders\": [{\"id\": 1, \"item\": \"widget\"}, {\"id\": 2, \"item\": \"gadget\"}]}\n",
    )?;
    println!("== starting ClickHouse (clickhouse-server 18.16, data in a temporary directory)");
    let ch = loopgate_e2e::ClickHouse::start();
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join("orders.toml"),
        r#"[[rules]]
id = "no-deletes"
targets = ["orders-api"]
methods = ["DELETE"]
action = "deny"
reason = "loops may not delete orders"
"#,
    )?;
    let token = dir.join("orders-api.token");
    std::fs::write(&token, "demo-stored-token-not-shown-to-loops\n")?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"[agent]
cgroup_root = "{ROOT}"
proxy_port = {PORT}
admin_socket = "{d}/admin.sock"
state_dir = "{d}/state"
policies = "{d}/policies"
egress = "deny"

[audit]
clickhouse_url = "{ch_url}"
database = "loopgate"

[[targets]]
name = "orders-api"
address = "{SERVER}:8080"
protocol = "http"
[targets.credential]
token_file = "{d}/orders-api.token"
"#,
            d = dir.display(),
            ch_url = ch.url(),
        ),
    )?;
    let mut guard = Guard {
        children: Vec::new(),
        pin_dir: format!("/sys/fs/bpf/loopgate/{ROOT}"),
    };
    println!("== starting an HTTP server on {SERVER}:8080 (python3 -m http.server)");
    guard.children.push(
        Command::new("/usr/bin/python3")
            .args(["-m", "http.server", "8080", "--bind", SERVER])
            .current_dir(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting python3 http.server")?,
    );
    println!("== starting the loopgate agent ({})", config.display());
    let log = std::fs::File::create(dir.join("agent.log"))?;
    guard.children.push(
        Command::new(&bin)
            .args(["--config"])
            .arg(&config)
            .arg("agent")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting loopgate agent")?,
    );
    if let Err(e) = env::wait_ready(&bin, &config) {
        let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
        bail!("{e}; the agent's log:\n{log}");
    }
    let lg = |args: &[&str]| -> Result<std::process::Output> {
        Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .context("running loopgate")
    };
    // `curl` as the tagged loop `orders-bot`.
    let tagged_curl = |args: &[&str]| {
        let mut a = vec![
            "exec",
            "--workload",
            "orders-bot",
            "--",
            "curl",
            "-sS",
            "-m",
            "10",
        ];
        a.extend_from_slice(args);
        lg(&a)
    };

    println!("\n== loop 1: `loopgate exec --workload orders-bot -- curl http://{SERVER}:8080/orders.json`");
    let out = tagged_curl(&[&format!("http://{SERVER}:8080/orders.json")])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("the tagged curl to the registered target failed");
    }

    println!(
        "\n== loop 1b: the same loop tries `curl -X DELETE .../orders.json` (policy: no-deletes)"
    );
    let out = tagged_curl(&["-X", "DELETE", &format!("http://{SERVER}:8080/orders.json")])?;
    let body = String::from_utf8_lossy(&out.stdout);
    print!("{body}");
    if !body.contains("no-deletes") {
        bail!("the DELETE was not refused by the no-deletes rule");
    }

    println!("\n== loop 2: the same loop tries 127.10.0.81:8080, which is not a registered target (egress = deny)");
    let out = tagged_curl(&["http://127.10.0.81:8080/"])?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        bail!("the connect to an unregistered destination was not refused");
    }

    println!("\n== waiting for the records to reach ClickHouse");
    ch.wait_count(
        "SELECT count() FROM loopgate.sessions FINAL WHERE outcome != 'open'",
        3,
        30,
    );
    println!("\n== loopgate sessions   (read from ClickHouse)");
    let sessions = lg(&["sessions"])?;
    print!("{}", String::from_utf8_lossy(&sessions.stdout));
    let id = String::from_utf8_lossy(&sessions.stdout)
        .lines()
        .find(|l| l.contains("orders-api"))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .context("the session to the target was not recorded")?;
    println!("\n== loopgate replay {id}");
    print!("{}", String::from_utf8_lossy(&lg(&["replay", &id])?.stdout));
    println!("\n== an analyst query (docs/audit.md: sessions per workload per day)");
    print!(
        "{}",
        ch.query(
            "SELECT day, workload, count() AS sessions, countIf(outcome = 'denied') AS denied \
             FROM loopgate.sessions FINAL GROUP BY day, workload ORDER BY day, workload FORMAT PrettyCompactNoEscapes"
        )
    );
    println!("\n== loopgate status");
    print!("{}", String::from_utf8_lossy(&lg(&["status"])?.stdout));
    drop(guard);
    println!(
        "\n== stopped the agent and detached its programs; state kept in {}",
        dir.display()
    );
    Ok(())
}
