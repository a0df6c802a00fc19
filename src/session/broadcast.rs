//! Client broadcasts (JSON and V2 binary), relayed to the topic's subscribers, and the write
//! policy gate of private channels: a send or track waits, in order, for the channel's first
//! write check after a join or a new token.

use serde_json::json;

use super::{Session, SessionEvent};
use crate::channels::{ChannelId, Fanout, FanoutPayload};
use crate::policies;
use crate::protocol::event::ClientEvent;
use crate::protocol::{clip, MAX_ECHO_BYTES};
use crate::protocol::{encode, Inbound, InboundPayload, UserBroadcast};
use crate::telemetry;

/// Pushes that may wait for one channel's write check; more are dropped (and logged).
pub(super) const MAX_AWAITING_WRITE: usize = 256;

impl Session {
    pub(super) fn broadcast(&mut self, m: Inbound) {
        let Some(ch) = self.channels.get(&m.topic) else {
            return;
        };
        if ch.read.is_some() && !ch.write.is_some_and(|w| w.broadcast) {
            // As the original: a broadcast the write policy denies is dropped, with no ack.
            tracing::debug!(topic = %clip(&m.topic, MAX_ECHO_BYTES), "broadcast dropped: write not allowed by policy");
            return;
        }
        let size = match &m.payload {
            InboundPayload::Json(raw) => {
                if !raw.get().trim_start().starts_with('{') {
                    tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), "broadcast payload is not an object: dropped");
                    return;
                }
                raw.get().len()
            }
            InboundPayload::UserBroadcast(ub) => ub.payload.len(),
        };
        let max = self.settings().max_payload_bytes;
        if size > max {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "payload_size").increment(1);
            tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), size, max, "broadcast over the payload limit: dropped");
            if ch.broadcast_ack {
                self.reply(&m, &ch.join_ref, "error", &json!("payload_size_exceeded"));
            }
            return;
        }
        if self.ctx.limits.events.triggered() {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "events_per_second").increment(1);
            self.shutdown_channel(&m.topic, "Too many messages per second".into());
            return;
        }
        let except = (!ch.broadcast_self).then_some(ch.id);
        let key = ch.key.clone();
        let ack = ch.broadcast_ack.then(|| {
            encode::reply(
                self.vsn,
                &ch.join_ref,
                &m.msg_ref,
                &m.topic,
                "ok",
                &json!({}),
            )
        });
        let payload = match m.payload {
            InboundPayload::Json(raw) => FanoutPayload::Json {
                event: "broadcast",
                payload: raw,
            },
            // Client metadata (e.g. `persist`) is not relayed, as in the original.
            InboundPayload::UserBroadcast(ub) => FanoutPayload::User(UserBroadcast {
                metadata: None,
                ..ub
            }),
        };
        let delivered =
            self.ctx
                .channels
                .broker
                .publish(&key, Fanout::new(key.topic.clone(), payload), except);
        self.ctx.limits.events.add(delivered as u64 + 1);
        if let Some(ack) = ack {
            self.send(ack);
        }
    }

    /// Whether a send or track on this channel must wait for its write policy (private
    /// channels, before their first write check).
    pub(super) fn needs_write_check(&self, topic: &str) -> bool {
        self.channels
            .get(topic)
            .is_some_and(|ch| ch.read.is_some() && ch.write.is_none())
    }

    /// Queues a send or track until the channel's write policy is known, starting the check.
    pub(super) fn await_write(&mut self, m: Inbound, event: ClientEvent) {
        let Some(ch) = self.channels.get_mut(&m.topic) else {
            return;
        };
        if ch.awaiting_write.len() >= MAX_AWAITING_WRITE {
            tracing::warn!(topic = %clip(&m.topic, MAX_ECHO_BYTES), "too many pushes waiting for the write policy: dropped");
            return;
        }
        let topic = m.topic.clone();
        ch.awaiting_write.push_back((m, event));
        if ch.write_job.running.is_none() {
            self.check_write(&topic);
        }
    }

    /// Starts a channel's write policy check (none may be running).
    pub(super) fn check_write(&mut self, topic: &str) {
        let checker = self.ctx.policies.clone();
        let Some(ch) = self.channels.get_mut(topic) else {
            return;
        };
        let Some(checker) = checker else {
            // No database, no policies: nothing may be written.
            ch.write = Some(policies::Write::default());
            self.drain_awaiting_write(topic);
            return;
        };
        let ctx = policies::Context::new(&ch.sub_topic, &ch.claims, &self.headers);
        let (topic, channel, events) = (ch.key.topic.to_string(), ch.id, self.events.clone());
        let task = self.tasks.spawn(async move {
            let result = checker.write(&ctx).await;
            let _ = events
                .send(Box::new(SessionEvent::WriteChecked {
                    topic,
                    channel,
                    result,
                }))
                .await;
        });
        ch.write_job.started(task);
    }

    /// Handles, in order, the pushes that waited for the write policy.
    pub(super) fn drain_awaiting_write(&mut self, topic: &str) {
        let Some(ch) = self.channels.get_mut(topic) else {
            return;
        };
        let waiting: Vec<(Inbound, ClientEvent)> = ch.awaiting_write.drain(..).collect();
        for (m, event) in waiting {
            match event {
                ClientEvent::Presence(presence) => self.presence(&m, presence),
                // Only broadcasts and presence pushes wait.
                _ => self.broadcast(m),
            }
        }
    }

    /// A channel's write policy check finished.
    pub(super) fn write_checked(
        &mut self,
        topic: String,
        channel: ChannelId,
        result: Result<policies::Write, policies::PolicyError>,
    ) {
        let Some(ch) = self.channels.get_mut(&topic) else {
            return;
        };
        if ch.id != channel {
            return;
        }
        if !ch.write_job.finished() {
            // Checked under a token since replaced: check again under the current one.
            self.check_write(&topic);
            return;
        }
        ch.write = Some(match result {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(topic = %clip(&topic, MAX_ECHO_BYTES), error = %e, "write policy check failed: denying");
                policies::Write::default()
            }
        });
        self.drain_awaiting_write(&topic);
    }
}
