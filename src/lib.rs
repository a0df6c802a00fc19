//! walcast: a Supabase Realtime compatible server.
//!
//! # Layout
//!
//! - [`config`]: typed settings from flags and environment variables (the original's names).
//! - [`app`]: the composition root: builds the shared pieces, starts and stops the background
//!   tasks, serves until shutdown.
//! - [`context`]: the app-wide state the composition root builds for the server and sessions.
//! - [`server`]: the axum router: WebSocket upgrade, REST broadcast, health.
//! - [`session`]: one socket: the read loop and dispatch (`mod.rs`), the writer, joins,
//!   broadcast, presence, access tokens and the postgres_changes glue, a file each.
//! - [`channels`]: the hub (topic → local subscribers, encode once per serializer), the broker
//!   seam and its cluster (NATS) broker for several nodes, presence, and each socket's bounded
//!   outbound queue.
//! - [`protocol`]: the Phoenix wire format, V1 JSON, V2 JSON and V2 binary, the join payload
//!   and typed client events; pure, no I/O.
//! - [`auth`]: JWT verification (HS*, JWKS) with the protocol's exact error messages.
//! - [`replication`]: the replication connection, pgoutput decoding, values to JSON.
//! - [`postgres_changes`]: bindings, filters, subscription preparation and registry, the
//!   dispatcher (transactions, batching, matching), authorization (column privileges, batched
//!   RLS checks) and delivery, payloads, and broadcast from the database.
//! - [`db`]: SQL connections, TLS, migrations, privilege checks, the partition janitor and the
//!   hand-back; [`dev`]: the `walcast dev` PostgreSQL cluster.
//! - [`error`]: start-up errors.
//!
//! Control flows `server` → `session` → `channels` / `postgres_changes`; messages flow
//! `session`/`server` → `channels::Broker` → `channels::Hub` → each subscriber's
//! `channels::outbound::Outbound` → socket, and `replication` → (bounded queue) →
//! `postgres_changes` (match, authorize, build payload) → outbound queues. `protocol` knows
//! nothing of sockets; nothing imports `server` or `app`.

pub mod app;
pub mod auth;
pub mod channels;
pub mod config;
pub mod context;
pub mod db;
pub mod dev;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod policies;
pub mod postgres_changes;
pub mod protocol;
pub mod replication;
pub mod server;
pub mod session;
pub mod telemetry;
