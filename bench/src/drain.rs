//! Change-stream drain against `pg_recvlogical` decoding the same backlog.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::chart;
use crate::harness::{
    anon_token, rss_bytes, save_results, start_walcast_with, unsafe_is_root, ws_connect, BenchDb,
};

fn pg_bin() -> anyhow::Result<PathBuf> {
    Ok(walcast::dev::find_binaries()?)
}

pub(crate) async fn drain(n: usize) -> anyhow::Result<()> {
    let db = BenchDb::start("drain")?;
    async {
        let db_url = db.url();
        // First start: migrations and walcast's slot; then the reference slot, at the same point.
        let mut w = start_walcast_with(&db_url, 4, &[("STARTUP_GRACE_MS", "0")]).await?;
        let (sql, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        sql.batch_execute(
            "CREATE TABLE IF NOT EXISTS drain (id bigserial PRIMARY KEY, body text);
             GRANT SELECT ON drain TO anon;
             ALTER PUBLICATION supabase_realtime ADD TABLE drain;",
        )
        .await?;
        sql.batch_execute("SELECT pg_create_logical_replication_slot('bench_reference', 'pgoutput')")
            .await?;
        let _ = w.child.start_kill();
        let _ = w.child.wait().await;

        // The backlog: n single-row transactions (autocommit), pipelined 100 at a time.
        let started = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            let bodies: Vec<String> = chunk.iter().map(|i| format!("message {i}")).collect();
            let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> =
                bodies.iter().map(|b| [b as &(dyn tokio_postgres::types::ToSql + Sync)]).collect();
            let futs: Vec<_> = params
                .iter()
                .map(|p| sql.execute("INSERT INTO drain (body) VALUES ($1)", p))
                .collect();
            for r in futures_util::future::join_all(futs).await {
                r?;
            }
        }
        let commit_secs = started.elapsed().as_secs_f64();
        let end_lsn: String = sql.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);

        // walcast: restart with a grace period, subscribe, count deliveries.
        // The clock starts when the grace period ends: from then on walcast decodes (well, its
        // walsender does), matches and delivers, like pg_recvlogical from its start below.
        let grace = Duration::from_millis(1500);
        let spawned = Instant::now();
        let mut w = start_walcast_with(&db_url, 4, &[("STARTUP_GRACE_MS", "1500")]).await?;
        let tok = anon_token();
        let mut ws = ws_connect(w.port, &tok).await?;
        let join = json!(["1", "1", "realtime:drain", "phx_join",
            {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "drain"}]}}]);
        ws.send(Message::Text(join.to_string().into())).await?;
        // Memory while the backlog drains: it waits in the slot, not in walcast (backpressure).
        let pid = w.child.id().context("pid")?;
        let rss_start = rss_bytes(pid)?;
        let mut rss_peak = rss_start;
        let mut first: Option<Instant> = None;
        let mut got = 0usize;
        while got < n {
            if got.is_multiple_of(500) {
                rss_peak = rss_peak.max(rss_bytes(pid)?);
            }
            let msg = tokio::time::timeout(Duration::from_secs(60), ws.next()).await?.context("closed")??;
            let Message::Text(t) = msg else { continue };
            if t.contains("\"postgres_changes\",{\"ids\"") {
                first.get_or_insert_with(Instant::now);
                got += 1;
            }
        }
        let _ = first;
        let walcast_secs = (spawned.elapsed() - grace).as_secs_f64();
        let _ = w.child.kill().await;

        // Reference: pg_recvlogical decodes the same backlog from its own slot.
        let bin = pg_bin()?.join("pg_recvlogical");
        let mut cmd = if unsafe_is_root() {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            tokio::process::Command::new(&bin)
        };
        let ref_started = Instant::now();
        let status = cmd
            .args(["-h", "127.0.0.1", "-p", &db.cluster.port.to_string(), "-U", "postgres", "-d", "postgres",
                   "-S", "bench_reference", "--start", "-E", &end_lsn, "-f", "/dev/null",
                   "-o", "proto_version=1", "-o", "publication_names=supabase_realtime"])
            .status()
            .await?;
        let reference_secs = ref_started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("pg_recvlogical failed: {status}");
        }

        let walcast_rate = n as f64 / walcast_secs;
        let reference_rate = n as f64 / reference_secs;
        println!("drain: {n} single-row transactions waiting in the slot (committed in {commit_secs:.1} s)");
        println!("(loader, walcast and PostgreSQL share this {}-core machine)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
        println!("{:<40} {:>12} {:>10}", "", "changes/s", "seconds");
        println!("{:<40} {:>12.0} {:>10.2}", "pg_recvlogical (reference: decode only)", reference_rate, reference_secs);
        println!("{:<40} {:>12.0} {:>10.2}", "walcast (decode, match, deliver)", walcast_rate, walcast_secs);
        println!("{:<40} {:>12.2}", "walcast / pg_recvlogical", walcast_rate / reference_rate);
        println!(
            "walcast RSS while draining: {:.1} MiB at the join, {:.1} MiB peak",
            rss_start as f64 / 1048576.0,
            rss_peak as f64 / 1048576.0
        );
        let out = json!({
            "scenario": "drain", "transactions": n,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "note": "loader, walcast and PostgreSQL share the machine",
            "reference": {"tool": "pg_recvlogical", "changes_per_sec": reference_rate, "seconds": reference_secs},
            "walcast": {"changes_per_sec": walcast_rate, "seconds": walcast_secs},
            "ratio": walcast_rate / reference_rate,
            "walcast_rss_start": rss_start, "walcast_rss_peak": rss_peak,
        });
        save_results("drain", &out, &[chart::Panel::Bars(chart::BarChart {
            title: format!("change-stream drain, {n} single-row transactions"),
            y_label: "changes/s".into(),
            categories: vec![format!("{n} transactions")],
            series: vec![
                ("walcast (decode, match, deliver)".into(), vec![walcast_rate], false),
                ("pg_recvlogical (decode only)".into(), vec![reference_rate], true),
            ],
        })])?;
        Ok::<_, anyhow::Error>(())
    }
    .await
}
