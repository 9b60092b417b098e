//! The audit trail: sessions, events (requests and denials), payload chunks
//! and approvals.
//!
//! ```text
//!  data path ── record() ──► bounded queue ──► spool writer thread ──► spool segments (fsync per batch)
//!   (never blocks)                           (every 50 ms or 8192 records)       │
//!                                                                  shipper task ─┘─► ClickHouse
//!                                                                  (from a cursor, batched, idempotent)
//! ```
//!
//! Every record is written ahead to the spool, so neither a slow or absent
//! ClickHouse nor an agent crash loses it; the shipper replays from its cursor
//! in order, and re-sent rows collapse in ClickHouse (`ReplacingMergeTree` over
//! ids assigned when the record was made). Without `clickhouse_url` the spool
//! is the store. Modules: [`rows`] (one type per table), [`spool`],
//! [`clickhouse`] (schema, migrations, shipper, queries), [`query`] (what the
//! CLI reads).

pub mod capture;
pub mod clickhouse;
pub mod mask;
pub mod query;
pub mod rows;
pub mod spool;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

pub use rows::{ApprovalRow, ChunkRow, EventRow, Record, SessionRow};

/// Records held in memory before the writer takes them (then they are dropped
/// and counted: the writer is far faster than the data path can produce).
const QUEUE: usize = 1 << 20;
/// ... and bytes: captured payload makes records large.
const QUEUE_BYTES: usize = 64 << 20;
/// Encoded records the writer keeps while the spool cannot take them (disk
/// full), retrying, before new ones are dropped.
const PENDING_BYTES: usize = 64 << 20;
/// Retry interval of a failed spool write.
const RETRY: Duration = Duration::from_millis(200);
/// How long the writer gathers records before one write + fsync: at most
/// 20 fsyncs a second on a busy host (at 5 ms the spool's fsyncs queued
/// behind a local database's WAL flushes in the pgbench TPC-B runs), and
/// the window of records a crash of the host (not of the agent) could take.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// A batch this large wakes the writer before the window is over.
const BATCH_RECORDS: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error(transparent)]
    ClickHouse(#[from] clickhouse::ChError),
    #[error("audit store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Microseconds since the Unix epoch.
pub fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub fn now_micros() -> i64 {
    micros(SystemTime::now())
}

/// RFC 3339 UTC with microseconds, from microseconds since the epoch.
pub fn timestamp(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

pub trait AuditSink: Send + Sync {
    /// Queues a record. Never blocks.
    fn record(&self, rec: Record);
    fn stats(&self) -> SinkStats;
    /// Why records cannot be written right now (`None`: recording works).
    /// With `audit.on_failure = "refuse"` new sessions are refused meanwhile.
    fn failing(&self) -> Option<String> {
        None
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStats {
    /// `clickhouse` or `local` (the spool is the store).
    pub backend: &'static str,
    pub spooled: u64,
    pub dropped: u64,
    pub spool_errors: u64,
    /// Bytes in the spool not yet delivered to ClickHouse (0 for `local`).
    pub spool_pending_bytes: u64,
    pub shipped: u64,
    pub ship_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why the spool cannot take records right now (disk full, a full
    /// queue); `None` while recording works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing: Option<String>,
}

/// Counters shared by the recorder and the shipper.
#[derive(Default)]
pub struct Counters {
    pub spooled: AtomicU64,
    pub dropped: AtomicU64,
    pub spool_errors: AtomicU64,
    pub shipped: AtomicU64,
    pub ship_errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Set while records cannot be written (see [`SinkStats::failing`]).
    pub failing: Mutex<Option<String>>,
    failing_flag: std::sync::atomic::AtomicBool,
}

impl Counters {
    fn set_failing(&self, why: Option<String>) {
        self.failing_flag.store(why.is_some(), Ordering::Relaxed);
        if let Ok(mut f) = self.failing.lock() {
            *f = why;
        }
    }

    /// Whether records cannot be written right now.
    pub fn is_failing(&self) -> bool {
        self.failing_flag.load(Ordering::Relaxed)
    }
}

/// The audit sink: queue → spool (→ shipper, when ClickHouse is configured).
pub struct Recorder {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    pub spool_dir: PathBuf,
    pub counters: Arc<Counters>,
    /// Woken after each spooled batch (the shipper waits on it).
    pub spooled_notify: Arc<tokio::sync::Notify>,
    backend: &'static str,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    records: Vec<Record>,
    /// `approx_bytes` of `records`.
    bytes: usize,
    /// The writer's emptied buffer, handed back so the queue never regrows
    /// (growing a large Vec of records cost page faults and copies).
    spare: Vec<Record>,
    closed: bool,
}

pub fn spool_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("spool")
}

impl Recorder {
    pub fn open(state_dir: &Path, shipping: bool) -> Result<Self, AuditError> {
        let dir = spool_dir(state_dir);
        let writer = spool::SpoolWriter::open(&dir, spool::SEGMENT_BYTES)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let counters = Arc::new(Counters::default());
        let notify = Arc::new(tokio::sync::Notify::new());
        let (sh, c, n) = (shared.clone(), counters.clone(), notify.clone());
        let handle = std::thread::Builder::new()
            .name("audit-spool".into())
            .spawn(move || write_loop(&sh, &c, &n, writer))
            .map_err(|source| AuditError::Io {
                path: dir.clone(),
                source,
            })?;
        Ok(Self {
            shared,
            writer: Mutex::new(Some(handle)),
            spool_dir: dir,
            counters,
            spooled_notify: notify,
            backend: if shipping { "clickhouse" } else { "local" },
        })
    }

    /// Stops accepting records and waits until everything queued is on disk.
    pub fn close(&self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.closed = true;
        }
        self.shared.wake.notify_one();
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }
}

fn write_loop(
    sh: &Shared,
    c: &Counters,
    notify: &tokio::sync::Notify,
    mut writer: spool::SpoolWriter,
) {
    // Framed records not yet on disk, and how many they are. A failed write
    // (disk full) keeps them here and retries; only past PENDING_BYTES are
    // new records dropped.
    let mut pending: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut pending_n: u64 = 0;
    let mut payload = Vec::with_capacity(4096);
    loop {
        let (batch, closed) = {
            let Ok(mut q) = sh.queue.lock() else { return };
            if q.records.is_empty() && !q.closed && pending_n == 0 {
                q = match sh.wake.wait_timeout(q, BATCH_WINDOW) {
                    Ok((q, _)) => q,
                    Err(_) => return,
                };
            }
            let spare = std::mem::take(&mut q.spare);
            q.bytes = 0;
            (std::mem::replace(&mut q.records, spare), q.closed)
        };
        let mut batch = batch;
        for rec in &batch {
            if pending.len() >= PENDING_BYTES {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            payload.clear();
            match postcard::to_io(rec, &mut payload) {
                Ok(_) => {
                    spool::frame(&payload, &mut pending);
                    pending_n += 1;
                }
                Err(e) => {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, table = rec.table(), "audit record could not be encoded; dropped");
                }
            }
        }
        let mut failed = false;
        if pending_n > 0 {
            match writer.append(&pending) {
                Ok(()) => {
                    c.spooled.fetch_add(pending_n, Ordering::Relaxed);
                    pending.clear();
                    pending_n = 0;
                    if c.is_failing() {
                        tracing::info!("the audit spool takes records again");
                        c.set_failing(None);
                    }
                    notify.notify_one();
                }
                Err(e) => {
                    failed = true;
                    c.spool_errors.fetch_add(1, Ordering::Relaxed);
                    if !c.is_failing() {
                        tracing::error!(error = %e, records = pending_n, "audit spool write failed; records kept in memory and retried");
                    }
                    c.set_failing(Some(format!("the audit spool cannot be written: {e}")));
                }
            }
        }
        let n_batch = batch.len();
        batch.clear();
        if let Ok(mut q) = sh.queue.lock() {
            if q.spare.capacity() < batch.capacity() {
                q.spare = batch;
            }
        }
        if closed {
            let empty = sh
                .queue
                .lock()
                .map(|q| q.records.is_empty())
                .unwrap_or(true);
            if empty && (pending_n == 0 || failed) {
                if pending_n > 0 {
                    c.dropped.fetch_add(pending_n, Ordering::Relaxed);
                    tracing::error!(
                        records = pending_n,
                        "agent stopping with audit records the spool could not take; they are lost"
                    );
                }
                return;
            }
        } else if failed {
            std::thread::sleep(RETRY);
        } else if n_batch < BATCH_RECORDS {
            std::thread::sleep(BATCH_WINDOW);
        }
    }
}

impl AuditSink for Recorder {
    fn record(&self, rec: Record) {
        let size = rec.approx_bytes();
        let accepted = match self.shared.queue.lock() {
            Ok(mut q) if !q.closed && q.records.len() < QUEUE && q.bytes + size <= QUEUE_BYTES => {
                q.bytes += size;
                q.records.push(rec);
                if q.records.len() == BATCH_RECORDS {
                    self.shared.wake.notify_one();
                }
                true
            }
            _ => false,
        };
        if !accepted {
            if !self.counters.is_failing() {
                self.counters
                    .set_failing(Some("the audit queue is full".into()));
            }
            let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n + 1,
                    "audit queue full or closed; record dropped"
                );
            }
        }
    }

    fn stats(&self) -> SinkStats {
        let c = &self.counters;
        let pending = if self.backend == "clickhouse" {
            spool::pending_bytes(&self.spool_dir, spool::load_cursor(&self.spool_dir))
        } else {
            0
        };
        SinkStats {
            backend: self.backend,
            spooled: c.spooled.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            spool_errors: c.spool_errors.load(Ordering::Relaxed),
            spool_pending_bytes: pending,
            shipped: c.shipped.load(Ordering::Relaxed),
            ship_errors: c.ship_errors.load(Ordering::Relaxed),
            last_error: c.last_error.lock().ok().and_then(|e| e.clone()),
            failing: self.failing(),
        }
    }

    fn failing(&self) -> Option<String> {
        if !self.counters.is_failing() {
            return None;
        }
        self.counters.failing.lock().ok().and_then(|f| f.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    pub fn session(id: Uuid, version: u8) -> SessionRow {
        SessionRow {
            session_id: id,
            version,
            host: "h".into(),
            workload: "etl".into(),
            cgroup: "loopgate/etl/i-1".into(),
            target: "web".into(),
            protocol: "http".into(),
            destination: "127.10.0.5:80".into(),
            pid: 10,
            tgid: 10,
            uid: 65534,
            gid: 65534,
            comm: "curl".into(),
            cgroup_id: 1,
            netns_cookie: 1,
            started_at: 1_700_000_000_000_000,
            ended_at: if version == 2 {
                1_700_000_000_500_000
            } else {
                0
            },
            bytes_up: 5 * version as u64,
            bytes_down: 7,
            outcome: if version == 2 { "ok" } else { "open" }.into(),
            detail: String::new(),
        }
    }

    #[test]
    fn recorder_spools_and_local_reader_folds_versions() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Recorder::open(dir.path(), false).unwrap();
        let id = Uuid::now_v7();
        rec.record(Record::Session(session(id, 1)));
        rec.record(Record::Session(session(id, 2)));
        rec.record(Record::Chunk(ChunkRow {
            session_id: id,
            direction: rows::DIRECTION_UP,
            seq: 0,
            offset: 0,
            ts: 1,
            data: b"GET /".to_vec(),
            masked: 0,
        }));
        rec.close();
        assert_eq!(rec.stats().spooled, 3);
        let rows = query::local_sessions(&rec.spool_dir).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].outcome, "ok");
        assert_eq!(rows[0].bytes_up, 10);
        let replay = query::local_replay(&rec.spool_dir, id).unwrap().unwrap();
        assert_eq!(replay.chunks.len(), 1);
    }

    #[test]
    fn timestamps_format_as_rfc3339_micros() {
        assert_eq!(
            timestamp(1_700_000_000_123_456),
            "2023-11-14T22:13:20.123456Z"
        );
    }
}
