//! The glue between a channel and the change stream: its postgres_changes bindings (parsed and
//! checked at join and after each new token, then installed), the `system` messages about them
//! (subscribed, errors, gaps in the stream, the stream going down and coming back), and the
//! `replication_ready` waits a join can ask for.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::channel::Channel;
use super::{Session, SessionEvent};
use crate::channels::ChannelId;
use crate::postgres_changes::registry::{Sub, Target};
use crate::postgres_changes::{binding, SubscribeError};
use crate::protocol::{clip, MAX_ECHO_BYTES};

impl Session {
    /// Parses a channel's bindings and starts checking them against the database. Errors that
    /// need no database are reported at once, like the original's parse errors.
    pub(super) fn start_postgres_changes(
        &mut self,
        channel: &mut Channel,
        raw: &[Map<String, Value>],
    ) {
        if self.ctx.pg.is_none() {
            self.push_system(
                channel,
                "postgres_changes",
                "error",
                "walcast has no database configured (set DB_HOST or DATABASE_URL): postgres_changes are not available",
            );
            return;
        }
        if raw.len() > binding::MAX_BINDINGS_PER_CHANNEL {
            let message = binding::too_many_bindings(raw.len());
            tracing::info!(topic = %clip(&channel.key.topic, MAX_ECHO_BYTES), %message, "postgres_changes subscription refused");
            self.push_system(channel, "postgres_changes", "error", &message.to_string());
            return;
        }
        let mut specs = Vec::with_capacity(raw.len());
        for b in raw {
            match binding::parse(b, binding_id(b)) {
                Ok(spec) => specs.push(spec),
                Err(message) => {
                    tracing::info!(topic = %clip(&channel.key.topic, MAX_ECHO_BYTES), %message, "postgres_changes subscription refused");
                    self.push_system(channel, "postgres_changes", "error", &message.to_string());
                    return;
                }
            }
        }
        channel.pg_bindings = Arc::from(specs);
        self.catchup_identify(channel, raw);
        self.prepare_postgres_changes(channel);
    }

    /// Checks a channel's bindings under its claims: at once, or, when a check is running,
    /// once it ends (with the claims current then).
    pub(super) fn prepare_postgres_changes(&mut self, channel: &mut Channel) {
        let Some(pg) = self.ctx.pg.clone() else {
            return;
        };
        if !channel.pg_job.request() {
            return;
        }
        channel.pg_generation += 1;
        let target = Arc::new(Target {
            channel: channel.id,
            vsn: self.vsn,
            topic: channel.key.topic.clone(),
            outbound: self.outbound.clone(),
        });
        let (claims, specs) = (channel.claims.clone(), channel.pg_bindings.clone());
        let (topic, id, generation) = (
            channel.key.topic.to_string(),
            channel.id,
            channel.pg_generation,
        );
        let events = self.events.clone();
        let task = self.tasks.spawn(async move {
            let result = pg.prepare(target, &claims, &specs).await;
            tracing::debug!(topic = %clip(&topic, MAX_ECHO_BYTES), ok = result.is_ok(), "postgres_changes prepared");
            let _ = events
                .send(Box::new(SessionEvent::PgPrepared {
                    topic,
                    channel: id,
                    generation,
                    result,
                }))
                .await;
        });
        channel.pg_job.started(task);
    }

    /// A channel's postgres_changes check finished.
    pub(super) fn pg_prepared(
        &mut self,
        topic: String,
        channel: ChannelId,
        generation: u64,
        result: Result<Vec<(u32, Sub)>, SubscribeError>,
    ) {
        let Some(ch) = self.channels.get_mut(&topic) else {
            return;
        };
        if ch.id != channel || ch.pg_generation != generation {
            return; // the channel left, or a newer subscription superseded this one
        }
        if !ch.pg_job.finished() {
            // A newer token came while this ran: check again under it; this result,
            // for older claims, is dropped (the latest token wins).
            if let Some(mut ch) = self.channels.remove(&topic) {
                self.prepare_postgres_changes(&mut ch);
                self.channels.insert(topic, ch);
            }
            return;
        }
        let ch = &self.channels[&topic];
        match result {
            Ok(subs) => {
                let mut subscribed = json!({
                    "extension": "postgres_changes",
                    "status": "ok",
                    "message": "Subscribed to PostgreSQL",
                    "channel": ch.sub_topic,
                });
                if let Some(notice) = self.catchup_notice(ch) {
                    subscribed["catchup"] = notice;
                }
                if let Some(from) = ch.catchup_from {
                    // A rejoin: what it missed goes out first, then it is live (catchup.rs).
                    self.push(ch, "system", &subscribed);
                    self.start_catch_up(topic, subs, from);
                    return;
                }
                if let Some(pg) = &self.ctx.pg {
                    pg.registry.replace(channel, subs);
                }
                // Sent only now that the subscriptions are live: a change committed
                // after the client reads this is matched against them.
                self.push(ch, "system", &subscribed);
                let gap = self.ctx.replication.as_ref().and_then(|s| s.gap_for_join());
                if let Some(gap) = gap {
                    self.tell_gap(&topic, &gap);
                }
            }
            Err(message) => {
                tracing::info!(topic = %clip(&topic, MAX_ECHO_BYTES), %message, "postgres_changes subscription refused");
                if let Some(pg) = &self.ctx.pg {
                    pg.registry.remove(channel);
                }
                self.push_system(ch, "postgres_changes", "error", &message.to_string());
            }
        }
    }

    /// Tells a channel with postgres_changes about a gap in the change stream, once.
    pub(super) fn tell_gap(&mut self, topic: &str, gap: &crate::replication::Gap) {
        let Some(ch) = self.channels.get_mut(topic) else {
            return;
        };
        if ch.gap_told >= gap.id || ch.pg_bindings.is_empty() {
            return;
        }
        ch.gap_told = gap.id;
        let ch = &self.channels[topic];
        self.push(
            ch,
            "system",
            &json!({
                "extension": "postgres_changes",
                "status": "error",
                "message": gap.message,
                "channel": ch.sub_topic,
                "gap": { "reason": gap.reason.as_str() },
            }),
        );
    }

    /// A gap that concerns the channels subscribed now (a lost slot): tell each.
    pub(super) fn tell_gap_to_subscribed(&mut self, gap: &crate::replication::Gap) {
        if !gap.reason.concerns_subscribed() {
            return;
        }
        let topics: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, ch)| !ch.pg_bindings.is_empty())
            .map(|(t, _)| t.clone())
            .collect();
        for topic in topics {
            self.tell_gap(&topic, gap);
        }
    }

    /// A postgres_changes `system` message to every channel that has bindings live.
    pub(super) fn tell_postgres_channels(&self, status: &str, message: &str) {
        for ch in self.channels.values() {
            if !ch.pg_bindings.is_empty() {
                self.push_system(ch, "postgres_changes", status, message);
            }
        }
    }

    /// When the earliest `replication_ready` wait times out.
    pub(super) fn next_ready_deadline(&self) -> Option<Instant> {
        self.channels
            .values()
            .filter_map(|c| c.ready_wait.map(|(_, at)| at))
            .min()
    }

    /// The stream has passed the join of every ticket up to `served`: tell those channels.
    pub(super) fn tell_ready(&mut self, served: u64) {
        let mut ready = Vec::new();
        for ch in self.channels.values_mut() {
            if ch.ready_wait.is_some_and(|(ticket, _)| ticket <= served) {
                ch.ready_wait = None;
                ready.push(ch.key.topic.to_string());
            }
        }
        for topic in ready {
            if let Some(ch) = self.channels.get(&topic) {
                self.push_system(ch, "system", "ok", "Replication connection established");
            }
        }
    }

    /// `replication_ready` waits past their deadline end their channels, as the original.
    pub(super) fn expire_ready_waits(&mut self, now: Instant) {
        let late: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, c)| c.ready_wait.is_some_and(|(_, at)| at <= now))
            .map(|(t, _)| t.clone())
            .collect();
        for topic in late {
            self.shutdown_channel(
                &topic,
                "Replication connection was not established in time".into(),
            );
        }
    }
}

/// A stable id for a postgres_changes binding: the same parameters always give the same id (an
/// integer below 2^27, like the original's `phash2`), so identical bindings share one.
pub(super) fn binding_id(binding: &Map<String, Value>) -> u32 {
    // DefaultHasher::new() uses fixed keys, so ids are stable across restarts.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    Value::Object(binding.clone()).to_string().hash(&mut h);
    (h.finish() % (1 << 27)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn binding_ids_are_stable_and_small() {
        let a: Map<String, Value> =
            serde_json::from_str(r#"{"event":"*","schema":"public"}"#).unwrap();
        let b: Map<String, Value> =
            serde_json::from_str(r#"{"schema":"public","event":"*"}"#).unwrap();
        assert_eq!(binding_id(&a), binding_id(&b));
        assert!(binding_id(&a) < (1 << 27));
    }
}
