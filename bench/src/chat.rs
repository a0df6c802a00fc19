//! Live chat load on postgres_changes, with or without RLS.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::chart;
use crate::harness::{
    now_us, percentile, save_results, start_walcast_with, ws_connect, BenchDb, SECRET,
};

struct ChatRun {
    rate: u64,
    commits: usize,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    seconds: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

impl ChatRun {
    fn delivered_per_sec(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }

    fn json(&self) -> Value {
        json!({"commits_per_sec": self.rate, "commits": self.commits, "delivered_per_sec": self.delivered_per_sec(),
            "p50_ms": self.p50, "p95_ms": self.p95, "p99_ms": self.p99, "max_ms": self.max, "lost": self.lost, "duplicated": self.duplicated})
    }
}

/// The run that delivered the most per second with its p99 within 100 ms and nothing lost
/// (by deliveries achieved, not the rate asked for: writers that fall behind deliver less).
fn sustainable(runs: &[ChatRun]) -> Option<&ChatRun> {
    runs.iter()
        .filter(|r| r.p99 <= 100.0 && r.lost == 0)
        .max_by(|a, b| a.delivered_per_sec().total_cmp(&b.delivered_per_sec()))
}

fn print_chat_table(title: &str, runs: &[ChatRun]) {
    println!("\n{title}");
    println!(
        "{:>8} {:>8} {:>12} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6}",
        "commit/s", "commits", "delivered/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "lost", "dup"
    );
    for r in runs {
        println!(
            "{:>8} {:>8} {:>12.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>6} {:>6}",
            r.rate,
            r.commits,
            r.delivered_per_sec(),
            r.p50,
            r.p95,
            r.p99,
            r.max,
            r.lost,
            r.duplicated
        );
    }
    match sustainable(runs) {
        Some(b) => println!(
            "highest rate with p99 <= 100 ms and nothing lost: {} commits/s ({:.0} deliveries/s)",
            b.rate,
            b.delivered_per_sec()
        ),
        None => println!("highest rate with p99 <= 100 ms and nothing lost: none"),
    }
}

/// A percentile's name and how to read it from a run.
type Percentile = (&'static str, fn(&ChatRun) -> f64);

/// Latency percentiles against deliveries per second; `reference` (the run without RLS) dashed.
fn chat_panel(title: &str, runs: &[ChatRun], reference: Option<&[ChatRun]>) -> chart::Panel {
    let mut series = Vec::new();
    let pick: [Percentile; 3] = [("p50", |r| r.p50), ("p95", |r| r.p95), ("p99", |r| r.p99)];
    for (colour, (name, f)) in pick.iter().enumerate() {
        let label = if reference.is_some() {
            format!("RLS {name}")
        } else {
            name.to_string()
        };
        series.push(chart::Series {
            name: label,
            points: runs.iter().map(|r| (r.rate as f64, f(r))).collect(),
            dashed: false,
            colour,
        });
    }
    if let Some(reference) = reference {
        for (colour, (name, f)) in pick.iter().enumerate() {
            series.push(chart::Series {
                name: format!("no RLS {name}"),
                points: reference.iter().map(|r| (r.rate as f64, f(r))).collect(),
                dashed: true,
                colour,
            });
        }
    }
    chart::Panel::Line(chart::LineChart {
        title: title.to_string(),
        x_label: "commits per second offered (each goes to its conversation's subscribers)".into(),
        y_label: "latency ms (log)".into(),
        log_y: true,
        series,
        bound: Some((100.0, "p99 bound 100 ms".into())),
    })
}

pub async fn chat(
    subscribers: usize,
    conversations: usize,
    rates: Vec<u64>,
    seconds: u64,
    writers: usize,
    rls: bool,
) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("chat: {subscribers} subscribers over {conversations} conversations (conversation_id=eq.X), {writers} writers, {seconds} s per rate");
    println!("(loader, walcast and PostgreSQL share this {cores}-core machine; latency = writer send -> subscriber receipt)");
    // With RLS, the same load without it runs first, in the same command: the figure is a ratio.
    let plain = chat_runs(subscribers, conversations, &rates, seconds, writers, false).await?;
    print_chat_table("without RLS", &plain);
    let secured = if rls {
        let runs = chat_runs(subscribers, conversations, &rates, seconds, writers, true).await?;
        print_chat_table(
            "with RLS (participants policy, one distinct user per subscriber)",
            &runs,
        );
        Some(runs)
    } else {
        None
    };
    let best = |runs: &[ChatRun]| {
        sustainable(runs)
            .map(|r| r.delivered_per_sec())
            .unwrap_or(0.0)
    };
    let ratio = secured.as_deref().map(|s| {
        if best(&plain) > 0.0 {
            best(s) / best(&plain)
        } else {
            0.0
        }
    });
    if let Some(ratio) = ratio {
        println!("\nsustainable deliveries/s (p99 <= 100 ms, nothing lost): RLS {:.0}, no RLS {:.0}, ratio {ratio:.2}",
            secured.as_deref().map(best).unwrap_or(0.0), best(&plain));
    }
    let mut out = json!({
        "scenario": if rls { "chat_rls" } else { "chat" }, "subscribers": subscribers, "conversations": conversations, "writers": writers,
        "seconds_per_rate": seconds, "cores": cores,
        "note": "loader, walcast and PostgreSQL share the machine",
        "runs": plain.iter().map(ChatRun::json).collect::<Vec<_>>(),
        "highest_rate_p99_under_100ms": sustainable(&plain).map(|r| r.rate),
    });
    let panel = match &secured {
        Some(s) => {
            out["reference_without_rls"] = out["runs"].take();
            out["runs"] = json!(s.iter().map(ChatRun::json).collect::<Vec<_>>());
            out["highest_rate_p99_under_100ms"] = json!(sustainable(s).map(|r| r.rate));
            out["reference_highest_rate_p99_under_100ms"] =
                json!(sustainable(&plain).map(|r| r.rate));
            out["rls_to_plain_ratio"] = json!(ratio);
            chat_panel(&format!("postgres_changes with RLS, {subscribers} users in {conversations} conversations (no RLS dashed)"), s, Some(&plain))
        }
        None => chat_panel(
            &format!(
                "postgres_changes, {subscribers} subscribers in {conversations} conversations"
            ),
            &plain,
            None,
        ),
    };
    let name = if rls { "chat_rls" } else { "chat" };
    save_results(name, &out, &[panel])?;
    Ok(())
}

/// One chat load: its own cluster and walcast, every rate in turn.
async fn chat_runs(
    subscribers: usize,
    conversations: usize,
    rates: &[u64],
    seconds: u64,
    writers: usize,
    rls: bool,
) -> anyhow::Result<Vec<ChatRun>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let db = BenchDb::start("chat")?;
    async {
        let db_url = db.url();
        let mut w = start_walcast_with(&db_url, 4, &[("STARTUP_GRACE_MS", "0"), ("RLIMIT_NOFILE", "20000")]).await?;
        let (sql, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        sql.batch_execute(
            "CREATE TABLE IF NOT EXISTS chat (id bigserial PRIMARY KEY, conversation_id int NOT NULL, sent_us bigint NOT NULL, body text);
             GRANT SELECT ON chat TO anon, authenticated;
             ALTER PUBLICATION supabase_realtime ADD TABLE chat;",
        )
        .await?;
        let user = |s: usize| format!("00000000-0000-4000-8000-{s:012}");
        if rls {
            sql.batch_execute(
                "CREATE TABLE participants (conversation_id int NOT NULL, user_id uuid NOT NULL, PRIMARY KEY (conversation_id, user_id));
                 GRANT SELECT ON participants TO authenticated;
                 ALTER TABLE chat ENABLE ROW LEVEL SECURITY;
                 CREATE POLICY participants_read ON chat FOR SELECT TO authenticated
                   USING (EXISTS (SELECT 1 FROM participants p
                                   WHERE p.conversation_id = chat.conversation_id AND p.user_id = auth.uid()));",
            )
            .await?;
            for s in 0..subscribers {
                sql.execute(
                    "INSERT INTO participants VALUES ($1, $2::text::uuid)",
                    &[&((s % conversations) as i32), &user(s)],
                )
                .await?;
            }
        }
        let token_for = |s: usize| {
            let claims = if rls {
                json!({"role": "authenticated", "sub": user(s), "exp": walcast::auth::now_secs() + 3600})
            } else {
                json!({"role": "anon", "exp": walcast::auth::now_secs() + 3600})
            };
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
            )
        };
        // Received: (subscriber, id) → count; latencies in ms.
        let received: Arc<Mutex<HashMap<(usize, i64), u32>>> = Arc::new(Mutex::new(HashMap::new()));
        let latencies: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
        let mut ready = Vec::new();
        for s in 0..subscribers {
            let conv = s % conversations;
            let tok = token_for(s)?;
            let mut ws = ws_connect(w.port, &tok).await?;
            let join = json!(["1", "1", format!("realtime:conversation:{conv}"), "phx_join",
                {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "chat", "filter": format!("conversation_id=eq.{conv}")}]}}]);
            ws.send(Message::Text(join.to_string().into())).await?;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let (received, latencies) = (received.clone(), latencies.clone());
            tokio::spawn(async move {
                let mut tx = Some(tx);
                while let Some(Ok(msg)) = ws.next().await {
                    let Message::Text(t) = msg else { continue };
                    let now = now_us();
                    let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                    match v[3].as_str() {
                        Some("system") if v[4]["status"] == "ok" => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Some("postgres_changes") => {
                            let rec = &v[4]["data"]["record"];
                            let (Some(id), Some(sent)) = (rec["id"].as_i64(), rec["sent_us"].as_i64()) else { continue };
                            *received.lock().unwrap().entry((s, id)).or_insert(0) += 1;
                            latencies.lock().unwrap().push((now - sent) as f64 / 1000.0);
                        }
                        _ => {}
                    }
                }
            });
            ready.push(rx);
        }
        for r in ready {
            tokio::time::timeout(Duration::from_secs(30), r).await??;
        }

        let mut runs = Vec::new();
        for &rate in rates {
            received.lock().unwrap().clear();
            latencies.lock().unwrap().clear();
            let inserted: Arc<Mutex<Vec<(i64, usize)>>> = Arc::new(Mutex::new(Vec::new()));
            let total = (rate * seconds) as usize;
            let per_writer = total / writers;
            let interval = Duration::from_secs_f64(writers as f64 / rate as f64);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for wi in 0..writers {
                let (c, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                let inserted = inserted.clone();
                tasks.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    for i in 0..per_writer {
                        tick.tick().await;
                        let conv = ((wi * per_writer + i) * 7919) % conversations;
                        let sent = now_us();
                        let row = c
                            .query_one(
                                "INSERT INTO chat (conversation_id, sent_us, body) VALUES ($1, $2, 'hello there') RETURNING id",
                                &[&(conv as i32), &sent],
                            )
                            .await?;
                        inserted.lock().unwrap().push((row.get(0), conv));
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            // Let the last deliveries arrive (bounded wait: everything expected, or 10 s).
            let expected: usize = inserted.lock().unwrap().len() * (subscribers / conversations);
            let deadline = Instant::now() + Duration::from_secs(10);
            while received.lock().unwrap().len() < expected && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let seconds_taken = started.elapsed().as_secs_f64();
            let got = received.lock().unwrap().clone();
            let mut lost = 0;
            let mut duplicated = 0;
            let by_conv: HashMap<usize, Vec<i64>> = inserted.lock().unwrap().iter().fold(HashMap::new(), |mut m, (id, c)| {
                m.entry(*c).or_insert_with(Vec::new).push(*id);
                m
            });
            for s in 0..subscribers {
                for id in by_conv.get(&(s % conversations)).map(Vec::as_slice).unwrap_or(&[]) {
                    match got.get(&(s, *id)) {
                        None => lost += 1,
                        Some(n) if *n > 1 => duplicated += (*n - 1) as usize,
                        _ => {}
                    }
                }
            }
            let mut l = latencies.lock().unwrap().clone();
            l.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            let pct = |p: f64| percentile(&l, p).unwrap_or(f64::NAN);
            runs.push(ChatRun {
                rate,
                commits: inserted.lock().unwrap().len(),
                delivered: l.len(),
                lost,
                duplicated,
                seconds: seconds_taken,
                p50: pct(0.50),
                p95: pct(0.95),
                p99: pct(0.99),
                max: l.last().copied().unwrap_or(f64::NAN),
            });
        }
        let _ = w.child.kill().await;
        Ok::<_, anyhow::Error>(runs)
    }
    .await
}
