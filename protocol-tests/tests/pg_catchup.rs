//! Catch-up on rejoin (RELIABILITY.md, "Catch-up on rejoin"): a socket that goes away without a
//! leave, rows committed meanwhile, and the same user rejoining the same topic with the same
//! bindings gets every one it missed, once, in commit order, authorized under its new token,
//! then live changes with no gap and no duplicate.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};
use tokio_postgres::Client as Sql;

const SCHEMA: &str = "
    CREATE TABLE members (room int, user_id text, PRIMARY KEY (room, user_id));
    CREATE TABLE gate (open bool);
    INSERT INTO gate VALUES (true);
    CREATE TABLE notes (id serial PRIMARY KEY, room int NOT NULL, k int NOT NULL);
    ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
    CREATE POLICY members ON notes FOR SELECT TO authenticated
        USING (EXISTS (SELECT 1 FROM members m WHERE m.room = notes.room
                       AND m.user_id = auth.jwt()->>'sub')
               AND EXISTS (SELECT 1 FROM gate WHERE open));
    GRANT SELECT ON notes, members, gate TO authenticated;
    ALTER PUBLICATION supabase_realtime ADD TABLE notes;
    INSERT INTO members VALUES (1, 'alice'), (2, 'alice');
";

fn alice() -> String {
    sign(json!({"role": "authenticated", "sub": "alice", "session_id": "s1", "exp": now() + 3600}))
}

fn bindings() -> Value {
    json!([{"event": "INSERT", "schema": "public", "table": "notes"}])
}

/// Joins `realtime:notes` and returns the "Subscribed to PostgreSQL" payload.
async fn subscribe(c: &mut protocol_tests::Client) -> Value {
    let (_, reply) = c
        .join(
            "realtime:notes",
            json!({"config": {"postgres_changes": bindings()}}),
        )
        .await;
    assert_eq!(reply.payload()["status"], "ok", "{reply:?}");
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(
        sys.payload()["message"],
        "Subscribed to PostgreSQL",
        "{sys:?}"
    );
    sys.payload().clone()
}

async fn insert(sql: &Sql, room: i32, k: i32) {
    sql.execute("INSERT INTO notes (room, k) VALUES ($1, $2)", &[&room, &k])
        .await
        .expect("insert a note");
}

/// The `k` of the next change on the socket.
async fn next_k(c: &mut protocol_tests::Client) -> i64 {
    let f = c
        .recv_until("a change", |f| {
            f.event() == "postgres_changes"
                || (f.event() == "system" && f.payload()["status"] == "error")
        })
        .await;
    assert_eq!(f.event(), "postgres_changes", "{f:?}");
    f.payload()["data"]["record"]["k"]
        .as_i64()
        .expect("k in the record")
}

/// Subscribes alice, sees `k` = 1 arrive, and makes the client's last message follow it.
async fn alice_sees_one(server: &Server, sql: &Sql) -> protocol_tests::Client {
    let mut c = server.connect(Vsn::V2, &alice()).await;
    subscribe(&mut c).await;
    insert(sql, 1, 1).await;
    assert_eq!(next_k(&mut c).await, 1);
    // The client's last message comes after it received 1: 1 counts as received.
    c.barrier().await;
    c
}

async fn setup(name: &str, env: &[(&str, &str)]) -> (TestDb, Server, Sql) {
    let db = TestDb::create(name).await;
    let server = Server::start_with_db(&db, env).await;
    let sql = db.client().await;
    sql.batch_execute(SCHEMA).await.expect("schema");
    (db, server, sql)
}

#[tokio::test]
async fn a_rejoin_gets_what_it_missed_once_in_order_then_live() {
    let (_db, server, sql) = setup("catchup", &[]).await;
    let c = alice_sees_one(&server, &sql).await;
    let refs = c.next_ref();
    drop(c); // the socket dies: no leave, no close frame
    for k in 2..=5 {
        insert(&sql, 1, k).await;
    }
    // supabase-js's own reconnect: its message refs go on.
    let mut c = server.connect(Vsn::V1, &alice()).await;
    c.set_next_ref(refs);
    let sys = subscribe(&mut c).await;
    assert_eq!(sys["catchup"]["status"], "resumed", "{sys}");
    for k in 2..=5 {
        assert_eq!(next_k(&mut c).await, k, "missed changes in commit order");
    }
    insert(&sql, 1, 6).await;
    assert_eq!(next_k(&mut c).await, 6, "then live");
    c.assert_no_more("postgres_changes", "the rejoined client")
        .await;
    // Another user with the same bindings is not a rejoin.
    let bob = sign(json!({"role": "authenticated", "sub": "bob", "exp": now() + 3600}));
    let mut b = server.connect(Vsn::V2, &bob).await;
    let sys = subscribe(&mut b).await;
    assert!(sys.get("catchup").is_none(), "{sys}");
}

#[tokio::test]
async fn a_change_committed_during_the_replay_arrives_once_after_it() {
    let (db, server, sql) = setup("catchup_race", &[]).await;
    let c = alice_sees_one(&server, &sql).await;
    let refs = c.next_ref();
    drop(c);
    insert(&sql, 1, 2).await;
    insert(&sql, 1, 3).await;
    // Hold the replay inside its row check: the policy reads `gate`.
    let mut lock = db.client().await;
    let tx = lock.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock gate");
    let mut c = server.connect(Vsn::V2, &alice()).await;
    c.set_next_ref(refs);
    subscribe(&mut c).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let waiting: i64 = sql
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replay never reached its row check"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Committed while the replay waits.
    insert(&sql, 1, 4).await;
    tx.commit().await.expect("release gate");
    for k in 2..=4 {
        assert_eq!(next_k(&mut c).await, k);
    }
    insert(&sql, 1, 5).await;
    assert_eq!(next_k(&mut c).await, 5);
    c.assert_no_more("postgres_changes", "the rejoined client")
        .await;
}

#[tokio::test]
async fn a_rejoin_gets_only_what_its_new_token_may_read() {
    let (_db, server, sql) = setup("catchup_revoked", &[]).await;
    let c = alice_sees_one(&server, &sql).await;
    let refs = c.next_ref();
    drop(c);
    insert(&sql, 2, 20).await;
    insert(&sql, 1, 2).await;
    insert(&sql, 2, 21).await;
    // Alice loses room 2 before she is back.
    sql.execute("DELETE FROM members WHERE room = 2", &[])
        .await
        .expect("revoke");
    let mut c = server.connect(Vsn::V2, &alice()).await;
    c.set_next_ref(refs);
    subscribe(&mut c).await;
    assert_eq!(next_k(&mut c).await, 2);
    insert(&sql, 1, 3).await;
    assert_eq!(next_k(&mut c).await, 3);
    c.assert_no_more("postgres_changes", "the revoked user")
        .await;
}

#[tokio::test]
async fn anonymous_subscribers_are_told_there_is_no_catch_up() {
    let (_db, server, sql) = setup("catchup_anon", &[]).await;
    sql.batch_execute("GRANT SELECT ON notes TO anon; CREATE POLICY anon ON notes FOR SELECT TO anon USING (true);")
        .await
        .expect("anon");
    let anon = sign(json!({"role": "anon", "exp": now() + 3600}));
    let mut c = server.connect(Vsn::V2, &anon).await;
    let sys = subscribe(&mut c).await;
    assert_eq!(sys["catchup"]["status"], "unavailable", "{sys}");
    assert!(
        sys["catchup"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no sub claim")),
        "{sys}"
    );
    c.barrier().await;
    let mut observer = server.connect(Vsn::V2, &anon).await;
    subscribe(&mut observer).await;
    drop(c);
    insert(&sql, 1, 2).await;
    // Delivered (to the observer) before the rejoin: only a replay could bring it.
    assert_eq!(next_k(&mut observer).await, 2);
    let mut c = server.connect(Vsn::V2, &anon).await;
    subscribe(&mut c).await;
    insert(&sql, 1, 3).await;
    assert_eq!(
        next_k(&mut c).await,
        3,
        "nothing replayed to an anonymous rejoin"
    );
}

#[tokio::test]
async fn a_gap_older_than_the_history_is_told() {
    // Room for about four changes.
    let (_db, server, sql) = setup("catchup_gap", &[("CATCHUP_HISTORY_BYTES", "1000")]).await;
    let c = alice_sees_one(&server, &sql).await;
    let refs = c.next_ref();
    drop(c);
    for k in 2..=12 {
        insert(&sql, 1, k).await;
    }
    let mut c = server.connect(Vsn::V2, &alice()).await;
    c.set_next_ref(refs);
    subscribe(&mut c).await;
    let gap = c
        .recv_until("the gap notice", |f| f.event() == "system")
        .await;
    assert_eq!(gap.payload()["status"], "error", "{gap:?}");
    assert_eq!(gap.payload()["gap"]["reason"], "catchup_history", "{gap:?}");
    // What the history still holds follows, in order, ending with the newest.
    let mut last = 0;
    while last < 12 {
        let k = next_k(&mut c).await;
        assert!(
            k > last && k > 1,
            "in order, nothing before the gap: {k} after {last}"
        );
        last = k;
    }
    c.assert_no_more("postgres_changes", "the rejoined client")
        .await;
}

#[tokio::test]
async fn catch_up_off_replays_nothing() {
    let (_db, server, sql) = setup("catchup_off", &[("CATCHUP_WINDOW_MS", "0")]).await;
    let c = alice_sees_one(&server, &sql).await;
    let refs = c.next_ref();
    let bob = sign(json!({"role": "authenticated", "sub": "bob", "exp": now() + 3600}));
    sql.execute("INSERT INTO members VALUES (1, 'bob')", &[])
        .await
        .expect("bob");
    let mut observer = server.connect(Vsn::V2, &bob).await;
    subscribe(&mut observer).await;
    drop(c);
    insert(&sql, 1, 2).await;
    assert_eq!(next_k(&mut observer).await, 2);
    let mut c = server.connect(Vsn::V2, &alice()).await;
    c.set_next_ref(refs);
    let sys = subscribe(&mut c).await;
    assert!(sys.get("catchup").is_none(), "{sys}");
    insert(&sql, 1, 3).await;
    assert_eq!(next_k(&mut c).await, 3);
}

#[tokio::test]
async fn a_rejoin_before_the_old_socket_is_noticed_resumes_from_it() {
    // A network blip: the client reconnects while walcast still holds the old socket (it would
    // only notice at the idle timeout). What went to the old socket after the client's last
    // message there is sent again on the new one.
    let (_db, server, sql) = setup("catchup_blip", &[]).await;
    let old = alice_sees_one(&server, &sql).await;
    let refs = old.next_ref();
    insert(&sql, 1, 2).await;
    insert(&sql, 1, 3).await;
    let mut c = server.connect(Vsn::V2, &alice()).await;
    c.set_next_ref(refs);
    let sys = subscribe(&mut c).await;
    assert_eq!(sys["catchup"]["status"], "resumed", "{sys}");
    assert_eq!(next_k(&mut c).await, 2);
    assert_eq!(next_k(&mut c).await, 3);
    insert(&sql, 1, 4).await;
    assert_eq!(next_k(&mut c).await, 4);
    c.assert_no_more("postgres_changes", "the rejoined client")
        .await;
    drop(old);
}

#[tokio::test]
async fn a_graceful_restart_keeps_positions_and_the_rejoin_gets_what_was_committed_meanwhile() {
    let (db, mut server, sql) = setup("catchup_restart", &[]).await;
    let mut c = alice_sees_one(&server, &sql).await;
    let refs = c.next_ref();
    server.terminate(); // SIGTERM: sockets closed with 1012, positions saved
    assert_eq!(c.closed().await.map(|(code, _)| code), Some(1012));
    assert!(server
        .wait_exit(std::time::Duration::from_secs(15))
        .await
        .success());
    insert(&sql, 1, 2).await;
    insert(&sql, 1, 3).await;
    let lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    // No grace period: the backlog streams before the client is back (without catch-up it would
    // be gone for it, with a "restart" gap notice).
    let server = Server::start_with_db(&db, &[]).await;
    protocol_tests::pg::wait_slot_confirmed(&sql, &format!("s_{}", db.name), &lsn).await;
    let mut c = server.connect(Vsn::V2, &alice()).await;
    c.set_next_ref(refs);
    let sys = subscribe(&mut c).await;
    assert_eq!(sys["catchup"]["status"], "resumed", "{sys}");
    assert_eq!(next_k(&mut c).await, 2);
    assert_eq!(next_k(&mut c).await, 3);
    insert(&sql, 1, 4).await;
    assert_eq!(next_k(&mut c).await, 4);
    let rest = c.barrier().await;
    assert!(
        rest.iter()
            .all(|f| f.event() != "postgres_changes" && f.event() != "system"),
        "no duplicate and no gap notice: {rest:?}"
    );
}

#[tokio::test]
async fn rejoins_waiting_together_are_served_together_each_exactly() {
    // A storm after a blip: while one replay is held in its row check, four more rejoins queue;
    // they are served in one turn, each with its own position, once each, in order.
    let (db, server, sql) = setup("catchup_storm", &[]).await;
    let users = ["u1", "u2", "u3", "u4", "u5"];
    let tok = |u: &str| sign(json!({"role": "authenticated", "sub": u, "exp": now() + 3600}));
    let mut olds = Vec::new();
    for u in users {
        sql.execute("INSERT INTO members VALUES (1, $1)", &[&u])
            .await
            .expect("member");
        let mut c = server.connect(Vsn::V2, &tok(u)).await;
        subscribe(&mut c).await;
        olds.push(c);
    }
    insert(&sql, 1, 1).await;
    for c in &mut olds {
        assert_eq!(next_k(c).await, 1);
        c.barrier().await;
    }
    let refs: Vec<u64> = olds.iter().map(|c| c.next_ref()).collect();
    drop(olds);
    insert(&sql, 1, 2).await;
    insert(&sql, 1, 3).await;
    let mut lock = db.client().await;
    let tx = lock.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock gate");
    let mut news = Vec::new();
    for (u, refs) in users.into_iter().zip(refs) {
        let mut c = server.connect(Vsn::V2, &tok(u)).await;
        c.set_next_ref(refs);
        let sys = subscribe(&mut c).await;
        assert_eq!(sys["catchup"]["status"], "resumed", "{sys}");
        news.push(c);
    }
    insert(&sql, 1, 4).await;
    tx.commit().await.expect("release gate");
    for c in &mut news {
        for k in 2..=4 {
            assert_eq!(next_k(c).await, k);
        }
    }
    insert(&sql, 1, 5).await;
    for c in &mut news {
        assert_eq!(next_k(c).await, 5);
        c.assert_no_more("postgres_changes", "a rejoined client")
            .await;
    }
}

#[tokio::test]
async fn a_new_page_with_the_same_token_starts_fresh() {
    // A reload: the same user, topic and bindings, but a new client whose refs start again at 1.
    // It loads the current data itself; replaying what the old page had may duplicate it.
    let (_db, server, sql) = setup("catchup_fresh", &[]).await;
    let c = alice_sees_one(&server, &sql).await;
    drop(c);
    insert(&sql, 1, 2).await;
    let mut c = server.connect(Vsn::V2, &alice()).await;
    let sys = subscribe(&mut c).await;
    assert_eq!(sys["catchup"]["status"], "fresh", "{sys}");
    assert!(
        sys["catchup"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("new client")),
        "{sys}"
    );
    insert(&sql, 1, 3).await;
    assert_eq!(next_k(&mut c).await, 3, "live only: 2 is not replayed");
    c.assert_no_more("postgres_changes", "the new page").await;
    // The old position is forgotten: a reconnect of this new page resumes from its own.
    let refs = c.next_ref();
    drop(c);
    insert(&sql, 1, 4).await;
    let mut c = server.connect(Vsn::V2, &alice()).await;
    c.set_next_ref(refs);
    let sys = subscribe(&mut c).await;
    assert_eq!(sys["catchup"]["status"], "resumed", "{sys}");
    assert_eq!(next_k(&mut c).await, 4);
    c.assert_no_more("postgres_changes", "the reconnected page")
        .await;
}

#[tokio::test]
async fn a_new_tab_while_the_old_one_is_open_starts_fresh() {
    // The old socket is still live (another tab, or a page whose socket walcast has not yet
    // noticed is gone): a new client's refs do not continue it, so nothing is replayed.
    let (_db, server, sql) = setup("catchup_fresh_live", &[]).await;
    let mut old = alice_sees_one(&server, &sql).await;
    insert(&sql, 1, 2).await;
    assert_eq!(next_k(&mut old).await, 2);
    let mut c = server.connect(Vsn::V1, &alice()).await;
    let sys = subscribe(&mut c).await;
    assert_eq!(sys["catchup"]["status"], "fresh", "{sys}");
    insert(&sql, 1, 3).await;
    assert_eq!(next_k(&mut c).await, 3, "live only");
    assert_eq!(next_k(&mut old).await, 3);
    c.assert_no_more("postgres_changes", "the new tab").await;
}

#[tokio::test]
async fn a_graceful_restart_keeps_the_old_sockets_ref_even_in_an_older_positions_table() {
    let (db, mut server, sql) = setup("catchup_restart_ref", &[]).await;
    // The table as a walcast before the ref was kept created it.
    sql.batch_execute(
        "CREATE TABLE walcast.catchup_positions (
             key text PRIMARY KEY, complete boolean NOT NULL, expires_at timestamptz NOT NULL)",
    )
    .await
    .expect("an older positions table");
    // Two sessions of alice: one reconnects (refs go on), one is a reloaded page (refs from 1).
    let tok = |s: &str| {
        sign(json!({"role": "authenticated", "sub": "alice", "session_id": s, "exp": now() + 3600}))
    };
    let mut olds = Vec::new();
    for s in ["s1", "s2"] {
        let mut c = server.connect(Vsn::V2, &tok(s)).await;
        subscribe(&mut c).await;
        olds.push(c);
    }
    insert(&sql, 1, 1).await;
    for c in &mut olds {
        assert_eq!(next_k(c).await, 1);
        c.barrier().await;
    }
    let refs = olds[0].next_ref();
    server.terminate();
    for c in &mut olds {
        assert_eq!(c.closed().await.map(|(code, _)| code), Some(1012));
    }
    assert!(server
        .wait_exit(std::time::Duration::from_secs(15))
        .await
        .success());
    insert(&sql, 1, 2).await;
    let lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let server = Server::start_with_db(&db, &[]).await;
    protocol_tests::pg::wait_slot_confirmed(&sql, &format!("s_{}", db.name), &lsn).await;
    let mut c = server.connect(Vsn::V2, &tok("s1")).await;
    c.set_next_ref(refs);
    let sys = subscribe(&mut c).await;
    assert_eq!(sys["catchup"]["status"], "resumed", "{sys}");
    assert_eq!(next_k(&mut c).await, 2);
    let mut page = server.connect(Vsn::V2, &tok("s2")).await;
    let sys = subscribe(&mut page).await;
    assert_eq!(sys["catchup"]["status"], "fresh", "{sys}");
    // Like any new subscriber after a restart whose backlog went out before it joined.
    let gap = page
        .recv_until("the restart gap notice", |f| f.event() == "system")
        .await;
    assert_eq!(gap.payload()["gap"]["reason"], "restart", "{gap:?}");
    insert(&sql, 1, 3).await;
    assert_eq!(
        next_k(&mut page).await,
        3,
        "2 is not replayed to the new page"
    );
    assert_eq!(next_k(&mut c).await, 3);
    page.assert_no_more("postgres_changes", "the new page")
        .await;
}
