//! A change's authorization and delivery depend on that change alone: not on what else shares
//! its transaction or its batch, and not on how PostgreSQL happened to log its key.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

const USER_A: &str = "00000000-0000-4000-8000-00000000000a";
const USER_B: &str = "00000000-0000-4000-8000-00000000000b";

fn user_token(sub: &str) -> String {
    sign(json!({"role": "authenticated", "sub": sub, "exp": now() + 3600}))
}

async fn subscribe(c: &mut Client, topic: &str, bindings: Value) {
    let (_, reply) = c
        .join(topic, json!({"config": {"postgres_changes": bindings}}))
        .await;
    assert_eq!(reply.payload()["status"], "ok", "{:?}", reply.payload());
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(sys.payload()["status"], "ok", "{:?}", sys.payload());
}

/// The next postgres_changes event's `data`.
async fn next_change(c: &mut Client) -> Value {
    let f = c
        .recv_until("postgres_changes", |f| f.event() == "postgres_changes")
        .await;
    f.payload()["data"].clone()
}

/// A marker row every test channel also subscribes to: once it arrives, everything committed
/// before it has been delivered or withheld (changes go out in commit order).
async fn mark(sql: &tokio_postgres::Client, n: i32) {
    sql.execute("INSERT INTO marks VALUES ($1)", &[&n])
        .await
        .unwrap();
}

/// Every change up to marker `n`, as (type, record or old_record).
async fn until_mark(c: &mut Client, n: i32) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    loop {
        let data = next_change(c).await;
        if data["table"] == "marks" {
            assert_eq!(data["record"]["n"], n, "markers arrive in order");
            return out;
        }
        let kind = data["type"].as_str().unwrap_or_default().to_owned();
        let row = if kind == "DELETE" {
            data["old_record"].clone()
        } else {
            data["record"].clone()
        };
        out.push((kind, row));
    }
}

const MARKS: &str = "CREATE TABLE marks (n int PRIMARY KEY);
    GRANT SELECT ON marks TO anon, authenticated;
    ALTER PUBLICATION supabase_realtime ADD TABLE marks;";

fn marks_binding() -> Value {
    json!({"event": "INSERT", "schema": "public", "table": "marks"})
}

/// The original's e2e case: one channel, three bindings on one RLS table, the three writes in
/// one transaction. The DELETE was lost whenever it shared a batch with the others' row check.
#[tokio::test]
async fn insert_update_and_delete_in_one_transaction_all_arrive() {
    let db = TestDb::create("batch_iud").await;
    let server = Server::start_with_db(&db, &[]).await;
    let mut sql = db.client().await;
    sql.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, value text, owner uuid);
         ALTER TABLE items ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON items FOR SELECT TO authenticated USING (owner = auth.uid());
         GRANT SELECT ON items TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE items;
         INSERT INTO items VALUES (1, 'old', '{USER_A}'), (2, 'doomed', '{USER_A}');
         {MARKS}"
    ))
    .await
    .unwrap();
    for (i, vsn) in BOTH.into_iter().enumerate() {
        let mut c = server.connect(vsn, &user_token(USER_A)).await;
        let topic = format!("realtime:iud{i}");
        subscribe(
            &mut c,
            &topic,
            json!([
                {"event": "INSERT", "schema": "public", "table": "items", "filter": format!("value=eq.new{i}")},
                {"event": "UPDATE", "schema": "public", "table": "items", "filter": "id=eq.1"},
                {"event": "DELETE", "schema": "public", "table": "items", "filter": "id=eq.2"},
                marks_binding(),
            ]),
        )
        .await;
        let tx = sql.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO items VALUES ($1, $2, $3::text::uuid)",
            &[&(10 + i as i32), &format!("new{i}"), &USER_A],
        )
        .await
        .unwrap();
        tx.execute(
            "UPDATE items SET value = $1 WHERE id = 1",
            &[&format!("upd{i}")],
        )
        .await
        .unwrap();
        tx.execute("DELETE FROM items WHERE id = 2", &[])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        mark(&sql, i as i32).await;
        let got = until_mark(&mut c, i as i32).await;
        let kinds: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["INSERT", "UPDATE", "DELETE"], "{vsn:?}: {got:?}");
        assert_eq!(got[0].1["value"], format!("new{i}"));
        assert_eq!(got[1].1["value"], format!("upd{i}"));
        assert_eq!(
            got[2].1,
            json!({"id": 2}),
            "a deleted row under RLS: its key only"
        );
        // Put row 2 back for the next serializer.
        sql.execute(
            "INSERT INTO items VALUES (2, 'doomed', $1::text::uuid)",
            &[&USER_A],
        )
        .await
        .unwrap();
    }
}

/// A key long enough to be stored out of line: an UPDATE that leaves it unchanged does not
/// carry it in the new row. The row must still be checked, by the old key PostgreSQL logs.
#[tokio::test]
async fn an_unchanged_out_of_line_key_is_still_checked() {
    let db = TestDb::create("batch_toast").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    sql.batch_execute(&format!(
        "CREATE TABLE docs (id text PRIMARY KEY, owner uuid, body text);
         ALTER TABLE docs ALTER COLUMN id SET STORAGE EXTERNAL;
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON docs FOR SELECT TO authenticated USING (owner = auth.uid());
         GRANT SELECT ON docs TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE docs;
         {MARKS}"
    ))
    .await
    .unwrap();
    // 2,200 bytes of digits: too long to stay in the row (EXTERNAL storage), short enough for
    // the primary key's index.
    let key: String = (0..2200)
        .map(|i| char::from(b'0' + (i * 7 % 10) as u8))
        .collect();
    sql.execute(
        "INSERT INTO docs VALUES ($1, $2::text::uuid, 'v0')",
        &[&key, &USER_A],
    )
    .await
    .unwrap();
    let stored_out_of_line: bool = sql
        .query_one(
            "SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE relname = 'docs'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored_out_of_line, "the key must be TOASTed for this test");

    let bindings = json!([
        {"event": "UPDATE", "schema": "public", "table": "docs"},
        marks_binding(),
    ]);
    let mut owner = server.connect(Vsn::V2, &user_token(USER_A)).await;
    subscribe(&mut owner, "realtime:docs", bindings.clone()).await;
    let mut other = server.connect(Vsn::V1, &user_token(USER_B)).await;
    subscribe(&mut other, "realtime:docs", bindings.clone()).await;

    // The key stays; the body changes. Alone, and next to a change of a short-keyed row.
    sql.execute("UPDATE docs SET body = 'v1' WHERE id = $1", &[&key])
        .await
        .unwrap();
    mark(&sql, 1).await;
    let got = until_mark(&mut owner, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["body"], "v1");
    assert!(
        got[0].1["id"] == key.as_str(),
        "the record carries the full key"
    );
    let leaked = until_mark(&mut other, 1).await;
    let bodies: Vec<&Value> = leaked.iter().map(|(_, r)| &r["body"]).collect();
    assert!(
        leaked.is_empty(),
        "a row the policy hides was sent: bodies {bodies:?}"
    );

    // Moved to user B: now B sees it and A does not.
    sql.execute(
        "UPDATE docs SET owner = $2::text::uuid, body = 'v2' WHERE id = $1",
        &[&key, &USER_B],
    )
    .await
    .unwrap();
    mark(&sql, 2).await;
    assert!(until_mark(&mut owner, 2).await.is_empty());
    let got = until_mark(&mut other, 2).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["body"], "v2");
}

/// With a replica identity other than the primary key (here a unique index on another column),
/// PostgreSQL logs no old primary key: an UPDATE that leaves an out-of-line primary key unchanged
/// cannot be checked, so no RLS subscriber gets it, and the metric and log say so. Subscribers
/// who are not checked (service_role bypasses RLS) still get it.
#[tokio::test]
async fn a_change_without_a_key_is_withheld_and_counted() {
    let db = TestDb::create("batch_nokey").await;
    let metrics_secret = "metrics-secret-with-at-least-32-characters!!";
    let server = Server::start_with_db(&db, &[("METRICS_JWT_SECRET", metrics_secret)]).await;
    let sql = db.client().await;
    sql.batch_execute(&format!(
        "CREATE TABLE docs (id text PRIMARY KEY, ref int NOT NULL UNIQUE, owner uuid, body text);
         ALTER TABLE docs ALTER COLUMN id SET STORAGE EXTERNAL;
         ALTER TABLE docs REPLICA IDENTITY USING INDEX docs_ref_key;
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON docs FOR SELECT TO authenticated USING (owner = auth.uid());
         GRANT SELECT ON docs TO authenticated, service_role;
         ALTER PUBLICATION supabase_realtime ADD TABLE docs;
         {MARKS}
         GRANT SELECT ON marks TO service_role;"
    ))
    .await
    .unwrap();
    let key: String = (0..2200)
        .map(|i| char::from(b'a' + (i * 3 % 26) as u8))
        .collect();
    sql.execute(
        "INSERT INTO docs VALUES ($1, 1, $2::text::uuid, 'v0')",
        &[&key, &USER_A],
    )
    .await
    .unwrap();
    let bindings = json!([
        {"event": "UPDATE", "schema": "public", "table": "docs"},
        marks_binding(),
    ]);
    let mut a = server.connect(Vsn::V2, &user_token(USER_A)).await;
    subscribe(&mut a, "realtime:docs", bindings.clone()).await;
    let mut b = server.connect(Vsn::V2, &user_token(USER_B)).await;
    subscribe(&mut b, "realtime:docs", bindings.clone()).await;
    let mut service = server.connect(Vsn::V2, &token("service_role")).await;
    subscribe(&mut service, "realtime:docs", bindings.clone()).await;

    sql.execute("UPDATE docs SET body = 'v1' WHERE id = $1", &[&key])
        .await
        .unwrap();
    mark(&sql, 1).await;
    assert!(until_mark(&mut b, 1).await.is_empty(), "sent unchecked");
    assert!(until_mark(&mut a, 1).await.is_empty(), "sent unchecked");
    let got = until_mark(&mut service, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1["body"], "v1");

    let metrics_token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(metrics_secret.as_bytes()),
    )
    .unwrap();
    let text = server.metrics(&metrics_token).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("walcast_changes_withheld_total{reason=\"no_key\"} 1")),
        "{text}"
    );
}

/// A policy that raises an error for one row withholds that row only, not the other rows its
/// transaction (and so its cohort's check) shared.
#[tokio::test]
async fn a_policy_error_on_one_row_withholds_that_row_only() {
    let db = TestDb::create("batch_policy_error").await;
    let server = Server::start_with_db(&db, &[]).await;
    let mut sql = db.client().await;
    sql.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, divisor int, owner uuid);
         ALTER TABLE items ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON items FOR SELECT TO authenticated
             USING (owner = auth.uid() AND 10 / divisor > 0);
         GRANT SELECT ON items TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE items;
         {MARKS}"
    ))
    .await
    .unwrap();
    let mut c = server.connect(Vsn::V2, &user_token(USER_A)).await;
    subscribe(
        &mut c,
        "realtime:items",
        json!([{"event": "INSERT", "schema": "public", "table": "items"}, marks_binding()]),
    )
    .await;
    let tx = sql.transaction().await.unwrap();
    for (id, divisor) in [(1, 1), (2, 0), (3, 2)] {
        tx.execute(
            "INSERT INTO items VALUES ($1, $2, $3::text::uuid)",
            &[&id, &divisor, &USER_A],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    mark(&sql, 1).await;
    let got: Vec<Value> = until_mark(&mut c, 1)
        .await
        .into_iter()
        .map(|(_, r)| r["id"].clone())
        .collect();
    assert_eq!(got, [json!(1), json!(3)], "row 2's policy divides by zero");
}
