//! Rule conditions (`when = "..."`) in CEL, with the `cel-interpreter`
//! crate (pinned: its parser can panic on malformed input, see
//! `../shared/design/LIBRARIES.md`).
//!
//! Compiled once, when the policy loads, inside `catch_unwind`: a broken or
//! panicking expression is a policy error at `file:line:column`, never a
//! crash of the agent or of a hot reload. Evaluated the same way: an
//! expression that panics or errors at run time (a missing map key, a type
//! mismatch) counts as a match for `deny` and `approve` rules and as no
//! match for `allow` and `mask` rules, so an error never opens anything.
//!
//! The variables, built once per operation (only when a candidate rule has
//! a condition) as a child scope of one root context that holds the
//! functions:
//!
//! | name | type | |
//! |---|---|---|
//! | `workload`, `cgroup`, `target`, `protocol` | string | |
//! | `uid` | int | |
//! | `exe` | string | `""` when unknown |
//! | `jwt.sub`, `jwt.iss` | string | `""` without a verified JWT |
//! | `jwt.claims` | map | every claim of the verified JWT (`{}` without one) |
//! | `http.method`, `http.path`, `http.host` | string | HTTP requests only |
//! | `http.headers` | map | lower-case names; repeated headers joined by `, ` |
//! | `sql.kind`, `sql.text` | string | SQL statements only: `select`, `drop`, `alter_role`, ... |
//! | `sql.tables`, `sql.writes`, `sql.functions`, `sql.params` | list of strings | tables schema-qualified |
//! | `sql.unbounded` | bool | an UPDATE or DELETE without WHERE |
//! | `sql.program` | bool | `COPY ... PROGRAM` (a shell command on the server) |
//! | `sql.server_file` | bool | `COPY ... FROM/TO 'file'` (a file on the database server) |
//! | `sql.settings` | list of strings | settings it changes: `SET`/`RESET` names, `set_config` names (`?` when computed) |
//! | `ssh.command` | string | SSH commands only: the command line as sent |
//! | `ssh.argv` | list of strings | its words as a POSIX shell splits them |
//! | `ssh.user` | string | the user the loop asked for |

use std::{
    cell::Cell,
    collections::HashMap,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Arc,
};

use cel_interpreter::{objects::Key, Context, ExecutionError, Program, Value};

use super::{Operation, Request};
use crate::kinds::OpKind;

thread_local! {
    /// How deep this thread is in guarded calls into the CEL crate.
    static GUARDED: Cell<u32> = const { Cell::new(0) };
}

/// Calls into the CEL crate with its panics caught (see the module docs).
fn guarded<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    GUARDED.with(|g| g.set(g.get() + 1));
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(g.get().saturating_sub(1)));
    r
}

/// Whether this thread is inside a guarded CEL call: a panic there is
/// caught and becomes a policy error or a refusal. A panic hook can tell
/// such panics from real ones (the fuzz targets' hook aborts only on the
/// latter).
pub fn in_guarded_call() -> bool {
    GUARDED.with(|g| g.get() > 0)
}

/// The top-level names a condition may use, and the operation kind whose
/// attributes each namespace holds.
const SESSION_NAMES: &[&str] = &[
    "workload", "cgroup", "uid", "exe", "target", "protocol", "jwt",
];

/// A compiled condition.
pub struct Condition {
    source: String,
    program: Program,
    /// The operation kind whose attributes it reads (`http.*`), if any.
    pub reads: Option<OpKind>,
}

impl Condition {
    /// Whether its text names `word` (a cheap, conservative "may read").
    pub fn mentions(&self, word: &str) -> bool {
        self.source.contains(word)
    }
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition")
            .field("source", &self.source)
            .field("reads", &self.reads)
            .finish()
    }
}

/// A compile error, at a byte offset (and 0-based line) inside the
/// expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CelError {
    pub offset: usize,
    pub line: usize,
    pub message: String,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// The functions every condition may call (built once per policy).
#[derive(Default)]
pub struct Functions(Context<'static>);

impl std::fmt::Debug for Functions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Functions")
    }
}

impl Condition {
    /// Compiles `source`; checks that it names only known variables and
    /// reads the attributes of at most one kind of operation.
    pub fn compile(source: &str, functions: &Functions) -> Result<Condition, CelError> {
        let at0 = |message: String| CelError {
            offset: 0,
            line: 0,
            message,
        };
        if source.trim().is_empty() {
            return Err(at0("the condition is empty".into()));
        }
        let program = match guarded(|| Program::compile(source)) {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                let start = e.span.start.clone();
                let mut message = e.msg.clone();
                if !e.expected.is_empty() && e.expected.len() <= 8 {
                    message.push_str(&format!(", expected one of {}", e.expected.join(" ")));
                }
                return Err(CelError {
                    offset: start.as_ref().map_or(0, |l| l.absolute),
                    line: start.as_ref().map_or(0, |l| l.line),
                    message,
                });
            }
            Err(p) => {
                return Err(at0(format!(
                    "the CEL parser failed on this expression ({})",
                    panic_text(p.as_ref())
                )))
            }
        };
        let refs = guarded(|| {
            let r = program.references();
            let mut v: Vec<String> = r.variables().into_iter().map(str::to_owned).collect();
            v.sort();
            v
        })
        .map_err(|p| {
            at0(format!(
                "the CEL program cannot be inspected ({})",
                panic_text(p.as_ref())
            ))
        })?;
        let mut reads = Vec::new();
        for k in OpKind::ALL {
            if let Some(ns) = k.namespace() {
                if refs.iter().any(|v| v == ns) {
                    reads.push(k);
                }
            }
        }
        if reads.len() > 1 {
            return Err(at0(format!(
                "the condition reads the attributes of {} operations; a rule decides one kind",
                reads
                    .iter()
                    .filter_map(|k| k.namespace())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )));
        }
        let c = Condition {
            source: source.to_owned(),
            program,
            reads: reads.first().copied(),
        };
        // A trial run over sample attributes finds names nothing defines
        // (a typo like `htp.path` would otherwise be a run-time error on
        // every request) and conditions that are not true or false.
        let sample_op = match c.reads {
            Some(OpKind::Http) => Operation::Http(super::HttpOp {
                method: "GET",
                path: "/",
                host: Some("sample.invalid"),
                headers: None,
            }),
            Some(OpKind::Sql) => Operation::Sql(super::SqlOp::SELECT),
            Some(OpKind::Ssh) => Operation::Ssh(super::SshOp::SAMPLE),
            _ => Operation::Connect,
        };
        let sample = Request {
            workload: "sample",
            cgroup: "loopgate/sample",
            uid: 0,
            exe: Some("/usr/bin/sample"),
            target: "sample",
            protocol: crate::kinds::Protocol::Tcp,
            jwt: None,
            op: sample_op,
        };
        let vars = Vars::new(&sample, functions);
        match c.run(&vars) {
            Err(Failure::Error(ExecutionError::UndeclaredReference(name))) => {
                let known: Vec<&str> = SESSION_NAMES
                    .iter()
                    .copied()
                    .chain(OpKind::ALL.iter().filter_map(|k| k.namespace()))
                    .collect();
                if !refs.iter().any(|v| **v == *name) || known.contains(&name.as_str()) {
                    // A function name, or bound by a macro: fine.
                } else {
                    return Err(at0(format!(
                        "unknown name `{name}` (the names are {})",
                        known.join(", ")
                    )));
                }
            }
            Ok(Value::Bool(_)) | Err(_) => {}
            Ok(v) => {
                return Err(at0(format!(
                    "the condition must be true or false, and it gives a {}",
                    v.type_of()
                )))
            }
        }
        Ok(c)
    }

    fn run(&self, vars: &Vars<'_>) -> Result<Value, Failure> {
        match guarded(|| self.program.execute(&vars.ctx)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Failure::Error(e)),
            Err(p) => Err(Failure::Panic(panic_text(p.as_ref()))),
        }
    }

    /// Whether the condition holds; `Err` says why it could not be
    /// evaluated (without echoing the operation's values).
    pub fn holds(&self, vars: &Vars<'_>) -> Result<bool, String> {
        match self.run(vars) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(v) => Err(format!(
                "the condition gave a {}, not true or false",
                v.type_of()
            )),
            Err(Failure::Panic(p)) => Err(format!("the CEL interpreter failed ({p})")),
            Err(Failure::Error(e)) => Err(describe(&e)),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

enum Failure {
    Error(ExecutionError),
    Panic(String),
}

/// An execution error without the values it carries (they may be the
/// loop's headers).
fn describe(e: &ExecutionError) -> String {
    match e {
        ExecutionError::NoSuchKey(k) => format!("no such key `{k}`"),
        ExecutionError::UndeclaredReference(n) => format!("unknown name `{n}`"),
        ExecutionError::InvalidArgumentCount { expected, actual } => {
            format!("a function takes {expected} arguments, given {actual}")
        }
        ExecutionError::UnexpectedType { got, want } => {
            format!("a {got} where a {want} is expected")
        }
        ExecutionError::FunctionError { function, .. } => format!("function `{function}` failed"),
        ExecutionError::ValuesNotComparable(a, b) => format!(
            "a {} cannot be compared with a {}",
            a.type_of(),
            b.type_of()
        ),
        ExecutionError::UnsupportedBinaryOperator(op, a, b) => format!(
            "`{op}` does not apply to a {} and a {}",
            a.type_of(),
            b.type_of()
        ),
        _ => "a type error".into(),
    }
}

/// The variables of one operation (built once, read by every condition).
pub struct Vars<'f> {
    ctx: Context<'f>,
}

/// A CEL map with string keys.
fn map<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    let m: HashMap<Key, Value> = pairs
        .into_iter()
        .map(|(k, v)| (Key::String(Arc::new(k.to_owned())), v))
        .collect();
    Value::Map(m.into())
}

fn string_map<'a>(pairs: impl Iterator<Item = (&'a str, String)>) -> Value {
    map(pairs.map(|(k, v)| (k, Value::String(Arc::new(v)))))
}

fn json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_u64().map(Value::UInt))
            .unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN))),
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(a) => Value::List(Arc::new(a.iter().map(json).collect())),
        serde_json::Value::Object(o) => {
            let m: HashMap<Key, Value> = o
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), json(v)))
                .collect();
            Value::Map(m.into())
        }
    }
}

impl<'f> Vars<'f> {
    pub fn new(r: &Request<'_>, functions: &'f Functions) -> Self {
        let mut ctx = functions.0.new_inner_scope();
        let s = |v: &str| Value::String(Arc::new(v.to_owned()));
        ctx.add_variable_from_value("workload", s(r.workload));
        ctx.add_variable_from_value("cgroup", s(r.cgroup));
        ctx.add_variable_from_value("uid", Value::Int(i64::from(r.uid)));
        ctx.add_variable_from_value("exe", s(r.exe.unwrap_or("")));
        ctx.add_variable_from_value("target", s(r.target));
        ctx.add_variable_from_value("protocol", s(r.protocol.as_str()));
        let (sub, iss, claims) = match r.jwt {
            Some(c) => (
                c.sub.as_str(),
                c.iss.as_str(),
                json(&serde_json::Value::Object(c.all.clone())),
            ),
            None => ("", "", map([])),
        };
        ctx.add_variable_from_value(
            "jwt",
            map([("sub", s(sub)), ("iss", s(iss)), ("claims", claims)]),
        );
        if let Operation::Sql(q) = r.op {
            let list = |v: &[String]| {
                Value::List(Arc::new(
                    v.iter()
                        .map(|s| Value::String(Arc::new(s.clone())))
                        .collect(),
                ))
            };
            ctx.add_variable_from_value(
                "sql",
                map([
                    ("kind", s(q.kind)),
                    ("tables", list(q.tables)),
                    ("writes", list(q.writes)),
                    ("unbounded", Value::Bool(q.unbounded)),
                    ("functions", list(q.functions)),
                    ("program", Value::Bool(q.program)),
                    ("server_file", Value::Bool(q.server_file)),
                    ("settings", list(q.settings)),
                    ("text", s(q.text)),
                    ("params", list(q.params)),
                ]),
            );
        }
        if let Operation::Ssh(c) = r.op {
            ctx.add_variable_from_value(
                "ssh",
                map([
                    ("command", s(c.command)),
                    (
                        "argv",
                        Value::List(Arc::new(
                            c.argv
                                .iter()
                                .map(|a| Value::String(Arc::new(a.clone())))
                                .collect(),
                        )),
                    ),
                    ("user", s(c.user)),
                ]),
            );
        }
        if let Operation::Http(h) = r.op {
            let headers = match h.headers {
                Some(hm) => {
                    let mut joined: HashMap<&str, String> = HashMap::new();
                    for (name, v) in hm {
                        let v = String::from_utf8_lossy(v.as_bytes());
                        joined
                            .entry(name.as_str())
                            .and_modify(|e| {
                                e.push_str(", ");
                                e.push_str(&v);
                            })
                            .or_insert_with(|| v.into_owned());
                    }
                    string_map(joined.into_iter())
                }
                None => string_map(std::iter::empty()),
            };
            ctx.add_variable_from_value(
                "http",
                map([
                    ("method", s(h.method)),
                    ("path", s(h.path)),
                    ("host", s(h.host.unwrap_or(""))),
                    ("headers", headers),
                ]),
            );
        }
        Vars { ctx }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(op: Operation<'a>, jwt: Option<&'a crate::identity::Claims>) -> Request<'a> {
        Request {
            workload: "etl",
            cgroup: "loopgate/etl",
            uid: 1000,
            exe: None,
            target: "orders",
            protocol: crate::kinds::Protocol::Http,
            jwt,
            op,
        }
    }

    #[test]
    fn conditions_over_the_operation() {
        let f = Functions::default();
        let mut headers = hyper::HeaderMap::new();
        headers.insert("x-env", "prod".parse().unwrap());
        headers.append("accept", "a".parse().unwrap());
        headers.append("accept", "b".parse().unwrap());
        let op = Operation::Http(super::super::HttpOp {
            method: "DELETE",
            path: "/admin/users/7",
            host: Some("orders.internal"),
            headers: Some(&headers),
        });
        let claims = crate::identity::Claims::for_tests(
            "svc-etl",
            serde_json::json!({"sub": "svc-etl", "groups": ["ops", "etl"], "tier": 2}),
        );
        let r = req(op, Some(&claims));
        let vars = Vars::new(&r, &f);
        for (src, want) in [
            (
                "http.method == 'DELETE' && http.path.startsWith('/admin')",
                true,
            ),
            ("http.headers['x-env'] == 'prod'", true),
            ("http.headers['accept'] == 'a, b'", true),
            ("'x-missing' in http.headers", false),
            ("workload == 'etl' && uid == 1000", true),
            ("jwt.sub == 'svc-etl' && 'ops' in jwt.claims.groups", true),
            ("jwt.claims.tier > 1", true),
            ("http.path.matches('^/admin/users/[0-9]+$')", true),
            ("size(http.path) > 100", false),
        ] {
            let c = Condition::compile(src, &f).unwrap_or_else(|e| panic!("{src}: {e:?}"));
            assert_eq!(
                c.reads,
                Some(OpKind::Http).filter(|_| src.contains("http."))
            );
            assert_eq!(c.holds(&vars), Ok(want), "{src}");
        }
        // A run-time error says what failed, not the values.
        // A missing header is null: comparing it is false, calling a
        // string function on it is an error that names no value.
        let c = Condition::compile("http.headers['x-token'] == 'a'", &f).unwrap();
        assert_eq!(c.holds(&vars), Ok(false));
        let c = Condition::compile(
            "http.headers['x-token'].startsWith(http.headers['x-env'])",
            &f,
        )
        .unwrap();
        let e = c.holds(&vars).unwrap_err();
        assert!(!e.contains("prod"), "{e}");
    }

    #[test]
    fn broken_conditions_are_errors_not_crashes() {
        let f = Functions::default();
        for (src, want) in [
            ("http.method == ", "unrecognized eof"),
            ("]", ""),
            ("", "empty"),
            ("htp.path == '/'", "unknown name `htp`"),
            ("http.path", "true or false"),
            ("http.path == '/' && sql.kind == 'drop'", ""),
            // Byte strings with odd escapes made 0.9.1's parser panic.
            ("b'{||\\b',1", ""),
        ] {
            let e = Condition::compile(src, &f).expect_err(src);
            assert!(e.message.contains(want), "{src}: {e:?}");
        }
        // Errors carry where in the expression they are.
        let e = Condition::compile("http.method == 'GET' &&\n  )", &f).unwrap_err();
        assert_eq!((e.line, e.offset), (1, 26), "{e:?}");
    }
}
