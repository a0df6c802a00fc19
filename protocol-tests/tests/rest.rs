//! REST: broadcast (batch and single), health and ping.

use protocol_tests::*;
use serde_json::json;

#[tokio::test]
async fn health_and_ping() {
    let server = Server::start().await;
    let (status, head, body) = http("GET", &server.http("/healthcheck"), &[], b"").await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/plain"));
    for path in ["/api/ping", "/realtime/v1/api/ping"] {
        let (status, _, body) = http("GET", &server.http(path), &[], b"").await;
        assert_eq!(status, 200);
        assert_eq!(json_body(&body), json!({"message":"Success"}));
    }
}

#[tokio::test]
async fn batch_broadcast_reaches_v1_and_v2_subscribers() {
    let server = Server::start().await;
    let mut v1 = server.connect(Vsn::V1, &token("anon")).await;
    let mut v2 = server.connect(Vsn::V2, &token("anon")).await;
    v1.join_ok("realtime:news", json!({})).await;
    v2.join_ok("realtime:news", json!({})).await;
    let auth = format!("Bearer {}", token("service_role"));
    for path in [
        "/api/broadcast",
        "/realtime/v1/api/broadcast?apikey=ignored&vsn=2.0.0",
    ] {
        let body = json!({"messages":[
            {"topic":"news","event":"headline","payload":{"t":"a"}},
            {"topic":"news","event":"headline","payload":{"t":"b"},"id":"msg-1"},
            {"topic":"news","event":"private-one","payload":{"t":"c"},"private":true},
            {"topic":"elsewhere","event":"x","payload":{}}
        ]});
        let (status, _, resp) = http(
            "POST",
            &server.http(path),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(status, 202, "{}", String::from_utf8_lossy(&resp));
        assert!(resp.is_empty());
        for c in [&mut v1, &mut v2] {
            let first = c.recv().await;
            assert_eq!(first.event(), "broadcast");
            assert_eq!(
                first.payload(),
                &json!({"event":"headline","payload":{"t":"a"},"type":"broadcast"})
            );
            let second = c.recv().await;
            assert_eq!(
                second.payload(),
                &json!({"event":"headline","payload":{"t":"b"},"type":"broadcast","meta":{"id":"msg-1"}})
            );
            // The private message needs a write policy this build cannot check: not delivered
            // to anyone, and never to the public topic of the same name.
            c.assert_quiet().await;
        }
    }
}

#[tokio::test]
async fn batch_broadcast_errors() {
    let server = Server::start().await;
    let url = server.http("/api/broadcast");
    let body = json!({"messages":[{"topic":"a","event":"e","payload":{}}]}).to_string();
    // No token, a bad token, an expired token: 401.
    for headers in [
        vec![],
        vec![("authorization", "Bearer nope".to_owned())],
        vec![("apikey", sign(json!({"role":"anon","exp": now() - 1})))],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, _, resp) = http("POST", &url, &headers, body.as_bytes()).await;
        assert_eq!(status, 401);
        assert_eq!(json_body(&resp), json!({"message":"Unauthorized"}));
    }
    // The apikey header alone is accepted; the bearer scheme is matched in any case.
    let tok = token("anon");
    let (status, _, _) = http("POST", &url, &[("apikey", &tok)], body.as_bytes()).await;
    assert_eq!(status, 202);
    let (status, _, _) = http(
        "POST",
        &url,
        &[("Authorization", &format!("bEaReR {tok}"))],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 202);

    // Validation: one error object per message, {} for valid ones.
    let bad = json!({"messages":[
        {"topic":"a","event":"e","payload":{}},
        {"event":"e","payload":{}},
        {"topic":"a","event":"e"},
        {"topic":"a","event":"e","payload":"str"}
    ]});
    let (status, _, resp) = http(
        "POST",
        &url,
        &[("apikey", &tok)],
        bad.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        json_body(&resp),
        json!({"errors":{"messages":[{},{"topic":["can't be blank"]},{"payload":["can't be blank"]},{"payload":["is invalid"]}]}})
    );
    let (status, _, resp) = http("POST", &url, &[("apikey", &tok)], b"{}").await;
    assert_eq!(status, 422);
    assert_eq!(
        json_body(&resp),
        json!({"errors":{"messages":["can't be blank"]}})
    );
}

#[tokio::test]
async fn batch_payload_over_the_limit_is_422() {
    let server = Server::start_with(&[("TENANT_MAX_PAYLOAD_SIZE_IN_KB", "1")]).await;
    let body = json!({"messages":[{"topic":"a","event":"e","payload":{"x":"q".repeat(1_200)}}]});
    let (status, _, resp) = http(
        "POST",
        &server.http("/api/broadcast"),
        &[("apikey", &token("anon"))],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        json_body(&resp),
        json!({"errors":{"messages":[{"payload":["Payload size exceeds tenant limit"]}]}})
    );
}

#[tokio::test]
async fn single_message_endpoint_json_and_binary() {
    let server = Server::start().await;
    let mut v1 = server.connect(Vsn::V1, &token("anon")).await;
    let mut v2 = server.connect(Vsn::V2, &token("anon")).await;
    v1.join_ok("realtime:room 1", json!({})).await;
    v2.join_ok("realtime:room 1", json!({})).await;
    let auth = format!("Bearer {}", token("anon"));
    let url = server.http("/realtime/v1/api/broadcast/room%201/events/msg?apikey=x&vsn=2.0.0");

    let (status, _, _) = http(
        "POST",
        &url,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        br#"{"via":"http"}"#,
    )
    .await;
    assert_eq!(status, 202);
    match v2.recv().await {
        Frame::Binary {
            topic,
            event,
            json,
            payload,
            meta,
        } => {
            assert_eq!(
                (topic.as_str(), event.as_str(), json, meta),
                ("realtime:room 1", "msg", true, None)
            );
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&payload).unwrap(),
                json!({"via":"http"})
            );
        }
        other => panic!("expected kind 4, got {other:?}"),
    }
    assert_eq!(
        v1.recv().await.payload(),
        &json!({"event":"msg","payload":{"via":"http"},"type":"broadcast"})
    );

    let (status, _, _) = http(
        "POST",
        &url,
        &[
            ("authorization", &auth),
            ("content-type", "application/octet-stream"),
        ],
        &[1, 2, 3],
    )
    .await;
    assert_eq!(status, 202);
    match v2.recv().await {
        Frame::Binary { json, payload, .. } => assert_eq!((json, payload), (false, vec![1, 2, 3])),
        other => panic!("expected kind 4, got {other:?}"),
    }
    v1.assert_quiet().await;

    let (status, _, body) = http(
        "POST",
        &url,
        &[("authorization", &auth), ("content-type", "text/plain")],
        b"hi",
    )
    .await;
    assert_eq!(status, 415);
    assert_eq!(
        json_body(&body),
        json!({"error":"Unsupported Media Type. Use application/json or application/octet-stream"})
    );

    let (status, _, body) = http(
        "POST",
        &format!("{url}&private=true"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        b"{}",
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(json_body(&body), json!({"message":"Unauthorized"}));

    let (status, _, _) = http("POST", &url, &[("content-type", "application/json")], b"{}").await;
    assert_eq!(status, 401);
    v2.assert_quiet().await;
    v1.assert_quiet().await;
}

/// The support-chat example's pages and endpoint exist only under `walcast dev --example
/// support-chat` (its browser test, examples/support-chat/test, exercises them there).
#[tokio::test]
async fn the_example_app_is_not_served_by_walcast_serve() {
    let server = Server::start().await;
    let (status, _, _) = http(
        "GET",
        &server.http("/examples/support-chat/widget.html"),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 404);
    let auth = format!("Bearer {}", token("authenticated"));
    let (status, _, _) = http(
        "POST",
        &server.http("/examples/support-chat/api/list_conversations"),
        &[("authorization", &auth)],
        b"{}",
    )
    .await;
    assert_eq!(status, 404);
}
