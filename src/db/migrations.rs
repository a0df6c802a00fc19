//! Applies the SQL in `migrations/` (embedded in the binary) in order, once each, recorded in
//! `walcast.schema_migrations`, under an advisory lock so that several walcast processes can
//! start against one database at the same time.

use super::{DbError, Pool};
use std::sync::Arc;

/// (version, name, SQL), in order. Append only: never edit an applied migration.
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
