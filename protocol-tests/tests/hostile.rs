//! Hostile input: every case gets its documented reply or drop, and the socket or server
//! survives as documented.

use protocol_tests::*;
use serde_json::json;

#[tokio::test]
async fn a_heartbeat_flood_is_answered_in_order() {
    let server = Server::start().await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    for i in 0..10_000 {
        c.send(
            None,
            Some(&i.to_string()),
            "phoenix",
            "heartbeat",
            json!({}),
        )
        .await;
    }
    for i in 0..10_000 {
        let f = c.recv().await;
        assert_eq!(f.msg_ref(), &json!(i.to_string()));
    }
    c.assert_quiet().await;
}

#[tokio::test]
async fn ten_thousand_joins_on_one_socket_are_bounded() {
    let server = Server::start().await;
    let mut c = server.connect(Vsn::V1, &token("anon")).await;
    for i in 0..10_000 {
        let r = i.to_string();
        c.send(
            Some(&r),
            Some(&r),
            &format!("realtime:t{i}"),
            "phx_join",
            json!({}),
        )
        .await;
    }
    let mut ok = 0;
    let mut refused = 0;
    for _ in 0..10_000 {
        let f = c.recv().await;
        match f.payload()["status"].as_str() {
            Some("ok") => ok += 1,
            _ => {
                assert_eq!(
                    f.payload()["response"]["reason"],
                    "ChannelRateLimitReached: Too many channels"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (100, 9_900));
    c.assert_quiet().await;
    // Other sockets are unaffected.
    let mut other = server.connect(Vsn::V2, &token("anon")).await;
    other.join_ok("realtime:fine", json!({})).await;
}

#[tokio::test]
async fn huge_tokens_and_topics_get_clear_answers() {
    let server = Server::start().await;
    // A 100 KB token: refused like any other bad token (or by the HTTP layer), never a crash.
    let big = "a".repeat(100_000);
    let url = server.ws_url("/socket/websocket", "vsn=2.0.0");
    let err = server
        .connect_url(Vsn::V2, &url, &[("x-api-key", &big)])
        .await
        .err()
        .expect("refused");
    assert!((400..500).contains(&err.0), "{err:?}");
    // In the query string (too long for a client library's URI type: sent by hand).
    let (status, _, _) = http(
        "GET",
        &server.http(&format!("/socket/websocket?apikey={big}&vsn=2.0.0")),
        &[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    )
    .await;
    assert!((400..500).contains(&status), "{status}");
    // A 200 KB topic: a channel like any other for JSON frames.
    let mut c = server.connect(Vsn::V1, &token("anon")).await;
    let topic = format!("realtime:{}", "x".repeat(200_000));
    c.join_ok(&topic, json!({"broadcast": {"self": true, "ack": true}}))
        .await;
    c.send(
        None,
        Some("5"),
        &topic,
        "broadcast",
        json!({"type":"broadcast","event":"e","payload":{}}),
    )
    .await;
    let frames = c.barrier().await;
    assert_eq!(frames.len(), 2, "echo and ack");
    // The server is fine.
    let mut other = server.connect(Vsn::V2, &token("anon")).await;
    other.assert_quiet().await;
}

#[tokio::test]
async fn tokens_that_should_not_pass_do_not() {
    let server = Server::start().await;
    let not_yet = sign(json!({"role":"anon","exp": now() + 600, "nbf": now() + 300}));
    let garbage_b64 = "@@@.###.$$$".to_owned();
    let wrong_kid = sign_with(
        jsonwebtoken::Algorithm::HS256,
        Some("unknown-kid"),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
        json!({"role":"anon","exp": now() + 60}),
    );
    for (tok, message) in [
        (not_yet, "The token provided is not a valid JWT"),
        (garbage_b64, "The token provided is not a valid JWT"),
        (wrong_kid, "Failed to validate JWT signature"),
    ] {
        let url = server.ws_url("/socket/websocket", &format!("apikey={tok}&vsn=2.0.0"));
        let (status, body) = server
            .connect_url(Vsn::V2, &url, &[])
            .await
            .err()
            .expect("refused");
        assert_eq!(status, 401);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"],
            message
        );
    }
}
