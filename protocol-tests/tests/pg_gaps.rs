//! Gaps in the change stream are never silent: a channel that may have missed committed changes
//! is told so in a `system` message (RELIABILITY.md, "Gaps").
//!
//! Each test has a cluster of its own: they kill walcast, invalidate and drop slots.

use std::time::{Duration, Instant};

use protocol_tests::pg::{create_ticks, insert_tick, subscribe_to_ticks};
use protocol_tests::*;
use serde_json::json;
use tokio_postgres::Client;

struct Setup {
    cluster: walcast::dev::DevCluster,
    dir: std::path::PathBuf,
    url: String,
    sql: Client,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("walcast-gap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = walcast::dev::DevCluster::start(&dir).expect("cluster");
    protocol_tests::pg::stop_when_this_process_ends(&cluster, &dir);
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let sql = protocol_tests::pg::connect(cluster.port, "postgres").await;
    Setup {
        cluster,
        dir,
        url,
        sql,
    }
}

/// walcast's slot's `wal_status` (None while it does not exist).
async fn slot_status(sql: &Client) -> Option<String> {
    sql.query_opt(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walcast_changes'",
        &[],
    )
    .await
    .unwrap()
    .and_then(|r| r.get(0))
}

async fn wait_for(sql: &Client, what: &str, query: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: bool = sql.query_one(query, &[]).await.unwrap().get(0);
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn expect_change(c: &mut protocol_tests::Client, k: i64) {
    let f = c
        .recv_until("change", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(f.payload()["data"]["record"]["k"], k);
}

#[tokio::test]
async fn a_channel_rejoining_after_the_backlog_went_out_is_told_of_the_gap() {
    let s = setup("restart").await;
    let mut server = Server::start_with(&[("DATABASE_URL", &s.url)]).await;
    create_ticks(&s.sql).await; // after the migrations made the roles
    let (mut c, _) = subscribe_to_ticks(&server).await;
    insert_tick(&s.sql, 1).await;
    expect_change(&mut c, 1).await;

    server.kill().await; // kill -9
    let lsn = insert_tick(&s.sql, 2).await;
    // No grace period: the backlog streams at once, before this client is back.
    let server = Server::start_with(&[("DATABASE_URL", &s.url), ("STARTUP_GRACE_MS", "0")]).await;
    wait_for(
        &s.sql,
        "the backlog to be delivered",
        &format!("SELECT confirmed_flush_lsn >= '{lsn}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'walcast_changes'"),
    )
    .await;
    let (mut c, join_ref) = subscribe_to_ticks(&server).await;
    let gap = c.recv_until("gap", |f| f.event() == "system").await;
    assert_eq!(gap.payload()["extension"], "postgres_changes");
    assert_eq!(gap.payload()["status"], "error");
    assert_eq!(gap.payload()["gap"]["reason"], "restart");
    assert!(
        gap.payload()["message"]
            .as_str()
            .unwrap()
            .contains("while the server was down"),
        "{gap:?}"
    );
    // Told once; live changes flow as usual.
    insert_tick(&s.sql, 3).await;
    expect_change(&mut c, 3).await;
    c.assert_quiet().await;

    // A resubscription (new access token) does not repeat it.
    let msg_ref = c.make_ref();
    c.send(
        Some(&join_ref),
        Some(&msg_ref),
        "realtime:t",
        "access_token",
        // A different token (later expiry), so the subscription is made again.
        json!({"access_token": sign(json!({"role": "anon", "exp": now() + 7200, "sub": "anon-user"}))}),
    )
    .await;
    let f = c
        .recv_until("resubscribed", |f| f.event() == "system")
        .await;
    assert_eq!(f.payload()["message"], "Subscribed to PostgreSQL");
    c.assert_quiet().await;
}

#[tokio::test]
async fn an_invalidated_slot_is_recreated_and_rejoining_channels_are_told() {
    let s = setup("lost").await;
    let mut server = Server::start_with(&[("DATABASE_URL", &s.url)]).await;
    create_ticks(&s.sql).await; // after the migrations made the roles
    let (mut c, _) = subscribe_to_ticks(&server).await;
    insert_tick(&s.sql, 1).await;
    expect_change(&mut c, 1).await;
    server.kill().await;

    // While walcast is down, the database bounds the WAL it keeps for the slot and invalidates
    // it once more was written.
    s.sql
        .batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await
        .unwrap();
    s.sql
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        s.sql
            .batch_execute("INSERT INTO ticks (k) SELECT 0 FROM generate_series(1, 1000); SELECT pg_switch_wal(); CHECKPOINT;")
            .await
            .unwrap();
        let status = slot_status(&s.sql).await;
        if status.as_deref() == Some("lost") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot not invalidated: {status:?}"
        );
    }

    let server = Server::start_with(&[("DATABASE_URL", &s.url)]).await;
    let (mut c, _) = subscribe_to_ticks(&server).await;
    let gap = c.recv_until("gap", |f| f.event() == "system").await;
    assert_eq!(gap.payload()["gap"]["reason"], "slot_lost");
    assert!(
        gap.payload()["message"]
            .as_str()
            .unwrap()
            .contains("invalidated"),
        "{gap:?}"
    );
    // The new slot streams.
    insert_tick(&s.sql, 7).await;
    expect_change(&mut c, 7).await;
    let status = slot_status(&s.sql).await;
    assert!(
        status.is_some() && status.as_deref() != Some("lost"),
        "the recreated slot: {status:?}"
    );
}

#[tokio::test]
async fn a_slot_dropped_under_a_running_server_is_recreated_and_subscribed_channels_are_told() {
    let s = setup("dropped").await;
    let server = Server::start_with(&[("DATABASE_URL", &s.url)]).await;
    create_ticks(&s.sql).await;
    let (mut c, _) = subscribe_to_ticks(&server).await;
    insert_tick(&s.sql, 1).await;
    expect_change(&mut c, 1).await;

    // Take the slot away: end walcast's walsender, then drop the slot before it reconnects.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        s.sql
            .batch_execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                  WHERE slot_name = 'walcast_changes' AND active_pid IS NOT NULL",
            )
            .await
            .unwrap();
        // Refused while walcast's walsender still holds it (or holds it again): retry.
        if s.sql
            .batch_execute("SELECT pg_drop_replication_slot('walcast_changes')")
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "could not drop the slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The channel, subscribed all along, is told.
    let gap = c
        .recv_until("gap", |f| {
            f.event() == "system" && f.payload()["gap"]["reason"] == "slot_lost"
        })
        .await;
    assert!(gap.payload()["message"]
        .as_str()
        .unwrap()
        .contains("dropped"));
    wait_for(
        &s.sql,
        "the slot to be back",
        "SELECT count(*) > 0 FROM pg_replication_slots WHERE slot_name = 'walcast_changes' AND active",
    )
    .await;
    insert_tick(&s.sql, 2).await;
    expect_change(&mut c, 2).await;
}
