//! The way back: `walcast migrate --hand-back` leaves a database ready for supabase/realtime. On a
//! database the original set up, its `realtime` schema is exactly as it was and walcast's slot and
//! schema are gone; on one walcast set up, the `realtime` objects the original's schema dump
//! creates with a plain CREATE are out of its way, and the app's policies come back as statements
//! that run on the original's `realtime.messages`.

use protocol_tests::pg::TestDb;
use protocol_tests::*;

/// The `realtime` schema as the original made it: functions (owner and body), tables and their
/// owners (daily partitions of realtime.messages left out: walcast makes them ahead as the
/// original's janitor does), policies, and publications (but the one for broadcast from the
/// database, which the original creates at its first start exactly as walcast does, and keeps
/// when it publishes realtime.messages).
const REALTIME_SCHEMA: &str = "
    SELECT 'function ' || p.oid::regprocedure::text || ' ' || p.proowner::regrole::text || ' ' || md5(p.prosrc)
      FROM pg_proc p WHERE p.pronamespace = 'realtime'::regnamespace
    UNION ALL
    SELECT 'table ' || c.relname || ' ' || c.relkind::text || ' ' || c.relowner::regrole::text
      FROM pg_class c
     WHERE c.relnamespace = 'realtime'::regnamespace AND c.relkind IN ('r', 'p', 'v')
       AND c.relname !~ '^messages_[0-9]{4}_[0-9]{2}_[0-9]{2}$'
    UNION ALL
    SELECT 'policy ' || policyname || ' ' || cmd || ' ' || coalesce(qual, '') || ' ' || coalesce(with_check, '')
      FROM pg_policies WHERE schemaname = 'realtime'
    UNION ALL
    SELECT 'publication ' || pubname FROM pg_publication
     WHERE pubname <> 'supabase_realtime_messages_publication'
    ORDER BY 1";

async fn snapshot(sql: &tokio_postgres::Client) -> Vec<String> {
    sql.query(REALTIME_SCHEMA, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `walcast migrate <args>` on `db` (with the slot name the test server uses): exit status,
/// stdout, stderr.
async fn migrate(db: &TestDb, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(walcast_bin())
        .arg("migrate")
        .args(args)
        .envs(db.env())
        .env("LOG_LEVEL", "error")
        .output()
        .await
        .expect("run walcast migrate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn exists(sql: &tokio_postgres::Client, query: &str, slot: &str) -> bool {
    sql.query_one(query, &[&slot]).await.unwrap().get(0)
}

const SLOT_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)";
const SLOT_ACTIVE: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active)";
const WALCAST_SCHEMA_EXISTS: &str = "SELECT to_regnamespace('walcast') IS NOT NULL OR $1 = ''";

#[tokio::test]
async fn hand_back_on_a_database_the_original_set_up_leaves_its_schema_as_it_was() {
    let db = TestDb::create("handback_original").await;
    let sql = db.client().await;
    sql.batch_execute(&std::fs::read_to_string(fixture("original-realtime-schema.sql")).unwrap())
        .await
        .expect("the fixture loads");
    sql.batch_execute(
        "CREATE POLICY room_read ON realtime.messages FOR SELECT TO authenticated
             USING (realtime.topic() = 'room:' || auth.uid()::text);",
    )
    .await
    .unwrap();
    let before = snapshot(&sql).await;
    let slot = format!("s_{}", db.name);

    let mut server = Server::start_with_db(&db, &[]).await;
    assert!(exists(&sql, SLOT_EXISTS, &slot).await);
    // Once it streams (the slot can exist a moment before walcast opens it).
    let streaming = std::time::Instant::now();
    while !exists(&sql, SLOT_ACTIVE, &slot).await {
        assert!(
            streaming.elapsed() < WAIT,
            "walcast never began streaming its slot"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A walcast still streams: refused, and nothing changes.
    let (ok, _, err) = migrate(&db, &["--hand-back"]).await;
    assert!(!ok, "a hand-back under a running walcast went ahead");
    assert!(
        err.contains(&format!("the replication slot {slot} is in use"))
            && err.contains("stop every walcast first"),
        "{err}"
    );
    assert!(exists(&sql, SLOT_EXISTS, &slot).await);
    server.terminate();
    server.wait_exit(std::time::Duration::from_secs(15)).await;

    let (ok, plan, err) = migrate(&db, &["--hand-back", "--dry-run"]).await;
    assert!(ok, "{err}");
    for line in [
        "found: the original's realtime schema (realtime.schema_migrations has rows): kept as it is",
        &format!("would: drop the replication slot {slot}"),
        "would: drop the schema walcast",
        "--dry-run: nothing was changed",
    ] {
        assert!(plan.contains(line), "missing {line:?} in:\n{plan}");
    }
    assert!(!plan.contains("realtime.messages"), "{plan}");
    assert!(
        exists(&sql, SLOT_EXISTS, &slot).await,
        "--dry-run dropped the slot"
    );
    assert!(exists(&sql, WALCAST_SCHEMA_EXISTS, &slot).await);

    let (ok, report, err) = migrate(&db, &["--hand-back"]).await;
    assert!(ok, "{err}");
    assert!(
        report.contains(&format!("did: drop the replication slot {slot}")),
        "{report}"
    );
    assert!(
        !exists(&sql, SLOT_EXISTS, &slot).await,
        "the slot is left to hold WAL"
    );
    assert!(!exists(&sql, WALCAST_SCHEMA_EXISTS, &slot).await);
    assert_eq!(
        snapshot(&sql).await,
        before,
        "the original's realtime schema changed"
    );
    // The publication walcast made for broadcast from the database is one the original accepts
    // as its own (it re-creates any that publishes other tables).
    let published: Vec<String> = sql
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables
              WHERE pubname = 'supabase_realtime_messages_publication' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        published.iter().all(|t| t.starts_with("realtime.messages")),
        "{published:?}"
    );
}

#[tokio::test]
async fn hand_back_on_a_database_walcast_set_up_makes_room_for_the_original() {
    let db = TestDb::create("handback_walcast").await;
    let sql = db.client().await;
    let (ok, _, err) = migrate(&db, &[]).await;
    assert!(ok, "{err}");
    sql.batch_execute(
        "CREATE POLICY room_read ON realtime.messages FOR SELECT TO authenticated
             USING (realtime.topic() = 'room:' || auth.uid()::text);
         CREATE POLICY room_write ON realtime.messages AS RESTRICTIVE FOR INSERT TO authenticated, anon
             WITH CHECK (extension = 'broadcast');
         CREATE VIEW recent_broadcasts AS SELECT topic, event FROM realtime.messages;",
    )
    .await
    .unwrap();

    // A view on realtime.messages would go with it: refused, named, nothing changed.
    let (ok, _, err) = migrate(&db, &["--hand-back"]).await;
    assert!(!ok, "the view was dropped silently");
    assert!(
        err.contains("realtime.messages was created by walcast")
            && err.contains("view recent_broadcasts"),
        "{err}"
    );
    assert!(exists(&sql, WALCAST_SCHEMA_EXISTS, "").await);
    sql.batch_execute("DROP VIEW recent_broadcasts")
        .await
        .unwrap();

    let (ok, report, err) = migrate(&db, &["--hand-back"]).await;
    assert!(ok, "{err}");
    for line in [
        "did: drop realtime.messages, created by walcast (2 policies saved below as statements)",
        "did: drop realtime.send(jsonb, text, text, boolean), created by walcast",
        "did: drop realtime.topic(), created by walcast",
        "did: drop the publication supabase_realtime_messages_publication",
        "then: start supabase/realtime once",
    ] {
        assert!(report.contains(line), "missing {line:?} in:\n{report}");
    }
    // What the original's schema dump creates with a plain CREATE is no longer in its way.
    let leftovers: Vec<String> = sql
        .query(
            "SELECT o FROM unnest(ARRAY[
                 CASE WHEN to_regclass('realtime.messages') IS NOT NULL THEN 'realtime.messages' END,
                 CASE WHEN to_regprocedure('realtime.topic()') IS NOT NULL THEN 'realtime.topic()' END,
                 CASE WHEN to_regprocedure('realtime.send(jsonb, text, text, boolean)') IS NOT NULL THEN 'realtime.send' END,
                 CASE WHEN to_regprocedure('realtime.send_binary(bytea, text, text, boolean)') IS NOT NULL THEN 'realtime.send_binary' END,
                 CASE WHEN to_regprocedure('realtime.broadcast_changes(text, text, text, text, text, record, record, text)') IS NOT NULL THEN 'realtime.broadcast_changes' END,
                 CASE WHEN to_regnamespace('walcast') IS NOT NULL THEN 'schema walcast' END,
                 CASE WHEN EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime_messages_publication') THEN 'publication' END
               ]) AS o WHERE o IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(leftovers.is_empty(), "still there: {leftovers:?}");

    // The original makes its schema (here: the fixture of its final schema); the saved
    // statements then give the app its policies back, unchanged.
    sql.batch_execute(&std::fs::read_to_string(fixture("original-realtime-schema.sql")).unwrap())
        .await
        .expect("the original's schema loads");
    let statements: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("CREATE POLICY"))
        .collect();
    assert_eq!(statements.len(), 2, "{report}");
    for stmt in &statements {
        sql.batch_execute(stmt)
            .await
            .unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }
    let policies: Vec<(String, String, String)> = sql
        .query(
            "SELECT policyname::text, permissive::text, array_to_string(roles, ',') FROM pg_policies
              WHERE schemaname = 'realtime' AND tablename = 'messages' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        policies,
        vec![
            (
                "room_read".into(),
                "PERMISSIVE".into(),
                "authenticated".into()
            ),
            (
                "room_write".into(),
                "RESTRICTIVE".into(),
                "anon,authenticated".into()
            ),
        ]
    );
}
