//! Transparent redirect: real eBPF programs on real cgroups, real loops.

use loopgate_e2e::*;

/// Kernel programs the agent attaches: 13 per attach point, 2 tracepoints.
const PROGRAMS: usize = 15;
const BODY: &str = "hello from the orders api\n";

#[test]
fn tagged_curl_is_redirected_and_recorded_with_its_identity() {
    let http = HttpServer::start("127.10.1.1", BODY);
    let agent = Agent::start(AgentSpec::new("identity").target(
        "orders-api",
        &http.addr.to_string(),
        "http",
    ));
    let url = format!("http://{}/orders", http.addr);
    let out = agent.exec("orders-bot", &["curl", "-sS", "-m", "10", &url]);
    assert!(out.status.success(), "curl failed: {}", stderr(&out));
    assert_eq!(stdout(&out), BODY);
    assert_eq!(http.requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    let rows = agent.wait_sessions("one closed session", |s| {
        s.iter().any(|r| r["ended_at"].is_string())
    });
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let r = &rows[0];
    assert_eq!(r["workload"], "orders-bot");
    assert_eq!(r["target"], "orders-api");
    assert_eq!(r["protocol"], "http");
    assert_eq!(r["destination"], http.addr.to_string());
    assert_eq!(r["uid"], 65534, "loops run as nobody by default");
    assert_eq!(r["comm"], "curl");
    assert_eq!(r["outcome"], "ok");
    assert!(r["pid"].as_u64().unwrap() > 1);
    assert!(r["cgroup"]
        .as_str()
        .unwrap()
        .starts_with("lgt-identity/orders-bot/i-"));
    assert!(
        r["bytes_up"].as_u64().unwrap() > 40,
        "the GET request went up"
    );
    let down = r["bytes_down"].as_u64().unwrap();
    assert!(
        down > BODY.len() as u64,
        "response headers + body came down: {down}"
    );
    for k in ["session_id", "started_at", "ended_at"] {
        assert!(r[k].is_string(), "{k} missing in {r}");
    }
    assert_eq!(agent.counter("redirected"), 1);
}

#[test]
fn untagged_process_connects_directly() {
    let echo = EchoServer::start("127.10.1.2");
    let agent =
        Agent::start(AgentSpec::new("untagged").target("echo", &echo.addr.to_string(), "tcp"));
    // The test process is outside the agent's cgroup subtree.
    assert_eq!(direct_roundtrip(echo.addr, b"direct"), b"direct");
    assert_eq!(echo.accepted(), 1);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        agent.sessions().is_empty(),
        "an untagged connection was recorded"
    );
    assert_eq!(agent.counter("redirected"), 0);
}

#[test]
fn config_errors_name_file_key_and_line() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[agent]\nproxy_port = 15001\negres = \"deny\"\n").unwrap();
    let out = std::process::Command::new(loopgate_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("agent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&cfg.display().to_string()), "{err}");
    assert!(err.contains("agent.egres"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("unknown field"), "{err}");

    std::fs::write(
        &cfg,
        "[agent]\n[[targets]]\nname = \"db\"\naddress = \"db.internal\"\nprotocol = \"postgres\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(loopgate_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("agent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("targets[0].address"), "{err}");
    assert!(err.contains("no port"), "{err}");
}

/// A non-blocking connect to a registered target completes through the proxy,
/// and the loop's `getpeername()` reports the original destination.
const NONBLOCKING: &str = r#"
import errno, select, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setblocking(False)
rc = s.connect_ex((host, port))
assert rc == errno.EINPROGRESS, rc
_, w, _ = select.select([], [s], [], 5)
assert w, "connect did not complete"
assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
s.setblocking(True)
peer = s.getpeername()
print("peer", peer[0], peer[1])
s.sendall(b"nonblocking-hello")
data = b""
while len(data) < 17:
    data += s.recv(100)
print("echo", data.decode())
"#;

#[test]
fn nonblocking_connect_and_getpeername_show_the_original_peer() {
    let echo = EchoServer::start("127.10.1.3");
    let agent =
        Agent::start(AgentSpec::new("nonblock").target("echo", &echo.addr.to_string(), "tcp"));
    let port = echo.addr.port().to_string();
    let out = agent.python("nb", NONBLOCKING, &["127.10.1.3", &port]);
    assert!(out.status.success(), "loop failed: {}", stderr(&out));
    let o = stdout(&out);
    assert!(o.contains(&format!("peer 127.10.1.3 {port}")), "{o}");
    assert!(o.contains("echo nonblocking-hello"), "{o}");
    assert_eq!(echo.accepted(), 1);
    let rows = agent.wait_sessions("closed", |s| s.len() == 1 && s[0]["ended_at"].is_string());
    assert_eq!(rows[0]["bytes_up"], 17);
    assert_eq!(rows[0]["bytes_down"], 17);
}

const V6: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.connect((host, port))
peer = s.getpeername()
print("peer", peer[0], peer[1])
s.sendall(b"v6-hello")
data = b""
while len(data) < 8:
    data += s.recv(100)
print("echo", data.decode())
"#;

#[test]
fn ipv6_target_is_redirected() {
    let echo = EchoServer::start("::1");
    let agent = Agent::start(AgentSpec::new("ipv6").target("echo6", &echo.addr.to_string(), "tcp"));
    let port = echo.addr.port().to_string();
    let out = agent.python("v6", V6, &["::1", &port]);
    assert!(out.status.success(), "loop failed: {}", stderr(&out));
    let o = stdout(&out);
    assert!(o.contains(&format!("peer ::1 {port}")), "{o}");
    assert!(o.contains("echo v6-hello"), "{o}");
    let rows = agent.wait_sessions("closed", |s| s.len() == 1 && s[0]["ended_at"].is_string());
    assert_eq!(rows[0]["target"], "echo6");
    assert_eq!(rows[0]["destination"], format!("[::1]:{port}"));
    assert_eq!(rows[0]["bytes_down"], 8);
    assert_eq!(agent.counter("redirected"), 1);
}

#[test]
fn ipv4_mapped_ipv6_connect_is_redirected() {
    let echo = EchoServer::start("127.10.1.4");
    let agent =
        Agent::start(AgentSpec::new("mapped").target("echo", &echo.addr.to_string(), "tcp"));
    let port = echo.addr.port().to_string();
    let out = agent.python("mapped", V6, &["::ffff:127.10.1.4", &port]);
    assert!(out.status.success(), "loop failed: {}", stderr(&out));
    let o = stdout(&out);
    assert!(o.contains(&format!("peer ::ffff:127.10.1.4 {port}")), "{o}");
    assert!(o.contains("echo v6-hello"), "{o}");
    let rows = agent.wait_sessions("closed", |s| s.len() == 1 && s[0]["ended_at"].is_string());
    assert_eq!(rows[0]["destination"], echo.addr.to_string());
    assert_eq!(echo.accepted(), 1);
}

const CONNECT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"ping")
    data = s.recv(4)
    print("ok", data.decode())
except OSError as e:
    print("error", e.errno)
"#;

#[test]
fn egress_deny_refuses_with_eperm_and_records_the_denial() {
    let target = EchoServer::start("127.10.1.5");
    let other = EchoServer::start("127.10.1.6");
    let agent = Agent::start(AgentSpec::new("deny").egress("deny").target(
        "allowed",
        &target.addr.to_string(),
        "tcp",
    ));
    let out = agent.python(
        "denied-bot",
        CONNECT,
        &["127.10.1.6", &other.addr.port().to_string()],
    );
    assert_eq!(
        stdout(&out).trim(),
        "error 1",
        "expected EPERM: {}",
        stderr(&out)
    );
    assert_eq!(other.accepted(), 0, "the denied server saw a connection");
    // The registered target still works, and the agent's own upstream connect
    // was not subject to egress deny (it is outside the tagged subtree).
    let out = agent.python(
        "denied-bot",
        CONNECT,
        &["127.10.1.5", &target.addr.port().to_string()],
    );
    assert_eq!(stdout(&out).trim(), "ok ping", "{}", stderr(&out));
    let rows = agent.wait_sessions("denial + session", |s| {
        s.len() == 2 && s.iter().all(|r| r["ended_at"].is_string())
    });
    let denial = rows
        .iter()
        .find(|r| r["outcome"] == "denied")
        .expect("a denial row");
    assert_eq!(denial["destination"], other.addr.to_string());
    assert_eq!(denial["workload"], "denied-bot");
    assert_eq!(denial["uid"], 65534);
    assert_eq!(denial["comm"], "python3");
    assert_eq!(agent.counter("denied"), 1);
    assert_eq!(
        agent.counter("redirected"),
        1,
        "only the loop's connect was redirected"
    );
}

#[test]
fn egress_audit_relays_and_records_unregistered_destinations() {
    let other = EchoServer::start("127.10.1.7");
    let agent = Agent::start(AgentSpec::new("audit").egress("audit"));
    let out = agent.python(
        "auditee",
        CONNECT,
        &["127.10.1.7", &other.addr.port().to_string()],
    );
    assert_eq!(stdout(&out).trim(), "ok ping", "{}", stderr(&out));
    assert_eq!(other.accepted(), 1);
    let rows = agent.wait_sessions("audited session", |s| {
        s.len() == 1 && s[0]["ended_at"].is_string()
    });
    let r = &rows[0];
    assert_eq!(r["target"], "(egress)");
    assert_eq!(r["protocol"], "tcp");
    assert_eq!(r["destination"], other.addr.to_string());
    assert_eq!(r["workload"], "auditee");
    assert_eq!(
        (r["bytes_up"].as_u64(), r["bytes_down"].as_u64()),
        (Some(4), Some(4))
    );
}

#[test]
fn host_name_targets_are_resolved() {
    let echo = EchoServer::start("127.0.0.1");
    let agent = Agent::start(AgentSpec::new("hostname").target(
        "local",
        &format!("localhost:{}", echo.addr.port()),
        "tcp",
    ));
    let st = agent.status();
    let resolved = st["targets"][0]["resolved"].as_array().unwrap();
    assert!(
        resolved
            .iter()
            .any(|a| a == &Value::from(echo.addr.to_string())),
        "{st}"
    );
    let out = agent.python(
        "resolver",
        CONNECT,
        &["127.0.0.1", &echo.addr.port().to_string()],
    );
    assert_eq!(stdout(&out).trim(), "ok ping", "{}", stderr(&out));
    let rows = agent.wait_sessions("session", |s| s.len() == 1);
    assert_eq!(rows[0]["target"], "local");
}

#[test]
fn killed_agent_fails_closed_and_restart_takes_over_without_retagging() {
    let echo = EchoServer::start("127.10.1.8");
    let mut agent =
        Agent::start(AgentSpec::new("failclosed").target("echo", &echo.addr.to_string(), "tcp"));
    let mut l = Loop::start(&agent, "survivor", echo.addr);
    assert_eq!(l.ask(), "ok");
    assert_eq!(echo.accepted(), 1);
    agent.wait_sessions("first session closed", |s| {
        s.len() == 1 && s[0]["outcome"] == "ok"
    });

    agent.kill9();
    let t = std::time::Instant::now();
    assert_eq!(
        l.ask(),
        "error 111",
        "tagged loop must be refused (ECONNREFUSED)"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "refusal took {:?}",
        t.elapsed()
    );
    assert_eq!(
        echo.accepted(),
        1,
        "the tagged loop reached the server directly"
    );
    assert_eq!(
        direct_roundtrip(echo.addr, b"untagged"),
        b"untagged",
        "untagged process must still connect"
    );
    assert_eq!(echo.accepted(), 2);

    agent.spawn();
    let st = agent.status();
    let programs = st["programs"].as_array().unwrap();
    assert_eq!(programs.len(), PROGRAMS, "{st}");
    assert!(
        programs
            .iter()
            .filter(|p| p["attach_type"] != "tracepoint")
            .all(|p| p["how"] == "updated"),
        "pinned links re-used: {st}"
    );
    // Same process, same cgroup: no re-tagging.
    assert_eq!(l.ask(), "ok");
    assert_eq!(echo.accepted(), 3);
    drop(l.child.stdin.take());
    assert!(l.child.wait().unwrap().success());
    let rows = agent.wait_sessions("two sessions", |s| {
        s.iter().filter(|r| r["outcome"] == "ok").count() == 2
    });
    assert!(rows.iter().all(|r| r["workload"] == "survivor"));
}

const CONCURRENT: &str = r#"
import socket, sys, threading
host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
results = [None] * n
barrier = threading.Barrier(n)
def worker(i):
    try:
        payload = (("%06d" % i).encode() * (size // 6 + 1))[:size]
        s = socket.create_connection((host, port), timeout=60)
        barrier.wait(timeout=120)  # all n connections open at once
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
        s.close()
        results[i] = got == payload or "mismatch %d bytes" % len(got)
    except Exception as e:
        results[i] = repr(e)
threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join(180)
print("ok", sum(1 for r in results if r is True))
print("bad", [r for r in results if r is not True][:5])
"#;

#[test]
fn five_hundred_concurrent_tagged_connections_complete_with_correct_bytes() {
    let echo = EchoServer::start("127.10.1.9");
    let agent =
        Agent::start(AgentSpec::new("concurrent").target("echo", &echo.addr.to_string(), "tcp"));
    let out = agent.python(
        "swarm",
        CONCURRENT,
        &["127.10.1.9", &echo.addr.port().to_string(), "500", "20000"],
    );
    let o = stdout(&out);
    assert!(o.contains("ok 500"), "{o}\n{}", stderr(&out));
    let rows = agent.wait_sessions("500 closed sessions", |s| {
        s.len() == 500 && s.iter().all(|r| r["ended_at"].is_string())
    });
    for r in &rows {
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["bytes_up"], 20000, "{r}");
        assert_eq!(r["bytes_down"], 20000, "{r}");
    }
    assert_eq!(agent.counter("redirected"), 500);
    assert_eq!(echo.accepted(), 500);
}

#[test]
fn connection_to_the_proxy_without_a_record_is_closed_and_others_continue() {
    use std::io::Read;
    let echo = EchoServer::start("127.10.1.10");
    let agent =
        Agent::start(AgentSpec::new("norecord").target("echo", &echo.addr.to_string(), "tcp"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "the proxy must close an unknown connection"
    );
    assert_eq!(echo.accepted(), 0);
    let out = agent.python(
        "after",
        CONNECT,
        &["127.10.1.10", &echo.addr.port().to_string()],
    );
    assert_eq!(stdout(&out).trim(), "ok ping", "{}", stderr(&out));
    // The refusal is recorded, as no one.
    let s = agent.wait_sessions("the unidentified connection recorded", |s| {
        s.iter().any(|r| r["workload"] == "(unidentified)")
    });
    let r = s
        .iter()
        .find(|r| r["workload"] == "(unidentified)")
        .unwrap();
    assert_eq!(r["outcome"], "denied", "{r}");
    assert!(
        r["detail"].as_str().unwrap().contains("no redirect record"),
        "{r}"
    );
}

#[test]
fn sre_named_cgroup_is_a_workload() {
    let echo = EchoServer::start("127.10.1.11");
    let cg = NamedCgroup::create("lgt-named.slice");
    let agent = Agent::start(
        AgentSpec::new("named")
            .target("echo", &echo.addr.to_string(), "tcp")
            .raw("\n[[workloads]]\nname = \"etl-unit\"\ncgroup = \"lgt-named.slice\"\n"),
    );
    let script = agent.path("connect.py");
    std::fs::write(&script, CONNECT).unwrap();
    // What systemd would do for a unit: put the process in the unit's cgroup.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/python3 {} 127.10.1.11 {}",
            cg.path().display(),
            script.display(),
            echo.addr.port()
        ))
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "ok ping", "{}", stderr(&out));
    let rows = agent.wait_sessions("session", |s| s.len() == 1);
    assert_eq!(rows[0]["workload"], "etl-unit");
    assert_eq!(rows[0]["cgroup"], "lgt-named.slice");
}

#[test]
fn admin_socket_refuses_unprivileged_callers() {
    let agent = Agent::start(AgentSpec::new("adminauth"));
    let out = agent.cli_as("nobody", "nogroup", &["status"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
    // Root is served.
    assert_eq!(agent.status()["egress"], "allow");
}

#[test]
fn admin_group_members_are_served() {
    let agent = Agent::start(AgentSpec::new("admingroup").raw(""));
    // Reconfigure with admin_group and restart: the socket becomes 0660 root:nogroup.
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        cfg.replace("[agent]\n", "[agent]\nadmin_group = \"nogroup\"\n"),
    )
    .unwrap();
    let mut agent = agent;
    assert!(agent.terminate());
    agent.spawn();
    let out = agent.cli_as("nobody", "nogroup", &["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["programs"].as_array().unwrap().len(), PROGRAMS);
}

const HOLD: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=30)
s.sendall(b"ping")
print("connected", s.recv(4).decode(), flush=True)
sys.stdin.readline()
"#;

#[test]
fn sigterm_drains_then_closes_open_sessions() {
    let echo = EchoServer::start("127.10.1.12");
    let mut agent =
        Agent::start(AgentSpec::new("drain").target("echo", &echo.addr.to_string(), "tcp"));
    let script = agent.path("hold.py");
    std::fs::write(&script, HOLD).unwrap();
    let port = echo.addr.port().to_string();
    let mut child = agent.spawn_exec(
        "holder",
        &[
            "/usr/bin/python3",
            script.to_str().unwrap(),
            "127.10.1.12",
            &port,
        ],
    );
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "connected ping");
    assert_eq!(agent.status()["active_sessions"], 1);
    let t = std::time::Instant::now();
    assert!(agent.terminate(), "agent must exit 0 after SIGTERM");
    let took = t.elapsed();
    // shutdown_grace_secs = 2 in test configs.
    assert!(
        took >= std::time::Duration::from_secs(2),
        "did not wait for the open session: {took:?}"
    );
    assert!(
        took < std::time::Duration::from_secs(10),
        "drain took {took:?}"
    );
    drop(child.stdin.take());
    let _ = child.wait();
    let rows = agent.sessions();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["outcome"], "shutdown");
    assert_eq!(rows[0]["bytes_up"], 4);
}
