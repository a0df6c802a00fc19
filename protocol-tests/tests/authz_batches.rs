//! Delivery as a property of each change alone: random transactions of one to six statements
//! mixing INSERT, UPDATE and DELETE over three tables (a parent table with its own policy, a
//! child table whose policy reads the parent and calls a helper function, and a table without
//! RLS), with primary keys and values long enough to be stored out of line (TOAST) and updates
//! that leave them unchanged. Channels carry several bindings each, under several users. Every
//! change each channel should get (by its bindings' events and filters, and by what PostgreSQL
//! lets the user select once the transaction has committed) must arrive exactly once, with the
//! `ids` of exactly the bindings it matched; nothing else may arrive. Run with RLS on and off.
//!
//! A DELETE under RLS goes to a channel when its cohort (role and claims) could see the row:
//! for `convs` (`REPLICA IDENTITY FULL`) as PostgreSQL judges the old row (put back, in a probe
//! table with the same policy); for `msgs` as PostgreSQL judged the row at its last INSERT or
//! UPDATE, when some channel of that cohort was matched by it then (walcast's memory), and
//! otherwise as the original (`DELETE_VISIBILITY=original`: sent).
//!
//! The seed is printed; `WALCAST_AUTHZ_SEED=<n>` replays a run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::{json, Value};

const CUSTOMERS: [&str; 3] = [
    "00000000-0000-4000-8000-000000000001",
    "00000000-0000-4000-8000-000000000002",
    "00000000-0000-4000-8000-000000000003",
];
const AGENT: &str = "00000000-0000-4000-8000-0000000000a9";
const TRANSACTIONS: usize = 45;
const CONVERSATIONS: i64 = 4;

const SCHEMA: &str = "
    CREATE TABLE agents (user_id uuid PRIMARY KEY);
    CREATE FUNCTION is_agent() RETURNS boolean LANGUAGE sql STABLE
        AS $$ SELECT EXISTS (SELECT 1 FROM agents WHERE user_id = auth.uid()) $$;
    CREATE TABLE convs (id int PRIMARY KEY, owner uuid, status text, stamp text);
    ALTER TABLE convs REPLICA IDENTITY FULL;
    CREATE TABLE msgs (id text PRIMARY KEY, conv int, level int, stamp text, body text);
    ALTER TABLE msgs ALTER COLUMN id SET STORAGE EXTERNAL;
    ALTER TABLE msgs ALTER COLUMN body SET STORAGE EXTERNAL;
    CREATE TABLE notes (id int PRIMARY KEY, room int, stamp text);
    CREATE TABLE marks (n int PRIMARY KEY);
    CREATE TABLE convs_probe (LIKE convs);
    ALTER TABLE convs_probe ENABLE ROW LEVEL SECURITY;
    CREATE POLICY mine ON convs_probe FOR SELECT TO authenticated
        USING (owner = auth.uid() OR is_agent());
    GRANT SELECT ON convs_probe TO anon, authenticated;
    CREATE POLICY mine ON convs FOR SELECT TO authenticated
        USING (owner = auth.uid() OR is_agent());
    CREATE POLICY through_parent ON msgs FOR SELECT TO authenticated
        USING (is_agent() OR EXISTS (SELECT 1 FROM convs c WHERE c.id = msgs.conv));
    GRANT SELECT ON agents, convs, msgs, notes, marks TO anon, authenticated;
    GRANT EXECUTE ON FUNCTION is_agent() TO anon, authenticated;
    ALTER PUBLICATION supabase_realtime ADD TABLE convs, msgs, notes, marks;
";

/// A filter as sent, and how it judges a row image (a missing column never matches).
#[derive(Clone, Debug)]
enum Filter {
    Eq(&'static str, i64),
    Lt(&'static str, i64),
    In(&'static str, i64, i64),
    EqText(&'static str, &'static str),
}

impl Filter {
    fn wire(&self) -> String {
        match self {
            Filter::Eq(c, v) => format!("{c}=eq.{v}"),
            Filter::Lt(c, v) => format!("{c}=lt.{v}"),
            Filter::In(c, a, b) => format!("{c}=in.({a},{b})"),
            Filter::EqText(c, v) => format!("{c}=eq.{v}"),
        }
    }
    fn matches(&self, image: &BTreeMap<&'static str, Value>) -> bool {
        let num = |c: &str| image.get(c).and_then(Value::as_i64);
        match self {
            Filter::Eq(c, v) => num(c) == Some(*v),
            Filter::Lt(c, v) => num(c).is_some_and(|x| x < *v),
            Filter::In(c, a, b) => num(c).is_some_and(|x| x == *a || x == *b),
            Filter::EqText(c, v) => image.get(c).and_then(Value::as_str) == Some(*v),
        }
    }
}

#[derive(Clone, Debug)]
struct Binding {
    table: &'static str,
    event: &'static str,
    filter: Option<Filter>,
    /// The id the server gave it (the join reply's).
    id: u64,
}

impl Binding {
    fn covers(&self, kind: &str) -> bool {
        self.event == "*" || self.event == kind
    }
}

struct Channel {
    client: Client,
    role: &'static str,
    claims: Value,
    bindings: Vec<Binding>,
}

/// One row change as the test made it.
#[derive(Debug)]
struct Made {
    table: &'static str,
    kind: &'static str,
    /// The primary key as text.
    key: String,
    /// What the change's filters see: the new row, or for a DELETE the old row as the replica
    /// identity logs it (only the key, unless REPLICA IDENTITY FULL).
    image: BTreeMap<&'static str, Value>,
    /// The full row (new, or old for a DELETE), to check what was sent.
    row: BTreeMap<&'static str, Value>,
}

impl Made {
    /// How the test recognises the change among those delivered.
    fn identity(&self) -> String {
        match self.kind {
            "DELETE" => format!("{}:DELETE:{}", self.table, short(&self.key)),
            _ => format!(
                "{}:{}",
                self.table,
                self.row["stamp"].as_str().unwrap_or("?")
            ),
        }
    }
}

fn short(key: &str) -> String {
    if key.len() > 24 {
        format!("{}…({} bytes)", &key[..16], key.len())
    } else {
        key.to_owned()
    }
}

fn random_binding(rng: &mut Rng) -> Binding {
    let event = *rng.pick(&["*", "*", "INSERT", "UPDATE", "DELETE"]);
    let (table, filter) = match rng.below(3) {
        0 => (
            "msgs",
            match rng.below(5) {
                0 | 1 => None,
                2 => Some(Filter::Eq(
                    "conv",
                    rng.below(CONVERSATIONS as u64) as i64 + 1,
                )),
                3 => Some(Filter::Lt("level", rng.below(8) as i64 + 1)),
                _ => Some(Filter::In(
                    "conv",
                    rng.below(CONVERSATIONS as u64) as i64 + 1,
                    rng.below(CONVERSATIONS as u64) as i64 + 1,
                )),
            },
        ),
        1 => (
            "convs",
            match rng.below(3) {
                0 => None,
                1 => Some(Filter::EqText("status", "open")),
                _ => Some(Filter::Eq("id", rng.below(CONVERSATIONS as u64) as i64 + 1)),
            },
        ),
        _ => (
            "notes",
            if rng.chance(50) {
                None
            } else {
                Some(Filter::Eq("room", rng.below(3) as i64 + 1))
            },
        ),
    };
    Binding {
        table,
        event,
        filter,
        id: 0,
    }
}

/// A text of `len` characters from `seed`, varied enough not to compress away.
fn long_text(seed: u64, len: usize) -> String {
    let mut r = Rng(seed);
    (0..len)
        .map(|_| char::from(b'a' + r.below(26) as u8))
        .collect()
}

#[tokio::test]
async fn every_change_reaches_exactly_its_channels_whatever_shares_its_transaction() {
    let seed: u64 = std::env::var("WALCAST_AUTHZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now() as u64 ^ u64::from(std::process::id()));
    println!("WALCAST_AUTHZ_SEED={seed}");
    let mut rng = Rng(seed);

    let db = TestDb::create("authz_batches").await;
    let server = Server::start_with_db(&db, &[]).await;
    let mut sql = db.client().await;
    sql.batch_execute(SCHEMA).await.unwrap();
    sql.execute("INSERT INTO agents VALUES ($1::text::uuid)", &[&AGENT])
        .await
        .unwrap();
    for c in 1..=CONVERSATIONS {
        sql.execute(
            "INSERT INTO convs VALUES ($1::int, $2::text::uuid, 'open', 'seed')",
            &[&(c as i32), &CUSTOMERS[(c as usize) % CUSTOMERS.len()]],
        )
        .await
        .unwrap();
    }
    // The seed rows are through the stream before any channel joins (else a channel that
    // joined first could get them).
    let lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    protocol_tests::pg::wait_slot_confirmed(&sql, &format!("s_{}", db.name), &lsn).await;

    let mut mark = 0;
    let mut next_id: i64 = 100;
    let mut live_msgs: Vec<String> = Vec::new();
    let mut live_notes: Vec<i64> = Vec::new();
    let mut bodies: HashMap<String, String> = HashMap::new();
    let (mut decisions, mut delivered, mut multi, mut toasted_updates) = (0, 0, 0, 0);
    for rls in [true, false] {
        sql.batch_execute(if rls {
            "ALTER TABLE convs ENABLE ROW LEVEL SECURITY; ALTER TABLE msgs ENABLE ROW LEVEL SECURITY;"
        } else {
            "ALTER TABLE convs DISABLE ROW LEVEL SECURITY; ALTER TABLE msgs DISABLE ROW LEVEL SECURITY;"
        })
        .await
        .unwrap();

        // Channels: each customer, the agent, anon, and two more customers' channels.
        let mut who: Vec<(&'static str, Option<&'static str>)> = CUSTOMERS
            .iter()
            .map(|c| ("authenticated", Some(*c)))
            .collect();
        who.push(("authenticated", Some(AGENT)));
        who.push(("anon", None));
        who.push(("authenticated", Some(*rng.pick(&CUSTOMERS))));
        who.push(("authenticated", Some(*rng.pick(&CUSTOMERS))));
        let mut channels = Vec::new();
        for (i, (role, sub)) in who.into_iter().enumerate() {
            let mut claims = json!({"role": role, "exp": now() + 3600});
            if let Some(sub) = sub {
                claims["sub"] = json!(sub);
            }
            let mut bindings: Vec<Binding> = (0..2 + rng.below(3))
                .map(|_| random_binding(&mut rng))
                .collect();
            bindings.push(Binding {
                table: "marks",
                event: "INSERT",
                filter: None,
                id: 0,
            });
            let wire: Vec<Value> = bindings
                .iter()
                .map(|b| {
                    let mut w = json!({"event": b.event, "schema": "public", "table": b.table});
                    if let Some(f) = &b.filter {
                        w["filter"] = json!(f.wire());
                    }
                    w
                })
                .collect();
            let vsn = if i % 2 == 0 { Vsn::V2 } else { Vsn::V1 };
            let mut client = server.connect(vsn, &sign(claims.clone())).await;
            let (_, reply) = client
                .join(
                    &format!("realtime:c{i}-{rls}"),
                    json!({"config": {"postgres_changes": wire}}),
                )
                .await;
            assert_eq!(reply.payload()["status"], "ok", "{:?}", reply.payload());
            let echoed = reply.payload()["response"]["postgres_changes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert_eq!(echoed.len(), bindings.len());
            for (b, e) in bindings.iter_mut().zip(&echoed) {
                b.id = e["id"].as_u64().expect("binding id");
            }
            let sys = client
                .recv_until("subscribed", |f| f.event() == "system")
                .await;
            assert_eq!(sys.payload()["status"], "ok", "{:?}", sys.payload());
            println!(
                "rls={rls} channel {i}: {role} {sub:?} {:?}",
                bindings
                    .iter()
                    .map(|b| format!("{} {} {:?}", b.table, b.event, b.filter))
                    .collect::<Vec<_>>()
            );
            channels.push(Channel {
                client,
                role,
                claims,
                bindings,
            });
        }

        // walcast's memory of who could see each msgs row at its last change, modelled:
        // key -> cohort (role, claims) -> what PostgreSQL said then.
        let mut memory: HashMap<String, HashMap<(String, String), bool>> = HashMap::new();
        for t in 0..TRANSACTIONS {
            let statements = if rng.chance(35) { 1 } else { 2 + rng.below(5) };
            if statements > 1 {
                multi += 1;
            }
            let tx = sql.transaction().await.unwrap();
            let mut made: Vec<Made> = Vec::new();
            let mut convs_deleted = HashSet::new();
            for s in 0..statements {
                let stamp = format!("r{rls}t{t}s{s}");
                let roll = rng.below(100);
                let change = if roll < 55 {
                    msgs_change(
                        &tx,
                        &mut rng,
                        &stamp,
                        &mut next_id,
                        &mut live_msgs,
                        &mut bodies,
                    )
                    .await
                } else if roll < 75 {
                    convs_change(&tx, &mut rng, &stamp, &mut convs_deleted).await
                } else {
                    notes_change(&tx, &mut rng, &stamp, &mut next_id, &mut live_notes).await
                };
                if let Some(m) = change {
                    if m.table == "msgs" && m.kind == "UPDATE" && m.key.len() > 1000 {
                        toasted_updates += 1;
                    }
                    made.push(m);
                }
            }
            tx.commit().await.unwrap();

            // Who may get each DELETE under RLS, change by change in commit order.
            let mut may_delete: HashMap<(usize, usize), bool> = HashMap::new();
            if rls {
                for (mi, m) in made.iter().enumerate() {
                    match (m.table, m.kind) {
                        ("notes", _) => {}
                        ("convs", "DELETE") => {
                            for (ci, ch) in channels.iter().enumerate() {
                                let ok = old_row_selectable(&mut sql, ch, m).await;
                                may_delete.insert((mi, ci), ok);
                            }
                        }
                        ("msgs", "DELETE") => {
                            let known = memory.remove(&m.key).unwrap_or_default();
                            for (ci, ch) in channels.iter().enumerate() {
                                let ok = known.get(&cohort(ch)).copied().unwrap_or(true);
                                may_delete.insert((mi, ci), ok);
                            }
                        }
                        ("msgs", _) => {
                            // The cohorts checked: those with a channel whose msgs binding takes
                            // this change or DELETEs and whose filter holds on the row.
                            let mut verdicts = HashMap::new();
                            for ch in &channels {
                                let matched = ch.bindings.iter().any(|b| {
                                    b.table == m.table
                                        && (b.covers(m.kind) || b.covers("DELETE"))
                                        && b.filter.as_ref().is_none_or(|f| f.matches(&m.image))
                                });
                                if matched && !verdicts.contains_key(&cohort(ch)) {
                                    let ok = selectable(&mut sql, ch, m).await;
                                    verdicts.insert(cohort(ch), ok);
                                }
                            }
                            memory.insert(m.key.clone(), verdicts);
                        }
                        _ => {}
                    }
                }
            }

            // What each channel should get, judged now that the transaction has committed.
            let mut expected: Vec<BTreeMap<String, BTreeSet<u64>>> = Vec::new();
            for (ci, ch) in channels.iter().enumerate() {
                let mut want = BTreeMap::new();
                for (mi, m) in made.iter().enumerate() {
                    let ids: BTreeSet<u64> = ch
                        .bindings
                        .iter()
                        .filter(|b| b.table == m.table && b.covers(m.kind))
                        .filter(|b| b.filter.as_ref().is_none_or(|f| f.matches(&m.image)))
                        .map(|b| b.id)
                        .collect();
                    decisions += 1;
                    if ids.is_empty() {
                        continue;
                    }
                    let checked = rls && m.table != "notes" && m.kind != "DELETE";
                    if checked && !selectable(&mut sql, ch, m).await {
                        continue;
                    }
                    if may_delete.get(&(mi, ci)) == Some(&false) {
                        continue;
                    }
                    want.insert(m.identity(), ids);
                }
                expected.push(want);
            }

            mark += 1;
            sql.execute("INSERT INTO marks VALUES ($1)", &[&mark])
                .await
                .unwrap();
            let by_identity: HashMap<String, &Made> =
                made.iter().map(|m| (m.identity(), m)).collect();
            for (i, (ch, want)) in channels.iter_mut().zip(expected).enumerate() {
                let mut got: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
                loop {
                    let f = ch
                        .client
                        .recv_until("change", |f| f.event() == "postgres_changes")
                        .await;
                    let ids: BTreeSet<u64> = f.payload()["ids"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_u64).collect())
                        .unwrap_or_default();
                    let data = &f.payload()["data"];
                    let table = data["table"].as_str().unwrap_or_default().to_owned();
                    if table == "marks" {
                        assert_eq!(data["record"]["n"], mark, "marks arrive in order");
                        break;
                    }
                    let kind = data["type"].as_str().unwrap_or_default();
                    let identity = if kind == "DELETE" {
                        let old = &data["old_record"];
                        let key = match &old["id"] {
                            Value::String(s) => s.clone(),
                            v => v.to_string(),
                        };
                        if rls && table != "notes" {
                            assert_eq!(
                                old.as_object().map(|o| o.len()),
                                Some(1),
                                "seed {seed}: a deleted row under RLS carries its key only"
                            );
                        }
                        format!("{table}:DELETE:{}", short(&key))
                    } else {
                        format!(
                            "{table}:{}",
                            data["record"]["stamp"].as_str().unwrap_or("?")
                        )
                    };
                    // What was sent is the row as made (an unchanged out-of-line value may be
                    // absent, never wrong).
                    if let Some(m) = by_identity.get(&identity) {
                        let sent = if kind == "DELETE" {
                            &data["old_record"]
                        } else {
                            &data["record"]
                        };
                        for (col, v) in sent.as_object().into_iter().flatten() {
                            if let Some(truth) = m.row.get(col.as_str()) {
                                assert!(
                                    v == truth,
                                    "seed {seed}: {identity} sent {col} = {} but it is {}",
                                    short(&v.to_string()),
                                    short(&truth.to_string())
                                );
                            }
                        }
                    }
                    assert!(
                        got.insert(identity.clone(), ids).is_none(),
                        "seed {seed}: {identity} sent twice to channel {i}"
                    );
                }
                delivered += got.len();
                assert!(
                    got == want,
                    "seed {seed}, rls={rls}, transaction {t} ({} statements: {:?}), channel {i} ({} {}):\n  got      {:?}\n  expected {:?}",
                    made.len(),
                    made.iter().map(|m| format!("{} {} {}", m.table, m.kind, short(&m.key))).collect::<Vec<_>>(),
                    ch.role,
                    ch.claims["sub"],
                    got,
                    want
                );
            }
        }
    }
    println!(
        "{decisions} channel-change decisions, {delivered} deliveries, {multi} multi-statement transactions, {toasted_updates} updates of rows with out-of-line keys"
    );
    assert!(delivered > 50, "the cases must deliver: {delivered}");
    assert!(
        multi > 20 && toasted_updates > 0,
        "{multi} {toasted_updates}"
    );
}

/// Whether the channel's user may select the changed row now (by PostgreSQL itself).
async fn selectable(sql: &mut tokio_postgres::Client, ch: &Channel, m: &Made) -> bool {
    let tx = sql.transaction().await.unwrap();
    tx.batch_execute(&format!("SET LOCAL ROLE {}", ch.role))
        .await
        .unwrap();
    tx.execute(
        "SELECT set_config('request.jwt.claims', $1, true)",
        &[&ch.claims.to_string()],
    )
    .await
    .unwrap();
    let n: i64 = tx
        .query_one(
            &format!("SELECT count(*) FROM {} WHERE id::text = $1", m.table),
            &[&m.key],
        )
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    n > 0
}

/// A channel's claims cohort, as walcast groups row checks.
fn cohort(ch: &Channel) -> (String, String) {
    (ch.role.to_owned(), ch.claims.to_string())
}

/// Whether PostgreSQL would let the channel's user see a deleted conversation as it was: the
/// old row put back in a probe table with the same policy, selected under the user's claims.
async fn old_row_selectable(sql: &mut tokio_postgres::Client, ch: &Channel, m: &Made) -> bool {
    let tx = sql.transaction().await.unwrap();
    let id = m.row["id"].as_i64().unwrap_or_default() as i32;
    let text = |c: &str| m.row.get(c).and_then(Value::as_str).map(str::to_owned);
    tx.execute(
        "INSERT INTO convs_probe VALUES ($1, $2::text::uuid, $3, $4)",
        &[&id, &text("owner"), &text("status"), &text("stamp")],
    )
    .await
    .unwrap();
    tx.batch_execute(&format!("SET LOCAL ROLE {}", ch.role))
        .await
        .unwrap();
    tx.execute(
        "SELECT set_config('request.jwt.claims', $1, true)",
        &[&ch.claims.to_string()],
    )
    .await
    .unwrap();
    let n: i64 = tx
        .query_one("SELECT count(*) FROM convs_probe WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    n > 0
}

fn image(row: &tokio_postgres::Row, cols: &[&'static str]) -> BTreeMap<&'static str, Value> {
    cols.iter()
        .enumerate()
        .map(|(i, c)| {
            let v = if let Ok(v) = row.try_get::<_, Option<i32>>(i) {
                v.map_or(Value::Null, Value::from)
            } else {
                row.try_get::<_, Option<String>>(i)
                    .ok()
                    .flatten()
                    .map_or(Value::Null, Value::from)
            };
            (*c, v)
        })
        .collect()
}

/// Keeps only the key: a DELETE's old row under the default replica identity.
fn key_only(row: &BTreeMap<&'static str, Value>) -> BTreeMap<&'static str, Value> {
    row.iter()
        .filter(|(c, _)| **c == "id")
        .map(|(c, v)| (*c, v.clone()))
        .collect()
}

fn key_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

async fn msgs_change(
    tx: &tokio_postgres::Transaction<'_>,
    rng: &mut Rng,
    stamp: &str,
    next_id: &mut i64,
    live: &mut Vec<String>,
    bodies: &mut HashMap<String, String>,
) -> Option<Made> {
    const COLS: [&str; 5] = ["id", "conv", "level", "stamp", "body"];
    let conv = rng.below(CONVERSATIONS as u64) as i32 + 1;
    let level = rng.below(9) as i32;
    let body = |rng: &mut Rng, n: i64| {
        if rng.chance(30) {
            long_text(n as u64, 3000)
        } else {
            format!("b{n}")
        }
    };
    let (kind, row) = if live.is_empty() || rng.chance(45) {
        *next_id += 1;
        let id = if rng.chance(35) {
            format!("k{next_id}-{}", long_text(*next_id as u64 ^ 0x5eed, 2200))
        } else {
            format!("k{next_id}")
        };
        let b = body(rng, *next_id);
        let row = tx
            .query_one(
                "INSERT INTO msgs VALUES ($1, $2, $3, $4, $5) RETURNING id, conv, level, stamp, body",
                &[&id, &conv, &level, &stamp, &b],
            )
            .await
            .unwrap();
        live.push(id.clone());
        bodies.insert(id, b);
        ("INSERT", row)
    } else if rng.chance(70) {
        let id = rng.pick(live).clone();
        // Sometimes only the stamp changes: the key and a long body stay out of line, unchanged.
        let row = match rng.below(3) {
            0 => tx
                .query_one(
                    "UPDATE msgs SET stamp = $2 WHERE id = $1 RETURNING id, conv, level, stamp, body",
                    &[&id, &stamp],
                )
                .await
                .unwrap(),
            1 => tx
                .query_one(
                    "UPDATE msgs SET stamp = $2, conv = $3, level = $4 WHERE id = $1 RETURNING id, conv, level, stamp, body",
                    &[&id, &stamp, &conv, &level],
                )
                .await
                .unwrap(),
            _ => {
                *next_id += 1;
                let b = body(rng, *next_id);
                bodies.insert(id.clone(), b.clone());
                tx.query_one(
                    "UPDATE msgs SET stamp = $2, level = $3, body = $4 WHERE id = $1 RETURNING id, conv, level, stamp, body",
                    &[&id, &stamp, &level, &b],
                )
                .await
                .unwrap()
            }
        };
        ("UPDATE", row)
    } else {
        let i = rng.below(live.len() as u64) as usize;
        let id = live.swap_remove(i);
        bodies.remove(&id);
        let row = tx
            .query_one(
                "DELETE FROM msgs WHERE id = $1 RETURNING id, conv, level, stamp, body",
                &[&id],
            )
            .await
            .unwrap();
        ("DELETE", row)
    };
    let full = image(&row, &COLS);
    let key = key_text(&full["id"]);
    let image = if kind == "DELETE" {
        key_only(&full)
    } else {
        full.clone()
    };
    Some(Made {
        table: "msgs",
        kind,
        key,
        image,
        row: full,
    })
}

async fn convs_change(
    tx: &tokio_postgres::Transaction<'_>,
    rng: &mut Rng,
    stamp: &str,
    deleted: &mut HashSet<i32>,
) -> Option<Made> {
    const COLS: [&str; 4] = ["id", "owner", "status", "stamp"];
    let id = rng.below(CONVERSATIONS as u64) as i32 + 1;
    let owner = *rng.pick(&CUSTOMERS);
    let status = *rng.pick(&["open", "closed"]);
    // Conversations are few and kept: an existing one changes hands or status, or one is
    // deleted and put back in the same transaction (its messages are hidden meanwhile).
    let exists = tx
        .query_opt("SELECT 1 FROM convs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .is_some();
    let (kind, row) = if !exists {
        (
            "INSERT",
            tx.query_one(
                "INSERT INTO convs VALUES ($1, $2::text::uuid, $3, $4) RETURNING id, owner::text, status, stamp",
                &[&id, &owner, &status, &stamp],
            )
            .await
            .unwrap(),
        )
    } else if rng.chance(80) || deleted.contains(&id) {
        // (A conversation is deleted at most once per transaction: its DELETE is known by key.)
        (
            "UPDATE",
            tx.query_one(
                "UPDATE convs SET owner = $2::text::uuid, status = $3, stamp = $4 WHERE id = $1 RETURNING id, owner::text, status, stamp",
                &[&id, &owner, &status, &stamp],
            )
            .await
            .unwrap(),
        )
    } else {
        deleted.insert(id);
        (
            "DELETE",
            tx.query_one(
                "DELETE FROM convs WHERE id = $1 RETURNING id, owner::text, status, stamp",
                &[&id],
            )
            .await
            .unwrap(),
        )
    };
    let full = image(&row, &COLS);
    // REPLICA IDENTITY FULL: a DELETE's old row is whole.
    Some(Made {
        table: "convs",
        kind,
        key: key_text(&full["id"]),
        image: full.clone(),
        row: full,
    })
}

async fn notes_change(
    tx: &tokio_postgres::Transaction<'_>,
    rng: &mut Rng,
    stamp: &str,
    next_id: &mut i64,
    live: &mut Vec<i64>,
) -> Option<Made> {
    const COLS: [&str; 3] = ["id", "room", "stamp"];
    let room = rng.below(3) as i32 + 1;
    let (kind, row) = if live.is_empty() || rng.chance(45) {
        *next_id += 1;
        let id = *next_id as i32;
        live.push(*next_id);
        (
            "INSERT",
            tx.query_one(
                "INSERT INTO notes VALUES ($1, $2, $3) RETURNING id, room, stamp",
                &[&id, &room, &stamp],
            )
            .await
            .unwrap(),
        )
    } else if rng.chance(70) {
        let id = live[rng.below(live.len() as u64) as usize] as i32;
        (
            "UPDATE",
            tx.query_one(
                "UPDATE notes SET room = $2, stamp = $3 WHERE id = $1 RETURNING id, room, stamp",
                &[&id, &room, &stamp],
            )
            .await
            .unwrap(),
        )
    } else {
        let i = rng.below(live.len() as u64) as usize;
        let id = live.swap_remove(i) as i32;
        (
            "DELETE",
            tx.query_one(
                "DELETE FROM notes WHERE id = $1 RETURNING id, room, stamp",
                &[&id],
            )
            .await
            .unwrap(),
        )
    };
    let full = image(&row, &COLS);
    let image = if kind == "DELETE" {
        key_only(&full)
    } else {
        full.clone()
    };
    Some(Made {
        table: "notes",
        kind,
        key: key_text(&full["id"]),
        image,
        row: full,
    })
}
