//! One Rust row type per audit table. The same structs are the spool's record
//! payloads (postcard) and the ClickHouse rows (RowBinary via the `clickhouse`
//! crate), so what was spooled is exactly what is inserted.
//!
//! Times are microseconds since the Unix epoch (`i64`): the RowBinary encoding
//! of both `DateTime64(6, 'UTC')` (modern DDL) and `Int64` (legacy DDL).
//! `LowCardinality(String)` and `String` also encode alike.

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `sessions`: one logical row per session. Written at the start (`version`
/// 1, outcome `open`) and at the end (`version` 2); `ReplacingMergeTree(version)`
/// keeps the last one.
#[derive(Debug, Clone, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct SessionRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub session_id: Uuid,
    pub version: u8,
    pub host: String,
    pub workload: String,
    pub cgroup: String,
    pub target: String,
    pub protocol: String,
    pub destination: String,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub started_at: i64,
    /// 0 while open.
    pub ended_at: i64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub outcome: String,
    pub detail: String,
}

/// `events`: one row per request (SQL statement, SSH command, HTTP request)
/// and per denied connect, with the verdict and the rule behind it.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct EventRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    #[serde(with = "clickhouse::serde::uuid")]
    pub session_id: Uuid,
    pub ts: i64,
    pub host: String,
    pub workload: String,
    pub target: String,
    pub protocol: String,
    /// `connection_denied`, `sql`, `ssh_exec`, `http_request`, ...
    pub kind: String,
    pub request: String,
    /// `allow`, `deny`, `approve`, `mask`.
    pub verdict: String,
    pub rule_id: String,
    pub reason: String,
    pub pid: u32,
    pub uid: u32,
    /// Protocol-specific attributes as parallel arrays: ClickHouse 18.16
    /// cannot store `Array(Tuple(..))` or `Map`, and two arrays encode the
    /// same in every version (modern DDL adds an `attributes` Map alias).
    pub attr_keys: Vec<String>,
    pub attr_values: Vec<String>,
}

pub const DIRECTION_UP: i8 = 1;
pub const DIRECTION_DOWN: i8 = 2;

/// `chunks`: the captured payload of a session, in order per direction.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct ChunkRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub session_id: Uuid,
    /// `Enum8('up' = 1, 'down' = 2)`: loop → upstream is up.
    pub direction: i8,
    pub seq: u32,
    /// Offset of the first byte in this direction's stream.
    pub offset: u64,
    pub ts: i64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// 1 when a masking hook changed the bytes.
    pub masked: u8,
}

/// `approvals`: a held request and its decision (`version` 1 requested, 2 decided).
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct ApprovalRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub approval_id: Uuid,
    pub version: u8,
    #[serde(with = "clickhouse::serde::uuid")]
    pub session_id: Uuid,
    pub host: String,
    pub workload: String,
    pub target: String,
    pub rule_id: String,
    pub request: String,
    pub requested_at: i64,
    /// 0 while pending.
    pub decided_at: i64,
    /// `pending`, `approved`, `denied`, `timeout`.
    pub decision: String,
    pub approver: String,
    pub reason: String,
}

/// A record as it travels through the spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Session(SessionRow),
    Event(EventRow),
    Chunk(ChunkRow),
    Approval(ApprovalRow),
}

impl Record {
    /// Roughly what the record holds in memory (the audit queue is bounded
    /// by bytes as well as by records).
    pub fn approx_bytes(&self) -> usize {
        match self {
            Record::Chunk(c) => 96 + c.data.len(),
            Record::Event(e) => {
                256 + e.request.len()
                    + e.reason.len()
                    + e.attr_values.iter().map(String::len).sum::<usize>()
            }
            Record::Session(s) => 256 + s.detail.len(),
            Record::Approval(_) => 512,
        }
    }

    pub fn table(&self) -> &'static str {
        match self {
            Record::Session(_) => "sessions",
            Record::Event(_) => "events",
            Record::Chunk(_) => "chunks",
            Record::Approval(_) => "approvals",
        }
    }
}
