//! DNS over TCP from tagged loops (redirected to the proxy with the DNS
//! target id): each query is judged by name and answered by the agent's
//! resolver ([`crate::dns`]), like the UDP queries the resolver serves
//! itself. There is no session decision at connect.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::ProtocolHandler;
use crate::{
    dns::{Asker, Resolver},
    kinds::{Outcome, Protocol},
    session::{Counters, Session},
};

/// A connection with no query for this long is closed.
const IDLE: Duration = Duration::from_secs(30);

pub struct Dns {
    pub resolver: Arc<Resolver>,
}

#[async_trait::async_trait]
impl ProtocolHandler for Dns {
    fn protocol(&self) -> Protocol {
        Protocol::Dns
    }

    fn sees_requests(&self) -> bool {
        true
    }

    fn decided_at_connect(&self) -> bool {
        false
    }

    async fn serve(&self, s: Arc<Session>, client: TcpStream) -> Outcome {
        let row = s.row();
        let who = Asker {
            workload: row.workload.clone(),
            cgroup: row.cgroup.clone(),
            cgroup_id: row.cgroup_id,
            pid: row.tgid,
            uid: row.uid,
            gid: row.gid,
            comm: row.comm.clone(),
            netns_cookie: row.netns_cookie,
            session_id: Some(row.session_id),
        };
        serve_tcp(&self.resolver, client, &who, s.counters()).await
    }
}

/// Each length-prefixed query is judged, answered and recorded as an event
/// of the session.
async fn serve_tcp(
    resolver: &Resolver,
    mut client: TcpStream,
    who: &Asker,
    counters: &Counters,
) -> Outcome {
    let mut len = [0u8; 2];
    loop {
        let r = tokio::time::timeout(IDLE, client.read_exact(&mut len)).await;
        let Ok(Ok(_)) = r else {
            return Outcome::ok();
        };
        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
        if client.read_exact(&mut q).await.is_err() {
            return Outcome::ClientError("the DNS query was cut short".into());
        }
        counters.up.fetch_add(2 + q.len() as u64, Ordering::Relaxed);
        let (reply, judged, answer) = match resolver.answer(&q, true).await {
            Ok(x) => x,
            Err(e) => return Outcome::ClientError(e.to_string()),
        };
        resolver.record(who, &judged, &answer, None);
        let mut out = Vec::with_capacity(2 + reply.len());
        out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        out.extend_from_slice(&reply);
        if let Err(e) = client.write_all(&out).await {
            return Outcome::ClientError(format!("writing the DNS answer: {e}"));
        }
        counters.down.fetch_add(out.len() as u64, Ordering::Relaxed);
    }
}
