//! `walcast dev --example support-chat` only: the example's pages, and the small endpoint they
//! read and write rows through. walcast streams changes but has no REST API for tables (that is
//! PostgREST's job in a Supabase stack), so the example brings the least it needs: a fixed list
//! of SQL functions (defined in `examples/support-chat/schema.sql`), each called in a
//! transaction *as the caller*: the role and `request.jwt.claims` of the caller's verified JWT,
//! set as transaction-local settings, so every policy and column privilege applies. Roles that
//! would bypass row level security are refused. Never mounted outside that command.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::context::Context;

/// The files served, and their types: nothing else under the directory is reachable.
const FILES: &[(&str, &str)] = &[
    ("widget.html", "text/html; charset=utf-8"),
    ("dashboard.html", "text/html; charset=utf-8"),
    ("app.css", "text/css; charset=utf-8"),
    ("chat.js", "text/javascript; charset=utf-8"),
    ("widget.js", "text/javascript; charset=utf-8"),
    ("dashboard.js", "text/javascript; charset=utf-8"),
    ("vendor/supabase.js", "text/javascript; charset=utf-8"),
];

/// The functions of `support_chat` the pages may call (each takes and returns `jsonb`).
const ACTIONS: &[&str] = &[
    "start_conversation",
    "send_message",
    "set_status",
    "set_internal_note",
    "mark_read",
    "list_conversations",
    "list_messages",
];

/// The roles calls may run as: customers and agents. `anon`, `service_role` (BYPASSRLS) and
/// any other role are refused.
const ROLES: &[&str] = &["authenticated", "support_agent"];

const MAX_BODY_BYTES: usize = 16 * 1024;

pub(super) fn routes() -> Router<Arc<Context>> {
    Router::new()
        .route("/examples/support-chat/{file}", get(page))
        .route("/examples/support-chat/vendor/{file}", get(vendored))
        .route(
            "/examples/support-chat/api/{action}",
            post(call).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
}

async fn page(State(ctx): State<Arc<Context>>, Path(file): Path<String>) -> Response {
    serve(&ctx, &file).await
}

async fn vendored(State(ctx): State<Arc<Context>>, Path(file): Path<String>) -> Response {
    serve(&ctx, &format!("vendor/{file}")).await
}

async fn serve(ctx: &Context, name: &str) -> Response {
    let (Some(dir), Some((name, content_type))) = (
        ctx.settings.example_dir.as_ref(),
        FILES.iter().find(|(f, _)| *f == name),
    ) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let path = dir.join(name);
    let read = tokio::task::spawn_blocking(move || std::fs::read(path)).await;
    match read.unwrap_or_else(|e| Err(std::io::Error::other(e))) {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-store"),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => error(
            StatusCode::NOT_FOUND,
            &format!("{name} could not be read: {e}"),
        ),
    }
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "error": text }))).into_response()
}

/// Runs `support_chat.<action>(body)` as the caller; answers `{"data": ...}` or `{"error": ...}`.
async fn call(
    State(ctx): State<Arc<Context>>,
    Path(action): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(action) = ACTIONS.iter().find(|a| **a == action) else {
        return error(StatusCode::NOT_FOUND, &format!("unknown action {action:?}"));
    };
    let Some(pg) = ctx.pg.as_ref() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no database");
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return error(
            StatusCode::UNAUTHORIZED,
            "Authorization: Bearer <JWT> is missing",
        );
    };
    let claims = match ctx.verifier.verify(token.trim()) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::UNAUTHORIZED, &e.to_string()),
    };
    if !ROLES.contains(&claims.role.as_str()) {
        return error(
            StatusCode::FORBIDDEN,
            &format!(
                "the example's endpoint runs as {} only, not as {:?}",
                ROLES.join(" or "),
                claims.role
            ),
        );
    }
    let args = if body.is_empty() {
        Value::Object(Default::default())
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return error(StatusCode::BAD_REQUEST, "the body must be a JSON object"),
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
        }
    };
    let raw_claims = Value::Object((*claims.raw).clone()).to_string();
    let sub = claims.sub().unwrap_or_default().to_owned();
    let result = async {
        let mut client = pg.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true), \
             set_config('request.jwt.claim.sub', $3, true), \
             set_config('request.jwt.claim.role', $1, true)",
            &[&claims.role, &raw_claims, &sub],
        )
        .await?;
        // `action` is one of ACTIONS, never the caller's text.
        let row = tx
            .query_one(
                &format!("SELECT support_chat.{action}($1::text::jsonb)::text"),
                &[&args.to_string()],
            )
            .await?;
        let data: Option<String> = row.get(0);
        tx.commit().await?;
        Ok::<_, crate::db::DbError>(data.unwrap_or_else(|| "null".into()))
    }
    .await;
    match result {
        Ok(data) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{{\"data\":{data}}}"),
        )
            .into_response(),
        Err(e) => {
            let status = match e.db_error().map(|d| d.code().code()) {
                // insufficient_privilege: a policy's WITH CHECK, or a missing grant.
                Some("42501") => StatusCode::FORBIDDEN,
                // Bad input (invalid uuid, check violation, RAISE in a function, ...).
                Some(c) if c.starts_with("22") || c.starts_with("23") || c == "P0001" => {
                    StatusCode::BAD_REQUEST
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let text = match e.db_error() {
                Some(db) => db.message().to_owned(),
                None => e.to_string(),
            };
            error(status, &text)
        }
    }
}
