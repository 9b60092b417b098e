//! Attacks by a loop on the host it runs on (issue 9): the admin socket, the
//! terminal and environment `loopgate exec` hands it, the approval page and the
//! webhooks. Each test makes the attack and checks it fails.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use loopgate_e2e::*;

/// Approvers for the admin-socket attacks: `nobody` (the attacking loops'
/// user) and `daemon` are approvers named by the rule and members of the
/// admin group, so only the "tagged loops are refused" check stands between
/// a loop and a decision.
fn admin_spec(name: &str, echo: &EchoServer) -> AgentSpec {
    AgentSpec::new(name)
        .agent_key("admin_group = \"nogroup\"")
        .target("db", &echo.addr.to_string(), "tcp")
        .raw("\n[[approvers]]\nname = \"loop-user\"\nuser = \"nobody\"\n\n[[approvers]]\nname = \"sre\"\nuser = \"daemon\"\n")
        .policy(
            "p.toml",
            "[[rules]]\nid = \"db-approve\"\ntargets = [\"db\"]\naction = \"approve\"\napprovers = [\"loop-user\", \"sre\"]\n",
        )
}

/// The loop creates an admin socket and forks; the child connects and exits
/// at once (and is reaped), then the parent talks on the inherited
/// connection, so the pid `SO_PEERCRED` names is gone by the time the agent
/// looks. A race the loop wins often enough; it tries until it does.
const FORK_CONNECT_EXIT: &str = r#"
import json, os, socket, sys
path, rid = sys.argv[1], sys.argv[2]
for attempt in range(300):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        s.connect(path)
        os._exit(0)
    os.waitpid(pid, 0)
    f = s.makefile("rwb")
    try:
        f.write(b'{"cmd": "approvals_list"}\n')
        f.flush()
        answer = f.readline().decode().strip()
    except OSError as e:
        answer = "error %s" % e
    if '"error"' in answer or answer.startswith("error"):
        print("refused", answer, flush=True)
        s.close()
        continue
    print("listed", answer, flush=True)
    f.write((json.dumps({"cmd": "approvals_decide", "id": rid, "approve": True,
                         "reason": "forked"}) + "\n").encode())
    f.flush()
    print("decided", f.readline().decode().strip(), flush=True)
    break
"#;

#[test]
fn a_loop_that_forks_a_child_to_connect_to_the_admin_socket_is_refused() {
    let echo = EchoServer::start("127.10.9.1");
    let agent = Agent::start(admin_spec("l-admfork", &echo));
    // Another workload's request, made by uid daemon, is held.
    let mut victim = Loop::start_as(&agent, "l-victim", "daemon", echo.addr);
    victim.go();
    let id = agent.wait_approval_id();

    let sock = agent.path("admin.sock");
    let out = agent.python(
        "l-attacker",
        FORK_CONNECT_EXIT,
        &[sock.to_str().unwrap(), &id],
    );
    let text = stdout(&out);
    let refused = text.lines().filter(|l| l.starts_with("refused")).count();
    let won = text.lines().filter(|l| !l.starts_with("refused")).count();
    eprintln!(
        "{refused} attempts refused ({} as unknown), {won} other lines",
        text.matches("cannot establish that the caller is not a tagged loop")
            .count()
    );
    assert!(
        refused == 300 && won == 0,
        "the loop got past the admin socket:\n{}\nstderr: {}",
        text.lines()
            .filter(|l| !l.starts_with("refused"))
            .collect::<Vec<_>>()
            .join("\n"),
        stderr(&out)
    );
    assert!(
        text.lines()
            .all(|l| l.contains("tagged loops may not use the admin socket")
                || l.contains("cannot establish that the caller is not a tagged loop")),
        "{text}"
    );
    assert_eq!(agent.approvals().len(), 1, "the request must still be held");
    assert_eq!(echo.accepted(), 0, "nothing was approved");
}

#[test]
fn a_loop_in_a_named_workload_cgroup_is_refused_on_the_admin_socket() {
    let echo = EchoServer::start("127.10.9.2");
    let named = NamedCgroup::create("lgt-l-admnamed-sre/etl.service");
    let agent = Agent::start(admin_spec("l-admnamed", &echo).raw(&format!(
        "\n[[workloads]]\nname = \"sre-etl\"\ncgroup = \"{}\"\n",
        named.rel
    )));
    // A loop in the cgroup root, as nobody, is held.
    let mut victim = Loop::start_as(&agent, "l-victim", "nobody", echo.addr);
    victim.go();
    let id = agent.wait_approval_id();

    // A process of the named workload, as daemon (an approver, in the admin
    // group): it moves itself into the cgroup, then drops to daemon.
    let run_in_named = |args: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {procs} && exec setpriv --reuid=daemon --regid=nogroup --clear-groups {bin} --config {cfg} {args}",
                procs = named.procs().display(),
                bin = loopgate_bin().display(),
                cfg = agent.config.display(),
            ))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    for args in [
        "approvals list --json".to_owned(),
        format!("approvals approve {id} --reason named"),
    ] {
        let out = run_in_named(&args);
        assert!(!out.status.success(), "{args}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("tagged loops may not use the admin socket"),
            "{args}: {}",
            stderr(&out)
        );
        assert!(!stdout(&out).contains(&id), "{args}: {}", stdout(&out));
    }
    assert_eq!(agent.approvals().len(), 1, "the request must still be held");
    assert_eq!(echo.accepted(), 0, "nothing was approved");
    // The same user outside the cgroup may decide (it is an approver).
    let out = agent.cli_as("daemon", "nogroup", &["approvals", "approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(victim.answer(), "ok");
}

/// `loopgate exec` run by the test with `env` set in its environment.
fn exec_with_env(agent: &Agent, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    agent
        .command()
        .arg("exec")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run loopgate exec")
}

/// Names (never values) of the variables in `env` output.
fn env_names(out: &str) -> Vec<String> {
    let mut n: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
        .collect();
    n.sort();
    n
}

#[test]
fn exec_gives_the_loop_a_reset_environment_and_env_passes_more() {
    let agent = Agent::start(AgentSpec::new("l-execenv"));
    // Fake secrets: the values are only ever compared, never printed.
    let secret = "lg-test-secret-1b0c9d";
    let env = [
        ("LG_TEST_API_TOKEN", secret),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("LANG", "C.UTF-8"),
    ];
    let out = exec_with_env(&agent, &env, &["--workload", "l-env", "--", "env"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let names = env_names(&text);
    assert!(
        !text.contains(secret),
        "the caller's secrets reached the loop: {names:?}"
    );
    for n in [
        "HOME",
        "LANG",
        "LOGNAME",
        "LOOPGATE_INSTANCE",
        "LOOPGATE_WORKLOAD",
        "PATH",
        "SHELL",
        "USER",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing: {names:?}");
    }
    let allowed = [
        "HOME",
        "LANG",
        "LOGNAME",
        "LOOPGATE_INSTANCE",
        "LOOPGATE_WORKLOAD",
        "PATH",
        "SHELL",
        "TERM",
        "USER",
    ];
    assert!(
        names.iter().all(|n| allowed.contains(&n.as_str())),
        "unexpected variables: {names:?}"
    );
    assert!(text.contains("USER=nobody\n"), "{names:?}");
    assert!(text.contains("LOOPGATE_WORKLOAD=l-env\n"), "{names:?}");
    assert!(text.contains("LANG=C.UTF-8\n"), "{names:?}");

    // --env NAME passes one more, and only that one.
    let out = exec_with_env(
        &agent,
        &env,
        &[
            "--workload",
            "l-env",
            "--env",
            "LG_TEST_API_TOKEN",
            "--",
            "env",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("LG_TEST_API_TOKEN={secret}\n")),
        "--env did not pass it: {:?}",
        env_names(&text)
    );
    assert!(
        !env_names(&text).contains(&"AWS_SECRET_ACCESS_KEY".to_owned()),
        "{:?}",
        env_names(&text)
    );
    // A value instead of a name is refused (and not echoed back).
    let out = exec_with_env(
        &agent,
        &env,
        &["--workload", "l-env", "--env", "X=1", "--", "true"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("give a variable name"),
        "{}",
        stderr(&out)
    );
}

/// Runs the caller's command (`argv`) as a session leader on a fresh pty, as
/// an interactive login would; types `hello-through-pty` when the output says
/// `TYPE NOW` (after changing the window size); prints everything the
/// terminal showed.
const TERMINAL: &str = r#"
import fcntl, os, pty, select, struct, sys, termios, time
argv = sys.argv[1:]
pid, m = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)
fcntl.ioctl(m, termios.TIOCSWINSZ, struct.pack("HHHH", 37, 101, 0, 0))
out, typed = b"", False
deadline = time.time() + 60
while time.time() < deadline:
    r, _, _ = select.select([m], [], [], 0.2)
    if m in r:
        try:
            d = os.read(m, 4096)
        except OSError:
            break
        if not d:
            break
        out += d
        if not typed and b"TYPE NOW" in out:
            fcntl.ioctl(m, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            time.sleep(0.5)
            os.write(m, b"hello-through-pty\r")
            typed = True
os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
"#;

/// The loop: where it is (session, controlling tty), then it types a command
/// into its terminal with TIOCSTI (through stdin and /dev/tty) and exits.
const INJECT: &str = r#"
import fcntl, os, termios
st = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
print("LOOP sid=%s tty=%s" % (st[3], st[4]), flush=True)
res = []
for name in ("stdin", "devtty"):
    try:
        fd = 0 if name == "stdin" else os.open("/dev/tty", os.O_RDWR)
        for c in b"echo INJECTED-BY-LOOP\n":
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([c]))
        res.append(name + ":ok")
    except OSError as e:
        res.append("%s:errno%d" % (name, e.errno))
print("TIOCSTI", " ".join(res), flush=True)
"#;

/// An interactive loop: reads a line from its terminal and echoes it.
const INTERACTIVE: &str = r#"
import os, signal, sys
sizes = []
signal.signal(signal.SIGWINCH, lambda *a: sizes.append(os.get_terminal_size(0)))
s = os.get_terminal_size(0)
print("SIZE %dx%d" % (s.columns, s.lines), flush=True)
print("TYPE NOW", flush=True)
line = sys.stdin.readline()
print("LOOP got [%s]" % line.strip(), flush=True)
s = os.get_terminal_size(0)
print("SIZE2 %dx%d winch=%d" % (s.columns, s.lines, len(sizes)), flush=True)
"#;

/// `bash -c SCRIPT` on a fresh pty: the caller's interactive root shell.
fn on_a_terminal(agent: &Agent, script: &str) -> String {
    let term = agent.path("terminal.py");
    std::fs::write(&term, TERMINAL).unwrap();
    let out = Command::new("/usr/bin/python3")
        .arg(&term)
        .args(["bash", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("run the terminal harness");
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).replace('\r', "")
}

fn field<'a>(text: &'a str, line_prefix: &str, key: &str) -> &'a str {
    let line = text
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .unwrap_or_else(|| panic!("no `{line_prefix}` line in:\n{text}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in `{line}`"))
}

#[test]
fn exec_from_a_terminal_gives_the_loop_its_own_session_and_pty() {
    let tiocsti = std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti")
        .unwrap_or_else(|_| "absent".into());
    eprintln!("dev.tty.legacy_tiocsti = {}", tiocsti.trim());
    let agent = Agent::start(AgentSpec::new("l-exectty"));
    let inject = agent.path("inject.py");
    std::fs::write(&inject, INJECT).unwrap();
    set_mode(&inject, 0o644);
    let exec = format!(
        "{} --config {} exec --workload l-tty --",
        loopgate_bin().display(),
        agent.config.display()
    );

    // The attack: the loop types a command into its terminal; the caller's
    // shell reads its next line once the loop has exited.
    let text = on_a_terminal(
        &agent,
        &format!(
            "echo \"CALLER sid=$(cut -d' ' -f6 /proc/$$/stat) tty=$(cut -d' ' -f7 /proc/$$/stat)\"; \
             {exec} /usr/bin/python3 {}; \
             IFS= read -t 2 -r line; echo \"CALLER read [$line]\"",
            inject.display()
        ),
    );
    eprintln!("{text}");
    assert!(
        text.contains("CALLER read []"),
        "the loop's keystrokes reached the caller's shell:\n{text}"
    );
    let (caller_sid, caller_tty) = (
        field(&text, "CALLER sid", "sid"),
        field(&text, "CALLER sid", "tty"),
    );
    let (loop_sid, loop_tty) = (
        field(&text, "LOOP sid", "sid"),
        field(&text, "LOOP sid", "tty"),
    );
    assert_ne!(loop_sid, caller_sid, "the loop is in the caller's session");
    assert_ne!(loop_tty, caller_tty, "the loop has the caller's terminal");
    assert_ne!(loop_tty, "0", "the loop has no terminal of its own");

    // Interactive use still works, through the loop's pty: a line typed on
    // the caller's terminal reaches it, window sizes follow, and the caller's
    // terminal settings are back afterwards.
    let interactive = agent.path("interactive.py");
    std::fs::write(&interactive, INTERACTIVE).unwrap();
    set_mode(&interactive, 0o644);
    let text = on_a_terminal(
        &agent,
        &format!(
            "before=$(stty -g); {exec} /usr/bin/python3 {}; echo \"EXIT $?\"; \
             [ \"$before\" = \"$(stty -g)\" ] && echo 'CALLER tty restored'",
            interactive.display()
        ),
    );
    assert!(text.contains("SIZE 101x37"), "{text}");
    assert!(text.contains("LOOP got [hello-through-pty]"), "{text}");
    assert!(text.contains("SIZE2 120x40 winch=1"), "{text}");
    assert!(text.contains("EXIT 0"), "{text}");
    assert!(text.contains("CALLER tty restored"), "{text}");
}

#[test]
fn approval_page_decisions_need_the_pages_origin_and_csrf_token_and_metrics_its_host() {
    let echo = EchoServer::start("127.10.9.3");
    let http = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-l-page-approver-alice-5d1e";
    let token_file = dir.path().join("alice.token");
    std::fs::write(&token_file, token).unwrap();
    let agent = Agent::start(
        AgentSpec::new("l-page")
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
    let port = http.rsplit(':').next().unwrap();
    let mut l = Loop::start_as(&agent, "l-ops", "nobody", echo.addr);
    l.go();
    let id = agent.wait_approval_id();
    let jar = dir.path().join("cookies");
    let jar = jar.to_str().unwrap();
    let (code, _) = curl(&["-c", jar, &format!("{base}/approvals?token={token}")]);
    assert_eq!(code, 303);
    let (code, page) = curl(&["-b", jar, &format!("{base}/approvals")]);
    assert_eq!(code, 200);
    // (Before the fix the page had no token: the attacks below then carry none.)
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_default()
        .to_owned();
    let approve = format!("{base}/approvals/{id}/approve");
    let form = format!("reason=cross-site&csrf={csrf}");

    // Another site's page posting with the approver's cookie (a loop's web
    // server on loopback is same-site, so SameSite does not stop it).
    let (code, _) = curl(&[
        "-b",
        jar,
        "-H",
        "Origin: http://evil.example",
        "-d",
        &form,
        &approve,
    ]);
    assert_eq!(code, 403, "cross-origin decision");
    let (code, _) = curl(&[
        "-b",
        jar,
        "-H",
        "Origin: http://127.0.0.1:8000",
        "-d",
        &form,
        &approve,
    ]);
    assert_eq!(code, 403, "another local origin");
    let (code, _) = curl(&[
        "-b",
        jar,
        "-H",
        "Referer: http://evil.example/x",
        "-d",
        &form,
        &approve,
    ]);
    assert_eq!(code, 403, "cross-origin Referer, no Origin");
    let (code, _) = curl(&["-b", jar, "-d", &form, &approve]);
    assert_eq!(code, 403, "neither Origin nor Referer");
    // From the page's origin, but without (or with a wrong) token.
    let origin = format!("Origin: {base}");
    let (code, _) = curl(&["-b", jar, "-H", &origin, "-d", "reason=no-token", &approve]);
    assert_eq!(code, 403, "no CSRF token");
    let (code, _) = curl(&[
        "-b",
        jar,
        "-H",
        &origin,
        "-d",
        "reason=x&csrf=AAAA",
        &approve,
    ]);
    assert_eq!(code, 403, "wrong CSRF token");
    assert_eq!(agent.approvals().len(), 1, "nothing may have been decided");
    assert_eq!(echo.accepted(), 0);

    // DNS rebinding: a name of the attacker's resolving to 127.0.0.1.
    let (code, body) = curl(&["-H", "Host: evil.example", &format!("{base}/metrics")]);
    assert_eq!(code, 421, "metrics for another Host");
    assert!(!body.contains("loopgate_"), "{body}");
    let (code, _) = curl(&[
        "-H",
        &format!("Host: evil.example:{port}"),
        &format!("{base}/approvals"),
    ]);
    assert_eq!(code, 421, "the page for another Host");
    let (code, body) = curl(&[&format!("{base}/metrics")]);
    assert_eq!(code, 200);
    assert!(body.contains("loopgate_decisions_total"), "{body}");
    let (code, _) = curl(&[
        "-H",
        &format!("Host: localhost:{port}"),
        &format!("{base}/metrics"),
    ]);
    assert_eq!(code, 200, "localhost names the listener too");

    // The page itself decides.
    let (code, _) = curl(&[
        "-b",
        jar,
        "-H",
        &origin,
        "-d",
        &format!("reason=ok&csrf={csrf}"),
        &approve,
    ]);
    assert_eq!(code, 303);
    assert_eq!(l.answer(), "ok");
    let log = agent.log();
    assert!(log.contains("cross-origin decision refused"), "{log}");
    assert!(!log.contains(token), "the token must never be logged");
}

/// A PostgreSQL start-up as a loop writes it: any user name it likes, then
/// the JWT (from `$LG_JWT`, passed with `exec --env`) as the password; then it
/// waits while the agent holds the session.
const PG_STARTUP: &str = r#"
import os, socket, struct, sys
host, port, user = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=30)
params = b"user\0" + user.encode() + b"\0database\0postgres\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
kind = s.recv(1)
(n,) = struct.unpack("!i", s.recv(4))
s.recv(n - 4)
pw = os.environ["LG_JWT"].encode() + b"\0"
s.sendall(b"p" + struct.pack("!i", 4 + len(pw)) + pw)
print("sent", kind.decode(), flush=True)
s.recv(1)
"#;

#[test]
fn loop_text_in_webhooks_cannot_mention_or_link_in_slack() {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let idp = Idp::new(dir.path());
    let pw = dir.path().join("db.pw");
    std::fs::write(&pw, "l-stored-pw-never-used\n").unwrap();
    let (url, bodies) = webhook_receiver("127.10.9.4", "/hooks/l-test", 0);
    let policy = format!(
        r#"
[[workloads]]
name = "signed-bots"
workload = "signed-*"
jwt = {{ issuer = "{ISSUER}", audience = "orders-db", jwks_file = "{}" }}

[[rules]]
id = "signed-bots-approve"
workloads = ["signed-bots"]
targets = ["orders-db"]
action = "approve"
reason = "orders-db needs a human"
"#,
        idp.jwks.display()
    );
    let agent = Agent::start(
        AgentSpec::new("l-hookslack")
            .raw(&format!(
                "\n[[targets]]\nname = \"orders-db\"\naddress = \"127.10.9.5:5432\"\nprotocol = \"postgres\"\n[targets.credential]\nusername = \"app\"\npassword_file = \"{}\"\n\n[approvals]\nwebhooks = [\"{url}\"]\n\n[[approvers]]\nname = \"root-operator\"\nuid = 0\n",
                pw.display()
            ))
            .policy("p.toml", &policy),
    );
    let script = agent.path("pg_startup.py");
    std::fs::write(&script, PG_STARTUP).unwrap();
    set_mode(&script, 0o644);
    let jwt = idp.token("etl@example", "orders-db", 300);
    let evil = "<!channel> <https://evil.example|click here> & co";
    let mut child = agent
        .command()
        .args(["exec", "--workload", "signed-etl", "--env", "LG_JWT", "--"])
        .arg("/usr/bin/python3")
        .arg(&script)
        .args(["127.10.9.5", "5432", evil])
        .env("LG_JWT", &jwt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let id = agent.wait_approval_id();
    let deadline = Instant::now() + Duration::from_secs(15);
    while bodies.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no webhook:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let v: Value = serde_json::from_str(&bodies.lock().unwrap()[0]).unwrap();
    assert_eq!(v["approval_id"], id.as_str());
    let text = v["text"].as_str().unwrap();
    assert!(
        text.contains("as &lt;!channel&gt; &lt;https://evil.example|click here&gt; &amp; co"),
        "{text}"
    );
    assert!(
        !text.contains("<!channel>") && !text.contains("<https://"),
        "{text}"
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(!agent.log().contains(&jwt), "the JWT must never be logged");
}
