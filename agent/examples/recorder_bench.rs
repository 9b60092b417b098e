//! Recorder throughput: pushes N synthetic `events` rows (about 240 bytes each,
//! 16 columns) through the real recorder (queue → spool with fsync → shipper →
//! ClickHouse) and reports when ClickHouse has them all.
//!
//! Run by `cargo xtask bench audit`; by hand:
//! `cargo run --release --example recorder_bench -- http://127.0.0.1:8123 2000000`

use std::{sync::atomic::Ordering, time::Instant};

use loopgate::audit::{
    clickhouse::{Ch, Shipper},
    now_micros, AuditSink, EventRow, Record, Recorder,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:8123".into());
    let n: u64 = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let db = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "loopgate_bench".into());
    let state = tempfile::tempdir()?;
    let rec = std::sync::Arc::new(Recorder::open(state.path(), true)?);
    let ch = Ch::new(&url, &db);
    ch.migrate(30).await?;
    let stop = CancellationToken::new();
    let shipper = tokio::spawn(
        Shipper {
            ch,
            spool_dir: rec.spool_dir.clone(),
            counters: rec.counters.clone(),
            notify: rec.spooled_notify.clone(),
            retention_days: 30,
            batch: 100_000,
            interval: std::time::Duration::from_millis(200),
        }
        .run(stop.clone()),
    );
    let session = Uuid::now_v7();
    let sample = |i: u64| EventRow {
        event_id: Uuid::now_v7(),
        session_id: session,
        ts: now_micros(),
        host: "bench-host".into(),
        workload: format!("workload-{}", i % 16),
        target: "orders-db".into(),
        protocol: "postgres".into(),
        kind: "sql".into(),
        request: format!("SELECT id, total FROM orders WHERE customer_id = {i} LIMIT 100"),
        verdict: "allow".into(),
        rule_id: "default:allow".into(),
        reason: "no rule matched; target default".into(),
        pid: 4242,
        uid: 1000,
        attr_keys: vec!["statement_kind".into(), "tables".into()],
        attr_values: vec!["select".into(), "orders".into()],
    };
    let bytes: usize = postcard::to_allocvec(&Record::Event(sample(0)))?.len();
    let t = Instant::now();
    // Producers push at full speed; the recorder's queue holds 1 M records, so
    // pace by what has been spooled to measure the sustained rate.
    let mut i = 0;
    while i < n {
        let spooled = rec.counters.spooled.load(Ordering::Relaxed);
        if i - spooled > 50_000 {
            tokio::task::yield_now().await;
            continue;
        }
        for _ in 0..10_000.min(n - i) {
            rec.record(Record::Event(sample(i)));
            i += 1;
        }
    }
    let pushed = t.elapsed();
    while rec.counters.shipped.load(Ordering::Relaxed) < n {
        if rec.counters.dropped.load(Ordering::Relaxed) > 0 {
            anyhow::bail!(
                "records dropped: {}",
                rec.counters.dropped.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let total = t.elapsed();
    stop.cancel();
    let _ = shipper.await;
    rec.close();
    let secs = total.as_secs_f64();
    println!(
        "{{\"events\": {n}, \"record_bytes\": {bytes}, \"push_s\": {:.3}, \"total_s\": {secs:.3}, \"events_per_s\": {:.0}, \"mb_per_s\": {:.1}}}",
        pushed.as_secs_f64(),
        n as f64 / secs,
        (n as f64 * bytes as f64) / secs / 1e6
    );
    Ok(())
}
