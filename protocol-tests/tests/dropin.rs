//! walcast as a drop-in for the realtime service of self-hosted Supabase: its exact
//! environment, Kong's paths and Host, the compose health check, and metrics that move.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::json;

/// The fixture's variables with the compose placeholders filled in for the test database.
fn compose_env(db: &TestDb) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(fixture("self-hosted.env")).unwrap();
    let fill = |v: &str| {
        v.replace("${POSTGRES_HOST}", "127.0.0.1")
            .replace("${POSTGRES_PORT}", &db.port.to_string())
            .replace("${POSTGRES_PASSWORD}", "unused-with-trust-auth")
            .replace("${POSTGRES_DB}", &db.name)
            .replace("${JWT_SECRET}", SECRET)
            .replace(
                "${SECRET_KEY_BASE}",
                "UpNVntn3cDxHJpq99YMc1T1AQgQpc8kfYTuRgBiYa15BLrx8etQoXz3gZv1/u2oq",
            )
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), fill(v))
        })
        .collect()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_self_hosted_compose_environment_works_unchanged() {
    let db = TestDb::create("dropin").await;
    let admin = db.client().await;
    admin
        .batch_execute(
            "DO $$ BEGIN
               CREATE ROLE supabase_admin SUPERUSER LOGIN;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;",
        )
        .await
        .unwrap();
    let env = compose_env(&db);
    let mut vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // The only changes: a free port instead of 4000 (tests run side by side), and a slot of its
    // own in the shared test cluster.
    let slot = format!("s_{}", db.name);
    vars.push(("PORT", "0"));
    vars.push(("SLOT_NAME", &slot));
    let server = Server::start_with(&vars).await;

    // The socket through Kong's upstream path and Host.
    let anon = token("anon");
    let url = server.ws_url("/socket/websocket", &format!("apikey={anon}&vsn=2.0.0"));
    let mut c = server
        .connect_url(
            Vsn::V2,
            &url,
            &[
                ("host", "realtime-dev.supabase-realtime"),
                ("x-api-key", &anon),
            ],
        )
        .await
        .expect("connect like Kong does");
    c.join_ok(
        "realtime:room",
        json!({"broadcast": {"self": true, "ack": true}}),
    )
    .await;

    // The compose health check: HEAD with the anon key as bearer. Starting up is not an
    // outage: the first probe already passes.
    let health = server.http("/api/tenants/realtime-dev/health");
    let (status, _, body) = http(
        "HEAD",
        &health,
        &[
            ("host", "realtime-dev.supabase-realtime"),
            ("authorization", &format!("Bearer {anon}")),
        ],
        b"",
    )
    .await;
    assert_eq!((status, body.len()), (200, 0));
    // The body says when the replication stream is up.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, _, body) = http(
            "GET",
            &health,
            &[("authorization", &format!("Bearer {anon}"))],
            b"",
        )
        .await;
        assert_eq!(status, 200);
        let v = json_body(&body);
        assert_eq!(v["data"]["healthy"], true);
        assert_eq!(v["data"]["db_connected"], true);
        if v["data"]["replication_connected"] == true {
            assert_eq!(v["data"]["replication"], "streaming");
            break;
        }
        assert_eq!(v["data"]["replication"], "starting", "{v}");
        assert!(std::time::Instant::now() < deadline, "never streaming");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, _, body) = http("GET", &health, &[("authorization", "Bearer nope")], b"").await;
    assert_eq!((status, body.len()), (403, 0));

    // Metrics, with a bearer token signed by METRICS_JWT_SECRET, and counters that move.
    let metrics_token = sign(json!({"iss": "prometheus", "exp": now() + 60}));
    let scrape = || server.metrics(&metrics_token);
    let before = scrape().await;
    assert!(metric(&before, "walcast_connections") >= 1.0, "{before}");
    assert!(
        metric(&before, "walcast_joins_total{result=\"ok\"}") >= 1.0,
        "{before}"
    );
    for i in 0..5 {
        let r = format!("b{i}");
        c.send(
            None,
            Some(&r),
            "realtime:room",
            "broadcast",
            json!({"type":"broadcast","event":"e","payload":{"i":i}}),
        )
        .await;
        c.reply(&r).await;
    }
    c.barrier().await;
    let after = scrape().await;
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert!(
        delta("walcast_messages_in_total{kind=\"broadcast\"}") >= 5.0,
        "{after}"
    );
    assert!(
        delta("walcast_messages_out_total{kind=\"broadcast\"}") >= 5.0,
        "{after}"
    );
    assert!(delta("walcast_bytes_out_total") > 0.0);
    assert!(after.contains("walcast_replication_connected 1"), "{after}");
    // The WAL the database keeps for the slot is visible (read at start, then every 10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = scrape().await;
        if text.contains("walcast_slot_retained_wal_bytes ") {
            assert!(metric(&text, "walcast_slot_retained_wal_bytes") >= 0.0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no slot metric: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, _, _) = http("GET", &server.http("/metrics"), &[], b"").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn the_token_subcommand_signs_keys_walcast_accepts() {
    let out = tokio::process::Command::new(walcast_bin())
        .args([
            "token",
            "--role",
            "authenticated",
            "--sub",
            "user-1",
            "--claims",
            "{\"email\":\"a@b.c\"}",
        ])
        .env("API_JWT_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let server = Server::start().await;
    let mut c = server.connect(Vsn::V2, &tok).await;
    c.join_ok("realtime:t", json!({})).await;
    let data = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&tok)
        .unwrap()
        .claims;
    assert_eq!(
        (
            data["role"].as_str(),
            data["sub"].as_str(),
            data["email"].as_str()
        ),
        (Some("authenticated"), Some("user-1"), Some("a@b.c"))
    );
}
