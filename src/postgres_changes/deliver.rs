//! Delivery of a batch of matched changes: the row checks it needs (one request per table and
//! claims cohort, each change gated by its own key), the payload built once per audience, one
//! message per channel, in commit order.
//!
//! Rows under row level security: the verdicts of each INSERT/UPDATE's row checks are
//! remembered per cohort ([`super::visibility`]) when its changes are sent, in commit order. A
//! DELETE goes to the cohorts allowed at the row's last change; a cohort not known there is
//! decided from the old row's values when the table has `REPLICA IDENTITY FULL` (its SELECT
//! policies evaluated on them, under that cohort's role and claims), and by
//! `DELETE_VISIBILITY` otherwise. An UPDATE that a cohort was allowed to see at the row's
//! previous change but not now is a leave for its subscribers that asked for them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::config::DeleteVisibility;
use crate::protocol::encode;

use super::authorize::{OldRowRequest, RlsRequest};
use super::binding::Action;
use super::payload::{self, Change, RowCell};
use super::registry::{Cohort, Sub, Target};
use super::visibility::{Known, Verdicts};
use super::PgChanges;

impl PgChanges {
    /// Delivery of a batch of matched changes is [`PgChanges::check`] then [`PgChanges::send`].
    /// Whether a subscriber gets a change depends on that change and that subscriber only
    /// (and, for a DELETE or a leave under row level security, the row's earlier changes),
    /// never on what else is in the batch: the batch only shares the database round trip.
    ///
    /// Step 1 of delivery: each (change, subscriber)'s gate and the row checks they need,
    /// answered. Checks of consecutive batches may run at the same time (on the delivery
    /// pool's connections); [`PgChanges::send`] then takes their results in commit order.
    pub(super) async fn check(&self, pending: Vec<(Change, Vec<Arc<Sub>>)>) -> Checked {
        let mut bypass: HashMap<String, bool> = HashMap::new();
        for (change, subs) in &pending {
            if needs_row_check(change) || tracks_deletes(change) {
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
        // The replica that answers must have replayed every commit of the batch.
        let commit_lsn = pending.iter().map(|(c, _)| c.commit_lsn).max().unwrap_or(0);
        let visible = self
            .authorizer
            .visible(&plan.requests, &plan.xids, commit_lsn)
            .await;
        let exact = self
            .authorizer
            .visible_old_rows(&plan.old_rows, &plan.xids)
            .await;
        // Where the WAL stood once the row checks had ended: a later DELETE of a row committed
        // before this may have been what a check saw (see `Verdicts`).
        let checked_upto = if plan.requests.is_empty() {
            0
        } else {
            self.wal_position().await.unwrap_or(u64::MAX)
        };
        Checked {
            pending,
            gates: plan.gates,
            visible,
            exact,
            checked_upto,
        }
    }

    /// The primary's WAL insert position now (`None` if it cannot be read: then every denial
    /// of the batch counts as unknown for later DELETEs).
    async fn wal_position(&self) -> Option<u64> {
        let client = self.delivery.get().await.ok()?;
        let row = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .ok()?;
        crate::replication::conn::parse_lsn(row.try_get::<_, &str>(0).ok()?)
    }

    /// Step 2 of delivery: change by change, one message per channel, to the subscribers
    /// whose gate is open. `live`: the changes come from the stream, in commit order, and
    /// their verdicts are remembered; a catch-up replay (`false`) only reads what is known.
    pub(super) async fn send(&self, checked: Checked, live: bool) {
        let Checked {
            pending,
            gates,
            visible,
            exact,
            checked_upto,
        } = checked;
        for ((change, subs), gates) in pending.iter().zip(&gates) {
            let t = &change.table;
            let tracked = t.rls && t.has_pk;
            let is_open = |gate: &Gate| match gate {
                Gate::Open => true,
                Gate::Withheld | Gate::Delete { .. } => false,
                Gate::Check(idx, pk) => visible.get(*idx).is_some_and(|v| v.contains(pk)),
            };
            // Leaves of this change: (subscriber, the key it knew the row by).
            let mut leaves: Vec<&Arc<Sub>> = Vec::new();
            let mut leave_key: Option<Vec<String>> = None;
            // Per subscriber: delivered or not.
            let mut open: Vec<bool> = Vec::with_capacity(subs.len());
            if tracked && change.action != Action::Delete {
                // What was known before this change (for leaves), then this change's verdicts.
                let key = change.pk_values();
                let old_key = change.old_pk_values().filter(|k| Some(k) != key.as_ref());
                let before = if live {
                    match (&old_key, &key) {
                        (Some(old), _) => {
                            leave_key = Some(old.clone());
                            self.visibility.take(t.oid, old)
                        }
                        // (Read only when someone asked for leaves.)
                        (None, Some(k)) if subs.iter().any(|s| s.leaves) => {
                            leave_key = Some(k.clone());
                            self.visibility.get(t.oid, k)
                        }
                        (None, _) => None,
                    }
                } else {
                    None
                };
                let mut verdicts = Verdicts::new().checked_upto(change.xid, checked_upto);
                for (s, gate) in subs.iter().zip(gates) {
                    let o = is_open(gate);
                    if let Gate::Check(..) = gate {
                        verdicts.set(s.cohort.key, o);
                        if !o
                            && s.leaves
                            && before
                                .as_ref()
                                .is_some_and(|b| b.get(s.cohort.key) == Known::Allowed)
                        {
                            leaves.push(s);
                        }
                    }
                    open.push(o && s.action.admits(change.action));
                }
                if live {
                    if let Some(k) = key {
                        if verdicts.is_empty() {
                            self.visibility.take(t.oid, &k);
                        } else {
                            self.visibility.record(t.oid, k, verdicts);
                        }
                    }
                }
            } else if tracked {
                // A DELETE: the row's last verdicts, read once (and forgotten, live).
                let key = change.old_pk_values();
                let known = key.as_ref().and_then(|k| {
                    if live {
                        self.visibility.take(t.oid, k)
                    } else {
                        self.visibility.get(t.oid, k)
                    }
                });
                for (s, gate) in subs.iter().zip(gates) {
                    let o = match gate {
                        Gate::Delete { exact: Some(idx) }
                            if exact.get(*idx).is_some_and(Option::is_some) =>
                        {
                            let o = key.as_ref().is_some_and(|k| {
                                exact
                                    .get(*idx)
                                    .and_then(Option::as_ref)
                                    .is_some_and(|v| v.contains(k))
                            });
                            delete_decision("exact", o)
                        }
                        Gate::Delete { .. } => {
                            match known.as_ref().map_or(Known::Unknown, |v| {
                                v.for_delete(s.cohort.key, change.xid, change.commit_lsn)
                            }) {
                                Known::Allowed => delete_decision("memory", true),
                                Known::Denied => delete_decision("memory", false),
                                Known::Unknown => delete_decision(
                                    "rule",
                                    self.delete_visibility == DeleteVisibility::Original,
                                ),
                            }
                        }
                        g => is_open(g),
                    };
                    open.push(o);
                }
            } else {
                open.extend(gates.iter().map(is_open));
            }

            let mut per_channel: HashMap<
                crate::channels::ChannelId,
                (Arc<Target>, Vec<&Arc<Sub>>),
            > = HashMap::new();
            for (s, o) in subs.iter().zip(&open) {
                if !o {
                    continue;
                }
                per_channel
                    .entry(s.target.channel)
                    .or_insert_with(|| (s.target.clone(), Vec::new()))
                    .1
                    .push(s);
            }
            self.push_per_channel(change, per_channel).await;

            if !leaves.is_empty() {
                if let Some(key) = &leave_key {
                    let leave = leave_change(change, key);
                    let mut per_channel: HashMap<
                        crate::channels::ChannelId,
                        (Arc<Target>, Vec<&Arc<Sub>>),
                    > = HashMap::new();
                    for s in leaves {
                        per_channel
                            .entry(s.target.channel)
                            .or_insert_with(|| (s.target.clone(), Vec::new()))
                            .1
                            .push(s);
                    }
                    let n = per_channel.len() as u64;
                    self.push_per_channel(&leave, per_channel).await;
                    metrics::counter!(crate::telemetry::LEAVE_EVENTS).increment(n);
                }
            }
            let latency = now_since_2000_micros()
                .saturating_sub(change.commit_ts)
                .max(0) as f64
                / 1e6;
            metrics::histogram!(crate::telemetry::DELIVERY_LATENCY_SECONDS).record(latency);
        }
    }

    /// One message per channel: the payload built once per (role, select), the channel's
    /// binding ids in `ids`.
    async fn push_per_channel(
        &self,
        change: &Change,
        per_channel: HashMap<crate::channels::ChannelId, (Arc<Target>, Vec<&Arc<Sub>>)>,
    ) {
        let t = &change.table;
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
    }
}

/// Counts one subscriber's DELETE decision and returns it.
fn delete_decision(by: &'static str, sent: bool) -> bool {
    let result = if sent { "sent" } else { "withheld" };
    metrics::counter!(crate::telemetry::RLS_DELETE_DECISIONS, "by" => by, "result" => result)
        .increment(1);
    sent
}

/// The leave of an UPDATE: a DELETE of the row's key as the subscriber knew it, marked
/// `left_view` (see `payload::build_data`).
fn leave_change(change: &Change, key: &[String]) -> Change {
    let t = &change.table;
    let mut old: Vec<RowCell> = vec![RowCell::Missing; t.columns.len()];
    for ((name, _), value) in t.pk.iter().zip(key) {
        if let Some(i) = t.column_index(name) {
            old[i] = RowCell::Text(bytes::Bytes::copy_from_slice(value.as_bytes()));
        }
    }
    Change {
        table: t.clone(),
        action: Action::Delete,
        new: None,
        old: Some(old),
        commit_ts: change.commit_ts,
        xid: change.xid,
        left_view: true,
        commit_lsn: change.commit_lsn,
    }
}

/// A batch whose row checks are answered, waiting for its turn to be sent.
pub(super) struct Checked {
    pending: Vec<(Change, Vec<Arc<Sub>>)>,
    gates: Vec<Vec<Gate>>,
    visible: Vec<HashSet<Vec<String>>>,
    /// Answers of the old-row requests (DELETEs of `REPLICA IDENTITY FULL` tables); `None`
    /// for a request the old rows could not answer (then as without them).
    exact: Vec<Option<HashSet<Vec<String>>>>,
    /// A WAL position at or past the end of the row checks (0: none ran).
    checked_upto: u64,
}

/// What one subscriber's delivery of one change waits on.
#[derive(Debug, PartialEq)]
enum Gate {
    /// No row check: no RLS on the table, or a role that bypasses it.
    Open,
    /// Visible if request `.0` of the batch answers key `.1`.
    Check(usize, Vec<String>),
    /// Under RLS but the row's key is not in the change: it cannot be checked, so it is not sent.
    Withheld,
    /// A DELETE under RLS, decided when it is sent: by old-row request `exact` when there is
    /// one and it could be answered, else by what is remembered of the row's last change, else
    /// by `DELETE_VISIBILITY`.
    Delete { exact: Option<usize> },
}

/// The row checks a batch needs: one request per (table, cohort) with every key asked about,
/// the transactions to wait for, and a gate per (change, subscriber) that names its own key.
struct CheckPlan {
    requests: Vec<RlsRequest>,
    old_rows: Vec<OldRowRequest>,
    xids: Vec<u32>,
    gates: Vec<Vec<Gate>>,
}

/// Whether a change's subscribers are checked row by row: INSERTs and UPDATEs of RLS tables,
/// but not tables without a primary key (they get the original's "no primary key" error
/// payload, which carries no row).
fn needs_row_check(change: &Change) -> bool {
    change.table.rls && change.table.has_pk && change.action != Action::Delete
}

/// Whether a change is a DELETE under RLS, decided per subscriber (see [`Gate::Delete`]).
fn tracks_deletes(change: &Change) -> bool {
    change.table.rls && change.table.has_pk && change.action == Action::Delete
}

fn plan_checks(pending: &[(Change, Vec<Arc<Sub>>)], bypasses: impl Fn(&str) -> bool) -> CheckPlan {
    let mut need: HashMap<(u32, Arc<Cohort>), usize> = HashMap::new();
    let mut requests: Vec<RlsRequest> = Vec::new();
    let mut need_old: HashMap<(u32, Arc<Cohort>), usize> = HashMap::new();
    let mut old_rows: Vec<OldRowRequest> = Vec::new();
    let mut xids: Vec<u32> = Vec::new();
    let mut gates = Vec::with_capacity(pending.len());
    for (change, subs) in pending {
        let t = &change.table;
        if tracks_deletes(change) {
            // The old row decides exactly when it is whole (REPLICA IDENTITY FULL).
            let old = change
                .old_pk_values()
                .zip(change.old_row_texts())
                .filter(|_| t.replica_identity == b'f');
            let change_gates = subs
                .iter()
                .map(|s| {
                    if bypasses(&s.cohort.role) {
                        return Gate::Open;
                    }
                    let Some((pk, json)) = &old else {
                        return Gate::Delete { exact: None };
                    };
                    let idx = *need_old
                        .entry((t.oid, s.cohort.clone()))
                        .or_insert_with(|| {
                            old_rows.push(OldRowRequest {
                                table: t.clone(),
                                cohort: s.cohort.clone(),
                                rows: Vec::new(),
                            });
                            old_rows.len() - 1
                        });
                    if !old_rows[idx].rows.iter().any(|(k, _)| k == pk) {
                        old_rows[idx].rows.push((pk.clone(), json.clone()));
                    }
                    if !xids.contains(&change.xid) {
                        xids.push(change.xid);
                    }
                    Gate::Delete { exact: Some(idx) }
                })
                .collect();
            gates.push(change_gates);
            continue;
        }
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
        old_rows,
        xids,
        gates,
    }
}

/// Microseconds since 2000-01-01 (PostgreSQL's epoch), now.
pub(super) fn now_since_2000_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
        - 946_684_800_000_000
}

#[cfg(test)]
mod tests {
    use super::super::catalog::{self, TableInfo};
    use super::super::payload::{Row, RowCell};
    use super::*;
    use crate::channels::outbound::Outbound;
    use crate::channels::ChannelId;
    use crate::protocol::Vsn;
    use crate::replication::values::Conv;
    use bytes::Bytes;

    fn table(oid: u32, rls: bool) -> Arc<TableInfo> {
        table_with(oid, rls, b'd')
    }

    fn table_with(oid: u32, rls: bool, replica_identity: u8) -> Arc<TableInfo> {
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
            replica_identity,
            columns: vec![col("id", true), col("body", false)],
            rls,
            has_pk: true,
            pk: vec![("id".into(), "text".into())],
            stored_broadcasts: false,
        })
    }

    fn cohort(role: &str, sub: &str) -> Arc<Cohort> {
        Arc::new(Cohort::new(
            role.into(),
            format!("{{\"sub\":\"{sub}\"}}"),
            sub.into(),
        ))
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
            leaves: false,
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
            left_view: false,
            commit_lsn: 0,
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
        assert_eq!(alone, vec![Gate::Delete { exact: None }]);
        assert_eq!(together, alone, "a DELETE's fate depends on its neighbours");
    }

    #[test]
    fn a_delete_under_rls_is_decided_from_its_old_row_only_when_the_row_is_whole() {
        let alice = cohort("authenticated", "a");
        let s = sub(Action::Delete, &alice);
        let full = table_with(3, true, b'f');
        let whole = change(
            &full,
            Action::Delete,
            None,
            Some(vec![text("9"), text("x")]),
        );
        let plan = plan_checks(&[(whole, vec![s.clone()])], |_| false);
        assert_eq!(plan.gates, vec![vec![Gate::Delete { exact: Some(0) }]]);
        assert_eq!(plan.old_rows.len(), 1);
        assert_eq!(plan.old_rows[0].rows[0].0, vec!["9".to_owned()]);
        assert!(
            plan.requests.is_empty(),
            "no key lookup for a row that is gone"
        );
        // A value missing from the old row (key-only identity): the memory and the rule decide.
        let partial = change(
            &full,
            Action::Delete,
            None,
            Some(vec![text("9"), RowCell::Missing]),
        );
        let plan = plan_checks(&[(partial, vec![s.clone()])], |_| false);
        assert_eq!(plan.gates, vec![vec![Gate::Delete { exact: None }]]);
        assert!(plan.old_rows.is_empty());
        // A role that bypasses RLS gets it; a table without RLS is not decided at all.
        let whole = change(
            &full,
            Action::Delete,
            None,
            Some(vec![text("9"), text("x")]),
        );
        let plan = plan_checks(&[(whole, vec![s.clone()])], |_| true);
        assert_eq!(plan.gates, vec![vec![Gate::Open]]);
        let open = table(4, false);
        let d = change(
            &open,
            Action::Delete,
            None,
            Some(vec![text("9"), text("x")]),
        );
        let plan = plan_checks(&[(d, vec![s])], |_| false);
        assert_eq!(plan.gates, vec![vec![Gate::Open]]);
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
}
