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

pub mod model;
pub mod store;

use std::{collections::HashMap, time::Duration};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Serialize;

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

/// Who is asking, and for what.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    pub workload: &'a str,
    pub cgroup: &'a str,
    pub uid: u32,
    /// Executable path, when a selector needs it.
    pub exe: Option<&'a str>,
    pub target: &'a str,
    pub protocol: &'a str,
    /// `connect` at L4 (once per session); protocol handlers add their own
    /// kinds (`request` for HTTP).
    pub kind: &'a str,
    /// Subject of a JWT second factor the protocol handler verified.
    pub jwt_subject: Option<&'a str>,
    /// HTTP request method (upper case), for `methods` rules.
    pub method: Option<&'a str>,
    /// HTTP request path without the query, for `paths` rules.
    pub path: Option<&'a str>,
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
        (self.jwt.is_none() || r.jwt_subject.is_some()) && self.matches_identity(r)
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
    /// The request attributes. A rule without `kinds` applies to the session
    /// decision (`connect`) unless it names request attributes (`methods`,
    /// `paths`), in which case it applies to requests.
    fn matches_request(&self, r: &Request<'_>) -> bool {
        let l7 = self.methods.is_some() || self.paths.is_some();
        let kind_ok = match &self.kinds {
            Some(k) => k.is_match(r.kind),
            None => (r.kind == CONNECT) != l7,
        };
        kind_ok
            && self.methods.as_ref().is_none_or(|ms| {
                r.method
                    .is_some_and(|m| ms.iter().any(|x| x.eq_ignore_ascii_case(m)))
            })
            && self
                .paths
                .as_ref()
                .is_none_or(|ps| r.path.is_some_and(|p| ps.is_match(p)))
    }
}

#[derive(Debug)]
struct Rule {
    id: String,
    /// Indexes into `Policy::workloads`; empty = every workload.
    workloads: Vec<usize>,
    protocols: Option<Vec<String>>,
    kinds: Option<GlobSet>,
    /// HTTP methods (upper case); `None`: any.
    methods: Option<Vec<String>>,
    /// Globs on the HTTP path (`*` stays within a segment, `**` crosses).
    paths: Option<GlobSet>,
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
}

impl Policy {
    pub fn rule_count(&self) -> usize {
        self.rules.len()
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
    /// requests, not the session, for this identity × target. On a target
    /// whose requests the agent cannot see yet, the session is refused
    /// instead of letting such requests through unchecked. `methods`/`paths`
    /// rules count only on HTTP-speaking protocols (they cannot match other
    /// requests).
    pub fn request_rule(&self, r: &Request<'_>) -> Option<String> {
        let http_like = matches!(r.protocol, "http" | "https" | "kubernetes");
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
                let l7 = rule.methods.is_some() || rule.paths.is_some();
                let request_level = match &rule.kinds {
                    Some(k) => !k.is_match(CONNECT) && (!l7 || http_like),
                    None => l7 && http_like,
                };
                request_level
                    && rule.verdict >= Verdict::Approve
                    && (rule.workloads.is_empty() || rule.workloads.iter().any(|&w| matched[w]))
                    && rule
                        .protocols
                        .as_ref()
                        .is_none_or(|p| p.iter().any(|x| x == r.protocol))
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
        let mut best: Option<&Rule> = None;
        let candidates = self
            .by_target
            .get(r.target)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
            .iter()
            .chain(self.any_target.iter());
        for &i in candidates {
            let rule = &self.rules[i];
            if best.is_some_and(|b| b.verdict >= rule.verdict) {
                continue;
            }
            let wl_ok = rule.workloads.is_empty() || rule.workloads.iter().any(|&w| matched[w]);
            let proto_ok = rule
                .protocols
                .as_ref()
                .is_none_or(|p| p.iter().any(|x| x == r.protocol));
            if wl_ok && proto_ok && rule.matches_request(r) {
                best = Some(rule);
                if rule.verdict == Verdict::Deny {
                    break;
                }
            }
        }
        if let Some(rule) = best {
            return Decision {
                verdict: rule.verdict,
                rule_id: rule.id.clone(),
                reason: rule.reason.clone(),
                approval: rule.approval.clone(),
                mask: rule.mask.clone(),
            };
        }
        if r.kind != CONNECT {
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
