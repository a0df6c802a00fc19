//! The dispatcher: the task that consumes the replication events. It keeps the transaction
//! state (exactly once across reconnects), gathers events into batches (whole transactions when
//! they fit), turns tuples into rows, matches them against the registry, hands matched changes
//! to [`PgChanges::deliver`](super::deliver) in commit order, routes `realtime.messages` rows to
//! [`db_broadcast`](super::db_broadcast), and acknowledges each delivered commit.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::replication::pgoutput::{Datum, OldKind, OldTuple, Tuple};
use crate::replication::{Event, Status};

use super::binding::Action;
use super::catalog::TableInfo;
use super::db_broadcast::broadcast_stored;
use super::deliver::{now_since_2000_micros, Checked};
use super::payload::{Change, Row, RowCell};
use super::registry::{Cell, Sub};
use super::{history, PgChanges};

/// How many decoded events the dispatcher takes at once before authorizing and delivering.
const MAX_BATCH_EVENTS: usize = 1024;

impl PgChanges {
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
        // Checks of consecutive batches run ahead (`DB_CHECKS_IN_FLIGHT` at once, each on a
        // delivery connection of its own); one task sends their results, and acknowledges
        // commits, strictly in commit order. The queue holds a batch and its acknowledgement
        // per check in flight.
        let in_flight = Arc::new(tokio::sync::Semaphore::new(self.checks_in_flight));
        let (steps, steps_rx) = mpsc::channel::<Step>(2 * self.checks_in_flight);
        let sender = tokio::spawn(self.clone().send_in_order(
            steps_rx,
            status.clone(),
            channels,
            max_payload_bytes,
        ));
        // The end LSN of the last commit handed to the sender: it will be delivered.
        let mut dispatched: u64 = 0;
        // Cluster mode: the events come from the slot holder over NATS (see `Event::Source`).
        let mut remote = false;
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
            // Catch-ups run between batches (see `history`).
            let _turn = self.history.turn().await;
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
                        // Remembered verdicts name rows by key: a new key is a new naming.
                        if tables.get(&rel.oid).is_some_and(|old| old.pk != info.pk) {
                            self.visibility.forget_table(rel.oid);
                        }
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
                            .max(dispatched)
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
                    Event::Source { remote: r } => remote = r,
                    Event::Insert { relation, new, lsn }
                        if messages_oids.contains(&relation) && txn.take(lsn) =>
                    {
                        // Keep commit order: what was matched before this goes out first.
                        if !pending.is_empty() {
                            let batch = std::mem::take(&mut pending);
                            if !self.submit(&steps, &in_flight, batch).await {
                                return;
                            }
                        }
                        // In a cluster only the node streaming the slot sends it on: its
                        // broker reaches every node.
                        if let Some(table) = tables.get(&relation).filter(|_| !remote) {
                            if steps
                                .send(Step::Stored(table.clone(), new.clone()))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        self.match_change(
                            &tables,
                            relation,
                            Action::Insert,
                            Some(new),
                            None,
                            (commit_ts, xid, txn.point()),
                            &mut pending,
                        );
                    }
                    Event::Insert { relation, new, lsn } if txn.take(lsn) => self.match_change(
                        &tables,
                        relation,
                        Action::Insert,
                        Some(new),
                        None,
                        (commit_ts, xid, txn.point()),
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
                        (commit_ts, xid, txn.point()),
                        &mut pending,
                    ),
                    Event::Delete { relation, old, lsn } if txn.take(lsn) => self.match_change(
                        &tables,
                        relation,
                        Action::Delete,
                        None,
                        Some(old),
                        (commit_ts, xid, txn.point()),
                        &mut pending,
                    ),
                    Event::Insert { .. } | Event::Update { .. } | Event::Delete { .. } => {}
                }
            }
            if !pending.is_empty() && !self.submit(&steps, &in_flight, pending).await {
                return;
            }
            if let Some(lsn) = last_commit {
                dispatched = dispatched.max(lsn);
                if steps.send(Step::Ack { lsn, commit_ts }).await.is_err() {
                    return;
                }
            }
            // Catch-up positions count what the sender has pushed, not what was matched.
            if self.history.enabled()
                && steps
                    .send(Step::Delivered(self.history.recorded()))
                    .await
                    .is_err()
            {
                return;
            }
        }
        // Everything handed over is sent before the dispatcher ends.
        drop(steps);
        if let Err(e) = sender.await {
            tracing::error!(error = %e, "postgres_changes sender ended abnormally");
        }
    }

    /// Starts a batch's row checks and queues it for sending; false when the sender is gone.
    async fn submit(
        self: &Arc<Self>,
        steps: &mpsc::Sender<Step>,
        in_flight: &Arc<tokio::sync::Semaphore>,
        batch: Pending,
    ) -> bool {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return false;
        };
        let me = self.clone();
        let checked = tokio::spawn(async move {
            let checked = me.check(batch).await;
            drop(permit);
            checked
        });
        // Recorded in the catch-up history up to here (this batch's changes included): counted
        // as delivered right after the batch is pushed.
        let upto = self.history.recorded();
        steps.send(Step::Changes(checked, upto)).await.is_ok()
    }

    /// Sends checked batches, stored broadcasts and acknowledgements in the order the
    /// dispatcher queued them (commit order), whatever order their checks finish in.
    async fn send_in_order(
        self: Arc<Self>,
        mut steps: mpsc::Receiver<Step>,
        status: Arc<Status>,
        channels: crate::channels::Channels,
        max_payload_bytes: usize,
    ) {
        while let Some(step) = steps.recv().await {
            match step {
                Step::Changes(checked, upto) => match checked.await {
                    Ok(checked) => {
                        self.send(checked, true).await;
                        // At once: a client that read these and spoke again must not have its
                        // catch-up position fall before them (it would get them twice).
                        self.history.mark_delivered(upto);
                    }
                    Err(e) => {
                        // Not sent: the check panicked, so nothing is known about who may see it.
                        tracing::error!(error = %e, "row check of a batch failed; batch withheld");
                        metrics::counter!(crate::telemetry::CHANGES_WITHHELD, "reason" => "policy_error")
                            .increment(1);
                    }
                },
                Step::Stored(table, row) => {
                    broadcast_stored(&table, &row, &channels, max_payload_bytes);
                }
                Step::Delivered(upto) => self.history.mark_delivered(upto),
                Step::Ack { lsn, commit_ts } => {
                    status.acked.fetch_max(lsn, Ordering::Relaxed);
                    // How old the newest delivered commit was when it went out.
                    let age = now_since_2000_micros().saturating_sub(commit_ts).max(0) as f64 / 1e6;
                    metrics::gauge!(crate::telemetry::REPLICATION_LAG_SECONDS).set(age);
                }
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
        (commit_ts, xid, point): (i64, u32, history::Point),
        pending: &mut Vec<(Change, Vec<Arc<Sub>>)>,
    ) {
        let record = self.history.enabled();
        if !record && !self.registry.watches(relation) {
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
            left_view: false,
            // The transaction's commit LSN (the same on every node of a cluster).
            commit_lsn: point.0,
        };
        if change.filter_row().is_none() {
            return;
        }
        if record {
            self.history.record(relation, &change, point);
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
        // Under RLS, an INSERT or UPDATE is also checked for the cohorts that take DELETEs
        // (remembered for the row's DELETE and for leaves).
        let and_deletes = table.rls && table.has_pk && action != Action::Delete;
        let subs = self
            .registry
            .matches(relation, action, and_deletes, &lookup);
        if !subs.is_empty() {
            pending.push((change, subs));
        }
    }
}

type Pending = Vec<(Change, Vec<Arc<Sub>>)>;

/// What the sender does next, in commit order.
enum Step {
    /// A batch of matched changes, its row checks running (or done), and the catch-up history
    /// position it completes.
    Changes(tokio::task::JoinHandle<Checked>, u64),
    /// A row of `realtime.messages` to broadcast.
    Stored(Arc<TableInfo>, Tuple),
    /// Every commit up to this one is delivered: the slot may advance.
    Ack { lsn: u64, commit_ts: i64 },
    /// Every change recorded in the catch-up history up to this position has been handed over.
    Delivered(u64),
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

    /// Where the change just taken stands in the stream, the same on every node of a cluster.
    fn point(&self) -> history::Point {
        (self.open.unwrap_or(0), self.handled_upto)
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

#[cfg(test)]
mod tests {
    use super::*;

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
