//! Policies: who a loop is (workload selectors), what it may do (rules), and
//! what happens when nothing says so (per-target and global defaults).
//!
//! Files `policies/*.toml` are parsed strictly ([`model`]), compiled once into
//! a [`Policy`] (glob sets, rule indexes by target), and evaluated with
//! [`Policy::evaluate`]: pure, synchronous, no allocation on the common path.
//! Every [`Decision`] carries the rule id and reason that the audit records.
//!
//! Precedence among the rules that match a request: **deny** beats
//! **approve** beats **mask** beats **allow**. When no rule matches, the
//! target's `default` applies, then `[defaults] action`, then `allow`.

pub mod cel;
pub mod model;
pub mod store;

use std::{collections::HashMap, time::Duration};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Serialize;

pub use crate::kinds::OpKind;
use crate::kinds::Protocol;
pub use model::{load_dir, PolicyError, PolicyErrors};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    // Order = precedence (higher wins).
    #[default]
    Allow,
    Mask,
    Approve,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Mask => "mask",
            Verdict::Approve => "approve",
            Verdict::Deny => "deny",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "allow" => Verdict::Allow,
            "mask" => Verdict::Mask,
            "approve" => Verdict::Approve,
            "deny" => Verdict::Deny,
            _ => return None,
        })
    }
}

/// How long an approval lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// This request only.
    Once,
    /// The rest of this session.
    Session,
    /// This workload × target × rule, for a while.
    For(#[serde(with = "humantime_serde_secs")] Duration),
}

mod humantime_serde_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

/// Approval settings of an `approve` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalSpec {
    /// Approver names allowed to decide (empty: any configured approver).
    pub approvers: Vec<String>,
    pub timeout: Duration,
    pub grant: Grant,
}

pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(300);

/// The outcome of a policy evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// `file.toml#rule-id`, `target-default:<target>` or `default`.
    pub rule_id: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
    /// Fields to mask in responses (`mask` rules).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mask: Vec<String>,
}

impl Decision {
    /// A decision by a default (no rule): `approve` defaults hold once, with
    /// the default timeout, for any approver.
    fn default_of(verdict: Verdict, rule_id: String, reason: String) -> Self {
        Decision {
            verdict,
            rule_id,
            reason,
            approval: (verdict == Verdict::Approve).then(|| ApprovalSpec {
                approvers: Vec::new(),
                timeout: DEFAULT_APPROVAL_TIMEOUT,
                grant: Grant::Once,
            }),
            mask: Vec::new(),
        }
    }
}

/// One HTTP request, as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct HttpOp<'a> {
    /// Upper case.
    pub method: &'a str,
    /// Normalised, without the query.
    pub path: &'a str,
    /// The `Host` header, when there is exactly one.
    pub host: Option<&'a str>,
    pub headers: Option<&'a hyper::HeaderMap>,
}

/// One SQL statement, as PostgreSQL's parser classified it
/// (`protocol::postgres::sql`).
#[derive(Debug, Clone, Copy)]
pub struct SqlOp<'a> {
    /// `select`, `drop`, `alter_role`, ...
    pub kind: &'a str,
    /// Schema-qualified tables named (read or written).
    pub tables: &'a [String],
    pub writes: &'a [String],
    /// An UPDATE or DELETE without WHERE.
    pub unbounded: bool,
    pub functions: &'a [String],
    /// `COPY ... PROGRAM`.
    pub program: bool,
    /// `COPY ... FROM|TO 'file'` (a file on the database server).
    pub server_file: bool,
    /// Settings it changes (`role`, `search_path`, `?`: a computed name).
    pub settings: &'a [String],
    pub text: &'a str,
    /// Bound parameters in text form (extended protocol), if any.
    pub params: &'a [String],
}

/// A command a loop runs over SSH (an `exec` request), as the rules see it
/// (`protocol::ssh`).
#[derive(Debug, Clone, Copy)]
pub struct SshOp<'a> {
    /// The command line as sent.
    pub command: &'a str,
    /// Its words, split as a POSIX shell splits them (quotes and escapes
    /// removed; empty when the line does not split).
    pub argv: &'a [String],
    /// The user the loop asked for (checked against the target's).
    pub user: &'a str,
}

impl SshOp<'static> {
    /// A sample for checking conditions.
    pub const SAMPLE: SshOp<'static> = SshOp {
        command: "true",
        argv: &[],
        user: "sample",
    };
}

/// What a decision is about: the session, or one operation inside it. Each
/// protocol that inspects its sessions adds its variant (and an
/// [`OpKind`]).
impl SqlOp<'static> {
    /// A plain SELECT with no attributes: a sample for checking
    /// conditions, and what a session's results are masked with by default.
    pub const SELECT: SqlOp<'static> = SqlOp {
        kind: "select",
        tables: &[],
        writes: &[],
        unbounded: false,
        functions: &[],
        program: false,
        server_file: false,
        settings: &[],
        text: "select 1",
        params: &[],
    };
}

#[derive(Debug, Clone, Copy)]
pub enum Operation<'a> {
    /// Opening the session (once per connection).
    Connect,
    Http(HttpOp<'a>),
    Sql(SqlOp<'a>),
    Ssh(SshOp<'a>),
}

impl Operation<'_> {
    pub fn kind(&self) -> OpKind {
        match self {
            Operation::Connect => OpKind::Connect,
            Operation::Http(_) => OpKind::Http,
            Operation::Sql(_) => OpKind::Sql,
            Operation::Ssh(_) => OpKind::Ssh,
        }
    }
}

/// Who is asking, and for what.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub workload: &'a str,
    pub cgroup: &'a str,
    pub uid: u32,
    /// Executable path, when a selector needs it.
    pub exe: Option<&'a str>,
    pub target: &'a str,
    pub protocol: Protocol,
    /// The verified JWT second factor, once a handler checked it.
    pub jwt: Option<&'a crate::identity::Claims>,
    pub op: Operation<'a>,
}

impl Default for Request<'_> {
    /// An anonymous session decision on raw TCP (tests and benches fill in
    /// what they need).
    fn default() -> Self {
        Request {
            workload: "",
            cgroup: "",
            uid: 0,
            exe: None,
            target: "",
            protocol: Protocol::Tcp,
            jwt: None,
            op: Operation::Connect,
        }
    }
}

impl Request<'_> {
    pub fn jwt_subject(&self) -> Option<&str> {
        self.jwt.map(|c| c.sub.as_str())
    }
}

/// The kind of the one decision made when a session opens.
pub const CONNECT: &str = "connect";

/// A compiled workload selector.
#[derive(Debug)]
struct WorkloadSel {
    name: String,
    workload: Option<globset::GlobMatcher>,
    cgroup: Option<globset::GlobMatcher>,
    uid: Option<u32>,
    exe: Option<globset::GlobMatcher>,
    jwt: Option<std::sync::Arc<crate::identity::JwtVerifier>>,
}

impl WorkloadSel {
    fn matches(&self, r: &Request<'_>) -> bool {
        // A selector that requires the second factor never matches without it.
        (self.jwt.is_none() || r.jwt.is_some()) && self.matches_identity(r)
    }

    /// The kernel-attested criteria only (workload, cgroup, uid, exe).
    fn matches_identity(&self, r: &Request<'_>) -> bool {
        self.workload
            .as_ref()
            .is_none_or(|g| g.is_match(r.workload))
            && self.cgroup.as_ref().is_none_or(|g| g.is_match(r.cgroup))
            && self.uid.is_none_or(|u| u == r.uid)
            && self
                .exe
                .as_ref()
                .is_none_or(|g| r.exe.is_some_and(|e| g.is_match(e)))
    }
}

impl Rule {
    /// Whether the rule applies to this operation. A rule without `kinds`
    /// decides the operations whose attributes it names (`methods`,
    /// `paths`, `when` over `http.*`), or else the session (`connect`).
    fn matches_op(&self, r: &Request<'_>) -> bool {
        let kind = r.op.kind();
        let kind_ok = match &self.kinds {
            Some(k) => k.is_match(kind.as_str()),
            None => self.decides == kind,
        };
        if !kind_ok {
            return false;
        }
        if self.methods.is_none() && self.paths.is_none() {
            return true;
        }
        let Operation::Http(h) = r.op else {
            return false;
        };
        self.methods
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|x| x.eq_ignore_ascii_case(h.method)))
            && self.paths.as_ref().is_none_or(|ps| ps.is_match(h.path))
    }

    /// Whether it decides operations other than the session's opening that
    /// this protocol has.
    fn decides_operations(&self, protocol: Protocol) -> bool {
        let ops = protocol.operations();
        match &self.kinds {
            Some(k) => {
                !k.is_match(CONNECT)
                    && (self.decides == OpKind::Connect || ops.contains(&self.decides))
            }
            None => self.decides != OpKind::Connect && ops.contains(&self.decides),
        }
    }
}

#[derive(Debug)]
struct Rule {
    id: String,
    /// Indexes into `Policy::workloads`; empty = every workload.
    workloads: Vec<usize>,
    protocols: Option<Vec<Protocol>>,
    kinds: Option<GlobSet>,
    /// The operations it decides, from the attributes it names.
    decides: OpKind,
    /// HTTP methods (upper case); `None`: any.
    methods: Option<Vec<String>>,
    /// Globs on the HTTP path (`*` stays within a segment, `**` crosses).
    paths: Option<GlobSet>,
    /// A CEL condition (`when`).
    when: Option<cel::Condition>,
    verdict: Verdict,
    reason: String,
    approval: Option<ApprovalSpec>,
    mask: Vec<String>,
}

/// A compiled, immutable policy set.
#[derive(Debug, Default)]
pub struct Policy {
    workloads: Vec<WorkloadSel>,
    rules: Vec<Rule>,
    /// Rule indexes by target name; `*` rules are in `any_target`.
    by_target: HashMap<String, Vec<usize>>,
    any_target: Vec<usize>,
    target_defaults: HashMap<String, (Verdict, String)>,
    /// Per target: requests no rule names (default: allow).
    request_defaults: HashMap<String, (Verdict, String)>,
    default: Verdict,
    pub files: usize,
    /// Whether any workload selector looks at the executable.
    pub needs_exe: bool,
    /// The functions of rule conditions.
    functions: cel::Functions,
}

impl Policy {
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Whether any rule's condition names `word` (`sql.params`): work that
    /// only such rules need can be skipped otherwise.
    pub fn conditions_mention(&self, word: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.when.as_ref().is_some_and(|c| c.mentions(word)))
    }

    /// Which workload selectors match: computed once per connection.
    pub fn workload_matches(&self, r: &Request<'_>) -> Vec<bool> {
        self.workloads.iter().map(|w| w.matches(r)).collect()
    }

    /// The JWT a protocol handler must verify for this identity: the first
    /// workload requiring one whose kernel-attested criteria match. A request
    /// that cannot carry a token (raw TCP) from such a workload is refused.
    pub fn jwt_required(
        &self,
        r: &Request<'_>,
    ) -> Option<(&str, std::sync::Arc<crate::identity::JwtVerifier>)> {
        self.workloads
            .iter()
            .filter(|w| w.jwt.is_some() && w.matches_identity(r))
            .find_map(|w| w.jwt.clone().map(|j| (w.name.as_str(), j)))
    }

    /// A `deny` or `approve` rule (or request default) that decides
    /// operations inside the session, not the session itself, for this
    /// identity × target. On a target whose operations the agent cannot see
    /// yet, the session is refused instead of letting such operations
    /// through unchecked. Rules on operations this protocol never has
    /// (`methods` on a PostgreSQL target) do not count.
    pub fn request_rule(&self, r: &Request<'_>) -> Option<String> {
        let matched = self.workload_matches(r);
        let rule = self
            .by_target
            .get(r.target)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
            .iter()
            .chain(self.any_target.iter())
            .map(|&i| &self.rules[i])
            .find(|rule| {
                rule.decides_operations(r.protocol)
                    && rule.verdict >= Verdict::Approve
                    && (rule.workloads.is_empty() || rule.workloads.iter().any(|&w| matched[w]))
                    && rule
                        .protocols
                        .as_ref()
                        .is_none_or(|p| p.contains(&r.protocol))
            })
            .map(|rule| rule.id.clone());
        rule.or_else(|| {
            self.request_defaults
                .get(r.target)
                .filter(|(v, _)| *v >= Verdict::Approve)
                .map(|_| format!("request-default:{}", r.target))
        })
    }

    pub fn workload_names(&self, matched: &[bool]) -> Vec<&str> {
        self.workloads
            .iter()
            .zip(matched)
            .filter(|(_, m)| **m)
            .map(|(w, _)| w.name.as_str())
            .collect()
    }

    /// Evaluates a request. `matched` is [`Policy::workload_matches`] of the
    /// same identity (pass `None` to compute it here).
    pub fn evaluate(&self, r: &Request<'_>, matched: Option<&[bool]>) -> Decision {
        let owned;
        let matched = match matched {
            Some(m) => m,
            None => {
                owned = self.workload_matches(r);
                &owned
            }
        };
        // The best rule so far, and why its condition failed (if it did).
        let mut best: Option<(&Rule, Option<String>)> = None;
        let mut masks: Vec<String> = Vec::new();
        let mut vars: Option<cel::Vars<'_>> = None;
        let candidates = self
            .by_target
            .get(r.target)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
            .iter()
            .chain(self.any_target.iter());
        for &i in candidates {
            let rule = &self.rules[i];
            // Mask rules are all looked at: every one that matches adds its
            // list, whatever decides the verdict.
            if rule.verdict != Verdict::Mask
                && best
                    .as_ref()
                    .is_some_and(|(b, _)| b.verdict >= rule.verdict)
            {
                continue;
            }
            let wl_ok = rule.workloads.is_empty() || rule.workloads.iter().any(|&w| matched[w]);
            let proto_ok = rule
                .protocols
                .as_ref()
                .is_none_or(|p| p.contains(&r.protocol));
            if !(wl_ok && proto_ok && rule.matches_op(r)) {
                continue;
            }
            let mut failed = None;
            if let Some(c) = &rule.when {
                let vars = vars.get_or_insert_with(|| cel::Vars::new(r, &self.functions));
                match c.holds(vars) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    // An error never opens anything: it counts as a match
                    // for deny and approve, as none for allow and mask.
                    Err(e) if rule.verdict >= Verdict::Approve => failed = Some(e),
                    // A mask that cannot be evaluated masks: it hides, it
                    // never opens.
                    Err(e) if rule.verdict == Verdict::Mask => failed = Some(e),
                    Err(_) => continue,
                }
            }
            if rule.verdict == Verdict::Mask {
                for m in &rule.mask {
                    if !masks.contains(m) {
                        masks.push(m.clone());
                    }
                }
            }
            if best.as_ref().is_none_or(|(b, _)| b.verdict < rule.verdict) {
                best = Some((rule, failed));
            }
            if rule.verdict == Verdict::Deny {
                break;
            }
        }
        if let Some((rule, failed)) = best {
            let reason = match failed {
                Some(e) => format!(
                    "{} (its condition could not be evaluated: {e}; counted as a match)",
                    rule.reason
                ),
                None => rule.reason.clone(),
            };
            return Decision {
                verdict: rule.verdict,
                rule_id: rule.id.clone(),
                reason,
                approval: rule.approval.clone(),
                mask: masks,
            };
        }
        if r.op.kind() != OpKind::Connect {
            // Target and global defaults decide whether a session may open;
            // inside an allowed session, what no rule names follows the
            // target's `request_default` (allow when unset).
            if let Some((v, reason)) = self.request_defaults.get(r.target) {
                return Decision::default_of(
                    *v,
                    format!("request-default:{}", r.target),
                    reason.clone(),
                );
            }
            return Decision::default_of(
                Verdict::Allow,
                "session".into(),
                "no request rule matched; the session was allowed when it opened".into(),
            );
        }
        if let Some((v, reason)) = self.target_defaults.get(r.target) {
            return Decision::default_of(
                *v,
                format!("target-default:{}", r.target),
                reason.clone(),
            );
        }
        Decision::default_of(
            self.default,
            "default".into(),
            format!(
                "no rule matched; the policy default is {}",
                self.default.as_str()
            ),
        )
    }
}

fn glob(pattern: &str) -> Result<globset::GlobMatcher, globset::Error> {
    Ok(Glob::new(pattern)?.compile_matcher())
}

/// Path globs: `*` matches within one segment, `**` across segments.
fn path_set(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let glob = |p: &str| globset::GlobBuilder::new(p).literal_separator(true).build();
        b.add(glob(p)?);
        // `/x/**` covers `/x` itself too.
        if let Some(base) = p.strip_suffix("/**").filter(|b| !b.is_empty()) {
            b.add(glob(base)?);
        }
    }
    b.build()
}

fn glob_set(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p)?);
    }
    b.build()
}

#[cfg(test)]
mod tests;
