//! Read replicas for the row checks (`DB_REPLICA_URLS`), against a real streaming replica of
//! the test cluster (`pg_basebackup -R`, a hot standby on its own port): the checks run there
//! once it has replayed a change's commit, never before (a replica paused behind a policy
//! change is not asked), and a replica that dies in the middle of a check costs nothing.

use protocol_tests::pg::{Replica, TestDb};
use protocol_tests::*;
use serde_json::{json, Value};

const ON_REPLICA: &str = "walcast_authorization_batches_total{on=\"replica\"}";
const ON_PRIMARY: &str = "walcast_authorization_batches_total{on=\"primary\"}";

/// `notes` visible to their owner; `members`/`msgs` visible to a room's members; `marks`
/// without row level security, for ordering barriers.
const SCHEMA: &str = "
    CREATE TABLE notes (id serial PRIMARY KEY, owner uuid NOT NULL, body text);
    ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON notes FOR SELECT TO authenticated USING (owner = auth.uid());
    CREATE TABLE members (room int, user_id uuid);
    CREATE TABLE msgs (id int PRIMARY KEY, room int NOT NULL, body text);
    ALTER TABLE msgs ENABLE ROW LEVEL SECURITY;
    CREATE POLICY member ON msgs FOR SELECT TO authenticated
        USING (EXISTS (SELECT 1 FROM members m WHERE m.room = msgs.room AND m.user_id = auth.uid()));
    CREATE TABLE marks (n int PRIMARY KEY);
    GRANT SELECT ON notes, members, msgs, marks TO authenticated;
    ALTER PUBLICATION supabase_realtime ADD TABLE notes, msgs, marks;
";

fn user(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn user_token(n: u32) -> String {
    sign(json!({"role":"authenticated","sub": user(n),"exp": now() + 3600}))
}

async fn subscribe(server: &Server, n: u32) -> Client {
    let mut c = server.connect(Vsn::V2, &user_token(n)).await;
    let bindings = json!([
        {"event":"*","schema":"public","table":"notes"},
        {"event":"*","schema":"public","table":"msgs"},
        {"event":"INSERT","schema":"public","table":"marks"}
    ]);
    let (_, reply) = c
        .join(
            "realtime:r",
            json!({"config": {"postgres_changes": bindings}}),
        )
        .await;
    assert_eq!(reply.payload()["status"], "ok");
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(sys.payload()["message"], "Subscribed to PostgreSQL");
    c
}

/// The next postgres_changes payload's `data`.
async fn next_change(c: &mut Client) -> Value {
    c.recv_until("change", |f| f.event() == "postgres_changes")
        .await
        .payload()["data"]
        .clone()
}

/// Every change up to the mark `n` (marks are delivered in commit order), the mark excluded.
async fn changes_until_mark(c: &mut Client, n: i32) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let d = next_change(c).await;
        if d["table"] == "marks" {
            assert_eq!(d["record"]["n"], n, "marks arrive in order");
            return out;
        }
        out.push(d);
    }
}

/// walcast on `db` with the replica, once walcast counts the replica usable.
async fn start(db: &TestDb, replica: &Replica, wait_ms: &str) -> Server {
    let url = replica.url(db);
    let server = Server::start_with_db(
        db,
        &[
            ("DB_REPLICA_URLS", url.as_str()),
            ("DB_REPLICA_MAX_WAIT_MS", wait_ms),
            ("METRICS_JWT_SECRET", SECRET),
        ],
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    while server.metric("walcast_replicas_usable").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "walcast never found the replica usable"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server
}

#[tokio::test]
async fn row_checks_run_on_a_caught_up_replica_and_each_user_sees_only_their_rows() {
    let db = TestDb::create("rep_serve").await;
    let replica = Replica::start();
    // A generous wait: on this machine replay is within milliseconds, but the test must not
    // depend on it.
    let server = start(&db, &replica, "2000").await;
    let sql = db.client().await;
    sql.batch_execute(SCHEMA).await.unwrap();
    let rsql = replica.client(&db).await;
    let calls_before = replica.check_calls(&rsql).await;
    let mut alice = subscribe(&server, 1).await;
    let mut bob = subscribe(&server, 2).await;
    const ROWS: i32 = 40;
    for i in 0..ROWS {
        let owner = user(if i % 2 == 0 { 1 } else { 2 });
        sql.execute(
            "INSERT INTO notes (owner, body) VALUES ($1::text::uuid, $2)",
            &[&owner, &format!("n{i}")],
        )
        .await
        .unwrap();
    }
    sql.execute("INSERT INTO marks VALUES (1)", &[])
        .await
        .unwrap();
    for (c, parity, who) in [(&mut alice, 0, "alice"), (&mut bob, 1, "bob")] {
        let got: Vec<String> = changes_until_mark(c, 1)
            .await
            .iter()
            .map(|d| d["record"]["body"].as_str().unwrap_or("?").to_owned())
            .collect();
        let want: Vec<String> = (0..ROWS)
            .filter(|i| i % 2 == parity)
            .map(|i| format!("n{i}"))
            .collect();
        assert_eq!(got, want, "{who} got exactly their own notes, in order");
    }
    // The replica served the checks: walcast says so, and so do the replica's own statistics.
    let on_replica = server.metric(ON_REPLICA).await;
    assert!(on_replica >= 1.0, "no batch was checked on the replica");
    // (Backends flush their statistics within a second or so of going idle.)
    let deadline = std::time::Instant::now() + WAIT;
    let calls = loop {
        let calls = replica.check_calls(&rsql).await - calls_before;
        if calls >= 1 {
            break calls;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica's statistics show no walcast.check_cohorts call"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    println!(
        "batches on the replica: {on_replica}, on the primary: {}; check_cohorts calls on the replica: {calls}",
        server.metric(ON_PRIMARY).await
    );
}

/// The case a lagging replica gets wrong: bob is a member of room 1 on the replica (replay
/// paused) but no longer on the primary when the message is updated. Asked, the replica would
/// let bob see the update (the row and his membership are there); walcast must not ask it.
#[tokio::test]
async fn a_replica_paused_before_a_revocation_is_not_asked_about_later_changes() {
    let db = TestDb::create("rep_behind").await;
    let replica = Replica::start();
    let server = start(&db, &replica, "200").await;
    let sql = db.client().await;
    sql.batch_execute(SCHEMA).await.unwrap();
    sql.batch_execute(&format!(
        "INSERT INTO members VALUES (1, '{}'), (1, '{}'); INSERT INTO msgs VALUES (1, 1, 'before');",
        user(1),
        user(2)
    ))
    .await
    .unwrap();
    let rsql = replica.client(&db).await;
    replica.wait_caught_up(&sql, &rsql).await;
    let mut alice = subscribe(&server, 1).await;
    let mut bob = subscribe(&server, 2).await;
    // Both see an update while the replica follows (checked on it).
    sql.execute("UPDATE msgs SET body = 'first' WHERE id = 1", &[])
        .await
        .unwrap();
    sql.execute("INSERT INTO marks VALUES (1)", &[])
        .await
        .unwrap();
    for c in [&mut alice, &mut bob] {
        let got = changes_until_mark(c, 1).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["record"]["body"], "first");
    }
    assert!(server.metric(ON_REPLICA).await >= 1.0);

    // The replica stops replaying; bob leaves the room, then the message changes.
    replica.wait_caught_up(&sql, &rsql).await;
    replica.pause(&rsql).await;
    let fallbacks = "walcast_replica_fallbacks_total{reason=\"behind\"}";
    let behind_before = server.metric(fallbacks).await;
    let primary_before = server.metric(ON_PRIMARY).await;
    sql.execute(
        "DELETE FROM members WHERE user_id = $1::text::uuid",
        &[&user(2)],
    )
    .await
    .unwrap();
    sql.execute("UPDATE msgs SET body = 'after' WHERE id = 1", &[])
        .await
        .unwrap();
    sql.execute("INSERT INTO marks VALUES (2)", &[])
        .await
        .unwrap();
    // The replica, asked now, would still say bob may read row 1.
    let bob_on_replica: i64 = {
        let q = format!(
            "BEGIN READ ONLY; SET LOCAL ROLE authenticated;
             SELECT set_config('request.jwt.claims', '{{\"sub\":\"{}\",\"role\":\"authenticated\"}}', true);
             SELECT count(*) FROM msgs WHERE id = 1; COMMIT;",
            user(2)
        );
        let rows = rsql.simple_query(&q).await.unwrap();
        rows.iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                _ => None,
            })
            .next_back()
            .unwrap_or(0)
    };
    assert_eq!(bob_on_replica, 1, "the paused replica would allow bob");
    let got = changes_until_mark(&mut alice, 2).await;
    assert_eq!(got.len(), 1, "alice, still a member, gets the update");
    assert_eq!(got[0]["record"]["body"], "after");
    let got = changes_until_mark(&mut bob, 2).await;
    assert!(
        got.is_empty(),
        "bob left the room before the update, but got {got:?}"
    );
    assert!(
        server.metric(fallbacks).await > behind_before,
        "the replica was not found behind"
    );
    assert!(server.metric(ON_PRIMARY).await > primary_before);

    // Replay resumes: the replica takes the checks again once it has caught up.
    replica.resume(&rsql).await;
    replica.wait_caught_up(&sql, &rsql).await;
    let deadline = std::time::Instant::now() + WAIT;
    let mut mark = 3;
    loop {
        let on_replica = server.metric(ON_REPLICA).await;
        sql.execute(
            "UPDATE msgs SET body = $1 WHERE id = 1",
            &[&format!("m{mark}")],
        )
        .await
        .unwrap();
        sql.execute("INSERT INTO marks VALUES ($1)", &[&mark])
            .await
            .unwrap();
        let got = changes_until_mark(&mut alice, mark).await;
        assert_eq!(got.len(), 1);
        assert!(changes_until_mark(&mut bob, mark).await.is_empty());
        if server.metric(ON_REPLICA).await > on_replica {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica was never used again after it caught up"
        );
        mark += 1;
    }
}

/// A check waiting on the replica (its replay paused, a long wait allowed) when the replica is
/// killed: the batch is checked on the primary, and later ones too. Nothing is lost, nothing
/// is sent that the primary would not allow.
#[tokio::test]
async fn a_replica_killed_during_a_check_loses_nothing() {
    let db = TestDb::create("rep_kill").await;
    let replica = Replica::start();
    let server = start(&db, &replica, "30000").await;
    let sql = db.client().await;
    sql.batch_execute(SCHEMA).await.unwrap();
    let rsql = replica.client(&db).await;
    let mut alice = subscribe(&server, 1).await;
    let mut bob = subscribe(&server, 2).await;
    let insert = |i: i32| {
        let owner = user(if i % 2 == 0 { 1 } else { 2 });
        let body = format!("n{i}");
        let sql = &sql;
        async move {
            sql.execute(
                "INSERT INTO notes (owner, body) VALUES ($1::text::uuid, $2)",
                &[&owner, &body],
            )
            .await
            .unwrap();
        }
    };
    for i in 0..10 {
        insert(i).await;
    }
    sql.execute("INSERT INTO marks VALUES (1)", &[])
        .await
        .unwrap();
    assert_eq!(changes_until_mark(&mut alice, 1).await.len(), 5);
    assert_eq!(changes_until_mark(&mut bob, 1).await.len(), 5);
    assert!(server.metric(ON_REPLICA).await >= 1.0);

    // A check in flight on the replica: replay paused, so it waits there for the commit.
    replica.wait_caught_up(&sql, &rsql).await;
    replica.pause(&rsql).await;
    let since: std::time::SystemTime = rsql
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0);
    insert(10).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let waiting: i64 = rsql
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'walcast_replica_checks'
                    AND query LIKE '%pg_last_wal_replay_lsn() > $1%' AND state_change > $1",
                &[&since],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let rows = rsql
                .query("SELECT application_name, state, query, state_change::text FROM pg_stat_activity WHERE backend_type = 'client backend'", &[])
                .await
                .unwrap();
            let seen: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{:?} {:?} {:?} {:?}",
                        r.get::<_, Option<String>>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, Option<String>>(2),
                        r.get::<_, Option<String>>(3)
                    )
                })
                .collect();
            panic!("no check ever waited on the replica (since {since:?}): {seen:#?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(rsql);
    replica.kill();
    for i in 11..40 {
        insert(i).await;
    }
    sql.execute("INSERT INTO marks VALUES (2)", &[])
        .await
        .unwrap();
    for (c, parity, who) in [(&mut alice, 0, "alice"), (&mut bob, 1, "bob")] {
        let got: Vec<String> = changes_until_mark(c, 2)
            .await
            .iter()
            .map(|d| d["record"]["body"].as_str().unwrap_or("?").to_owned())
            .collect();
        let want: Vec<String> = (10..40)
            .filter(|i| i % 2 == parity)
            .map(|i| format!("n{i}"))
            .collect();
        assert_eq!(got, want, "{who}: every own note after the kill, in order");
    }
    assert!(
        server
            .metric("walcast_replica_fallbacks_total{reason=\"unavailable\"}")
            .await
            >= 1.0
    );
    assert_eq!(server.metric("walcast_replicas_usable").await, 0.0);
}

/// A check cancelled on the replica by a recovery conflict (the replica replays an ACCESS
/// EXCLUSIVE lock on the table while the check reads it, and `max_standby_streaming_delay = 0`
/// cancels the reader at once) is answered by the primary: the row still reaches its owner.
#[tokio::test]
async fn a_check_cancelled_by_a_recovery_conflict_is_answered_by_the_primary() {
    let db = TestDb::create("rep_conflict").await;
    let replica = Replica::start_with(&["max_standby_streaming_delay=0"]);
    let server = start(&db, &replica, "2000").await;
    let sql = db.client().await;
    // Each lookup takes 0.5 s, so the check is still reading when the lock is replayed.
    sql.batch_execute(
        "CREATE FUNCTION slow_true() RETURNS boolean LANGUAGE plpgsql VOLATILE AS
           $$ BEGIN PERFORM pg_sleep(0.5); RETURN true; END $$;
         CREATE TABLE slow (id serial PRIMARY KEY, owner uuid NOT NULL, body text);
         ALTER TABLE slow ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON slow FOR SELECT TO authenticated
             USING (owner = auth.uid() AND slow_true());
         GRANT SELECT ON slow TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE slow;",
    )
    .await
    .unwrap();
    let rsql = replica.client(&db).await;
    replica.wait_caught_up(&sql, &rsql).await;
    let mut alice = server.connect(Vsn::V2, &user_token(1)).await;
    let (_, reply) = alice
        .join(
            "realtime:slow",
            json!({"config": {"postgres_changes": [{"event":"INSERT","schema":"public","table":"slow"}]}}),
        )
        .await;
    assert_eq!(reply.payload()["status"], "ok");
    alice.recv_until("system", |f| f.event() == "system").await;
    let conflicts = "walcast_replica_fallbacks_total{reason=\"conflict\"}";
    assert_eq!(server.metric(conflicts).await, 0.0);

    sql.execute(
        "INSERT INTO slow (owner, body) VALUES ($1::text::uuid, 'mine')",
        &[&user(1)],
    )
    .await
    .unwrap();
    // The check is running on the replica...
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let running: i64 = rsql
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'walcast_replica_checks' AND state = 'active'
                    AND query LIKE '%check_cohorts%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the check never ran on the replica"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // ...when the primary takes a lock the replica must replay: the replica cancels the check.
    sql.batch_execute("BEGIN; LOCK TABLE slow IN ACCESS EXCLUSIVE MODE; COMMIT;")
        .await
        .unwrap();
    let got = alice
        .recv_until("change", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(got.payload()["data"]["record"]["body"], "mine");
    assert!(
        server.metric(conflicts).await >= 1.0,
        "the check was not cancelled by a recovery conflict"
    );
    assert!(server.metric(ON_PRIMARY).await >= 1.0);
}
