//! Catch-up on rejoin (RELIABILITY.md, "Catch-up on rejoin"): a bounded history of recent
//! decoded changes, filled by the dispatcher in commit order, and the positions of subscribers
//! whose socket went away without a leave, so that the same user joining the same topic with
//! the same bindings within `CATCHUP_WINDOW_MS` gets what it missed, then continues live.
//!
//! Positions are sequence numbers the history gives each recorded change, in commit order.
//! [`History::delivered`] is the position up to which every change has been pushed to its
//! subscribers' queues. The dispatcher holds [`History::turn`] while it matches and delivers a
//! batch; a catch-up holds it while it installs the rejoined channel's subscriptions and
//! replays the history after the remembered position, so a change is either in the replay or
//! matched live, never both, never neither.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::binding::Action;
use super::payload::{Change, RowCell};
use super::registry::{Cell, Sub};
use super::PgChanges;
use crate::channels::ChannelId;
use crate::config::CatchupConfig;
use crate::telemetry;

/// Bookkeeping charged per retained change on top of its values.
const ENTRY_OVERHEAD: usize = 160;
/// How often expired remembered positions are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Charged per column value.
const CELL_OVERHEAD: usize = 24;

struct Entry {
    seq: u64,
    point: Point,
    at: Instant,
    bytes: usize,
    relation: u32,
    change: Change,
}

#[derive(Default)]
struct Ring {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// The last sequence number given.
    last_seq: u64,
    /// The newest position evicted: a position below it has lost part of what followed it.
    evicted_upto: u64,
    /// The stream point of the last change recorded.
    last_point: Point,
}

/// Where a change stands in the change stream, the same on every node of a cluster (each
/// decodes the same stream): its transaction's commit LSN, then its own LSN. Positions are
/// per node; points let a position travel to another node ([`History::share`],
/// [`History::cluster_update`]).
pub type Point = (u64, u64);

/// A position another node published for a key (defined with the cluster, which carries it).
pub use crate::channels::cluster::positions::Shared;

/// What this node holds of another node's published positions.
struct RemoteNode {
    positions: HashMap<Key, Shared>,
    /// When the node was declared gone (timeout or goodbye): its positions are then
    /// remembered positions, taken once each, until `CATCHUP_WINDOW_MS` after this.
    gone: Option<Instant>,
    /// It said goodbye (it is not coming back; a late update does not revive it).
    bye: bool,
}

/// Who a subscriber was and what it subscribed to (see [`identity_key`]).
pub use crate::channels::cluster::positions::Key;

/// A remembered position: where, since when, and whether changes before it were lost (a
/// position saved by a shutdown that had not received everything delivered before it).
#[derive(Clone, Copy)]
struct Remembered {
    pos: u64,
    /// Restored from the last graceful shutdown (its position means "before this process"):
    /// not published to other nodes.
    restored: bool,
    at: Instant,
    gap: bool,
    /// The highest numeric message ref the old socket sent (`None`: none was numeric).
    last_ref: Option<u64>,
}

/// Where a rejoin resumes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub from: u64,
    /// Changes before `from` were lost already (told to the rejoin).
    pub gap: bool,
}

/// What a join under a key is: a new subscriber, a rejoin that resumes, or a fresh client (a
/// new page or tab of the same user) whose position is forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejoin {
    New,
    Resume(Resume),
    Fresh,
}

/// Whether a join with message ref `join_ref` continues a socket whose highest message ref was
/// `old` (both numeric: `0` stands for none). supabase-js keeps numbering its messages across
/// its own reconnects; a new page starts again from 1. Non-numeric refs resume.
pub fn continues(old: u64, join_ref: Option<u64>) -> bool {
    match join_ref {
        Some(j) if old > 0 => j > old,
        _ => true,
    }
}

/// A message ref as a number, if it is one (`"12"`).
pub fn numeric_ref(r: &serde_json::Value) -> Option<u64> {
    r.as_str().and_then(|s| s.parse::<u64>().ok())
}

/// Channels live under each key, with their socket's position and highest numeric message ref
/// (0: none).
type Live = HashMap<Key, Vec<(ChannelId, Arc<AtomicU64>, Arc<AtomicU64>)>>;

/// The history and the remembered positions.
pub struct History {
    cfg: CatchupConfig,
    ring: Mutex<Ring>,
    delivered: AtomicU64,
    /// Serializes the dispatcher's batches with catch-ups.
    turn: tokio::sync::Mutex<()>,
    remembered: Mutex<HashMap<Key, Remembered>>,
    /// Channels live now, by key, with their socket's position: a rejoin that arrives before
    /// walcast has noticed the old socket is gone (a network blip) resumes from it.
    live: Mutex<Live>,
    /// Live channels whose rejoin replay has not finished: the position they resumed from
    /// (their socket's position may already be past what the replay has sent).
    floors: Mutex<HashMap<ChannelId, u64>>,
    /// When expired positions were last swept.
    swept: Mutex<Instant>,
    /// Rejoins waiting for a turn (bounded by the channels: one per rejoining channel).
    waiting: Mutex<Vec<CatchupRequest>>,
    /// Positions other nodes of a cluster published, by node (each bounded by
    /// `CATCHUP_MAX_REMEMBERED`; a gone node's are dropped after the window).
    remote: Mutex<HashMap<u64, RemoteNode>>,
}

/// A rejoin waiting for its turn.
struct CatchupRequest {
    channel: ChannelId,
    subs: Vec<(u32, Sub)>,
    from: u64,
    alive: Arc<AtomicBool>,
    done: tokio::sync::oneshot::Sender<Outcome>,
}

/// What a catch-up did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Changes matched and handed to delivery (each still filtered and authorized).
    pub replayed: usize,
    /// Part of what followed the position had left the history already.
    pub gap: bool,
}

/// The dispatcher's turn: while held, no catch-up runs. What was recorded during it counts as
/// delivered only once the dispatcher's sender has pushed it ([`History::mark_delivered`]):
/// with checks in flight, a batch is sent after the turn that matched it has ended.
pub struct Turn<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
}

/// The key a subscriber is remembered by: its `sub` (and `session_id` when the token has one),
/// the topic and its bindings (order and key order do not matter). `None` without a `sub`.
pub fn identity_key(
    claims: &serde_json::Map<String, serde_json::Value>,
    topic: &str,
    bindings: &[serde_json::Map<String, serde_json::Value>],
) -> Option<Key> {
    let sub = claims.get("sub").and_then(|v| v.as_str())?;
    let session = claims.get("session_id").and_then(|v| v.as_str());
    let mut b: Vec<String> = bindings
        .iter()
        .map(|m| serde_json::Value::Object(m.clone()).to_string())
        .collect();
    b.sort();
    let key = serde_json::json!([sub, session, topic, b]).to_string();
    Some(Arc::from(key))
}

impl History {
    pub fn new(cfg: CatchupConfig) -> Self {
        Self {
            cfg,
            ring: Mutex::default(),
            delivered: AtomicU64::new(0),
            turn: tokio::sync::Mutex::new(()),
            remembered: Mutex::default(),
            live: Mutex::default(),
            floors: Mutex::default(),
            waiting: Mutex::default(),
            swept: Mutex::new(Instant::now()),
            remote: Mutex::default(),
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<CatchupRequest>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_floors(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelId, u64>> {
        self.floors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A channel's position for a rejoin elsewhere: its socket's, or while its own replay
    /// runs, where that started.
    fn live_position(&self, channel: ChannelId, position: &AtomicU64) -> u64 {
        let pos = position.load(Ordering::SeqCst);
        self.lock_floors()
            .get(&channel)
            .map_or(pos, |floor| pos.min(*floor))
    }

    /// A rejoined channel's replay is done.
    pub fn caught_up(&self, channel: ChannelId) {
        self.lock_floors().remove(&channel);
    }

    /// A channel joined under `key` with message ref `join_ref`: where it resumes from (a
    /// remembered position, else the earliest position of a live channel with the same key),
    /// or that it is a fresh client (its ref does not continue the old socket's, see
    /// [`continues`]); it is now live under the key, with its socket's position and last ref.
    pub fn join(
        &self,
        key: &Key,
        channel: ChannelId,
        position: Arc<AtomicU64>,
        last_ref: Arc<AtomicU64>,
        join_ref: Option<u64>,
    ) -> Rejoin {
        if !self.enabled() {
            return Rejoin::New;
        }
        let remembered = self.take_remembered(key);
        let mut live = self.lock_live();
        let others = live.entry(key.clone()).or_default();
        let outcome = match remembered {
            Some(e) if continues(e.last_ref.unwrap_or(0), join_ref) => Rejoin::Resume(Resume {
                from: e.pos,
                gap: e.gap,
            }),
            Some(_) => Rejoin::Fresh,
            None if others.is_empty() => self.join_from_cluster(key, join_ref),
            None => others
                .iter()
                .filter(|(_, _, r)| continues(r.load(Ordering::SeqCst), join_ref))
                .map(|(c, p, _)| self.live_position(*c, p))
                .min()
                .map_or(Rejoin::Fresh, |from| {
                    Rejoin::Resume(Resume { from, gap: false })
                }),
        };
        others.push((channel, position, last_ref));
        if let Rejoin::Resume(r) = outcome {
            self.lock_floors().insert(channel, r.from);
        }
        outcome
    }

    /// Whether no channel is live under a key (every socket with one has gone).
    pub fn none_live(&self) -> bool {
        self.lock_live().is_empty()
    }

    /// A channel is gone; true when no other channel is live under its key.
    pub fn leave(&self, key: &Key, channel: ChannelId) -> bool {
        self.lock_floors().remove(&channel);
        let mut live = self.lock_live();
        let Some(list) = live.get_mut(key) else {
            return true;
        };
        list.retain(|(c, _, _)| *c != channel);
        let last = list.is_empty();
        if last {
            live.remove(key);
        }
        last
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled()
    }

    fn lock_ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_remembered(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Remembered>> {
        self.remembered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken by the dispatcher for each batch.
    pub async fn turn(&self) -> Turn<'_> {
        Turn {
            _guard: self.turn.lock().await,
        }
    }

    /// The position of the last change recorded.
    pub fn recorded(&self) -> u64 {
        self.lock_ring().last_seq
    }

    /// Every change up to `upto` has been pushed to its subscribers' queues (called by the
    /// dispatcher's sender, in commit order).
    pub fn mark_delivered(&self, upto: u64) {
        self.delivered.fetch_max(upto, Ordering::SeqCst);
    }

    /// Every change up to this position has been pushed to its subscribers' queues.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }

    /// Records a decoded change (called by the dispatcher, in commit order, during its turn).
    /// `point`: where it stands in the stream ([`Point`]).
    pub fn record(&self, relation: u32, change: &Change, point: Point) {
        if !self.enabled() {
            return;
        }
        let bytes = change_bytes(change);
        let now = Instant::now();
        let mut ring = self.lock_ring();
        ring.last_seq += 1;
        ring.last_point = point;
        let seq = ring.last_seq;
        ring.bytes += bytes;
        ring.entries.push_back(Entry {
            seq,
            point,
            at: now,
            bytes,
            relation,
            change: change.clone(),
        });
        self.evict(&mut ring, now);
    }

    fn evict(&self, ring: &mut Ring, now: Instant) {
        while let Some(front) = ring.entries.front() {
            let reason = if ring.bytes > self.cfg.history_bytes {
                "bytes"
            } else if now.duration_since(front.at) > self.cfg.history_age {
                "age"
            } else {
                break;
            };
            if let Some(e) = ring.entries.pop_front() {
                ring.bytes -= e.bytes;
                ring.evicted_upto = e.seq;
                metrics::counter!(telemetry::CATCHUP_HISTORY_EVICTED, "reason" => reason)
                    .increment(1);
            }
        }
        metrics::gauge!(telemetry::CATCHUP_HISTORY_BYTES).set(ring.bytes as f64);
        metrics::gauge!(telemetry::CATCHUP_HISTORY_CHANGES).set(ring.entries.len() as f64);
    }

    /// (changes, bytes) retained now.
    pub fn size(&self) -> (usize, usize) {
        let ring = self.lock_ring();
        (ring.entries.len(), ring.bytes)
    }

    /// Remembers where a subscriber stood when its socket went away without a leave.
    /// `last_ref`: the highest numeric message ref its socket sent (0: none).
    pub fn remember(&self, key: Key, position: u64, last_ref: u64) {
        let last_ref = (last_ref > 0).then_some(last_ref);
        self.insert(key, position, Instant::now(), false, last_ref, false);
    }

    /// A position saved by the last graceful shutdown: everything this process streams is new
    /// to it; `complete` false when it had also missed changes before the shutdown.
    pub fn restore(&self, key: Key, complete: bool, left: Duration, last_ref: Option<u64>) {
        let at = Instant::now()
            .checked_sub(self.cfg.window.saturating_sub(left))
            .unwrap_or_else(Instant::now);
        self.insert(key, 0, at, !complete, last_ref, true);
    }

    fn insert(
        &self,
        key: Key,
        pos: u64,
        at: Instant,
        gap: bool,
        last_ref: Option<u64>,
        restored: bool,
    ) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let mut r = self.lock_remembered();
        let window = self.cfg.window;
        // Expired positions are swept at most once a second (a disconnect storm must not scan
        // the whole map each time), and whenever the map is full.
        let full = r.len() >= self.cfg.max_remembered && !r.contains_key(&key);
        {
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if full || now.duration_since(*swept) >= SWEEP_EVERY {
                r.retain(|_, e| now.duration_since(e.at) <= window);
                *swept = now;
            }
        }
        if r.len() >= self.cfg.max_remembered && !r.contains_key(&key) {
            // Bounded: the oldest position goes.
            if let Some(oldest) = r.iter().min_by_key(|(_, e)| e.at).map(|(k, _)| k.clone()) {
                r.remove(&oldest);
            }
        }
        // Two sockets of one user on the same topic: the earlier position covers both, and
        // a rejoin continuing either of them resumes (the lower ref).
        let lower_ref = |e: &Remembered| match (e.last_ref, last_ref) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        };
        let entry = match r.get(&key) {
            Some(e) if e.pos <= pos => Remembered {
                at,
                gap: e.gap || gap,
                last_ref: lower_ref(e),
                ..*e
            },
            Some(e) => Remembered {
                pos,
                restored: e.restored && restored,
                at,
                gap: e.gap || gap,
                last_ref: lower_ref(e),
            },
            None => Remembered {
                pos,
                restored: pos == 0 && restored,
                at,
                gap,
                last_ref,
            },
        };
        r.insert(key, entry);
        metrics::gauge!(telemetry::CATCHUP_REMEMBERED).set(r.len() as f64);
    }

    /// The remembered position for `key` if it is within the window (and forgets it).
    pub fn take(&self, key: &Key) -> Option<Resume> {
        self.take_remembered(key).map(|e| Resume {
            from: e.pos,
            gap: e.gap,
        })
    }

    fn take_remembered(&self, key: &Key) -> Option<Remembered> {
        if !self.enabled() {
            return None;
        }
        let mut r = self.lock_remembered();
        let found = r.remove(key);
        metrics::gauge!(telemetry::CATCHUP_REMEMBERED).set(r.len() as f64);
        found.filter(|e| e.at.elapsed() <= self.cfg.window)
    }

    /// Whether everything after `position` is still in the history.
    pub fn covers(&self, position: u64) -> bool {
        self.lock_ring().evicted_upto <= position
    }

    /// Every remembered position still within the window: (key, position, age, changes
    /// before it already lost, the old socket's highest numeric message ref).
    pub fn remembered(&self) -> Vec<(Key, u64, Duration, bool, Option<u64>)> {
        let r = self.lock_remembered();
        r.iter()
            .filter(|(_, e)| e.at.elapsed() <= self.cfg.window)
            .map(|(k, e)| (k.clone(), e.pos, e.at.elapsed(), e.gap, e.last_ref))
            .collect()
    }

    fn lock_remote(&self) -> std::sync::MutexGuard<'_, HashMap<u64, RemoteNode>> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For the other nodes of a cluster: the position each identity with a live channel here
    /// would be remembered at if its socket went now, and the remembered positions (not those
    /// restored from the last shutdown), as stream points. Two channels under one key share
    /// the earlier position and the lower ref, as [`History::remember`] does.
    pub fn share(&self) -> HashMap<Key, Shared> {
        if !self.enabled() {
            return HashMap::new();
        }
        // (position, gap, last ref), one lock at a time.
        let mut at: HashMap<Key, (u64, bool, u64)> = HashMap::new();
        let mut merge = |k: &Key, pos: u64, gap: bool, r: u64| {
            let e = at.entry(k.clone()).or_insert((pos, gap, r));
            e.0 = e.0.min(pos);
            e.1 |= gap;
            e.2 = e.2.min(r);
        };
        for (k, list) in self.lock_live().iter() {
            for (c, p, r) in list {
                merge(
                    k,
                    self.live_position(*c, p),
                    false,
                    r.load(Ordering::SeqCst),
                );
            }
        }
        for (k, e) in self.lock_remembered().iter() {
            if !e.restored && e.at.elapsed() <= self.cfg.window {
                merge(k, e.pos, e.gap, e.last_ref.unwrap_or(0));
            }
        }
        let ring = self.lock_ring();
        at.into_iter()
            .map(|(k, (pos, gap, last_ref))| {
                let shared = match point_of(&ring, pos) {
                    Some(point) => Shared {
                        point,
                        gap,
                        last_ref,
                    },
                    // What followed it has partly left the history: the oldest change still
                    // held, told as a gap.
                    None => Shared {
                        point: ring.entries.front().map_or(ring.last_point, |e| e.point),
                        gap: true,
                        last_ref,
                    },
                };
                (k, shared)
            })
            .collect()
    }

    /// Positions node `node` published: `reset` replaces what was held of it; `None` removes
    /// a key. `bye`: the node is shutting down (these are its last). Updates from a node
    /// already gone are ignored, but for its last ones.
    pub fn cluster_update(
        &self,
        node: u64,
        reset: bool,
        bye: bool,
        entries: Vec<(Key, Option<Shared>)>,
    ) {
        if !self.enabled() {
            return;
        }
        let max = self.cfg.max_remembered;
        let window = self.cfg.window;
        let mut remote = self.lock_remote();
        // Gone nodes' positions past the window go.
        remote.retain(|id, n| *id == node || n.gone.is_none_or(|g| g.elapsed() <= window));
        let n = remote.entry(node).or_insert_with(|| RemoteNode {
            positions: HashMap::new(),
            gone: None,
            bye: false,
        });
        if n.gone.is_some() && !bye {
            // A node found gone (cut off from NATS) that is back: its full list revives it.
            if reset && !n.bye {
                n.gone = None;
            } else {
                return;
            }
        }
        if reset {
            n.positions.clear();
        }
        for (k, s) in entries {
            match s {
                Some(s) if n.positions.len() < max || n.positions.contains_key(&k) => {
                    n.positions.insert(k, s);
                }
                Some(_) => {}
                None => {
                    n.positions.remove(&k);
                }
            }
        }
        if bye {
            n.gone.get_or_insert_with(Instant::now);
            n.bye = true;
        }
        set_cluster_gauge(&remote);
    }

    /// Node `node` is gone (not heard from within the node timeout, or said goodbye): the
    /// positions it published last are remembered positions here, taken once each, for
    /// `CATCHUP_WINDOW_MS`.
    pub fn cluster_node_gone(&self, node: u64) {
        let mut remote = self.lock_remote();
        if let Some(n) = remote.get_mut(&node) {
            n.gone.get_or_insert_with(Instant::now);
        }
    }

    /// A join with nothing here under its key: a position another node published (a gone
    /// node's is taken; a live node's stays, as a live channel's here does).
    fn join_from_cluster(&self, key: &Key, join_ref: Option<u64>) -> Rejoin {
        let found: Vec<Shared> = {
            let mut remote = self.lock_remote();
            let window = self.cfg.window;
            remote.retain(|_, n| n.gone.is_none_or(|g| g.elapsed() <= window));
            let mut found = Vec::new();
            for n in remote.values_mut() {
                if n.gone.is_some() {
                    found.extend(n.positions.remove(key));
                } else {
                    found.extend(n.positions.get(key).copied());
                }
            }
            set_cluster_gauge(&remote);
            found
        };
        if found.is_empty() {
            return Rejoin::New;
        }
        let ring = self.lock_ring();
        found
            .iter()
            .filter(|s| continues(s.last_ref, join_ref))
            .map(|s| local_position(&ring, s))
            .min_by_key(|(from, _)| *from)
            .map_or(Rejoin::Fresh, |(from, gap)| {
                metrics::counter!(telemetry::CATCHUP_CLUSTER_RESUMES).increment(1);
                Rejoin::Resume(Resume { from, gap })
            })
    }

    /// `CATCHUP_WINDOW_MS`.
    pub fn window(&self) -> Duration {
        self.cfg.window
    }
}

fn set_cluster_gauge(remote: &HashMap<u64, RemoteNode>) {
    let n: usize = remote.values().map(|n| n.positions.len()).sum();
    metrics::gauge!(telemetry::CATCHUP_CLUSTER_POSITIONS).set(n as f64);
}

/// The stream point of position `pos` here; `None` when the change at it has left the history.
fn point_of(ring: &Ring, pos: u64) -> Option<Point> {
    if pos == ring.last_seq {
        return Some(ring.last_point);
    }
    if pos == 0 {
        return (ring.evicted_upto == 0).then_some((0, 0));
    }
    let first = ring.entries.front()?.seq;
    let i = usize::try_from(pos.checked_sub(first)?).ok()?;
    ring.entries.get(i).map(|e| e.point)
}

/// Where a position another node published stands here: this node's position after which
/// comes what it had not received, and whether part of that is not in this node's history.
fn local_position(ring: &Ring, s: &Shared) -> (u64, bool) {
    if s.point == (0, 0) {
        return (0, s.gap || ring.evicted_upto > 0);
    }
    // Changes are recorded in commit order: points only grow.
    let i = ring.entries.partition_point(|e| e.point <= s.point);
    if let Some(e) = i.checked_sub(1).and_then(|i| ring.entries.get(i)) {
        return (e.seq, s.gap);
    }
    match ring.entries.front() {
        // Everything held is after the point: what came between left the history, or
        // reached it before this node ran.
        Some(f) => (f.seq.saturating_sub(1), true),
        // Nothing held: behind the point (it comes live) or past it with everything evicted.
        None => (ring.last_seq, s.gap || ring.last_point > s.point),
    }
}

/// What a retained change is charged.
fn change_bytes(c: &Change) -> usize {
    let row = |r: &Option<Vec<RowCell>>| {
        r.as_ref().map_or(0, |cells| {
            cells
                .iter()
                .map(|c| {
                    CELL_OVERHEAD
                        + match c {
                            RowCell::Text(b) => b.len(),
                            RowCell::Null | RowCell::Missing => 0,
                        }
                })
                .sum()
        })
    };
    ENTRY_OVERHEAD + row(&c.new) + row(&c.old)
}

impl PgChanges {
    /// Installs a rejoined channel's subscriptions and replays, under them, what the history
    /// holds after `from`, in commit order, each change filtered and authorized again like a
    /// live one. Runs between two of the dispatcher's batches: what the replay does not hold is
    /// matched live. `alive` turns false when the channel goes; its subscriptions are then
    /// removed again. Rejoins waiting at once (a storm after a blip) are served together: one
    /// pass over the history and one delivery for all of them.
    pub async fn catch_up(
        &self,
        channel: ChannelId,
        subs: Vec<(u32, Sub)>,
        from: u64,
        alive: Arc<AtomicBool>,
    ) -> Outcome {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        self.history.lock_waiting().push(CatchupRequest {
            channel,
            subs,
            from,
            alive,
            done: tx,
        });
        tokio::select! {
            biased;
            // Served in another rejoin's turn.
            done = &mut rx => return done.unwrap_or_default(),
            _turn = self.history.turn.lock() => {
                let requests = std::mem::take(&mut *self.history.lock_waiting());
                if !requests.is_empty() {
                    self.serve_catch_ups(requests).await;
                }
            }
        }
        rx.await.unwrap_or_default()
    }

    /// Serves waiting rejoins, during a turn.
    async fn serve_catch_ups(&self, requests: Vec<CatchupRequest>) {
        let mut from_of: HashMap<ChannelId, u64> = HashMap::new();
        let mut done = Vec::new();
        let evicted_upto = self.history.lock_ring().evicted_upto;
        for r in requests {
            self.registry.replace(r.channel, r.subs);
            if r.alive.load(Ordering::SeqCst) {
                from_of.insert(r.channel, r.from);
                done.push((r.channel, evicted_upto > r.from, r.done));
            } else {
                self.registry.remove(r.channel);
                let _ = r.done.send(Outcome::default());
            }
        }
        let Some(min_from) = from_of.values().copied().min() else {
            return;
        };
        let entries: Vec<(u64, u32, Change)> = {
            let ring = self.history.lock_ring();
            ring.entries
                .iter()
                .filter(|e| e.seq > min_from)
                .map(|e| (e.seq, e.relation, e.change.clone()))
                .collect()
        };
        let mut pending = Vec::new();
        let mut replayed: HashMap<ChannelId, usize> = HashMap::new();
        for (seq, relation, change) in entries {
            let subs: Vec<Arc<Sub>> = self
                .matches_now(relation, &change)
                .into_iter()
                .filter(|s| from_of.get(&s.target.channel).is_some_and(|f| *f < seq))
                .collect();
            if subs.is_empty() {
                continue;
            }
            let mut channels: Vec<ChannelId> = subs.iter().map(|s| s.target.channel).collect();
            channels.sort_unstable();
            channels.dedup();
            for c in channels {
                *replayed.entry(c).or_default() += 1;
            }
            pending.push((change, subs));
        }
        metrics::counter!(telemetry::CATCHUP_REPLAYED_CHANGES)
            .increment(replayed.values().sum::<usize>() as u64);
        if !pending.is_empty() {
            // Checked and sent here, under the turn: no batch is matched meanwhile, and every
            // batch matched before the rejoined channel's subscription was installed was
            // matched without it, so the channel's live changes all come after these.
            let checked = self.check(pending).await;
            self.send(checked, false).await;
        }
        for (channel, gap, tx) in done {
            let _ = tx.send(Outcome {
                replayed: replayed.get(&channel).copied().unwrap_or(0),
                gap,
            });
        }
    }

    /// The live subscriptions a change matches.
    fn matches_now(&self, relation: u32, change: &Change) -> Vec<Arc<Sub>> {
        let table = &change.table;
        let lookup = |col: &str| match table.column_index(col).and_then(|i| change.current_cell(i))
        {
            None | Some(RowCell::Missing) => Cell::Missing,
            Some(RowCell::Null) => Cell::Null,
            Some(cell @ RowCell::Text(_)) => match cell.text() {
                Some(t) => Cell::Value(t),
                None => Cell::Missing,
            },
        };
        let action: Action = change.action;
        self.registry.matches(relation, action, false, &lookup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn identity_needs_a_sub_and_ignores_binding_order() {
        let claims = map(json!({"sub": "u1", "role": "authenticated"}));
        let a = map(json!({"event": "*", "schema": "public"}));
        let b = map(json!({"event": "INSERT", "schema": "public", "table": "t"}));
        let k1 = identity_key(&claims, "realtime:x", &[a.clone(), b.clone()]);
        let k2 = identity_key(&claims, "realtime:x", &[b.clone(), a.clone()]);
        assert!(k1.is_some());
        assert_eq!(k1, k2);
        assert_ne!(
            k1,
            identity_key(&claims, "realtime:y", &[a.clone(), b.clone()])
        );
        assert_ne!(
            k1,
            identity_key(&claims, "realtime:x", std::slice::from_ref(&a))
        );
        let other_session = map(json!({"sub": "u1", "session_id": "s2"}));
        assert_ne!(
            k1,
            identity_key(&other_session, "realtime:x", &[a.clone(), b])
        );
        assert_eq!(
            identity_key(&map(json!({"role": "anon"})), "realtime:x", &[a]),
            None
        );
    }

    #[test]
    fn remembered_positions_expire_and_are_taken_once() {
        let h = History::new(CatchupConfig {
            window: Duration::from_millis(50),
            ..CatchupConfig::default()
        });
        let k: Key = Arc::from("k");
        h.remember(k.clone(), 7, 0);
        h.remember(k.clone(), 9, 0);
        assert_eq!(
            h.take(&k),
            Some(Resume {
                from: 7,
                gap: false
            }),
            "the earlier position covers both"
        );
        assert_eq!(h.take(&k), None);
        h.remember(k.clone(), 3, 0);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(h.take(&k), None, "past the window");
    }

    #[test]
    fn remembered_positions_are_bounded() {
        let h = History::new(CatchupConfig {
            max_remembered: 2,
            ..CatchupConfig::default()
        });
        for i in 0..5u64 {
            h.remember(Arc::from(format!("k{i}")), i, 0);
        }
        assert_eq!(h.remembered().len(), 2);
    }

    fn change() -> Change {
        Change {
            table: Arc::new(crate::postgres_changes::catalog::TableInfo {
                oid: 1,
                schema: "public".into(),
                name: "t".into(),
                replica_identity: b'd',
                columns: Vec::new(),
                rls: false,
                has_pk: false,
                pk: Vec::new(),
                stored_broadcasts: false,
            }),
            action: Action::Insert,
            new: None,
            old: None,
            commit_ts: 0,
            xid: 0,
            left_view: false,
            commit_lsn: 0,
        }
    }

    #[test]
    fn another_nodes_positions_map_onto_this_history_by_stream_point() {
        let h = History::new(CatchupConfig::default());
        // This node's history: changes at points (10,1), (10,2), (20,1), (30,1).
        for p in [(10, 1), (10, 2), (20, 1), (30, 1)] {
            h.record(1, &change(), p);
        }
        let shared = |point: Point, last_ref: u64| Shared {
            point,
            gap: false,
            last_ref,
        };
        let k: Key = Arc::from("k");
        let pos = || Arc::new(AtomicU64::new(0));
        let c: Vec<ChannelId> = (0..6).map(|_| ChannelId::next()).collect();
        // A live node's position: resumes after the change at it, and stays.
        h.cluster_update(7, true, false, vec![(k.clone(), Some(shared((10, 2), 40)))]);
        assert_eq!(
            h.join(&k, c[0], pos(), pos(), Some(41)),
            Rejoin::Resume(Resume {
                from: 2,
                gap: false
            })
        );
        h.leave(&k, c[0]);
        // A new page (refs from 1): fresh.
        assert_eq!(h.join(&k, c[1], pos(), pos(), Some(1)), Rejoin::Fresh);
        h.leave(&k, c[1]);
        // Gone: taken once.
        h.cluster_node_gone(7);
        assert!(matches!(
            h.join(&k, c[2], pos(), pos(), Some(42)),
            Rejoin::Resume(Resume { from: 2, .. })
        ));
        h.leave(&k, c[2]);
        assert_eq!(h.join(&k, c[3], pos(), pos(), Some(43)), Rejoin::New);
        h.leave(&k, c[3]);
        // A point before this history: a gap; one beyond it (this node lags): its newest.
        h.cluster_update(8, true, true, vec![(k.clone(), Some(shared((5, 1), 0)))]);
        assert_eq!(
            h.join(&k, c[4], pos(), pos(), Some(1)),
            Rejoin::Resume(Resume { from: 0, gap: true })
        );
        h.leave(&k, c[4]);
        h.cluster_update(9, true, true, vec![(k.clone(), Some(shared((99, 1), 0)))]);
        assert_eq!(
            h.join(&k, c[5], pos(), pos(), None),
            Rejoin::Resume(Resume {
                from: 4,
                gap: false
            })
        );
        // What this node shares: a live channel's position as a stream point.
        let shared_here = h.share();
        assert_eq!(shared_here.get(&k).map(|s| s.point), Some((0, 0)));
    }

    #[test]
    fn a_channel_still_replaying_is_shared_at_the_position_it_resumed_from() {
        let h = History::new(CatchupConfig::default());
        for p in [(10, 1), (20, 1), (30, 1)] {
            h.record(1, &change(), p);
        }
        let k: Key = Arc::from("k");
        let c = ChannelId::next();
        h.remember(k.clone(), 1, 0);
        // The socket has spoken since (its position is the newest), the replay is running.
        let socket = Arc::new(AtomicU64::new(3));
        assert!(matches!(
            h.join(&k, c, socket, Arc::new(AtomicU64::new(0)), None),
            Rejoin::Resume(Resume { from: 1, .. })
        ));
        assert_eq!(h.share().get(&k).map(|s| s.point), Some((10, 1)));
        h.caught_up(c);
        assert_eq!(h.share().get(&k).map(|s| s.point), Some((30, 1)));
    }

    #[test]
    fn a_rejoin_resumes_only_when_its_ref_continues_the_old_sockets() {
        let h = History::new(CatchupConfig::default());
        let c: Vec<ChannelId> = (0..9).map(|_| ChannelId::next()).collect();
        let k: Key = Arc::from("k");
        let pos = || Arc::new(AtomicU64::new(0));
        let refs = |r: u64| Arc::new(AtomicU64::new(r));
        // A new page (refs from 1 again): fresh, and the position is forgotten.
        h.remember(k.clone(), 7, 40);
        assert_eq!(h.join(&k, c[1], pos(), refs(1), Some(1)), Rejoin::Fresh);
        h.leave(&k, c[1]);
        assert_eq!(h.take(&k), None);
        // supabase-js's own reconnect (refs go on): resumes.
        h.remember(k.clone(), 7, 40);
        assert_eq!(
            h.join(&k, c[2], pos(), refs(41), Some(41)),
            Rejoin::Resume(Resume {
                from: 7,
                gap: false
            })
        );
        h.leave(&k, c[2]);
        // Non-numeric refs (either side) resume as before.
        h.remember(k.clone(), 7, 40);
        assert!(matches!(
            h.join(&k, c[3], pos(), refs(0), None),
            Rejoin::Resume(_)
        ));
        h.leave(&k, c[3]);
        h.remember(k.clone(), 7, 0);
        assert!(matches!(
            h.join(&k, c[4], pos(), refs(1), Some(1)),
            Rejoin::Resume(_)
        ));
        // The old socket not yet noticed as gone: its live ref counts.
        let old_ref = refs(40);
        h.leave(&k, c[4]);
        assert_eq!(
            h.join(&k, c[6], Arc::new(AtomicU64::new(3)), old_ref, Some(40)),
            Rejoin::New
        );
        assert_eq!(
            h.join(&k, c[7], pos(), refs(41), Some(41)),
            Rejoin::Resume(Resume {
                from: 3,
                gap: false
            })
        );
        assert_eq!(h.join(&k, c[8], pos(), refs(1), Some(1)), Rejoin::Fresh);
    }
}
