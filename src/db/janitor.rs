//! Upkeep of `realtime.messages`: stored broadcasts are kept `MESSAGES_RETENTION_HOURS` (for
//! replay), and when the table is partitioned by day (a database the original set up), the
//! partitions for today and the next days exist before anything is sent into them.

use std::time::Duration;

use super::{DbError, Pool};

/// Daily partitions kept from yesterday to this many days ahead of today, as the original does
/// (yesterday's is for rows written just before midnight by a clock slightly behind).
pub const PARTITION_DAYS_AHEAD: i32 = 3;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub partitions_created: Vec<String>,
    pub partitions_dropped: Vec<String>,
    pub rows_deleted: u64,
}

/// Whether `realtime.messages` is a partitioned table.
pub async fn is_partitioned(pool: &std::sync::Arc<Pool>) -> Result<bool, DbError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'realtime' AND c.relname = 'messages'",
            &[],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}

/// Creates the missing daily partitions of a partitioned `realtime.messages`, from yesterday to
/// `PARTITION_DAYS_AHEAD` days ahead (UTC days: `inserted_at` is written by `now()` on a UTC
/// server, as Supabase's are), named `messages_YYYY_MM_DD` and owned by
/// `supabase_realtime_admin` (when walcast may) as the original makes them.
pub async fn ensure_partitions(pool: &std::sync::Arc<Pool>) -> Result<Vec<String>, DbError> {
    if !is_partitioned(pool).await? {
        return Ok(Vec::new());
    }
    make_partitions(pool).await
}

/// [`ensure_partitions`] for a table known to be partitioned.
async fn make_partitions(pool: &std::sync::Arc<Pool>) -> Result<Vec<String>, DbError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT to_char(d, 'YYYY_MM_DD'), d::text, (d + 1)::text
               FROM generate_series(-1, $1) AS g(i),
                    LATERAL (SELECT ((now() AT TIME ZONE 'UTC')::date + i) AS d) AS day
              WHERE to_regclass('realtime.messages_' || to_char(d, 'YYYY_MM_DD')) IS NULL",
            &[&PARTITION_DAYS_AHEAD],
        )
        .await?;
    let mut created = Vec::new();
    for r in rows {
        let (suffix, from, to): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let name = format!("messages_{suffix}");
        // Names and bounds come from the database's own date formatting: digits and dashes.
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS realtime.{name} PARTITION OF realtime.messages \
             FOR VALUES FROM ('{from}') TO ('{to}')"
        );
        match client.batch_execute(&sql).await {
            Ok(()) => {
                // The original's owner, so that the original's own janitor can drop it later
                // (the way back); not possible, or not needed, where that role is not ours.
                let _ = client
                    .batch_execute(&format!(
                        "DO $$ BEGIN
                           IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'supabase_realtime_admin') THEN
                             ALTER TABLE realtime.{name} OWNER TO supabase_realtime_admin;
                           END IF;
                         EXCEPTION WHEN insufficient_privilege THEN NULL;
                         END $$"
                    ))
                    .await;
                created.push(format!("realtime.{name}"));
            }
            // Another process (the original, still running during a switch) made it first.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_TABLE) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(created)
}

/// One pass: partitions ahead, then retention (whole partitions older than it are dropped, the
/// rest deleted row by row).
pub async fn pass(pool: &std::sync::Arc<Pool>, retention: Duration) -> Result<Pass, DbError> {
    // Asked before taking a connection: a pool of one must not wait for itself.
    let partitioned = is_partitioned(pool).await?;
    let mut out = Pass::default();
    if partitioned {
        out.partitions_created = make_partitions(pool).await?;
    }
    let hours = retention.as_secs_f64() / 3600.0;
    let client = pool.get().await?;
    if partitioned {
        // A partition whose whole range is older than the retention holds nothing to keep.
        let old = client
            .query(
                "SELECT c.relname::text FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE i.inhparent = 'realtime.messages'::regclass
                    AND c.relname ~ '^messages_[0-9]{4}_[0-9]{2}_[0-9]{2}$'
                    AND to_date(substr(c.relname::text, 10), 'YYYY_MM_DD') + 1
                        <= ((now() AT TIME ZONE 'UTC') - make_interval(secs => $1::float8 * 3600))::date",
                &[&hours],
            )
            .await?;
        for r in old {
            let name: String = r.get(0);
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS realtime.{name}"))
                .await?;
            out.partitions_dropped.push(format!("realtime.{name}"));
        }
    }
    out.rows_deleted = client
        .execute(
            "DELETE FROM realtime.messages WHERE inserted_at < (now() AT TIME ZONE 'UTC') - make_interval(secs => $1::float8 * 3600)",
            &[&hours],
        )
        .await?;
    Ok(out)
}

/// Every 10 minutes (the first pass at once): partitions ahead always (without them every
/// `realtime.send` fails, and the original's send swallows the error), retention when `prune`.
pub async fn run(pool: std::sync::Arc<Pool>, retention: Duration, prune: bool) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tick.tick().await;
        let result = if prune {
            pass(&pool, retention).await
        } else {
            ensure_partitions(&pool).await.map(|created| Pass {
                partitions_created: created,
                ..Pass::default()
            })
        };
        match result {
            Ok(p) => {
                if !p.partitions_created.is_empty() || !p.partitions_dropped.is_empty() {
                    tracing::info!(
                        created = ?p.partitions_created,
                        dropped = ?p.partitions_dropped,
                        "janitor: realtime.messages partitions"
                    );
                }
                if p.rows_deleted > 0 {
                    tracing::info!(
                        deleted = p.rows_deleted,
                        "janitor removed old realtime.messages rows"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "janitor could not maintain realtime.messages"),
        }
    }
}
