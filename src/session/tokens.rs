//! Tokens after the join: `access_token` pushes (new claims for postgres_changes and the
//! policies of private channels), the read-policy refresh they start, and token expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::channel::Channel;
use super::{Session, SessionEvent};
use crate::channels::ChannelId;
use crate::policies;
use crate::protocol::{clip, MAX_ECHO_BYTES};

impl Session {
    /// A pushed `access_token` (`None`: the payload had no string token). Never answered.
    pub(super) fn access_token(&mut self, topic: &str, pushed: Option<String>) {
        let Some(ch) = self.channels.get(topic) else {
            return;
        };
        let Some(raw) = pushed else {
            return;
        };
        // The verifier cleans a token (URI-decoded, whitespace removed) before it reads it: one
        // equal to the channel's after cleaning is the same token, and costs nothing more.
        let token = crate::auth::clean_token(&raw);
        if raw.starts_with("sb_") || token.starts_with("sb_") || token == ch.token {
            return;
        }
        match self.ctx.verifier.verify(&raw) {
            Ok(claims) => {
                if let Some(mut ch) = self.channels.remove(topic) {
                    ch.token = token;
                    ch.claims = claims;
                    // postgres_changes run under the new claims: check again, then a new
                    // "Subscribed to PostgreSQL". One check at a time; the latest token wins.
                    if !ch.pg_bindings.is_empty() {
                        self.prepare_postgres_changes(&mut ch);
                    }
                    // Private channels: the policies are evaluated again for the new claims;
                    // writes are checked again on the next send or track.
                    if ch.read.is_some() {
                        ch.write = None;
                        ch.write_job.stale |= ch.write_job.running.is_some();
                        self.refresh_read(&mut ch);
                    }
                    self.channels.insert(topic.to_owned(), ch);
                }
            }
            Err(e) => self.shutdown_channel(topic, e.to_string()),
        }
    }

    /// Evaluates a private channel's read policies again (after a token change): at once, or,
    /// when a check is running, once it ends.
    pub(super) fn refresh_read(&mut self, ch: &mut Channel) {
        let Some(checker) = self.ctx.policies.clone() else {
            return;
        };
        if !ch.read_job.request() {
            return;
        }
        let ctx = policies::Context::new(&ch.sub_topic, &ch.claims, &self.headers);
        let (topic, channel, events) = (ch.key.topic.to_string(), ch.id, self.events.clone());
        let task = self.tasks.spawn(async move {
            let result = checker.read(&ctx).await;
            let _ = events
                .send(Box::new(SessionEvent::ReadRefreshed {
                    topic,
                    channel,
                    result,
                }))
                .await;
        });
        ch.read_job.started(task);
    }

    /// A private channel's read policy, checked again under a new token, finished.
    pub(super) fn read_refreshed(
        &mut self,
        topic: String,
        channel: ChannelId,
        result: Result<policies::Read, policies::PolicyError>,
    ) {
        let Some(ch) = self.channels.get_mut(&topic) else {
            return;
        };
        if ch.id != channel {
            return;
        }
        if !ch.read_job.finished() {
            // A newer token came while this ran: only its check counts.
            if let Some(mut ch) = self.channels.remove(&topic) {
                self.refresh_read(&mut ch);
                self.channels.insert(topic, ch);
            }
            return;
        }
        let read = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(topic = %clip(&topic, MAX_ECHO_BYTES), error = %e, "read policy check failed: treating as denied");
                policies::Read::default()
            }
        };
        if !read.any() {
            let message = format!(
                "You no longer have permission to read from this Channel topic: {}",
                ch.sub_topic
            );
            self.shutdown_channel(&topic, message);
            return;
        }
        if ch.read != Some(read) {
            // What the channel may receive changed: re-register with the hub.
            let Some(mut ch) = self.channels.remove(&topic) else {
                return;
            };
            ch.read = Some(read);
            self.ctx.channels.hub.unsubscribe(&ch.key, ch.id);
            self.ctx
                .channels
                .hub
                .subscribe(&ch.key, self.subscriber(&ch));
            self.channels.insert(topic, ch);
        }
    }

    /// When the earliest channel token expires.
    pub(super) fn next_token_expiry(&self) -> Option<Instant> {
        let exp = self.channels.values().map(|c| c.claims.exp).min()?;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let wait_ms = (exp.saturating_mul(1000) - now_ms).max(0) as u64;
        Some(Instant::now() + Duration::from_millis(wait_ms))
    }

    pub(super) fn expire_tokens(&mut self) {
        let now = crate::auth::now_secs();
        let expired: Vec<(String, i64)> = self
            .channels
            .iter()
            .filter(|(_, c)| c.claims.exp <= now)
            .map(|(t, c)| (t.clone(), c.claims.exp))
            .collect();
        for (topic, exp) in expired {
            self.shutdown_channel(
                &topic,
                format!("Token has expired {} seconds ago", now - exp),
            );
        }
    }
}
