//! Token lifecycle on a joined channel: access_token refresh, refusal, and expiry.

use protocol_tests::*;
use serde_json::json;

async fn expect_shutdown(c: &mut Client, topic: &str, jr: &str, message: &str) {
    let system = c.recv().await;
    assert_eq!(system.event(), "system", "{system:?}");
    assert_eq!(
        system.payload(),
        &json!({"extension":"system","status":"error","message":message,"channel":topic.trim_start_matches("realtime:")})
    );
    if c.vsn.is_v2() {
        assert_eq!(system.join_ref(), Some(&json!(jr)));
    }
    let close = c.recv().await;
    assert_eq!(close.event(), "phx_close");
    assert_eq!(close.msg_ref(), &json!(jr));
}

#[tokio::test]
async fn a_new_valid_token_is_taken_silently_and_the_channel_lives_on() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let jr = c
            .join_ok(
                "realtime:refresh",
                json!({"broadcast":{"self":true,"ack":true}}),
            )
            .await;
        for tok in [token("authenticated"), "sb_secret_x".to_owned()] {
            c.send(
                Some(&jr),
                Some("5"),
                "realtime:refresh",
                "access_token",
                json!({"access_token": tok}),
            )
            .await;
            c.assert_quiet().await; // no reply, ever
        }
        c.send(
            Some(&jr),
            Some("6"),
            "realtime:refresh",
            "access_token",
            json!({"access_token": null}),
        )
        .await;
        c.assert_quiet().await;
        c.send(
            Some(&jr),
            Some("7"),
            "realtime:refresh",
            "broadcast",
            json!({"type":"broadcast","event":"e","payload":{}}),
        )
        .await;
        let frames = c.barrier().await;
        assert!(
            frames.iter().any(|f| f.event() == "broadcast"),
            "{frames:?}"
        );
    }
}

#[tokio::test]
async fn a_bad_token_ends_the_channel_with_the_reason() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let cases = [
            (
                json!(""),
                "The token provided is not a valid JWT".to_owned(),
            ),
            (
                json!("garbage"),
                "The token provided is not a valid JWT".to_owned(),
            ),
            (
                json!(sign(json!({"exp": now() + 60}))),
                "Fields `role` and `exp` are required in JWT".to_owned(),
            ),
        ];
        for (tok, message) in cases {
            let jr = c.join_ok("realtime:bad", json!({})).await;
            c.send(
                Some(&jr),
                Some("9"),
                "realtime:bad",
                "access_token",
                json!({"access_token": tok}),
            )
            .await;
            expect_shutdown(&mut c, "realtime:bad", &jr, &message).await;
        }
        let jr = c.join_ok("realtime:bad", json!({})).await;
        c.send(
            Some(&jr),
            Some("9"),
            "realtime:bad",
            "access_token",
            json!({"access_token": sign(json!({"role":"anon","exp": now() - 5}))}),
        )
        .await;
        let system = c.recv().await;
        let msg = system.payload()["message"].as_str().unwrap().to_owned();
        assert!(
            msg.starts_with("Token has expired ") && msg.ends_with(" seconds ago"),
            "{msg}"
        );
        assert_eq!(c.recv().await.event(), "phx_close");
    }
}

#[tokio::test]
async fn channels_close_when_their_token_expires() {
    let server = Server::start().await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let short = sign(json!({"role":"anon","exp": now() + 2}));
        let (jr, f) = c
            .join(
                "realtime:short",
                json!({"config":{}, "access_token": short}),
            )
            .await;
        assert_eq!(f.payload()["status"], "ok");
        let long = c.join_ok("realtime:long", json!({})).await;
        let system = c.recv().await;
        assert_eq!(system.event(), "system");
        assert_eq!(system.topic(), "realtime:short");
        let msg = system.payload()["message"].as_str().unwrap();
        assert!(
            msg == "Token has expired 0 seconds ago" || msg == "Token has expired 1 seconds ago",
            "{msg}"
        );
        let close = c.recv().await;
        assert_eq!(close.event(), "phx_close");
        assert_eq!(close.msg_ref(), &json!(jr));
        // The other channel, on the socket's token, is untouched.
        c.send(
            Some(&long),
            Some("3"),
            "realtime:long",
            "phx_leave",
            json!({}),
        )
        .await;
        assert_eq!(c.reply("3").await.payload()["status"], "ok");
    }
}
