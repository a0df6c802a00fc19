//! Nothing is held back after a start unless a restart's backlog needs it (RELIABILITY.md,
//! "Restarts"), and health reports a held backlog as healthy. Each interleaving: a new slot, a
//! restart whose slot holds only WAL of other tables, a restart with a backlog and a change
//! committed after the start.

use std::time::{Duration, Instant};

use protocol_tests::pg::{
    create_ticks, insert_tick, subscribe_to_ticks, wait_slot_confirmed, TestDb,
};
use protocol_tests::*;
use serde_json::{json, Value};

/// The grace period these tests start with: far longer than any wait, so a change held by it
/// times the test out.
const LONG_GRACE: &str = "60000";

async fn health(server: &Server) -> (u16, Value) {
    let (status, _, body) = http(
        "GET",
        &server.http("/api/tenants/any/health"),
        &[("authorization", &format!("Bearer {}", token("anon")))],
        b"",
    )
    .await;
    (status, json_body(&body))
}

async fn subscribed(server: &Server) -> protocol_tests::Client {
    subscribe_to_ticks(server).await.0
}

async fn expect_tick(c: &mut protocol_tests::Client, k: i64) {
    let f = c
        .recv_until("change", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(f.payload()["data"]["record"]["k"], k);
}

#[tokio::test]
async fn a_new_slot_streams_at_once_and_is_healthy_from_the_first_probe() {
    let db = TestDb::create("new_slot").await;
    let started = Instant::now();
    let server = Server::start_with_db(&db, &[("STARTUP_GRACE_MS", LONG_GRACE)]).await;
    // The first probe, straight after the start.
    let (status, body) = health(&server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["healthy"], true);
    assert_ne!(body["data"]["replication"], "holding_backlog", "{body}");
    let sql = db.client().await;
    create_ticks(&sql).await;
    let mut c = subscribed(&server).await;
    insert_tick(&sql, 1).await;
    expect_tick(&mut c, 1).await;
    eprintln!(
        "new slot: start to first delivered change {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_restart_with_only_other_tables_written_meanwhile_streams_at_once() {
    let db = TestDb::create("no_backlog").await;
    let mut server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    create_ticks(&sql).await;
    sql.batch_execute("CREATE TABLE elsewhere (n int)")
        .await
        .unwrap();
    let mut c = subscribed(&server).await;
    let lsn = insert_tick(&sql, 1).await;
    expect_tick(&mut c, 1).await;
    wait_slot_confirmed(&sql, &format!("s_{}", db.name), &lsn).await;
    server.kill().await;
    // WAL while walcast is down, none of it for walcast: the slot is behind the WAL's end
    // but holds nothing to deliver.
    sql.batch_execute("INSERT INTO elsewhere SELECT generate_series(1, 100)")
        .await
        .unwrap();

    let server = Server::start_with_db(&db, &[("STARTUP_GRACE_MS", LONG_GRACE)]).await;
    let mut c = subscribed(&server).await;
    insert_tick(&sql, 2).await;
    expect_tick(&mut c, 2).await;
    let (status, body) = health(&server).await;
    assert_eq!(
        (status, &body["data"]["replication"]),
        (200, &json!("streaming"))
    );
}

#[tokio::test]
async fn a_backlog_is_held_for_the_grace_period_and_later_changes_only_wait_behind_it() {
    let db = TestDb::create("backlog").await;
    let mut server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    create_ticks(&sql).await;
    let mut c = subscribed(&server).await;
    let lsn = insert_tick(&sql, 1).await;
    expect_tick(&mut c, 1).await;
    wait_slot_confirmed(&sql, &format!("s_{}", db.name), &lsn).await;
    server.kill().await;
    insert_tick(&sql, 2).await;
    insert_tick(&sql, 3).await;

    let grace = Duration::from_millis(2000);
    let started = Instant::now();
    let server = Server::start_with_db(&db, &[("STARTUP_GRACE_MS", "2000")]).await;
    // Holding is not an outage: 200, and the body says what is going on.
    let (status, body) = health(&server).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["healthy"], true);
    assert_eq!(body["data"]["replication"], "holding_backlog", "{body}");
    let left = body["data"]["backlog_hold_remaining_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 2000, "{body}");

    // A client rejoins within the grace period and commits a change of its own.
    let mut c = subscribed(&server).await;
    insert_tick(&sql, 4).await;
    for k in [2, 3, 4] {
        expect_tick(&mut c, k).await;
        if k == 2 {
            assert!(
                started.elapsed() >= grace,
                "the backlog went out before the grace period ended"
            );
        }
    }
    // Once streaming, changes flow at once.
    let (status, body) = health(&server).await;
    assert_eq!(
        (status, &body["data"]["replication"]),
        (200, &json!("streaming"))
    );
    insert_tick(&sql, 5).await;
    expect_tick(&mut c, 5).await;
}

/// Before/after figures for RELIABILITY.md (run with `--ignored`): with the default grace
/// period, a brand-new slot: time from the start to the first 200 from health, and to the
/// first change delivered to a client that subscribes and inserts at once.
#[tokio::test]
#[ignore]
async fn measure_a_first_start() {
    let db = TestDb::create("measure").await;
    let started = Instant::now();
    let server = Server::start_with_db(&db, &[("STARTUP_GRACE_MS", "5000")]).await;
    let sql = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let first_200 = loop {
        if health(&server).await.0 == 200 {
            break started.elapsed();
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    create_ticks(&sql).await;
    let mut c = subscribed(&server).await;
    insert_tick(&sql, 1).await;
    expect_tick(&mut c, 1).await;
    eprintln!(
        "MEASURE health first 200 after {first_200:?}; first change delivered {:?} after the start",
        started.elapsed()
    );
}
