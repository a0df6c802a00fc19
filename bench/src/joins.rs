//! Joins per second: private channels whose read policy queries a membership table, against
//! public channels (no policy) in the same run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::chart;
use crate::harness::{percentile, save_results, start_walcast, token, ws_connect, BenchDb};

/// One socket joining `n` channels in turn; returns the join latencies.
async fn join_many(
    port: u16,
    tok: String,
    topics: Vec<String>,
    private: bool,
) -> anyhow::Result<Vec<Duration>> {
    let mut ws = ws_connect(port, &tok).await?;
    let mut latencies = Vec::with_capacity(topics.len());
    for (i, topic) in topics.iter().enumerate() {
        let r = (i + 1).to_string();
        let frame = json!([r, r, format!("realtime:{topic}"), "phx_join",
            {"config": {"private": private, "broadcast": {"self": false, "ack": false}, "presence": {"enabled": false}}}]);
        let start = Instant::now();
        ws.send(Message::Text(frame.to_string().into())).await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await?
                .context("socket closed")??;
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(&t)?;
            if v[1] == json!(r) && v[3] == "phx_reply" {
                if v[4]["status"] != "ok" {
                    bail!("join of {topic} failed: {}", v[4]);
                }
                break;
            }
        }
        latencies.push(start.elapsed());
    }
    Ok(latencies)
}

struct JoinRun {
    joins: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn run_joins(
    port: u16,
    sockets: usize,
    per_socket: usize,
    members: usize,
    private: bool,
) -> anyhow::Result<JoinRun> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..sockets {
        // Each socket is a member: user s of room s*per_socket+j.
        let user = format!("00000000-0000-4000-8000-{:012}", s % members);
        let topics: Vec<String> = (0..per_socket)
            .map(|j| format!("room-{}", (s * per_socket + j) % members))
            .collect();
        tasks.push(tokio::spawn(join_many(port, token(&user), topics, private)));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let seconds = start.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| percentile(&all, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    Ok(JoinRun {
        joins: all.len(),
        seconds,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
}

pub(crate) async fn joins(sockets: usize, per_socket: usize, members: usize) -> anyhow::Result<()> {
    let db = BenchDb::start("joins")?;
    async {
        let db_url = db.url();
        let mut walcast = start_walcast(&db_url, 8).await?;
        let (sql, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        sql.batch_execute(
            "CREATE TABLE IF NOT EXISTS members (topic text NOT NULL, user_id uuid NOT NULL, PRIMARY KEY (topic, user_id));
             TRUNCATE members;
             GRANT SELECT ON members TO authenticated;
             DROP POLICY IF EXISTS members_read ON realtime.messages;
             CREATE POLICY members_read ON realtime.messages FOR SELECT TO authenticated
               USING (EXISTS (SELECT 1 FROM members m WHERE m.topic = realtime.topic() AND m.user_id = auth.uid()));",
        )
        .await?;
        // Every (room, user) pair the run joins, plus filler rows up to `members`.
        sql.execute(
            "INSERT INTO members
             SELECT 'room-' || r, ('00000000-0000-4000-8000-' || lpad(u::text, 12, '0'))::uuid
               FROM generate_series(0, $1::int - 1) r, LATERAL (SELECT r % $2::int AS u) x
             ON CONFLICT DO NOTHING",
            &[&(members as i32), &(sockets as i32)],
        )
        .await?;
        for s in 0..sockets {
            for j in 0..per_socket {
                let room = format!("room-{}", (s * per_socket + j) % members);
                let user = format!("00000000-0000-4000-8000-{:012}", s % members);
                sql.execute(
                    "INSERT INTO members VALUES ($1, $2::text::uuid) ON CONFLICT DO NOTHING",
                    &[&room, &user],
                )
                .await?;
            }
        }
        // Warm up, then public (reference) and private in the same run.
        run_joins(walcast.port, 4, 5, members, false).await?;
        let public = run_joins(walcast.port, sockets, per_socket, members, false).await?;
        let private = run_joins(walcast.port, sockets, per_socket, members, true).await?;
        let _ = walcast.child.kill().await;

        let rate = |r: &JoinRun| r.joins as f64 / r.seconds;
        println!("joins: {sockets} sockets x {per_socket} channels, membership table of {members} rows");
        println!("(loader, walcast and PostgreSQL share this {}-core machine)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
        println!("{:<28} {:>10} {:>10} {:>10}", "", "joins/s", "p50 ms", "p99 ms");
        println!("{:<28} {:>10.0} {:>10.2} {:>10.2}", "public (reference, no policy)", rate(&public), public.p50_ms, public.p99_ms);
        println!("{:<28} {:>10.0} {:>10.2} {:>10.2}", "private (membership policy)", rate(&private), private.p50_ms, private.p99_ms);
        println!("{:<28} {:>10.2}", "private / public", rate(&private) / rate(&public));
        let out = json!({
            "scenario": "joins",
            "sockets": sockets, "joins_per_socket": per_socket, "members": members,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "note": "loader, walcast and PostgreSQL share the machine",
            "public": {"joins_per_sec": rate(&public), "p50_ms": public.p50_ms, "p99_ms": public.p99_ms},
            "private": {"joins_per_sec": rate(&private), "p50_ms": private.p50_ms, "p99_ms": private.p99_ms},
            "ratio": rate(&private) / rate(&public),
        });
        let cases = vec!["public (reference, no policy)".to_string(), "private (membership policy)".to_string()];
        save_results("joins", &out, &[
            chart::Panel::Bars(chart::BarChart {
                title: format!("joins per second, {sockets} sockets x {per_socket} channels"),
                y_label: "joins/s".into(),
                categories: cases.clone(),
                series: vec![("joins/s".into(), vec![rate(&public), rate(&private)], false)],
            }),
            chart::Panel::Bars(chart::BarChart {
                title: "join latency (phx_join sent -> reply)".into(),
                y_label: "ms".into(),
                categories: cases,
                series: vec![
                    ("p50".into(), vec![public.p50_ms, private.p50_ms], false),
                    ("p99".into(), vec![public.p99_ms, private.p99_ms], false),
                ],
            }),
        ])?;
        Ok::<_, anyhow::Error>(())
    }
    .await
}
