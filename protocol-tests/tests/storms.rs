//! Bounded work per client: token pushes re-run a channel's checks at most one at a time (the
//! latest token wins, a token equal after cleaning is the same token, nothing outlives the
//! socket), and delivery has connections of its own, so a storm of joins and token pushes from
//! one client cannot delay or withhold another user's changes.

use std::time::{Duration, Instant};

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

fn user(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// A token for user `n`; `salt` makes tokens with the same claims differ.
fn user_token(n: u32, salt: i64) -> String {
    sign(json!({"role":"authenticated","sub": user(n),"exp": now() + 3600 + salt}))
}

/// `items.v` is of a domain whose check counts (in the sequence `checks`) every time walcast's
/// client pool casts a filter value to it, and takes 100 ms: each postgres_changes check of a
/// channel filtering on `v` counts one.
const COUNTED: &str = "
    CREATE SEQUENCE checks;
    CREATE FUNCTION counted_check(v int) RETURNS boolean LANGUAGE sql VOLATILE AS $$
        SELECT CASE WHEN current_setting('application_name') = 'walcast'
                    THEN nextval('checks') > 0 AND (SELECT true FROM pg_sleep(0.1))
                    ELSE true END
    $$;
    CREATE DOMAIN counted AS int CHECK (counted_check(VALUE));
    CREATE TABLE items (id serial PRIMARY KEY, v counted, owner uuid);
    ALTER TABLE items ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON items FOR SELECT TO authenticated USING (owner = auth.uid());
    GRANT SELECT ON items TO anon, authenticated;
    ALTER PUBLICATION supabase_realtime ADD TABLE items;
";

async fn checks_run(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM checks",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

fn items_binding() -> Value {
    json!([{"event":"INSERT","schema":"public","table":"items","filter":"v=eq.1"}])
}

async fn subscribed(c: &mut Client) {
    let sys = c
        .recv_until("Subscribed to PostgreSQL", |f| f.event() == "system")
        .await;
    assert_eq!(
        sys.payload()["message"],
        "Subscribed to PostgreSQL",
        "{sys:?}"
    );
}

/// Joins `realtime:items` with the counted binding and waits for the subscription.
async fn join_items(c: &mut Client) -> String {
    let jr = c
        .join_ok(
            "realtime:items",
            json!({"postgres_changes": items_binding()}),
        )
        .await;
    subscribed(c).await;
    jr
}

async fn push_token(c: &mut Client, jr: &str, token: &str) {
    c.send(
        Some(jr),
        None,
        "realtime:items",
        "access_token",
        json!({"access_token": token}),
    )
    .await;
}

/// The pool has two connections and hands them out in order, so once a later join is
/// subscribed, every check queued before it has started: the counts below do not race.
#[tokio::test]
async fn token_pushes_run_one_check_per_channel_the_latest_wins_and_none_outlives_the_socket() {
    let db = TestDb::create("token_storm").await;
    let server = Server::start_with_db(&db, &[("DB_POOL_SIZE", "2")]).await;
    let sql = db.client().await;
    sql.batch_execute(COUNTED).await.unwrap();

    let first = user_token(1, 0);
    let mut a = server.connect(Vsn::V2, &first).await;
    let jr = join_items(&mut a).await;
    assert_eq!(checks_run(&sql).await, 1, "the join's check");

    // The same token with whitespace, or percent-encoded, is the same token: no work at all.
    let dot = first.find('.').unwrap();
    for i in 0..30 {
        let variant = match i % 4 {
            0 => format!(" {first}"),
            1 => format!("{first}\n"),
            2 => format!("{} {}", &first[..dot + i], &first[dot + i..]),
            _ => format!("{}%2E{}", &first[..dot], &first[dot + 1..]),
        };
        push_token(&mut a, &jr, &variant).await;
    }
    a.assert_quiet().await;

    // Twenty new tokens in a burst, alternating anon and the user, ending with the user: one
    // check runs, one more runs after it under the latest token.
    for i in 0..20 {
        let t = if i % 2 == 0 {
            token("anon")
        } else {
            user_token(1, i)
        };
        push_token(&mut a, &jr, &t).await;
    }
    subscribed(&mut a).await;
    let mut b = server.connect(Vsn::V2, &user_token(2, 0)).await;
    join_items(&mut b).await;
    let after_storm = checks_run(&sql).await;
    assert!(
        after_storm <= 5,
        "30 same-token pushes and 20 new tokens ran {} checks (expected at most 2 plus the two joins)",
        after_storm - 2
    );

    // The latest token (the user's) is the one in force: their row arrives, no one else's.
    sql.execute(
        "INSERT INTO items (v, owner) VALUES (1, $1::text::uuid), (1, $2::text::uuid)",
        &[&user(9), &user(1)],
    )
    .await
    .unwrap();
    let ev = a
        .recv_until("the user's row", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(ev.payload()["data"]["record"]["owner"], user(1));
    a.assert_no_more("postgres_changes", "the latest token's user")
        .await;

    // Checks still waiting when the socket closes are dropped with it.
    for i in 0..10 {
        let t = if i % 2 == 0 {
            token("anon")
        } else {
            user_token(1, 100 + i)
        };
        push_token(&mut a, &jr, &t).await;
    }
    drop(a);
    let mut c = server.connect(Vsn::V2, &user_token(3, 0)).await;
    join_items(&mut c).await;
    let after_close = checks_run(&sql).await;
    assert!(
        after_close - after_storm <= 3,
        "10 tokens pushed before closing ran {} checks after it (expected at most 2)",
        after_close - after_storm - 1
    );
}

const NOTES: &str = "
    CREATE TABLE notes (id serial PRIMARY KEY, owner uuid NOT NULL, body text);
    ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON notes FOR SELECT TO authenticated USING (owner = auth.uid());
    GRANT SELECT ON notes TO authenticated;
    ALTER PUBLICATION supabase_realtime ADD TABLE notes;
    -- Private channels named slow*: every read check sleeps 250 ms per probe row (two per join).
    CREATE POLICY slow_read ON realtime.messages FOR SELECT TO authenticated
        USING (realtime.topic() LIKE 'slow%' AND (SELECT true FROM pg_sleep(0.25)));
";

/// How long another user's change may take to arrive while the storm runs.
const DELIVERY_BOUND: Duration = Duration::from_secs(2);

/// Waits up to `within` for the next postgres_changes frame; `None` if none came.
async fn next_change(c: &mut Client, within: Duration) -> Option<(Frame, Duration)> {
    let started = Instant::now();
    loop {
        let left = within.checked_sub(started.elapsed())?;
        // In slices shorter than the harness's own wait, which fails the test when it passes.
        let slice = left.min(WAIT / 2);
        if let Ok(f) = tokio::time::timeout(slice, c.recv()).await {
            if f.event() == "postgres_changes" {
                return Some((f, started.elapsed()));
            }
        }
    }
}

#[tokio::test]
async fn a_storm_of_joins_and_token_pushes_does_not_delay_or_withhold_another_users_changes() {
    let db = TestDb::create("join_storm").await;
    let server = Server::start_with_db(&db, &[("DB_POOL_SIZE", "1")]).await;
    let sql = db.client().await;
    sql.batch_execute(NOTES).await.unwrap();

    let reader = 7;
    let mut victim = server.connect(Vsn::V2, &user_token(reader, 0)).await;
    victim
        .join_ok(
            "realtime:notes",
            json!({"postgres_changes": [{"event":"INSERT","schema":"public","table":"notes"}]}),
        )
        .await;
    subscribed(&mut victim).await;

    // One private channel joined before the storm, for token pushes.
    let mut pusher = server.connect(Vsn::V2, &user_token(8, 0)).await;
    let pjr = pusher
        .join_ok("realtime:slow-pushed", json!({"private": true}))
        .await;

    // The storm: 95 private joins (47 s of policy checks for the one client connection, more
    // than the 30 s a check may wait for a connection), and a burst of token pushes.
    let mut storm = server.connect(Vsn::V2, &user_token(8, 0)).await;
    for n in 0..95 {
        let r = format!("{n}");
        storm
            .send(
                Some(&r),
                Some(&r),
                &format!("realtime:slow-{n}"),
                "phx_join",
                json!({"config": {"private": true}}),
            )
            .await;
    }
    for i in 0..20 {
        pusher
            .send(
                Some(&pjr),
                None,
                "realtime:slow-pushed",
                "access_token",
                json!({"access_token": user_token(8, i + 1)}),
            )
            .await;
    }
    // The storm holds the client connection (its policy sleeps) before the change is written.
    let deadline = Instant::now() + WAIT;
    loop {
        let busy: i64 = sql
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND application_name = 'walcast' AND wait_event = 'PgSleep'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if busy > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the storm never reached the database"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut delays = Vec::new();
    for i in 0..5 {
        sql.execute(
            "INSERT INTO notes (owner, body) VALUES ($1::text::uuid, $2)",
            &[&user(reader), &format!("note {i}")],
        )
        .await
        .unwrap();
        // Long enough to see a change withheld (a check waits at most 30 s for a connection).
        match next_change(&mut victim, Duration::from_secs(40)).await {
            Some((ev, took)) => {
                eprintln!(
                    "note {i} delivered {} ms after its commit",
                    took.as_millis()
                );
                assert_eq!(ev.payload()["data"]["record"]["body"], format!("note {i}"));
                delays.push(Some(took));
            }
            None => {
                eprintln!("note {i} withheld: not delivered within 40 s of its commit");
                delays.push(None);
            }
        }
    }
    assert!(
        delays.iter().all(|d| d.is_some_and(|d| d < DELIVERY_BOUND)),
        "during the storm, changes took {delays:?} to arrive (bound {DELIVERY_BOUND:?}; None: withheld)"
    );
}
