//! Session audit in a real ClickHouse (Debian's 18.16), with real agents and loops.

use loopgate_e2e::*;

const CONNECT: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=10)
        msg = b"ping-%d" % i
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            d = s.recv(100)
            if not d:
                break
            got += d
        s.close()
        ok += got == msg
    except OSError as e:
        print("error", e, flush=True)
print("ok", ok)
"#;

fn run_loop(agent: &Agent, host: &str, port: u16, n: usize) {
    let out = agent.python(
        "auditee",
        CONNECT,
        &[host, &port.to_string(), &n.to_string()],
    );
    assert!(
        stdout(&out).contains(&format!("ok {n}")),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn sessions_and_payload_reach_clickhouse_and_the_cli_reads_them() {
    let ch = ClickHouse::start();
    let echo = EchoServer::start("127.10.2.1");
    let agent = Agent::start(
        AgentSpec::new("chbasic")
            .target("echo", &echo.addr.to_string(), "tcp")
            .clickhouse(&ch, ""),
    );
    run_loop(&agent, "127.10.2.1", echo.addr.port(), 3);
    ch.wait_count(
        "SELECT count() FROM loopgate.sessions FINAL WHERE outcome = 'ok'",
        3,
        30,
    );
    // Migrations are recorded; the legacy dialect was chosen for 18.16.
    assert_eq!(
        ch.query("SELECT version, dialect FROM loopgate.schema_migrations FORMAT TSV")
            .trim(),
        "1\tlegacy"
    );
    let row = ch.query(
        "SELECT workload, target, protocol, uid, comm, bytes_up, bytes_down FROM loopgate.sessions FINAL ORDER BY started_at LIMIT 1 FORMAT TSV",
    );
    assert_eq!(row.trim(), "auditee\techo\ttcp\t65534\tpython3\t6\t6");
    // The CLI reads ClickHouse when it is configured.
    let rows = agent.sessions();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert!(rows
        .iter()
        .all(|r| r["outcome"] == "ok" && r["workload"] == "auditee"));
    let id = rows[0]["session_id"].as_str().unwrap().to_owned();
    let chunks = ch.count(&format!(
        "SELECT count() FROM loopgate.chunks FINAL WHERE session_id = '{id}'"
    ));
    assert_eq!(chunks, 2, "one chunk up, one down");
    let out = agent.cli(&["replay", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("> up #0 @0 6 bytes"), "{text}");
    assert!(text.contains("< down #0 @0 6 bytes"), "{text}");
    assert!(text.contains("ping-0"), "{text}");
    let st = agent.status();
    assert_eq!(st["audit"]["backend"], "clickhouse");
}

const SESSIONS_OK: &str = "SELECT count() FROM loopgate.sessions FINAL WHERE outcome = 'ok'";
const SESSIONS_DISTINCT: &str = "SELECT uniqExact(session_id) FROM loopgate.sessions";

fn pending(agent: &Agent) -> u64 {
    agent.status()["audit"]["spool_pending_bytes"]
        .as_u64()
        .unwrap()
}

fn wait_drained(agent: &Agent) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pending(agent) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "spool not drained: {}",
            agent.status()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn ten_thousand_connections_are_recorded_exactly_once() {
    let ch = ClickHouse::start();
    let echo = EchoServer::start("127.10.2.2");
    let agent = Agent::start(
        AgentSpec::new("ch10k")
            .target("echo", &echo.addr.to_string(), "tcp")
            .clickhouse(&ch, ""),
    );
    run_loop(&agent, "127.10.2.2", echo.addr.port(), 10_000);
    ch.wait_count(SESSIONS_OK, 10_000, 120);
    wait_drained(&agent);
    assert_eq!(ch.count(SESSIONS_DISTINCT), 10_000);
    assert_eq!(
        ch.count("SELECT count() FROM loopgate.chunks FINAL"),
        20_000,
        "one chunk each way per session"
    );
    assert_eq!(echo.accepted(), 10_000);
}

#[test]
fn clickhouse_outage_loses_nothing_and_the_spool_drains() {
    let mut ch = ClickHouse::start();
    let echo = EchoServer::start("127.10.2.3");
    let agent = Agent::start(
        AgentSpec::new("choutage")
            .target("echo", &echo.addr.to_string(), "tcp")
            .clickhouse(&ch, ""),
    );
    run_loop(&agent, "127.10.2.3", echo.addr.port(), 300);
    ch.wait_count(SESSIONS_OK, 300, 60);
    ch.stop();
    // Sessions continue while ClickHouse is down.
    run_loop(&agent, "127.10.2.3", echo.addr.port(), 300);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let st = agent.status();
        let err = st["audit"]["last_error"].as_str().unwrap_or("").to_owned();
        if err.contains("unreachable") && pending(&agent) > 0 {
            assert!(err.contains("connection refused"), "{err}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no outage reported: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(agent
        .log()
        .contains("audit records stay in the spool until ClickHouse accepts them"));
    ch.spawn();
    ch.wait_count(SESSIONS_OK, 600, 90);
    assert_eq!(ch.count(SESSIONS_DISTINCT), 600);
    wait_drained(&agent);
    assert!(agent.status()["audit"]["last_error"].is_null());
}

#[test]
fn agent_killed_while_draining_restarts_without_loss_or_duplicates() {
    let mut ch = ClickHouse::start();
    ch.stop();
    let echo = EchoServer::start("127.10.2.4");
    let mut agent = Agent::start(
        AgentSpec::new("chkill")
            .target("echo", &echo.addr.to_string(), "tcp")
            .clickhouse(&ch, ""),
    );
    run_loop(&agent, "127.10.2.4", echo.addr.port(), 3000);
    // Everything is in the spool; ClickHouse comes back and the drain starts.
    agent.wait_sessions_spooled(6000);
    ch.spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ch.count("SELECT count() FROM loopgate.sessions") == 0 {
        assert!(std::time::Instant::now() < deadline, "drain never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    agent.kill9();
    agent.spawn();
    ch.wait_count(SESSIONS_OK, 3000, 90);
    // Tables are inserted one after the other: wait for the last one too.
    ch.wait_count("SELECT count() FROM loopgate.chunks FINAL", 6000, 60);
    ch.wait_count(
        "SELECT count() FROM loopgate.events FINAL WHERE kind = 'connect'",
        3000,
        60,
    );
    wait_drained(&agent);
    assert_eq!(ch.count(SESSIONS_DISTINCT), 3000);
    assert_eq!(ch.count("SELECT count() FROM loopgate.chunks FINAL"), 6000);
}

#[test]
fn corrupt_spool_segment_is_quarantined_and_the_rest_delivered() {
    let mut ch = ClickHouse::start();
    ch.stop();
    let echo = EchoServer::start("127.10.2.5");
    let mut agent = Agent::start(
        AgentSpec::new("chcorrupt")
            .target("echo", &echo.addr.to_string(), "tcp")
            .clickhouse(&ch, "capture_bytes = 0"),
    );
    run_loop(&agent, "127.10.2.5", echo.addr.port(), 200);
    agent.wait_sessions_spooled(400);
    assert!(agent.terminate());
    // Damage the middle of the segment that holds the 400 session records.
    let spool = agent.path("state/spool");
    let seg = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "lgs"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 40] {
        *b ^= 0x5a;
    }
    std::fs::write(&seg, &bytes).unwrap();
    ch.spawn();
    agent.spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let quarantined = spool.join("quarantine").join(seg.file_name().unwrap());
    while !quarantined.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "segment not quarantined:\n{}",
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let log = agent.log();
    assert!(
        log.contains("corrupt bytes in the audit spool skipped"),
        "{log}"
    );
    assert!(log.contains("quarantined a spool segment"), "{log}");
    // 40 damaged bytes touch at most two records; every other record arrives,
    // including those after the damage.
    let rows = ch.count("SELECT count() FROM loopgate.sessions");
    assert!(
        (398..=400).contains(&rows),
        "{rows} session records delivered"
    );
    let before = ch.count(SESSIONS_OK);
    assert!(before >= 198, "{before}");
    // Records written after the restart are delivered as usual.
    run_loop(&agent, "127.10.2.5", echo.addr.port(), 10);
    ch.wait_count(SESSIONS_OK, before + 10, 30);
}

#[test]
fn clickhouse_errors_are_clear_and_records_stay_in_the_spool() {
    let ch = ClickHouse::start();
    let echo = EchoServer::start("127.10.2.6");
    // A read-only user: the server refuses the schema and the inserts.
    let mut agent = Agent::start(
        AgentSpec::new("chreadonly")
            .target("echo", &echo.addr.to_string(), "tcp")
            .clickhouse(&ch, "user = \"reader\""),
    );
    run_loop(&agent, "127.10.2.6", echo.addr.port(), 20);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let err = loop {
        let st = agent.status();
        if let Some(e) = st["audit"]["last_error"].as_str() {
            break e.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no error reported: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(err.contains(&ch.url()), "{err}");
    assert!(err.contains("readonly mode"), "{err}");
    assert!(pending(&agent) > 0, "records must stay in the spool");
    assert!(agent.log().contains("readonly mode"));
    // With a writable user the same spool is delivered.
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, cfg.replace("user = \"reader\"", "")).unwrap();
    assert!(agent.terminate());
    agent.spawn();
    ch.wait_count(SESSIONS_OK, 20, 60);
    wait_drained(&agent);

    // The database dropped under a running agent: a clear error, then the
    // schema is created again and nothing is lost.
    ch.query("DROP DATABASE loopgate");
    run_loop(&agent, "127.10.2.6", echo.addr.port(), 10);
    ch.wait_count(SESSIONS_OK, 10, 60);
    assert!(
        agent.log().contains("Database loopgate doesn't exist"),
        "{}",
        agent.log()
    );
    wait_drained(&agent);
}

#[test]
fn stored_credentials_never_reach_the_audit_or_the_logs() {
    const SECRET: &str = "s3cr3t-Orders-DB-pw-7c1e";
    let ch = ClickHouse::start();
    // An upstream that leaks the credential in its answer (a misconfigured banner).
    let http = HttpServer::start(
        "127.10.2.7",
        "welcome; db password is s3cr3t-Orders-DB-pw-7c1e\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("orders-db.pw");
    std::fs::write(&pw, format!("{SECRET}\n")).unwrap();
    let agent = Agent::start(
        AgentSpec::new("chsecret")
            .raw(&format!(
                "\n[[targets]]\nname = \"orders\"\naddress = \"{}\"\nprotocol = \"http\"\n[targets.credential]\nusername = \"app\"\npassword_file = \"{}\"\n",
                http.addr,
                pw.display()
            ))
            .clickhouse(&ch, ""),
    );
    let out = agent.exec(
        "leaky",
        &["curl", "-sS", "-m", "10", &format!("http://{}/", http.addr)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // The loop does not see it either: the response is masked on its way.
    assert_eq!(
        stdout(&out),
        "welcome; db password is ************************\n"
    );
    ch.wait_count(SESSIONS_OK, 1, 30);
    // The answer is recorded as the loop got it (the handler captures the
    // response on the loop's side): masked.
    ch.wait_count(
        "SELECT count() FROM loopgate.chunks FINAL WHERE direction = 'down' AND position(data, 'db password is *') > 0",
        1,
        30,
    );
    // The upstream got the stored credential as HTTP Basic; its base64 form
    // is masked in the captured request too.
    let basic = "YXBwOnMzY3IzdC1PcmRlcnMtREItcHctN2MxZQ=="; // base64("app:" + SECRET)
    let head = http.heads.lock().unwrap()[0].clone();
    assert!(
        head.contains(&format!("authorization: Basic {basic}")),
        "the upstream did not get the stored credential (head not printed: it holds it)"
    );
    assert_eq!(
        ch.count(&format!(
            "SELECT count() FROM loopgate.chunks FINAL WHERE position(data, '{basic}') > 0"
        )),
        0,
        "the Basic credential is in the captured request"
    );
    // Chunks may split the masked value; read the request back whole.
    let request: String = ch
        .query("SELECT data FROM loopgate.chunks FINAL WHERE direction = 'up' ORDER BY offset FORMAT TSV")
        .lines()
        .collect();
    assert!(
        // The whole header value `Basic <base64>` is the stored secret.
        request.contains(&format!(
            "authorization: {}\\r\\n",
            "*".repeat(6 + basic.len())
        )),
        "{request}"
    );
    assert_eq!(
        ch.count("SELECT max(masked) FROM loopgate.chunks FINAL WHERE direction = 'down'"),
        1,
        "the chunk that carried the secret is marked masked"
    );
    for t in ["sessions", "events", "chunks", "approvals"] {
        let dump = ch.query(&format!("SELECT * FROM loopgate.{t} FORMAT TSV"));
        assert!(!dump.contains(SECRET), "secret in table {t}");
    }
    let replay = agent.cli(&[
        "replay",
        agent.sessions()[0]["session_id"].as_str().unwrap(),
    ]);
    let text = stdout(&replay);
    assert!(text.contains("db password is ****"), "{text}");
    assert!(!text.contains(SECRET));
    assert!(!agent.log().contains(SECRET), "secret in the agent log");
    assert!(!agent.status().to_string().contains(SECRET));
    assert!(
        !agent.status().to_string().contains("orders-db.pw"),
        "status shows no credential paths"
    );
    // A missing credential file stops the agent with the key, not the value.
    std::fs::remove_file(&pw).unwrap();
    let out = agent.command().arg("agent").output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("targets[0].credential.password_file"), "{err}");
}

#[test]
fn documented_analyst_queries_run_on_both_dialects() {
    let ch = ClickHouse::start();
    let echo = EchoServer::start("127.10.2.8");
    let dead = {
        let l = std::net::TcpListener::bind("127.10.2.9:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        a
    };
    let other = EchoServer::start("127.10.2.10");
    let agent = Agent::start(
        AgentSpec::new("chdocs")
            .egress("deny")
            .target("echo", &echo.addr.to_string(), "tcp")
            .target("gone", &dead.to_string(), "tcp")
            .clickhouse(&ch, ""),
    );
    // Ordinary sessions, a failed one, and a denied connect.
    run_loop(&agent, "127.10.2.8", echo.addr.port(), 5);
    let out = agent.python(
        "auditee",
        CONNECT,
        &["127.10.2.9", &dead.port().to_string(), "1"],
    );
    assert!(stdout(&out).contains("ok 0"), "{}", stdout(&out));
    let out = agent.python(
        "auditee",
        CONNECT,
        &["127.10.2.10", &other.addr.port().to_string(), "1"],
    );
    assert!(stdout(&out).contains("error"), "{}", stdout(&out));
    ch.wait_count("SELECT count() FROM loopgate.sessions FINAL", 7, 60);
    ch.wait_count(
        "SELECT count() FROM loopgate.events FINAL WHERE kind = 'connection_denied'",
        1,
        60,
    );
    // Approvals are written by the policy engine (a later issue); until then
    // the test inserts two decided requests itself.
    let sid = agent.sessions()[0]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Recent times: the modern DDL's TTL would drop old rows on insert.
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
        - 600_000_000;
    let (t1, t2) = (t0 + 42_000_000, t0 + 300_000_000);
    ch.query(&format!(
        "INSERT INTO loopgate.approvals (approval_id, version, session_id, host, workload, target, rule_id, request, requested_at, decided_at, decision, approver, reason) VALUES \
         (toUUID('00000000-0000-4000-8000-000000000001'), 2, toUUID('{sid}'), 'h', 'auditee', 'echo', 'sql:drop', 'DROP TABLE t', {t0}, {t1}, 'approved', 'alice', 'planned'), \
         (toUUID('00000000-0000-4000-8000-000000000002'), 2, toUUID('{sid}'), 'h', 'auditee', 'echo', 'sql:drop', 'DROP TABLE u', {t0}, {t2}, 'timeout', '', 'no answer')"
    ));

    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/audit.md")).unwrap();
    let queries: Vec<String> = sql_blocks(&doc)
        .into_iter()
        .map(|q| q.replace("{session_id}", &format!("toUUID('{sid}')")))
        .collect();
    assert!(
        queries.len() >= 8,
        "docs/audit.md has {} queries",
        queries.len()
    );

    // Legacy dialect: the real 18.16 server.
    let mut legacy_rows = Vec::new();
    for q in &queries {
        let out = ch
            .try_query(&format!("{q}\nFORMAT TSV"))
            .unwrap_or_else(|e| panic!("query fails on 18.16:\n{q}\n{e}"));
        let n = out.lines().filter(|l| !l.trim().is_empty()).count();
        assert!(n > 0, "query returns nothing on the test data:\n{q}");
        legacy_rows.push(n);
    }

    // Modern dialect: chdb-core, loaded with the same rows.
    let dir = tempfile::tempdir().unwrap();
    let ddl_out = agent.cli(&["audit-schema", "--dialect", "modern"]);
    assert!(ddl_out.status.success());
    let ddl: Vec<String> = stdout(&ddl_out)
        .split(";\n")
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let mut tables = Vec::new();
    for t in ["sessions", "events", "chunks", "approvals"] {
        let cols: Vec<String> = ch
            .query(&format!(
                "SELECT name FROM system.columns WHERE database = 'loopgate' AND table = '{t}' AND default_kind = '' FORMAT TSV"
            ))
            .lines()
            .map(str::to_owned)
            .collect();
        let file = dir.path().join(format!("{t}.rowbinary"));
        let list = cols
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ");
        ch.query_to_file(
            &format!("SELECT {list} FROM loopgate.{t} FINAL FORMAT RowBinary"),
            &file,
        );
        tables.push(serde_json::json!({"name": t, "file": file, "columns": cols}));
    }
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        serde_json::json!({"ddl": ddl, "tables": tables, "queries": queries}).to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(chdb_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/chdb_queries.py"))
        .arg(&spec)
        .output()
        .unwrap();
    assert!(out.status.success(), "chdb run failed:\n{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["loaded"]["sessions"], 7, "{v}");
    assert_eq!(v["loaded"]["approvals"], 2, "{v}");
    let modern_rows: Vec<usize> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        modern_rows, legacy_rows,
        "row counts differ between the dialects"
    );
}
