//! What `loopgate sessions` and `loopgate replay` read: the local spool when no
//! ClickHouse is configured, otherwise ClickHouse (see [`super::clickhouse`]).

use std::{collections::HashMap, path::Path};

use uuid::Uuid;

use super::{
    rows::{ChunkRow, EventRow, Record, SessionRow},
    spool, timestamp, AuditError,
};

/// Everything recorded about one session, in order.
#[derive(Debug, Clone)]
pub struct Replay {
    pub session: SessionRow,
    pub events: Vec<EventRow>,
    pub chunks: Vec<ChunkRow>,
}

/// `sessions` filters.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub workload: Option<String>,
    pub target: Option<String>,
    /// Microseconds since the epoch.
    pub since: Option<i64>,
}

impl Filter {
    pub fn matches(&self, s: &SessionRow) -> bool {
        self.workload.as_ref().is_none_or(|w| &s.workload == w)
            && self.target.as_ref().is_none_or(|t| &s.target == t)
            && self.since.is_none_or(|t| s.started_at >= t)
    }
}

/// The JSON object `loopgate sessions --json` prints for a session.
pub fn session_json(s: &SessionRow) -> serde_json::Value {
    serde_json::json!({
        "session_id": s.session_id,
        "host": s.host,
        "workload": s.workload,
        "cgroup": s.cgroup,
        "target": s.target,
        "protocol": s.protocol,
        "destination": s.destination,
        "pid": s.tgid,
        "uid": s.uid,
        "gid": s.gid,
        "comm": s.comm,
        "started_at": timestamp(s.started_at),
        "ended_at": (s.ended_at != 0).then(|| timestamp(s.ended_at)),
        "bytes_up": s.bytes_up,
        "bytes_down": s.bytes_down,
        "outcome": s.outcome,
        "detail": (!s.detail.is_empty()).then_some(&s.detail),
    })
}

/// Decodes every record in the spool, oldest first. Corrupt bytes and records
/// that do not decode are skipped (the shipper reports and quarantines them).
pub fn local_records(dir: &Path) -> Result<Vec<Record>, AuditError> {
    let ids = match spool::list_segments(dir) {
        Ok(ids) => ids,
        Err(spool::SpoolError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    let last = ids.last().copied();
    for id in ids {
        let path = spool::segment_path(dir, id);
        let buf = match spool::read_from(&path, spool::HEADER_LEN) {
            Ok(b) => b,
            Err(spool::SpoolError::NotASegment { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let scan = spool::scan(&buf, spool::HEADER_LEN, usize::MAX, Some(id) != last);
        out.extend(
            scan.records
                .iter()
                .filter_map(|(_, p)| postcard::from_bytes::<Record>(p).ok()),
        );
    }
    Ok(out)
}

/// Folds session rows: the highest version of each session wins.
pub fn fold_sessions(records: impl IntoIterator<Item = SessionRow>) -> Vec<SessionRow> {
    let mut by_id: HashMap<Uuid, SessionRow> = HashMap::new();
    for s in records {
        match by_id.get(&s.session_id) {
            Some(old) if old.version >= s.version => {}
            _ => {
                by_id.insert(s.session_id, s);
            }
        }
    }
    let mut v: Vec<SessionRow> = by_id.into_values().collect();
    v.sort_by_key(|s| (s.started_at, s.session_id));
    v
}

pub fn local_sessions(dir: &Path) -> Result<Vec<SessionRow>, AuditError> {
    Ok(fold_sessions(local_records(dir)?.into_iter().filter_map(
        |r| match r {
            Record::Session(s) => Some(s),
            _ => None,
        },
    )))
}

pub fn local_replay(dir: &Path, id: Uuid) -> Result<Option<Replay>, AuditError> {
    let mut sessions = Vec::new();
    let mut events = Vec::new();
    let mut chunks = Vec::new();
    for r in local_records(dir)? {
        match r {
            Record::Session(s) if s.session_id == id => sessions.push(s),
            Record::Event(e) if e.session_id == id => events.push(e),
            Record::Chunk(c) if c.session_id == id => chunks.push(c),
            _ => {}
        }
    }
    Ok(assemble(sessions, events, chunks))
}

/// Orders what was found for one session; duplicates (re-sent rows) collapse.
pub fn assemble(
    sessions: Vec<SessionRow>,
    mut events: Vec<EventRow>,
    mut chunks: Vec<ChunkRow>,
) -> Option<Replay> {
    let session = fold_sessions(sessions).into_iter().next()?;
    events.sort_by_key(|e| (e.ts, e.event_id));
    events.dedup_by_key(|e| e.event_id);
    chunks.sort_by_key(|c| (c.ts, c.direction, c.seq));
    chunks.dedup_by_key(|c| (c.direction, c.seq));
    Some(Replay {
        session,
        events,
        chunks,
    })
}
