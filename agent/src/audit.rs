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
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Queue depth between the data path and the writer thread.
const QUEUE: usize = 65_536;
const FILE: &str = "records.jsonl";

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
    tx: Mutex<Option<mpsc::SyncSender<AuditRecord>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
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
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let (tx, rx) = mpsc::sync_channel::<AuditRecord>(QUEUE);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Ok(first) = rx.recv() {
                    let mut n = 0u64;
                    let mut next = Some(first);
                    while let Some(rec) = next {
                        if serde_json::to_writer(&mut buf, &rec).is_ok() {
                            buf.push(b'\n');
                            n += 1;
                        }
                        next = if buf.len() < 1 << 20 {
                            rx.try_recv().ok()
                        } else {
                            None
                        };
                    }
                    let r = file.write_all(&buf).and_then(|_| file.sync_data());
                    buf.clear();
                    match r {
                        Ok(()) => {
                            c.written.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            c.write_errors.fetch_add(1, Ordering::Relaxed);
                            c.dropped.fetch_add(n, Ordering::Relaxed);
                            tracing::error!(error = %e, records = n, "audit store write failed");
                        }
                    }
                }
            })
            .map_err(io)?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            counters,
        })
    }

    /// Stops accepting records and waits until everything queued is on disk.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }
}

impl AuditSink for LocalStore {
    fn record(&self, rec: AuditRecord) {
        let sent = match self.tx.lock() {
            Ok(tx) => tx.as_ref().map(|tx| tx.try_send(rec).is_ok()),
            Err(_) => None,
        };
        if sent != Some(true) {
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
        SinkStats {
            backend: "local",
            written: self.counters.written.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            write_errors: self.counters.write_errors.load(Ordering::Relaxed),
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
