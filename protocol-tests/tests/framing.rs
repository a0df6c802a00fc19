//! Phoenix control messages and framing, under both serializers.

use protocol_tests::*;
use serde_json::json;

#[tokio::test]
async fn malformed_frames_are_dropped_and_the_socket_stays_up() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let garbage = [
            "{not json",
            "\u{1}\u{2}",
            r#"{"topic":"realtime:a","event":"phx_join","payload":{}}"#, // V1 without ref
            r#"["1","1","realtime:a","phx_join"]"#,                      // short V2 array
            r#"[1,"1",5,"phx_join",{}]"#,                                // non-string topic
            "42",
            "",
        ];
        for g in garbage {
            c.send_text(g.to_owned()).await;
        }
        // The other serializer's framing is malformed for this socket.
        let other = if vsn.is_v2() {
            json!({"topic":"realtime:a","event":"phx_join","payload":{},"ref":"1"}).to_string()
        } else {
            json!(["1", "1", "realtime:a", "phx_join", {}]).to_string()
        };
        c.send_text(other).await;
        // JSON nested 10,000 deep.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        c.send_text(deep).await;
        // Binary: V1 has none; for V2, lengths past the end, unknown kinds, empty frames.
        c.send_binary(vec![3, 200, 0, 0, 0, 0, 1, b'x']).await;
        c.send_binary(vec![9, 0, 0]).await;
        c.send_binary(vec![]).await;
        c.send_binary(kind3("1", "2", "realtime:a", "e", b"", true, b"{bad json"))
            .await;
        // Invalid UTF-8 in a text frame cannot even be sent by a conforming client; as binary it is
        // an unknown kind.
        c.send_binary(vec![0xff, 0xfe]).await;
        c.assert_quiet().await;
    }
}

#[tokio::test]
async fn unmatched_topics_and_leaves() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        // An event on a topic that is not joined.
        c.send(
            Some("1"),
            Some("2"),
            "realtime:nope",
            "broadcast",
            json!({"type":"broadcast","event":"e","payload":{}}),
        )
        .await;
        let f = c.reply("2").await;
        assert_eq!(
            f.payload(),
            &json!({"status":"error","response":{"reason":"unmatched topic"}})
        );
        if vsn.is_v2() {
            assert_eq!(f.join_ref(), Some(&json!(null)));
        }
        // A join of a topic outside realtime:*.
        c.send(Some("3"), Some("3"), "room:1", "phx_join", json!({}))
            .await;
        assert_eq!(
            c.reply("3").await.payload()["response"]["reason"],
            "unmatched topic"
        );
        // A heartbeat-like event on the phoenix topic that is not a heartbeat.
        c.send(None, Some("4"), "phoenix", "something", json!({}))
            .await;
        assert_eq!(
            c.reply("4").await.payload()["response"]["reason"],
            "unmatched topic"
        );
        // phx_leave of a topic never joined (supabase-js sends these): ok {}.
        c.send(None, Some("5"), "realtime:never", "phx_leave", json!({}))
            .await;
        assert_eq!(
            c.reply("5").await.payload(),
            &json!({"status":"ok","response":{}})
        );
        c.assert_quiet().await;

        // phx_leave of a joined topic: ok {}, then phx_close with the join_ref.
        let jr = c.join_ok("realtime:leave-me", json!({})).await;
        c.send(
            Some(&jr),
            Some("90"),
            "realtime:leave-me",
            "phx_leave",
            json!({}),
        )
        .await;
        let reply = c.recv().await;
        assert_eq!(reply.event(), "phx_reply");
        assert_eq!(reply.payload(), &json!({"status":"ok","response":{}}));
        let close = c.recv().await;
        assert_eq!(close.event(), "phx_close");
        assert_eq!(close.payload(), &json!({}));
        assert_eq!(close.msg_ref(), &json!(jr));
        if vsn.is_v2() {
            assert_eq!(close.join_ref(), Some(&json!(jr)));
        } else {
            assert_eq!(close.join_ref(), None);
        }
        // After leaving, the topic is unmatched again.
        c.send(
            Some(&jr),
            Some("91"),
            "realtime:leave-me",
            "presence",
            json!({"event":"track"}),
        )
        .await;
        assert_eq!(
            c.reply("91").await.payload()["response"]["reason"],
            "unmatched topic"
        );
    }
}

#[tokio::test]
async fn duplicate_join_closes_the_old_channel_first() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let old = c.join_ok("realtime:dup", json!({})).await;
        c.send(
            Some("50"),
            Some("50"),
            "realtime:dup",
            "phx_join",
            json!({"config":{}}),
        )
        .await;
        let close = c.recv().await;
        assert_eq!(close.event(), "phx_close");
        assert_eq!(close.msg_ref(), &json!(old));
        let reply = c.recv().await;
        assert_eq!(reply.event(), "phx_reply");
        assert_eq!(reply.msg_ref(), &json!("50"));
        assert_eq!(reply.payload()["status"], "ok");
        if vsn.is_v2() {
            assert_eq!(reply.join_ref(), Some(&json!("50")));
        }
    }
}

#[tokio::test]
async fn stale_or_missing_join_ref_is_still_delivered() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        c.join_ok(
            "realtime:lenient",
            json!({"broadcast":{"ack":true,"self":true}}),
        )
        .await;
        for join_ref in [Some("999"), None] {
            let r = c.make_ref();
            c.send(
                join_ref,
                Some(&r),
                "realtime:lenient",
                "broadcast",
                json!({"type":"broadcast","event":"e","payload":{"n":r}}),
            )
            .await;
            let frames = c.barrier().await;
            assert!(
                frames
                    .iter()
                    .any(|f| f.event() == "broadcast" && f.payload()["payload"]["n"] == json!(r)),
                "{frames:?}"
            );
            assert!(
                frames
                    .iter()
                    .any(|f| f.event() == "phx_reply" && f.msg_ref() == &json!(r)),
                "{frames:?}"
            );
        }
    }
}

#[tokio::test]
async fn idle_sockets_are_closed_and_heartbeats_keep_them_open() {
    let server = Server::start_with(&[("WEBSOCKET_IDLE_TIMEOUT_MS", "600")]).await;
    let mut idle = server.connect(Vsn::V2, &token("anon")).await;
    let mut busy = server.connect(Vsn::V2, &token("anon")).await;
    // `busy` heartbeats every 200 ms, three times the idle timeout in all.
    let keepalive = async {
        for _ in 0..9 {
            busy.assert_quiet().await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        busy
    };
    let (closed, mut busy) = tokio::join!(idle.closed(), keepalive);
    assert_eq!(closed, Some((1000, "idle timeout".to_owned())));
    busy.assert_quiet().await;
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_the_socket_with_1009() {
    let server = Server::start_with(&[("WEBSOCKET_MAX_FRAME_BYTES", "100000")]).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    let big = format!(
        "[null,\"1\",\"phoenix\",\"heartbeat\",{{\"x\":\"{}\"}}]",
        "a".repeat(100_001)
    );
    c.send_text(big).await;
    let close = c.closed().await;
    assert_eq!(close.map(|c| c.0), Some(1009));
    // The server is fine.
    let mut other = server.connect(Vsn::V2, &token("anon")).await;
    other.assert_quiet().await;
}

/// A frame past twice `WEBSOCKET_MAX_FRAME_BYTES` cannot be read at all: the transport refuses it
/// and the session tells that read error apart (by its type) to still close with 1009.
#[tokio::test]
async fn an_unreadable_frame_still_gets_1009() {
    let server = Server::start_with(&[("WEBSOCKET_MAX_FRAME_BYTES", "100000")]).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    // 250,000 bytes: over the transport's 200,000, and small enough to sit in the socket
    // buffers, so the client reads the close frame rather than a reset.
    let sent = c.try_send_text("x".repeat(250_000)).await;
    assert!(sent.is_ok(), "{sent:?}");
    assert_eq!(c.closed().await, Some((1009, "frame too large".to_owned())));
    let mut other = server.connect(Vsn::V2, &token("anon")).await;
    other.assert_quiet().await;
}

#[tokio::test]
async fn the_default_frame_limit_is_five_megabytes() {
    let server = Server::start().await;
    let mut c = server.connect(Vsn::V1, &token("anon")).await;
    // 5,000,000 bytes exactly is accepted (and dropped as malformed JSON)...
    c.send_text("x".repeat(5_000_000)).await;
    c.assert_quiet().await;
    // ...one more byte closes the socket with 1009 once the frame is read whole (bounds.rs
    // checks that the client is not cut off while sending).
    let sent = c.try_send_text("x".repeat(5_000_001)).await;
    assert!(sent.is_ok(), "{sent:?}");
    assert_eq!(c.closed().await.map(|c| c.0), Some(1009));
    let mut other = server.connect(Vsn::V1, &token("anon")).await;
    other.assert_quiet().await;
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1012_and_exits() {
    let mut server = Server::start().await;
    let mut a = server.connect(Vsn::V2, &token("anon")).await;
    let mut b = server.connect(Vsn::V1, &token("anon")).await;
    a.join_ok("realtime:bye", json!({})).await;
    b.assert_quiet().await;
    server.terminate();
    assert_eq!(a.closed().await.map(|c| c.0), Some(1012));
    assert_eq!(b.closed().await.map(|c| c.0), Some(1012));
    let status = server.wait_exit(std::time::Duration::from_secs(15)).await;
    assert!(status.success(), "walcast exited with {status}");
}
