//! postgres_changes: subscriptions from join payloads, matched against the change stream,
//! authorized per subscriber, delivered to channels.
//!
//! - [`binding`] and [`filter`] parse what the client asked for (with the original's errors);
//! - [`PgChanges::prepare`] checks it against the database (tables in the publication, columns
//!   the role may read, filter values cast to the column type) before it goes live;
//! - [`registry`] holds live subscriptions, indexed by equality-filter value;
//! - [`PgChanges::dispatch`] runs the stream: decode rows, match, authorize in batches
//!   ([`authorize`]), build each payload once per audience ([`payload`]), deliver in commit
//!   order, then acknowledge the commit so the slot can advance.

pub mod authorize;
pub mod binding;
pub mod catalog;
pub mod filter;
pub mod payload;
pub mod registry;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::auth::Claims;
use crate::db::{DbError, Pool};
use crate::error::{clip, MAX_ECHO_BYTES};
use crate::protocol::encode;
use crate::replication::pgoutput::{Datum, OldKind, OldTuple, Tuple};
use crate::replication::{Event, Status};

use authorize::{Authorizer, RlsRequest};
use binding::{Action, BindingSpec};
use catalog::{Catalog, TableInfo};
use filter::{Filter, Kind, Op, Operand};
use payload::{Change, Row, RowCell};
use registry::{Cell, Cohort, Registry, Sub, Target};

/// How many decoded events the dispatcher takes at once before authorizing and delivering.
const MAX_BATCH_EVENTS: usize = 1024;
/// Most values an `in` filter may list.
const MAX_IN_VALUES: usize = 100;

pub struct PgChanges {
    /// For work clients start (subscription checks at join and after a new token).
    pub pool: Arc<Pool>,
    /// For delivery only (the dispatcher's table descriptions, privilege and row checks): no
    /// storm of joins or token pushes can make a change wait for a connection.
    pub delivery: Arc<Pool>,
    pub catalog: Catalog,
    pub registry: Registry,
    pub authorizer: Authorizer,
    pub publication: String,
    pub max_record_bytes: usize,
}

impl PgChanges {
    pub fn new(
        pool: Arc<Pool>,
        delivery: Arc<Pool>,
        publication: String,
        max_record_bytes: usize,
    ) -> Self {
        Self {
            catalog: Catalog::new(delivery.clone()),
            authorizer: Authorizer::new(delivery.clone()),
            registry: Registry::new(),
            pool,
            delivery,
            publication,
            max_record_bytes,
        }
    }

    /// Checks a channel's bindings against the database and returns the subscriptions to
    /// register, or the `system` error message. All or nothing, as in the original.
    pub async fn prepare(
        &self,
        target: Arc<Target>,
        claims: &Claims,
        bindings: &[BindingSpec],
    ) -> Result<Vec<(u32, Sub)>, String> {
        let cohort = Arc::new(Cohort {
            role: claims.role.clone(),
            claims: serde_json::to_string(&*claims.raw).unwrap_or_else(|_| "{}".into()),
            sub: claims.sub().unwrap_or_default().to_owned(),
        });
        let mut out = Vec::new();
        for b in bindings {
            let subs = self
                .prepare_binding(&target, &cohort, b)
                .await
                .map_err(|e| e.message(b))?;
            out.extend(subs);
        }
        Ok(out)
    }

    async fn prepare_binding(
        &self,
        target: &Arc<Target>,
        cohort: &Arc<Cohort>,
        b: &BindingSpec,
    ) -> Result<Vec<(u32, Sub)>, PrepareError> {
        let client = self.pool.get().await.map_err(PrepareError::db)?;
        let role_ok = client
            .query_one("SELECT to_regrole($1) IS NOT NULL", &[&cohort.role])
            .await
            .map_err(|e| PrepareError::db(e.into()))?
            .get::<_, bool>(0);
        if !role_ok {
            return Err(PrepareError::Exception(format!(
                "ERROR 42704 (undefined_object) role {} does not exist",
                filter::inspect(&cohort.role)
            )));
        }
        let tables = client
            .query(
                "SELECT format('%I.%I', schemaname, tablename)::regclass::oid, schemaname::text, tablename::text
                   FROM pg_publication_tables
                  WHERE pubname = $1
                    AND schemaname LIKE (CASE $2 WHEN '*' THEN '%' ELSE $2 END) ESCAPE ''
                    AND tablename LIKE (CASE $3 WHEN '*' THEN '%' ELSE $3 END) ESCAPE ''
                  ORDER BY 2, 3",
                &[&self.publication, &b.schema, &b.table],
            )
            .await
            .map_err(|e| PrepareError::db(e.into()))?;
        if tables.is_empty() {
            return Err(PrepareError::NoTable);
        }
        let mut out = Vec::new();
        for row in tables {
            let oid: u32 = row.get(0);
            let columns = client
                .query(
                    "SELECT attname::text, atttypid, format_type(atttypid, atttypmod)
                       FROM pg_attribute
                      WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
                        AND has_column_privilege($2, attrelid, attnum, 'SELECT')",
                    &[&oid, &cohort.role],
                )
                .await
                .map_err(|e| PrepareError::db(e.into()))?;
            let columns: HashMap<String, (u32, String)> = columns
                .iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        (r.get::<_, u32>(1), r.get::<_, String>(2)),
                    )
                })
                .collect();
            let mut filters = Vec::with_capacity(b.filters.len());
            for f in &b.filters {
                let Some((type_oid, type_name)) = columns.get(&f.column) else {
                    return Err(PrepareError::raise(format!(
                        "invalid column for filter {}",
                        f.column
                    )));
                };
                filters.push(
                    self.compile_filter(&client, f, *type_oid, type_name)
                        .await?,
                );
            }
            if let Some(select) = &b.select {
                for c in select {
                    if !columns.contains_key(c) {
                        return Err(PrepareError::raise(format!(
                            "invalid column for select {c}"
                        )));
                    }
                }
            }
            out.push((
                oid,
                Sub {
                    target: target.clone(),
                    binding_id: b.id,
                    action: b.action,
                    filters,
                    select: b.select.clone().map(Arc::new),
                    cohort: cohort.clone(),
                },
            ));
        }
        Ok(out)
    }

    async fn compile_filter(
        &self,
        client: &tokio_postgres::Client,
        f: &filter::ParsedFilter,
        type_oid: u32,
        type_name: &str,
    ) -> Result<Filter, PrepareError> {
        self.catalog
            .ensure_types([type_oid])
            .await
            .map_err(PrepareError::db)?;
        let kind = self
            .catalog
            .kind(client, type_oid)
            .await
            .map_err(PrepareError::db)?;
        let operand = match f.op {
            Op::Eq | Op::Neq | Op::Lt | Op::Lte | Op::Gt | Op::Gte | Op::IsDistinct => {
                if matches!(f.op, Op::Lt | Op::Lte | Op::Gt | Op::Gte) && !kind.orderable() {
                    return Err(PrepareError::raise(format!(
                        "operator {} is not supported by walcast for column type {type_name}",
                        f.op.as_str()
                    )));
                }
                let sql = format!("SELECT ($1::text::{type_name})::text");
                let row = client
                    .query_one(&sql, &[&f.value])
                    .await
                    .map_err(PrepareError::sql)?;
                Operand::Value(row.get(0))
            }
            Op::In => {
                let sql = format!("SELECT x::text FROM unnest($1::text::{type_name}[]) AS x");
                let rows = client
                    .query(&sql, &[&f.value])
                    .await
                    .map_err(PrepareError::sql)?;
                if rows.len() > MAX_IN_VALUES {
                    return Err(PrepareError::raise(
                        "too many values for `in` filter. Maximum 100".into(),
                    ));
                }
                Operand::List(rows.iter().map(|r| r.get(0)).collect())
            }
            Op::Is => {
                if !matches!(f.value.as_str(), "null" | "true" | "false" | "unknown") {
                    return Err(PrepareError::raise(
                        "invalid value for is filter: must be null, true, false, or unknown".into(),
                    ));
                }
                if f.value != "null" && kind != Kind::Bool {
                    return Err(PrepareError::raise(format!(
                        "is {} filter requires a boolean column, got {type_name}",
                        f.value
                    )));
                }
                Operand::Keyword(f.value.clone())
            }
            Op::Like | Op::ILike | Op::Match | Op::IMatch => {
                let opname = match f.op {
                    Op::Like | Op::ILike => "~~",
                    Op::Match => "~",
                    _ => "~*",
                };
                let ok = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_operator WHERE oprname = $1 AND oprleft = $2)",
                        &[&opname, &type_oid],
                    )
                    .await
                    .map_err(PrepareError::sql)?
                    .get::<_, bool>(0);
                if !ok {
                    return Err(PrepareError::raise(format!(
                        "operator {} requires a text-compatible column type, got {type_name}",
                        f.op.as_str()
                    )));
                }
                if matches!(f.op, Op::Match | Op::IMatch) {
                    if let Err(e) = client.query_one("SELECT '' ~ $1", &[&f.value]).await {
                        let msg = e
                            .as_db_error()
                            .map(|d| d.message().to_owned())
                            .unwrap_or_else(|| e.to_string());
                        return Err(PrepareError::raise(format!(
                            "invalid regular expression for {} filter: {msg}",
                            f.op.as_str()
                        )));
                    }
                    let re = filter::compile_regex(&f.value, f.op == Op::IMatch).map_err(|e| {
                            PrepareError::raise(format!(
                                "invalid regular expression for {} filter: walcast cannot evaluate it: {e}",
                                f.op.as_str()
                            ))
                        })?;
                    Operand::Regex(re)
                } else {
                    Operand::Pattern(filter::LikePattern::new(&f.value, f.op == Op::ILike))
                }
            }
        };
        Ok(Filter {
            column: f.column.clone(),
            kind,
            op: f.op,
            negate: f.negate,
            operand,
        })
    }

    /// Runs the dispatcher until the event queue closes.
    /// Runs the dispatcher until the event queue closes. Rows inserted into
    /// `realtime.messages` (broadcast from the database) go to `channels`.
    pub async fn dispatch(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Event>,
        status: Arc<Status>,
        channels: crate::channels::Channels,
        max_payload_bytes: usize,
    ) {
        let mut tables: HashMap<u32, Arc<TableInfo>> = HashMap::new();
        // realtime.messages, or its daily partitions (pgoutput names the partition a row went to).
        let mut messages_oids: std::collections::HashSet<u32> = std::collections::HashSet::new();
        let mut commit_ts: i64 = 0;
        let mut xid: u32 = 0;
        let mut batch = Vec::with_capacity(MAX_BATCH_EVENTS);
        // Exactly once across reconnects: PostgreSQL streams again everything after the last
        // confirmed commit, which may include what was already delivered. Commits arrive in
        // commit-LSN order, so a transaction whose commit LSN is below the last delivered
        // commit's end was delivered whole; one cut off mid-way is streamed again from its
        // start, and its changes up to the last one handled are skipped.
        let mut txn = TxnState::default();
        // Whether the batch being collected ends inside a transaction.
        let mut in_txn = false;
        while let Some(first) = rx.recv().await {
            batch.push(first);
            // Take what is already waiting (batches form by themselves under load), and the
            // rest of a transaction begun in the batch: PostgreSQL sends a transaction whole at
            // its commit, so its remaining events are moments away, and its rows are then
            // checked together whatever the stream's timing.
            loop {
                if let Some(ev) = batch.last() {
                    match ev {
                        Event::Begin { .. } => in_txn = true,
                        Event::Commit { .. } => in_txn = false,
                        _ => {}
                    }
                }
                if batch.len() >= MAX_BATCH_EVENTS {
                    break;
                }
                match rx.try_recv() {
                    Ok(ev) => batch.push(ev),
                    Err(mpsc::error::TryRecvError::Empty) if in_txn => match rx.recv().await {
                        Some(ev) => batch.push(ev),
                        None => break,
                    },
                    Err(_) => break,
                }
            }
            let mut pending: Vec<(Change, Vec<Arc<Sub>>)> = Vec::new();
            let mut last_commit = None;
            for ev in batch.drain(..) {
                tracing::trace!(event = ?ev, "change event");
                if matches!(
                    ev,
                    Event::Insert { .. } | Event::Update { .. } | Event::Delete { .. }
                ) {
                    metrics::counter!(crate::telemetry::DECODED_CHANGES).increment(1);
                }
                match ev {
                    Event::Relation(rel) => {
                        let mut backoff = Duration::from_millis(100);
                        let info = loop {
                            match self.catalog.table_from_relation(&rel).await {
                                Ok(t) => break t,
                                // Shutting down: the stream is gone, nothing more is delivered,
                                // and the slot has not been confirmed past this point.
                                Err(_) if rx.is_closed() => return,
                                Err(e) => {
                                    // Without the table's key and RLS flag nothing can be sent
                                    // safely: wait (the stream waits too) and try again.
                                    tracing::warn!(error = %e, table = %rel.name, retry_ms = backoff.as_millis() as u64, "cannot describe table; retrying");
                                    tokio::time::sleep(backoff).await;
                                    backoff = (backoff * 2).min(Duration::from_secs(5));
                                }
                            }
                        };
                        if info.stored_broadcasts {
                            messages_oids.insert(rel.oid);
                        } else {
                            messages_oids.remove(&rel.oid);
                        }
                        self.authorizer.forget_table(rel.oid);
                        tables.insert(rel.oid, Arc::new(info));
                    }
                    Event::Begin {
                        commit_ts: ts,
                        final_lsn,
                        xid: x,
                    } => {
                        commit_ts = ts;
                        xid = x;
                        let delivered = status
                            .acked
                            .load(Ordering::Relaxed)
                            .max(last_commit.unwrap_or(0));
                        txn.begin(final_lsn, delivered);
                    }
                    Event::Commit { end_lsn } => {
                        if !txn.skip_all {
                            last_commit = Some(end_lsn);
                        }
                        txn.commit();
                    }
                    Event::Message { .. } => {}
                    Event::Insert { relation, new, lsn }
                        if messages_oids.contains(&relation) && txn.take(lsn) =>
                    {
                        // Keep commit order: what was matched before this goes out first.
                        if !pending.is_empty() {
                            self.deliver(std::mem::take(&mut pending)).await;
                        }
                        if let Some(table) = tables.get(&relation) {
                            broadcast_stored(table, &new, &channels, max_payload_bytes);
                        }
                        self.match_change(
                            &tables,
                            relation,
                            Action::Insert,
                            Some(new),
                            None,
                            (commit_ts, xid),
                            &mut pending,
                        );
                    }
                    Event::Insert { relation, new, lsn } if txn.take(lsn) => self.match_change(
                        &tables,
                        relation,
                        Action::Insert,
                        Some(new),
                        None,
                        (commit_ts, xid),
                        &mut pending,
                    ),
                    Event::Update {
                        relation,
                        old,
                        new,
                        lsn,
                    } if txn.take(lsn) => self.match_change(
                        &tables,
                        relation,
                        Action::Update,
                        Some(new),
                        old,
                        (commit_ts, xid),
                        &mut pending,
                    ),
                    Event::Delete { relation, old, lsn } if txn.take(lsn) => self.match_change(
                        &tables,
                        relation,
                        Action::Delete,
                        None,
                        Some(old),
                        (commit_ts, xid),
                        &mut pending,
                    ),
                    Event::Insert { .. } | Event::Update { .. } | Event::Delete { .. } => {}
                }
            }
            if !pending.is_empty() {
                self.deliver(pending).await;
            }
            if let Some(lsn) = last_commit {
                status.acked.fetch_max(lsn, Ordering::Relaxed);
                // How old the newest delivered commit was when it went out.
                let age = now_since_2000_micros().saturating_sub(commit_ts).max(0) as f64 / 1e6;
                metrics::gauge!(crate::telemetry::REPLICATION_LAG_SECONDS).set(age);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn match_change(
        &self,
        tables: &HashMap<u32, Arc<TableInfo>>,
        relation: u32,
        action: Action,
        new: Option<Tuple>,
        old: Option<OldTuple>,
        (commit_ts, xid): (i64, u32),
        pending: &mut Vec<(Change, Vec<Arc<Sub>>)>,
    ) {
        if !self.registry.watches(relation) {
            return;
        }
        let Some(table) = tables.get(&relation) else {
            tracing::warn!(relation, "change for a relation never described: skipped");
            return;
        };
        let change = Change {
            table: table.clone(),
            action,
            new: new.map(|t| tuple_row(&t)),
            old: old.map(|o| old_row(&o, table)),
            commit_ts,
            xid,
        };
        if change.filter_row().is_none() {
            return;
        }
        // An unchanged TOAST value is the old image's value when the old image carries it.
        let lookup = |col: &str| match table.column_index(col).and_then(|i| change.current_cell(i))
        {
            None | Some(RowCell::Missing) => Cell::Missing,
            Some(RowCell::Null) => Cell::Null,
            Some(cell @ RowCell::Text(_)) => match cell.text() {
                Some(t) => Cell::Value(t),
                None => Cell::Missing,
            },
        };
        let subs = self.registry.matches(relation, action, &lookup);
        if !subs.is_empty() {
            pending.push((change, subs));
        }
    }

    /// Authorizes a batch of matched changes and delivers them in order. Whether a subscriber
    /// gets a change depends on that change and that subscriber only, never on what else is in
    /// the batch: the batch only shares the database round trip.
    async fn deliver(&self, pending: Vec<(Change, Vec<Arc<Sub>>)>) {
        // 1. Each (change, subscriber)'s gate, and the (table, cohort) checks they need.
        let mut bypass: HashMap<String, bool> = HashMap::new();
        for (change, subs) in &pending {
            if needs_row_check(change) {
                for s in subs {
                    let role = &s.cohort.role;
                    if !bypass.contains_key(role) {
                        let b = self.authorizer.bypasses_rls(role).await;
                        bypass.insert(role.clone(), b);
                    }
                }
            }
        }
        let plan = plan_checks(&pending, |role| bypass.get(role).copied().unwrap_or(false));
        let visible = self.authorizer.visible(&plan.requests, &plan.xids).await;

        // 2. Deliver, change by change, one message per channel.
        for ((change, subs), gates) in pending.iter().zip(&plan.gates) {
            let t = &change.table;
            let mut per_channel: HashMap<
                crate::channels::ChannelId,
                (Arc<Target>, Vec<&Arc<Sub>>),
            > = HashMap::new();
            for (s, gate) in subs.iter().zip(gates) {
                let open = match gate {
                    Gate::Open => true,
                    Gate::Withheld => false,
                    Gate::Check(idx, pk) => visible.get(*idx).is_some_and(|v| v.contains(pk)),
                };
                if !open {
                    continue;
                }
                per_channel
                    .entry(s.target.channel)
                    .or_insert_with(|| (s.target.clone(), Vec::new()))
                    .1
                    .push(s);
            }
            let mut data_cache: HashMap<(String, Option<Vec<String>>), Arc<str>> = HashMap::new();
            for (_, (target, subs)) in per_channel {
                let role = subs[0].cohort.role.clone();
                let select: Option<Vec<String>> = if subs.iter().any(|s| s.select.is_none()) {
                    None
                } else {
                    let mut cols: Vec<String> = subs
                        .iter()
                        .flat_map(|s| s.select.as_deref().cloned().unwrap_or_default())
                        .collect();
                    cols.sort();
                    cols.dedup();
                    Some(cols)
                };
                let key = (role.clone(), select.clone());
                let data = match data_cache.get(&key) {
                    Some(d) => d.clone(),
                    None => {
                        let selectable = self.authorizer.selectable(&role, t.oid).await;
                        let d: Arc<str> = Arc::from(payload::build_data(
                            change,
                            &selectable,
                            select.as_deref(),
                            self.max_record_bytes,
                        ));
                        data_cache.insert(key, d.clone());
                        d
                    }
                };
                let mut ids: Vec<u32> = subs.iter().map(|s| s.binding_id).collect();
                ids.sort_unstable();
                ids.dedup();
                let ids_json = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
                let body = format!("{{\"ids\":{ids_json},\"data\":{data}}}");
                let Ok(raw) = RawValue::from_string(body) else {
                    tracing::error!("built an invalid postgres_changes payload; dropped");
                    continue;
                };
                let frame = encode::fastlane(target.vsn, &target.topic, "postgres_changes", &raw);
                if target.outbound.push(frame).is_err() {
                    tracing::debug!(topic = %target.topic, "postgres_changes not queued: socket closing");
                } else {
                    metrics::counter!(crate::telemetry::MESSAGES_OUT, "kind" => "postgres_changes")
                        .increment(1);
                }
            }
            let latency = now_since_2000_micros()
                .saturating_sub(change.commit_ts)
                .max(0) as f64
                / 1e6;
            metrics::histogram!(crate::telemetry::DELIVERY_LATENCY_SECONDS).record(latency);
        }
    }
}

/// What one subscriber's delivery of one change waits on.
#[derive(Debug, PartialEq)]
enum Gate {
    /// No row check: no RLS on the table, a DELETE (sent as its key only), or a role that
    /// bypasses RLS.
    Open,
    /// Visible if request `.0` of the batch answers key `.1`.
    Check(usize, Vec<String>),
    /// Under RLS but the row's key is not in the change: it cannot be checked, so it is not sent.
    Withheld,
}

/// The row checks a batch needs: one request per (table, cohort) with every key asked about,
/// the transactions to wait for, and a gate per (change, subscriber) that names its own key.
struct CheckPlan {
    requests: Vec<RlsRequest>,
    xids: Vec<u32>,
    gates: Vec<Vec<Gate>>,
}

/// Whether a change's subscribers are checked row by row: RLS tables, but not DELETEs (sent as
/// their key only) and not tables without a primary key (they get the original's "no primary
/// key" error payload, which carries no row).
fn needs_row_check(change: &Change) -> bool {
    change.table.rls && change.table.has_pk && change.action != Action::Delete
}

fn plan_checks(pending: &[(Change, Vec<Arc<Sub>>)], bypasses: impl Fn(&str) -> bool) -> CheckPlan {
    let mut need: HashMap<(u32, Arc<Cohort>), usize> = HashMap::new();
    let mut requests: Vec<RlsRequest> = Vec::new();
    let mut xids: Vec<u32> = Vec::new();
    let mut gates = Vec::with_capacity(pending.len());
    for (change, subs) in pending {
        let t = &change.table;
        let checked = needs_row_check(change);
        let pk = if checked { change.pk_values() } else { None };
        let mut withheld = false;
        let change_gates: Vec<Gate> = subs
            .iter()
            .map(|s| {
                if !checked || bypasses(&s.cohort.role) {
                    return Gate::Open;
                }
                let Some(pk) = &pk else {
                    withheld = true;
                    return Gate::Withheld;
                };
                let idx = *need.entry((t.oid, s.cohort.clone())).or_insert_with(|| {
                    requests.push(RlsRequest {
                        table: t.clone(),
                        cohort: s.cohort.clone(),
                        pks: Vec::new(),
                    });
                    requests.len() - 1
                });
                if !requests[idx].pks.contains(pk) {
                    requests[idx].pks.push(pk.clone());
                }
                if !xids.contains(&change.xid) {
                    xids.push(change.xid);
                }
                Gate::Check(idx, pk.clone())
            })
            .collect();
        if withheld {
            metrics::counter!(crate::telemetry::CHANGES_WITHHELD, "reason" => "no_key")
                .increment(1);
            tracing::warn!(
                table = %format!("{}.{}", t.schema, t.name),
                action = change.action.as_str(),
                "change withheld from row-level-security subscribers: its primary key is not in \
                 the change (unchanged out-of-line value and no old key), so it cannot be checked"
            );
        }
        gates.push(change_gates);
    }
    xids.sort_unstable();
    CheckPlan {
        requests,
        xids,
        gates,
    }
}

/// Fans out a row inserted into `realtime.messages` (by `realtime.send`, `send_binary`,
/// `broadcast_changes`, or directly) to the channels of its topic, public or private by the
/// row's `private`, as a user broadcast with `meta: {"id": ...}`.
fn broadcast_stored(
    table: &TableInfo,
    row: &Tuple,
    channels: &crate::channels::Channels,
    max_payload_bytes: usize,
) {
    let text = |name: &str| -> Option<String> {
        let i = table.column_index(name)?;
        match row.get(i)? {
            Datum::Text(b) | Datum::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    };
    if text("extension").as_deref() != Some("broadcast") {
        return;
    }
    let (Some(topic), Some(id)) = (text("topic"), text("id")) else {
        return;
    };
    let event = text("event").unwrap_or_default();
    let private = text("private").as_deref() == Some("t");
    let (encoding, payload) = match (text("payload"), text("binary_payload")) {
        (Some(json), _) => (crate::protocol::Encoding::Json, bytes::Bytes::from(json)),
        (None, Some(hex)) => {
            let Some(bin) = decode_bytea_hex(&hex) else {
                tracing::warn!(%topic, %id, "UnableToBroadcastChanges: binary_payload is not hex bytea");
                return;
            };
            (crate::protocol::Encoding::Binary, bytes::Bytes::from(bin))
        }
        (None, None) => (
            crate::protocol::Encoding::Json,
            bytes::Bytes::from_static(b"{}"),
        ),
    };
    if payload.len() > max_payload_bytes {
        tracing::warn!(%topic, %id, size = payload.len(), "UnableToBroadcastChanges: payload over the size limit, dropped");
        return;
    }
    let key = crate::channels::TopicKey::new(
        &format!("{}{topic}", crate::protocol::TOPIC_PREFIX),
        private,
    );
    let metadata = serde_json::json!({ "id": id }).to_string();
    let fanout = crate::channels::Fanout::new(
        key.topic.clone(),
        crate::channels::FanoutPayload::User(crate::protocol::UserBroadcast {
            event,
            encoding,
            payload,
            metadata: Some(bytes::Bytes::from(metadata)),
        }),
    )
    .with_message_id(id);
    channels.broker.publish(&key, fanout, None);
}

/// `\x0102ff` → bytes.
fn decode_bytea_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Microseconds since 2000-01-01 (PostgreSQL's epoch), now.
fn now_since_2000_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
        - 946_684_800_000_000
}

/// Where the dispatcher is in the transaction stream (see `dispatch`).
#[derive(Default)]
struct TxnState {
    /// The commit LSN of the transaction being received, until its Commit.
    open: Option<u64>,
    /// The last change LSN handled in the open transaction.
    handled_upto: u64,
    /// Changes at or below this LSN were handled before a reconnect.
    skip_upto: u64,
    /// The whole transaction was delivered before.
    skip_all: bool,
}

impl TxnState {
    fn begin(&mut self, final_lsn: u64, delivered_commit_end: u64) {
        self.skip_all = final_lsn < delivered_commit_end;
        self.skip_upto = if self.open == Some(final_lsn) {
            self.handled_upto
        } else {
            0
        };
        if self.skip_all || self.skip_upto > 0 {
            tracing::info!(
                final_lsn,
                skip_all = self.skip_all,
                "transaction streamed again after a reconnect: skipping what was delivered"
            );
        }
        if self.open != Some(final_lsn) {
            self.handled_upto = 0;
        }
        self.open = Some(final_lsn);
    }

    /// Whether a change at `lsn` is new.
    fn take(&mut self, lsn: u64) -> bool {
        if self.skip_all || lsn <= self.skip_upto {
            return false;
        }
        self.handled_upto = self.handled_upto.max(lsn);
        true
    }

    fn commit(&mut self) {
        *self = TxnState::default();
    }
}

fn tuple_row(t: &Tuple) -> Row {
    t.iter().map(datum_cell).collect()
}

fn datum_cell(d: &Datum) -> RowCell {
    match d {
        Datum::Null => RowCell::Null,
        Datum::UnchangedToast => RowCell::Missing,
        Datum::Text(b) | Datum::Binary(b) => RowCell::Text(b.clone()),
    }
}

/// A key-only old row carries NULLs for non-key columns: those are absent, not NULL.
fn old_row(o: &OldTuple, table: &TableInfo) -> Row {
    o.tuple
        .iter()
        .enumerate()
        .map(|(i, d)| match o.kind {
            OldKind::Key if !table.columns.get(i).is_some_and(|c| c.key) => RowCell::Missing,
            _ => datum_cell(d),
        })
        .collect()
}

/// Why a binding could not go live.
enum PrepareError {
    NoTable,
    /// The original's "An exception happened" message, with the database error text.
    Exception(String),
}

impl PrepareError {
    fn raise(msg: String) -> Self {
        PrepareError::Exception(format!("ERROR P0001 (raise_exception) {msg}"))
    }

    fn sql(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => PrepareError::Exception(format!(
                "ERROR {} ({}) {}",
                db.code().code(),
                condition_name(db.code().code()),
                db.message()
            )),
            None => PrepareError::Exception(e.to_string()),
        }
    }

    fn db(e: DbError) -> Self {
        match e {
            DbError::Postgres(e) => Self::sql(e),
            other => PrepareError::Exception(other.to_string()),
        }
    }

    /// The original's message. The echoed parameters and the database's error text (which can
    /// quote the value) are clipped to [`MAX_ECHO_BYTES`] each.
    fn message(&self, b: &BindingSpec) -> String {
        let params = b.params_to_log();
        let params = clip(&params, MAX_ECHO_BYTES);
        match self {
            PrepareError::NoTable => format!(
                "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [{params}]"
            ),
            PrepareError::Exception(e) => format!(
                "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: [{params}]. Exception: {}",
                clip(e, MAX_ECHO_BYTES)
            ),
        }
    }
}

/// PostgreSQL's condition names for the SQLSTATEs a filter can hit.
fn condition_name(code: &str) -> &'static str {
    match code {
        "22P02" => "invalid_text_representation",
        "22003" => "numeric_value_out_of_range",
        "22007" => "invalid_datetime_format",
        "22008" => "datetime_field_overflow",
        "22001" => "string_data_right_truncation",
        "22023" => "invalid_parameter_value",
        "2201B" => "invalid_regular_expression",
        "42704" => "undefined_object",
        "42883" => "undefined_function",
        "42846" => "cannot_coerce",
        "42501" => "insufficient_privilege",
        "P0001" => "raise_exception",
        "0A000" => "feature_not_supported",
        _ => "error",
    }
}

/// Channels whose tokens' claims differ need separate checks; this is the key the dispatcher
/// uses, exposed for tests.
pub fn cohort_key(c: &Cohort) -> (String, String) {
    (c.role.clone(), c.claims.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::outbound::Outbound;
    use crate::channels::ChannelId;
    use crate::protocol::Vsn;
    use crate::replication::values::Conv;
    use bytes::Bytes;

    fn table(oid: u32, rls: bool) -> Arc<TableInfo> {
        let col = |name: &str, pk: bool| catalog::ColumnInfo {
            name: name.into(),
            type_oid: 25,
            typname: "text".into(),
            conv: Conv::Text,
            key: pk,
            pk,
        };
        Arc::new(TableInfo {
            oid,
            schema: "public".into(),
            name: format!("t{oid}"),
            replica_identity: b'd',
            columns: vec![col("id", true), col("body", false)],
            rls,
            has_pk: true,
            pk: vec![("id".into(), "text".into())],
            stored_broadcasts: false,
        })
    }

    fn cohort(role: &str, sub: &str) -> Arc<Cohort> {
        Arc::new(Cohort {
            role: role.into(),
            claims: format!("{{\"sub\":\"{sub}\"}}"),
            sub: sub.into(),
        })
    }

    fn sub(action: Action, cohort: &Arc<Cohort>) -> Arc<Sub> {
        Arc::new(Sub {
            target: Arc::new(Target {
                channel: ChannelId::next(),
                vsn: Vsn::V2,
                topic: Arc::from("realtime:t"),
                outbound: Arc::new(Outbound::new(1 << 20)),
            }),
            binding_id: 1,
            action,
            filters: Vec::new(),
            select: None,
            cohort: cohort.clone(),
        })
    }

    fn text(v: &str) -> RowCell {
        RowCell::Text(Bytes::copy_from_slice(v.as_bytes()))
    }

    fn change(t: &Arc<TableInfo>, action: Action, new: Option<Row>, old: Option<Row>) -> Change {
        Change {
            table: t.clone(),
            action,
            new,
            old,
            commit_ts: 0,
            xid: 7,
        }
    }

    /// Every gate of one change, computed alone and inside a batch with `neighbours`.
    fn alone_and_in_batch(
        target: (Change, Vec<Arc<Sub>>),
        neighbours: Vec<(Change, Vec<Arc<Sub>>)>,
    ) -> (Vec<Gate>, Vec<Gate>) {
        let alone = plan_checks(std::slice::from_ref(&target), |_| false);
        let mut batch = neighbours;
        batch.push(target);
        let mut together = plan_checks(&batch, |_| false);
        let last = together.gates.pop().unwrap_or_default();
        let mut first = alone.gates.into_iter().next().unwrap_or_default();
        // Request indexes differ between the two plans; compare keys and verdict kinds.
        let strip = |g: Gate| match g {
            Gate::Check(_, pk) => Gate::Check(0, pk),
            g => g,
        };
        first = first.into_iter().map(strip).collect();
        (first, last.into_iter().map(strip).collect())
    }

    #[test]
    fn a_delete_is_not_gated_by_the_checks_its_batch_neighbours_need() {
        let t = table(1, true);
        let alice = cohort("authenticated", "a");
        let channel_subs = [sub(Action::Insert, &alice), sub(Action::Delete, &alice)];
        let insert = change(&t, Action::Insert, Some(vec![text("1"), text("x")]), None);
        let update = change(&t, Action::Update, Some(vec![text("3"), text("y")]), None);
        let delete = change(
            &t,
            Action::Delete,
            None,
            Some(vec![text("2"), RowCell::Missing]),
        );
        let (alone, together) = alone_and_in_batch(
            (delete, vec![channel_subs[1].clone()]),
            vec![
                (insert, vec![channel_subs[0].clone()]),
                (update, vec![channel_subs[0].clone()]),
            ],
        );
        assert_eq!(alone, vec![Gate::Open]);
        assert_eq!(together, alone, "a DELETE's fate depends on its neighbours");
    }

    #[test]
    fn each_change_is_checked_by_its_own_key_whatever_shares_the_batch() {
        let t = table(1, true);
        let alice = cohort("authenticated", "a");
        let s = sub(Action::Insert, &alice);
        let mine = change(&t, Action::Insert, Some(vec![text("k1"), text("x")]), None);
        let other = change(&t, Action::Insert, Some(vec![text("k2"), text("y")]), None);
        let (alone, together) =
            alone_and_in_batch((mine, vec![s.clone()]), vec![(other, vec![s.clone()])]);
        assert_eq!(alone, vec![Gate::Check(0, vec!["k1".into()])]);
        assert_eq!(together, alone);
        // The shared request asks about both keys once each.
        let batch = vec![
            (
                change(&t, Action::Insert, Some(vec![text("k1"), text("x")]), None),
                vec![s.clone()],
            ),
            (
                change(&t, Action::Update, Some(vec![text("k2"), text("y")]), None),
                vec![s.clone()],
            ),
            (
                change(&t, Action::Update, Some(vec![text("k1"), text("z")]), None),
                vec![s],
            ),
        ];
        let plan = plan_checks(&batch, |_| false);
        assert_eq!(plan.requests.len(), 1);
        assert_eq!(
            plan.requests[0].pks,
            vec![vec!["k1".to_owned()], vec!["k2".to_owned()]]
        );
        assert_eq!(plan.xids, vec![7]);
    }

    #[test]
    fn an_unchanged_out_of_line_key_is_taken_from_the_old_key_or_withheld() {
        let t = table(1, true);
        let alice = cohort("authenticated", "a");
        let s = sub(Action::Update, &alice);
        // The key is unchanged TOAST in the new row; PostgreSQL logged the old key.
        let with_old_key = change(
            &t,
            Action::Update,
            Some(vec![RowCell::Missing, text("new body")]),
            Some(vec![text("long-key"), RowCell::Missing]),
        );
        let plan = plan_checks(&[(with_old_key, vec![s.clone()])], |_| false);
        assert_eq!(
            plan.gates,
            vec![vec![Gate::Check(0, vec!["long-key".into()])]]
        );
        // No key anywhere: never delivered unchecked, whatever the batch.
        let no_key = || {
            change(
                &t,
                Action::Update,
                Some(vec![RowCell::Missing, text("b")]),
                None,
            )
        };
        let (alone, together) = alone_and_in_batch(
            (no_key(), vec![s.clone()]),
            vec![(
                change(&t, Action::Insert, Some(vec![text("k"), text("b")]), None),
                vec![s.clone()],
            )],
        );
        assert_eq!(alone, vec![Gate::Withheld]);
        assert_eq!(together, alone);
        // Without RLS, or for a role that bypasses it, there is nothing to check.
        let open = table(2, false);
        let plan = plan_checks(
            &[(
                change(
                    &open,
                    Action::Update,
                    Some(vec![RowCell::Missing, text("b")]),
                    None,
                ),
                vec![s.clone()],
            )],
            |_| false,
        );
        assert_eq!(plan.gates, vec![vec![Gate::Open]]);
        let plan = plan_checks(&[(no_key(), vec![s])], |role| role == "authenticated");
        assert_eq!(plan.gates, vec![vec![Gate::Open]]);
    }

    #[test]
    fn a_transaction_streamed_again_is_not_delivered_twice() {
        let mut t = TxnState::default();
        t.begin(100, 50);
        assert!(t.take(60) && t.take(70));
        // The stream broke before the commit; the transaction comes again from its start.
        t.begin(100, 50);
        assert!(!t.take(60) && !t.take(70));
        assert!(t.take(80));
        t.commit();
        // A transaction whose commit precedes what was already delivered is skipped whole.
        t.begin(90, 120);
        assert!(!t.take(95));
        t.commit();
        t.begin(130, 120);
        assert!(t.take(125));
    }
}
