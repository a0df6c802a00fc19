//! One WebSocket connection: the Phoenix socket and all the channels joined on it.
//!
//! A session is two tasks. The reader task (this module's [`run`]) decodes frames, answers
//! heartbeats and joins, keeps each channel's state, and runs the socket's timers (idle timeout,
//! token expiry, delayed join errors). The writer task (`writer.rs`) drains the bounded
//! [`crate::channels::outbound::Outbound`] queue into the socket, so a slow client can only ever
//! fill its own queue.
//!
//! All channels of a socket live in the reader task rather than one task each: a channel is a
//! few hundred bytes of state, and socket-wide ordering (reply, then pushes) comes for free.
//!
//! This file owns the `Session` state, [`run`] (the socket loop and its biased `select!`) and
//! the dispatch on [`ClientEvent`] (from [`crate::protocol::event`]); each concern has its own
//! `impl Session` block:
//! - `channel.rs`: one joined channel's state, and closing a channel (shutdown, teardown);
//! - `join.rs`: the join pipeline (limits, token, policies, replay) and `JoinError`, the
//!   refusals, answered after the back-off delay;
//! - `broadcast.rs`: client broadcasts and the write-policy gate of private channels;
//! - `presence.rs`: presence track/untrack;
//! - `tokens.rs`: `access_token` pushes, read-policy refresh and token expiry;
//! - `catchup.rs`: catch-up on rejoin (who a channel is, where it resumes from, the replay);
//! - `postgres_changes.rs`: the glue to the change stream (postgres_changes bindings, gap
//!   notices, system messages, `replication_ready` waits);
//! - `writer.rs`: the writer task and frame sizes.

mod broadcast;
mod catchup;
mod channel;
mod join;
mod postgres_changes;
mod presence;
mod tokens;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{sleep_until, Instant};

use crate::channels::outbound::{CloseReason, Outbound};
use crate::channels::ChannelId;
use crate::config::Settings;
use crate::context::Context;
use crate::policies;
use crate::postgres_changes::registry::Sub;
use crate::protocol::event::ClientEvent;
use crate::protocol::{clip, MAX_ECHO_BYTES};
use crate::protocol::{encode, Frame, Inbound, Ref, Vsn, CLOSE_SERVICE_RESTART};
use crate::telemetry;

use channel::Channel;
use join::JoinRequest;
use writer::{frame_len, is_capacity_error, write_loop, CLOSE_TOO_BIG, LINGER_AFTER_TOO_BIG};

/// How long a closing socket may take to flush and say goodbye before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What the upgrade handler established before handing the socket over.
pub struct Connect {
    pub vsn: Vsn,
    /// The socket's token (from `x-api-key` or `apikey`), already verified.
    pub token: String,
    /// `log_level=info` asks for per-message logs for this socket.
    pub log_info: bool,
    /// The upgrade request's `x-` headers (except the token), for `request.headers`.
    pub headers: Map<String, Value>,
}

/// The next change of an optional watch; never resolves without one (its `select!` branch is
/// also disabled then).
async fn next_change<T>(
    w: &mut Option<tokio::sync::watch::Receiver<T>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match w.as_mut() {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// Runs `f` when dropped.
pub(crate) fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Results of work a session started in the background.
enum SessionEvent {
    /// postgres_changes subscriptions checked against the database.
    PgPrepared {
        topic: String,
        channel: ChannelId,
        generation: u64,
        result: Result<Vec<(u32, Sub)>, crate::postgres_changes::SubscribeError>,
    },
    /// A rejoined channel's missed changes replayed (catch-up on rejoin).
    PgCaughtUp {
        topic: String,
        channel: ChannelId,
        generation: u64,
        outcome: crate::postgres_changes::history::Outcome,
    },
    /// A private join's read policy (and replay) checked.
    PrivateJoin {
        generation: u64,
        request: Box<JoinRequest>,
        result: Result<(policies::Read, Vec<policies::Stored>), policies::PolicyError>,
    },
    /// A private channel's read policy checked again under a new token.
    ReadRefreshed {
        topic: String,
        channel: ChannelId,
        result: Result<policies::Read, policies::PolicyError>,
    },
    /// A private channel's write policies checked.
    WriteChecked {
        topic: String,
        channel: ChannelId,
        result: Result<policies::Write, policies::PolicyError>,
    },
}

/// Background results that may wait for the session at once (one per channel in practice).
const SESSION_EVENTS: usize = 128;

struct Session {
    ctx: Arc<Context>,
    vsn: Vsn,
    socket_token: String,
    log_info: bool,
    outbound: Arc<Outbound>,
    /// Keyed by the full topic (`realtime:<name>`).
    /// Boxed: an idle socket has one channel, and the map's buckets stay small.
    channels: HashMap<String, Box<Channel>>,
    delayed: VecDeque<(Instant, Frame)>,
    events: mpsc::Sender<Box<SessionEvent>>,
    /// Private joins waiting for their policy check: topic → (generation, its task).
    pending_joins: HashMap<String, (u64, AbortHandle)>,
    /// Every background task of this socket (policy checks, postgres_changes checks). Bounded:
    /// at most one per pending join and one of each [`channel::Job`] kind per channel. Finished ones are
    /// reaped each turn of the loop; the rest are aborted when the socket ends (close, error,
    /// server shutdown), so none outlives it.
    tasks: JoinSet<()>,
    next_generation: u64,
    headers: Map<String, Value>,
    /// Counted in the concurrent users (it has had a channel since it last had none).
    user_counted: bool,
    /// The change-stream position delivered when the client's last message arrived (what a
    /// rejoin resumes from, see `catchup.rs`).
    inbound_position: Arc<std::sync::atomic::AtomicU64>,
    /// The highest numeric message ref the client has sent (0: none): a rejoin whose ref does
    /// not go beyond it is a new page, not this client reconnecting (see `catchup.rs`).
    last_ref: Arc<std::sync::atomic::AtomicU64>,
}

/// Serves one upgraded socket until it closes.
pub async fn run(socket: WebSocket, ctx: Arc<Context>, connect: Connect) {
    let _alive = ctx.alive.clone();
    metrics::gauge!(telemetry::CONNECTIONS).increment(1.0);
    let _connection = scopeguard(|| metrics::gauge!(telemetry::CONNECTIONS).decrement(1.0));
    let (sink, mut stream) = socket.split();
    let outbound = Arc::new(Outbound::new(ctx.settings.outbound_queue_bytes));
    let mut writer = tokio::spawn(write_loop(sink, outbound.clone()));
    let mut shutdown = ctx.shutdown.clone();
    let idle_timeout = ctx.settings.idle_timeout;
    let (events_tx, mut events_rx) = mpsc::channel::<Box<SessionEvent>>(SESSION_EVENTS);
    let mut session = Session {
        events: events_tx,
        vsn: connect.vsn,
        socket_token: connect.token,
        log_info: connect.log_info,
        outbound: outbound.clone(),
        channels: HashMap::new(),
        delayed: VecDeque::new(),
        pending_joins: HashMap::new(),
        tasks: JoinSet::new(),
        next_generation: 0,
        headers: connect.headers,
        user_counted: false,
        inbound_position: Arc::new(std::sync::atomic::AtomicU64::new(
            ctx.pg.as_ref().map_or(0, |pg| pg.history.delivered()),
        )),
        last_ref: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        ctx,
    };
    let mut last_inbound = Instant::now();
    // The change stream going down and coming back, told to channels with postgres_changes.
    let mut stream_state = session.ctx.replication.as_ref().map(|s| s.watch());
    let mut stream_was_up = stream_state.as_ref().is_some_and(|w| *w.borrow());
    let mut stream_down_told = false;
    let mut gaps = session.ctx.replication.as_ref().map(|s| s.watch_gaps());
    let mut ready = session.ctx.replication.as_ref().map(|s| s.watch_ready());
    let mut closing_since: Option<Instant> = None;
    // A frame too large to read at all: after the close frame, keep the connection open a
    // moment so that a client reading while it writes gets 1009 before the connection drops.
    let mut linger = false;

    if *shutdown.borrow() {
        outbound.close(CloseReason::new(
            CLOSE_SERVICE_RESTART,
            "server shutting down",
        ));
    }

    loop {
        // Reap finished background tasks (each one's result arrived as an event).
        while session.tasks.try_join_next().is_some() {}
        session.sync_user_count();
        if closing_since.is_none() && outbound.is_closing() {
            closing_since = Some(Instant::now());
        }
        let open = closing_since.is_none();
        let idle_at = last_inbound + idle_timeout;
        let expiry = session.next_token_expiry();
        let delayed_at = session.delayed.front().map(|(at, _)| *at);
        let ready_at = session.next_ready_deadline();
        let give_up_at = closing_since.map(|at| at + CLOSE_GRACE);
        tokio::select! {
            biased;
            // 1. The writer is done: the socket failed or the close frame went out.
            _ = &mut writer => break,
            // 2. A closing socket that does not drain in time is dropped.
            _ = sleep_until(give_up_at.unwrap_or(idle_at)), if give_up_at.is_some() => break,
            // 3. Server shutdown: tell the client to come back (1012), after what is queued.
            changed = shutdown.changed(), if open => {
                if changed.is_err() || *shutdown.borrow() {
                    outbound.close(CloseReason::new(CLOSE_SERVICE_RESTART, "server shutting down"));
                }
            }
            // 4. Client frames.
            frame = stream.next() => match frame {
                None => break,
                Some(Err(e)) => {
                    let e = e.into_inner();
                    let too_big = is_capacity_error(&*e);
                    tracing::info!(error = %e, "websocket read failed");
                    if too_big {
                        outbound.close(CloseReason::new(CLOSE_TOO_BIG, "frame too large"));
                        linger = true;
                    } else {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) => break,
                Some(Ok(msg)) => {
                    last_inbound = Instant::now();
                    if let Some(pg) = &session.ctx.pg {
                        session
                            .inbound_position
                            .store(pg.history.delivered(), std::sync::atomic::Ordering::SeqCst);
                    }
                    if frame_len(&msg) > session.settings().max_frame_bytes {
                        // Read whole (the transport allows twice the setting), so the client
                        // gets the close frame and a normal closing handshake.
                        tracing::info!(bytes = frame_len(&msg), "frame over WEBSOCKET_MAX_FRAME_BYTES: closing");
                        outbound.close(CloseReason::new(CLOSE_TOO_BIG, "frame too large"));
                    } else if open {
                        session.handle_frame(msg);
                    }
                }
            },
            // 5. Background work finished (postgres_changes subscriptions).
            Some(event) = events_rx.recv(), if open => session.handle_event(*event),
            // 5b. The change stream went down or came back.
            changed = next_change(&mut stream_state), if open && stream_state.is_some() => {
                match changed {
                    Err(_) => stream_state = None,
                    Ok(()) => {
                        let up = stream_state.as_ref().is_some_and(|w| *w.borrow());
                        if !up && stream_was_up && !stream_down_told {
                            stream_down_told = true;
                            session.tell_postgres_channels(
                                "error",
                                "The database's change stream was interrupted; changes are kept in the replication slot and will be delivered when it is back",
                            );
                        } else if up && stream_down_told {
                            stream_down_told = false;
                            session.tell_postgres_channels("ok", "Subscribed to PostgreSQL");
                        }
                        stream_was_up |= up;
                    }
                }
            }
            // 5c. A gap in the change stream (a recreated slot) concerns the channels subscribed.
            changed = next_change(&mut gaps), if open && gaps.is_some() => {
                match changed {
                    Err(_) => gaps = None,
                    Ok(()) => {
                        let gap = gaps.as_ref().and_then(|w| w.borrow().clone());
                        if let Some(gap) = gap {
                            session.tell_gap_to_subscribed(&gap);
                        }
                    }
                }
            }
            // 5d. The change stream passed the joins of channels waiting for replication_ready.
            changed = next_change(&mut ready), if open && ready_at.is_some() => {
                match changed {
                    Err(_) => ready = None,
                    Ok(()) => {
                        let served = ready.as_ref().map_or(0, |w| *w.borrow());
                        session.tell_ready(served);
                    }
                }
            }
            // 5e. A replication_ready wait timed out.
            _ = sleep_until(ready_at.unwrap_or(idle_at)), if ready_at.is_some() && open => {
                session.expire_ready_waits(Instant::now());
            }
            // 6. Join errors whose back-off delay is over.
            _ = sleep_until(delayed_at.unwrap_or(idle_at)), if delayed_at.is_some() && open => {
                session.flush_delayed(Instant::now());
            }
            // 7. A channel's token expired.
            _ = sleep_until(expiry.unwrap_or(idle_at)), if expiry.is_some() && open => {
                session.expire_tokens();
            }
            // 8. Nothing received for the idle timeout (supabase-js heartbeats every 25 s).
            _ = sleep_until(idle_at), if open => {
                tracing::debug!("closing idle socket");
                outbound.close(CloseReason::new(1000, "idle timeout"));
            }
        }
    }

    session.leave_all();
    session.sync_user_count();
    // Checks still running for this socket's channels are of no use to anyone now.
    session.tasks.abort_all();
    outbound.close(CloseReason::new(1000, "bye"));
    if !writer.is_finished() {
        // Give the writer a moment to send the close frame, then stop it.
        if tokio::time::timeout(Duration::from_millis(200), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }
    if linger && writer.is_finished() {
        tokio::time::sleep(LINGER_AFTER_TOO_BIG).await;
    }
}

impl Session {
    fn settings(&self) -> &Settings {
        &self.ctx.settings
    }

    fn send(&self, frame: Frame) {
        // A rejected push means the socket is already closing; nothing more to do.
        let _ = self.outbound.push(frame);
    }

    fn reply(&self, m: &Inbound, join_ref: &Ref, status: &str, response: &Value) {
        self.send(encode::reply(
            self.vsn, join_ref, &m.msg_ref, &m.topic, status, response,
        ));
    }

    fn handle_frame(&mut self, msg: Message) {
        let decoded = match &msg {
            Message::Text(text) => self.vsn.decode_text(text.as_str()),
            Message::Binary(bytes) => self.vsn.decode_binary(bytes),
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => return,
        };
        match decoded {
            Ok(m) => self.dispatch(m),
            Err(e) => {
                metrics::counter!(telemetry::MESSAGES_IN, "kind" => "malformed").increment(1);
                tracing::warn!(error = %e, "MalformedWebSocketMessage: frame dropped")
            }
        }
    }

    fn dispatch(&mut self, m: Inbound) {
        if let Some(r) = crate::postgres_changes::history::numeric_ref(&m.msg_ref) {
            self.last_ref
                .fetch_max(r, std::sync::atomic::Ordering::SeqCst);
        }
        metrics::counter!(telemetry::MESSAGES_IN, "kind" => ClientEvent::metric_kind(&m.event))
            .increment(1);
        match ClientEvent::parse(&m) {
            ClientEvent::Heartbeat => self.reply(&m, &Ref::Null, "ok", &json!({})),
            ClientEvent::Join => self.join(m),
            event if self.channels.contains_key(&m.topic) => self.channel_event(m, event),
            ClientEvent::Leave => self.reply(&m, &m.join_ref, "ok", &json!({})),
            _ => self.reply(
                &m,
                &Ref::Null,
                "error",
                &json!({"reason": "unmatched topic"}),
            ),
        }
    }

    /// An event on a joined channel.
    fn channel_event(&mut self, m: Inbound, event: ClientEvent) {
        match event {
            ClientEvent::Leave => {
                if let Some(ch) = self.channels.remove(&m.topic) {
                    self.reply(&m, &ch.join_ref, "ok", &json!({}));
                    self.send(encode::close(self.vsn, &ch.join_ref, &m.topic));
                    self.teardown(&ch);
                }
            }
            ClientEvent::Broadcast | ClientEvent::Presence(_)
                if self.needs_write_check(&m.topic) =>
            {
                self.await_write(m, event)
            }
            ClientEvent::Broadcast => self.broadcast(m),
            ClientEvent::Presence(presence) => self.presence(&m, presence),
            ClientEvent::AccessToken(token) => self.access_token(&m.topic, token),
            // Heartbeats and joins never get here (see `dispatch`).
            ClientEvent::Unknown | ClientEvent::Heartbeat | ClientEvent::Join => {
                let (topic, event) = (
                    clip(&m.topic, MAX_ECHO_BYTES),
                    clip(&m.event, MAX_ECHO_BYTES),
                );
                if self.log_info {
                    tracing::info!(%topic, %event, "Unexpected message from client");
                } else {
                    tracing::debug!(%topic, %event, "Unexpected message from client");
                }
            }
        }
    }

    fn handle_event(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::PrivateJoin {
                generation,
                request,
                result,
            } => self.private_join_checked(generation, *request, result),
            SessionEvent::WriteChecked {
                topic,
                channel,
                result,
            } => self.write_checked(topic, channel, result),
            SessionEvent::ReadRefreshed {
                topic,
                channel,
                result,
            } => self.read_refreshed(topic, channel, result),
            SessionEvent::PgPrepared {
                topic,
                channel,
                generation,
                result,
            } => self.pg_prepared(topic, channel, generation, result),
            SessionEvent::PgCaughtUp {
                topic,
                channel,
                generation,
                outcome,
            } => self.pg_caught_up(topic, channel, generation, outcome),
        }
    }

    /// Keeps the concurrent-users count: a socket counts while it has a channel.
    fn sync_user_count(&mut self) {
        let has = !self.channels.is_empty();
        if has && !self.user_counted {
            self.ctx.limits.add_user();
            self.user_counted = true;
        } else if !has && self.user_counted {
            self.ctx.limits.remove_user();
            self.user_counted = false;
        }
    }
}
