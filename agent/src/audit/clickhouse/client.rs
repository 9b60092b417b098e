//! The ClickHouse client: connection, dialect detection, migrations,
//! inserts, and the queries behind `sessions` and `replay`.

use std::time::Duration;

use clickhouse::{Client, Row, RowOwned, RowRead, RowWrite};
use uuid::Uuid;

use super::{ChError, Dialect, MIGRATIONS, TABLES};
use crate::audit::{
    query::{self, Filter, Replay},
    rows::{ApprovalRow, ChunkRow, EventRow, Record, SessionRow},
};

#[derive(Clone)]
pub struct Ch {
    /// No default database: DDL (the database may not exist yet), queries
    /// with qualified names.
    client: Client,
    /// Default database set: inserts (the crate quotes the table name as one
    /// identifier, so it cannot be qualified).
    inserts: Client,
    pub(super) url: String,
    pub(super) db: String,
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
        let cutoff = crate::audit::now_micros() - i64::from(retention_days) * 86_400_000_000;
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
