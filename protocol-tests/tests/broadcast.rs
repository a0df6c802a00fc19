//! Broadcast over the socket: relay, self, ack, serializers, binary frames, payload limit.

use protocol_tests::*;
use serde_json::json;

const TOPIC: &str = "realtime:chat";

#[tokio::test]
async fn json_broadcasts_are_relayed_verbatim_with_self_and_ack() {
    let server = Server::start().await;
    for sender_vsn in BOTH {
        for receiver_vsn in BOTH {
            let mut a = server.connect(sender_vsn, &token("anon")).await;
            let mut b = server.connect(receiver_vsn, &token("anon")).await;
            let ja = a
                .join_ok(TOPIC, json!({"broadcast":{"self":false,"ack":true}}))
                .await;
            b.join_ok(TOPIC, json!({"broadcast":{"self":false,"ack":false}}))
                .await;
            let payload = json!({"type":"broadcast","event":"new-message","payload":{"text":"hi","n":[1,2]},"extra":"kept"});
            a.send(Some(&ja), Some("10"), TOPIC, "broadcast", payload.clone())
                .await;
            let ack = a.reply("10").await;
            assert_eq!(ack.payload(), &json!({"status":"ok","response":{}}));
            // self:false: nothing else for the sender.
            a.assert_quiet().await;
            let got = b.recv().await;
            assert_eq!(got.event(), "broadcast");
            assert_eq!(got.topic(), TOPIC);
            assert_eq!(got.payload(), &payload, "relayed verbatim, extra keys kept");
            assert_eq!(got.msg_ref(), &json!(null));
            if receiver_vsn.is_v2() {
                assert_eq!(got.join_ref(), Some(&json!(null)));
            } else {
                assert_eq!(got.join_ref(), None);
            }
            // ack:false: no reply for b's own broadcast.
            b.send(None, Some("11"), TOPIC, "broadcast", payload.clone())
                .await;
            b.assert_quiet().await;
            let back = a.recv().await;
            assert_eq!(back.payload(), &payload);
        }
    }
}

#[tokio::test]
async fn self_true_echoes_to_the_sender() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut a = server.connect(vsn, &token("anon")).await;
        a.join_ok(TOPIC, json!({"broadcast":{"self":true}})).await;
        a.send(
            None,
            Some("3"),
            TOPIC,
            "broadcast",
            json!({"type":"broadcast","event":"e","payload":{"x":1}}),
        )
        .await;
        let frames = a.barrier().await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].payload()["payload"], json!({"x":1}));
    }
}

#[tokio::test]
async fn kind3_pushes_reach_v2_as_kind4_and_v1_as_json() {
    let server = Server::start().await;
    let mut sender = server.connect(Vsn::V2, &token("anon")).await;
    let mut v2 = server.connect(Vsn::V2, &token("anon")).await;
    let mut v1 = server.connect(Vsn::V1, &token("anon")).await;
    let jr = sender
        .join_ok(TOPIC, json!({"broadcast":{"ack":true}}))
        .await;
    v2.join_ok(TOPIC, json!({})).await;
    v1.join_ok(TOPIC, json!({})).await;

    // JSON-encoded payload, as supabase-js sends every send() on vsn 2.
    sender
        .send_binary(kind3(
            &jr,
            "20",
            TOPIC,
            "msg",
            br#"{"persist":true}"#,
            true,
            br#"{"hello":"world"}"#,
        ))
        .await;
    assert_eq!(sender.reply("20").await.payload()["status"], "ok");
    match v2.recv().await {
        Frame::Binary {
            topic,
            event,
            meta,
            json,
            payload,
        } => {
            assert_eq!(
                (topic.as_str(), event.as_str(), meta, json),
                (TOPIC, "msg", None, true)
            );
            assert_eq!(payload, br#"{"hello":"world"}"#);
        }
        other => panic!("expected a kind-4 frame, got {other:?}"),
    }
    let f = v1.recv().await;
    assert_eq!(f.event(), "broadcast");
    assert_eq!(
        f.payload(),
        &json!({"event":"msg","payload":{"hello":"world"},"type":"broadcast"})
    );

    // Raw binary payload: V2 gets it byte for byte; V1 cannot carry it and gets nothing.
    let bytes = vec![0u8, 1, 2, 255, 254];
    sender
        .send_binary(kind3(&jr, "21", TOPIC, "bin", b"", false, &bytes))
        .await;
    assert_eq!(sender.reply("21").await.payload()["status"], "ok");
    match v2.recv().await {
        Frame::Binary {
            event,
            json,
            payload,
            ..
        } => {
            assert_eq!(event, "bin");
            assert!(!json);
            assert_eq!(payload, bytes);
        }
        other => panic!("expected a kind-4 frame, got {other:?}"),
    }
    v1.assert_quiet().await;

    // A text broadcast from a V1 client stays a JSON frame for V2 receivers (relayed verbatim).
    v1.send(
        None,
        Some("1"),
        TOPIC,
        "broadcast",
        json!({"type":"broadcast","event":"t","payload":{"v":1}}),
    )
    .await;
    let f = v2.recv().await;
    assert_eq!(
        f.payload(),
        &json!({"type":"broadcast","event":"t","payload":{"v":1}})
    );
}

#[tokio::test]
async fn oversized_payloads_are_dropped_and_acked_with_an_error() {
    let server = Server::start_with(&[("TENANT_MAX_PAYLOAD_SIZE_IN_KB", "1")]).await;
    for vsn in BOTH {
        let mut a = server.connect(vsn, &token("anon")).await;
        let mut b = server.connect(vsn, &token("anon")).await;
        let jr = a.join_ok(TOPIC, json!({"broadcast":{"ack":true}})).await;
        b.join_ok(TOPIC, json!({})).await;
        let big = "x".repeat(1_100);
        a.send(
            Some(&jr),
            Some("30"),
            TOPIC,
            "broadcast",
            json!({"type":"broadcast","event":"e","payload":{"big":big}}),
        )
        .await;
        let reply = a.reply("30").await;
        assert_eq!(
            reply.payload(),
            &json!({"status":"error","response":"payload_size_exceeded"})
        );
        if vsn.is_v2() {
            a.send_binary(kind3(&jr, "31", TOPIC, "e", b"", false, &vec![7u8; 1_001]))
                .await;
            assert_eq!(
                a.reply("31").await.payload()["response"],
                "payload_size_exceeded"
            );
        }
        b.assert_quiet().await;
        // Under the limit passes.
        a.send(
            Some(&jr),
            Some("32"),
            TOPIC,
            "broadcast",
            json!({"type":"broadcast","event":"e","payload":{"small":1}}),
        )
        .await;
        assert_eq!(a.reply("32").await.payload()["status"], "ok");
        assert_eq!(b.recv().await.payload()["payload"], json!({"small":1}));
    }
}

#[tokio::test]
async fn topics_are_isolated() {
    let server = Server::start().await;
    let mut a = server.connect(Vsn::V2, &token("anon")).await;
    let mut b = server.connect(Vsn::V2, &token("anon")).await;
    a.join_ok("realtime:one", json!({"broadcast":{"ack":true}}))
        .await;
    b.join_ok("realtime:two", json!({})).await;
    a.send(
        None,
        Some("1"),
        "realtime:one",
        "broadcast",
        json!({"type":"broadcast","event":"e","payload":{}}),
    )
    .await;
    a.reply("1").await;
    b.assert_quiet().await;
}

#[tokio::test]
async fn a_slow_consumer_is_disconnected_and_does_not_slow_others() {
    // A small queue so the test needs little data: 64 KiB payload limit, 256 KiB queue.
    let server = Server::start_with(&[
        ("TENANT_MAX_PAYLOAD_SIZE_IN_KB", "64"),
        ("CLIENT_OUTBOUND_QUEUE_BYTES", "262144"),
    ])
    .await;
    let mut sender = server.connect(Vsn::V2, &token("anon")).await;
    let mut fast = server.connect(Vsn::V2, &token("anon")).await;
    let mut slow = server.connect(Vsn::V2, &token("anon")).await;
    let jr = sender
        .join_ok(TOPIC, json!({"broadcast":{"ack":true}}))
        .await;
    fast.join_ok(TOPIC, json!({})).await;
    slow.join_ok(TOPIC, json!({})).await;

    // `slow` reads nothing from here on. Send until its backlog (kernel buffers + queue)
    // overflows; `fast` reads everything as it comes.
    let chunk = "y".repeat(60_000);
    let mut sent = 0;
    for i in 0..2_000 {
        let r = format!("b{i}");
        sender
            .send(
                Some(&jr),
                Some(&r),
                TOPIC,
                "broadcast",
                json!({"type":"broadcast","event":"e","payload":{"i":i,"c":chunk}}),
            )
            .await;
        sender.reply(&r).await;
        let got = fast.recv().await;
        assert_eq!(
            got.payload()["payload"]["i"],
            json!(i),
            "fast consumer stays in order"
        );
        sent += 1;
        if sent >= 400 {
            break;
        }
    }
    // Now drain `slow`: it got some broadcasts, then the close for overflowing.
    let mut received = 0;
    let close = loop {
        match slow.recv().await {
            Frame::Close(c) => break c,
            f => {
                assert_eq!(f.event(), "broadcast");
                received += 1;
            }
        }
    };
    assert_eq!(
        close,
        Some((1013, "slow consumer: outbound queue full".to_owned())),
        "after {received} of {sent}"
    );
    assert!(
        received < sent,
        "slow consumer must not have received everything"
    );
    fast.assert_quiet().await;
    sender.assert_quiet().await;
}
