//! The typed vocabulary shared by the config, the policy, the session seam,
//! the protocol handlers and the audit: protocols, operation kinds, event
//! kinds, session outcomes and refusals. Strings appear only at the audit
//! boundary (`as_str`), where ClickHouse rows and logs need them.
//!
//! A leaf module: it imports nothing else of the crate.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A target's protocol (`protocol = "..."` in `agent.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Postgres,
    Ssh,
    Http,
    Https,
    Kubernetes,
    Tcp,
    /// Tagged loops' DNS over TCP to the agent's resolver (never a target's
    /// configured protocol).
    #[serde(skip)]
    Dns,
}

impl Protocol {
    /// Every protocol a target may be configured with.
    pub const CONFIGURABLE: [Protocol; 6] = [
        Protocol::Postgres,
        Protocol::Ssh,
        Protocol::Http,
        Protocol::Https,
        Protocol::Kubernetes,
        Protocol::Tcp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Ssh => "ssh",
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Kubernetes => "kubernetes",
            Protocol::Tcp => "tcp",
            Protocol::Dns => "dns",
        }
    }

    /// A configurable protocol by its name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::CONFIGURABLE.into_iter().find(|p| p.as_str() == s)
    }

    /// The operations a session of this protocol consists of, once its
    /// handler inspects them (whether it does yet is the handler's
    /// business: `ProtocolHandler::sees_requests`). Rules that decide these
    /// operations can apply to this protocol's targets.
    pub fn operations(self) -> &'static [OpKind] {
        match self {
            Protocol::Http | Protocol::Https | Protocol::Kubernetes => &[OpKind::Http],
            Protocol::Postgres => &[OpKind::Sql],
            Protocol::Ssh => &[OpKind::Ssh],
            Protocol::Tcp | Protocol::Dns => &[],
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a policy decision is about: the session itself, or one kind of
/// operation inside it. Each protocol that inspects its sessions adds its
/// kind (and its attributes, in `policy::Operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// Opening the session: decided once per connection.
    Connect,
    /// One HTTP request.
    Http,
    /// One SQL statement.
    Sql,
    /// One SSH channel request (a command run).
    Ssh,
}

impl OpKind {
    pub const ALL: [OpKind; 4] = [OpKind::Connect, OpKind::Http, OpKind::Sql, OpKind::Ssh];

    /// The name `kinds` globs match and audit events carry.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Connect => "connect",
            OpKind::Http => "request",
            OpKind::Sql => "sql",
            OpKind::Ssh => "ssh",
        }
    }

    /// The CEL namespace of this operation's attributes (`http.method`);
    /// `None` for the session decision, which has none.
    pub fn namespace(self) -> Option<&'static str> {
        match self {
            OpKind::Connect => None,
            OpKind::Http => Some("http"),
            OpKind::Sql => Some("sql"),
            OpKind::Ssh => Some("ssh"),
        }
    }
}

/// The kind of an audit event (`events.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A decision about an operation (`connect`, `request`, ...).
    Op(OpKind),
    /// An HTTP response on its way to the loop.
    Response,
    /// An approver's decision that let a held operation through.
    Approval,
    /// The agent logged in upstream with the stored credential.
    Login,
    /// A PostgreSQL cancel request.
    Cancel,
    /// A DNS query of a tagged loop.
    Dns,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Op(k) => k.as_str(),
            EventKind::Response => "response",
            EventKind::Approval => "approval",
            EventKind::Login => "login",
            EventKind::Cancel => "cancel",
            EventKind::Dns => "dns",
        }
    }
}

impl From<OpKind> for EventKind {
    fn from(k: OpKind) -> Self {
        EventKind::Op(k)
    }
}

/// Why something was refused: the rule (or check) that refused it and a
/// reason for the loop and the audit. Each handler renders it in its own
/// protocol (an HTTP 403 JSON body, a PostgreSQL `ErrorResponse`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `file.toml#rule`, `target-default:<t>`, `jwt:<workload>`,
    /// `limit:sessions`, ...
    pub rule_id: String,
    pub reason: String,
}

impl Refusal {
    pub fn new(rule_id: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            rule_id: rule_id.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rule_id.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "rule {}: {}", self.rule_id, self.reason)
        }
    }
}

/// How a session ended (`sessions.outcome`, with its detail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Ended normally (the detail, if any, says how).
    Ok(Option<String>),
    /// Refused: at connect, by the second factor, or by a rule.
    Denied(String),
    /// The loop broke its protocol or went away mid-message.
    ClientError(String),
    UpstreamUnreachable(String),
    UpstreamError(String),
    /// Closed by the agent's shutdown.
    Shutdown,
    /// A policy reload withdrew the permission.
    Revoked(String),
    /// No bytes either way for the idle timeout.
    IdleTimeout(String),
    /// The handler ended without an outcome (it panicked or was dropped).
    AgentError(String),
}

impl Outcome {
    pub fn ok() -> Self {
        Outcome::Ok(None)
    }

    /// The `outcome` column.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok(_) => "ok",
            Outcome::Denied(_) => "denied",
            Outcome::ClientError(_) => "client_error",
            Outcome::UpstreamUnreachable(_) => "upstream_unreachable",
            Outcome::UpstreamError(_) => "upstream_error",
            Outcome::Shutdown => "shutdown",
            Outcome::Revoked(_) => "revoked",
            Outcome::IdleTimeout(_) => "idle_timeout",
            Outcome::AgentError(_) => "agent_error",
        }
    }

    /// The `detail` column.
    pub fn detail(&self) -> &str {
        match self {
            Outcome::Ok(d) => d.as_deref().unwrap_or(""),
            Outcome::Shutdown => "closed by agent shutdown",
            Outcome::Denied(d)
            | Outcome::ClientError(d)
            | Outcome::UpstreamUnreachable(d)
            | Outcome::UpstreamError(d)
            | Outcome::Revoked(d)
            | Outcome::IdleTimeout(d)
            | Outcome::AgentError(d) => d,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.detail() {
            "" => f.write_str(self.as_str()),
            d => write!(f, "{}: {d}", self.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_at_the_audit_boundary() {
        for p in Protocol::CONFIGURABLE {
            assert_eq!(Protocol::parse(p.as_str()), Some(p));
        }
        assert_eq!(Protocol::parse("dns"), None, "not configurable");
        assert_eq!(EventKind::from(OpKind::Http).as_str(), "request");
        assert_eq!(EventKind::Op(OpKind::Connect).as_str(), "connect");
        assert_eq!(
            Outcome::Shutdown.to_string(),
            "shutdown: closed by agent shutdown"
        );
        assert_eq!(Outcome::ok().detail(), "");
        assert_eq!(
            Refusal::new("a.toml#r", "no").to_string(),
            "rule a.toml#r: no"
        );
    }

    #[test]
    fn dns_is_not_a_configurable_protocol() {
        #[derive(Deserialize)]
        struct T {
            #[expect(dead_code, reason = "read by serde only")]
            protocol: Protocol,
        }
        assert!(toml::from_str::<T>("protocol = \"dns\"").is_err());
        assert!(toml::from_str::<T>("protocol = \"http\"").is_ok());
    }
}
