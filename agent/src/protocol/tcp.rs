//! Raw TCP: splice both ways, count bytes, report how it ended.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};
use tokio_util::sync::CancellationToken;

const BUF: usize = 64 * 1024;

/// Live byte counters of a session (read by `loopgate status`).
#[derive(Debug, Default)]
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `ok`, `upstream_unreachable`, `client_error`, `upstream_error`, `shutdown`.
    pub outcome: &'static str,
    pub detail: Option<String>,
}

impl Outcome {
    fn new(outcome: &'static str, detail: Option<String>) -> Self {
        Self { outcome, detail }
    }
}

/// Connects to `upstream` and relays until both directions are closed, an error
/// occurs, or `abort` fires (agent shutdown past its grace period).
pub async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    connect_timeout: Duration,
    counters: Arc<Counters>,
    abort: CancellationToken,
) -> Outcome {
    let server = match tokio::time::timeout(connect_timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Outcome::new(
                "upstream_unreachable",
                Some(format!("connect {upstream}: {e}")),
            )
        }
        Err(_) => {
            return Outcome::new(
                "upstream_unreachable",
                Some(format!(
                    "connect {upstream}: timed out after {connect_timeout:?}"
                )),
            )
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, counters.clone(), true);
    let down = pump(sr, cw, counters, false);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    // An error in either direction ends the session at once; a clean EOF only
    // ends its own direction (half-close), so request/response over a
    // half-closed socket keeps working.
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return Outcome::new("client_error", Some(e)),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return Outcome::new("upstream_error", Some(e)),
            },
            _ = abort.cancelled() => {
                return Outcome::new("shutdown", Some("closed by agent shutdown".into()))
            }
        }
    }
    Outcome::new("ok", None)
}

/// Copies one direction; on EOF half-closes the other side.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    counters: Arc<Counters>,
    upward: bool,
) -> Result<(), String> {
    let mut buf = vec![0u8; BUF];
    let (src, dst) = if upward {
        ("client", "upstream")
    } else {
        ("upstream", "client")
    };
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Err(format!("reading from {src}: {e}")),
        };
        to.write_all(&buf[..n])
            .await
            .map_err(|e| format!("writing to {dst}: {e}"))?;
        let c = if upward { &counters.up } else { &counters.down };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Propagate the half-close; the peer may already be gone, which is fine.
    let _ = to.shutdown().await;
    Ok(())
}
