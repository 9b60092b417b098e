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
    let out = agent.python("auditee", CONNECT, &[host, &port.to_string(), &n.to_string()]);
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
        ch.query("SELECT version, dialect FROM loopgate.schema_migrations FORMAT TSV").trim(),
        "1\tlegacy"
    );
    let row = ch.query(
        "SELECT workload, target, protocol, uid, comm, bytes_up, bytes_down FROM loopgate.sessions FINAL ORDER BY started_at LIMIT 1 FORMAT TSV",
    );
    assert_eq!(row.trim(), "auditee\techo\ttcp\t65534\tpython3\t6\t6");
    // The CLI reads ClickHouse when it is configured.
    let rows = agent.sessions();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert!(rows.iter().all(|r| r["outcome"] == "ok" && r["workload"] == "auditee"));
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
