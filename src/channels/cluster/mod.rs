//! Cluster mode: several walcast nodes behind one NATS (`CLUSTER_NATS_URL`).
//!
//! - Broadcast: [`ClusterBroker::publish`] delivers to this node's hub, then hands the message,
//!   encoded once in a node-neutral form ([`wire`]), to one forwarder task that publishes it on
//!   the topic's subject. A node subscribes to a topic's subject only while it has local
//!   subscribers ([`crate::channels::hub::Interest`]); every node receives what the others
//!   publish (never its own: the connection is `no_echo`) and fans it out to its hub, which
//!   encodes once per serializer. `self: false` and acks stay with the publishing node, which
//!   alone knows the sender's channel.
//! - Presence: each node publishes diffs of its own presences, numbered per node, on the
//!   topic's subject; other nodes keep a copy per (topic, node) in [`Presence`] and fan out
//!   only what changed their copy. A node that starts following a topic, sees a gap in a
//!   node's numbers, or reconnects to NATS asks for snapshots. Heartbeats carry each node's
//!   last number per topic: a number that stays different for two heartbeats asks for a
//!   snapshot, a topic that stays missing drops the copy, and a node not heard from for
//!   `CLUSTER_NODE_TIMEOUT_MS` has all its presences dropped, with leaves.
//! - Trouble: NATS down or a slow consumer is a metric, a log line and, on the topics this node
//!   follows, a `system` message saying messages from other nodes may have been lost; local
//!   traffic never waits on NATS (a full publish queue drops, counted).
//!
//! Here: the broker, following topics, messages on a topic's subject, NATS events;
//! [`wire`]: subjects and message encoding; `peers.rs`: heartbeats, node liveness, goodbyes;
//! `changes.rs`: the change stream; `positions.rs`: catch-up positions shared across nodes.

mod changes;
mod peers;
pub mod positions;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, value::RawValue, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::hub::{Fanout, FanoutKind, FanoutPayload, Hub, Interest};
use super::{Broker, ChannelId, Presence, TopicKey};
use crate::config::ClusterSettings;
use crate::telemetry;
use wire::Message;

/// Events from the NATS client waiting for the event task; more are dropped (they are rare).
const EVENT_QUEUE: usize = 64;

/// The message sent to a followed topic's channels when messages from other nodes may have
/// been lost.
pub const LOST_MESSAGES: &str =
    "Messages from other nodes may have been lost: the connection to the cluster broker (NATS) was interrupted or fell behind";

/// What another node's presence numbers on one topic look like from here.
#[derive(Default)]
struct RemoteSeq {
    /// The number of the last diff or snapshot applied.
    last: u64,
    /// Heartbeats in a row whose number differed from `last` (or that did not list the topic).
    mismatches: u8,
}

/// Another node.
struct Peer {
    name: String,
    last_heard: Instant,
    /// How far it has delivered the change stream, from its last heartbeat (`None`: it does
    /// not stream changes).
    pg_position: Option<u64>,
}

/// This node's presence numbering: one counter for all topics, and per topic the number of its
/// last presence message (only for topics with presences here).
#[derive(Default)]
struct Numbering {
    counter: u64,
    last: HashMap<TopicKey, u64>,
}

/// The cluster's shared state.
pub struct Cluster {
    settings: ClusterSettings,
    /// This process's id among the nodes (a restarted node with the same name is a new one).
    instance: u64,
    hub: Arc<Hub>,
    presence: Arc<Presence>,
    outbox: mpsc::Sender<(String, Bytes)>,
    numbering: Mutex<Numbering>,
    remote_seqs: Mutex<HashMap<(TopicKey, u64), RemoteSeq>>,
    peers: Mutex<HashMap<u64, Peer>>,
    connected: AtomicBool,
    /// Topics this node follows (has a NATS subscription for), with their reader task.
    followed: Mutex<HashMap<TopicKey, JoinHandle<()>>>,
    client: async_nats::Client,
    /// The change stream's state, once postgres_changes runs ([`Cluster::changes_tasks`]).
    pg: std::sync::OnceLock<changes::Attached>,
}

/// The broker of a node in a cluster.
pub struct ClusterBroker {
    cluster: Arc<Cluster>,
}

impl Broker for ClusterBroker {
    fn publish(&self, key: &TopicKey, msg: Fanout, except: Option<ChannelId>) -> usize {
        let delivered = self.cluster.hub.publish(key, &msg, except);
        self.cluster.forward(key, &msg);
        delivered
    }
}

/// The health view of the cluster.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterHealth {
    pub node: String,
    pub broker_connected: bool,
    pub peers: Vec<String>,
}

/// A named task the composition root runs until shutdown.
pub type Task = (
    &'static str,
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
);

/// What `start` hands to the composition root: the broker, and the tasks to run.
pub struct Started {
    pub cluster: Arc<Cluster>,
    pub broker: Arc<dyn Broker>,
    /// Run until shutdown.
    pub tasks: Vec<Task>,
    /// Runs at shutdown: tells the other nodes this one is leaving.
    pub goodbye: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl Cluster {
    /// Connects to NATS (in the background: walcast serves local traffic while NATS is away)
    /// and builds the broker and its tasks.
    pub async fn start(
        settings: ClusterSettings,
        hub: Arc<Hub>,
        interest: Arc<Interest>,
        presence: Arc<Presence>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Started, ClusterError> {
        let (events_tx, events_rx) = mpsc::channel::<async_nats::Event>(EVENT_QUEUE);
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("walcast {}", settings.node))
            .no_echo()
            .retry_on_initial_connect()
            // A silent connection (a partition that drops packets) is found dead after two
            // unanswered pings: about one node timeout, as the other nodes judge this one.
            .ping_interval((settings.node_timeout / 2).max(Duration::from_millis(100)))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64).saturating_mul(100).min(2_000))
            })
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.try_send(event);
                }
            });
        if let Some(path) = &settings.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| ClusterError(format!("CLUSTER_NATS_CREDS_FILE: {e}")))?;
        }
        if let Some(path) = &settings.tls_ca_file {
            options = options
                .add_root_certificates(path.clone())
                .require_tls(true);
        }
        let addrs: Vec<async_nats::ServerAddr> = settings
            .urls
            .iter()
            .filter_map(|u| u.parse().ok())
            .collect();
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| ClusterError(format!("NATS: {e}")))?;
        let (outbox, outbox_rx) = mpsc::channel(settings.publish_queue);
        metrics::gauge!(telemetry::CLUSTER_NODE, "node" => settings.node.clone()).set(1.0);
        metrics::gauge!(telemetry::CLUSTER_CONNECTED).set(0.0);
        let cluster = Arc::new(Cluster {
            instance: rand::random::<u64>() | 1,
            settings,
            hub,
            presence,
            outbox,
            numbering: Mutex::new(Numbering::default()),
            remote_seqs: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            followed: Mutex::new(HashMap::new()),
            client: client.clone(),
            pg: std::sync::OnceLock::new(),
        });
        tracing::info!(node = %cluster.settings.node, urls = cluster.settings.urls.len(), "cluster mode: connecting to NATS");
        let heartbeats = client
            .subscribe(wire::heartbeat_subject(&cluster.settings.prefix))
            .await
            .map_err(|e| ClusterError(format!("NATS subscribe: {e}")))?;
        let tasks: Vec<Task> = vec![
            (
                "cluster forwarder",
                Box::pin(forward(client.clone(), outbox_rx)),
            ),
            (
                "cluster interest",
                Box::pin(cluster.clone().follow(client.clone(), interest)),
            ),
            (
                "cluster events",
                Box::pin(cluster.clone().events(client.clone(), events_rx)),
            ),
            (
                "cluster heartbeats in",
                Box::pin(cluster.clone().heartbeats_in(heartbeats)),
            ),
            (
                "cluster heartbeats out",
                Box::pin(cluster.clone().heartbeats_out()),
            ),
        ];
        let goodbye = Box::pin(cluster.clone().goodbye(client, shutdown));
        Ok(Started {
            broker: Arc::new(ClusterBroker {
                cluster: cluster.clone(),
            }),
            cluster,
            tasks,
            goodbye,
        })
    }

    pub fn health(&self) -> ClusterHealth {
        let mut peers: Vec<String> = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|p| p.name.clone())
            .collect();
        peers.sort();
        ClusterHealth {
            node: self.settings.node.clone(),
            broker_connected: self.connected.load(Ordering::Relaxed),
            peers,
        }
    }

    /// `CLUSTER_NODE_TIMEOUT_MS`.
    pub fn node_timeout(&self) -> Duration {
        self.settings.node_timeout
    }

    fn subject(&self, key: &TopicKey) -> String {
        wire::topic_subject(&self.settings.prefix, key)
    }

    /// Queues a message for NATS; a full queue drops it (counted, logged).
    fn send(&self, subject: String, bytes: Bytes, kind: &'static str) {
        match self.outbox.try_send((subject, bytes)) {
            Ok(()) => {
                metrics::counter!(telemetry::CLUSTER_MESSAGES_OUT, "kind" => kind).increment(1)
            }
            Err(_) => {
                metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "publish_queue_full")
                    .increment(1);
                tracing::warn!(kind, "cluster publish queue full (CLUSTER_PUBLISH_QUEUE): message not sent to other nodes");
            }
        }
    }

    /// Sends what was just delivered locally to the other nodes.
    fn forward(&self, key: &TopicKey, msg: &Fanout) {
        match msg.kind() {
            FanoutKind::Broadcast => {
                if let Some(bytes) = wire::encode_fanout(msg) {
                    self.send(self.subject(key), bytes, "broadcast");
                }
            }
            FanoutKind::Presence => {
                let FanoutPayload::Json { payload, .. } = msg.payload() else {
                    return;
                };
                // Numbered and queued under one lock: the queue holds them in number order.
                let mut numbering = self.numbering.lock().unwrap_or_else(|p| p.into_inner());
                numbering.counter += 1;
                let seq = numbering.counter;
                let prev = numbering.last.insert(key.clone(), seq).unwrap_or(0);
                let bytes = wire::encode(&Message::Diff {
                    origin: self.instance,
                    seq,
                    prev,
                    diff: payload.get().as_bytes().to_vec(),
                });
                self.send(self.subject(key), bytes, "presence");
            }
        }
    }

    /// Sends a snapshot of this node's presences on a topic (when it has any, or had some).
    fn send_snapshot(&self, key: &TopicKey) {
        let numbering = self.numbering.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&seq) = numbering.last.get(key) else {
            return;
        };
        let state = self.presence.local_state(key);
        let bytes = wire::encode(&Message::Snapshot {
            origin: self.instance,
            seq,
            state: state.to_string().into_bytes(),
        });
        self.send(self.subject(key), bytes, "presence");
    }

    fn request_sync(&self, key: &TopicKey) {
        metrics::counter!(telemetry::CLUSTER_RESYNCS).increment(1);
        let bytes = wire::encode(&Message::SyncRequest {
            origin: self.instance,
        });
        self.send(self.subject(key), bytes, "control");
    }

    /// Fans out a presence diff to this node's subscribers only.
    fn deliver_presence(&self, key: &TopicKey, diff: &Value) {
        let Ok(payload) = RawValue::from_string(diff.to_string()) else {
            return;
        };
        self.hub.publish(
            key,
            &Fanout::new(
                key.topic.clone(),
                FanoutPayload::Json {
                    event: "presence_diff",
                    payload,
                },
            ),
            None,
        );
    }

    /// Tells this node's subscribers of a topic that messages from other nodes may be lost.
    fn tell_lost(&self, key: &TopicKey) {
        let channel = key
            .topic
            .strip_prefix(crate::protocol::TOPIC_PREFIX)
            .unwrap_or(&key.topic);
        let body = json!({
            "extension": "broadcast",
            "status": "error",
            "message": LOST_MESSAGES,
            "channel": channel,
        });
        let Ok(payload) = RawValue::from_string(body.to_string()) else {
            return;
        };
        self.hub.publish(
            key,
            &Fanout::new(
                key.topic.clone(),
                FanoutPayload::Json {
                    event: "system",
                    payload,
                },
            ),
            None,
        );
    }

    fn followed_topics(&self) -> Vec<TopicKey> {
        self.followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Handles one message on a followed topic's subject.
    fn on_topic_message(&self, key: &TopicKey, bytes: &Bytes) {
        let Some(msg) = wire::decode(bytes) else {
            metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "malformed").increment(1);
            tracing::warn!(topic = %key.topic, "cluster: malformed message from another node dropped");
            return;
        };
        match msg {
            Message::Broadcast(b) => {
                metrics::counter!(telemetry::CLUSTER_MESSAGES_IN, "kind" => "broadcast")
                    .increment(1);
                if let Some(fanout) = b.into_fanout(key) {
                    self.hub.publish(key, &fanout, None);
                }
            }
            Message::Diff {
                origin,
                seq,
                prev,
                diff,
            } => {
                metrics::counter!(telemetry::CLUSTER_MESSAGES_IN, "kind" => "presence")
                    .increment(1);
                self.heard_from(origin, None);
                let Ok(diff) = serde_json::from_slice::<Value>(&diff) else {
                    return;
                };
                let gap = {
                    let mut seqs = self.remote_seqs.lock().unwrap_or_else(|p| p.into_inner());
                    let rec = seqs.entry((key.clone(), origin)).or_default();
                    if seq <= rec.last {
                        return;
                    }
                    let gap = rec.last != prev;
                    rec.last = seq;
                    gap
                };
                if let Some(effective) = self.presence.apply_remote_diff(key, origin, &diff) {
                    self.deliver_presence(key, &effective);
                }
                if gap {
                    tracing::info!(topic = %key.topic, "cluster: presence messages missed; asking for a snapshot");
                    self.request_sync(key);
                }
            }
            Message::Snapshot { origin, seq, state } => {
                metrics::counter!(telemetry::CLUSTER_MESSAGES_IN, "kind" => "presence")
                    .increment(1);
                self.heard_from(origin, None);
                let Ok(state) = serde_json::from_slice::<Value>(&state) else {
                    return;
                };
                {
                    let mut seqs = self.remote_seqs.lock().unwrap_or_else(|p| p.into_inner());
                    let rec = seqs.entry((key.clone(), origin)).or_default();
                    if seq < rec.last {
                        return;
                    }
                    rec.last = seq;
                    rec.mismatches = 0;
                }
                if let Some(diff) = self.presence.replace_remote(key, origin, &state) {
                    self.deliver_presence(key, &diff);
                }
            }
            Message::SyncRequest { origin } => {
                metrics::counter!(telemetry::CLUSTER_MESSAGES_IN, "kind" => "control").increment(1);
                if origin != self.instance {
                    self.send_snapshot(key);
                }
            }
            Message::Heartbeat { .. }
            | Message::Bye { .. }
            | Message::Wal { .. }
            | Message::Position { .. }
            | Message::Positions { .. } => {}
        }
    }

    /// Follows the topics this node has subscribers for: a NATS subscription and a reader task
    /// each, started at the first local subscriber and stopped after the last.
    async fn follow(self: Arc<Self>, client: async_nats::Client, interest: Arc<Interest>) {
        loop {
            for key in interest.changed().await {
                let want = self.hub.subscriber_count(&key) > 0;
                let have = self
                    .followed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&key);
                if want && !have {
                    // A clean slate: what a reader stopped mid-message may have left behind.
                    self.presence.forget_remote_topic(&key);
                    let mut sub = match client.subscribe(self.subject(&key)).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(topic = %key.topic, error = %e, "cluster: could not subscribe; this topic gets no messages from other nodes");
                            continue;
                        }
                    };
                    let me = self.clone();
                    let k = key.clone();
                    let reader = tokio::spawn(async move {
                        while let Some(m) = sub.next().await {
                            me.on_topic_message(&k, &m.payload);
                        }
                    });
                    self.followed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone(), reader);
                    metrics::gauge!(telemetry::CLUSTER_TOPICS).increment(1.0);
                    // Who is already present on the other nodes.
                    self.request_sync(&key);
                } else if !want && have {
                    if let Some(reader) = self
                        .followed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key)
                    {
                        // Dropping the subscription unsubscribes.
                        reader.abort();
                    }
                    metrics::gauge!(telemetry::CLUSTER_TOPICS).decrement(1.0);
                    self.presence.forget_remote_topic(&key);
                    self.remote_seqs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|(k, _), _| *k != key);
                }
            }
        }
    }

    /// The NATS client's events: connection state, slow consumers, errors.
    async fn events(
        self: Arc<Self>,
        client: async_nats::Client,
        mut rx: mpsc::Receiver<async_nats::Event>,
    ) {
        let mut lost = false;
        while let Some(event) = rx.recv().await {
            match event {
                async_nats::Event::Connected => {
                    self.connected.store(true, Ordering::Relaxed);
                    metrics::gauge!(telemetry::CLUSTER_CONNECTED).set(1.0);
                    tracing::info!(node = %self.settings.node, "cluster: connected to NATS");
                    let nats_max = client.server_info().max_payload;
                    if nats_max > 0 && nats_max < self.settings.largest_payload.saturating_add(1024)
                    {
                        tracing::warn!(
                            nats_max_payload = nats_max,
                            largest_payload = self.settings.largest_payload,
                            "cluster: the NATS server's max_payload is below TENANT_MAX_PAYLOAD_SIZE_IN_KB: larger broadcasts reach only this node's subscribers (raise max_payload in nats-server's configuration)"
                        );
                    }
                    if std::mem::take(&mut lost) {
                        self.changes_lost();
                        // What was missed meanwhile: told, and presence resynchronised.
                        for key in self.followed_topics() {
                            self.tell_lost(&key);
                            self.request_sync(&key);
                        }
                    }
                }
                async_nats::Event::Disconnected => {
                    lost = true;
                    self.connected.store(false, Ordering::Relaxed);
                    metrics::gauge!(telemetry::CLUSTER_CONNECTED).set(0.0);
                    metrics::counter!(telemetry::CLUSTER_DISCONNECTS).increment(1);
                    tracing::warn!(node = %self.settings.node, "cluster: disconnected from NATS; serving local traffic and reconnecting");
                }
                async_nats::Event::SlowConsumer(_) => {
                    metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "slow_consumer")
                        .increment(1);
                    tracing::warn!("cluster: messages from other nodes dropped (slow consumer)");
                    self.changes_lost();
                    for key in self.followed_topics() {
                        self.tell_lost(&key);
                        self.request_sync(&key);
                    }
                }
                other => tracing::warn!(event = %other, "cluster: NATS event"),
            }
        }
    }
}

/// Hands queued messages to NATS in order.
async fn forward(client: async_nats::Client, mut rx: mpsc::Receiver<(String, Bytes)>) {
    while let Some((subject, bytes)) = rx.recv().await {
        if let Err(e) = client.publish(subject, bytes).await {
            metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "publish_error").increment(1);
            tracing::warn!(error = %e, "cluster: publish to NATS failed");
        }
    }
}

/// Cluster mode could not start.
#[derive(Debug, thiserror::Error)]
#[error("cluster: {0}")]
pub struct ClusterError(pub String);
