//! Protocol handlers. Each gets an accepted loop connection whose identity
//! and original destination are known, with its [`Session`], and serves it
//! until it ends.
//!
//! - `http` terminates HTTP/1.1 and decides each request;
//! - `postgres` answers the start-up and logs in upstream with the stored
//!   credential, then relays;
//! - `dns` answers DNS over TCP from the agent's resolver (each query judged);
//! - `tcp` relays bytes; targets whose protocol has no handler yet (ssh,
//!   https, kubernetes) are relayed as raw TCP (the agent says so at start-up).
//!
//! Adding a protocol: a folder `protocol/<name>/` with a type implementing
//! [`ProtocolHandler`], its operation variant in `policy::Operation` (and
//! `kinds::OpKind`), and one line in [`Registry::new`].

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::net::TcpStream;

pub use crate::kinds::Protocol;
use crate::{kinds::Outcome, session::Session};

pub mod dns;
pub mod http;
pub mod postgres;
pub mod ssh;
pub mod tcp;

/// A protocol handler: what it can do (default-bodied hooks) and how it
/// serves a session.
#[async_trait::async_trait]
pub trait ProtocolHandler: Send + Sync + 'static {
    /// The protocol it serves.
    fn protocol(&self) -> Protocol;

    /// Whether it decides operations inside a session (requests,
    /// statements, commands). When it does not, a rule that would deny or
    /// hold such operations cannot be enforced, and the session is refused.
    fn sees_requests(&self) -> bool {
        false
    }

    /// Whether the loop can present a JWT second factor on this protocol
    /// (then the session decision waits for the token).
    fn carries_second_factor(&self) -> bool {
        false
    }

    /// Whether it sends the target's stored credential upstream: the proxy
    /// then checks that no tagged loop owns the listener at the destination.
    fn sends_credential(&self) -> bool {
        false
    }

    /// Whether the session is decided by the policy when it opens (`false`
    /// for DNS, whose every query is judged by name instead).
    fn decided_at_connect(&self) -> bool {
        true
    }

    /// Serves the loop's connection until it ends; returns how it ended.
    /// The session's closing row is written by the proxy.
    async fn serve(&self, session: Arc<Session>, client: TcpStream) -> Outcome;
}

/// What handlers are built with.
pub struct Settings {
    /// The resolver of tagged loops' DNS, when egress is filtered.
    pub dns: Option<Arc<crate::dns::Resolver>>,
    /// Raw TCP sessions idle this long are closed.
    pub tcp_idle_timeout: Duration,
    /// The agent's CA (`state_dir/ca`): certificates for loops that ask
    /// for TLS.
    pub ca: Option<Arc<crate::ca::AgentCa>>,
    /// The agent's SSH host CA (`state_dir/ssh`), when there are SSH
    /// targets.
    pub ssh_ca: Option<Arc<crate::ssh_ca::SshHostCa>>,
}

/// Handlers by protocol; protocols without one are relayed as raw TCP.
pub struct Registry {
    handlers: HashMap<Protocol, Arc<dyn ProtocolHandler>>,
    raw: Arc<dyn ProtocolHandler>,
}

impl Registry {
    pub fn new(settings: Settings) -> Self {
        let raw: Arc<dyn ProtocolHandler> = Arc::new(tcp::Tcp {
            idle_timeout: settings.tcp_idle_timeout,
        });
        let mut r = Registry {
            handlers: HashMap::new(),
            raw: raw.clone(),
        };
        r.add(raw);
        r.add(Arc::new(http::Http));
        r.add(Arc::new(postgres::Postgres::new(settings.ca.clone())));
        r.add(Arc::new(ssh::Ssh {
            ca: settings.ssh_ca.clone(),
            pool: Arc::default(),
        }));
        if let Some(resolver) = settings.dns {
            r.add(Arc::new(dns::Dns { resolver }));
        }
        r
    }

    /// Registers (or replaces) the handler of `h.protocol()`.
    pub(crate) fn add(&mut self, h: Arc<dyn ProtocolHandler>) {
        self.handlers.insert(h.protocol(), h);
    }

    /// The handler of `p` (raw TCP when it has none).
    pub fn get(&self, p: Protocol) -> &Arc<dyn ProtocolHandler> {
        self.handlers.get(&p).unwrap_or(&self.raw)
    }

    /// Whether `p` has a handler of its own.
    pub fn handles(&self, p: Protocol) -> bool {
        self.handlers.contains_key(&p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_without_a_handler_are_relayed_as_raw_tcp() {
        let r = Registry::new(Settings {
            dns: None,
            tcp_idle_timeout: Duration::from_secs(1),
            ca: None,
            ssh_ca: None,
        });
        for p in [
            Protocol::Http,
            Protocol::Postgres,
            Protocol::Ssh,
            Protocol::Tcp,
        ] {
            assert!(r.handles(p));
            assert_eq!(r.get(p).protocol(), p);
        }
        for p in [Protocol::Https, Protocol::Kubernetes, Protocol::Dns] {
            assert!(!r.handles(p), "{p}");
            assert_eq!(r.get(p).protocol(), Protocol::Tcp);
        }
        let http = r.get(Protocol::Http);
        assert!(http.sees_requests() && http.carries_second_factor() && http.sends_credential());
        let tcp = r.get(Protocol::Tcp);
        assert!(!tcp.sees_requests() && !tcp.carries_second_factor() && !tcp.sends_credential());
    }
}
