//! One WebSocket connection: the Phoenix socket and all the channels joined on it.
//!
//! A session is two tasks. The reader task (this module's [`run`]) decodes frames, answers
//! heartbeats and joins, keeps each channel's state, and runs the socket's timers (idle timeout,
//! token expiry, delayed join errors). The writer task drains the bounded [`crate::channels::outbound::Outbound`]
//! queue into the socket, so a slow client can only ever fill its own queue.
//!
//! All channels of a socket live in the reader task rather than one task each: a channel is a
//! few hundred bytes of state, and socket-wide ordering (reply, then pushes) comes for free.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{sleep_until, Instant};

use crate::auth::Claims;
use crate::channels::outbound::{CloseReason, Drain, Outbound};
use crate::channels::presence::Tracked;
use crate::channels::{ChannelId, Fanout, FanoutPayload, Subscriber, TopicKey};
use crate::config::Settings;
use crate::context::Context;
use crate::error::{clip, MAX_ECHO_BYTES};
use crate::policies;
use crate::postgres_changes::binding::{self, BindingSpec};
use crate::postgres_changes::registry::{Sub, Target};
use crate::protocol::{
    encode, join, Frame, Inbound, InboundPayload, Ref, UserBroadcast, Vsn, CLOSE_SERVICE_RESTART,
    TOPIC_PREFIX,
};
use crate::telemetry;

/// Join errors waiting for their back-off delay, per socket. Past this many, errors are answered
/// at once: the delay is there to slow down retry loops, not to hold memory for them.
const MAX_DELAYED_REPLIES: usize = 128;

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

/// One joined channel.
struct Channel {
    id: ChannelId,
    key: TopicKey,
    join_ref: Ref,
    sub_topic: String,
    broadcast_self: bool,
    broadcast_ack: bool,
    presence_key: String,
    presence_enabled: bool,
    /// The channel's token, cleaned as the verifier cleans it (URI-decoded, no whitespace): a
    /// pushed token equal to it after cleaning is the same token and changes nothing.
    token: String,
    claims: Claims,
    /// Start of the current presence rate window and the calls made in it.
    presence_window: Option<(Instant, u32)>,
    /// The channel's postgres_changes bindings, parsed. Shared with the check that runs them:
    /// they may be megabytes, and a token push must not copy them.
    pg_bindings: Arc<[BindingSpec]>,
    /// Bumped at every (re)subscription, so that a late result of an older one is ignored.
    pg_generation: u64,
    /// The postgres_changes check (at join, then after each new token).
    pg_job: Job,
    /// A private channel's read policy check after a new token.
    read_job: Job,
    /// The last change-stream gap this channel was told about (0: none).
    gap_told: u64,
    /// Private channels: what the read policies allow (`None` on public channels).
    read: Option<policies::Read>,
    /// Private channels: the write policies, checked on the first send or track.
    write: Option<policies::Write>,
    /// The write policy check (on the first send or track after a join or a new token).
    write_job: Job,
    /// Sends and tracks waiting for the write check, in order.
    awaiting_write: VecDeque<Inbound>,
    /// Ids of the messages replayed at join.
    replayed: Option<Arc<HashSet<String>>>,
    /// `replication_ready` asked for and not yet told: the readiness ticket and the deadline.
    ready_wait: Option<(u64, Instant)>,
}

/// A join, kept while a private channel's read policy is checked.
struct JoinRequest {
    join_ref: Ref,
    msg_ref: Ref,
    topic: String,
    sub_topic: String,
    cfg: join::JoinConfig,
    token: String,
    claims: Claims,
}

/// Pushes that may wait for one channel's write check; more are dropped (and logged).
const MAX_AWAITING_WRITE: usize = 256;

/// One kind of background check for a channel, run under its claims. At most one runs at a
/// time: a new token while it runs only marks it stale, and when it ends it runs once more with
/// the latest claims (its own result is dropped). So a client pushing tokens as fast as it can
/// costs each of its channels at most one running check of each kind, plus a flag.
#[derive(Default)]
struct Job {
    /// The running task (tracked in the session's task set, aborted when the channel goes).
    running: Option<AbortHandle>,
    /// The claims changed while it ran: its result is for older claims.
    stale: bool,
}

impl Job {
    /// Marks the job to run again if it is running; true when the caller should start it now.
    fn request(&mut self) -> bool {
        if self.running.is_some() {
            self.stale = true;
            false
        } else {
            true
        }
    }

    fn started(&mut self, handle: AbortHandle) {
        self.stale = false;
        self.running = Some(handle);
    }

    /// The task ended; true when its result is current (not stale).
    fn finished(&mut self) -> bool {
        self.running = None;
        !self.stale
    }

    fn abort(&self) {
        if let Some(h) = &self.running {
            h.abort();
        }
    }
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

fn channel_kind(ch: &Channel) -> &'static str {
    if ch.read.is_some() {
        "private"
    } else {
        "public"
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

fn unauthorized(sub_topic: &str) -> String {
    format!(
        "Unauthorized: You do not have permissions to read from this Channel topic: {sub_topic}"
    )
}

/// Results of work a session started in the background.
enum SessionEvent {
    /// postgres_changes subscriptions checked against the database.
    PgPrepared {
        topic: String,
        channel: ChannelId,
        generation: u64,
        result: Result<Vec<(u32, Sub)>, String>,
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
    /// at most one per pending join and one of each [`Job`] kind per channel. Finished ones are
    /// reaped each turn of the loop; the rest are aborted when the socket ends (close, error,
    /// server shutdown), so none outlives it.
    tasks: JoinSet<()>,
    next_generation: u64,
    headers: Map<String, Value>,
    /// Counted in the concurrent users (it has had a channel since it last had none).
    user_counted: bool,
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
                    let too_big = is_capacity_error(&e);
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

/// The reply to a track that would take the topic's presence state past
/// `PRESENCE_MAX_STATE_BYTES`.
const PRESENCE_STATE_FULL: &str =
    "Presence state size exceeded: this topic's presence state is full (PRESENCE_MAX_STATE_BYTES)";

/// Close code for a frame over `WEBSOCKET_MAX_FRAME_BYTES` (1009 "Message Too Big").
const CLOSE_TOO_BIG: u16 = 1009;
/// How long a connection stays open after a close 1009 for a frame that could not be read.
const LINGER_AFTER_TOO_BIG: Duration = Duration::from_secs(1);

fn is_capacity_error(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Space limit exceeded")
        || text.contains("too long")
        || text.contains("Message too big")
}

fn frame_len(frame: &Message) -> usize {
    match frame {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(_) => 0,
    }
}

async fn write_loop(mut sink: SplitSink<WebSocket, Message>, queue: Arc<Outbound>) {
    loop {
        match queue.drain().await {
            Drain::Frames(frames) => {
                let bytes: usize = frames.iter().map(frame_len).sum();
                let (frames_out, bytes_out) = telemetry::frames_and_bytes_out();
                frames_out.increment(frames.len() as u64);
                bytes_out.increment(bytes as u64);
                for frame in frames {
                    if sink.feed(frame).await.is_err() {
                        queue.close(CloseReason::new(1011, "write failed"));
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    queue.close(CloseReason::new(1011, "write failed"));
                    return;
                }
            }
            Drain::Close(frames, reason) => {
                if queue.overflowed() {
                    metrics::counter!(telemetry::SLOW_CONSUMER_DISCONNECTS).increment(1);
                    tracing::warn!(code = reason.code, "disconnecting slow consumer");
                }
                for frame in frames {
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                }
                let close = Message::Close(Some(CloseFrame {
                    code: reason.code,
                    reason: reason.reason.into(),
                }));
                let _ = sink.send(close).await;
                let _ = sink.close().await;
                return;
            }
        }
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

    /// A join error, answered after the back-off delay.
    fn join_error(&mut self, m: &Inbound, reason: String) {
        tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), %reason, "join refused");
        let code = reason.split(':').next().unwrap_or("Unknown").to_owned();
        metrics::counter!(telemetry::JOINS, "result" => "error").increment(1);
        metrics::counter!(telemetry::JOIN_ERRORS, "code" => code).increment(1);
        let frame = encode::reply(
            self.vsn,
            &m.join_ref,
            &m.msg_ref,
            &m.topic,
            "error",
            &json!({ "reason": reason }),
        );
        let delay = self.settings().channel_error_backoff;
        if delay.is_zero() || self.delayed.len() >= MAX_DELAYED_REPLIES {
            self.send(frame);
        } else {
            self.delayed.push_back((Instant::now() + delay, frame));
        }
    }

    fn flush_delayed(&mut self, now: Instant) {
        while let Some((at, _)) = self.delayed.front() {
            if *at > now {
                break;
            }
            if let Some((_, frame)) = self.delayed.pop_front() {
                self.send(frame);
            }
        }
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
        let kind = match m.event.as_str() {
            "heartbeat" => "heartbeat",
            "phx_join" => "join",
            "phx_leave" => "leave",
            "broadcast" => "broadcast",
            "presence" => "presence",
            "access_token" => "access_token",
            _ => "other",
        };
        metrics::counter!(telemetry::MESSAGES_IN, "kind" => kind).increment(1);
        if m.topic == "phoenix" && m.event == "heartbeat" {
            self.reply(&m, &Ref::Null, "ok", &json!({}));
            return;
        }
        if m.event == "phx_join" {
            self.join(m);
            return;
        }
        if self.channels.contains_key(&m.topic) {
            self.channel_event(m);
        } else if m.event == "phx_leave" {
            self.reply(&m, &m.join_ref, "ok", &json!({}));
        } else {
            self.reply(
                &m,
                &Ref::Null,
                "error",
                &json!({"reason": "unmatched topic"}),
            );
        }
    }

    fn join(&mut self, m: Inbound) {
        let Some(sub_topic) = m.topic.strip_prefix(TOPIC_PREFIX).map(str::to_owned) else {
            self.reply(
                &m,
                &Ref::Null,
                "error",
                &json!({"reason": "unmatched topic"}),
            );
            return;
        };
        // A second join of a joined topic replaces the channel: close the old one first.
        if let Some(old) = self.channels.remove(&m.topic) {
            tracing::debug!(topic = %clip(&m.topic, MAX_ECHO_BYTES), "duplicate join: closing the existing channel");
            self.send(encode::close(self.vsn, &old.join_ref, &m.topic));
            self.teardown(&old);
        }
        // A join still waiting for its policy check is superseded (and its check stopped).
        if let Some((_, task)) = self.pending_joins.remove(&m.topic) {
            task.abort();
        }
        if sub_topic.is_empty() {
            self.join_error(
                &m,
                "TopicNameRequired: You must provide a topic name".into(),
            );
            return;
        }
        let cfg = match &m.payload {
            InboundPayload::Json(raw) => join::parse(raw.get()),
            InboundPayload::UserBroadcast(_) => join::parse("{}"),
        };
        if !cfg.problems.is_empty() {
            tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), problems = ?cfg.problems, "InvalidJoinPayload: joining with defaults");
        }
        // The server-wide limits, in the original's order: users, joins per second.
        let limits = self.ctx.limits.clone();
        if !self.user_counted && self.channels.is_empty() && limits.users_full() {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "concurrent_users").increment(1);
            self.join_error(
                &m,
                "ConnectionRateLimitReached: Too many connected users".into(),
            );
            return;
        }
        limits.joins.add(1);
        if limits.joins.triggered() {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "joins_per_second").increment(1);
            tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), average = limits.joins.average(), "join refused: too many joins per second; closing the socket");
            metrics::counter!(telemetry::JOINS, "result" => "error").increment(1);
            metrics::counter!(telemetry::JOIN_ERRORS, "code" => "ClientJoinRateLimitReached")
                .increment(1);
            self.send(encode::reply(
                self.vsn,
                &m.join_ref,
                &m.msg_ref,
                &m.topic,
                "error",
                &json!({ "reason": "ClientJoinRateLimitReached: Too many joins per second" }),
            ));
            // As the original, the socket is disconnected too.
            self.outbound
                .close(CloseReason::new(1001, "too many joins per second"));
            return;
        }
        if self.channels.len() + self.pending_joins.len() >= self.settings().max_channels_per_client
        {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "channels_per_client")
                .increment(1);
            self.join_error(&m, "ChannelRateLimitReached: Too many channels".into());
            return;
        }
        // `sb_...` keys are opaque API keys, not JWTs: the socket's token is used instead.
        let token = match &cfg.access_token {
            Some(t) if !t.starts_with("sb_") => t.as_str(),
            _ => self.socket_token.as_str(),
        };
        let claims = match self.ctx.verifier.verify(token) {
            Ok(c) => c,
            Err(e) => {
                self.join_error(&m, e.join_reason());
                return;
            }
        };
        let token = crate::auth::clean_token(token);
        let request = JoinRequest {
            join_ref: m.join_ref.clone(),
            msg_ref: m.msg_ref.clone(),
            topic: m.topic.clone(),
            sub_topic,
            cfg,
            token,
            claims,
        };
        if !request.cfg.private {
            if request.cfg.replay.is_some() {
                self.join_error(
                    &m,
                    "UnableToReplayMessages: Replay is not allowed for public channels".into(),
                );
                return;
            }
            self.finish_join(request, None, Vec::new());
            return;
        }
        if let Some(Err(())) = request.cfg.replay {
            self.join_error(
                &m,
                "UnableToReplayMessages: Replay params are not valid".into(),
            );
            return;
        }
        let Some(checker) = self.ctx.policies.clone() else {
            // Without a database there are no policies to allow anything: deny.
            let reason = unauthorized(&request.sub_topic);
            self.join_error(&m, reason);
            return;
        };
        // The read policy is checked off the socket's task: joins do not wait on each other.
        self.next_generation += 1;
        let generation = self.next_generation;
        let ctx = policies::Context::new(&request.sub_topic, &request.claims, &self.headers);
        let events = self.events.clone();
        let topic = m.topic.clone();
        let task = self.tasks.spawn(async move {
            let result = async {
                let read = checker.read(&ctx).await?;
                let replay = match request.cfg.replay {
                    Some(Ok((since, limit))) if read.broadcast => {
                        checker.replay(&ctx.topic, since, limit).await?
                    }
                    _ => Vec::new(),
                };
                Ok::<_, policies::PolicyError>((read, replay))
            }
            .await;
            let _ = events
                .send(Box::new(SessionEvent::PrivateJoin {
                    generation,
                    request: Box::new(request),
                    result,
                }))
                .await;
        });
        self.pending_joins.insert(topic, (generation, task));
    }

    /// A private join's policy check finished.
    fn private_join_checked(
        &mut self,
        generation: u64,
        request: JoinRequest,
        result: Result<(policies::Read, Vec<policies::Stored>), policies::PolicyError>,
    ) {
        if self.pending_joins.get(&request.topic).map(|(g, _)| *g) != Some(generation) {
            return; // superseded by another join, or left
        }
        self.pending_joins.remove(&request.topic);
        let m = Inbound {
            join_ref: request.join_ref.clone(),
            msg_ref: request.msg_ref.clone(),
            topic: request.topic.clone(),
            event: "phx_join".into(),
            payload: InboundPayload::Json(
                RawValue::from_string("{}".into()).unwrap_or_else(|_| unreachable!()),
            ),
        };
        match result {
            Ok((read, replay)) => {
                let wants_replay = matches!(request.cfg.replay, Some(Ok(_)));
                if !read.any() || (wants_replay && !read.broadcast) {
                    let reason = unauthorized(&request.sub_topic);
                    self.join_error(&m, reason);
                    return;
                }
                self.finish_join(request, Some(read), replay);
            }
            Err(e @ policies::PolicyError::MissingPartition) => {
                tracing::warn!(topic = %clip(&request.topic, MAX_ECHO_BYTES), "private channel join: {e}");
                self.join_error(&m, e.to_string());
            }
            Err(e) => {
                tracing::warn!(topic = %clip(&request.topic, MAX_ECHO_BYTES), error = %e, "private channel policy check failed: denying");
                let reason = unauthorized(&request.sub_topic);
                self.join_error(&m, reason);
            }
        }
    }

    /// Joins the channel: reply, subscribe, postgres_changes, presence state, replay.
    fn finish_join(
        &mut self,
        request: JoinRequest,
        read: Option<policies::Read>,
        replay: Vec<policies::Stored>,
    ) {
        let JoinRequest {
            join_ref,
            msg_ref,
            topic,
            sub_topic,
            cfg,
            token,
            claims,
        } = request;
        let key = TopicKey::new(&topic, cfg.private);
        let presence_key = if cfg.presence_key.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            cfg.presence_key.clone()
        };
        let replayed: Option<Arc<HashSet<String>>> =
            (!replay.is_empty()).then(|| Arc::new(replay.iter().map(|r| r.id.clone()).collect()));
        let mut channel = Channel {
            id: ChannelId::next(),
            key,
            join_ref: join_ref.clone(),
            sub_topic,
            broadcast_self: cfg.broadcast_self,
            broadcast_ack: cfg.broadcast_ack,
            presence_key,
            presence_enabled: cfg.presence_enabled,
            token,
            claims,
            presence_window: None,
            pg_bindings: Arc::from(Vec::new()),
            pg_generation: 0,
            pg_job: Job::default(),
            read_job: Job::default(),
            gap_told: 0,
            read,
            write: None,
            write_job: Job::default(),
            awaiting_write: VecDeque::new(),
            replayed,
            ready_wait: None,
        };

        let bindings: Vec<Value> = cfg
            .postgres_changes
            .iter()
            .map(|b| {
                let mut echoed = b.clone();
                echoed.insert("id".into(), Value::from(binding_id(b)));
                Value::Object(echoed)
            })
            .collect();
        self.send(encode::reply(
            self.vsn,
            &join_ref,
            &msg_ref,
            &topic,
            "ok",
            &json!({ "postgres_changes": bindings }),
        ));
        self.ctx
            .channels
            .hub
            .subscribe(&channel.key, self.subscriber(&channel));
        if !cfg.postgres_changes.is_empty() {
            self.start_postgres_changes(&mut channel, &cfg.postgres_changes);
        }
        for stored in &replay {
            if let Some(frame) = stored.replay_frame(self.vsn, &join_ref, &topic) {
                self.send(frame);
            }
        }
        if channel.presence_enabled && channel.read.is_none_or(|r| r.presence) {
            // The joiner did not choose the state's size (PRESENCE_MAX_STATE_BYTES bounds it):
            // it is queued even past the queue's cap rather than close the joiner as slow.
            let state = self.ctx.channels.presence.state(&channel.key);
            let _ = self.outbound.push_unchosen(encode::push(
                self.vsn,
                &channel.join_ref,
                &channel.key.topic,
                "presence_state",
                &state,
            ));
        }
        // Asked for after the hub subscription: once the stream has passed this point, every
        // broadcast from the database committed from now on reaches the channel.
        let no_stream = cfg.replication_ready && self.ctx.replication.is_none();
        if cfg.replication_ready {
            if let Some(status) = &self.ctx.replication {
                channel.ready_wait = Some((
                    status.request_ready(),
                    Instant::now() + status.ready_timeout,
                ));
            }
        }
        tracing::debug!(topic = %clip(&topic, MAX_ECHO_BYTES), role = %channel.claims.role, private = cfg.private, "joined");
        metrics::counter!(telemetry::JOINS, "result" => "ok").increment(1);
        metrics::gauge!(telemetry::CHANNELS, "kind" => channel_kind(&channel)).increment(1.0);
        self.channels.insert(topic.clone(), Box::new(channel));
        if no_stream {
            self.shutdown_channel(
                &topic,
                "walcast has no database configured (set DB_HOST or DATABASE_URL): there is no replication connection".into(),
            );
        }
    }

    /// When the earliest `replication_ready` wait times out.
    fn next_ready_deadline(&self) -> Option<Instant> {
        self.channels
            .values()
            .filter_map(|c| c.ready_wait.map(|(_, at)| at))
            .min()
    }

    /// The stream has passed the join of every ticket up to `served`: tell those channels.
    fn tell_ready(&mut self, served: u64) {
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
    fn expire_ready_waits(&mut self, now: Instant) {
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

    /// How the hub sees a channel: what it may receive.
    fn subscriber(&self, channel: &Channel) -> Subscriber {
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

    fn push(&self, channel: &Channel, event: &str, payload: &Value) {
        self.send(encode::push(
            self.vsn,
            &channel.join_ref,
            &channel.key.topic,
            event,
            payload,
        ));
    }

    fn channel_event(&mut self, m: Inbound) {
        match m.event.as_str() {
            "phx_leave" => {
                if let Some(ch) = self.channels.remove(&m.topic) {
                    self.reply(&m, &ch.join_ref, "ok", &json!({}));
                    self.send(encode::close(self.vsn, &ch.join_ref, &m.topic));
                    self.teardown(&ch);
                }
            }
            "broadcast" | "presence" if self.needs_write_check(&m.topic) => self.await_write(m),
            "broadcast" => self.broadcast(m),
            "presence" => self.presence(m),
            "access_token" => self.access_token(m),
            other => {
                if self.log_info {
                    tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), event = %clip(other, MAX_ECHO_BYTES), "Unexpected message from client");
                } else {
                    tracing::debug!(topic = %clip(&m.topic, MAX_ECHO_BYTES), event = %clip(other, MAX_ECHO_BYTES), "Unexpected message from client");
                }
            }
        }
    }

    fn broadcast(&mut self, m: Inbound) {
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

    fn presence(&mut self, m: Inbound) {
        let payload: Value = match &m.payload {
            InboundPayload::Json(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            InboundPayload::UserBroadcast(_) => Value::Null,
        };
        let Some(ch) = self.channels.get(&m.topic) else {
            return;
        };
        let join_ref = ch.join_ref.clone();
        // A payload without an event is accepted and ignored, as the original does.
        let Some(event) = payload.get("event") else {
            self.reply(&m, &join_ref, "ok", &json!({}));
            return;
        };
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
        let event = event.as_str().map(str::to_ascii_lowercase);
        match event.as_deref() {
            Some("track")
                if self.channels.get(&m.topic).is_some_and(|ch| {
                    ch.read.is_some() && !ch.write.is_some_and(|w| w.presence)
                }) =>
            {
                tracing::debug!(topic = %clip(&m.topic, MAX_ECHO_BYTES), "track refused: write not allowed by policy");
                self.reply(&m, &join_ref, "error", &json!({}));
            }
            Some("track") => {
                let meta = match payload.get("payload") {
                    None | Some(Value::Null) => Map::new(),
                    Some(Value::Object(meta)) => meta.clone(),
                    Some(_) => {
                        self.reply(
                            &m,
                            &join_ref,
                            "error",
                            &json!({"reason": "Presence track payload must be a map"}),
                        );
                        return;
                    }
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
                            &m,
                            &join_ref,
                            "error",
                            &json!({"reason": PRESENCE_STATE_FULL}),
                        );
                    }
                    tracked => {
                        if let Some(ch) = self.channels.get_mut(&m.topic) {
                            ch.presence_enabled = true;
                        }
                        self.reply(&m, &join_ref, "ok", &json!({}));
                        if let Tracked::Diff(diff) = tracked {
                            self.publish_presence_diff(&key, &diff);
                        }
                    }
                }
            }
            Some("untrack") => {
                let Some(ch) = self.channels.get(&m.topic) else {
                    return;
                };
                let (key, id, pkey) = (ch.key.clone(), ch.id, ch.presence_key.clone());
                self.reply(&m, &join_ref, "ok", &json!({}));
                if let Some(diff) = self.ctx.channels.presence.untrack(&key, id, &pkey) {
                    self.publish_presence_diff(&key, &diff);
                }
            }
            _ => {
                tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), event = %clip(&payload.get("event").map(|e| e.to_string()).unwrap_or_default(), MAX_ECHO_BYTES), "UnknownPresenceEvent");
                self.reply(&m, &join_ref, "error", &json!({}));
            }
        }
    }

    /// Counts a presence call against the channel's window; false when over the limit.
    fn presence_allowed(&mut self, topic: &str) -> bool {
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

    fn publish_presence_diff(&self, key: &TopicKey, diff: &Value) {
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

    fn access_token(&mut self, m: Inbound) {
        let payload: Value = match &m.payload {
            InboundPayload::Json(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            InboundPayload::UserBroadcast(_) => Value::Null,
        };
        let Some(ch) = self.channels.get(&m.topic) else {
            return;
        };
        // No reply is ever sent to `access_token`.
        let Some(Value::String(raw)) = payload.get("access_token") else {
            return;
        };
        // The verifier cleans a token (URI-decoded, whitespace removed) before it reads it: one
        // equal to the channel's after cleaning is the same token, and costs nothing more.
        let token = crate::auth::clean_token(raw);
        if raw.starts_with("sb_") || token.starts_with("sb_") || token == ch.token {
            return;
        }
        match self.ctx.verifier.verify(raw) {
            Ok(claims) => {
                if let Some(mut ch) = self.channels.remove(&m.topic) {
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
                    self.channels.insert(m.topic.clone(), ch);
                }
            }
            Err(e) => self.shutdown_channel(&m.topic, e.to_string()),
        }
    }

    /// Whether a send or track on this channel must wait for its write policy (private
    /// channels, before their first write check).
    fn needs_write_check(&self, topic: &str) -> bool {
        self.channels
            .get(topic)
            .is_some_and(|ch| ch.read.is_some() && ch.write.is_none())
    }

    /// Queues a send or track until the channel's write policy is known, starting the check.
    fn await_write(&mut self, m: Inbound) {
        let Some(ch) = self.channels.get_mut(&m.topic) else {
            return;
        };
        if ch.awaiting_write.len() >= MAX_AWAITING_WRITE {
            tracing::warn!(topic = %clip(&m.topic, MAX_ECHO_BYTES), "too many pushes waiting for the write policy: dropped");
            return;
        }
        let topic = m.topic.clone();
        ch.awaiting_write.push_back(m);
        if ch.write_job.running.is_none() {
            self.check_write(&topic);
        }
    }

    /// Starts a channel's write policy check (none may be running).
    fn check_write(&mut self, topic: &str) {
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
    fn drain_awaiting_write(&mut self, topic: &str) {
        let Some(ch) = self.channels.get_mut(topic) else {
            return;
        };
        let waiting: Vec<Inbound> = ch.awaiting_write.drain(..).collect();
        for m in waiting {
            match m.event.as_str() {
                "broadcast" => self.broadcast(m),
                _ => self.presence(m),
            }
        }
    }

    /// Evaluates a private channel's read policies again (after a token change): at once, or,
    /// when a check is running, once it ends.
    fn refresh_read(&mut self, ch: &mut Channel) {
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

    /// Parses a channel's bindings and starts checking them against the database. Errors that
    /// need no database are reported at once, like the original's parse errors.
    fn start_postgres_changes(&mut self, channel: &mut Channel, raw: &[Map<String, Value>]) {
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
            self.push_system(channel, "postgres_changes", "error", &message);
            return;
        }
        let mut specs = Vec::with_capacity(raw.len());
        for b in raw {
            match binding::parse(b, binding_id(b)).map_err(|e| e.to_string()) {
                Ok(spec) => specs.push(spec),
                Err(message) => {
                    tracing::info!(topic = %clip(&channel.key.topic, MAX_ECHO_BYTES), %message, "postgres_changes subscription refused");
                    self.push_system(channel, "postgres_changes", "error", &message);
                    return;
                }
            }
        }
        channel.pg_bindings = Arc::from(specs);
        self.prepare_postgres_changes(channel);
    }

    /// Checks a channel's bindings under its claims: at once, or, when a check is running,
    /// once it ends (with the claims current then).
    fn prepare_postgres_changes(&mut self, channel: &mut Channel) {
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
            let result = pg.prepare(target, &claims, &specs).await.map_err(|e| e.to_string());
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
            } => {
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
            SessionEvent::ReadRefreshed {
                topic,
                channel,
                result,
            } => {
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
            SessionEvent::PgPrepared {
                topic,
                channel,
                generation,
                result,
            } => {
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
                        if let Some(pg) = &self.ctx.pg {
                            pg.registry.replace(channel, subs);
                        }
                        // Sent only now that the subscriptions are live: a change committed
                        // after the client reads this is matched against them.
                        self.push_system(ch, "postgres_changes", "ok", "Subscribed to PostgreSQL");
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
                        self.push_system(ch, "postgres_changes", "error", &message);
                    }
                }
            }
        }
    }

    fn push_system(&self, channel: &Channel, extension: &str, status: &str, message: &str) {
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

    /// Tells a channel with postgres_changes about a gap in the change stream, once.
    fn tell_gap(&mut self, topic: &str, gap: &crate::replication::Gap) {
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
    fn tell_gap_to_subscribed(&mut self, gap: &crate::replication::Gap) {
        if gap.reason != crate::replication::GapReason::SlotLost {
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
    fn tell_postgres_channels(&self, status: &str, message: &str) {
        for ch in self.channels.values() {
            if !ch.pg_bindings.is_empty() {
                self.push_system(ch, "postgres_changes", status, message);
            }
        }
    }

    /// Stops a channel with a reason: `system` error, then `phx_close`.
    fn shutdown_channel(&mut self, topic: &str, message: String) {
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
    fn teardown(&self, ch: &Channel) {
        metrics::gauge!(telemetry::CHANNELS, "kind" => channel_kind(ch)).decrement(1.0);
        // Its checks are of no use any more.
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

    fn leave_all(&mut self) {
        let channels: Vec<Box<Channel>> = self.channels.drain().map(|(_, c)| c).collect();
        for ch in &channels {
            self.teardown(ch);
        }
    }

    /// When the earliest channel token expires.
    fn next_token_expiry(&self) -> Option<Instant> {
        let exp = self.channels.values().map(|c| c.claims.exp).min()?;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let wait_ms = (exp.saturating_mul(1000) - now_ms).max(0) as u64;
        Some(Instant::now() + Duration::from_millis(wait_ms))
    }

    fn expire_tokens(&mut self) {
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

/// A stable id for a postgres_changes binding: the same parameters always give the same id (an
/// integer below 2^27, like the original's `phash2`), so identical bindings share one.
fn binding_id(binding: &Map<String, Value>) -> u32 {
    // DefaultHasher::new() uses fixed keys, so ids are stable across restarts.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    Value::Object(binding.clone()).to_string().hash(&mut h);
    (h.finish() % (1 << 27)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_ids_are_stable_and_small() {
        let a: Map<String, Value> =
            serde_json::from_str(r#"{"event":"*","schema":"public"}"#).unwrap();
        let b: Map<String, Value> =
            serde_json::from_str(r#"{"schema":"public","event":"*"}"#).unwrap();
        assert_eq!(binding_id(&a), binding_id(&b));
        assert!(binding_id(&a) < (1 << 27));
    }
}
