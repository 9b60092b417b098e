//! The audit trail: what every session and every denied connect was.
//!
//! Protocol handlers and the denial reader hand records to an [`AuditSink`],
//! whose `record()` never blocks the data path. The embedded default is the
//! [`LocalStore`]: an append-only JSON-lines file under `state_dir/audit`,
//! written by its own thread in batches, each batch fsynced. `loopgate
//! sessions` reads it back (also while the agent is down).

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Queue depth between the data path and the writer thread.
const QUEUE: usize = 65_536;
const FILE: &str = "records.jsonl";
/// How long the writer gathers records before one write + fsync.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// A batch this large wakes the writer before the window is over.
const BATCH_RECORDS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who made a connection and where it was going, as the kernel recorded it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Peer {
    pub workload: String,
    pub cgroup: String,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// Original destination `ip:port`.
    pub destination: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditRecord {
    SessionStart {
        session_id: Uuid,
        target: String,
        protocol: String,
        #[serde(flatten)]
        peer: Peer,
        started_at: String,
    },
    SessionEnd {
        session_id: Uuid,
        ended_at: String,
        bytes_up: u64,
        bytes_down: u64,
        outcome: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    ConnectionDenied {
        denial_id: Uuid,
        #[serde(flatten)]
        peer: Peer,
        at: String,
        reason: String,
    },
}

/// RFC 3339 UTC with microseconds.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

pub trait AuditSink: Send + Sync {
    /// Queues a record. Never blocks.
    fn record(&self, rec: AuditRecord);
    fn stats(&self) -> SinkStats;
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStats {
    pub backend: &'static str,
    pub written: u64,
    pub dropped: u64,
    pub write_errors: u64,
}

/// Append-only JSON-lines store.
pub struct LocalStore {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The queue between the data path and the writer thread. `record()` only
/// pushes under a short lock; the writer wakes on its own every
/// `BATCH_WINDOW` (or early when a batch is full, or on close), so a record
/// costs no thread wake-up on the data path.
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

#[derive(Default)]
struct Queue {
    records: Vec<AuditRecord>,
    closed: bool,
}

pub fn store_path(state_dir: &Path) -> PathBuf {
    state_dir.join("audit").join(FILE)
}

impl LocalStore {
    pub fn open(state_dir: &Path) -> Result<Self, AuditError> {
        let path = store_path(state_dir);
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(&sh, file))
            .map_err(io)?;
        Ok(Self {
            shared,
            writer: Mutex::new(Some(writer)),
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

fn write_loop(sh: &Shared, mut file: std::fs::File) {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let (batch, closed) = {
            let Ok(mut q) = sh.queue.lock() else { return };
            if q.records.is_empty() && !q.closed {
                q = match sh.wake.wait_timeout(q, BATCH_WINDOW) {
                    Ok((q, _)) => q,
                    Err(_) => return,
                };
            }
            (std::mem::take(&mut q.records), q.closed)
        };
        if !batch.is_empty() {
            let n = batch.len() as u64;
            for rec in &batch {
                if serde_json::to_writer(&mut buf, rec).is_ok() {
                    buf.push(b'\n');
                }
            }
            // One write + fsync per batch (group commit).
            let r = file.write_all(&buf).and_then(|_| file.sync_data());
            buf.clear();
            match r {
                Ok(()) => {
                    sh.written.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    sh.write_errors.fetch_add(1, Ordering::Relaxed);
                    sh.dropped.fetch_add(n, Ordering::Relaxed);
                    tracing::error!(error = %e, records = n, "audit store write failed");
                }
            }
        }
        if closed {
            // Drain anything pushed between the take and the close.
            if sh
                .queue
                .lock()
                .map(|q| q.records.is_empty())
                .unwrap_or(true)
            {
                return;
            }
        } else if batch.len() < BATCH_RECORDS {
            std::thread::sleep(BATCH_WINDOW);
        }
    }
}

impl AuditSink for LocalStore {
    fn record(&self, rec: AuditRecord) {
        let accepted = match self.shared.queue.lock() {
            Ok(mut q) if !q.closed && q.records.len() < QUEUE => {
                q.records.push(rec);
                if q.records.len() == BATCH_RECORDS {
                    self.shared.wake.notify_one();
                }
                true
            }
            _ => false,
        };
        if !accepted {
            let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n + 1,
                    "audit queue full or closed; record dropped"
                );
            }
        }
    }

    fn stats(&self) -> SinkStats {
        SinkStats {
            backend: "local",
            written: self.shared.written.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            write_errors: self.shared.write_errors.load(Ordering::Relaxed),
        }
    }
}

/// One row of `loopgate sessions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRow {
    pub session_id: Uuid,
    pub workload: String,
    pub target: String,
    pub protocol: String,
    pub destination: String,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Reads the local store and folds start/end records into sessions; denied
/// connects become rows with outcome `denied`. A torn last line (a crash mid
/// write) is skipped.
pub fn read_sessions(state_dir: &Path) -> Result<Vec<SessionRow>, AuditError> {
    let path = store_path(state_dir);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(AuditError::Io { path, source }),
    };
    let mut rows: BTreeMap<Uuid, SessionRow> = BTreeMap::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|source| AuditError::Io {
            path: path.clone(),
            source,
        })?;
        let Ok(rec) = serde_json::from_str::<AuditRecord>(&line) else {
            continue;
        };
        match rec {
            AuditRecord::SessionStart {
                session_id,
                target,
                protocol,
                peer,
                started_at,
            } => {
                rows.insert(
                    session_id,
                    SessionRow {
                        session_id,
                        workload: peer.workload,
                        target,
                        protocol,
                        destination: peer.destination,
                        pid: peer.tgid,
                        uid: peer.uid,
                        gid: peer.gid,
                        comm: peer.comm,
                        cgroup: peer.cgroup,
                        started_at,
                        ended_at: None,
                        bytes_up: 0,
                        bytes_down: 0,
                        outcome: "open".into(),
                        detail: None,
                    },
                );
            }
            AuditRecord::SessionEnd {
                session_id,
                ended_at,
                bytes_up,
                bytes_down,
                outcome,
                detail,
            } => {
                if let Some(r) = rows.get_mut(&session_id) {
                    r.ended_at = Some(ended_at);
                    r.bytes_up = bytes_up;
                    r.bytes_down = bytes_down;
                    r.outcome = outcome;
                    r.detail = detail;
                }
            }
            AuditRecord::ConnectionDenied {
                denial_id,
                peer,
                at,
                reason,
            } => {
                rows.insert(
                    denial_id,
                    SessionRow {
                        session_id: denial_id,
                        workload: peer.workload,
                        target: "(egress)".into(),
                        protocol: "tcp".into(),
                        destination: peer.destination,
                        pid: peer.tgid,
                        uid: peer.uid,
                        gid: peer.gid,
                        comm: peer.comm,
                        cgroup: peer.cgroup,
                        started_at: at.clone(),
                        ended_at: Some(at),
                        bytes_up: 0,
                        bytes_down: 0,
                        outcome: "denied".into(),
                        detail: Some(reason),
                    },
                );
            }
        }
    }
    let mut v: Vec<SessionRow> = rows.into_values().collect();
    v.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        Peer {
            workload: "etl".into(),
            cgroup: "loopgate/etl/i-1".into(),
            pid: 10,
            tgid: 10,
            uid: 65534,
            gid: 65534,
            comm: "curl".into(),
            cgroup_id: 1,
            netns_cookie: 1,
            destination: "127.10.0.5:80".into(),
        }
    }

    #[test]
    fn store_round_trips_and_folds_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let id = Uuid::now_v7();
        store.record(AuditRecord::SessionStart {
            session_id: id,
            target: "web".into(),
            protocol: "http".into(),
            peer: peer(),
            started_at: timestamp(SystemTime::now()),
        });
        store.record(AuditRecord::SessionEnd {
            session_id: id,
            ended_at: timestamp(SystemTime::now()),
            bytes_up: 5,
            bytes_down: 7,
            outcome: "ok".into(),
            detail: None,
        });
        store.record(AuditRecord::ConnectionDenied {
            denial_id: Uuid::now_v7(),
            peer: peer(),
            at: timestamp(SystemTime::now()),
            reason: "egress deny".into(),
        });
        store.close();
        assert_eq!(store.stats().written, 3);
        // A torn line from a crash mid-write is skipped.
        let mut f = OpenOptions::new()
            .append(true)
            .open(store_path(dir.path()))
            .unwrap();
        f.write_all(b"{\"kind\":\"session_st").unwrap();
        let rows = read_sessions(dir.path()).unwrap();
        assert_eq!(rows.len(), 2);
        let s = rows.iter().find(|r| r.session_id == id).unwrap();
        assert_eq!((s.bytes_up, s.bytes_down, s.outcome.as_str()), (5, 7, "ok"));
        assert_eq!(s.workload, "etl");
        assert!(rows.iter().any(|r| r.outcome == "denied"));
    }
}
