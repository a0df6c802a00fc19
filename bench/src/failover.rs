//! Slot failover (issue #16): N walcast nodes with one database behind one nats-server, a
//! subscriber on a node that does not hold the slot, a writer committing a row every 10 ms.
//! The slot holder is killed (SIGKILL); measured: the time from the kill to the subscriber's
//! first row committed after it (so streamed by the new holder), and whether every row
//! committed in the round reached the subscriber exactly once. Repeated for several rounds.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::fanout::start_nats_server;
use crate::harness::{anon_token, start_walcast_with, ws_connect, BenchDb, Walcast};

pub(crate) struct FailoverArgs {
    pub nodes: usize,
    pub rounds: usize,
}

/// Rows of one round are numbered from `round * ROUND_STRIDE`.
const ROUND_STRIDE: i64 = 1_000_000;

pub(crate) async fn slot_failover(a: FailoverArgs) -> anyhow::Result<()> {
    let nodes = a.nodes.max(2);
    println!(
        "slot failover: {nodes} walcast nodes, one nats-server, one PostgreSQL; a row committed every 10 ms; the slot holder killed (SIGKILL), {} rounds; loader, nodes, nats-server and PostgreSQL share 2 cores",
        a.rounds
    );
    let db = BenchDb::start("failover")?;
    let db_url = db.url();
    let (mut nats, nport) = start_nats_server().await?;
    let nats_url = format!("nats://127.0.0.1:{nport}");
    let (sql, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut rows = Vec::new();
    for round in 1..=a.rounds {
        let base = round as i64 * ROUND_STRIDE;
        let mut started: Vec<Walcast> = Vec::new();
        for i in 0..nodes {
            let name = format!("r{round}-n{i}");
            started.push(
                start_walcast_with(
                    &db_url,
                    4,
                    &[
                        ("CLUSTER_NATS_URL", &nats_url),
                        ("NODE_NAME", &name),
                        ("CLUSTER_HEARTBEAT_MS", "100"),
                        ("CLUSTER_NODE_TIMEOUT_MS", "1000"),
                        ("STARTUP_GRACE_MS", "0"),
                    ],
                )
                .await?,
            );
            if i == 0 && round == 1 {
                sql.batch_execute(
                    "CREATE TABLE IF NOT EXISTS failover (id bigserial PRIMARY KEY, k bigint);
                     GRANT SELECT ON failover TO anon;
                     ALTER PUBLICATION supabase_realtime ADD TABLE failover;",
                )
                .await?;
            }
        }
        // The first node started first: it holds the slot. The subscriber is on the second.
        let mut ws = subscribe(started[1].port).await?;
        // Flowing to the subscriber through the holder.
        let mut probe = base;
        loop {
            probe += 1;
            sql.execute("INSERT INTO failover (k) VALUES ($1)", &[&probe])
                .await?;
            if wait_k(&mut ws, |k| k >= probe, Duration::from_millis(300))
                .await?
                .is_some()
            {
                break;
            }
            if probe > base + 200 {
                bail!("round {round}: no change reached the subscriber");
            }
        }
        // The writer.
        let last = Arc::new(AtomicI64::new(probe));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let writer = {
            let last = last.clone();
            let (wsql, wconn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await?;
            tokio::spawn(wconn);
            tokio::spawn(async move {
                let mut k = last.load(Ordering::SeqCst);
                while !*stop_rx.borrow() {
                    k += 1;
                    if wsql
                        .execute("INSERT INTO failover (k) VALUES ($1)", &[&k])
                        .await
                        .is_err()
                    {
                        break;
                    }
                    last.store(k, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let mut seen: Vec<i64> = vec![];
        // Some rows under the first holder.
        let first_leg = probe + 50;
        while seen.last().is_none_or(|k| *k < first_leg) {
            match wait_k(&mut ws, |_| true, Duration::from_secs(10)).await? {
                Some(k) => seen.push(k),
                None => bail!("round {round}: rows stopped before the kill"),
            }
        }
        let holder = started.remove(0);
        let mut holder = holder.child;
        let committed_at_kill = last.load(Ordering::SeqCst);
        let killed = Instant::now();
        holder.start_kill()?;
        let mut failover = None;
        loop {
            let Some(k) = wait_k(&mut ws, |_| true, Duration::from_secs(30)).await? else {
                bail!("round {round}: no row after the kill");
            };
            seen.push(k);
            if k > committed_at_kill + 1 {
                failover = failover.or(Some(killed.elapsed()));
            }
            if k > committed_at_kill + 100 {
                break;
            }
        }
        let _ = holder.wait().await;
        stop_tx.send_replace(true);
        writer.await?;
        let end = last.load(Ordering::SeqCst);
        while seen.last().is_none_or(|k| *k < end) {
            match wait_k(&mut ws, |_| true, Duration::from_secs(10)).await? {
                Some(k) => seen.push(k),
                None => break,
            }
        }
        let mine: Vec<i64> = seen.iter().copied().filter(|k| *k > probe).collect();
        let expected: Vec<i64> = (probe + 1..=end).collect();
        let mut unique = mine.clone();
        unique.sort_unstable();
        unique.dedup();
        let duplicates = mine.len() - unique.len();
        let missing = expected.len() - unique.iter().filter(|k| **k <= end).count();
        let ms = failover.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
        println!(
            "round {round}: first row via the new holder {ms:.0} ms after the kill; {} rows committed, {missing} missing, {duplicates} duplicates at the surviving subscriber",
            expected.len()
        );
        rows.push(
            json!({"round": round, "failover_ms": ms, "committed": expected.len(),
                         "missing": missing, "duplicates": duplicates}),
        );
        for mut w in started {
            let _ = w.child.kill().await;
        }
    }
    let mut times: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["failover_ms"].as_f64())
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let median = crate::harness::percentile(&times, 0.5).unwrap_or(f64::NAN);
    let max = times.last().copied().unwrap_or(f64::NAN);
    println!(
        "failover: median {median:.0} ms, max {max:.0} ms over {} rounds",
        times.len()
    );
    let out = json!({"scenario": "slot_failover", "nodes": nodes, "write_interval_ms": 10,
        "note": "kill -9 of the slot holder -> first row committed after the kill delivered at a subscriber on a surviving node; loader, nodes, nats-server and PostgreSQL share the machine",
        "median_ms": median, "max_ms": max, "rounds": rows});
    let panel = crate::chart::Panel::Bars(crate::chart::BarChart {
        title: format!("Slot failover, {nodes} nodes: kill -9 of the holder to the first row via the new holder"),
        y_label: "ms".into(),
        categories: rows.iter().map(|r| format!("round {}", r["round"])).collect(),
        series: vec![(
            "failover ms".into(),
            rows.iter()
                .map(|r| r["failover_ms"].as_f64().unwrap_or(0.0))
                .collect(),
            false,
        )],
    });
    crate::harness::save_results("slot_failover", &out, &[panel])?;
    let _ = nats.kill().await;
    if rows
        .iter()
        .any(|r| r["missing"] != 0 || r["duplicates"] != 0)
    {
        bail!("rows were missing or duplicated at a surviving subscriber");
    }
    Ok(())
}

async fn subscribe(port: u16) -> anyhow::Result<crate::harness::Ws> {
    let mut ws = ws_connect(port, &anon_token()).await?;
    let join = json!(["1", "1", "realtime:failover", "phx_join",
        {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "failover"}]}}]);
    ws.send(Message::Text(join.to_string().into())).await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await?
            .context("socket closed")??;
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t)?;
        if v[3] == "system" && v[4]["extension"] == "postgres_changes" {
            if v[4]["status"] != "ok" {
                bail!("subscription failed: {}", v[4]);
            }
            return Ok(ws);
        }
    }
}

/// The next row's k that satisfies `pred` (others are skipped), or `None` after `within`.
async fn wait_k(
    ws: &mut crate::harness::Ws,
    pred: impl Fn(i64) -> bool,
    within: Duration,
) -> anyhow::Result<Option<i64>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Ok(None),
            Ok(m) => m.context("socket closed")??,
        };
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t)?;
        if v[3] != "postgres_changes" {
            continue;
        }
        if let Some(k) = v[4]["data"]["record"]["k"].as_i64() {
            if pred(k) {
                return Ok(Some(k));
            }
        }
    }
}
