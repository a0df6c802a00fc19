//! Who may see what: column privileges per role (cached briefly) and row visibility under row
//! level security, checked the way the original does (look the row up by primary key as the
//! subscriber's role with `request.jwt.claims` set), but in batches: one key lookup per
//! (table, claims cohort) for all rows of a batch, all of a batch's lookups run by calls of
//! `walcast.check_cohorts` in one read-only transaction (one call per plan mode in use, see
//! `plans`). A lookup is a prepared statement of its own (once per connection, or once per key
//! set of the batch), and runs right after its own cohort's `set_config` calls: claims never
//! vary inside one lookup, and no lookup runs with another cohort's claims (a later call starts
//! from a savepoint taken before the first).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

use crate::db::replicas::{Replica, Replicas};
use crate::db::{quote_ident, quote_literal, text_array_literal, DbError, Pool};

use super::catalog::TableInfo;
use super::plans::{plan_calls, Call, PlanChoice, PlanMode};
use super::registry::Cohort;

/// How long privilege lookups are trusted. GRANT/REVOKE take effect within this time.
const PRIVILEGE_TTL: Duration = Duration::from_secs(2);
const CACHE_LIMIT: usize = 10_000;

/// (role, table) → when it was looked up, and the columns the role may select.
/// (role, table) → when it was looked up, and its SELECT policies as one condition.
type PolicyCache = HashMap<(String, u32), (Instant, Option<Arc<Policies>>)>;

/// A table's SELECT policies for one role, and its columns, to evaluate them on old rows.
#[derive(Debug)]
pub struct Policies {
    /// Permissive conditions OR'd, restrictive ones AND'd.
    cond: String,
    /// Every column of the table (name, `format_type`), in order.
    columns: Vec<(String, String)>,
}

type ColumnCache = HashMap<(String, u32), (Instant, Arc<HashSet<String>>)>;

/// How long a replica may take over a batch's checks beyond its wait for replay before it is
/// left out and the primary answers.
const REPLICA_ATTEMPT: Duration = Duration::from_secs(5);
/// SQLSTATEs the replay guard raises (see [`replay_guard_sql`]).
const BEHIND: &str = "WC001";
const NOT_STANDBY: &str = "WC002";

pub struct Authorizer {
    pool: Arc<Pool>,
    /// `DB_REPLICA_URLS`: where row checks may run instead (see [`crate::db::replicas`]).
    replicas: Option<Arc<Replicas>>,
    columns: Mutex<ColumnCache>,
    bypass: Mutex<HashMap<String, (Instant, bool)>>,
    plans: Mutex<HashMap<u32, PlanChoice>>,
    /// (role, table) → when it was looked up, and the table's SELECT policies for that role
    /// (`None`: no permissive policy, nothing is visible).
    policies: Mutex<PolicyCache>,
}
/// Why a batch of row checks failed (then narrowed down, and what still fails is withheld and
/// logged; clients never see these).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No connection for the check.
    #[error(transparent)]
    Pool(#[from] DbError),
    /// A statement of the check failed outside the lookups (preparing, the transaction).
    #[error(transparent)]
    Sql(#[from] tokio_postgres::Error),
    /// A lookup failed: a policy that errors, claims it cannot read, the statement timeout.
    #[error("{code}: {message}")]
    Lookup { code: String, message: String },
    #[error("check_cohorts answered for unknown cohort {0}")]
    UnknownCohort(i32),
    /// A composite key that is not a JSON array of texts.
    #[error(transparent)]
    Key(#[from] serde_json::Error),
}

impl CheckError {
    /// The SQLSTATE of a failed lookup.
    pub fn code(&self) -> Option<&str> {
        match self {
            CheckError::Lookup { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// One old-row question (DELETEs of `REPLICA IDENTITY FULL` tables): which of these rows,
/// given by their key and their values (column, text or NULL), would this cohort's SELECT
/// policies let it see?
pub struct OldRowRequest {
    pub table: Arc<TableInfo>,
    pub cohort: Arc<Cohort>,
    pub rows: Vec<OldRow>,
}

/// A deleted row: its key, and its columns' values as text (NULL as `None`).
pub type OldRow = (Vec<String>, Vec<(String, Option<String>)>);

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
            replicas: None,
            columns: Mutex::new(HashMap::new()),
            bypass: Mutex::new(HashMap::new()),
            plans: Mutex::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
        }
    }

    /// Row checks may also run on these replicas.
    pub fn set_replicas(&mut self, replicas: Arc<Replicas>) {
        if !replicas.is_empty() {
            self.replicas = Some(replicas);
        }
    }

    /// The replicas row checks may run on, if any.
    pub fn replicas(&self) -> Option<Arc<Replicas>> {
        self.replicas.clone()
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
        self.policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(_, t), _| *t != table);
    }

    /// The SELECT policies of `table` that apply to `role` (as PostgreSQL picks them: `TO` a
    /// role whose privileges `role` has, or PUBLIC), as one condition on the table's row
    /// (permissive ones OR'd, restrictive ones AND'd, as PostgreSQL combines them), with the
    /// table's columns; `None` when no permissive one applies (nothing is visible). Cached
    /// like privileges.
    async fn select_policies(
        &self,
        role: &str,
        table: u32,
    ) -> Result<Option<Arc<Policies>>, DbError> {
        let key = (role.to_owned(), table);
        if let Some((at, cond)) = self
            .policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if at.elapsed() < PRIVILEGE_TTL {
                return Ok(cond.clone());
            }
        }
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT p.polpermissive, pg_get_expr(p.polqual, p.polrelid)
                   FROM pg_policy p
                  WHERE p.polrelid = $1 AND p.polcmd IN ('r', '*')
                    AND (0::oid = ANY (p.polroles)
                         OR EXISTS (SELECT 1 FROM unnest(p.polroles) r
                                     WHERE pg_has_role($2::text::name, r, 'USAGE')))
                  ORDER BY p.polname",
                &[&table, &role],
            )
            .await?;
        let mut permissive = Vec::new();
        let mut restrictive = Vec::new();
        for r in rows {
            let is_permissive: bool = r.try_get(0)?;
            // A policy without a condition is taken as allowing nothing (in doubt, deny).
            let qual: Option<String> = r.try_get(1)?;
            let qual = format!("({})", qual.unwrap_or_else(|| "false".into()));
            if is_permissive {
                permissive.push(qual);
            } else {
                restrictive.push(qual);
            }
        }
        let cond: Option<Arc<Policies>> = if permissive.is_empty() {
            None
        } else {
            let mut c = format!("({})", permissive.join(" OR "));
            for r in restrictive {
                c.push_str(" AND ");
                c.push_str(&r);
            }
            let columns = client
                .query(
                    "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
                      WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                    &[&table],
                )
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<(String, String)>, tokio_postgres::Error>>()?;
            Some(Arc::new(Policies { cond: c, columns }))
        };
        let mut cache = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), cond.clone()));
        Ok(cond)
    }

    /// Answers old-row requests: the keys of the rows each cohort's SELECT policies admit,
    /// evaluated on the rows' values (each cast from its text to its column's type, in a row
    /// named as the table so that the policies' conditions read it) under the cohort's role
    /// and claims, in one read-only transaction. A request that fails, or whose policies
    /// cannot be read, sees nothing (and is logged as withheld); one whose rows lack a column
    /// of the table (a generated column pgoutput does not send) is not answered (`None`).
    pub async fn visible_old_rows(
        &self,
        requests: &[OldRowRequest],
        xids: &[u32],
    ) -> Vec<Option<HashSet<Vec<String>>>> {
        if requests.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<Option<HashSet<Vec<String>>>> = vec![Some(HashSet::new()); requests.len()];
        let mut statements: Vec<Option<String>> = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            match self.select_policies(&r.cohort.role, r.table.oid).await {
                Ok(Some(p)) => {
                    let sql = old_rows_sql(r, &p);
                    if sql.is_none() {
                        out[i] = None;
                    }
                    statements.push(sql);
                }
                Ok(None) => statements.push(None),
                Err(e) => {
                    withheld_old(r, &e.to_string());
                    statements.push(None);
                }
            }
        }
        let asked: Vec<usize> = (0..requests.len())
            .filter(|&i| statements[i].is_some())
            .collect();
        if asked.is_empty() {
            return out;
        }
        let run = |members: Vec<usize>| {
            let statements = &statements;
            async move {
                let mut client = self.pool.get().await.map_err(CheckError::from)?;
                let r = self
                    .check_old_rows(&mut client, requests, statements, &members, xids)
                    .await;
                if r.is_err() {
                    client.discard();
                }
                r
            }
        };
        match run(asked.clone()).await {
            Ok(answers) => {
                for (i, keys) in answers {
                    out[i] = Some(keys);
                }
            }
            Err(_) => {
                // Narrow down: a failing request withholds only itself.
                for i in asked {
                    match run(vec![i]).await {
                        Ok(answers) => {
                            for (i, keys) in answers {
                                out[i] = Some(keys);
                            }
                        }
                        Err(e) => withheld_old(&requests[i], &e.to_string()),
                    }
                }
            }
        }
        out
    }

    async fn check_old_rows(
        &self,
        client: &mut crate::db::PooledClient,
        requests: &[OldRowRequest],
        statements: &[Option<String>],
        members: &[usize],
        xids: &[u32],
    ) -> Result<Vec<(usize, HashSet<Vec<String>>)>, CheckError> {
        let mut setup = String::from("BEGIN READ ONLY; SET LOCAL statement_timeout = '10s';");
        if !xids.is_empty() {
            let xids: Vec<String> = xids.iter().map(u32::to_string).collect();
            setup.push_str(&format!(
                "SELECT walcast.wait_visible('{{{}}}'::text[]::xid[])",
                xids.join(",")
            ));
        }
        client.simple_query(&setup).await?;
        let cohorts: Vec<&Cohort> = members.iter().map(|&i| &*requests[i].cohort).collect();
        let stmts: Vec<&str> = members
            .iter()
            .map(|&i| statements[i].as_deref().unwrap_or("SELECT NULL::text[]"))
            .collect();
        let mut out = Vec::with_capacity(members.len());
        for (at, visible) in check_cohorts(client, &cohorts, &stmts).await? {
            let i = members[at];
            let mut keys = HashSet::new();
            for key in visible.unwrap_or_default() {
                // Every key comes as a JSON array of its columns' texts.
                keys.insert(serde_json::from_str::<Vec<String>>(&key)?);
            }
            out.push((i, keys));
        }
        client.batch_execute("ROLLBACK").await?;
        Ok(out)
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
    /// `commit_lsn` is the start of the batch's last commit record: a replica answers only once
    /// it has replayed past it (see [`crate::db::replicas`]); else the primary answers.
    pub async fn visible(
        &self,
        requests: &[RlsRequest],
        xids: &[u32],
        commit_lsn: u64,
    ) -> Vec<HashSet<Vec<String>>> {
        if requests.is_empty() {
            return Vec::new();
        }
        let started = std::time::Instant::now();
        metrics::histogram!(crate::telemetry::AUTHZ_COHORTS).record(requests.len() as f64);
        let _timer = TimerGuard(started);
        if let Some(replicas) = &self.replicas {
            if let Some((replica, _busy)) = replicas.pick(commit_lsn) {
                match self
                    .on_replica(&replica, replicas.max_wait, requests, xids, commit_lsn)
                    .await
                {
                    Ok(v) => {
                        metrics::counter!(crate::telemetry::AUTHZ_BATCHES, "on" => "replica")
                            .increment(1);
                        return v;
                    }
                    Err(miss) => miss.record(&replica),
                }
            }
        }
        let _busy = self.replicas.as_ref().map(|r| r.primary_busy());
        metrics::counter!(crate::telemetry::AUTHZ_BATCHES, "on" => "primary").increment(1);
        match self.visible_batch(requests, xids).await {
            Ok(v) => v,
            Err(e) => {
                // One failing lookup fails the whole call: narrow down, so that a row whose
                // policy errors (or a cohort whose claims do) withholds only itself, never the
                // other rows or cohorts that happened to share the batch.
                tracing::debug!(error = %e, "batched RLS check failed; checking cohorts one by one");
                let mut out = Vec::with_capacity(requests.len());
                for r in requests {
                    out.push(self.visible_one_cohort(r, xids).await);
                }
                out
            }
        }
    }

    /// One cohort's request on its own; if that fails too, key by key.
    async fn visible_one_cohort(&self, r: &RlsRequest, xids: &[u32]) -> HashSet<Vec<String>> {
        match self.visible_batch(std::slice::from_ref(r), xids).await {
            Ok(mut v) => return v.pop().unwrap_or_default(),
            Err(e) if r.pks.len() <= 1 => {
                withheld(r, &e);
                return HashSet::new();
            }
            Err(_) => {}
        }
        let mut seen = HashSet::new();
        for pk in &r.pks {
            let one = RlsRequest {
                table: r.table.clone(),
                cohort: r.cohort.clone(),
                pks: vec![pk.clone()],
            };
            match self.visible_batch(std::slice::from_ref(&one), xids).await {
                Ok(mut v) => seen.extend(v.pop().unwrap_or_default()),
                Err(e) => withheld(&one, &e),
            }
        }
        seen
    }

    /// The whole batch on `replica`, all or nothing: any failure (still behind after the wait,
    /// an error, a recovery conflict, a lost connection) returns why, and the primary answers
    /// the batch instead. Policy errors are narrowed down on the primary only, so a replica
    /// never answers for part of a batch.
    async fn on_replica(
        &self,
        replica: &Replica,
        wait: Duration,
        requests: &[RlsRequest],
        xids: &[u32],
        commit_lsn: u64,
    ) -> Result<Vec<HashSet<Vec<String>>>, Miss> {
        let deadline = wait + REPLICA_ATTEMPT;
        let mut client = match tokio::time::timeout(deadline, replica.pool.get()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                replica.down();
                return Err(Miss::Unavailable(e.to_string()));
            }
            Err(_) => {
                replica.down();
                return Err(Miss::Unavailable("no connection in time".into()));
            }
        };
        let attempt = async {
            let waited_until = tokio::time::Instant::now() + wait;
            let mut waited = false;
            loop {
                match self
                    .check(&mut client, requests, xids, Some(commit_lsn))
                    .await
                {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        let miss = Miss::of(&e);
                        if !matches!(miss, Miss::Behind) || waited {
                            return Err(miss);
                        }
                    }
                }
                // Not replayed yet: wait for it outside any transaction (a snapshot held while
                // waiting could hold up the very replay it waits for, on a recovery conflict),
                // then check again, guard included.
                client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(|e| Miss::of(&CheckError::Sql(e)))?;
                waited = true;
                if !wait_replayed(&client, commit_lsn, waited_until)
                    .await
                    .map_err(|e| Miss::of(&CheckError::Sql(e)))?
                {
                    return Err(Miss::Behind);
                }
            }
        };
        match tokio::time::timeout(deadline, attempt).await {
            Ok(Ok(v)) => {
                replica.replayed(commit_lsn.saturating_add(1));
                Ok(v)
            }
            Ok(Err(miss)) => {
                // Its session state is in doubt (an aborted transaction, prepared statements).
                client.discard();
                match miss {
                    Miss::Behind => replica.behind(commit_lsn),
                    Miss::Unavailable(_) => replica.down(),
                    Miss::Conflict(_) | Miss::Error(_) => {}
                }
                Err(miss)
            }
            Err(_) => {
                // The check is cut off mid-transaction: its connection is not reused.
                client.discard();
                replica.down();
                Err(Miss::Unavailable(format!(
                    "no answer within {} ms",
                    deadline.as_millis()
                )))
            }
        }
    }

    async fn visible_batch(
        &self,
        requests: &[RlsRequest],
        xids: &[u32],
    ) -> Result<Vec<HashSet<Vec<String>>>, CheckError> {
        let mut client = self.pool.get().await?;
        let result = self.check(&mut client, requests, xids, None).await;
        if result.is_err() {
            // Its prepared statements may be what failed: start the next check afresh.
            client.discard();
        }
        result
    }

    /// One transaction: wait until the changed rows are visible, then calls of
    /// `walcast.check_cohorts` that, cohort by cohort, set the role and claims and run that
    /// table's prepared key lookup under them: one call per plan mode in use (see
    /// [`PlanChoice`]), and a timed call of its own for each half of a table being compared.
    /// On a replica, `replay` is the batch's last commit LSN: the transaction first makes sure
    /// the replica has replayed past it (see [`replay_guard_sql`]), or fails with `WC001`. Nothing here writes (no temporary tables, no sequences): `SET
    /// LOCAL`, `set_config`, `PREPARE`, savepoints and the lookups all run on a hot standby.
    async fn check(
        &self,
        client: &mut crate::db::PooledClient,
        requests: &[RlsRequest],
        xids: &[u32],
        replay: Option<u64>,
    ) -> Result<Vec<HashSet<Vec<String>>>, CheckError> {
        let calls = self.plan_calls(requests);
        // Each request's keys as one text array literal per key column.
        let args: Vec<Vec<String>> = requests
            .iter()
            .map(|r| {
                columns_of(&r.pks, r.table.pk.len())
                    .iter()
                    .map(|col| quote_literal(&text_array_literal(col)))
                    .collect()
            })
            .collect();
        let mut statements = vec![String::new(); requests.len()];
        // Per call, the statements prepared for its key sets (Keys mode; planned at their first
        // EXECUTE, and again by PostgreSQL should a later cohort's role differ).
        let mut prepares: Vec<Vec<String>> = vec![Vec::new(); calls.len()];
        let mut prepared = 0usize;
        for (call, prepare) in calls.iter().zip(prepares.iter_mut()) {
            let mut by_keys: HashMap<(u32, &[String]), String> = HashMap::new();
            for &i in &call.members {
                let r = &requests[i];
                statements[i] = match call.mode {
                    PlanMode::Generic => {
                        let width = r.table.pk.len();
                        let types = vec!["text[]"; width].join(", ");
                        let params: Vec<String> = (1..=width).map(|n| format!("${n}")).collect();
                        let name = client
                            .named_statement(&select_sql(&r.table, &params), &types)
                            .await?;
                        format!("EXECUTE {name}({})", args[i].join(", "))
                    }
                    PlanMode::Keys => {
                        let name = by_keys
                            .entry((r.table.oid, args[i].as_slice()))
                            .or_insert_with(|| {
                                prepared += 1;
                                let name = format!("walcast_keys_{prepared}");
                                let literals: Vec<String> =
                                    args[i].iter().map(|a| format!("{a}::text[]")).collect();
                                prepare.push(format!(
                                    "PREPARE {name} AS {}",
                                    select_sql(&r.table, &literals)
                                ));
                                name
                            });
                        format!("EXECUTE {name}")
                    }
                };
            }
        }

        // Three round trips: the transaction's setup with the wait for visibility, the calls,
        // the rollback (with the key sets' statements deallocated). Any error discards the
        // connection (see `visible_batch`), so no transaction is left open on it.
        //
        // A generic plan per lookup statement, made once: left to choose, PostgreSQL planned
        // every lookup afresh (custom plans for each key array), which was a quarter of its
        // time. The key sets' statements have no parameters: their one plan is for their keys.
        let mut setup = String::from(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = '10s'; \
             SET LOCAL plan_cache_mode = force_generic_plan;",
        );
        if let Some(lsn) = replay {
            // Before any lookup: every later statement's snapshot includes the batch's commits.
            setup.push_str(&replay_guard_sql(lsn));
        }
        for p in prepares.iter().flatten() {
            setup.push_str(p);
            setup.push(';');
        }
        if calls.len() > 1 {
            // Each later call starts from here again: no cohort's role or claims carry over.
            setup.push_str("SAVEPOINT walcast_call;");
        }
        if !xids.is_empty() {
            let xids: Vec<String> = xids.iter().map(u32::to_string).collect();
            setup.push_str(&format!(
                "SELECT walcast.wait_visible('{{{}}}'::text[]::xid[])",
                xids.join(",")
            ));
        }
        let answers = client.simple_query(&setup).await?;
        if !xids.is_empty() {
            let visible = answers.iter().any(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0) == Some("t"),
                _ => false,
            });
            if !visible {
                tracing::warn!(
                    ?xids,
                    "committed transactions still not visible after 5 s; checking anyway"
                );
            }
        }
        let mut out = vec![HashSet::new(); requests.len()];
        for (n, call) in calls.iter().enumerate() {
            let cohorts: Vec<&Cohort> =
                call.members.iter().map(|&i| &*requests[i].cohort).collect();
            let stmts: Vec<&str> = call
                .members
                .iter()
                .map(|&i| statements[i].as_str())
                .collect();
            if n > 0 {
                // The previous call left its last cohort's role and claims set.
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT walcast_call")
                    .await?;
            }
            let started = Instant::now();
            let answers = check_cohorts(client, &cohorts, &stmts).await?;
            if let Some(table) = call.timed {
                let keys = call.members.iter().map(|&i| requests[i].pks.len()).sum();
                let micros = started.elapsed().as_secs_f64() * 1e6;
                self.plans
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(table)
                    .or_default()
                    .record(call.mode, micros, keys);
            }
            for (at, visible) in answers {
                let i = call.members[at];
                let composite = requests[i].table.pk.len() > 1;
                for key in visible.unwrap_or_default() {
                    // A composite key comes as a JSON array of its columns' texts.
                    let key = if composite {
                        serde_json::from_str(&key)?
                    } else {
                        vec![key]
                    };
                    out[i].insert(key);
                }
            }
        }
        // Prepared statements outlive the transaction: the key sets' go with it.
        let mut end = String::from("ROLLBACK;");
        for n in 1..=prepared {
            end.push_str(&format!("DEALLOCATE walcast_keys_{n};"));
        }
        client.batch_execute(&end).await?;
        Ok(out)
    }

    /// Groups a batch's requests into `check_cohorts` calls (see [`plan_calls`]).
    fn plan_calls(&self, requests: &[RlsRequest]) -> Vec<Call> {
        let tables: Vec<u32> = requests.iter().map(|r| r.table.oid).collect();
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if plans.len() > CACHE_LIMIT {
            plans.clear();
        }
        plan_calls(&mut plans, &tables)
    }
}

/// `commit_lsn` as PostgreSQL writes an LSN (`XXX/XXX`).
fn lsn_text(commit_lsn: u64) -> String {
    format!("{:X}/{:X}", commit_lsn >> 32, commit_lsn & 0xFFFF_FFFF)
}

/// The replay guard of a check on a replica, run first in the check's transaction on the
/// check's connection: raises `WC001` unless the standby has replayed past `commit_lsn` (the
/// start of the batch's last commit record; the end of the last record replayed is then at or
/// past that commit's end), `WC002` if the server is not a standby (promoted: its data is no
/// longer the primary's). Replay only moves forward while the standby runs, and the connection
/// dies with it, so the lookups that follow see at least everything up to that commit.
fn replay_guard_sql(commit_lsn: u64) -> String {
    let lsn = lsn_text(commit_lsn);
    format!(
        "DO $walcast_replay$ BEGIN \
           IF NOT pg_is_in_recovery() THEN RAISE EXCEPTION 'not a standby' USING ERRCODE = '{NOT_STANDBY}'; END IF; \
           IF NOT pg_last_wal_replay_lsn() > '{lsn}'::pg_lsn THEN \
             RAISE EXCEPTION 'replay behind {lsn}' USING ERRCODE = '{BEHIND}'; END IF; \
         END $walcast_replay$;"
    )
}

/// Waits, outside any transaction (each poll a statement of its own, so no snapshot is held
/// across the wait), until the standby has replayed past `commit_lsn`; false if it has not by
/// `until`.
async fn wait_replayed(
    client: &tokio_postgres::Client,
    commit_lsn: u64,
    until: tokio::time::Instant,
) -> Result<bool, tokio_postgres::Error> {
    let lsn = lsn_text(commit_lsn);
    loop {
        let done: Option<bool> = client
            .query_one(
                "SELECT pg_is_in_recovery() AND pg_last_wal_replay_lsn() > $1::text::pg_lsn",
                &[&lsn],
            )
            .await?
            .try_get(0)?;
        if done == Some(true) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= until {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Why a replica did not answer a batch (which the primary then answers).
#[derive(Debug)]
enum Miss {
    /// Not replayed past the batch's commits within `DB_REPLICA_MAX_WAIT_MS`.
    Behind,
    /// A query cancelled by a recovery conflict.
    Conflict(String),
    /// Any other error of the check (a policy error, a setting): the primary decides.
    Error(String),
    /// No connection, a lost one, no answer in time, or no longer a standby.
    Unavailable(String),
}

impl Miss {
    fn of(e: &CheckError) -> Miss {
        let db = match e {
            CheckError::Sql(e) => e.as_db_error().map(|d| (d.code().code(), d.message())),
            CheckError::Lookup { code, message } => Some((code.as_str(), message.as_str())),
            CheckError::Pool(e) => e.db_error().map(|d| (d.code().code(), d.message())),
            _ => return Miss::Error(e.to_string()),
        };
        match db {
            None => Miss::Unavailable(e.to_string()),
            Some((BEHIND, _)) => Miss::Behind,
            Some((NOT_STANDBY, _)) => Miss::Unavailable("no longer a standby".into()),
            Some((code, message))
                if matches!(code, "40001" | "40P01" | "57P04") && message.contains("recovery") =>
            {
                Miss::Conflict(format!("{code}: {message}"))
            }
            Some((code, message)) => Miss::Error(format!("{code}: {message}")),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Miss::Behind => "behind",
            Miss::Conflict(_) => "conflict",
            Miss::Error(_) => "error",
            Miss::Unavailable(_) => "unavailable",
        }
    }

    /// The metric, and a log line where an operator has something to look at.
    fn record(&self, replica: &Replica) {
        metrics::counter!(crate::telemetry::REPLICA_FALLBACKS, "reason" => self.reason())
            .increment(1);
        match self {
            Miss::Behind => tracing::debug!(
                replica = %replica.label,
                "replica had not replayed the batch's commits in time: checked on the primary"
            ),
            Miss::Conflict(e) => tracing::warn!(
                replica = %replica.label, error = %e,
                "row check cancelled on the replica by a recovery conflict: checked on the primary"
            ),
            Miss::Error(e) => tracing::debug!(
                replica = %replica.label, error = %e,
                "row check failed on the replica: checked on the primary"
            ),
            Miss::Unavailable(e) => tracing::warn!(
                replica = %replica.label, error = %e,
                "replica unavailable: row checks go to the primary until it answers again"
            ),
        }
    }
}

/// Says, in a metric and a log line, that a row check failed and its rows are not sent.
fn withheld(r: &RlsRequest, error: &CheckError) {
    metrics::counter!(crate::telemetry::CHANGES_WITHHELD, "reason" => "policy_error").increment(1);
    tracing::warn!(
        table = %format!("{}.{}", r.table.schema, r.table.name),
        role = %r.cohort.role,
        rows = r.pks.len(),
        error = %error,
        "RlsPolicyError: row check failed, change withheld"
    );
}

/// Says, in a metric and a log line, that an old-row check failed and its DELETEs are not sent.
fn withheld_old(r: &OldRowRequest, error: &str) {
    metrics::counter!(crate::telemetry::CHANGES_WITHHELD, "reason" => "policy_error").increment(1);
    tracing::warn!(
        table = %format!("{}.{}", r.table.schema, r.table.name),
        role = %r.cohort.role,
        rows = r.rows.len(),
        error = %error,
        "RlsPolicyError: old-row check of a DELETE failed, DELETE withheld"
    );
}

/// The old-row lookup of one request: its rows' keys (each a JSON array of the key columns'
/// texts) whose values pass the cohort's SELECT policies, with the rows named as the table is
/// (the policies' conditions may say `messages.room`) and each value cast from its text to its
/// column's type. `None` when a row lacks a column of the table.
fn old_rows_sql(r: &OldRowRequest, p: &Policies) -> Option<String> {
    let t = &r.table;
    let mut rows = Vec::with_capacity(r.rows.len());
    for (pk, values) in &r.rows {
        let key = serde_json::to_string(pk).unwrap_or_else(|_| "[]".into());
        let mut row = vec![format!("{}::text", quote_literal(&key))];
        for (name, ty) in &p.columns {
            let (_, value) = values.iter().find(|(n, _)| n == name)?;
            row.push(match value {
                Some(v) => format!("{}::{ty}", quote_literal(v)),
                None => format!("NULL::{ty}"),
            });
        }
        rows.push(format!("({})", row.join(", ")));
    }
    let names: Vec<String> = p.columns.iter().map(|(n, _)| quote_ident(n)).collect();
    Some(format!(
        "SELECT array_agg(walcast_k) FROM (VALUES {}) AS {}(walcast_k, {}) WHERE {}",
        rows.join(", "),
        quote_ident(&t.name),
        names.join(", "),
        p.cond
    ))
}

/// One call of `walcast.check_cohorts`: statement `stmts[n]` run under `cohorts[n]`'s role and
/// claims, for every `n`; answers (n, the keys it returned), with the function's own errors as
/// [`CheckError::Lookup`]. One unnamed statement (parsed, bound and run in one round trip): the
/// lookups inside it are prepared statements.
async fn check_cohorts(
    client: &crate::db::PooledClient,
    cohorts: &[&Cohort],
    stmts: &[&str],
) -> Result<Vec<(usize, Option<Vec<String>>)>, CheckError> {
    let roles: Vec<&str> = cohorts.iter().map(|c| c.role.as_str()).collect();
    let claims: Vec<&str> = cohorts.iter().map(|c| c.claims.as_str()).collect();
    let subs: Vec<&str> = cohorts.iter().map(|c| c.sub.as_str()).collect();
    let rows = client
        .query_typed(
            "SELECT cohort, visible FROM walcast.check_cohorts($1, $2, $3, $4)",
            &[
                (&roles, Type::TEXT_ARRAY),
                (&claims, Type::TEXT_ARRAY),
                (&subs, Type::TEXT_ARRAY),
                (&stmts, Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => CheckError::Lookup {
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
            },
            None => CheckError::Sql(e),
        })?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let cohort: i32 = row.try_get(0)?;
        let visible: Option<Vec<String>> = row.try_get(1)?;
        let at = usize::try_from(cohort - 1)
            .ok()
            .filter(|&at| at < cohorts.len())
            .ok_or(CheckError::UnknownCohort(cohort))?;
        out.push((at, visible));
    }
    Ok(out)
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

/// The key lookup for one table: the keys of the given rows the current role and claims may
/// see, as text (a JSON array of texts per row for a composite key). `keys` holds one `text[]`
/// expression per key column: a parameter (`$1`, prepared once per connection) or a literal
/// (prepared for one key set).
fn select_sql(t: &TableInfo, keys: &[String]) -> String {
    let table = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
    let key = |i: usize| keys.get(i).map(String::as_str).unwrap_or("NULL::text[]");
    if t.pk.len() == 1 {
        let (name, ty) = &t.pk[0];
        let col = quote_ident(name);
        format!(
            "SELECT array_agg({col}::text) FROM {table} WHERE {col} = ANY({}::{ty}[])",
            key(0)
        )
    } else {
        let names: Vec<String> = t.pk.iter().map(|(n, _)| quote_ident(n)).collect();
        let texts: Vec<String> = names.iter().map(|n| format!("{n}::text")).collect();
        let unnests: Vec<String> =
            t.pk.iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("{}::{ty}[]", key(i)))
                .collect();
        format!(
            "SELECT array_agg(jsonb_build_array({})::text) FROM {table} WHERE ({}) IN (SELECT * FROM unnest({}))",
            texts.join(", "),
            names.join(", "),
            unnests.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard asks for replay strictly past the commit record's start (the end of the last
    /// record replayed equals its start only before the commit is replayed), in PostgreSQL's
    /// LSN notation.
    #[test]
    fn the_replay_guard_asks_for_replay_past_the_commit_record() {
        assert_eq!(lsn_text(0x1_0000_00FF), "1/FF");
        assert_eq!(lsn_text(0x306_BF00), "0/306BF00");
        let sql = replay_guard_sql(0x2_ABCD_0001);
        assert!(
            sql.contains("IF NOT pg_last_wal_replay_lsn() > '2/ABCD0001'::pg_lsn THEN"),
            "{sql}"
        );
        assert!(sql.contains("IF NOT pg_is_in_recovery()"), "{sql}");
    }

    /// The log text of each error the check makes itself (the wrapped ones keep their own).
    #[test]
    fn check_errors_display_as_before() {
        let lookup = CheckError::Lookup {
            code: "42P17".into(),
            message: "infinite recursion detected in policy".into(),
        };
        assert_eq!(
            lookup.to_string(),
            "42P17: infinite recursion detected in policy"
        );
        assert_eq!(lookup.code(), Some("42P17"));
        assert_eq!(
            CheckError::UnknownCohort(7).to_string(),
            "check_cohorts answered for unknown cohort 7"
        );
        let bad_key = serde_json::from_str::<Vec<String>>("nope").unwrap_err();
        let text = bad_key.to_string();
        assert_eq!(CheckError::Key(bad_key).to_string(), text);
    }
}
