//! Fuzz-target drivers (not an API). Each takes the fuzzer's bytes, runs the
//! agent's own parsing code on them, and panics when a property does not
//! hold; the targets in `fuzz/fuzz_targets/` are one-line calls to these
//! (`cargo xtask fuzz NAME`), and the tests below replay the committed
//! corpora (`fuzz/corpus/NAME/`) on stable.
//!
//! | target | input | code under test |
//! |---|---|---|
//! | `pg_startup` | the loop's first bytes to a PostgreSQL target | `protocol::postgres`: `read_startup`, `parse_params`, `read_password` |
//! | `http_path` | the loop's bytes to an HTTP target (hyper parses them, as in the proxy) | `protocol::http`: `normalize_path`, the `Host`/authority check, `bearer`, `strip_hop_by_hop` |
//! | `policy` | policy files (NUL-separated) | `policy::compile`, then `Policy::evaluate` |
//! | `config` | `agent.toml` | `Config::parse` |
//! | `dns_query` | a loop's DNS message to the agent's resolver | `dns::parse_query`, `dns::refused`, `dns::Policy::judge` |
//! | `pg_messages` | the byte streams of a session after the login, both ways | `protocol::postgres::messages` (`next_frame`, `decode`: every frame decodes or is refused, none is lost) and the relay's server half (what it sends the loop is the server's frames unchanged, plus its own answers) |
//! | `pg_sql` | a loop's query string | `protocol::postgres::sql::classify` (each statement's text is a piece of the input, in order; tables are schema-qualified; classifying twice gives the same) |

use std::{
    collections::HashSet,
    convert::Infallible,
    future::Future,
    path::Path,
    pin::{pin, Pin},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, service::service_fn, HeaderMap, Response, Uri};
use hyper_util::rt::TokioIo;

use crate::{
    config::{Config, TargetAddress},
    kinds::Protocol,
    policy::{self, HttpOp, Operation, Request, Verdict},
    protocol::{http::fuzz as http, postgres::fuzz as pg},
};

/// Polls a future whose I/O is an in-memory slice until it completes.
/// `None`: it waited on something else (a bug in the driver, not a finding).
fn block_on<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    // hyper yields every few requests; nothing here waits on a real event.
    for _ in 0..100_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
    }
    None
}

/// The loop's start-up on a PostgreSQL target, as `postgres::Session::start`
/// reads it: packets until a protocol 3.0 start-up (SSL/GSSENC requests are
/// declined and read again), its parameters, then a password message.
pub fn pg_startup(data: &[u8]) {
    let mut wire = data;
    let params = loop {
        let before = wire.len();
        let Some(read) = block_on(pg::read_startup(&mut wire)) else {
            panic!("a read from a slice did not complete");
        };
        let Ok(body) = read else { return };
        // `start` reads the request code from body[0..4] and, for a cancel,
        // checks the length before it reads the pid.
        assert!(body.len() >= 4, "a {}-byte start-up body", body.len());
        assert!(body.len() + 4 <= pg::MAX_STARTUP);
        assert_eq!(before - wire.len(), body.len() + 4, "not one packet read");
        match code(&body) {
            pg::SSL_REQUEST | pg::GSSENC_REQUEST => continue,
            pg::PROTOCOL_3 => match pg::parse_params(&body[4..]) {
                Ok(p) => break p,
                Err((sqlstate, _)) => {
                    assert_eq!(sqlstate, Some("08P01"));
                    return;
                }
            },
            // A cancel request (its length is checked before use) or
            // another protocol version ends the start-up.
            _ => return,
        }
    };
    // What is sent upstream (with `user` replaced) is the same map: the
    // parameters encode again and parse back unchanged.
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &mut buf,
    )
    .expect("parsed parameters hold no NUL");
    let mut again = &buf[..];
    let body = block_on(pg::read_startup(&mut again))
        .expect("completes")
        .expect("a re-encoded start-up reads back");
    assert!(again.is_empty());
    assert_eq!(code(&body), pg::PROTOCOL_3);
    assert_eq!(pg::parse_params(&body[4..]).ok().as_ref(), Some(&params));
    for (k, v) in &params {
        assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
    }

    // The JWT second factor: a PasswordMessage follows.
    if !wire.is_empty() {
        let Some(read) = block_on(pg::read_password(&mut wire)) else {
            panic!("a read from a slice did not complete");
        };
        if let Ok(password) = read {
            assert!(password.len() < pg::MAX_STARTUP);
        }
    }
}

fn code(body: &[u8]) -> i32 {
    i32::from_be_bytes([body[0], body[1], body[2], body[3]])
}

/// Four targets with distinct host names: a request names at most one.
fn http_targets() -> [TargetAddress; 4] {
    [
        TargetAddress::Host {
            host: "orders.internal".into(),
            port: 8080,
        },
        TargetAddress::Host {
            host: "billing.internal".into(),
            port: 8080,
        },
        TargetAddress::Ip("127.10.4.1:80".parse().expect("literal")),
        TargetAddress::Ip("[::1]:8080".parse().expect("literal")),
    ]
}

/// The loop's bytes on an HTTP target: hyper parses the request heads (as the
/// proxy's server connection does), and each request goes through the checks
/// the handler makes before it forwards anything. Returns how many requests
/// were checked.
pub fn http_head(data: &[u8]) -> usize {
    let targets = http_targets();
    let checked = std::cell::Cell::new(0);
    let svc = service_fn(|req: hyper::Request<Incoming>| {
        check_request(&req, &targets);
        checked.set(checked.get() + 1);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(Wire(data)), svc);
    // Malformed HTTP is hyper's error, not a finding.
    let _ = block_on(conn).expect("hyper finished on an in-memory connection");
    checked.get()
}

fn check_request<B>(req: &hyper::Request<B>, targets: &[TargetAddress]) {
    // The path rules see and the upstream gets.
    let raw = req.uri().path();
    if let Ok(path) = http::normalize_path(raw) {
        assert_normal_path(raw, &path);
        // The handler rebuilds the request target from it.
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        if path != "*" {
            let target = format!("{path}{query}");
            let parsed: Uri = target
                .parse()
                .unwrap_or_else(|e| panic!("{raw:?} → {target:?} is not a URI: {e}"));
            assert_eq!(parsed.path(), path);
        }
    }

    // The stored credential goes to one target's host at most.
    let named: Vec<&TargetAddress> = targets
        .iter()
        .filter(|a| http::names_target(req, a).is_ok())
        .collect();
    assert!(
        named.len() <= 1,
        "Host {:?} (authority {:?}) names {named:?}",
        req.headers()
            .get_all(header::HOST)
            .iter()
            .collect::<Vec<_>>(),
        req.uri().authority()
    );
    if let [a] = named.as_slice() {
        let hosts: Vec<_> = req.headers().get_all(header::HOST).iter().collect();
        assert_eq!(hosts.len(), 1);
        let host = hosts[0].to_str().expect("checked as text");
        assert!(http::host_matches(host, a));
    }

    check_headers(req.headers());
}

/// `normalize_path`'s output: one spelling, stable, nothing a server could
/// read as another path.
fn assert_normal_path(raw: &str, path: &str) {
    if raw == "*" {
        assert_eq!(path, "*");
        return;
    }
    assert!(path.starts_with('/'), "{raw:?} → {path:?}");
    for bad in ["//", "/./", "/../", "\\", ";", "\0"] {
        assert!(!path.contains(bad), "{raw:?} → {path:?} holds {bad:?}");
    }
    assert!(
        !path.ends_with("/.") && !path.ends_with("/.."),
        "{raw:?} → {path:?}"
    );
    // Escapes left are upper-case and of bytes a path cannot hold literally.
    let b = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let hex = path.get(i + 1..i + 3).unwrap_or("");
        assert!(
            hex.len() == 2 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F')),
            "{raw:?} → {path:?}: escape {:?}",
            &b[i..b.len().min(i + 3)]
        );
        let v = u8::from_str_radix(hex, 16).expect("hex");
        assert!(
            !(v.is_ascii_alphanumeric() || b"-_~!$&'()*+,=:@/\\.;\0".contains(&v)),
            "{raw:?} → {path:?} keeps %{hex}"
        );
    }
    // Every escape the loop sent was two hex digits.
    for (i, _) in raw.match_indices('%') {
        let hex = raw.get(i + 1..i + 3).unwrap_or("");
        assert!(
            hex.len() == 2 && hex.bytes().all(|c| c.is_ascii_hexdigit()),
            "{raw:?} was accepted with escape %{hex}"
        );
    }
    // Idempotent.
    assert_eq!(
        http::normalize_path(path).as_deref(),
        Ok(path),
        "{raw:?} → {path:?} is not stable"
    );
}

fn check_headers(h: &HeaderMap) {
    if let Some(token) = http::bearer(h) {
        assert!(!token.is_empty() && token.trim() == token, "{token:?}");
        let v = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .expect("a bearer token comes from Authorization");
        assert!(v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "));
    }
    // Nothing hop-by-hop (or named by Connection) is forwarded; everything
    // else is, unchanged.
    let mut stripped = h.clone();
    http::strip_hop_by_hop(&mut stripped);
    let named: HashSet<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    for name in h.keys() {
        if http::HOP_BY_HOP.contains(&name.as_str()) || named.contains(name.as_str()) {
            assert!(!stripped.contains_key(name), "{name} forwarded");
        } else {
            assert!(
                stripped.get_all(name).iter().eq(h.get_all(name).iter()),
                "{name} changed"
            );
        }
    }
}

/// A connection whose reads are `data` then EOF, and whose writes go nowhere.
struct Wire<'a>(&'a [u8]);

impl tokio::io::AsyncRead for Wire<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.0.len().min(buf.remaining());
        buf.put_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Wire<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Target names of the agent config the `policy` driver compiles against.
const POLICY_TARGETS: &[&str] = &["orders-db", "api", "billing"];

/// Policy files, separated by NUL bytes (up to four): compiled as a set
/// against a config's target names and without one, then evaluated.
pub fn policy(data: &[u8]) {
    // libFuzzer's panic hook aborts on every panic, including the CEL
    // parser's, which compile() catches and turns into a policy error (the
    // property under test is that no panic escapes). Only those are let
    // through to their catch_unwind.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !crate::policy::cel::in_guarded_call() {
                abort(info);
            }
        }));
    });
    let Ok(text) = std::str::from_utf8(data) else {
        return; // load_dir reads files as UTF-8
    };
    let texts: Vec<&str> = text.splitn(4, '\0').collect();
    if !texts.iter().all(|t| reads_no_special_file(t)) {
        return;
    }
    let names: Vec<String> = (0..texts.len()).map(|i| format!("{i}.toml")).collect();
    let sources: Vec<(&Path, &str)> = names
        .iter()
        .zip(&texts)
        .map(|(n, t)| (Path::new(n.as_str()), *t))
        .collect();
    let known: HashSet<String> = POLICY_TARGETS.iter().map(|t| t.to_string()).collect();
    let checked = policy::model::compile(&sources, Some(&known));
    let unchecked = policy::model::compile(&sources, None);
    match &checked {
        // Naming the config's targets only adds errors.
        Ok(p) => {
            assert!(unchecked.is_ok(), "{:?}", unchecked.err());
            evaluate(p);
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                let n = sources
                    .iter()
                    .find(|(f, _)| *f == e.file)
                    .unwrap_or_else(|| panic!("error names another file: {e}"));
                // A line and column inside the file (0: the whole file).
                let lines = n.1.split('\n').count();
                assert!(e.line <= lines && (e.line == 0) == (e.column == 0), "{e}");
                let _ = e.to_string();
            }
        }
    }
    if let Ok(p) = &unchecked {
        evaluate(p);
    }
}

/// Policy files may name a JWKS or CA file, which compiling reads: only
/// regular files (not `/dev/zero` or a FIFO) are left to it.
fn reads_no_special_file(text: &str) -> bool {
    fn walk(v: &toml::Value) -> bool {
        match v {
            toml::Value::Table(t) => t.iter().all(|(k, v)| match (k.as_str(), v) {
                ("jwks_file" | "ca_file", toml::Value::String(f)) => {
                    std::fs::metadata(f).map_or(true, |m| m.is_file() && m.len() < 1 << 20)
                }
                _ => walk(v),
            }),
            toml::Value::Array(a) => a.iter().all(walk),
            _ => true,
        }
    }
    // Text TOML cannot parse never gets to a file name.
    text.parse::<toml::Table>()
        .map_or(true, |t| walk(&toml::Value::Table(t)))
}

fn evaluate(p: &policy::Policy) {
    let claims = crate::identity::Claims::for_tests(
        "alice",
        serde_json::json!({"sub": "alice", "iss": "https://idp", "groups": ["ops"]}),
    );
    let mut headers = hyper::HeaderMap::new();
    headers.insert("x-env", hyper::header::HeaderValue::from_static("prod"));
    let tables = ["pii.users".to_owned(), "public.orders".to_owned()];
    let functions = ["pg_read_file".to_owned()];
    let requests = [
        Request {
            workload: "etl",
            cgroup: "loopgate/etl/1",
            uid: 1000,
            target: "orders-db",
            protocol: Protocol::Postgres,
            jwt: Some(&claims),
            op: Operation::Sql(policy::SqlOp {
                kind: "delete",
                tables: &tables,
                writes: &tables[1..],
                unbounded: true,
                functions: &functions,
                program: false,
                server_file: false,
                settings: &[],
                text: "delete from orders",
                params: &[],
            }),
            ..Default::default()
        },
        Request {
            workload: "etl",
            cgroup: "loopgate/etl/1",
            uid: 1000,
            exe: Some("/usr/bin/psql"),
            target: "orders-db",
            protocol: Protocol::Postgres,
            ..Default::default()
        },
        Request {
            workload: "root",
            cgroup: "loopgate/root/1",
            uid: 0,
            target: "api",
            protocol: Protocol::Http,
            ..Default::default()
        },
        Request {
            workload: "agent",
            cgroup: "loopgate/agent/7",
            uid: 1001,
            exe: Some("/usr/bin/curl"),
            target: "api",
            protocol: Protocol::Http,
            jwt: Some(&claims),
            op: Operation::Http(HttpOp {
                method: "DELETE",
                path: "/admin/users/1",
                host: Some("api.internal"),
                headers: Some(&headers),
            }),
        },
        Request {
            workload: "nightly-1",
            cgroup: "system.slice/etl.service",
            uid: 1000,
            target: "elsewhere",
            protocol: Protocol::Tcp,
            ..Default::default()
        },
    ];
    for r in &requests {
        let matched = p.workload_matches(r);
        let d = p.evaluate(r, Some(&matched));
        assert_eq!(d, p.evaluate(r, None));
        assert!(!d.rule_id.is_empty());
        assert_eq!(d.verdict == Verdict::Approve, d.approval.is_some(), "{d:?}");
        assert_eq!(d.verdict == Verdict::Mask, !d.mask.is_empty(), "{d:?}");
        let _ = p.request_rule(r);
        let _ = p.jwt_required(r);
        assert_eq!(p.workload_names(&matched).len(), {
            matched.iter().filter(|m| **m).count()
        });
    }
}

/// An `agent.toml`.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // Config::load reads the file as UTF-8
    };
    match Config::parse(text, Path::new("agent.toml")) {
        Ok(cfg) => {
            let _ = format!("{cfg:?}");
            let mut names = HashSet::new();
            for t in &cfg.targets {
                assert!(crate::config::validate_name(&t.name).is_ok());
                assert!(names.insert(t.name.as_str()), "duplicate {}", t.name);
                // An address prints as it parses.
                let a = TargetAddress::parse(&t.address)
                    .unwrap_or_else(|e| panic!("{}: accepted, then {e}", t.address));
                assert_eq!(TargetAddress::parse(&a.to_string()).as_ref(), Ok(&a));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("config agent.toml"), "{msg}");
        }
    }
}

/// A loop's DNS message: parsing never panics; whatever the resolver sends
/// back (REFUSED for a question, FORMERR for another count) parses as a
/// response to the same id carrying the question; the name judgement is
/// case- and trailing-dot-insensitive.
pub fn dns_query(data: &[u8]) {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    let id = (data.len() >= 2).then(|| u16::from_be_bytes([data[0], data[1]]));
    let check = |reply: &[u8], code: ResponseCode| {
        let m = Message::from_vec(reply).expect("the resolver's own reply parses");
        assert_eq!(m.message_type(), MessageType::Response);
        assert_eq!(Some(m.id()), id);
        assert_eq!(m.response_code(), code);
        m
    };
    match crate::dns::parse_query(data) {
        Err(_) => {}
        Ok(crate::dns::Parsed::NotOne(reply)) => {
            check(&reply, ResponseCode::FormErr);
        }
        Ok(crate::dns::Parsed::Question { msg, name, qtype }) => {
            let m = check(&crate::dns::refused(&msg), ResponseCode::Refused);
            assert_eq!(m.queries().len(), 1);
            assert_eq!(m.queries()[0].name().to_ascii(), name);
            assert_eq!(m.queries()[0].query_type().to_string(), qtype);
            let p = crate::dns::Policy::new(
                false,
                vec!["db.internal".into()],
                &["*.corp.example".into()],
            )
            .expect("static policy");
            let upper = name.to_ascii_uppercase();
            let dotted = format!("{}.", name.trim_end_matches('.'));
            assert_eq!(p.judge(&name), p.judge(&upper), "{name}");
            assert_eq!(p.judge(&name), p.judge(&dotted), "{name}");
        }
    }
}

/// A session's bytes after the login: the first byte says how many
/// entries of the next bytes make the relay's queue of expected answers;
/// the rest is read both as the loop's messages and as the server's.
pub fn pg_messages(data: &[u8]) {
    use crate::protocol::postgres::messages::{
        decode, next_frame, parameter_description, read_param, Front, MAX_LOOP_MESSAGE,
    };
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (expects, stream) = rest.split_at(n);
    // The loop's side: frames split where their lengths say, each decoded
    // or refused (never a panic); the frames cover the bytes read.
    let mut buf = bytes::BytesMut::from(stream);
    let mut taken = 0;
    while let Ok(Some(f)) = next_frame(&mut buf, MAX_LOOP_MESSAGE) {
        taken += f.len();
        // Bound parameters read under every type the agent decodes (and an
        // unknown one): a stand-in, never a panic.
        if let Ok(Front::Bind { params, .. }) = decode(&f) {
            for p in &params {
                for oid in [0, 16, 19, 20, 21, 23, 25, 26, 700, 701, 2950, 3802] {
                    let (text, readable) = read_param(p, oid);
                    assert!(readable || text.is_some(), "a stand-in names the length");
                }
            }
        }
        // The same bytes as the server's ParameterDescription.
        let _ = parameter_description(&f);
    }
    assert_eq!(taken + buf.len(), stream.len(), "bytes lost between frames");
    // The server's side: relayed unchanged up to where the agent would end
    // the session (rows nobody asked for); it adds only its own answers,
    // and swallows only its own catalogue lookups and the errors it
    // replaces with its refusals.
    let (out, framed, _) = crate::protocol::postgres::fuzz::replay_server(expects, stream);
    // Masks change rows and values by design.
    let own = expects.iter().any(|b| b % 11 >= 8 || b & 0x40 != 0);
    if !own {
        assert_eq!(
            &out[..],
            &stream[..framed],
            "server bytes changed on the way"
        );
    }
    // Whatever was masked, the loop gets whole frames.
    let mut back = bytes::BytesMut::from(&out[..]);
    let mut whole = 0;
    while let Ok(Some(f)) = next_frame(&mut back, usize::MAX) {
        whole += f.len();
    }
    assert_eq!(whole, out.len(), "the loop got a broken frame");
}

/// A loop's query string through the statement classifier (PostgreSQL's
/// own parser).
pub fn pg_sql(data: &[u8]) {
    use crate::protocol::postgres::sql::{classify, SqlError};
    let Ok(text) = std::str::from_utf8(data) else {
        return; // the server refuses non-UTF-8 text in a UTF-8 database too
    };
    let path = ["app".to_owned(), "public".to_owned()];
    let first = classify(text, &path);
    assert_eq!(
        first,
        classify(text, &path),
        "classification is deterministic"
    );
    match first {
        Ok(statements) => {
            let mut from = 0;
            for s in &statements {
                // Each statement is a piece of the input, in order.
                let at = text[from..]
                    .find(s.text.as_str())
                    .unwrap_or_else(|| panic!("{:?} is not in {text:?} after {from}", s.text));
                from += at + s.text.len();
                for t in s.tables.iter().chain(&s.writes) {
                    assert!(t.contains('.'), "{t} is not schema-qualified");
                }
                for w in &s.writes {
                    assert!(s.tables.contains(w), "written {w} is not among the tables");
                }
                assert!(!s.kind.is_empty());
            }
        }
        Err(SqlError::Syntax(m)) => assert!(!m.is_empty()),
        Err(SqlError::TooLong(n)) => assert!(n > crate::protocol::postgres::sql::MAX_SQL),
        Err(SqlError::Ambiguous(_, m)) => assert!(text.contains('\\') && !m.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_messages_corpus() {
        replay("pg_messages", pg_messages);
    }

    #[test]
    fn pg_sql_corpus() {
        replay("pg_sql", pg_sql);
    }

    #[test]
    fn dns_query_corpus() {
        replay("dns_query", dns_query);
    }

    /// The committed corpora hold every property (the fuzzer's findings,
    /// once fixed, stay fixed without nightly).
    fn replay(target: &str, run: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut n = 0;
        for e in entries {
            let path = e.expect("dir entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{} fails", path.display());
            n += 1;
        }
        assert!(n > 0, "{} is empty", dir.display());
    }

    #[test]
    fn pg_startup_corpus() {
        replay("pg_startup", pg_startup);
    }

    #[test]
    fn http_path_corpus() {
        replay("http_path", |d| {
            http_head(d);
        });
        // Every request of a pipelined connection is checked.
        let pipelined = concat!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
            "GET /b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /never HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert_eq!(http_head(pipelined.as_bytes()), 3);
    }

    #[test]
    fn policy_corpus() {
        replay("policy", policy);
    }

    #[test]
    fn config_corpus() {
        replay("config", config);
    }
}
