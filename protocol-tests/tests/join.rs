//! phx_join: payload parsing, the reply, every refusal and its exact reason.

use protocol_tests::*;
use serde_json::json;

#[tokio::test]
async fn join_reply_shapes() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let (jr, reply) = c.join("realtime:room", json!({"config":{"broadcast":{"ack":false,"self":false},"presence":{"key":"","enabled":false},"postgres_changes":[],"private":false}})).await;
        assert_eq!(
            reply.payload(),
            &json!({"status":"ok","response":{"postgres_changes":[]}})
        );
        match vsn {
            Vsn::V2 => assert_eq!(
                c.raw.last().unwrap(),
                &format!(
                    r#"["{jr}","{jr}","realtime:room","phx_reply",{{"status":"ok","response":{{"postgres_changes":[]}}}}]"#
                )
            ),
            _ => assert!(!c.raw.last().unwrap().contains("join_ref")),
        }
        c.assert_quiet().await;
    }
}

#[tokio::test]
async fn postgres_changes_bindings_are_echoed_with_stable_ids_and_the_gap_is_reported() {
    let server = Server::start().await;
    let bindings = json!([
        {"event":"INSERT","schema":"public","table":"messages","filter":"conversation_id=eq.5"},
        {"event":"*","schema":"public","table":"messages","filter":"conversation_id=eq.5","select":["id"]},
        {"event":"INSERT","schema":"public","table":"messages","filter":"conversation_id=eq.5"}
    ]);
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let (_, reply) = c
            .join(
                "realtime:pg",
                json!({"config":{"postgres_changes": bindings}}),
            )
            .await;
        let echoed = reply.payload()["response"]["postgres_changes"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(echoed.len(), 3);
        for (sent, got) in bindings.as_array().unwrap().iter().zip(&echoed) {
            let mut without_id = got.clone();
            let id = without_id.as_object_mut().unwrap().remove("id").unwrap();
            assert!(id.is_u64() && id.as_u64().unwrap() < (1 << 27));
            assert_eq!(&without_id, sent, "bindings are echoed verbatim");
        }
        assert_eq!(
            echoed[0]["id"], echoed[2]["id"],
            "identical bindings share an id"
        );
        assert_ne!(echoed[0]["id"], echoed[1]["id"]);
        let system = c.recv().await;
        assert_eq!(system.event(), "system");
        assert_eq!(system.payload()["extension"], "postgres_changes");
        assert_eq!(system.payload()["status"], "error");
        assert_eq!(system.payload()["channel"], "pg");
    }
}

#[tokio::test]
async fn refusals_with_the_original_reasons() {
    let server = Server::start_with(&[("TENANT_MAX_CHANNELS_PER_CLIENT", "2")]).await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let reason = |f: &Frame| {
            assert_eq!(f.payload()["status"], "error", "{f:?}");
            f.payload()["response"]["reason"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let (_, f) = c.join("realtime:", json!({})).await;
        assert_eq!(
            reason(&f),
            "TopicNameRequired: You must provide a topic name"
        );

        let (_, f) = c
            .join("realtime:p", json!({"config":{"private":true}}))
            .await;
        assert_eq!(
            reason(&f),
            "Unauthorized: You do not have permissions to read from this Channel topic: p"
        );

        let expired = sign(json!({"role":"anon","exp":now()-42}));
        let (_, f) = c
            .join("realtime:a", json!({"config":{}, "access_token": expired}))
            .await;
        let r = reason(&f);
        assert!(
            r.starts_with("InvalidJWTToken: Token has expired ") && r.ends_with(" seconds ago"),
            "{r}"
        );
        let secs: i64 = r.split(' ').nth(4).unwrap().parse().unwrap();
        assert!((42..50).contains(&secs), "{r}");

        let (_, f) = c
            .join("realtime:a", json!({"config":{}, "access_token": "nope"}))
            .await;
        assert_eq!(
            reason(&f),
            "MalformedJWT: The token provided is not a valid JWT"
        );
        let (_, f) = c
            .join(
                "realtime:a",
                json!({"config":{}, "access_token": sign(json!({"exp": now()+60}))}),
            )
            .await;
        assert_eq!(
            reason(&f),
            "InvalidJWTToken: Fields `role` and `exp` are required in JWT"
        );
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"role":"service_role","exp":now()+60}),
            &jsonwebtoken::EncodingKey::from_secret(b"guess"),
        )
        .unwrap();
        let (_, f) = c
            .join("realtime:a", json!({"config":{}, "user_token": forged}))
            .await;
        assert_eq!(
            reason(&f),
            "JwtSignatureError: Failed to validate JWT signature"
        );

        c.join_ok("realtime:one", json!({})).await;
        c.join_ok("realtime:two", json!({})).await;
        let (_, f) = c.join("realtime:three", json!({})).await;
        assert_eq!(reason(&f), "ChannelRateLimitReached: Too many channels");
        // Re-joining a joined topic does not count twice.
        c.join_ok("realtime:two", json!({})).await;
    }
}

#[tokio::test]
async fn sb_access_tokens_are_ignored_and_the_socket_token_is_used() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let (_, f) = c
            .join(
                "realtime:sb",
                json!({"config":{}, "access_token":"sb_publishable_abc"}),
            )
            .await;
        assert_eq!(f.payload()["status"], "ok");
    }
}

#[tokio::test]
async fn invalid_join_payloads_are_tolerated() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        for payload in [
            json!("a string"),
            json!([1, 2]),
            json!({"config": 5}),
            json!({"config":{"broadcast":{"self":7},"presence":"x","postgres_changes":{}}}),
        ] {
            let (_, f) = c.join("realtime:tolerant", payload.clone()).await;
            assert_eq!(f.payload()["status"], "ok", "{payload}");
        }
    }
}

#[tokio::test]
async fn string_booleans_are_accepted() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        c.join_ok(
            "realtime:strbool",
            json!({"broadcast":{"self":"true","ack":"TRUE"},"presence":{"enabled":"True"}}),
        )
        .await;
        let state = c.recv().await;
        assert_eq!(state.event(), "presence_state");
        c.send(
            None,
            Some("77"),
            "realtime:strbool",
            "broadcast",
            json!({"type":"broadcast","event":"e","payload":{}}),
        )
        .await;
        let frames = c.barrier().await;
        assert!(
            frames.iter().any(|f| f.event() == "broadcast"),
            "self:true echoes: {frames:?}"
        );
        assert!(
            frames
                .iter()
                .any(|f| f.event() == "phx_reply" && f.msg_ref() == &json!("77")),
            "ack:true replies: {frames:?}"
        );
    }
}

#[tokio::test]
async fn join_errors_wait_for_the_backoff_without_blocking_the_socket() {
    let server = Server::start_with(&[("CHANNEL_ERROR_BACKOFF_MS", "500")]).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    let start = std::time::Instant::now();
    c.send(Some("1"), Some("1"), "realtime:", "phx_join", json!({}))
        .await;
    // The socket keeps answering while the error waits.
    c.assert_quiet().await;
    assert!(start.elapsed() < std::time::Duration::from_millis(500));
    let f = c.reply("1").await;
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        f.payload()["response"]["reason"],
        "TopicNameRequired: You must provide a topic name"
    );
}
