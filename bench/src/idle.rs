//! Memory per joined idle socket.

use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::chart;
use crate::harness::{
    anon_token, rss_bytes, save_results, start_walcast_alone, ws_connect, Walcast,
};

pub(crate) async fn idle(n: usize) -> anyhow::Result<()> {
    // No database: an idle socket's cost is the socket, its session and its channel.
    let nofile = (n + 1000).to_string();
    let Walcast { mut child, port } = start_walcast_alone(&[("RLIMIT_NOFILE", &nofile)]).await?;
    let pid = child.id().context("pid")?;
    let tok = anon_token();
    let open = |i: usize| {
        let tok = tok.clone();
        async move {
            let mut ws = ws_connect(port, &tok).await?;
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
