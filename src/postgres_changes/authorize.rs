//! Who may see what: column privileges per role (cached briefly) and row visibility under row
//! level security, checked the way the original does (look the row up by primary key as the
//! subscriber's role with `request.jwt.claims` set), but in batches: one statement per
//! (table, claims cohort) for all rows of a batch, and all statements of a batch pipelined in
//! one read-only transaction. Claims are never varied inside one statement, and a statement
//! never runs with another cohort's claims: each is preceded by its own `set_config` call.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio_postgres::types::{ToSql, Type};

use crate::db::{quote_ident, DbError, Pool};

use super::catalog::TableInfo;
use super::registry::Cohort;

/// How long privilege lookups are trusted. GRANT/REVOKE take effect within this time.
const PRIVILEGE_TTL: Duration = Duration::from_secs(2);
const CACHE_LIMIT: usize = 10_000;

/// (role, table) → when it was looked up, and the columns the role may select.
type ColumnCache = HashMap<(String, u32), (Instant, Arc<HashSet<String>>)>;

pub struct Authorizer {
    pool: Arc<Pool>,
    columns: Mutex<ColumnCache>,
    bypass: Mutex<HashMap<String, (Instant, bool)>>,
}

/// One row-visibility question: which of these primary keys may this cohort see in this table?
pub struct RlsRequest {
    pub table: Arc<TableInfo>,
    pub cohort: Arc<Cohort>,
    pub pks: Vec<Vec<String>>,
}

impl Authorizer {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self {
            pool,
            columns: Mutex::new(HashMap::new()),
            bypass: Mutex::new(HashMap::new()),
        }
    }

    /// Columns of `table` that `role` may SELECT. An unknown role may select nothing.
    pub async fn selectable(&self, role: &str, table: u32) -> Arc<HashSet<String>> {
        let key = (role.to_owned(), table);
        if let Some((at, cols)) = self
            .columns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if at.elapsed() < PRIVILEGE_TTL {
                return cols.clone();
            }
        }
        let cols = match self.query_selectable(role, table).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::warn!(%role, table, error = %e, "column privilege lookup failed: denying");
                Arc::new(HashSet::new())
            }
        };
        let mut cache = self.columns.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), cols.clone()));
        cols
    }

    async fn query_selectable(&self, role: &str, table: u32) -> Result<HashSet<String>, DbError> {
        let client = self.pool.get().await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await?
            .is_some();
        if !exists {
            return Ok(HashSet::new());
        }
        let rows = client
            .query(
                "SELECT attname::text FROM pg_attribute
                  WHERE attrelid = $2 AND attnum > 0 AND NOT attisdropped
                    AND has_column_privilege($1, attrelid, attnum, 'SELECT')",
                &[&role, &table],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Forgets cached privileges for a table (its definition changed).
    pub fn forget_table(&self, table: u32) {
        self.columns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(_, t), _| *t != table);
    }

    /// Whether `role` bypasses row level security (BYPASSRLS or superuser).
    pub async fn bypasses_rls(&self, role: &str) -> bool {
        if let Some((at, v)) = self
            .bypass
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(role)
        {
            if at.elapsed() < PRIVILEGE_TTL {
                return *v;
            }
        }
        let v = match self.pool.get().await {
            Ok(client) => client
                .query_opt(
                    "SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = $1",
                    &[&role],
                )
                .await
                .ok()
                .flatten()
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false),
            Err(_) => false,
        };
        let mut cache = self.bypass.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(role.to_owned(), (Instant::now(), v));
        v
    }

    /// Answers every request; a request whose check fails (a policy error, a timeout) sees
    /// nothing. Returns the visible primary keys per request, in request order.
    /// `xids` are the transactions whose rows are checked: the check waits until they are
    /// visible (see `walcast.wait_visible`), so that it judges the committed row.
    pub async fn visible(
        &self,
        requests: &[RlsRequest],
        xids: &[u32],
    ) -> Vec<HashSet<Vec<String>>> {
        if requests.is_empty() {
            return Vec::new();
        }
        let started = std::time::Instant::now();
        metrics::histogram!(crate::telemetry::AUTHZ_COHORTS).record(requests.len() as f64);
        let _timer = TimerGuard(started);
        match self.visible_pipelined(requests, xids).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "pipelined RLS check failed; checking cohorts one by one");
                let mut out = Vec::with_capacity(requests.len());
                for r in requests {
                    match self.visible_pipelined(std::slice::from_ref(r), xids).await {
                        Ok(mut v) => out.push(v.pop().unwrap_or_default()),
                        Err(e) => {
                            tracing::warn!(
                                table = %format!("{}.{}", r.table.schema, r.table.name),
                                role = %r.cohort.role,
                                error = %e,
                                "RlsPolicyError: row check failed, change withheld"
                            );
                            out.push(HashSet::new());
                        }
                    }
                }
                out
            }
        }
    }

    async fn visible_pipelined(
        &self,
        requests: &[RlsRequest],
        xids: &[u32],
    ) -> Result<Vec<HashSet<Vec<String>>>, String> {
        let mut client = self.pool.get().await.map_err(|e| e.to_string())?;
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        tx.batch_execute("SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = '10s'")
            .await
            .map_err(|e| e.to_string())?;
        if !xids.is_empty() {
            let xids: Vec<String> = xids.iter().map(u32::to_string).collect();
            let visible: bool = tx
                .query_one("SELECT walcast.wait_visible($1::text[]::xid[])", &[&xids])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if !visible {
                tracing::warn!(
                    ?xids,
                    "committed transactions still not visible after 5 s; checking anyway"
                );
            }
        }
        const SET: &str = "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true), \
                           set_config('request.jwt.claim.sub', $3, true), set_config('request.jwt.claim.role', $1, true)";
        let selects: Vec<(String, Vec<Vec<String>>)> = requests
            .iter()
            .map(|r| (select_sql(&r.table), columns_of(&r.pks, r.table.pk.len())))
            .collect();
        // Futures are created and first polled in order, so the statements go out in order:
        // set_config for cohort 1, its select, set_config for cohort 2, its select, ...
        let set_params: Vec<[(&(dyn ToSql + Sync), Type); 3]> = requests
            .iter()
            .map(|r| {
                [
                    (&r.cohort.role as &(dyn ToSql + Sync), Type::TEXT),
                    (&r.cohort.claims as &(dyn ToSql + Sync), Type::TEXT),
                    (&r.cohort.sub as &(dyn ToSql + Sync), Type::TEXT),
                ]
            })
            .collect();
        let select_params: Vec<Vec<(&(dyn ToSql + Sync), Type)>> = selects
            .iter()
            .map(|(_, cols)| {
                cols.iter()
                    .map(|c| (c as &(dyn ToSql + Sync), Type::TEXT_ARRAY))
                    .collect()
            })
            .collect();
        let mut futures = Vec::with_capacity(requests.len() * 2);
        for i in 0..requests.len() {
            futures.push(tx.query_typed(SET, &set_params[i]));
            futures.push(tx.query_typed(&selects[i].0, &select_params[i]));
        }
        let results = join_all(futures).await;
        let mut out = Vec::with_capacity(requests.len());
        for (i, chunk) in results.chunks(2).enumerate() {
            if let Err(e) = &chunk[0] {
                return Err(e.to_string());
            }
            let rows = chunk[1].as_ref().map_err(|e| match e.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => e.to_string(),
            })?;
            let width = requests[i].table.pk.len();
            out.push(
                rows.iter()
                    .map(|row| (0..width).map(|c| row.get::<_, String>(c)).collect())
                    .collect(),
            );
        }
        drop(results);
        tx.rollback().await.map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// Records the batch's duration when the check ends, however it ends.
struct TimerGuard(std::time::Instant);

impl Drop for TimerGuard {
    fn drop(&mut self) {
        metrics::histogram!(crate::telemetry::AUTHZ_QUERY_SECONDS)
            .record(self.0.elapsed().as_secs_f64());
    }
}

/// Transposes primary-key tuples into one text array per key column.
fn columns_of(pks: &[Vec<String>], width: usize) -> Vec<Vec<String>> {
    (0..width)
        .map(|c| {
            pks.iter()
                .map(|pk| pk.get(c).cloned().unwrap_or_default())
                .collect()
        })
        .collect()
}

fn select_sql(t: &TableInfo) -> String {
    let table = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
    let cols: Vec<String> =
        t.pk.iter()
            .map(|(n, _)| format!("{}::text", quote_ident(n)))
            .collect();
    if t.pk.len() == 1 {
        let (name, ty) = &t.pk[0];
        format!(
            "SELECT {} FROM {table} WHERE {} = ANY($1::text[]::{ty}[])",
            cols.join(", "),
            quote_ident(name)
        )
    } else {
        let names: Vec<String> = t.pk.iter().map(|(n, _)| quote_ident(n)).collect();
        let unnests: Vec<String> =
            t.pk.iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("${}::text[]::{ty}[]", i + 1))
                .collect();
        format!(
            "SELECT {} FROM {table} WHERE ({}) IN (SELECT * FROM unnest({}))",
            cols.join(", "),
            names.join(", "),
            unnests.join(", ")
        )
    }
}
