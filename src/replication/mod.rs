//! The change stream: one replication connection per walcast, a durable pgoutput slot, and a
//! bounded queue of decoded events to the dispatcher.
//!
//! Nothing is acknowledged to PostgreSQL before it has been handed on: the dispatcher stores the
//! end LSN of each commit it has delivered in `acked`, and only that LSN is reported as flushed
//! in standby status updates. A restart therefore resumes from the last delivered commit. When
//! the dispatcher cannot keep up, the queue fills and reading from PostgreSQL pauses (the WAL
//! waits in the slot) instead of buffering without limit.
//!
//! The slot's life (create, replace, what it holds back, WAL watch) is in [`slot`]; the wire
//! connection in [`conn`]; decoding in [`pgoutput`] and [`values`]. This file is the stream loop
//! and its status, one cohesive thing (about 610 lines).

pub mod cluster;
pub mod conn;
pub mod pgoutput;
pub mod slot;
pub mod values;

pub use cluster::Published;
pub use slot::{ensure_slot, slot_gap_message, SlotState};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use crate::db::{DbConfig, DbError, Pool, SESSION_GUCS};
use conn::{format_lsn, parse_lsn, ConnError, CopyFrame, ReplicationConn};
use pgoutput::{Datum, Message, OldKind, OldTuple, Relation, Tuple};

/// What the dispatcher receives, in WAL order.
#[derive(Debug)]
pub enum Event {
    Relation(Relation),
    /// `final_lsn` is the transaction's commit LSN; commits stream in this order.
    Begin {
        commit_ts: i64,
        final_lsn: u64,
        xid: u32,
    },
    /// `lsn`: where the change is in the WAL (the same when a transaction is streamed again).
    Insert {
        relation: u32,
        new: Tuple,
        lsn: u64,
    },
    Update {
        relation: u32,
        old: Option<OldTuple>,
        new: Tuple,
        lsn: u64,
    },
    Delete {
        relation: u32,
        old: OldTuple,
        lsn: u64,
    },
    Commit {
        end_lsn: u64,
    },
    /// `pg_logical_emit_message` content.
    Message {
        prefix: String,
        content: bytes::Bytes,
    },
    /// Cluster mode: the events that follow come from this node's own stream of the slot
    /// (`remote: false`) or from the slot holder over NATS (`remote: true`). Broadcasts from
    /// the database are sent on by the node that streams them only (its broker reaches every
    /// node).
    Source {
        remote: bool,
    },
}

/// Replication settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub db: DbConfig,
    pub slot: String,
    pub publication: String,
    /// How often a standby status update is sent even when nothing changed.
    pub status_interval: Duration,
    /// How long changes that waited in the slot are held after start (see `STARTUP_GRACE_MS`
    /// and [`run`]).
    pub startup_grace: Duration,
}

/// What the change stream is doing, for the health endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connecting for the first time since start.
    Starting = 0,
    /// Holding the backlog a restart found in the slot (`STARTUP_GRACE_MS`).
    HoldingBacklog = 1,
    Streaming = 2,
    /// The stream was up (or a connection attempt failed) and is being re-established.
    Reconnecting = 3,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::HoldingBacklog => "holding_backlog",
            Phase::Streaming => "streaming",
            Phase::Reconnecting => "reconnecting",
        }
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::HoldingBacklog,
            2 => Phase::Streaming,
            3 => Phase::Reconnecting,
            _ => Phase::Starting,
        }
    }
}

/// Why changes committed to the database may not have reached a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// walcast was down, and the changes committed meanwhile were streamed (after the startup
    /// grace period) before the channel joined again.
    Restart,
    /// The replication slot was invalidated (`max_slot_wal_keep_size`) or dropped, and recreated:
    /// the changes it had kept are gone for everyone.
    SlotLost,
    /// Cluster mode: messages carrying the change stream from the slot holder to this node were
    /// lost (NATS interrupted, or this node fell behind): changes committed meanwhile may be
    /// missing here.
    ClusterLost,
}

impl GapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Restart => "restart",
            GapReason::SlotLost => "slot_lost",
            GapReason::ClusterLost => "cluster_lost",
        }
    }

    /// Whether the channels subscribed when it happened missed changes (not only those joining
    /// after it), and a catch-up's history cannot cover it.
    pub fn concerns_subscribed(self) -> bool {
        matches!(self, GapReason::SlotLost | GapReason::ClusterLost)
    }
}

/// A gap in the change stream, told to channels in a `system` message.
#[derive(Clone, Debug)]
pub struct Gap {
    /// Counts gaps since start (1, 2, ...), so a channel is told each one once.
    pub id: u64,
    pub reason: GapReason,
    pub message: String,
    /// When it was recorded: joins up to `GAP_NOTICE_MS` later are told.
    pub at: std::time::Instant,
}

/// Shared replication state.
pub struct Status {
    /// End LSN of the last commit fully delivered by the dispatcher.
    pub acked: AtomicU64,
    /// Whether the stream is currently up.
    pub connected: AtomicBool,
    /// The same, for sessions that tell their channels when the stream goes down and comes back.
    updates: watch::Sender<bool>,
    /// The latest gap; sessions follow it to tell the channels subscribed when it happened.
    gap: watch::Sender<Option<Arc<Gap>>>,
    /// WAL position when this process started: changes before it were committed while walcast
    /// was down (0 until known).
    backlog_end: AtomicU64,
    /// How long after a gap joining channels are told about it.
    gap_notice: Duration,
    /// [`Phase`], as a number.
    phase: AtomicU8,
    /// When the backlog hold ends, while it lasts.
    hold_until: Mutex<Option<Instant>>,
    /// Everything in the WAL before this position has been handed to the hubs (or had nothing
    /// for walcast). Published by the stream while it runs.
    position: watch::Sender<u64>,
    /// `replication_ready` joins: tickets handed out, ...
    ready_requested: AtomicU64,
    /// ... the wake-up of the task that serves them ([`serve_readiness`]), ...
    ready_wake: Notify,
    /// ... and the highest ticket whose join point the stream has passed.
    ready_served: watch::Sender<u64>,
    /// How long a `replication_ready` join waits before its channel is shut down.
    pub ready_timeout: Duration,
    /// Cluster mode: who streams the slot, and this node's part (see [`cluster`]).
    pub cluster: cluster::SlotView,
}

impl Status {
    pub fn new(gap_notice: Duration, ready_timeout: Duration) -> Self {
        Self {
            acked: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            updates: watch::channel(false).0,
            gap: watch::channel(None).0,
            backlog_end: AtomicU64::new(0),
            gap_notice,
            phase: AtomicU8::new(Phase::Starting as u8),
            hold_until: Mutex::new(None),
            position: watch::channel(0).0,
            ready_requested: AtomicU64::new(0),
            ready_wake: Notify::new(),
            ready_served: watch::channel(0).0,
            ready_timeout,
            cluster: cluster::SlotView::default(),
        }
    }

    /// Everything in the WAL before this position has been handed to this node's hubs.
    pub fn position(&self) -> u64 {
        *self.position.borrow()
    }

    /// What the stream is doing, and how long the backlog hold still lasts.
    pub fn phase(&self) -> (Phase, Duration) {
        let phase = Phase::from_u8(self.phase.load(Ordering::Relaxed));
        let left = match phase {
            Phase::HoldingBacklog => self
                .hold_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map_or(Duration::ZERO, |t| {
                    t.saturating_duration_since(Instant::now())
                }),
            _ => Duration::ZERO,
        };
        (phase, left)
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// A `replication_ready` join asks to be told once the stream has passed the WAL position
    /// of now; the ticket is served when [`Status::watch_ready`] reaches it.
    pub fn request_ready(&self) -> u64 {
        let ticket = self.ready_requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.ready_wake.notify_one();
        ticket
    }

    /// Follows the highest served `replication_ready` ticket.
    pub fn watch_ready(&self) -> watch::Receiver<u64> {
        self.ready_served.subscribe()
    }

    /// Publishes the stream's position (it only moves forward).
    pub(crate) fn publish_position(&self, lsn: u64) {
        self.position.send_if_modified(|p| {
            if lsn > *p {
                *p = lsn;
                true
            } else {
                false
            }
        });
    }

    /// Records the WAL position at start (see `backlog_end`).
    pub fn set_backlog_end(&self, lsn: u64) {
        self.backlog_end.store(lsn, Ordering::Relaxed);
    }

    /// Records a gap. `reason` decides who is told: a lost slot concerns every channel
    /// subscribed now as well as those joining within `GAP_NOTICE_MS`; a restart only the
    /// channels joining after the backlog started streaming (those subscribed receive it).
    pub fn record_gap(&self, reason: GapReason, message: String) {
        let id = self.gap.borrow().as_ref().map_or(0, |g| g.id) + 1;
        tracing::warn!(reason = reason.as_str(), %message, "gap in the change stream");
        metrics::counter!(crate::telemetry::REPLICATION_GAPS, "reason" => reason.as_str())
            .increment(1);
        self.gap.send_replace(Some(Arc::new(Gap {
            id,
            reason,
            message,
            at: std::time::Instant::now(),
        })));
    }

    /// The gap a channel joining now must be told about, if any.
    pub fn gap_for_join(&self) -> Option<Arc<Gap>> {
        self.gap
            .borrow()
            .as_ref()
            .filter(|g| g.at.elapsed() < self.gap_notice)
            .cloned()
    }

    /// Follows recorded gaps.
    pub fn watch_gaps(&self) -> watch::Receiver<Option<Arc<Gap>>> {
        self.gap.subscribe()
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        self.set_phase(if up {
            Phase::Streaming
        } else {
            Phase::Reconnecting
        });
        // Readiness waits on the position and on the stream being up.
        self.position.send_modify(|_| {});
        self.updates.send_replace(up);
        metrics::gauge!(crate::telemetry::REPLICATION_CONNECTED).set(if up { 1.0 } else { 0.0 });
    }

    /// Follows the stream going down and up.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.updates.subscribe()
    }
}

/// Streams until shutdown, reconnecting with back-off after failures.
///
/// The backlog hold (RELIABILITY.md, "Restarts"): changes committed while walcast was down wait
/// in the slot, and clients reconnecting after a restart (supabase-js retries after 1, 2, 5 s)
/// should be subscribed again before they go out. So when, at start, the slot holds changes for
/// walcast from before the start (`backlog_end`, checked with a peek into the slot), streaming
/// starts `startup_grace` after the start. WAL is streamed in commit order, so changes committed
/// after the start wait behind that backlog, and only as long as it is held. Without such a
/// backlog (a new slot, a clean stop, only other tables' WAL meanwhile) nothing is held.
pub async fn run(
    cfg: Config,
    tx: mpsc::Sender<Event>,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
    mut link: Option<cluster::Link>,
) {
    let backlog_end = status.backlog_end.load(Ordering::Relaxed);
    if backlog_end != 0 && !cfg.startup_grace.is_zero() {
        let until = Instant::now() + cfg.startup_grace;
        *status.hold_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
        status.set_phase(Phase::HoldingBacklog);
        // The peek can take no longer than the hold it may cancel.
        let relevant = match backlog_has_changes(&cfg, backlog_end, until).await {
            Ok(found) => found,
            Err(e) => {
                tracing::info!(error = %e, "could not look into the slot's backlog: holding it");
                true
            }
        };
        if relevant {
            tracing::info!(
                grace_ms = cfg.startup_grace.as_millis() as u64,
                backlog_end = %format_lsn(backlog_end),
                "the slot holds changes committed while walcast was down: holding them for reconnecting clients"
            );
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = shutdown.changed() => return,
            }
        } else {
            tracing::info!(
                "the slot holds no change for walcast from before the start: streaming at once"
            );
        }
        *status.hold_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        status.set_phase(Phase::Starting);
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        // On shutdown the stream confirms what was delivered, then ends.
        let result = stream(&cfg, &tx, &status, &mut shutdown, link.as_mut()).await;
        status.set_connected(false);
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "replication stream failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The `publication_names` option: the configured publication and the one of
/// `realtime.messages`.
fn publication_names(cfg: &Config) -> String {
    format!(
        "{},{}",
        crate::db::quote_ident(&cfg.publication),
        crate::db::quote_ident(crate::db::migrations::MESSAGES_PUBLICATION)
    )
}

/// Whether the slot holds at least one change for walcast before `upto`: a peek (the slot does
/// not move) that stops at the first one, so it is quick when there is a backlog and reads only
/// other tables' WAL when there is none. Bounded by `until` (statement_timeout); retried while
/// the slot is still held by the walsender of a walcast that just died. PostgreSQL before 15
/// sends empty transactions too, so there any transaction counts as a backlog.
async fn backlog_has_changes(cfg: &Config, upto: u64, until: Instant) -> Result<bool, DbError> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match peek_backlog(cfg, upto, left).await {
            Err(e)
                if e.db_error().map(|d| d.code())
                    == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && left > Duration::from_millis(50) =>
            {
                tracing::debug!(
                    "the slot is still in use by a previous walsender; retrying the peek"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            other => return other,
        }
    }
}

async fn peek_backlog(cfg: &Config, upto: u64, within: Duration) -> Result<bool, DbError> {
    let mut pg = cfg.db.pg_config("walcast_backlog_check");
    let options = format!(
        "{} -c statement_timeout={}",
        pg.get_options().unwrap_or_default(),
        within.as_millis().max(1)
    );
    pg.options(options.trim());
    let client = cfg.db.connect_with(&pg, cfg.db.tls_config()?).await?;
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, 1, 'proto_version', '1', 'publication_names', $3)",
            &[&cfg.slot, &format_lsn(upto), &publication_names(cfg)],
        )
        .await;
    drop(client);
    Ok(row?.get::<_, i64>(0) > 0)
}

/// The WAL position flushed now: once the stream has passed it, everything committed before
/// this call has been handed on.
async fn wal_flushed(pool: &Arc<Pool>) -> Result<u64, DbError> {
    let client = pool.get().await?;
    let row = client
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?;
    Ok(parse_lsn(row.get::<_, &str>(0)).unwrap_or(0))
}

/// Serves `replication_ready` joins (see [`Status::request_ready`]) until aborted. One round
/// serves every ticket taken before it started: it reads the WAL position once, waits until the
/// stream runs and has passed it, and serves them all, so a storm of joins costs one query per
/// round, not one each.
pub async fn serve_readiness(pool: Arc<Pool>, status: Arc<Status>) {
    let mut position = status.position.subscribe();
    loop {
        status.ready_wake.notified().await;
        let upto = status.ready_requested.load(Ordering::SeqCst);
        if upto <= *status.ready_served.borrow() {
            continue;
        }
        let mut backoff = Duration::from_millis(100);
        let target = loop {
            match wal_flushed(&pool).await {
                Ok(lsn) => break lsn,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the WAL position for replication_ready; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let passed = position
            .wait_for(|p| *p >= target && status.connected.load(Ordering::Relaxed))
            .await;
        if passed.is_err() {
            return;
        }
        status.ready_served.send_replace(upto);
    }
}

async fn stream(
    cfg: &Config,
    tx: &mpsc::Sender<Event>,
    status: &Status,
    shutdown: &mut watch::Receiver<bool>,
    mut link: Option<&mut cluster::Link>,
) -> Result<(), ConnError> {
    if *shutdown.borrow() {
        return Ok(());
    }
    let mut params: Vec<(&str, &str)> = SESSION_GUCS.to_vec();
    params.push(("client_encoding", "UTF8"));
    let mut conn = ReplicationConn::connect(&cfg.db, "walcast_replication", &params).await?;
    let system = conn.simple_query("IDENTIFY_SYSTEM").await?;
    let xlogpos = system
        .first()
        .and_then(|r| r.get(2).cloned().flatten())
        .unwrap_or_default();
    let slot_state = ensure_slot(&mut conn, &cfg.slot).await?;
    if let Some(message) = slot_gap_message(&slot_state) {
        status.record_gap(GapReason::SlotLost, message);
    }
    let backlog_end = status.backlog_end.load(Ordering::Relaxed);
    let mut backlog_told = status
        .gap
        .borrow()
        .as_ref()
        .is_some_and(|g| g.reason == GapReason::Restart);
    let publications = publication_names(cfg);
    let command = format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'true')",
        crate::db::quote_ident(&cfg.slot),
        quote_literal(&publications),
    );
    // In a cluster the position confirmed may be held back by other nodes: never report less
    // than the slot has already confirmed.
    let confirmed_at_start = if link.is_some() {
        slot_confirmed(&mut conn, &cfg.slot).await?
    } else {
        0
    };
    conn.start_replication(&command).await?;
    if link.is_some() && tx.send(Event::Source { remote: false }).await.is_err() {
        return Ok(());
    }
    status.set_connected(true);
    tracing::info!(slot = %cfg.slot, publication = %cfg.publication, server_lsn = %xlogpos, "replication stream started");

    // Bookkeeping for what may be confirmed: inside a transaction nothing beyond the last
    // acked commit; between transactions, once everything sent is acked, the keepalive's
    // position too (WAL with nothing for us in it).
    let mut received: u64 = 0;
    let mut last_commit_sent: u64 = status.acked.load(Ordering::Relaxed);
    let mut in_txn = false;
    let mut reported: u64 = confirmed_at_start;
    let mut last_published = (0u64, tokio::time::Instant::now());
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = tokio::time::Instant::now();

    loop {
        tokio::select! {
            frame = conn.next_frame() => {
                match frame? {
                    CopyFrame::XLogData { wal_start, wal_end, data } => {
                        let lsn = wal_start;
                        received = received.max(wal_end);
                        let msg = match pgoutput::decode(&data) {
                            Ok(m) => m,
                            Err(e) => {
                                // Never skip data silently: a message we cannot read stops the
                                // stream, and it restarts from the last confirmed commit.
                                return Err(ConnError::Protocol(format!("undecodable pgoutput message: {e}")));
                            }
                        };
                        let event = event_of(msg, lsn);
                        match &event {
                            Some(Event::Begin { .. }) => in_txn = true,
                            Some(Event::Commit { end_lsn }) => {
                                in_txn = false;
                                last_commit_sent = *end_lsn;
                            }
                            _ => {}
                        }
                        if let (Some(link), Some(ev)) = (&mut link, &event) {
                            // The other nodes decode the same bytes (in WAL order, numbered).
                            link.publish_event(ev, lsn, data).await;
                        }
                        if !backlog_told && lsn < backlog_end && matches!(event, Some(Event::Insert { .. } | Event::Update { .. } | Event::Delete { .. })) {
                            // The first change committed while walcast was down goes out now:
                            // channels joining from here on have missed it (and maybe others).
                            backlog_told = true;
                            status.record_gap(
                                GapReason::Restart,
                                format!(
                                    "Changes committed while the server was down (before {}) were delivered before this channel joined; refetch to catch up",
                                    format_lsn(backlog_end)
                                ),
                            );
                        }
                        if let Some(ev) = event {
                            // Backpressure: waits while the dispatcher is behind.
                            if tx.send(ev).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    CopyFrame::Keepalive { wal_end, reply } => {
                        received = received.max(wal_end);
                        status.publish_position(confirmable(status, last_commit_sent, in_txn, received));
                        if reply {
                            let flush = held_for_peers(&link, confirmable(status, last_commit_sent, in_txn, received), reported);
                            conn.send_status(received, flush, false).await?;
                            reported = flush;
                            last_status = tokio::time::Instant::now();
                        }
                    }
                }
            }
            // Shutdown: confirm everything delivered so far, so a restart does not send it again.
            _ = shutdown.changed() => {
                let flush = held_for_peers(&link, confirmable(status, last_commit_sent, in_txn, received), reported);
                conn.send_status(received.max(flush), flush, false).await?;
                tracing::info!(flush = %format_lsn(flush), "replication stream stopped; delivered changes confirmed");
                return Ok(());
            }
            _ = ticker.tick() => {
                let own = confirmable(status, last_commit_sent, in_txn, received);
                status.publish_position(own);
                if let Some(link) = link.as_mut() {
                    // The other nodes' position (and a sign of life, see `Link::liveness`).
                    if own > last_published.0 || last_published.1.elapsed() >= link.liveness {
                        link.publish(Published::Position(own)).await;
                        last_published = (own, tokio::time::Instant::now());
                    }
                }
                let flush = held_for_peers(&link, own, reported);
                metrics::gauge!(crate::telemetry::REPLICATION_LAG_BYTES).set(received.saturating_sub(flush) as f64);
                if flush > reported || last_status.elapsed() >= cfg.status_interval {
                    conn.send_status(received.max(flush), flush, false).await?;
                    tracing::trace!(flush = %format_lsn(flush), "standby status");
                    reported = flush;
                    last_status = tokio::time::Instant::now();
                }
            }
        }
    }
}

/// The dispatcher's event for one decoded pgoutput message found at `lsn` (`None`: nothing for
/// it). The stream and, in a cluster, the nodes that receive the stream from the slot holder
/// both use it.
pub fn event_of(msg: Message, lsn: u64) -> Option<Event> {
    match msg {
        Message::Begin {
            commit_ts,
            final_lsn,
            xid,
        } => Some(Event::Begin {
            commit_ts,
            final_lsn,
            xid,
        }),
        Message::Commit { end_lsn, .. } => Some(Event::Commit { end_lsn }),
        Message::Relation(r) => Some(Event::Relation(r)),
        Message::Insert { relation, new } => Some(Event::Insert { relation, new, lsn }),
        Message::Update { relation, old, new } => Some(Event::Update {
            relation,
            old,
            new,
            lsn,
        }),
        Message::Delete { relation, old } => Some(Event::Delete { relation, old, lsn }),
        Message::Message {
            prefix, content, ..
        } => Some(Event::Message { prefix, content }),
        Message::Truncate { .. } | Message::Type { .. } | Message::Origin { .. } => None,
    }
}

/// In a cluster, what may be confirmed to the slot: no further than every other node that
/// streams changes has delivered (see RELIABILITY.md, "Several nodes"), never below what was
/// reported before.
fn held_for_peers(link: &Option<&mut cluster::Link>, flush: u64, reported: u64) -> u64 {
    match link.as_ref().and_then(|l| l.peers_position()) {
        Some(peers) => flush.min(peers).max(reported),
        None => flush,
    }
}

/// The slot's confirmed position now (0 when unknown).
async fn slot_confirmed(conn: &mut ReplicationConn, slot: &str) -> Result<u64, ConnError> {
    let rows = conn
        .simple_query(&format!(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|s| parse_lsn(&s))
        .unwrap_or(0))
}

fn confirmable(status: &Status, last_commit_sent: u64, in_txn: bool, received: u64) -> u64 {
    let acked = status.acked.load(Ordering::Relaxed);
    if !in_txn && acked >= last_commit_sent {
        acked.max(received)
    } else {
        acked
    }
}

/// The slot's confirmed position, for tests and diagnostics.
pub fn parse_confirmed(s: &str) -> Option<u64> {
    parse_lsn(s)
}

/// Marks non-key columns of a key-only old row as absent rather than NULL.
pub fn old_row_cells(old: &OldTuple, key: &[bool]) -> Vec<Option<Datum>> {
    old.tuple
        .iter()
        .enumerate()
        .map(|(i, d)| match old.kind {
            OldKind::Key if !key.get(i).copied().unwrap_or(false) => None,
            _ => Some(d.clone()),
        })
        .collect()
}
