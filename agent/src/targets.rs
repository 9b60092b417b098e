//! Registered targets: config entries, their resolved addresses, and the
//! `(ip, port) → target id` entries the kernel programs look up.
//!
//! Host names are resolved at start-up and again every
//! `resolve_interval_secs`; a name that does not resolve is reported and
//! retried, and the addresses it had keep being enforced.

use std::{
    collections::HashMap,
    net::{SocketAddr, ToSocketAddrs},
    sync::RwLock,
};

use loopgate_common::{TargetKey, TargetValue};
use serde::Serialize;

use crate::{
    config::{Protocol, TargetAddress, TargetConfig},
    ebpf::target_key,
};

pub struct TargetTable {
    entries: Vec<Entry>,
}

struct Entry {
    name: String,
    protocol: Protocol,
    address: TargetAddress,
    state: RwLock<Resolved>,
}

#[derive(Default, Clone)]
struct Resolved {
    addrs: Vec<SocketAddr>,
    /// The addresses before the last change (connects made just before a
    /// re-resolution still carry them).
    previous: Vec<SocketAddr>,
    error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetStatus {
    pub id: u32,
    pub name: String,
    pub address: String,
    pub protocol: Protocol,
    pub resolved: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolve_error: Option<String>,
}

impl TargetTable {
    pub fn new(cfg: &[TargetConfig]) -> Self {
        let entries = cfg
            .iter()
            .map(|t| Entry {
                name: t.name.clone(),
                protocol: t.protocol,
                // Validated when the config was loaded.
                address: TargetAddress::parse(&t.address).unwrap_or(TargetAddress::Host {
                    host: t.address.clone(),
                    port: 0,
                }),
                state: RwLock::new(Resolved::default()),
            })
            .collect();
        Self { entries }
    }

    /// Target id (1-based; 0 is egress audit) → (name, protocol).
    pub fn get(&self, id: u32) -> Option<(&str, Protocol)> {
        let e = self.entries.get((id as usize).checked_sub(1)?)?;
        Some((e.name.as_str(), e.protocol))
    }

    /// The configured address of a target.
    pub fn address(&self, id: u32) -> Option<&TargetAddress> {
        Some(&self.entries.get((id as usize).checked_sub(1)?)?.address)
    }

    /// Resolves every host name (blocking; call off the async runtime) and
    /// returns the kernel map contents. Names that fail keep their last addresses.
    pub fn resolve(&self) -> HashMap<TargetKey, TargetValue> {
        let mut map = HashMap::new();
        for (i, e) in self.entries.iter().enumerate() {
            let fresh = match &e.address {
                TargetAddress::Ip(a) => Ok(vec![*a]),
                TargetAddress::Host { host, port } => (host.as_str(), *port)
                    .to_socket_addrs()
                    .map(|it| {
                        let mut v: Vec<SocketAddr> = it.collect();
                        v.sort();
                        v.dedup();
                        v
                    })
                    .map_err(|err| err.to_string()),
            };
            let mut st = match e.state.write() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            match fresh {
                Ok(addrs) if !addrs.is_empty() => {
                    if st.addrs != addrs {
                        tracing::info!(target_name = %e.name, addresses = ?addrs, "target resolved");
                        let previous = std::mem::take(&mut st.addrs);
                        *st = Resolved {
                            addrs,
                            previous,
                            error: None,
                        };
                    } else {
                        st.error = None;
                    }
                }
                Ok(_) => st.error = Some("resolved to no address".into()),
                Err(err) => {
                    if st.error.as_deref() != Some(err.as_str()) {
                        tracing::warn!(target_name = %e.name, address = %e.address, error = %err,
                            "cannot resolve target; keeping its previous addresses");
                    }
                    st.error = Some(err);
                }
            }
            for a in &st.addrs {
                map.insert(
                    target_key(*a),
                    TargetValue {
                        target_id: i as u32 + 1,
                        flags: 0,
                    },
                );
            }
        }
        map
    }

    /// Whether `destination` is an address of target `id` (as resolved now
    /// or before the last change). The kernel's record names the target by
    /// id, looked up in a map the agent rewrites on re-resolution: a record
    /// whose destination is not the target's is not trusted with the
    /// target's credential.
    pub fn owns(&self, id: u32, destination: SocketAddr) -> bool {
        let Some(e) = id.checked_sub(1).and_then(|i| self.entries.get(i as usize)) else {
            return false;
        };
        let want = canonical(destination);
        let st = match e.state.read() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        st.addrs
            .iter()
            .chain(st.previous.iter())
            .any(|a| canonical(*a) == want)
    }

    pub fn status(&self) -> Vec<TargetStatus> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let st = e.state.read().map(|s| s.clone()).unwrap_or_default();
                TargetStatus {
                    id: i as u32 + 1,
                    name: e.name.clone(),
                    address: e.address.to_string(),
                    protocol: e.protocol,
                    resolved: st.addrs.iter().map(|a| a.to_string()).collect(),
                    resolve_error: st.error,
                }
            })
            .collect()
    }

    pub fn protocols(&self) -> impl Iterator<Item = (&str, Protocol)> {
        self.entries.iter().map(|e| (e.name.as_str(), e.protocol))
    }
}

/// A v4-mapped IPv6 address as IPv4 (the kernel keys both forms the same).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(crate::ebpf::canonical_ip(a.ip()), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_one_based_and_localhost_resolves() {
        let cfg = vec![
            TargetConfig {
                name: "web".into(),
                address: "127.10.0.5:80".into(),
                protocol: Protocol::Http,
                credential: None,
                auth_methods: None,
                pool_size: None,
                pool_idle_timeout_secs: None,
                max_message_bytes: None,
                max_result_message_bytes: None,
            },
            TargetConfig {
                name: "local".into(),
                address: "localhost:5432".into(),
                protocol: Protocol::Postgres,
                credential: None,
                auth_methods: None,
                pool_size: None,
                pool_idle_timeout_secs: None,
                max_message_bytes: None,
                max_result_message_bytes: None,
            },
        ];
        let t = TargetTable::new(&cfg);
        let map = t.resolve();
        assert_eq!(
            map.get(&target_key("127.10.0.5:80".parse().unwrap())),
            Some(&TargetValue {
                target_id: 1,
                flags: 0
            })
        );
        assert_eq!(
            map.get(&target_key("127.0.0.1:5432".parse().unwrap()))
                .map(|v| v.target_id),
            Some(2)
        );
        assert_eq!(t.get(2).map(|x| x.0), Some("local"));
        assert_eq!(t.get(0), None);
        assert_eq!(t.get(3), None);
    }
}
