//! Policy files: strict TOML, every error with `file:line:column` and a reason.
//!
//! ```toml
//! [defaults]
//! action = "allow"                 # when no rule and no target default applies
//!
//! [[workloads]]                    # a named selector; every given criterion must match
//! name = "etl"
//! workload = "nightly-*"           # glob on the workload name
//! cgroup = "loopgate/nightly-*/*"  # glob on the cgroup path
//! uid = 1000
//! exe = "/usr/bin/psql"            # glob on the executable path
//! # second factor: the loop must also present a JWT (where the protocol
//! # carries a credential), verified against this JWKS, then stripped
//! # (or jwks_url = "https://idp.example/.well-known/jwks.json", fetched on
//! # first use and cached; ca_file = "/etc/loopgate/idp-ca.pem" to trust a
//! # private CA instead of the system roots)
//! jwt = { issuer = "https://idp.example", audience = "loopgate", jwks_file = "/etc/loopgate/jwks.json" }
//!
//! [[targets]]
//! name = "orders-db"               # a target of agent.toml
//! default = "deny"                 # allow | deny | approve
//! request_default = "deny"         # optional: requests no rule names inside an
//!                                  # open session (HTTP); default allow
//! reason = "orders-db is closed unless a rule opens it"
//!
//! [[rules]]
//! id = "etl-reads-orders"
//! workloads = ["etl"]              # selector names, or "*" (the default)
//! targets = ["orders-db"]          # target names, or "*"
//! protocols = ["postgres"]         # optional
//! kinds = ["connect"]              # optional globs on the request kind: `connect`
//!                                  # (the session decision) or `request` (HTTP)
//! methods = ["DELETE", "PUT"]      # optional, HTTP requests: methods
//! paths = ["/admin/**"]            # optional, HTTP requests: path globs
//!                                  # (`*` within a segment, `**` across)
//! when = "http.path.startsWith('/admin') && !('ops' in jwt.claims.groups)"
//!                                  # optional: a CEL condition (see below)
//! # Without `kinds`, a rule decides whether a session opens (`connect`),
//! # unless it names `methods` or `paths` or its `when` reads `http.*`:
//! # then it decides each request.
//! action = "approve"               # allow | deny | approve | mask
//! reason = "writes need a human"
//! approvers = ["alice"]            # approve: who may decide (default: any approver)
//! approval_timeout = "5m"          # approve: refused after this (default 5m)
//! grant = "10m"                    # approve: once | session | a duration
//! mask = ["password"]              # mask: fields to hide in responses (name
//!                                  # globs), and values by pattern: value:email,
//!                                  # value:card, value:iban, value:re:<regex>
//!                                  # (see crate::masking); every matching mask
//!                                  # rule adds its list
//! ```
//!
//! `when` conditions are [CEL](https://cel.dev) over the operation's
//! attributes (see [`super::cel`] for the table): `workload`, `cgroup`,
//! `uid`, `exe`, `target`, `protocol`, `jwt.sub`, `jwt.iss`, `jwt.claims`,
//! for HTTP requests `http.method`, `http.path`, `http.host`,
//! `http.headers` (lower-case names), and for SQL statements `sql.kind`,
//! `sql.tables`, `sql.writes`, `sql.unbounded`, `sql.functions`, `sql.text`,
//! `sql.params`. For example:
//!
//! ```toml
//! when = "http.method in ['PUT', 'DELETE'] && http.headers['x-env'] == 'prod'"
//! when = "uid == 0 || exe.endsWith('/python3')"
//! when = "http.path.matches('^/users/[0-9]+/keys$')"
//! ```
//!
//! A condition is compiled when the policy loads: a syntax error, an unknown
//! name or a condition that is not true or false is a policy error at its
//! `file:line:column` (`policy check`; a reload with one is refused). At
//! run time a condition that cannot be evaluated (a function called on a
//! missing header) counts as a match for `deny` and `approve` rules and as
//! no match for `allow` and `mask` rules; a missing map key compared with
//! `==` is simply false.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use crate::config::line_col;

use super::{
    cel::Condition, glob, glob_set, ApprovalSpec, Grant, OpKind, Policy, Rule, Verdict,
    WorkloadSel, DEFAULT_APPROVAL_TIMEOUT,
};
use crate::{identity::JwtRegistry, kinds::Protocol};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.reason
            )
        }
    }
}

/// All the errors of a policy set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: Option<Spanned<RawDefaults>>,
    #[serde(default)]
    workloads: Vec<Spanned<RawWorkload>>,
    #[serde(default)]
    targets: Vec<Spanned<RawTarget>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    action: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: Spanned<String>,
    #[serde(default)]
    workload: Option<Spanned<String>>,
    #[serde(default)]
    cgroup: Option<Spanned<String>>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    exe: Option<Spanned<String>>,
    /// Second factor: the loop must present a JWT from this issuer.
    #[serde(default)]
    jwt: Option<Spanned<RawJwt>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    issuer: String,
    audience: String,
    /// Exactly one of `jwks_file` and `jwks_url`.
    #[serde(default)]
    jwks_file: Option<String>,
    /// Fetched on first use (never while compiling), cached, refreshed.
    #[serde(default)]
    jwks_url: Option<String>,
    /// The CA to trust for `jwks_url` instead of the system roots.
    #[serde(default)]
    ca_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Spanned<String>,
    default: Spanned<String>,
    #[serde(default)]
    request_default: Option<Spanned<String>>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    #[serde(default)]
    workloads: Option<Spanned<Vec<String>>>,
    targets: Spanned<Vec<String>>,
    #[serde(default)]
    protocols: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    kinds: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    methods: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    paths: Option<Spanned<Vec<String>>>,
    action: Spanned<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    approvers: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    approval_timeout: Option<Spanned<String>>,
    #[serde(default)]
    grant: Option<Spanned<String>>,
    #[serde(default)]
    mask: Option<Spanned<Vec<String>>>,
    /// A CEL condition over the request's attributes.
    #[serde(default)]
    when: Option<Spanned<String>>,
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: &'a mut Vec<PolicyError>,
}

impl Ctx<'_> {
    fn err(&mut self, span: Range<usize>, reason: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line,
            column,
            reason: reason.into(),
        });
    }
}

fn parse_grant(s: &str) -> Result<Grant, String> {
    match s {
        "once" => Ok(Grant::Once),
        "session" => Ok(Grant::Session),
        d => humantime::parse_duration(d)
            .map(Grant::For)
            .map_err(|_| format!("grant `{d}` is not once, session or a duration like 10m")),
    }
}

/// Loads and compiles every `*.toml` in `dir`, in name order. `targets`, when
/// given, are the target names of the agent config: rules naming others are
/// errors. Returns every error found, not just the first.
pub fn load_dir(dir: &Path, targets: Option<&HashSet<String>>) -> Result<Policy, PolicyErrors> {
    load_dir_with(dir, targets, &JwtRegistry::default())
}

/// [`load_dir`], reusing the JWKS verifiers of `jwts` (kept across reloads).
pub fn load_dir_with(
    dir: &Path,
    targets: Option<&HashSet<String>>,
    jwts: &JwtRegistry,
) -> Result<Policy, PolicyErrors> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) => {
            return Err(PolicyErrors(vec![PolicyError {
                file: dir.to_owned(),
                line: 0,
                column: 0,
                reason: format!("cannot read the policy directory: {e}"),
            }]))
        }
    };
    files.sort();
    let mut texts = Vec::new();
    let mut errors = Vec::new();
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(t) => texts.push((f.clone(), t)),
            Err(e) => errors.push(PolicyError {
                file: f.clone(),
                line: 0,
                column: 0,
                reason: format!("cannot read: {e}"),
            }),
        }
    }
    let sources: Vec<(&Path, &str)> = texts
        .iter()
        .map(|(p, t)| (p.as_path(), t.as_str()))
        .collect();
    match compile_with(&sources, targets, jwts) {
        Ok(p) if errors.is_empty() => Ok(p),
        Ok(_) => Err(PolicyErrors(errors)),
        Err(PolicyErrors(mut more)) => {
            errors.append(&mut more);
            Err(PolicyErrors(errors))
        }
    }
}

/// Compiles policy sources (file name, text).
pub fn compile(
    sources: &[(&Path, &str)],
    targets: Option<&HashSet<String>>,
) -> Result<Policy, PolicyErrors> {
    compile_with(sources, targets, &JwtRegistry::default())
}

/// [`compile`], reusing the JWKS verifiers of `jwts`.
pub fn compile_with(
    sources: &[(&Path, &str)],
    targets: Option<&HashSet<String>>,
    jwts: &JwtRegistry,
) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    for (file, text) in sources {
        match toml::from_str::<RawFile>(text) {
            Ok(raw) => parsed.push((*file, *text, raw)),
            Err(e) => {
                let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
                errors.push(PolicyError {
                    file: file.to_path_buf(),
                    line,
                    column,
                    reason: e.message().trim().to_owned(),
                });
            }
        }
    }

    let mut policy = Policy {
        default: Verdict::Allow,
        files: sources.len(),
        ..Default::default()
    };
    let mut default_seen: Option<(PathBuf, usize)> = None;
    let mut workload_ix: HashMap<String, usize> = HashMap::new();

    // Pass 1: defaults, workload selectors and target defaults (rules in any
    // file may name workloads of any other file).
    for (file, text, raw) in &parsed {
        let mut cx = Ctx {
            file,
            text,
            errors: &mut errors,
        };
        if let Some(d) = &raw.defaults {
            let a = &d.get_ref().action;
            match Verdict::parse(a.get_ref()) {
                Some(Verdict::Mask) | None => cx.err(
                    a.span(),
                    format!("action `{}` is not allow, deny or approve", a.get_ref()),
                ),
                Some(v) => policy.default = v,
            }
            if let Some((f, line)) = &default_seen {
                cx.err(
                    d.span(),
                    format!("[defaults] is already set in {}:{line}", f.display()),
                );
            }
            default_seen = Some((file.to_path_buf(), line_col(text, d.span().start).0));
        }
        for w in &raw.workloads {
            let w = w.get_ref();
            let name = w.name.get_ref();
            if let Err(r) = crate::config::validate_name(name) {
                cx.err(w.name.span(), format!("workload name: {r}"));
            }
            if workload_ix.contains_key(name) {
                cx.err(w.name.span(), format!("duplicate workload `{name}`"));
                continue;
            }
            if w.workload.is_none() && w.cgroup.is_none() && w.uid.is_none() && w.exe.is_none() {
                cx.err(
                    w.name.span(),
                    format!("workload `{name}` has no selector (workload, cgroup, uid or exe); rules use \"*\" for every workload"),
                );
                continue;
            }
            let g = |s: &Option<Spanned<String>>, cx: &mut Ctx<'_>| match s {
                None => None,
                Some(p) => match glob(p.get_ref()) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        cx.err(p.span(), format!("bad glob `{}`: {e}", p.get_ref()));
                        None
                    }
                },
            };
            let jwt = w.jwt.as_ref().and_then(|j| {
                let r = j.get_ref();
                let v = match (&r.jwks_file, &r.jwks_url, &r.ca_file) {
                    (Some(f), None, None) => crate::identity::JwtVerifier::from_jwks_file(
                        Path::new(f),
                        &r.issuer,
                        &r.audience,
                    )
                    .map(std::sync::Arc::new),
                    (None, Some(u), ca) => {
                        jwts.remote(u, ca.as_deref().map(Path::new), &r.issuer, &r.audience)
                    }
                    (Some(_), Some(_), _) => {
                        cx.err(j.span(), "jwt: set jwks_file or jwks_url, not both");
                        return None;
                    }
                    (None, None, _) => {
                        cx.err(j.span(), "jwt: set jwks_file or jwks_url");
                        return None;
                    }
                    (Some(_), None, Some(_)) => {
                        cx.err(
                            j.span(),
                            "jwt: ca_file is for jwks_url (a JWKS fetched over https)",
                        );
                        return None;
                    }
                };
                match v {
                    Ok(v) => Some(v),
                    Err(e) => {
                        cx.err(j.span(), e.to_string());
                        None
                    }
                }
            });
            let sel = WorkloadSel {
                name: name.clone(),
                workload: g(&w.workload, &mut cx),
                cgroup: g(&w.cgroup, &mut cx),
                uid: w.uid,
                exe: g(&w.exe, &mut cx),
                jwt,
            };
            policy.needs_exe |= sel.exe.is_some();
            workload_ix.insert(name.clone(), policy.workloads.len());
            policy.workloads.push(sel);
        }
        for t in &raw.targets {
            let t = t.get_ref();
            let name = t.name.get_ref();
            if let Some(known) = targets {
                if !known.contains(name) {
                    cx.err(
                        t.name.span(),
                        format!("`{name}` is not a target of the agent config"),
                    );
                }
            }
            let v = match Verdict::parse(t.default.get_ref()) {
                Some(Verdict::Mask) | None => {
                    cx.err(
                        t.default.span(),
                        format!(
                            "default `{}` is not allow, deny or approve",
                            t.default.get_ref()
                        ),
                    );
                    continue;
                }
                Some(v) => v,
            };
            if policy.target_defaults.contains_key(name) {
                cx.err(
                    t.name.span(),
                    format!("target `{name}` already has a default"),
                );
                continue;
            }
            let reason = t
                .reason
                .clone()
                .unwrap_or_else(|| format!("no rule matched; {name} defaults to {}", v.as_str()));
            policy.target_defaults.insert(name.clone(), (v, reason));
            if let Some(rd) = &t.request_default {
                match Verdict::parse(rd.get_ref()) {
                    Some(v @ (Verdict::Allow | Verdict::Deny | Verdict::Approve)) => {
                        policy.request_defaults.insert(
                            name.clone(),
                            (
                                v,
                                format!(
                                    "no request rule matched; requests to {name} default to {}",
                                    v.as_str()
                                ),
                            ),
                        );
                    }
                    _ => cx.err(
                        rd.span(),
                        format!(
                            "request_default `{}` is not allow, deny or approve",
                            rd.get_ref()
                        ),
                    ),
                }
            }
        }
    }

    // Pass 2: rules.
    let mut rule_ids: HashSet<String> = HashSet::new();
    for (file, text, raw) in &parsed {
        let mut cx = Ctx {
            file,
            text,
            errors: &mut errors,
        };
        for r in &raw.rules {
            let r = r.get_ref();
            let id = r.id.get_ref();
            if id.is_empty() || id.contains(char::is_whitespace) {
                cx.err(r.id.span(), "rule id must be non-empty and without spaces");
            }
            if !rule_ids.insert(id.clone()) {
                cx.err(r.id.span(), format!("duplicate rule id `{id}`"));
            }
            let Some(verdict) = Verdict::parse(r.action.get_ref()) else {
                cx.err(
                    r.action.span(),
                    format!(
                        "action `{}` is not allow, deny, approve or mask",
                        r.action.get_ref()
                    ),
                );
                continue;
            };
            let mut workloads = Vec::new();
            if let Some(ws) = &r.workloads {
                if ws.get_ref().is_empty() {
                    cx.err(
                        ws.span(),
                        "workloads is empty (use [\"*\"] for every workload)",
                    );
                }
                if !ws.get_ref().iter().any(|w| w == "*") {
                    for w in ws.get_ref() {
                        match workload_ix.get(w) {
                            Some(&i) => workloads.push(i),
                            None => cx.err(
                                ws.span(),
                                format!(
                                    "unknown workload `{w}` (define it in a [[workloads]] table)"
                                ),
                            ),
                        }
                    }
                }
            }
            let ts = r.targets.get_ref();
            if ts.is_empty() {
                cx.err(
                    r.targets.span(),
                    "targets is empty (use [\"*\"] for every target)",
                );
            }
            if let Some(known) = targets {
                for t in ts.iter().filter(|t| *t != "*") {
                    if !known.contains(t) {
                        cx.err(
                            r.targets.span(),
                            format!("`{t}` is not a target of the agent config"),
                        );
                    }
                }
            }
            let protocols = r.protocols.as_ref().map(|p| {
                let mut v = Vec::new();
                for x in p.get_ref() {
                    match Protocol::parse(x) {
                        Some(p) => v.push(p),
                        None => cx.err(
                            p.span(),
                            format!(
                                "unknown protocol `{x}` (one of {})",
                                Protocol::CONFIGURABLE.map(Protocol::as_str).join(", ")
                            ),
                        ),
                    }
                }
                v
            });
            let kinds = r.kinds.as_ref().and_then(|k| match glob_set(k.get_ref()) {
                Ok(s) => Some(s),
                Err(e) => {
                    cx.err(k.span(), format!("bad glob in kinds: {e}"));
                    None
                }
            });
            let when = r.when.as_ref().and_then(|w| {
                match Condition::compile(w.get_ref(), &policy.functions) {
                    Ok(c) => Some((c, w.span())),
                    Err(e) => {
                        let at = expression_offset(text, w.span(), e.offset);
                        cx.err(at..at, format!("when: {}", e.message));
                        None
                    }
                }
            });
            // The operations the rule decides, from the attributes it names.
            let by_fields = (r.methods.is_some() || r.paths.is_some()).then_some(OpKind::Http);
            let by_when = when.as_ref().and_then(|(c, _)| c.reads);
            let decides = match (by_fields, by_when) {
                (Some(a), Some(b)) if a != b => {
                    if let Some((_, span)) = &when {
                        cx.err(
                            span.clone(),
                            format!(
                                "when reads {} attributes, and methods/paths describe {} operations",
                                b.namespace().unwrap_or("session"),
                                a.namespace().unwrap_or("session")
                            ),
                        );
                    }
                    a
                }
                (Some(k), _) | (None, Some(k)) => k,
                (None, None) => OpKind::Connect,
            };
            let ops_protocols: Vec<&str> = Protocol::CONFIGURABLE
                .into_iter()
                .filter(|p| p.operations().contains(&decides))
                .map(Protocol::as_str)
                .collect();
            for (field, span) in [
                ("methods", r.methods.as_ref().map(|m| m.span())),
                ("paths", r.paths.as_ref().map(|m| m.span())),
                (
                    "when",
                    when.as_ref()
                        .filter(|(c, _)| c.reads.is_some())
                        .map(|(_, s)| s.clone()),
                ),
            ] {
                let Some(span) = span else { continue };
                if let Some(ps) = &protocols {
                    if !ps.iter().any(|p| p.operations().contains(&decides)) {
                        cx.err(
                            span.clone(),
                            format!(
                                "{field} applies to {} requests, and this rule's protocols are {}",
                                human_list(&ops_protocols),
                                ps.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
                            ),
                        );
                    }
                }
                if let Some(k) = &r.kinds {
                    if k.get_ref().iter().any(|k| k == super::CONNECT) {
                        cx.err(
                            span,
                            format!("{field} describes requests; a `connect` kind has none"),
                        );
                    }
                }
            }
            let methods = r.methods.as_ref().map(|m| {
                for x in m.get_ref() {
                    if x.is_empty() || !x.bytes().all(|b| b.is_ascii_uppercase()) {
                        cx.err(
                            m.span(),
                            format!(
                                "method `{x}` is not an upper-case HTTP method like GET or DELETE"
                            ),
                        );
                    }
                }
                m.get_ref().clone()
            });
            let paths = r.paths.as_ref().and_then(|p| {
                if let Some(bad) = p.get_ref().iter().find(|x| !x.starts_with('/')) {
                    cx.err(p.span(), format!("path `{bad}` must start with /"));
                    return None;
                }
                match super::path_set(p.get_ref()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        cx.err(p.span(), format!("bad glob in paths: {e}"));
                        None
                    }
                }
            });
            let approval = if verdict == Verdict::Approve {
                let timeout = match &r.approval_timeout {
                    None => DEFAULT_APPROVAL_TIMEOUT,
                    Some(t) => match humantime::parse_duration(t.get_ref()) {
                        Ok(d) if !d.is_zero() => d,
                        _ => {
                            cx.err(
                                t.span(),
                                format!(
                                    "approval_timeout `{}` is not a duration like 5m",
                                    t.get_ref()
                                ),
                            );
                            DEFAULT_APPROVAL_TIMEOUT
                        }
                    },
                };
                let grant = match &r.grant {
                    None => Grant::Once,
                    Some(g) => parse_grant(g.get_ref()).unwrap_or_else(|e| {
                        cx.err(g.span(), e);
                        Grant::Once
                    }),
                };
                Some(ApprovalSpec {
                    approvers: r
                        .approvers
                        .as_ref()
                        .map(|a| a.get_ref().clone())
                        .unwrap_or_default(),
                    timeout,
                    grant,
                })
            } else {
                for (field, span) in [
                    ("approvers", r.approvers.as_ref().map(|a| a.span())),
                    (
                        "approval_timeout",
                        r.approval_timeout.as_ref().map(|a| a.span()),
                    ),
                    ("grant", r.grant.as_ref().map(|a| a.span())),
                ] {
                    if let Some(span) = span {
                        cx.err(
                            span,
                            format!("{field} only applies to action = \"approve\""),
                        );
                    }
                }
                None
            };
            let mask = match (&r.mask, verdict) {
                (Some(m), Verdict::Mask) if !m.get_ref().is_empty() => {
                    if let Err(e) = crate::masking::MaskSpec::parse(m.get_ref()) {
                        cx.err(m.span(), &e);
                    }
                    m.get_ref().clone()
                }
                (_, Verdict::Mask) => {
                    cx.err(
                        r.action.span(),
                        "action = \"mask\" needs a non-empty mask list",
                    );
                    Vec::new()
                }
                (Some(m), _) => {
                    cx.err(m.span(), "mask only applies to action = \"mask\"");
                    Vec::new()
                }
                (None, _) => Vec::new(),
            };
            let ix = policy.rules.len();
            policy.rules.push(Rule {
                id: id.clone(),
                workloads,
                protocols,
                kinds,
                decides,
                methods,
                paths,
                when: when.map(|(c, _)| c),
                verdict,
                reason: r
                    .reason
                    .clone()
                    .unwrap_or_else(|| format!("rule {id}: {}", verdict.as_str())),
                approval,
                mask,
            });
            if ts.iter().any(|t| t == "*") {
                policy.any_target.push(ix);
            } else {
                for t in ts {
                    policy.by_target.entry(t.clone()).or_default().push(ix);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyErrors(errors))
    }
}

/// The file offset of byte `offset` of a `when` expression whose TOML
/// string spans `span` (escapes inside a basic string shift it slightly).
fn expression_offset(text: &str, span: Range<usize>, offset: usize) -> usize {
    let lit = text.get(span.clone()).unwrap_or("");
    let mut start = span.start;
    if lit.starts_with("\"\"\"") || lit.starts_with("'''") {
        start += 3;
        // A newline right after the opening quotes is not part of the string.
        if text[start..].starts_with("\r\n") {
            start += 2;
        } else if text[start..].starts_with('\n') {
            start += 1;
        }
    } else if lit.starts_with('"') || lit.starts_with('\'') {
        start += 1;
    }
    let mut at = (start + offset)
        .min(span.end.saturating_sub(1))
        .max(span.start);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// `a, b and c`.
fn human_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Durations in messages.
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
