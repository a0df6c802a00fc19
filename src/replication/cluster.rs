//! The change stream in cluster mode: exactly one node streams the slot, every node delivers.
//!
//! - Election: every node holds a connection of its own to PostgreSQL and tries
//!   `pg_try_advisory_lock(<key of the slot name>)` every [`ELECTION_INTERVAL`]. The node that
//!   holds the lock streams the slot ([`super::run`]); the others never open it. PostgreSQL
//!   frees the lock when the holder's connection ends (a crash, `kill -9`), and another node
//!   takes over at its next try. Even if two nodes believed they held it, PostgreSQL lets one
//!   walsender at a time use a slot.
//! - Distribution: the holder publishes every pgoutput message it hands its own dispatcher, raw
//!   and numbered, to the other nodes ([`Link`]), with the Relation message of each table a
//!   transaction touches (so a node that joined late can read it), and its position now and
//!   then. The others decode them and feed their own dispatcher ([`Follower`]): filtering, row
//!   checks and delivery happen on the node that holds the subscriber.
//! - Exactness: each node reports in its heartbeat how far it has delivered; the holder confirms
//!   to the slot no further than the lowest report of a live node ([`Link::peers_position`]).
//!   After a takeover the new holder streams from the slot's confirmed position, and each node's
//!   dispatcher skips the commits it had delivered. A node that sees a hole in the numbering
//!   tells its channels (a `cluster_lost` gap) instead of staying silent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{Event, GapReason, Status};
use crate::telemetry;

/// How often a node that does not stream the slot tries to take it, and how often the holder
/// checks that its lock connection is alive.
pub const ELECTION_INTERVAL: Duration = Duration::from_millis(500);

/// The largest pgoutput message a node reassembles from chunks (more is a gap).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// How long the holder waits for room in the publish queue before publishing without waiting
/// (dropping what does not fit: the others see the hole in the numbering).
const PUBLISH_WAIT: Duration = Duration::from_secs(1);

/// What the slot holder publishes to the other nodes, in order.
#[derive(Debug)]
pub enum Published {
    /// One pgoutput message found at `lsn`.
    Wal { lsn: u64, data: Bytes },
    /// Everything before this position has been published.
    Position(u64),
}

/// What this node receives from the holder (in the holder's order), or a notice that some may
/// have been lost.
#[derive(Debug)]
pub enum FromCluster {
    Message {
        /// The holder's process id among the nodes.
        origin: u64,
        seq: u64,
        node: Option<String>,
        kind: Received,
    },
    /// The connection to the other nodes was interrupted or fell behind.
    Lost,
}

#[derive(Debug)]
pub enum Received {
    /// A pgoutput message, or a chunk of one (`more`: further chunks follow).
    Wal {
        lsn: u64,
        data: Bytes,
        more: bool,
    },
    Position(u64),
}

/// This node's part in streaming the slot, for health and metrics.
#[derive(Default)]
pub struct SlotView {
    /// 0: not in a cluster, 1: holder, 2: follower.
    role: AtomicU8,
    holder: Mutex<Option<String>>,
    last_lsn: AtomicU64,
}

impl SlotView {
    pub fn role(&self) -> Option<&'static str> {
        match self.role.load(Ordering::Relaxed) {
            1 => Some("holder"),
            2 => Some("follower"),
            _ => None,
        }
    }

    /// The node that streams the slot, as far as this node knows.
    pub fn holder(&self) -> Option<String> {
        self.holder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The WAL position of the last change message streamed or received.
    pub fn last_lsn(&self) -> u64 {
        self.last_lsn.load(Ordering::Relaxed)
    }

    fn set(&self, holder: bool, name: Option<String>) {
        self.role
            .store(if holder { 1 } else { 2 }, Ordering::Relaxed);
        metrics::gauge!(telemetry::SLOT_HOLDER).set(if holder { 1.0 } else { 0.0 });
        *self.holder.lock().unwrap_or_else(|p| p.into_inner()) = name;
    }

    fn saw(&self, lsn: u64) {
        self.last_lsn.fetch_max(lsn, Ordering::Relaxed);
    }
}

/// The lowest delivered position reported by the other live nodes (`None`: no other node).
pub type PeersPosition = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// The holder's side: publishes what it streams, and knows how far the others are.
#[derive(Clone)]
pub struct Link {
    tap: mpsc::Sender<Published>,
    peers: PeersPosition,
    status: Arc<Status>,
    /// The publish queue stayed full for `PUBLISH_WAIT`: publish without waiting until it
    /// takes a message again.
    stuck: bool,
    /// The last Relation message of each table, and the tables whose Relation went out in the
    /// current transaction.
    relations: HashMap<u32, Bytes>,
    sent_in_txn: HashSet<u32>,
    /// How often the holder's position goes out even when it did not move: the others'
    /// sign that it is alive (well within their node timeout).
    pub(super) liveness: Duration,
}

impl Link {
    pub fn new(
        tap: mpsc::Sender<Published>,
        peers: PeersPosition,
        status: Arc<Status>,
        node_timeout: Duration,
    ) -> Self {
        Self {
            liveness: (node_timeout / 3).min(Duration::from_secs(1)),
            tap,
            peers,
            status,
            stuck: false,
            relations: HashMap::new(),
            sent_in_txn: HashSet::new(),
        }
    }

    pub(super) fn peers_position(&self) -> Option<u64> {
        (self.peers)()
    }

    /// Publishes one pgoutput message (the stream decoded it into `event`), preceded by the
    /// Relation of its table when this transaction has not carried it yet.
    pub(super) async fn publish_event(&mut self, event: &Event, lsn: u64, data: Bytes) {
        match event {
            Event::Begin { .. } => self.sent_in_txn.clear(),
            Event::Relation(r) => {
                self.relations.insert(r.oid, data.clone());
                self.sent_in_txn.insert(r.oid);
            }
            Event::Insert { relation, .. }
            | Event::Update { relation, .. }
            | Event::Delete { relation, .. }
                if self.sent_in_txn.insert(*relation) =>
            {
                if let Some(rel) = self.relations.get(relation).cloned() {
                    self.publish(Published::Wal { lsn, data: rel }).await;
                }
            }
            _ => {}
        }
        self.status.cluster.saw(lsn);
        self.publish(Published::Wal { lsn, data }).await;
    }

    pub(super) async fn publish(&mut self, p: Published) {
        if self.stuck {
            match self.tap.try_send(p) {
                Ok(()) => self.stuck = false,
                Err(_) => dropped(),
            }
            return;
        }
        match tokio::time::timeout(PUBLISH_WAIT, self.tap.send(p)).await {
            Ok(_) => {}
            Err(_) => {
                self.stuck = true;
                tracing::warn!("cluster: the change stream's publish queue stayed full (NATS stuck?): publishing without waiting; other nodes may miss changes and will say so");
                dropped();
            }
        }
    }
}

fn dropped() {
    metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "changes_queue_full").increment(1);
}

/// The 64-bit advisory lock key of a slot.
pub fn lock_key(slot: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("walcast slot {slot}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(b)
}

/// What the election task needs.
pub struct Election {
    pub cfg: super::Config,
    /// This node's name.
    pub node: String,
    pub link: Link,
    pub incoming: mpsc::Receiver<FromCluster>,
    /// A holder not heard from for this long is gone (`CLUSTER_NODE_TIMEOUT_MS`).
    pub node_timeout: Duration,
}

/// Runs until shutdown: follows the holder, and streams the slot while this node holds the
/// lock.
pub async fn run(
    election: Election,
    tx: mpsc::Sender<Event>,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Election {
        cfg,
        node,
        link,
        mut incoming,
        node_timeout,
    } = election;
    let key = lock_key(&cfg.slot);
    let mut lock: Option<tokio_postgres::Client> = None;
    let mut follower = Follower::new(node_timeout);
    let mut tick = tokio::time::interval(ELECTION_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status.cluster.set(false, None);
    loop {
        // Following.
        loop {
            tokio::select! {
                _ = down(&mut shutdown) => return,
                m = incoming.recv() => match m {
                    Some(m) => follower.on(m, &tx, &status).await,
                    None => return,
                },
                _ = tick.tick() => {
                    follower.tick(&status);
                    match try_lock(&cfg, &mut lock, key).await {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "cluster: cannot try the slot's lock");
                            lock = None;
                        }
                    }
                }
            }
        }
        // Holding: stream the slot until the lock is lost or shutdown.
        if follower.heard_any {
            // A takeover, not a start: the backlog hold is for clients reconnecting after a
            // restart of the whole service.
            status.set_backlog_end(0);
        }
        tracing::info!(node = %node, slot = %cfg.slot, "cluster: this node holds the replication slot now and streams it");
        metrics::counter!(telemetry::SLOT_TAKEOVERS).increment(1);
        status.cluster.set(true, Some(node.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut stream = tokio::spawn(super::run(
            cfg.clone(),
            tx.clone(),
            status.clone(),
            stop_rx,
            Some(link.clone()),
        ));
        let stopped_by_shutdown = loop {
            tokio::select! {
                _ = down(&mut shutdown) => break true,
                _ = &mut stream => break false,
                m = incoming.recv() => {
                    if m.is_none() {
                        break true;
                    }
                    // Another node's stream (it lost the lock): not followed while this node
                    // streams.
                }
                _ = tick.tick() => {
                    if !lock_alive(&mut lock).await {
                        tracing::warn!(node = %node, "cluster: the connection holding the slot's lock is gone: stopping the stream");
                        break false;
                    }
                }
            }
        };
        stop_tx.send_replace(true);
        if tokio::time::timeout(Duration::from_secs(5), &mut stream)
            .await
            .is_err()
        {
            stream.abort();
        }
        lock = None;
        if stopped_by_shutdown {
            return;
        }
        status.cluster.set(false, None);
        follower = Follower::new(node_timeout);
        follower.heard_any = true;
    }
}

/// Resolves once shutdown has begun.
async fn down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|d| *d).await;
}

/// Tries to take the slot's lock on the election connection (opened when needed).
async fn try_lock(
    cfg: &super::Config,
    lock: &mut Option<tokio_postgres::Client>,
    key: i64,
) -> Result<bool, crate::db::DbError> {
    if lock.as_ref().is_none_or(|c| c.is_closed()) {
        let pg = cfg.db.pg_config("walcast_slot_election");
        let client = tokio::time::timeout(
            Duration::from_secs(5),
            cfg.db.connect_with(&pg, cfg.db.tls_config()?),
        )
        .await
        .map_err(|_| crate::db::DbError::PoolTimeout)??;
        *lock = Some(client);
    }
    let Some(client) = lock.as_ref() else {
        return Ok(false);
    };
    let row = tokio::time::timeout(
        Duration::from_secs(5),
        client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]),
    )
    .await
    .map_err(|_| crate::db::DbError::PoolTimeout)??;
    Ok(row.get::<_, bool>(0))
}

async fn lock_alive(lock: &mut Option<tokio_postgres::Client>) -> bool {
    let Some(client) = lock.as_ref() else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), client.simple_query("SELECT 1")).await,
        Ok(Ok(_))
    )
}

/// A node that does not stream the slot: feeds what the holder publishes to its dispatcher.
struct Follower {
    node_timeout: Duration,
    /// The holder followed, and the last number received from it.
    current: Option<u64>,
    last_seq: u64,
    /// Holders replaced by a newer one: what still comes from them is ignored.
    retired: VecDeque<u64>,
    /// A pgoutput message arriving in chunks.
    chunks: BytesMut,
    /// The last Relation message handed on, per table (a repeat is not handed on again).
    relations: HashMap<u32, Bytes>,
    /// The end of the last commit handed to the dispatcher, and the holder's position to
    /// publish once the dispatcher has delivered it.
    last_fed_commit: u64,
    pending_position: u64,
    last_heard: Option<Instant>,
    /// Whether this node ever received the stream from another node.
    heard_any: bool,
    /// Whether the messages from the current holder start at a transaction's beginning.
    synced: bool,
    /// When a gap was last told.
    last_gap: Option<Instant>,
    /// Whether the dispatcher was told that what follows comes from another node.
    announced: bool,
}

impl Follower {
    fn new(node_timeout: Duration) -> Self {
        Self {
            node_timeout,
            current: None,
            last_seq: 0,
            retired: VecDeque::new(),
            chunks: BytesMut::new(),
            relations: HashMap::new(),
            last_fed_commit: 0,
            pending_position: 0,
            last_heard: None,
            heard_any: false,
            synced: false,
            last_gap: None,
            announced: false,
        }
    }

    fn gap(&mut self, status: &Status) {
        self.chunks.clear();
        // One interruption is one gap: NATS reconnecting and the hole in the numbering it
        // leaves are told once.
        if self
            .last_gap
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_gap = Some(Instant::now());
        status.record_gap(
            GapReason::ClusterLost,
            "Changes streamed by another node may have been lost on their way to this one (the connection to the cluster broker, NATS, was interrupted or fell behind); refetch to catch up".to_string(),
        );
    }

    async fn on(&mut self, m: FromCluster, tx: &mpsc::Sender<Event>, status: &Status) {
        let (origin, seq, node, kind) = match m {
            FromCluster::Lost => {
                if self.current.is_some() {
                    self.gap(status);
                }
                return;
            }
            FromCluster::Message {
                origin,
                seq,
                node,
                kind,
            } => (origin, seq, node, kind),
        };
        if self.retired.contains(&origin) {
            return;
        }
        if self.current != Some(origin) {
            // A new holder (a takeover): it numbers from 1.
            if let Some(old) = self.current.replace(origin) {
                self.retired.push_back(old);
                if self.retired.len() > 16 {
                    self.retired.pop_front();
                }
                if seq != 1 {
                    self.gap(status);
                }
            }
            self.chunks.clear();
            self.last_seq = seq.saturating_sub(1);
            // The first holder heard since start may be mid-transaction: its rest (committed
            // before this node's subscribers could have joined) is not handed on.
            let first_ever = self.retired.is_empty() && !self.heard_any;
            self.synced = !first_ever;
        }
        if seq != self.last_seq.wrapping_add(1) {
            tracing::warn!(
                expected = self.last_seq.wrapping_add(1),
                got = seq,
                "cluster: change messages from the slot holder were missed"
            );
            self.gap(status);
        }
        self.last_seq = seq;
        self.last_heard = Some(Instant::now());
        self.heard_any = true;
        if let Some(name) = node {
            if status.cluster.holder().as_deref() != Some(name.as_str()) {
                tracing::info!(holder = %name, "cluster: the replication slot is streamed by another node");
                status.cluster.set(false, Some(name));
            }
        }
        if !status.connected.load(Ordering::Relaxed) {
            status.set_connected(true);
        }
        match kind {
            Received::Position(lsn) => {
                self.pending_position = self.pending_position.max(lsn);
                self.publish_position(status);
            }
            Received::Wal { lsn, data, more } => {
                metrics::counter!(telemetry::CLUSTER_MESSAGES_IN, "kind" => "changes").increment(1);
                if more || !self.chunks.is_empty() {
                    if self.chunks.len() + data.len() > MAX_MESSAGE_BYTES {
                        self.gap(status);
                        return;
                    }
                    self.chunks.extend_from_slice(&data);
                    if more {
                        return;
                    }
                }
                let data = if self.chunks.is_empty() {
                    data
                } else {
                    self.chunks.split().freeze()
                };
                let msg = match super::pgoutput::decode(&data) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: undecodable change message from the slot holder");
                        self.gap(status);
                        return;
                    }
                };
                status.cluster.saw(lsn);
                let Some(event) = super::event_of(msg, lsn) else {
                    return;
                };
                match &event {
                    Event::Begin { .. } => self.synced = true,
                    Event::Relation(_) => {}
                    _ if !self.synced => return,
                    _ => {}
                }
                match &event {
                    Event::Relation(r) => {
                        if self.relations.get(&r.oid) == Some(&data) {
                            return;
                        }
                        self.relations.insert(r.oid, data.clone());
                    }
                    Event::Commit { end_lsn } => self.last_fed_commit = *end_lsn,
                    _ => {}
                }
                if !self.announced {
                    self.announced = true;
                    let _ = tx.send(Event::Source { remote: true }).await;
                }
                // Backpressure: waits while the dispatcher is behind.
                let _ = tx.send(event).await;
            }
        }
    }

    /// The holder's position becomes this node's once its dispatcher has delivered every
    /// commit handed to it.
    fn publish_position(&self, status: &Status) {
        if self.pending_position > 0 && status.acked.load(Ordering::Relaxed) >= self.last_fed_commit
        {
            status.publish_position(self.pending_position);
        }
    }

    fn tick(&mut self, status: &Status) {
        self.publish_position(status);
        if let Some(at) = self.last_heard {
            if at.elapsed() > self.node_timeout && status.connected.load(Ordering::Relaxed) {
                tracing::warn!("cluster: the node streaming the replication slot is silent; waiting for it or for a takeover");
                status.set_connected(false);
                status.cluster.set(false, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn begin(final_lsn: u64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(final_lsn);
        b.put_i64(0);
        b.put_u32(7);
        b.freeze()
    }

    fn commit(end_lsn: u64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(end_lsn - 1);
        b.put_u64(end_lsn);
        b.put_i64(0);
        b.freeze()
    }

    fn insert(v: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(16388);
        b.put_u8(b'N');
        b.put_u16(2);
        b.put_u8(b't');
        b.put_i32(v.len() as i32);
        b.put_slice(v);
        b.put_u8(b'n');
        b.freeze()
    }

    fn msg(origin: u64, seq: u64, data: Bytes, more: bool) -> FromCluster {
        FromCluster::Message {
            origin,
            seq,
            node: Some("h".into()),
            kind: Received::Wal {
                lsn: seq,
                data,
                more,
            },
        }
    }

    fn kinds(rx: &mut mpsc::Receiver<Event>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            out.push(match ev {
                Event::Relation(_) => "R".to_string(),
                Event::Begin { final_lsn, .. } => format!("B{final_lsn}"),
                Event::Insert { new, .. } => match &new[0] {
                    super::super::pgoutput::Datum::Text(t) => {
                        format!("I{}", String::from_utf8_lossy(t))
                    }
                    _ => "I?".into(),
                },
                Event::Commit { end_lsn } => format!("C{end_lsn}"),
                Event::Source { remote } => format!("S{remote}"),
                other => format!("{other:?}"),
            });
        }
        out
    }

    fn status() -> Status {
        Status::new(Duration::from_secs(60), Duration::from_secs(5))
    }

    #[tokio::test]
    async fn a_follower_hands_on_whole_transactions_reassembles_chunks_and_tells_holes() {
        let status = status();
        let (tx, mut rx) = mpsc::channel(64);
        let mut f = Follower::new(Duration::from_secs(1));
        let rel = super::super::pgoutput::tests::relation_bytes();
        // Joined mid-transaction: its rest is not handed on, the next one is.
        f.on(msg(1, 10, insert(b"old"), false), &tx, &status).await;
        f.on(msg(1, 11, commit(100), false), &tx, &status).await;
        f.on(msg(1, 12, begin(150), false), &tx, &status).await;
        f.on(msg(1, 13, rel.clone(), false), &tx, &status).await;
        // An insert in two chunks.
        let ins = insert(b"abcdef");
        f.on(msg(1, 14, ins.slice(..5), true), &tx, &status).await;
        f.on(msg(1, 15, ins.slice(5..), false), &tx, &status).await;
        f.on(msg(1, 16, commit(200), false), &tx, &status).await;
        assert_eq!(kinds(&mut rx), ["Strue", "B150", "R", "Iabcdef", "C200"]);
        assert!(status.gap_for_join().is_none());
        // The same Relation again (the holder sends it with each transaction): not handed on.
        f.on(msg(1, 17, begin(250), false), &tx, &status).await;
        f.on(msg(1, 18, rel.clone(), false), &tx, &status).await;
        f.on(msg(1, 19, insert(b"x"), false), &tx, &status).await;
        f.on(msg(1, 20, commit(300), false), &tx, &status).await;
        assert_eq!(kinds(&mut rx), ["B250", "Ix", "C300"]);
        // A hole in the numbering is a gap, told.
        f.on(msg(1, 23, begin(350), false), &tx, &status).await;
        let gap = status.gap_for_join().expect("a gap");
        assert_eq!(gap.reason, GapReason::ClusterLost);
        // A new holder numbers from 1 (no gap); the old one's late messages are ignored.
        f.on(msg(2, 1, begin(400), false), &tx, &status).await;
        f.on(msg(1, 24, insert(b"late"), false), &tx, &status).await;
        f.on(msg(2, 2, insert(b"new"), false), &tx, &status).await;
        assert_eq!(kinds(&mut rx), ["B350", "B400", "Inew"]);
        assert_eq!(status.gap_for_join().map(|g| g.id), Some(gap.id));
    }

    #[tokio::test]
    async fn the_holder_sends_a_tables_relation_with_each_transaction_that_touches_it() {
        let (tap, mut out) = mpsc::channel(64);
        let mut link = Link::new(
            tap,
            Arc::new(|| None),
            Arc::new(status()),
            Duration::from_secs(5),
        );
        let rel = super::super::pgoutput::tests::relation_bytes();
        let publish = |data: Bytes, lsn: u64| {
            let ev = super::super::pgoutput::decode(&data)
                .ok()
                .and_then(|m| super::super::event_of(m, lsn))
                .expect("an event");
            (ev, data)
        };
        let stream = [
            publish(begin(100), 1),
            publish(rel.clone(), 2),
            publish(insert(b"a"), 3),
            publish(commit(150), 4),
            publish(begin(200), 5),
            publish(insert(b"b"), 6),
            publish(insert(b"c"), 7),
            publish(commit(250), 8),
        ];
        for (ev, data) in stream {
            let lsn = match &ev {
                Event::Insert { lsn, .. } => *lsn,
                _ => 0,
            };
            link.publish_event(&ev, lsn, data).await;
        }
        let mut tags = String::new();
        while let Ok(Published::Wal { data, .. }) = out.try_recv() {
            tags.push(char::from(data[0]));
        }
        // The second transaction carries the Relation (once) before its first change.
        assert_eq!(tags, "BRICBRIIC");
    }

    #[tokio::test]
    async fn the_holders_position_is_this_nodes_once_its_commits_are_delivered() {
        let status = status();
        let (tx, _rx) = mpsc::channel(64);
        let mut f = Follower::new(Duration::from_secs(1));
        let pos = |seq, lsn| FromCluster::Message {
            origin: 1,
            seq,
            node: Some("h".into()),
            kind: Received::Position(lsn),
        };
        f.on(msg(1, 1, begin(150), false), &tx, &status).await;
        f.on(msg(1, 2, commit(200), false), &tx, &status).await;
        f.on(pos(3, 210), &tx, &status).await;
        assert_eq!(status.position(), 0, "the commit is not delivered yet");
        status.acked.store(200, Ordering::Relaxed);
        f.tick(&status);
        assert_eq!(status.position(), 210);
        assert_eq!(status.cluster.holder().as_deref(), Some("h"));
    }

    #[test]
    fn the_lock_key_is_stable_and_per_slot() {
        assert_eq!(lock_key("a"), lock_key("a"));
        assert_ne!(lock_key("a"), lock_key("b"));
    }
}
