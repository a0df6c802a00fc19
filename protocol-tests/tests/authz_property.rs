//! Authorization as a property: random policies (by `auth.uid()`, by a membership table, by a
//! claim, by role, plus a restrictive one), random claims, random filters and events, random
//! INSERT/UPDATE/DELETE. What each subscriber receives must equal what PostgreSQL itself says
//! it may see (`SET ROLE`, `request.jwt.claims`, `SELECT`), change by change: nothing more
//! (a leak) and nothing less. Deletes of rows under RLS carry the key only.
//!
//! DELETEs and leaves are checked against the row's last state: a DELETE reaches a subscriber
//! when PostgreSQL let its cohort (role and claims) see the row at its last INSERT/UPDATE, as
//! judged then for the cohorts some subscriber's binding matched (walcast checks those); for a
//! cohort not judged then, `DELETE_VISIBILITY` (chosen by the seed) decides. A subscriber with
//! `leaves: true` gets a leave (a DELETE marked `left_view`) for an UPDATE its binding matches
//! when its cohort was allowed at the row's previous change and is not now.
//!
//! The same again with a streaming replica (`DB_REPLICA_URLS`) taking the checks: policies,
//! memberships and rows change between and during the operations, so a replica answering
//! before it has replayed a change's commit would show up as a difference.
//!
//! The seed is printed; `WALCAST_AUTHZ_SEED=<n>` replays a run.

use std::collections::{BTreeSet, HashMap};

use protocol_tests::*;
use serde_json::{json, Value};

const USERS: [&str; 4] = [
    "00000000-0000-0000-0000-00000000000a",
    "00000000-0000-0000-0000-00000000000b",
    "00000000-0000-0000-0000-00000000000c",
    "00000000-0000-0000-0000-00000000000d",
];
const ROUNDS: usize = 3;
const SUBSCRIBERS: usize = 10;
const OPS: usize = 150;

const POLICIES: [(&str, &str); 4] = [
    (
        "p_author",
        "CREATE POLICY p_author ON msgs FOR SELECT USING (author = auth.uid())",
    ),
    (
        "p_member",
        "CREATE POLICY p_member ON msgs FOR SELECT USING (EXISTS (SELECT 1 FROM members m WHERE m.room = msgs.room AND m.user_id = auth.uid()))",
    ),
    (
        "p_gold",
        "CREATE POLICY p_gold ON msgs FOR SELECT USING ((auth.jwt() ->> 'tier') = 'gold' AND level < 5)",
    ),
    (
        "p_anon",
        "CREATE POLICY p_anon ON msgs FOR SELECT TO anon USING (level = 0)",
    ),
];
const RESTRICTIVE: &str =
    "CREATE POLICY r_not7 ON msgs AS RESTRICTIVE FOR SELECT USING (level <> 7)";

struct Subscriber {
    client: Client,
    role: &'static str,
    claims: Value,
    event: &'static str,
    /// `leaves: true` (only on `*` and DELETE bindings).
    leaves: bool,
    /// The filter as sent, and the same as SQL for the ground truth.
    filter: Option<(String, String)>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Op {
    Insert,
    Update,
    Delete,
}

fn random_filter(rng: &mut Rng) -> Option<(String, String)> {
    match rng.below(5) {
        0 | 1 => None,
        2 => {
            let r = rng.below(4) + 1;
            Some((format!("room=eq.{r}"), format!("room = {r}")))
        }
        3 => {
            let l = rng.below(8) + 1;
            Some((format!("level=lt.{l}"), format!("level < {l}")))
        }
        _ => {
            let a = rng.below(4) + 1;
            let b = rng.below(4) + 1;
            Some((format!("room=in.({a},{b})"), format!("room IN ({a}, {b})")))
        }
    }
}

#[tokio::test]
async fn every_subscriber_receives_exactly_what_postgres_lets_it_select() {
    run(false).await;
}

/// With a replica: the primary's answer is still the ground truth, and the replica must have
/// answered most batches.
#[tokio::test]
async fn with_a_read_replica_every_subscriber_still_receives_exactly_what_the_primary_allows() {
    run(true).await;
}

async fn run(with_replica: bool) {
    let seed: u64 = std::env::var("WALCAST_AUTHZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now() as u64 ^ u64::from(std::process::id()));
    println!("WALCAST_AUTHZ_SEED={seed}");
    let mut rng = Rng(seed);
    let rule = if rng.chance(50) {
        "original"
    } else {
        "withhold"
    };
    println!("DELETE_VISIBILITY={rule}");

    let db = pg::TestDb::create("authz").await;
    // The replica applies each commit 30 ms late (`recovery_min_apply_delay`): asked as soon as
    // walcast has a change, it would not have the change yet, nor the policy and membership
    // changes just before it. walcast must wait for it (or ask the primary).
    let replica = with_replica.then(|| pg::Replica::start_with(&["recovery_min_apply_delay=30ms"]));
    let replica_url = replica.as_ref().map(|r| r.url(&db));
    let mut extra = vec![("METRICS_JWT_SECRET", SECRET), ("DELETE_VISIBILITY", rule)];
    if let Some(url) = &replica_url {
        extra.push(("DB_REPLICA_URLS", url.as_str()));
        // Generous, so that the replica answers nearly every batch on a loaded machine.
        extra.push(("DB_REPLICA_MAX_WAIT_MS", "1000"));
    }
    let server = Server::start_with_db(&db, &extra).await;
    if with_replica {
        let deadline = std::time::Instant::now() + WAIT;
        while server.metric("walcast_replicas_usable").await < 1.0 {
            assert!(std::time::Instant::now() < deadline, "replica never usable");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let mut sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE members (room int, user_id uuid);
         CREATE TABLE msgs (id serial PRIMARY KEY, room int, author uuid, body text, secret text, level int);
         CREATE TABLE marks (n int PRIMARY KEY);
         ALTER TABLE msgs ENABLE ROW LEVEL SECURITY;
         GRANT SELECT ON members, marks TO anon, authenticated;
         GRANT SELECT ON msgs TO anon;
         GRANT SELECT (id, room, author, body, level) ON msgs TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE msgs, marks;",
    )
    .await
    .unwrap();

    let mut live: Vec<i32> = Vec::new();
    let mut mark = 0;
    let mut checked = 0usize;
    let mut delivered = 0usize;
    let mut deletes_seen = 0usize;
    let mut leaves_seen = 0usize;
    // DELETEs a subscriber's binding matched but its cohort could not see (the original sent
    // them all).
    let mut deletes_withheld = 0usize;
    // walcast's memory, modelled: row -> cohort (role, claims) -> PostgreSQL's verdict at the
    // row's last INSERT/UPDATE, for the cohorts judged then.
    let mut memory: HashMap<i32, HashMap<(String, String), bool>> = HashMap::new();
    for round in 0..ROUNDS {
        // Policies: a random non-empty set of permissive ones, sometimes a restrictive one.
        sql.batch_execute(
            "DROP POLICY IF EXISTS p_author ON msgs; DROP POLICY IF EXISTS p_member ON msgs;
             DROP POLICY IF EXISTS p_gold ON msgs; DROP POLICY IF EXISTS p_anon ON msgs;
             DROP POLICY IF EXISTS r_not7 ON msgs; DELETE FROM members;",
        )
        .await
        .unwrap();
        let mut chosen = Vec::new();
        for (name, ddl) in POLICIES {
            if rng.chance(50) {
                sql.batch_execute(ddl).await.unwrap();
                chosen.push(name);
            }
        }
        if chosen.is_empty() {
            sql.batch_execute(POLICIES[1].1).await.unwrap();
            chosen.push(POLICIES[1].0);
        }
        if rng.chance(40) {
            sql.batch_execute(RESTRICTIVE).await.unwrap();
            chosen.push("r_not7");
        }
        for user in USERS {
            for room in 1..=4 {
                if rng.chance(40) {
                    sql.execute(
                        "INSERT INTO members VALUES ($1, $2::text::uuid)",
                        &[&room, &user],
                    )
                    .await
                    .unwrap();
                }
            }
        }
        println!("round {round}: policies {chosen:?}");

        // Subscribers with random claims, events and filters.
        let mut subs = Vec::new();
        for i in 0..SUBSCRIBERS {
            let role = if rng.chance(25) {
                "anon"
            } else {
                "authenticated"
            };
            let mut claims = json!({"role": role, "exp": now() + 3600});
            if rng.chance(85) {
                claims["sub"] = json!(rng.pick(&USERS));
            }
            if rng.chance(40) {
                claims["tier"] = json!("gold");
            }
            let event = *rng.pick(&["*", "*", "INSERT", "UPDATE", "DELETE"]);
            let filter = random_filter(&mut rng);
            let leaves = matches!(event, "*" | "DELETE") && rng.chance(50);
            let mut binding = json!({"event": event, "schema": "public", "table": "msgs"});
            if let Some((f, _)) = &filter {
                binding["filter"] = json!(f);
            }
            if leaves {
                binding["leaves"] = json!(true);
            }
            let mut client = server.connect(Vsn::V2, &sign(claims.clone())).await;
            client
                .join_ok(
                    &format!("realtime:s{i}"),
                    json!({"postgres_changes": [binding, {"event": "INSERT", "schema": "public", "table": "marks"}]}),
                )
                .await;
            let f = client
                .recv_until("subscribed", |f| f.event() == "system")
                .await;
            assert_eq!(
                f.payload()["status"],
                "ok",
                "subscriber {i} ({role}, {filter:?}): {f:?}"
            );
            subs.push(Subscriber {
                client,
                role,
                claims,
                event,
                leaves,
                filter,
            });
        }

        for n in 0..OPS {
            let op = if live.is_empty() || rng.chance(50) {
                Op::Insert
            } else if rng.chance(70) {
                Op::Update
            } else {
                Op::Delete
            };
            let body = format!("r{round}-op{n}");
            let room = rng.below(4) as i32 + 1;
            let level = rng.below(9) as i32;
            let author = *rng.pick(&USERS);
            let id: i32 = match op {
                Op::Insert => {
                    let id: i32 = sql
                        .query_one(
                            "INSERT INTO msgs (room, author, body, secret, level) VALUES ($1, $2::text::uuid, $3, 'hidden', $4) RETURNING id",
                            &[&room, &author, &body, &level],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    live.push(id);
                    id
                }
                Op::Update => {
                    let id = *rng.pick(&live);
                    sql.execute(
                        "UPDATE msgs SET room = $2, author = $3::text::uuid, body = $4, level = $5 WHERE id = $1",
                        &[&id, &room, &author, &body, &level],
                    )
                    .await
                    .unwrap();
                    id
                }
                Op::Delete => {
                    let i = rng.below(live.len() as u64) as usize;
                    let id = live.swap_remove(i);
                    sql.execute("DELETE FROM msgs WHERE id = $1", &[&id])
                        .await
                        .unwrap();
                    id
                }
            };

            // The ground truth, before anything else changes: may each subscriber select the
            // row as it now is (through its filter)? For a DELETE: could its cohort see the row at
            // its last change? For an UPDATE: does it leave an opted-in subscriber's view?
            let mut expected = BTreeSet::new();
            let mut expected_leaves = BTreeSet::new();
            if op == Op::Delete {
                let known = memory.remove(&id).unwrap_or_default();
                for (i, s) in subs.iter().enumerate() {
                    // The old row is the key only: a filter on another column never holds.
                    if !matches!(s.event, "*" | "DELETE") || s.filter.is_some() {
                        continue;
                    }
                    let sent = match known.get(&cohort(s)) {
                        Some(v) => *v,
                        None => rule == "original",
                    };
                    if sent {
                        expected.insert(i);
                    } else {
                        deletes_withheld += 1;
                    }
                }
            } else {
                let before = memory.remove(&id).unwrap_or_default();
                let mut verdicts: HashMap<(String, String), bool> = HashMap::new();
                for (i, s) in subs.iter().enumerate() {
                    let takes = match s.event {
                        "*" | "DELETE" => true,
                        "INSERT" => op == Op::Insert,
                        _ => op == Op::Update,
                    };
                    if !takes || !filter_holds(&sql, s, id).await {
                        continue;
                    }
                    let allowed = match verdicts.get(&cohort(s)) {
                        Some(v) => *v,
                        None => {
                            let v = may_select(&mut sql, s, id).await;
                            verdicts.insert(cohort(s), v);
                            v
                        }
                    };
                    let wanted = match s.event {
                        "*" => true,
                        "INSERT" => op == Op::Insert,
                        "UPDATE" => op == Op::Update,
                        _ => false,
                    };
                    if wanted && allowed {
                        expected.insert(i);
                    }
                    if op == Op::Update
                        && s.leaves
                        && !allowed
                        && before.get(&cohort(s)) == Some(&true)
                    {
                        expected_leaves.insert(i);
                    }
                }
                memory.insert(id, verdicts);
            }

            // A marker every subscriber receives: changes are delivered in commit order, so
            // once it is in, everything this operation caused has been delivered or withheld.
            mark += 1;
            sql.execute("INSERT INTO marks VALUES ($1)", &[&mark])
                .await
                .unwrap();
            let mut got = BTreeSet::new();
            let mut got_leaves = BTreeSet::new();
            for (i, s) in subs.iter_mut().enumerate() {
                loop {
                    let f = s
                        .client
                        .recv_until("change", |f| f.event() == "postgres_changes")
                        .await;
                    let data = &f.payload()["data"];
                    if data["table"] == "marks" {
                        assert_eq!(data["record"]["n"], mark, "marks arrive in order");
                        break;
                    }
                    let record = &data["record"];
                    if s.role == "authenticated" {
                        assert!(
                            record.get("secret").is_none()
                                && data["old_record"].get("secret").is_none(),
                            "seed {seed}: a column the role may not select was sent: {data}"
                        );
                    }
                    match data["type"].as_str() {
                        Some("DELETE") if data["left_view"] == true => {
                            leaves_seen += 1;
                            assert_eq!(op, Op::Update, "seed {seed}: a leave for a {op:?}: {data}");
                            assert_eq!(
                                data["old_record"],
                                json!({"id": id}),
                                "seed {seed}: {data}"
                            );
                            assert!(got_leaves.insert(i), "seed {seed}: two leaves for #{i}");
                        }
                        Some("DELETE") => {
                            deletes_seen += 1;
                            got.insert(i);
                            assert_eq!(op, Op::Delete, "seed {seed}: unexpected DELETE {data}");
                            assert!(
                                s.event == "*" || s.event == "DELETE",
                                "seed {seed}: DELETE to a {} binding",
                                s.event
                            );
                            let old = data["old_record"].as_object().expect("old_record");
                            assert_eq!(
                                old.keys().collect::<Vec<_>>(),
                                vec!["id"],
                                "seed {seed}: a deleted row under RLS must carry its key only: {data}"
                            );
                            assert_eq!(old["id"], id);
                        }
                        Some(kind) => {
                            assert_eq!(
                                record["body"], body,
                                "seed {seed}: a change of another operation ({kind}): {data}"
                            );
                            got.insert(i);
                        }
                        None => panic!("no type: {data}"),
                    }
                }
            }
            {
                checked += subs.len();
                delivered += got.len();
                if got != expected || got_leaves != expected_leaves {
                    let detail: Vec<String> = subs
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| {
                            got.contains(i) != expected.contains(i)
                                || got_leaves.contains(i) != expected_leaves.contains(i)
                        })
                        .map(|(i, s)| {
                            format!(
                                "#{i}: {} {} {} leaves={} {:?}",
                                s.role, s.claims, s.event, s.leaves, s.filter
                            )
                        })
                        .collect();
                    panic!(
                        "seed {seed} ({rule}), round {round} ({chosen:?}), op {n} {op:?} on row {id} (room {room}, level {level}, author {author}): \
                         delivered to {got:?} (leaves {got_leaves:?}), expected {expected:?} (leaves {expected_leaves:?}); differing subscribers: {detail:?}"
                    );
                }
            }
        }
    }
    println!(
        "{checked} subscriber-change decisions checked against PostgreSQL ({delivered} delivered), {deletes_seen} key-only deletes, {deletes_withheld} withheld, {leaves_seen} leaves"
    );
    assert!(checked >= 3000, "{checked}");
    let on_replica = server
        .metric("walcast_authorization_batches_total{on=\"replica\"}")
        .await;
    let on_primary = server
        .metric("walcast_authorization_batches_total{on=\"primary\"}")
        .await;
    let mut fallbacks = Vec::new();
    for reason in ["behind", "conflict", "error", "unavailable"] {
        let n = server
            .metric(&format!(
                "walcast_replica_fallbacks_total{{reason=\"{reason}\"}}"
            ))
            .await;
        fallbacks.push(format!("{reason} {n}"));
    }
    println!(
        "row-check batches: {on_replica} on the replica, {on_primary} on the primary; \
         replica fallbacks: {}",
        fallbacks.join(", ")
    );
    if with_replica {
        assert!(
            on_replica > on_primary,
            "the replica answered too few batches to say anything"
        );
    } else {
        assert_eq!(on_replica, 0.0);
    }
    assert!(
        delivered > 0 && delivered < checked,
        "the cases must include both verdicts"
    );
}

/// A subscriber's claims cohort, as walcast groups row checks.
fn cohort(s: &Subscriber) -> (String, String) {
    (s.role.to_owned(), s.claims.to_string())
}

/// Whether the subscriber's filter holds on the row as it now is (judged by PostgreSQL, as the
/// table's owner).
async fn filter_holds(sql: &tokio_postgres::Client, s: &Subscriber, id: i32) -> bool {
    let pred = s
        .filter
        .as_ref()
        .map_or("true".to_owned(), |(_, p)| p.clone());
    let n: i64 = sql
        .query_one(
            &format!("SELECT count(*) FROM msgs WHERE id = $1 AND ({pred})"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    n > 0
}

/// Whether PostgreSQL lets the subscriber's role and claims select the row as it now is.
async fn may_select(sql: &mut tokio_postgres::Client, s: &Subscriber, id: i32) -> bool {
    let tx = sql.transaction().await.unwrap();
    tx.batch_execute(&format!("SET LOCAL ROLE {}", s.role))
        .await
        .unwrap();
    tx.execute(
        "SELECT set_config('request.jwt.claims', $1, true)",
        &[&s.claims.to_string()],
    )
    .await
    .unwrap();
    let visible: i64 = tx
        .query_one("SELECT count(*) FROM msgs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    visible > 0
}
