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

use serde::Serialize;

mod client;
mod schema;
mod shipper;

pub use client::Ch;
pub use schema::{full_ddl, Migration, MIGRATIONS, TABLES};
pub use shipper::Shipper;

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
