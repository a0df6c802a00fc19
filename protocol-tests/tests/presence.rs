//! Presence: state after join, diffs for track/update/untrack, leaves on leave and disconnect.

use protocol_tests::*;
use serde_json::{json, Value};

const TOPIC: &str = "realtime:lobby";

fn metas<'a>(diff: &'a Value, side: &str, key: &str) -> &'a Vec<Value> {
    diff[side][key]["metas"]
        .as_array()
        .unwrap_or_else(|| panic!("no {side}.{key} in {diff}"))
}

async fn track(c: &mut Client, jr: &str, meta: Value) -> Frame {
    let r = c.make_ref();
    c.send(
        Some(jr),
        Some(&r),
        TOPIC,
        "presence",
        json!({"type":"presence","event":"track","payload":meta}),
    )
    .await;
    c.reply(&r).await
}

#[tokio::test]
async fn state_and_diffs_between_two_clients() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut a = server.connect(vsn, &token("anon")).await;
        let ja = a
            .join_ok(TOPIC, json!({"presence":{"key":"alice","enabled":true}}))
            .await;
        let state = a.recv().await;
        assert_eq!(state.event(), "presence_state");
        assert_eq!(state.payload(), &json!({}));
        if vsn.is_v2() {
            assert_eq!(
                state.join_ref(),
                Some(&json!(ja)),
                "presence_state is a channel push"
            );
        }

        let reply = track(&mut a, &ja, json!({"online_at":"2025-01-01T00:00:00Z"})).await;
        assert_eq!(reply.payload(), &json!({"status":"ok","response":{}}));
        let diff = a.recv().await;
        assert_eq!(diff.event(), "presence_diff");
        let joined = metas(diff.payload(), "joins", "alice");
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0]["online_at"], "2025-01-01T00:00:00Z");
        let alice_ref = joined[0]["phx_ref"].as_str().unwrap().to_owned();
        assert_eq!(diff.payload()["leaves"], json!({}));

        // Bob joins: his presence_state has alice; his track reaches both.
        let mut b = server.connect(vsn, &token("anon")).await;
        let jb = b
            .join_ok(TOPIC, json!({"presence":{"key":"bob","enabled":true}}))
            .await;
        let state = b.recv().await;
        assert_eq!(
            state.payload()["alice"]["metas"][0]["phx_ref"],
            alice_ref.as_str()
        );
        track(&mut b, &jb, json!({"name":"bob"})).await;
        for c in [&mut a, &mut b] {
            let d = c.recv().await;
            assert_eq!(metas(d.payload(), "joins", "bob")[0]["name"], "bob");
        }

        // Re-tracking the same meta: ok, no diff. A new meta: update with phx_ref_prev.
        track(&mut a, &ja, json!({"online_at":"2025-01-01T00:00:00Z"})).await;
        b.assert_quiet().await;
        track(&mut a, &ja, json!({"online_at":"later"})).await;
        let d = b.recv().await;
        let updated = metas(d.payload(), "joins", "alice")[0].clone();
        assert_eq!(updated["phx_ref_prev"], alice_ref.as_str());
        assert_eq!(
            metas(d.payload(), "leaves", "alice")[0]["phx_ref"],
            alice_ref.as_str()
        );
        a.recv().await;

        // Untrack: a leave diff.
        let r = a.make_ref();
        a.send(
            Some(&ja),
            Some(&r),
            TOPIC,
            "presence",
            json!({"type":"presence","event":"untrack"}),
        )
        .await;
        assert_eq!(a.reply(&r).await.payload()["status"], "ok");
        let d = b.recv().await;
        // The stored meta, unchanged: the update's phx_ref and phx_ref_prev included.
        assert_eq!(metas(d.payload(), "leaves", "alice"), &vec![updated]);
        a.recv().await;

        // Bob's socket drops: alice sees him leave.
        drop(b);
        let d = a.recv().await;
        assert_eq!(d.event(), "presence_diff");
        assert_eq!(metas(d.payload(), "leaves", "bob")[0]["name"], "bob");
    }
}

#[tokio::test]
async fn leaving_the_channel_sends_a_leave() {
    let server = Server::start().await;
    let mut a = server.connect(Vsn::V2, &token("anon")).await;
    let mut b = server.connect(Vsn::V1, &token("anon")).await;
    let ja = a
        .join_ok(TOPIC, json!({"presence":{"key":"a","enabled":true}}))
        .await;
    a.recv().await;
    b.join_ok(TOPIC, json!({"presence":{"enabled":true}})).await;
    b.recv().await;
    track(&mut a, &ja, json!({"x":1})).await;
    a.recv().await;
    b.recv().await;
    a.send(Some(&ja), Some("99"), TOPIC, "phx_leave", json!({}))
        .await;
    let d = b.recv().await;
    assert_eq!(metas(d.payload(), "leaves", "a")[0]["x"], 1);
}

#[tokio::test]
async fn replies_for_odd_presence_messages() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        // Presence disabled at join: no presence_state, but a track turns it on.
        let jr = c
            .join_ok(TOPIC, json!({"presence":{"enabled":false}}))
            .await;
        c.assert_quiet().await;
        c.send(
            Some(&jr),
            Some("1"),
            TOPIC,
            "presence",
            json!({"type":"presence","event":"TRACK","payload":{"k":1}}),
        )
        .await;
        assert_eq!(c.reply("1").await.payload()["status"], "ok");
        let diff = c.recv().await;
        assert_eq!(diff.event(), "presence_diff");
        let key = diff.payload()["joins"]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        assert_eq!(key.len(), 36, "a server-chosen UUID key: {key}");

        c.send(
            Some(&jr),
            Some("2"),
            TOPIC,
            "presence",
            json!({"type":"presence","event":"track","payload":"not a map"}),
        )
        .await;
        assert_eq!(
            c.reply("2").await.payload(),
            &json!({"status":"error","response":{"reason":"Presence track payload must be a map"}})
        );
        c.send(
            Some(&jr),
            Some("3"),
            TOPIC,
            "presence",
            json!({"type":"presence","event":"wave"}),
        )
        .await;
        assert_eq!(
            c.reply("3").await.payload(),
            &json!({"status":"error","response":{}})
        );
        c.send(
            Some(&jr),
            Some("4"),
            TOPIC,
            "presence",
            json!({"type":"presence"}),
        )
        .await;
        assert_eq!(
            c.reply("4").await.payload(),
            &json!({"status":"ok","response":{}})
        );
        c.assert_quiet().await;
    }
}

#[tokio::test]
async fn per_channel_presence_rate_limit_ends_the_channel() {
    let server = Server::start_with(&[
        ("CLIENT_PRESENCE_MAX_CALLS", "2"),
        ("CLIENT_PRESENCE_WINDOW_MS", "60000"),
    ])
    .await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let jr = c
            .join_ok(TOPIC, json!({"presence":{"key":"k","enabled":true}}))
            .await;
        c.recv().await;
        for n in 0..2 {
            track(&mut c, &jr, json!({"n":n})).await;
            c.recv().await;
        }
        c.send(
            Some(&jr),
            Some("x"),
            TOPIC,
            "presence",
            json!({"type":"presence","event":"track","payload":{"n":9}}),
        )
        .await;
        let system = c.recv().await;
        assert_eq!(
            system.payload()["message"],
            "Client presence rate limit exceeded"
        );
        assert_eq!(c.recv().await.event(), "phx_close");
    }
}

#[tokio::test]
async fn oversized_presence_meta_ends_the_channel() {
    let server = Server::start_with(&[("TENANT_MAX_PAYLOAD_SIZE_IN_KB", "1")]).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    let jr = c.join_ok(TOPIC, json!({})).await;
    c.send(
        Some(&jr),
        Some("1"),
        TOPIC,
        "presence",
        json!({"type":"presence","event":"track","payload":{"big":"z".repeat(1_100)}}),
    )
    .await;
    let system = c.recv().await;
    assert_eq!(system.payload()["message"], "Track message size exceeded");
    assert_eq!(c.recv().await.event(), "phx_close");
}
