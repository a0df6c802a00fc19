//! The WebSocket upgrade: negotiate the serializer, authenticate the socket, hand it to a session.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::AuthError;
use crate::context::Context;
use crate::protocol::Vsn;
use crate::session::{self, Connect};

/// Per-socket read buffer. The default (128 KiB) costs ~100 KiB per idle socket; 1 KiB keeps a
/// joined idle socket under 8 KiB in all (BENCHMARKS.md, "Idle capacity"). Larger frames grow the
/// buffer as they arrive.
const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 4 * 1024;

pub(super) async fn upgrade(
    State(ctx): State<Arc<Context>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let params: HashMap<String, String> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    // Cross-site WebSocket hijacking: a browser page from another origin is refused before
    // anything else, when origins are configured.
    if let Some(origin) = headers.get("origin") {
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(&ctx.settings.allowed_origins, origin) {
            tracing::info!(%origin, "socket refused: origin not in ALLOWED_ORIGINS");
            return StatusCode::FORBIDDEN.into_response();
        }
    }
    // An unknown serializer is refused by Phoenix before the socket's connect runs: 403, no body.
    let Some(vsn) = Vsn::negotiate(params.get("vsn").map(String::as_str)) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    // The `x-api-key` header (set by the self-hosted gateway) wins over the query parameter.
    let token = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| params.get("apikey").cloned());
    let Some(token) = token else {
        return connect_error(&ctx, AuthError::Missing).await;
    };
    if let Err(e) = ctx.verifier.verify(&token) {
        return connect_error(&ctx, e).await;
    }
    // The server-wide limits, as the original checks them at connect.
    if ctx.limits.users_full() {
        return limit_error(&ctx, "concurrent_users", "Too many connected users").await;
    }
    if ctx.limits.joins.triggered() {
        return limit_error(&ctx, "joins_per_second", "Too many joins per second").await;
    }
    let log_info = params.get("log_level").map(String::as_str) == Some("info");
    // `request.headers` for private channel policies: the `x-` headers, never the token.
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-") && name.as_str() != "x-api-key")
        .filter_map(|(name, value)| {
            Some((
                name.as_str().to_owned(),
                serde_json::Value::String(value.to_str().ok()?.to_owned()),
            ))
        })
        .collect();
    let transport_max = transport_limit(ctx.settings.max_frame_bytes);
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(transport_max)
        .max_frame_size(transport_max)
        .on_upgrade(move |socket| {
            session::run(
                socket,
                ctx,
                Connect {
                    vsn,
                    token,
                    log_info,
                    headers,
                },
            )
        })
}

/// The WebSocket layer's own frame limit: twice `WEBSOCKET_MAX_FRAME_BYTES`. Up to it, a frame is
/// read whole and the session refuses one over the setting with close 1009, after which the
/// closing handshake completes normally. A frame over this limit cannot be read at all (its
/// header alone says how long it is): the session still sends 1009, but the client is cut off
/// with its frame half sent, and a client that only reads after writing sees a reset (1006).
pub(super) fn transport_limit(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_mul(2)
}

/// Whether `origin` matches one of `allowed` (exactly, or `scheme://*.domain` for subdomains);
/// every origin when `allowed` is empty.
pub(super) fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    allowed.iter().any(|a| match a.split_once("://*.") {
        Some((scheme, domain)) => origin
            .strip_prefix(scheme)
            .and_then(|r| r.strip_prefix("://"))
            .and_then(|host| host.strip_suffix(domain))
            .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
        None => *a == origin,
    })
}

/// An upgrade refused by a limit: HTTP 429 with `{"error": ...}`, after the back-off delay.
async fn limit_error(ctx: &Context, limit: &'static str, message: &str) -> Response {
    tracing::info!(limit, "socket connection refused: {message}");
    metrics::counter!(crate::telemetry::RATE_LIMITED, "limit" => limit).increment(1);
    refuse(ctx, StatusCode::TOO_MANY_REQUESTS, message).await
}

/// A refused upgrade: HTTP 401 with `{"error": ...}`, after the connect back-off delay.
async fn connect_error(ctx: &Context, e: AuthError) -> Response {
    tracing::info!(reason = e.code(), "socket connection refused");
    refuse(ctx, StatusCode::UNAUTHORIZED, &e.connect_message()).await
}

/// `{"error": message}` with `status`, after `CONNECT_ERROR_BACKOFF_MS` (slows retry storms).
/// A refusal waits holding its connection, so only `CONNECT_ERROR_BACKOFF_MAX_WAITING` of them
/// wait at once; past that a refusal is answered at once: a storm of bad upgrades then costs
/// its own round trips, not the server's sockets and memory.
async fn refuse(ctx: &Context, status: StatusCode, message: &str) -> Response {
    let delay = ctx.settings.connect_error_backoff;
    if !delay.is_zero() {
        match ctx.refusals.clone().try_acquire_owned() {
            Ok(_permit) => {
                let waiting = metrics::gauge!(crate::telemetry::REFUSED_UPGRADES_WAITING);
                waiting.increment(1.0);
                let _counted = session::scopeguard(move || waiting.decrement(1.0));
                tokio::time::sleep(delay).await;
            }
            Err(_) => {
                tracing::debug!(
                    "refusal answered without back-off: CONNECT_ERROR_BACKOFF_MAX_WAITING reached"
                );
            }
        }
    }
    (status, Json(json!({ "error": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::origin_allowed;

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let allowed = vec![
            "https://app.example.com".to_string(),
            "https://*.widget.io".to_string(),
        ];
        assert!(origin_allowed(&[], "https://anything.test"));
        assert!(origin_allowed(&allowed, "https://app.example.com"));
        assert!(origin_allowed(&allowed, "HTTPS://APP.EXAMPLE.COM/"));
        assert!(origin_allowed(&allowed, "https://shop.widget.io"));
        assert!(origin_allowed(&allowed, "https://a.b.widget.io"));
        assert!(!origin_allowed(&allowed, "https://widget.io"));
        assert!(!origin_allowed(&allowed, "https://evilwidget.io"));
        assert!(!origin_allowed(&allowed, "http://shop.widget.io"));
        assert!(!origin_allowed(
            &allowed,
            "https://app.example.com.evil.com"
        ));
        assert!(!origin_allowed(&allowed, "null"));
    }
}
