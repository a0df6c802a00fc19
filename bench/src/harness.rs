//! What every scenario shares: its own PostgreSQL, the walcast under test, tokens, sockets,
//! process figures (CPU, RSS) and where the results go.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::chart;

pub(crate) const SECRET: &str = "walcast-bench-secret-with-at-least-32-characters";

pub(crate) fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The nearest-rank percentile `p` (0..1) of sorted values; None when there are none.
pub(crate) fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((sorted.len() as f64 * p) as usize).min(last)])
}

/// A PostgreSQL of the scenario's own (walcast's dev-cluster code) in a temporary directory;
/// stopped and removed when dropped, however the scenario ends.
pub(crate) struct BenchDb {
    pub cluster: walcast::dev::DevCluster,
    dir: PathBuf,
}

impl BenchDb {
    pub(crate) fn start(scenario: &str) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("walcast-bench-{scenario}-{}", std::process::id()));
        let cluster = walcast::dev::DevCluster::start(&dir)?;
        Ok(Self { cluster, dir })
    }

    pub(crate) fn url(&self) -> String {
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
pub(crate) fn save_results(
    name: &str,
    results: &Value,
    panels: &[chart::Panel],
) -> anyhow::Result<()> {
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
pub(crate) fn results_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("WALCAST_BENCH_RESULTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("bench/results"));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The socket URL of a walcast on `port` for a client with `token`, speaking vsn 2.0.0.
pub(crate) fn socket_url(port: u16, token: &str) -> String {
    format!("ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={token}&vsn=2.0.0")
}

/// A vsn 2.0.0 client of the walcast on `port`, with Nagle off like a browser's and like the NATS
/// clients: the loader must not add its own delay to the latencies it measures.
pub(crate) async fn ws_connect(port: u16, token: &str) -> anyhow::Result<Ws> {
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(socket_url(port, token), None, true).await?;
    Ok(ws)
}

pub(crate) fn token(sub: &str) -> String {
    let exp = walcast::auth::now_secs() + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": "authenticated", "sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

pub(crate) struct Walcast {
    pub child: tokio::process::Child,
    pub port: u16,
}

pub(crate) async fn start_walcast(db_url: &str, pool: usize) -> anyhow::Result<Walcast> {
    start_walcast_with(db_url, pool, &[]).await
}

pub(crate) async fn start_walcast_with(
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
pub(crate) fn anon_token() -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": "anon", "exp": walcast::auth::now_secs() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// Starts the walcast under test (`WALCAST_BIN`, else the release build) with `env`; without
/// `DATABASE_URL` in it, postgres_changes is off (sockets, broadcast, presence only).
pub(crate) async fn start_walcast_alone(env: &[(&str, &str)]) -> anyhow::Result<Walcast> {
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

pub(crate) fn unsafe_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// CPU time (user + system) a process has used so far, in seconds. Linux reports it in clock
/// ticks of 1/100 s (USER_HZ, 100 on every Linux architecture walcast builds for).
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are plain.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
        + fields.get(12).context("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

pub(crate) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
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

pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
