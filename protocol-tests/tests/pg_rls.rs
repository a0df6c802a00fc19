//! Row level security for postgres_changes: each subscriber sees exactly the rows its JWT and
//! the table's policies allow, even when many users' checks share one batch.

use protocol_tests::pg::{
    create_ticks, insert_tick, subscribe_to_ticks, wait_slot_confirmed, TestDb,
};
use protocol_tests::*;
use serde_json::{json, Value};

const SCHEMA: &str = "
    CREATE TABLE conversations (id uuid PRIMARY KEY, customer_id uuid NOT NULL, agent_id uuid, status text NOT NULL DEFAULT 'waiting');
    CREATE TABLE messages (id bigserial PRIMARY KEY, conversation_id uuid NOT NULL REFERENCES conversations, sender_id uuid, body text);
    ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
    ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
    CREATE POLICY participants ON conversations FOR SELECT TO authenticated
        USING (customer_id = auth.uid() OR agent_id = auth.uid());
    CREATE POLICY participants ON messages FOR SELECT TO authenticated
        USING (EXISTS (SELECT 1 FROM conversations c WHERE c.id = conversation_id
                       AND (c.customer_id = auth.uid() OR c.agent_id = auth.uid())));
    GRANT SELECT ON conversations, messages TO anon, authenticated, service_role;
    ALTER PUBLICATION supabase_realtime ADD TABLE conversations, messages;
";

fn user(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn user_token(n: u32) -> String {
    sign(json!({"role":"authenticated","sub": user(n),"exp": now() + 3600}))
}

async fn subscribe(c: &mut Client, topic: &str, bindings: Value) {
    let (_, reply) = c
        .join(topic, json!({"config": {"postgres_changes": bindings}}))
        .await;
    assert_eq!(reply.payload()["status"], "ok");
    let sys = c.recv_until("system", |f| f.event() == "system").await;
    assert_eq!(
        sys.payload()["message"],
        "Subscribed to PostgreSQL",
        "{:?}",
        sys.payload()
    );
}

#[tokio::test]
async fn many_customers_each_see_only_their_own_conversation() {
    let db = TestDb::create("rls").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    sql.batch_execute(SCHEMA).await.unwrap();
    const CUSTOMERS: u32 = 12;
    const AGENT: u32 = 999;
    for n in 0..CUSTOMERS {
        sql.execute(
            "INSERT INTO conversations (id, customer_id, agent_id) VALUES ($1::text::uuid, $2::text::uuid, $3::text::uuid)",
            &[&user(1000 + n), &user(n), &user(AGENT)],
        )
        .await
        .unwrap();
    }
    let all_messages = json!([{"event":"INSERT","schema":"public","table":"messages"}]);
    let mut customers = Vec::new();
    for n in 0..CUSTOMERS {
        let vsn = if n % 2 == 0 { Vsn::V2 } else { Vsn::V1 };
        let mut c = server.connect(vsn, &user_token(n)).await;
        // No filter at all: only the policy stands between a customer and the others' messages.
        subscribe(&mut c, "realtime:inbox", all_messages.clone()).await;
        customers.push(c);
    }
    let mut agent = server.connect(Vsn::V2, &user_token(AGENT)).await;
    subscribe(&mut agent, "realtime:inbox", all_messages.clone()).await;
    let mut anon = server.connect(Vsn::V2, &token("anon")).await;
    subscribe(&mut anon, "realtime:inbox", all_messages.clone()).await;
    let mut service = server.connect(Vsn::V2, &token("service_role")).await;
    subscribe(&mut service, "realtime:inbox", all_messages.clone()).await;

    // A burst of single-row transactions, so that many cohorts share each batch.
    const ROUNDS: u32 = 3;
    for round in 0..ROUNDS {
        for n in 0..CUSTOMERS {
            sql.execute(
                "INSERT INTO messages (conversation_id, sender_id, body) VALUES ($1::text::uuid, $2::text::uuid, $3)",
                &[&user(1000 + n), &user(n), &format!("from {n} round {round}")],
            )
            .await
            .unwrap();
        }
    }
    for (n, c) in customers.iter_mut().enumerate() {
        for round in 0..ROUNDS {
            let ev = c
                .recv_until("message", |f| f.event() == "postgres_changes")
                .await;
            assert_eq!(
                ev.payload()["data"]["record"]["body"],
                format!("from {n} round {round}"),
                "customer {n}"
            );
        }
        c.assert_no_more(
            "postgres_changes",
            &format!("customer {n} (another's message)"),
        )
        .await;
    }
    let mut agent_count = 0;
    while agent_count < CUSTOMERS * ROUNDS {
        agent
            .recv_until("message", |f| f.event() == "postgres_changes")
            .await;
        agent_count += 1;
    }
    agent.assert_quiet().await;
    for _ in 0..CUSTOMERS * ROUNDS {
        service
            .recv_until("message", |f| f.event() == "postgres_changes")
            .await;
    }
    service.assert_quiet().await;
    // anon has no policy: nothing.
    anon.assert_quiet().await;

    // A status update reaches the conversation's customer and its agent only.
    sql.execute(
        "UPDATE conversations SET status = 'active' WHERE id = $1::text::uuid",
        &[&user(1003)],
    )
    .await
    .unwrap();
    // (No one subscribed to conversations yet: nothing arrives anywhere.)
    customers[3].assert_quiet().await;

    // DELETE on an RLS table: the original's behaviour, the key only.
    let mut c = server.connect(Vsn::V2, &user_token(0)).await;
    subscribe(
        &mut c,
        "realtime:deletes",
        json!([{"event":"DELETE","schema":"public","table":"messages"}]),
    )
    .await;
    sql.batch_execute("ALTER TABLE messages REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let id: i64 = sql
        .query_one("SELECT id FROM messages WHERE body = 'from 0 round 0'", &[])
        .await
        .unwrap()
        .get(0);
    sql.execute("DELETE FROM messages WHERE id = $1", &[&id])
        .await
        .unwrap();
    let ev = c
        .recv_until("delete", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(ev.payload()["data"]["old_record"], json!({"id": id}));
}

#[tokio::test]
async fn a_refreshed_token_resubscribes_under_the_new_claims() {
    let db = TestDb::create("refresh").await;
    let slot = format!("s_{}", db.name);
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    sql.batch_execute(SCHEMA).await.unwrap();
    for n in [1u32, 2] {
        sql.execute(
            "INSERT INTO conversations (id, customer_id) VALUES ($1::text::uuid, $2::text::uuid)",
            &[&user(100 + n), &user(n)],
        )
        .await
        .unwrap();
    }
    for vsn in BOTH {
        let mut c = server.connect(vsn, &user_token(1)).await;
        let (jr, reply) = c
            .join("realtime:me", json!({"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"messages"}]}}))
            .await;
        assert_eq!(reply.payload()["status"], "ok");
        c.recv_until("subscribed", |f| f.event() == "system").await;
        let insert = |n: u32, body: &'static str| {
            let sql = &sql;
            async move {
                sql.execute(
                    "INSERT INTO messages (conversation_id, body) VALUES ($1::text::uuid, $2)",
                    &[&user(100 + n), &body],
                )
                .await
                .unwrap();
            }
        };
        insert(1, "for one").await;
        insert(2, "for two").await;
        let lsn: String = sql
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let ev = c
            .recv_until("change", |f| f.event() == "postgres_changes")
            .await;
        assert_eq!(ev.payload()["data"]["record"]["body"], "for one");
        // "for two" has been judged (under user 1's claims: withheld) before the token changes;
        // a change still being dispatched when the subscription is replaced is judged under the
        // new claims, as in the original.
        wait_slot_confirmed(&sql, &slot, &lsn).await;

        // Same role, another user: after "Subscribed to PostgreSQL" again, the view is user 2's.
        c.send(
            Some(&jr),
            Some("50"),
            "realtime:me",
            "access_token",
            json!({"access_token": user_token(2)}),
        )
        .await;
        let sys = c
            .recv_until("resubscribed", |f| f.event() == "system")
            .await;
        assert_eq!(sys.payload()["message"], "Subscribed to PostgreSQL");
        insert(1, "one again").await;
        insert(2, "two again").await;
        let ev = c
            .recv_until("change", |f| f.event() == "postgres_changes")
            .await;
        assert_eq!(ev.payload()["data"]["record"]["body"], "two again");
        c.assert_no_more("postgres_changes", "the client under its new token")
            .await;
    }
}

#[tokio::test]
async fn a_write_right_after_subscribed_is_never_missed() {
    let db = TestDb::create("race").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    create_ticks(&sql).await;
    for i in 0..25 {
        let vsn = if i % 2 == 0 { Vsn::V2 } else { Vsn::V1 };
        let mut c = server.connect(vsn, &token("anon")).await;
        let (_, reply) = c
            .join(&format!("realtime:race{i}"), json!({"config":{"postgres_changes":[{"event":"INSERT","schema":"public","table":"ticks","filter":format!("k=eq.{i}")}]}}))
            .await;
        assert_eq!(reply.payload()["status"], "ok");
        c.recv_until("subscribed", |f| f.event() == "system").await;
        sql.execute("INSERT INTO ticks (k) VALUES ($1)", &[&i])
            .await
            .unwrap();
        let ev = c
            .recv_until("the write", |f| f.event() == "postgres_changes")
            .await;
        assert_eq!(ev.payload()["data"]["record"]["k"], json!(i));
    }
}

#[tokio::test]
async fn the_slot_is_durable_and_confirmed_only_after_delivery() {
    let db = TestDb::create("durable").await;
    let mut server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    create_ticks(&sql).await;
    let slot = format!("s_{}", db.name);
    let row = sql
        .query_one(
            "SELECT temporary, plugin FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "the slot is durable");
    assert_eq!(row.get::<_, String>(1), "pgoutput");

    let (mut c, _) = subscribe_to_ticks(&server).await;
    let lsn = insert_tick(&sql, 1).await;
    c.recv_until("the write", |f| f.event() == "postgres_changes")
        .await;
    // After delivery the confirmed position moves past the write (within a few status updates).
    wait_slot_confirmed(&sql, &slot, &lsn).await;
    server.terminate();
    server.wait_exit(std::time::Duration::from_secs(15)).await;
    let exists = sql
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert!(exists.is_some(), "the slot outlives walcast");
}

#[tokio::test]
async fn sigterm_confirms_what_was_delivered_before_exiting() {
    let db = TestDb::create("sigterm").await;
    let mut server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    create_ticks(&sql).await;
    let (mut c, _) = subscribe_to_ticks(&server).await;
    let lsn = insert_tick(&sql, 1).await;
    c.recv_until("the write", |f| f.event() == "postgres_changes")
        .await;
    // Straight away: no waiting for a periodic status update.
    server.terminate();
    assert!(server
        .wait_exit(std::time::Duration::from_secs(15))
        .await
        .success());
    // The last standby status reaches the walsender just before walcast's socket closes; it may
    // take the walsender a moment to apply it. Nothing else streams this slot, so only walcast's
    // shutdown can confirm the change.
    let slot = format!("s_{}", db.name);
    wait_slot_confirmed(&sql, &slot, &lsn).await;
}

#[tokio::test]
async fn after_a_crash_reconnecting_clients_get_what_was_committed_while_down() {
    let db = TestDb::create("crash").await;
    let mut server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    create_ticks(&sql).await;
    let binding =
        json!({"postgres_changes":[{"event":"INSERT","schema":"public","table":"ticks"}]});
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    c.join_ok("realtime:t", binding.clone()).await;
    c.recv_until("subscribed", |f| f.event() == "system").await;
    let lsn = insert_tick(&sql, 1).await;
    c.recv_until("first", |f| f.event() == "postgres_changes")
        .await;
    // Wait for the confirmation of the delivered change (what RELIABILITY.md promises).
    let slot = format!("s_{}", db.name);
    wait_slot_confirmed(&sql, &slot, &lsn).await;

    server.kill().await; // kill -9
    for k in 2..=6 {
        insert_tick(&sql, k).await;
    }
    // The restart holds the backlog for the grace period; the client rejoins within it.
    let server = Server::start_with_db(&db, &[("STARTUP_GRACE_MS", "3000")]).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    c.join_ok("realtime:t", binding).await;
    c.recv_until("subscribed", |f| f.event() == "system").await;
    let mut ks = Vec::new();
    while ks.len() < 5 {
        let f = c
            .recv_until("backlog", |f| f.event() == "postgres_changes")
            .await;
        ks.push(f.payload()["data"]["record"]["k"].as_i64().unwrap());
    }
    assert_eq!(
        ks,
        vec![2, 3, 4, 5, 6],
        "in order, none missing, none twice"
    );
    c.assert_quiet().await;
}

/// Keys that must survive being quoted into the lookup: quotes, backslashes, braces, commas,
/// the word NULL, spaces, non-ASCII; one text key and one composite key, many keys of several
/// users in one transaction (so one batch checks many keys per user).
#[tokio::test]
async fn awkward_and_composite_keys_are_checked_exactly() {
    let db = TestDb::create("keys").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE tags (name text PRIMARY KEY, owner uuid NOT NULL);
         CREATE TABLE docs (owner uuid, slug text, rev int, body text, PRIMARY KEY (owner, slug, rev));
         ALTER TABLE tags ENABLE ROW LEVEL SECURITY;
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON tags FOR SELECT TO authenticated USING (owner = auth.uid());
         CREATE POLICY mine ON docs FOR SELECT TO authenticated USING (owner = auth.uid());
         GRANT SELECT ON tags, docs TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE tags, docs;",
    )
    .await
    .unwrap();
    const AWKWARD: [&str; 10] = [
        "plain",
        "a\"quote",
        "back\\slash",
        "{braces}",
        "com,ma",
        "NULL",
        "it's",
        " spaced ",
        "ünï",
        "\\\"{,}'",
    ];
    let mut subs = Vec::new();
    for n in 0..3u32 {
        let vsn = if n % 2 == 0 { Vsn::V2 } else { Vsn::V1 };
        let mut c = server.connect(vsn, &user_token(n)).await;
        subscribe(
            &mut c,
            "realtime:keys",
            json!([{"event":"INSERT","schema":"public","table":"tags"},
                   {"event":"INSERT","schema":"public","table":"docs"}]),
        )
        .await;
        subs.push(c);
    }
    // One transaction: every awkward key for every user, in both tables.
    let mut statements = String::from("BEGIN;");
    for n in 0..3u32 {
        for (i, k) in AWKWARD.iter().enumerate() {
            let lit = k.replace('\'', "''");
            statements.push_str(&format!(
                "INSERT INTO tags VALUES ('{n}/{lit}', '{}');
                 INSERT INTO docs VALUES ('{}', '{lit}', {i}, 'doc {n} {i}');",
                user(n),
                user(n)
            ));
        }
    }
    statements.push_str("COMMIT;");
    sql.batch_execute(&statements).await.unwrap();

    for (n, c) in subs.iter_mut().enumerate() {
        let mut tags = std::collections::BTreeSet::new();
        let mut docs = std::collections::BTreeSet::new();
        while tags.len() + docs.len() < 2 * AWKWARD.len() {
            let ev = c
                .recv_until("change", |f| f.event() == "postgres_changes")
                .await;
            let data = &ev.payload()["data"];
            let rec = &data["record"];
            match data["table"].as_str() {
                Some("tags") => {
                    assert!(tags.insert(rec["name"].as_str().unwrap().to_string()));
                }
                Some("docs") => {
                    assert_eq!(rec["owner"], user(n as u32), "user {n} got {rec}");
                    assert!(docs.insert(rec["slug"].as_str().unwrap().to_string()));
                }
                other => panic!("unexpected table {other:?}"),
            }
        }
        let want_tags: std::collections::BTreeSet<String> =
            AWKWARD.iter().map(|k| format!("{n}/{k}")).collect();
        let want_docs: std::collections::BTreeSet<String> =
            AWKWARD.iter().map(|k| k.to_string()).collect();
        assert_eq!(tags, want_tags, "user {n}");
        assert_eq!(docs, want_docs, "user {n}");
        c.assert_no_more("postgres_changes", &format!("user {n}"))
            .await;
    }
}

/// A policy that fails for one user (here: a division by zero only that user's check reaches)
/// withholds that user's changes and nobody else's, batch after batch; both sockets stay open.
#[tokio::test]
async fn a_policy_error_withholds_only_the_cohort_it_hits() {
    let db = TestDb::create("policyerr").await;
    let server = Server::start_with_db(&db, &[]).await;
    let sql = db.client().await;
    let bad = user(2);
    sql.batch_execute(&format!(
        "CREATE TABLE notes (id serial PRIMARY KEY, owner uuid NOT NULL, body text);
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY fragile ON notes FOR SELECT TO authenticated
           USING (CASE WHEN auth.uid() = '{bad}'::uuid THEN 1 / (id - id) = 1 ELSE true END);
         GRANT SELECT ON notes TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE notes;"
    ))
    .await
    .unwrap();
    let binding = json!([{"event":"INSERT","schema":"public","table":"notes"}]);
    let mut good = server.connect(Vsn::V2, &user_token(1)).await;
    subscribe(&mut good, "realtime:notes", binding.clone()).await;
    let mut fails = server.connect(Vsn::V1, &user_token(2)).await;
    subscribe(&mut fails, "realtime:notes", binding.clone()).await;
    let mut other = server.connect(Vsn::V2, &user_token(3)).await;
    subscribe(&mut other, "realtime:notes", binding).await;

    // Several transactions, some in one batch with both users' checks, some alone.
    for round in 0..3 {
        sql.batch_execute(&format!(
            "INSERT INTO notes (owner, body) VALUES ('{}', 'a{round}');
             BEGIN; INSERT INTO notes (owner, body) VALUES ('{}', 'b{round}'); COMMIT;",
            user(1),
            user(1)
        ))
        .await
        .unwrap();
    }
    for c in [&mut good, &mut other] {
        let mut bodies = Vec::new();
        while bodies.len() < 6 {
            let ev = c
                .recv_until("change", |f| f.event() == "postgres_changes")
                .await;
            bodies.push(
                ev.payload()["data"]["record"]["body"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        bodies.sort();
        assert_eq!(bodies, ["a0", "a1", "a2", "b0", "b1", "b2"]);
    }
    // The failing user gets nothing, and its socket still answers.
    fails
        .assert_no_more("postgres_changes", "the user whose policy fails")
        .await;
}
