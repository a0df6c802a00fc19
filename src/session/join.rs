//! The join pipeline: topic and server-wide limits, the join's token, a private channel's read
//! policy and replay (checked off the socket's task), then [`Session::finish_join`] (reply, hub
//! subscription, postgres_changes, presence state, replayed messages). Refused joins are
//! answered after the back-off delay.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::channel::{channel_kind, Channel, Job};
use super::postgres_changes::binding_id;
use super::{Session, SessionEvent};
use crate::auth::{AuthError, Claims};
use crate::channels::outbound::CloseReason;
use crate::channels::{ChannelId, TopicKey};
use crate::policies;
use crate::protocol::{clip, MAX_ECHO_BYTES};
use crate::protocol::{encode, join, Inbound, InboundPayload, Ref, TOPIC_PREFIX};
use crate::telemetry;

/// Join errors waiting for their back-off delay, per socket. Past this many, errors are answered
/// at once: the delay is there to slow down retry loops, not to hold memory for them.
pub(super) const MAX_DELAYED_REPLIES: usize = 128;

/// A join, kept while a private channel's read policy is checked.
pub(super) struct JoinRequest {
    pub(super) join_ref: Ref,
    pub(super) msg_ref: Ref,
    pub(super) topic: String,
    pub(super) sub_topic: String,
    pub(super) cfg: join::JoinConfig,
    pub(super) token: String,
    pub(super) claims: Claims,
}

/// Why a join was refused: the client gets `{"reason": "<code>: <message>"}`. `Display` is
/// that reason, verbatim as ERROR_CODES.md lists it (the original's strings); [`JoinError::code`]
/// is the code alone, the `code` label of `walcast_join_errors_total`.
///
/// Here rather than in `protocol`: two variants carry (or mirror) what auth and the policies
/// found, and `protocol` is the wire format alone, below both.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum JoinError {
    /// The topic is `realtime:` alone.
    #[error("TopicNameRequired: You must provide a topic name")]
    TopicNameRequired,
    /// A socket without channels would exceed `TENANT_MAX_CONCURRENT_USERS`.
    #[error("ConnectionRateLimitReached: Too many connected users")]
    ConnectionRateLimitReached,
    /// Joins per second over `TENANT_MAX_JOINS_PER_SECOND` (answered at once; the socket closes).
    #[error("ClientJoinRateLimitReached: Too many joins per second")]
    ClientJoinRateLimitReached,
    /// The socket has `TENANT_MAX_CHANNELS_PER_CLIENT` channels.
    #[error("ChannelRateLimitReached: Too many channels")]
    ChannelRateLimitReached,
    /// The join's token does not verify.
    #[error("{}", .0.join_reason())]
    Token(AuthError),
    /// A private channel the read policies do not let the claims read (also when a policy check
    /// fails, when replay is asked without broadcast read, and without a database).
    #[error(
        "Unauthorized: You do not have permissions to read from this Channel topic: {sub_topic}"
    )]
    Unauthorized { sub_topic: String },
    /// `realtime.messages` has no partition for now.
    #[error("{}", policies::PolicyError::MissingPartition)]
    MissingPartition,
    /// `broadcast.replay` on a public channel.
    #[error("UnableToReplayMessages: Replay is not allowed for public channels")]
    ReplayOnPublicChannel,
    /// `broadcast.replay` without an integer `since` (or with a non-integer `limit`).
    #[error("UnableToReplayMessages: Replay params are not valid")]
    InvalidReplayParams,
}

impl JoinError {
    /// The stable code: the reason's part before `:`.
    pub(super) fn code(&self) -> &'static str {
        match self {
            JoinError::TopicNameRequired => "TopicNameRequired",
            JoinError::ConnectionRateLimitReached => "ConnectionRateLimitReached",
            JoinError::ClientJoinRateLimitReached => "ClientJoinRateLimitReached",
            JoinError::ChannelRateLimitReached => "ChannelRateLimitReached",
            JoinError::Token(e) => e.join_code(),
            JoinError::Unauthorized { .. } => "Unauthorized",
            JoinError::MissingPartition => "MissingPartition",
            JoinError::ReplayOnPublicChannel | JoinError::InvalidReplayParams => {
                "UnableToReplayMessages"
            }
        }
    }

    /// The `phx_reply` response: `{"reason": ...}`.
    fn response(&self) -> Value {
        json!({ "reason": self.to_string() })
    }
}

impl Session {
    /// Refuses a join: the error is answered after the back-off delay.
    pub(super) fn join_error(&mut self, m: &Inbound, error: JoinError) {
        self.refuse_join(&m.join_ref, &m.msg_ref, &m.topic, error);
    }

    fn refuse_join(&mut self, join_ref: &Ref, msg_ref: &Ref, topic: &str, error: JoinError) {
        tracing::info!(topic = %clip(topic, MAX_ECHO_BYTES), reason = %error, "join refused");
        metrics::counter!(telemetry::JOINS, "result" => "error").increment(1);
        metrics::counter!(telemetry::JOIN_ERRORS, "code" => error.code()).increment(1);
        let frame = encode::reply(
            self.vsn,
            join_ref,
            msg_ref,
            topic,
            "error",
            &error.response(),
        );
        let delay = self.settings().channel_error_backoff;
        if delay.is_zero() || self.delayed.len() >= MAX_DELAYED_REPLIES {
            self.send(frame);
        } else {
            self.delayed.push_back((Instant::now() + delay, frame));
        }
    }

    pub(super) fn flush_delayed(&mut self, now: Instant) {
        while let Some((at, _)) = self.delayed.front() {
            if *at > now {
                break;
            }
            if let Some((_, frame)) = self.delayed.pop_front() {
                self.send(frame);
            }
        }
    }

    pub(super) fn join(&mut self, m: Inbound) {
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
            self.join_error(&m, JoinError::TopicNameRequired);
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
            self.join_error(&m, JoinError::ConnectionRateLimitReached);
            return;
        }
        limits.joins.add(1);
        if limits.joins.triggered() {
            metrics::counter!(telemetry::RATE_LIMITED, "limit" => "joins_per_second").increment(1);
            tracing::info!(topic = %clip(&m.topic, MAX_ECHO_BYTES), average = limits.joins.average(), "join refused: too many joins per second; closing the socket");
            let error = JoinError::ClientJoinRateLimitReached;
            metrics::counter!(telemetry::JOINS, "result" => "error").increment(1);
            metrics::counter!(telemetry::JOIN_ERRORS, "code" => error.code()).increment(1);
            self.send(encode::reply(
                self.vsn,
                &m.join_ref,
                &m.msg_ref,
                &m.topic,
                "error",
                &error.response(),
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
            self.join_error(&m, JoinError::ChannelRateLimitReached);
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
                self.join_error(&m, JoinError::Token(e));
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
                self.join_error(&m, JoinError::ReplayOnPublicChannel);
                return;
            }
            self.finish_join(request, None, Vec::new());
            return;
        }
        if let Some(Err(())) = request.cfg.replay {
            self.join_error(&m, JoinError::InvalidReplayParams);
            return;
        }
        let Some(checker) = self.ctx.policies.clone() else {
            // Without a database there are no policies to allow anything: deny.
            let sub_topic = request.sub_topic;
            self.join_error(&m, JoinError::Unauthorized { sub_topic });
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
    pub(super) fn private_join_checked(
        &mut self,
        generation: u64,
        request: JoinRequest,
        result: Result<(policies::Read, Vec<policies::Stored>), policies::PolicyError>,
    ) {
        if self.pending_joins.get(&request.topic).map(|(g, _)| *g) != Some(generation) {
            return; // superseded by another join, or left
        }
        self.pending_joins.remove(&request.topic);
        let error = match result {
            Ok((read, replay)) => {
                let wants_replay = matches!(request.cfg.replay, Some(Ok(_)));
                if read.any() && (!wants_replay || read.broadcast) {
                    self.finish_join(request, Some(read), replay);
                    return;
                }
                JoinError::Unauthorized {
                    sub_topic: request.sub_topic.clone(),
                }
            }
            Err(e @ policies::PolicyError::MissingPartition) => {
                tracing::warn!(topic = %clip(&request.topic, MAX_ECHO_BYTES), "private channel join: {e}");
                JoinError::MissingPartition
            }
            Err(e) => {
                tracing::warn!(topic = %clip(&request.topic, MAX_ECHO_BYTES), error = %e, "private channel policy check failed: denying");
                JoinError::Unauthorized {
                    sub_topic: request.sub_topic.clone(),
                }
            }
        };
        self.refuse_join(&request.join_ref, &request.msg_ref, &request.topic, error);
    }

    /// Joins the channel: reply, subscribe, postgres_changes, presence state, replay.
    pub(super) fn finish_join(
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
            catchup_key: None,
            catchup_from: None,
            catchup_alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            catchup_lost: false,
            catchup_gap_told: false,
            catchup_fresh: false,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal with today's wire string, verbatim, and its code (the metric label).
    fn cases() -> Vec<(JoinError, &'static str, &'static str)> {
        vec![
            (
                JoinError::TopicNameRequired,
                "TopicNameRequired",
                "TopicNameRequired: You must provide a topic name",
            ),
            (
                JoinError::ConnectionRateLimitReached,
                "ConnectionRateLimitReached",
                "ConnectionRateLimitReached: Too many connected users",
            ),
            (
                JoinError::ClientJoinRateLimitReached,
                "ClientJoinRateLimitReached",
                "ClientJoinRateLimitReached: Too many joins per second",
            ),
            (
                JoinError::ChannelRateLimitReached,
                "ChannelRateLimitReached",
                "ChannelRateLimitReached: Too many channels",
            ),
            (
                JoinError::Token(AuthError::Expired(3)),
                "InvalidJWTToken",
                "InvalidJWTToken: Token has expired 3 seconds ago",
            ),
            (
                JoinError::Token(AuthError::MissingClaims),
                "InvalidJWTToken",
                "InvalidJWTToken: Fields `role` and `exp` are required in JWT",
            ),
            (
                JoinError::Token(AuthError::NotYetValid(7)),
                "InvalidJWTToken",
                "InvalidJWTToken: Token is not valid yet, it becomes valid in 7 seconds",
            ),
            (
                JoinError::Token(AuthError::ClaimMismatch("iss".into())),
                "InvalidJWTToken",
                "InvalidJWTToken: Token claim `iss` does not have the expected value",
            ),
            (
                JoinError::Token(AuthError::Malformed),
                "MalformedJWT",
                "MalformedJWT: The token provided is not a valid JWT",
            ),
            (
                JoinError::Token(AuthError::Missing),
                "MalformedJWT",
                "MalformedJWT: The token provided is not a valid JWT",
            ),
            (
                JoinError::Token(AuthError::Signature),
                "JwtSignatureError",
                "JwtSignatureError: Failed to validate JWT signature",
            ),
            (
                JoinError::Token(AuthError::Signer),
                "JwtSignerError",
                "JwtSignerError: Failed to generate JWT signer, check your JWT secret or JWKS configuration",
            ),
            (
                JoinError::Token(AuthError::SignerForKid("a:b".into())),
                "JwtSignerError",
                "JwtSignerError: Failed to generate JWT signer for key ID (kid) \"a:b\", check your JWT secret or JWKS configuration",
            ),
            (
                JoinError::Unauthorized {
                    sub_topic: "room:1".into(),
                },
                "Unauthorized",
                "Unauthorized: You do not have permissions to read from this Channel topic: room:1",
            ),
            (
                JoinError::MissingPartition,
                "MissingPartition",
                "MissingPartition: Realtime was unable to find the expected messages partition",
            ),
            (
                JoinError::ReplayOnPublicChannel,
                "UnableToReplayMessages",
                "UnableToReplayMessages: Replay is not allowed for public channels",
            ),
            (
                JoinError::InvalidReplayParams,
                "UnableToReplayMessages",
                "UnableToReplayMessages: Replay params are not valid",
            ),
        ]
    }

    #[test]
    fn reasons_and_codes_are_todays() {
        for (error, code, reason) in cases() {
            assert_eq!(error.to_string(), reason);
            assert_eq!(error.code(), code, "{reason}");
            // The code is the reason's part before ':' (what the metric label always was).
            assert_eq!(reason.split(':').next(), Some(code), "{reason}");
            assert_eq!(error.response(), json!({ "reason": reason }));
        }
    }

    /// ERROR_CODES.md lists every reason (with `<N>`, `<claim>`, `<topic>` for the parts that
    /// vary, and the signer errors cut short).
    #[test]
    fn error_codes_md_lists_every_reason() {
        let doc = include_str!("../../ERROR_CODES.md");
        for (_, _, reason) in cases() {
            let listed = reason
                .replace(" 3 seconds", " <N> seconds")
                .replace(" 7 seconds", " <N> seconds")
                .replace("`iss`", "`<claim>`")
                .replace("topic: room:1", "topic: <topic>");
            let listed = match listed.strip_prefix("JwtSignerError: Failed to generate JWT signer")
            {
                Some(_) => "JwtSignerError: Failed to generate JWT signer...".to_owned(),
                None => listed,
            };
            assert!(
                doc.contains(&format!("`{listed}`")) || doc.contains(&format!("``{listed}``")),
                "ERROR_CODES.md does not list {listed}"
            );
        }
    }
}
