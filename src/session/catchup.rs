//! Catch-up on rejoin, the session's side (RELIABILITY.md, "Catch-up on rejoin"): a channel
//! with postgres_changes whose socket goes away without a leave has its position remembered
//! under its user, topic and bindings; the same user joining the same topic with the same
//! bindings within `CATCHUP_WINDOW_MS`, continuing the old socket's message refs (a new page
//! starts again at 1 and is told `fresh`), gets, once its subscriptions are checked, every change
//! it missed (filtered and authorized under the new token), then continues live. The history
//! and the hand-over to live delivery are in [`crate::postgres_changes::history`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::channel::Channel;
use super::{Session, SessionEvent};
use crate::channels::ChannelId;
use crate::postgres_changes::history::{identity_key, numeric_ref, Outcome, Rejoin};
use crate::postgres_changes::registry::Sub;
use crate::protocol::{clip, MAX_ECHO_BYTES};
use crate::telemetry;

/// Told (in the `catchup` field of "Subscribed to PostgreSQL") to a token without `sub`.
pub(super) const ANONYMOUS: &str =
    "the token has no sub claim: a rejoin cannot be told apart from a new subscriber, so changes missed while away are not replayed";
/// Told (in the `catchup` field of "Subscribed to PostgreSQL") to a join whose message ref does
/// not continue the old socket's: a new page or tab, not supabase-js's own reconnect.
pub(super) const FRESH_CLIENT: &str =
    "a new client (its message refs start again): it loads the current data itself, so changes missed by an earlier page are not replayed";
/// The gap notice of a rejoin whose missed changes are partly gone from the history.
pub(super) const HISTORY_EXCEEDED: &str =
    "Some changes committed while this channel was away are no longer in the catch-up history and were not replayed; reload the data you display";

impl Session {
    /// At join: who the channel is for catch-up, and where it stood if it is a rejoin.
    pub(super) fn catchup_identify(&self, channel: &mut Channel, raw: &[Map<String, Value>]) {
        let Some(pg) = &self.ctx.pg else {
            return;
        };
        if !pg.history.enabled() || raw.is_empty() {
            return;
        }
        if let Some(key) = &channel.catchup_key {
            // A new token's bindings check keeps the channel's identity.
            pg.history.leave(key, channel.id);
        }
        channel.catchup_key = identity_key(&channel.claims.raw, &channel.key.topic, raw);
        let rejoin = channel.catchup_key.as_ref().map_or(Rejoin::New, |k| {
            pg.history.join(
                k,
                channel.id,
                self.inbound_position.clone(),
                self.last_ref.clone(),
                numeric_ref(&channel.join_ref),
            )
        });
        let resume = match rejoin {
            Rejoin::Resume(r) => Some(r),
            Rejoin::New | Rejoin::Fresh => None,
        };
        channel.catchup_fresh = rejoin == Rejoin::Fresh;
        if channel.catchup_fresh {
            metrics::counter!(telemetry::CATCHUP_REJOINS, "result" => "fresh").increment(1);
        }
        channel.catchup_from = resume.map(|r| r.from);
        channel.catchup_lost = resume.is_some_and(|r| r.gap);
    }

    /// A channel is gone: it is no longer live under its key.
    pub(super) fn catchup_leave(&self, ch: &Channel) -> bool {
        ch.catchup_alive.store(false, Ordering::SeqCst);
        match (&self.ctx.pg, &ch.catchup_key) {
            (Some(pg), Some(key)) => pg.history.leave(key, ch.id),
            _ => false,
        }
    }

    /// The `catchup` field of a channel's "Subscribed to PostgreSQL", if any.
    pub(super) fn catchup_notice(&self, channel: &Channel) -> Option<Value> {
        let pg = self.ctx.pg.as_ref()?;
        if !pg.history.enabled() {
            return None;
        }
        if channel.catchup_key.is_none() {
            return Some(json!({"status": "unavailable", "reason": ANONYMOUS}));
        }
        if channel.catchup_fresh {
            return Some(json!({"status": "fresh", "reason": FRESH_CLIENT}));
        }
        channel.catchup_from.map(|_| json!({"status": "resumed"}))
    }

    /// Subscriptions checked for a rejoin: install them and replay what was missed, in one turn
    /// between the dispatcher's batches. Runs as the channel's postgres_changes job, so a new
    /// token waits for it.
    pub(super) fn start_catch_up(
        &mut self,
        topic: String,
        subs: Vec<(u32, Sub)>,
        from: u64,
    ) -> bool {
        let Some(pg) = self.ctx.pg.clone() else {
            return false;
        };
        let Some(mut ch) = self.channels.remove(&topic) else {
            return false;
        };
        if ch.catchup_lost || !pg.history.covers(from) {
            self.tell_catchup_gap(&mut ch);
        }
        // A lost slot is a gap the history cannot cover either.
        let gap = self.ctx.replication.as_ref().and_then(|s| s.gap_for_join());
        let slot_lost = gap.filter(|g| g.reason.concerns_subscribed());
        let (id, generation, alive) = (ch.id, ch.pg_generation, ch.catchup_alive.clone());
        let events = self.events.clone();
        let task = self.tasks.spawn(async move {
            let outcome = pg.catch_up(id, subs, from, alive).await;
            tracing::debug!(topic = %clip(&topic, MAX_ECHO_BYTES), replayed = outcome.replayed, gap = outcome.gap, "caught up");
            let _ = events
                .send(Box::new(SessionEvent::PgCaughtUp {
                    topic,
                    channel: id,
                    generation,
                    outcome,
                }))
                .await;
        });
        ch.pg_job.started(task);
        let topic = ch.key.topic.to_string();
        self.channels.insert(topic.clone(), ch);
        if let Some(gap) = slot_lost {
            self.tell_gap(&topic, &gap);
        }
        true
    }

    /// A rejoin's replay is done: the channel is live.
    pub(super) fn pg_caught_up(
        &mut self,
        topic: String,
        channel: ChannelId,
        generation: u64,
        outcome: Outcome,
    ) {
        let Some(ch) = self.channels.get_mut(&topic) else {
            return;
        };
        if ch.id != channel || ch.pg_generation != generation {
            return;
        }
        let result = if outcome.gap { "gap" } else { "complete" };
        metrics::counter!(telemetry::CATCHUP_REJOINS, "result" => result).increment(1);
        ch.catchup_from = None;
        if let Some(pg) = &self.ctx.pg {
            pg.history.caught_up(ch.id);
        }
        let gap_before = ch.catchup_gap_told;
        if !ch.pg_job.finished() {
            // A newer token came during the replay: subscribe again under it.
            if let Some(mut ch) = self.channels.remove(&topic) {
                self.prepare_postgres_changes(&mut ch);
                self.channels.insert(topic.clone(), ch);
            }
        }
        if outcome.gap && !gap_before {
            if let Some(mut ch) = self.channels.remove(&topic) {
                self.tell_catchup_gap(&mut ch);
                self.channels.insert(topic, ch);
            }
        }
    }

    fn tell_catchup_gap(&self, ch: &mut Channel) {
        if ch.catchup_gap_told {
            return;
        }
        ch.catchup_gap_told = true;
        metrics::counter!(telemetry::REPLICATION_GAPS, "reason" => "catchup_history").increment(1);
        self.push(
            ch,
            "system",
            &json!({
                "extension": "postgres_changes",
                "status": "error",
                "message": HISTORY_EXCEEDED,
                "channel": ch.sub_topic,
                "gap": { "reason": "catchup_history" },
            }),
        );
    }

    /// The socket is going away without a leave: remember where each channel with
    /// postgres_changes stood. Everything the dispatcher had pushed when the client's last
    /// message arrived counts as received; what came after is sent again on a rejoin.
    pub(super) fn catchup_remember(&self, ch: &Channel) {
        // Another channel live under the same key (the client already rejoined elsewhere)
        // stands for it.
        if !self.catchup_leave(ch) {
            return;
        }
        let (Some(pg), Some(key)) = (&self.ctx.pg, &ch.catchup_key) else {
            return;
        };
        if ch.pg_bindings.is_empty() {
            return;
        }
        // Closed by a graceful shutdown: the socket was flushed before its close frame, so
        // everything delivered counts as received (RELIABILITY.md states this).
        let at = if *self.ctx.shutdown.borrow() {
            pg.history.delivered()
        } else {
            self.inbound_position.load(Ordering::SeqCst)
        };
        // A rejoin whose replay had not finished stands where it stood before.
        let pos = ch.catchup_from.map_or(at, |f| f.min(at));
        pg.history
            .remember(Arc::clone(key), pos, self.last_ref.load(Ordering::SeqCst));
    }
}
