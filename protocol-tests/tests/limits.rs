//! The server-wide limits of the original, with its replies: concurrent users, joins per second,
//! events per second (fan-out counted), presence events per second. Short rate buckets
//! (`RATE_COUNTER_TICK_MS`) keep the tests quick; the counting is the production one.

use std::time::{Duration, Instant};

use protocol_tests::*;
use serde_json::json;

const TICK: (&str, &str) = ("RATE_COUNTER_TICK_MS", "100");

fn until(what: &str) -> impl FnMut() {
    let deadline = Instant::now() + Duration::from_secs(20);
    let what = what.to_owned();
    move || assert!(Instant::now() < deadline, "timed out waiting for {what}")
}

/// A new V2 socket with an anon token; `Err` carries the refused upgrade's status and body.
async fn try_connect(server: &Server) -> Result<Client, (u16, String)> {
    let url = server.ws_url(
        "/socket/websocket",
        &format!("apikey={}&vsn=2.0.0", token("anon")),
    );
    server.connect_url(Vsn::V2, &url, &[]).await
}

#[tokio::test]
async fn concurrent_users_are_capped_at_connect_and_at_join_and_released_on_leave() {
    let server = Server::start_with(&[("TENANT_MAX_CONCURRENT_USERS", "2")]).await;
    let mut a = server.connect(Vsn::V2, &token("anon")).await;
    let mut b = server.connect(Vsn::V2, &token("anon")).await;
    // Connected but not joined: not a user yet.
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    let a_ref = a.join_ok("realtime:a", json!({})).await;
    b.join_ok("realtime:b", json!({})).await;
    // A user may join more channels.
    b.join_ok("realtime:b2", json!({})).await;

    let (_, reply) = c.join("realtime:c", json!({"config": {}})).await;
    assert_eq!(reply.payload()["status"], "error");
    assert_eq!(
        reply.payload()["response"]["reason"],
        "ConnectionRateLimitReached: Too many connected users"
    );
    // A new socket is refused at the upgrade, as the original: 429.
    let refused = try_connect(&server).await.err().expect("refused");
    assert_eq!(refused.0, 429);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&refused.1).unwrap(),
        json!({"error": "Too many connected users"})
    );

    // A leaves its only channel: no longer a user, so C gets in.
    let r = a.make_ref();
    a.send(Some(&a_ref), Some(&r), "realtime:a", "phx_leave", json!({}))
        .await;
    a.reply(&r).await;
    let mut tick = until("the user count to drop");
    loop {
        let (_, reply) = c.join("realtime:c", json!({"config": {}})).await;
        if reply.payload()["status"] == "ok" {
            break;
        }
        tick();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A closed socket frees its place too.
    drop(b);
    let mut tick = until("the closed socket to be released");
    loop {
        let (_, reply) = a.join("realtime:a", json!({"config": {}})).await;
        if reply.payload()["status"] == "ok" {
            break;
        }
        tick();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn too_many_joins_per_second_refuses_the_join_and_disconnects() {
    let server = Server::start_with(&[("TENANT_MAX_JOINS_PER_SECOND", "50"), TICK]).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    // Join (and leave, to stay under the channel limit) until the average crosses 50/s.
    let mut tick = until("the joins limit");
    let mut n = 0;
    let refused = loop {
        let topic = format!("realtime:j{}", n % 50);
        n += 1;
        let (_, reply) = c.join(&topic, json!({"config": {}})).await;
        if reply.payload()["status"] == "error" {
            break reply;
        }
        tick();
    };
    assert_eq!(
        refused.payload()["response"]["reason"],
        "ClientJoinRateLimitReached: Too many joins per second"
    );
    let (code, _) = c.closed().await.expect("close frame");
    assert_eq!(code, 1001);
    // While the limit holds, new sockets are refused at the upgrade.
    let refused = try_connect(&server).await.err().expect("refused");
    assert_eq!(refused.0, 429);
    assert!(
        refused.1.contains("Too many joins per second"),
        "{refused:?}"
    );
    // It clears once the average falls (12 buckets of 100 ms).
    let mut tick = until("the joins limit to clear");
    loop {
        if try_connect(&server).await.is_ok() {
            break;
        }
        tick();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn too_many_events_per_second_ends_the_sending_channel_and_refuses_rest() {
    // Fan-out counts: every broadcast goes to 20 listeners, so 20+ events each.
    let server = Server::start_with(&[("TENANT_MAX_EVENTS_PER_SECOND", "500"), TICK]).await;
    let mut listeners = Vec::new();
    for _ in 0..20 {
        let mut l = server.connect(Vsn::V2, &token("anon")).await;
        l.join_ok("realtime:room", json!({})).await;
        listeners.push(l);
    }
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    let jr = c.join_ok("realtime:room", json!({})).await;
    let mut tick = until("the events limit");
    let mut sent = 0;
    let system = loop {
        c.send(
            Some(&jr),
            None,
            "realtime:room",
            "broadcast",
            json!({"type":"broadcast","event":"typing","payload":{"n": sent}}),
        )
        .await;
        sent += 1;
        // A few at a time, then look for the verdict without waiting on a quiet socket.
        if sent % 5 == 0 {
            let frames = c.barrier().await;
            if let Some(i) = frames.iter().position(|f| f.event() == "system") {
                // The channel is closed right after the system message.
                assert!(
                    frames[i..]
                        .iter()
                        .any(|f| f.event() == "phx_close" && f.topic() == "realtime:room"),
                    "{frames:?}"
                );
                break frames[i].clone();
            }
        }
        tick();
    };
    assert_eq!(system.payload()["message"], "Too many messages per second");
    assert_eq!(system.payload()["status"], "error");
    assert!(sent < 200, "the limit took {sent} broadcasts to trigger");

    // REST broadcasts are refused while it holds.
    let (status, _, body) = http(
        "POST",
        &server.http("/api/broadcast"),
        &[("apikey", &token("anon"))],
        json!({"messages":[{"topic":"room","event":"e","payload":{}}]})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(json_body(&body), json!({"message": "Too many requests"}));
}

#[tokio::test]
async fn too_many_presence_events_per_second_ends_the_channel() {
    let server = Server::start_with(&[
        ("TENANT_MAX_PRESENCE_EVENTS_PER_SECOND", "20"),
        ("CLIENT_PRESENCE_MAX_CALLS", "100000"),
        TICK,
    ])
    .await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    let jr = c
        .join_ok(
            "realtime:online",
            json!({"presence":{"key":"me","enabled":true}}),
        )
        .await;
    let mut tick = until("the presence limit");
    let mut n = 0;
    let system = loop {
        let r = c.make_ref();
        c.send(
            Some(&jr),
            Some(&r),
            "realtime:online",
            "presence",
            json!({"type":"presence","event":"track","payload":{"n": n}}),
        )
        .await;
        n += 1;
        let f = c
            .recv_until("reply or verdict", |f| {
                f.event() == "system" || f.msg_ref() == &json!(r)
            })
            .await;
        if f.event() == "system" {
            break f;
        }
        tick();
    };
    assert_eq!(
        system.payload()["message"],
        "Too many presence messages per second"
    );
    c.recv_until("phx_close", |f| f.event() == "phx_close")
        .await;
}

/// A refused upgrade waits out CONNECT_ERROR_BACKOFF_MS holding its connection; only
/// CONNECT_ERROR_BACKOFF_MAX_WAITING do at once, and the next refusal is answered at once with
/// the same reply.
#[tokio::test]
async fn refused_upgrades_waiting_out_the_back_off_are_capped() {
    let server = Server::start_with(&[
        ("CONNECT_ERROR_BACKOFF_MS", "60000"),
        ("CONNECT_ERROR_BACKOFF_MAX_WAITING", "2"),
        ("METRICS_JWT_SECRET", SECRET),
    ])
    .await;
    let bad = server.ws_url("/socket/websocket", "apikey=garbage&vsn=2.0.0");
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let url = bad.clone();
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.is_ok() })
        })
        .collect();
    // Both are waiting (the gauge says so) before the next one is sent.
    let metrics_token = sign(json!({"exp": now() + 60}));
    let mut check = until("two refusals waiting");
    loop {
        let text = server.metrics(&metrics_token).await;
        if text
            .lines()
            .any(|l| l == "walcast_refused_upgrades_waiting 2")
        {
            break;
        }
        check();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let refused = server.connect_url(Vsn::V2, &bad, &[]).await;
    assert_eq!(
        refused.err(),
        Some((
            401,
            json!({"error": "The token provided is not a valid JWT"}).to_string()
        ))
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the third refusal waited {:?}",
        started.elapsed()
    );
    for w in waiting {
        w.abort();
    }
}
