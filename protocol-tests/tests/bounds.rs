//! Inputs whose cost would otherwise be unbounded: filter values and LIKE patterns, refused
//! bindings echoed back and logged, presence state, oversized frames and REST bodies. Each test
//! sends raw frames at and just past a bound.

use std::time::{Duration, Instant};

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

async fn setup(extra: &[(&str, &str)]) -> (TestDb, Server, tokio_postgres::Client) {
    let db = TestDb::create("bounds").await;
    let server = Server::start_with_db(&db, extra).await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE notes (id serial PRIMARY KEY, body text);
         GRANT SELECT ON notes TO anon;
         ALTER PUBLICATION supabase_realtime ADD TABLE notes;",
    )
    .await
    .unwrap();
    (db, server, sql)
}

fn binding(filter: &str) -> Value {
    json!({"event": "INSERT", "schema": "public", "table": "notes", "filter": filter})
}

/// Joins `topic` with these bindings; returns the `system` message that follows.
async fn subscribe(c: &mut Client, topic: &str, bindings: Vec<Value>) -> Value {
    let (_, reply) = c
        .join(topic, json!({"config": {"postgres_changes": bindings}}))
        .await;
    assert_eq!(reply.payload()["status"], "ok", "{reply:?}");
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    sys.payload().clone()
}

#[tokio::test]
async fn filter_values_past_their_bounds_are_refused_with_specific_errors() {
    let (_db, server, _sql) = setup(&[]).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;

    // At the bounds: subscribed.
    let pattern = format!("%{}", "a".repeat(1023));
    // 100 values (the original's maximum), 8,191 bytes with their commas.
    let mut values = vec!["x".repeat(81); 99];
    values.push("x".repeat(73));
    let list = values.join(",");
    assert_eq!(list.len(), 8191);
    let at_bounds = subscribe(
        &mut c,
        "realtime:at",
        vec![
            binding(&format!("body=like.{pattern}")),
            binding(&format!("body=in.({list}y)")),
        ],
    )
    .await;
    assert_eq!(at_bounds["status"], "ok", "{at_bounds}");

    let big = binding(&format!("body=eq.{}", "v".repeat(20_000)));
    let cases: Vec<(Vec<Value>, String)> = vec![
        (
            vec![binding(&format!("body=like.{pattern}b"))],
            "Error parsing `filter` params: pattern of `like` filter too long. Maximum 1024 characters".into(),
        ),
        (
            vec![binding(&format!("body=not.imatch.{pattern}b"))],
            "Error parsing `filter` params: pattern of `imatch` filter too long. Maximum 1024 characters".into(),
        ),
        (
            vec![binding(&format!("body=in.({list}yy)"))],
            "Error parsing `filter` params: `in` filter value too long. Maximum 8192 bytes".into(),
        ),
        (
            vec![big.clone()],
            format!("Binding too large: {} bytes. Maximum 16384 bytes of JSON per postgres_changes binding", big.to_string().len()),
        ),
        (
            (0..101).map(|i| binding(&format!("id=eq.{i}"))).collect(),
            "Too many postgres_changes bindings: 101. Maximum 100 per channel".into(),
        ),
    ];
    for (i, (bindings, want)) in cases.into_iter().enumerate() {
        let sys = subscribe(&mut c, &format!("realtime:past{i}"), bindings).await;
        assert_eq!(sys["status"], "error", "case {i}: {sys}");
        assert_eq!(sys["message"], want, "case {i}");
    }
    // 100 bindings are fine.
    let sys = subscribe(
        &mut c,
        "realtime:hundred",
        (0..100).map(|i| binding(&format!("id=eq.{i}"))).collect(),
    )
    .await;
    assert_eq!(sys["status"], "ok", "{sys}");
}

/// Five channels' LIKE bindings at the pattern bound, built so that a backtracking matcher
/// retries at every position of a 100,000-character value, must not hold up a plain
/// subscriber on the same table. The old matcher spent ~0.3 s per match (release build) here.
#[tokio::test]
async fn like_bindings_at_the_bound_do_not_stall_other_subscribers() {
    let (_db, server, sql) = setup(&[]).await;
    let mut hostile = server.connect(Vsn::V2, &token("anon")).await;
    let pattern = format!("%{}ab%", "a_".repeat(510));
    assert_eq!(pattern.chars().count(), 1024);
    for i in 0..5 {
        let sys = subscribe(
            &mut hostile,
            &format!("realtime:hostile{i}"),
            vec![binding(&format!("body=like.{pattern}"))],
        )
        .await;
        assert_eq!(sys["status"], "ok", "{sys}");
    }
    let mut plain = server.connect(Vsn::V2, &token("anon")).await;
    let sys = subscribe(
        &mut plain,
        "realtime:plain",
        vec![json!({"event": "INSERT", "schema": "public", "table": "notes"})],
    )
    .await;
    assert_eq!(sys["status"], "ok", "{sys}");

    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        let started = Instant::now();
        sql.execute("INSERT INTO notes (body) VALUES (repeat('a', 100000))", &[])
            .await
            .unwrap();
        plain
            .recv_until("the change", |f| f.event() == "postgres_changes")
            .await;
        worst = worst.max(started.elapsed());
    }
    eprintln!("worst commit-to-delivery with 5 hostile LIKE bindings: {worst:?}");
    assert!(
        worst < Duration::from_secs(1),
        "the plain subscriber waited {worst:?}"
    );
}

#[tokio::test]
async fn a_refused_binding_is_not_echoed_or_logged_whole() {
    let db = TestDb::create("bounds_echo").await;
    let log = std::env::temp_dir().join(format!("walcast-echo-{}.log", std::process::id()));
    let mut env: Vec<(&str, String)> = db.env();
    env.push(("LOG_LEVEL", "info".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_logging_to(&env, &log).await;
    let mut c = server.connect(Vsn::V1, &token("anon")).await;

    // A 1 MB filter (too large), a 10 KB value the database refuses (echoed by the original's
    // message), and a 15 KB value behind an unknown operator: every system message stays small.
    let huge = "9".repeat(1_000_000);
    let cases = [
        binding(&format!("id=eq.{huge}")),
        binding(&format!("id=eq.{}", "x".repeat(10_000))),
        binding(&format!("id=zz.{}", "z".repeat(15_000))),
    ];
    for (i, b) in cases.into_iter().enumerate() {
        for n in 0..5 {
            let sys = subscribe(&mut c, &format!("realtime:echo{i}_{n}"), vec![b.clone()]).await;
            assert_eq!(sys["status"], "error", "{i}");
            let len = sys["message"].as_str().unwrap().len();
            assert!(len < 3_000, "case {i}: a {len}-byte system message");
        }
    }
    c.assert_quiet().await;
    let logged = std::fs::metadata(&log).unwrap().len();
    eprintln!("log after 15 refused joins: {logged} bytes");
    assert!(logged < 200_000, "{logged} bytes of log");
    let _ = std::fs::remove_file(&log);
}
