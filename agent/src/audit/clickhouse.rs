//! ClickHouse: schema (two DDL dialects), versioned migrations, the shipper
//! that drains the spool, and the queries behind `sessions` and `replay`.
//!
//! Dialects are chosen by `SELECT version()`: `modern` (22.x and later:
//! `DateTime64(6, 'UTC')`, `LowCardinality`, `Map` alias, `CODEC(ZSTD)`, `TTL`)
//! and `legacy` (18.16, the only server Debian 12 ships: `Int64` microseconds,
//! `String`, retention by dropping day partitions). The inserted columns encode
//! identically in RowBinary, so one row type per table serves both. Both
//! dialects add the same helper columns, so one query text runs on either:
//! `<time>_us Int64` (microseconds) and `day Date`.

use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use clickhouse::{Client, Row, RowOwned, RowRead, RowWrite};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    query::{self, Filter, Replay},
    rows::{ApprovalRow, ChunkRow, EventRow, Record, SessionRow},
    spool, Counters,
};

#[derive(Debug, thiserror::Error)]
pub enum ChError {
    #[error("ClickHouse at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("ClickHouse at {url} refused {what}: {message}")]
    Refused {
        url: String,
        what: String,
        message: String,
    },
    #[error("ClickHouse at {url}: {what}: {message}")]
    Other {
        url: String,
        what: String,
        message: String,
    },
}

impl ChError {
    fn from_client(url: &str, what: &str, e: clickhouse::error::Error) -> Self {
        use clickhouse::error::Error as E;
        match e {
            E::Network(inner) => {
                // The crate's Display is only "client error (Connect)"; the
                // cause (refused, timed out, ...) is in the debug form.
                let dbg = format!("{inner:?}");
                let reason = if dbg.contains("ConnectionRefused") {
                    "connection refused".to_owned()
                } else if dbg.contains("TimedOut") || dbg.contains("timed out") {
                    "connection timed out".to_owned()
                } else {
                    format!("network error: {inner}")
                };
                ChError::Unreachable {
                    url: url.to_owned(),
                    reason,
                }
            }
            E::TimedOut => ChError::Unreachable {
                url: url.to_owned(),
                reason: "request timed out".into(),
            },
            E::BadResponse(body) => ChError::Refused {
                url: url.to_owned(),
                what: what.to_owned(),
                message: tidy(&body),
            },
            other => ChError::Other {
                url: url.to_owned(),
                what: what.to_owned(),
                message: other.to_string(),
            },
        }
    }
}

/// "Code: 81, e.displayText() = DB::Exception: Database x doesn't exist, e.what() = DB::Exception"
/// → "Code 81: Database x doesn't exist".
fn tidy(body: &str) -> String {
    let body = body.trim();
    let code = body
        .strip_prefix("Code: ")
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .filter(|c| !c.is_empty());
    let msg = body
        .split("DB::Exception: ")
        .nth(1)
        .map(|m| m.split(", e.what()").next().unwrap_or(m))
        .map(|m| m.split(" (version ").next().unwrap_or(m))
        .unwrap_or(body)
        .trim_end_matches('.')
        .trim();
    match code {
        Some(c) => format!("Code {c}: {msg}"),
        None => msg.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Modern,
    Legacy,
}

impl Dialect {
    /// Modern DDL needs DateTime64, Map and GA LowCardinality: 22.x and later.
    pub fn for_version(version: &str) -> Self {
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.trim().parse().ok())
            .unwrap_or(0);
        if major >= 22 {
            Dialect::Modern
        } else {
            Dialect::Legacy
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "modern" => Some(Dialect::Modern),
            "legacy" => Some(Dialect::Legacy),
            _ => None,
        }
    }
}

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

#[derive(Clone)]
pub struct Ch {
    /// No default database: DDL (the database may not exist yet), queries
    /// with qualified names.
    client: Client,
    /// Default database set: inserts (the crate quotes the table name as one
    /// identifier, so it cannot be qualified).
    inserts: Client,
    url: String,
    db: String,
}

impl Ch {
    pub fn new(url: &str, db: &str) -> Self {
        let client = Client::default()
            .with_url(url)
            // 18.16 knows neither RowBinaryWithNamesAndTypes nor
            // describe_include_subcolumns; the schema round trip is tested instead.
            .with_validation(false);
        Self {
            inserts: client.clone().with_database(db),
            client,
            url: url.to_owned(),
            db: db.to_owned(),
        }
    }

    /// The client `[audit]` describes (`None` without `clickhouse_url`).
    pub fn from_config(
        cfg: &crate::config::Config,
    ) -> Result<Option<Self>, crate::secrets::SecretError> {
        let Some(url) = &cfg.audit.clickhouse_url else {
            return Ok(None);
        };
        let mut ch = Self::new(url, &cfg.audit.database);
        if let Some(user) = &cfg.audit.user {
            ch = ch.with_user(user);
        }
        if let Some(p) = &cfg.audit.password_file {
            ch = ch.with_password(&crate::secrets::read_file(cfg, "audit.password_file", p)?);
        }
        Ok(Some(ch))
    }

    pub fn with_user(mut self, user: &str) -> Self {
        self.client = self.client.with_user(user);
        self.inserts = self.inserts.with_user(user);
        self
    }

    pub fn with_password(mut self, password: &crate::secrets::Secret) -> Self {
        self.client = self.client.with_password(password.expose());
        self.inserts = self.inserts.with_password(password.expose());
        self
    }

    fn err(&self, what: &str) -> impl FnOnce(clickhouse::error::Error) -> ChError + '_ {
        let what = what.to_owned();
        move |e| ChError::from_client(&self.url, &what, e)
    }

    pub async fn version(&self) -> Result<String, ChError> {
        self.client
            .query("SELECT version()")
            .fetch_one::<String>()
            .await
            .map_err(self.err("SELECT version()"))
    }

    async fn exec(&self, sql: &str) -> Result<(), ChError> {
        let what = sql.lines().next().unwrap_or(sql).to_owned();
        self.client
            .query(sql)
            .execute()
            .await
            .map_err(self.err(&what))
    }

    /// Creates the database and applies missing migrations. Returns the dialect.
    pub async fn migrate(&self, retention_days: u32) -> Result<Dialect, ChError> {
        let dialect = Dialect::for_version(&self.version().await?);
        let db = &self.db;
        self.exec(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .await?;
        self.exec(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, name String, dialect String, applied_at DateTime) ENGINE = MergeTree ORDER BY version"
        ))
        .await?;
        let applied: Vec<u32> = self
            .client
            .query(&format!("SELECT version FROM {db}.schema_migrations"))
            .fetch_all::<u32>()
            .await
            .map_err(self.err("reading schema_migrations"))?;
        for m in MIGRATIONS {
            if applied.contains(&m.version) {
                continue;
            }
            for stmt in (m.statements)(dialect, db, retention_days) {
                self.exec(&stmt).await?;
            }
            let d = match dialect {
                Dialect::Modern => "modern",
                Dialect::Legacy => "legacy",
            };
            self.exec(&format!(
                "INSERT INTO {db}.schema_migrations (version, name, dialect, applied_at) VALUES ({}, '{}', '{d}', now())",
                m.version, m.name
            ))
            .await?;
            tracing::info!(
                version = m.version,
                name = m.name,
                dialect = d,
                "audit schema migration applied"
            );
        }
        if dialect == Dialect::Modern {
            // Retention follows the config on every start.
            for (t, col) in [
                ("sessions", "started_at"),
                ("events", "ts"),
                ("chunks", "ts"),
                ("approvals", "requested_at"),
            ] {
                self.exec(&format!(
                    "ALTER TABLE {db}.{t} MODIFY TTL toDateTime({col}) + INTERVAL {retention_days} DAY"
                ))
                .await?;
            }
        }
        Ok(dialect)
    }

    /// Legacy retention: drops day partitions older than `retention_days`.
    pub async fn drop_old_partitions(&self, retention_days: u32) -> Result<usize, ChError> {
        let cutoff = super::now_micros() - i64::from(retention_days) * 86_400_000_000;
        let cutoff_day: u32 = {
            let t = std::time::UNIX_EPOCH + Duration::from_micros(cutoff.max(0) as u64);
            let s = humantime::format_rfc3339(t).to_string();
            s[..10].replace('-', "").parse().unwrap_or(0)
        };
        let mut dropped = 0;
        for t in TABLES {
            let parts: Vec<String> = self
                .client
                .query("SELECT DISTINCT partition FROM system.parts WHERE database = ? AND table = ? AND active")
                .bind(&self.db)
                .bind(t)
                .fetch_all::<String>()
                .await
                .map_err(self.err("listing partitions"))?;
            for p in parts {
                if p.trim_matches('\'')
                    .parse::<u32>()
                    .is_ok_and(|d| d < cutoff_day)
                {
                    self.exec(&format!("ALTER TABLE {}.{t} DROP PARTITION {p}", self.db))
                        .await?;
                    dropped += 1;
                }
            }
        }
        Ok(dropped)
    }

    async fn insert<T>(&self, table: &str, rows: &[T]) -> Result<(), ChError>
    where
        T: Row + RowWrite + for<'a> Row<Value<'a> = T>,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let what = format!("an insert into {}.{table}", self.db);
        let mut ins = self
            .inserts
            .insert::<T>(table)
            .await
            .map_err(self.err(&what))?;
        for r in rows {
            ins.write(r).await.map_err(self.err(&what))?;
        }
        ins.end().await.map_err(self.err(&what))
    }

    /// Inserts a batch of records, table by table.
    pub async fn insert_records(&self, records: Vec<Record>) -> Result<(), ChError> {
        let (mut s, mut e, mut c, mut a) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in records {
            match r {
                Record::Session(x) => s.push(x),
                Record::Event(x) => e.push(x),
                Record::Chunk(x) => c.push(x),
                Record::Approval(x) => a.push(x),
            }
        }
        self.insert("sessions", &s).await?;
        self.insert("events", &e).await?;
        self.insert("chunks", &c).await?;
        self.insert("approvals", &a).await
    }

    async fn fetch<T>(&self, sql: &str, what: &str) -> Result<Vec<T>, ChError>
    where
        T: RowOwned + RowRead,
    {
        self.client
            .query(sql)
            .fetch_all::<T>()
            .await
            .map_err(self.err(what))
    }

    pub async fn sessions(&self, f: &Filter) -> Result<Vec<SessionRow>, ChError> {
        let mut sql = format!("SELECT ?fields FROM {}.sessions FINAL WHERE 1", self.db);
        let mut q_workload = None;
        let mut q_target = None;
        if let Some(w) = &f.workload {
            sql.push_str(" AND workload = ?");
            q_workload = Some(w.clone());
        }
        if let Some(t) = &f.target {
            sql.push_str(" AND target = ?");
            q_target = Some(t.clone());
        }
        if let Some(since) = f.since {
            sql.push_str(&format!(" AND started_at_us >= {since}"));
        }
        sql.push_str(" ORDER BY started_at, session_id");
        let mut q = self.client.query(&sql);
        if let Some(w) = q_workload {
            q = q.bind(w);
        }
        if let Some(t) = q_target {
            q = q.bind(t);
        }
        let mut rows = q
            .fetch_all::<SessionRow>()
            .await
            .map_err(self.err("reading sessions"))?;
        // FINAL merges at read time; fold again in case of a replica lag.
        rows = query::fold_sessions(rows);
        Ok(rows)
    }

    pub async fn replay(&self, id: Uuid) -> Result<Option<Replay>, ChError> {
        let db = &self.db;
        let sessions: Vec<SessionRow> = self
            .fetch(
                &format!("SELECT ?fields FROM {db}.sessions FINAL WHERE session_id = '{id}'"),
                "reading the session",
            )
            .await?;
        let events: Vec<EventRow> = self
            .fetch(
                &format!(
                    "SELECT ?fields FROM {db}.events FINAL WHERE session_id = '{id}' ORDER BY ts"
                ),
                "reading events",
            )
            .await?;
        let chunks: Vec<ChunkRow> = self
            .fetch(
                &format!("SELECT ?fields FROM {db}.chunks FINAL WHERE session_id = '{id}' ORDER BY ts, direction, seq"),
                "reading chunks",
            )
            .await?;
        let _: Option<ApprovalRow> = None;
        Ok(query::assemble(sessions, events, chunks))
    }
}

/// Drains the spool into ClickHouse, in order, from the persisted cursor.
pub struct Shipper {
    pub ch: Ch,
    pub spool_dir: PathBuf,
    pub counters: Arc<Counters>,
    pub notify: Arc<tokio::sync::Notify>,
    pub retention_days: u32,
    /// Records per INSERT batch.
    pub batch: usize,
    /// After a partial batch, wait this long before the next INSERT: ClickHouse
    /// wants few large inserts (each one is a new part to merge), and the
    /// spool holds the records meanwhile.
    pub interval: Duration,
}

impl Shipper {
    fn note_error(&self, e: &ChError, last_logged: &mut Option<(String, Instant)>) {
        self.counters.ship_errors.fetch_add(1, Ordering::Relaxed);
        let msg = e.to_string();
        if let Ok(mut le) = self.counters.last_error.lock() {
            *le = Some(msg.clone());
        }
        // The same error is logged again at most every 30 s.
        let again = match last_logged {
            Some((m, at)) => *m != msg || at.elapsed() > Duration::from_secs(30),
            None => true,
        };
        if again {
            tracing::error!(error = %msg, "audit records stay in the spool until ClickHouse accepts them");
            *last_logged = Some((msg, Instant::now()));
        }
    }

    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        let mut last_logged: Option<(String, Instant)> = None;
        let mut dialect = None;
        let mut last_retention = Instant::now() - Duration::from_secs(86_400);
        let mut quarantine_pending = false;
        let mut cursor = spool::load_cursor(&self.spool_dir);
        loop {
            if stop.is_cancelled() {
                return;
            }
            if dialect.is_none() {
                match self.ch.migrate(self.retention_days).await {
                    Ok(d) => {
                        tracing::info!(url = %self.ch.url, database = %self.ch.db, dialect = ?d, "ClickHouse audit sink ready");
                        dialect = Some(d);
                        backoff = Duration::from_millis(250);
                        if let Ok(mut le) = self.counters.last_error.lock() {
                            *le = None;
                        }
                    }
                    Err(e) => {
                        self.note_error(&e, &mut last_logged);
                        sleep_or_stop(&stop, backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            if dialect == Some(Dialect::Legacy)
                && last_retention.elapsed() > Duration::from_secs(3600)
            {
                last_retention = Instant::now();
                match self.ch.drop_old_partitions(self.retention_days).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(partitions = n, "dropped audit partitions past retention")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "retention clean-up failed"),
                }
            }
            let ids = match spool::list_segments(&self.spool_dir) {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list the spool");
                    sleep_or_stop(&stop, Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some(&newest) = ids.last() else {
                wait(&stop, &self.notify).await;
                continue;
            };
            let c = match cursor {
                Some(c) if ids.contains(&c.segment) => c,
                Some(c) if c.segment > newest => {
                    // The cursor is ahead of the spool (a spool removed by hand):
                    // start over from what is there.
                    tracing::warn!(cursor = ?c, "spool cursor points past the spool; restarting from its oldest segment");
                    spool::Cursor {
                        segment: ids[0],
                        offset: spool::HEADER_LEN,
                    }
                }
                Some(c) => {
                    // Its segment is done and gone: continue with the next one.
                    let next = ids
                        .iter()
                        .copied()
                        .find(|&i| i > c.segment)
                        .unwrap_or(newest);
                    spool::Cursor {
                        segment: next,
                        offset: spool::HEADER_LEN,
                    }
                }
                None => spool::Cursor {
                    segment: ids[0],
                    offset: spool::HEADER_LEN,
                },
            };
            let path = spool::segment_path(&self.spool_dir, c.segment);
            let closed = c.segment != newest;
            let buf = match spool::read_from(&path, c.offset) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool");
                    sleep_or_stop(&stop, Duration::from_secs(1)).await;
                    continue;
                }
            };
            let scan = spool::scan(&buf, c.offset.max(spool::HEADER_LEN), self.batch, closed);
            for (from, to) in &scan.corrupt {
                quarantine_pending = true;
                tracing::error!(segment = %path.display(), from, to, bytes = to - from,
                    "corrupt bytes in the audit spool skipped; the intact records around them are delivered and the segment will be quarantined");
            }
            let mut records = Vec::with_capacity(scan.records.len());
            for (end, payload) in &scan.records {
                match postcard::from_bytes::<Record>(payload) {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        quarantine_pending = true;
                        tracing::error!(segment = %path.display(), record_end = end, error = %e,
                            "an audit record in the spool does not decode; skipped, segment will be quarantined");
                    }
                }
            }
            if !records.is_empty() {
                let n = records.len() as u64;
                if let Err(e) = self.ch.insert_records(records).await {
                    self.note_error(&e, &mut last_logged);
                    sleep_or_stop(&stop, backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    // The schema may be gone (database dropped): check it again.
                    if matches!(e, ChError::Refused { .. }) {
                        dialect = None;
                    }
                    continue;
                }
                backoff = Duration::from_millis(250);
                if last_logged.take().is_some() {
                    tracing::info!("ClickHouse accepts audit records again; draining the spool");
                    if let Ok(mut le) = self.counters.last_error.lock() {
                        *le = None;
                    }
                }
                self.counters.shipped.fetch_add(n, Ordering::Relaxed);
            }
            let next = spool::Cursor {
                segment: c.segment,
                offset: scan.end,
            };
            let advanced = next != c || cursor != Some(c);
            if advanced {
                if let Err(e) = spool::store_cursor(&self.spool_dir, next) {
                    tracing::error!(error = %e, "cannot store the spool cursor");
                }
                cursor = Some(next);
            }
            let segment_done =
                closed && scan.end as usize >= c.offset.max(spool::HEADER_LEN) as usize + buf.len();
            if segment_done {
                if quarantine_pending {
                    let q = self
                        .spool_dir
                        .join("quarantine")
                        .join(path.file_name().unwrap_or_default());
                    match std::fs::rename(&path, &q) {
                        Ok(()) => {
                            tracing::error!(segment = %path.display(), moved_to = %q.display(), "quarantined a spool segment with corrupt bytes")
                        }
                        Err(e) => {
                            tracing::error!(segment = %path.display(), error = %e, "cannot quarantine a spool segment")
                        }
                    }
                    quarantine_pending = false;
                } else if let Err(e) = std::fs::remove_file(&path) {
                    tracing::error!(segment = %path.display(), error = %e, "cannot remove a shipped spool segment");
                }
                continue;
            }
            if scan.records.is_empty() && scan.corrupt.is_empty() {
                wait(&stop, &self.notify).await;
            } else if scan.records.len() < self.batch {
                sleep_or_stop(&stop, self.interval).await;
            }
        }
    }
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Waits for new spooled records (or a second, whichever comes first).
async fn wait(stop: &CancellationToken, notify: &tokio::sync::Notify) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = notify.notified() => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_tidied() {
        assert_eq!(
            tidy("Code: 81, e.displayText() = DB::Exception: Database nosuchdb doesn't exist, e.what() = DB::Exception\n"),
            "Code 81: Database nosuchdb doesn't exist"
        );
        assert_eq!(
            tidy("Code: 164, e.displayText() = DB::Exception: Cannot insert into table in readonly mode, e.what() = DB::Exception"),
            "Code 164: Cannot insert into table in readonly mode"
        );
    }

    #[test]
    fn dialect_by_version() {
        assert_eq!(Dialect::for_version("18.16.1"), Dialect::Legacy);
        assert_eq!(Dialect::for_version("24.8.4.13"), Dialect::Modern);
    }

    #[test]
    fn ddl_dialects_insert_the_same_columns() {
        for t in TABLES {
            let m = full_ddl(Dialect::Modern, "lg", 30);
            let l = full_ddl(Dialect::Legacy, "lg", 30);
            let cols = |ddl: &[String]| -> Vec<String> {
                let stmt = ddl
                    .iter()
                    .find(|s| s.contains(&format!("lg.{t} (")))
                    .unwrap();
                stmt.lines()
                    .skip(1)
                    .take_while(|l| !l.starts_with(')'))
                    .filter(|l| !l.contains(" ALIAS "))
                    .map(|l| l.split_whitespace().next().unwrap().to_owned())
                    .collect()
            };
            assert_eq!(cols(&m), cols(&l), "{t}");
        }
        let m = full_ddl(Dialect::Modern, "lg", 30).join("\n");
        assert!(
            m.contains("DateTime64(6, 'UTC')") && m.contains("TTL") && m.contains("CODEC(ZSTD")
        );
        let l = full_ddl(Dialect::Legacy, "lg", 30).join("\n");
        assert!(!l.contains("DateTime64") && !l.contains("TTL") && !l.contains("LowCardinality"));
    }
}
