//! Cluster mode and postgres_changes: one node streams the slot (elected through a PostgreSQL
//! advisory lock), every node's subscribers get the changes, filtered and authorized on their
//! own node; when the slot holder is killed, another takes over and nothing committed is lost
//! or repeated at the surviving subscribers.

use std::collections::BTreeMap;
use std::time::Duration;

use protocol_tests::nats::{Nats, Proxy};
use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::Value;

async fn pg_node(db: &TestDb, nats_url: &str, name: &str, timeout_ms: &str) -> Server {
    Server::start_with_db(
        db,
        &[
            ("CLUSTER_NATS_URL", nats_url),
            ("NODE_NAME", name),
            ("CLUSTER_HEARTBEAT_MS", "100"),
            ("CLUSTER_NODE_TIMEOUT_MS", timeout_ms),
            ("METRICS_JWT_SECRET", SECRET),
        ],
    )
    .await
}

async fn health(server: &Server) -> Value {
    let (status, _, body) = http(
        "GET",
        &server.http("/api/tenants/t/health"),
        &[("authorization", &format!("Bearer {}", token("anon")))],
        b"",
    )
    .await;
    // 503 while the node does not receive the change stream yet.
    assert!(status == 200 || status == 503, "{status}");
    json_body(&body)["data"].clone()
}

/// Waits until `server` knows a slot holder (for a follower: it receives the holder's
/// stream); returns its name and this node's role.
async fn holder(server: &Server) -> (String, String) {
    let started = tokio::time::Instant::now();
    loop {
        let h = health(server).await;
        if let Some(name) = h["slot"]["holder"].as_str() {
            return (
                name.to_owned(),
                h["slot"]["role"].as_str().unwrap_or("").to_owned(),
            );
        }
        assert!(started.elapsed() < WAIT, "no slot holder known: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `ticks` readable by anon only where `k` is even (row-level security).
async fn create_even_ticks(db: &TestDb) -> tokio_postgres::Client {
    let sql = db.client().await;
    pg::create_ticks(&sql).await;
    sql.batch_execute(
        "ALTER TABLE ticks ENABLE ROW LEVEL SECURITY;
         CREATE POLICY even ON ticks FOR SELECT TO anon USING (k % 2 = 0);",
    )
    .await
    .expect("policy");
    sql
}

/// walsenders of this test's database (walcast streams with application_name
/// walcast_replication).
async fn walsenders(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' AND datname = current_database()",
        &[],
    )
    .await
    .expect("count walsenders")
    .get(0)
}

fn k_of(f: &Frame) -> Option<i64> {
    (f.event() == "postgres_changes").then(|| f.payload()["data"]["record"]["k"].as_i64())?
}

/// Reads postgres_changes until `last` arrives; returns every k received, in order.
async fn ks_until(c: &mut Client, last: i64) -> Vec<i64> {
    let mut ks = Vec::new();
    loop {
        let f = c.recv().await;
        assert!(!matches!(f, Frame::Close(_)), "socket closed");
        if let Some(k) = k_of(&f) {
            ks.push(k);
            if k == last {
                return ks;
            }
        }
    }
}

#[tokio::test]
async fn subscribers_on_every_node_get_each_change_once_authorized_on_their_node() {
    let nats = Nats::start().await;
    let db = TestDb::create("cluster_pg").await;
    let a = pg_node(&db, &nats.url(), "a", "1000").await;
    let sql = create_even_ticks(&db).await;
    let b = pg_node(&db, &nats.url(), "b", "1000").await;
    let c = pg_node(&db, &nats.url(), "c", "1000").await;
    // a started first and took the slot; b and c follow it.
    let mut roles = BTreeMap::new();
    for (name, node) in [("a", &a), ("b", &b), ("c", &c)] {
        let (h, role) = holder(node).await;
        assert_eq!(h, "a", "node {name} names the holder");
        roles.insert(name, role);
    }
    assert_eq!(roles["a"], "holder");
    assert_eq!(
        (roles["b"].as_str(), roles["c"].as_str()),
        ("follower", "follower")
    );

    let mut clients = Vec::new();
    for node in [&a, &b, &c] {
        clients.push(pg::subscribe_to_ticks(node).await.0);
    }
    for k in 1..=40 {
        pg::insert_tick(&sql, k).await;
    }
    // Only the even rows (RLS for anon, checked on each node), each once, in commit order.
    let want: Vec<i64> = (1..=40).filter(|k| k % 2 == 0).collect();
    for (name, client) in ["a", "b", "c"].iter().zip(clients.iter_mut()) {
        assert_eq!(ks_until(client, 40).await, want, "node {name}");
    }
    // One walsender for the slot, however many nodes.
    assert_eq!(walsenders(&sql).await, 1);
    pg::insert_tick(&sql, 42).await;
    for (name, client) in ["a", "b", "c"].iter().zip(clients.iter_mut()) {
        assert_eq!(
            ks_until(client, 42).await,
            vec![42],
            "node {name}: no duplicate"
        );
    }
    assert_eq!(walsenders(&sql).await, 1);
    let text = a.metrics(&token("anon")).await;
    assert!(text.lines().any(|l| l == "walcast_slot_holder 1"), "{text}");
    let text = b.metrics(&token("anon")).await;
    assert!(text.lines().any(|l| l == "walcast_slot_holder 0"), "{text}");
}

/// The slot holder is cut off from NATS (what it streams no longer reaches the others) while
/// rows are written at a steady pace, then killed (SIGKILL). Another node takes the slot over,
/// and every committed row reaches the subscribers on the surviving nodes exactly once: the
/// holder never confirmed to the slot past what the other nodes had delivered.
#[tokio::test]
async fn killing_the_slot_holder_under_load_loses_nothing_at_the_surviving_subscribers() {
    let nats = Nats::start().await;
    let proxy = Proxy::start(nats.port).await;
    let db = TestDb::create("cluster_pg_kill").await;
    // a, the first node, holds the slot; it reaches NATS through the proxy.
    let mut a = pg_node(&db, &proxy.url(), "a", "4000").await;
    let sql = db.client().await;
    pg::create_ticks(&sql).await;
    let b = pg_node(&db, &nats.url(), "b", "4000").await;
    let c = pg_node(&db, &nats.url(), "c", "4000").await;
    for node in [&a, &b, &c] {
        assert_eq!(holder(node).await.0, "a");
    }
    let mut ca = pg::subscribe_to_ticks(&a).await.0;
    let mut cb = pg::subscribe_to_ticks(&b).await.0;
    let mut cc = pg::subscribe_to_ticks(&c).await.0;

    // A steady writer: one row every 5 ms until told to stop; returns the rows committed.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer_sql = db.client().await;
    let writer = tokio::spawn(async move {
        let mut k = 0;
        while !*stop_rx.borrow() {
            k += 1;
            writer_sql
                .execute("INSERT INTO ticks (k) VALUES ($1)", &[&k])
                .await
                .expect("insert");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        k
    });
    // Flowing everywhere.
    for client in [&mut ca, &mut cb, &mut cc] {
        client
            .recv_until("a first row", |f| k_of(f).is_some_and(|k| k >= 20))
            .await;
    }
    // The holder loses NATS: it keeps streaming (and delivering to its own subscriber), but
    // the others get nothing more from it.
    proxy.partition();
    let cut_at = {
        // Whatever a has delivered by now, plus 40 more rows it streams alone.
        let f = ca.recv_until("a row on a", |f| k_of(f).is_some()).await;
        k_of(&f).unwrap_or(0)
    };
    ca.recv_until("rows streamed by a alone", |f| {
        k_of(f).is_some_and(|k| k >= cut_at + 40)
    })
    .await;
    // The interleaving this test forces, not a wait for an event: a window (well inside the
    // node timeout) in which a holder that confirmed its own delivery would have sent two
    // status updates (one each 100 ms) for rows the other nodes never got.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let killed = tokio::time::Instant::now();
    a.kill().await;
    // b or c takes the slot over.
    let new_holder = loop {
        let (hb, role_b) = holder(&b).await;
        if hb != "a" {
            let (hc, _) = holder(&c).await;
            if hc == hb {
                assert!(role_b == "holder" || hb == "c");
                break hb;
            }
        }
        assert!(killed.elapsed() < WAIT, "no takeover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let takeover = killed.elapsed();
    println!(
        "takeover: {new_holder} holds the slot {} ms after the holder was killed",
        takeover.as_millis()
    );
    assert!(
        takeover < Duration::from_secs(5),
        "takeover took {takeover:?}"
    );
    // Writes go on a while under the new holder, then stop.
    cb.recv_until("rows after the takeover", |f| {
        k_of(f).is_some_and(|k| k > cut_at + 100)
    })
    .await;
    stop_tx.send_replace(true);
    let last = writer.await.expect("writer");
    // Every committed row at every surviving subscriber, once, in commit order.
    for (name, client) in [("b", &mut cb), ("c", &mut cc)] {
        let mut seen: Vec<i64> = Vec::new();
        // What was read before (the probes above) is re-counted from the raw frames.
        for raw in client.raw.iter() {
            if let Ok(v) = serde_json::from_str::<Value>(raw) {
                let payload = if v.is_array() { &v[4] } else { &v["payload"] };
                let event = if v.is_array() { &v[3] } else { &v["event"] };
                if event == "postgres_changes" {
                    if let Some(k) = payload["data"]["record"]["k"].as_i64() {
                        seen.push(k);
                    }
                }
            }
        }
        if seen.last() != Some(&i64::from(last)) {
            seen.extend(ks_until(client, i64::from(last)).await);
        }
        let want: Vec<i64> = (1..=i64::from(last)).collect();
        assert_eq!(
            seen.len(),
            want.len(),
            "node {name}: {} rows of {last}",
            seen.len()
        );
        assert_eq!(seen, want, "node {name}: every row once, in order");
        client
            .assert_no_more("postgres_changes", &format!("node {name} (a duplicate)"))
            .await;
    }
    assert_eq!(walsenders(&sql).await, 1);
    drop(proxy);
}

/// A node cut off from NATS misses what the slot holder streams meanwhile: once back, its
/// subscribed channels are told (a `system` message, gap reason `cluster_lost`) rather than
/// left silent, and later changes reach them again.
#[tokio::test]
async fn a_node_that_missed_the_holders_stream_tells_its_channels() {
    let nats = Nats::start().await;
    let proxy = Proxy::start(nats.port).await;
    let db = TestDb::create("cluster_pg_gap").await;
    let a = pg_node(&db, &nats.url(), "a", "1000").await;
    let sql = db.client().await;
    pg::create_ticks(&sql).await;
    // b reaches NATS through the proxy.
    let b = pg_node(&db, &proxy.url(), "b", "1000").await;
    assert_eq!(holder(&a).await.0, "a");
    assert_eq!(holder(&b).await.0, "a");
    let mut cb = pg::subscribe_to_ticks(&b).await.0;
    pg::insert_tick(&sql, 1).await;
    assert_eq!(ks_until(&mut cb, 1).await, vec![1]);
    proxy.partition();
    // Rows b cannot get; a goes on streaming them.
    for k in 2..=5 {
        pg::insert_tick(&sql, k).await;
    }
    proxy.heal();
    let f = cb
        .recv_until("the gap notice", |f| {
            f.event() == "system" && f.payload()["gap"]["reason"] == "cluster_lost"
        })
        .await;
    assert_eq!(f.payload()["extension"], "postgres_changes");
    assert_eq!(f.payload()["status"], "error");
    // Later changes arrive again (b follows the holder anew).
    let started = tokio::time::Instant::now();
    let mut k = 100;
    loop {
        pg::insert_tick(&sql, k).await;
        let got = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                if k_of(&cb.recv().await) == Some(i64::from(k)) {
                    return;
                }
            }
        })
        .await;
        if got.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "no change reached b after the gap"
        );
        k += 1;
    }
}

/// Catch-up on rejoin works on a node that receives the stream from the holder: a socket on a
/// follower that dies without a leave and rejoins there gets what it missed, once, in order,
/// then live changes.
#[tokio::test]
async fn a_rejoin_on_a_follower_catches_up() {
    let nats = Nats::start().await;
    let db = TestDb::create("cluster_pg_catchup").await;
    let a = pg_node(&db, &nats.url(), "a", "1000").await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE notes (id serial PRIMARY KEY, k int NOT NULL);
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON notes FOR SELECT TO authenticated USING (auth.jwt()->>'sub' = 'alice');
         GRANT SELECT ON notes TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE notes;",
    )
    .await
    .expect("schema");
    let b = pg_node(&db, &nats.url(), "b", "1000").await;
    assert_eq!(holder(&a).await, ("a".to_owned(), "holder".to_owned()));
    assert_eq!(holder(&b).await, ("a".to_owned(), "follower".to_owned()));
    let alice = sign(
        serde_json::json!({"role": "authenticated", "sub": "alice", "session_id": "s1", "exp": now() + 3600}),
    );
    let config = serde_json::json!({"config": {"postgres_changes":
        [{"event": "INSERT", "schema": "public", "table": "notes"}]}});
    async fn subscribed(c: &mut Client, config: &Value) -> Value {
        let (_, reply) = c.join("realtime:notes", config.clone()).await;
        assert_eq!(reply.payload()["status"], "ok", "{reply:?}");
        let sys = c.recv_until("system", |f| f.event() == "system").await;
        assert_eq!(sys.payload()["message"], "Subscribed to PostgreSQL");
        sys.payload().clone()
    }
    let insert = |k: i32| {
        let sql = &sql;
        async move {
            sql.execute("INSERT INTO notes (k) VALUES ($1)", &[&k])
                .await
                .expect("insert");
        }
    };
    let mut c = b.connect(Vsn::V2, &alice).await;
    subscribed(&mut c, &config).await;
    insert(1).await;
    assert_eq!(ks_until(&mut c, 1).await, vec![1]);
    c.barrier().await;
    let refs = c.next_ref();
    drop(c); // no leave, no close frame
    for k in 2..=5 {
        insert(k).await;
    }
    let mut c = b.connect(Vsn::V1, &alice).await;
    c.set_next_ref(refs);
    let sys = subscribed(&mut c, &config).await;
    assert_eq!(sys["catchup"]["status"], "resumed", "{sys}");
    assert_eq!(ks_until(&mut c, 5).await, vec![2, 3, 4, 5]);
    insert(6).await;
    assert_eq!(ks_until(&mut c, 6).await, vec![6]);
    c.assert_no_more("postgres_changes", "the rejoined client")
        .await;
}

/// A broadcast from the database (`realtime.send`) with every node reading the stream: sent on
/// by the node that streams the slot only, so a subscriber on each node gets it once.
#[tokio::test]
async fn a_broadcast_from_the_database_reaches_each_node_once() {
    let nats = Nats::start().await;
    let db = TestDb::create("cluster_pg_dbb").await;
    let a = pg_node(&db, &nats.url(), "a", "1000").await;
    let b = pg_node(&db, &nats.url(), "b", "1000").await;
    let c = pg_node(&db, &nats.url(), "c", "1000").await;
    for node in [&a, &b, &c] {
        assert_eq!(holder(node).await.0, "a");
    }
    let topic = "realtime:dbroom";
    let mut clients = Vec::new();
    for node in [&a, &b, &c] {
        let mut cl = node.connect(Vsn::V2, &token("anon")).await;
        cl.join_ok(topic, serde_json::json!({})).await;
        clients.push(cl);
    }
    let sql = db.client().await;
    // Until every node follows the topic on NATS, a broadcast may miss one: send numbered ones
    // until one reaches all three, then one more that must arrive once everywhere.
    let send = |n: i64| {
        let sql = &sql;
        async move {
            sql.execute(
                "SELECT realtime.send(jsonb_build_object('n', $1::int8), 'ev', 'dbroom', false)",
                &[&n],
            )
            .await
            .expect("realtime.send");
        }
    };
    let n_of = |f: &Frame| match f {
        Frame::Binary { event, payload, .. } if event == "ev" => {
            serde_json::from_slice::<Value>(payload).ok()?["n"].as_i64()
        }
        _ => None,
    };
    let started = tokio::time::Instant::now();
    let mut probe = 0;
    'probing: loop {
        probe += 1;
        send(probe).await;
        for cl in clients.iter_mut() {
            let got = tokio::time::timeout(Duration::from_millis(300), async {
                loop {
                    if n_of(&cl.recv().await) == Some(probe) {
                        return;
                    }
                }
            })
            .await;
            if got.is_err() {
                assert!(
                    started.elapsed() < WAIT,
                    "a broadcast never reached every node"
                );
                continue 'probing;
            }
        }
        break;
    }
    send(1000).await;
    for (name, cl) in ["a", "b", "c"].iter().zip(clients.iter_mut()) {
        cl.recv_until("the broadcast", |f| n_of(f) == Some(1000))
            .await;
        let more: Vec<Frame> = cl.barrier().await;
        assert!(
            more.iter().all(|f| n_of(f) != Some(1000)),
            "node {name} got the broadcast twice: {more:?}"
        );
    }
}

/// A rolling restart: the slot holder stopped gracefully (SIGTERM) under a steady write load;
/// the other node takes over and its subscriber gets every committed row once.
#[tokio::test]
async fn stopping_the_slot_holder_gracefully_hands_the_slot_over_losing_nothing() {
    let nats = Nats::start().await;
    let db = TestDb::create("cluster_pg_term").await;
    let mut a = pg_node(&db, &nats.url(), "a", "1000").await;
    let sql = db.client().await;
    pg::create_ticks(&sql).await;
    let b = pg_node(&db, &nats.url(), "b", "1000").await;
    assert_eq!(holder(&b).await.0, "a");
    let mut cb = pg::subscribe_to_ticks(&b).await.0;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer_sql = db.client().await;
    let writer = tokio::spawn(async move {
        let mut k = 0;
        while !*stop_rx.borrow() {
            k += 1;
            writer_sql
                .execute("INSERT INTO ticks (k) VALUES ($1)", &[&k])
                .await
                .expect("insert");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        k
    });
    cb.recv_until("rows via a", |f| k_of(f).is_some_and(|k| k >= 30))
        .await;
    a.terminate();
    a.wait_exit(WAIT).await;
    let started = tokio::time::Instant::now();
    loop {
        let (h, role) = holder(&b).await;
        if h == "b" && role == "holder" {
            break;
        }
        assert!(started.elapsed() < WAIT, "b never took the slot over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = sql
        .query_one("SELECT max(k) FROM ticks", &[])
        .await
        .expect("max k")
        .get::<_, Option<i32>>(0)
        .unwrap_or(0);
    cb.recv_until("rows via b", |f| {
        k_of(f).is_some_and(|k| k > i64::from(after) + 20)
    })
    .await;
    stop_tx.send_replace(true);
    let last = i64::from(writer.await.expect("writer"));
    let mut seen = Vec::new();
    for raw in cb.raw.iter() {
        if let Ok(v) = serde_json::from_str::<Value>(raw) {
            if v[3] == "postgres_changes" {
                if let Some(k) = v[4]["data"]["record"]["k"].as_i64() {
                    seen.push(k);
                }
            }
        }
    }
    if seen.last() != Some(&last) {
        seen.extend(ks_until(&mut cb, last).await);
    }
    assert_eq!(
        seen,
        (1..=last).collect::<Vec<_>>(),
        "every row once, in order"
    );
}

/// How the node a subscriber was on goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeEnd {
    /// SIGKILL: its last published positions (at most a second old) are what others know;
    /// the client rejoins once the others have found it gone (`CLUSTER_NODE_TIMEOUT_MS`).
    Killed,
    /// SIGKILL, and the client rejoins before the others have noticed.
    KilledNotYetNoticed,
    /// SIGTERM: it publishes its positions as it goes.
    Stopped,
}

/// `notes`, readable by alice only, in the publication.
async fn create_notes(sql: &tokio_postgres::Client) {
    sql.batch_execute(
        "CREATE TABLE notes (id serial PRIMARY KEY, k int NOT NULL);
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON notes FOR SELECT TO authenticated USING (auth.jwt()->>'sub' = 'alice');
         GRANT SELECT ON notes TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE notes;",
    )
    .await
    .expect("schema");
}

/// Joins `realtime:notes` and returns the payload of "Subscribed to PostgreSQL".
async fn subscribed_to_notes(c: &mut Client) -> Value {
    let config = serde_json::json!({"config": {"postgres_changes":
        [{"event": "INSERT", "schema": "public", "table": "notes"}]}});
    let (_, reply) = c.join("realtime:notes", config).await;
    assert_eq!(reply.payload()["status"], "ok", "{reply:?}");
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(sys.payload()["message"], "Subscribed to PostgreSQL");
    sys.payload().clone()
}

/// The value of a gauge in a node's metrics (0 when absent).
async fn gauge(server: &Server, name: &str) -> f64 {
    let text = server.metrics(&token("anon")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A subscriber on node b (or on the slot holder a: `on_holder`), whose node goes (`end`) while
/// a writer commits, rejoins on node c continuing its message refs (as supabase-js does):
/// resumed there, it gets every row committed after the last one it had received, in order,
/// and live ones after; rows the old node sent after the client's last message there may come
/// again (RELIABILITY.md, "Several nodes"), nothing else. A new page (refs from 1) on the third
/// node is fresh.
async fn a_subscriber_whose_node_goes_resumes_on_another(
    end: NodeEnd,
    on_holder: bool,
    db_name: &str,
) {
    let nats = Nats::start().await;
    let db = TestDb::create(db_name).await;
    let a = pg_node(&db, &nats.url(), "a", "1000").await;
    let sql = db.client().await;
    create_notes(&sql).await;
    let b = pg_node(&db, &nats.url(), "b", "1000").await;
    let c = pg_node(&db, &nats.url(), "c", "1000").await;
    for node in [&a, &b, &c] {
        assert_eq!(holder(node).await.0, "a");
    }
    // The subscriber's node (the slot holder a, or the follower b) goes; it rejoins on c; a new
    // page opens on the remaining one.
    let (mut gone, gone_name, to, third) = if on_holder {
        (a, "a", c, b)
    } else {
        (b, "b", c, a)
    };
    let alice = sign(
        serde_json::json!({"role": "authenticated", "sub": "alice", "session_id": "s1", "exp": now() + 3600}),
    );
    let mut cl = gone.connect(Vsn::V2, &alice).await;
    let sys = subscribed_to_notes(&mut cl).await;
    assert_eq!(sys.get("catchup"), None, "a new subscriber: {sys}");
    for k in 1..=5 {
        sql.execute("INSERT INTO notes (k) VALUES ($1)", &[&k])
            .await
            .expect("insert");
    }
    assert_eq!(ks_until(&mut cl, 5).await, vec![1, 2, 3, 4, 5]);
    cl.barrier().await;
    // c has heard of b's positions (published every second).
    let started = tokio::time::Instant::now();
    while gauge(&to, "walcast_catchup_cluster_positions").await < 1.0 {
        assert!(
            started.elapsed() < WAIT,
            "c never heard of the positions of {gone_name}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer_sql = db.client().await;
    let writer = tokio::spawn(async move {
        let mut k = 5;
        while !*stop_rx.borrow() {
            k += 1;
            writer_sql
                .execute("INSERT INTO notes (k) VALUES ($1)", &[&k])
                .await
                .expect("insert");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        k
    });
    // Rows arrive from the old node while the writer runs; then it goes.
    let mut received = 5;
    while received < 10 {
        let f = cl.recv().await;
        if let Some(k) = k_of(&f) {
            assert_eq!(k, received + 1, "in order from the old node");
            received = k;
        }
    }
    let refs = cl.next_ref();
    match end {
        NodeEnd::KilledNotYetNoticed => gone.kill().await,
        NodeEnd::Killed => {
            gone.kill().await;
            let started = tokio::time::Instant::now();
            while health(&to).await["cluster"]["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|n| n == gone_name))
            {
                assert!(started.elapsed() < WAIT, "c never found {gone_name} gone");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        NodeEnd::Stopped => {
            gone.terminate();
            gone.wait_exit(WAIT).await;
        }
    }
    // What b had pushed before it went counts as received (the client read it).
    let mut last_received = received;
    loop {
        let f = cl.recv().await;
        if matches!(f, Frame::Close(_)) {
            break;
        }
        if let Some(k) = k_of(&f) {
            assert_eq!(k, last_received + 1, "in order from the old node");
            last_received = k;
        }
    }
    drop(cl);
    let mut cl = to.connect(Vsn::V1, &alice).await;
    cl.set_next_ref(refs);
    let sys = subscribed_to_notes(&mut cl).await;
    assert_eq!(sys["catchup"]["status"], "resumed", "{sys}");
    // Live rows arrive on c, then the writer stops.
    let mut got = Vec::new();
    loop {
        let f = cl.recv().await;
        assert!(!matches!(f, Frame::Close(_)), "socket closed");
        if let Some(k) = k_of(&f) {
            got.push(k);
            if k > last_received + 20 {
                break;
            }
        }
    }
    stop_tx.send_replace(true);
    let last = i64::from(writer.await.expect("writer"));
    if got.last() != Some(&last) {
        got.extend(ks_until(&mut cl, last).await);
    }
    let first = got.first().copied().unwrap_or(0);
    assert!(
        (1..=last_received + 1).contains(&first),
        "resumed at or before the first row it had not received ({last_received}): {got:?}"
    );
    assert_eq!(
        got,
        (first..=last).collect::<Vec<_>>(),
        "every row after the position once, in order"
    );
    if end == NodeEnd::Stopped {
        // Its sockets were flushed and their positions published once closed: nothing twice.
        assert_eq!(
            first,
            last_received + 1,
            "nothing again after a graceful stop"
        );
    }
    eprintln!(
        "{end:?}: had received up to {last_received}; c replayed from {first} (again: {})",
        last_received + 1 - first
    );
    cl.assert_no_more("postgres_changes", "the rejoined client")
        .await;
    // A new page of the same user (its refs start again) is not a rejoin.
    let mut page = third.connect(Vsn::V2, &alice).await;
    let sys = subscribed_to_notes(&mut page).await;
    assert_eq!(sys["catchup"]["status"], "fresh", "{sys}");
}

#[tokio::test]
async fn a_subscriber_whose_node_is_killed_resumes_on_another_node() {
    a_subscriber_whose_node_goes_resumes_on_another(NodeEnd::Killed, false, "cluster_pg_move_kill")
        .await;
}

#[tokio::test]
async fn a_subscriber_whose_node_is_stopped_resumes_on_another_node() {
    a_subscriber_whose_node_goes_resumes_on_another(
        NodeEnd::Stopped,
        false,
        "cluster_pg_move_term",
    )
    .await;
}

#[tokio::test]
async fn a_subscriber_whose_node_is_killed_resumes_on_another_node_before_it_is_noticed() {
    a_subscriber_whose_node_goes_resumes_on_another(
        NodeEnd::KilledNotYetNoticed,
        false,
        "cluster_pg_move_blip",
    )
    .await;
}

/// The same with the subscriber on the slot holder: another node takes the slot over meanwhile.
#[tokio::test]
async fn a_subscriber_on_the_slot_holder_killed_resumes_on_another_node() {
    a_subscriber_whose_node_goes_resumes_on_another(
        NodeEnd::Killed,
        true,
        "cluster_pg_move_holder",
    )
    .await;
}

/// A rejoin on another node whose history no longer holds part of what the client missed is
/// told (the same gap notice as on one node), then gets what is still held, in order.
#[tokio::test]
async fn a_rejoin_on_another_node_past_its_history_is_told_of_the_gap() {
    let nats = Nats::start().await;
    let db = TestDb::create("cluster_pg_move_gap").await;
    let a = pg_node(&db, &nats.url(), "a", "1000").await;
    let sql = db.client().await;
    create_notes(&sql).await;
    let mut b = pg_node(&db, &nats.url(), "b", "1000").await;
    // c's history has room for about four changes.
    let c = Server::start_with_db(
        &db,
        &[
            ("CLUSTER_NATS_URL", &nats.url()),
            ("NODE_NAME", "c"),
            ("CLUSTER_HEARTBEAT_MS", "100"),
            ("CLUSTER_NODE_TIMEOUT_MS", "1000"),
            ("METRICS_JWT_SECRET", SECRET),
            ("CATCHUP_HISTORY_BYTES", "1000"),
        ],
    )
    .await;
    for node in [&a, &b, &c] {
        assert_eq!(holder(node).await.0, "a");
    }
    let alice =
        sign(serde_json::json!({"role": "authenticated", "sub": "alice", "exp": now() + 3600}));
    let mut cl = b.connect(Vsn::V2, &alice).await;
    subscribed_to_notes(&mut cl).await;
    let insert = |k: i32| {
        let sql = &sql;
        async move {
            sql.execute("INSERT INTO notes (k) VALUES ($1)", &[&k])
                .await
                .expect("insert");
        }
    };
    insert(1).await;
    assert_eq!(ks_until(&mut cl, 1).await, vec![1]);
    cl.barrier().await;
    let started = tokio::time::Instant::now();
    while gauge(&c, "walcast_catchup_cluster_positions").await < 1.0 {
        assert!(started.elapsed() < WAIT, "c never heard of b's positions");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refs = cl.next_ref();
    b.kill().await;
    drop(cl);
    for k in 2..=12 {
        insert(k).await;
    }
    let mut cl = c.connect(Vsn::V2, &alice).await;
    cl.set_next_ref(refs);
    let sys = subscribed_to_notes(&mut cl).await;
    assert_eq!(sys["catchup"]["status"], "resumed", "{sys}");
    let gap = cl
        .recv_until("the gap notice", |f| f.event() == "system")
        .await;
    assert_eq!(gap.payload()["status"], "error", "{gap:?}");
    assert_eq!(gap.payload()["gap"]["reason"], "catchup_history", "{gap:?}");
    // What c's history still holds follows, in order, ending with the newest.
    let got = ks_until(&mut cl, 12).await;
    assert!(
        got.windows(2).all(|w| w[0] < w[1]) && got.first().is_some_and(|k| *k > 1),
        "in order, nothing before the gap: {got:?}"
    );
    cl.assert_no_more("postgres_changes", "the rejoined client")
        .await;
}
