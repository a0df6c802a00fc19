//! Broadcast fan-out against nats-server: the same subscribers, the same payloads, the same
//! publish rates, in the same run. Two shapes: one topic with S subscribers, and many topics
//! with a few subscribers each. For each publish rate: deliveries per second and latency
//! (publish to receipt, one clock); the figure is the highest delivery rate whose p99 stays under
//! the bound, walcast against nats-server.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{anon_token, cpu_seconds, now_us, start_walcast_alone};

pub(crate) struct FanoutArgs {
    pub subscribers: usize,
    pub topics_for_many: usize,
    pub rates: Vec<u64>,
    pub many_rates: Vec<u64>,
    pub seconds: u64,
    pub p99_bound_ms: f64,
}

#[derive(Clone, Debug)]
struct Point {
    rate: u64,
    delivered_per_sec: f64,
    expected: usize,
    received: usize,
    p50_ms: f64,
    p99_ms: f64,
    /// Server CPU (user + system) from the first publish until the receivers were done.
    server_cpu_s: f64,
    /// The load generator's CPU over the same window (it shares the machine).
    loader_cpu_s: f64,
}

impl Point {
    /// Server CPU per delivered message, in microseconds.
    fn cpu_us_per_delivery(&self) -> f64 {
        if self.received == 0 {
            0.0
        } else {
            self.server_cpu_s * 1e6 / self.received as f64
        }
    }
}

/// Reads the microsecond timestamp after `t=` in a payload.
fn stamp(bytes: &[u8]) -> Option<i64> {
    let pos = bytes.windows(2).position(|w| w == b"t=")? + 2;
    let digits = bytes[pos..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&bytes[pos..pos + digits])
        .ok()?
        .parse()
        .ok()
}

type Latencies = Arc<std::sync::Mutex<Vec<f64>>>;

/// What a system under test must do: subscribe S receivers over topics, publish.
trait Target {
    async fn subscribe(
        &mut self,
        topic: String,
        lat: Latencies,
        done: Arc<AtomicBool>,
    ) -> anyhow::Result<()>;
    /// Connects the publisher (and joins its topics) before the clock starts.
    async fn prepare(&mut self, topics: &[String]) -> anyhow::Result<()>;
    async fn publish(&mut self, topic: &str, body: &str) -> anyhow::Result<()>;
}

struct Walcast {
    /// The nodes: subscribers are spread over them in turn, the publisher uses the first.
    ports: Vec<u16>,
    next: usize,
    token: String,
    publisher: Option<crate::harness::Ws>,
}

impl Walcast {
    fn new(ports: Vec<u16>, token: String) -> Self {
        Self {
            ports,
            next: 0,
            token,
            publisher: None,
        }
    }
}

impl Target for Walcast {
    async fn subscribe(
        &mut self,
        topic: String,
        lat: Latencies,
        done: Arc<AtomicBool>,
    ) -> anyhow::Result<()> {
        let port = self.ports[self.next % self.ports.len()];
        self.next += 1;
        let mut ws = crate::harness::ws_connect(port, &self.token).await?;
        let join = json!(["1", "1", format!("realtime:{topic}"), "phx_join",
            {"config": {"broadcast": {"self": false, "ack": false}, "presence": {"enabled": false}, "private": false}}]);
        ws.send(Message::Text(join.to_string().into())).await?;
        ws.next().await.context("no join reply")??;
        tokio::spawn(async move {
            let mut local = Vec::new();
            loop {
                // Until publishing is over, silence is waiting; after it, 500 ms of it ends.
                let msg = match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                    Ok(Some(Ok(msg))) => msg,
                    Ok(_) => break,
                    Err(_) if done.load(Ordering::Relaxed) => break,
                    Err(_) => continue,
                };
                if let Message::Text(t) = msg {
                    if let Some(sent) = stamp(t.as_bytes()) {
                        local.push((now_us() - sent) as f64 / 1000.0);
                    }
                }
            }
            if let Ok(mut l) = lat.lock() {
                l.extend(local);
            }
        });
        Ok(())
    }

    async fn prepare(&mut self, topics: &[String]) -> anyhow::Result<()> {
        let mut ws = crate::harness::ws_connect(self.ports[0], &self.token).await?;
        // A client may only broadcast on channels it joined.
        for (i, topic) in topics.iter().enumerate() {
            let r = (i + 1).to_string();
            let join = json!([r, r, format!("realtime:{topic}"), "phx_join",
                {"config": {"broadcast": {"self": false, "ack": false}, "presence": {"enabled": false}, "private": false}}]);
            ws.send(Message::Text(join.to_string().into())).await?;
            loop {
                let msg = ws.next().await.context("closed")??;
                if let Message::Text(t) = msg {
                    if t.contains("phx_reply") {
                        if !t.contains("\"ok\"") {
                            bail!("publisher join refused: {t}");
                        }
                        break;
                    }
                }
            }
        }
        self.publisher = Some(ws);
        Ok(())
    }

    async fn publish(&mut self, topic: &str, body: &str) -> anyhow::Result<()> {
        let ws = self.publisher.as_mut().context("publish before prepare")?;
        let frame = json!([null, null, format!("realtime:{topic}"), "broadcast",
            {"type": "broadcast", "event": "m", "payload": {"b": body}}]);
        ws.send(Message::Text(frame.to_string().into())).await?;
        Ok(())
    }
}

struct Nats {
    port: u16,
    publisher: Option<tokio::net::TcpStream>,
}

async fn nats_connect(port: u16) -> anyhow::Result<BufReader<tokio::net::TcpStream>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let mut r = BufReader::new(stream);
    let mut info = String::new();
    r.read_line(&mut info).await?;
    if !info.starts_with("INFO") {
        bail!("not a NATS server: {info}");
    }
    r.get_mut()
        .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
        .await?;
    Ok(r)
}

impl Target for Nats {
    async fn subscribe(
        &mut self,
        topic: String,
        lat: Latencies,
        done: Arc<AtomicBool>,
    ) -> anyhow::Result<()> {
        let mut r = nats_connect(self.port).await?;
        r.get_mut()
            .write_all(format!("SUB {topic} 1\r\nPING\r\n").as_bytes())
            .await?;
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).await?;
            if line.starts_with("PONG") {
                break;
            }
        }
        tokio::spawn(async move {
            let mut local = Vec::new();
            let mut line = String::new();
            let mut buf = Vec::new();
            loop {
                line.clear();
                match tokio::time::timeout(Duration::from_millis(500), r.read_line(&mut line)).await
                {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => break,
                    Err(_) if done.load(Ordering::Relaxed) => break,
                    Err(_) => continue,
                }
                if line.starts_with("PING") {
                    if r.get_mut().write_all(b"PONG\r\n").await.is_err() {
                        break;
                    }
                    continue;
                }
                if let Some(rest) = line.strip_prefix("MSG ") {
                    let size: usize = rest
                        .split_whitespace()
                        .last()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    buf.resize(size + 2, 0);
                    if r.read_exact(&mut buf).await.is_err() {
                        break;
                    }
                    if let Some(sent) = stamp(&buf) {
                        local.push((now_us() - sent) as f64 / 1000.0);
                    }
                }
            }
            if let Ok(mut l) = lat.lock() {
                l.extend(local);
            }
        });
        Ok(())
    }

    async fn prepare(&mut self, _topics: &[String]) -> anyhow::Result<()> {
        self.publisher = Some(nats_connect(self.port).await?.into_inner());
        Ok(())
    }

    async fn publish(&mut self, topic: &str, body: &str) -> anyhow::Result<()> {
        let p = self.publisher.as_mut().context("publish before prepare")?;
        // The same JSON body walcast's subscribers receive inside their frame.
        let payload = format!("{{\"b\":\"{body}\"}}");
        p.write_all(format!("PUB {topic} {}\r\n{payload}\r\n", payload.len()).as_bytes())
            .await?;
        Ok(())
    }
}

async fn measure<T: Target>(
    target: &mut T,
    server_pid: u32,
    topics: &[String],
    subs_per_topic: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Point> {
    let lat: Latencies = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    for topic in topics {
        for _ in 0..subs_per_topic {
            target
                .subscribe(topic.clone(), lat.clone(), done.clone())
                .await?;
        }
    }
    target.prepare(topics).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let server_cpu = cpu_seconds(server_pid)?;
    let loader_cpu = cpu_seconds(std::process::id())?;
    let start = Instant::now();
    for i in 0..total {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        let topic = &topics[i % topics.len()];
        target.publish(topic, &format!("t={}", now_us())).await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    // Receivers end after 500 ms of quiet.
    let expected = total * subs_per_topic;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = Arc::strong_count(&lat);
        if n == 1 || Instant::now() > deadline {
            break;
        }
    }
    let server_cpu_s = cpu_seconds(server_pid)? - server_cpu;
    let loader_cpu_s = cpu_seconds(std::process::id())? - loader_cpu;
    let mut l = lat.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    l.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| crate::harness::percentile(&l, p).unwrap_or(0.0);
    Ok(Point {
        rate,
        delivered_per_sec: l.len() as f64 / elapsed,
        expected,
        received: l.len(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        server_cpu_s,
        loader_cpu_s,
    })
}

/// A nats-server on a free loopback port (killed when dropped).
pub(crate) async fn start_nats_server() -> anyhow::Result<(tokio::process::Child, u16)> {
    start_nats(nats_bin()?).await
}

async fn start_nats(bin: &str) -> anyhow::Result<(tokio::process::Child, u16)> {
    let nport = free_port()?;
    let n = tokio::process::Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &nport.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let up = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", nport))
        .await
        .is_err()
    {
        if up.elapsed() > Duration::from_secs(10) {
            bail!("nats-server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((n, nport))
}

fn nats_bin() -> anyhow::Result<&'static str> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("nats-server not found: apt-get install nats-server")
}

pub(crate) struct ClusterArgs {
    pub subscribers: usize,
    pub nodes: usize,
    pub rates: Vec<u64>,
    /// Topics in the many-topics shape (the subscribers spread over them).
    pub topics_for_many: usize,
    /// Publish rates for the many-topics shape (messages per second over all topics).
    pub many_rates: Vec<u64>,
    pub seconds: u64,
    pub p99_bound_ms: f64,
}

/// Two shapes (one topic with S subscribers; many topics with a few each), each on one walcast
/// and then spread over N walcast nodes behind one nats-server with the publisher on the first
/// node (so (N-1)/N of the deliveries take the cross-node hop), in the same run. The difference
/// in latency is what the hop adds; the highest rate within the p99 bound with nothing lost is
/// printed for both.
pub(crate) async fn cluster(a: ClusterArgs) -> anyhow::Result<()> {
    let nats_bin = nats_bin()?;
    let token = anon_token();
    let nofile = (a.subscribers + 1000).to_string();
    let per_topic_many = (a.subscribers / a.topics_for_many.max(1)).max(1);
    let shapes: Vec<(String, Vec<String>, usize, &Vec<u64>)> = vec![
        (
            format!("1 topic x {} subscribers", a.subscribers),
            vec!["room".to_string()],
            a.subscribers,
            &a.rates,
        ),
        (
            format!(
                "{} topics x {} subscribers",
                a.topics_for_many, per_topic_many
            ),
            (0..a.topics_for_many).map(|i| format!("room{i}")).collect(),
            per_topic_many,
            &a.many_rates,
        ),
    ];
    println!(
        "cluster: 1 walcast vs {} walcast nodes behind nats-server (subscribers spread over the nodes, publisher on the first), {} s per rate, p99 bound {} ms; loader, nodes and nats-server share 2 cores",
        a.nodes, a.seconds, a.p99_bound_ms
    );
    let env = |extra: Vec<(&'static str, String)>| {
        let mut e = vec![
            ("RLIMIT_NOFILE", nofile.clone()),
            // The publisher joins every topic.
            ("TENANT_MAX_CHANNELS_PER_CLIENT", "100000".to_string()),
        ];
        e.extend(extra);
        e
    };
    let mut report = Vec::new();
    let mut panels = Vec::new();
    for (name, topics, per_topic, rates) in &shapes {
        let mut rows: Vec<(u64, Point, Point)> = Vec::new();
        for &rate in rates.iter() {
            // Fresh servers per point, so one point's backlog cannot spill into the next.
            let one = env(Vec::new());
            let one: Vec<(&str, &str)> = one.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let crate::harness::Walcast { child: mut w, port } = start_walcast_alone(&one).await?;
            let wpid = w.id().context("walcast pid")?;
            let mut target = Walcast::new(vec![port], token.clone());
            let single = measure(&mut target, wpid, topics, *per_topic, rate, a.seconds).await?;
            drop(target);
            let _ = w.kill().await;

            let (mut n, nport) = start_nats(nats_bin).await?;
            let url = format!("nats://127.0.0.1:{nport}");
            let mut nodes = Vec::new();
            for i in 0..a.nodes {
                let e = env(vec![
                    ("CLUSTER_NATS_URL", url.clone()),
                    ("NODE_NAME", format!("bench-{i}")),
                ]);
                let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
                nodes.push(start_walcast_alone(&e).await?);
            }
            let ports = nodes.iter().map(|w| w.port).collect();
            let first = nodes[0].child.id().context("walcast pid")?;
            let mut target = Walcast::new(ports, token.clone());
            let many = measure(&mut target, first, topics, *per_topic, rate, a.seconds).await?;
            drop(target);
            for mut w in nodes {
                let _ = w.child.kill().await;
            }
            let _ = n.kill().await;
            rows.push((rate, single, many));
        }
        println!("\n{name}");
        println!(
            "{:>10} | {:>12} {:>8} {:>8} {:>15} | {:>12} {:>8} {:>8} {:>15}",
            "publish/s",
            "1 node d/s",
            "p50 ms",
            "p99 ms",
            "recv/expected",
            "N nodes d/s",
            "p50 ms",
            "p99 ms",
            "recv/expected"
        );
        for (rate, s, c) in &rows {
            println!(
                "{:>10} | {:>12.0} {:>8.2} {:>8.2} {:>15} | {:>12.0} {:>8.2} {:>8.2} {:>15}",
                rate,
                s.delivered_per_sec,
                s.p50_ms,
                s.p99_ms,
                format!("{}/{}", s.received, s.expected),
                c.delivered_per_sec,
                c.p50_ms,
                c.p99_ms,
                format!("{}/{}", c.received, c.expected),
            );
        }
        let one_best = best_within(rows.iter().map(|r| &r.1), a.p99_bound_ms);
        let n_best = best_within(rows.iter().map(|r| &r.2), a.p99_bound_ms);
        println!(
            "highest deliveries/s with p99 <= {} ms and nothing lost: 1 node {:.0}, {} nodes {:.0}",
            a.p99_bound_ms, one_best, a.nodes, n_best
        );
        let point = |p: &Point| {
            json!({"publish_rate": p.rate, "delivered_per_sec": p.delivered_per_sec, "expected": p.expected,
                   "received": p.received, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms})
        };
        panels.push(latency_panel(
            &format!("{name}, 1 node vs {} nodes", a.nodes),
            &rows,
            a.p99_bound_ms,
            a.seconds as f64,
            ("1 node", &format!("{} nodes", a.nodes)),
        ));
        report.push(json!({"shape": name,
            "single": rows.iter().map(|r| point(&r.1)).collect::<Vec<_>>(),
            "cluster": rows.iter().map(|r| point(&r.2)).collect::<Vec<_>>(),
            "single_best": one_best, "cluster_best": n_best}));
    }
    let out = json!({"scenario": "cluster", "subscribers": a.subscribers, "nodes": a.nodes, "seconds": a.seconds,
        "p99_bound_ms": a.p99_bound_ms,
        "note": "loader, nodes and nats-server share the machine; server CPU not reported (several processes)",
        "shapes": report});
    crate::harness::save_results("cluster", &out, &panels)?;
    Ok(())
}

/// The highest deliveries/s among `points` with p99 within `bound_ms` and nothing lost (0: none).
fn best_within<'a>(points: impl Iterator<Item = &'a Point>, bound_ms: f64) -> f64 {
    points
        .filter(|p| p.p99_ms <= bound_ms && p.received == p.expected)
        .map(|p| p.delivered_per_sec)
        .fold(0.0_f64, f64::max)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    let nats_bin = nats_bin()?;
    let token = anon_token();
    let nofile = (a.subscribers + 1000).to_string();
    let shapes: Vec<(String, Vec<String>, usize, &Vec<u64>)> = vec![
        (
            format!("1 topic x {} subscribers", a.subscribers),
            vec!["room".to_string()],
            a.subscribers,
            &a.rates,
        ),
        (
            format!(
                "{} topics x {} subscribers",
                a.topics_for_many,
                a.subscribers / a.topics_for_many.max(1)
            ),
            (0..a.topics_for_many).map(|i| format!("room{i}")).collect(),
            (a.subscribers / a.topics_for_many.max(1)).max(1),
            &a.many_rates,
        ),
    ];
    let mut report = Vec::new();
    let mut panels = Vec::new();
    println!(
        "fanout: walcast (vsn 2.0.0 JSON over WebSocket) vs nats-server (its text protocol over TCP), same subscribers, payloads and publish rates, {} s per rate; p99 bound {} ms; loader and servers share 2 cores",
        a.seconds, a.p99_bound_ms
    );
    for (name, topics, per_topic, rates) in &shapes {
        let mut rows: Vec<(u64, Point, Point)> = Vec::new();
        for &rate in rates.iter() {
            // Fresh servers per point, so one point's backlog cannot spill into the next.
            let crate::harness::Walcast { child: mut w, port } = start_walcast_alone(&[
                ("RLIMIT_NOFILE", &nofile),
                // The publisher joins every topic.
                ("TENANT_MAX_CHANNELS_PER_CLIENT", "100000"),
            ])
            .await?;
            let mut target = Walcast::new(vec![port], token.clone());
            let wpid = w.id().context("walcast pid")?;
            let wp = measure(&mut target, wpid, topics, *per_topic, rate, a.seconds).await?;
            drop(target);
            let _ = w.kill().await;

            let (mut n, nport) = start_nats(nats_bin).await?;
            let mut target = Nats {
                port: nport,
                publisher: None,
            };
            let npid = n.id().context("nats-server pid")?;
            let np = measure(&mut target, npid, topics, *per_topic, rate, a.seconds).await?;
            drop(target);
            let _ = n.kill().await;
            rows.push((rate, wp, np));
        }
        println!("\n{name}");
        println!(
            "{:>10} | {:>14} {:>8} {:>8} {:>15} {:>8} | {:>14} {:>8} {:>8} {:>15} {:>8}",
            "publish/s",
            "walcast del/s",
            "p50 ms",
            "p99 ms",
            "recv/expected",
            "cpu us/d",
            "nats del/s",
            "p50 ms",
            "p99 ms",
            "recv/expected",
            "cpu us/d"
        );
        for (rate, w, n) in &rows {
            println!(
                "{:>10} | {:>14.0} {:>8.2} {:>8.2} {:>15} {:>8.2} | {:>14.0} {:>8.2} {:>8.2} {:>15} {:>8.2}",
                rate,
                w.delivered_per_sec,
                w.p50_ms,
                w.p99_ms,
                format!("{}/{}", w.received, w.expected),
                w.cpu_us_per_delivery(),
                n.delivered_per_sec,
                n.p50_ms,
                n.p99_ms,
                format!("{}/{}", n.received, n.expected),
                n.cpu_us_per_delivery()
            );
        }
        let wb = best_within(rows.iter().map(|r| &r.1), a.p99_bound_ms);
        let nb = best_within(rows.iter().map(|r| &r.2), a.p99_bound_ms);
        let ratio = if nb > 0.0 { wb / nb } else { 0.0 };
        println!(
            "highest deliveries/s with p99 <= {} ms and nothing lost: walcast {:.0}, nats-server {:.0}, ratio {:.2}",
            a.p99_bound_ms, wb, nb, ratio
        );
        let point = |p: &Point| {
            json!({"publish_rate": p.rate, "delivered_per_sec": p.delivered_per_sec, "expected": p.expected,
                                         "received": p.received, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms,
                                         "server_cpu_s": p.server_cpu_s, "loader_cpu_s": p.loader_cpu_s,
                                         "server_cpu_us_per_delivery": p.cpu_us_per_delivery()})
        };
        panels.push(latency_panel(
            name,
            &rows,
            a.p99_bound_ms,
            a.seconds as f64,
            ("walcast", "nats-server"),
        ));
        report.push(
            json!({"shape": name, "walcast": rows.iter().map(|r| point(&r.1)).collect::<Vec<_>>(),
            "nats": rows.iter().map(|r| point(&r.2)).collect::<Vec<_>>(),
            "walcast_best": wb, "nats_best": nb, "ratio": ratio}),
        );
    }
    let out = json!({"scenario": "fanout", "subscribers": a.subscribers, "seconds": a.seconds,
        "p99_bound_ms": a.p99_bound_ms, "note": "loader, walcast and nats-server share the machine", "shapes": report});
    crate::harness::save_results("fanout", &out, &panels)?;
    Ok(())
}

/// p50 and p99 against deliveries per second, the first system solid and the second dashed.
fn latency_panel(
    shape: &str,
    rows: &[(u64, Point, Point)],
    bound_ms: f64,
    seconds: f64,
    (first, second): (&str, &str),
) -> crate::chart::Panel {
    use crate::chart::{LineChart, Panel, Series};
    let series =
        |name: &str, pick: fn(&(u64, Point, Point)) -> &Point, p99: bool, dashed: bool| Series {
            name: name.to_string(),
            points: rows
                .iter()
                .map(pick)
                .map(|p| {
                    (
                        p.expected as f64 / seconds,
                        if p99 { p.p99_ms } else { p.p50_ms },
                    )
                })
                .collect(),
            dashed,
            colour: usize::from(p99),
        };
    Panel::Line(LineChart {
        title: format!("broadcast fan-out, {shape}"),
        x_label: "deliveries per second offered (publish rate x subscribers per topic)".into(),
        y_label: "latency ms (log)".into(),
        log_y: true,
        series: vec![
            series(&format!("{first} p50"), |r| &r.1, false, false),
            series(&format!("{first} p99"), |r| &r.1, true, false),
            series(&format!("{second} p50"), |r| &r.2, false, true),
            series(&format!("{second} p99"), |r| &r.2, true, true),
        ],
        bound: Some((bound_ms, format!("p99 bound {bound_ms} ms"))),
    })
}
