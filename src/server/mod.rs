//! The HTTP edge: one axum router on one port for the WebSocket endpoint, the REST broadcast
//! API and health checks. Every path is served both as the original serves it (`/socket/...`,
//! `/api/...`) and as supabase-js builds it without a gateway (`/realtime/v1/...`).

mod example;
pub mod listener;
mod operator;
mod rest;
mod socket;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::CorsLayer;

use crate::context::Context;

pub fn router(ctx: Arc<Context>) -> Router {
    let api = Router::new()
        .route("/api/ping", get(rest::ping))
        .route("/api/broadcast", post(rest::broadcast_batch))
        .route(
            "/api/broadcast/{topic}/events/{event}",
            post(rest::broadcast_single),
        )
        .route("/api/tenants/{tenant}/health", get(operator::tenant_health))
        .layer(DefaultBodyLimit::max(rest::max_body_bytes(
            ctx.settings.max_payload_bytes,
        )))
        // Browsers call the broadcast API from other origins, as with the original (CORS `*`).
        .layer(CorsLayer::very_permissive());
    let router = Router::new()
        .route("/socket/websocket", get(socket::upgrade))
        .route("/realtime/v1/websocket", get(socket::upgrade))
        .route("/healthcheck", get(rest::healthcheck))
        .route("/metrics", get(operator::metrics))
        .merge(api.clone())
        .nest("/realtime/v1", api);
    // `walcast dev --example support-chat` only.
    let router = if ctx.settings.example_dir.is_some() {
        router.merge(example::routes())
    } else {
        router
    };
    router.with_state(ctx)
}
