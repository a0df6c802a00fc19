//! The change stream between nodes (see [`crate::replication::cluster`]): the slot holder
//! publishes on `<prefix>.pg`, every node receives it (all nodes get all changes: each filters
//! them against its own subscribers), and heartbeats carry how far each node has delivered.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::positions::SharedPositions;
use super::wire::{self, Message};
use super::{Cluster, Task};
use crate::replication::cluster::{FromCluster, Published, Received};
use crate::replication::Status;
use crate::telemetry;

/// Room left in a NATS message for the header of a change message.
const HEADER_ROOM: usize = 512;

/// What the change stream attached to the cluster.
pub(super) struct Attached {
    pub(super) status: Arc<Status>,
    /// Whose catch-up positions this node shares ([`super::positions`]).
    pub(super) pg: Arc<dyn SharedPositions>,
    lost: mpsc::Sender<FromCluster>,
}

impl Cluster {
    /// Attaches the change stream: returns the tasks that publish what `tap` receives (while
    /// this node holds the slot) and hand what the holder publishes to `incoming`.
    pub fn changes_tasks(
        self: &Arc<Self>,
        status: Arc<Status>,
        pg: Arc<dyn SharedPositions>,
        tap: mpsc::Receiver<Published>,
        incoming: mpsc::Sender<FromCluster>,
    ) -> Vec<Task> {
        let _ = self.pg.set(Attached {
            status,
            pg: pg.clone(),
            lost: incoming.clone(),
        });
        vec![
            (
                "cluster changes out",
                Box::pin(self.clone().changes_out(tap)),
            ),
            (
                "cluster changes in",
                Box::pin(self.clone().changes_in(incoming)),
            ),
            (
                "cluster positions out",
                Box::pin(self.clone().positions_out(pg.clone())),
            ),
            (
                "cluster positions in",
                Box::pin(self.clone().positions_in(pg)),
            ),
        ]
    }

    /// The lowest change stream position the other live nodes report (`None`: no other node
    /// streams changes).
    pub fn peers_position(&self) -> Option<u64> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|p| p.pg_position)
            .min()
    }

    /// Tells the change stream that messages from the holder may have been lost.
    pub(super) fn changes_lost(&self) {
        if let Some(a) = self.pg.get() {
            let _ = a.lost.try_send(FromCluster::Lost);
        }
    }

    async fn changes_out(self: Arc<Self>, mut tap: mpsc::Receiver<Published>) {
        let subject = wire::changes_subject(&self.settings.prefix);
        let mut seq: u64 = 0;
        while let Some(p) = tap.recv().await {
            let max = self.client.server_info().max_payload;
            let chunk = if max == 0 { 1 << 20 } else { max }
                .saturating_sub(HEADER_ROOM)
                .max(1024);
            let mut out: Vec<Bytes> = Vec::with_capacity(1);
            match p {
                Published::Position(lsn) => {
                    seq += 1;
                    out.push(wire::encode(&Message::Position {
                        origin: self.instance,
                        seq,
                        lsn,
                        node: self.settings.node.clone(),
                    }));
                }
                Published::Wal { lsn, data } => {
                    let mut rest = data;
                    loop {
                        let part = rest.split_to(rest.len().min(chunk));
                        seq += 1;
                        out.push(wire::encode(&Message::Wal {
                            origin: self.instance,
                            seq,
                            lsn,
                            more: !rest.is_empty(),
                            data: part,
                        }));
                        if rest.is_empty() {
                            break;
                        }
                    }
                }
            }
            for bytes in out {
                match self.client.publish(subject.clone(), bytes).await {
                    Ok(()) => {
                        metrics::counter!(telemetry::CLUSTER_MESSAGES_OUT, "kind" => "changes")
                            .increment(1)
                    }
                    Err(e) => {
                        metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "publish_error")
                            .increment(1);
                        tracing::warn!(error = %e, "cluster: publishing a change message failed");
                    }
                }
            }
        }
    }

    async fn changes_in(self: Arc<Self>, incoming: mpsc::Sender<FromCluster>) {
        let subject = wire::changes_subject(&self.settings.prefix);
        let mut sub = loop {
            match self.client.subscribe(subject.clone()).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot subscribe to the change stream; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        };
        while let Some(m) = sub.next().await {
            let from = match wire::decode(&m.payload) {
                Some(Message::Wal {
                    origin,
                    seq,
                    lsn,
                    more,
                    data,
                }) => FromCluster::Message {
                    origin,
                    seq,
                    node: None,
                    kind: Received::Wal { lsn, data, more },
                },
                Some(Message::Position {
                    origin,
                    seq,
                    lsn,
                    node,
                }) => FromCluster::Message {
                    origin,
                    seq,
                    node: Some(node),
                    kind: Received::Position(lsn),
                },
                _ => {
                    metrics::counter!(telemetry::CLUSTER_DROPPED, "reason" => "malformed")
                        .increment(1);
                    continue;
                }
            };
            if let FromCluster::Message { origin, .. } = &from {
                if *origin == self.instance {
                    continue;
                }
                self.heard_from(*origin, None);
            }
            // Backpressure: while the dispatcher is behind, NATS buffers (and past its limit
            // drops, which is told as a gap).
            if incoming.send(from).await.is_err() {
                return;
            }
        }
    }
}
