//! How a publish travels. Today a single node: the broker hands the message to the local hub. A
//! cluster broker (NATS) will also forward it to the other nodes, which deliver to their hubs;
//! callers do not change.

use std::sync::Arc;

use super::hub::{Fanout, Hub};
use super::{ChannelId, TopicKey};

pub trait Broker: Send + Sync + 'static {
    /// Delivers `msg` to every subscriber of `key` except the channel `except`. Returns the number
    /// of local deliveries.
    fn publish(&self, key: &TopicKey, msg: Fanout, except: Option<ChannelId>) -> usize;
}

/// The single-node broker.
pub struct LocalBroker {
    hub: Arc<Hub>,
}

impl LocalBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl Broker for LocalBroker {
    fn publish(&self, key: &TopicKey, msg: Fanout, except: Option<ChannelId>) -> usize {
        self.hub.publish(key, &msg, except)
    }
}
