//! Raw TCP (`protocol = "tcp"`, and every protocol without a handler of its
//! own yet): splice(2) both ways (zero-copy through a pipe per direction),
//! count bytes, report how it ended. Sessions idle for
//! `agent.tcp_idle_timeout_secs` are closed.
//!
//! [`relay_streams`] and [`relay_io`] are also what other handlers use once
//! their protocol's start-up is done (PostgreSQL after the login).

use std::{
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use std::os::fd::{AsFd, OwnedFd};

use tokio::{io::Interest, net::TcpStream};
use tokio_util::sync::CancellationToken;

use super::ProtocolHandler;
use crate::{
    audit::capture::{Capture, CaptureStream, Side},
    kinds::{Outcome, Protocol},
    session::{Counters, Session},
};

/// Most bytes moved per splice call, and the pipe size asked for.
const BUF: usize = 1 << 20;
const PIPE_SIZE: i32 = 1 << 20;
/// Bytes per direction copied through user space before switching to splice.
const COPY_LIMIT: usize = 256 * 1024;
const COPY_BUF: usize = 32 * 1024;

/// The raw TCP handler.
pub struct Tcp {
    /// Sessions with no bytes either way for this long are closed.
    pub idle_timeout: Duration,
}

#[async_trait::async_trait]
impl ProtocolHandler for Tcp {
    fn protocol(&self) -> Protocol {
        Protocol::Tcp
    }

    async fn serve(&self, s: Arc<Session>, client: TcpStream) -> Outcome {
        let relay = async {
            match s.connect_upstream().await {
                Ok(server) => {
                    relay_streams(
                        client,
                        server,
                        s.counters().clone(),
                        s.capture(),
                        s.closed().clone(),
                    )
                    .await
                }
                Err(o) => o,
            }
        };
        tokio::select! {
            out = relay => out,
            idle = idle_for(s.counters(), self.idle_timeout) => Outcome::IdleTimeout(format!(
                "no bytes either way for {} s (agent.tcp_idle_timeout_secs)",
                idle.as_secs()
            )),
        }
    }
}

/// Resolves once the session's byte counters have not moved for `limit`.
async fn idle_for(counters: &Counters, limit: Duration) -> Duration {
    let step = (limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut last = counters.total();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = counters.total();
        if now != last {
            last = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= limit {
            return limit;
        }
    }
}

/// Relays between two connected sockets (see [`relay`]).
pub async fn relay_streams(
    client: TcpStream,
    server: TcpStream,
    counters: Arc<Counters>,
    capture: Option<Capture>,
    abort: CancellationToken,
) -> Outcome {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let up = pump(
        &client,
        &server,
        &counters.up,
        Side::Client,
        capture.as_ref(),
    );
    let down = pump(
        &server,
        &client,
        &counters.down,
        Side::Upstream,
        capture.as_ref(),
    );
    both_ways(up, down, abort).await
}

/// Relays between the loop's socket and an upstream stream that cannot be
/// spliced (TLS): copies through user space both ways, with the same
/// counters, capture, half-close and outcomes as [`relay_streams`].
pub async fn relay_io<S>(
    client: TcpStream,
    server: S,
    counters: Arc<Counters>,
    capture: Option<Capture>,
    abort: CancellationToken,
) -> Outcome
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = client.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = tokio::io::split(server);
    let up = copy_dir(
        &mut cr,
        &mut sw,
        &counters.up,
        Side::Client,
        capture.clone(),
    );
    let down = copy_dir(&mut sr, &mut cw, &counters.down, Side::Upstream, capture);
    both_ways(up, down, abort).await
}

/// Runs both directions to the end. An error in either ends the session at
/// once; a clean EOF only ends its own direction (half-close), so
/// request/response over a half-closed socket keeps working.
async fn both_ways(
    up: impl std::future::Future<Output = Result<(), PumpError>>,
    down: impl std::future::Future<Output = Result<(), PumpError>>,
    abort: CancellationToken,
) -> Outcome {
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return e.outcome(),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return e.outcome(),
            },
            _ = abort.cancelled() => {
                return Outcome::Shutdown
            }
        }
    }
    Outcome::ok()
}

/// One direction of [`relay_io`]; on EOF it shuts the other side's writing half.
async fn copy_dir<R, W>(
    from: &mut R,
    to: &mut W,
    counter: &AtomicU64,
    side: Side,
    capture: Option<Capture>,
) -> Result<(), PumpError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let other = match side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    let limit = capture.as_ref().map_or(0, |c| c.limit);
    let mut cap = capture.map(|c| CaptureStream::new(c, side));
    let mut seen = 0u64;
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = from.read(&mut buf).await.map_err(|err| PumpError {
            side,
            op: "reading from",
            err,
        })?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(|err| PumpError {
            side: other,
            op: "writing to",
            err,
        })?;
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = cap.as_mut() {
            if seen < limit {
                c.push(&buf[..n.min((limit - seen) as usize)]);
            }
            seen += n as u64;
        }
    }
}

/// A failed direction: which side failed, doing what.
#[derive(Debug)]
struct PumpError {
    side: Side,
    op: &'static str,
    err: std::io::Error,
}

impl PumpError {
    fn outcome(&self) -> Outcome {
        match self.side {
            Side::Client => Outcome::ClientError(self.to_string()),
            Side::Upstream => Outcome::UpstreamError(self.to_string()),
        }
    }
}

impl std::fmt::Display for PumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.op, self.side.name(), self.err)
    }
}

/// A kernel pipe used as the splice buffer of one direction.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Self> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe moves more per splice; failure only costs speed.
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Self { r, w })
    }
}

/// splice(2) between two descriptors, no offsets, non-blocking.
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> std::io::Result<usize> {
    use nix::fcntl::SpliceFFlags;
    Ok(nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )?)
}

/// Moves one direction. The first `COPY_LIMIT` bytes are copied through a
/// small buffer (cheapest for short request/response sessions); after that the
/// direction switches to splice(2) through a pipe, with no copy through user
/// space. On EOF it half-closes the other side.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    side: Side,
    capture: Option<&Capture>,
) -> Result<(), PumpError> {
    let other = match side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    let fail = |side, op, err| PumpError { side, op, err };
    let mut copied = 0usize;
    let mut cap = capture.map(|c| CaptureStream::new(c.clone(), side));
    let capture_limit = capture.map_or(0, |c| c.limit as usize);
    let copy_limit = COPY_LIMIT.max(capture_limit);
    let mut buf = vec![0u8; COPY_BUF];
    while copied < copy_limit {
        let n = loop {
            from.readable()
                .await
                .map_err(|e| fail(side, "reading from", e))?;
            match from.try_read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(fail(side, "reading from", e)),
            }
        };
        if n == 0 {
            half_close(to);
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            to.writable()
                .await
                .map_err(|e| fail(other, "writing to", e))?;
            match to.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(fail(other, "writing to", e)),
            }
        }
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = cap.as_mut() {
            if copied < capture_limit {
                c.push(&buf[..n.min(capture_limit - copied)]);
            }
        }
        copied += n;
    }
    // Capture is over for this direction: record what was held back.
    drop(cap);
    drop(buf);
    let pipe = Pipe::new().map_err(|e| fail(side, "creating a pipe for", e))?;
    loop {
        // Socket → pipe.
        let n = loop {
            from.readable()
                .await
                .map_err(|e| fail(side, "reading from", e))?;
            match from.try_io(Interest::READABLE, || splice(from, &pipe.w, BUF)) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(fail(side, "reading from", e)),
            }
        };
        if n == 0 {
            break;
        }
        // Pipe → socket, until the pipe is empty again.
        let mut left = n;
        while left > 0 {
            to.writable()
                .await
                .map_err(|e| fail(other, "writing to", e))?;
            match to.try_io(Interest::WRITABLE, || splice(&pipe.r, to, left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(fail(other, "writing to", e)),
            }
        }
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
    half_close(to);
    Ok(())
}

/// Propagates a half-close; the peer may already be gone, which is fine.
fn half_close(to: &TcpStream) {
    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::SocketAddr, sync::atomic::Ordering};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// A client connected to a relay task towards `upstream`.
    async fn relayed(
        upstream: SocketAddr,
        abort: CancellationToken,
    ) -> (TcpStream, tokio::task::JoinHandle<Outcome>, Arc<Counters>) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            let (sock, _) = front.accept().await.unwrap();
            match crate::session::connect(upstream, Duration::from_secs(2)).await {
                Ok(server) => relay_streams(sock, server, c, None, abort).await,
                Err(o) => o,
            }
        });
        (TcpStream::connect(addr).await.unwrap(), task, counters)
    }

    #[tokio::test]
    async fn relays_both_ways_across_the_splice_switch_and_half_close() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = server.local_addr().unwrap();
        // The server reads everything until EOF, then answers with a digest and
        // a large body: request/response over a half-closed connection.
        let srv = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            let sum: u64 = got.iter().map(|&b| b as u64).sum();
            s.write_all(&sum.to_le_bytes()).await.unwrap();
            s.write_all(&vec![9u8; 3 << 20]).await.unwrap();
            got.len()
        });
        let (mut client, task, counters) = relayed(upstream, CancellationToken::new()).await;
        // More than COPY_LIMIT, so both the copy and the splice paths run.
        let payload: Vec<u8> = (0..(2usize << 20)).map(|i| (i % 251) as u8).collect();
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let sum: u64 = payload.iter().map(|&b| b as u64).sum();
        assert_eq!(&answer[..8], &sum.to_le_bytes());
        assert_eq!(answer.len(), 8 + (3 << 20));
        assert!(answer[8..].iter().all(|&b| b == 9));
        assert_eq!(srv.await.unwrap(), payload.len());
        let out = task.await.unwrap();
        assert_eq!(out, Outcome::ok());
        assert_eq!(counters.up.load(Ordering::Relaxed), payload.len() as u64);
        assert_eq!(counters.down.load(Ordering::Relaxed), 8 + (3 << 20));
    }

    #[tokio::test]
    async fn unreachable_upstream_is_reported_and_the_client_closed() {
        // A port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = l.local_addr().unwrap();
        drop(l);
        let (mut client, task, _) = relayed(dead, CancellationToken::new()).await;
        let out = task.await.unwrap();
        assert_eq!(out.as_str(), "upstream_unreachable");
        assert!(out.detail().contains(&dead.to_string()));
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.unwrap_or(0), 0);
    }

    #[tokio::test]
    async fn abort_closes_an_idle_session() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = server.local_addr().unwrap();
        let _srv = tokio::spawn(async move {
            let (s, _) = server.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let abort = CancellationToken::new();
        let (_client, task, _) = relayed(upstream, abort.clone()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        abort.cancel();
        let out = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, Outcome::Shutdown);
    }
}
