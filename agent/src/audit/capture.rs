//! Payload capture: the first bytes of each direction of a session, masked
//! and recorded as `chunks` rows for `loopgate replay`.

use std::sync::Arc;

use uuid::Uuid;

use super::mask::StreamMasker;
use super::{
    now_micros,
    rows::{ChunkRow, Record, DIRECTION_DOWN, DIRECTION_UP},
    AuditSink,
};
use crate::secrets::Masker;

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

/// One direction's capture, masked by the [`StreamMasker`] (a secret split
/// across two reads is still masked as a whole). Dropping it records what
/// is held back.
pub struct CaptureStream {
    capture: Capture,
    side: Side,
    masker: StreamMasker,
    /// Stream offset of the next chunk.
    offset: u64,
    /// When the held-back bytes were read (they keep the time they arrived,
    /// so replay orders them where they belong).
    pending_ts: i64,
    seq: u32,
    masked: bool,
}

impl CaptureStream {
    pub fn new(capture: Capture, side: Side) -> Self {
        Self {
            masker: StreamMasker::new(capture.masker.clone()),
            capture,
            side,
            offset: 0,
            pending_ts: 0,
            seq: 0,
            masked: false,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let now = now_micros();
        if self.masker.held() == 0 {
            self.pending_ts = now;
        }
        self.masked |= self.masker.push(bytes);
        if let Some(out) = self.masker.ready() {
            self.emit(out);
            self.pending_ts = now;
        }
    }

    /// Marks the next recorded chunk as masked (for bytes masked before they
    /// reached the capture).
    pub fn mark_masked(&mut self) {
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
        let rest = self.masker.finish();
        self.emit(rest);
    }
}

/// Which side of a session bytes come from.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
