//! Catch-up across a graceful restart (RELIABILITY.md, "Catch-up on rejoin"): the remembered
//! positions are saved at shutdown, once the sockets are closed and the dispatcher has stopped,
//! in `walcast.catchup_positions` (created on first use), and loaded, then deleted, at the next
//! start. A position saved as complete had received everything walcast delivered before it
//! stopped; what the slot streams after the start (the backlog, then live changes) is what it
//! missed, and the history holds it from the start. One saved as incomplete also missed changes
//! delivered (and confirmed) before the stop: its rejoin is told of the gap.

use std::time::Duration;

use super::PgChanges;

const CREATE: &str = "CREATE TABLE IF NOT EXISTS walcast.catchup_positions (
    key text PRIMARY KEY,
    complete boolean NOT NULL,
    expires_at timestamptz NOT NULL,
    last_ref int8
);
ALTER TABLE walcast.catchup_positions ADD COLUMN IF NOT EXISTS last_ref int8";

impl PgChanges {
    /// Saves the remembered positions (graceful shutdown). Failures are logged: a restart then
    /// only loses catch-up, never changes.
    pub async fn save_positions(&self) {
        if !self.history.enabled() {
            return;
        }
        let delivered = self.history.delivered();
        let window = self.history.window();
        let mut keys = Vec::new();
        let mut complete = Vec::new();
        let mut left_ms = Vec::new();
        let mut last_refs: Vec<Option<i64>> = Vec::new();
        for (key, pos, age, lost, last_ref) in self.history.remembered() {
            last_refs.push(last_ref.and_then(|r| i64::try_from(r).ok()));
            keys.push(key.to_string());
            complete.push(!lost && pos >= delivered);
            left_ms.push(window.saturating_sub(age).as_millis() as i64);
        }
        if keys.is_empty() {
            return;
        }
        let result = async {
            let client = self.pool.get().await?;
            client.batch_execute(CREATE).await?;
            client
                .execute(
                    "INSERT INTO walcast.catchup_positions (key, complete, expires_at, last_ref)
                     SELECT k, c, now() + make_interval(secs => ms / 1000.0), r
                     FROM unnest($1::text[], $2::bool[], $3::int8[], $4::int8[]) AS u(k, c, ms, r)
                     ON CONFLICT (key) DO UPDATE SET complete = EXCLUDED.complete AND walcast.catchup_positions.complete,
                         expires_at = greatest(EXCLUDED.expires_at, walcast.catchup_positions.expires_at),
                         last_ref = CASE WHEN EXCLUDED.last_ref IS NULL OR walcast.catchup_positions.last_ref IS NULL THEN NULL
                             ELSE least(EXCLUDED.last_ref, walcast.catchup_positions.last_ref) END",
                    &[&keys, &complete, &left_ms, &last_refs],
                )
                .await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
        .await;
        match result {
            Ok(()) => tracing::info!(
                positions = keys.len(),
                "catch-up positions saved for the next start"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not save catch-up positions: clients rejoining after the restart get no catch-up")
            }
        }
    }

    /// Loads (and deletes) the positions a graceful shutdown saved.
    pub async fn load_positions(&self) {
        if !self.history.enabled() {
            return;
        }
        let result = async {
            let client = self.pool.get().await?;
            let exists: bool = client
                .query_one(
                    "SELECT to_regclass('walcast.catchup_positions') IS NOT NULL",
                    &[],
                )
                .await?
                .get(0);
            if !exists {
                return Ok(0);
            }
            // A table saved by an older walcast has no last_ref column yet.
            client.batch_execute(CREATE).await?;
            let rows = client
                .query(
                    "DELETE FROM walcast.catchup_positions RETURNING key, complete,
                         (extract(epoch FROM expires_at - now()) * 1000)::int8, last_ref",
                    &[],
                )
                .await?;
            let mut n = 0;
            for r in rows {
                let (key, complete, left_ms): (String, bool, i64) = (r.get(0), r.get(1), r.get(2));
                let last_ref: Option<i64> = r.get(3);
                let last_ref = last_ref.and_then(|r| u64::try_from(r).ok());
                if left_ms > 0 {
                    self.history.restore(
                        key.into(),
                        complete,
                        Duration::from_millis(left_ms as u64),
                        last_ref,
                    );
                    n += 1;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(n)
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                positions = n,
                "catch-up positions restored from the last shutdown"
            ),
            Err(e) => tracing::warn!(error = %e, "could not load catch-up positions"),
        }
    }
}
