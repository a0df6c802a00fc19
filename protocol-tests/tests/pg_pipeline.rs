//! Row checks of consecutive batches run at the same time on the delivery pool's connections,
//! and their changes still go out in commit order: a later batch whose check finishes first
//! waits for the earlier one.

use std::time::{Duration, Instant};

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::json;

const USER: &str = "00000000-0000-4000-8000-00000000000a";
const METRICS_SECRET: &str = "metrics-secret-with-at-least-32-characters!!";
/// The advisory lock the policy waits on for the row whose body is 'slow'.
const LOCK: i64 = 4242;

/// How many batches' row checks have finished (the authorization query histogram's count).
async fn checks_done(server: &Server) -> u64 {
    let bearer = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(METRICS_SECRET.as_bytes()),
    )
    .unwrap();
    let text = server.metrics(&bearer).await;
    text.lines()
        .find_map(|l| l.strip_prefix("walcast_authorization_query_seconds_count "))
        .map(|n| n.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// Polls `cond` until it holds, failing with `what` after 15 s.
async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_later_batch_checked_first_still_goes_out_after_the_earlier_one() {
    let db = TestDb::create("pipeline").await;
    // Index scans only, so that the lookup of another key never evaluates the policy on the
    // 'slow' row.
    let server = Server::start_with_db(
        &db,
        &[
            ("METRICS_JWT_SECRET", METRICS_SECRET),
            ("DB_DELIVERY_POOL_SIZE", "3"),
            ("DB_CHECKS_IN_FLIGHT", "2"),
            ("DB_AFTER_CONNECT_QUERY", "SET enable_seqscan = off"),
        ],
    )
    .await;
    let sql = db.client().await;
    // The policy blocks on an advisory lock for the row 'slow' only.
    sql.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, body text);
         ALTER TABLE items ENABLE ROW LEVEL SECURITY;
         CREATE FUNCTION gate(b text) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
           IF b = 'slow' THEN
             PERFORM pg_advisory_lock_shared({LOCK});
             PERFORM pg_advisory_unlock_shared({LOCK});
           END IF;
           RETURN true;
         END $$;
         CREATE POLICY p ON items FOR SELECT TO authenticated USING (gate(body));
         GRANT SELECT ON items TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE items;"
    ))
    .await
    .unwrap();
    let token = sign(json!({"role": "authenticated", "sub": USER, "exp": now() + 3600}));
    let mut c = server.connect(Vsn::V2, &token).await;
    let (_, reply) = c
        .join(
            "realtime:items",
            json!({"config": {"postgres_changes": [
                {"event": "INSERT", "schema": "public", "table": "items"}
            ]}}),
        )
        .await;
    assert_eq!(reply.payload()["status"], "ok", "{:?}", reply.payload());
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(sys.payload()["status"], "ok", "{:?}", sys.payload());

    let locker = db.client().await;
    locker
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await
        .unwrap();
    let before = checks_done(&server).await;

    // The first batch's check waits on the lock.
    sql.execute("INSERT INTO items VALUES (1, 'slow')", &[])
        .await
        .unwrap();
    wait_for("the first check to wait on the lock", || async {
        let waiting: i64 = sql
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        waiting > 0
    })
    .await;

    // The second batch's check runs on the other connection and finishes first.
    sql.execute("INSERT INTO items VALUES (2, 'fast')", &[])
        .await
        .unwrap();
    wait_for(
        "the second batch's check to finish while the first one waits",
        || async { checks_done(&server).await > before },
    )
    .await;
    assert_eq!(checks_done(&server).await, before + 1);
    // Its change waits for the first one's.
    c.assert_no_more("postgres_changes", "the subscriber (out of commit order)")
        .await;

    locker
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await
        .unwrap();
    for expected in ["slow", "fast"] {
        let f = c
            .recv_until("postgres_changes", |f| f.event() == "postgres_changes")
            .await;
        assert_eq!(
            f.payload()["data"]["record"]["body"],
            expected,
            "{:?}",
            f.payload()
        );
    }
}
