//! The in-process tier: the proxy, the session seam and the real handlers
//! on loopback sockets, with the kernel behind a fake [`Flows`], a cgroup
//! tree in a temporary directory and an in-memory audit sink. No root, no
//! eBPF: what is decided, what the loop gets, and what is recorded.

use std::{
    io::{Read, Write},
    net::{TcpListener as StdListener, TcpStream as StdStream},
    os::unix::fs::MetadataExt,
    sync::Mutex,
    time::Instant,
};

use loopgate_common::{ConnRecord, ExeKey, FlowKey, ANCESTOR_LEVELS};

use super::*;
use crate::{
    approval::Approvals,
    audit::{AuditSink, EventRow, SinkStats},
    config::TargetConfig,
    kinds::Protocol,
    metrics::Metrics,
    policy::store::PolicyStore,
    protocol::{ProtocolHandler, Settings},
    secrets::{Secret, SecretMasker, StoredCredential},
    sockdiag::DiagError,
};

/// The kernel's answers, as a test wants them.
struct FakeFlows {
    /// The record every accepted connection has (`None`: no record).
    record: Option<ConnRecord>,
    /// What the sock_diag peer check says.
    peer_ok: bool,
    /// Whether the listener at the destination is the loop's own (its
    /// cgroup is the loop's), else nobody's we know.
    listener_is_the_loops: bool,
    /// Filled in by the harness: the loop's cgroup id.
    loop_cgroup: u64,
}

impl Flows for FakeFlows {
    fn take_flow(&self, _: SocketAddr, _: SocketAddr, _: u64) -> Option<ConnRecord> {
        self.record.map(|mut r| {
            r.ktime_ns = crate::ebpf::ktime_now();
            r
        })
    }
    fn exe_path(&self, _: &ExeKey) -> Option<String> {
        None
    }
    fn peer_is(&self, _: SocketAddr, _: SocketAddr, _: u64) -> Result<bool, DiagError> {
        Ok(self.peer_ok)
    }
    fn listener_cgroup(&self, _: SocketAddr) -> Result<Option<u64>, DiagError> {
        Ok(self.listener_is_the_loops.then_some(self.loop_cgroup))
    }
}

/// The audit, in memory.
#[derive(Default)]
struct Memory(Mutex<Vec<Record>>);

impl AuditSink for Memory {
    fn record(&self, rec: Record) {
        self.0.lock().unwrap().push(rec);
    }
    fn stats(&self) -> SinkStats {
        SinkStats::default()
    }
}

impl Memory {
    fn events(&self) -> Vec<EventRow> {
        let g = self.0.lock().unwrap();
        g.iter()
            .filter_map(|r| match r {
                Record::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    /// The closing rows (version 2).
    fn closed(&self) -> Vec<SessionRow> {
        let g = self.0.lock().unwrap();
        g.iter()
            .filter_map(|r| match r {
                Record::Session(s) if s.version == 2 => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// Waits for `n` closing rows.
    fn wait_closed(&self, n: usize) -> Vec<SessionRow> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = self.closed();
            if c.len() >= n {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} sessions closed",
                c.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

struct Harness {
    proxy: Arc<Proxy>,
    /// The proxy's listener: loops "redirected" here.
    addr: SocketAddr,
    audit: Arc<Memory>,
    approvals: Arc<Approvals>,
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

const STORED_TOKEN: &str = "stored-token-7c1e";

/// A proxy with one target (`api`, `protocol`, at `upstream`), a loop in
/// workload `etl`, and `policy` as its only policy file.
fn harness(policy: &str, protocol: Protocol, upstream: SocketAddr, flows: FakeFlows) -> Harness {
    harness_with(policy, protocol, upstream, flows, |_| {})
}

fn harness_with(
    policy: &str,
    protocol: Protocol,
    upstream: SocketAddr,
    mut flows: FakeFlows,
    extra: impl FnOnce(&mut Registry),
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    // A cgroup tree: the loop runs in loopgate/etl/i-1.
    let instance = dir.path().join("cg/loopgate/etl/i-1");
    std::fs::create_dir_all(&instance).unwrap();
    let cgroup_id = std::fs::metadata(&instance).unwrap().ino();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("p.toml"), policy).unwrap();
    flows.loop_cgroup = cgroup_id;
    if let Some(r) = flows.record.as_mut() {
        r.cgroup_id = cgroup_id;
        if r.orig_port == 0 {
            r.orig_addr = crate::ebpf::to_words(upstream.ip());
            r.orig_port = upstream.port();
        }
    }
    let audit = Arc::new(Memory::default());
    let metrics = Arc::new(Metrics::new());
    let approvals = Arc::new(Approvals::new(
        HashMap::from([(0, "root-operator".to_owned())]),
        audit.clone(),
        "test-host".into(),
        metrics.clone(),
    ));
    let store =
        Arc::new(PolicyStore::open(&policies, ["api".to_owned()].into_iter().collect()).unwrap());
    let targets = Arc::new(TargetTable::new(&[TargetConfig {
        name: "api".into(),
        address: upstream.to_string(),
        protocol,
        credential: None,
        auth_methods: None,
        pool_size: None,
        pool_idle_timeout_secs: None,
        max_message_bytes: None,
        max_result_message_bytes: None,
    }]));
    targets.resolve();
    let stored = Secret::for_tests(STORED_TOKEN);
    let credential = StoredCredential {
        authorization: Some(Secret::for_tests(&format!("Bearer {STORED_TOKEN}"))),
        ..Default::default()
    };
    let services = Arc::new(Services {
        policy: store,
        approvals: approvals.clone(),
        metrics,
        audit: audit.clone(),
        masker: Arc::new(SecretMasker::new(&[stored])),
        abort: CancellationToken::new(),
        connect_timeout: Duration::from_secs(2),
    });
    let mut handlers = Registry::new(Settings {
        dns: None,
        tcp_idle_timeout: Duration::from_secs(60),
        ca: None,
        ssh_ca: None,
    });
    extra(&mut handlers);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let flows: Arc<dyn Flows> = Arc::new(flows);
    let proxy = Arc::new(Proxy {
        services,
        flows,
        workloads: Arc::new(WorkloadResolver::new(
            dir.path().join("cg"),
            "loopgate",
            Vec::new(),
        )),
        targets,
        handlers,
        capture_bytes: 0,
        capture_budget: crate::limits::CaptureBudget::new(0, Duration::from_secs(3600)),
        limits: crate::limits::SessionLimits::new(64, 16),
        audit_refuse: true,
        credentials: HashMap::from([("api".to_owned(), Arc::new(credential))]),
        host: "test-host".into(),
        sessions: SessionTable::default(),
        netns_cookie: 1,
        unidentified: Default::default(),
        stop_accepting: CancellationToken::new(),
        tracker: TaskTracker::new(),
    });
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(proxy.clone().serve(listener));
    Harness {
        proxy,
        addr,
        audit,
        approvals,
        _dir: dir,
        _rt: rt,
    }
}

/// A redirect record of a loop (uid 1000) towards target 1.
fn record() -> ConnRecord {
    ConnRecord {
        orig_addr: [0; 4],
        orig_port: 0,
        family: 2,
        target_id: 1,
        via_v4: 1,
        pid: 4242,
        tgid: 4242,
        uid: 1000,
        gid: 1000,
        reason: 0,
        sock_type: 1,
        protocol: 6,
        cgroup_id: 0,
        ancestors: [0; ANCESTOR_LEVELS],
        netns_cookie: 1,
        socket_cookie: 99,
        ktime_ns: 0,
        comm: *b"python3\0\0\0\0\0\0\0\0\0",
        flow: FlowKey::EMPTY,
        exe: ExeKey {
            tgid: 4242,
            _pad: 0,
            seq: 0,
        },
    }
}

fn known_loop() -> FakeFlows {
    FakeFlows {
        record: Some(record()),
        peer_ok: true,
        listener_is_the_loops: false,
        loop_cgroup: 0,
    }
}

/// An upstream that echoes what it reads until EOF.
fn echo_server() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn connect(h: &Harness) -> StdStream {
    let s = StdStream::connect(h.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads until EOF or an error (a reset).
fn read_all(s: &mut StdStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, false),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, true),
        }
    }
}

const ALLOW_ALL: &str = "[defaults]\naction = \"allow\"\n";

#[test]
fn a_connection_without_a_kernel_record_is_refused_and_recorded() {
    for (flows, rule) in [
        (
            FakeFlows {
                record: None,
                ..known_loop()
            },
            "identity:no-record",
        ),
        // A record that belongs to another socket than the peer.
        (
            FakeFlows {
                peer_ok: false,
                ..known_loop()
            },
            "identity:peer",
        ),
    ] {
        let h = harness(ALLOW_ALL, Protocol::Tcp, echo_server(), flows);
        let mut c = connect(&h);
        let _ = c.write_all(b"hello");
        let (got, _) = read_all(&mut c);
        assert!(got.is_empty(), "an unidentified loop gets nothing");
        let closed = h.audit.wait_closed(1);
        assert_eq!(
            (closed[0].workload.as_str(), closed[0].outcome.as_str()),
            ("(unidentified)", "denied")
        );
        let e = h.audit.events();
        assert_eq!(
            (e[0].kind.as_str(), e[0].rule_id.as_str()),
            ("connect", rule)
        );
    }
}

#[test]
fn an_allowed_session_is_relayed_and_closed_with_its_counts() {
    let h = harness(ALLOW_ALL, Protocol::Tcp, echo_server(), known_loop());
    let mut c = connect(&h);
    c.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    assert_eq!(h.proxy.sessions.len(), 1, "listed while open");
    drop(c);
    let closed = h.audit.wait_closed(1);
    let s = &closed[0];
    assert_eq!(
        (s.workload.as_str(), s.cgroup.as_str(), s.outcome.as_str()),
        ("etl", "loopgate/etl/i-1", "ok")
    );
    assert_eq!(
        (s.bytes_up, s.bytes_down, s.uid, s.comm.as_str()),
        (4, 4, 1000, "python3")
    );
    let e = h.audit.events();
    assert_eq!(
        (e[0].kind.as_str(), e[0].verdict.as_str()),
        ("connect", "allow")
    );
    assert_eq!(h.proxy.sessions.len(), 0, "gone when closed");
}

#[test]
fn a_denied_session_is_reset_and_its_reason_recorded() {
    let policy = "[[rules]]\nid = \"etl-out\"\nworkloads = [\"*\"]\ntargets = [\"api\"]\nwhen = \"workload == 'etl' && uid == 1000\"\naction = \"deny\"\nreason = \"etl stays out\"\n";
    let h = harness(policy, Protocol::Tcp, echo_server(), known_loop());
    let mut c = connect(&h);
    let (got, _) = read_all(&mut c);
    assert!(got.is_empty());
    let closed = h.audit.wait_closed(1);
    assert_eq!(
        (closed[0].outcome.as_str(), closed[0].detail.as_str()),
        ("denied", "etl stays out")
    );
    let e = h.audit.events();
    assert_eq!(
        (e[0].verdict.as_str(), e[0].rule_id.as_str()),
        ("deny", "etl-out")
    );
}

#[test]
fn a_held_session_ends_when_the_loop_hangs_up_and_goes_through_when_approved() {
    let policy = "[[rules]]\nid = \"hold\"\ntargets = [\"api\"]\naction = \"approve\"\nreason = \"needs a human\"\n";
    let h = harness(policy, Protocol::Tcp, echo_server(), known_loop());
    let pending = |h: &Harness| h.approvals.list();
    let wait_pending = |h: &Harness, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pending(h).len() != n {
            assert!(
                Instant::now() < deadline,
                "{} held, want {n}",
                pending(h).len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The loop gives up while held: no grant, the hold is withdrawn.
    let c = connect(&h);
    wait_pending(&h, 1);
    drop(c);
    let closed = h.audit.wait_closed(1);
    assert_eq!(
        (closed[0].outcome.as_str(), closed[0].detail.as_str()),
        ("denied", "the loop hung up while its request was held")
    );
    wait_pending(&h, 0);
    // Approved: the session opens and relays.
    let mut c = connect(&h);
    wait_pending(&h, 1);
    let id = pending(&h)[0].approval_id;
    h.approvals
        .decide(id, 0, true, "ok for today".into())
        .unwrap();
    c.write_all(b"after").unwrap();
    let mut got = [0u8; 5];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"after");
    let kinds: Vec<(String, String)> = h
        .audit
        .events()
        .into_iter()
        .map(|e| (e.kind, e.verdict))
        .collect();
    assert!(
        kinds.contains(&("approval".into(), "allow".into())),
        "{kinds:?}"
    );
}

/// An HTTP upstream that answers every request with the `Authorization`
/// header it got (echoing the stored credential back), and notes it.
fn http_upstream(seen: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk) else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let auth = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .starts_with("authorization:")
                                    .then(|| l[14..].trim().to_owned())
                            })
                            .unwrap_or_default();
                        seen.lock()
                            .unwrap()
                            .push(head.lines().next().unwrap_or("").to_owned() + " " + &auth);
                        let body = format!("you sent {auth}");
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn http_requests_are_decided_one_by_one_and_refusals_rendered_as_json() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let upstream = http_upstream(seen.clone());
    let policy = r#"
[[rules]]
id = "no-admin-deletes"
targets = ["api"]
methods = ["DELETE"]
paths = ["/admin/**"]
action = "deny"
reason = "admin data stays"

[[rules]]
id = "prod-writes"
targets = ["api"]
when = "http.method == 'POST' && http.headers['x-env'] == 'prod'"
action = "deny"
reason = "no writes to prod"
"#;
    let h = harness(policy, Protocol::Http, upstream, known_loop());
    let mut c = connect(&h);
    let host = upstream.to_string();
    let mut ask = |req: String| -> String {
        c.write_all(req.as_bytes()).unwrap();
        // Responses here are small: one read of the head and body.
        let mut buf = vec![0u8; 8192];
        let mut got = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(got.contains("\r\n\r\n")
            && got.split("\r\n\r\n").nth(1).is_some_and(|b| !b.is_empty()))
        {
            assert!(Instant::now() < deadline, "{got}");
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        got
    };
    let r = ask(format!(
        "DELETE /admin/users/1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer loops-own\r\n\r\n"
    ));
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(
        r.contains("\"rule\":\"no-admin-deletes\"") && r.contains("admin data stays"),
        "{r}"
    );
    let r = ask(format!(
        "POST /orders HTTP/1.1\r\nHost: {host}\r\nx-env: prod\r\ncontent-length: 0\r\n\r\n"
    ));
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("prod-writes"),
        "{r}"
    );
    // Allowed: the upstream gets the stored credential (never the loop's),
    // and the loop gets the echo of it masked.
    let r = ask(format!(
        "GET /orders HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer loops-own\r\n\r\n"
    ));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        !r.contains(STORED_TOKEN) && r.contains("you sent Bearer *"),
        "{r}"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![format!("GET /orders HTTP/1.1 Bearer {STORED_TOKEN}")],
        "only the allowed request reached the upstream"
    );
    drop(c);
    let closed = h.audit.wait_closed(1);
    assert_eq!(closed[0].outcome, "ok");
    let decisions: Vec<(String, String, String)> = h
        .audit
        .events()
        .into_iter()
        .map(|e| (e.kind, e.verdict, e.rule_id))
        .collect();
    assert_eq!(
        decisions,
        [
            ("connect", "allow", "default"),
            ("request", "deny", "no-admin-deletes"),
            ("request", "deny", "prod-writes"),
            ("request", "allow", "session"),
            ("response", "allow", "session"),
        ]
        .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()))
    );
}

#[test]
fn the_credential_is_not_sent_to_a_listener_a_tagged_loop_owns() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let upstream = http_upstream(seen.clone());
    let flows = FakeFlows {
        listener_is_the_loops: true,
        ..known_loop()
    };
    let h = harness(ALLOW_ALL, Protocol::Http, upstream, flows);
    let mut c = connect(&h);
    let _ = c.write_all(format!("GET / HTTP/1.1\r\nHost: {upstream}\r\n\r\n").as_bytes());
    let (got, _) = read_all(&mut c);
    assert!(got.is_empty());
    let closed = h.audit.wait_closed(1);
    assert_eq!(closed[0].outcome, "denied");
    assert_eq!(h.audit.events()[0].rule_id, "listener:tagged");
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the listener"
    );
}

/// A handler that panics: the guard still closes the session.
struct Panics;

#[async_trait::async_trait]
impl ProtocolHandler for Panics {
    fn protocol(&self) -> Protocol {
        Protocol::Ssh
    }
    async fn serve(&self, _: Arc<Session>, _: TcpStream) -> Outcome {
        panic!("a handler bug");
    }
}

#[test]
fn a_handler_that_panics_still_closes_its_session() {
    let h = harness_with(ALLOW_ALL, Protocol::Ssh, echo_server(), known_loop(), |r| {
        r.add(Arc::new(Panics))
    });
    for n in 1..=2 {
        let mut c = connect(&h);
        let _ = read_all(&mut c);
        // The accept loop survives: the second session is served (and
        // closed) as well.
        let closed = h.audit.wait_closed(n);
        assert_eq!(closed[n - 1].outcome, "agent_error");
        assert_eq!(h.proxy.sessions.len(), 0);
    }
}

#[test]
fn a_record_whose_destination_is_not_its_targets_is_refused() {
    // The record names target 1 (`api`) but points elsewhere: a map entry
    // recycled while it was read. The credential must not go there.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let elsewhere = http_upstream(seen.clone());
    let mut rec = record();
    rec.orig_addr = crate::ebpf::to_words(elsewhere.ip());
    rec.orig_port = elsewhere.port();
    let flows = FakeFlows {
        record: Some(rec),
        ..known_loop()
    };
    let h = harness(ALLOW_ALL, Protocol::Http, echo_server(), flows);
    let mut c = connect(&h);
    let _ = c.write_all(format!("GET / HTTP/1.1\r\nHost: {elsewhere}\r\n\r\n").as_bytes());
    let (got, _) = read_all(&mut c);
    assert!(got.is_empty());
    let closed = h.audit.wait_closed(1);
    assert_eq!(closed[0].outcome, "denied");
    assert_eq!(h.audit.events()[0].rule_id, "identity:target");
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the other address"
    );
}
