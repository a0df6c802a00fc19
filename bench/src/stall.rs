//! Stalled readers: S sockets join a busy topic and stop reading (a 4 KiB receive buffer, so
//! the kernel cannot hide the stall), next to H healthy readers, while one client broadcasts at a
//! fixed rate. Reports the server's memory over the run, how many stalled sockets were cut off
//! (CLIENT_OUTBOUND_QUEUE_BYTES), and the healthy readers' latency, against a reference run
//! without stalled readers in the same invocation.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

use tokio_tungstenite::tungstenite::Message;

use crate::harness::{anon_token, now_us, rss_bytes, start_walcast_alone, Walcast};

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

pub(crate) struct StallArgs {
    pub stalled: usize,
    pub healthy: usize,
    pub rate: u64,
    pub seconds: u64,
    pub payload: usize,
    pub queue_bytes: usize,
}

struct Run {
    stalled: usize,
    rss_start: u64,
    rss_peak: u64,
    rss_end: u64,
    cut_off: usize,
    received: usize,
    sent: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn connect(port: u16, tok: &str, recv_buffer: Option<u32>) -> anyhow::Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let stream = socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    stream.set_nodelay(true)?;
    let (mut ws, _) =
        tokio_tungstenite::client_async(crate::harness::socket_url(port, tok), stream).await?;
    let join = json!(["1", "1", "realtime:busy", "phx_join",
        {"config": {"broadcast": {"ack": false, "self": false}, "presence": {"enabled": false}, "private": false}}]);
    ws.send(Message::Text(join.to_string().into())).await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await?
            .context("closed before the join reply")??;
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t)?;
            if v[3] == "phx_reply" {
                if v[4]["status"] != "ok" {
                    bail!("join failed: {}", v[4]);
                }
                return Ok(ws);
            }
        }
    }
}

async fn one_run(a: &StallArgs, stalled: usize, reading: bool) -> anyhow::Result<Run> {
    let nofile = (stalled + a.healthy + 1000).to_string();
    let queue = a.queue_bytes.to_string();
    // The queue must hold the largest payload plus headroom.
    let payload_kb = (a.queue_bytes.saturating_sub(64 * 1024) / 1000)
        .clamp(1, 3000)
        .to_string();
    let Walcast { mut child, port } = start_walcast_alone(&[
        ("RLIMIT_NOFILE", &nofile),
        ("CLIENT_OUTBOUND_QUEUE_BYTES", &queue),
        ("TENANT_MAX_PAYLOAD_SIZE_IN_KB", &payload_kb),
    ])
    .await?;
    let pid = child.id().context("pid")?;
    let tok = anon_token();

    let mut stalled_ws = Vec::with_capacity(stalled);
    let mut drains = Vec::new();
    for _ in 0..stalled {
        let ws = connect(port, &tok, Some(4096)).await?;
        if reading {
            // The reference: the same sockets, reading (and discarding) everything.
            drains.push(tokio::spawn(async move {
                let mut ws = ws;
                while let Some(Ok(_)) = ws.next().await {}
            }));
        } else {
            stalled_ws.push(ws);
        }
    }
    // Healthy readers record the latency of every broadcast (one clock: this process).
    let mut readers = Vec::new();
    for _ in 0..a.healthy {
        let mut ws = connect(port, &tok, None).await?;
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while let Ok(Some(Ok(msg))) =
                tokio::time::timeout(Duration::from_secs(5), ws.next()).await
            {
                let Message::Text(t) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&t) else {
                    continue;
                };
                if v[4]["event"] == "done" {
                    break;
                }
                if let Some(sent) = v[4]["payload"]["t"].as_i64() {
                    lat.push((now_us() - sent) as f64 / 1000.0);
                }
            }
            lat
        }));
    }
    let mut sender = connect(port, &tok, None).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_start = rss_bytes(pid)?;

    let pad = "x".repeat(a.payload);
    let total = (a.rate * a.seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / a.rate as f64);
    let start = Instant::now();
    let mut rss_peak = rss_start;
    let mut last_sample = Instant::now();
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let frame = json!([null, null, "realtime:busy", "broadcast",
            {"type": "broadcast", "event": "m", "payload": {"t": now_us(), "pad": &pad}}]);
        sender.send(Message::Text(frame.to_string().into())).await?;
        if last_sample.elapsed() >= Duration::from_millis(100) {
            rss_peak = rss_peak.max(rss_bytes(pid)?);
            last_sample = Instant::now();
        }
    }
    let done = json!([null, null, "realtime:busy", "broadcast",
        {"type": "broadcast", "event": "done", "payload": {}}]);
    sender.send(Message::Text(done.to_string().into())).await?;
    let mut lat = Vec::new();
    for r in readers {
        lat.extend(r.await?);
    }
    rss_peak = rss_peak.max(rss_bytes(pid)?);
    let rss_end = rss_bytes(pid)?;

    // Which stalled sockets were cut off: drain each until its close frame (or give up).
    let mut cut_off = 0;
    for mut ws in stalled_ws {
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(Message::Close(Some(c))) => return u16::from(c.code) == 1013,
                    Ok(_) => continue,
                    Err(_) => return true,
                }
            }
            true
        })
        .await
        .unwrap_or(false);
        cut_off += usize::from(closed);
    }
    let _ = child.kill().await;
    for d in drains {
        d.abort();
    }

    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| crate::harness::percentile(&lat, p).unwrap_or(0.0);
    Ok(Run {
        stalled,
        rss_start,
        rss_peak,
        rss_end,
        cut_off,
        received: lat.len(),
        sent: total * a.healthy,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
    })
}

pub(crate) async fn stall(a: StallArgs) -> anyhow::Result<()> {
    let alone = one_run(&a, 0, true).await?;
    let reference = one_run(&a, a.stalled, true).await?;
    let run = one_run(&a, a.stalled, false).await?;
    println!(
        "stall: {} healthy readers + S = {} other readers (4 KiB receive buffers) on one topic, reading (reference) or stalled; {} broadcasts/s of {} B for {} s; CLIENT_OUTBOUND_QUEUE_BYTES {}; release build; loader and walcast share 2 cores",
        a.healthy, a.stalled, a.rate, a.payload, a.seconds, a.queue_bytes
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>9} {:>10} {:>8} {:>8} {:>8}",
        "", "RSS start", "RSS peak", "RSS end", "cut off", "received", "p50 ms", "p99 ms", "max ms"
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    for (name, r) in [
        ("healthy readers alone", &alone),
        ("reference: S reading", &reference),
        ("S stalled", &run),
    ] {
        println!(
            "{:<24} {:>8.1}Mi {:>8.1}Mi {:>8.1}Mi {:>9} {:>4}/{:<5} {:>8.2} {:>8.2} {:>8.2}",
            name,
            mib(r.rss_start),
            mib(r.rss_peak),
            mib(r.rss_end),
            r.cut_off,
            r.received,
            r.sent,
            r.p50_ms,
            r.p99_ms,
            r.max_ms
        );
    }
    let json_run = |r: &Run| {
        json!({"others": r.stalled, "rss_start": r.rss_start, "rss_peak": r.rss_peak, "rss_end": r.rss_end,
               "cut_off": r.cut_off, "received": r.received, "sent": r.sent,
               "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms})
    };
    let out = json!({"scenario": "stall", "healthy": a.healthy, "rate": a.rate, "seconds": a.seconds,
        "payload": a.payload, "queue_bytes": a.queue_bytes,
        "alone": json_run(&alone), "reference": json_run(&reference), "run": json_run(&run)});
    let cases = vec![
        "healthy alone".to_string(),
        format!("+{} reading", a.stalled),
        format!("+{} stalled", a.stalled),
    ];
    let runs = [&alone, &reference, &run];
    let latency = crate::chart::BarChart {
        title: format!(
            "stalled readers: latency of the {} healthy readers",
            a.healthy
        ),
        y_label: "ms".into(),
        categories: cases.clone(),
        series: vec![
            ("p50".into(), runs.iter().map(|r| r.p50_ms).collect(), false),
            ("p99".into(), runs.iter().map(|r| r.p99_ms).collect(), false),
        ],
    };
    let memory = crate::chart::BarChart {
        title: "walcast memory (RSS)".into(),
        y_label: "MiB".into(),
        categories: cases,
        series: vec![
            (
                "start".into(),
                runs.iter().map(|r| mib(r.rss_start)).collect(),
                false,
            ),
            (
                "peak".into(),
                runs.iter().map(|r| mib(r.rss_peak)).collect(),
                false,
            ),
            (
                "end".into(),
                runs.iter().map(|r| mib(r.rss_end)).collect(),
                false,
            ),
        ],
    };
    crate::harness::save_results(
        "stall",
        &out,
        &[
            crate::chart::Panel::Bars(latency),
            crate::chart::Panel::Bars(memory),
        ],
    )?;
    if run.received < run.sent {
        bail!(
            "healthy readers lost broadcasts: {} of {}",
            run.received,
            run.sent
        );
    }
    Ok(())
}
