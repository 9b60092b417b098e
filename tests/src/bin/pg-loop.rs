//! A tokio-postgres loop for the end-to-end tests (`tests/postgres_sql.rs`):
//! run through `loopgate exec` as an unprivileged, tagged process, it
//! drives the extended protocol the way Rust services do (prepared
//! statements, binary parameters and results, pipelined queries, portals
//! with row limits, cancel) and prints one line per step, so the test can
//! compare what the loop saw.
//!
//! Usage: `pg-loop HOST PORT`.

use futures_util::future::join3;
use tokio_postgres::{error::SqlState, Client, NoTls};

/// `code message` of a failed step (the rule's name is in the message).
fn failure(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => format!("client error {e}"),
    }
}

async fn connect(conninfo: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {}", failure(&e)));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

async fn run(host: &str, port: &str) {
    let conninfo = format!("host={host} port={port} user=x dbname=postgres connect_timeout=10");
    let mut c = connect(&conninfo).await;

    // The simple protocol, two statements in one string.
    let msgs = c.simple_query("SELECT 1; SELECT 'two'").await.unwrap();
    let vals: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    println!("simple {}", vals.join(" "));

    // Prepared, a binary int4 parameter, binary results (a masked text
    // column comes back as the same number of stars).
    let st = c
        .prepare("SELECT id, email FROM orders WHERE id = $1")
        .await
        .unwrap();
    let row = c.query_one(&st, &[&1i32]).await.unwrap();
    println!(
        "prepared {} {}",
        row.get::<_, i32>(0),
        row.get::<_, String>(1)
    );

    // A refused Parse; the client goes on.
    match c.query("DELETE FROM orders", &[]).await {
        Ok(_) => println!("delete not refused"),
        Err(e) => println!("refused {}", failure(&e)),
    }

    // Pipelined: three statements in flight at once, the middle one refused.
    let (a, b, d) = join3(
        c.query_one("SELECT $1::int + 1", &[&1i32]),
        c.query("TRUNCATE orders", &[]),
        c.query_one("SELECT count(*) FROM orders", &[]),
    )
    .await;
    println!(
        "pipeline {} {} {}",
        a.map(|r| r.get::<_, i32>(0).to_string())
            .unwrap_or_else(|e| failure(&e)),
        b.map(|_| "ran".to_owned())
            .unwrap_or_else(|e| e.code().map(|c| c.code().to_owned()).unwrap_or_default()),
        d.map(|r| r.get::<_, i64>(0).to_string())
            .unwrap_or_else(|e| failure(&e)),
    );

    // A transaction: binary text and int parameters, a refused statement
    // that does not abort it, a portal read two rows at a time
    // (PortalSuspended), then commit.
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO orders VALUES ($1, $2)",
        &[&40i32, &"rust@example.com"],
    )
    .await
    .unwrap();
    let refused = tx.execute("UPDATE orders SET email = $1", &[&"x"]).await;
    println!(
        "in transaction {}",
        refused
            .err()
            .and_then(|e| e.code().map(|c| c.code().to_owned()))
            .unwrap_or_else(|| "ran".into())
    );
    let portal = tx
        .bind("SELECT id FROM orders ORDER BY id", &[])
        .await
        .unwrap();
    let mut chunks = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 2).await.unwrap();
        if rows.is_empty() {
            break;
        }
        chunks.push(
            rows.iter()
                .map(|r| r.get::<_, i32>(0).to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    println!("portal {}", chunks.join(" | "));
    tx.commit().await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    println!("committed {n}");

    // A cancel, through the agent's cancel key.
    let token = c.cancel_token();
    let sleeper = c.simple_query("SELECT pg_sleep(30)");
    let cancel = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await
    };
    let (slept, cancelled) = tokio::join!(sleeper, cancel);
    println!(
        "cancel {} {}",
        cancelled.is_ok(),
        slept
            .err()
            .filter(|e| e.code() == Some(&SqlState::QUERY_CANCELED))
            .map_or("not cancelled", |_| "57014")
    );
    drop(c);

    // A message over the target's limits, from either side: the session
    // ends with a FATAL; a new one works.
    let c = connect(&conninfo).await;
    let big = format!("SELECT '{}'", "x".repeat(2 << 20));
    match c.simple_query(&big).await {
        Ok(_) => println!("long query ran"),
        Err(e) => println!("long query {}", failure(&e)),
    }
    // The session is over: the next statement fails.
    println!("closed {}", c.simple_query("SELECT 1").await.is_err());
    let c = connect(&conninfo).await;
    match c.simple_query("SELECT repeat('y', 3000000)").await {
        Ok(_) => println!("long row relayed"),
        Err(e) => println!("long row {}", failure(&e)),
    }
    let c = connect(&conninfo).await;
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    println!("after {one}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, host, port] = &args[..] else {
        eprintln!("usage: pg-loop HOST PORT");
        std::process::exit(2);
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run(host, port));
}
