//! PostgreSQL restarts under a running walcast: channels are told, walcast reconnects, and every
//! committed change arrives exactly once.

use protocol_tests::*;
use serde_json::json;

#[tokio::test]
async fn a_database_restart_loses_nothing_and_duplicates_nothing() {
    // A cluster of its own: this test restarts it.
    let dir = std::env::temp_dir().join(format!("walcast-restart-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = walcast::dev::DevCluster::start(&dir).expect("cluster");
    protocol_tests::pg::stop_when_this_process_ends(&cluster, &dir);
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let server = Server::start_with(&[("DATABASE_URL", &url)]).await;
    let sql = protocol_tests::pg::connect(cluster.port, "postgres").await;
    protocol_tests::pg::create_ticks(&sql).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    c.join_ok(
        "realtime:t",
        json!({"postgres_changes":[{"event":"INSERT","schema":"public","table":"ticks"}]}),
    )
    .await;
    assert_eq!(
        c.recv_until("subscribed", |f| f.event() == "system")
            .await
            .payload()["status"],
        "ok"
    );
    sql.batch_execute("INSERT INTO ticks (k) VALUES (1)")
        .await
        .unwrap();
    c.recv_until("first", |f| f.event() == "postgres_changes")
        .await;

    let restart_began = std::time::Instant::now();
    let c2 = cluster.restart();
    c2.expect("restart");
    let database_back = std::time::Instant::now();
    let down = c.recv_until("stream down", |f| f.event() == "system").await;
    assert_eq!(down.payload()["extension"], "postgres_changes");
    assert_eq!(down.payload()["status"], "error");
    // Written while walcast is (probably) not yet streaming again.
    let sql = protocol_tests::pg::connect(cluster.port, "postgres").await;
    for k in 2..=5 {
        sql.execute("INSERT INTO ticks (k) VALUES ($1)", &[&k])
            .await
            .unwrap();
    }
    let mut ks = Vec::new();
    let mut resubscribed = false;
    while ks.len() < 4 {
        let f = c.recv().await;
        match f.event() {
            "postgres_changes" => ks.push(f.payload()["data"]["record"]["k"].as_i64().unwrap()),
            "system" => {
                assert_eq!(f.payload()["message"], "Subscribed to PostgreSQL");
                if !resubscribed {
                    // RELIABILITY.md quotes these.
                    println!(
                        "recovery: restart took {} ms; resubscribed {} ms after the database was back",
                        (database_back - restart_began).as_millis(),
                        database_back.elapsed().as_millis()
                    );
                }
                resubscribed = true;
            }
            other => panic!("unexpected {other}: {f:?}"),
        }
    }
    assert_eq!(ks, vec![2, 3, 4, 5], "in commit order, once each");
    sql.batch_execute("INSERT INTO ticks (k) VALUES (6)")
        .await
        .unwrap();
    let mut rest = Vec::new();
    loop {
        let f = c.recv().await;
        if f.event() == "system" {
            resubscribed = true;
            continue;
        }
        rest.push(f.payload()["data"]["record"]["k"].as_i64().unwrap());
        break;
    }
    assert_eq!(rest, vec![6]);
    assert!(resubscribed, "channels are told when the stream is back");
    c.assert_no_more(
        "postgres_changes",
        "the client after the restart (a duplicate)",
    )
    .await;
    drop(server);
    let _ = cluster.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A graceful stop awaits every background task (replication first, then the dispatcher that
/// drains its queue, then the periodic jobs) instead of aborting them, and none overstays.
#[tokio::test]
async fn a_graceful_stop_awaits_every_background_task() {
    let db = pg::TestDb::create("task_stop").await;
    let log = std::env::temp_dir().join(format!("walcast-task-stop-{}.log", std::process::id()));
    let env = db.env();
    let all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start_logging_to(&all, &log).await;
    server.terminate();
    let status = server.wait_exit(std::time::Duration::from_secs(15)).await;
    assert!(status.success(), "walcast exited with {status}");
    let text = std::fs::read_to_string(&log).expect("read the log");
    let _ = std::fs::remove_file(&log);
    let mut last = 0;
    for task in [
        "replication",
        "replication readiness",
        "dispatcher",
        "slot watch",
        "janitor",
        "rate limits",
    ] {
        let line = format!("stopped task=\"{task}\"");
        let at = text
            .find(&line)
            .unwrap_or_else(|| panic!("no {line:?} in the log:\n{text}"));
        assert!(at >= last, "{task} stopped out of order:\n{text}");
        last = at;
    }
    assert!(!text.contains("did not stop in time"), "{text}");
    assert!(!text.contains("task failed"), "{text}");
}
