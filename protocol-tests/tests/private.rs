//! Private channels (policies on realtime.messages), broadcast from the database, replay.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

const POLICIES: &str = "
    CREATE TABLE members (topic text NOT NULL, user_id uuid NOT NULL, can_write boolean NOT NULL DEFAULT false);
    GRANT SELECT ON members TO authenticated;
    CREATE POLICY members_read ON realtime.messages FOR SELECT TO authenticated
        USING (EXISTS (SELECT 1 FROM members m WHERE m.topic = realtime.topic() AND m.user_id = auth.uid()));
    CREATE POLICY members_write ON realtime.messages FOR INSERT TO authenticated
        WITH CHECK (EXISTS (SELECT 1 FROM members m WHERE m.topic = realtime.topic() AND m.user_id = auth.uid() AND m.can_write));
";

fn user(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn user_token(n: u32) -> String {
    sign(json!({"role":"authenticated","sub": user(n),"exp": now() + 3600}))
}

async fn setup(hint: &str) -> (TestDb, Server, tokio_postgres::Client) {
    let db = TestDb::create(hint).await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    sql.batch_execute(POLICIES).await.unwrap();
    // Room "room": user 1 reads and writes, user 2 only reads; user 3 is not a member.
    sql.batch_execute(&format!(
        "INSERT INTO members VALUES ('room', '{}', true), ('room', '{}', false)",
        user(1),
        user(2)
    ))
    .await
    .unwrap();
    (db, server, sql)
}

fn private(extra: Value) -> Value {
    let mut cfg = json!({"private": true, "broadcast": {"ack": true, "self": false}, "presence": {"enabled": true}});
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    cfg
}

#[tokio::test]
async fn joins_sends_and_presence_follow_the_policies() {
    let (_db, server, _sql) = setup("private").await;
    for vsn in BOTH {
        let mut writer = server.connect(vsn, &user_token(1)).await;
        let mut reader = server.connect(vsn, &user_token(2)).await;
        let mut outsider = server.connect(vsn, &user_token(3)).await;
        let mut anon = server.connect(vsn, &token("anon")).await;
        let jw = writer.join_ok("realtime:room", private(json!({}))).await;
        assert_eq!(writer.recv().await.event(), "presence_state");
        let jr = reader.join_ok("realtime:room", private(json!({}))).await;
        assert_eq!(reader.recv().await.event(), "presence_state");
        for c in [&mut outsider, &mut anon] {
            let (_, reply) = c
                .join("realtime:room", json!({"config": private(json!({}))}))
                .await;
            assert_eq!(
                reply.payload(),
                &json!({"status":"error","response":{"reason":"Unauthorized: You do not have permissions to read from this Channel topic: room"}})
            );
        }

        // The writer's broadcast is acked and delivered; the reader's is dropped without an ack.
        writer
            .send(
                Some(&jw),
                Some("10"),
                "realtime:room",
                "broadcast",
                json!({"type":"broadcast","event":"msg","payload":{"from":"writer"}}),
            )
            .await;
        assert_eq!(writer.reply("10").await.payload()["status"], "ok");
        assert_eq!(
            reader.recv().await.payload()["payload"],
            json!({"from":"writer"})
        );
        reader
            .send(
                Some(&jr),
                Some("11"),
                "realtime:room",
                "broadcast",
                json!({"type":"broadcast","event":"msg","payload":{"from":"reader"}}),
            )
            .await;
        if vsn.is_v2() {
            reader
                .send_binary(kind3(
                    &jr,
                    "12",
                    "realtime:room",
                    "msg",
                    b"",
                    true,
                    br#"{"from":"reader"}"#,
                ))
                .await;
        }
        reader.assert_quiet().await; // no ack
        writer.assert_quiet().await; // nothing delivered

        // A public channel of the same name is another topic.
        let mut public = server.connect(vsn, &user_token(3)).await;
        public.join_ok("realtime:room", json!({})).await;
        writer
            .send(
                Some(&jw),
                Some("13"),
                "realtime:room",
                "broadcast",
                json!({"type":"broadcast","event":"msg","payload":{"n":2}}),
            )
            .await;
        writer.reply("13").await;
        reader.recv().await;
        public.assert_quiet().await;

        // Presence: the writer may track, the reader may not.
        writer
            .send(
                Some(&jw),
                Some("20"),
                "realtime:room",
                "presence",
                json!({"type":"presence","event":"track","payload":{"who":"writer"}}),
            )
            .await;
        assert_eq!(
            writer.reply("20").await.payload(),
            &json!({"status":"ok","response":{}})
        );
        let diff = reader
            .recv_until("presence diff", |f| f.event() == "presence_diff")
            .await;
        let joins = diff.payload()["joins"].as_object().unwrap();
        assert_eq!(joins.values().next().unwrap()["metas"][0]["who"], "writer");
        reader
            .send(
                Some(&jr),
                Some("21"),
                "realtime:room",
                "presence",
                json!({"type":"presence","event":"track","payload":{"who":"reader"}}),
            )
            .await;
        assert_eq!(
            reader.reply("21").await.payload(),
            &json!({"status":"error","response":{}})
        );
        writer
            .recv_until("own diff", |f| f.event() == "presence_diff")
            .await;
        writer.assert_quiet().await;
    }
}

#[tokio::test]
async fn losing_access_on_token_refresh_ends_the_channel() {
    let (_db, server, _sql) = setup("lose").await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &user_token(1)).await;
        let jr = c.join_ok("realtime:room", private(json!({}))).await;
        c.recv().await; // presence_state
                        // Another member's token keeps access.
        c.send(
            Some(&jr),
            None,
            "realtime:room",
            "access_token",
            json!({"access_token": user_token(2)}),
        )
        .await;
        c.assert_quiet().await;
        // A non-member's token loses it.
        c.send(
            Some(&jr),
            None,
            "realtime:room",
            "access_token",
            json!({"access_token": user_token(3)}),
        )
        .await;
        let sys = c.recv().await;
        assert_eq!(
            sys.payload(),
            &json!({"extension":"system","status":"error","message":"You no longer have permission to read from this Channel topic: room","channel":"room"})
        );
        assert_eq!(c.recv().await.event(), "phx_close");
    }
}

#[tokio::test]
async fn broadcast_from_the_database_under_both_serializers() {
    let (_db, server, sql) = setup("dbcast").await;
    let mut v1 = server.connect(Vsn::V1, &user_token(2)).await;
    let mut v2 = server.connect(Vsn::V2, &user_token(2)).await;
    let mut public_v2 = server.connect(Vsn::V2, &token("anon")).await;
    let mut outsider = server.connect(Vsn::V2, &user_token(3)).await;
    v1.join_ok(
        "realtime:room",
        private(json!({"presence": {"enabled": false}})),
    )
    .await;
    v2.join_ok(
        "realtime:room",
        private(json!({"presence": {"enabled": false}})),
    )
    .await;
    public_v2.join_ok("realtime:news", json!({})).await;
    outsider.join_ok("realtime:room", json!({})).await; // the public "room"

    // Private by default, as realtime.send's signature says.
    sql.batch_execute("SELECT realtime.send('{\"text\":\"hello\"}'::jsonb, 'chat', 'room')")
        .await
        .unwrap();
    let id: String = sql
        .query_one(
            "SELECT id::text FROM realtime.messages WHERE event = 'chat'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    match v2.recv().await {
        Frame::Binary {
            topic,
            event,
            meta,
            json,
            payload,
        } => {
            assert_eq!(
                (topic.as_str(), event.as_str(), json),
                ("realtime:room", "chat", true)
            );
            assert_eq!(meta, Some(json!({"id": id})));
            let p: Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(p, json!({"text":"hello","id": id}));
        }
        other => panic!("expected kind 4, got {other:?}"),
    }
    let f = v1.recv().await;
    assert_eq!(f.event(), "broadcast");
    assert_eq!(
        f.payload(),
        &json!({"event":"chat","payload":{"text":"hello","id":id},"type":"broadcast","meta":{"id":id}})
    );
    outsider.assert_quiet().await;

    // Public, and binary.
    sql.batch_execute("SELECT realtime.send('{\"n\":1}'::jsonb, 'pub', 'news', false)")
        .await
        .unwrap();
    let f = public_v2.recv().await;
    assert!(
        matches!(f, Frame::Binary { ref event, .. } if event == "pub"),
        "{f:?}"
    );
    sql.batch_execute("SELECT realtime.send_binary('\\x00ff'::bytea, 'bin', 'room')")
        .await
        .unwrap();
    match v2.recv().await {
        Frame::Binary { json, payload, .. } => assert_eq!((json, payload), (false, vec![0, 255])),
        other => panic!("expected kind 4, got {other:?}"),
    }
    v1.assert_quiet().await; // V1 cannot carry binary payloads

    // broadcast_changes from a trigger.
    sql.batch_execute(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         CREATE FUNCTION notes_broadcast() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
         BEGIN
           PERFORM realtime.broadcast_changes('room', TG_OP, TG_OP, TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
           RETURN NULL;
         END $$;
         CREATE TRIGGER notes_broadcast AFTER INSERT OR UPDATE OR DELETE ON notes FOR EACH ROW EXECUTE FUNCTION notes_broadcast();
         INSERT INTO notes VALUES (1, 'hi');",
    )
    .await
    .unwrap();
    let f = v1.recv().await;
    let p = f.payload();
    assert_eq!(p["event"], "INSERT");
    assert_eq!(p["payload"]["record"], json!({"id": 1, "body": "hi"}));
    assert_eq!(p["payload"]["old_record"], json!(null));
    assert_eq!(
        (
            p["payload"]["operation"].as_str(),
            p["payload"]["table"].as_str(),
            p["payload"]["schema"].as_str()
        ),
        (Some("INSERT"), Some("notes"), Some("public"))
    );
    assert_eq!(p["meta"]["id"], p["payload"]["id"]);
}

#[tokio::test]
async fn replay_pushes_stored_messages_oldest_first_once() {
    let (_db, server, sql) = setup("replay").await;
    for i in 0..30 {
        sql.execute(
            "SELECT realtime.send(jsonb_build_object('n', $1::int), 'chat', 'room')",
            &[&i],
        )
        .await
        .unwrap();
    }
    let since = 0;
    let mut last = 29; // the newest stored message so far
    for vsn in BOTH {
        let mut c = server.connect(vsn, &user_token(2)).await;
        let (jr, reply) = c
            .join("realtime:room", json!({"config": private(json!({"presence": {"enabled": false}, "broadcast": {"replay": {"since": since, "limit": 5}}}))}))
            .await;
        assert_eq!(reply.payload()["status"], "ok", "{reply:?}");
        let mut got = Vec::new();
        for _ in 0..5 {
            let f = c.recv().await;
            assert_eq!(f.event(), "broadcast");
            if vsn.is_v2() {
                assert_eq!(f.join_ref(), Some(&json!(jr)), "replays are channel pushes");
            }
            assert_eq!(f.payload()["meta"]["replayed"], true);
            got.push(f.payload()["payload"]["n"].as_i64().unwrap());
        }
        assert_eq!(got, ((last - 4)..=last).collect::<Vec<i64>>());
        // Live messages still flow, each once.
        last += 1;
        sql.execute(
            "SELECT realtime.send(jsonb_build_object('n', $1::int), 'chat', 'room')",
            &[&(last as i32)],
        )
        .await
        .unwrap();
        let live = c.recv().await;
        let n = match &live {
            Frame::Binary { payload, meta, .. } => {
                assert!(meta.as_ref().unwrap().get("replayed").is_none());
                serde_json::from_slice::<Value>(payload).unwrap()["n"].as_i64()
            }
            other => other.payload()["payload"]["n"].as_i64(),
        };
        assert_eq!(n, Some(last));
        c.assert_quiet().await;
    }
    // A message stored right before the join is replayed and, if it also arrives live, sent once.
    let mut c = server.connect(Vsn::V1, &user_token(2)).await;
    sql.batch_execute("SELECT realtime.send('{\"n\":131}'::jsonb, 'chat', 'room')")
        .await
        .unwrap();
    let (_, reply) = c
        .join("realtime:room", json!({"config": private(json!({"presence": {"enabled": false}, "broadcast": {"replay": {"since": now() * 1000 - 60_000, "limit": 25}}}))}))
        .await;
    assert_eq!(reply.payload()["status"], "ok");
    let mut frames = Vec::new();
    frames.extend(c.barrier().await);
    sql.batch_execute("SELECT realtime.send('{\"n\":132}'::jsonb, 'chat', 'room')")
        .await
        .unwrap();
    frames.push(c.recv().await);
    let ns: Vec<i64> = frames
        .iter()
        .filter_map(|f| f.payload()["payload"]["n"].as_i64())
        .collect();
    assert_eq!(ns.iter().filter(|n| **n == 131).count(), 1, "{ns:?}");
    assert_eq!(ns.last(), Some(&132));

    // The original's errors.
    let mut c = server.connect(Vsn::V2, &user_token(2)).await;
    let (_, reply) = c
        .join(
            "realtime:pub",
            json!({"config": {"broadcast": {"replay": {"since": 0}}}}),
        )
        .await;
    assert_eq!(
        reply.payload()["response"]["reason"],
        "UnableToReplayMessages: Replay is not allowed for public channels"
    );
    let (_, reply) = c
        .join(
            "realtime:room",
            json!({"config": private(json!({"broadcast": {"replay": {"since": "yesterday"}}}))}),
        )
        .await;
    assert_eq!(
        reply.payload()["response"]["reason"],
        "UnableToReplayMessages: Replay params are not valid"
    );
}

#[tokio::test]
async fn rest_private_broadcasts_obey_the_write_policy() {
    let (_db, server, _sql) = setup("rest").await;
    let mut member = server.connect(Vsn::V2, &user_token(2)).await;
    member
        .join_ok(
            "realtime:room",
            private(json!({"presence": {"enabled": false}})),
        )
        .await;
    let url = server.http("/api/broadcast");
    let msg = |text: &str| {
        json!({"messages":[{"topic":"room","event":"e","payload":{"t":text},"private":true}]})
            .to_string()
    };
    for (n, text, delivered) in [
        (1u32, "from writer", true),
        (2, "from reader", false),
        (3, "from outsider", false),
    ] {
        let auth = format!("Bearer {}", user_token(n));
        let (status, _, _) = http(
            "POST",
            &url,
            &[("authorization", &auth)],
            msg(text).as_bytes(),
        )
        .await;
        assert_eq!(status, 202);
        let frames = member.barrier().await;
        assert_eq!(
            frames.iter().any(|f| f.payload()["payload"]["t"] == text),
            delivered,
            "{text}: {frames:?}"
        );
    }
    let single = server.http("/api/broadcast/room/events/e?private=true");
    let (status, _, _) = http(
        "POST",
        &single,
        &[
            ("authorization", &format!("Bearer {}", user_token(1))),
            ("content-type", "application/json"),
        ],
        b"{\"s\":1}",
    )
    .await;
    assert_eq!(status, 202);
    assert!(matches!(member.recv().await, Frame::Binary { .. }));
    let (status, _, body) = http(
        "POST",
        &single,
        &[
            ("authorization", &format!("Bearer {}", user_token(3))),
            ("content-type", "application/json"),
        ],
        b"{}",
    )
    .await;
    assert_eq!(
        (status, json_body(&body)),
        (403, json!({"message":"Unauthorized"}))
    );
}

#[tokio::test]
async fn messages_sent_while_walcast_is_down_are_kept_and_replayable() {
    let (db, mut server, sql) = setup("restart").await;
    server.terminate();
    server.wait_exit(std::time::Duration::from_secs(15)).await;
    let before = now() * 1000 - 1000;
    sql.batch_execute("SELECT realtime.send('{\"while\":\"down\"}'::jsonb, 'chat', 'room')")
        .await
        .unwrap();
    let server = Server::start_with_db(&db, &[]).await;
    let mut c = server.connect(Vsn::V2, &user_token(2)).await;
    let (_, reply) = c
        .join("realtime:room", json!({"config": private(json!({"presence": {"enabled": false}, "broadcast": {"replay": {"since": before}}}))}))
        .await;
    assert_eq!(reply.payload()["status"], "ok");
    let f = c.recv().await;
    assert_eq!(
        f.payload()["payload"],
        json!({"while":"down","id": f.payload()["meta"]["id"]})
    );
    assert_eq!(f.payload()["meta"]["replayed"], true);
}

#[tokio::test]
async fn the_janitor_removes_messages_past_the_retention() {
    let db = TestDb::create("janitor").await;
    // Migrate first so that realtime.messages exists, then plant an old and a recent message.
    let server = Server::start_with_db(&db, &[("RUN_JANITOR", "false")]).await;
    drop(server);
    let sql = db.client().await;
    sql.batch_execute(
        "INSERT INTO realtime.messages (topic, extension, payload, event, private, inserted_at)
         VALUES ('room', 'broadcast', '{}', 'old', true, (now() AT TIME ZONE 'UTC') - interval '100 hours'),
                ('room', 'broadcast', '{}', 'new', true, (now() AT TIME ZONE 'UTC') - interval '1 hour')",
    )
    .await
    .unwrap();
    let _server = Server::start_with_db(&db, &[("MESSAGES_RETENTION_HOURS", "72")]).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let events: Vec<String> = sql
            .query("SELECT event FROM realtime.messages ORDER BY event", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if events == ["new"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "janitor did not run: {events:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
