//! DELETEs and leaves under row level security (issue #14): a DELETE goes only to the
//! subscribers whose cohort could see the row at its last change; what walcast cannot know
//! follows `DELETE_VISIBILITY` (or, with `REPLICA IDENTITY FULL`, the table's policies on the
//! old row); an UPDATE that takes a row out of a subscriber's view is a leave for the
//! subscribers that asked for them (`leaves: true`), and for no one else.
//!
//! "Nothing arrives" is shown by a marker row every subscriber receives afterwards (changes go
//! out in commit order): whatever precedes it was delivered or withheld.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

const SCHEMA: &str = "
    CREATE TABLE conversations (id uuid PRIMARY KEY, customer_id uuid NOT NULL, agent_id uuid, status text NOT NULL DEFAULT 'waiting');
    CREATE TABLE messages (id bigserial PRIMARY KEY, conversation_id uuid NOT NULL, sender_id uuid, body text);
    CREATE TABLE marks (n int PRIMARY KEY);
    ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
    ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
    CREATE POLICY participants ON conversations FOR SELECT TO authenticated
        USING (customer_id = auth.uid() OR agent_id = auth.uid());
    CREATE POLICY participants ON messages FOR SELECT TO authenticated
        USING (EXISTS (SELECT 1 FROM conversations c WHERE c.id = conversation_id
                       AND (c.customer_id = auth.uid() OR c.agent_id = auth.uid())));
    GRANT SELECT ON conversations, messages, marks TO anon, authenticated, service_role;
    ALTER PUBLICATION supabase_realtime ADD TABLE conversations, messages, marks;
";

fn user(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn conv(n: u32) -> String {
    format!("00000000-0000-4000-9000-{n:012}")
}

fn user_token(n: u32) -> String {
    sign(json!({"role":"authenticated","sub": user(n),"exp": now() + 3600}))
}

/// Connects as user `n` and subscribes to `bindings` plus the marker table on one channel.
async fn subscriber(server: &Server, vsn: Vsn, n: u32, bindings: Value) -> Client {
    let mut c = server.connect(vsn, &user_token(n)).await;
    let mut all = bindings.as_array().cloned().unwrap_or_default();
    all.push(json!({"event":"INSERT","schema":"public","table":"marks"}));
    c.join_ok("realtime:rls-deletes", json!({"postgres_changes": all}))
        .await;
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(sys.payload()["status"], "ok", "{:?}", sys.payload());
    c
}

/// Everything a subscriber received before marker `n` (the `data` objects).
async fn until_mark(c: &mut Client, n: i32) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let f = c
            .recv_until("change", |f| f.event() == "postgres_changes")
            .await;
        let data = f.payload()["data"].clone();
        if data["table"] == "marks" {
            assert_eq!(data["record"]["n"], n, "marks arrive in order");
            return got;
        }
        got.push(data);
    }
}

struct Db {
    sql: tokio_postgres::Client,
    mark: i32,
    slot: String,
}

impl Db {
    async fn exec(&self, q: &str, args: &[&(dyn tokio_postgres::types::ToSql + Sync)]) {
        self.sql.execute(q, args).await.unwrap();
    }

    /// Waits until walcast has taken in everything committed so far (its slot confirmed it):
    /// rows written before this are ones the channels that join next never saw change.
    async fn settled(&self) {
        let lsn: String = self
            .sql
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        protocol_tests::pg::wait_slot_confirmed(&self.sql, &self.slot, &lsn).await;
    }

    async fn mark(&mut self) -> i32 {
        self.mark += 1;
        self.exec("INSERT INTO marks VALUES ($1)", &[&self.mark])
            .await;
        self.mark
    }

    async fn new_conversation(&self, id: u32, customer: u32, agent: Option<u32>) {
        let agent = agent.map(user);
        self.exec(
            "INSERT INTO conversations (id, customer_id, agent_id) VALUES ($1::text::uuid, $2::text::uuid, $3::text::uuid)",
            &[&conv(id), &user(customer), &agent],
        )
        .await;
    }

    async fn delete_conversation(&self, id: u32) {
        self.exec(
            "DELETE FROM conversations WHERE id = $1::text::uuid",
            &[&conv(id)],
        )
        .await;
    }
}

async fn setup(extra: &[(&str, &str)]) -> (TestDb, Server, Db) {
    let db = TestDb::create("rlsdel").await;
    let server = Server::start_with_db(&db, extra).await;
    let sql = db.client().await;
    sql.batch_execute(SCHEMA).await.unwrap();
    let slot = format!("s_{}", db.name);
    (db, server, Db { sql, mark: 0, slot })
}

fn types(got: &[Value]) -> Vec<String> {
    got.iter()
        .map(|d| format!("{} {}", d["type"].as_str().unwrap_or("?"), d["table"]))
        .collect()
}

fn conversations() -> Value {
    json!([{"event":"*","schema":"public","table":"conversations"}])
}

#[tokio::test]
async fn a_delete_goes_only_to_subscribers_that_could_see_the_row() {
    let (_db, server, mut db) = setup(&[]).await;
    for vsn in BOTH {
        let base = if vsn == Vsn::V1 { 100 } else { 200 };
        let mut one = subscriber(&server, vsn, base + 1, conversations()).await;
        let mut two = subscriber(&server, vsn, base + 2, conversations()).await;
        // A DELETE-only binding: its cohort is checked at the row's INSERT all the same.
        let mut three = subscriber(
            &server,
            vsn,
            base + 3,
            json!([{"event":"DELETE","schema":"public","table":"conversations"}]),
        )
        .await;
        db.new_conversation(base + 1, base + 1, None).await;
        db.new_conversation(base + 2, base + 2, None).await;
        db.new_conversation(base + 3, base + 3, None).await;
        let m = db.mark().await;
        assert_eq!(
            types(&until_mark(&mut one, m).await),
            ["INSERT \"conversations\""]
        );
        assert_eq!(
            types(&until_mark(&mut two, m).await),
            ["INSERT \"conversations\""]
        );
        assert!(until_mark(&mut three, m).await.is_empty());

        for n in 1..=3 {
            db.delete_conversation(base + n).await;
        }
        let m = db.mark().await;
        for (n, c) in [(1, &mut one), (2, &mut two), (3, &mut three)] {
            let got = until_mark(c, m).await;
            // Its own row's DELETE, the key only; never the ids of the other users' rows
            // (the original sends all three to everyone).
            assert_eq!(got.len(), 1, "{vsn:?} user {n}: {got:?}");
            assert_eq!(got[0]["type"], "DELETE");
            assert_eq!(got[0]["old_record"], json!({"id": conv(base + n)}));
            assert!(got[0].get("left_view").is_none(), "{:?}", got[0]);
        }
    }
}

/// The rows of a run whose DELETE walcast cannot decide: inserted before anyone of that cohort
/// subscribed (so never checked for it), on a table whose old rows carry the key only.
async fn unknown_rows_under(rule: &str) -> (Vec<Value>, Vec<Value>) {
    let (_db, server, mut db) = setup(&[("DELETE_VISIBILITY", rule)]).await;
    db.new_conversation(1, 1, None).await;
    db.new_conversation(2, 2, None).await;
    // Else the INSERTs could reach the dispatcher after the channels joined, and be checked.
    db.settled().await;
    let mut one = subscriber(&server, Vsn::V2, 1, conversations()).await;
    let mut two = subscriber(&server, Vsn::V2, 2, conversations()).await;
    db.delete_conversation(1).await;
    let m = db.mark().await;
    (until_mark(&mut one, m).await, until_mark(&mut two, m).await)
}

#[tokio::test]
async fn an_unknown_row_s_delete_follows_delete_visibility_original() {
    let (one, two) = unknown_rows_under("original").await;
    // As the original: both get the key (walcast cannot know who could see it).
    for got in [one, two] {
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["old_record"], json!({"id": conv(1)}));
    }
}

#[tokio::test]
async fn an_unknown_row_s_delete_follows_delete_visibility_withhold() {
    let (one, two) = unknown_rows_under("withhold").await;
    // Nobody: not even its owner, whom walcast cannot tell apart from the others.
    assert!(one.is_empty(), "{one:?}");
    assert!(two.is_empty(), "{two:?}");
}

#[tokio::test]
async fn replica_identity_full_decides_every_delete_from_the_old_row() {
    // `original` for what is unknown: without the old-row decision user 2 would get user 1's
    // DELETE; under `withhold` user 1 would not.
    for rule in ["original", "withhold"] {
        let (_db, server, mut db) = setup(&[("DELETE_VISIBILITY", rule)]).await;
        db.sql
            .batch_execute("ALTER TABLE messages REPLICA IDENTITY FULL")
            .await
            .unwrap();
        db.new_conversation(1, 1, Some(9)).await;
        db.new_conversation(2, 2, Some(9)).await;
        // Rows from before anyone subscribed: unknown to the memory.
        for (c, body) in [(1, "one"), (2, "two")] {
            db.exec(
                "INSERT INTO messages (conversation_id, body) VALUES ($1::text::uuid, $2)",
                &[&conv(c), &body],
            )
            .await;
        }
        db.settled().await;
        let messages = json!([{"event":"DELETE","schema":"public","table":"messages"}]);
        let mut one = subscriber(&server, Vsn::V2, 1, messages.clone()).await;
        let mut two = subscriber(&server, Vsn::V1, 2, messages.clone()).await;
        let mut agent = subscriber(&server, Vsn::V2, 9, messages.clone()).await;
        let mut anon = server.connect(Vsn::V2, &token("anon")).await;
        anon.join_ok(
            "realtime:rls-deletes",
            json!({"postgres_changes": [messages[0].clone(), {"event":"INSERT","schema":"public","table":"marks"}]}),
        )
        .await;
        anon.recv_until("system", |f| f.event() == "system").await;
        db.exec("DELETE FROM messages WHERE body = 'one'", &[])
            .await;
        let m = db.mark().await;
        let got = until_mark(&mut one, m).await;
        assert_eq!(got.len(), 1, "{rule}: {got:?}");
        // Still the key only, as the original sends under RLS.
        assert_eq!(
            got[0]["old_record"].as_object().map(|o| o.len()),
            Some(1),
            "{got:?}"
        );
        assert!(until_mark(&mut two, m).await.is_empty(), "{rule}");
        assert_eq!(until_mark(&mut agent, m).await.len(), 1, "{rule}");
        // anon: no policy for anon at all.
        assert!(until_mark(&mut anon, m).await.is_empty(), "{rule}");
    }
}

#[tokio::test]
async fn a_reassigned_conversation_is_a_leave_for_the_opted_in_subscriber_only() {
    let (_db, server, mut db) = setup(&[]).await;
    for vsn in BOTH {
        let base = if vsn == Vsn::V1 { 100 } else { 200 };
        let (a, b, customer) = (base + 1, base + 2, base + 3);
        let with_leaves =
            json!([{"event":"*","schema":"public","table":"conversations","leaves":true}]);
        // Agent a twice: with leaves, and without (the same cohort).
        let mut a_leaves = subscriber(&server, vsn, a, with_leaves.clone()).await;
        let mut a_plain = subscriber(&server, vsn, a, conversations()).await;
        let mut b_leaves = subscriber(&server, vsn, b, with_leaves.clone()).await;
        // A DELETE-only binding with leaves, of a user who never saw the row.
        let mut other = subscriber(
            &server,
            vsn,
            base + 4,
            json!([{"event":"DELETE","schema":"public","table":"conversations","leaves":true}]),
        )
        .await;
        db.new_conversation(base, customer, Some(a)).await;
        let m = db.mark().await;
        assert_eq!(until_mark(&mut a_leaves, m).await.len(), 1);
        assert_eq!(until_mark(&mut a_plain, m).await.len(), 1);
        assert!(until_mark(&mut b_leaves, m).await.is_empty());
        assert!(until_mark(&mut other, m).await.is_empty());

        // Reassigned from a to b.
        db.exec(
            "UPDATE conversations SET agent_id = $2::text::uuid WHERE id = $1::text::uuid",
            &[&conv(base), &user(b)],
        )
        .await;
        let m = db.mark().await;
        let got = until_mark(&mut a_leaves, m).await;
        assert_eq!(got.len(), 1, "{vsn:?}: {got:?}");
        assert_eq!(got[0]["type"], "DELETE", "a leave is a DELETE event");
        assert_eq!(got[0]["left_view"], true);
        assert_eq!(got[0]["old_record"], json!({"id": conv(base)}));
        assert!(got[0].get("record").is_none());
        assert!(
            until_mark(&mut a_plain, m).await.is_empty(),
            "no leave without leaves: true"
        );
        // b gains the row: the UPDATE itself, no leave.
        let got = until_mark(&mut b_leaves, m).await;
        assert_eq!(types(&got), ["UPDATE \"conversations\""]);
        assert!(until_mark(&mut other, m).await.is_empty());

        // Another UPDATE: a no longer saw it, so no second leave; b still does.
        db.exec(
            "UPDATE conversations SET status = 'active' WHERE id = $1::text::uuid",
            &[&conv(base)],
        )
        .await;
        let m = db.mark().await;
        assert!(until_mark(&mut a_leaves, m).await.is_empty());
        assert!(until_mark(&mut a_plain, m).await.is_empty());
        assert_eq!(until_mark(&mut b_leaves, m).await.len(), 1);
        assert!(until_mark(&mut other, m).await.is_empty());
        // Its DELETE goes to b only.
        db.delete_conversation(base).await;
        let m = db.mark().await;
        assert!(until_mark(&mut a_leaves, m).await.is_empty());
        assert!(until_mark(&mut a_plain, m).await.is_empty());
        let got = until_mark(&mut b_leaves, m).await;
        assert_eq!(types(&got), ["DELETE \"conversations\""]);
        assert!(got[0].get("left_view").is_none());
        assert!(until_mark(&mut other, m).await.is_empty());
    }
}

#[tokio::test]
async fn leaves_on_a_binding_that_cannot_receive_them_is_refused() {
    let (_db, server, _db2) = setup(&[]).await;
    for vsn in BOTH {
        let mut c = server.connect(vsn, &user_token(1)).await;
        c.join_ok(
            "realtime:bad",
            json!({"postgres_changes": [{"event":"UPDATE","schema":"public","table":"conversations","leaves":true}]}),
        )
        .await;
        let sys = c.recv_until("system", |f| f.event() == "system").await;
        assert_eq!(sys.payload()["status"], "error");
        assert_eq!(
            sys.payload()["message"],
            "`leaves: true` needs a binding whose event is `*` or `DELETE`: a leave is sent as a DELETE event"
        );
        c.join_ok(
            "realtime:bad2",
            json!({"postgres_changes": [{"event":"*","schema":"public","table":"conversations","leaves":"yes"}]}),
        )
        .await;
        let sys = c.recv_until("system", |f| f.event() == "system").await;
        assert_eq!(
            sys.payload()["message"],
            "Error parsing `leaves` params: expected true or false"
        );
    }
}

#[tokio::test]
async fn the_old_row_decision_reads_arrays_json_and_qualified_columns_as_postgres_does() {
    let (_db, server, mut db) = setup(&[]).await;
    db.sql
        .batch_execute(
            "CREATE TABLE tagged (id int PRIMARY KEY, owner uuid, tags text[], meta jsonb, at timestamptz);
             ALTER TABLE tagged REPLICA IDENTITY FULL;
             ALTER TABLE tagged ENABLE ROW LEVEL SECURITY;
             CREATE POLICY mine ON tagged FOR SELECT TO authenticated
                 USING (tagged.owner = auth.uid() AND 'x' = ANY (tags) AND (meta ->> 'hidden') IS NULL);
             CREATE POLICY not_future ON tagged AS RESTRICTIVE FOR SELECT USING (at < now());
             GRANT SELECT ON tagged TO authenticated;
             ALTER PUBLICATION supabase_realtime ADD TABLE tagged;",
        )
        .await
        .unwrap();
    // (id, tags, meta, in the future): only row 1 passes every policy.
    let rows = [
        (1, "{x,y}", r#"{"a": [1, "two"]}"#, false),
        (2, "{y}", "{}", false),
        (3, "{x}", r#"{"hidden": true}"#, false),
        (4, "{x}", "{}", true),
    ];
    for (id, tags, meta, future) in rows {
        let at = if future { "2999-01-01" } else { "2000-01-01" };
        db.exec(
            "INSERT INTO tagged VALUES ($1, $2::text::uuid, $3::text::text[], $4::text::jsonb, $5::text::timestamptz)",
            &[&id, &user(1), &tags, &meta, &at],
        )
        .await;
    }
    let mut one = subscriber(
        &server,
        Vsn::V2,
        1,
        json!([{"event":"DELETE","schema":"public","table":"tagged"}]),
    )
    .await;
    db.exec("DELETE FROM tagged", &[]).await;
    let m = db.mark().await;
    let got = until_mark(&mut one, m).await;
    // Without the old-row decision (DELETE_VISIBILITY=original), all four.
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["old_record"], json!({"id": 1}));
}

/// A row check reads the row as it is when the check runs. A row updated and then deleted
/// before the UPDATE's check ran is simply gone for that check ("denied" for everyone): that
/// says nothing about who could see it, so its DELETE follows `DELETE_VISIBILITY` (here the
/// default, `original`) instead of being withheld from the user who had it on screen (a typing
/// indicator set and cleared within milliseconds, while checks run behind). Before: the DELETE
/// was withheld from everyone, its owner included.
///
/// The interleaving is forced: an earlier batch's check is held by a lock on a table the policy
/// reads (after its snapshot), so the next batch's check (one in flight at a time) can only
/// start once the UPDATE and the DELETE have both committed.
#[tokio::test]
async fn a_row_deleted_before_its_last_change_was_checked_is_not_taken_for_hidden() {
    let (test_db, server, mut db) = setup(&[("DB_CHECKS_IN_FLIGHT", "1")]).await;
    db.sql
        .batch_execute(
            "CREATE TABLE gate (open bool);
             INSERT INTO gate VALUES (true);
             CREATE TABLE typing (id int PRIMARY KEY, user_id uuid NOT NULL, state text);
             ALTER TABLE typing ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON typing FOR SELECT TO authenticated
                 USING (user_id = auth.uid() AND EXISTS (SELECT 1 FROM gate WHERE open));
             GRANT SELECT ON typing, gate TO authenticated;
             ALTER PUBLICATION supabase_realtime ADD TABLE typing;",
        )
        .await
        .unwrap();
    let typing = json!([{"event":"*","schema":"public","table":"typing"}]);
    let mut one = subscriber(&server, Vsn::V2, 1, typing.clone()).await;
    let mut two = subscriber(&server, Vsn::V2, 2, typing).await;
    db.exec(
        "INSERT INTO typing VALUES (1, $1::text::uuid, 'typing')",
        &[&user(1)],
    )
    .await;
    let m = db.mark().await;
    let got = until_mark(&mut one, m).await;
    assert_eq!(types(&got), ["INSERT \"typing\""], "{got:?}");
    assert!(until_mark(&mut two, m).await.is_empty());

    // Another row's check is held on the lock; the UPDATE and DELETE of row 1 come behind it.
    let mut lock = test_db.client().await;
    let tx = lock.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    db.exec(
        "INSERT INTO typing VALUES (2, $1::text::uuid, 'typing')",
        &[&user(1)],
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let waiting: i64 = db
            .sql
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the check never waited on the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    db.exec("UPDATE typing SET state = 'idle' WHERE id = 1", &[])
        .await;
    db.exec("DELETE FROM typing WHERE id = 1", &[]).await;
    tx.commit().await.unwrap();

    let m = db.mark().await;
    let got = until_mark(&mut one, m).await;
    // Row 2 as usual; row 1's UPDATE found no row when checked (as the original's would): not
    // sent. Its DELETE is.
    assert_eq!(
        types(&got),
        ["INSERT \"typing\"", "DELETE \"typing\""],
        "{got:?}"
    );
    assert_eq!(got[0]["record"]["id"], 2);
    assert_eq!(got[1]["old_record"], json!({"id": 1}));
    // For user 2 too the row's last change (the UPDATE) could not be judged: the rule decides,
    // as for any row walcast cannot know (an earlier verdict is not the last change's).
    let other = until_mark(&mut two, m).await;
    assert_eq!(types(&other), ["DELETE \"typing\""], "{other:?}");
}
