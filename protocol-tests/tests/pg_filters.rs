//! postgres_changes filters: every operator, negation, AND, quoting, and every error.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

async fn setup() -> (TestDb, Server, tokio_postgres::Client) {
    let db = TestDb::create("filters").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE items (
            id serial PRIMARY KEY,
            n int, price numeric(10,2), score float8, name text, code char(4), flag boolean,
            at timestamptz, day date, uid uuid, m mood, doc jsonb
         );
         ALTER TABLE items REPLICA IDENTITY FULL;
         GRANT SELECT ON items TO anon;
         CREATE TABLE hidden (id serial PRIMARY KEY, v int);
         GRANT SELECT ON hidden TO anon;
         ALTER PUBLICATION supabase_realtime ADD TABLE items;",
    )
    .await
    .unwrap();
    (db, server, sql)
}

/// Subscribes one channel per filter; returns the topics that got "Subscribed".
async fn subscribe_all(c: &mut Client, filters: &[&str]) {
    for (i, f) in filters.iter().enumerate() {
        let topic = format!("realtime:f{i}");
        let (_, reply) = c
            .join(&topic, json!({"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"items","filter": f}]}}))
            .await;
        assert_eq!(reply.payload()["status"], "ok");
        let sys = c.recv_until("system", |f| f.event() == "system").await;
        assert_eq!(
            sys.payload()["status"],
            "ok",
            "filter {f}: {:?}",
            sys.payload()
        );
    }
}

/// Inserts one row and returns the set of channels (filter indexes) that received it.
async fn who_sees(c: &mut Client, sql: &tokio_postgres::Client, insert: &str) -> Vec<usize> {
    sql.batch_execute(insert).await.unwrap();
    // A marker row that no filter above matches except the catch-all channel "realtime:all".
    sql.batch_execute("INSERT INTO items (n) VALUES (-999999)")
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let f = c
            .recv_until("change", |f| f.event() == "postgres_changes")
            .await;
        if f.topic() == "realtime:all" {
            if f.payload()["data"]["record"]["n"] == json!(-999999) {
                return seen;
            }
            continue;
        }
        if f.payload()["data"]["record"]["n"] == json!(-999999) {
            continue; // the marker, on its way to other channels
        }
        let i: usize = f.topic().trim_start_matches("realtime:f").parse().unwrap();
        seen.push(i);
    }
}

#[tokio::test]
async fn every_operator_with_type_semantics() {
    let (_db, server, sql) = setup().await;
    let filters = [
        "n=eq.10",                                     // 0
        "n=neq.10",                                    // 1
        "n=lt.10",                                     // 2
        "n=lte.10",                                    // 3
        "n=gt.9",                                      // 4
        "n=gte.11",                                    // 5
        "n=in.(1,10,100)",                             // 6
        "name=like.hel%",                              // 7
        "name=ilike.HEL%",                             // 8
        "flag=is.true",                                // 9
        "name=is.null",                                // 10
        "name=match.^h.l+o$",                          // 11
        "name=imatch.^H.L+O$",                         // 12
        "n=isdistinct.10",                             // 13
        "n=not.eq.10",                                 // 14
        "n=gt.5,n=lt.20",                              // 15: AND
        "price=eq.12.5",                               // 16: numeric 12.50 == 12.5
        "price=gt.9.99",                               // 17
        "at=gt.2024-01-01T00:00:00Z",                  // 18: timestamptz as instants
        "at=eq.2024-06-01 12:00:00+02",                // 19: same instant, other zone
        "day=lt.2024-02-01",                           // 20
        "uid=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", // 21: uuid case-insensitive
        "m=gt.sad",                                    // 22: enum order
        r#"name=eq."he,llo""#,                         // 23: quoted value with a comma
        "code=eq.ab",                                  // 24: char(4) pads
        "score=lt.1e3",                                // 25: float
        "n=not.in.(10,11)",                            // 26
        "flag=not.is.true",                            // 27
        "name=not.like.x%",                            // 28
        "doc=eq.{\"a\": 1}",                           // 29: jsonb canonical
    ];
    for vsn in BOTH {
        let mut c = server.connect(vsn, &token("anon")).await;
        subscribe_all(&mut c, &filters).await;
        let (_, reply) = c.join("realtime:all", json!({"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"items"}]}})).await;
        assert_eq!(reply.payload()["status"], "ok");
        c.recv_until("system", |f| f.event() == "system").await;

        let row =
            "INSERT INTO items (n, price, score, name, code, flag, at, day, uid, m, doc) VALUES
                   (10, 12.50, 2.5, 'hello', 'ab', true, '2024-06-01 10:00:00+00', '2024-01-15',
                    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'ok', '{\"a\":1}')";
        let mut seen = who_sees(&mut c, &sql, row).await;
        seen.sort();
        assert_eq!(
            seen,
            vec![0, 3, 4, 6, 7, 8, 9, 11, 12, 15, 16, 17, 18, 19, 20, 21, 22, 24, 25, 28, 29],
            "{vsn:?}"
        );

        let row = "INSERT INTO items (n, price, name, flag, score) VALUES (11, 9.99, 'he,llo', false, 5000)";
        let mut seen = who_sees(&mut c, &sql, row).await;
        seen.sort();
        assert_eq!(seen, vec![1, 4, 5, 13, 14, 15, 23, 27, 28], "{vsn:?}");

        // NULLs match nothing but `is.null` (and IS DISTINCT FROM / negated IS).
        let row = "INSERT INTO items (n) VALUES (NULL)";
        let mut seen = who_sees(&mut c, &sql, row).await;
        seen.sort();
        assert_eq!(seen, vec![10, 13, 27], "{vsn:?}");
    }
}

/// PostgREST's `or`/`and` trees and 1,000-value `in` lists, over the real stream: each channel
/// gets exactly the rows its whole condition holds for (walcast only; the original refuses `or`
/// and stops matching `in` lists at 60-70 values).
#[tokio::test]
async fn or_trees_and_thousand_value_in_lists_deliver_exactly_the_matching_rows() {
    let (_db, server, sql) = setup().await;
    let evens: Vec<String> = (0..1000).map(|i| (i * 2).to_string()).collect();
    let uuids: Vec<String> = (0..1000)
        .map(|i| format!("00000000-0000-0000-0000-{i:012}"))
        .collect();
    let in_evens = format!("n=in.({})", evens.join(","));
    let in_uuids = format!("uid=in.({})", uuids.join(","));
    assert!(in_uuids.len() > 37_000, "1,000 uuids fit the bounds");
    let filters = [
        "or=(n.eq.1,name.eq.x)",                                   // 0
        "n=gt.0,or=(name.like.a%,and(flag.is.true,price.gte.10))", // 1: AND of a filter and a tree
        "not.or=(n.eq.1,n.eq.2)",                                  // 2
        r#"or=(n.in.(5,6),name.eq."x,y")"#,                        // 3: list and quoted value
        "or=(name.is.null,not.and(n.gte.0,n.lte.100))",            // 4
        in_evens.as_str(),                                         // 5
        in_uuids.as_str(),                                         // 6
    ];
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    subscribe_all(&mut c, &filters).await;
    let (_, reply) = c.join("realtime:all", json!({"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"items"}]}})).await;
    assert_eq!(reply.payload()["status"], "ok");
    c.recv_until("system", |f| f.event() == "system").await;

    let cases: [(&str, Vec<usize>); 9] = [
        ("INSERT INTO items (n, name) VALUES (1, 'q')", vec![0]),
        ("INSERT INTO items (n, name) VALUES (3, 'x')", vec![0, 2]),
        ("INSERT INTO items (n, name) VALUES (2, 'abc')", vec![1, 5]),
        ("INSERT INTO items (n, name, flag, price) VALUES (7, 'q', true, 10)", vec![1, 2]),
        ("INSERT INTO items (n, name, flag, price) VALUES (7, 'q', true, 9.99)", vec![2]),
        ("INSERT INTO items (n, name) VALUES (6, 'x,y')", vec![2, 3, 5]),
        // NULL name: `or(n.eq.1, name.eq.x)` is unknown, not true.
        ("INSERT INTO items (n) VALUES (1998)", vec![2, 4, 5]),
        ("INSERT INTO items (n, name) VALUES (2000, 'q')", vec![2, 4]),
        (
            "INSERT INTO items (n, name, uid) VALUES (1999, 'q', '00000000-0000-0000-0000-000000000999')",
            vec![2, 4, 6],
        ),
    ];
    for (row, want) in cases {
        let mut seen = who_sees(&mut c, &sql, row).await;
        seen.sort();
        assert_eq!(seen, want, "{row}");
    }
}

/// `eq` filters on a boolean column: the value is normalised to `true`/`false` at join while
/// the stream sends `t`/`f`, and the equality index must see them as equal.
#[tokio::test]
async fn boolean_equality_filters_match() {
    let (_db, server, sql) = setup().await;
    let filters = [
        "flag=eq.true",             // 0
        "flag=eq.f",                // 1
        "flag=neq.true",            // 2
        "flag=in.(true)",           // 3
        "or=(flag.eq.true,n.eq.5)", // 4
    ];
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    subscribe_all(&mut c, &filters).await;
    let (_, reply) = c.join("realtime:all", json!({"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"items"}]}})).await;
    assert_eq!(reply.payload()["status"], "ok");
    c.recv_until("system", |f| f.event() == "system").await;
    for (row, want) in [
        (
            "INSERT INTO items (n, flag) VALUES (1, true)",
            vec![0, 3, 4],
        ),
        ("INSERT INTO items (n, flag) VALUES (1, false)", vec![1, 2]),
    ] {
        let mut seen = who_sees(&mut c, &sql, row).await;
        seen.sort();
        assert_eq!(seen, want, "{row}");
    }
}

async fn subscription_error(server: &Server, binding: Value) -> String {
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    let (_, reply) = c
        .join(
            "realtime:err",
            json!({"config":{"postgres_changes":[binding]}}),
        )
        .await;
    assert_eq!(reply.payload()["status"], "ok", "the join itself succeeds");
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(sys.payload()["extension"], "postgres_changes");
    assert_eq!(sys.payload()["status"], "error");
    assert_eq!(sys.payload()["channel"], "err");
    sys.payload()["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn errors_carry_the_original_messages() {
    let (_db, server, _sql) = setup().await;
    let b = |filter: &str| json!({"event":"*","schema":"public","table":"items","filter":filter});
    let exception = |filter: &str, exc: &str| {
        format!("Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: [event: *, schema: public, table: items, filters: [{filter}], select: nil]. Exception: {exc}")
    };
    let cases: Vec<(Value, String)> = vec![
        (b("wrong"), r#"Error parsing `filter` params: ["wrong"]"#.into()),
        (b("n=foo.1"), r#"Error parsing `filter` params: ["foo", "1"]"#.into()),
        (b("n=in.1,2"), "Error parsing `filter` params: `in` filter value must be wrapped by parentheses".into()),
        (b("n=eq.1,,n=eq.2"), "Error parsing `filter` params: filter must not contain empty segments (check for extra commas)".into()),
        (json!({"event":"INSERT"}), r#"No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: %{"event" => "INSERT"}"#.into()),
        (json!({"schema":"public","table":"items","select":"id"}), "Error parsing `select` params: expected a list of column name strings, e.g. select: [\"col1\", \"col2\"]".into()),
        (json!({"schema":"public","select":["id"]}), "Column selection is not supported for wildcard subscriptions. Provide an explicit schema and table name.".into()),
        (
            json!({"event":"INSERT","schema":"public","table":"nope"}),
            "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: INSERT, schema: public, table: nope, filters: [], select: nil]".into(),
        ),
        (
            json!({"event":"*","schema":"public","table":"hidden"}),
            "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: *, schema: public, table: hidden, filters: [], select: nil]".into(),
        ),
        (b("notacolumn=eq.123"), exception(r#"{"notacolumn", "eq", "123", false}"#, "ERROR P0001 (raise_exception) invalid column for filter notacolumn")),
        (b("n=eq.abc"), exception(r#"{"n", "eq", "abc", false}"#, "ERROR 22P02 (invalid_text_representation) invalid input syntax for type integer: \"abc\"")),
        (b("flag=is.maybe"), exception(r#"{"flag", "is", "maybe", false}"#, "ERROR P0001 (raise_exception) invalid value for is filter: must be null, true, false, or unknown")),
        (b("n=is.true"), exception(r#"{"n", "is", "true", false}"#, "ERROR P0001 (raise_exception) is true filter requires a boolean column, got integer")),
        (b("n=like.1%"), exception(r#"{"n", "like", "1%", false}"#, "ERROR P0001 (raise_exception) operator like requires a text-compatible column type, got integer")),
        (b("name=match.(("), exception(r#"{"name", "match", "((", false}"#, "ERROR P0001 (raise_exception) invalid regular expression for match filter: invalid regular expression: parentheses () not balanced")),
        (
            json!({"event":"*","schema":"public","table":"items","select":["id","nope"]}),
            "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: [event: *, schema: public, table: items, filters: [], select: [\"id\", \"nope\"]]. Exception: ERROR P0001 (raise_exception) invalid column for select nope".into(),
        ),
    ];
    for (binding, expected) in cases {
        assert_eq!(
            subscription_error(&server, binding.clone()).await,
            expected,
            "{binding}"
        );
    }
    // 1,001 values: a clear error, never a silent non-match.
    let many: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let filter = format!("n=in.({})", many.join(","));
    let msg = subscription_error(&server, b(&filter)).await;
    assert!(
        msg.ends_with(
            "Exception: ERROR P0001 (raise_exception) too many values for `in` filter. Maximum 1000"
        ),
        "{msg}"
    );
    // A bad leaf inside an `or` gets the same errors as a top-level filter.
    assert_eq!(
        subscription_error(&server, b("or=(n.eq.1,name.foo.x)")).await,
        r#"Error parsing `filter` params: ["foo", "x"]"#
    );
    assert_eq!(
        subscription_error(&server, b("or=(n.eq.1,nope.eq.2)")).await,
        exception(
            r#"or({"n", "eq", "1", false}, {"nope", "eq", "2", false})"#,
            "ERROR P0001 (raise_exception) invalid column for filter nope"
        )
    );
    assert!(
        subscription_error(&server, b("or=(n.eq.1,and(n.eq.abc))"))
            .await
            .ends_with(r#"Exception: ERROR 22P02 (invalid_text_representation) invalid input syntax for type integer: "abc""#)
    );
}

#[tokio::test]
async fn sql_in_filters_is_never_executed() {
    let (_db, server, sql) = setup().await;
    let nasty = [
        "name=eq.'; DROP TABLE items; --",
        "name=eq.x'||(SELECT 1)||'",
        "name=in.(a,\"b'); DROP TABLE items; --\")",
        "name=like.%'); DELETE FROM items; --",
    ];
    for f in nasty {
        let mut c = server.connect(Vsn::V2, &token("anon")).await;
        let (_, reply) = c.join("realtime:nasty", json!({"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"items","filter":f}]}})).await;
        assert_eq!(reply.payload()["status"], "ok");
        let sys = c.recv_until("system", |f| f.event() == "system").await;
        assert_eq!(
            sys.payload()["status"],
            "ok",
            "a value is only a value: {f}"
        );
    }
    // Identifiers: a column name with SQL in it is just an unknown column.
    let msg = subscription_error(
        &server,
        json!({"event":"*","schema":"public","table":"items","filter":"id;DROP TABLE items=eq.1"}),
    )
    .await;
    assert!(
        msg.contains("invalid column for filter id;DROP TABLE items"),
        "{msg}"
    );
    let msg = subscription_error(
        &server,
        json!({"event":"*","schema":"public","table":"items\"; DROP TABLE items; --"}),
    )
    .await;
    assert!(
        msg.starts_with(
            "Unable to subscribe to changes with given parameters. Please check Realtime"
        ),
        "{msg}"
    );
    // The table is still there, and a value with quotes matches literally.
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    let (_, _) = c.join("realtime:q", json!({"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"items","filter":"name=eq.'; DROP TABLE items; --"}]}})).await;
    c.recv_until("system", |f| f.event() == "system").await;
    sql.execute(
        "INSERT INTO items (name) VALUES ($1)",
        &[&"'; DROP TABLE items; --"],
    )
    .await
    .unwrap();
    let ev = c
        .recv_until("change", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(
        ev.payload()["data"]["record"]["name"],
        "'; DROP TABLE items; --"
    );
}
