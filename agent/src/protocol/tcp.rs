//! Raw TCP: splice(2) both ways (zero-copy through a pipe per direction),
//! count bytes, report how it ended.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::{io::Interest, net::TcpStream};
use uuid::Uuid;

use crate::{
    audit::{
        now_micros,
        rows::{ChunkRow, Record, DIRECTION_DOWN, DIRECTION_UP},
        AuditSink,
    },
    secrets::Masker,
};
use tokio_util::sync::CancellationToken;

/// Most bytes moved per splice call, and the pipe size asked for.
const BUF: usize = 1 << 20;
const PIPE_SIZE: libc::c_int = 1 << 20;
/// Bytes per direction copied through user space before switching to splice.
const COPY_LIMIT: usize = 256 * 1024;
const COPY_BUF: usize = 32 * 1024;

/// Payload capture of a session: the first `limit` bytes of each direction
/// become `chunks` rows, after the masking hook.
#[derive(Clone)]
pub struct Capture {
    pub session_id: Uuid,
    pub sink: Arc<dyn AuditSink>,
    pub limit: u64,
    pub masker: Arc<dyn Masker>,
}

impl Capture {
    fn emit(&self, side: Side, seq: u32, offset: u64, ts: i64, data: Vec<u8>, masked: bool) {
        self.sink.record(Record::Chunk(ChunkRow {
            session_id: self.session_id,
            direction: match side {
                Side::Client => DIRECTION_UP,
                Side::Upstream => DIRECTION_DOWN,
            },
            seq,
            offset,
            ts,
            data,
            masked: masked as u8,
        }));
    }
}

/// One direction's capture. Masking runs over the bytes not yet recorded,
/// and the last `max_secret_len - 1` bytes are held back until more arrive
/// (or the direction ends), so a secret split across two reads is still
/// masked as a whole. Dropping it records what is held back.
pub(crate) struct CaptureStream {
    capture: Capture,
    side: Side,
    pending: Vec<u8>,
    /// Stream offset of `pending[0]`.
    offset: u64,
    /// When the bytes in `pending` were read (held-back bytes keep the time
    /// they arrived, so replay orders them where they belong).
    pending_ts: i64,
    seq: u32,
    masked: bool,
}

impl CaptureStream {
    pub(crate) fn new(capture: Capture, side: Side) -> Self {
        Self {
            capture,
            side,
            pending: Vec::new(),
            offset: 0,
            pending_ts: 0,
            seq: 0,
            masked: false,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let now = now_micros();
        if self.pending.is_empty() {
            self.pending_ts = now;
        }
        self.pending.extend_from_slice(bytes);
        self.masked |= self.capture.masker.mask(&mut self.pending);
        let keep = self.capture.masker.max_len().saturating_sub(1);
        if self.pending.len() > keep {
            let rest = self.pending.split_off(self.pending.len() - keep);
            let out = std::mem::replace(&mut self.pending, rest);
            self.emit(out);
            self.pending_ts = now;
        }
    }

    /// Marks the next recorded chunk as masked (for bytes masked before they
    /// reached the capture).
    pub(crate) fn mark_masked(&mut self) {
        self.masked = true;
    }

    fn emit(&mut self, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let n = data.len() as u64;
        self.capture.emit(
            self.side,
            self.seq,
            self.offset,
            self.pending_ts,
            data,
            std::mem::take(&mut self.masked),
        );
        self.offset += n;
        self.seq += 1;
    }
}

impl Drop for CaptureStream {
    fn drop(&mut self) {
        let rest = std::mem::take(&mut self.pending);
        self.emit(rest);
    }
}

/// Live byte counters of a session (read by `loopgate status`).
#[derive(Debug, Default)]
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `ok`, `upstream_unreachable`, `client_error`, `upstream_error`,
    /// `shutdown` (and `revoked`, set by the proxy).
    pub outcome: &'static str,
    pub detail: Option<String>,
}

impl Outcome {
    pub(crate) fn new(outcome: &'static str, detail: Option<String>) -> Self {
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
    capture: Option<Capture>,
    abort: CancellationToken,
) -> Outcome {
    match connect(upstream, connect_timeout).await {
        Ok(server) => relay_streams(client, server, counters, capture, abort).await,
        Err(o) => o,
    }
}

/// Connects to the upstream, within `connect_timeout`.
pub async fn connect(
    upstream: SocketAddr,
    connect_timeout: Duration,
) -> Result<TcpStream, Outcome> {
    match tokio::time::timeout(connect_timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(Outcome::new(
            "upstream_unreachable",
            Some(format!("connect {upstream}: {e}")),
        )),
        Err(_) => Err(Outcome::new(
            "upstream_unreachable",
            Some(format!(
                "connect {upstream}: timed out after {connect_timeout:?}"
            )),
        )),
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
                Err(e) => return Outcome::new(e.outcome(), Some(e.to_string())),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return Outcome::new(e.outcome(), Some(e.to_string())),
            },
            _ = abort.cancelled() => {
                return Outcome::new("shutdown", Some("closed by agent shutdown".into()))
            }
        }
    }
    Outcome::new("ok", None)
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
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(c) = cap.as_mut() {
            if seen < limit {
                c.push(&buf[..n.min((limit - seen) as usize)]);
            }
            seen += n as u64;
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Side {
    Client,
    Upstream,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
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
    fn outcome(&self) -> &'static str {
        match self.side {
            Side::Client => "client_error",
            Side::Upstream => "upstream_error",
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
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both fds are new and ours.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per splice; failure only costs speed.
        // SAFETY: fcntl on our own fd.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Self { r, w })
    }
}

fn splice(from: i32, to: i32, len: usize) -> std::io::Result<usize> {
    // SAFETY: plain splice(2) between fds we hold, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
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
        counter.fetch_add(n as u64, Ordering::Relaxed);
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
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.w.as_raw_fd(), BUF)
            }) {
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
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.r.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(fail(other, "writing to", e)),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    half_close(to);
    Ok(())
}

/// Propagates a half-close; the peer may already be gone, which is fine.
fn half_close(to: &TcpStream) {
    // SAFETY: shutdown(2) on a socket we hold.
    unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
}

#[cfg(test)]
mod tests {
    use super::*;
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
            relay(sock, upstream, Duration::from_secs(2), c, None, abort).await
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
        assert_eq!(out.outcome, "ok", "{out:?}");
        assert_eq!(counters.up.load(Ordering::Relaxed), payload.len() as u64);
        assert_eq!(counters.down.load(Ordering::Relaxed), 8 + (3 << 20));
    }

    struct Collect(std::sync::Mutex<Vec<ChunkRow>>);
    impl AuditSink for Collect {
        fn record(&self, rec: Record) {
            if let Record::Chunk(c) = rec {
                self.0.lock().unwrap().push(c);
            }
        }
        fn stats(&self) -> crate::audit::SinkStats {
            Default::default()
        }
    }

    #[test]
    fn a_secret_split_across_reads_is_masked() {
        let sink = Arc::new(Collect(Default::default()));
        let cap = Capture {
            session_id: Uuid::nil(),
            sink: sink.clone(),
            limit: 1 << 20,
            masker: Arc::new(crate::secrets::SecretMasker::new(&[
                crate::secrets::Secret::for_tests("hunter2-db-pass"),
            ])),
        };
        {
            let mut s = CaptureStream::new(cap.clone(), Side::Client);
            s.push(b"user=app password=hunt");
            s.push(b"er2-db-pass; more bytes after the secret");
        }
        let chunks = sink.0.lock().unwrap();
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        let text = String::from_utf8(all).unwrap();
        assert_eq!(
            text,
            "user=app password=***************; more bytes after the secret"
        );
        // Offsets and sequence numbers stay contiguous.
        let mut off = 0;
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!((c.seq as usize, c.offset), (i, off));
            off += c.data.len() as u64;
        }
        assert!(chunks.iter().any(|c| c.masked == 1));
    }

    #[tokio::test]
    async fn unreachable_upstream_is_reported_and_the_client_closed() {
        // A port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = l.local_addr().unwrap();
        drop(l);
        let (mut client, task, _) = relayed(dead, CancellationToken::new()).await;
        let out = task.await.unwrap();
        assert_eq!(out.outcome, "upstream_unreachable");
        assert!(out.detail.unwrap().contains(&dead.to_string()));
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
        assert_eq!(out.outcome, "shutdown");
    }
}
