//! Response bodies on their way to the loop: decoded when the upstream
//! compressed them anyway (gzip, deflate), masked, trailers dropped.
//!
//! The agent asks upstreams for `Accept-Encoding: identity`, but a hostile or
//! careless upstream may compress regardless, and a stored credential inside
//! a gzip stream would pass the masker unseen. So the body is decoded as it
//! streams (at most [`DECODE_CHUNK`] bytes of output at a time, and no more
//! than a cap in total, against decompression bombs), masked, and sent on
//! with chunked framing. Encodings that cannot be decoded are refused before
//! the response head is sent ([`coding`]).

use std::{
    collections::VecDeque,
    io::{self, BufRead, Read},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::{
    body::{Body, Frame, SizeHint},
    header::{self, HeaderMap},
};

use crate::{audit::mask::StreamMasker, secrets::Masker};

/// Decoded bytes produced per step (and so the largest data frame).
pub(crate) const DECODE_CHUNK: usize = 32 * 1024;

/// Largest decoded body of one response (a decompression bomb is cut there).
pub(crate) const MAX_DECODED: u64 = 64 * 1024 * 1024;

/// How a response body reaches the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    Identity,
    Gzip,
    /// zlib-wrapped (RFC 9110) or, as some servers send it, raw deflate.
    Deflate,
}

/// The coding of a response body, from `Content-Encoding` and any transfer
/// coding before `chunked`. Anything but none, one `gzip` or one `deflate`
/// is refused (the reason is for the loop and the audit).
pub(crate) fn coding(h: &HeaderMap) -> Result<Coding, String> {
    let mut codings = Vec::new();
    for (name, skip) in [
        (header::CONTENT_ENCODING, "identity"),
        (header::TRANSFER_ENCODING, "chunked"),
    ] {
        for v in h.get_all(&name) {
            let v = v
                .to_str()
                .map_err(|_| format!("the upstream sent a {name} header that is not text"))?;
            for c in v.split(',') {
                let c = c.trim().to_ascii_lowercase();
                if !c.is_empty() && c != skip && c != "identity" {
                    codings.push(c);
                }
            }
        }
    }
    match codings.as_slice() {
        [] => Ok(Coding::Identity),
        [c] if c == "gzip" || c == "x-gzip" => Ok(Coding::Gzip),
        [c] if c == "deflate" => Ok(Coding::Deflate),
        [c] => Err(format!(
            "the upstream sent its response encoded as {c:.40}, which loopgate cannot decode to mask stored credentials"
        )),
        more => Err(format!(
            "the upstream sent its response with {} stacked encodings, which loopgate does not decode",
            more.len()
        )),
    }
}

/// Why a response body was cut short.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the upstream's response body failed: {0}")]
    Upstream(Box<dyn std::error::Error + Send + Sync>),
    #[error("the upstream's {0} response body is corrupt: {1}")]
    Corrupt(&'static str, io::Error),
    #[error("the upstream's {0} response body decodes to more than {1} bytes (a decompression bomb?); the response was cut there")]
    TooLarge(&'static str, u64),
}

/// Compressed bytes received and not decoded yet. Reading past them says
/// `WouldBlock` (more may come) until the body ends.
#[derive(Default)]
struct Feed {
    buf: VecDeque<u8>,
    eof: bool,
}

impl Read for Feed {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = {
            let have = self.fill_buf()?;
            let n = have.len().min(out.len());
            out[..n].copy_from_slice(&have[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Feed {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.buf.is_empty() && !self.eof {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(self.buf.as_slices().0)
    }

    fn consume(&mut self, n: usize) {
        self.buf.drain(..n.min(self.buf.len()));
    }
}

enum Decoder {
    Gzip(Box<flate2::bufread::MultiGzDecoder<Feed>>),
    Zlib(Box<flate2::bufread::ZlibDecoder<Feed>>),
    RawDeflate(Box<flate2::bufread::DeflateDecoder<Feed>>),
    /// `deflate`, until its first two bytes tell zlib from raw.
    DeflateUndecided(Feed),
}

impl Decoder {
    fn feed(&mut self) -> &mut Feed {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zlib(d) => d.get_mut(),
            Decoder::RawDeflate(d) => d.get_mut(),
            Decoder::DeflateUndecided(f) => f,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Decoder::Gzip(_) => "gzip",
            _ => "deflate",
        }
    }

    /// Decoded bytes into `out`: `Ok(0)` at the end of the stream,
    /// `WouldBlock` when more input is needed.
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Decoder::DeflateUndecided(f) = self {
            if f.buf.len() < 2 && !f.eof {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let f = std::mem::take(f);
            let zlib = match (f.buf.front(), f.buf.get(1)) {
                // CMF (method 8, window ≤ 32K) and FLG with the check bits.
                (Some(&cmf), Some(&flg)) => {
                    cmf & 0x0f == 8
                        && cmf >> 4 <= 7
                        && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
                }
                _ => false,
            };
            *self = if zlib {
                Decoder::Zlib(Box::new(flate2::bufread::ZlibDecoder::new(f)))
            } else {
                Decoder::RawDeflate(Box::new(flate2::bufread::DeflateDecoder::new(f)))
            };
        }
        match self {
            Decoder::Gzip(d) => d.read(out),
            Decoder::Zlib(d) => d.read(out),
            Decoder::RawDeflate(d) => d.read(out),
            Decoder::DeflateUndecided(_) => Ok(0),
        }
    }
}

/// Called once when a body is cut short, with the reason (for the session
/// outcome).
pub(crate) type OnError = Arc<dyn Fn(&BodyError) + Send + Sync>;

/// A response body on its way to the loop, with every stored credential
/// masked. Identity bodies keep their length (masking is in place), so
/// `Content-Length` holds; decoded bodies have no known length. The last
/// bytes that could start a stored value are held back until more arrive, so
/// a value split across two frames is still masked. Trailers are dropped:
/// they could carry a credential, and the loop asked for nothing that needs
/// them (`TE: trailers` is hop-by-hop).
pub(crate) struct MaskBody<B = hyper::body::Incoming> {
    inner: B,
    decoder: Option<Decoder>,
    /// Whether a decoder got any input (an empty body, e.g. for HEAD or
    /// 304, is not a truncated stream).
    fed: bool,
    /// The decoder reached the end of its stream; what follows is ignored.
    decoded_all: bool,
    decoded: u64,
    limit: u64,
    /// The stream masker, holding back what could start a stored value.
    pending: StreamMasker,
    /// The inner body ended.
    inner_done: bool,
    /// Nothing more will be produced (after the end or an error).
    finished: bool,
    masked: Option<Arc<Mutex<bool>>>,
    on_error: Option<OnError>,
}

impl<B> MaskBody<B> {
    /// `masked` is set whenever something was masked (for the capture).
    pub(crate) fn new(
        inner: B,
        masker: Arc<dyn Masker>,
        coding: Coding,
        masked: Option<Arc<Mutex<bool>>>,
        on_error: Option<OnError>,
    ) -> Self {
        let decoder = match coding {
            Coding::Identity => None,
            Coding::Gzip => Some(Decoder::Gzip(Box::new(
                flate2::bufread::MultiGzDecoder::new(Feed::default()),
            ))),
            Coding::Deflate => Some(Decoder::DeflateUndecided(Feed::default())),
        };
        Self {
            inner,
            pending: StreamMasker::new(masker),
            decoder,
            fed: false,
            decoded_all: false,
            decoded: 0,
            limit: MAX_DECODED,
            inner_done: false,
            finished: false,
            masked,
            on_error,
        }
    }

    #[cfg(test)]
    fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    fn push_plain(&mut self, data: &[u8]) {
        if self.pending.push(data) {
            if let Some(m) = self.masked.as_ref().and_then(|m| m.lock().ok()).as_mut() {
                **m = true;
            }
        }
    }

    /// Masked bytes that can go now (all of them once the body is done).
    fn ready(&mut self) -> Option<Bytes> {
        if self.finished {
            let rest = self.pending.finish();
            return (!rest.is_empty()).then(|| Bytes::from(rest));
        }
        self.pending.ready().map(Bytes::from)
    }

    fn fail(&mut self, e: BodyError) -> BodyError {
        self.finished = true;
        self.pending.clear();
        if let Some(f) = self.on_error.take() {
            f(&e);
        }
        e
    }

    /// One decoding step: `Some` when it produced bytes, ended the stream
    /// or failed; `None` when it needs more input.
    fn decode_step(&mut self) -> Option<Result<(), BodyError>> {
        let dec = self.decoder.as_mut()?;
        if self.decoded_all {
            return None;
        }
        if !self.fed && self.inner_done {
            // No body at all (HEAD, 204, 304).
            self.decoded_all = true;
            return Some(Ok(()));
        }
        let name = dec.name();
        let room = (self.limit - self.decoded).min(DECODE_CHUNK as u64) as usize;
        // One byte past the cap tells a body of exactly `limit` bytes from
        // a larger one.
        let mut out = vec![0u8; room.max(1)];
        match dec.read(&mut out) {
            Ok(0) => {
                self.decoded_all = true;
                Some(Ok(()))
            }
            Ok(_) if room == 0 => Some(Err(BodyError::TooLarge(name, self.limit))),
            Ok(n) => {
                self.decoded += n as u64;
                self.push_plain(&out[..n]);
                Some(Ok(()))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(BodyError::Corrupt(name, e))),
        }
    }
}

impl<B> Body for MaskBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if let Some(out) = this.ready() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.decode_step() {
                Some(Ok(())) => continue,
                Some(Err(e)) => return Poll::Ready(Some(Err(this.fail(e)))),
                None => {}
            }
            if this.inner_done {
                // Identity body, or a decoder at the end of its stream.
                this.finished = true;
                continue;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.inner_done = true;
                    if let Some(d) = this.decoder.as_mut() {
                        d.feed().eof = true;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let e = BodyError::Upstream(e.into());
                    return Poll::Ready(Some(Err(this.fail(e))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are dropped (see the type's doc).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match this.decoder.as_mut() {
                        None => this.push_plain(&data),
                        Some(_) if this.decoded_all => {}
                        Some(d) => {
                            this.fed |= !data.is_empty();
                            d.feed().buf.extend(data.iter());
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.pending.held() == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.decoder.is_some() {
            return SizeHint::default();
        }
        let inner = self.inner.size_hint();
        let held = self.pending.held() as u64;
        let mut h = SizeHint::new();
        h.set_lower(inner.lower() + held);
        if let Some(u) = inner.upper() {
            h.set_upper(u + held);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use http_body_util::{BodyExt, StreamBody};

    use super::*;
    use crate::secrets::{Secret, SecretMasker};

    const SECRET: &str = "stored-api-token-7f3a9c";

    type Frames =
        StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, io::Error>>>>;

    fn frames(parts: Vec<Frame<Bytes>>) -> Frames {
        StreamBody::new(futures_util::stream::iter(
            parts.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    fn masker() -> Arc<dyn Masker> {
        Arc::new(SecretMasker::new(&[Secret::for_tests(SECRET)]))
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// The body split into `size`-byte frames, collected.
    async fn run(
        wire: &[u8],
        size: usize,
        coding: Coding,
        limit: u64,
    ) -> (Result<Vec<u8>, String>, bool, Option<String>) {
        let parts = wire
            .chunks(size)
            .map(|c| Frame::data(Bytes::copy_from_slice(c)))
            .chain(std::iter::once(Frame::trailers({
                let mut t = HeaderMap::new();
                t.insert("x-leak", SECRET.parse().unwrap());
                t
            })))
            .collect();
        let masked = Arc::new(Mutex::new(false));
        let failed = Arc::new(Mutex::new(None));
        let f = failed.clone();
        let on_error: OnError = Arc::new(move |e| *f.lock().unwrap() = Some(e.to_string()));
        let mut body = MaskBody::new(
            frames(parts),
            masker(),
            coding,
            Some(masked.clone()),
            Some(on_error),
        )
        .with_limit(limit);
        let mut out = Vec::new();
        let got = loop {
            match body.frame().await {
                None => break Ok(out),
                Some(Err(e)) => break Err(e.to_string()),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => {
                        assert!(d.len() <= DECODE_CHUNK + SECRET.len());
                        out.extend_from_slice(&d)
                    }
                    Err(_) => panic!("a trailer reached the loop"),
                },
            }
        };
        let m = *masked.lock().unwrap();
        let failed = failed.lock().unwrap().clone();
        (got, m, failed)
    }

    fn plain() -> Vec<u8> {
        format!(
            "{{\"token\": \"{SECRET}\", \"pad\": \"{}\"}}",
            "x".repeat(5000)
        )
        .into_bytes()
    }

    fn masked_plain() -> Vec<u8> {
        String::from_utf8(plain())
            .unwrap()
            .replace(SECRET, &"*".repeat(SECRET.len()))
            .into_bytes()
    }

    #[tokio::test]
    async fn identity_bodies_are_masked_across_frames_and_trailers_dropped() {
        for size in [1, 7, 64, 100_000] {
            let (got, m, failed) = run(&plain(), size, Coding::Identity, MAX_DECODED).await;
            assert_eq!(got.unwrap(), masked_plain(), "frames of {size}");
            assert!(m && failed.is_none());
        }
    }

    #[tokio::test]
    async fn gzip_and_deflate_bodies_are_decoded_then_masked() {
        let gz = gzip(&plain());
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&plain()).unwrap();
        let zlib = z.finish().unwrap();
        let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        d.write_all(&plain()).unwrap();
        let raw = d.finish().unwrap();
        // Two gzip members, as `cat a.gz b.gz` makes.
        let mut two = gz.clone();
        two.extend_from_slice(&gzip(b" and more"));
        let mut want_two = masked_plain();
        want_two.extend_from_slice(b" and more");
        for (wire, coding, want) in [
            (&gz, Coding::Gzip, masked_plain()),
            (&zlib, Coding::Deflate, masked_plain()),
            (&raw, Coding::Deflate, masked_plain()),
            (&two, Coding::Gzip, want_two),
        ] {
            for size in [1, 3, 1000, 1 << 20] {
                let (got, m, failed) = run(wire, size, coding, MAX_DECODED).await;
                assert_eq!(got.unwrap(), want, "{coding:?} in frames of {size}");
                assert!(m && failed.is_none());
            }
        }
        // An empty body (HEAD, 304) is not a truncated stream.
        let (got, _, failed) = run(b"", 1, Coding::Gzip, MAX_DECODED).await;
        assert_eq!(got.unwrap(), b"");
        assert!(failed.is_none());
    }

    #[tokio::test]
    async fn corrupt_truncated_and_oversized_streams_end_the_body_with_an_error() {
        let gz = gzip(&plain());
        let (got, _, failed) = run(&gz[..gz.len() - 5], 100, Coding::Gzip, MAX_DECODED).await;
        assert!(got.unwrap_err().contains("gzip response body is corrupt"));
        assert!(failed.is_some());
        let (got, _, _) = run(b"not gzip at all", 100, Coding::Gzip, MAX_DECODED).await;
        assert!(got.is_err());
        // A bomb: 16 MiB of zeros in ~16 KiB; cut at the cap.
        let bomb = gzip(&vec![0u8; 16 << 20]);
        assert!(bomb.len() < 64 * 1024);
        let (got, _, failed) = run(&bomb, 4096, Coding::Gzip, 1 << 20).await;
        let e = got.unwrap_err();
        assert!(e.contains("decodes to more than 1048576 bytes"), "{e}");
        assert_eq!(failed.as_deref(), Some(e.as_str()));
        // Exactly at the cap is fine.
        let (got, _, _) = run(&gzip(&[7u8; 1000]), 10, Coding::Gzip, 1000).await;
        assert_eq!(got.unwrap(), vec![7u8; 1000]);
    }

    #[test]
    fn codings_that_cannot_be_decoded_are_refused() {
        let h = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            coding(&h)
        };
        assert_eq!(h(&[]), Ok(Coding::Identity));
        assert_eq!(h(&[("content-encoding", "identity")]), Ok(Coding::Identity));
        assert_eq!(h(&[("transfer-encoding", "chunked")]), Ok(Coding::Identity));
        assert_eq!(h(&[("content-encoding", "GZIP")]), Ok(Coding::Gzip));
        assert_eq!(h(&[("content-encoding", "x-gzip")]), Ok(Coding::Gzip));
        assert_eq!(
            h(&[("transfer-encoding", "gzip, chunked")]),
            Ok(Coding::Gzip)
        );
        assert_eq!(h(&[("content-encoding", "deflate")]), Ok(Coding::Deflate));
        for bad in [
            &[("content-encoding", "br")][..],
            &[("content-encoding", "zstd")],
            &[("content-encoding", "compress")],
            &[("content-encoding", "gzip, gzip")],
            &[("content-encoding", "gzip"), ("content-encoding", "br")],
            &[
                ("content-encoding", "gzip"),
                ("transfer-encoding", "deflate, chunked"),
            ],
        ] {
            assert!(h(bad).is_err(), "{bad:?}");
        }
    }
}
