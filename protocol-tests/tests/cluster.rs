//! Cluster mode: walcast nodes behind a real nats-server on loopback (CLUSTER_NATS_URL).
//! Broadcast and presence across nodes, NATS restarted under load, a node cut off from NATS.
//!
//! A node subscribes to a topic's subject when the topic's first local subscriber joins; until
//! that subscription is in place, messages from other nodes do not reach it. Tests wait for it
//! with probes (a broadcast sent until one arrives), never with a sleep.

use std::time::Duration;

use protocol_tests::nats::{Nats, Proxy};
use protocol_tests::*;
use serde_json::{json, Value};

const TOPIC: &str = "realtime:cluster-room";

async fn node(nats_url: &str, name: &str) -> Server {
    Server::start_with(&[
        ("CLUSTER_NATS_URL", nats_url),
        ("NODE_NAME", name),
        ("CLUSTER_HEARTBEAT_MS", "100"),
        ("CLUSTER_NODE_TIMEOUT_MS", "1000"),
        ("METRICS_JWT_SECRET", SECRET),
    ])
    .await
}

fn bcast(event: &str, payload: Value) -> Value {
    json!({"type":"broadcast","event":event,"payload":payload})
}

fn is_event(f: &Frame, event: &str) -> bool {
    f.event() == "broadcast" && f.payload()["event"] == event
}

/// Sends probes from `from` (joined to `topic` with `self: false`) until one reaches `to`:
/// then `to`'s node follows the topic on NATS.
async fn linked(from: &mut Client, to: &mut Client, topic: &str) {
    let started = tokio::time::Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        from.send(
            None,
            None,
            topic,
            "broadcast",
            bcast("probe", json!({"n": n})),
        )
        .await;
        let got = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                let f = to.recv().await;
                if is_event(&f, "probe") {
                    return;
                }
                assert!(!matches!(f, Frame::Close(_)), "closed while probing");
            }
        })
        .await;
        if got.is_ok() {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "no probe crossed from node to node on {topic}"
        );
    }
}

/// The value of one metric line (name with labels, exactly), 0 when absent.
async fn metric(server: &Server, series: &str) -> f64 {
    let text = server.metrics(&token("anon")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn health(server: &Server) -> Value {
    let (status, _, body) = http(
        "GET",
        &server.http("/api/tenants/t/health"),
        &[("authorization", &format!("Bearer {}", token("anon")))],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    json_body(&body)["data"].clone()
}

#[tokio::test]
async fn broadcast_reaches_every_node_in_order_with_self_and_ack() {
    let nats = Nats::start().await;
    let (a, b, c) = (
        node(&nats.url(), "a").await,
        node(&nats.url(), "b").await,
        node(&nats.url(), "c").await,
    );
    let cfg = json!({"broadcast":{"self":false,"ack":true}});
    let mut ca = a.connect(Vsn::V1, &token("anon")).await;
    let ja = ca.join_ok(TOPIC, cfg.clone()).await;
    let mut cb = b.connect(Vsn::V1, &token("anon")).await;
    cb.join_ok(TOPIC, cfg.clone()).await;
    let mut cc = c.connect(Vsn::V2, &token("anon")).await;
    cc.join_ok(TOPIC, cfg.clone()).await;
    linked(&mut ca, &mut cb, TOPIC).await;
    linked(&mut ca, &mut cc, TOPIC).await;
    linked(&mut cb, &mut ca, TOPIC).await;

    // 200 messages from one publisher on node a: acked to it, never echoed (self: false), and
    // received on b and c in publish order.
    for i in 0..200 {
        ca.send(
            Some(&ja),
            Some(&format!("m{i}")),
            TOPIC,
            "broadcast",
            bcast("msg", json!({"i": i})),
        )
        .await;
    }
    for i in 0..200 {
        let ack = ca.reply(&format!("m{i}")).await;
        assert_eq!(ack.payload()["status"], "ok");
    }
    for (who, client) in [("b", &mut cb), ("c", &mut cc)] {
        for i in 0..200 {
            let f = client
                .recv_until("a message from node a", |f| is_event(f, "msg"))
                .await;
            assert_eq!(
                f.payload()["payload"]["i"],
                i,
                "node {who}: in publish order"
            );
        }
    }
    let own = ca.barrier().await;
    assert!(
        !own.iter().any(|f| is_event(f, "msg")),
        "self: false across nodes"
    );

    // REST on node b reaches a and c (and b's own subscriber).
    let body = json!({"messages":[{"topic":"cluster-room","event":"rest","payload":{"r":1}}]});
    let (status, _, _) = http(
        "POST",
        &b.http("/api/broadcast"),
        &[("apikey", &token("anon"))],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 202);
    for client in [&mut ca, &mut cb, &mut cc] {
        let f = client
            .recv_until("the REST broadcast", |f| is_event(f, "rest"))
            .await;
        assert_eq!(f.payload()["payload"], json!({"r":1}));
    }

    // A node only receives topics it has subscribers for: c follows one topic, and 50 messages
    // on a topic only a and b have subscribers for do not reach it.
    let other = "realtime:elsewhere";
    let jo = ca.join_ok(other, cfg.clone()).await;
    cb.join_ok(other, cfg.clone()).await;
    linked(&mut ca, &mut cb, other).await;
    let series = "walcast_cluster_messages_in_total{kind=\"broadcast\"}";
    let before = metric(&c, series).await;
    for i in 0..50 {
        ca.send(
            Some(&jo),
            None,
            other,
            "broadcast",
            bcast("elsewhere", json!({"i": i})),
        )
        .await;
    }
    for _ in 0..50 {
        cb.recv_until("a message on the other topic", |f| is_event(f, "elsewhere"))
            .await;
    }
    let after = metric(&c, series).await;
    assert!(
        after - before < 50.0,
        "node c received a topic it has no subscriber for"
    );
    assert_eq!(metric(&c, "walcast_cluster_topics").await, 1.0);
    assert_eq!(metric(&a, "walcast_cluster_topics").await, 2.0);

    // Health names the node, its peers and the broker connection.
    let h = health(&a).await;
    assert_eq!(h["node"], "a");
    assert_eq!(h["connected_cluster"], 3);
    assert_eq!(h["cluster"]["broker_connected"], true);
    assert_eq!(h["cluster"]["peers"], json!(["b", "c"]));
}

/// A client's view of a topic's presence: presence key → phx_refs, from `presence_state` and
/// `presence_diff` frames.
#[derive(Default, Debug)]
struct View(std::collections::BTreeMap<String, Vec<String>>);

impl View {
    fn apply(&mut self, f: &Frame) {
        let refs = |v: &Value| -> Vec<String> {
            v["metas"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(|m| m["phx_ref"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        match f.event() {
            "presence_state" => {
                self.0.clear();
                for (k, v) in f.payload().as_object().into_iter().flatten() {
                    self.0.insert(k.clone(), refs(v));
                }
            }
            "presence_diff" => {
                for (k, v) in f.payload()["leaves"].as_object().into_iter().flatten() {
                    if let Some(list) = self.0.get_mut(k) {
                        list.retain(|r| !refs(v).contains(r));
                        if list.is_empty() {
                            self.0.remove(k);
                        }
                    }
                }
                for (k, v) in f.payload()["joins"].as_object().into_iter().flatten() {
                    let list = self.0.entry(k.clone()).or_default();
                    for r in refs(v) {
                        assert!(!list.contains(&r), "a join repeated: {k} {r}");
                        list.push(r);
                    }
                }
            }
            _ => {}
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    /// Reads frames until the view's keys are `want`; returns the frames that were not presence.
    async fn until(&mut self, c: &mut Client, want: &[&str]) -> Vec<Frame> {
        let mut others = Vec::new();
        while self.keys() != want {
            let f = c.recv().await;
            assert!(
                !matches!(f, Frame::Close(_)),
                "closed waiting for presence {want:?}"
            );
            match f.event() {
                "presence_state" | "presence_diff" => self.apply(&f),
                _ => others.push(f),
            }
        }
        others
    }
}

async fn join_present(server: &Server, key: &str) -> (Client, String, View) {
    let mut c = server.connect(Vsn::V1, &token("anon")).await;
    let jr = c
        .join_ok(
            TOPIC,
            json!({"presence":{"key":key,"enabled":true},"broadcast":{"self":false}}),
        )
        .await;
    let mut view = View::default();
    let state = c
        .recv_until("presence_state", |f| f.event() == "presence_state")
        .await;
    view.apply(&state);
    (c, jr, view)
}

async fn track(c: &mut Client, jr: &str, meta: Value) {
    let r = c.make_ref();
    c.send(
        Some(jr),
        Some(&r),
        TOPIC,
        "presence",
        json!({"type":"presence","event":"track","payload":meta}),
    )
    .await;
    assert_eq!(c.reply(&r).await.payload()["status"], "ok");
}

#[tokio::test]
async fn presence_is_one_state_across_nodes_and_a_dead_nodes_presences_leave() {
    let nats = Nats::start().await;
    let mut a = node(&nats.url(), "a").await;
    let b = node(&nats.url(), "b").await;
    let (mut pa, ja, mut va) = join_present(&a, "alice").await;
    track(&mut pa, &ja, json!({"on":"a"})).await;
    va.until(&mut pa, &["alice"]).await;

    // Bob on node b sees alice (from a's snapshot), and alice sees bob's track.
    let (mut pb, jb, mut vb) = join_present(&b, "bob").await;
    vb.until(&mut pb, &["alice"]).await;
    track(&mut pb, &jb, json!({"on":"b"})).await;
    vb.until(&mut pb, &["alice", "bob"]).await;
    va.until(&mut pa, &["alice", "bob"]).await;

    // A new joiner on b gets both in its presence_state: one state across nodes.
    let (mut pc, _, mut vc) = join_present(&b, "carol").await;
    assert_eq!(
        vc.keys(),
        ["alice", "bob"],
        "presence_state holds every node's presences"
    );
    // An update on a replaces alice's meta everywhere, with no repeated join.
    track(&mut pa, &ja, json!({"on":"a", "v":2})).await;
    let d = pc
        .recv_until("alice's update", |f| f.event() == "presence_diff")
        .await;
    assert_eq!(d.payload()["joins"]["alice"]["metas"][0]["v"], 2);
    vc.apply(&d);
    assert_eq!(vc.keys(), ["alice", "bob"]);

    // Bob leaves (socket closed): alice sees the leave.
    drop(pb);
    va.until(&mut pa, &["alice"]).await;

    // Node a dies (SIGKILL): after CLUSTER_NODE_TIMEOUT_MS its presences leave on b.
    a.kill().await;
    vc.until(&mut pc, &[]).await;
    assert_eq!(health(&b).await["cluster"]["peers"], json!([]));
}

#[tokio::test]
async fn nats_restarted_under_load_local_traffic_continues_and_nodes_resynchronise() {
    let mut nats = Nats::start().await;
    let a = node(&nats.url(), "a").await;
    let b = node(&nats.url(), "b").await;
    let (mut pa, ja, mut va) = join_present(&a, "alice").await;
    track(&mut pa, &ja, json!({"on":"a"})).await;
    va.until(&mut pa, &["alice"]).await;
    let (mut pb, _, mut vb) = join_present(&b, "bob").await;
    vb.until(&mut pb, &["alice"]).await;
    // A second subscriber on node a: local traffic.
    let mut local = a.connect(Vsn::V1, &token("anon")).await;
    local.join_ok(TOPIC, json!({})).await;
    linked(&mut pa, &mut pb, TOPIC).await;

    // Publishing on a while NATS goes away and comes back.
    let mut sent = 0;
    for round in 0..3 {
        for _ in 0..100 {
            pa.send(
                Some(&ja),
                None,
                TOPIC,
                "broadcast",
                bcast("load", json!({"n": sent})),
            )
            .await;
            sent += 1;
        }
        match round {
            0 => nats.stop().await,
            1 => nats.restart().await,
            _ => {}
        }
    }
    // Node a's own subscriber got every message, in order, NATS or not.
    for n in 0..sent {
        let f = local
            .recv_until("a local message", |f| is_event(f, "load"))
            .await;
        assert_eq!(f.payload()["payload"]["n"], n);
    }
    // Node b's subscriber is told that messages may have been lost, and messages flow again.
    let notice = pb
        .recv_until("the lost-messages notice", |f| f.event() == "system")
        .await;
    assert_eq!(notice.payload()["status"], "error");
    assert!(
        notice.payload()["message"]
            .as_str()
            .is_some_and(|m| m.contains("may have been lost")),
        "{notice:?}"
    );
    linked(&mut pa, &mut pb, TOPIC).await;
    // Presence is resynchronised: alice is (again) present on b.
    vb.until(&mut pb, &["alice"]).await;
    let (_pc, _, vc) = join_present(&b, "carol").await;
    let mut vc = vc;
    let mut pc = _pc;
    vc.until(&mut pc, &["alice"]).await;
    assert!(metric(&b, "walcast_cluster_disconnects_total").await >= 1.0);
    assert_eq!(metric(&b, "walcast_cluster_connected").await, 1.0);
}

#[tokio::test]
async fn a_node_cut_off_from_nats_loses_and_regains_the_others_presences() {
    let nats = Nats::start().await;
    let proxy = Proxy::start(nats.port).await;
    let a = node(&proxy.url(), "a").await;
    let b = node(&nats.url(), "b").await;
    let (mut pa, ja, mut va) = join_present(&a, "alice").await;
    track(&mut pa, &ja, json!({"on":"a"})).await;
    let (mut pb, jb, mut vb) = join_present(&b, "bob").await;
    track(&mut pb, &jb, json!({"on":"b"})).await;
    va.until(&mut pa, &["alice", "bob"]).await;
    vb.until(&mut pb, &["alice", "bob"]).await;

    // Cut off: each side sees the other's presences leave after the node timeout.
    proxy.partition();
    va.until(&mut pa, &["alice"]).await;
    vb.until(&mut pb, &["bob"]).await;
    let h = health(&a).await;
    assert_eq!(h["cluster"]["broker_connected"], false);
    assert_eq!(metric(&a, "walcast_cluster_connected").await, 0.0);

    // Back: both resynchronise, and the cut-off node's subscribers are told of the gap.
    proxy.heal();
    let others = va.until(&mut pa, &["alice", "bob"]).await;
    vb.until(&mut pb, &["alice", "bob"]).await;
    let told = others.iter().any(|f| f.event() == "system")
        || pa
            .recv_until("the lost-messages notice", |f| f.event() == "system")
            .await
            .payload()["status"]
            == "error";
    assert!(told);
    linked(&mut pb, &mut pa, TOPIC).await;
}

#[tokio::test]
async fn a_node_shutting_down_has_its_presences_leave_at_once() {
    let nats = Nats::start().await;
    // A node timeout far longer than the wait: only the node's goodbye can explain the leave.
    let slow_timeout = |name: &'static str| {
        let url = nats.url();
        async move {
            Server::start_with(&[
                ("CLUSTER_NATS_URL", url.as_str()),
                ("NODE_NAME", name),
                ("CLUSTER_HEARTBEAT_MS", "100"),
                ("CLUSTER_NODE_TIMEOUT_MS", "600000"),
            ])
            .await
        }
    };
    let mut a = slow_timeout("a").await;
    let b = slow_timeout("b").await;
    let (mut pa, ja, mut va) = join_present(&a, "alice").await;
    track(&mut pa, &ja, json!({"on":"a"})).await;
    va.until(&mut pa, &["alice"]).await;
    let (mut pb, _, mut vb) = join_present(&b, "bob").await;
    vb.until(&mut pb, &["alice"]).await;
    a.terminate();
    vb.until(&mut pb, &[]).await;
    a.wait_exit(WAIT).await;
}

#[tokio::test]
async fn broadcast_from_the_database_reaches_a_node_without_one() {
    let nats = Nats::start().await;
    let db = protocol_tests::pg::TestDb::create("cluster_dbb").await;
    let env = [
        ("CLUSTER_NATS_URL", nats.url()),
        ("CLUSTER_HEARTBEAT_MS", "100".into()),
        ("CLUSTER_NODE_TIMEOUT_MS", "1000".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Node a streams the database; node b has none.
    let a = Server::start_with_db(&db, &env).await;
    let b = Server::start_with(&env).await;
    let topic = "realtime:dbroom";
    let mut ca = a.connect(Vsn::V1, &token("anon")).await;
    ca.join_ok(topic, json!({"broadcast":{"self":false}})).await;
    let mut cb = b.connect(Vsn::V2, &token("anon")).await;
    cb.join_ok(topic, json!({})).await;
    linked(&mut ca, &mut cb, topic).await;
    let sql = db.client().await;
    sql.execute(
        "SELECT realtime.send('{\"n\":7}'::jsonb, 'ev', 'dbroom', false)",
        &[],
    )
    .await
    .expect("realtime.send");
    let f = cb
        .recv_until(
            "the broadcast from the database",
            |f| matches!(f, Frame::Binary { event, .. } if event == "ev"),
        )
        .await;
    let Frame::Binary { payload, meta, .. } = f else {
        unreachable!()
    };
    assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap()["n"], 7);
    assert!(
        meta.is_some_and(|m| m["id"].is_string()),
        "the stored message's id crosses too"
    );
}

#[tokio::test]
async fn a_very_long_topic_crosses_nodes_without_breaking_the_nats_connection() {
    let nats = Nats::start().await;
    let a = node(&nats.url(), "a").await;
    let b = node(&nats.url(), "b").await;
    // Longer than a NATS control line (4 KiB) even before hex encoding.
    let long = format!("realtime:{}", "x".repeat(5000));
    let cfg = json!({"broadcast":{"self":false}});
    let mut ca = a.connect(Vsn::V1, &token("anon")).await;
    ca.join_ok(&long, cfg.clone()).await;
    let mut cb = b.connect(Vsn::V1, &token("anon")).await;
    cb.join_ok(&long, cfg.clone()).await;
    linked(&mut ca, &mut cb, &long).await;
    // And an ordinary topic still works: the connection was never dropped.
    ca.join_ok(TOPIC, cfg.clone()).await;
    cb.join_ok(TOPIC, cfg).await;
    linked(&mut cb, &mut ca, TOPIC).await;
    for server in [&a, &b] {
        assert_eq!(
            metric(server, "walcast_cluster_disconnects_total").await,
            0.0
        );
    }
}

#[tokio::test]
async fn with_nats_down_from_the_start_a_node_serves_local_traffic_and_counts_what_it_drops() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let a = Server::start_with(&[
        ("CLUSTER_NATS_URL", url.as_str()),
        ("NODE_NAME", "alone"),
        ("CLUSTER_PUBLISH_QUEUE", "1"),
        ("METRICS_JWT_SECRET", SECRET),
    ])
    .await;
    let mut publisher = a.connect(Vsn::V1, &token("anon")).await;
    let jp = publisher
        .join_ok(TOPIC, json!({"broadcast":{"self":false,"ack":true}}))
        .await;
    let mut local = a.connect(Vsn::V1, &token("anon")).await;
    local.join_ok(TOPIC, json!({})).await;
    let n = 3000;
    for i in 0..n {
        publisher
            .send(
                Some(&jp),
                Some(&format!("r{i}")),
                TOPIC,
                "broadcast",
                bcast("m", json!({"i": i})),
            )
            .await;
    }
    publisher.reply(&format!("r{}", n - 1)).await;
    for i in 0..n {
        let f = local
            .recv_until("a local message", |f| is_event(f, "m"))
            .await;
        assert_eq!(f.payload()["payload"]["i"], i);
    }
    let dropped = metric(
        &a,
        "walcast_cluster_dropped_total{reason=\"publish_queue_full\"}",
    )
    .await;
    assert!(dropped > 0.0, "nothing counted as dropped");
    let h = health(&a).await;
    assert_eq!(h["cluster"]["broker_connected"], false);
    assert_eq!(h["node"], "alone");
}
