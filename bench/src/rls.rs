//! Row level security for the chat scenario: the policy shapes apps write (`--policy`), the
//! schema and users they read, and the two references each shape is measured against in the
//! same run (issue #13):
//!
//! 1. `direct`: PostgreSQL's own capacity for the same checks. N connections each set the role
//!    and the claims (`set_config`, as walcast does) and run the same key lookup walcast
//!    prepares (`SELECT array_agg(id::text) FROM public.chat WHERE id = ANY($1)`, generic plan),
//!    pipelined, as fast as the server answers. Nothing batched: one (claims, row) per lookup.
//!    Run with walcast's forced generic plan, and once more with PostgreSQL's own choice of
//!    plan per key (a custom plan), which shows what the plan choice costs.
//! 2. `original`: supabase/realtime's method (`realtime.apply_rls`): changes taken one at a
//!    time on one connection; for each change a `walrus_rls_stmt` prepared for that row
//!    (`select exists(select 1 from <table> where <pk> = <literal>)`), then for each subscriber
//!    `set_config('role')`, `set_config('request.jwt.claims')`, execute, reset the role. Only
//!    the checks are emulated (no wal2json decoding, no record JSON, no filters), so this is an
//!    upper bound for the original.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::ValueEnum;
use serde_json::{json, Value};
use tokio_postgres::types::{ToSql, Type};

use crate::harness::cpu_seconds;

/// The read policy on the chat table (`--policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Policy {
    /// `EXISTS` on a participants table keyed by (conversation_id, user_id).
    Participants,
    /// The support-chat seed's shape: a message is visible if its conversation belongs to the
    /// user or the user is an agent (`is_agent()`, a SQL helper reading `auth.uid()`), and
    /// `conversations` has its own RLS policy.
    Seed,
    /// The seed's shape in Supabase's documented fast idiom: `(select auth.uid())` and the
    /// helper wrapped in `(select is_agent())`, in both policies.
    SeedFast,
    /// Claims only: `org_id = auth.jwt() ->> 'org_id'`, no other table read.
    Claims,
    /// The policy calls a SECURITY DEFINER function that reads `conversations` and `agents`
    /// (bypassing their RLS).
    Definer,
}

impl Policy {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Policy::Participants => "participants",
            Policy::Seed => "seed",
            Policy::SeedFast => "seed-fast",
            Policy::Claims => "claims",
            Policy::Definer => "definer",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Policy::Participants => "EXISTS on participants (conversation_id, user_id)",
            Policy::Seed => "seed: conversation owner OR is_agent(), conversations under RLS",
            Policy::SeedFast => "seed, fast idiom: (select auth.uid()), (select is_agent())",
            Policy::Claims => "claims only: org_id = auth.jwt() ->> 'org_id'",
            Policy::Definer => "SECURITY DEFINER can_read_conversation(conversation_id)",
        }
    }

    /// The policy (and the helpers it calls), on top of `SCHEMA`.
    fn sql(self) -> &'static str {
        match self {
            Policy::Participants => {
                "CREATE POLICY chat_read ON chat FOR SELECT TO authenticated
                   USING (EXISTS (SELECT 1 FROM participants p
                                   WHERE p.conversation_id = chat.conversation_id AND p.user_id = auth.uid()));"
            }
            Policy::Seed => {
                "CREATE FUNCTION public.is_agent() RETURNS boolean LANGUAGE sql STABLE AS $$
                   SELECT EXISTS (SELECT 1 FROM public.agents WHERE user_id = auth.uid())
                 $$;
                 ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
                 CREATE POLICY conversations_read ON conversations FOR SELECT TO authenticated
                   USING (customer_id = auth.uid() OR public.is_agent());
                 CREATE POLICY chat_read ON chat FOR SELECT TO authenticated
                   USING (EXISTS (SELECT 1 FROM conversations c
                                   WHERE c.id = chat.conversation_id
                                     AND (c.customer_id = auth.uid() OR public.is_agent())));"
            }
            Policy::SeedFast => {
                "CREATE FUNCTION public.is_agent() RETURNS boolean LANGUAGE sql STABLE AS $$
                   SELECT EXISTS (SELECT 1 FROM public.agents WHERE user_id = (SELECT auth.uid()))
                 $$;
                 ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
                 CREATE POLICY conversations_read ON conversations FOR SELECT TO authenticated
                   USING (customer_id = (SELECT auth.uid()) OR (SELECT public.is_agent()));
                 CREATE POLICY chat_read ON chat FOR SELECT TO authenticated
                   USING (EXISTS (SELECT 1 FROM conversations c
                                   WHERE c.id = chat.conversation_id
                                     AND (c.customer_id = (SELECT auth.uid()) OR (SELECT public.is_agent()))));"
            }
            Policy::Claims => {
                "ALTER TABLE chat ADD COLUMN org_id text GENERATED ALWAYS AS ('org-' || conversation_id::text) STORED;
                 CREATE POLICY chat_read ON chat FOR SELECT TO authenticated
                   USING (org_id = (auth.jwt() ->> 'org_id'));"
            }
            Policy::Definer => {
                "CREATE FUNCTION public.can_read_conversation(conv int) RETURNS boolean
                   LANGUAGE sql STABLE SECURITY DEFINER SET search_path = '' AS $$
                   SELECT EXISTS (SELECT 1 FROM public.conversations c WHERE c.id = conv AND c.customer_id = auth.uid())
                       OR EXISTS (SELECT 1 FROM public.agents a WHERE a.user_id = auth.uid())
                 $$;
                 REVOKE ALL ON FUNCTION public.can_read_conversation(int) FROM PUBLIC;
                 GRANT EXECUTE ON FUNCTION public.can_read_conversation(int) TO authenticated;
                 ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
                 CREATE POLICY conversations_read ON conversations FOR SELECT TO authenticated
                   USING (customer_id = auth.uid());
                 CREATE POLICY chat_read ON chat FOR SELECT TO authenticated
                   USING (public.can_read_conversation(conversation_id));"
            }
        }
    }
}

/// The tables every shape has (each reads what it needs), RLS on the chat table, and the
/// emulation of the original's per-change checks (reference 2).
const SCHEMA: &str = "
CREATE TABLE participants (conversation_id int NOT NULL, user_id uuid NOT NULL, PRIMARY KEY (conversation_id, user_id));
CREATE TABLE conversations (id int PRIMARY KEY, customer_id uuid NOT NULL);
CREATE TABLE agents (user_id uuid PRIMARY KEY);
GRANT SELECT ON participants, conversations, agents TO authenticated;
ALTER TABLE chat ENABLE ROW LEVEL SECURITY;
CREATE FUNCTION public.bench_apply_rls(entity regclass, key text, claims text[]) RETURNS int
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  c text;
  ok boolean;
  n int := 0;
BEGIN
  PERFORM set_config('role', null, true);
  IF (SELECT 1 FROM pg_prepared_statements WHERE name = 'walrus_rls_stmt' LIMIT 1) > 0 THEN
    DEALLOCATE walrus_rls_stmt;
  END IF;
  EXECUTE format('prepare walrus_rls_stmt as select exists(select 1 from %s where id = %L)', entity, key);
  FOREACH c IN ARRAY claims LOOP
    PERFORM set_config('role', 'authenticated', true), set_config('request.jwt.claims', c, true);
    EXECUTE 'execute walrus_rls_stmt' INTO ok;
    PERFORM set_config('role', null, true);
    IF ok THEN
      n := n + 1;
    END IF;
  END LOOP;
  RETURN n;
END
$fn$;
";

/// Subscriber `s`'s user id.
pub(crate) fn user(s: usize) -> String {
    format!("00000000-0000-4000-8000-{s:012}")
}

/// Subscriber `s`'s JWT claims: one distinct user each, in conversation `s % conversations`.
/// In the seed's shapes the first subscriber of each conversation is its customer (owner), the
/// others are agents.
pub(crate) fn claims(policy: Option<Policy>, s: usize, conversations: usize, exp: i64) -> Value {
    match policy {
        None => json!({"role": "anon", "exp": exp}),
        Some(Policy::Claims) => {
            json!({"role": "authenticated", "sub": user(s), "org_id": format!("org-{}", s % conversations), "exp": exp})
        }
        Some(_) => json!({"role": "authenticated", "sub": user(s), "exp": exp}),
    }
}

/// Creates the tables, users and `policy` on a database whose `chat` table exists.
pub(crate) async fn setup(
    sql: &tokio_postgres::Client,
    policy: Policy,
    subscribers: usize,
    conversations: usize,
) -> anyhow::Result<()> {
    sql.batch_execute(SCHEMA).await.context("RLS schema")?;
    let (subs, convs) = (subscribers as i32, conversations as i32);
    let uuid = "('00000000-0000-4000-8000-' || lpad(s::text, 12, '0'))::uuid";
    sql.execute(
        &format!(
            "INSERT INTO participants SELECT s % $2, {uuid} FROM generate_series(0, $1 - 1) s"
        ),
        &[&subs, &convs],
    )
    .await?;
    sql.execute(
        &format!("INSERT INTO conversations SELECT s, {uuid} FROM generate_series(0, $1 - 1) s"),
        &[&convs],
    )
    .await?;
    sql.execute(
        &format!("INSERT INTO agents SELECT {uuid} FROM generate_series($2, $1 - 1) s"),
        &[&subs, &convs],
    )
    .await?;
    sql.batch_execute(policy.sql())
        .await
        .with_context(|| format!("policy {}", policy.name()))?;
    sql.batch_execute("ANALYZE participants, conversations, agents")
        .await?;
    Ok(())
}

/// One authorization question: may the user with these claims see row `id`?
pub(crate) struct Check {
    pub id: i64,
    pub claims: String,
    pub sub: String,
}

/// A reference's result.
pub(crate) struct Reference {
    pub connections: usize,
    /// Reference 1 with walcast's generic plan (false: PostgreSQL's choice per key).
    pub generic_plan: bool,
    pub checks: usize,
    pub seconds: f64,
    /// Checks that said "not visible" (every check asked is one the policy allows).
    pub denied: usize,
    /// CPU time of the PostgreSQL backends serving the reference, in seconds.
    pub pg_cpu: f64,
}

impl Reference {
    pub(crate) fn per_sec(&self) -> f64 {
        self.checks as f64 / self.seconds
    }

    pub(crate) fn pg_us_per_check(&self) -> f64 {
        self.pg_cpu * 1e6 / self.checks.max(1) as f64
    }

    pub(crate) fn json(&self) -> Value {
        json!({"connections": self.connections, "generic_plan": self.generic_plan, "checks": self.checks, "seconds": self.seconds,
            "checks_per_sec": self.per_sec(), "denied": self.denied,
            "pg_cpu_seconds": self.pg_cpu, "pg_cpu_us_per_check": self.pg_us_per_check()})
    }
}

async fn connect(db_url: &str) -> anyhow::Result<(tokio_postgres::Client, u32)> {
    let (c, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    Ok((c, u32::try_from(pid)?))
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_seconds(*p).ok()).sum()
}

/// Checks in flight per connection in reference 1 (a lookup and its settings each).
const DEPTH: usize = 8;

/// Reference 1: the same role/claims settings and key lookup as walcast's, one (claims, row)
/// per lookup, from `connections` connections, pipelined, for `seconds`.
pub(crate) async fn direct(
    db_url: &str,
    connections: usize,
    generic_plan: bool,
    seconds: f64,
    checks: Arc<Vec<Check>>,
) -> anyhow::Result<Reference> {
    anyhow::ensure!(!checks.is_empty(), "no rows to check");
    let mut clients = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..connections {
        let (c, pid) = connect(db_url).await?;
        // walcast's lookups run with a generic plan, made once per connection; without
        // `generic_plan` PostgreSQL chooses (a custom plan for the key it is given).
        if generic_plan {
            c.batch_execute("SET plan_cache_mode = force_generic_plan")
                .await?;
        }
        clients.push(c);
        pids.push(pid);
    }
    let cpu_before = cpu_of(&pids);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let checks = checks.clone();
        tasks.push(tokio::spawn(async move {
            let set = c
                .prepare_typed(
                    "SELECT set_config('role', 'authenticated', false), set_config('request.jwt.claims', $1, false),
                            set_config('request.jwt.claim.sub', $2, false), set_config('request.jwt.claim.role', 'authenticated', false)",
                    &[Type::TEXT, Type::TEXT],
                )
                .await?;
            let look = c
                .prepare_typed(
                    "SELECT array_agg(\"id\"::text) FROM \"public\".\"chat\" WHERE \"id\" = ANY($1::int8[])",
                    &[Type::TEXT_ARRAY],
                )
                .await?;
            let (mut done, mut denied) = (0usize, 0usize);
            let mut k = i * 7919;
            while Instant::now() < deadline {
                let batch: Vec<&Check> = (0..DEPTH)
                    .map(|j| &checks[(k + j) % checks.len()])
                    .collect();
                k += DEPTH;
                let keys: Vec<Vec<String>> = batch.iter().map(|c| vec![c.id.to_string()]).collect();
                // Sent in this order on the connection: settings, then the lookup under them.
                let set_params: Vec<[&(dyn ToSql + Sync); 2]> = batch
                    .iter()
                    .map(|c| [&c.claims as &(dyn ToSql + Sync), &c.sub])
                    .collect();
                let look_params: Vec<[&(dyn ToSql + Sync); 1]> =
                    keys.iter().map(|k| [k as &(dyn ToSql + Sync)]).collect();
                let mut futs = Vec::with_capacity(2 * DEPTH);
                for (sp, lp) in set_params.iter().zip(&look_params) {
                    futs.push(c.query_one(&set, sp));
                    futs.push(c.query_one(&look, lp));
                }
                let rows = futures_util::future::join_all(futs).await;
                for (pair, check) in rows.chunks(2).zip(&batch) {
                    pair[0].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
                    let visible: Option<Vec<String>> = pair[1]
                        .as_ref()
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                        .get(0);
                    if !visible.is_some_and(|v| v.contains(&check.id.to_string())) {
                        denied += 1;
                    }
                }
                done += DEPTH;
            }
            Ok::<_, anyhow::Error>((done, denied, c))
        }));
    }
    let (mut done, mut denied) = (0, 0);
    let mut keep = Vec::new();
    for t in tasks {
        let (d, n, c) = t.await??;
        done += d;
        denied += n;
        keep.push(c);
    }
    let seconds = started.elapsed().as_secs_f64();
    let pg_cpu = cpu_of(&pids) - cpu_before;
    drop(keep);
    Ok(Reference {
        connections,
        generic_plan,
        checks: done,
        seconds,
        denied,
        pg_cpu,
    })
}

/// Reference 2: the original's method. `changes` are (row id, the claims of each subscriber
/// the row goes to); one change at a time, one connection, for `seconds`.
pub(crate) async fn original(
    db_url: &str,
    seconds: f64,
    changes: &[(i64, Vec<String>)],
) -> anyhow::Result<Reference> {
    anyhow::ensure!(!changes.is_empty(), "no rows to check");
    let (c, pid) = connect(db_url).await?;
    let stmt = c
        .prepare_typed(
            "SELECT public.bench_apply_rls('public.chat'::regclass, $1, $2)",
            &[Type::TEXT, Type::TEXT_ARRAY],
        )
        .await?;
    let cpu_before = cpu_of(&[pid]);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let (mut done, mut denied) = (0usize, 0usize);
    let mut i = 0;
    while Instant::now() < deadline {
        let (id, claims) = &changes[i % changes.len()];
        i += 1;
        let visible: i32 = c.query_one(&stmt, &[&id.to_string(), claims]).await?.get(0);
        done += claims.len();
        denied += claims
            .len()
            .saturating_sub(usize::try_from(visible).unwrap_or(0));
    }
    let seconds = started.elapsed().as_secs_f64();
    let pg_cpu = cpu_of(&[pid]) - cpu_before;
    Ok(Reference {
        connections: 1,
        generic_plan: false,
        checks: done,
        seconds,
        denied,
        pg_cpu,
    })
}
