//! The other nodes: who is alive (heartbeats, the node timeout, goodbyes), and keeping this
//! node's copy of their presences in step with their heartbeats.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use super::wire::{self, Message};
use super::{Cluster, Peer};
use crate::telemetry;

impl Cluster {
    /// Marks a node alive (a new one is logged; one that replaced an older process of the same
    /// name makes that one gone).
    pub(super) fn heard_from(&self, origin: u64, name: Option<&str>) {
        self.heard_from_with(origin, name, None);
    }

    /// The same, with the change stream position its heartbeat reported.
    fn heard_from_with(&self, origin: u64, name: Option<&str>, pg_position: Option<u64>) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match peers.get_mut(&origin) {
            Some(p) => {
                p.last_heard = now;
                if name.is_some() {
                    p.pg_position = pg_position;
                }
                if let Some(n) = name.filter(|n| *n != p.name) {
                    p.name = n.to_owned();
                }
            }
            None => {
                let name = name.unwrap_or("?").to_owned();
                // A node restarted under the same name: the old one is gone.
                let replaced: Vec<u64> = peers
                    .iter()
                    .filter(|(_, p)| name != "?" && p.name == name)
                    .map(|(id, _)| *id)
                    .collect();
                tracing::info!(peer = %name, "cluster: a node joined");
                peers.insert(
                    origin,
                    Peer {
                        name,
                        last_heard: now,
                        pg_position,
                    },
                );
                metrics::gauge!(telemetry::CLUSTER_PEERS).set(peers.len() as f64);
                drop(peers);
                for old in replaced {
                    self.node_gone(old);
                }
            }
        }
    }

    /// A node stopped or was cut off: its presences leave.
    pub(super) fn node_gone(&self, origin: u64) {
        let name = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let gone = peers.remove(&origin);
            metrics::gauge!(telemetry::CLUSTER_PEERS).set(peers.len() as f64);
            gone.map(|p| p.name)
        };
        tracing::warn!(
            peer = name.as_deref().unwrap_or("?"),
            "cluster: node gone (shut down, or not heard from within CLUSTER_NODE_TIMEOUT_MS); removing its presences"
        );
        self.remote_seqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(_, o), _| *o != origin);
        // Its channels' last published positions are remembered here now.
        if let Some(a) = self.pg.get() {
            a.pg.cluster_node_gone(origin);
        }
        for (key, diff) in self.presence.drop_remote_origin(origin) {
            self.deliver_presence(&key, &diff);
        }
    }

    /// A heartbeat from another node.
    pub(super) fn on_heartbeat(
        &self,
        origin: u64,
        node: &str,
        topics: Vec<(String, u64)>,
        position: Option<u64>,
    ) {
        if origin == self.instance {
            return;
        }
        self.heard_from_with(origin, Some(node), position);
        let listed: HashMap<String, u64> = topics.into_iter().collect();
        let followed = self.followed_topics();
        let mut resync = Vec::new();
        let mut drop = Vec::new();
        {
            let mut seqs = self.remote_seqs.lock().unwrap_or_else(|p| p.into_inner());
            for key in &followed {
                let listed_seq = listed.get(&wire::topic_id(key)).copied();
                let known = seqs.contains_key(&(key.clone(), origin));
                if listed_seq.is_none() && !known {
                    continue;
                }
                let rec = seqs.entry((key.clone(), origin)).or_default();
                if listed_seq == Some(rec.last) {
                    rec.mismatches = 0;
                    continue;
                }
                // Twice in a row: a message in flight explains one, not two.
                rec.mismatches += 1;
                if rec.mismatches < 2 {
                    continue;
                }
                rec.mismatches = 0;
                match listed_seq {
                    Some(_) => resync.push(key.clone()),
                    None => drop.push(key.clone()),
                }
            }
            for key in &drop {
                seqs.remove(&(key.clone(), origin));
            }
        }
        for key in drop {
            if let Some(diff) = self.presence.drop_remote(&key, origin) {
                self.deliver_presence(&key, &diff);
            }
        }
        for key in resync {
            tracing::info!(topic = %key.topic, peer = node, "cluster: presence out of step with a node; asking for a snapshot");
            self.request_sync(&key);
        }
    }

    pub(super) async fn heartbeats_in(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(m) = sub.next().await {
            match wire::decode(&m.payload) {
                Some(Message::Heartbeat {
                    origin,
                    node,
                    topics,
                    position,
                }) => self.on_heartbeat(origin, &node, topics, position),
                Some(Message::Bye { origin }) if origin != self.instance => {
                    tracing::info!("cluster: a node is shutting down");
                    self.node_gone(origin);
                }
                Some(Message::Bye { .. }) => {}
                _ => {
                    metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "malformed")
                        .increment(1);
                }
            }
        }
    }

    /// Announces this node every `CLUSTER_HEARTBEAT_MS`, and drops nodes not heard from.
    pub(super) async fn heartbeats_out(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let topics: Vec<(String, u64)> = {
                let mut numbering = self.numbering.lock().unwrap_or_else(|p| p.into_inner());
                // Topics with no presence here any more leave the list (their last number
                // reached the others, which then drop their copy).
                numbering.last.retain(|k, _| self.presence.has_local(k));
                numbering
                    .last
                    .iter()
                    .map(|(k, s)| (wire::topic_id(k), *s))
                    .collect()
            };
            let bytes = wire::encode(&Message::Heartbeat {
                origin: self.instance,
                node: self.settings.node.clone(),
                topics,
                position: self.pg.get().map(|a| a.status.position()),
            });
            self.send(
                wire::heartbeat_subject(&self.settings.prefix),
                bytes,
                "heartbeat",
            );
            let now = Instant::now();
            let gone: Vec<u64> = self
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, p)| now.duration_since(p.last_heard) > self.settings.node_timeout)
                .map(|(id, _)| *id)
                .collect();
            for origin in gone {
                self.node_gone(origin);
            }
        }
    }

    /// At shutdown, tells the other nodes at once, so this node's presences leave there now
    /// rather than after `CLUSTER_NODE_TIMEOUT_MS`; its catch-up positions go before, and again
    /// once its sockets are closed.
    pub(super) async fn goodbye(
        self: Arc<Self>,
        client: async_nats::Client,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let _ = shutdown.wait_for(|down| *down).await;
        // The sockets close now: their positions go first, so that a client rejoining on
        // another node resumes there (RELIABILITY.md, "Several nodes").
        let positions = self.last_positions();
        let bytes = wire::encode(&Message::Bye {
            origin: self.instance,
        });
        let sent = tokio::time::timeout(Duration::from_secs(1), async {
            for p in positions {
                client
                    .publish(wire::positions_subject(&self.settings.prefix), p)
                    .await
                    .ok()?;
            }
            client
                .publish(wire::heartbeat_subject(&self.settings.prefix), bytes)
                .await
                .ok()?;
            client.flush().await.ok()
        })
        .await;
        if !matches!(sent, Ok(Some(()))) {
            tracing::warn!("cluster: could not tell the other nodes this one is leaving; its presences leave there after CLUSTER_NODE_TIMEOUT_MS");
        }
        // Once the sockets are closed (flushed: everything delivered counts as received, as
        // on one node), their positions again, exact now.
        let Some(pg) = self.pg.get().map(|a| a.pg.clone()) else {
            return;
        };
        let closed = tokio::time::timeout(Duration::from_millis(1500), async {
            while !pg.none_live() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if closed.is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            for p in self.last_positions() {
                client
                    .publish(wire::positions_subject(&self.settings.prefix), p)
                    .await
                    .ok()?;
            }
            client.flush().await.ok()
        })
        .await;
    }
}
