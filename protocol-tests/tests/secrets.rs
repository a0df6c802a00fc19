//! Secrets and tokens never reach the log, even at debug level with per-socket message logging
//! (`log_level=info`), through refusals, joins, token refreshes, REST and metrics requests.

use protocol_tests::*;
use serde_json::json;

#[tokio::test]
async fn no_secret_or_token_is_ever_logged() {
    let db = pg::TestDb::create("secrets").await;
    let log = std::env::temp_dir().join(format!("walcast-secrets-{}.log", std::process::id()));
    let metrics_secret = "metrics-secret-that-must-not-be-logged-0123456789";
    let env = db.env();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(&[
        ("LOG_LEVEL", "debug"),
        ("METRICS_JWT_SECRET", metrics_secret),
    ]);
    let mut server = Server::start_logging_to(&all, &log).await;

    let good = token("authenticated");
    let refreshed = sign(json!({"role": "authenticated", "exp": now() + 7200, "sub": "u2"}));
    let expired = sign(json!({"role": "anon", "exp": now() - 10}));
    let forged = {
        // A valid token's claims with another key's signature.
        let key = jsonwebtoken::EncodingKey::from_secret(b"another-secret-of-sufficient-length!!");
        sign_with(
            jsonwebtoken::Algorithm::HS256,
            None,
            &key,
            json!({"role": "anon", "exp": now() + 60}),
        )
    };

    // Per-message logging asked for by the client.
    let url = server.ws_url(
        "/socket/websocket",
        &format!("apikey={good}&vsn=2.0.0&log_level=info"),
    );
    let mut c = server
        .connect_url(Vsn::V2, &url, &[])
        .await
        .expect("connect");
    let jr = c
        .join_ok("realtime:room", json!({"broadcast": {"self": true}}))
        .await;
    let r = c.make_ref();
    c.send(
        Some(&jr),
        Some(&r),
        "realtime:room",
        "access_token",
        json!({"access_token": refreshed}),
    )
    .await;
    c.send(
        Some(&jr),
        None,
        "realtime:room",
        "broadcast",
        json!({"type":"broadcast","event":"e","payload":{}}),
    )
    .await;
    c.recv_until("broadcast", |f| f.event() == "broadcast")
        .await;
    // Refusals: a join with an expired token, a forged socket token, a private join.
    let (_, reply) = c
        .join(
            "realtime:other",
            json!({"config": {}, "access_token": expired}),
        )
        .await;
    assert_eq!(reply.payload()["status"], "error");
    let (_, reply) = c
        .join(
            "realtime:priv",
            json!({"config": {"private": true}, "access_token": forged}),
        )
        .await;
    assert_eq!(reply.payload()["status"], "error");
    let url = server.ws_url("/socket/websocket", &format!("apikey={forged}&vsn=2.0.0"));
    assert!(server.connect_url(Vsn::V2, &url, &[]).await.is_err());
    // REST with a bearer token, metrics with a wrong and a right one.
    let (status, _, _) = http(
        "POST",
        &server.http("/api/broadcast"),
        &[("authorization", &format!("Bearer {good}"))],
        json!({"messages":[{"topic":"room","event":"e","payload":{}}]})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(status, 202);
    let metrics_token = {
        let key = jsonwebtoken::EncodingKey::from_secret(metrics_secret.as_bytes());
        sign_with(
            jsonwebtoken::Algorithm::HS256,
            None,
            &key,
            json!({"role": "metrics", "exp": now() + 60}),
        )
    };
    let (status, _, _) = http(
        "GET",
        &server.http("/metrics"),
        &[("authorization", &format!("Bearer {metrics_token}"))],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = http(
        "GET",
        &server.http("/metrics"),
        &[("authorization", &format!("Bearer {forged}"))],
        b"",
    )
    .await;
    assert_eq!(status, 403);

    server.terminate();
    server.wait_exit(std::time::Duration::from_secs(10)).await;
    let text = std::fs::read_to_string(&log).expect("log");
    let _ = std::fs::remove_file(&log);
    // The log did record all this (so the checks below look at something).
    assert!(text.contains("join refused"), "{text}");
    assert!(text.contains("socket connection refused"), "{text}");
    assert!(text.contains("joined"), "{text}");
    for (what, secret) in [
        ("API_JWT_SECRET", SECRET),
        ("METRICS_JWT_SECRET", metrics_secret),
        ("socket token", good.as_str()),
        ("refreshed token", refreshed.as_str()),
        ("expired token", expired.as_str()),
        ("forged token", forged.as_str()),
        ("metrics token", metrics_token.as_str()),
    ] {
        assert!(!text.contains(secret), "{what} appears in the log");
        // Nor its signature alone.
        if let Some(sig) = secret.rsplit('.').next().filter(|s| s.len() > 20) {
            assert!(!text.contains(sig), "{what}'s signature appears in the log");
        }
    }
}
