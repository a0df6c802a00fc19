//! REST: broadcast (batch and single message), ping and health.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::auth::Claims;
use crate::channels::{Fanout, FanoutPayload, TopicKey};
use crate::context::Context;
use crate::protocol::TOPIC_PREFIX;
use crate::protocol::{binary, Encoding, UserBroadcast};

pub(super) async fn healthcheck() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain")], "ok")
}

pub(super) async fn ping() -> impl IntoResponse {
    Json(json!({"message": "Success"}))
}

/// The largest REST request body: the original's (Plug.Parsers' default, 8,000,000 bytes), or
/// more when `TENANT_MAX_PAYLOAD_SIZE_IN_KB` allows a payload that would not fit in it.
pub(super) const ORIGINAL_MAX_BODY_BYTES: usize = 8_000_000;

pub(super) fn max_body_bytes(max_payload_bytes: usize) -> usize {
    ORIGINAL_MAX_BODY_BYTES.max(max_payload_bytes.saturating_add(64 * 1024))
}

/// A body that could not be read: over the limit (413) or cut short (400), as JSON like every
/// other REST error.
fn body_refused(rejection: BytesRejection) -> Response {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return message(status, "Request Entity Too Large");
    }
    message(status, &rejection.body_text())
}

fn message(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "message": text }))).into_response()
}

/// The caller's token: `Authorization: Bearer` (scheme in any case), else the `apikey` header.
fn authorize(ctx: &Context, headers: &HeaderMap) -> Result<Claims, Box<Response>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
    let token = bearer.or_else(|| {
        headers
            .get("apikey")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let Some(token) = token else {
        return Err(Box::new(message(StatusCode::UNAUTHORIZED, "Unauthorized")));
    };
    ctx.verifier.verify(&token).map_err(|e| {
        tracing::info!(reason = e.code(), "REST broadcast refused");
        Box::new(message(StatusCode::UNAUTHORIZED, "Unauthorized"))
    })
}

/// Whether the caller's broadcast write policy allows `topic` (without a database: no).
async fn may_write(ctx: &Context, topic: &str, claims: &Claims, headers: &HeaderMap) -> bool {
    let Some(checker) = &ctx.policies else {
        return false;
    };
    let request_headers: Map<String, Value> = headers
        .iter()
        .filter(|(name, _)| name.as_str() != "authorization" && name.as_str() != "apikey")
        .filter_map(|(name, value)| {
            Some((
                name.as_str().to_owned(),
                Value::String(value.to_str().ok()?.to_owned()),
            ))
        })
        .collect();
    let pctx = crate::policies::Context::new(topic, claims, &request_headers);
    match checker.write(&pctx).await {
        Ok(w) => w.broadcast,
        Err(e) => {
            tracing::warn!(%topic, error = %e, "write policy check failed: denying");
            false
        }
    }
}

/// `POST /api/broadcast` with `{"messages":[{topic, event, payload, private?, id?}]}`.
/// The events-per-second limit for a REST request: 429 while it is triggered, or (batch
/// endpoint) when the batch alone would cross it, as the original.
fn events_limit(ctx: &Context, batch: Option<u64>) -> Option<Response> {
    let events = &ctx.limits.events;
    let reason = if events.triggered() {
        "Too many requests"
    } else if batch.is_some_and(|n| events.limit() != 0 && n + events.average() > events.limit()) {
        "Too many messages to broadcast, please reduce the batch size"
    } else {
        return None;
    };
    metrics::counter!(crate::telemetry::RATE_LIMITED, "limit" => "events_per_second").increment(1);
    Some(message(StatusCode::TOO_MANY_REQUESTS, reason))
}

pub(super) async fn broadcast_batch(
    State(ctx): State<Arc<Context>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return body_refused(rejection),
    };
    let claims = match authorize(&ctx, &headers) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let root: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return message(StatusCode::BAD_REQUEST, &format!("Invalid JSON body: {e}"));
        }
    };
    let messages = match root.get("messages") {
        Some(Value::Array(list)) => list,
        None | Some(Value::Null) => {
            return unprocessable(json!({"messages": ["can't be blank"]}));
        }
        Some(_) => return unprocessable(json!({"messages": ["is invalid"]})),
    };
    if let Some(refused) = events_limit(&ctx, Some(messages.len() as u64)) {
        return refused;
    }
    let max = ctx.settings.max_payload_bytes;
    let mut valid = Vec::with_capacity(messages.len());
    let mut errors = Vec::with_capacity(messages.len());
    let mut any_error = false;
    for m in messages {
        let (checked, errs) = check_message(m, max);
        any_error |= !errs.is_empty();
        errors.push(Value::Object(errs));
        valid.push(checked);
    }
    if any_error {
        return unprocessable(json!({ "messages": errors }));
    }
    let mut allowed_private: HashMap<String, bool> = HashMap::new();
    for m in valid.into_iter().flatten() {
        if m.private {
            // The caller's write policy decides, once per topic; denied messages are dropped
            // (the request still gets 202), as the original does.
            let allowed = match allowed_private.get(&m.topic) {
                Some(a) => *a,
                None => {
                    let a = may_write(&ctx, &m.topic, &claims, &headers).await;
                    allowed_private.insert(m.topic.clone(), a);
                    a
                }
            };
            if !allowed {
                tracing::info!(topic = %m.topic, "REST broadcast to a private topic dropped: write not allowed by policy");
                continue;
            }
        }
        let mut payload = Map::new();
        payload.insert("event".into(), Value::String(m.event));
        payload.insert("payload".into(), m.payload);
        payload.insert("type".into(), Value::String("broadcast".into()));
        if let Some(id) = m.id {
            payload.insert("meta".into(), json!({ "id": id }));
        }
        let Ok(raw) = RawValue::from_string(Value::Object(payload).to_string()) else {
            continue;
        };
        let key = TopicKey::new(&format!("{TOPIC_PREFIX}{}", m.topic), m.private);
        let delivered = ctx.channels.broker.publish(
            &key,
            Fanout::new(
                key.topic.clone(),
                FanoutPayload::Json {
                    event: "broadcast",
                    payload: raw,
                },
            ),
            None,
        );
        ctx.limits.events.add(delivered as u64 + 1);
    }
    StatusCode::ACCEPTED.into_response()
}

struct BatchMessage {
    topic: String,
    event: String,
    payload: Value,
    private: bool,
    id: Option<String>,
}

/// Validates one batch entry; the error map has one list of messages per bad field.
fn check_message(m: &Value, max_payload: usize) -> (Option<BatchMessage>, Map<String, Value>) {
    let mut errs = Map::new();
    let mut err = |field: &str, text: &str| {
        errs.insert(field.to_owned(), json!([text]));
    };
    let Some(obj) = m.as_object() else {
        err("message", "is invalid");
        return (None, errs);
    };
    let text = |field: &str, err: &mut dyn FnMut(&str, &str)| match obj.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        None | Some(Value::Null) => {
            err(field, "can't be blank");
            None
        }
        Some(Value::String(_)) => {
            err(field, "can't be blank");
            None
        }
        Some(_) => {
            err(field, "is invalid");
            None
        }
    };
    let topic = text("topic", &mut err);
    let event = text("event", &mut err);
    let payload = match obj.get("payload") {
        Some(Value::Object(p)) => {
            let size = serde_json::to_string(p)
                .map(|s| s.len())
                .unwrap_or(usize::MAX);
            if size > max_payload {
                err("payload", "Payload size exceeds tenant limit");
                None
            } else {
                Some(Value::Object(p.clone()))
            }
        }
        None | Some(Value::Null) => {
            err("payload", "can't be blank");
            None
        }
        Some(_) => {
            err("payload", "is invalid");
            None
        }
    };
    let private = match obj.get("private") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
        Some(_) => {
            err("private", "is invalid");
            false
        }
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            err("id", "is invalid");
            None
        }
    };
    match (topic, event, payload) {
        (Some(topic), Some(event), Some(payload)) if errs.is_empty() => (
            Some(BatchMessage {
                topic,
                event,
                payload,
                private,
                id,
            }),
            errs,
        ),
        _ => (None, errs),
    }
}

fn unprocessable(errors: Value) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({ "errors": errors })),
    )
        .into_response()
}

/// `POST /api/broadcast/:topic/events/:event[?private=true]` with a raw JSON or binary body.
pub(super) async fn broadcast_single(
    State(ctx): State<Arc<Context>>,
    Path((topic, event)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return body_refused(rejection),
    };
    let claims = match authorize(&ctx, &headers) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let encoding = match content_type.as_deref() {
        None | Some("application/json") => Encoding::Json,
        Some("application/octet-stream") => Encoding::Binary,
        Some(_) => {
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Json(json!({"error": "Unsupported Media Type. Use application/json or application/octet-stream"})),
            )
                .into_response();
        }
    };
    let params: HashMap<String, String> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let private = params.get("private").map(String::as_str) == Some("true");

    let full_topic = format!("{TOPIC_PREFIX}{topic}");
    let mut errs = Map::new();
    if topic.is_empty() {
        errs.insert("topic".into(), json!(["can't be blank"]));
    } else if full_topic.len() > binary::MAX_FIELD {
        errs.insert(
            "topic".into(),
            json!(["is too long: at most 246 bytes (255 with the realtime: prefix)"]),
        );
    }
    if event.len() > binary::MAX_FIELD {
        errs.insert("event".into(), json!(["is too long: at most 255 bytes"]));
    }
    match encoding {
        Encoding::Json if body.is_empty() => {
            errs.insert("payload".into(), json!(["can't be blank"]));
        }
        Encoding::Json if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() => {
            errs.insert("payload".into(), json!(["is invalid"]));
        }
        _ => {}
    }
    if body.len() > ctx.settings.max_payload_bytes {
        errs.insert(
            "payload".into(),
            json!(["Payload size exceeds tenant limit"]),
        );
    }
    if !errs.is_empty() {
        return unprocessable(Value::Object(errs));
    }
    if private && !may_write(&ctx, &topic, &claims, &headers).await {
        return message(StatusCode::FORBIDDEN, "Unauthorized");
    }
    if let Some(refused) = events_limit(&ctx, None) {
        return refused;
    }
    let key = TopicKey::new(&full_topic, private);
    let delivered = ctx.channels.broker.publish(
        &key,
        Fanout::new(
            key.topic.clone(),
            FanoutPayload::User(UserBroadcast {
                event,
                encoding,
                payload: body,
                metadata: None,
            }),
        ),
        None,
    );
    ctx.limits.events.add(delivered as u64 + 1);
    StatusCode::ACCEPTED.into_response()
}
