//! One joined channel's state ([`Channel`], its background [`Job`]s), how the hub sees it, the
//! pushes it gets (`system` messages), and closing it: shutdown with a reason, teardown (hub,
//! presence, postgres_changes), and leaving all at the end of the socket.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::Session;
use crate::auth::Claims;
use crate::channels::{ChannelId, Subscriber, TopicKey};
use crate::policies;
use crate::postgres_changes::binding::BindingSpec;
use crate::protocol::event::ClientEvent;
use crate::protocol::{clip, MAX_ECHO_BYTES};
use crate::protocol::{encode, Inbound, Ref};
use crate::telemetry;

/// One joined channel.
pub(super) struct Channel {
    pub(super) id: ChannelId,
    pub(super) key: TopicKey,
    pub(super) join_ref: Ref,
    pub(super) sub_topic: String,
    pub(super) broadcast_self: bool,
    pub(super) broadcast_ack: bool,
    pub(super) presence_key: String,
    pub(super) presence_enabled: bool,
    /// The channel's token, cleaned as the verifier cleans it (URI-decoded, no whitespace): a
    /// pushed token equal to it after cleaning is the same token and changes nothing.
    pub(super) token: String,
    pub(super) claims: Claims,
    /// Start of the current presence rate window and the calls made in it.
    pub(super) presence_window: Option<(Instant, u32)>,
    /// The channel's postgres_changes bindings, parsed. Shared with the check that runs them:
    /// they may be megabytes, and a token push must not copy them.
    pub(super) pg_bindings: Arc<[BindingSpec]>,
    /// Bumped at every (re)subscription, so that a late result of an older one is ignored.
    pub(super) pg_generation: u64,
    /// The postgres_changes check (at join, then after each new token).
    pub(super) pg_job: Job,
    /// A private channel's read policy check after a new token.
    pub(super) read_job: Job,
    /// The last change-stream gap this channel was told about (0: none).
    pub(super) gap_told: u64,
    /// Private channels: what the read policies allow (`None` on public channels).
    pub(super) read: Option<policies::Read>,
    /// Private channels: the write policies, checked on the first send or track.
    pub(super) write: Option<policies::Write>,
    /// The write policy check (on the first send or track after a join or a new token).
    pub(super) write_job: Job,
    /// Sends and tracks waiting for the write check, in order.
    pub(super) awaiting_write: VecDeque<(Inbound, ClientEvent)>,
    /// Ids of the messages replayed at join.
    pub(super) replayed: Option<Arc<HashSet<String>>>,
    /// `replication_ready` asked for and not yet told: the readiness ticket and the deadline.
    pub(super) ready_wait: Option<(u64, Instant)>,
    /// Catch-up on rejoin: who this channel is (`None` without a `sub` or bindings).
    pub(super) catchup_key: Option<crate::postgres_changes::history::Key>,
    /// A rejoin: the position it resumes from, until its replay is done.
    pub(super) catchup_from: Option<u64>,
    /// False once the channel is gone (a running replay then removes what it installed).
    pub(super) catchup_alive: Arc<std::sync::atomic::AtomicBool>,
    /// A rejoin whose remembered position had lost changes already (saved by a shutdown).
    pub(super) catchup_lost: bool,
    /// The rejoin was told that part of what it missed is gone.
    pub(super) catchup_gap_told: bool,
    /// A join under a remembered (or live) key whose message ref does not continue the old
    /// socket's: a new page, not a reconnect; nothing is replayed.
    pub(super) catchup_fresh: bool,
}

/// One kind of background check for a channel, run under its claims. At most one runs at a
/// time: a new token while it runs only marks it stale, and when it ends it runs once more with
/// the latest claims (its own result is dropped). So a client pushing tokens as fast as it can
/// costs each of its channels at most one running check of each kind, plus a flag.
#[derive(Default)]
pub(super) struct Job {
    /// The running task (tracked in the session's task set, aborted when the channel goes).
    pub(super) running: Option<AbortHandle>,
    /// The claims changed while it ran: its result is for older claims.
    pub(super) stale: bool,
}

impl Job {
    /// Marks the job to run again if it is running; true when the caller should start it now.
    pub(super) fn request(&mut self) -> bool {
        if self.running.is_some() {
            self.stale = true;
            false
        } else {
            true
        }
    }

    pub(super) fn started(&mut self, handle: AbortHandle) {
        self.stale = false;
        self.running = Some(handle);
    }

    /// The task ended; true when its result is current (not stale).
    pub(super) fn finished(&mut self) -> bool {
        self.running = None;
        !self.stale
    }

    pub(super) fn abort(&self) {
        if let Some(h) = &self.running {
            h.abort();
        }
    }
}

pub(super) fn channel_kind(ch: &Channel) -> &'static str {
    if ch.read.is_some() {
        "private"
    } else {
        "public"
    }
}

impl Session {
    /// How the hub sees a channel: what it may receive.
    pub(super) fn subscriber(&self, channel: &Channel) -> Subscriber {
        let read = channel.read.unwrap_or(policies::Read {
            broadcast: true,
            presence: true,
        });
        Subscriber {
            channel: channel.id,
            vsn: self.vsn,
            outbound: self.outbound.clone(),
            broadcast: read.broadcast,
            presence: read.presence,
            replayed: channel.replayed.clone(),
        }
    }

    pub(super) fn push(&self, channel: &Channel, event: &str, payload: &Value) {
        self.send(encode::push(
            self.vsn,
            &channel.join_ref,
            &channel.key.topic,
            event,
            payload,
        ));
    }

    pub(super) fn push_system(
        &self,
        channel: &Channel,
        extension: &str,
        status: &str,
        message: &str,
    ) {
        self.push(
            channel,
            "system",
            &json!({
                "extension": extension,
                "status": status,
                "message": message,
                "channel": channel.sub_topic,
            }),
        );
    }

    /// Stops a channel with a reason: `system` error, then `phx_close`.
    pub(super) fn shutdown_channel(&mut self, topic: &str, message: String) {
        let Some(ch) = self.channels.remove(topic) else {
            return;
        };
        tracing::info!(topic = %clip(topic, MAX_ECHO_BYTES), %message, "channel shut down");
        self.push(
            &ch,
            "system",
            &json!({
                "extension": "system",
                "status": "error",
                "message": message,
                "channel": ch.sub_topic,
            }),
        );
        self.send(encode::close(self.vsn, &ch.join_ref, topic));
        self.teardown(&ch);
    }

    /// Removes a channel from the hub and presence. Its presence leave goes to the others.
    pub(super) fn teardown(&self, ch: &Channel) {
        metrics::gauge!(telemetry::CHANNELS, "kind" => channel_kind(ch)).decrement(1.0);
        // Its checks are of no use any more.
        self.catchup_leave(ch);
        ch.pg_job.abort();
        ch.read_job.abort();
        ch.write_job.abort();
        self.ctx.channels.hub.unsubscribe(&ch.key, ch.id);
        if let Some(pg) = &self.ctx.pg {
            if !ch.pg_bindings.is_empty() {
                pg.registry.remove(ch.id);
            }
        }
        if let Some(diff) = self
            .ctx
            .channels
            .presence
            .untrack(&ch.key, ch.id, &ch.presence_key)
        {
            self.publish_presence_diff(&ch.key, &diff);
        }
    }

    pub(super) fn leave_all(&mut self) {
        let channels: Vec<Box<Channel>> = self.channels.drain().map(|(_, c)| c).collect();
        for ch in &channels {
            self.catchup_remember(ch);
            self.teardown(ch);
        }
    }
}
