//! The replication slot: created or replaced at start, what it holds back, and how much WAL the
//! database keeps for it (a metric, and warnings before the disk fills).

use std::sync::Arc;
use std::time::Duration;

use super::conn::{ConnError, ReplicationConn};
use super::{parse_confirmed, quote_literal};
use crate::db::{DbError, Pool};

/// What `ensure_slot` found.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotState {
    /// The slot was there and usable.
    Existing,
    /// There was no slot; one was created.
    Created,
    /// The slot had been invalidated (its WAL removed, `max_slot_wal_keep_size`); it was dropped
    /// and created again. What it had kept since `confirmed` is lost.
    Recreated { confirmed: String },
}

/// Creates the slot when it does not exist, and replaces it when it has been invalidated.
pub async fn ensure_slot(conn: &mut ReplicationConn, slot: &str) -> Result<SlotState, ConnError> {
    let rows = conn
        .simple_query(&format!(
            "SELECT wal_status, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await?;
    let mut state = SlotState::Created;
    if let Some(row) = rows.first() {
        let wal_status = row.first().cloned().flatten().unwrap_or_default();
        if wal_status != "lost" {
            return Ok(SlotState::Existing);
        }
        let confirmed = row.get(1).cloned().flatten().unwrap_or_default();
        tracing::error!(%slot, %confirmed, "the replication slot was invalidated (its WAL was removed, see max_slot_wal_keep_size); recreating it: changes committed since it fell behind are lost");
        conn.simple_query(&format!(
            "DROP_REPLICATION_SLOT {}",
            crate::db::quote_ident(slot)
        ))
        .await?;
        state = SlotState::Recreated { confirmed };
    }
    match conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            crate::db::quote_ident(slot)
        ))
        .await
    {
        Ok(_) => {}
        // Another node of a cluster created it in between (42710 duplicate_object).
        Err(ConnError::Server { code, .. }) if code == "42710" && state == SlotState::Created => {
            return Ok(SlotState::Existing)
        }
        Err(e) => return Err(e),
    }
    tracing::info!(%slot, "created logical replication slot");
    Ok(state)
}

/// The `system` message for a recreated or vanished slot.
pub fn slot_gap_message(state: &SlotState) -> Option<String> {
    match state {
        SlotState::Existing => None,
        SlotState::Created => Some(
            "The replication slot had been dropped and was created again: changes committed before now may be missing; refetch to catch up".to_string(),
        ),
        SlotState::Recreated { confirmed } => Some(format!(
            "The replication slot was invalidated by the database (max_slot_wal_keep_size) and was created again: changes committed after {confirmed} may be missing; refetch to catch up"
        )),
    }
}

/// The WAL position at start when the slot has not confirmed it (changes before it were
/// committed while walcast was down), else 0.
pub async fn unconfirmed_backlog_end(pool: &Arc<Pool>, slot: &str) -> Result<u64, DbError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT pg_current_wal_lsn()::text, (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await?;
    let end = parse_confirmed(row.get::<_, &str>(0)).unwrap_or(0);
    let confirmed = row
        .get::<_, Option<&str>>(1)
        .and_then(parse_confirmed)
        .unwrap_or(0);
    Ok(if confirmed >= end { 0 } else { end })
}

/// A slot nobody reads keeps WAL for ever unless `max_slot_wal_keep_size` bounds it: say so at
/// start, once.
pub async fn warn_unbounded_wal(pool: &Arc<Pool>) {
    let setting = async {
        let client = pool.get().await?;
        let row = client
            .query_one("SELECT current_setting('max_slot_wal_keep_size')", &[])
            .await?;
        Ok::<String, DbError>(row.get(0))
    }
    .await;
    match setting {
        Ok(v) if v == "-1" => tracing::warn!(
            "max_slot_wal_keep_size is unlimited: while walcast is stopped, its replication slot keeps WAL until the database's disk is full; set it (e.g. '10GB') to bound that, and watch walcast_slot_retained_wal_bytes"
        ),
        Ok(v) => tracing::info!(max_slot_wal_keep_size = %v, "WAL kept for the replication slot is bounded"),
        Err(e) => tracing::debug!(error = %e, "could not read max_slot_wal_keep_size"),
    }
}

/// Every 10 s: how much WAL the database keeps for the slot, as a metric, with a warning (at
/// most once a minute) above `warn_bytes`.
pub async fn watch(pool: Arc<Pool>, slot: String, warn_bytes: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let result = async {
            let client = pool.get().await?;
            let row = client
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, wal_status FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?;
            Ok::<_, DbError>(row.map(|r| (r.get::<_, Option<i64>>(0), r.get::<_, Option<String>>(1))))
        }
        .await;
        match result {
            Ok(Some((retained, wal_status))) => {
                let retained = retained.unwrap_or(0).max(0) as u64;
                metrics::gauge!(crate::telemetry::SLOT_RETAINED_WAL_BYTES).set(retained as f64);
                let due = last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                if retained > warn_bytes && due {
                    last_warning = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        %slot,
                        retained_bytes = retained,
                        wal_status = wal_status.as_deref().unwrap_or(""),
                        "the database keeps more WAL for walcast's slot than SLOT_WAL_WARN_BYTES: walcast is behind"
                    );
                }
            }
            Ok(None) => tracing::warn!(%slot, "the replication slot does not exist"),
            Err(e) => tracing::debug!(error = %e, "could not read the slot's retained WAL"),
        }
    }
}
