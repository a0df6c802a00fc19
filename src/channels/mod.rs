//! Who is connected here, how messages travel, and who is present, kept apart:
//! - [`hub::Hub`]: topic → the local channels joined to it, and the fan-out loop;
//! - [`broker::Broker`]: the seam through which a publish reaches every node (in-memory today;
//!   a cluster broker later);
//! - [`presence::Presence`]: the presence state of each topic;
//! - [`cluster`]: cluster mode's broker (NATS), presence across nodes, peers;
//! - [`outbound::Outbound`]: each socket's bounded queue of encoded frames, the delivery contract
//!   every producer (the hub's fan-out, postgres_changes, the session's own replies) pushes into.

pub mod broker;
pub mod cluster;
pub mod hub;
pub mod outbound;
pub mod presence;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use broker::{Broker, LocalBroker};
pub use hub::{Fanout, FanoutKind, FanoutPayload, Hub, Subscriber};
pub use presence::Presence;

/// Identifies one joined channel (one socket's membership of one topic) for this process's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(u64);

impl ChannelId {
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ChannelId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A topic as subscribers share it. Public and private channels of the same name are different
/// topics and never see each other's messages.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TopicKey {
    pub private: bool,
    /// The full topic, `realtime:<name>`, exactly as clients join it.
    pub topic: Arc<str>,
}

impl TopicKey {
    pub fn new(topic: &str, private: bool) -> Self {
        Self {
            private,
            topic: Arc::from(topic),
        }
    }
}

/// The three pieces together, as the server and sessions use them.
#[derive(Clone)]
pub struct Channels {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<Presence>,
    /// Cluster mode's state (peers, broker connection), when `CLUSTER_NATS_URL` is set.
    pub cluster: Option<Arc<cluster::Cluster>>,
}

impl Channels {
    /// A single-node setup: the broker delivers to this process's hub. Each topic's presence
    /// state holds at most `max_presence_state_bytes`.
    pub fn local(max_presence_state_bytes: usize) -> Self {
        let hub = Arc::new(Hub::new());
        Self {
            broker: Arc::new(LocalBroker::new(hub.clone())),
            hub,
            presence: Arc::new(Presence::new(max_presence_state_bytes)),
            cluster: None,
        }
    }

    /// A node of a cluster: the broker also sends to, and receives from, the other nodes over
    /// NATS. Returns what the cluster runs.
    pub async fn cluster(
        max_presence_state_bytes: usize,
        settings: crate::config::ClusterSettings,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(Self, cluster::Started), cluster::ClusterError> {
        let (hub, interest) = Hub::with_interest();
        let hub = Arc::new(hub);
        let presence = Arc::new(Presence::new(max_presence_state_bytes));
        let started =
            cluster::Cluster::start(settings, hub.clone(), interest, presence.clone(), shutdown)
                .await?;
        Ok((
            Self {
                hub,
                broker: started.broker.clone(),
                presence,
                cluster: Some(started.cluster.clone()),
            },
            started,
        ))
    }
}
