//! Operator endpoints: the tenant health check the self-hosted compose file runs, and metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::context::Context;
use crate::replication::Phase;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// `GET|HEAD /api/tenants/:id/health` with `Authorization: Bearer <JWT signed with
/// API_JWT_SECRET>`; 403 with an empty body otherwise, as the original's admin API. walcast is
/// single-tenant: any tenant id names it.
pub(super) async fn tenant_health(State(ctx): State<Arc<Context>>, headers: HeaderMap) -> Response {
    let authorized = match (&ctx.admin, bearer(&headers)) {
        (Some(v), Some(token)) => v.verify_signature(token).is_ok(),
        _ => false,
    };
    if !authorized {
        return StatusCode::FORBIDDEN.into_response();
    }
    let (db_connected, replication_connected) = match &ctx.pg {
        None => (false, false),
        Some(pg) => {
            let db = tokio::time::timeout(Duration::from_secs(2), pg.pool.get())
                .await
                .map(|r| r.is_ok())
                .unwrap_or(false);
            let repl = ctx
                .replication
                .as_ref()
                .is_some_and(|s| s.connected.load(Ordering::Relaxed));
            (db, repl)
        }
    };
    // What the change stream is doing. Starting up and holding a restart's backlog for
    // reconnecting clients are not outages: walcast serves meanwhile.
    let (phase, hold_left) = ctx
        .replication
        .as_ref()
        .map_or((None, Duration::ZERO), |s| {
            let (p, left) = s.phase();
            (Some(p), left)
        });
    let stream_ok =
        replication_connected || matches!(phase, Some(Phase::Starting | Phase::HoldingBacklog));
    // Without a database walcast still serves broadcast and presence: that is healthy.
    let healthy = ctx.pg.is_none() || (db_connected && stream_ok);
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Cluster mode: this node, the nodes it hears from, the broker connection.
    let cluster = ctx.channels.cluster.as_ref().map(|c| c.health());
    let (node, nodes) = cluster.as_ref().map_or(("walcast".to_owned(), 1), |c| {
        (c.node.clone(), 1 + c.peers.len())
    });
    // Cluster mode: who streams the replication slot, and this node's part.
    let slot = ctx.replication.as_ref().and_then(|s| {
        let view = &s.cluster;
        view.role().map(|role| {
            json!({
                "role": role,
                "holder": view.holder(),
                "last_lsn": crate::replication::conn::format_lsn(view.last_lsn()),
            })
        })
    });
    (
        status,
        Json(json!({"data": {
            "healthy": healthy,
            "db_connected": db_connected,
            "replication_connected": replication_connected,
            "replication": phase.map(Phase::as_str),
            "backlog_hold_remaining_ms": hold_left.as_millis() as u64,
            "connected_cluster": nodes,
            "region": null,
            "node": node,
            "cluster": cluster,
            "slot": slot,
        }})),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text, for a bearer JWT signed with `METRICS_JWT_SECRET`.
pub(super) async fn metrics(State(ctx): State<Arc<Context>>, headers: HeaderMap) -> Response {
    let authorized = match (&ctx.metrics_auth, bearer(&headers)) {
        (Some(v), Some(token)) => v.verify_signature(token).is_ok(),
        _ => false,
    };
    if !authorized {
        return StatusCode::FORBIDDEN.into_response();
    }
    let Some(handle) = &ctx.metrics else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
