//! `config.broadcast.replication_ready`: once the change stream (which carries broadcasts from
//! the database) runs and has passed the join, the channel gets the original's `system`
//! message; when it cannot get there within the timeout, the channel is shut down with the
//! original's message. Each interleaving is forced: stream already up, stream holding a backlog
//! then released, stream held past the timeout, no database at all.

use protocol_tests::pg::{
    create_ticks, insert_tick, subscribe_to_ticks, wait_slot_confirmed, TestDb,
};
use protocol_tests::*;
use serde_json::{json, Value};

const READY: &str = "Replication connection established";

fn ready_config() -> Value {
    json!({"broadcast": {"replication_ready": true}})
}

fn is_ready(f: &Frame) -> bool {
    f.event() == "system" && f.payload()["message"] == READY
}

#[tokio::test]
async fn a_ready_channel_gets_the_originals_message_then_broadcasts_from_the_database() {
    let db = TestDb::create("ready").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    for vsn in BOTH {
        let topic = format!("room{}", vsn.is_v2());
        let mut c = server.connect(vsn, &token("anon")).await;
        let join_ref = c
            .join_ok(&format!("realtime:{topic}"), ready_config())
            .await;
        let f = c.recv_until("replication ready", is_ready).await;
        assert_eq!(
            f.payload(),
            &json!({"extension": "system", "status": "ok", "message": READY, "channel": topic}),
            "{vsn:?}"
        );
        if vsn.is_v2() {
            assert_eq!(f.join_ref(), Some(&json!(join_ref)));
        }
        // Committed after the message: delivered.
        sql.execute(
            "SELECT realtime.send('{\"n\":1}'::jsonb, 'ev', $1, false)",
            &[&topic],
        )
        .await
        .unwrap();
        let b = c
            .recv_until("broadcast from the database", |f| {
                f.event().starts_with("broadcast")
            })
            .await;
        let (event, payload) = match b {
            // V2 carries it as a binary user broadcast.
            Frame::Binary { event, payload, .. } => {
                (event, serde_json::from_slice::<Value>(&payload).unwrap())
            }
            f => (
                f.payload()["event"].as_str().unwrap().to_owned(),
                f.payload()["payload"].clone(),
            ),
        };
        assert_eq!(
            (event.as_str(), &payload["n"]),
            ("ev", &json!(1)),
            "{vsn:?}"
        );
        // Told once.
        c.assert_no_more("system", "the ready channel").await;
    }
}

#[tokio::test]
async fn only_channels_that_ask_are_told() {
    let db = TestDb::create("ready_optin").await;
    let server = Server::start_with_db(&db, &[]).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    c.join_ok("realtime:plain", json!({"broadcast": {"self": true}}))
        .await;
    c.join_ok("realtime:asks", ready_config()).await;
    // The plain channel joined first: had it been told, it would have been by the time the
    // second one is.
    let f = c.recv_until("replication ready", is_ready).await;
    assert_eq!(f.topic(), "realtime:asks");
    let before = c.barrier().await;
    assert!(
        before.iter().all(|f| f.event() != "system"),
        "nothing for the plain channel: {before:?}"
    );
}

/// Starts walcast, delivers one change, kills it, commits `ks` while it is down: the slot holds
/// a backlog for the next start.
async fn backlog(db: &TestDb, ks: &[i32]) -> tokio_postgres::Client {
    let mut server = Server::start_with_db(db, &[]).await;
    let sql = db.client().await;
    create_ticks(&sql).await;
    let (mut c, _) = subscribe_to_ticks(&server).await;
    let lsn = insert_tick(&sql, 1).await;
    c.recv_until("first", |f| f.event() == "postgres_changes")
        .await;
    wait_slot_confirmed(&sql, &format!("s_{}", db.name), &lsn).await;
    server.kill().await;
    for k in ks {
        insert_tick(&sql, *k).await;
    }
    sql
}

#[tokio::test]
async fn a_join_while_the_backlog_is_held_is_told_after_the_backlog_went_out() {
    let db = TestDb::create("ready_held").await;
    let sql = backlog(&db, &[2, 3]).await;
    let server = Server::start_with_db(&db, &[("STARTUP_GRACE_MS", "2000")]).await;
    let mut c = server.connect(Vsn::V1, &token("anon")).await;
    let config = json!({
        "broadcast": {"replication_ready": true},
        "postgres_changes": [{"event":"INSERT","schema":"public","table":"ticks"}],
    });
    c.join_ok("realtime:t", config).await;
    // Held: the stream has not passed this join, so no ready message yet.
    let held = c.barrier().await;
    assert!(!held.iter().any(is_ready), "ready while held: {held:?}");
    // Released: the backlog (committed before the join) comes first, then the message.
    let mut seen = Vec::new();
    loop {
        let f = c
            .recv_until("backlog or ready", |f| {
                f.event() == "postgres_changes" || is_ready(f)
            })
            .await;
        if is_ready(&f) {
            break;
        }
        seen.push(f.payload()["data"]["record"]["k"].as_i64().unwrap());
    }
    assert_eq!(seen, vec![2, 3], "the backlog went out before the message");
    insert_tick(&sql, 4).await;
    let f = c
        .recv_until("live change", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(f.payload()["data"]["record"]["k"], 4);
}

#[tokio::test]
async fn a_stream_that_does_not_get_there_in_time_shuts_the_channel_down() {
    let db = TestDb::create("ready_late").await;
    let _sql = backlog(&db, &[2]).await;
    // The backlog is held for a minute; the join waits at most 300 ms.
    let server = Server::start_with_db(
        &db,
        &[
            ("STARTUP_GRACE_MS", "60000"),
            ("REPLICATION_READY_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let join_ref = c.join_ok("realtime:late", ready_config()).await;
        let f = c.recv_until("system", |f| f.event() == "system").await;
        assert_eq!(
            f.payload(),
            &json!({"extension": "system", "status": "error",
                    "message": "Replication connection was not established in time",
                    "channel": "late"}),
            "{vsn:?}"
        );
        let close = c.recv().await;
        assert_eq!(close.event(), "phx_close", "{vsn:?}");
        assert_eq!(close.msg_ref(), &json!(join_ref), "{vsn:?}");
        // The socket stays up.
        c.assert_quiet().await;
    }
}

#[tokio::test]
async fn without_a_database_the_channel_is_told_at_once() {
    let server = Server::start().await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    c.join_ok("realtime:nodb", ready_config()).await;
    let f = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(f.payload()["extension"], "system");
    assert_eq!(f.payload()["status"], "error");
    assert!(
        f.payload()["message"]
            .as_str()
            .unwrap()
            .contains("no database configured"),
        "{f:?}"
    );
    assert_eq!(c.recv().await.event(), "phx_close");
}
