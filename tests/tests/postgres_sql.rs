//! PostgreSQL at layer 7: every statement parsed with PostgreSQL's own
//! parser and judged by the shipped guardrails (`policies/postgres.toml`)
//! before it reaches the server. Real PostgreSQL 15, real loops: psql,
//! psycopg2 (simple protocol), asyncpg (extended protocol, binary format,
//! pipelined `executemany`), pgbench in its three query modes, and a raw
//! protocol client for the exact message order of a refused pipeline.

use loopgate_e2e::*;

const STORED: &str = "pg-sql-stored-pw-8812-Kx";
const SHIPPED_DEFAULT: &str = include_str!("../../policies/default.toml");
const SHIPPED_SQL: &str = include_str!("../../policies/postgres.toml");

/// A server where `app` owns `orders` (it could drop it, and change its own
/// password, were it not for the guardrails).
fn server(ip: &str) -> PgServer {
    let pg = PgServer::start(ip);
    pg.admin(&format!(
        "CREATE ROLE app LOGIN PASSWORD '{STORED}'; CREATE TABLE orders (id int, email text); \
         INSERT INTO orders VALUES (1, 'ann@example.com'), (2, 'bob@example.com'), (3, NULL); \
         ALTER TABLE orders OWNER TO app; GRANT CREATE ON SCHEMA public TO app; \
         CREATE SCHEMA secret; CREATE TABLE secret.notes (t text); INSERT INTO secret.notes VALUES ('s3'); \
         GRANT USAGE ON SCHEMA secret TO app; GRANT SELECT ON secret.notes TO app;"
    ));
    pg
}

fn agent(name: &str, pg: &PgServer) -> (Agent, tempfile::TempDir) {
    agent_with(name, pg, "")
}

/// [`agent`] with one more policy file.
fn agent_with(name: &str, pg: &PgServer, extra_policy: &str) -> (Agent, tempfile::TempDir) {
    let (spec, dir) = agent_spec(name, pg, extra_policy, "");
    (Agent::start(spec), dir)
}

/// The spec of [`agent_with`], with more lines for the target (the
/// stored password lives in the dir).
fn agent_spec(
    name: &str,
    pg: &PgServer,
    extra_policy: &str,
    target_extra: &str,
) -> (AgentSpec, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("orders-db");
    std::fs::write(&pw, format!("{STORED}\n")).unwrap();
    let spec = AgentSpec::new(name)
            .policy("default.toml", SHIPPED_DEFAULT)
            .policy("postgres.toml", SHIPPED_SQL)
            .policy(
                "secret.toml",
                "[[rules]]\nid = \"no-secret-schema\"\ntargets = [\"orders-db\"]\nwhen = \"sql.tables.exists(t, t.startsWith('secret.'))\"\naction = \"deny\"\nreason = \"the secret schema is off limits\"\n",
            )
            .policy("extra.toml", extra_policy)
            .raw("\n[[approvers]]\nname = \"ops\"\nuid = 0\n")
            .raw(&format!(
                "\n[[targets]]\nname = \"orders-db\"\naddress = \"{}\"\nprotocol = \"postgres\"\n{target_extra}[targets.credential]\nusername = \"app\"\npassword_file = \"{}\"\n",
                pg.addr,
                pw.display()
            ));
    (spec, dir)
}

fn conninfo(pg: &PgServer) -> String {
    format!(
        "host={} port={} user=loop-user dbname=postgres connect_timeout=10",
        pg.addr.ip(),
        pg.addr.port()
    )
}

/// psql as the loop: `-c` text, or a script on stdin (`-f -`).
fn psql(agent: &Agent, pg: &PgServer, sql: &str) -> (bool, String) {
    psql_conn(agent, &conninfo(pg), &[sql])
}

/// psql as the loop on `conn`, one `-c` per command (each reaches the
/// server as it is); whether it succeeded, and stdout then stderr.
fn psql_conn(agent: &Agent, conn: &str, commands: &[&str]) -> (bool, String) {
    let mut args = vec!["psql", "-X", "-w", "-At", "-d", conn];
    for c in commands {
        args.extend_from_slice(&["-c", c]);
    }
    let out = agent.exec("report-bot", &args);
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

fn psql_script(agent: &Agent, pg: &PgServer, script: &str) -> String {
    let path = std::env::temp_dir().join(format!("lg-psql-{}.sql", std::process::id()));
    std::fs::write(&path, script).unwrap();
    set_mode(&path, 0o644);
    let conn = conninfo(pg);
    let out = agent.exec(
        "report-bot",
        &[
            "psql",
            "-X",
            "-w",
            "-At",
            "-d",
            &conn,
            "-f",
            &path.display().to_string(),
        ],
    );
    let _ = std::fs::remove_file(&path);
    format!("{}{}", stdout(&out), stderr(&out))
}

/// Every event of every recorded session (`replay --json`).
fn events(agent: &Agent) -> Vec<Value> {
    let mut out = Vec::new();
    for s in agent.sessions() {
        let id = s["session_id"].as_str().unwrap();
        out.extend(
            agent
                .replay_json(id)
                .into_iter()
                .filter(|v| v["kind"] == "event"),
        );
    }
    out
}

fn count(pg: &PgServer) -> String {
    pg.admin("SELECT count(*) FROM orders").trim().to_owned()
}

#[test]
fn psql_statements_are_judged_one_by_one_and_refusals_leave_the_session_usable() {
    let pg = server("127.10.6.1");
    let (agent, _dir) = agent("pgsql", &pg);

    // Allowed statements return what the server returns.
    let (ok, out) = psql(
        &agent,
        &pg,
        "SELECT id FROM orders WHERE id > 1 ORDER BY id",
    );
    assert!(ok, "{out}\n{}", agent.log());
    assert_eq!(out, "2\n3\n");

    // DROP TABLE: refused with 42501 naming the rule; the table is there.
    let (ok, out) = psql(&agent, &pg, "DROP TABLE orders");
    assert!(!ok);
    assert!(
        out.contains("ERROR:  loopgate: statement refused by rule")
            && out.contains("sql-no-drop-or-truncate"),
        "{out}"
    );
    assert_eq!(count(&pg), "3");

    // One refused statement in a string: none of it runs.
    let (ok, out) = psql(
        &agent,
        &pg,
        "INSERT INTO orders VALUES (4, 'x'); DROP TABLE orders",
    );
    assert!(!ok, "{out}");
    assert_eq!(count(&pg), "3", "the INSERT of a refused string ran");

    // A refused DELETE inside a transaction: the transaction goes on and
    // commits its other work (psql sends each statement on its own).
    let out = psql_script(
        &agent,
        &pg,
        "BEGIN;\nINSERT INTO orders VALUES (10, NULL);\nDELETE FROM orders;\n\
         INSERT INTO orders VALUES (11, NULL);\nCOMMIT;\nSELECT count(*) FROM orders;\n",
    );
    assert!(out.contains("sql-no-unbounded-writes"), "{out}");
    assert!(out.ends_with("5\n") || out.contains("\n5\n"), "{out}");
    assert_eq!(count(&pg), "5");

    // Role and password changes, and their spellings, are refused; the
    // stored password still works afterwards.
    for sql in [
        "ALTER ROLE app PASSWORD 'owned'",
        "ALTER USER CURRENT_USER PASSWORD 'owned'",
        "SET ROLE postgres",
        "SELECT set_config('role', 'postgres', false)",
        "SELECT pg_read_file('/etc/passwd')",
        "COPY orders TO PROGRAM 'cat > /tmp/x'",
        "DO $$ BEGIN EXECUTE 'DROP TABLE orders'; END $$",
        // What a naive splitter would cut is one statement to the parser:
        // the whole string is judged as the server will run it.
        "SELECT $q$ ; $q$; DROP TABLE orders",
    ] {
        let (ok, out) = psql(&agent, &pg, sql);
        assert!(
            !ok && out.contains("loopgate: statement refused by rule"),
            "{sql}: {out}"
        );
    }
    let (ok, out) = psql(&agent, &pg, "SELECT current_user");
    assert!(ok && out == "app\n", "{out}");
    assert_eq!(count(&pg), "5");

    // A search path cannot move a table out of a rule's sight: in the same
    // string, in a later statement, or from the start-up options.
    let (ok, out) = psql(&agent, &pg, "SELECT t FROM secret.notes");
    assert!(!ok && out.contains("no-secret-schema"), "{out}");
    let (ok, out) = psql(
        &agent,
        &pg,
        "SET search_path = secret, public; SELECT t FROM notes",
    );
    assert!(!ok && out.contains("no-secret-schema"), "{out}");
    let out = psql_script(
        &agent,
        &pg,
        "SET search_path = secret;\nSELECT t FROM notes;\n",
    );
    assert!(
        out.contains("no-secret-schema") && !out.contains("s3"),
        "{out}"
    );
    let conn = format!("{} options='-c search_path=secret'", conninfo(&pg));
    let (ok, out) = psql_conn(&agent, &conn, &["SELECT t FROM notes"]);
    assert!(!ok && out.contains("no-secret-schema"), "{out}");

    // Text the server could read otherwise than the agent: with
    // standard_conforming_strings off, `\'` ends no string, and the DROP
    // hidden in a literal would run.
    // (psql splits a script itself, knowing the setting; two -c strings
    // reach the server as they are.)
    let (_, out) = psql_conn(
        &agent,
        &conninfo(&pg),
        &[
            "SET standard_conforming_strings = off",
            "SELECT 'a\\' , ' ; DROP TABLE orders; --'",
        ],
    );
    assert!(
        out.contains("ERROR:  loopgate: this text means different statements"),
        "{out}"
    );
    assert_eq!(count(&pg), "5");
    // Start-up settings are an allow-list: a role there would start the
    // session as another role.
    let conn = format!("{} options='-c role=postgres'", conninfo(&pg));
    let (ok, out) = psql_conn(&agent, &conn, &["SELECT current_user"]);
    assert!(
        !ok && out.contains("setting role is not allowed at start-up"),
        "{out}"
    );

    // Text the parser refuses gets the parser's own error, as the server
    // would have sent it.
    let (ok, out) = psql(&agent, &pg, "SELEC id FROM orders");
    assert!(!ok);
    assert!(
        out.contains("ERROR:  syntax error at or near \"SELEC\""),
        "{out}"
    );

    // SQL-level PREPARE is judged as what it prepares.
    let (ok, out) = psql(&agent, &pg, "PREPARE wipe AS DELETE FROM orders");
    assert!(!ok && out.contains("sql-no-unbounded-writes"), "{out}");

    // The audit: one event per statement with its verdict and result;
    // constants replaced; never the stored password.
    let ev = agent_events_when(&agent, |ev| {
        ev.iter().any(|e| e["request"] == "SELECT current_user")
    });
    let select = ev
        .iter()
        .find(|e| e["request"] == "SELECT id FROM orders WHERE id > $1 ORDER BY id")
        .unwrap_or_else(|| panic!("no normalized select event: {ev:#?}"));
    assert_eq!(select["event_kind"], "sql");
    assert_eq!(select["verdict"], "mask");
    assert_eq!(select["attrs"]["result"], "ok");
    assert_eq!(select["attrs"]["rows"], "2");
    assert_eq!(select["attrs"]["statement_kind"], "select");
    assert!(select["attrs"]["duration_us"].as_str().is_some());
    let drop = ev
        .iter()
        .find(|e| e["request"] == "DROP TABLE orders")
        .unwrap();
    assert_eq!(drop["verdict"], "deny");
    assert!(drop["rule_id"]
        .as_str()
        .unwrap()
        .ends_with("sql-no-drop-or-truncate"));
    let insert_not_run = ev.iter().find(|e| {
        e["request"] == "INSERT INTO orders VALUES ($1, $2)" && e["attrs"]["result"] == "not_run"
    });
    assert!(insert_not_run.is_some(), "{ev:#?}");
    let parse_refusals: Vec<&Value> = ev.iter().filter(|e| e["rule_id"] == "sql:parse").collect();
    assert!(
        parse_refusals
            .iter()
            .any(|e| e["attrs"]["sqlstate"] == "42601")
            && parse_refusals
                .iter()
                .any(|e| e["attrs"]["sqlstate"] == "22P06"),
        "{parse_refusals:#?}"
    );
    let all = serde_json::to_string(&ev).unwrap();
    assert!(!all.contains("owned'"), "a literal reached the audit");
    assert!(!all.contains(STORED) && !agent.log().contains(STORED));
}

/// A raw v3 protocol client for Python loops (`sys.argv[1:3]`: host and
/// port), logged in; `read_until_ready()` lists the message types up to
/// ReadyForQuery (`E` with the SQLSTATE, `C:` with the tag).
const RAW_CLIENT: &str = r#"
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
def msg(t, body=b""):
    return t + struct.pack("!i", len(body) + 4) + body
def cstr(x):
    return x.encode() + b"\0"
def startup():
    body = struct.pack("!i", 196608) + cstr("user") + cstr("x") + cstr("database") + cstr("postgres") + b"\0"
    s.sendall(struct.pack("!i", len(body) + 4) + body)
buf = b""
def read_until_ready():
    global buf
    types = []
    while True:
        while len(buf) < 5 or len(buf) < 1 + struct.unpack("!i", buf[1:5])[0]:
            chunk = s.recv(65536)
            if not chunk:
                types.append("EOF")
                return types
            buf += chunk
        n = struct.unpack("!i", buf[1:5])[0]
        t, body, buf = buf[:1], buf[5:1 + n], buf[1 + n:]
        if t == b"E":
            code = [f[1:] for f in body.split(b"\0") if f[:1] == b"C"][0].decode()
            types.append("E" + code)
        elif t == b"C":
            types.append("C:" + body[:-1].decode())
        elif t not in (b"S", b"K", b"N"):
            types.append(t.decode())
        if t == b"Z":
            return types
startup()
print(read_until_ready())
def parse(q, name=""): return msg(b"P", cstr(name) + cstr(q) + struct.pack("!h", 0))
def bind_to(stmt, fmt=0, params=()):
    body = cstr("") + cstr(stmt) + (struct.pack("!hh", 1, fmt) if params else struct.pack("!h", 0))
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", len(p)) + p
    return msg(b"B", body + struct.pack("!h", 0))
bind = bind_to("")
execute = msg(b"E", cstr("") + struct.pack("!i", 0))
sync = msg(b"S")
def query(q): return msg(b"Q", cstr(q))
"#;

/// Events, once `pred` holds (records are written asynchronously).
fn agent_events_when(agent: &Agent, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let ev = events(agent);
        if pred(&ev) || std::time::Instant::now() > deadline {
            return ev;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn drivers_keep_working_through_refusals_psycopg2_and_asyncpg() {
    let pg = server("127.10.6.2");
    let (agent, _dir) = agent("pgdrv", &pg);
    let host = pg.addr.ip().to_string();
    let port = pg.addr.port().to_string();

    // psycopg2 (libpq, simple protocol): a refusal inside its implicit
    // transaction, then the same transaction commits; COPY both ways, a
    // server-side cursor, LISTEN/NOTIFY.
    let out = agent.python(
        "report-bot",
        r#"
import io, sys, psycopg2, psycopg2.errors
c = psycopg2.connect(host=sys.argv[1], port=int(sys.argv[2]), user="x", dbname="postgres", connect_timeout=10)
cur = c.cursor()
cur.execute("INSERT INTO orders VALUES (%s, %s)", (20, "eve@example.com"))
try:
    cur.execute("UPDATE orders SET email = NULL")
    print("not refused")
except psycopg2.errors.InsufficientPrivilege as e:
    print("refused", "sql-no-unbounded-writes" in str(e))
cur.execute("INSERT INTO orders VALUES (21, NULL)")
c.commit()
cur.execute("SELECT count(*) FROM orders")
print(cur.fetchone()[0])
buf = io.StringIO()
cur.copy_expert("COPY (SELECT id FROM orders ORDER BY id) TO STDOUT", buf)
print(buf.getvalue().split())
cur.copy_expert("COPY orders (id) FROM STDIN", io.StringIO("30\n31\n"))
c.commit()
named = c.cursor(name="big")
named.itersize = 2
named.execute("SELECT id FROM orders ORDER BY id")
print(sum(1 for _ in named))
named.close()
c.commit()
lo = c.lobject(0, "wb")
lo.write(b"large object through FunctionCall")
oid = lo.oid
lo.close()
print(c.lobject(oid, "rb").read())
c.commit()
c.autocommit = True
cur.execute("LISTEN jobs")
cur.execute("NOTIFY jobs, 'hello'")
c.poll()
print([n.payload for n in c.notifies])
"#,
        &[&host, &port],
    );
    assert_eq!(
        stdout(&out),
        "refused True\n5\n['1', '2', '3', '20', '21']\n7\nb'large object through FunctionCall'\n['hello']\n",
        "{}\n{}",
        stderr(&out),
        agent.log()
    );

    // asyncpg (extended protocol, binary format): prepared statements, a
    // refused Parse then the connection still works, a pipelined
    // executemany, and a refused statement inside a transaction that
    // still commits.
    let out = agent.python_with(
        &loops_python(),
        "report-bot",
        r#"
import asyncio, sys, asyncpg
async def main():
    c = await asyncpg.connect(host=sys.argv[1], port=int(sys.argv[2]), user="x", database="postgres", ssl=False)
    print(await c.fetchval("SELECT count(*) FROM orders WHERE id > $1", 0))
    try:
        await c.fetch("DELETE FROM orders WHERE $1::int IS NOT NULL OR true", 1)
        await c.fetch("TRUNCATE orders")
        print("not refused")
    except asyncpg.exceptions.InsufficientPrivilegeError as e:
        print("refused", "sql-no-drop-or-truncate" in str(e))
    await c.executemany("INSERT INTO orders (id) VALUES ($1)", [(i,) for i in range(100, 150)])
    async with c.transaction():
        await c.execute("INSERT INTO orders (id) VALUES (200)")
        try:
            await c.fetch("DELETE FROM orders")
        except asyncpg.exceptions.InsufficientPrivilegeError:
            print("refused in transaction")
        await c.execute("INSERT INTO orders (id) VALUES (201)")
    stmt = await c.prepare("SELECT id, email FROM orders WHERE id = $1")
    print(await stmt.fetchrow(1))
    print(await c.fetchval("SELECT count(*) FROM orders"))
    await c.close()
asyncio.run(main())
"#,
        &[&host, &port],
    );
    // The DELETE with a WHERE was allowed and ran (7 rows gone).
    assert_eq!(
        stdout(&out),
        "7\nrefused True\nrefused in transaction\nNone\n52\n",
        "{}\n{}",
        stderr(&out),
        agent.log()
    );
    assert_eq!(count(&pg), "52");
}

/// tokio-postgres (`src/bin/pg-loop.rs`) as the loop: prepared
/// statements with binary parameters and results, a refused Parse, a
/// pipeline with a refused statement in the middle, a refusal inside a
/// transaction that then commits, a portal read with a row limit, a cancel;
/// then messages over the target's limits from each side (a FATAL for that
/// session; the next works).
#[test]
fn tokio_postgres_prepared_pipelined_portals_cancel_and_size_limits() {
    let pg = server("127.10.6.10");
    let (spec, _dir) = agent_spec(
        "pgtokio",
        &pg,
        "",
        "max_message_bytes = 1048576\nmax_result_message_bytes = 2097152\n",
    );
    let agent = Agent::start(spec);
    let out = agent.exec(
        "report-bot",
        &[
            env!("CARGO_BIN_EXE_pg-loop"),
            &pg.addr.ip().to_string(),
            &pg.addr.port().to_string(),
        ],
    );
    let stars = "*".repeat("ann@example.com".len());
    assert_eq!(
        stdout(&out),
        format!(
            "simple 1 two\n\
             prepared 1 {stars}\n\
             refused 42501 loopgate: statement refused by rule sql-no-unbounded-writes: UPDATE or DELETE without WHERE changes every row\n\
             pipeline 2 42501 3\n\
             in transaction 42501\n\
             portal 1,2 | 3,40\n\
             committed 4\n\
             cancel true 57014\n\
             long query 08P01 loopgate: a message of type 'Q' of 2097167 bytes is over the limit of 1048576 bytes\n\
             closed true\n\
             long row 08P01 loopgate: the server sent a message it cannot relay: a message of type 'D' of 3000011 bytes is over the limit of 2097152 bytes\n\
             after 1\n"
        ),
        "{}\n{}",
        stderr(&out),
        agent.log()
    );
    assert!(out.status.success());
    // What the refusals protected, and what the transaction committed.
    assert_eq!(count(&pg), "4");
    assert_eq!(
        pg.admin("SELECT email FROM orders WHERE id = 40").trim(),
        "rust@example.com"
    );
    // Every statement recorded, refusals with their rule; the long query's
    // text is not.
    let ev = agent_events_when(&agent, |ev| {
        ev.iter().filter(|e| e["event_kind"] == "sql").count() >= 10
    });
    let refused: Vec<&str> = ev
        .iter()
        .filter(|e| e["verdict"] == "deny")
        .filter_map(|e| e["rule_id"].as_str())
        .collect();
    assert!(
        refused.contains(&"sql-no-unbounded-writes")
            && refused.contains(&"sql-no-drop-or-truncate"),
        "{ev:#?}"
    );
    assert!(!serde_json::to_string(&ev).unwrap().contains("xxxxxxxxxx"));
    // Binary parameters are recorded as their values (the rules read them
    // so too).
    let prepared = ev
        .iter()
        .find(|e| e["request"] == "SELECT id, email FROM orders WHERE id = $1")
        .unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(prepared["attrs"]["params"], "[\"1\"]");
    let inserted = ev
        .iter()
        .find(|e| e["request"] == "INSERT INTO orders VALUES ($1, $2)")
        .unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(
        inserted["attrs"]["params"],
        format!("[\"40\",\"{}\"]", "*".repeat("rust@example.com".len()))
    );
}

#[test]
fn pgbench_runs_in_every_query_mode_and_each_statement_is_recorded() {
    let pg = server("127.10.6.3");
    // Initialised directly: `pgbench -i` drops and truncates, which the
    // guardrails refuse.
    pg.pgbench_init(1);
    pg.admin(
        "GRANT ALL ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO app",
    );
    let (agent, _dir) = agent("pgbench", &pg);
    let host = pg.addr.ip().to_string();
    let port = pg.addr.port().to_string();
    for mode in ["simple", "extended", "prepared"] {
        let out = agent.exec(
            "report-bot",
            &[
                "pgbench",
                "-n",
                "-M",
                mode,
                "-c",
                "2",
                "-t",
                "20",
                "-h",
                &host,
                "-p",
                &port,
                "-U",
                "loop-user",
                "postgres",
            ],
        );
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(out.status.success(), "{mode}: {text}\n{}", agent.log());
        assert!(
            text.contains("number of transactions actually processed: 40/40"),
            "{mode}: {text}"
        );
    }
    // 3 modes x 40 transactions x 7 statements, each recorded once with
    // its result.
    let ev = agent_events_when(&agent, |ev| {
        ev.iter().filter(|e| e["event_kind"] == "sql").count() >= 840
    });
    let sql: Vec<&Value> = ev.iter().filter(|e| e["event_kind"] == "sql").collect();
    let of = |kind: &str| {
        sql.iter()
            .filter(|e| e["attrs"]["statement_kind"] == kind && e["attrs"]["result"] == "ok")
            .count()
    };
    assert_eq!(of("update"), 3 * 40 * 3, "{:#?}", &sql[..sql.len().min(10)]);
    assert_eq!(of("insert"), 3 * 40);
    assert_eq!(of("transaction"), 3 * 40 * 2);
    // The SELECT of each transaction, and pgbench's own scale lookups.
    assert!(of("select") >= 3 * 40, "{}", of("select"));
    assert!(
        sql.iter()
            .all(|e| e["verdict"] != "deny" && e["attrs"]["result"] == "ok"),
        "{:#?}",
        sql.iter().find(|e| e["attrs"]["result"] != "ok")
    );
    let history = pg.admin("SELECT count(*) FROM pgbench_history");
    assert_eq!(history.trim(), "120");
}

/// The exact order of messages around a refused `Parse` in a pipeline,
/// written with a raw protocol client: the allowed statements before it
/// answer, then the refusal, then the server's own `ReadyForQuery`; the
/// messages between the refusal and `Sync` are discarded; the session
/// works afterwards. Then a message no client sends ends only that session.
#[test]
fn a_refused_parse_in_a_pipeline_discards_to_sync_and_malformed_messages_end_the_session() {
    let pg = server("127.10.6.4");
    let (agent, _dir) = agent("pgpipe", &pg);
    let out = agent.python(
        "report-bot",
        &format!("{RAW_CLIENT}{}", r#"
s.sendall(parse("INSERT INTO orders (id) VALUES (40)") + bind + execute
          + parse("DROP TABLE orders") + bind + execute
          + parse("INSERT INTO orders (id) VALUES (41)") + bind + execute + sync)
print(read_until_ready())
s.sendall(msg(b"Q", cstr("SELECT count(*) FROM orders")))
print(read_until_ready())
s.sendall(msg(b"Q", cstr("BEGIN")) + msg(b"Q", cstr("TRUNCATE orders")) + msg(b"Q", cstr("SELECT 1")) + msg(b"Q", cstr("COMMIT")))
print(read_until_ready(), read_until_ready(), read_until_ready(), read_until_ready())
# An error in a batch: the server ignores everything up to Sync, a simple
# query included; the refusal and the answer after it stay in place.
s.sendall(parse("SELECT 1/count(*) FROM orders WHERE false") + bind + execute + msg(b"Q", cstr("SELECT 1")) + sync)
print(read_until_ready(), end=" ")
s.sendall(msg(b"Q", cstr("DROP TABLE orders")) + msg(b"Q", cstr("SELECT 2")))
print(read_until_ready(), read_until_ready())
# A Parse the server refuses creates nothing: the same name parsed again
# is the statement that runs (and that the record names).
s.sendall(msg(b"P", cstr("s") + cstr("SELECT * FROM no_such_table") + struct.pack("!h", 0)) + sync)
print(read_until_ready(), end=" ")
s.sendall(msg(b"P", cstr("s") + cstr("SELECT id FROM orders WHERE id = 1") + struct.pack("!h", 0))
          + msg(b"B", cstr("") + cstr("s") + struct.pack("!hhh", 0, 0, 0)) + execute + sync)
print(read_until_ready())
# A transaction block opened in the same batch is not the server's word
# yet: the refusal fails the batch as a server error would, so the block is
# aborted and COMMIT rolls it back (the safe side).
s.sendall(parse("BEGIN") + bind + execute + parse("INSERT INTO orders (id) VALUES (42)") + bind + execute
          + parse("DROP TABLE orders") + bind + execute + sync)
print(read_until_ready(), end=" ")
s.sendall(msg(b"Q", cstr("COMMIT")))
print(read_until_ready())
s.sendall(msg(b"p", b"garbage\0"))
print(read_until_ready())
"#),
        &[&pg.addr.ip().to_string(), &pg.addr.port().to_string()],
    );
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(
        lines.len(),
        8,
        "{}\n{}\n{}",
        stdout(&out),
        stderr(&out),
        agent.log()
    );
    assert_eq!(lines[0], "['R', 'Z']");
    // The INSERT before the refusal ran, and was rolled back with its
    // batch's implicit transaction, as after a server error (the server got
    // a failing Parse in the refused one's place); the one after was
    // discarded with the rest of the batch.
    assert_eq!(lines[1], "['1', '2', 'C:INSERT 0 1', 'E42501', 'Z']");
    assert_eq!(lines[2], "['T', 'D', 'C:SELECT 1', 'Z']");
    // Pipelined simple queries: the refusal comes in its place, and the
    // transaction status stays "in a transaction".
    assert_eq!(
        lines[3],
        "['C:BEGIN', 'Z'] ['E42501', 'Z'] ['T', 'D', 'C:SELECT 1', 'Z'] ['C:COMMIT', 'Z']"
    );
    assert_eq!(
        lines[4],
        "['1', '2', 'E22012', 'Z'] ['E42501', 'Z'] ['T', 'D', 'C:SELECT 1', 'Z']"
    );
    assert_eq!(
        lines[5],
        "['E42P01', 'Z'] ['1', '2', 'D', 'C:SELECT 1', 'Z']"
    );
    assert_eq!(
        lines[6],
        "['1', '2', 'C:BEGIN', '1', '2', 'C:INSERT 0 1', 'E42501', 'Z'] ['C:ROLLBACK', 'Z']"
    );
    assert_eq!(lines[7], "['E08P01', 'EOF']");
    assert_eq!(count(&pg), "3");
    // Other sessions are unaffected.
    let (ok, out) = psql(&agent, &pg, "SELECT count(*) FROM orders");
    assert!(ok && out == "3\n", "{out}");
    let s = agent.wait_sessions("the raw session and psql", |s| {
        s.len() == 2 && s.iter().all(|r| r["outcome"] != "open")
    });
    assert!(s.iter().any(|r| r["outcome"] == "client_error"), "{s:#?}");
    let ran = |e: &Value| {
        e["request"] == "SELECT id FROM orders WHERE id = $1" && e["attrs"]["result"] == "ok"
    };
    let ev = agent_events_when(&agent, |ev| ev.iter().any(ran));
    assert!(ev.iter().any(ran), "{ev:#?}");
}

/// Attacks on the agent's map of prepared statements and its queue of
/// answers (a raw protocol client): a statement an `approve` rule holds,
/// prepared with Parse, run by SQL `EXECUTE`, after a `PREPARE` under the
/// same name that the server refuses, and bound after a `Close` the server
/// skipped; a binary parameter of an unknown type when rules read
/// parameters; messages pipelined after a COPY FROM STDIN.
#[test]
fn prepared_statement_names_and_pipelines_cannot_slip_past_the_rules() {
    let pg = server("127.10.6.13");
    let (agent, _dir) = agent_with(
        "pgnames",
        &pg,
        "[[rules]]\nid = \"hold-deletes\"\ntargets = [\"orders-db\"]\nkinds = [\"sql\"]\nwhen = \"sql.kind == 'delete'\"\naction = \"approve\"\napproval_timeout = \"1s\"\nreason = \"deletes need a person\"\n\n[[rules]]\nid = \"no-admin\"\ntargets = [\"orders-db\"]\nkinds = [\"sql\"]\nwhen = \"sql.params.exists(p, p == 'admin')\"\naction = \"deny\"\nreason = \"not admin\"\n",
    );
    let out = agent.python(
        "report-bot",
        &format!("{RAW_CLIENT}{}", r#"
s.sendall(parse("DELETE FROM orders WHERE id = $1", "s1") + sync)
print(read_until_ready())
# SQL EXECUTE of a protocol-level statement: judged as the DELETE (held; no
# one approves).
s.sendall(query("EXECUTE s1(1)"))
print(read_until_ready())
# A PREPARE under the same name fails on the server; the agent keeps s1.
s.sendall(parse("PREPARE s1 AS SELECT 1") + bind + execute + sync)
print(read_until_ready())
s.sendall(query("EXECUTE s1(2)"))
print(read_until_ready())
# A Close the server skips (an error earlier in its batch): the server
# keeps s1, the agent forgot it; binding it is refused.
s.sendall(parse("SELECT 1/0") + bind + execute + msg(b"C", b"S" + cstr("s1")) + sync)
print(read_until_ready())
s.sendall(bind_to("s1", 0, [b"3"]) + execute + sync)
print(read_until_ready())
s.sendall(query("EXECUTE s1(3)"))
print(read_until_ready())
# Rules read parameters: a binary value of a type nobody described is
# refused; the same value as text meets the rule.
s.sendall(parse("SELECT $1::text") + bind_to("", 1, [b"admin"]) + execute + sync)
print(read_until_ready())
s.sendall(parse("SELECT $1::text") + bind_to("", 0, [b"admin"]) + execute + sync)
print(read_until_ready())
# Messages pipelined after a COPY FROM STDIN: the agent waits for the
# server's answer; in COPY mode a Parse ends the session.
s.sendall(parse("COPY orders (id) FROM STDIN") + bind + execute + parse("SELECT email FROM orders") + sync
          + parse("SELECT email FROM orders") + bind + execute + sync)
print(read_until_ready())
"#),
        &[&pg.addr.ip().to_string(), &pg.addr.port().to_string()],
    );
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    let expected = [
        "['R', 'Z']",
        "['1', 'Z']",
        "['E42501', 'Z']",
        "['1', '2', 'E42P05', 'Z']",
        "['E42501', 'Z']",
        "['1', 'E22012', 'Z']",
        "['E26000', 'Z']",
        "['E42501', 'Z']",
        "['1', 'E0A000', 'Z']",
        "['1', 'E42501', 'Z']",
        "['1', '2', 'G', 'E08P01', 'EOF']",
    ];
    assert_eq!(
        lines,
        expected,
        "{}\n{}\n{}",
        stdout(&out),
        stderr(&out),
        agent.log()
    );
    assert_eq!(count(&pg), "3", "no DELETE ran, no COPY row arrived");
    let refusals: Vec<Value> = agent_events_when(&agent, |ev| {
        ev.iter().filter(|e| e["verdict"] == "deny").count() >= 6
    });
    let rules: Vec<&str> = refusals
        .iter()
        .filter(|e| e["verdict"] == "deny")
        .filter_map(|e| e["rule_id"].as_str())
        .collect();
    assert!(
        rules.contains(&"sql:safety")
            && rules.contains(&"sql:params")
            && rules.iter().any(|r| r.ends_with("no-admin")),
        "{rules:?}"
    );
    assert!(
        refusals.iter().any(|e| e["rule_id"]
            .as_str()
            .is_some_and(|r| r.ends_with("hold-deletes"))
            && e["request"] == "EXECUTE s1($1)"),
        "{refusals:#?}"
    );
}

/// A loop that asks for TLS gets it, with a certificate for the target's
/// address issued by the agent's CA (made once in `state_dir/ca`, key mode
/// 0600); `sslmode=verify-full` verifies it against that CA and fails
/// against another; `loopgate trust install` adds the CA to the host's
/// store and `trust uninstall` takes it out.
#[test]
fn loops_that_ask_for_tls_get_a_certificate_from_the_agents_ca() {
    use std::os::unix::fs::PermissionsExt;
    let pg = server("127.10.6.5");
    let (agent, _dir) = agent("pgtls", &pg);
    let key = agent.path("state/ca/ca.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let ca_pem = std::fs::read_to_string(agent.path("state/ca/ca.pem")).unwrap();
    // The loop (nobody) reads the CA from a copy.
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let root = dir.path().join("agent-ca.pem");
    std::fs::write(&root, &ca_pem).unwrap();
    set_mode(&root, 0o644);
    let other = dir.path().join("other-ca.pem");
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, params.self_signed(&other_key).unwrap().pem()).unwrap();
    set_mode(&other, 0o644);

    let run = |mode: &str, rootcert: &std::path::Path, sql: &[&str]| {
        let conn = format!(
            "{} sslmode={mode} sslrootcert={}",
            conninfo(&pg),
            rootcert.display()
        );
        psql_conn(&agent, &conn, sql)
    };
    let (ok, out) = run(
        "verify-full",
        &root,
        &["\\conninfo", "SELECT count(*) FROM orders"],
    );
    assert!(ok, "{out}\n{}", agent.log());
    assert!(out.contains("SSL connection (protocol: TLSv1.3"), "{out}");
    assert!(out.ends_with("3\n"), "{out}");
    // Statements are judged inside TLS as outside.
    let (ok, out) = run("require", &root, &["DROP TABLE orders"]);
    assert!(!ok && out.contains("sql-no-drop-or-truncate"), "{out}");
    assert_eq!(count(&pg), "3");
    // Another CA does not verify it.
    let (ok, out) = run("verify-full", &other, &["SELECT 1"]);
    assert!(!ok && out.contains("certificate verify failed"), "{out}");

    // The host's trust store, once.
    let o = agent.trust("install");
    assert!(o.status.success(), "{}", stderr(&o));
    let installed = stdout(&o);
    let path = installed
        .trim()
        .strip_prefix("trusted: ")
        .and_then(|p| p.split(' ').next())
        .unwrap_or_else(|| panic!("{installed}"))
        .to_owned();
    let body: String = ca_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let bundle = || {
        std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
    };
    assert!(std::path::Path::new(&path).exists());
    assert!(
        bundle().contains(&body),
        "the CA is not in the system bundle"
    );
    // Idempotent.
    assert!(agent.trust("install").status.success());
    let o = agent.trust("uninstall");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!std::path::Path::new(&path).exists());
    assert!(
        !bundle().contains(&body),
        "the CA is still in the system bundle"
    );
}

/// Results are masked on their way to the loop: values by pattern (the
/// shipped e-mail and card rule) and columns by name (a rule of the test),
/// in text format (psql) and in binary format (asyncpg), jsonb included;
/// a hidden column of a non-text type becomes NULL. The server's data is
/// untouched.
#[test]
fn results_are_masked_by_value_and_by_column_in_text_and_binary() {
    let pg = server("127.10.6.6");
    pg.admin(
        "CREATE TABLE people (id int, email text, note varchar, card text, pin int, doc jsonb); \
         INSERT INTO people VALUES (1, 'ann@example.com', 'call ann@example.com', '4111 1111 1111 1111', 1234, \
         '{\"contact\": \"ann@example.com\", \"n\": 1}'), \
         (2, 'no address', 'order 4111 1111 1111 1112', 'none', 99, '{}'); \
         GRANT SELECT ON people TO app;",
    );
    let (agent, _dir) = agent_with(
        "pgmask",
        &pg,
        "[[rules]]\nid = \"hide-pins\"\ntargets = [\"orders-db\"]\nkinds = [\"sql\"]\naction = \"mask\"\nmask = [\"pin\", \"note\"]\n",
    );
    let (ok, out) = psql(
        &agent,
        &pg,
        "SELECT id, email, note, card, pin, doc FROM people ORDER BY id",
    );
    assert!(ok, "{out}\n{}", agent.log());
    let stars = "*".repeat("ann@example.com".len());
    assert_eq!(
        out,
        format!(
            "1|{stars}|****|**** **** **** ****||{{\"n\": 1, \"contact\": \"{stars}\"}}\n2|no address|****|none||{{}}\n"
        )
    );
    // Values outside result rows: COPY output, error texts.
    let (ok, out) = psql(
        &agent,
        &pg,
        "COPY (SELECT email FROM people ORDER BY id) TO STDOUT",
    );
    assert!(ok, "{out}");
    // COPY rows name no columns: with a rule that hides columns by name,
    // whole rows are hidden (tabs and newlines kept).
    assert_eq!(
        out,
        format!("{stars}\n{}\n", "*".repeat("no address".len()))
    );
    let (ok, out) = psql(&agent, &pg, "SELECT email::int FROM people WHERE id = 1");
    assert!(
        !ok && out.contains(&format!("\"{stars}\"")) && !out.contains("ann@"),
        "{out}"
    );
    // The server still has the values.
    assert_eq!(
        pg.admin("SELECT email FROM people WHERE id = 1").trim(),
        "ann@example.com"
    );
    let out = agent.python_with(
        &loops_python(),
        "report-bot",
        r#"
import asyncio, json, sys, asyncpg
async def main():
    c = await asyncpg.connect(host=sys.argv[1], port=int(sys.argv[2]), user="x", database="postgres", ssl=False)
    r = await c.fetchrow("SELECT email, note, card, pin, doc FROM people WHERE id = $1", 1)
    print(r["email"], r["note"], r["card"], r["pin"], json.loads(r["doc"])["contact"])
    # A text array in binary: not looked into, so hidden.
    print(await c.fetchval("SELECT ARRAY[email] FROM people WHERE id = $1", 1))
    # A notification's payload.
    got = asyncio.get_running_loop().create_future()
    await c.add_listener("jobs", lambda *a: got.set_result(a[3]))
    await c.execute("SELECT pg_notify('jobs', email) FROM people WHERE id = 1")
    print(await asyncio.wait_for(got, 5))
    await c.close()
asyncio.run(main())
"#,
        &[&pg.addr.ip().to_string(), &pg.addr.port().to_string()],
    );
    assert_eq!(
        stdout(&out),
        format!("{stars} **** **** **** **** **** None {stars}\nNone\n{stars}\n"),
        "{}",
        stderr(&out)
    );
    let ev = agent_events_when(&agent, |ev| {
        ev.iter()
            .filter(|e| e["attrs"]["masked_values"].is_string())
            .count()
            >= 3
    });
    let masked: Vec<&Value> = ev
        .iter()
        .filter(|e| e["attrs"]["masked_values"].is_string())
        .collect();
    assert!(masked.len() >= 3, "{ev:#?}");
    assert!(masked.iter().all(|e| e["verdict"] == "mask"));
    let all = serde_json::to_string(&ev).unwrap();
    assert!(!all.contains("ann@example.com"));
}

/// Pooled logins: a loop session that leaves its server connection idle
/// hands it to the next session of the same database, role and settings
/// (same backend pid, no new SCRAM login), reset with DISCARD ALL: the
/// next loop sees none of the first one's settings, temporary tables,
/// prepared statements, advisory locks or LISTENs. Cancel requests go
/// through keys of the agent's own, mapped to the connection a session
/// holds.
#[test]
fn pooled_logins_carry_no_state_from_one_loop_to_the_next() {
    let pg = server("127.10.6.7");
    let (agent, _dir) = agent("pgpool", &pg);
    let (ok, first) = psql(
        &agent,
        &pg,
        "SET work_mem = '77MB'; CREATE TEMP TABLE scratch (x int); PREPARE p1 AS SELECT 1; \
         SELECT pg_advisory_lock(42); LISTEN jobs; SELECT pg_backend_pid()",
    );
    assert!(ok, "{first}\n{}", agent.log());
    let pid = first.lines().last().unwrap().to_owned();
    // The connection goes back to the pool once reset.
    std::thread::sleep(std::time::Duration::from_millis(700));
    let (ok, out) = psql(
        &agent,
        &pg,
        "SELECT pg_backend_pid(), current_setting('work_mem'), \
         (SELECT count(*) FROM pg_prepared_statements), to_regclass('pg_temp.scratch') IS NULL, \
         (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'), \
         (SELECT count(*) FROM pg_listening_channels())",
    );
    assert!(ok, "{out}");
    assert_eq!(out, format!("{pid}|4MB|0|t|0|0\n"));
    let ev = agent_events_when(&agent, |ev| {
        ev.iter().filter(|e| e["event_kind"] == "login").count() >= 2
    });
    let logins: Vec<&Value> = ev.iter().filter(|e| e["event_kind"] == "login").collect();
    assert!(
        logins.iter().any(|e| e["attrs"]["pooled"] == "true"),
        "{logins:#?}"
    );
    // A session in a transaction when it ends does not give its
    // connection back: the next one is a new backend.
    let (_, out) = psql(&agent, &pg, "BEGIN; SELECT pg_backend_pid()");
    let in_tx = out.lines().last().unwrap().to_owned();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let (_, out) = psql(&agent, &pg, "SELECT pg_backend_pid()");
    assert_ne!(out.trim(), in_tx);
    // Cancel through the agent's key (psycopg2 sends it on a second
    // connection).
    let out = agent.python(
        "report-bot",
        r#"
import sys, threading, psycopg2
c = psycopg2.connect(host=sys.argv[1], port=int(sys.argv[2]), user="x", dbname="postgres", connect_timeout=10, sslmode="disable")
cur = c.cursor()
threading.Timer(0.5, c.cancel).start()
try:
    cur.execute("SELECT pg_sleep(20)")
    print("not cancelled")
except psycopg2.errors.QueryCanceled:
    print("cancelled")
"#,
        &[&pg.addr.ip().to_string(), &pg.addr.port().to_string()],
    );
    assert_eq!(stdout(&out), "cancelled\n", "{}", stderr(&out));
}

/// `approve` holds one statement: the loop waits, an approver sees the
/// statement as written, and the session goes on after an approval, a
/// refusal or a timeout (the refusal is 42501 with the reason). A duration
/// grant covers statements of the same shape only.
#[test]
fn a_held_statement_waits_for_a_person_and_the_session_goes_on() {
    let pg = server("127.10.6.8");
    let (agent, _dir) = agent_with(
        "pghold",
        &pg,
        "[[rules]]\nid = \"hold-deletes\"\ntargets = [\"orders-db\"]\nkinds = [\"sql\"]\nwhen = \"sql.kind == 'delete'\"\naction = \"approve\"\napproval_timeout = \"3s\"\ngrant = \"10m\"\nreason = \"deletes need a person\"\n",
    );
    let conn = conninfo(&pg);
    let run = |delete: &str| {
        agent.spawn_exec(
            "report-bot",
            &[
                "sh",
                "-c",
                &format!(
                    "psql -X -w -At -d '{conn}' -c \"{delete}\" -c 'SELECT count(*) FROM orders' 2>&1"
                ),
            ],
        )
    };
    let output = |c: std::process::Child| {
        String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).into_owned()
    };
    // Approved: the DELETE runs, then the SELECT.
    let child = run("DELETE FROM orders WHERE id = 1");
    let held = agent.wait_approval();
    assert!(
        held["rule_id"].as_str().unwrap().ends_with("hold-deletes"),
        "{held}"
    );
    assert_eq!(held["request"], "DELETE FROM orders WHERE id = 1");
    assert_eq!(count(&pg), "3", "a held statement waits");
    let id = held["approval_id"].as_str().unwrap().to_owned();
    assert!(agent.cli(&["approvals", "approve", &id]).status.success());
    assert_eq!(output(child), "DELETE 1\n2\n");
    // Within the 10-minute grant: the same shape is not held again.
    assert_eq!(
        output(run("DELETE FROM orders WHERE id = 2")),
        "DELETE 1\n1\n"
    );
    // Another shape is: refused by the approver, 42501 with the reason;
    // the session goes on.
    let child = run("DELETE FROM orders WHERE id = 3 AND email IS NULL");
    let id = agent.wait_approval_id();
    assert!(agent
        .cli(&["approvals", "deny", &id, "--reason", "not now"])
        .status
        .success());
    let out = output(child);
    assert!(
        out.contains("ERROR:  loopgate: statement refused by rule")
            && out.contains("approval denied by ops: not now")
            && out.ends_with("1\n"),
        "{out}"
    );
    // Nobody answers: refused when the approval times out.
    let out = output(run("DELETE FROM orders WHERE id = 3 AND email IS NULL"));
    assert!(
        out.contains("no approval within 3s") && out.ends_with("1\n"),
        "{out}"
    );
    assert_eq!(count(&pg), "1");
}

/// pgjdbc (Debian's) as the loop: a statement prepared past pgjdbc's
/// threshold (named, binary results, masked), a refusal, a batch with a
/// refused statement (none of it runs), a refusal in a transaction that
/// commits, a cancel from another thread.
#[test]
fn jdbc_prepared_batches_transactions_and_cancel() {
    let pg = server("127.10.6.12");
    let (agent, _dir) = agent("pgjdbc", &pg);
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/loops/JdbcLoop.java");
    let out = agent.exec(
        "report-bot",
        &[
            "java",
            "-Xshare:off",
            "-cp",
            "/usr/share/java/postgresql.jar",
            src,
            &pg.addr.ip().to_string(),
            &pg.addr.port().to_string(),
        ],
    );
    let stars = "*".repeat("ann@example.com".len());
    assert_eq!(
        stdout(&out),
        format!(
            "prepared 1 {stars}\n\
             refused 42501 ERROR: loopgate: statement refused by rule sql-no-unbounded-writes: UPDATE or DELETE without WHERE changes every row\n\
             batch refused 42501\n\
             in transaction 42501\n\
             committed 4\n\
             cancelled 57014\n\
             after 1\n"
        ),
        "{}\n{}",
        stderr(&out),
        agent.log()
    );
    assert_eq!(count(&pg), "4");
    assert_eq!(
        pg.admin("SELECT count(*) FROM orders WHERE id = 50").trim(),
        "0",
        "no statement of a refused batch runs"
    );
}

/// A held statement of the extended protocol (asyncpg: binary
/// parameters) waits at each `Bind`, with its values shown to the approver:
/// a `once` approval covers that one execution, not the next one with other
/// values.
#[test]
fn a_once_approval_covers_one_execution_with_the_values_the_approver_saw() {
    let pg = server("127.10.6.11");
    let (agent, _dir) = agent_with(
        "pgonce",
        &pg,
        "[[rules]]\nid = \"hold-deletes\"\ntargets = [\"orders-db\"]\nkinds = [\"sql\"]\nwhen = \"sql.kind == 'delete'\"\naction = \"approve\"\napproval_timeout = \"20s\"\nreason = \"deletes need a person\"\n",
    );
    let script = agent.dir.path().join("once.py");
    std::fs::write(
        &script,
        r#"
import asyncio, sys, asyncpg
async def main():
    c = await asyncpg.connect(host=sys.argv[1], port=int(sys.argv[2]), user="x", database="postgres", ssl=False)
    stmt = await c.prepare("DELETE FROM orders WHERE id = $1 AND email <> $2")
    await stmt.fetch(1, "nobody@example.com")
    print("after approval", await c.fetchval("SELECT count(*) FROM orders"))
    try:
        await stmt.fetch(2, "nobody@example.com")
        print("not held")
    except asyncpg.exceptions.InsufficientPrivilegeError as e:
        print("refused", "approval denied by ops: other values" in str(e))
    print("after refusal", await c.fetchval("SELECT count(*) FROM orders"))
    await c.close()
asyncio.run(main())
"#,
    )
    .unwrap();
    set_mode(&script, 0o644);
    let child = agent.spawn_exec(
        "report-bot",
        &[
            &loops_python(),
            &script.display().to_string(),
            &pg.addr.ip().to_string(),
            &pg.addr.port().to_string(),
        ],
    );
    // The approver sees the statement and its values (e-mail addresses
    // masked, as in the record); the Parse alone was not held.
    let stars = "*".repeat("nobody@example.com".len());
    let held = agent.wait_approval();
    assert_eq!(
        held["request"],
        format!(
            "DELETE FROM orders WHERE id = $1 AND email <> $2\n-- parameters: [\"1\",\"{stars}\"]"
        ),
        "{held}"
    );
    assert_eq!(count(&pg), "3", "a held statement waits");
    let id = held["approval_id"].as_str().unwrap().to_owned();
    assert!(agent.cli(&["approvals", "approve", &id]).status.success());
    // The same prepared statement with other values: held again.
    let held = loop {
        let h = agent.wait_approval();
        if h["approval_id"] != id.as_str() {
            break h;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(
        held["request"],
        format!(
            "DELETE FROM orders WHERE id = $1 AND email <> $2\n-- parameters: [\"2\",\"{stars}\"]"
        )
    );
    let id = held["approval_id"].as_str().unwrap().to_owned();
    assert!(agent
        .cli(&["approvals", "deny", &id, "--reason", "other values"])
        .status
        .success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "after approval 2\nrefused True\nafter refusal 2\n",
        "{}",
        agent.log()
    );
    assert_eq!(count(&pg), "2");
    // The record: the approved execution with its values, the refused one.
    let ev = agent_events_when(&agent, |ev| {
        ev.iter()
            .any(|e| e["attrs"]["result"] == "refused" && e["event_kind"] == "sql")
    });
    let deletes: Vec<&Value> = ev
        .iter()
        .filter(|e| e["event_kind"] == "sql" && e["attrs"]["statement_kind"] == "delete")
        .collect();
    let ran = deletes
        .iter()
        .find(|e| e["attrs"]["result"] == "ok")
        .unwrap_or_else(|| panic!("{ev:#?}"));
    assert_eq!(ran["attrs"]["params"], format!("[\"1\",\"{stars}\"]"));
    assert_eq!(ran["attrs"]["rows"], "1");
    let refused = deletes
        .iter()
        .find(|e| e["attrs"]["result"] == "refused")
        .unwrap();
    assert_eq!(refused["attrs"]["params"], format!("[\"2\",\"{stars}\"]"));
    assert!(!serde_json::to_string(&ev).unwrap().contains("nobody@"));
}

/// Nothing is dropped: 100,000 statements from pgbench (4 clients,
/// prepared) are each one `sql` event in ClickHouse.
#[test]
fn a_hundred_thousand_statements_are_each_recorded_in_clickhouse() {
    let ch = ClickHouse::start();
    let pg = server("127.10.6.9");
    pg.pgbench_init(1);
    pg.admin("GRANT SELECT ON pgbench_accounts, pgbench_branches TO app");
    let (spec, _dir) = agent_spec("pg100k", &pg, "", "");
    let agent = Agent::start(spec.clickhouse(&ch, ""));
    let host = pg.addr.ip().to_string();
    let port = pg.addr.port().to_string();
    let out = agent.exec(
        "report-bot",
        &[
            "pgbench",
            "-n",
            "-S",
            "-M",
            "prepared",
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "25000",
            "-h",
            &host,
            "-p",
            &port,
            "-U",
            "loop-user",
            "postgres",
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("number of transactions actually processed: 100000/100000"),
        "{text}"
    );
    let selects = "SELECT count() FROM loopgate.events FINAL WHERE kind = 'sql' \
                   AND request = 'SELECT abalance FROM pgbench_accounts WHERE aid = $1' \
                   AND has(attr_values, 'ok')";
    ch.wait_count(selects, 100_000, 240);
    assert_eq!(ch.count(selects), 100_000);
}
