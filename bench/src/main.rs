//! `walcast-bench`: benchmark scenarios. Each starts its own PostgreSQL (walcast's dev cluster
//! code) and a release walcast, runs the scenario and its reference side by side in the same
//! run, prints a table and writes JSON under `bench/results/`.
//!
//! Loader, walcast and PostgreSQL share this machine: every figure says so.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

mod chart;
mod fanout;
mod stall;

const SECRET: &str = "walcast-bench-secret-with-at-least-32-characters";

#[derive(Parser)]
#[command(about = "walcast benchmarks")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Joins per second: private channels whose read policy queries a membership table, against
    /// public channels (no policy) in the same run.
    /// Change-stream drain: N single-row transactions wait in the slot; time for walcast to
    /// deliver them all to a subscriber, against `pg_recvlogical` streaming the same changes from
    /// its own slot (the decode limit).
    Drain {
        /// Transactions to commit.
        #[arg(long, default_value_t = 20_000)]
        transactions: usize,
    },
    /// Memory per joined idle socket: the server's RSS before and after N sockets each join a
    /// channel (raise `ulimit -n` above N first).
    Idle {
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
    },
    /// Live chat load: S subscribers over C conversations (`conversation_id=eq.X`), writers
    /// committing at fixed rates; latency from the writer's send to the subscriber's receipt
    /// (one clock), deliveries per second, and a check that nothing was lost or duplicated.
    Chat {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 100)]
        conversations: usize,
        /// Commit rates to run, one after the other (commits per second).
        #[arg(long, value_delimiter = ',', default_value = "500,1000,2000")]
        rates: Vec<u64>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Writer connections.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// Row level security on: a policy through a participants table, one distinct user per
        /// subscriber.
        #[arg(long)]
        rls: bool,
    },
    /// Broadcast fan-out against nats-server (Debian package), same subscribers, payloads and
    /// publish rates: one topic with S subscribers, and many topics with a few each.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Topics in the "many topics" shape (subscribers are spread over them).
        #[arg(long, default_value_t = 250)]
        topics: usize,
        /// Publish rates for the one-topic shape (messages per second).
        #[arg(long, value_delimiter = ',', default_value = "400,800,1600,2400,3200")]
        rates: Vec<u64>,
        /// Publish rates for the many-topics shape (messages per second over all topics).
        #[arg(long, value_delimiter = ',', default_value = "2000,8000,16000")]
        many_rates: Vec<u64>,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 50.0)]
        p99_bound_ms: f64,
    },
    /// Cluster hop: one topic with S subscribers on 1 walcast, then spread over N walcast nodes
    /// behind nats-server (publisher on the first node); latency with and without the hop.
    Cluster {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Publish rates (messages per second).
        #[arg(long, value_delimiter = ',', default_value = "100,400,800")]
        rates: Vec<u64>,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 50.0)]
        p99_bound_ms: f64,
    },
    /// Stalled readers: S sockets on a busy topic stop reading, next to healthy readers; the
    /// server's memory, the sockets cut off, and the healthy readers' latency, against a run
    /// without stalled readers.
    Stall {
        #[arg(long, default_value_t = 1000)]
        stalled: usize,
        #[arg(long, default_value_t = 10)]
        healthy: usize,
        /// Broadcasts per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Padding per broadcast, in bytes.
        #[arg(long, default_value_t = 1024)]
        payload: usize,
        /// CLIENT_OUTBOUND_QUEUE_BYTES for the run.
        #[arg(long, default_value_t = 1024 * 1024)]
        queue_bytes: usize,
    },
    Joins {
        /// Concurrent sockets.
        #[arg(long, default_value_t = 50)]
        sockets: usize,
        /// Channels each socket joins, one after the other.
        #[arg(long, default_value_t = 20)]
        joins_per_socket: usize,
        /// Rows in the membership table the policy reads.
        #[arg(long, default_value_t = 10_000)]
        members: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Drain { transactions } => drain(transactions).await,
        Scenario::Chat {
            subscribers,
            conversations,
            rates,
            seconds,
            writers,
            rls,
        } => chat(subscribers, conversations, rates, seconds, writers, rls).await,
        Scenario::Idle { sockets } => idle(sockets).await,
        Scenario::Fanout {
            subscribers,
            topics,
            rates,
            many_rates,
            seconds,
            p99_bound_ms,
        } => {
            fanout::fanout(fanout::FanoutArgs {
                subscribers,
                topics_for_many: topics,
                rates,
                many_rates,
                seconds,
                p99_bound_ms,
            })
            .await
        }
        Scenario::Cluster {
            subscribers,
            nodes,
            rates,
            seconds,
            p99_bound_ms,
        } => {
            fanout::cluster(fanout::ClusterArgs {
                subscribers,
                nodes: nodes.max(1),
                rates,
                seconds,
                p99_bound_ms,
            })
            .await
        }
        Scenario::Stall {
            stalled,
            healthy,
            rate,
            seconds,
            payload,
            queue_bytes,
        } => {
            stall::stall(stall::StallArgs {
                stalled,
                healthy,
                rate,
                seconds,
                payload,
                queue_bytes,
            })
            .await
        }
        Scenario::Joins {
            sockets,
            joins_per_socket,
            members,
        } => joins(sockets, joins_per_socket, members).await,
    }
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The nearest-rank percentile `p` (0..1) of sorted values; None when there are none.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((sorted.len() as f64 * p) as usize).min(last)])
}

/// A PostgreSQL of the scenario's own (walcast's dev-cluster code) in a temporary directory;
/// stopped and removed when dropped, however the scenario ends.
struct BenchDb {
    cluster: walcast::dev::DevCluster,
    dir: PathBuf,
}

impl BenchDb {
    fn start(scenario: &str) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("walcast-bench-{scenario}-{}", std::process::id()));
        let cluster = walcast::dev::DevCluster::start(&dir)?;
        Ok(Self { cluster, dir })
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.cluster.port
        )
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a scenario's results: `<name>.json` and the chart `<name>.png`.
fn save_results(name: &str, results: &Value, panels: &[chart::Panel]) -> anyhow::Result<()> {
    let path = results_path(&format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(results)?)?;
    println!("written: {}", path.display());
    let png = results_path(&format!("{name}.png"));
    chart::write_png(&png, panels)?;
    println!("written: {}", png.display());
    Ok(())
}

/// Where a scenario's JSON and chart go: `bench/results/`, or `WALCAST_BENCH_RESULTS` (the smoke test
/// writes elsewhere so it never replaces published figures).
fn results_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("WALCAST_BENCH_RESULTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("bench/results"));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The socket URL of a walcast on `port` for a client with `token`, speaking vsn 2.0.0.
fn socket_url(port: u16, token: &str) -> String {
    format!("ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={token}&vsn=2.0.0")
}

/// A vsn 2.0.0 client of the walcast on `port`, with Nagle off like a browser's and like the NATS
/// clients: the loader must not add its own delay to the latencies it measures.
async fn ws_connect(port: u16, token: &str) -> anyhow::Result<Ws> {
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(socket_url(port, token), None, true).await?;
    Ok(ws)
}

fn token(sub: &str) -> String {
    let exp = walcast::auth::now_secs() + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": "authenticated", "sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

struct Walcast {
    child: tokio::process::Child,
    port: u16,
}

async fn start_walcast(db_url: &str, pool: usize) -> anyhow::Result<Walcast> {
    start_walcast_with(db_url, pool, &[]).await
}

async fn start_walcast_with(
    db_url: &str,
    pool: usize,
    env: &[(&str, &str)],
) -> anyhow::Result<Walcast> {
    let pool = pool.to_string();
    let mut all = vec![("DATABASE_URL", db_url), ("DB_POOL_SIZE", pool.as_str())];
    all.extend_from_slice(env);
    start_walcast_alone(&all).await
}

/// A token for the `anon` role, valid for an hour.
fn anon_token() -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": "anon", "exp": walcast::auth::now_secs() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// Starts the walcast under test (`WALCAST_BIN`, else the release build) with `env`; without
/// `DATABASE_URL` in it, postgres_changes is off (sockets, broadcast, presence only).
async fn start_walcast_alone(env: &[(&str, &str)]) -> anyhow::Result<Walcast> {
    let bin = std::env::var("WALCAST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target/release/walcast"));
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first (or set WALCAST_BIN)",
            bin.display()
        );
    }
    let mut child = tokio::process::Command::new(bin)
        .arg("serve")
        .env("PORT", "0")
        .env("WALCAST_BIND", "127.0.0.1")
        .env("API_JWT_SECRET", SECRET)
        .env("TENANT_MAX_CHANNELS_PER_CLIENT", "10000")
        // Capacity is what is measured: the server-wide rate limits are off.
        .env("TENANT_MAX_CONCURRENT_USERS", "0")
        .env("TENANT_MAX_JOINS_PER_SECOND", "0")
        .env("TENANT_MAX_EVENTS_PER_SECOND", "0")
        .env("TENANT_MAX_PRESENCE_EVENTS_PER_SECOND", "0")
        .env("LOG_LEVEL", "error")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await??
        .context("walcast exited")?;
    let port = line.rsplit(':').next().context("port")?.trim().parse()?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Walcast { child, port })
}

/// One socket joining `n` channels in turn; returns the join latencies.
async fn join_many(
    port: u16,
    tok: String,
    topics: Vec<String>,
    private: bool,
) -> anyhow::Result<Vec<Duration>> {
    let mut ws = crate::ws_connect(port, &tok).await?;
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

async fn joins(sockets: usize, per_socket: usize, members: usize) -> anyhow::Result<()> {
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

fn pg_bin() -> anyhow::Result<PathBuf> {
    Ok(walcast::dev::find_binaries()?)
}

async fn drain(n: usize) -> anyhow::Result<()> {
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
        let mut ws = crate::ws_connect(w.port, &tok).await?;
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

fn unsafe_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// CPU time (user + system) a process has used so far, in seconds. Linux reports it in clock
/// ticks of 1/100 s (USER_HZ, 100 on every Linux architecture walcast builds for).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are plain.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
        + fields.get(12).context("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

async fn idle(n: usize) -> anyhow::Result<()> {
    // No database: an idle socket's cost is the socket, its session and its channel.
    let nofile = (n + 1000).to_string();
    let Walcast { mut child, port } = start_walcast_alone(&[("RLIMIT_NOFILE", &nofile)]).await?;
    let pid = child.id().context("pid")?;
    let tok = anon_token();
    let open = |i: usize| {
        let tok = tok.clone();
        async move {
            let mut ws = crate::ws_connect(port, &tok).await?;
            let join = json!(["1", "1", format!("realtime:room-{}", i % 100), "phx_join",
                {"config": {"broadcast": {"ack": false, "self": false}, "presence": {"key": "", "enabled": false}, "postgres_changes": [], "private": false}}]);
            ws.send(Message::Text(join.to_string().into())).await?;
            ws.next().await.context("no join reply")??;
            Ok::<_, anyhow::Error>(ws)
        }
    };
    let mut sockets = Vec::with_capacity(n + 50);
    for i in 0..50 {
        sockets.push(open(i).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid)?;
    // Bytes per socket so far, at tenths of the way (the chart's points).
    let mut growth = Vec::new();
    let step = (n / 10).max(1);
    for i in 50..n + 50 {
        sockets.push(open(i).await?);
        let opened = i - 49;
        if opened % step == 0 && opened < n {
            growth.push((
                opened as f64,
                rss_bytes(pid)?.saturating_sub(before) as f64 / opened as f64,
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(pid)?;
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    println!("idle: {n} sockets, each joined to a channel (100 topics), vsn 2.0.0, release build");
    println!(
        "server RSS {:.1} MiB -> {:.1} MiB: {:.0} bytes per joined idle socket",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        per
    );
    let out = json!({"scenario": "idle", "sockets": n, "rss_before": before, "rss_after": after, "bytes_per_socket": per});
    growth.push((n as f64, per));
    save_results(
        "idle",
        &out,
        &[chart::Panel::Line(chart::LineChart {
            title: "memory per joined idle socket (server RSS growth / sockets)".into(),
            x_label: "joined idle sockets".into(),
            y_label: "bytes per socket".into(),
            log_y: false,
            series: vec![chart::Series {
                name: "walcast".into(),
                points: growth,
                dashed: false,
                colour: 0,
            }],
            bound: Some((8192.0, "target 8 KiB".into())),
        })],
    )?;
    drop(sockets);
    let _ = child.kill().await;
    Ok(())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

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

async fn chat(
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
            let mut ws = crate::ws_connect(w.port, &tok).await?;
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
