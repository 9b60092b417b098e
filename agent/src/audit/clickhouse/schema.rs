//! The schema: versioned migrations of both DDL dialects (every statement
//! idempotent), and the full DDL for `loopgate audit-schema`.

use super::Dialect;

/// Schema migrations, in order. Each is a list of statements per dialect;
/// every statement is idempotent (`IF NOT EXISTS`). Never edit a released
/// migration: add a new one.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: fn(Dialect, &str, u32) -> Vec<String>,
}

pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "sessions, events, chunks, approvals",
    statements: v1,
}];

/// Types that differ between the dialects.
struct Types {
    time: &'static str,
    lc: &'static str,
    zstd: &'static str,
}

fn types(d: Dialect) -> Types {
    match d {
        Dialect::Modern => Types {
            time: "DateTime64(6, 'UTC')",
            lc: "LowCardinality(String)",
            zstd: " CODEC(ZSTD(3))",
        },
        Dialect::Legacy => Types {
            time: "Int64",
            lc: "String",
            zstd: "",
        },
    }
}

/// `<t>_us Int64`: a time column as microseconds, in either dialect.
fn us_alias(d: Dialect, t: &str) -> String {
    match d {
        Dialect::Modern => format!("{t}_us Int64 ALIAS toUnixTimestamp64Micro({t})"),
        Dialect::Legacy => format!("{t}_us Int64 ALIAS {t}"),
    }
}

/// Helper columns around the main time column `t`: `<t>_us` and `day`.
fn time_helpers(d: Dialect, t: &str) -> String {
    let day = match d {
        Dialect::Modern => format!("toDate({t})"),
        Dialect::Legacy => format!("toDate(toDateTime(intDiv({t}, 1000000), 'UTC'))"),
    };
    format!("{},\n  day Date ALIAS {day}", us_alias(d, t))
}

fn partition_and_ttl(d: Dialect, t: &str, retention_days: u32) -> String {
    match d {
        Dialect::Modern => {
            format!("PARTITION BY toDate({t})\nTTL toDateTime({t}) + INTERVAL {retention_days} DAY")
        }
        Dialect::Legacy => {
            format!("PARTITION BY toYYYYMMDD(toDateTime(intDiv({t}, 1000000), 'UTC'))")
        }
    }
}

fn v1(d: Dialect, db: &str, retention_days: u32) -> Vec<String> {
    let Types { time, lc, zstd } = types(d);
    let modern = d == Dialect::Modern;
    let attributes_alias = if modern {
        ",\n  attributes Map(String, String) ALIAS mapFromArrays(attr_keys, attr_values)"
    } else {
        ""
    };
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.sessions (
  session_id UUID,
  version UInt8,
  host {lc},
  workload {lc},
  cgroup String,
  target {lc},
  protocol {lc},
  destination String,
  pid UInt32,
  tgid UInt32,
  uid UInt32,
  gid UInt32,
  comm {lc},
  cgroup_id UInt64,
  netns_cookie UInt64,
  started_at {time},
  ended_at {time},
  bytes_up UInt64,
  bytes_down UInt64,
  outcome {lc},
  detail String,
  {helpers},
  {ended_us}
) ENGINE = ReplacingMergeTree(version)
{part}
ORDER BY (workload, started_at, session_id)",
            helpers = time_helpers(d, "started_at"),
            ended_us = us_alias(d, "ended_at"),
            part = partition_and_ttl(d, "started_at", retention_days),
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.events (
  event_id UUID,
  session_id UUID,
  ts {time},
  host {lc},
  workload {lc},
  target {lc},
  protocol {lc},
  kind {lc},
  request String{zstd},
  verdict {lc},
  rule_id {lc},
  reason String,
  pid UInt32,
  uid UInt32,
  attr_keys Array(String),
  attr_values Array(String),
  {helpers}{attributes_alias}
) ENGINE = ReplacingMergeTree
{part}
ORDER BY (workload, ts, event_id)",
            helpers = time_helpers(d, "ts"),
            part = partition_and_ttl(d, "ts", retention_days),
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.chunks (
  session_id UUID,
  direction Enum8('up' = 1, 'down' = 2),
  seq UInt32,
  offset UInt64,
  ts {time},
  data String{zstd},
  masked UInt8,
  {helpers}
) ENGINE = ReplacingMergeTree
{part}
ORDER BY (session_id, direction, seq)",
            helpers = time_helpers(d, "ts"),
            part = partition_and_ttl(d, "ts", retention_days),
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.approvals (
  approval_id UUID,
  version UInt8,
  session_id UUID,
  host {lc},
  workload {lc},
  target {lc},
  rule_id {lc},
  request String,
  requested_at {time},
  decided_at {time},
  decision {lc},
  approver {lc},
  reason String,
  {helpers},
  {decided_us}
) ENGINE = ReplacingMergeTree(version)
{part}
ORDER BY (workload, requested_at, approval_id)",
            helpers = time_helpers(d, "requested_at"),
            decided_us = us_alias(d, "decided_at"),
            part = partition_and_ttl(d, "requested_at", retention_days),
        ),
    ]
}

/// Every statement of every migration, for `loopgate audit-schema`.
pub fn full_ddl(d: Dialect, db: &str, retention_days: u32) -> Vec<String> {
    let mut v = vec![format!("CREATE DATABASE IF NOT EXISTS {db}")];
    for m in MIGRATIONS {
        v.extend((m.statements)(d, db, retention_days));
    }
    v
}

pub const TABLES: [&str; 4] = ["sessions", "events", "chunks", "approvals"];
