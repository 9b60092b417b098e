//! The agent's DNS resolver for tagged loops.
//!
//! With egress `deny` or `audit`, the kernel sends every DNS query of a
//! tagged loop here: UDP datagrams to port 53 are rewritten to the proxy's
//! address and port number in UDP (`sendmsg4|6`, and `connect4|6` for
//! connected sockets; `recvmsg4|6` makes replies show the resolver the loop
//! asked), and TCP connects to port 53 are redirected through the proxy like
//! any target. Each query is judged by name: under `deny` only the targets'
//! host names and `[agent] dns_allow` globs are answered (asked of the host's
//! resolvers from `/etc/resolv.conf`); the rest get REFUSED. Under `audit`
//! every name is answered. Every query is recorded (name, type, answer,
//! verdict) under the loop's workload. The wire format is hickory-proto's.
//!
//! Who sent a UDP query comes from the kernel: the sending socket is looked up
//! by its address with sock_diag, whose cgroup names the workload.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::RData,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};
use uuid::Uuid;

use crate::{
    audit::{now_micros, AuditSink, EventRow, Record, SessionRow},
    cgroup::WorkloadResolver,
};

/// Longest DNS message over UDP the resolver takes or sends (EDNS sizes).
const UDP_MAX: usize = 4096;
/// One exchange with an upstream resolver.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Queries answered at once (more wait).
const CONCURRENCY: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("not a DNS query: {0}")]
    Malformed(String),
    #[error("no upstream resolver answered: {0}")]
    Upstream(String),
}

/// What was decided for one query (for the audit and the tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub name: String,
    pub qtype: String,
    pub allowed: bool,
    pub rule_id: &'static str,
}

/// Which names a loop may resolve.
pub struct Policy {
    /// Answer every name (egress `audit`).
    pub answer_all: bool,
    /// Target host names (exact, lower case, no trailing dot).
    pub names: Vec<String>,
    /// `dns_allow` globs.
    pub globs: GlobSet,
}

impl Policy {
    pub fn new(answer_all: bool, names: Vec<String>, globs: &[String]) -> Result<Self, String> {
        let mut b = GlobSetBuilder::new();
        for g in globs {
            b.add(
                GlobBuilder::new(&normalize(g))
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| format!("dns_allow `{g}`: {e}"))?,
            );
        }
        Ok(Self {
            answer_all,
            names: names.iter().map(|n| normalize(n)).collect(),
            globs: b.build().map_err(|e| e.to_string())?,
        })
    }

    pub fn judge(&self, name: &str) -> (bool, &'static str) {
        let n = normalize(name);
        if self.names.contains(&n) {
            return (true, "dns:target");
        }
        if self.globs.is_match(&n) {
            return (true, "dns:allow");
        }
        if self.answer_all {
            return (true, "dns:audit");
        }
        (false, "dns:deny")
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `nameserver` addresses of a resolv.conf.
pub fn resolv_conf_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next()?.split('%').next()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// The resolvers of a resolv.conf, on port 53.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    resolv_conf_nameservers(text)
        .into_iter()
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Who asked, as the kernel says.
#[derive(Debug, Clone, Default)]
pub struct Asker {
    pub workload: String,
    pub cgroup: String,
    pub cgroup_id: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub netns_cookie: u64,
    pub session_id: Option<Uuid>,
}

pub struct Resolver {
    pub policy: arc_swap::ArcSwap<Policy>,
    pub upstreams: Vec<SocketAddr>,
    pub audit: Arc<dyn AuditSink>,
    pub workloads: Arc<WorkloadResolver>,
    pub host: String,
}

impl Resolver {
    /// Judges one query and produces the reply. `Err` only when the bytes
    /// are not a DNS query at all (nothing to answer).
    pub async fn answer(
        &self,
        query: &[u8],
        tcp: bool,
    ) -> Result<(Vec<u8>, Judged, String), DnsError> {
        let (msg, name, qtype) = match parse_query(query)? {
            Parsed::Question { msg, name, qtype } => (msg, name, qtype),
            Parsed::NotOne(reply) => {
                return Ok((
                    reply,
                    Judged {
                        name: String::new(),
                        qtype: String::new(),
                        allowed: false,
                        rule_id: "dns:malformed",
                    },
                    "FORMERR: exactly one question expected".into(),
                ))
            }
        };
        let (allowed, rule_id) = self.policy.load().judge(&name);
        let judged = Judged {
            name: normalize(&name),
            qtype,
            allowed,
            rule_id,
        };
        if !allowed {
            return Ok((
                refusal(&msg, ResponseCode::Refused),
                judged,
                "REFUSED".into(),
            ));
        }
        match self.exchange(query, tcp, msg.id()).await {
            Ok(reply) => {
                let summary = summarize(&reply);
                Ok((reply, judged, summary))
            }
            Err(e) => {
                tracing::warn!(error = %e, "DNS upstream failed");
                Ok((
                    refusal(&msg, ResponseCode::ServFail),
                    judged,
                    format!("SERVFAIL: {e}"),
                ))
            }
        }
    }

    /// Asks the host's resolvers, in order.
    async fn exchange(&self, query: &[u8], tcp: bool, id: u16) -> Result<Vec<u8>, DnsError> {
        let mut last = String::from("no nameserver in /etc/resolv.conf");
        for up in &self.upstreams {
            let r = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                if tcp {
                    exchange_tcp(*up, query).await
                } else {
                    exchange_udp(*up, query, id).await
                }
            })
            .await;
            match r {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => last = format!("{up}: {e}"),
                Err(_) => last = format!("{up}: no answer within {UPSTREAM_TIMEOUT:?}"),
            }
        }
        Err(DnsError::Upstream(last))
    }

    /// Records one query: a `dns` session (for UDP) and a `dns_query` event.
    pub fn record(&self, who: &Asker, judged: &Judged, answer: &str, resolver: Option<SocketAddr>) {
        let now = now_micros();
        let session_id = who.session_id.unwrap_or_else(Uuid::now_v7);
        let (verdict, reason) = if judged.allowed {
            ("allow", format!("answered: {answer}"))
        } else {
            (
                "deny",
                "the name is neither a target's nor in dns_allow".to_owned(),
            )
        };
        if who.session_id.is_none() {
            self.audit.record(Record::Session(SessionRow {
                session_id,
                version: 2,
                host: self.host.clone(),
                workload: who.workload.clone(),
                cgroup: who.cgroup.clone(),
                target: "(dns)".into(),
                protocol: "dns".into(),
                destination: resolver.map(|r| r.to_string()).unwrap_or_default(),
                pid: who.pid,
                tgid: who.pid,
                uid: who.uid,
                gid: who.gid,
                comm: who.comm.clone(),
                cgroup_id: who.cgroup_id,
                netns_cookie: who.netns_cookie,
                started_at: now,
                ended_at: now,
                bytes_up: 0,
                bytes_down: 0,
                outcome: if judged.allowed { "ok" } else { "denied" }.into(),
                detail: format!("{} {}: {answer}", judged.qtype, judged.name),
            }));
        }
        self.audit.record(Record::Event(EventRow {
            event_id: Uuid::now_v7(),
            session_id,
            ts: now,
            host: self.host.clone(),
            workload: who.workload.clone(),
            target: "(dns)".into(),
            protocol: "dns".into(),
            kind: "dns_query".into(),
            request: format!("{} {}", judged.qtype, judged.name),
            verdict: verdict.into(),
            rule_id: judged.rule_id.into(),
            reason,
            pid: who.pid,
            uid: who.uid,
            attr_keys: vec!["name".into(), "type".into(), "answer".into()],
            attr_values: vec![judged.name.clone(), judged.qtype.clone(), answer.to_owned()],
        }));
    }

    /// Serves UDP queries on `sock` until `stop`.
    pub async fn serve_udp(
        self: Arc<Self>,
        sock: UdpSocket,
        kernel: Arc<crate::ebpf::Kernel>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let sock = Arc::new(sock);
        let local = match sock.local_addr() {
            Ok(a) => a,
            Err(_) => return,
        };
        let limit = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let mut buf = vec![0u8; UDP_MAX];
        loop {
            let (n, from) = tokio::select! {
                _ = stop.cancelled() => return,
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "DNS socket receive failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let query = buf[..n].to_vec();
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let (this, sock, kernel) = (self.clone(), sock.clone(), kernel.clone());
            tokio::spawn(async move {
                let _permit = permit;
                // The sender is a tagged loop's socket, or no one is answered.
                let Some((who, resolver)) = this.asker_udp(from, local, &kernel) else {
                    tracing::debug!(%from, "DNS query from a socket that is not a tagged loop's; dropped");
                    return;
                };
                match this.answer(&query, false).await {
                    Ok((reply, judged, answer)) => {
                        this.record(&who, &judged, &answer, resolver);
                        let _ = sock.send_to(&reply, from).await;
                    }
                    Err(e) => tracing::debug!(%from, error = %e, "bad DNS query dropped"),
                }
            });
        }
    }

    /// The workload of the UDP socket at `from` (the kernel's answer).
    fn asker_udp(
        &self,
        from: SocketAddr,
        local: SocketAddr,
        kernel: &crate::ebpf::Kernel,
    ) -> Option<(Asker, Option<SocketAddr>)> {
        let info = crate::sockdiag::lookup_udp(from, local).ok()??;
        // Unknown cgroups are remembered as outside: an untagged process
        // sending here costs no rescan of the subtree.
        if !self.workloads.is_tagged(info.cgroup_id) {
            return None;
        }
        let w = self.workloads.resolve(&[info.cgroup_id])?;
        let resolver = kernel.dns_origin(info.cookie);
        Some((
            Asker {
                workload: w.workload,
                cgroup: w.cgroup,
                cgroup_id: info.cgroup_id,
                uid: info.uid,
                ..Default::default()
            },
            resolver,
        ))
    }
}

/// A query as the resolver sees it.
pub enum Parsed {
    /// One question: its name and type.
    Question {
        msg: Message,
        name: String,
        qtype: String,
    },
    /// Not exactly one question: the FORMERR reply to send.
    NotOne(Vec<u8>),
}

/// Parses a loop's DNS message (hickory-proto). `Err`: not a query at all,
/// nothing to answer.
pub fn parse_query(query: &[u8]) -> Result<Parsed, DnsError> {
    let msg = Message::from_vec(query).map_err(|e| DnsError::Malformed(e.to_string()))?;
    if msg.message_type() != MessageType::Query {
        return Err(DnsError::Malformed("a response, not a query".into()));
    }
    if msg.queries().len() != 1 {
        return Ok(Parsed::NotOne(refusal(&msg, ResponseCode::FormErr)));
    }
    let q = &msg.queries()[0];
    let name = q.name().to_ascii();
    let qtype = q.query_type().to_string();
    Ok(Parsed::Question { msg, name, qtype })
}

/// The REFUSED reply to a parsed query (what a denied name gets).
pub fn refused(msg: &Message) -> Vec<u8> {
    refusal(msg, ResponseCode::Refused)
}

/// A reply with `code` and the query's question, nothing else.
fn refusal(q: &Message, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::error_msg(q.id(), q.op_code(), code);
    m.set_recursion_desired(q.recursion_desired());
    m.set_recursion_available(true);
    for query in q.queries() {
        m.add_query(query.clone());
    }
    m.to_vec().unwrap_or_default()
}

/// The answer's addresses (or its code), for the audit.
fn summarize(reply: &[u8]) -> String {
    let Ok(m) = Message::from_vec(reply) else {
        return "unparsable upstream reply".into();
    };
    let addrs: Vec<String> = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0).to_string()),
            RData::AAAA(a) => Some(IpAddr::V6(a.0).to_string()),
            RData::CNAME(c) => Some(format!("CNAME {}", c.0)),
            _ => None,
        })
        .collect();
    if addrs.is_empty() {
        m.response_code().to_string()
    } else {
        addrs.join(" ")
    }
}

async fn exchange_udp(up: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if up.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind).await?;
    s.connect(up).await?;
    s.send(query).await?;
    let mut buf = vec![0u8; UDP_MAX];
    loop {
        let n = s.recv(&mut buf).await?;
        // Only the answer to this query (same id) counts.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let mut out = Vec::with_capacity(2 + query.len());
    out.extend_from_slice(&(query.len() as u16).to_be_bytes());
    out.extend_from_slice(query);
    s.write_all(&out).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut reply).await?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::Query,
        rr::{Name, RecordType},
    };

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(4242);
        m.set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    struct Nothing;
    impl AuditSink for Nothing {
        fn record(&self, _: Record) {}
        fn stats(&self) -> crate::audit::SinkStats {
            Default::default()
        }
    }

    fn policy(all: bool) -> Policy {
        Policy::new(all, vec!["db.internal".into()], &["*.corp.example".into()]).unwrap()
    }

    #[test]
    fn nameservers_from_resolv_conf() {
        let t =
            "# comment\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch x\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_nameservers(t),
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn names_are_judged_by_target_and_glob() {
        let p = policy(false);
        assert_eq!(p.judge("DB.Internal."), (true, "dns:target"));
        assert_eq!(p.judge("api.corp.example"), (true, "dns:allow"));
        assert_eq!(p.judge("a.b.corp.example"), (true, "dns:allow"));
        assert_eq!(p.judge("corp.example"), (false, "dns:deny"));
        assert_eq!(p.judge("exfil.attacker.example"), (false, "dns:deny"));
        assert_eq!(policy(true).judge("anything.example"), (true, "dns:audit"));
    }

    #[tokio::test]
    async fn refused_names_get_refused_with_the_question() {
        let r = Resolver {
            policy: arc_swap::ArcSwap::from_pointee(policy(false)),
            upstreams: vec![],
            audit: Arc::new(Nothing),
            workloads: Arc::new(WorkloadResolver::new("/nonexistent".into(), "x", vec![])),
            host: "h".into(),
        };
        let (reply, judged, _) = r
            .answer(&query("secret.attacker.example"), false)
            .await
            .unwrap();
        assert!(!judged.allowed);
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.id(), 4242);
        assert_eq!(m.response_code(), ResponseCode::Refused);
        assert_eq!(m.queries().len(), 1);
        // An allowed name with no upstream: SERVFAIL, still judged allowed.
        let (reply, judged, _) = r.answer(&query("db.internal"), false).await.unwrap();
        assert!(judged.allowed);
        assert_eq!(
            Message::from_vec(&reply).unwrap().response_code(),
            ResponseCode::ServFail
        );
        // Garbage is not answered.
        assert!(r.answer(b"\x00\x01garbage", false).await.is_err());
    }
}
