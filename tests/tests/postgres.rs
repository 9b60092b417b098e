//! PostgreSQL targets: the agent answers the start-up, logs in upstream with
//! the stored credential (SCRAM-SHA-256), and takes a JWT second factor from
//! the loop's password. Real PostgreSQL, real psql loops.

use loopgate_e2e::*;

const STORED: &str = "pg-stored-pw-4471-Zq";

/// A real server with role `app` (SCRAM password `STORED`) and a table.
fn server(ip: &str) -> PgServer {
    let pg = PgServer::start(ip);
    pg.admin(&format!(
        "CREATE ROLE app LOGIN PASSWORD '{STORED}'; CREATE TABLE orders (id int); \
         INSERT INTO orders VALUES (1), (2), (3); GRANT SELECT ON orders TO app;"
    ));
    pg
}

/// A tagged psql that never prompts (`-w`); `env` is extra environment.
fn psql(agent: &Agent, workload: &str, pg: &PgServer, env: &[&str], sql: &str) -> (bool, String) {
    let conn = format!(
        // Plain: with libpq's default sslmode=prefer a refused TLS login is
        // retried in plain, and these tests count sessions.
        "host={} port={} user=loop-user dbname=postgres connect_timeout=10 sslmode=disable",
        pg.addr.ip(),
        pg.addr.port()
    );
    let mut args = vec!["env"];
    args.extend_from_slice(env);
    args.extend_from_slice(&["psql", "-X", "-w", "-At", "-d", &conn, "-c", sql]);
    let out = agent.exec(workload, &args);
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

fn secret_file(dir: &std::path::Path, name: &str, value: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("{value}\n")).unwrap();
    p.display().to_string()
}

#[test]
fn psql_logs_in_with_the_stored_credential_it_never_sees() {
    let pg = server("127.10.5.1");
    let dir = tempfile::tempdir().unwrap();
    let good = secret_file(dir.path(), "orders-db", STORED);
    let bad = secret_file(dir.path(), "stale", "an-old-password");
    let agent = Agent::start(
        AgentSpec::new("pglogin")
            .raw(&format!(
                "\n[[targets]]\nname = \"orders-db\"\naddress = \"{}\"\nprotocol = \"postgres\"\n[targets.credential]\nusername = \"app\"\npassword_file = \"{good}\"\n",
                pg.addr
            )),
    );
    // The loop names any user and no password; the server sees `app`.
    let (ok, out) = psql(
        &agent,
        "report-bot",
        &pg,
        &[],
        "SELECT current_user, count(*) FROM orders",
    );
    assert!(ok, "{out}\n{}", agent.log());
    assert_eq!(out.trim(), "app|3");
    // The replay shows who logged in where.
    let first = agent.wait_sessions("the psql session", |s| {
        s.len() == 1 && s[0]["outcome"] == "ok"
    });
    let replay = stdout(&agent.cli(&["replay", first[0]["session_id"].as_str().unwrap()]));
    assert!(replay.contains("login to postgres as app"), "{replay}");
    // A replication connection is refused (it would bypass statement policy).
    let conn = format!(
        "host={} port={} user=app dbname=postgres replication=database sslmode=disable",
        pg.addr.ip(),
        pg.addr.port()
    );
    let out = agent.exec(
        "report-bot",
        &["psql", "-X", "-w", "-d", &conn, "-c", "IDENTIFY_SYSTEM"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("replication connections are not allowed"),
        "{}",
        stderr(&out)
    );
    // A Python driver (psycopg2, libpq) the same way, with a query
    // parameter and a cancel (sent on a second connection, relayed).
    let out = agent.python(
        "report-bot",
        r#"
import sys, threading, psycopg2
c = psycopg2.connect(host=sys.argv[1], port=int(sys.argv[2]), user="anyone", dbname="postgres", connect_timeout=10)
cur = c.cursor()
cur.execute("SELECT current_user, count(*) FROM orders WHERE id >= %s", (2,))
print(cur.fetchone())
threading.Timer(0.5, c.cancel).start()
try:
    cur.execute("SELECT pg_sleep(20)")
    print("not cancelled")
except psycopg2.errors.QueryCanceled:
    print("cancelled")
"#,
        &[&pg.addr.ip().to_string(), &pg.addr.port().to_string()],
    );
    assert_eq!(stdout(&out), "('app', 2)\ncancelled\n", "{}", stderr(&out));
    let s = agent.wait_sessions("four postgres sessions", |s| {
        s.len() == 4 && s.iter().all(|r| r["outcome"] != "open")
    });
    assert!(s.iter().all(|r| r["protocol"] == "postgres"), "{s:?}");
    assert_eq!(
        s.iter().filter(|r| r["outcome"] == "ok").count(),
        3,
        "{s:?}"
    );
    assert_eq!(
        s.iter().filter(|r| r["outcome"] == "denied").count(),
        1,
        "{s:?}"
    );
    assert_eq!(
        s.iter()
            .filter(|r| r["detail"] == "cancel request relayed")
            .count(),
        1
    );
    assert!(!agent.log().contains(STORED));
    drop(agent);

    // A stale stored password: the server's own error reaches the loop, and
    // the session records it.
    let agent = Agent::start(AgentSpec::new("pgstale").raw(&format!(
        "\n[[targets]]\nname = \"orders-db\"\naddress = \"{}\"\nprotocol = \"postgres\"\n[targets.credential]\nusername = \"app\"\npassword_file = \"{bad}\"\n",
        pg.addr
    )));
    let (ok, out) = psql(&agent, "report-bot", &pg, &[], "SELECT 1");
    assert!(!ok);
    assert!(
        out.contains("password authentication failed for user \"app\""),
        "{out}"
    );
    let s = agent.wait_sessions("one failed session", |s| {
        s.len() == 1 && s[0]["outcome"] != "open"
    });
    assert_eq!(s[0]["outcome"], "upstream_error");
    assert!(
        s[0]["detail"]
            .as_str()
            .unwrap()
            .contains("the server refused the login as app"),
        "{:?}",
        s[0]
    );
    assert!(!agent.log().contains("an-old-password"));
    drop(agent);

    // A server that asks for the password in clear text (a downgrade) gets
    // nothing: only SCRAM is allowed unless the target says otherwise.
    pg.admin(&format!("CREATE ROLE legacy LOGIN PASSWORD '{STORED}'"));
    pg.prepend_hba("host all legacy 0.0.0.0/0 password");
    let agent = Agent::start(AgentSpec::new("pgdowngrade").raw(&format!(
        "\n[[targets]]\nname = \"orders-db\"\naddress = \"{}\"\nprotocol = \"postgres\"\n[targets.credential]\nusername = \"legacy\"\npassword_file = \"{good}\"\n",
        pg.addr
    )));
    let (ok, out) = psql(&agent, "report-bot", &pg, &[], "SELECT 1");
    assert!(!ok);
    assert!(
        out.contains("asks for a password login, which target orders-db does not allow"),
        "{out}"
    );
}

#[test]
fn a_jwt_in_the_postgres_password_is_verified_and_replaced() {
    let pg = server("127.10.5.2");
    let dir = tempfile::Builder::new()
        .prefix("lgt-pgjwt-")
        .tempdir()
        .unwrap();
    let pw = secret_file(dir.path(), "orders-db", STORED);
    let idp = Idp::new(dir.path());
    let policy = idp.signed_bots_policy("orders-db", "orders-db", "signed-bots-read-orders");
    let agent = Agent::start(
        AgentSpec::new("pgjwt")
            .raw(&format!(
                "\n[[targets]]\nname = \"orders-db\"\naddress = \"{}\"\nprotocol = \"postgres\"\n[targets.credential]\nusername = \"app\"\npassword_file = \"{pw}\"\n",
                pg.addr
            ))
            .policy("orders.toml", &policy),
    );
    let sql = "SELECT current_user, count(*) FROM orders";
    let good = format!("PGPASSWORD={}", idp.token("etl@example", "orders-db", 300));
    let (ok, out) = psql(&agent, "signed-etl", &pg, &[&good], sql);
    assert!(ok, "{out}\n{}", agent.log());
    assert_eq!(out.trim(), "app|3");

    let expired = format!("PGPASSWORD={}", idp.token("etl@example", "orders-db", -600));
    let (ok, out) = psql(&agent, "signed-etl", &pg, &[&expired], sql);
    assert!(!ok);
    assert!(
        out.contains("the JWT second factor was refused: the token has expired"),
        "{out}"
    );
    let wrong = format!("PGPASSWORD={}", idp.token("etl@example", "billing-db", 300));
    let (ok, out) = psql(&agent, "signed-etl", &pg, &[&wrong], sql);
    assert!(!ok);
    assert!(out.contains("audience is not orders-db"), "{out}");
    // Without a password psql cannot answer the agent's request at all.
    let (ok, out) = psql(&agent, "signed-etl", &pg, &[], sql);
    assert!(!ok);
    assert!(out.contains("password"), "{out}");

    let s = agent.wait_sessions("four sessions", |s| {
        s.len() == 4 && s.iter().all(|r| r["outcome"] != "open")
    });
    let outcomes: Vec<&str> = s.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "ok").count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| **o == "denied").count(),
        2,
        "{outcomes:?}"
    );
    let log = agent.log();
    assert!(!log.contains(STORED));
    assert!(!log.contains(good.trim_start_matches("PGPASSWORD=")));
}

#[test]
fn malformed_start_up_bytes_end_only_that_session() {
    let pg = server("127.10.5.3");
    let dir = tempfile::tempdir().unwrap();
    let pw = secret_file(dir.path(), "orders-db", STORED);
    let agent = Agent::start(AgentSpec::new("pgbad").raw(&format!(
        "\n[[targets]]\nname = \"orders-db\"\naddress = \"{}\"\nprotocol = \"postgres\"\n[targets.credential]\nusername = \"app\"\npassword_file = \"{pw}\"\n",
        pg.addr
    )));
    // An HTTP request to the database port: the length field reads as a
    // huge start-up packet; the loop gets a protocol-native error.
    let out = agent.python(
        "confused-bot",
        r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
data = s.recv(512)
print(data[:1].decode(), b"invalid start-up packet length" in data)
"#,
        &[&pg.addr.ip().to_string(), &pg.addr.port().to_string()],
    );
    assert_eq!(stdout(&out).trim(), "E True", "{}", stderr(&out));
    // A well-formed session at the same time is unaffected.
    let (ok, out) = psql(
        &agent,
        "report-bot",
        &pg,
        &[],
        "SELECT count(*) FROM orders",
    );
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "3");
    let s = agent.wait_sessions("two sessions", |s| {
        s.len() == 2 && s.iter().all(|r| r["outcome"] != "open")
    });
    let bad = s.iter().find(|r| r["workload"] == "confused-bot").unwrap();
    assert_eq!(bad["outcome"], "client_error", "{bad}");
    assert!(
        bad["detail"]
            .as_str()
            .unwrap()
            .contains("invalid start-up packet length"),
        "{bad}"
    );
}

#[test]
fn the_agent_logs_in_over_verified_tls_when_the_target_has_a_ca() {
    let pg = PgServer::start_tls("127.10.5.4");
    pg.admin(&format!("CREATE ROLE app LOGIN PASSWORD '{STORED}'"));
    let dir = tempfile::tempdir().unwrap();
    let pw = secret_file(dir.path(), "orders-db", STORED);
    let target = |ca: &str| {
        format!(
            "\n[[targets]]\nname = \"orders-db\"\naddress = \"{}\"\nprotocol = \"postgres\"\n[targets.credential]\nusername = \"app\"\npassword_file = \"{pw}\"\n{ca}",
            pg.addr
        )
    };
    let ca = pg.ca.as_ref().unwrap().display().to_string();
    let agent =
        Agent::start(AgentSpec::new("pgtls").raw(&target(&format!("ca_file = \"{ca}\"\n"))));
    // The server refuses logins without TLS; the loop itself speaks plain
    // protocol to the agent on loopback.
    let (ok, out) = psql(
        &agent,
        "report-bot",
        &pg,
        &["PGSSLMODE=disable"],
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert!(ok, "{out}\n{}", agent.log());
    assert_eq!(out.trim(), "t", "the agent's leg is TLS");
    drop(agent);
    // Without the CA the agent does not use TLS, and the server refuses.
    let agent = Agent::start(AgentSpec::new("pgnotls").raw(&target("")));
    let (ok, out) = psql(&agent, "report-bot", &pg, &[], "SELECT 1");
    assert!(!ok);
    assert!(out.contains("no encryption"), "{out}");
    drop(agent);
    // A CA that did not sign the server's certificate: the login stops at TLS.
    let other = PgServer::start_tls("127.10.5.5");
    let wrong = other.ca.as_ref().unwrap().display().to_string();
    let agent =
        Agent::start(AgentSpec::new("pgbadca").raw(&target(&format!("ca_file = \"{wrong}\"\n"))));
    let (ok, out) = psql(&agent, "report-bot", &pg, &[], "SELECT 1");
    assert!(!ok);
    assert!(out.contains("TLS with the server failed"), "{out}");
    let s = agent.wait_sessions("a failed session", |s| {
        s.len() == 1 && s[0]["outcome"] != "open"
    });
    assert_eq!(s[0]["outcome"], "upstream_error");
}

/// A victim session through the agent (raw protocol): logs in, starts
/// `SELECT pg_sleep(secs)`, prints its `BackendKeyData` (`pid key`), then
/// `cancelled` or `completed`.
const VICTIM: &str = r#"
import socket, struct, sys
host, port, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=60)
params = b"user\0loop-user\0database\0postgres\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
def msg():
    h = b""
    while len(h) < 5:
        c = s.recv(5 - len(h))
        if not c:
            sys.exit("the connection closed")
        h += c
    n = struct.unpack("!i", h[1:])[0] - 4
    b = b""
    while len(b) < n:
        b += s.recv(n - len(b))
    return h[:1], b
pid = key = None
while True:
    t, b = msg()
    if t == b"K":
        pid, key = struct.unpack("!ii", b)
    elif t == b"E":
        sys.exit("login failed")
    elif t == b"Z":
        break
q = ("SELECT pg_sleep(%s)" % secs).encode() + b"\0"
s.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
print(pid, key, flush=True)
while True:
    t, b = msg()
    if t == b"E":
        print("cancelled" if b"57014" in b else "error", flush=True)
        break
    if t == b"C":
        print("completed", flush=True)
        break
"#;

/// A hand-made 16-byte CancelRequest for `pid key`; prints what came back.
const CANCEL: &str = r#"
import socket, struct, sys
data = b""
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.sendall(struct.pack("!iiii", 16, 80877102, int(sys.argv[3]), int(sys.argv[4])))
    while True:
        b = s.recv(512)
        if not b:
            break
        data += b
except (ConnectionResetError, BrokenPipeError):
    print("reset")
print(data[:1].decode() or "closed", b"cancel request refused" in data)
"#;

#[test]
fn p_cancel_requests_are_decided_before_they_reach_the_server() {
    use std::io::BufRead;
    let pg = server("127.10.59.1");
    let dir = tempfile::Builder::new()
        .prefix("lgt-p-pgcancel-")
        .tempdir()
        .unwrap();
    let pw = secret_file(dir.path(), "orders-db", STORED);
    let idp = Idp::new(dir.path());
    // signed-* must send a JWT; p-victim-* may connect without one; anyone
    // else is refused by the target's default.
    let policy = idp.signed_bots_policy("orders-db", "orders-db", "signed-bots-read-orders")
        + r#"
[[workloads]]
name = "p-victims"
workload = "p-victim-*"

[[rules]]
id = "p-victims-use-orders"
workloads = ["p-victims"]
targets = ["orders-db"]
action = "allow"
"#;
    let agent = Agent::start(
        AgentSpec::new("p-pgcancel")
            .raw(&format!(
                "\n[[targets]]\nname = \"orders-db\"\naddress = \"{}\"\nprotocol = \"postgres\"\n[targets.credential]\nusername = \"app\"\npassword_file = \"{pw}\"\n",
                pg.addr
            ))
            .policy("orders.toml", &policy),
    );
    let victim_py = agent.path("p-victim.py");
    std::fs::write(&victim_py, VICTIM).unwrap();
    set_mode(&victim_py, 0o644);
    let (host, port) = (pg.addr.ip().to_string(), pg.addr.port().to_string());
    // A victim query, and the key that cancels it.
    let victim = |secs: &str| {
        let mut child = agent.spawn_exec(
            "p-victim-app",
            &[
                "/usr/bin/python3",
                victim_py.to_str().unwrap(),
                &host,
                &port,
                secs,
            ],
        );
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("victim output").unwrap();
        let (pid, key) = first.split_once(' ').expect("pid key");
        (child, lines, pid.to_owned(), key.to_owned())
    };
    let cancel = |workload: &str, pid: &str, key: &str| {
        let out = agent.python(workload, CANCEL, &[&host, &port, pid, key]);
        stdout(&out)
    };

    // The control: an allowed workload's cancel is relayed and works.
    let (mut child, mut lines, pid, key) = victim("20");
    let started = std::time::Instant::now();
    let got = cancel("p-victim-helper", &pid, &key);
    assert_eq!(got.trim(), "closed False", "{got}");
    assert_eq!(lines.next().unwrap().unwrap(), "cancelled");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    child.wait().unwrap();

    // The attack: the same cancel from a workload that requires a JWT (a
    // cancel carries none) and from one the policy refuses. Neither reaches
    // the server: the victim's query runs to its end.
    let (mut child, mut lines, pid, key) = victim("4");
    let got = cancel("signed-p-bot", &pid, &key);
    assert_eq!(got.trim(), "E True", "{got}");
    let got = cancel("p-stranger", &pid, &key);
    assert!(got.contains("reset") || got.contains("closed"), "{got}");
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "completed",
        "a refused cancel request reached the server"
    );
    child.wait().unwrap();

    let s = agent.wait_sessions("five sessions", |s| {
        s.len() == 5 && s.iter().all(|r| r["outcome"] != "open")
    });
    let by = |w: &str| s.iter().find(|r| r["workload"] == w).unwrap().clone();
    assert_eq!(by("p-victim-helper")["detail"], "cancel request relayed");
    assert_eq!(by("p-stranger")["outcome"], "denied");
    let jwt = by("signed-p-bot");
    assert_eq!(jwt["outcome"], "denied", "{jwt}");
    let replay = stdout(&agent.cli(&["replay", "--json", jwt["session_id"].as_str().unwrap()]));
    let event: Value = replay
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["kind"] == "event" && v["event_kind"] == "cancel")
        .unwrap_or_else(|| panic!("no cancel event: {replay}"));
    assert_eq!(event["verdict"], "deny", "{event}");
    assert_eq!(event["rule_id"], "jwt-required:signed-bots", "{event}");
    assert!(!agent.log().contains(STORED));
}
