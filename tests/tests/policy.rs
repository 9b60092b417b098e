//! Policies and approvals at connect time (L4), with real agents and loops.

use std::{
    io::{BufRead, BufReader, Write},
    time::{Duration, Instant},
};

use loopgate_e2e::*;

/// Refused connections are reset by the proxy: the loop sees ECONNRESET
/// (or, if the reset races its first read, a closed connection).
fn refused(answer: &str) -> bool {
    answer == "error 104" || answer.starts_with("closed")
}

#[test]
fn target_default_deny_resets_the_connection_and_records_the_rule() {
    let echo = EchoServer::start("127.10.3.1");
    let agent = Agent::start(
        AgentSpec::new("poldeny")
            .target("db", &echo.addr.to_string(), "tcp")
            .policy(
                "db.toml",
                "[[targets]]\nname = \"db\"\ndefault = \"deny\"\nreason = \"db is closed by default\"\n",
            ),
    );
    let mut l = Loop::start(&agent, "reporting", echo.addr);
    l.go();
    let a = l.answer();
    assert!(refused(&a), "{a}");
    assert_eq!(echo.accepted(), 0, "a denied connection reached the server");
    let rows = agent.wait_sessions("denied session", |s| {
        s.len() == 1 && s[0]["outcome"] == "denied"
    });
    assert_eq!(rows[0]["detail"], "db is closed by default");
    assert_eq!(rows[0]["workload"], "reporting");
}

#[test]
fn approval_is_required_granted_refused_and_times_out() {
    let ch = ClickHouse::start();
    let echo = EchoServer::start("127.10.3.2");
    let slow = EchoServer::start("127.10.3.3");
    let policy = r#"
[[workloads]]
name = "etl"
workload = "etl-*"

[[rules]]
id = "etl-db-needs-approval"
workloads = ["etl"]
targets = ["db"]
action = "approve"
approvers = ["alice"]
reason = "writes to db need a human"

[[rules]]
id = "etl-vault-timeout"
workloads = ["etl"]
targets = ["vault"]
action = "approve"
approval_timeout = "2s"
"#;
    let agent = Agent::start(
        AgentSpec::new("polapprove")
            .agent_key("admin_group = \"nogroup\"")
            .target("db", &echo.addr.to_string(), "tcp")
            .target("vault", &slow.addr.to_string(), "tcp")
            .raw("\n[[approvers]]\nname = \"alice\"\nuser = \"daemon\"\n\n[[approvers]]\nname = \"root-operator\"\nuid = 0\n\n[[approvers]]\nname = \"loop-user\"\nuser = \"nobody\"\n")
            .clickhouse(&ch, "")
            .policy("etl.toml", policy),
    );
    let mut l = Loop::start(&agent, "etl-nightly", echo.addr);

    // 1. Held, then approved by alice (uid `daemon`) → the connection goes through.
    l.go();
    let held = agent.wait_approval();
    assert_eq!(held["rule_id"], "etl-db-needs-approval");
    assert_eq!(held["workload"], "etl-nightly");
    assert_eq!(echo.accepted(), 0, "nothing reaches the server while held");
    let id = held["approval_id"].as_str().unwrap().to_owned();
    // Not an approver: uid `bin` in the admin group can connect, but not decide.
    let out = agent.cli_as("bin", "nogroup", &["approvals", "approve", &id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not an approver"),
        "{}",
        stderr(&out)
    );
    // The loop's own user is an approver, but not of its own request.
    let out = agent.cli_as("nobody", "nogroup", &["approvals", "approve", &id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("may not decide a request made by their own uid"),
        "{}",
        stderr(&out)
    );
    // A tagged loop may not use the admin socket at all, whatever its uid.
    let bin = loopgate_bin();
    let cfg = agent.config.to_str().unwrap().to_owned();
    let out = agent.exec(
        "etl-nightly",
        &[
            bin.to_str().unwrap(),
            "--config",
            &cfg,
            "approvals",
            "approve",
            &id,
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("tagged loops may not use the admin socket"),
        "{}",
        stderr(&out)
    );
    // An approver not named by the rule.
    let out = agent.cli(&["approvals", "approve", &id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("root-operator may not decide"),
        "{}",
        stderr(&out)
    );
    let out = agent.cli_as(
        "daemon",
        "nogroup",
        &["approvals", "approve", &id, "--reason", "planned migration"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(l.answer(), "ok");
    assert_eq!(echo.accepted(), 1);

    // 2. Held, then denied → the connection is reset.
    l.go();
    let id = agent.wait_approval_id();
    let out = agent.cli_as(
        "daemon",
        "nogroup",
        &["approvals", "deny", &id, "--reason", "not now"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let a = l.answer();
    assert!(refused(&a), "{a}");
    assert_eq!(echo.accepted(), 1);

    // 3. Nobody answers: refused after the rule's timeout.
    let mut v = Loop::start(&agent, "etl-nightly", slow.addr);
    let t = Instant::now();
    v.go();
    let a = v.answer();
    assert!(refused(&a), "{a}");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "refused before the timeout: {:?}",
        t.elapsed()
    );
    assert_eq!(slow.accepted(), 0);

    // Everything is in the audit: decisions, approvers, waits.
    ch.wait_count(
        "SELECT count() FROM loopgate.approvals FINAL WHERE decision != 'pending'",
        3,
        30,
    );
    let rows = ch.query(
        "SELECT decision, approver, reason, rule_id FROM loopgate.approvals FINAL ORDER BY requested_at FORMAT TSV",
    );
    let rows: Vec<&str> = rows.lines().collect();
    assert_eq!(
        rows[0],
        "approved\talice\tplanned migration\tetl-db-needs-approval"
    );
    assert_eq!(rows[1], "denied\talice\tnot now\tetl-db-needs-approval");
    assert!(
        rows[2].starts_with("timeout\t\tno decision within 2s\tetl-vault-timeout"),
        "{}",
        rows[2]
    );
    assert!(
        ch.count("SELECT min(decided_at_us - requested_at_us) FROM loopgate.approvals FINAL") > 0
    );
    ch.wait_count(
        "SELECT count() FROM loopgate.sessions FINAL WHERE outcome = 'denied' AND detail = 'approval denied by alice: not now'",
        1,
        30,
    );
}

#[test]
fn a_timed_grant_lets_later_connections_through() {
    let echo = EchoServer::start("127.10.3.4");
    let agent = Agent::start(
        AgentSpec::new("polgrant")
            .target("db", &echo.addr.to_string(), "tcp")
            .raw("\n[[approvers]]\nname = \"root-operator\"\nuid = 0\n")
            .policy(
                "grant.toml",
                "[[rules]]\nid = \"db-window\"\ntargets = [\"db\"]\naction = \"approve\"\ngrant = \"10m\"\n",
            ),
    );
    let mut l = Loop::start(&agent, "ops", echo.addr);
    l.go();
    let id = agent.wait_approval_id();
    assert!(agent.cli(&["approvals", "approve", &id]).status.success());
    assert_eq!(l.answer(), "ok");
    for _ in 0..3 {
        l.go();
        assert_eq!(l.answer(), "ok", "within the grant no approval is asked");
    }
    assert!(agent.approvals().is_empty());
    assert_eq!(echo.accepted(), 4);
}

#[test]
fn policies_reload_on_change_and_an_invalid_set_keeps_the_old_one() {
    let echo = EchoServer::start("127.10.3.5");
    let mut agent =
        Agent::start(AgentSpec::new("polreload").target("db", &echo.addr.to_string(), "tcp"));
    let mut l = Loop::start(&agent, "ops", echo.addr);
    l.go();
    assert_eq!(l.answer(), "ok");
    let reloads = |a: &Agent| a.status()["policy"]["reloads"].as_u64().unwrap();
    let before = reloads(&agent);

    // A valid change is picked up by the watcher.
    let file = agent.path("policies/db.toml");
    std::fs::write(&file, "[[targets]]\nname = \"db\"\ndefault = \"deny\"\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while reloads(&agent) == before {
        assert!(Instant::now() < deadline, "policy change not picked up");
        std::thread::sleep(Duration::from_millis(100));
    }
    l.go();
    assert!(refused(&l.answer()));

    // An invalid change is refused with its position; the deny stays in force.
    std::fs::write(
        &file,
        "[[targets]]\nname = \"db\"\ndefault = \"sometimes\"\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let err = loop {
        if let Some(e) = agent.status()["policy"]["last_error"].as_str() {
            break e.to_owned();
        }
        assert!(Instant::now() < deadline, "invalid policy not reported");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        err.contains("db.toml:3:11: default `sometimes` is not allow, deny or approve"),
        "{err}"
    );
    l.go();
    assert!(
        refused(&l.answer()),
        "the previous policy must stay in force"
    );

    // SIGHUP reloads at once.
    std::fs::write(&file, "[[targets]]\nname = \"db\"\ndefault = \"allow\"\n").unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.status()["policy"]["last_error"].is_null() {
        assert!(Instant::now() < deadline, "SIGHUP reload did not happen");
        std::thread::sleep(Duration::from_millis(50));
    }
    l.go();
    assert_eq!(l.answer(), "ok");
    assert!(agent.log().contains("policy reload refused"));
    drop(l);
    assert!(agent.terminate());
}

#[test]
fn policy_check_reports_every_error_with_its_position() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        "[[rules]]\nid = \"r1\"\ntargets = [\"*\"]\naction = \"permit\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        "[[rules]]\nid = \"r2\"\nworkloads = [\"ghost\"]\ntargets = [\"*\"]\naction = \"deny\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(loopgate_bin())
        .args(["--config", "/nonexistent/agent.toml", "policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let a = dir.path().join("a.toml").display().to_string();
    let b = dir.path().join("b.toml").display().to_string();
    assert!(
        err.contains(&format!(
            "{a}:4:10: action `permit` is not allow, deny, approve or mask"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{b}:3:13: unknown workload `ghost`")),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "{err}");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
    let out = std::process::Command::new(loopgate_bin())
        .args([
            "--config",
            "/nonexistent/agent.toml",
            "policy",
            "check",
            shipped,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn approval_page_and_metrics_on_the_admin_port() {
    let echo = EchoServer::start("127.10.3.6");
    let http = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-7f3a9c-approver-alice";
    let token_file = dir.path().join("alice.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let agent = Agent::start(
        AgentSpec::new("polpage")
            .agent_key(&format!("admin_http = \"{http}\""))
            .target("db", &echo.addr.to_string(), "tcp")
            .raw(&format!(
                "\n[[approvers]]\nname = \"alice\"\nuser = \"daemon\"\ntoken_file = \"{}\"\n",
                token_file.display()
            ))
            .policy(
                "p.toml",
                "[[rules]]\nid = \"db-approve\"\ntargets = [\"db\"]\naction = \"approve\"\n",
            ),
    );
    let base = format!("http://{http}");
    let mut l = Loop::start(&agent, "ops", echo.addr);
    l.go();
    let id = agent.wait_approval_id();

    // No token, a wrong token: refused.
    let code = |args: &[&str]| curl(args).0.to_string();
    assert_eq!(code(&[&format!("{base}/approvals")]), "401");
    assert_eq!(code(&[&format!("{base}/approvals?token=wrong")]), "401");
    assert_eq!(
        code(&["-X", "POST", &format!("{base}/approvals/{id}/approve")]),
        "401"
    );
    // The token signs in (cookie), the page lists the held request.
    let jar = dir.path().join("cookies");
    let jar = jar.to_str().unwrap();
    assert_eq!(
        code(&["-c", jar, &format!("{base}/approvals?token={token}")]),
        "303"
    );
    let page = curl(&["-b", jar, &format!("{base}/approvals")]).1;
    assert!(page.contains("Signed in as <b>alice</b>"), "{page}");
    assert!(page.contains(&format!("id=\"approve-{id}\"")), "{page}");
    assert!(page.contains("connect 127.10.3.6"), "{page}");
    // A decision carries the page's CSRF token and comes from its origin.
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a CSRF token in the page");
    assert_eq!(
        code(&[
            "-b",
            jar,
            "-H",
            &format!("Origin: {base}"),
            "-d",
            &format!("reason=looks fine&csrf={csrf}"),
            &format!("{base}/approvals/{id}/approve")
        ]),
        "303"
    );
    assert_eq!(l.answer(), "ok");
    assert!(curl(&["-b", jar, &format!("{base}/approvals")])
        .1
        .contains("Nothing is waiting"));
    assert!(
        !agent.log().contains(token),
        "the token must never be logged"
    );

    let m = curl(&[&format!("{base}/metrics")]).1;
    assert!(
        m.contains("loopgate_sessions_total{protocol=\"tcp\",workload=\"ops\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("loopgate_decisions_total{verdict=\"approve\",rule=\"db-approve\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("loopgate_approval_wait_seconds_count{decision=\"approved\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("loopgate_kernel_connects{counter=\"redirected\"} 1"),
        "{m}"
    );
    assert!(m.contains("loopgate_spool_pending_bytes 0"), "{m}");
}

#[test]
fn held_requests_are_announced_to_webhooks_with_retries() {
    let echo = EchoServer::start("127.10.3.7");
    let (url, bodies) = webhook_receiver("127.10.3.20", "/hooks/T000/B000/secret-path", 1);
    let agent = Agent::start(
        AgentSpec::new("polhook")
            .target("db", &echo.addr.to_string(), "tcp")
            .raw(&format!(
                "\n[approvals]\nwebhooks = [\"{url}\"]\npage_url = \"http://127.0.0.1:15002/approvals\"\n\n[[approvers]]\nname = \"root-operator\"\nuid = 0\n"
            ))
            .policy(
                "p.toml",
                "[[rules]]\nid = \"db-approve\"\ntargets = [\"db\"]\naction = \"approve\"\nreason = \"db needs a human\"\n",
            ),
    );
    let mut l = Loop::start(&agent, "ops", echo.addr);
    l.go();
    let id = agent.wait_approval_id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while bodies.lock().unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "webhook not retried: {:?}\n{}",
            bodies.lock().unwrap(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let v: Value = serde_json::from_str(&bodies.lock().unwrap()[1]).unwrap();
    assert_eq!(v["approval_id"], id.as_str());
    assert_eq!(v["workload"], "ops");
    assert_eq!(v["rule_id"], "db-approve");
    let text = v["text"].as_str().unwrap();
    assert!(
        text.contains("db needs a human") && text.contains("http://127.0.0.1:15002/approvals"),
        "{text}"
    );
    assert!(agent.cli(&["approvals", "approve", &id]).status.success());
    assert_eq!(l.answer(), "ok");
    let log = agent.log();
    assert!(
        log.contains("approval webhook refused the notification"),
        "{log}"
    );
    assert!(
        !log.contains("secret-path"),
        "webhook URLs are secrets: only the host may be logged"
    );
}

#[test]
fn approval_page_approves_with_a_real_click_in_headless_chromium() {
    let echo = EchoServer::start("127.10.3.8");
    let http = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-chromium-approver-bob";
    let token_file = dir.path().join("bob.token");
    std::fs::write(&token_file, token).unwrap();
    let agent = Agent::start(
        AgentSpec::new("polchromium")
            .agent_key(&format!("admin_http = \"{http}\""))
            .target("db", &echo.addr.to_string(), "tcp")
            .raw(&format!(
                "\n[[approvers]]\nname = \"bob\"\nuser = \"daemon\"\ntoken_file = \"{}\"\n",
                token_file.display()
            ))
            .policy(
                "p.toml",
                "[[rules]]\nid = \"db-approve\"\ntargets = [\"db\"]\naction = \"approve\"\nreason = \"db writes need a human\"\n",
            ),
    );
    let mut l = Loop::start(&agent, "etl", echo.addr);
    l.go();
    let id = agent.wait_approval_id();
    let shot = dir.path().join("approvals.png");
    let out = std::process::Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/approval_page.js"))
        .arg(playwright_core())
        .arg(format!("http://{http}/approvals?token={token}"))
        .arg(&id)
        .arg(&shot)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium run failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(
        v["row"]
            .as_str()
            .unwrap()
            .contains("db writes need a human"),
        "{v}"
    );
    assert_eq!(v["title"], "loopgate approvals");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 1000,
        "no screenshot"
    );
    assert_eq!(
        l.answer(),
        "ok",
        "the click let the held connection through"
    );
    assert!(agent.log().contains("approval decided"));
}

const HOLD_THEN_READ: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=30)
s.sendall(b"ping")
print("connected", s.recv(4).decode(), flush=True)
sys.stdin.readline()
try:
    s.sendall(b"more")
    d = s.recv(4)
    print("read", repr(d), flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"#;

#[test]
fn a_reload_that_withdraws_permission_closes_open_sessions() {
    let echo = EchoServer::start("127.10.3.9");
    let agent =
        Agent::start(AgentSpec::new("polrevoke").target("db", &echo.addr.to_string(), "tcp"));
    let script = agent.path("hold.py");
    std::fs::write(&script, HOLD_THEN_READ).unwrap();
    let port = echo.addr.port().to_string();
    let mut child = agent.spawn_exec(
        "ops",
        &[
            "/usr/bin/python3",
            script.to_str().unwrap(),
            "127.10.3.9",
            &port,
        ],
    );
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected ping");
    std::fs::write(
        agent.path("policies/db.toml"),
        "[[targets]]\nname = \"db\"\ndefault = \"deny\"\nreason = \"db closed for maintenance\"\n",
    )
    .unwrap();
    let rows = agent.wait_sessions("revoked session", |s| {
        s.len() == 1 && s[0]["outcome"] == "revoked"
    });
    assert!(
        rows[0]["detail"]
            .as_str()
            .unwrap()
            .contains("db closed for maintenance"),
        "{rows:#?}"
    );
    writeln!(child.stdin.as_mut().unwrap()).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("read b''") || line.starts_with("error"),
        "{line}"
    );
    let _ = child.wait();
}

#[test]
fn a_loop_that_hangs_up_while_held_leaves_nothing_to_approve() {
    let echo = EchoServer::start("127.10.3.10");
    let agent = Agent::start(
        AgentSpec::new("polhangup")
            .target("db", &echo.addr.to_string(), "tcp")
            .raw("\n[[approvers]]\nname = \"root-operator\"\nuid = 0\n")
            .policy(
                "p.toml",
                "[[rules]]\nid = \"db-approve\"\ntargets = [\"db\"]\naction = \"approve\"\ngrant = \"10m\"\n",
            ),
    );
    // A loop that gives up after a second and closes its socket.
    const IMPATIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"ping")
s.settimeout(1)
try:
    s.recv(4)
except OSError:
    pass
s.close()
"#;
    let script = agent.path("impatient.py");
    std::fs::write(&script, IMPATIENT).unwrap();
    let port = echo.addr.port().to_string();
    let mut child = agent.spawn_exec(
        "ops",
        &[
            "/usr/bin/python3",
            script.to_str().unwrap(),
            "127.10.3.10",
            &port,
        ],
    );
    let id = agent.wait_approval_id();
    assert!(child.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.approvals().is_empty() {
        assert!(
            Instant::now() < deadline,
            "held request still listed after the loop hung up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = agent.cli(&["approvals", "approve", &id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no pending approval"),
        "{}",
        stderr(&out)
    );
    let rows = agent.wait_sessions("refused session", |s| {
        s.len() == 1 && s[0]["outcome"] == "denied"
    });
    assert_eq!(
        rows[0]["detail"],
        "the loop hung up while its request was held"
    );
    assert_eq!(echo.accepted(), 0);
    // No grant was created: the next connection is held again.
    let mut l = Loop::start(&agent, "ops", echo.addr);
    l.go();
    agent.wait_approval();
}
