//! postgres_changes end to end: a real PostgreSQL, the real binary, raw frames.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

/// Joins with bindings and waits for "Subscribed to PostgreSQL"; returns the binding ids.
async fn subscribe(c: &mut Client, topic: &str, bindings: Value) -> Vec<u64> {
    let (_, reply) = c
        .join(topic, json!({"config": {"postgres_changes": bindings}}))
        .await;
    assert_eq!(reply.payload()["status"], "ok", "{reply:?}");
    let ids = reply.payload()["response"]["postgres_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    let system = c
        .recv_until("system message", |f| f.event() == "system")
        .await;
    assert_eq!(
        system.payload(),
        &json!({"extension":"postgres_changes","status":"ok","message":"Subscribed to PostgreSQL","channel": topic.trim_start_matches("realtime:")}),
    );
    ids
}

async fn next_change(c: &mut Client) -> Value {
    let f = c
        .recv_until("postgres_changes", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(f.msg_ref(), &json!(null));
    f.payload().clone()
}

#[tokio::test]
async fn insert_update_delete_with_an_equality_filter() {
    let db = TestDb::create("basic").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE messages (id bigserial PRIMARY KEY, conversation_id int NOT NULL, body text);
         GRANT SELECT ON messages TO anon, authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE messages;",
    )
    .await
    .unwrap();

    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        let topic = format!("realtime:conv-5-{vsn:?}");
        let ids = subscribe(&mut c, &topic, json!([{"event":"*","schema":"public","table":"messages","filter":"conversation_id=eq.5"}])).await;

        sql.batch_execute("INSERT INTO messages (conversation_id, body) VALUES (6, 'not for you')")
            .await
            .unwrap();
        let row = sql
            .query_one(
                "INSERT INTO messages (conversation_id, body) VALUES (5, 'hello') RETURNING id",
                &[],
            )
            .await
            .unwrap();
        let id: i64 = row.get(0);
        let ev = next_change(&mut c).await;
        assert_eq!(ev["ids"], json!(ids));
        let data = &ev["data"];
        assert_eq!(data["type"], "INSERT");
        assert_eq!(data["schema"], "public");
        assert_eq!(data["table"], "messages");
        assert_eq!(
            data["record"],
            json!({"id": id, "conversation_id": 5, "body": "hello"})
        );
        assert_eq!(data["errors"], json!(null));
        assert!(data.get("old_record").is_none());
        assert_eq!(
            data["columns"],
            json!([{"name":"id","type":"int8"},{"name":"conversation_id","type":"int4"},{"name":"body","type":"text"}])
        );
        let ts = data["commit_timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), 24, "YYYY-MM-DDTHH:MM:SS.mmmZ: {ts}");
        assert!(ts.ends_with('Z'));

        sql.execute("UPDATE messages SET body = 'edited' WHERE id = $1", &[&id])
            .await
            .unwrap();
        let ev = next_change(&mut c).await;
        assert_eq!(ev["data"]["type"], "UPDATE");
        assert_eq!(ev["data"]["record"]["body"], "edited");
        assert_eq!(
            ev["data"]["old_record"],
            json!({"id": id}),
            "default replica identity: the key"
        );

        // DELETE filters see the old row. With the default replica identity that is the key
        // only, so a filter on conversation_id cannot match (as in the original).
        sql.execute("DELETE FROM messages WHERE id = $1", &[&id])
            .await
            .unwrap();
        let row = sql
            .query_one(
                "INSERT INTO messages (conversation_id, body) VALUES (5, 'marker') RETURNING id",
                &[],
            )
            .await
            .unwrap();
        let marker: i64 = row.get(0);
        let ev = next_change(&mut c).await;
        assert_eq!(ev["data"]["type"], "INSERT", "the DELETE was not delivered");
        assert_eq!(ev["data"]["record"]["id"], json!(marker));

        // With REPLICA IDENTITY FULL the old row is whole: the DELETE matches and carries it.
        sql.batch_execute("ALTER TABLE messages REPLICA IDENTITY FULL")
            .await
            .unwrap();
        sql.execute("DELETE FROM messages WHERE id = $1", &[&marker])
            .await
            .unwrap();
        let ev = next_change(&mut c).await;
        assert_eq!(ev["data"]["type"], "DELETE");
        assert_eq!(
            ev["data"]["old_record"],
            json!({"id": marker, "conversation_id": 5, "body": "marker"})
        );
        assert!(ev["data"].get("record").is_none());
        sql.batch_execute("ALTER TABLE messages REPLICA IDENTITY DEFAULT")
            .await
            .unwrap();
        c.assert_quiet().await;
    }
}
