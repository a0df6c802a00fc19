//! walcast on a database the original has already set up (`fixtures/original-realtime-schema.sql`:
//! Supabase's roles and `auth` functions, the original's final `realtime` schema with
//! `realtime.messages` partitioned by day, its functions and owners), on a day for which no
//! partition was made ahead: walcast keeps the original's objects, makes the partitions, and
//! broadcast from the database, private channels under the app's policies and postgres_changes
//! under RLS all work.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

const USER_A: &str = "00000000-0000-4000-8000-00000000000a";
const USER_B: &str = "00000000-0000-4000-8000-00000000000b";

fn user_token(sub: &str) -> String {
    sign(json!({"role": "authenticated", "sub": sub, "exp": now() + 3600}))
}

const APP: &str = "
    CREATE TABLE conversations (id int PRIMARY KEY, customer_id uuid NOT NULL);
    CREATE TABLE messages (id bigserial PRIMARY KEY, conversation_id int NOT NULL REFERENCES conversations, body text);
    ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
    ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON conversations FOR SELECT TO authenticated USING (customer_id = auth.uid());
    CREATE POLICY through_conversation ON messages FOR SELECT TO authenticated
        USING (EXISTS (SELECT 1 FROM conversations c WHERE c.id = conversation_id));
    GRANT SELECT ON conversations, messages TO authenticated;
    ALTER PUBLICATION supabase_realtime ADD TABLE messages;
    -- Private channels: a user's own room, read and write.
    CREATE POLICY room_read ON realtime.messages FOR SELECT TO authenticated
        USING (realtime.topic() = 'room:' || auth.uid()::text);
    CREATE POLICY room_write ON realtime.messages FOR INSERT TO authenticated
        WITH CHECK (realtime.topic() = 'room:' || auth.uid()::text);
    -- broadcast_changes from a trigger, to the owner's room.
    CREATE TABLE notes (id int PRIMARY KEY, owner uuid, body text);
    CREATE FUNCTION notes_to_room() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
    BEGIN
      PERFORM realtime.broadcast_changes('room:' || NEW.owner::text, TG_OP, TG_OP, TG_TABLE_NAME,
                                         TG_TABLE_SCHEMA, NEW, OLD);
      RETURN NULL;
    END $$;
    CREATE TRIGGER notes_to_room AFTER INSERT ON notes FOR EACH ROW EXECUTE FUNCTION notes_to_room();
";

/// The original's functions as they are: owner and a hash of the body.
const FUNCTIONS: &str = "
    SELECT p.oid::regprocedure::text, r.rolname::text, md5(p.prosrc)
      FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
     WHERE p.pronamespace = 'realtime'::regnamespace
       AND p.proname IN ('topic', 'send', 'broadcast_changes')
     ORDER BY 1";

async fn functions(sql: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    sql.query(FUNCTIONS, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn partitions(sql: &tokio_postgres::Client) -> Vec<String> {
    sql.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'realtime.messages'::regclass ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The next broadcast on a V1 socket: (event, payload).
async fn broadcast(c: &mut Client) -> (String, Value) {
    let f = c
        .recv_until("broadcast", |f| f.event() == "broadcast")
        .await;
    let p = f.payload();
    (
        p["event"].as_str().unwrap_or_default().to_owned(),
        p["payload"].clone(),
    )
}

#[tokio::test]
async fn walcast_runs_on_a_database_the_original_set_up() {
    let db = TestDb::create("original").await;
    let sql = db.client().await;
    sql.batch_execute(&std::fs::read_to_string(fixture("original-realtime-schema.sql")).unwrap())
        .await
        .expect("the fixture loads");
    // The original stopped a while ago: no partition for today or later.
    sql.batch_execute(
        "DO $$ DECLARE p text; BEGIN
           FOR p IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = 'realtime.messages'::regclass
                       AND to_date(substr(c.relname, 10), 'YYYY_MM_DD') >= (now() AT TIME ZONE 'UTC')::date
           LOOP EXECUTE format('DROP TABLE realtime.%I', p); END LOOP;
         END $$;",
    )
    .await
    .unwrap();
    sql.batch_execute(APP).await.unwrap();
    // Without a partition, the original's send swallows the failure: no row, only a WARNING.
    sql.batch_execute("SELECT realtime.send('{}'::jsonb, 'lost', 'room-public', false)")
        .await
        .unwrap();
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM realtime.messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the fixture reproduces the silent failure");
    let before = functions(&sql).await;
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(before
        .iter()
        .all(|(_, owner, _)| owner == "supabase_realtime_admin"));

    let server = Server::start_with_db(&db, &[]).await;

    // The original's functions are untouched; today's and the next days' partitions exist.
    assert_eq!(
        functions(&sql).await,
        before,
        "walcast replaced the original's functions"
    );
    let parts = partitions(&sql).await;
    let expected: Vec<String> = sql
        .query(
            "SELECT 'messages_' || to_char((now() AT TIME ZONE 'UTC')::date + i, 'YYYY_MM_DD')
               FROM generate_series(0, 3) AS i",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for name in &expected {
        assert!(parts.contains(name), "missing {name}: {parts:?}");
    }
    let owner: String = sql
        .query_one(
            "SELECT relowner::regrole::text FROM pg_class WHERE relname = $1",
            &[&expected[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        owner, "supabase_realtime_admin",
        "made as the original makes them"
    );

    // Broadcast from the database, public: the row goes to today's partition and arrives.
    let mut public = server.connect(Vsn::V1, &token("anon")).await;
    public.join_ok("realtime:room-public", json!({})).await;
    sql.batch_execute("SELECT realtime.send('{\"n\":1}'::jsonb, 'news', 'room-public', false)")
        .await
        .unwrap();
    let (event, payload) = broadcast(&mut public).await;
    assert_eq!((event.as_str(), &payload["n"]), ("news", &json!(1)));
    let landed: String = sql
        .query_one(
            "SELECT tableoid::regclass::text FROM realtime.messages WHERE event = 'news'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(landed, format!("realtime.{}", expected[0]));

    // Private channels with the app's policies: A's room is A's.
    let room_a = format!("realtime:room:{USER_A}");
    let mut a = server.connect(Vsn::V1, &user_token(USER_A)).await;
    a.join_ok(&room_a, json!({"private": true})).await;
    let mut b = server.connect(Vsn::V1, &user_token(USER_B)).await;
    let (_, reply) = b.join(&room_a, json!({"config": {"private": true}})).await;
    assert_eq!(reply.payload()["status"], "error", "{:?}", reply.payload());
    sql.execute(
        "SELECT realtime.send('{\"hi\":true}'::jsonb, 'dm', $1, true)",
        &[&format!("room:{USER_A}")],
    )
    .await
    .unwrap();
    let (event, payload) = broadcast(&mut a).await;
    assert_eq!((event.as_str(), &payload["hi"]), ("dm", &json!(true)));
    // broadcast_changes from the app's trigger.
    sql.execute(
        "INSERT INTO notes VALUES (1, $1::text::uuid, 'remember')",
        &[&USER_A],
    )
    .await
    .unwrap();
    let (event, payload) = broadcast(&mut a).await;
    assert_eq!(event, "INSERT");
    assert_eq!(payload["record"]["body"], "remember", "{payload}");

    // postgres_changes on the app's publication, under its policies.
    sql.batch_execute(&format!(
        "INSERT INTO conversations VALUES (1, '{USER_A}'), (2, '{USER_B}')"
    ))
    .await
    .unwrap();
    let (_, reply) = a
        .join(
            "realtime:inbox",
            json!({"config": {"postgres_changes": [
                {"event": "INSERT", "schema": "public", "table": "messages"}
            ]}}),
        )
        .await;
    assert_eq!(reply.payload()["status"], "ok", "{:?}", reply.payload());
    a.recv_until("subscribed", |f| f.event() == "system").await;
    sql.batch_execute(
        "INSERT INTO messages (conversation_id, body) VALUES (2, 'for b');
         INSERT INTO messages (conversation_id, body) VALUES (1, 'for a');",
    )
    .await
    .unwrap();
    let f = a
        .recv_until("change", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(f.payload()["data"]["record"]["body"], "for a", "{f:?}");

    // Today's partition dropped under a running walcast: a private join says so (the
    // original's error, not "Unauthorized"), and walcast makes the partition again.
    sql.batch_execute(&format!("DROP TABLE realtime.{}", expected[0]))
        .await
        .unwrap();
    let mut c = server.connect(Vsn::V1, &user_token(USER_A)).await;
    let (_, reply) = c.join(&room_a, json!({"config": {"private": true}})).await;
    assert_eq!(
        reply.payload()["response"]["reason"],
        "MissingPartition: Realtime was unable to find the expected messages partition",
        "{:?}",
        reply.payload()
    );
    let deadline = std::time::Instant::now() + WAIT;
    while partitions(&sql).await.iter().all(|p| p != &expected[0]) {
        assert!(
            std::time::Instant::now() < deadline,
            "the partition was not made again"
        );
        tokio::task::yield_now().await;
    }
    let (_, reply) = c.join(&room_a, json!({"config": {"private": true}})).await;
    assert_eq!(reply.payload()["status"], "ok", "{:?}", reply.payload());
}

async fn run_migrate(db: &TestDb, extra: &[&str]) -> String {
    migrate_db(db, extra, &[("LOG_LEVEL", "error")]).await
}

/// `walcast migrate --dry-run` says what it finds and changes nothing; `walcast migrate` then
/// says what it did, and keeps the original's objects.
#[tokio::test]
async fn migrate_says_what_it_finds_and_what_it_does() {
    let db = TestDb::create("original_migrate").await;
    let sql = db.client().await;
    sql.batch_execute(&std::fs::read_to_string(fixture("original-realtime-schema.sql")).unwrap())
        .await
        .expect("the fixture loads");
    let before = functions(&sql).await;

    let plan = run_migrate(&db, &["--dry-run"]).await;
    for expected in [
        "found: role anon: present (kept)",
        "found: function auth.uid(): present (kept)",
        "found: table realtime.messages: partitioned by day, 5 partitions",
        "found: function realtime.send(jsonb, text, text, boolean): present, owner supabase_realtime_admin (kept)",
        "found: publication supabase_realtime (postgres_changes): present, 0 tables (kept)",
        "found: walcast migrations: applied [], pending [1 supabase_compat, 2 wait_visible, 3 realtime_messages, 4 check_cohorts]",
        "--dry-run: nothing was changed",
    ] {
        assert!(plan.contains(expected), "missing {expected:?} in:\n{plan}");
    }
    let untouched: bool = sql
        .query_one("SELECT to_regnamespace('walcast') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(untouched, "--dry-run changed the database:\n{plan}");

    let report = run_migrate(&db, &[]).await;
    assert!(
        report.contains("did: applied walcast migrations [1, 2, 3, 4]"),
        "{report}"
    );
    assert_eq!(functions(&sql).await, before, "{report}");
    let again = run_migrate(&db, &["--dry-run"]).await;
    assert!(
        again.contains("applied [1 supabase_compat, 2 wait_visible, 3 realtime_messages, 4 check_cohorts], pending []"),
        "{again}"
    );
}
