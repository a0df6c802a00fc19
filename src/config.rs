//! Typed settings. Every setting is a flag and an environment variable; the environment names are
//! supabase/realtime's wherever it has one, so the image is a drop-in replacement. Defaults live
//! here as consts and are listed, with their meaning, in `config/walcast.env` and `CONFIG.md`.
//!
//! One file on purpose (about 1,100 lines with its tests): it is the list of settings, each a clap argument with its
//! environment name, default and doc, and their validation; splitting it would scatter that list.
#![warn(missing_docs)]

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Default of `PORT`.
pub const DEFAULT_PORT: u16 = 4000;
/// Default of `CONNECT_ERROR_BACKOFF_MS`: how long a refused upgrade waits before its answer.
pub const DEFAULT_CONNECT_ERROR_BACKOFF_MS: u64 = 2_000;
/// Default of `CONNECT_ERROR_BACKOFF_MAX_WAITING`: refused upgrades that may wait out the back-off
/// at once.
pub const DEFAULT_CONNECT_ERROR_BACKOFF_MAX_WAITING: usize = 1_000;
/// Default of `HTTP_REQUEST_TIMEOUT_MS`: how long an accepted connection may go without a complete
/// request.
pub const DEFAULT_HTTP_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Default of `CHANNEL_ERROR_BACKOFF_MS`: how long a refused join waits before its error reply.
pub const DEFAULT_CHANNEL_ERROR_BACKOFF_MS: u64 = 5_000;
/// Default of `MAX_CHANNELS_PER_CLIENT` (the original's `max_channels_per_client`).
pub const DEFAULT_MAX_CHANNELS_PER_CLIENT: usize = 100;
/// Default of `MAX_PAYLOAD_SIZE_IN_KB` (the original's `max_payload_size_in_kb`).
pub const DEFAULT_MAX_PAYLOAD_SIZE_IN_KB: usize = 3_000;
/// Default of `CLIENT_PRESENCE_MAX_CALLS`: presence messages one channel may send per window.
pub const DEFAULT_CLIENT_PRESENCE_MAX_CALLS: u32 = 5;
/// Default of `CLIENT_PRESENCE_WINDOW_MS`: the window of [`DEFAULT_CLIENT_PRESENCE_MAX_CALLS`].
pub const DEFAULT_CLIENT_PRESENCE_WINDOW_MS: u64 = 30_000;
/// Default of `MAX_FRAME_BYTES`: the largest WebSocket frame accepted (larger: close 1009).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 5_000_000;
/// Most bytes of presence state one topic may hold: three metas at the largest payload fit.
pub const DEFAULT_PRESENCE_MAX_STATE_BYTES: usize = 10_000_000;
/// Default of `IDLE_TIMEOUT_MS`: a socket that sends nothing (not even a heartbeat) this long is
/// closed.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default of `CLIENT_OUTBOUND_QUEUE_BYTES`: the most one socket may have queued before it is
/// closed as a slow consumer.
pub const DEFAULT_OUTBOUND_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Default of `SHUTDOWN_TIMEOUT_MS`: how long shutdown waits for sockets to close.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Default of `PUBLICATION`: the publication postgres_changes streams (Supabase's name).
pub const DEFAULT_PUBLICATION: &str = "supabase_realtime";
/// Default of `SLOT_NAME`: walcast's durable logical replication slot.
pub const DEFAULT_SLOT_NAME: &str = "walcast_changes";
/// Default of `MAX_RECORD_BYTES`: a change record larger than this is sent with its large values
/// left out.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1_048_576;
/// Default of `DB_POOL_SIZE`: SQL connections for joins, policies and token checks.
pub const DEFAULT_DB_POOL_SIZE: usize = 4;
/// Default of `DB_DELIVERY_POOL_SIZE`: SQL connections reserved for the row checks of changes being
/// delivered.
pub const DEFAULT_DB_DELIVERY_POOL_SIZE: usize = 2;
/// Default of `DB_CHECKS_IN_FLIGHT`: batches whose row checks run at the same time. One: on the
/// 2-core project machine a second concurrent check raised tail latency for the cheap policy
/// shapes (see BENCHMARKS.md, issue #13); a database with cores to spare can take more.
pub const DEFAULT_DB_CHECKS_IN_FLIGHT: usize = 1;
/// Default of `DB_REPLICA_MAX_WAIT_MS`: how long a row check waits on a read replica for it to
/// replay the batch's commits before it is run on the primary instead.
pub const DEFAULT_DB_REPLICA_MAX_WAIT_MS: u64 = 20;
/// Default of `STARTUP_GRACE_MS`: how long a backlog found at start is held for subscribers to
/// rejoin.
pub const DEFAULT_STARTUP_GRACE_MS: u64 = 5_000;
/// The original's `replication_ready_timeout` (one minute).
pub const DEFAULT_REPLICATION_READY_TIMEOUT_MS: u64 = 60_000;

#[derive(Parser, Debug)]
#[command(
    name = "walcast",
    version,
    about = "A Supabase Realtime compatible server"
)]
/// The command line: `walcast <command> [flags]`.
pub struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
}

/// walcast's subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the Realtime protocol (WebSocket and REST) on one port.
    Serve(ServeArgs),
    /// Run a local development server with no set-up: its own PostgreSQL cluster (in
    /// `.walcast/`), migrations applied, listening on 127.0.0.1, printing the URL and
    /// ready-to-use anon and service_role keys.
    Dev(DevArgs),
    /// Apply walcast's migrations to the database and exit (or, with --hand-back, hand it back to
    /// supabase/realtime).
    Migrate(MigrateArgs),
    /// Print a JWT signed with API_JWT_SECRET, for trying walcast without another tool.
    Token(TokenArgs),
}

/// `walcast migrate`: the serve settings (for the database), `--dry-run` and `--hand-back`.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Print what walcast finds in the database and what migrating would do; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Hand the database back to supabase/realtime: drop walcast's replication slot and its
    /// `walcast` schema and, where the original never ran, the `realtime` objects walcast made
    /// (printing the app's policies on realtime.messages to run again). With --dry-run: the plan.
    #[arg(long)]
    pub hand_back: bool,
    /// The database and publication settings, as `serve` takes them.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `walcast token`: the claims of the token to print.
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// The `role` claim (anon, authenticated, service_role, or any role).
    #[arg(long, default_value = "anon")]
    pub role: String,

    /// The `sub` claim (the user id policies see as `auth.uid()`).
    #[arg(long)]
    pub sub: Option<String>,

    /// More claims, as a JSON object, e.g. `{"email":"a@b.c"}`.
    #[arg(long)]
    pub claims: Option<String>,

    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    pub expires_in: u64,

    /// The HMAC secret to sign with.
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
    pub api_jwt_secret: String,
}

/// The secret `walcast dev` signs with unless API_JWT_SECRET is set: the Supabase CLI's local
/// default, so keys from a local Supabase stack work unchanged. Never use it in production.
pub const DEV_JWT_SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

/// `walcast dev`: the port, the data directory, the example and the secret.
#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// TCP port for WebSocket and HTTP.
    #[arg(long, env = "PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// HMAC secret for tokens; defaults to the Supabase CLI's local development secret.
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true, default_value = DEV_JWT_SECRET)]
    pub api_jwt_secret: String,

    /// Where the development PostgreSQL cluster lives (created on first run, reused after).
    #[arg(long, env = "WALCAST_DEV_DIR", default_value = ".walcast")]
    pub data_dir: std::path::PathBuf,

    /// Serve without a database (broadcast and presence only).
    #[arg(long)]
    pub no_db: bool,

    /// Also run an example app: load its SQL into the dev database and serve its pages under
    /// `/examples/<name>/` (development only).
    #[arg(long, value_parser = ["support-chat"], conflicts_with = "no_db")]
    pub example: Option<String>,
}

impl DevArgs {
    /// The serve settings dev runs with: loopback only, the dev secret, everything else from the
    /// environment or its default.
    pub fn serve_args(&self) -> Result<ServeArgs, clap::Error> {
        let port = self.port.to_string();
        let cli = Cli::try_parse_from([
            "walcast",
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            &port,
            "--api-jwt-secret",
            &self.api_jwt_secret,
        ])?;
        match cli.command {
            Command::Serve(args) => Ok(args),
            _ => unreachable!("parsed a serve command"),
        }
    }
}

/// `walcast serve`: every setting, each a flag and an environment variable.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TCP port for WebSocket and HTTP.
    #[arg(long, env = "PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// Address to listen on.
    #[arg(long, env = "WALCAST_BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// HMAC secret that verifies HS256/384/512 JWTs.
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
    pub api_jwt_secret: Option<String>,

    /// A static JWKS (`{"keys":[...]}`) for RS*, PS*, ES256/384, EdDSA and `oct` keys, picked by `kid`.
    #[arg(long, env = "JWT_JWKS", hide_env_values = true)]
    pub jwt_jwks: Option<String>,

    /// JSON object of claims every token must carry with exactly these values, e.g. `{"iss":"x"}`.
    #[arg(long, env = "JWT_CLAIM_VALIDATORS")]
    pub jwt_claim_validators: Option<String>,

    /// Browser origins allowed to open sockets, comma-separated (`https://app.example.com`,
    /// `https://*.example.com`); empty allows every origin. Requests without an `Origin` header
    /// (servers, mobile apps) are not affected.
    #[arg(long, env = "ALLOWED_ORIGINS", default_value = "")]
    pub allowed_origins: String,

    /// Delay before a refused WebSocket upgrade is answered (slows down retry storms).
    #[arg(long, env = "CONNECT_ERROR_BACKOFF_MS", default_value_t = DEFAULT_CONNECT_ERROR_BACKOFF_MS)]
    pub connect_error_backoff_ms: u64,

    /// Refused upgrades that may wait out CONNECT_ERROR_BACKOFF_MS at once, server-wide (each
    /// holds its connection meanwhile); refusals past this many are answered at once.
    #[arg(long, env = "CONNECT_ERROR_BACKOFF_MAX_WAITING", default_value_t = DEFAULT_CONNECT_ERROR_BACKOFF_MAX_WAITING)]
    pub connect_error_backoff_max_waiting: usize,

    /// A connection must send a complete request within this long after it is accepted (plus
    /// CONNECT_ERROR_BACKOFF_MS, which a refused upgrade waits before its reply), or it is
    /// closed; 0 turns this off. Once answered (a WebSocket upgraded) there is no deadline.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value_t = DEFAULT_HTTP_REQUEST_TIMEOUT_MS)]
    pub http_request_timeout_ms: u64,

    /// Delay before a refused channel join is answered.
    #[arg(long, env = "CHANNEL_ERROR_BACKOFF_MS", default_value_t = DEFAULT_CHANNEL_ERROR_BACKOFF_MS)]
    pub channel_error_backoff_ms: u64,

    /// Channels one socket may have joined at once.
    #[arg(long, env = "TENANT_MAX_CHANNELS_PER_CLIENT", default_value_t = DEFAULT_MAX_CHANNELS_PER_CLIENT)]
    pub max_channels_per_client: usize,

    /// Sockets with at least one joined channel, server-wide (0: unlimited).
    #[arg(long, env = "TENANT_MAX_CONCURRENT_USERS", default_value_t = 10_000)]
    pub max_concurrent_users: usize,

    /// Channel joins per second, server-wide, averaged over a minute (0: unlimited).
    #[arg(long, env = "TENANT_MAX_JOINS_PER_SECOND", default_value_t = 10_000)]
    pub max_joins_per_second: u64,

    /// Broadcast and presence messages per second, server-wide, counted at delivery (a message
    /// to 100 subscribers counts 100) plus each one sent, averaged over a minute (0: unlimited).
    #[arg(long, env = "TENANT_MAX_EVENTS_PER_SECOND", default_value_t = 100_000)]
    pub max_events_per_second: u64,

    /// Presence track/untrack messages per second, server-wide, averaged over a minute (0: unlimited).
    #[arg(
        long,
        env = "TENANT_MAX_PRESENCE_EVENTS_PER_SECOND",
        default_value_t = 5_000
    )]
    pub max_presence_events_per_second: u64,

    /// Length of one bucket of the rate counters (12 buckets are averaged), in milliseconds.
    #[arg(long, env = "RATE_COUNTER_TICK_MS", default_value_t = 5_000)]
    pub rate_counter_tick_ms: u64,

    /// Largest broadcast or presence payload, in kilobytes (1,000 bytes) of JSON or raw bytes.
    #[arg(long, env = "TENANT_MAX_PAYLOAD_SIZE_IN_KB", default_value_t = DEFAULT_MAX_PAYLOAD_SIZE_IN_KB)]
    pub max_payload_size_in_kb: usize,

    /// Presence messages one channel may send per window.
    #[arg(long, env = "CLIENT_PRESENCE_MAX_CALLS", default_value_t = DEFAULT_CLIENT_PRESENCE_MAX_CALLS)]
    pub client_presence_max_calls: u32,

    /// The presence rate window, in milliseconds.
    #[arg(long, env = "CLIENT_PRESENCE_WINDOW_MS", default_value_t = DEFAULT_CLIENT_PRESENCE_WINDOW_MS)]
    pub client_presence_window_ms: u64,

    /// Most bytes of presence state one topic may hold (every joiner receives it whole); a track past it is refused.
    #[arg(long, env = "PRESENCE_MAX_STATE_BYTES", default_value_t = DEFAULT_PRESENCE_MAX_STATE_BYTES)]
    pub presence_max_state_bytes: usize,

    /// Largest WebSocket frame or message accepted from a client, in bytes; larger closes the socket (1009).
    #[arg(long, env = "WEBSOCKET_MAX_FRAME_BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES)]
    pub websocket_max_frame_bytes: usize,

    /// A socket that sends nothing (not even a heartbeat) for this long is closed.
    #[arg(long, env = "WEBSOCKET_IDLE_TIMEOUT_MS", default_value_t = DEFAULT_IDLE_TIMEOUT_MS)]
    pub websocket_idle_timeout_ms: u64,

    /// Bytes that may wait to be written to one socket; past this the client is disconnected as a slow consumer.
    #[arg(long, env = "CLIENT_OUTBOUND_QUEUE_BYTES", default_value_t = DEFAULT_OUTBOUND_QUEUE_BYTES)]
    pub client_outbound_queue_bytes: usize,

    /// How long shutdown waits for sockets to close before exiting anyway.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_MS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_MS)]
    pub shutdown_timeout_ms: u64,

    /// PostgreSQL host (or Unix socket directory). Without DB_HOST or DATABASE_URL, postgres_changes is off.
    #[arg(long, env = "DB_HOST")]
    pub db_host: Option<String>,

    /// PostgreSQL port.
    #[arg(long, env = "DB_PORT", default_value_t = 5432)]
    pub db_port: u16,

    /// PostgreSQL user; it needs the REPLICATION attribute (or superuser).
    #[arg(long, env = "DB_USER", default_value = "postgres")]
    pub db_user: String,

    /// PostgreSQL password.
    #[arg(long, env = "DB_PASSWORD", hide_env_values = true)]
    pub db_password: Option<String>,

    /// PostgreSQL database.
    #[arg(long, env = "DB_NAME", default_value = "postgres")]
    pub db_name: String,

    /// `postgres://user:password@host:port/dbname`; wins over the DB_* settings.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// TLS to PostgreSQL, as the original: `true` requires TLS (the certificate verified, host
    /// name included, when DB_SSL_CA_CERT is set; not verified otherwise), `false` turns it
    /// off. Unset: `sslmode` from DATABASE_URL, else `prefer` (TLS when the server offers it).
    #[arg(long, env = "DB_SSL")]
    pub db_ssl: Option<bool>,

    /// A PEM file of the root certificate(s) the database's certificate must chain to (with
    /// DB_SSL=true: verify-full). Same as `sslrootcert` in DATABASE_URL.
    #[arg(long, env = "DB_SSL_CA_CERT")]
    pub db_ssl_ca_cert: Option<std::path::PathBuf>,

    /// SQL connections for work clients start: subscription checks (at join and after a new
    /// token), private channel policies, replay.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = DEFAULT_DB_POOL_SIZE)]
    pub db_pool_size: usize,

    /// SQL connections for delivering changes only (row level security and privilege checks,
    /// table descriptions), apart from DB_POOL_SIZE so that clients cannot make delivery wait.
    #[arg(long, env = "DB_DELIVERY_POOL_SIZE", default_value_t = DEFAULT_DB_DELIVERY_POOL_SIZE)]
    pub db_delivery_pool_size: usize,

    /// How many consecutive batches' row checks run at the same time (each on its own delivery
    /// connection); their changes are still sent in commit order.
    #[arg(long, env = "DB_CHECKS_IN_FLIGHT", default_value_t = DEFAULT_DB_CHECKS_IN_FLIGHT)]
    pub db_checks_in_flight: usize,

    /// What a DELETE of a row under row level security does for a subscriber walcast cannot
    /// decide for (the row's last change was before walcast saw it, or left its memory, and the
    /// table's old rows carry the key only): `original` sends it (the key only), as the original
    /// sends every such DELETE; `withhold` sends nothing.
    #[arg(long, env = "DELETE_VISIBILITY", default_value = "original")]
    pub delete_visibility: String,

    /// Bound of the memory of who could see each row at its last change (bytes; 0 remembers
    /// nothing, so every RLS DELETE is decided by DELETE_VISIBILITY or the old row).
    #[arg(long, env = "VISIBILITY_MEMORY_BYTES", default_value_t = DEFAULT_VISIBILITY_MEMORY_BYTES)]
    pub visibility_memory_bytes: usize,

    /// Read replicas (streaming standbys of the database) for the row checks:
    /// comma-separated `postgres://` URLs. A URL without user, password or database takes the
    /// primary's; without `sslmode`, DB_SSL / DB_SSL_CA_CERT apply as for the primary. A batch's
    /// checks run on a replica only once it has replayed the batch's commits; else on the
    /// primary. Empty: every check runs on the primary.
    #[arg(long, env = "DB_REPLICA_URLS", hide_env_values = true)]
    pub db_replica_urls: Option<String>,

    /// How long a batch's row checks wait on a replica for it to replay the batch's commits
    /// before they run on the primary instead.
    #[arg(long, env = "DB_REPLICA_MAX_WAIT_MS", default_value_t = DEFAULT_DB_REPLICA_MAX_WAIT_MS)]
    pub db_replica_max_wait_ms: u64,

    /// The publication whose tables postgres_changes streams (created, empty, when missing).
    #[arg(long, env = "PUBLICATION", default_value = DEFAULT_PUBLICATION)]
    pub publication: String,

    /// The durable logical replication slot walcast streams from (created when missing).
    #[arg(long, env = "SLOT_NAME", default_value = DEFAULT_SLOT_NAME)]
    pub slot_name: String,

    /// A change whose row data is larger than this is sent with values over 64 bytes removed
    /// and the error "Error 413: Payload Too Large".
    #[arg(long, env = "MAX_RECORD_BYTES", default_value_t = DEFAULT_MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,

    /// After a start, hold the changes waiting in the slot this long (milliseconds) so that
    /// reconnecting clients are subscribed again before they are delivered.
    #[arg(long, env = "STARTUP_GRACE_MS", default_value_t = DEFAULT_STARTUP_GRACE_MS)]
    pub startup_grace_ms: u64,

    /// How long after a gap in the change stream (changes streamed before a channel rejoined
    /// after a restart, or a recreated slot) joining channels are told about it (milliseconds).
    #[arg(long, env = "GAP_NOTICE_MS", default_value_t = 300_000)]
    pub gap_notice_ms: u64,

    /// How long walcast remembers where a postgres_changes subscriber stood when its socket
    /// went away without a leave, so that the same user rejoining the same topic with the same
    /// bindings gets what it missed (milliseconds; 0 turns catch-up off).
    #[arg(long, env = "CATCHUP_WINDOW_MS", default_value_t = DEFAULT_CATCHUP_WINDOW_MS)]
    pub catchup_window_ms: u64,

    /// The catch-up history of recent decoded changes is bounded to this many bytes (0 turns
    /// catch-up off).
    #[arg(long, env = "CATCHUP_HISTORY_BYTES", default_value_t = DEFAULT_CATCHUP_HISTORY_BYTES)]
    pub catchup_history_bytes: usize,

    /// Changes older than this leave the catch-up history (milliseconds).
    #[arg(long, env = "CATCHUP_HISTORY_AGE_MS", default_value_t = DEFAULT_CATCHUP_HISTORY_AGE_MS)]
    pub catchup_history_age_ms: u64,

    /// How many subscriber positions are remembered at once (the oldest go first).
    #[arg(long, env = "CATCHUP_MAX_REMEMBERED", default_value_t = DEFAULT_CATCHUP_MAX_REMEMBERED)]
    pub catchup_max_remembered: usize,

    /// How long a join with `config.broadcast.replication_ready` waits for the change stream
    /// to pass its join before the channel is shut down (milliseconds).
    #[arg(long, env = "REPLICATION_READY_TIMEOUT_MS", default_value_t = DEFAULT_REPLICATION_READY_TIMEOUT_MS)]
    pub replication_ready_timeout_ms: u64,

    /// Log a warning when the database keeps more WAL than this for walcast's slot (bytes).
    #[arg(long, env = "SLOT_WAL_WARN_BYTES", default_value_t = 1 << 30)]
    pub slot_wal_warn_bytes: u64,

    /// Delete stored broadcast messages (realtime.messages) older than MESSAGES_RETENTION_HOURS.
    #[arg(long, env = "RUN_JANITOR", default_value_t = true, action = clap::ArgAction::Set)]
    pub run_janitor: bool,

    /// How long stored broadcast messages are kept (for replay).
    #[arg(long, env = "MESSAGES_RETENTION_HOURS", default_value_t = 72)]
    pub messages_retention_hours: u64,

    /// Apply walcast's migrations at start (`false` to run `walcast migrate` separately).
    #[arg(long, env = "MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    /// Secret of the bearer JWT that `GET /metrics` requires. Without it /metrics answers 403.
    #[arg(long, env = "METRICS_JWT_SECRET", hide_env_values = true)]
    pub metrics_jwt_secret: Option<String>,

    /// Raise the open-file limit to this at start (sockets are files), up to the hard limit.
    #[arg(long, env = "RLIMIT_NOFILE")]
    pub rlimit_nofile: Option<u64>,

    /// SQL run on every new SQL connection (the original's setting; e.g. `SET search_path TO _realtime`).
    #[arg(long, env = "DB_AFTER_CONNECT_QUERY")]
    pub db_after_connect_query: Option<String>,

    /// Log level: error, warning, info or debug (the original's names; `RUST_LOG` overrides).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Cluster mode: NATS server URL(s), comma-separated (`nats://`, `tls://`; user and password or token in the URL). Unset: one node, no broker.
    #[arg(long, env = "CLUSTER_NATS_URL", hide_env_values = true)]
    pub cluster_nats_url: Option<String>,
    /// This node's name in the cluster (health, metrics, logs). Default: host name and port.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// NATS credentials file (user JWT and nkey seed) for the cluster connection.
    #[arg(long, env = "CLUSTER_NATS_CREDS_FILE")]
    pub cluster_nats_creds_file: Option<std::path::PathBuf>,
    /// CA certificate (PEM) the NATS server's TLS certificate is checked against.
    #[arg(long, env = "CLUSTER_NATS_TLS_CA_FILE")]
    pub cluster_nats_tls_ca_file: Option<std::path::PathBuf>,
    /// First token(s) of every NATS subject walcast uses, so that several clusters can share one NATS.
    #[arg(long, env = "CLUSTER_SUBJECT_PREFIX", default_value = DEFAULT_CLUSTER_SUBJECT_PREFIX)]
    pub cluster_subject_prefix: String,
    /// How often a node announces itself and its presence sequence numbers to the others.
    #[arg(long, env = "CLUSTER_HEARTBEAT_MS", default_value_t = DEFAULT_CLUSTER_HEARTBEAT_MS)]
    pub cluster_heartbeat_ms: u64,
    /// A node not heard from for this long is gone: its presences are removed (leaves sent).
    #[arg(long, env = "CLUSTER_NODE_TIMEOUT_MS", default_value_t = DEFAULT_CLUSTER_NODE_TIMEOUT_MS)]
    pub cluster_node_timeout_ms: u64,
    /// Messages that may wait to be handed to NATS; past it they are dropped (counted and logged).
    #[arg(long, env = "CLUSTER_PUBLISH_QUEUE", default_value_t = DEFAULT_CLUSTER_PUBLISH_QUEUE)]
    pub cluster_publish_queue: usize,
}

/// `CLUSTER_SUBJECT_PREFIX`.
pub const DEFAULT_CLUSTER_SUBJECT_PREFIX: &str = "walcast";
/// `CLUSTER_HEARTBEAT_MS`.
pub const DEFAULT_CLUSTER_HEARTBEAT_MS: u64 = 1_000;
/// `CLUSTER_NODE_TIMEOUT_MS`.
pub const DEFAULT_CLUSTER_NODE_TIMEOUT_MS: u64 = 5_000;
/// `CLUSTER_PUBLISH_QUEUE`.
pub const DEFAULT_CLUSTER_PUBLISH_QUEUE: usize = 65_536;

/// Cluster mode's settings, after validation.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `CLUSTER_NATS_URL`, split.
    pub urls: Vec<String>,
    /// `NODE_NAME`, or host name and port.
    pub node: String,
    /// `CLUSTER_NATS_CREDS_FILE`.
    pub creds_file: Option<std::path::PathBuf>,
    /// `CLUSTER_NATS_TLS_CA_FILE`.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// `CLUSTER_SUBJECT_PREFIX`.
    pub prefix: String,
    /// `CLUSTER_HEARTBEAT_MS`.
    pub heartbeat: Duration,
    /// `CLUSTER_NODE_TIMEOUT_MS`.
    pub node_timeout: Duration,
    /// `CLUSTER_PUBLISH_QUEUE`.
    pub publish_queue: usize,
    /// The largest payload clients may send (`TENANT_MAX_PAYLOAD_SIZE_IN_KB`, in bytes), to
    /// compare with what the NATS server accepts.
    pub largest_payload: usize,
}

/// `LOG_FORMAT`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A setting that cannot work, found before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A count or size that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// `CLIENT_OUTBOUND_QUEUE_BYTES` could not hold one largest payload.
    #[error("CLIENT_OUTBOUND_QUEUE_BYTES ({queue}) must be at least the largest payload ({payload} bytes) plus headroom")]
    QueueSmallerThanPayload {
        /// The queue's bytes.
        queue: usize,
        /// The largest payload's bytes.
        payload: usize,
    },
    /// Neither `API_JWT_SECRET` nor `JWT_JWKS` is set.
    #[error("no way to verify tokens: set API_JWT_SECRET or JWT_JWKS")]
    NoJwtKeys,
    /// A database setting that cannot work (URL, TLS files).
    #[error(transparent)]
    Database(#[from] crate::db::DbError),
    #[error(
        "{0} must be a PostgreSQL identifier: letters, digits and underscores, at most 63 bytes"
    )]
    /// `SLOT_NAME` or `PUBLICATION` is not a usable identifier.
    BadIdentifier(&'static str),
    /// A cluster setting that cannot work.
    #[error("{0}")]
    Cluster(String),
    /// A setting with a value outside its list.
    #[error("{0} must be {1}")]
    BadValue(&'static str, &'static str),
    /// A `DB_REPLICA_URLS` entry that cannot work.
    #[error("DB_REPLICA_URLS: {0}")]
    Replica(String),
}

/// Default of `CATCHUP_WINDOW_MS`.
pub const DEFAULT_CATCHUP_WINDOW_MS: u64 = 120_000;
/// Default of `CATCHUP_HISTORY_BYTES`.
pub const DEFAULT_CATCHUP_HISTORY_BYTES: usize = 64 << 20;
/// Default of `CATCHUP_HISTORY_AGE_MS`.
pub const DEFAULT_CATCHUP_HISTORY_AGE_MS: u64 = 300_000;
/// Default of `CATCHUP_MAX_REMEMBERED`.
pub const DEFAULT_CATCHUP_MAX_REMEMBERED: usize = 100_000;

/// Default of `VISIBILITY_MEMORY_BYTES`.
pub const DEFAULT_VISIBILITY_MEMORY_BYTES: usize = 32 << 20;

/// `DELETE_VISIBILITY`: what an RLS DELETE walcast cannot decide for does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeleteVisibility {
    /// Sent, the key only, as the original sends every DELETE.
    #[default]
    Original,
    /// Not sent.
    Withhold,
}

/// The catch-up settings.
#[derive(Debug, Clone)]
pub struct CatchupConfig {
    /// `CATCHUP_WINDOW_MS`: how long a position is remembered (0: catch-up off).
    pub window: Duration,
    /// `CATCHUP_HISTORY_BYTES`: the history's size bound (0: catch-up off).
    pub history_bytes: usize,
    /// `CATCHUP_HISTORY_AGE_MS`: changes older than this leave the history.
    pub history_age: Duration,
    /// `CATCHUP_MAX_REMEMBERED`: positions remembered at once (the oldest go first).
    pub max_remembered: usize,
}

impl Default for CatchupConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(DEFAULT_CATCHUP_WINDOW_MS),
            history_bytes: DEFAULT_CATCHUP_HISTORY_BYTES,
            history_age: Duration::from_millis(DEFAULT_CATCHUP_HISTORY_AGE_MS),
            max_remembered: DEFAULT_CATCHUP_MAX_REMEMBERED,
        }
    }
}

impl CatchupConfig {
    /// Whether catch-up is on (a window and a history to replay from).
    pub fn enabled(&self) -> bool {
        !self.window.is_zero() && self.history_bytes > 0
    }
}

/// Settings the self-hosted compose file gives the Elixir server that mean nothing to walcast:
/// accepted, and named once in the log so nobody wonders whether they took effect.
pub const ELIXIR_ONLY: &[&str] = &[
    "DB_ENC_KEY",
    "DB_ENC_KEY_GCM",
    "SECRET_KEY_BASE",
    "ERL_AFLAGS",
    "DNS_NODES",
    "APP_NAME",
    "SEED_SELF_HOST",
    "SELF_HOST_TENANT_NAME",
    "DISABLE_HEALTHCHECK_LOGGING",
    "CLUSTER_STRATEGIES",
    "SLOT_NAME_SUFFIX",
    "REALTIME_IP_VERSION",
    "DB_IP_VERSION",
    "LOGS_ENGINE",
    "API_JWT_SECRET_NEXT",
    "API_TOKEN_BLOCKLIST",
];

/// The [`ELIXIR_ONLY`] settings present in the environment.
pub fn elixir_only_settings_present() -> Vec<&'static str> {
    ELIXIR_ONLY
        .iter()
        .copied()
        .filter(|k| std::env::var_os(k).is_some())
        .collect()
}

/// Database settings after validation.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// Where and how to connect (host, user, database, TLS).
    pub db: crate::db::DbConfig,
    /// `DB_POOL_SIZE`.
    pub pool_size: usize,
    /// `DB_DELIVERY_POOL_SIZE`.
    pub delivery_pool_size: usize,
    /// `DB_CHECKS_IN_FLIGHT`.
    pub checks_in_flight: usize,
    /// `DB_REPLICA_URLS`: where the row checks may also run.
    pub replicas: Vec<crate::db::DbConfig>,
    /// `DB_REPLICA_MAX_WAIT_MS`.
    pub replica_max_wait: std::time::Duration,
    /// `PUBLICATION`.
    pub publication: String,
    /// `SLOT_NAME`.
    pub slot: String,
    /// `MAX_RECORD_BYTES`.
    pub max_record_bytes: usize,
    /// `MIGRATE_ON_START` (always on in `walcast dev`).
    pub migrate_on_start: bool,
    /// `RUN_JANITOR`: prune old `realtime.messages` (partitions are kept ahead either way).
    pub run_janitor: bool,
    /// `MESSAGES_RETENTION_HOURS`.
    pub messages_retention: std::time::Duration,
    /// `DB_AFTER_CONNECT_QUERY`.
    pub after_connect: Option<String>,
    /// `STARTUP_GRACE_MS`.
    pub startup_grace: std::time::Duration,
    /// `GAP_NOTICE_MS`.
    pub gap_notice: std::time::Duration,
    /// `CATCHUP_WINDOW_MS`, `CATCHUP_HISTORY_BYTES`, `CATCHUP_HISTORY_AGE_MS`,
    /// `CATCHUP_MAX_REMEMBERED`.
    pub catchup: CatchupConfig,
    /// `REPLICATION_READY_TIMEOUT_MS`.
    pub replication_ready_timeout: std::time::Duration,
    /// `DELETE_VISIBILITY`.
    pub delete_visibility: DeleteVisibility,
    /// `VISIBILITY_MEMORY_BYTES`.
    pub visibility_memory_bytes: usize,
    /// `SLOT_WAL_WARN_BYTES`.
    pub slot_wal_warn_bytes: u64,
}

/// Settings after validation, in the units the code uses.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Allowed `Origin`s (empty: all).
    pub allowed_origins: Vec<String>,
    /// `CONNECT_ERROR_BACKOFF_MS`.
    pub connect_error_backoff: Duration,
    /// Refused upgrades that may wait out the back-off at once.
    pub connect_error_backoff_max_waiting: usize,
    /// How long an accepted connection may go unanswered (`None`: no limit).
    pub first_response_deadline: Option<Duration>,
    /// `CHANNEL_ERROR_BACKOFF_MS`.
    pub channel_error_backoff: Duration,
    /// `MAX_CHANNELS_PER_CLIENT`.
    pub max_channels_per_client: usize,
    /// `MAX_PAYLOAD_SIZE_IN_KB`, in bytes.
    pub max_payload_bytes: usize,
    /// `CLIENT_PRESENCE_MAX_CALLS`.
    pub client_presence_max_calls: u32,
    /// `CLIENT_PRESENCE_WINDOW_MS`.
    pub client_presence_window: Duration,
    /// `MAX_FRAME_BYTES`.
    pub max_frame_bytes: usize,
    /// `PRESENCE_MAX_STATE_BYTES` (capped below the outbound queue).
    pub presence_max_state_bytes: usize,
    /// `IDLE_TIMEOUT_MS`.
    pub idle_timeout: Duration,
    /// `CLIENT_OUTBOUND_QUEUE_BYTES`.
    pub outbound_queue_bytes: usize,
    /// `SHUTDOWN_TIMEOUT_MS`.
    pub shutdown_timeout: Duration,
    /// The server-wide limits: users, joins/s, events/s, presence/s.
    pub limits: crate::limits::LimitSettings,
    /// The support-chat example's directory, served under `/examples/support-chat/` (only set
    /// by `walcast dev --example support-chat`).
    pub example_dir: Option<std::path::PathBuf>,
    /// Cluster mode (`CLUSTER_NATS_URL` set).
    pub cluster: Option<ClusterSettings>,
}

impl ServeArgs {
    /// The serve settings, validated (a zero size, a queue too small for a payload, no way to
    /// verify tokens: refused here).
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        if self.api_jwt_secret.as_deref().unwrap_or("").is_empty()
            && self.jwt_jwks.as_deref().unwrap_or("").is_empty()
        {
            return Err(ConfigError::NoJwtKeys);
        }
        for (name, v) in [
            (
                "TENANT_MAX_CHANNELS_PER_CLIENT",
                self.max_channels_per_client,
            ),
            ("TENANT_MAX_PAYLOAD_SIZE_IN_KB", self.max_payload_size_in_kb),
            ("WEBSOCKET_MAX_FRAME_BYTES", self.websocket_max_frame_bytes),
            ("PRESENCE_MAX_STATE_BYTES", self.presence_max_state_bytes),
            (
                "CLIENT_OUTBOUND_QUEUE_BYTES",
                self.client_outbound_queue_bytes,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.websocket_idle_timeout_ms == 0 {
            return Err(ConfigError::Zero("WEBSOCKET_IDLE_TIMEOUT_MS"));
        }
        let max_payload_bytes = self.max_payload_size_in_kb.saturating_mul(1000);
        if self.client_outbound_queue_bytes < max_payload_bytes.saturating_add(64 * 1024) {
            return Err(ConfigError::QueueSmallerThanPayload {
                queue: self.client_outbound_queue_bytes,
                payload: max_payload_bytes,
            });
        }
        // A topic's presence state is bounded by what one socket's queue holds, so that a
        // smaller queue (set for many slow clients) lowers the state bound with it rather than
        // refusing to start.
        let presence_max_state_bytes = self
            .presence_max_state_bytes
            .min(self.client_outbound_queue_bytes.saturating_sub(64 * 1024));
        Ok(Settings {
            allowed_origins: self
                .allowed_origins
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
            connect_error_backoff: Duration::from_millis(self.connect_error_backoff_ms),
            connect_error_backoff_max_waiting: self.connect_error_backoff_max_waiting,
            first_response_deadline: (self.http_request_timeout_ms > 0).then(|| {
                Duration::from_millis(
                    self.http_request_timeout_ms
                        .saturating_add(self.connect_error_backoff_ms),
                )
            }),
            channel_error_backoff: Duration::from_millis(self.channel_error_backoff_ms),
            max_channels_per_client: self.max_channels_per_client,
            max_payload_bytes,
            client_presence_max_calls: self.client_presence_max_calls,
            client_presence_window: Duration::from_millis(self.client_presence_window_ms),
            max_frame_bytes: self.websocket_max_frame_bytes,
            presence_max_state_bytes,
            idle_timeout: Duration::from_millis(self.websocket_idle_timeout_ms),
            outbound_queue_bytes: self.client_outbound_queue_bytes,
            shutdown_timeout: Duration::from_millis(self.shutdown_timeout_ms),
            limits: crate::limits::LimitSettings {
                max_concurrent_users: self.max_concurrent_users,
                max_joins_per_second: self.max_joins_per_second,
                max_events_per_second: self.max_events_per_second,
                max_presence_events_per_second: self.max_presence_events_per_second,
                tick: Duration::from_millis(self.rate_counter_tick_ms.max(10)),
            },
            example_dir: None,
            cluster: self.cluster()?.map(|c| ClusterSettings {
                largest_payload: max_payload_bytes,
                ..c
            }),
        })
    }

    /// Cluster mode, when `CLUSTER_NATS_URL` is set.
    pub fn cluster(&self) -> Result<Option<ClusterSettings>, ConfigError> {
        let urls: Vec<String> = self
            .cluster_nats_url
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Ok(None);
        }
        let bad = |m: String| Err(ConfigError::Cluster(m));
        for u in &urls {
            if u.parse::<async_nats::ServerAddr>().is_err() {
                return bad(format!(
                    "CLUSTER_NATS_URL: {} is not a NATS URL (nats://host:port)",
                    u.rsplit('@').next().unwrap_or("")
                ));
            }
        }
        let prefix = self.cluster_subject_prefix.trim();
        if prefix.is_empty()
            || prefix.split('.').any(|t| {
                t.is_empty()
                    || t.bytes()
                        .any(|b| b.is_ascii_whitespace() || b == b'*' || b == b'>')
            })
        {
            return bad(
                "CLUSTER_SUBJECT_PREFIX must be dot-separated NATS subject tokens, without spaces, `*` or `>`".into(),
            );
        }
        if self.cluster_heartbeat_ms == 0 {
            return Err(ConfigError::Zero("CLUSTER_HEARTBEAT_MS"));
        }
        if self.cluster_publish_queue == 0 {
            return Err(ConfigError::Zero("CLUSTER_PUBLISH_QUEUE"));
        }
        if self.cluster_node_timeout_ms < self.cluster_heartbeat_ms.saturating_mul(3) {
            return bad(format!(
                "CLUSTER_NODE_TIMEOUT_MS ({}) must be at least three heartbeats (CLUSTER_HEARTBEAT_MS {} x 3)",
                self.cluster_node_timeout_ms, self.cluster_heartbeat_ms
            ));
        }
        let node = match self.node_name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => format!("{}:{}", host_name(), self.port),
        };
        Ok(Some(ClusterSettings {
            urls,
            node,
            creds_file: self.cluster_nats_creds_file.clone(),
            tls_ca_file: self.cluster_nats_tls_ca_file.clone(),
            prefix: prefix.to_owned(),
            heartbeat: Duration::from_millis(self.cluster_heartbeat_ms),
            node_timeout: Duration::from_millis(self.cluster_node_timeout_ms),
            publish_queue: self.cluster_publish_queue,
            largest_payload: 0,
        }))
    }

    /// The database, when one is configured.
    pub fn database(&self) -> Result<Option<DatabaseSettings>, ConfigError> {
        let (mut db, url_sslmode) = match (&self.database_url, &self.db_host) {
            (Some(url), _) if !url.is_empty() => (
                crate::db::DbConfig::from_url(url)?,
                // Whether the URL's query names an sslmode (which then wins over DB_SSL).
                url.split_once('?').is_some_and(|(_, q)| {
                    form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "sslmode")
                }),
            ),
            (_, Some(host)) if !host.is_empty() => (
                crate::db::DbConfig {
                    host: host.clone(),
                    port: self.db_port,
                    user: self.db_user.clone(),
                    password: self.db_password.clone().filter(|p| !p.is_empty()),
                    dbname: self.db_name.clone(),
                    tls: Default::default(),
                },
                false,
            ),
            _ => return Ok(None),
        };
        // The URL's own sslmode wins; else the original's DB_SSL / DB_SSL_CA_CERT.
        use crate::db::tls::SslMode;
        let ca = self
            .db_ssl_ca_cert
            .clone()
            .filter(|p| !p.as_os_str().is_empty());
        if !url_sslmode {
            match self.db_ssl {
                Some(true) if ca.is_some() => db.tls.mode = SslMode::VerifyFull,
                Some(true) => db.tls.mode = SslMode::Require,
                Some(false) => db.tls.mode = SslMode::Disable,
                None => {}
            }
        }
        if db.tls.root_cert.is_none() {
            db.tls.root_cert = ca;
        }
        self.database_on(db).map(Some)
    }

    /// `DB_REPLICA_URLS`, each a URL parsed as DATABASE_URL is: the user, password and
    /// database the URL leaves out are the primary's (`primary`), and without `sslmode` in the
    /// URL DB_SSL / DB_SSL_CA_CERT apply. A replica must hold the primary's database: one that
    /// names another database is refused (its checks would answer for other tables).
    fn replicas_of(
        &self,
        primary: &crate::db::DbConfig,
    ) -> Result<Vec<crate::db::DbConfig>, ConfigError> {
        use crate::db::tls::SslMode;
        let mut out = Vec::new();
        let urls = self.db_replica_urls.as_deref().unwrap_or("");
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let mut r = crate::db::DbConfig::from_url(url).map_err(|e| match e {
                crate::db::DbError::BadUrl(what) => {
                    ConfigError::Replica(format!("not a valid postgres:// URL: {what}"))
                }
                e => ConfigError::Database(e),
            })?;
            let (rest, query) = url.split_once('?').unwrap_or((url, ""));
            let after_scheme = rest.split_once("://").map_or(rest, |(_, r)| r);
            let (auth, hostpart) = after_scheme.rsplit_once('@').unwrap_or(("", after_scheme));
            if auth.is_empty() {
                r.user = primary.user.clone();
            }
            if !auth.contains(':') {
                r.password = primary.password.clone();
            }
            let named_db = hostpart.split_once('/').is_some_and(|(_, d)| !d.is_empty());
            if !named_db {
                r.dbname = primary.dbname.clone();
            } else if r.dbname != primary.dbname {
                return Err(ConfigError::Replica(format!(
                    "{} names database {}, but the checks are for database {}; leave the \
                     database out of the URL or name the primary's",
                    r.host, r.dbname, primary.dbname
                )));
            }
            let has_sslmode = form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "sslmode");
            let ca = self
                .db_ssl_ca_cert
                .clone()
                .filter(|p| !p.as_os_str().is_empty());
            if !has_sslmode {
                match self.db_ssl {
                    Some(true) if ca.is_some() => r.tls.mode = SslMode::VerifyFull,
                    Some(true) => r.tls.mode = SslMode::Require,
                    Some(false) => r.tls.mode = SslMode::Disable,
                    None => r.tls.mode = primary.tls.mode,
                }
            }
            if r.tls.root_cert.is_none() {
                r.tls.root_cert = ca.or_else(|| primary.tls.root_cert.clone());
            }
            r.tls_config()?;
            out.push(r);
        }
        Ok(out)
    }

    /// The database settings for the connection `db` (from [`Self::database`], or `walcast
    /// dev`'s own cluster), every other field from these arguments, validated.
    pub fn database_on(&self, db: crate::db::DbConfig) -> Result<DatabaseSettings, ConfigError> {
        // A root certificate that cannot be read is a setting to fix now, not at first use.
        db.tls_config()?;
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !ident_ok(&self.slot_name) {
            return Err(ConfigError::BadIdentifier("SLOT_NAME"));
        }
        if self.publication.is_empty() || self.publication.len() > 63 {
            return Err(ConfigError::BadIdentifier("PUBLICATION"));
        }
        if self.db_pool_size == 0 {
            return Err(ConfigError::Zero("DB_POOL_SIZE"));
        }
        if self.db_delivery_pool_size == 0 {
            return Err(ConfigError::Zero("DB_DELIVERY_POOL_SIZE"));
        }
        if self.db_checks_in_flight == 0 {
            return Err(ConfigError::Zero("DB_CHECKS_IN_FLIGHT"));
        }
        let delete_visibility = match self.delete_visibility.to_ascii_lowercase().as_str() {
            "original" => DeleteVisibility::Original,
            "withhold" => DeleteVisibility::Withhold,
            _ => {
                return Err(ConfigError::BadValue(
                    "DELETE_VISIBILITY",
                    "original or withhold",
                ))
            }
        };
        let replicas = self.replicas_of(&db)?;
        Ok(DatabaseSettings {
            delete_visibility,
            visibility_memory_bytes: self.visibility_memory_bytes,
            replicas,
            replica_max_wait: std::time::Duration::from_millis(self.db_replica_max_wait_ms),
            db,
            pool_size: self.db_pool_size,
            delivery_pool_size: self.db_delivery_pool_size,
            checks_in_flight: self.db_checks_in_flight,
            publication: self.publication.clone(),
            slot: self.slot_name.clone(),
            max_record_bytes: self.max_record_bytes,
            migrate_on_start: self.migrate_on_start,
            after_connect: self.db_after_connect_query.clone(),
            startup_grace: std::time::Duration::from_millis(self.startup_grace_ms),
            gap_notice: std::time::Duration::from_millis(self.gap_notice_ms),
            catchup: CatchupConfig {
                window: std::time::Duration::from_millis(self.catchup_window_ms),
                history_bytes: self.catchup_history_bytes,
                history_age: std::time::Duration::from_millis(self.catchup_history_age_ms),
                max_remembered: self.catchup_max_remembered.max(1),
            },
            replication_ready_timeout: std::time::Duration::from_millis(
                self.replication_ready_timeout_ms,
            ),
            slot_wal_warn_bytes: self.slot_wal_warn_bytes,
            run_janitor: self.run_janitor,
            messages_retention: std::time::Duration::from_secs(
                self.messages_retention_hours.saturating_mul(3600),
            ),
        })
    }

    /// The `tracing` filter for `LOG_LEVEL`, accepting the original's level names.
    pub fn log_filter(&self) -> &'static str {
        match self.log_level.to_ascii_lowercase().as_str() {
            "emergency" | "alert" | "critical" | "error" => "error",
            "warning" | "warn" => "warn",
            "debug" => "debug",
            "trace" => "trace",
            _ => "info",
        }
    }
}

/// This machine's host name (`NODE_NAME`'s default), `walcast` when it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "walcast".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every environment variable the binary reads, from the clap definitions.
    fn env_names() -> Vec<String> {
        let cli = Cli::command();
        let mut names = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                if let Some(env) = arg.get_env() {
                    names.push(env.to_string_lossy().into_owned());
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn example_env_file_and_config_doc_list_every_setting() {
        let example = include_str!("../config/walcast.env");
        let doc = include_str!("../CONFIG.md");
        for name in env_names() {
            assert!(
                example
                    .lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{name}="))),
                "config/walcast.env does not list {name}"
            );
            assert!(
                doc.contains(&format!("`{name}`")),
                "CONFIG.md does not document {name}"
            );
        }
    }

    #[test]
    fn defaults_validate_with_a_secret() {
        let cli = Cli::try_parse_from(["walcast", "serve", "--api-jwt-secret", "s"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let s = args.settings().unwrap();
        assert_eq!(s.max_payload_bytes, 3_000_000);
        assert_eq!(s.channel_error_backoff, Duration::from_secs(5));
    }

    #[test]
    fn replica_urls_take_what_they_leave_out_from_the_primary_and_must_name_its_database() {
        use crate::db::tls::SslMode;
        let settings = |args: &[&str]| {
            let mut all = vec!["walcast", "serve", "--api-jwt-secret", "s"];
            all.extend_from_slice(args);
            let Command::Serve(a) = Cli::try_parse_from(all).unwrap().command else {
                panic!("serve")
            };
            a.database()
        };
        let primary = "postgres://u:p@h/db";
        let s = settings(&[
            "--database-url",
            primary,
            "--db-ssl",
            "true",
            "--db-replica-urls",
            "postgres://r1:5433, postgres://me:pw@r2/db?sslmode=disable,",
        ])
        .unwrap()
        .unwrap();
        let got: Vec<_> = s
            .replicas
            .iter()
            .map(|r| {
                (
                    r.host.as_str(),
                    r.port,
                    r.user.as_str(),
                    r.password.as_deref(),
                    r.dbname.as_str(),
                    r.tls.mode,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("r1", 5433, "u", Some("p"), "db", SslMode::Require),
                ("r2", 5432, "me", Some("pw"), "db", SslMode::Disable),
            ]
        );
        assert_eq!(
            s.replica_max_wait,
            std::time::Duration::from_millis(DEFAULT_DB_REPLICA_MAX_WAIT_MS)
        );
        // Unset or empty: no replicas.
        let none = settings(&["--database-url", primary]).unwrap().unwrap();
        assert!(none.replicas.is_empty());
        // A replica of another database cannot answer for this one.
        let err = settings(&[
            "--database-url",
            primary,
            "--db-replica-urls",
            "postgres://r1/other",
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "DB_REPLICA_URLS: r1 names database other, but the checks are for database db; \
             leave the database out of the URL or name the primary's"
        );
        let err = settings(&[
            "--database-url",
            primary,
            "--db-replica-urls",
            "mysql://me:secret@r1",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("DB_REPLICA_URLS: not a valid postgres:// URL")
                && !err.contains("secret"),
            "{err}"
        );
    }

    #[test]
    fn the_urls_sslmode_wins_over_db_ssl_and_db_ssl_applies_otherwise() {
        use crate::db::tls::SslMode;
        let mode = |args: &[&str]| {
            let mut all = vec!["walcast", "serve", "--api-jwt-secret", "s"];
            all.extend_from_slice(args);
            let Command::Serve(a) = Cli::try_parse_from(all).unwrap().command else {
                panic!("serve")
            };
            a.database().unwrap().unwrap().db.tls.mode
        };
        let url = "postgres://u:p@h/db";
        assert_eq!(mode(&["--database-url", url]), SslMode::Prefer);
        assert_eq!(
            mode(&["--database-url", url, "--db-ssl", "true"]),
            SslMode::Require
        );
        assert_eq!(
            mode(&["--database-url", url, "--db-ssl", "false"]),
            SslMode::Disable
        );
        let with_mode = "postgres://u:p@h/db?sslmode=verify-ca";
        assert_eq!(
            mode(&["--database-url", with_mode, "--db-ssl", "false"]),
            SslMode::VerifyCa
        );
        // A password that merely contains the words is not a setting.
        let tricky = "postgres://u:sslmode=disable@h/db";
        assert_eq!(
            mode(&["--database-url", tricky, "--db-ssl", "true"]),
            SslMode::Require
        );
    }

    #[test]
    fn cluster_settings_are_checked() {
        let cluster = |args: &[&str]| {
            let mut all = vec![
                "walcast",
                "serve",
                "--api-jwt-secret",
                "s",
                "--port",
                "4100",
            ];
            all.extend_from_slice(args);
            let Command::Serve(a) = Cli::try_parse_from(all).unwrap().command else {
                panic!("serve")
            };
            a.cluster()
        };
        assert!(
            cluster(&[]).unwrap().is_none(),
            "off without CLUSTER_NATS_URL"
        );
        let c = cluster(&["--cluster-nats-url", "nats://a:4222, nats://u:p@b:4222"])
            .unwrap()
            .unwrap();
        assert_eq!(c.urls.len(), 2);
        assert!(c.node.ends_with(":4100"), "host name and port: {}", c.node);
        let named = cluster(&["--cluster-nats-url", "nats://a", "--node-name", "n1"]);
        assert_eq!(named.unwrap().unwrap().node, "n1");
        let err = |args: &[&str]| cluster(args).unwrap_err().to_string();
        // The password is not echoed.
        let bad = err(&["--cluster-nats-url", "nats://u:secret@a:notaport"]);
        assert!(!bad.contains("secret"), "{bad}");
        assert!(err(&[
            "--cluster-nats-url",
            "nats://a",
            "--cluster-subject-prefix",
            "a.>"
        ])
        .contains("CLUSTER_SUBJECT_PREFIX"));
        assert!(err(&[
            "--cluster-nats-url",
            "nats://a",
            "--cluster-heartbeat-ms",
            "1000",
            "--cluster-node-timeout-ms",
            "2000"
        ])
        .contains("three heartbeats"));
    }

    #[test]
    fn refuses_to_start_without_keys() {
        let cli = Cli::try_parse_from(["walcast", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert!(matches!(args.settings(), Err(ConfigError::NoJwtKeys)));
    }
}
