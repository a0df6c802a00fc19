//! The app-wide state: settings, verifiers, the channels, postgres_changes, policies, limits and
//! the shutdown signal. The composition root ([`crate::app`]) builds one and hands it to the HTTP
//! edge ([`crate::server`]) and, through it, to every socket's [`crate::session`]. It sits in a
//! module of its own, below both, so that neither imports the composition root (which imports
//! them) and the data flow keeps no arrow back.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::auth::JwtVerifier;
use crate::channels::Channels;
use crate::config::Settings;
use crate::limits::Limits;
use crate::policies;
use crate::postgres_changes::PgChanges;
use crate::replication;

/// What every session and every HTTP handler shares, built once by [`crate::app`].
pub struct Context {
    pub settings: Arc<Settings>,
    pub verifier: Arc<JwtVerifier>,
    pub channels: Channels,
    /// postgres_changes, when a database is configured.
    pub pg: Option<Arc<PgChanges>>,
    /// Private channel policies, when a database is configured.
    pub policies: Option<Arc<policies::Checker>>,
    /// The change stream's state, when a database is configured (for health).
    pub replication: Option<Arc<replication::Status>>,
    /// Verifies operator tokens (`API_JWT_SECRET`) for the tenant health endpoint.
    pub admin: Option<Arc<JwtVerifier>>,
    /// Verifies `/metrics` tokens (`METRICS_JWT_SECRET`).
    pub metrics_auth: Option<Arc<JwtVerifier>>,
    /// Renders the Prometheus text.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Flips to `true` when the server starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Held by every live session; the server waits for all clones to drop on shutdown.
    pub alive: mpsc::Sender<()>,
    /// Server-wide limits: users, joins/s, events/s, presence/s.
    pub limits: Arc<Limits>,
    /// Permits for refused upgrades to wait out their back-off (`CONNECT_ERROR_BACKOFF_MAX_WAITING`).
    pub refusals: Arc<tokio::sync::Semaphore>,
}
