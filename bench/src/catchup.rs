//! The cost of catch-up on rejoin (issue #14): the server memory of the history per 10,000
//! retained changes (RSS with catch-up on, against a run with it off), and how fast R clients
//! that went away rejoin and receive what they missed (every one checked), against the same
//! clients joining with catch-up off (the reference: a plain join).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::chart;
use crate::harness::{
    percentile, rss_bytes, save_results, start_walcast_with, token, ws_connect, BenchDb, Ws,
};

pub(crate) struct CatchupArgs {
    /// Changes retained for the memory figure.
    pub(crate) retained: usize,
    /// Rejoining clients.
    pub(crate) clients: usize,
    /// Rooms the clients are spread over (one `room=eq.X` binding each).
    pub(crate) rooms: usize,
    /// Changes each client misses.
    pub(crate) missed: usize,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, room int NOT NULL, body text NOT NULL);
    GRANT SELECT ON items TO authenticated;
    ALTER PUBLICATION supabase_realtime ADD TABLE items;
";

/// The WAL position now, as text.
async fn wal_now(sql: &tokio_postgres::Client) -> anyhow::Result<String> {
    Ok(sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// Waits until walcast's slot has confirmed `lsn` (everything before it was delivered, and so
/// recorded in the history).
async fn wait_confirmed(sql: &tokio_postgres::Client, lsn: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done: bool = sql
            .query_one(
                "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) FROM pg_replication_slots WHERE slot_name = 'walcast_changes'",
                &[&lsn],
            )
            .await?
            .get(0);
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the slot did not confirm {lsn} in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// RSS growth of a walcast while `n` changes (100-byte bodies, 100 per transaction) go through
/// it with no subscriber.
async fn rss_growth(db_url: &str, n: usize, catchup: bool) -> anyhow::Result<u64> {
    let env: Vec<(&str, &str)> = if catchup {
        vec![("CATCHUP_HISTORY_BYTES", "1073741824")]
    } else {
        vec![("CATCHUP_WINDOW_MS", "0")]
    };
    let mut walcast = start_walcast_with(db_url, 4, &env).await?;
    let pid = walcast.child.id().context("pid")?;
    let (sql, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    // Warm up the decoder and the catalog with one batch first.
    sql.execute(
        "INSERT INTO items (room, body) SELECT 0, repeat('x', 100) FROM generate_series(1, 100)",
        &[],
    )
    .await?;
    wait_confirmed(&sql, &wal_now(&sql).await?).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid)?;
    for _ in 0..n.div_ceil(100) {
        sql.execute(
            "INSERT INTO items (room, body) SELECT 0, repeat('y', 100) FROM generate_series(1, 100)",
            &[],
        )
        .await?;
    }
    wait_confirmed(&sql, &wal_now(&sql).await?).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_bytes(pid)?;
    let _ = walcast.child.kill().await;
    Ok(after.saturating_sub(before))
}

/// One client: join its room with message ref `msg_ref`, wait for "Subscribed"; returns the
/// socket. A rejoin continues the refs its first socket used (as supabase-js does across its
/// reconnects): a join that starts again from 1 is a new page, which starts fresh.
async fn subscribe(port: u16, user: &str, room: usize, msg_ref: u64) -> anyhow::Result<Ws> {
    let mut ws = ws_connect(port, &token(user)).await?;
    let r = msg_ref.to_string();
    let join = json!([r, r, format!("realtime:room-{room}"), "phx_join",
        {"config": {"broadcast": {"ack": false, "self": false}, "presence": {"enabled": false},
                    "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "items", "filter": format!("room=eq.{room}")}]}}]);
    ws.send(Message::Text(join.to_string().into())).await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await?
            .context("socket closed")??;
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t)?;
        if v[3] == "system" {
            if v[4]["status"] != "ok" {
                bail!("subscription failed: {}", v[4]);
            }
            // A rejoin that was not resumed would wait for nothing: say why instead.
            if msg_ref > 1 && v[4]["catchup"]["status"] != "resumed" {
                bail!("the rejoin was not resumed: {}", v[4]);
            }
            return Ok(ws);
        }
    }
}

/// One client rejoining: join, then receive `expect` changes; returns (time to the join's
/// reply, time to the last missed change) and checks each arrived once.
async fn rejoin(
    port: u16,
    user: String,
    room: usize,
    expect: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    // Ref 2 with catch-up on (a reconnect of the same client); with it off, ref 1 (a plain join).
    let msg_ref = if expect > 0 { 2 } else { 1 };
    let mut ws = subscribe(port, &user, room, msg_ref).await?;
    let subscribed = start.elapsed();
    let mut ids = HashSet::new();
    while ids.len() < expect {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .context("timed out waiting for missed changes")?
            .context("socket closed")??;
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t)?;
        if v[3] == "postgres_changes" {
            let id = v[4]["data"]["record"]["id"].as_i64().context("id")?;
            if !ids.insert(id) {
                bail!("change {id} twice");
            }
        }
    }
    Ok((subscribed, start.elapsed()))
}

struct RejoinRun {
    seconds: f64,
    subscribed_p50_ms: f64,
    done_p50_ms: f64,
    done_p99_ms: f64,
}

/// R clients join, go away, `missed` changes per room are committed, and they all rejoin at
/// once; with catch-up off the rejoin is a plain join (nothing to wait for).
async fn rejoin_run(db_url: &str, a: &CatchupArgs, catchup: bool) -> anyhow::Result<RejoinRun> {
    let env: Vec<(&str, &str)> = if catchup {
        vec![]
    } else {
        vec![("CATCHUP_WINDOW_MS", "0")]
    };
    let mut walcast = start_walcast_with(db_url, 8, &env).await?;
    let port = walcast.port;
    let (sql, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let users: Vec<String> = (0..a.clients).map(|i| format!("user-{i}")).collect();
    let mut sockets = Vec::new();
    for (i, u) in users.iter().enumerate() {
        sockets.push(subscribe(port, u, i % a.rooms, 1).await?);
    }
    drop(sockets); // every socket dies without a leave
    let rooms: Vec<i32> = (0..a.rooms as i32).collect();
    for _ in 0..a.missed {
        sql.execute(
            "INSERT INTO items (room, body) SELECT r, repeat('z', 100) FROM unnest($1::int[]) r",
            &[&rooms],
        )
        .await?;
    }
    wait_confirmed(&sql, &wal_now(&sql).await?).await?;
    let expect = if catchup { a.missed } else { 0 };
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, u) in users.into_iter().enumerate() {
        tasks.push(tokio::spawn(rejoin(port, u, i % a.rooms, expect)));
    }
    let mut subscribed = Vec::new();
    let mut done = Vec::new();
    for t in tasks {
        let (s, d) = t.await??;
        subscribed.push(s);
        done.push(d);
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = walcast.child.kill().await;
    subscribed.sort();
    done.sort();
    let ms = |v: &[Duration], p: f64| percentile(v, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    Ok(RejoinRun {
        seconds,
        subscribed_p50_ms: ms(&subscribed, 0.5),
        done_p50_ms: ms(&done, 0.5),
        done_p99_ms: ms(&done, 0.99),
    })
}

pub(crate) async fn catchup(a: CatchupArgs) -> anyhow::Result<()> {
    let db = BenchDb::start("catchup")?;
    let db_url = db.url();
    let (sql, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    // The first walcast run applies the migrations (roles, publication) the schema needs.
    let mut first = start_walcast_with(&db_url, 2, &[]).await?;
    sql.batch_execute(SCHEMA).await?;
    let _ = first.child.kill().await;

    let on = rss_growth(&db_url, a.retained, true).await?;
    let off = rss_growth(&db_url, a.retained, false).await?;
    let per_10k = (on as f64 - off as f64) / a.retained as f64 * 10_000.0;
    let with = rejoin_run(&db_url, &a, true).await?;
    let without = rejoin_run(&db_url, &a, false).await?;
    let replayed = (a.clients * a.missed) as f64;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "catchup: history memory, {} changes of ~120 bytes of row data each",
        a.retained
    );
    println!(
        "server RSS growth: catch-up on {:.1} MiB, off {:.1} MiB: {:.2} MiB per 10,000 retained changes",
        on as f64 / 1048576.0,
        off as f64 / 1048576.0,
        per_10k / 1048576.0
    );
    println!(
        "rejoin: {} clients over {} rooms, {} missed changes each ({} replayed in all); loader, walcast and PostgreSQL share {cores} cores",
        a.clients, a.rooms, a.missed, replayed
    );
    println!(
        "{:<34} {:>9} {:>14} {:>13} {:>13}",
        "", "seconds", "subscribed p50", "caught-up p50", "caught-up p99"
    );
    for (name, r) in [
        ("catch-up (rejoin + replay)", &with),
        ("reference: plain join, catch-up off", &without),
    ] {
        println!(
            "{:<34} {:>9.2} {:>11.1} ms {:>10.1} ms {:>10.1} ms",
            name, r.seconds, r.subscribed_p50_ms, r.done_p50_ms, r.done_p99_ms
        );
    }
    println!(
        "catch-up rate: {:.0} rejoins/s, {:.0} replayed changes/s",
        a.clients as f64 / with.seconds,
        replayed / with.seconds
    );
    let run_json = |r: &RejoinRun| json!({"seconds": r.seconds, "subscribed_p50_ms": r.subscribed_p50_ms, "caught_up_p50_ms": r.done_p50_ms, "caught_up_p99_ms": r.done_p99_ms});
    let out = json!({
        "scenario": "catchup",
        "retained": a.retained, "rss_growth_on": on, "rss_growth_off": off, "bytes_per_10k_retained": per_10k,
        "clients": a.clients, "rooms": a.rooms, "missed": a.missed, "cores": cores,
        "catchup": run_json(&with), "reference_plain_join": run_json(&without),
        "rejoins_per_sec": a.clients as f64 / with.seconds, "replayed_per_sec": replayed / with.seconds,
    });
    save_results(
        "catchup",
        &out,
        &[
            chart::Panel::Bars(chart::BarChart {
                title: format!("server RSS growth over {} changes", a.retained),
                y_label: "MiB".into(),
                categories: vec!["catch-up on".into(), "catch-up off (reference)".into()],
                series: vec![(
                    "RSS growth".into(),
                    vec![on as f64 / 1048576.0, off as f64 / 1048576.0],
                    false,
                )],
            }),
            chart::Panel::Bars(chart::BarChart {
                title: format!(
                    "{} clients rejoining at once, {} missed changes each",
                    a.clients, a.missed
                ),
                y_label: "ms".into(),
                categories: vec!["catch-up".into(), "plain join (reference)".into()],
                series: vec![
                    (
                        "caught-up p50".into(),
                        vec![with.done_p50_ms, without.done_p50_ms],
                        false,
                    ),
                    (
                        "caught-up p99".into(),
                        vec![with.done_p99_ms, without.done_p99_ms],
                        false,
                    ),
                ],
            }),
        ],
    )?;
    Ok(())
}
