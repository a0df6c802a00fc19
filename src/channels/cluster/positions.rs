//! Catch-up positions across nodes (RELIABILITY.md, "Several nodes"): every node publishes,
//! every [`PUBLISH_EVERY`], what changed in the positions its channels would be remembered at
//! if their sockets went now (and its remembered ones), as stream points every node reads the
//! same way, with a full list every [`FULL_EVERY`] publications and a last one, marked, at
//! shutdown. Every other node keeps them
//! ([`SharedPositions::cluster_update`], which postgres_changes implements); once the node is gone
//! (timeout or goodbye), a rejoin on another node resumes from them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::wire::{self, Message};
use super::Cluster;
use crate::telemetry;

/// Who a subscriber was and what it subscribed to, as catch-up names a position.
pub type Key = Arc<str>;

/// A catch-up position as it travels between nodes (RELIABILITY.md, "Several nodes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shared {
    /// The stream point (commit LSN, LSN: the same on every node) up to which the position
    /// had received everything.
    pub point: (u64, u64),
    /// Changes before it were lost already (or its point was unknown there).
    pub gap: bool,
    /// The highest numeric message ref its socket sent (0: none).
    pub last_ref: u64,
}

/// What the cluster needs of catch-up on rejoin (implemented by postgres_changes, which sits
/// above the channels: the cluster reaches it only through this).
pub trait SharedPositions: Send + Sync {
    /// The positions this node shares now (its live channels' and its remembered ones).
    fn share(&self) -> HashMap<Key, Shared>;
    /// Positions node `node` published (`reset`: all of them; `bye`: its last).
    fn cluster_update(
        &self,
        node: u64,
        reset: bool,
        bye: bool,
        entries: Vec<(Key, Option<Shared>)>,
    );
    /// Node `node` is gone: its positions become remembered ones here.
    fn cluster_node_gone(&self, node: u64);
    /// No channel is live on this node any more.
    fn none_live(&self) -> bool;
}

/// How often a node publishes its positions: a rejoin on another node after this node died
/// resumes from a position at most this old (and gets again what was sent meanwhile).
pub(super) const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Every this many publications, the full list (a node that missed a message or started later
/// catches up).
const FULL_EVERY: u32 = 10;
/// Room left in a NATS message for the header.
const HEADER_ROOM: usize = 512;

/// One entry as it travels: `[key, [commit LSN, LSN, gap, last ref] or null]`.
type WireEntry = (String, Option<(u64, u64, bool, u64)>);

impl Cluster {
    /// Publishes this node's positions until shutdown.
    pub(super) async fn positions_out(self: Arc<Self>, pg: Arc<dyn SharedPositions>) {
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: HashMap<Key, Shared> = HashMap::new();
        let mut count: u32 = 0;
        loop {
            tick.tick().await;
            let now = pg.share();
            let full = count.is_multiple_of(FULL_EVERY);
            count = count.wrapping_add(1);
            let entries: Vec<(Key, Option<Shared>)> = if full {
                now.iter().map(|(k, s)| (k.clone(), Some(*s))).collect()
            } else {
                let mut changed: Vec<(Key, Option<Shared>)> = now
                    .iter()
                    .filter(|(k, s)| last.get(*k) != Some(*s))
                    .map(|(k, s)| (k.clone(), Some(*s)))
                    .collect();
                changed.extend(
                    last.keys()
                        .filter(|k| !now.contains_key(*k))
                        .map(|k| (k.clone(), None)),
                );
                changed
            };
            if full || !entries.is_empty() {
                for bytes in self.positions_messages(entries, full, false) {
                    self.send(
                        wire::positions_subject(&self.settings.prefix),
                        bytes,
                        "positions",
                    );
                }
            }
            last = now;
        }
    }

    /// This node's last positions, at shutdown (sent by the goodbye, before it).
    pub(super) fn last_positions(&self) -> Vec<Bytes> {
        let Some(a) = self.pg.get() else {
            return Vec::new();
        };
        let entries =
            a.pg.share()
                .into_iter()
                .map(|(k, s)| (k, Some(s)))
                .collect();
        self.positions_messages(entries, true, true)
    }

    /// The messages carrying `entries`, each under the NATS server's `max_payload`.
    fn positions_messages(
        &self,
        entries: Vec<(Key, Option<Shared>)>,
        reset: bool,
        bye: bool,
    ) -> Vec<Bytes> {
        let max = self.client.server_info().max_payload;
        let limit = if max == 0 { 1 << 20 } else { max }
            .saturating_sub(HEADER_ROOM)
            .max(1024);
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut cur: Vec<u8> = Vec::new();
        for (k, s) in entries {
            let entry: WireEntry = (
                k.to_string(),
                s.map(|s| (s.point.0, s.point.1, s.gap, s.last_ref)),
            );
            let Ok(item) = serde_json::to_vec(&entry) else {
                continue;
            };
            if item.len() + 2 > limit {
                // A key this long is not shared (a rejoin on another node starts new).
                continue;
            }
            if !cur.is_empty() && cur.len() + item.len() + 2 > limit {
                cur.push(b']');
                parts.push(std::mem::take(&mut cur));
            }
            cur.push(if cur.is_empty() { b'[' } else { b',' });
            cur.extend_from_slice(&item);
        }
        if !cur.is_empty() {
            cur.push(b']');
            parts.push(cur);
        } else if parts.is_empty() {
            parts.push(b"[]".to_vec());
        }
        parts
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                wire::encode(&Message::Positions {
                    origin: self.instance,
                    reset: reset && i == 0,
                    bye,
                    body: Bytes::from(body),
                })
            })
            .collect()
    }

    /// Receives the other nodes' positions.
    pub(super) async fn positions_in(self: Arc<Self>, pg: Arc<dyn SharedPositions>) {
        let subject = wire::positions_subject(&self.settings.prefix);
        let mut sub = loop {
            match self.client.subscribe(subject.clone()).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot subscribe to catch-up positions; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        while let Some(m) = sub.next().await {
            let Some(Message::Positions {
                origin,
                reset,
                bye,
                body,
            }) = wire::decode(&m.payload)
            else {
                metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "malformed").increment(1);
                continue;
            };
            if origin == self.instance {
                continue;
            }
            let Ok(entries) = serde_json::from_slice::<Vec<WireEntry>>(&body) else {
                metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "malformed").increment(1);
                continue;
            };
            metrics::counter!(telemetry::CLUSTER_MESSAGES_IN, "kind" => "positions").increment(1);
            if !bye {
                self.heard_from(origin, None);
            }
            let entries = entries
                .into_iter()
                .map(|(k, s)| {
                    (
                        Key::from(k),
                        s.map(|(a, b, gap, last_ref)| Shared {
                            point: (a, b),
                            gap,
                            last_ref,
                        }),
                    )
                })
                .collect();
            pg.cluster_update(origin, reset, bye, entries);
        }
    }
}
