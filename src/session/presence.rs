//! Presence: track and untrack on a channel, the per-channel and server-wide presence rate
//! limits, and publishing the diffs.

use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::Session;
use crate::channels::presence::Tracked;
use crate::channels::{Fanout, FanoutPayload, TopicKey};
use crate::protocol::event::PresenceEvent;
use crate::protocol::Inbound;
use crate::protocol::{clip, MAX_ECHO_BYTES};
use crate::telemetry;

/// The reply to a track that would take the topic's presence state past
/// `PRESENCE_MAX_STATE_BYTES`.
pub(super) const PRESENCE_STATE_FULL: &str =
    "Presence state size exceeded: this topic's presence state is full (PRESENCE_MAX_STATE_BYTES)";

impl Session {
    pub(super) fn presence(&mut self, m: &Inbound, event: PresenceEvent) {
        let Some(ch) = self.channels.get(&m.topic) else {
            return;
        };
        let join_ref = ch.join_ref.clone();
        // A payload without an event is accepted and ignored, as the original does.
        if event == PresenceEvent::NoEvent {
            self.reply(m, &join_ref, "ok", &json!({}));
            return;
        }
        if !self.presence_allowed(&m.topic) {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "client_presence").increment(1);
            self.shutdown_channel(&m.topic, "Client presence rate limit exceeded".into());
            return;
        }
        self.ctx.limits.presence.add(1);
        if self.ctx.limits.presence.triggered() {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "presence_per_second")
                .increment(1);
            self.shutdown_channel(&m.topic, "Too many presence messages per second".into());
            return;
        }
        match event {
            PresenceEvent::Track(_)
                if self.channels.get(&m.topic).is_some_and(|ch| {
                    ch.read.is_some() && !ch.write.is_some_and(|w| w.presence)
                }) =>
            {
                tracing::debug!(topic = %clip(&m.topic, MAX_ECHO_BYTES), "track refused: write not allowed by policy");
                self.reply(m, &join_ref, "error", &json!({}));
            }
            PresenceEvent::Track(meta) => {
                let Ok(meta) = meta else {
                    self.reply(
                        m,
                        &join_ref,
                        "error",
                        &json!({"reason": "Presence track payload must be a map"}),
                    );
                    return;
                };
                let size = serde_json::to_string(&meta)
                    .map(|s| s.len())
                    .unwrap_or(usize::MAX);
                if size > self.settings().max_payload_bytes {
                    metrics::counter!(telemetry::RATE_LIMITED, "limit" => "payload_size")
                        .increment(1);
                    self.shutdown_channel(&m.topic, "Track message size exceeded".into());
                    return;
                }
                let Some(ch) = self.channels.get_mut(&m.topic) else {
                    return;
                };
                let (key, id, pkey) = (ch.key.clone(), ch.id, ch.presence_key.clone());
                match self
                    .ctx
                    .channels
                    .presence
                    .track(&key, id, &pkey, meta, size)
                {
                    Tracked::Full => {
                        metrics::counter!(telemetry::RATE_LIMITED, "limit" => "presence_state")
                            .increment(1);
                        tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), size, "track refused: the topic's presence state is full");
                        self.reply(
                            m,
                            &join_ref,
                            "error",
                            &json!({"reason": PRESENCE_STATE_FULL}),
                        );
                    }
                    tracked => {
                        if let Some(ch) = self.channels.get_mut(&m.topic) {
                            ch.presence_enabled = true;
                        }
                        self.reply(m, &join_ref, "ok", &json!({}));
                        if let Tracked::Diff(diff) = tracked {
                            self.publish_presence_diff(&key, &diff);
                        }
                    }
                }
            }
            PresenceEvent::Untrack => {
                let Some(ch) = self.channels.get(&m.topic) else {
                    return;
                };
                let (key, id, pkey) = (ch.key.clone(), ch.id, ch.presence_key.clone());
                self.reply(m, &join_ref, "ok", &json!({}));
                if let Some(diff) = self.ctx.channels.presence.untrack(&key, id, &pkey) {
                    self.publish_presence_diff(&key, &diff);
                }
            }
            // Answered before the rate limits.
            PresenceEvent::NoEvent => {}
            PresenceEvent::Unknown(event) => {
                tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), event = %clip(&event, MAX_ECHO_BYTES), "UnknownPresenceEvent");
                self.reply(m, &join_ref, "error", &json!({}));
            }
        }
    }

    /// Counts a presence call against the channel's window; false when over the limit.
    pub(super) fn presence_allowed(&mut self, topic: &str) -> bool {
        let (max, window) = (
            self.settings().client_presence_max_calls,
            self.settings().client_presence_window,
        );
        let Some(ch) = self.channels.get_mut(topic) else {
            return false;
        };
        let now = Instant::now();
        match &mut ch.presence_window {
            Some((start, count)) if now < *start + window => {
                if *count >= max {
                    return false;
                }
                *count += 1;
            }
            slot => *slot = Some((now, 1)),
        }
        true
    }

    pub(super) fn publish_presence_diff(&self, key: &TopicKey, diff: &Value) {
        let Ok(payload) = RawValue::from_string(diff.to_string()) else {
            return;
        };
        let delivered = self.ctx.channels.broker.publish(
            key,
            Fanout::new(
                key.topic.clone(),
                FanoutPayload::Json {
                    event: "presence_diff",
                    payload,
                },
            ),
            None,
        );
        self.ctx.limits.events.add(delivered as u64);
    }
}
