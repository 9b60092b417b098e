//! The shipper: drains the spool into ClickHouse in order, from the
//! persisted cursor, with backoff.

use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::{Ch, ChError, Dialect};
use crate::audit::{rows::Record, spool, Counters};

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
