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

pub struct Presence {
    shards: Box<[Mutex<HashMap<TopicKey, TopicState>>]>,
    /// Most bytes one topic's state may hold.
    max_state_bytes: usize,
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
        if topic.bytes - replaced + bytes > self.max_state_bytes {
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
    pub fn state(&self, key: &TopicKey) -> Value {
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
    fn refs_are_unique() {
        assert_ne!(new_ref(), new_ref());
    }
}
