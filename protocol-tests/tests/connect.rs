//! Socket connect: endpoints, serializer negotiation, token sources and every refusal.

use jsonwebtoken::{Algorithm, EncodingKey};
use protocol_tests::*;
use serde_json::json;

async fn refused(server: &Server, query: &str) -> (u16, serde_json::Value) {
    match server
        .connect_url(Vsn::V1, &server.ws_url("/socket/websocket", query), &[])
        .await
    {
        Ok(_) => panic!("connect with {query} should have been refused"),
        Err((status, body)) => (status, serde_json::from_str(&body).unwrap_or(json!(body))),
    }
}

#[tokio::test]
async fn both_paths_serve_the_socket_and_heartbeats_are_answered() {
    let server = Server::start().await;
    let tok = token("anon");
    for path in ["/socket/websocket", "/realtime/v1/websocket"] {
        for vsn in BOTH {
            let url = server.ws_url(path, &format!("apikey={tok}&vsn={}", vsn.param().unwrap()));
            let mut c = server.connect_url(vsn, &url, &[]).await.expect("connect");
            c.send(None, Some("7"), "phoenix", "heartbeat", json!({}))
                .await;
            let reply = c.recv().await;
            match vsn {
                Vsn::V2 => assert_eq!(
                    c.raw.last().unwrap(),
                    r#"[null,"7","phoenix","phx_reply",{"status":"ok","response":{}}]"#
                ),
                _ => {
                    assert_eq!(reply.join_ref(), None, "V1 never emits join_ref");
                    let v: serde_json::Value = serde_json::from_str(c.raw.last().unwrap()).unwrap();
                    assert_eq!(
                        v,
                        json!({"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"7"})
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn absent_vsn_means_v1_and_unknown_vsn_is_403() {
    let server = Server::start().await;
    let tok = token("anon");
    let mut c = server.connect(Vsn::Default, &tok).await;
    c.send(None, Some("1"), "phoenix", "heartbeat", json!({}))
        .await;
    let f = c.recv().await;
    assert_eq!(f.payload()["status"], "ok");
    assert!(
        c.raw[0].starts_with('{'),
        "V1 object expected: {}",
        c.raw[0]
    );

    let err = server
        .connect_url(
            Vsn::V1,
            &server.ws_url("/socket/websocket", &format!("apikey={tok}&vsn=3.0.0")),
            &[],
        )
        .await
        .err()
        .expect("refused");
    assert_eq!(err, (403, String::new()));
}

/// As CONFIG.md says (the original's `~> 1.0.0` / `~> 2.0.0`): patch releases speak their
/// serializer, other minor or major versions are refused.
#[tokio::test]
async fn patch_versions_speak_their_serializer_and_other_versions_are_403() {
    let server = Server::start().await;
    let tok = token("anon");
    for (param, vsn, first) in [("2.0.1", Vsn::V2, '['), ("1.0.2", Vsn::V1, '{')] {
        let url = server.ws_url("/socket/websocket", &format!("apikey={tok}&vsn={param}"));
        let mut c = server.connect_url(vsn, &url, &[]).await.expect("connect");
        c.send(None, Some("1"), "phoenix", "heartbeat", json!({}))
            .await;
        assert_eq!(c.recv().await.payload()["status"], "ok", "{param}");
        assert!(c.raw[0].starts_with(first), "{param}: {}", c.raw[0]);
    }
    for param in ["2.1.0", "1.1.0", "2.0"] {
        let url = server.ws_url("/socket/websocket", &format!("apikey={tok}&vsn={param}"));
        let err = server.connect_url(Vsn::V1, &url, &[]).await.err();
        assert_eq!(err, Some((403, String::new())), "{param}");
    }
}

#[tokio::test]
async fn refusals_carry_the_original_status_and_error_strings() {
    let server = Server::start().await;
    let cases = [
        ("vsn=2.0.0".to_owned(), "API key is missing"),
        (
            "apikey=not-a-jwt&vsn=2.0.0".to_owned(),
            "The token provided is not a valid JWT",
        ),
        (
            format!(
                "apikey={}",
                jsonwebtoken::encode(
                    &jsonwebtoken::Header::default(),
                    &json!({"role":"anon","exp":now()+60}),
                    &EncodingKey::from_secret(b"wrong")
                )
                .unwrap()
            ),
            "Failed to validate JWT signature",
        ),
        (
            format!("apikey={}", sign(json!({"role":"anon","exp":now()-30}))),
            "Token has expired",
        ),
        (
            format!("apikey={}", sign(json!({"exp":now()+60}))),
            "Fields `role` and `exp` are required in JWT",
        ),
        (
            format!("apikey={}", sign(json!({"role":"anon"}))),
            "Fields `role` and `exp` are required in JWT",
        ),
    ];
    for (query, message) in cases {
        let (status, body) = refused(&server, &query).await;
        assert_eq!(status, 401, "{query}");
        assert_eq!(body, json!({ "error": message }), "{query}");
    }
}

#[tokio::test]
async fn x_api_key_header_wins_over_the_query_parameter() {
    let server = Server::start().await;
    let good = token("anon");
    let url = server.ws_url("/socket/websocket", "apikey=garbage&vsn=2.0.0");
    assert!(server
        .connect_url(Vsn::V2, &url, &[("x-api-key", &good)])
        .await
        .is_ok());
    let url = server.ws_url("/socket/websocket", &format!("apikey={good}&vsn=2.0.0"));
    let err = server
        .connect_url(Vsn::V2, &url, &[("x-api-key", "garbage")])
        .await
        .err()
        .expect("refused");
    assert_eq!(err.0, 401);
}

#[tokio::test]
async fn connect_errors_wait_for_the_backoff() {
    let server = Server::start_with(&[("CONNECT_ERROR_BACKOFF_MS", "400")]).await;
    let start = std::time::Instant::now();
    let (status, _) = refused(&server, "apikey=nope").await;
    assert_eq!(status, 401);
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(400),
        "answered after {:?}",
        start.elapsed()
    );
}

fn jwks_server_env() -> Vec<(&'static str, String)> {
    vec![(
        "JWT_JWKS",
        std::fs::read_to_string(fixture("jwks.json")).unwrap(),
    )]
}

#[tokio::test]
async fn jwks_keys_verify_rsa_ec_eddsa_and_oct_tokens_by_kid() {
    let env = jwks_server_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_with(&env).await;
    let claims = json!({"role":"authenticated","exp":now()+600});
    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    let ec = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap();
    let ed = EncodingKey::from_ed_pem(&std::fs::read(fixture("ed_private.pem")).unwrap()).unwrap();
    let oct = EncodingKey::from_secret(b"a-secret-only-the-jwks-knows-0123456789");
    let good = [
        sign_with(Algorithm::RS256, Some("rsa-1"), &rsa, claims.clone()),
        sign_with(Algorithm::PS256, Some("rsa-1"), &rsa, claims.clone()),
        sign_with(Algorithm::ES256, Some("ec-1"), &ec, claims.clone()),
        sign_with(Algorithm::EdDSA, Some("ed-1"), &ed, claims.clone()),
        sign_with(Algorithm::HS256, Some("oct-1"), &oct, claims.clone()),
        // HS256 with a kid the JWKS does not have: the secret is used, as Supabase Auth tokens need.
        sign_with(
            Algorithm::HS256,
            Some("not-in-jwks"),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            claims.clone(),
        ),
    ];
    for tok in &good {
        let mut c = server.connect(Vsn::V2, tok).await;
        c.join_ok("realtime:jwks", json!({})).await;
    }

    let (status, body) = refused(
        &server,
        &format!(
            "apikey={}",
            sign_with(Algorithm::RS256, Some("nope"), &rsa, claims.clone())
        ),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        body["error"],
        "Failed to generate JWT signer for key ID (kid) \"nope\", check your JWT secret or JWKS configuration"
    );
    // An RS token signed by a key whose kid names the EC key: wrong key type, no signer.
    let (_, body) = refused(
        &server,
        &format!(
            "apikey={}",
            sign_with(Algorithm::RS256, Some("ec-1"), &rsa, claims.clone())
        ),
    )
    .await;
    assert!(body["error"]
        .as_str()
        .unwrap()
        .starts_with("Failed to generate JWT signer for key ID"));
    // HS/RS confusion: an HS256 token whose secret is the RSA public key must not verify.
    let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let confused = sign_with(
        Algorithm::HS256,
        Some("rsa-1"),
        &EncodingKey::from_secret(&public_pem),
        claims.clone(),
    );
    let (status, body) = refused(&server, &format!("apikey={confused}")).await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (401, "Failed to validate JWT signature")
    );
    // alg none.
    let b64 = |v: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!("{}.{}.", b64(json!({"alg":"none"})), b64(claims));
    let (_, body) = refused(&server, &format!("apikey={none}")).await;
    assert_eq!(
        body["error"],
        "Failed to generate JWT signer, check your JWT secret or JWKS configuration"
    );
}

#[tokio::test]
async fn dev_mode_serves_on_loopback_with_its_own_postgres_and_prints_keys_that_work() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let dir = std::env::temp_dir().join(format!("walcast-dev-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = tokio::process::Command::new(walcast_bin())
        .arg("dev")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("WALCAST_DEV_DIR", &dir)
        .env("STARTUP_GRACE_MS", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start walcast dev");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut port = None;
    let mut db_url = None;
    let mut keys = std::collections::HashMap::new();
    while keys.len() < 2 || db_url.is_none() {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("dev output")
            .unwrap()
            .expect("line");
        if let Some(rest) = line.strip_prefix("walcast listening on http://") {
            assert!(
                rest.starts_with("127.0.0.1:"),
                "dev listens on loopback only: {rest}"
            );
            port = rest.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        }
        if let Some(url) = line.trim().strip_prefix("PostgreSQL:") {
            db_url = Some(url.trim().to_owned());
        }
        for role in ["anon", "service_role"] {
            if let Some(k) = line.trim().strip_prefix(&format!("{role} key:")) {
                keys.insert(role, k.trim().to_owned());
            }
        }
    }
    let port = port.expect("port line");
    for (role, key) in &keys {
        let url = format!("ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={key}&vsn=2.0.0");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("{role} key refused: {e}"));
        let mut c = Client::new(ws, Vsn::V2);
        c.join_ok("realtime:dev", json!({})).await;
    }

    // The printed database works, and postgres_changes flow with no set-up beyond a table.
    let (sql, conn) = tokio_postgres::connect(db_url.as_deref().unwrap(), tokio_postgres::NoTls)
        .await
        .expect("dev database");
    tokio::spawn(conn);
    sql.batch_execute(
        "CREATE TABLE notes (id serial PRIMARY KEY, body text);
         GRANT SELECT ON notes TO anon;
         ALTER PUBLICATION supabase_realtime ADD TABLE notes;",
    )
    .await
    .unwrap();
    let url = format!(
        "ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={}&vsn=2.0.0",
        keys["anon"]
    );
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut c = Client::new(ws, Vsn::V2);
    c.join_ok(
        "realtime:notes",
        json!({"postgres_changes":[{"event":"INSERT","schema":"public","table":"notes"}]}),
    )
    .await;
    let subscribed = c.recv().await;
    assert_eq!(subscribed.payload()["message"], "Subscribed to PostgreSQL");
    sql.batch_execute("INSERT INTO notes (body) VALUES ('from dev')")
        .await
        .unwrap();
    let ev = c
        .recv_until("insert", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(
        ev.payload()["data"]["record"],
        json!({"id": 1, "body": "from dev"})
    );

    // SIGTERM: walcast stops, and stops its PostgreSQL.
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !dir.join("pg/data/postmaster.pid").exists(),
        "the dev cluster was stopped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn allowed_origins_refuse_other_browser_pages_but_not_clients_without_origin() {
    let server = Server::start_with(&[(
        "ALLOWED_ORIGINS",
        "https://app.example.com, https://*.widget.io",
    )])
    .await;
    let url = server.ws_url(
        "/socket/websocket",
        &format!("apikey={}&vsn=2.0.0", token("anon")),
    );
    for (origin, ok) in [
        ("https://app.example.com", true),
        ("https://shop.widget.io", true),
        ("https://evil.example", false),
        ("https://app.example.com.evil.example", false),
        ("null", false),
    ] {
        let result = server
            .connect_url(Vsn::V2, &url, &[("origin", origin)])
            .await;
        match (ok, result) {
            (true, Ok(mut c)) => {
                c.join_ok("realtime:o", json!({})).await;
            }
            (false, Err((status, _))) => assert_eq!(status, 403, "{origin}"),
            (ok, r) => panic!("{origin}: expected ok={ok}, got {:?}", r.err()),
        }
    }
    // No Origin header (a server or a mobile app): not a browser, not refused.
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    c.join_ok("realtime:o", json!({})).await;
}

/// A connection that never completes a request is closed after HTTP_REQUEST_TIMEOUT_MS (plus the
/// connect back-off); one that was answered in time (an upgraded socket, a refusal waiting out
/// its back-off) is not.
#[tokio::test]
async fn connections_that_send_no_complete_request_are_closed_in_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start_with(&[
        ("HTTP_REQUEST_TIMEOUT_MS", "300"),
        ("CONNECT_ERROR_BACKOFF_MS", "600"),
    ])
    .await;
    let mut socket = server.connect(Vsn::V2, &token("anon")).await;
    let bad = server.ws_url("/socket/websocket", "apikey=garbage&vsn=2.0.0");
    let refused = tokio::spawn(async move { tokio_tungstenite::connect_async(bad).await });
    let started = std::time::Instant::now();
    let addr = format!("127.0.0.1:{}", server.port);
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut dribbling = tokio::net::TcpStream::connect(&addr).await.unwrap();
    dribbling
        .write_all(b"GET /socket/websocket HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    for (name, conn) in [("silent", &mut silent), ("dribbling", &mut dribbling)] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the {name} connection was still open after {WAIT:?}"));
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the {name} connection got {read:?}"
        );
        eprintln!("{name} closed after {:?}", started.elapsed());
    }
    // The refusal waited 600 ms, past the 300 ms, and still got its reply.
    match refused.await.unwrap() {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401)
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
    // The upgraded socket, older than both, lives on.
    socket.assert_quiet().await;
}
