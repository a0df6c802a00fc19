//! Who is present on each topic, in Phoenix.Presence's shapes.
//!
//! Each joined channel tracks at most one entry (its presence key and meta). Tracking, updating
//! and untracking return the `presence_diff` payload to fan out; [`Presence::state`] gives the
//! `presence_state` payload for a channel that just joined.
//!
//! A topic's state is bounded in bytes (`PRESENCE_MAX_STATE_BYTES`): every joiner receives it
//! whole, so without a bound a few large metas made it larger than a socket's outbound queue
//! and every new joiner was disconnected before its join reply. A track that would take the
//! topic past the bound is refused ([`Tracked::Full`]).
//!
//! One file on purpose (about 640 lines, half of it tests): this node's entries and the copies
//! of other nodes' entries (cluster mode) share one state per topic and one byte bound.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use base64::Engine;
use serde_json::{json, Map, Value};

use super::{ChannelId, TopicKey};

const SHARDS: usize = 64;

/// One tracked presence, stored as Phoenix.Tracker stores it: the meta, its `phx_ref`, and
/// after an update the `phx_ref_prev` of the entry it replaced. Every report of the entry
/// (state, the leave half of a later update, the untrack) shows it as stored.
#[derive(Clone, Debug)]
struct Entry {
    channel: ChannelId,
    phx_ref: String,
    phx_ref_prev: Option<String>,
    meta: Map<String, Value>,
    /// What the entry adds to the topic's encoded state (see [`entry_bytes`]).
    bytes: usize,
}

/// Bytes an entry adds to the `presence_state` JSON besides its meta and key: the `phx_ref`,
/// the `{"metas":[...]}` wrapper, quotes and separators (an upper bound).
const ENTRY_OVERHEAD: usize = 64;

/// An entry's share of the encoded state: its meta's JSON, its key, the overhead.
pub fn entry_bytes(presence_key: &str, meta_json_bytes: usize) -> usize {
    meta_json_bytes
        .saturating_add(presence_key.len())
        .saturating_add(ENTRY_OVERHEAD)
}

impl Entry {
    fn to_json(&self) -> Value {
        let mut m = self.meta.clone();
        m.insert("phx_ref".into(), Value::String(self.phx_ref.clone()));
        if let Some(prev) = &self.phx_ref_prev {
            m.insert("phx_ref_prev".into(), Value::String(prev.clone()));
        }
        Value::Object(m)
    }
}

#[derive(Default)]
struct TopicState {
    entries: HashMap<String, Vec<Entry>>,
    /// The sum of the entries' `bytes`.
    bytes: usize,
}

/// Presences another node reported (cluster mode): presence key → metas, each with its `phx_ref`.
type RemoteEntries = HashMap<String, Vec<Value>>;

pub struct Presence {
    shards: Box<[Mutex<HashMap<TopicKey, TopicState>>]>,
    /// Most bytes one topic's state may hold.
    max_state_bytes: usize,
    /// Cluster mode: what each other node (by instance id) has present on each topic this node
    /// follows. Kept apart from the local entries: only the cluster broker changes it, from the
    /// diffs and snapshots the other nodes publish.
    remote: Mutex<HashMap<TopicKey, HashMap<u64, RemoteEntries>>>,
    /// The bytes (by [`entry_bytes`]) of the other nodes' presences per topic, so that
    /// `PRESENCE_MAX_STATE_BYTES` bounds the whole state a joiner receives.
    remote_bytes: Mutex<HashMap<TopicKey, usize>>,
}

/// The result of a track.
#[derive(Debug, PartialEq)]
pub enum Tracked {
    /// A new or changed entry: fan out this `presence_diff` payload.
    Diff(Value),
    /// The same meta was tracked again: nothing to send.
    Unchanged,
    /// The topic's state would pass its bound: nothing changed.
    Full,
}

impl Presence {
    pub fn new(max_state_bytes: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_state_bytes,
            remote: Mutex::new(HashMap::new()),
            remote_bytes: Mutex::new(HashMap::new()),
        }
    }

    fn shard(&self, key: &TopicKey) -> std::sync::MutexGuard<'_, HashMap<TopicKey, TopicState>> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        self.shards[(h.finish() as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks or updates `channel`'s entry under `presence_key`; `meta_json_bytes` is the length
    /// of the meta's JSON text.
    pub fn track(
        &self,
        key: &TopicKey,
        channel: ChannelId,
        presence_key: &str,
        meta: Map<String, Value>,
        meta_json_bytes: usize,
    ) -> Tracked {
        let mut shard = self.shard(key);
        let topic = shard.entry(key.clone()).or_default();
        let bytes = entry_bytes(presence_key, meta_json_bytes);
        let replaced = topic
            .entries
            .get(presence_key)
            .and_then(|es| es.iter().find(|e| e.channel == channel))
            .map_or(0, |e| e.bytes);
        let remote = self
            .remote_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0);
        if (topic.bytes - replaced + bytes).saturating_add(remote) > self.max_state_bytes {
            if topic.entries.is_empty() {
                shard.remove(key);
            }
            return Tracked::Full;
        }
        let entries = topic.entries.entry(presence_key.to_owned()).or_default();
        let new = Entry {
            channel,
            phx_ref: new_ref(),
            phx_ref_prev: None,
            meta,
            bytes,
        };
        match entries.iter_mut().find(|e| e.channel == channel) {
            Some(existing) if existing.meta == new.meta => Tracked::Unchanged,
            Some(existing) => {
                let new = Entry {
                    phx_ref_prev: Some(existing.phx_ref.clone()),
                    ..new
                };
                let old = std::mem::replace(existing, new);
                topic.bytes = topic.bytes - old.bytes + existing.bytes;
                Tracked::Diff(json!({
                    "joins": {presence_key: {"metas": [existing.to_json()]}},
                    "leaves": {presence_key: {"metas": [old.to_json()]}},
                }))
            }
            None => {
                let joined = new.to_json();
                topic.bytes += new.bytes;
                entries.push(new);
                Tracked::Diff(json!({
                    "joins": {presence_key: {"metas": [joined]}},
                    "leaves": {},
                }))
            }
        }
    }

    /// Removes `channel`'s entry; returns the `presence_diff` payload when there was one.
    pub fn untrack(&self, key: &TopicKey, channel: ChannelId, presence_key: &str) -> Option<Value> {
        let mut shard = self.shard(key);
        let topic = shard.get_mut(key)?;
        let entries = topic.entries.get_mut(presence_key)?;
        let at = entries.iter().position(|e| e.channel == channel)?;
        let gone = entries.remove(at);
        if entries.is_empty() {
            topic.entries.remove(presence_key);
        }
        topic.bytes -= gone.bytes;
        if topic.entries.is_empty() {
            shard.remove(key);
        }
        Some(json!({
            "joins": {},
            "leaves": {presence_key: {"metas": [gone.to_json()]}},
        }))
    }

    /// The bytes one topic's state holds (by [`entry_bytes`]).
    pub fn state_bytes(&self, key: &TopicKey) -> usize {
        self.shard(key).get(key).map_or(0, |t| t.bytes)
    }

    /// The `presence_state` payload: `{key: {"metas": [...]}}`, `{}` when nobody is present.
    /// In cluster mode it holds every node's presences.
    pub fn state(&self, key: &TopicKey) -> Value {
        let mut out = match self.local_state(key) {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        for entries in remote.get(key).into_iter().flat_map(HashMap::values) {
            for (pkey, metas) in entries {
                let slot = out
                    .entry(pkey.clone())
                    .or_insert_with(|| json!({ "metas": [] }));
                if let Some(list) = slot.get_mut("metas").and_then(Value::as_array_mut) {
                    list.extend(metas.iter().cloned());
                }
            }
        }
        Value::Object(out)
    }

    /// This node's own presences on a topic, in the `presence_state` shape.
    pub fn local_state(&self, key: &TopicKey) -> Value {
        let shard = self.shard(key);
        let mut out = Map::new();
        if let Some(topic) = shard.get(key) {
            for (pkey, entries) in &topic.entries {
                let metas: Vec<Value> = entries.iter().map(Entry::to_json).collect();
                out.insert(pkey.clone(), json!({ "metas": metas }));
            }
        }
        Value::Object(out)
    }

    /// Whether this node has presences of its own on a topic.
    pub fn has_local(&self, key: &TopicKey) -> bool {
        self.shard(key).contains_key(key)
    }

    /// Applies a `presence_diff` another node (`origin`) published. Returns the diff as it
    /// changed this node's copy (joins of refs not yet known, leaves of refs known), to fan out
    /// locally; `None` when it changed nothing (a repeat, or what a snapshot already held).
    pub fn apply_remote_diff(&self, key: &TopicKey, origin: u64, diff: &Value) -> Option<Value> {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let entries = remote
            .entry(key.clone())
            .or_default()
            .entry(origin)
            .or_default();
        let mut joins = Map::new();
        let mut leaves = Map::new();
        for (pkey, metas) in presence_metas(diff.get("leaves")) {
            let Some(list) = entries.get_mut(pkey) else {
                continue;
            };
            for meta in metas {
                let r = meta_ref(meta);
                if let Some(at) = list.iter().position(|m| meta_ref(m) == r) {
                    push_meta(&mut leaves, pkey, list.remove(at));
                }
            }
            if list.is_empty() {
                entries.remove(pkey);
            }
        }
        for (pkey, metas) in presence_metas(diff.get("joins")) {
            let list = entries.entry(pkey.to_owned()).or_default();
            for meta in metas {
                let r = meta_ref(meta);
                if r.is_some() && !list.iter().any(|m| meta_ref(m) == r) {
                    list.push(meta.clone());
                    push_meta(&mut joins, pkey, meta.clone());
                }
            }
            if list.is_empty() {
                entries.remove(pkey);
            }
        }
        tidy(&mut remote, key, origin);
        self.account(key, &joins, &leaves);
        diff_of(joins, leaves)
    }

    /// Replaces what `origin` has present on a topic with its snapshot (`presence_state`
    /// shape); returns the difference as a diff to fan out locally.
    pub fn replace_remote(&self, key: &TopicKey, origin: u64, state: &Value) -> Option<Value> {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let old = remote
            .entry(key.clone())
            .or_default()
            .remove(&origin)
            .unwrap_or_default();
        let mut new = RemoteEntries::new();
        for (pkey, metas) in presence_metas(Some(state)) {
            let list: Vec<Value> = metas
                .iter()
                .filter(|m| meta_ref(m).is_some())
                .cloned()
                .collect();
            if !list.is_empty() {
                new.insert(pkey.to_owned(), list);
            }
        }
        let mut joins = Map::new();
        let mut leaves = Map::new();
        for (pkey, metas) in &old {
            for m in metas {
                let gone = new
                    .get(pkey)
                    .is_none_or(|l| !l.iter().any(|n| meta_ref(n) == meta_ref(m)));
                if gone {
                    push_meta(&mut leaves, pkey, m.clone());
                }
            }
        }
        for (pkey, metas) in &new {
            for m in metas {
                let known = old
                    .get(pkey)
                    .is_some_and(|l| l.iter().any(|o| meta_ref(o) == meta_ref(m)));
                if !known {
                    push_meta(&mut joins, pkey, m.clone());
                }
            }
        }
        if let Some(by_origin) = remote.get_mut(key) {
            by_origin.insert(origin, new);
        }
        tidy(&mut remote, key, origin);
        self.account(key, &joins, &leaves);
        diff_of(joins, leaves)
    }

    /// Forgets what `origin` has present on one topic; returns the leaves to fan out.
    pub fn drop_remote(&self, key: &TopicKey, origin: u64) -> Option<Value> {
        self.replace_remote(key, origin, &json!({}))
    }

    /// Forgets everything a node (that stopped or was cut off) had present; returns, per topic,
    /// the leaves to fan out.
    pub fn drop_remote_origin(&self, origin: u64) -> Vec<(TopicKey, Value)> {
        let keys: Vec<TopicKey> = {
            let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
            remote
                .iter()
                .filter(|(_, by)| by.contains_key(&origin))
                .map(|(k, _)| k.clone())
                .collect()
        };
        keys.into_iter()
            .filter_map(|k| self.drop_remote(&k, origin).map(|d| (k, d)))
            .collect()
    }

    /// Forgets the other nodes' presences on a topic this node no longer follows.
    pub fn forget_remote_topic(&self, key: &TopicKey) {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        remote.remove(key);
        self.remote_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Counts what a remote change added and removed (called under the `remote` lock).
    fn account(&self, key: &TopicKey, joins: &Map<String, Value>, leaves: &Map<String, Value>) {
        let size = |m: &Map<String, Value>| -> usize {
            m.iter()
                .flat_map(|(pkey, v)| {
                    v.get("metas")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(move |meta| entry_bytes(pkey, meta.to_string().len()))
                })
                .sum()
        };
        let (added, removed) = (size(joins), size(leaves));
        if added == 0 && removed == 0 {
            return;
        }
        let mut bytes = self.remote_bytes.lock().unwrap_or_else(|p| p.into_inner());
        let total = bytes.entry(key.clone()).or_default();
        *total = total.saturating_add(added).saturating_sub(removed);
        if *total == 0 {
            bytes.remove(key);
        }
    }

    /// The bytes of the other nodes' presences on a topic.
    pub fn remote_state_bytes(&self, key: &TopicKey) -> usize {
        self.remote_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// The origins with presences on a topic.
    pub fn remote_origins(&self, key: &TopicKey) -> Vec<u64> {
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        remote
            .get(key)
            .map(|by| by.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// `{key: {"metas": [...]}}` → (key, metas) pairs; anything else is skipped.
fn presence_metas(v: Option<&Value>) -> impl Iterator<Item = (&str, &[Value])> {
    v.and_then(Value::as_object)
        .into_iter()
        .flat_map(|m| m.iter())
        .filter_map(|(k, v)| {
            let metas = v.get("metas")?.as_array()?;
            Some((k.as_str(), metas.as_slice()))
        })
}

fn meta_ref(meta: &Value) -> Option<&str> {
    meta.get("phx_ref").and_then(Value::as_str)
}

fn push_meta(out: &mut Map<String, Value>, pkey: &str, meta: Value) {
    let slot = out
        .entry(pkey.to_owned())
        .or_insert_with(|| json!({ "metas": [] }));
    if let Some(list) = slot.get_mut("metas").and_then(Value::as_array_mut) {
        list.push(meta);
    }
}

fn diff_of(joins: Map<String, Value>, leaves: Map<String, Value>) -> Option<Value> {
    (!joins.is_empty() || !leaves.is_empty()).then(|| json!({ "joins": joins, "leaves": leaves }))
}

/// Removes an origin with nothing present, and a topic with no origin.
fn tidy(remote: &mut HashMap<TopicKey, HashMap<u64, RemoteEntries>>, key: &TopicKey, origin: u64) {
    if let Some(by) = remote.get_mut(key) {
        if by.get(&origin).is_some_and(HashMap::is_empty) {
            by.remove(&origin);
        }
        if by.is_empty() {
            remote.remove(key);
        }
    }
}

/// An opaque, unique `phx_ref`: a per-process random prefix and a counter, base64url encoded.
fn new_ref() -> String {
    static NODE: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let node = *NODE.get_or_init(rand::random::<u32>);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&node.to_be_bytes());
    bytes[4..].copy_from_slice(&n.to_be_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn track_update_untrack_diffs() {
        let p = Presence::new(usize::MAX);
        let key = TopicKey::new("realtime:room", false);
        let ch = ChannelId::next();
        let Tracked::Diff(join) = p.track(&key, ch, "u1", meta(json!({"a":1})), 7) else {
            panic!("expected a diff")
        };
        let first_ref = join["joins"]["u1"]["metas"][0]["phx_ref"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(join["joins"]["u1"]["metas"][0]["a"], 1);
        assert_eq!(join["leaves"], json!({}));

        assert_eq!(
            p.track(&key, ch, "u1", meta(json!({"a":1})), 7),
            Tracked::Unchanged
        );

        let Tracked::Diff(update) = p.track(&key, ch, "u1", meta(json!({"a":2})), 7) else {
            panic!("expected a diff")
        };
        assert_eq!(
            update["joins"]["u1"]["metas"][0]["phx_ref_prev"],
            first_ref.as_str()
        );
        assert_eq!(
            update["leaves"]["u1"]["metas"][0]["phx_ref"],
            first_ref.as_str()
        );

        let state = p.state(&key);
        assert_eq!(state["u1"]["metas"].as_array().unwrap().len(), 1);
        assert_eq!(state["u1"]["metas"][0]["a"], 2);
        // Stored with the ref it replaced, as Phoenix.Tracker stores an update.
        assert_eq!(state["u1"]["metas"][0], update["joins"]["u1"]["metas"][0]);

        // A second update's leave is the first update as stored, phx_ref_prev included.
        let Tracked::Diff(again) = p.track(&key, ch, "u1", meta(json!({"a":3})), 7) else {
            panic!("expected a diff")
        };
        assert_eq!(
            again["leaves"]["u1"]["metas"][0],
            update["joins"]["u1"]["metas"][0]
        );

        let leave = p.untrack(&key, ch, "u1").unwrap();
        assert_eq!(
            leave["leaves"]["u1"]["metas"][0], again["joins"]["u1"]["metas"][0],
            "the untrack reports the stored meta unchanged"
        );
        assert_eq!(leave["leaves"]["u1"]["metas"][0]["a"], 3);
        assert_eq!(p.state(&key), json!({}));
        assert!(p.untrack(&key, ch, "u1").is_none());
    }

    #[test]
    fn two_channels_share_a_key() {
        let p = Presence::new(usize::MAX);
        let key = TopicKey::new("realtime:room", false);
        p.track(&key, ChannelId::next(), "same", meta(json!({"n":1})), 7);
        p.track(&key, ChannelId::next(), "same", meta(json!({"n":2})), 7);
        assert_eq!(p.state(&key)["same"]["metas"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_topics_state_is_bounded_in_bytes() {
        let one = entry_bytes("k", 100);
        let p = Presence::new(2 * one);
        let key = TopicKey::new("realtime:room", false);
        let (a, b, c) = (ChannelId::next(), ChannelId::next(), ChannelId::next());
        assert!(matches!(
            p.track(&key, a, "k", meta(json!({"n":1})), 100),
            Tracked::Diff(_)
        ));
        assert!(matches!(
            p.track(&key, b, "k", meta(json!({"n":2})), 100),
            Tracked::Diff(_)
        ));
        assert_eq!(p.state_bytes(&key), 2 * one);
        // A third entry does not fit; nothing changes.
        assert_eq!(
            p.track(&key, c, "k", meta(json!({"n":3})), 100),
            Tracked::Full
        );
        assert_eq!(p.state(&key)["k"]["metas"].as_array().unwrap().len(), 2);
        // Replacing one's own entry counts the old one out: a smaller meta fits, a larger not.
        assert!(matches!(
            p.track(&key, a, "k", meta(json!({"n":4})), 50),
            Tracked::Diff(_)
        ));
        assert_eq!(
            p.track(&key, a, "k", meta(json!({"n":5})), 200),
            Tracked::Full
        );
        // Leaving frees room.
        p.untrack(&key, b, "k");
        assert!(matches!(
            p.track(&key, c, "k", meta(json!({"n":3})), 100),
            Tracked::Diff(_)
        ));
        p.untrack(&key, a, "k");
        p.untrack(&key, c, "k");
        assert_eq!(p.state_bytes(&key), 0);
        // A refused first track leaves no empty topic behind.
        let other = TopicKey::new("realtime:other", false);
        assert_eq!(p.track(&other, a, "k", Map::new(), 10 * one), Tracked::Full);
        assert_eq!(p.state(&other), json!({}));
    }

    #[test]
    fn remote_diffs_and_snapshots_merge_and_repeat_nothing() {
        let p = Presence::new(usize::MAX);
        let key = TopicKey::new("realtime:room", false);
        p.track(&key, ChannelId::next(), "local", meta(json!({"n":0})), 7);
        let join = json!({"joins": {"u": {"metas": [{"phx_ref": "r1", "n": 1}]}}, "leaves": {}});
        assert_eq!(p.apply_remote_diff(&key, 7, &join), Some(join.clone()));
        // The same diff again (a resend) changes nothing.
        assert_eq!(p.apply_remote_diff(&key, 7, &join), None);
        let state = p.state(&key);
        assert_eq!(state["u"]["metas"][0]["phx_ref"], "r1");
        assert!(state["local"]["metas"][0]["phx_ref"].is_string());
        assert_eq!(p.local_state(&key).as_object().unwrap().len(), 1);
        // A snapshot that holds r2 instead of r1: r1 leaves, r2 joins.
        let snap = json!({"u": {"metas": [{"phx_ref": "r2", "n": 2}]}});
        let d = p.replace_remote(&key, 7, &snap).unwrap();
        assert_eq!(d["joins"]["u"]["metas"][0]["phx_ref"], "r2");
        assert_eq!(d["leaves"]["u"]["metas"][0]["phx_ref"], "r1");
        assert_eq!(p.replace_remote(&key, 7, &snap), None);
        // The node goes away: its presences leave.
        let gone = p.drop_remote_origin(7);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].1["leaves"]["u"]["metas"][0]["phx_ref"], "r2");
        assert!(p.remote_origins(&key).is_empty());
        assert!(p.state(&key).get("u").is_none());
        assert_eq!(p.remote_state_bytes(&key), 0);
    }

    #[test]
    fn the_state_bound_counts_the_other_nodes_presences() {
        let one = entry_bytes("k", 100);
        let p = Presence::new(2 * one + 40);
        let key = TopicKey::new("realtime:room", false);
        let big = "x".repeat(80);
        let remote =
            json!({"joins": {"k": {"metas": [{"phx_ref": "r1", "b": big}]}}, "leaves": {}});
        p.apply_remote_diff(&key, 7, &remote);
        assert!(p.remote_state_bytes(&key) > one);
        assert!(matches!(
            p.track(&key, ChannelId::next(), "k", meta(json!({"n":1})), 100),
            Tracked::Diff(_)
        ));
        // Local and remote together are full.
        assert_eq!(
            p.track(&key, ChannelId::next(), "k", meta(json!({"n":2})), 100),
            Tracked::Full
        );
        // The remote presence leaves: room again.
        p.drop_remote_origin(7);
        assert_eq!(p.remote_state_bytes(&key), 0);
        assert!(matches!(
            p.track(&key, ChannelId::next(), "k", meta(json!({"n":2})), 100),
            Tracked::Diff(_)
        ));
    }

    #[test]
    fn refs_are_unique() {
        assert_ne!(new_ref(), new_ref());
    }
}
