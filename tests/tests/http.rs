//! HTTP targets: per-request decisions, the stored credential, and the JWT
//! second factor, with real curl loops and a real upstream on loopback.

use loopgate_e2e::*;

const BODY: &str = "orders: 3\n";
const STORED: &str = "stored-api-token-7f3a9c";

/// A tagged curl left running (its requests may be held): every URL on one
/// connection, each followed by a line with its HTTP status.
fn spawn_curl(agent: &Agent, urls: &[&str]) -> std::process::Child {
    let mut args = vec!["curl", "-sS", "-m", "30", "-w", "\n%{http_code}"];
    args.extend_from_slice(urls);
    agent.spawn_exec("stock-bot", &args)
}

fn secrets_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("lgt-http-secrets-")
        .tempdir()
        .unwrap();
    std::fs::write(d.path().join("api-token"), format!("{STORED}\n")).unwrap();
    d
}

#[test]
fn jwt_second_factor_is_verified_stripped_and_replaced_by_the_stored_credential() {
    let ch = ClickHouse::start();
    let http = HttpServer::start("127.10.4.1", BODY);
    let dir = secrets_dir();
    let idp = Idp::new(dir.path());
    let policy = idp.signed_bots_policy("orders-api", "loopgate", "signed-bots-use-orders");
    let agent = Agent::start(
        AgentSpec::new("httpjwt")
            .target("orders-api", &http.addr.to_string(), "http")
            .raw(&format!(
                "[targets.credential]\ntoken_file = \"{}\"\n",
                dir.path().join("api-token").display()
            ))
            .clickhouse(&ch, "")
            .policy("api.toml", &policy),
    );
    let url = format!("http://{}/orders?limit=3", http.addr);

    // A good token: the request goes through with the stored credential only.
    let good = idp.token("etl-bot@example", "loopgate", 300);
    let auth = format!("Authorization: Bearer {good}");
    let (code, body) = agent.curl("signed-etl", &["-H", &auth, &url]);
    assert_eq!((code, body.as_str()), (200, BODY), "{}", agent.log());
    let heads = http.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    let head = heads[0].to_ascii_lowercase();
    assert!(head.starts_with("get /orders?limit=3 http/1.1"), "{head}");
    assert!(
        head.contains(&format!(
            "authorization: bearer {}",
            STORED.to_ascii_lowercase()
        )),
        "the upstream did not get the stored credential: {head}"
    );
    assert!(
        !heads[0].contains(&good),
        "the loop's JWT reached the upstream"
    );
    assert_eq!(head.matches("authorization:").count(), 1, "{head}");

    // The stored credential only goes to the target's own host name.
    let (code, body) = agent.curl(
        "signed-etl",
        &["-H", &auth, "-H", "Host: attacker.example", &url],
    );
    assert_eq!(code, 421, "{body}");
    assert!(
        body.contains("Host attacker.example is not the target's address"),
        "{body}"
    );

    // Expired, wrong audience, missing: 401 with the reason; nothing upstream.
    let expired = idp.token("etl-bot@example", "loopgate", -3600);
    let (code, body) = agent.curl(
        "signed-etl",
        &["-H", &format!("Authorization: Bearer {expired}"), &url],
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("the token has expired"), "{body}");
    let wrong = idp.token("etl-bot@example", "another-service", 300);
    let (code, body) = agent.curl(
        "signed-etl",
        &["-H", &format!("Authorization: Bearer {wrong}"), &url],
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("audience is not loopgate"), "{body}");
    let (code, body) = agent.curl("signed-etl", &[&url]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("requires a JWT"), "{body}");
    // A workload that needs no token is refused at connect by the target
    // default: curl sees the connection reset.
    let (code, _) = agent.curl("unsigned", &["-H", &auth, &url]);
    assert_eq!(code, 0, "an unsigned workload got an HTTP answer");
    assert_eq!(http.requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The audit: who, with which subject, and why each was refused.
    ch.wait_count(
        "SELECT count() FROM loopgate.events FINAL WHERE target = 'orders-api'",
        // good: connect + request + response; Host: connect + request;
        // 3 refusals; unsigned: connect
        9,
        30,
    );
    let rows = ch.query(
        "SELECT kind, verdict, rule_id, reason, arrayStringConcat(attr_values, ',') FROM loopgate.events FINAL WHERE target = 'orders-api' ORDER BY ts FORMAT TSV",
    );
    let has = |prefix: &str, part: &str| {
        rows.lines()
            .any(|l| l.starts_with(prefix) && l.contains(part))
    };
    // The session decision is made with the token's subject.
    assert!(
        has(
            "connect\tallow\tsigned-bots-use-orders\t",
            "etl-bot@example"
        ),
        "{rows}"
    );
    assert!(has("request\tallow\tsession\t", "GET,/orders"), "{rows}");
    assert!(has("response\tallow\tsession\t200\t", "200"), "{rows}");
    assert!(
        has("request\tdeny\tjwt:signed-bots\tthe token has expired", ""),
        "{rows}"
    );
    assert!(
        has(
            "request\tdeny\tjwt:signed-bots\t",
            "audience is not loopgate"
        ),
        "{rows}"
    );
    assert!(
        has("request\tdeny\tjwt:signed-bots\t", "requires a JWT"),
        "{rows}"
    );
    assert!(
        has("connect\tdeny\ttarget-default:orders-api\t", ""),
        "{rows}"
    );
    let sessions = ch.query(
        "SELECT workload, protocol, outcome FROM loopgate.sessions FINAL WHERE target = 'orders-api' ORDER BY started_at FORMAT TSV",
    );
    assert!(sessions.starts_with("signed-etl\thttp\tok\n"), "{sessions}");
    assert!(sessions.contains("unsigned\thttp\tdenied"), "{sessions}");

    // Neither secret is written anywhere: log, audit rows or captured bytes.
    let log = agent.log();
    for secret in [STORED, good.as_str()] {
        assert!(!log.contains(secret), "a secret is in the agent log");
        assert_eq!(
            ch.count(&format!(
                "SELECT count() FROM loopgate.chunks FINAL WHERE position(data, '{secret}') > 0"
            )),
            0,
            "a secret is in the captured payload"
        );
        assert_eq!(
            ch.count(&format!(
                "SELECT count() FROM loopgate.events FINAL WHERE position(request, '{secret}') > 0 OR position(reason, '{secret}') > 0"
            )),
            0
        );
    }
    assert!(
        ch.count("SELECT count() FROM loopgate.chunks FINAL WHERE position(data, 'GET /orders?limit=3') > 0") > 0,
        "the upstream side of the request was not captured"
    );
}

#[test]
fn http_requests_are_decided_by_method_and_path_and_held_for_approval() {
    let http = HttpServer::start("127.10.4.2", BODY);
    let policy = r#"
[[rules]]
id = "no-deletes"
targets = ["inventory"]
methods = ["DELETE"]
action = "deny"
reason = "loops may not delete inventory"

[[rules]]
id = "no-internal"
targets = ["inventory"]
paths = ["/internal/**"]
action = "deny"

[[rules]]
id = "admin-needs-a-human"
targets = ["inventory"]
paths = ["/admin/**"]
action = "approve"
approvers = ["alice"]

[[rules]]
id = "reports-for-the-session"
targets = ["inventory"]
paths = ["/reports/*"]
action = "approve"
grant = "session"
"#;
    let agent = Agent::start(
        AgentSpec::new("httprules")
            .target("inventory", &http.addr.to_string(), "http")
            .raw("\n[[approvers]]\nname = \"alice\"\nuid = 0\n")
            .policy("inventory.toml", policy),
    );
    let base = format!("http://{}", http.addr);

    let (code, body) = agent.curl("stock-bot", &[&format!("{base}/items/7")]);
    assert_eq!((code, body.as_str()), (200, BODY));
    // Denied in the protocol: a 403 JSON body naming the rule.
    let (code, body) = agent.curl("stock-bot", &["-X", "DELETE", &format!("{base}/items/7")]);
    assert_eq!(code, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rule"], "no-deletes");
    assert_eq!(v["reason"], "loops may not delete inventory");
    assert_eq!(http.requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    // One spelling of the path: encodings and dot-segments do not get past
    // a path rule, and `/internal/**` covers `/internal` itself.
    for p in [
        "/%69nternal/keys",
        "/items/../internal/keys",
        "//internal",
        "/internal",
    ] {
        let (code, body) = agent.curl("stock-bot", &["--path-as-is", &format!("{base}{p}")]);
        assert_eq!(code, 403, "{p}: {body}");
        assert!(body.contains("no-internal"), "{p}: {body}");
    }
    let (code, _) = agent.curl(
        "stock-bot",
        &["--path-as-is", &format!("{base}/%2e%2e/internal")],
    );
    assert_eq!(code, 400, "an ambiguous encoding is refused");
    let (code, _) = agent.curl("stock-bot", &["-X", "TRACE", &format!("{base}/items")]);
    assert_eq!(code, 405, "TRACE would echo the stored credential");
    assert_eq!(http.requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Held for approval, then approved by alice: the request completes.
    let child = spawn_curl(&agent, &[&format!("{base}/admin/reindex")]);
    let held = agent.wait_approval();
    assert_eq!(held["rule_id"], "admin-needs-a-human");
    assert_eq!(held["request"], "GET /admin/reindex");
    let id = held["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(
        http.requests.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "held requests wait"
    );
    let out = agent.cli(&["approvals", "approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n200"), "{text}");
    assert_eq!(http.requests.load(std::sync::atomic::Ordering::SeqCst), 2);

    // grant = "session": one approval covers the rest of the connection
    // (curl sends both URLs on one keep-alive connection), not the next one.
    let child = spawn_curl(
        &agent,
        &[&format!("{base}/reports/q1"), &format!("{base}/reports/q2")],
    );
    let held = agent.wait_approval();
    assert_eq!(held["request"], "GET /reports/q1");
    let id = held["approval_id"].as_str().unwrap().to_owned();
    assert!(agent.cli(&["approvals", "approve", &id]).status.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\n200").count(), 2, "{text}");
    assert_eq!(http.requests.load(std::sync::atomic::Ordering::SeqCst), 4);
    // A new connection needs a new approval.
    let child = spawn_curl(&agent, &[&format!("{base}/reports/q3")]);
    let held = agent.wait_approval();
    assert_eq!(held["request"], "GET /reports/q3");
    let id = held["approval_id"].as_str().unwrap().to_owned();
    assert!(agent
        .cli(&["approvals", "deny", &id, "--reason", "not today"])
        .status
        .success());
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("approval denied by alice: not today"));

    let s = agent.wait_sessions("eleven http sessions", |s| {
        s.len() == 11 && s.iter().all(|r| r["outcome"] == "ok")
    });
    assert!(s.iter().all(|r| r["protocol"] == "http"), "{s:?}");
}

#[test]
fn malformed_http_from_a_loop_ends_only_its_session() {
    let http = HttpServer::start("127.10.4.3", BODY);
    let agent =
        Agent::start(AgentSpec::new("httpbad").target("api", &http.addr.to_string(), "http"));
    let out = agent.python(
        "garbage-bot",
        r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"NOT HTTP AT ALL\x00\x01\r\n\r\n")
print(s.recv(200).split(b"\r\n")[0].decode())
"#,
        &[&http.addr.ip().to_string(), &http.addr.port().to_string()],
    );
    assert!(stdout(&out).starts_with("HTTP/1.1 400"), "{}", stdout(&out));
    let (code, body) = agent.curl("good-bot", &[&format!("http://{}/x", http.addr)]);
    assert_eq!((code, body.as_str()), (200, BODY));
    let s = agent.wait_sessions("two sessions", |s| {
        s.len() == 2 && s.iter().all(|r| r["outcome"] != "open")
    });
    let bad = s.iter().find(|r| r["workload"] == "garbage-bot").unwrap();
    assert_eq!(bad["outcome"], "client_error", "{bad}");
    assert!(
        bad["detail"].as_str().unwrap().contains("malformed HTTP"),
        "{bad}"
    );
    assert_eq!(http.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn a_jwks_url_is_fetched_on_first_use_and_cached() {
    let http = HttpServer::start("127.10.4.5", BODY);
    let dir = tempfile::Builder::new()
        .prefix("lgt-jwks-")
        .tempdir()
        .unwrap();
    set_mode(dir.path(), 0o755);
    let idp = Idp::new(dir.path());
    // The identity provider: Python's http.server over the JWKS directory,
    // on loopback (a remote jwks_url must be https).
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("idp.log")).unwrap();
    let mut server = std::process::Command::new("/usr/bin/python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.10.4.6",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.10.4.6:{port}/jwks.json");
    let policy = idp
        .signed_bots_policy("api", "loopgate", "signed-bots-use-api")
        .replace(
            &format!("jwks_file = \"{}\"", idp.jwks.display()),
            &format!("jwks_url = \"{url}\""),
        );
    assert!(policy.contains("jwks_url"));
    let agent = Agent::start(
        AgentSpec::new("httpjwks")
            .target("api", &http.addr.to_string(), "http")
            .policy("api.toml", &policy),
    );
    // Wait for the IdP to listen.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.10.4.6", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the IdP did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let auth = format!(
        "Authorization: Bearer {}",
        idp.token("etl@example", "loopgate", 300)
    );
    let target = format!("http://{}/a", http.addr);
    for _ in 0..3 {
        let (code, body) = agent.curl("signed-etl", &["-H", &auth, &target]);
        assert_eq!((code, body.as_str()), (200, BODY), "{}", agent.log());
    }
    let _ = server.kill();
    let _ = server.wait();
    let fetches = std::fs::read_to_string(dir.path().join("idp.log"))
        .unwrap()
        .matches("GET /jwks.json")
        .count();
    assert_eq!(fetches, 1, "keys are fetched once and cached");
}

/// A tagged loop's raw HTTP/1.1 request (`TE: trailers`, so the agent may
/// send trailers): everything it received, as text.
fn raw_get(agent: &Agent, addr: std::net::SocketAddr, path: &str) -> String {
    let out = agent.python(
        "p-raw-bot",
        r#"
import socket, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=20)
s.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nTE: trailers\r\nConnection: close\r\n\r\n" % (path, host, port)).encode())
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
sys.stdout.write(data.decode("latin-1"))
"#,
        &[&addr.ip().to_string(), &addr.port().to_string(), path],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

/// Test output never shows the stored credential.
fn shown(text: &str) -> String {
    text.replace(STORED, "<the stored token>")
}

/// Every captured chunk of every session, and the events, as `loopgate
/// replay --json` prints them.
fn replays(agent: &Agent) -> String {
    agent
        .sessions()
        .iter()
        .map(|s| stdout(&agent.cli(&["replay", "--json", s["session_id"].as_str().unwrap()])))
        .collect()
}

#[test]
fn p_compressed_bodies_reason_phrases_and_trailers_are_masked() {
    let pad = "ab".repeat(100);
    let echo = format!("{{\"echo\":\"{STORED}\",\"pad\":\"{pad}\"}}\n");
    let masked = echo.replace(STORED, &"*".repeat(STORED.len()));
    let gz = gzip(echo.as_bytes());
    let z = zlib(echo.as_bytes());
    for wire in [&gz, &z] {
        assert!(
            !wire.windows(STORED.len()).any(|w| w == STORED.as_bytes()),
            "the compressed body shows the secret in clear"
        );
    }
    // A decompression bomb: 65 MiB of zeros in about 64 KiB.
    let bomb = gzip(&vec![0u8; 65 << 20]);
    let upstream = RawHttpServer::start("127.10.49.1", move |head| {
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        let with = |headers: &str, body: &[u8]| {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            r
        };
        match path.as_str() {
            "/gzip" => with("Content-Encoding: gzip\r\n", &gz),
            "/deflate" => with("Content-Encoding: deflate\r\n", &z),
            "/br" => with("Content-Encoding: br\r\n", b"\x1b\x03\x00\xf8brotli?"),
            "/stacked" => with("Content-Encoding: gzip, gzip\r\n", &gzip(&gz)),
            "/named" => with(&format!("Content-Encoding: {STORED}\r\n"), b"?"),
            "/bomb" => with("Content-Encoding: gzip\r\n", &bomb),
            "/reason" => format!(
                "HTTP/1.1 200 {STORED} Fine\r\nContent-Length: 3\r\n\r\nok\n"
            )
            .into_bytes(),
            "/trailer" => format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Leak\r\n\r\n3\r\nok\n\r\n0\r\nX-Leak: {STORED}\r\n\r\n"
            )
            .into_bytes(),
            _ => with("", b"plain\n"),
        }
    });
    let dir = secrets_dir();
    let agent = Agent::start(
        AgentSpec::new("p-mask")
            .target("p-leaky", &upstream.addr.to_string(), "http")
            .raw(&format!(
                "[targets.credential]\ntoken_file = \"{}\"\n",
                dir.path().join("api-token").display()
            )),
    );
    let base = format!("http://{}", upstream.addr);

    // gzip and deflate despite `Accept-Encoding: identity`: decoded and
    // masked, whether curl asked for compression or not.
    for path in ["/gzip", "/deflate"] {
        let url = format!("{base}{path}");
        for extra in [&["--compressed"][..], &[]] {
            let (code, body) = agent.curl("p-api-bot", &[extra, &[url.as_str()]].concat());
            assert!(
                code == 200 && body == masked,
                "{path} {extra:?}: {code} {}",
                shown(&body)
            );
        }
    }
    // Encodings loopgate cannot decode: refused with a 502 naming why.
    let (code, body) = agent.curl("p-api-bot", &["--compressed", &format!("{base}/br")]);
    assert_eq!(code, 502, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["error"],
        "loopgate: the upstream's response cannot be masked"
    );
    assert!(
        v["reason"].as_str().unwrap().contains("encoded as br"),
        "{v}"
    );
    let (code, body) = agent.curl("p-api-bot", &[&format!("{base}/stacked")]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("stacked encodings"), "{body}");
    // The reason quotes the upstream's coding, masked.
    let (code, body) = agent.curl("p-api-bot", &[&format!("{base}/named")]);
    assert_eq!(code, 502, "{}", shown(&body));
    assert!(body.contains("encoded as ****"), "{}", shown(&body));
    // The reason phrase is the canonical one; trailers are dropped.
    let got = raw_get(&agent, upstream.addr, "/reason");
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{}", shown(&got));
    assert!(got.ends_with("\r\n\r\nok\n"), "{}", shown(&got));
    let got = raw_get(&agent, upstream.addr, "/trailer");
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{}", shown(&got));
    assert!(got.contains("ok\n"), "{}", shown(&got));
    assert!(
        !got.contains(STORED),
        "a trailer carried the secret: {}",
        shown(&got)
    );
    assert!(
        !got.to_ascii_lowercase().contains("x-leak"),
        "{}",
        shown(&got)
    );
    // A bomb: cut at the cap, and only that session ends.
    let out = agent.exec(
        "p-bomb-bot",
        &[
            "curl",
            "-sS",
            "-m",
            "120",
            "-o",
            "/dev/null",
            &format!("{base}/bomb"),
        ],
    );
    assert!(!out.status.success(), "the bomb was delivered whole");
    let (code, body) = agent.curl("p-api-bot", &[&format!("{base}/gzip")]);
    assert!(code == 200 && body == masked, "{code} {}", shown(&body));

    let s = agent.wait_sessions("eleven sessions", |s| {
        s.len() == 11 && s.iter().all(|r| r["outcome"] != "open")
    });
    let bombed = s.iter().find(|r| r["workload"] == "p-bomb-bot").unwrap();
    assert_eq!(bombed["outcome"], "upstream_error", "{bombed}");
    assert!(
        bombed["detail"]
            .as_str()
            .unwrap()
            .contains("gzip response body decodes to more than 67108864 bytes"),
        "{bombed}"
    );
    assert!(
        s.iter()
            .filter(|r| r["workload"] != "p-bomb-bot")
            .all(|r| r["outcome"] == "ok"),
        "{s:?}"
    );
    // The audit has what the loop got (decoded, masked), never the secret.
    let replays = replays(&agent);
    assert!(
        replays.contains("{\\\"echo\\\":\\\"*"),
        "{}",
        shown(&replays)
    );
    assert!(
        replays.contains("cannot decode to mask"),
        "{}",
        shown(&replays)
    );
    assert!(!replays.contains(STORED), "the secret is in a replay");
    assert!(
        !agent_files_contain(&agent, STORED),
        "the secret is in the spool or the log"
    );
}

#[test]
fn p_method_overrides_are_stripped_and_connection_may_not_name_end_to_end_headers() {
    let upstream = RawHttpServer::start("127.10.49.2", |_| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n".to_vec()
    });
    let agent = Agent::start(
        AgentSpec::new("p-override")
            .target("p-orders", &upstream.addr.to_string(), "http")
            .policy(
                "orders.toml",
                r#"
[[rules]]
id = "p-no-deletes"
targets = ["p-orders"]
methods = ["DELETE"]
action = "deny"
"#,
            ),
    );
    let url = format!("http://{}/orders/7", upstream.addr);
    let (code, body) = agent.curl("p-bot", &["-X", "DELETE", &url]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("p-no-deletes"), "{body}");
    // A POST that asks to be taken for a DELETE: the upstream gets a POST,
    // without the override.
    let (code, body) = agent.curl(
        "p-bot",
        &[
            "-X",
            "POST",
            "-d",
            "x=1",
            "-H",
            "X-HTTP-Method-Override: DELETE",
            "-H",
            "X-HTTP-Method: DELETE",
            "-H",
            "X-Method-Override: DELETE",
            &url,
        ],
    );
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let heads = upstream.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = heads[0].to_ascii_lowercase();
    assert!(head.starts_with("post /orders/7 "), "{head}");
    for h in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        assert!(!head.contains(h), "the upstream got {h}: {head}");
    }
    // Connection may name hop-by-hop headers only.
    for named in ["host", "keep-alive, Authorization", "Content-Length"] {
        let (code, body) = agent.curl("p-bot", &["-H", &format!("Connection: {named}"), &url]);
        assert_eq!(code, 400, "Connection: {named}: {body}");
        assert!(body.contains("an end-to-end header"), "{body}");
    }
    let (code, body) = agent.curl(
        "p-bot",
        &["-H", "Connection: x-trace", "-H", "X-Trace: 1", &url],
    );
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let heads = upstream.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "refused requests reached the upstream");
    let head = heads[1].to_ascii_lowercase();
    assert!(head.contains("host: "), "{head}");
    assert!(!head.contains("x-trace"), "{head}");
    agent.wait_sessions("six sessions", |s| {
        s.len() == 6 && s.iter().all(|r| r["outcome"] == "ok")
    });
    assert!(agent_files_contain(&agent, "method_override_stripped"));
}
