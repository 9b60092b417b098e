//! The session's upstream connection: sent on (and reconnected) per
//! request, and a socket wrapper that counts and captures what passes.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use hyper::{body::Incoming, client::conn::http1::SendRequest, Request as HttpRequest, Response};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::Conn;
use crate::{
    audit::capture::{Capture, CaptureStream, Side},
    kinds::Outcome,
    session::Counters,
};

impl Conn {
    /// Sends on the session's upstream connection, (re)connecting when there
    /// is none or the upstream closed it. A request the connection never
    /// took (the upstream closed an idle keep-alive connection just then) is
    /// sent once more on a new connection.
    pub(super) async fn send(
        &self,
        mut req: HttpRequest<Incoming>,
    ) -> Result<Response<Incoming>, Outcome> {
        let mut guard = self.sender.lock().await;
        let mut retried = false;
        loop {
            let reusable = match guard.as_mut() {
                Some(s) => !s.is_closed() && s.ready().await.is_ok(),
                None => false,
            };
            let sender = match guard.take() {
                Some(s) if reusable => s,
                _ => self.connect().await?,
            };
            let sender = guard.insert(sender);
            match sender.try_send_request(req).await {
                Ok(r) => return Ok(r),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !retried => {
                        retried = true;
                        req = unsent;
                        *guard = None;
                    }
                    _ => {
                        return Err(Outcome::UpstreamError(format!(
                            "HTTP request to {}: {}",
                            self.s.upstream(),
                            e.error()
                        )))
                    }
                },
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, Outcome> {
        let up = self.s.upstream();
        let sock = self.s.connect_upstream().await?;
        let _ = sock.set_nodelay(true);
        let io = TokioIo::new(Tap::new(sock, None, self.capture.clone(), false));
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| Outcome::UpstreamError(format!("HTTP handshake with {up}: {e}")))?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %up, error = %e, "upstream HTTP connection ended");
            }
        });
        if let Ok(mut t) = self.conn_tasks.lock() {
            t.retain(|t| !t.is_finished());
            t.push(task);
        }
        Ok(sender)
    }
}

/// A socket that counts what passes and captures what the agent writes to
/// it. `reads_are_up`: reads are the loop → upstream direction (the loop's
/// side of the proxy).
pub(super) struct Tap {
    inner: TcpStream,
    counters: Option<Arc<Counters>>,
    capture: Option<Arc<Mutex<TapCapture>>>,
    reads_are_up: bool,
}

pub(super) struct TapCapture {
    up: CaptureStream,
    down: CaptureStream,
    limit: u64,
    seen: [u64; 2],
    /// Set when a response was masked before it was written (the capture
    /// sees it masked already): the next down chunk is marked masked.
    pub(super) down_masked: Arc<Mutex<bool>>,
}

impl TapCapture {
    pub(super) fn new(c: Capture) -> Self {
        Self {
            limit: c.limit,
            up: CaptureStream::new(c.clone(), Side::Client),
            down: CaptureStream::new(c, Side::Upstream),
            seen: [0, 0],
            down_masked: Arc::new(Mutex::new(false)),
        }
    }
}

impl Tap {
    pub(super) fn new(
        inner: TcpStream,
        counters: Option<Arc<Counters>>,
        capture: Option<Arc<Mutex<TapCapture>>>,
        reads_are_up: bool,
    ) -> Self {
        Self {
            inner,
            counters,
            capture,
            reads_are_up,
        }
    }

    fn saw(&mut self, read: bool, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let up = read == self.reads_are_up;
        if let Some(c) = &self.counters {
            let ctr = if up { &c.up } else { &c.down };
            ctr.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if read {
            return;
        }
        if let Some(mut c) = self.capture.as_ref().and_then(|c| c.lock().ok()) {
            if !up
                && c.down_masked
                    .lock()
                    .map(|mut m| std::mem::take(&mut *m))
                    .unwrap_or(false)
            {
                c.down.mark_masked();
            }
            let i = usize::from(!up);
            let left = c.limit.saturating_sub(c.seen[i]) as usize;
            if left > 0 {
                let part = &bytes[..bytes.len().min(left)];
                if up {
                    c.up.push(part);
                } else {
                    c.down.push(part);
                }
                c.seen[i] += part.len() as u64;
            }
        }
    }
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.saw(true, &buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.saw(false, &buf[..n]);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
