//! Live chat load on postgres_changes, with or without RLS.
//!
//! One scenario, one file (about 620 lines): the writers, the subscribers, the latency and loss
//! accounting and the table; the RLS policy shapes and their references are in `rls.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::chart;
use crate::harness::{
    cpu_seconds, now_us, percentile, save_results, start_walcast_with, ws_connect, BenchDb, SECRET,
};
use crate::rls::{self, Check, Policy, Reference};

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
    /// CPU seconds used during the run by walcast, and by the PostgreSQL backends serving its
    /// connections (pool and walsender).
    walcast_cpu: f64,
    pg_cpu: f64,
    /// With a replica: CPU seconds of the replica's backends serving walcast and of its
    /// recovery (startup) and WAL receiver processes; and the row-check batches answered on
    /// the replica and on the primary during the run.
    replica_cpu: f64,
    batches_on_replica: f64,
    batches_on_primary: f64,
    replica_fallbacks: f64,
}

impl ChatRun {
    fn delivered_per_sec(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }

    fn json(&self) -> Value {
        json!({"commits_per_sec": self.rate, "commits": self.commits, "delivered_per_sec": self.delivered_per_sec(),
            "p50_ms": self.p50, "p95_ms": self.p95, "p99_ms": self.p99, "max_ms": self.max, "lost": self.lost, "duplicated": self.duplicated,
            "walcast_cpu_cores": self.walcast_cpu / self.seconds, "pg_cpu_cores": self.pg_cpu / self.seconds,
            "pg_cpu_us_per_delivery": self.pg_us_per_delivery(), "replica_cpu_cores": self.replica_cpu / self.seconds,
            "batches_on_replica": self.batches_on_replica, "batches_on_primary": self.batches_on_primary,
            "replica_fallbacks": self.replica_fallbacks})
    }

    /// CPU time of walcast's PostgreSQL backends per delivery, in microseconds.
    fn pg_us_per_delivery(&self) -> f64 {
        self.pg_cpu * 1e6 / self.delivered.max(1) as f64
    }
}

/// CPU seconds so far of walcast and of each PostgreSQL backend serving it.
struct Cpu {
    walcast: f64,
    backends: HashMap<i32, f64>,
}

impl Cpu {
    async fn sample(sql: &tokio_postgres::Client, walcast_pid: u32) -> anyhow::Result<Self> {
        Self::sample_where(sql, walcast_pid, "application_name LIKE 'walcast%'").await
    }

    /// On a replica: its backends serving walcast, and its recovery and WAL receiver.
    async fn sample_replica(sql: &tokio_postgres::Client) -> anyhow::Result<Self> {
        Self::sample_where(
            sql,
            std::process::id(),
            "application_name LIKE 'walcast%' OR backend_type IN ('startup', 'walreceiver')",
        )
        .await
    }

    async fn sample_where(
        sql: &tokio_postgres::Client,
        walcast_pid: u32,
        which: &str,
    ) -> anyhow::Result<Self> {
        let rows = sql
            .query(
                &format!("SELECT pid FROM pg_stat_activity WHERE {which}"),
                &[],
            )
            .await?;
        let backends = rows
            .iter()
            .filter_map(|r| {
                let pid: i32 = r.get(0);
                let cpu = cpu_seconds(u32::try_from(pid).ok()?).ok()?;
                Some((pid, cpu))
            })
            .collect();
        Ok(Self {
            walcast: cpu_seconds(walcast_pid)?,
            backends,
        })
    }

    /// (walcast, its backends) CPU seconds between `before` and this sample; a backend that
    /// started in between counts from zero, one that ended in between is missed.
    fn since(&self, before: &Cpu) -> (f64, f64) {
        let pg = self
            .backends
            .iter()
            .map(|(pid, cpu)| cpu - before.backends.get(pid).copied().unwrap_or(0.0))
            .sum();
        (self.walcast - before.walcast, pg)
    }
}

/// Reference 1 from one connection and from 2 x cores (walcast's generic plan), from 2 x cores
/// with PostgreSQL's own plan per key, and reference 2.
type References = (Reference, Reference, Reference, Reference);

/// Both references on the run's own database, walcast stopped, over the rows the run wrote:
/// each row checked for each subscriber of its conversation.
async fn references(
    db_url: &str,
    a: &ChatArgs,
    policy: Policy,
    inserted: &[(i64, usize)],
) -> anyhow::Result<References> {
    let policy = Some(policy);
    let exp = walcast::auth::now_secs() + 3600;
    let rows = &inserted[..inserted.len().min(20_000)];
    let mut checks = Vec::new();
    let mut changes = Vec::new();
    for &(id, conv) in rows {
        let mut claims = Vec::new();
        for s in (conv..a.subscribers).step_by(a.conversations.max(1)) {
            let c = rls::claims(policy, s, a.conversations, exp);
            let text = c.to_string();
            checks.push(Check {
                id,
                claims: text.clone(),
                sub: rls::user(s),
            });
            claims.push(text);
        }
        changes.push((id, claims));
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let checks = Arc::new(checks);
    let one = rls::direct(db_url, 1, true, a.reference_seconds, checks.clone()).await?;
    let many = rls::direct(db_url, 2 * cores, true, a.reference_seconds, checks.clone()).await?;
    let custom = rls::direct(db_url, 2 * cores, false, a.reference_seconds, checks).await?;
    let original = rls::original(db_url, a.reference_seconds, &changes).await?;
    Ok((one, many, custom, original))
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
        "{:>8} {:>8} {:>12} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>9} {:>9} {:>9}",
        "commit/s",
        "commits",
        "delivered/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "lost",
        "dup",
        "walc CPU",
        "PG CPU",
        "PG us/dlv"
    );
    for r in runs {
        println!(
            "{:>8} {:>8} {:>12.0} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>6} {:>6} {:>9.2} {:>9.2} {:>9.1}",
            r.rate,
            r.commits,
            r.delivered_per_sec(),
            r.p50,
            r.p95,
            r.p99,
            r.max,
            r.lost,
            r.duplicated,
            r.walcast_cpu / r.seconds,
            r.pg_cpu / r.seconds,
            r.pg_us_per_delivery()
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

pub(crate) struct ChatArgs {
    pub subscribers: usize,
    pub conversations: usize,
    pub rates: Vec<u64>,
    pub seconds: u64,
    pub writers: usize,
    /// The policies to run, one after the other (empty: no RLS).
    pub policies: Vec<Policy>,
    /// Seconds per reference measurement (RLS only).
    pub reference_seconds: f64,
    /// Each policy again with a streaming replica (`--replica`).
    pub replica: bool,
}

/// Where the row checks of one load run: the primary alone, or with a streaming replica of it
/// and this many checks in flight.
#[derive(Clone, Copy)]
struct Setup {
    replica: bool,
    in_flight: usize,
}

const PRIMARY_ALONE: Setup = Setup {
    replica: false,
    in_flight: 1,
};

/// One policy's load and its two references (issue #13).
struct PolicyRun {
    policy: Policy,
    runs: Vec<ChatRun>,
    /// Reference 1 from one connection and from 2 x cores connections.
    direct_one: Reference,
    direct_many: Reference,
    /// Reference 1 from 2 x cores connections with PostgreSQL's own plan per key.
    direct_custom: Reference,
    /// Reference 2: the original's method.
    original: Reference,
}

fn best(runs: &[ChatRun]) -> f64 {
    sustainable(runs)
        .map(|r| r.delivered_per_sec())
        .unwrap_or(0.0)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl PolicyRun {
    fn json(&self, plain: &[ChatRun]) -> Value {
        let sustained = best(&self.runs);
        json!({
            "policy": self.policy.name(), "describes": self.policy.describe(),
            "runs": self.runs.iter().map(ChatRun::json).collect::<Vec<_>>(),
            "highest_rate_p99_under_100ms": sustainable(&self.runs).map(|r| r.rate),
            "sustainable_deliveries_per_sec": sustained,
            "rls_to_plain_ratio": ratio(sustained, best(plain)),
            "reference_direct_1": self.direct_one.json(),
            "reference_direct_n": self.direct_many.json(),
            "reference_direct_n_custom_plan": self.direct_custom.json(),
            "reference_original": self.original.json(),
            "pg_cpu_bound_checks_per_sec": cpu_bound(&self.direct_many),
            "walcast_to_direct_n": ratio(sustained, self.direct_many.per_sec()),
            "walcast_to_original": ratio(sustained, self.original.per_sec()),
        })
    }

    fn print(&self, plain: &[ChatRun]) {
        print_chat_table(
            &format!(
                "with RLS, policy {} ({}), one distinct user per subscriber",
                self.policy.name(),
                self.policy.describe()
            ),
            &self.runs,
        );
        let sustained = best(&self.runs);
        println!(
            "{:<58} {:>10} {:>14} {:>7}",
            "reference", "checks/s", "PG CPU us/chk", "denied"
        );
        for (name, r) in [
            ("(1) direct, 1 connection", &self.direct_one),
            (
                &*format!(
                    "(1) direct, {} connections (PostgreSQL's capacity)",
                    self.direct_many.connections
                ),
                &self.direct_many,
            ),
            (
                &*format!(
                    "(1') direct, {} connections, PostgreSQL's own plan per key",
                    self.direct_custom.connections
                ),
                &self.direct_custom,
            ),
            (
                "(2) original's method (apply_rls: per change, per claims)",
                &self.original,
            ),
        ] {
            println!(
                "{:<58} {:>10.0} {:>14.1} {:>7}",
                name,
                r.per_sec(),
                r.pg_us_per_check(),
                r.denied
            );
        }
        println!(
            "PostgreSQL CPU per check (reference 1): {:.1} us, so at most {:.0} checks/s if PostgreSQL had all {} cores",
            self.direct_many.pg_us_per_check(),
            cpu_bound(&self.direct_many),
            cores()
        );
        println!(
            "sustainable authorized deliveries/s {sustained:.0}: / no RLS {:.2}, / reference 1 {:.2}, / reference 2 {:.2}",
            ratio(sustained, best(plain)),
            ratio(sustained, self.direct_many.per_sec()),
            ratio(sustained, self.original.per_sec()),
        );
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Checks per second PostgreSQL could answer with every core at `r`'s CPU time per check.
fn cpu_bound(r: &Reference) -> f64 {
    let us = r.pg_us_per_check();
    if us > 0.0 {
        cores() as f64 * 1e6 / us
    } else {
        0.0
    }
}

pub(crate) async fn chat(a: ChatArgs) -> anyhow::Result<()> {
    let ChatArgs {
        subscribers,
        conversations,
        ref rates,
        seconds,
        writers,
        ref policies,
        reference_seconds,
        replica,
    } = a;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("chat: {subscribers} subscribers over {conversations} conversations (conversation_id=eq.X), {writers} writers, {seconds} s per rate");
    println!("(loader, walcast and PostgreSQL share this {cores}-core machine; latency = writer send -> subscriber receipt)");
    // With RLS, the same load without it runs first, in the same command: the figure is a ratio.
    let (plain, _) = chat_runs(&a, None, PRIMARY_ALONE).await?;
    print_chat_table("without RLS", &plain);
    let mut secured = Vec::new();
    let mut replicas = Vec::new();
    for &policy in policies {
        let (runs, refs) = chat_runs(&a, Some(policy), PRIMARY_ALONE).await?;
        let (direct_one, direct_many, direct_custom, original) = refs.context("references")?;
        for r in [&direct_one, &direct_many, &direct_custom, &original] {
            // Every check asked is one the policy allows: a denial means the shape's schema
            // or the emulation is wrong, and its figures would measure something else.
            anyhow::ensure!(
                r.denied == 0,
                "policy {}: {} of {} reference checks denied",
                policy.name(),
                r.denied,
                r.checks
            );
        }
        let run = PolicyRun {
            policy,
            runs,
            direct_one,
            direct_many,
            direct_custom,
            original,
        };
        run.print(&plain);
        if replica {
            let mut with = Vec::new();
            for in_flight in [1, 2] {
                let setup = Setup {
                    replica: true,
                    in_flight,
                };
                let (runs, _) = chat_runs(&a, Some(policy), setup).await?;
                with.push((in_flight, runs));
            }
            print_replica_table(policy, &run.runs, &with);
            replicas.push(json!({
                "policy": policy.name(),
                "primary_alone": run.runs.iter().map(ChatRun::json).collect::<Vec<_>>(),
                "with_replica": with.iter().map(|(n, runs)| json!({
                    "checks_in_flight": n,
                    "runs": runs.iter().map(ChatRun::json).collect::<Vec<_>>(),
                    "highest_rate_p99_under_100ms": sustainable(runs).map(|r| r.rate),
                })).collect::<Vec<_>>(),
            }));
        }
        secured.push(run);
    }
    let mut out = json!({
        "scenario": if policies.is_empty() { "chat" } else { "chat_rls" }, "subscribers": subscribers, "conversations": conversations, "writers": writers,
        "seconds_per_rate": seconds, "reference_seconds": reference_seconds, "cores": cores,
        "note": "loader, walcast and PostgreSQL share the machine",
        "runs": plain.iter().map(ChatRun::json).collect::<Vec<_>>(),
        "highest_rate_p99_under_100ms": sustainable(&plain).map(|r| r.rate),
    });
    let mut panels = Vec::new();
    if secured.is_empty() {
        panels.push(chat_panel(
            &format!(
                "postgres_changes, {subscribers} subscribers in {conversations} conversations"
            ),
            &plain,
            None,
        ));
    } else {
        if let Some(o) = out.as_object_mut() {
            for (from, to) in [
                ("runs", "reference_without_rls"),
                (
                    "highest_rate_p99_under_100ms",
                    "reference_highest_rate_p99_under_100ms",
                ),
            ] {
                if let Some(v) = o.remove(from) {
                    o.insert(to.to_string(), v);
                }
            }
        }
        out["policies"] = json!(secured.iter().map(|p| p.json(&plain)).collect::<Vec<_>>());
        if replica {
            out["replica"] = json!(replicas);
            out["replica_note"] = json!("the replica is a pg_basebackup -R standby on the same machine: it shares the cores with the primary, walcast and the loader");
        }
        for p in &secured {
            panels.push(chat_panel(&format!("postgres_changes with RLS (policy {}), {subscribers} users in {conversations} conversations (no RLS dashed)", p.policy.name()), &p.runs, Some(&plain)));
        }
    }
    let name = match policies.as_slice() {
        [] => "chat".to_string(),
        [Policy::Participants] if !replica => "chat_rls".to_string(),
        [one] => format!("chat_rls_{}", one.name()),
        _ => "chat_rls_policies".to_string(),
    };
    let name = if replica {
        format!("{name}_replica")
    } else {
        name
    };
    let _ = rates;
    save_results(&name, &out, &panels)?;
    Ok(())
}

/// One chat load: its own cluster and walcast, every rate in turn.
async fn chat_runs(
    a: &ChatArgs,
    policy: Option<Policy>,
    setup: Setup,
) -> anyhow::Result<(Vec<ChatRun>, Option<References>)> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let (subscribers, conversations, rates, seconds, writers) = (
        a.subscribers,
        a.conversations,
        a.rates.as_slice(),
        a.seconds,
        a.writers,
    );
    let db = BenchDb::start("chat")?;
    // The replica is stopped (before the cluster's directory goes) however the run ends.
    let replica = if setup.replica {
        Some(StopOnDrop(db.cluster.start_replica("replica", &[])?))
    } else {
        None
    };
    async {
        let db_url = db.url();
        let in_flight = setup.in_flight.to_string();
        let replica_url = replica
            .as_ref()
            .map(|r| format!("postgres://postgres@127.0.0.1:{}/postgres", r.0.port));
        let mut env = vec![
            ("STARTUP_GRACE_MS", "0"),
            ("RLIMIT_NOFILE", "20000"),
            ("METRICS_JWT_SECRET", SECRET),
            ("DB_CHECKS_IN_FLIGHT", in_flight.as_str()),
        ];
        if let Some(url) = &replica_url {
            env.push(("DB_REPLICA_URLS", url.as_str()));
            // Enough delivery connections for every check in flight plus the privilege lookups.
            env.push(("DB_DELIVERY_POOL_SIZE", "3"));
        }
        let mut w = start_walcast_with(&db_url, 4, &env).await?;
        let (sql, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let rsql = match &replica_url {
            Some(url) => {
                let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                // walcast uses the replica once its poll has found it a standby of the primary.
                let deadline = Instant::now() + Duration::from_secs(30);
                while metric(w.port, "walcast_replicas_usable").await? < 1.0 {
                    anyhow::ensure!(Instant::now() < deadline, "walcast never found the replica usable");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(c)
            }
            None => None,
        };
        sql.batch_execute(
            "CREATE TABLE IF NOT EXISTS chat (id bigserial PRIMARY KEY, conversation_id int NOT NULL, sent_us bigint NOT NULL, body text);
             GRANT SELECT ON chat TO anon, authenticated;
             ALTER PUBLICATION supabase_realtime ADD TABLE chat;",
        )
        .await?;
        if let Some(policy) = policy {
            rls::setup(&sql, policy, subscribers, conversations).await?;
        }
        let exp = walcast::auth::now_secs() + 3600;
        let token_for = |s: usize| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &rls::claims(policy, s, conversations, exp),
                &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
            )
        };
        let walcast_pid = w.child.id().context("walcast pid")?;
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
        let mut all_inserted: Vec<(i64, usize)> = Vec::new();
        for &rate in rates {
            received.lock().unwrap().clear();
            latencies.lock().unwrap().clear();
            let inserted: Arc<Mutex<Vec<(i64, usize)>>> = Arc::new(Mutex::new(Vec::new()));
            let total = (rate * seconds) as usize;
            let per_writer = total / writers;
            let interval = Duration::from_secs_f64(writers as f64 / rate as f64);
            let cpu_start = Cpu::sample(&sql, walcast_pid).await?;
            let replica_cpu_start = match &rsql {
                Some(r) => Some(Cpu::sample_replica(r).await?),
                None => None,
            };
            let batches_start = batches(w.port).await?;
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
            let (walcast_cpu, pg_cpu) = Cpu::sample(&sql, walcast_pid).await?.since(&cpu_start);
            let replica_cpu = match (&rsql, &replica_cpu_start) {
                (Some(r), Some(before)) => Cpu::sample_replica(r).await?.since(before).1,
                _ => 0.0,
            };
            let batches_end = batches(w.port).await?;
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
                walcast_cpu,
                pg_cpu,
                replica_cpu,
                batches_on_replica: batches_end.0 - batches_start.0,
                batches_on_primary: batches_end.1 - batches_start.1,
                replica_fallbacks: batches_end.2 - batches_start.2,
            });
            all_inserted.extend(inserted.lock().unwrap().iter().copied());
        }
        let _ = w.child.kill().await;
        let _ = w.child.wait().await;
        let refs = match policy {
            Some(p) if !setup.replica => Some(references(&db_url, a, p, &all_inserted).await?),
            _ => None,
        };
        Ok::<_, anyhow::Error>((runs, refs))
    }
    .await
}

/// A replica cluster, stopped when dropped.
struct StopOnDrop(walcast::dev::DevCluster);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.stop();
    }
}

/// One series of the walcast on `port`'s `/metrics` (started with `METRICS_JWT_SECRET`), 0
/// when absent. A plain HTTP/1.0 request: the loader has no HTTP client of its own.
async fn metric(port: u16, series: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bearer = crate::harness::anon_token();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!(
            "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {bearer}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Row-check batches so far: (answered on the replica, on the primary, tried on the replica
/// and answered by the primary).
async fn batches(port: u16) -> anyhow::Result<(f64, f64, f64)> {
    let mut fallbacks = 0.0;
    for reason in ["behind", "conflict", "error", "unavailable"] {
        fallbacks += metric(
            port,
            &format!("walcast_replica_fallbacks_total{{reason=\"{reason}\"}}"),
        )
        .await?;
    }
    Ok((
        metric(port, "walcast_authorization_batches_total{on=\"replica\"}").await?,
        metric(port, "walcast_authorization_batches_total{on=\"primary\"}").await?,
        fallbacks,
    ))
}

/// The primary alone and with a replica, rate by rate, side by side.
fn print_replica_table(policy: Policy, alone: &[ChatRun], with: &[(usize, Vec<ChatRun>)]) {
    println!(
        "\nwith RLS, policy {}: one primary vs primary + streaming replica (same machine)",
        policy.name()
    );
    println!(
        "{:<32} {:>8} {:>12} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "setup",
        "commit/s",
        "delivered/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "lost",
        "walc CPU",
        "PG CPU",
        "repl CPU",
        "on repl",
        "fallbk"
    );
    let mut rows: Vec<(String, &ChatRun)> = alone
        .iter()
        .map(|r| ("primary alone, 1 in flight".to_string(), r))
        .collect();
    for (n, runs) in with {
        rows.extend(
            runs.iter()
                .map(|r| (format!("primary + replica, {n} in flight"), r)),
        );
    }
    rows.sort_by_key(|(_, r)| r.rate);
    for (name, r) in rows {
        let total = r.batches_on_replica + r.batches_on_primary;
        let share = if total > 0.0 {
            format!("{:.0}%", 100.0 * r.batches_on_replica / total)
        } else {
            "-".to_string()
        };
        println!(
            "{:<32} {:>8} {:>12.0} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8} {:>6}",
            name,
            r.rate,
            r.delivered_per_sec(),
            r.p50,
            r.p95,
            r.p99,
            r.lost,
            r.walcast_cpu / r.seconds,
            r.pg_cpu / r.seconds,
            r.replica_cpu / r.seconds,
            share,
            r.replica_fallbacks
        );
    }
    let best = |runs: &[ChatRun]| {
        sustainable(runs)
            .map(|r| {
                format!(
                    "{} commits/s ({:.0} deliveries/s)",
                    r.rate,
                    r.delivered_per_sec()
                )
            })
            .unwrap_or_else(|| "none".into())
    };
    println!(
        "highest rate with p99 <= 100 ms and nothing lost: primary alone {}",
        best(alone)
    );
    for (n, runs) in with {
        println!("  primary + replica, {n} in flight: {}", best(runs));
    }
}
