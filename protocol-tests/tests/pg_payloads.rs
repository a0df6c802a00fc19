//! postgres_changes payloads: values exactly as to_jsonb renders them, replica identity, TOAST,
//! oversized records, tables without a primary key, column privileges, select, ids, wildcards.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

async fn subscribe(c: &mut Client, topic: &str, bindings: Value) -> Vec<u64> {
    let (_, reply) = c
        .join(topic, json!({"config": {"postgres_changes": bindings}}))
        .await;
    assert_eq!(reply.payload()["status"], "ok", "{reply:?}");
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(
        sys.payload()["message"],
        "Subscribed to PostgreSQL",
        "{:?}",
        sys.payload()
    );
    reply.payload()["response"]["postgres_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect()
}

async fn change(c: &mut Client) -> Value {
    c.recv_until("postgres_changes", |f| f.event() == "postgres_changes")
        .await
        .payload()
        .clone()
}

#[tokio::test]
async fn every_common_type_renders_like_to_jsonb() {
    let db = TestDb::create("types").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TYPE color AS ENUM ('red', 'green');
         CREATE DOMAIN short_text AS varchar(10);
         CREATE TABLE everything (
            id bigserial PRIMARY KEY,
            i2 smallint, i4 int, i8 bigint, big bigint, num numeric, num_nan numeric, f4 real, f8 double precision,
            f_nan float8, f_inf float8, bo boolean, t text, vc varchar(20), ch char(3), u uuid,
            j json, jb jsonb, d date, ts timestamp, tstz timestamptz, tm time, iv interval,
            by bytea, ai int[], at text[], a2 int[][], ajb jsonb[], atz timestamptz[], e color, dom short_text,
            nul text, inet_col inet, money_col money, quote text
         );
         GRANT SELECT ON everything TO anon;
         ALTER PUBLICATION supabase_realtime ADD TABLE everything;",
    )
    .await
    .unwrap();
    let insert = r#"INSERT INTO everything (i2, i4, i8, big, num, num_nan, f4, f8, f_nan, f_inf, bo, t, vc, ch, u, j, jb, d, ts, tstz, tm, iv,
            by, ai, at, a2, ajb, atz, e, dom, nul, inet_col, money_col, quote)
        VALUES (-2, 42, 9007199254740993, 9223372036854775807, 12.50, 'NaN', 1.5, 0.1, 'NaN', '-Infinity', true, 'text', 'varchar', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '{"b": 2, "a": [1, 2],  "a": 3}', '{"nested": {"x": [true, null]}}', '2024-01-02', '2024-01-02 03:04:05.678', '2024-01-02 03:04:05+02', '10:11:12', '1 day 02:03:04',
            '\x0102ff', '{1,2,NULL}', '{a,"b c","d\"e",NULL}', '{{1,2},{3,4}}', ARRAY['{"a":1}'::jsonb, '[2]'], ARRAY['2024-01-01 00:00:00+00'::timestamptz], 'green', 'dom',
            NULL, '192.168.0.1/24', 12.34, 'it''s "quoted" \ back')
        RETURNING id"#;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        subscribe(
            &mut c,
            "realtime:types",
            json!([{"event":"INSERT","schema":"public","table":"everything"}]),
        )
        .await;
        let id: i64 = sql.query_one(insert, &[]).await.unwrap().get(0);
        let ev = change(&mut c).await;
        let expected: Value = sql
            .query_one(
                "SELECT to_jsonb(row_alias)::text FROM everything row_alias WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
            .parse()
            .unwrap();
        let record = &ev["data"]["record"];
        for (k, want) in expected.as_object().unwrap() {
            let got = &record[k];
            match k.as_str() {
                // The one documented difference: bytea is hex without `\x`, as the original sends it.
                "by" => assert_eq!(got, "0102ff"),
                // to_jsonb prints timestamptz in the session's zone; walcast uses UTC, as the original's connection does.
                "tstz" => assert_eq!(got, "2024-01-02T01:04:05+00:00"),
                "atz" => assert_eq!(got, &json!(["2024-01-01T00:00:00+00:00"])),
                _ => assert_eq!(got, want, "column {k}"),
            }
        }
        assert_eq!(
            record.as_object().unwrap().len(),
            expected.as_object().unwrap().len()
        );
        // Exact numbers survive: int8 beyond 2^53 and numeric scale.
        let raw = c.raw.last().unwrap();
        assert!(
            raw.contains("9007199254740993")
                && raw.contains("9223372036854775807")
                && raw.contains("12.50"),
            "{raw}"
        );
        let types: Vec<(String, String)> = ev["data"]["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["type"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let by_name = |n: &str| {
            types
                .iter()
                .find(|(c, _)| c == n)
                .map(|(_, t)| t.as_str())
                .unwrap()
        };
        assert_eq!(types[0], ("id".to_owned(), "int8".to_owned()));
        assert_eq!(
            (
                by_name("ai"),
                by_name("e"),
                by_name("dom"),
                by_name("tstz"),
                by_name("ch")
            ),
            ("_int4", "color", "short_text", "timestamptz", "bpchar")
        );
    }
}

#[tokio::test]
async fn toast_replica_identity_oversized_and_no_primary_key() {
    let db = TestDb::create("toast").await;
    let server = Server::start_with_db(&db, &[("MAX_RECORD_BYTES", "50000")]).await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE nopk (a int, b text);
         GRANT SELECT ON docs, nopk TO anon;
         ALTER PUBLICATION supabase_realtime ADD TABLE docs, nopk;",
    )
    .await
    .unwrap();
    let big = "x".repeat(20_000);
    for (i, vsn) in BOTH.into_iter().enumerate() {
        let id = i as i32 + 1;
        let mut c = server.connect(vsn, &token("anon")).await;
        subscribe(&mut c, "realtime:docs", json!([{"event":"*","schema":"public","table":"docs"}, {"event":"*","schema":"public","table":"nopk"}])).await;
        sql.execute("INSERT INTO docs VALUES ($1, 'first', $2)", &[&id, &big])
            .await
            .unwrap();
        let ev = change(&mut c).await;
        assert_eq!(ev["data"]["record"]["body"].as_str().unwrap().len(), 20_000);
        // Default identity: the unchanged TOASTed body is not in the WAL and is left out.
        sql.execute("UPDATE docs SET title = 'second' WHERE id = $1", &[&id])
            .await
            .unwrap();
        let ev = change(&mut c).await;
        assert_eq!(ev["data"]["record"], json!({"id": id, "title": "second"}));
        assert_eq!(ev["data"]["old_record"], json!({"id": id}));
        // REPLICA IDENTITY FULL: the old row is whole and fills the unchanged value.
        sql.batch_execute("ALTER TABLE docs REPLICA IDENTITY FULL")
            .await
            .unwrap();
        sql.execute("UPDATE docs SET title = 'third' WHERE id = $1", &[&id])
            .await
            .unwrap();
        let ev = change(&mut c).await;
        assert_eq!(ev["data"]["record"]["body"].as_str().unwrap().len(), 20_000);
        assert_eq!(ev["data"]["old_record"]["title"], "second");
        sql.batch_execute("ALTER TABLE docs REPLICA IDENTITY DEFAULT")
            .await
            .unwrap();
        // Over MAX_RECORD_BYTES: values over 64 bytes removed, error 413.
        let huge = "y".repeat(60_000);
        sql.execute("UPDATE docs SET body = $2 WHERE id = $1", &[&id, &huge])
            .await
            .unwrap();
        let ev = change(&mut c).await;
        assert_eq!(
            ev["data"]["errors"],
            json!(["Error 413: Payload Too Large"])
        );
        assert_eq!(ev["data"]["record"], json!({"id": id, "title": "third"}));
        // No primary key: error 400, nothing of the row.
        sql.execute("INSERT INTO nopk VALUES (1, 'secret')", &[])
            .await
            .unwrap();
        let ev = change(&mut c).await;
        assert_eq!(
            ev["data"],
            json!({"schema":"public","table":"nopk","commit_timestamp":null,"type":"INSERT","columns":[],"record":{},"errors":["Error 400: Bad Request, no primary key"]})
        );
    }
}

#[tokio::test]
async fn column_privileges_select_ids_and_wildcards() {
    let db = TestDb::create("privs").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE profiles (id int PRIMARY KEY, name text, email text, salary int);
         GRANT SELECT (id, name, email) ON profiles TO anon;
         GRANT SELECT ON profiles TO authenticated;
         CREATE TABLE keyless_view (id int PRIMARY KEY, v text);
         GRANT SELECT (v) ON keyless_view TO anon;
         CREATE SCHEMA other;
         CREATE TABLE other.things (id int PRIMARY KEY);
         GRANT USAGE ON SCHEMA other TO anon;
         GRANT SELECT ON other.things TO anon;
         ALTER PUBLICATION supabase_realtime ADD TABLE profiles, keyless_view, other.things;",
    )
    .await
    .unwrap();
    for vsn in BOTH {
        let mut anon = server.connect(vsn, &token("anon")).await;
        let mut auth = server.connect(vsn, &token("authenticated")).await;
        let ids = subscribe(
            &mut anon,
            "realtime:p",
            json!([
                {"event":"INSERT","schema":"public","table":"profiles"},
                {"event":"*","schema":"public","table":"profiles","filter":"name=eq.ann"},
                {"event":"INSERT","schema":"public","table":"keyless_view"}
            ]),
        )
        .await;
        subscribe(
            &mut auth,
            "realtime:p",
            json!([{"event":"INSERT","schema":"public","table":"profiles","select":["name"]}]),
        )
        .await;

        sql.batch_execute(
            "DELETE FROM profiles; INSERT INTO profiles VALUES (1, 'ann', 'ann@x', 100)",
        )
        .await
        .unwrap();
        let ev = change(&mut anon).await;
        // Both matching bindings, one message.
        let mut got: Vec<u64> = ev["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        got.sort();
        let mut want = vec![ids[0], ids[1]];
        want.sort();
        assert_eq!(got, want);
        // anon may not read salary: not in record, not in columns.
        assert_eq!(
            ev["data"]["record"],
            json!({"id": 1, "name": "ann", "email": "ann@x"})
        );
        let cols: Vec<&str> = ev["data"]["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(cols, ["id", "name", "email"]);
        assert!(
            !anon.raw.last().unwrap().contains("salary")
                && !anon.raw.last().unwrap().contains("100,")
        );
        // select: name plus the primary key.
        let ev = change(&mut auth).await;
        assert_eq!(ev["data"]["record"], json!({"id": 1, "name": "ann"}));

        // A role that cannot read the primary key gets error 401 and nothing else.
        sql.batch_execute("DELETE FROM keyless_view; INSERT INTO keyless_view VALUES (7, 'v')")
            .await
            .unwrap();
        let ev = change(&mut anon).await;
        assert_eq!(ev["data"]["errors"], json!(["Error 401: Unauthorized"]));
        assert_eq!(ev["data"]["record"], json!({}));
        anon.assert_quiet().await;
        auth.assert_quiet().await;
    }

    // Wildcards cover the tables in the publication: schema only, and table "*".
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    subscribe(
        &mut c,
        "realtime:wild",
        json!([{"event":"INSERT","schema":"other"}]),
    )
    .await;
    let mut all = server.connect(Vsn::V2, &token("anon")).await;
    subscribe(
        &mut all,
        "realtime:all",
        json!([{"event":"INSERT","schema":"*","table":"*"}]),
    )
    .await;
    sql.batch_execute("INSERT INTO other.things VALUES (5)")
        .await
        .unwrap();
    assert_eq!(change(&mut c).await["data"]["table"], "things");
    assert_eq!(change(&mut all).await["data"]["schema"], "other");
    sql.batch_execute("DELETE FROM profiles; INSERT INTO profiles VALUES (2, 'bob', 'b@x', 1)")
        .await
        .unwrap();
    assert_eq!(change(&mut all).await["data"]["table"], "profiles");
    c.assert_quiet().await;
}
