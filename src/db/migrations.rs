//! Applies the SQL in `migrations/` (embedded in the binary) in order, once each, recorded in
//! `walcast.schema_migrations`, under an advisory lock so that several walcast processes can
//! start against one database at the same time.

use super::{DbError, Pool};
use std::sync::Arc;

/// (version, name, SQL), in order. Append only: a migration is applied once, so an edit must
/// leave a database that applied the old text where the new text would (0003 was narrowed to
/// keep functions that already exist, which on a database walcast created them in is the same).
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "supabase_compat",
        include_str!("../../migrations/0001_supabase_compat.sql"),
    ),
    (
        2,
        "wait_visible",
        include_str!("../../migrations/0002_wait_visible.sql"),
    ),
    (
        3,
        "realtime_messages",
        include_str!("../../migrations/0003_realtime_messages.sql"),
    ),
    (
        4,
        "check_cohorts",
        include_str!("../../migrations/0004_check_cohorts.sql"),
    ),
];

/// The publication that carries `realtime.messages` (broadcast from the database).
pub const MESSAGES_PUBLICATION: &str = "supabase_realtime_messages_publication";

/// Applies what is missing; returns the versions applied now.
pub async fn run(pool: &Arc<Pool>) -> Result<Vec<i64>, DbError> {
    let mut client = pool.get().await?;
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS walcast;
             CREATE TABLE IF NOT EXISTS walcast.schema_migrations (
                 version bigint PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await?;
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('walcast.migrations'))",
            &[],
        )
        .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM walcast.schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO walcast.schema_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await?;
            applied.push(*version);
        }
        tx.commit().await?;
    }
    Ok(applied)
}

/// The migrations this binary has that the database has not applied (all of them when walcast
/// never migrated it), in order.
pub async fn pending(pool: &Arc<Pool>) -> Result<Vec<(i64, &'static str)>, DbError> {
    let client = pool.get().await?;
    let recorded = client
        .query_one(
            "SELECT to_regclass('walcast.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    let applied: Vec<i64> = if recorded {
        client
            .query("SELECT version FROM walcast.schema_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    Ok(MIGRATIONS
        .iter()
        .filter(|(v, _, _)| !applied.contains(v))
        .map(|(v, name, _)| (*v, *name))
        .collect())
}

/// What walcast finds in the database and what migrating would do with it, one line each: the
/// user's rights, the API roles and `auth` helpers, `realtime.messages` (plain or partitioned),
/// the `realtime` functions (kept when present, with their owner), the publications, and
/// walcast's own migrations applied and pending.
pub async fn survey(pool: &Arc<Pool>, publication: &str) -> Result<Vec<String>, DbError> {
    let client = pool.get().await?;
    let mut out = Vec::new();
    let me = client
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (user, sup, rep): (String, bool, bool) = (me.get(0), me.get(1), me.get(2));
    out.push(format!(
        "database user {user}: {}",
        match (sup, rep) {
            (true, _) => "superuser",
            (false, true) => "REPLICATION, not a superuser",
            (false, false) => "neither superuser nor REPLICATION (walcast serve will refuse)",
        }
    ));
    for role in ["anon", "authenticated", "service_role"] {
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await?
            .is_some();
        out.push(format!(
            "role {role}: {}",
            if exists {
                "present (kept)"
            } else {
                "missing (created)"
            }
        ));
    }
    for f in ["auth.uid()", "auth.role()", "auth.jwt()"] {
        let exists = client
            .query_one("SELECT to_regprocedure($1) IS NOT NULL", &[&f])
            .await?
            .get::<_, bool>(0);
        out.push(format!(
            "function {f}: {}",
            if exists {
                "present (kept)"
            } else {
                "missing (created)"
            }
        ));
    }
    let messages = client
        .query_opt(
            "SELECT c.relkind::text,
                    (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid),
                    (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'realtime' AND c.relname = 'messages'",
            &[],
        )
        .await?;
    out.push(match messages {
        None => "table realtime.messages: missing (created, not partitioned)".into(),
        Some(r) => {
            let (kind, parts, policies): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
            if kind == "p" {
                format!(
                    "table realtime.messages: partitioned by day, {parts} partitions, {policies} policies (kept; partitions made yesterday..today+3 at every start)"
                )
            } else {
                format!("table realtime.messages: present, {policies} policies (kept)")
            }
        }
    });
    for f in [
        "realtime.topic()",
        "realtime.send(jsonb, text, text, boolean)",
        "realtime.send_binary(bytea, text, text, boolean)",
        "realtime.broadcast_changes(text, text, text, text, text, record, record, text)",
    ] {
        let owner = client
            .query_opt(
                "SELECT r.rolname::text FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
                  WHERE p.oid = to_regprocedure($1)",
                &[&f],
            )
            .await?;
        out.push(match owner {
            Some(r) => format!(
                "function {f}: present, owner {} (kept)",
                r.get::<_, String>(0)
            ),
            None => format!("function {f}: missing (created)"),
        });
    }
    for (name, what) in [
        (publication, "postgres_changes"),
        (MESSAGES_PUBLICATION, "broadcast from the database"),
    ] {
        let tables = client
            .query_opt(
                "SELECT (SELECT count(*) FROM pg_publication_tables t WHERE t.pubname = p.pubname)
                   FROM pg_publication p WHERE p.pubname = $1",
                &[&name],
            )
            .await?;
        out.push(match tables {
            Some(r) => format!(
                "publication {name} ({what}): present, {} tables (kept)",
                r.get::<_, i64>(0)
            ),
            None => format!("publication {name} ({what}): missing (created)"),
        });
    }
    drop(client);
    let pending = pending(pool).await?;
    let applied: Vec<String> = MIGRATIONS
        .iter()
        .filter(|(v, _, _)| !pending.iter().any(|(p, _)| p == v))
        .map(|(v, n, _)| format!("{v} {n}"))
        .collect();
    let pending: Vec<String> = pending.iter().map(|(v, n)| format!("{v} {n}")).collect();
    out.push(format!(
        "walcast migrations: applied [{}], pending [{}]",
        applied.join(", "),
        pending.join(", ")
    ));
    Ok(out)
}

/// Creates the publication when it does not exist (empty: tables are added by the user with
/// `ALTER PUBLICATION ... ADD TABLE`).
pub async fn ensure_publication(pool: &Arc<Pool>, publication: &str) -> Result<bool, DbError> {
    let client = pool.get().await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {}",
                super::quote_ident(publication)
            ))
            .await?;
    }
    Ok(!exists)
}

/// `walcast migrate`: says what it finds, then (unless `dry_run`) applies migrations, creates
/// the publication and a partitioned `realtime.messages`'s partitions, and says what it did.
pub async fn migrate(
    db: &super::DbConfig,
    publication: &str,
    dry_run: bool,
) -> Result<Vec<String>, DbError> {
    let pool = Pool::new(db, 1);
    let mut report: Vec<String> = survey(&pool, publication)
        .await?
        .into_iter()
        .map(|l| format!("found: {l}"))
        .collect();
    if dry_run {
        report.push("--dry-run: nothing was changed".into());
        return Ok(report);
    }
    let applied = run(&pool).await?;
    report.push(format!("did: applied walcast migrations {applied:?}"));
    if ensure_publication(&pool, publication).await? {
        report.push(format!("did: created the publication {}", publication));
    }
    let created = super::janitor::ensure_partitions(&pool).await?;
    if !created.is_empty() {
        report.push(format!("did: created partitions {}", created.join(", ")));
    }
    Ok(report)
}
