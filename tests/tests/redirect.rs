//! Transparent redirect: real eBPF programs on real cgroups, real loops.

use loopgate_e2e::*;

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
