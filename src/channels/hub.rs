//! Topic → local subscribers, and the fan-out loop.
//!
//! The map is sharded by topic so that joins and publishes on different topics never contend,
//! and a publish only takes a shard's read lock. Each message is encoded at most once per
//! serializer ([`Fanout::frame`]) and the bytes are shared by every subscriber's queue.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use serde_json::value::RawValue;

use super::outbound::{Outbound, Rejected};
use super::{ChannelId, TopicKey};
use crate::protocol::{encode, Frame, UserBroadcast, Vsn};

const SHARDS: usize = 64;

/// One joined channel as the hub sees it.
#[derive(Clone)]
pub struct Subscriber {
    pub channel: ChannelId,
    pub vsn: Vsn,
    pub outbound: Arc<Outbound>,
    /// May receive broadcasts (always on public topics; the read policy on private ones).
    pub broadcast: bool,
    /// May receive presence diffs.
    pub presence: bool,
    /// Ids of messages this channel got by replay: the live copies are not sent again.
    pub replayed: Option<Arc<std::collections::HashSet<String>>>,
}

impl Subscriber {
    /// A subscriber of a public topic: it receives everything.
    pub fn public(channel: ChannelId, vsn: Vsn, outbound: Arc<Outbound>) -> Self {
        Self {
            channel,
            vsn,
            outbound,
            broadcast: true,
            presence: true,
            replayed: None,
        }
    }
}

/// What a fan-out is, for per-subscriber permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FanoutKind {
    Broadcast,
    Presence,
}

/// What is being fanned out.
#[derive(Debug)]
pub enum FanoutPayload {
    /// A JSON event (`broadcast`, `presence_diff`, ...) with its payload as JSON text.
    Json {
        event: &'static str,
        payload: Box<RawValue>,
    },
    /// A user broadcast: kind-4 binary for V2 sockets, JSON for V1 sockets.
    User(UserBroadcast),
}

/// A message on its way to every subscriber of a topic, with its encodings cached.
pub struct Fanout {
    topic: Arc<str>,
    payload: FanoutPayload,
    kind: FanoutKind,
    /// The stored message's id (broadcast from the database), for replay de-duplication.
    message_id: Option<String>,
    v1: OnceLock<Option<Frame>>,
    v2: OnceLock<Option<Frame>>,
}

impl Fanout {
    pub fn new(topic: Arc<str>, payload: FanoutPayload) -> Self {
        let kind = match &payload {
            FanoutPayload::Json {
                event: "presence_diff",
                ..
            } => FanoutKind::Presence,
            _ => FanoutKind::Broadcast,
        };
        Self {
            topic,
            payload,
            kind,
            message_id: None,
            v1: OnceLock::new(),
            v2: OnceLock::new(),
        }
    }

    /// Marks the fan-out as the stored message `id`.
    pub fn with_message_id(mut self, id: String) -> Self {
        self.message_id = Some(id);
        self
    }

    pub fn payload(&self) -> &FanoutPayload {
        &self.payload
    }

    pub fn kind(&self) -> FanoutKind {
        self.kind
    }

    /// The stored message's id, when it is one (broadcast from the database).
    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// The frame for a serializer, encoded on first use. `None` when this serializer cannot carry
    /// the message (a binary payload to a V1 socket).
    pub fn frame(&self, vsn: Vsn) -> Option<Frame> {
        let cell = match vsn {
            Vsn::V1 => &self.v1,
            Vsn::V2 => &self.v2,
        };
        cell.get_or_init(|| match &self.payload {
            FanoutPayload::Json { event, payload } => {
                Some(encode::fastlane(vsn, &self.topic, event, payload))
            }
            FanoutPayload::User(ub) => encode::user_broadcast(vsn, &self.topic, ub),
        })
        .clone()
    }
}

type Shard = RwLock<HashMap<TopicKey, Vec<Subscriber>>>;

/// The topics whose local subscribers went from none to some or back, for a cluster broker that
/// follows only the topics this node has subscribers for. A set, not a queue: its size is
/// bounded by the number of topics, and the broker reads the hub's current count for each.
#[derive(Default)]
pub struct Interest {
    changed: Mutex<HashSet<TopicKey>>,
    notify: tokio::sync::Notify,
}

impl Interest {
    fn mark(&self, key: &TopicKey) {
        self.changed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        self.notify.notify_one();
    }

    /// Waits until some topic changed, then takes the changed topics.
    pub async fn changed(&self) -> Vec<TopicKey> {
        loop {
            let taken: Vec<TopicKey> = self
                .changed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .collect();
            if !taken.is_empty() {
                return taken;
            }
            self.notify.notified().await;
        }
    }
}

pub struct Hub {
    shards: Box<[Shard]>,
    /// Told of topics gaining their first or losing their last local subscriber (cluster mode).
    interest: Option<Arc<Interest>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            interest: None,
        }
    }

    /// A hub that reports topics gaining or losing local interest to the returned watch.
    pub fn with_interest() -> (Self, Arc<Interest>) {
        let interest = Arc::new(Interest::default());
        let hub = Self {
            interest: Some(interest.clone()),
            ..Self::new()
        };
        (hub, interest)
    }

    fn shard(&self, key: &TopicKey) -> &Shard {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    pub fn subscribe(&self, key: &TopicKey, sub: Subscriber) {
        let mut map = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        let subs = map.entry(key.clone()).or_default();
        subs.push(sub);
        if subs.len() == 1 {
            if let Some(interest) = &self.interest {
                interest.mark(key);
            }
        }
    }

    pub fn unsubscribe(&self, key: &TopicKey, channel: ChannelId) {
        let mut map = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        if let Some(subs) = map.get_mut(key) {
            subs.retain(|s| s.channel != channel);
            if subs.is_empty() {
                map.remove(key);
                if let Some(interest) = &self.interest {
                    interest.mark(key);
                }
            }
        }
    }

    /// Local subscribers of a topic.
    pub fn subscriber_count(&self, key: &TopicKey) -> usize {
        let map = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        map.get(key).map_or(0, Vec::len)
    }

    /// Number of topics with at least one local subscriber.
    pub fn topic_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Delivers to every local subscriber of `key` except `except`; returns how many queued it.
    /// Never waits on a subscriber: a full queue disconnects that subscriber (see `Outbound`).
    pub fn publish(&self, key: &TopicKey, msg: &Fanout, except: Option<ChannelId>) -> usize {
        let map = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        let Some(subs) = map.get(key) else {
            return 0;
        };
        let mut delivered = 0;
        for sub in subs {
            if Some(sub.channel) == except {
                continue;
            }
            let allowed = match msg.kind {
                FanoutKind::Broadcast => sub.broadcast,
                FanoutKind::Presence => sub.presence,
            };
            if !allowed {
                continue;
            }
            if let (Some(id), Some(replayed)) = (&msg.message_id, &sub.replayed) {
                if replayed.contains(id) {
                    continue;
                }
            }
            let Some(frame) = msg.frame(sub.vsn) else {
                continue;
            };
            match sub.outbound.push(frame) {
                Ok(()) => delivered += 1,
                Err(Rejected::Overflow) => {
                    tracing::warn!(
                        topic = %key.topic,
                        "disconnecting slow consumer: outbound queue full"
                    );
                }
                Err(Rejected::Closed) => {}
            }
        }
        let kind = match msg.kind {
            FanoutKind::Broadcast => "broadcast",
            FanoutKind::Presence => "presence",
        };
        metrics::counter!(crate::telemetry::MESSAGES_OUT, "kind" => kind)
            .increment(delivered as u64);
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(vsn: Vsn) -> (Subscriber, Arc<Outbound>) {
        let q = Arc::new(Outbound::new(1 << 20));
        (Subscriber::public(ChannelId::next(), vsn, q.clone()), q)
    }

    fn json_fanout(topic: &TopicKey) -> Fanout {
        Fanout::new(
            topic.topic.clone(),
            FanoutPayload::Json {
                event: "broadcast",
                payload: RawValue::from_string("{\"a\":1}".into()).unwrap(),
            },
        )
    }

    #[test]
    fn publishes_to_all_but_the_sender_and_encodes_once_per_serializer() {
        let hub = Hub::new();
        let key = TopicKey::new("realtime:a", false);
        let (a, qa) = sub(Vsn::V1);
        let (b, qb) = sub(Vsn::V2);
        let (c, qc) = sub(Vsn::V2);
        let sender = a.channel;
        hub.subscribe(&key, a);
        hub.subscribe(&key, b);
        hub.subscribe(&key, c);
        let msg = json_fanout(&key);
        assert_eq!(hub.publish(&key, &msg, Some(sender)), 2);
        assert_eq!(qa.queued_bytes(), 0);
        assert!(qb.queued_bytes() > 0 && qb.queued_bytes() == qc.queued_bytes());
        // Same bytes shared: the cached V2 frame is what both queues hold.
        assert!(msg.v2.get().is_some() && msg.v1.get().is_none());
    }

    #[test]
    fn public_and_private_never_mix() {
        let hub = Hub::new();
        let public = TopicKey::new("realtime:a", false);
        let private = TopicKey::new("realtime:a", true);
        let (s, q) = sub(Vsn::V2);
        hub.subscribe(&private, s);
        assert_eq!(hub.publish(&public, &json_fanout(&public), None), 0);
        assert_eq!(q.queued_bytes(), 0);
    }

    #[test]
    fn unsubscribe_removes_empty_topics() {
        let hub = Hub::new();
        let key = TopicKey::new("realtime:a", false);
        let (s, _q) = sub(Vsn::V2);
        let id = s.channel;
        hub.subscribe(&key, s);
        assert_eq!(hub.topic_count(), 1);
        hub.unsubscribe(&key, id);
        assert_eq!(hub.topic_count(), 0);
    }
}
