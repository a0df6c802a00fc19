//! The composition root: builds the shared pieces, serves, and owns shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::auth::JwtVerifier;
use crate::channels::Channels;
use crate::config::{DatabaseSettings, Settings};
use crate::context::Context;
use crate::db::{migrations, DbError, Pool};
use crate::error::AppError;
use crate::postgres_changes::PgChanges;
use crate::replication;
use crate::server;

/// Decoded change events waiting for the dispatcher. When full, reading from PostgreSQL pauses.
const CHANGE_QUEUE: usize = 4096;

/// How long start-up waits for the database to accept connections.
const DB_STARTUP_WAIT: Duration = Duration::from_secs(60);

/// A database that is reachable, migrated, and ready for postgres_changes.
pub struct Database {
    pub settings: DatabaseSettings,
    pub pg: Arc<PgChanges>,
    /// What start-up found of the slot.
    start: SlotAtStart,
}

/// The slot as start-up found it.
struct SlotAtStart {
    /// WAL position at start when the slot already existed and had not confirmed it: changes
    /// before it were committed while walcast was down. 0 when the slot holds nothing older than
    /// this process (a new slot, or one confirmed up to the WAL's end).
    backlog_end: u64,
    /// The slot had been invalidated and was recreated: the gap to tell.
    gap: Option<String>,
}

impl Database {
    /// Connects (waiting up to a minute for the database to come up), migrates, and prepares
    /// postgres_changes.
    pub async fn connect(settings: DatabaseSettings) -> Result<Self, AppError> {
        let (pg, start) = start_database(&settings).await?;
        Ok(Self {
            settings,
            pg,
            start,
        })
    }
}

/// Tokens for the operator endpoints.
pub struct Operator {
    /// Verifies `API_JWT_SECRET` tokens (`/api/tenants/:id/health`).
    pub admin: Option<JwtVerifier>,
    /// Verifies `METRICS_JWT_SECRET` tokens (`/metrics`).
    pub metrics: Option<JwtVerifier>,
}

/// Serves on `listener` until `shutdown` resolves, then closes every socket (1012) and waits for
/// them, at most `settings.shutdown_timeout`.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    verifier: JwtVerifier,
    operator: Operator,
    database: Option<Database>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let shutdown_timeout = settings.shutdown_timeout;
    let first_response_deadline = settings.first_response_deadline;

    let mut tasks = Vec::new();
    let channels = Channels::local(settings.presence_max_state_bytes);
    let mut replication_status = None;
    let max_payload_bytes = settings.max_payload_bytes;
    let pg = match database {
        None => {
            tracing::warn!(
                "no database configured (DB_HOST or DATABASE_URL): postgres_changes is off"
            );
            None
        }
        Some(Database {
            settings: db,
            pg,
            start,
        }) => {
            let (tx, rx) = mpsc::channel(CHANGE_QUEUE);
            let status = Arc::new(replication::Status::new(
                db.gap_notice,
                db.replication_ready_timeout,
            ));
            status.set_backlog_end(start.backlog_end);
            if let Some(message) = start.gap {
                status.record_gap(replication::GapReason::SlotLost, message);
            }
            replication_status = Some(status.clone());
            let cfg = replication::Config {
                db: db.db.clone(),
                slot: db.slot.clone(),
                publication: db.publication.clone(),
                status_interval: Duration::from_secs(10),
                startup_grace: db.startup_grace,
            };
            tasks.push(tokio::spawn(replication::run(
                cfg,
                tx,
                status.clone(),
                shutdown_rx.clone(),
            )));
            tasks.push(tokio::spawn(replication::serve_readiness(
                pg.pool.clone(),
                status.clone(),
            )));
            tasks.push(tokio::spawn(pg.clone().dispatch(
                rx,
                status,
                channels.clone(),
                max_payload_bytes,
            )));
            tasks.push(tokio::spawn(watch_slot(
                pg.pool.clone(),
                db.slot.clone(),
                db.slot_wal_warn_bytes,
            )));
            tasks.push(tokio::spawn(crate::db::janitor::run(
                pg.pool.clone(),
                db.messages_retention,
                db.run_janitor,
            )));
            Some(pg)
        }
    };
    let policies = pg
        .as_ref()
        .map(|pg| Arc::new(crate::policies::Checker::new(pg.pool.clone())));

    let limits = crate::limits::Limits::new(settings.limits);
    let ticker = limits.spawn_ticker();
    let refusals = Arc::new(tokio::sync::Semaphore::new(
        settings.connect_error_backoff_max_waiting,
    ));
    let ctx = Arc::new(Context {
        refusals,
        settings: Arc::new(settings),
        verifier: Arc::new(verifier),
        channels,
        pg,
        policies,
        replication: replication_status,
        admin: operator.admin.map(Arc::new),
        metrics_auth: operator.metrics.map(Arc::new),
        metrics: crate::telemetry::install(),
        shutdown: shutdown_rx,
        alive: alive_tx,
        limits,
    });
    let router = server::router(ctx.clone());
    drop(ctx);

    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: refusing new connections and closing sockets");
        let _ = shutdown_tx.send(true);
        // Keep the sender alive so sessions see `true` rather than a closed channel.
        std::mem::forget(shutdown_tx);
    };
    // Frames are small and latency is the product: no Nagle delay (which, paired with the
    // client's delayed ACK, held back a socket's second small frame by up to 40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    // A connection that sends no complete request in time is closed (HTTP_REQUEST_TIMEOUT_MS).
    let listener = server::listener::Answered::new(listener, first_response_deadline);
    axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .await?;

    // Every session holds the context (and with it an `alive` sender); when the last one is
    // gone, recv() returns None.
    if tokio::time::timeout(shutdown_timeout, alive_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_ms = shutdown_timeout.as_millis() as u64,
            "shutdown deadline passed with sockets still open; exiting anyway"
        );
    }
    // The replication task confirms what was delivered and ends by itself; give it a moment.
    let mut tasks = tasks.into_iter();
    if let Some(replication) = tasks.next() {
        if tokio::time::timeout(Duration::from_secs(2), replication)
            .await
            .is_err()
        {
            tracing::warn!("replication stream did not stop in time");
        }
    }
    for t in tasks {
        t.abort();
    }
    ticker.abort();
    Ok(())
}

/// Connects (waiting for the database to come up), migrates, and prepares postgres_changes.
async fn start_database(db: &DatabaseSettings) -> Result<(Arc<PgChanges>, SlotAtStart), AppError> {
    let pool = Pool::with_after_connect(&db.db, db.pool_size, db.after_connect.clone());
    let started = tokio::time::Instant::now();
    loop {
        match pool.get().await {
            Ok(_) => break,
            // A certificate or TLS setting to fix: waiting would not change it.
            Err(e @ crate::db::DbError::Tls(_)) => return Err(AppError::Database(e)),
            Err(e) if started.elapsed() < DB_STARTUP_WAIT && e.db_error().is_none() => {
                tracing::info!(error = %e, "waiting for the database");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(AppError::Database(e)),
        }
    }
    check_privileges(&pool).await?;
    if db.migrate_on_start {
        let applied = migrations::run(&pool).await?;
        if !applied.is_empty() {
            tracing::info!(?applied, "applied migrations");
        }
    } else {
        // Without them this binary would run with functions it relies on missing (a row check
        // that cannot run withholds every change): refuse to start, and say what to do.
        let pending = migrations::pending(&pool).await?;
        if !pending.is_empty() {
            let names: Vec<String> = pending.iter().map(|(v, n)| format!("{v} ({n})")).collect();
            return Err(AppError::MigrationsPending(names.join(", ")));
        }
    }
    // A partitioned realtime.messages (set up by the original) needs today's partition before
    // the first private join probes it or the first realtime.send writes into it.
    let created = crate::db::janitor::ensure_partitions(&pool).await?;
    if !created.is_empty() {
        tracing::info!(?created, "created realtime.messages partitions ahead");
    }
    if migrations::ensure_publication(&pool, &db.publication).await? {
        tracing::info!(publication = %db.publication, "created the (empty) publication; add tables with ALTER PUBLICATION ... ADD TABLE");
    }
    // The slot exists before the first client can subscribe: from here on, every committed
    // change is kept for walcast, whether or not the stream is connected yet.
    let mut params: Vec<(&str, &str)> = crate::db::SESSION_GUCS.to_vec();
    params.push(("client_encoding", "UTF8"));
    let mut conn = replication::conn::ReplicationConn::connect(&db.db, "walcast_setup", &params)
        .await
        .map_err(AppError::Replication)?;
    let slot_state = replication::ensure_slot(&mut conn, &db.slot)
        .await
        .map_err(AppError::Replication)?;
    drop(conn);
    let backlog_end = if slot_state == replication::SlotState::Existing {
        let client = pool.get().await?;
        let row = client
            .query_one(
                "SELECT pg_current_wal_lsn()::text, (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1)",
                &[&db.slot],
            )
            .await
            .map_err(crate::db::DbError::from)?;
        let end = replication::parse_confirmed(row.get::<_, &str>(0)).unwrap_or(0);
        let confirmed = row
            .get::<_, Option<&str>>(1)
            .and_then(replication::parse_confirmed)
            .unwrap_or(0);
        if confirmed >= end {
            0
        } else {
            end
        }
    } else {
        0
    };
    let start = SlotAtStart {
        backlog_end,
        gap: match slot_state {
            replication::SlotState::Recreated { .. } => replication::slot_gap_message(&slot_state),
            _ => None,
        },
    };
    warn_unbounded_wal(&pool).await;
    // Delivery has connections of its own: a storm of joins or token pushes queues on `pool`,
    // never in front of a change's row checks.
    let delivery = Pool::named(
        &db.db,
        "walcast_delivery",
        db.delivery_pool_size,
        db.after_connect.clone(),
    );
    // One connection open before the first change, so that it is not delivered later for it.
    drop(delivery.get().await?);
    let pg = Arc::new(PgChanges::new(
        pool,
        delivery,
        db.publication.clone(),
        db.max_record_bytes,
    ));
    pg.catalog.load_types().await?;
    Ok((pg, start))
}

/// A slot nobody reads keeps WAL for ever unless `max_slot_wal_keep_size` bounds it: say so at
/// start, once.
async fn warn_unbounded_wal(pool: &Arc<Pool>) {
    let setting = async {
        let client = pool.get().await?;
        let row = client
            .query_one("SELECT current_setting('max_slot_wal_keep_size')", &[])
            .await?;
        Ok::<String, DbError>(row.get(0))
    }
    .await;
    match setting {
        Ok(v) if v == "-1" => tracing::warn!(
            "max_slot_wal_keep_size is unlimited: while walcast is stopped, its replication slot keeps WAL until the database's disk is full; set it (e.g. '10GB') to bound that, and watch walcast_slot_retained_wal_bytes"
        ),
        Ok(v) => tracing::info!(max_slot_wal_keep_size = %v, "WAL kept for the replication slot is bounded"),
        Err(e) => tracing::debug!(error = %e, "could not read max_slot_wal_keep_size"),
    }
}

/// Every 10 s: how much WAL the database keeps for the slot, as a metric, with a warning (at
/// most once a minute) above `warn_bytes`.
async fn watch_slot(pool: Arc<Pool>, slot: String, warn_bytes: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let result = async {
            let client = pool.get().await?;
            let row = client
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, wal_status FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?;
            Ok::<_, DbError>(row.map(|r| (r.get::<_, Option<i64>>(0), r.get::<_, Option<String>>(1))))
        }
        .await;
        match result {
            Ok(Some((retained, wal_status))) => {
                let retained = retained.unwrap_or(0).max(0) as u64;
                metrics::gauge!(crate::telemetry::SLOT_RETAINED_WAL_BYTES).set(retained as f64);
                let due = last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                if retained > warn_bytes && due {
                    last_warning = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        %slot,
                        retained_bytes = retained,
                        wal_status = wal_status.as_deref().unwrap_or(""),
                        "the database keeps more WAL for walcast's slot than SLOT_WAL_WARN_BYTES: walcast is behind"
                    );
                }
            }
            Ok(None) => tracing::warn!(%slot, "the replication slot does not exist"),
            Err(e) => tracing::debug!(error = %e, "could not read the slot's retained WAL"),
        }
    }
}

/// Removes stored broadcast messages older than the retention period, at start and every ten
/// minutes, so `realtime.messages` does not grow without bound.
/// What the database user must be able to do, checked before anything else so that a managed
/// database's missing grant is named (rather than met as a failure halfway through): stream
/// (superuser, `REPLICATION`, or RDS's `rds_replication`), and switch to the API roles to check
/// rows as each subscriber (granted here when the user may grant it, as the migration does).
async fn check_privileges(pool: &Arc<Pool>) -> Result<(), AppError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication
                    OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication')
                        AND pg_has_role(current_user, 'rds_replication', 'MEMBER'))
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(crate::db::DbError::from)?;
    let (user, superuser, replication): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    // As the user would type it.
    let plain = user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let ident = if plain {
        user.clone()
    } else {
        crate::db::quote_ident(&user)
    };
    if !superuser && !replication {
        return Err(AppError::Privilege(format!(
            "the database user {user} cannot stream changes: it lacks the REPLICATION attribute. \
             As a superuser (or your provider's admin user): ALTER ROLE {ident} REPLICATION; \
             on Amazon RDS: GRANT rds_replication TO {ident}"
        )));
    }
    if superuser {
        return Ok(());
    }
    let missing: Vec<String> = client
        .query(
            "SELECT rolname::text FROM pg_roles
              WHERE rolname IN ('anon', 'authenticated', 'service_role')
                AND NOT pg_has_role(current_user, oid, 'MEMBER')
              ORDER BY 1",
            &[],
        )
        .await
        .map_err(crate::db::DbError::from)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let roles = missing.join(", ");
    if let Err(e) = client
        .batch_execute(&format!("GRANT {roles} TO {ident}"))
        .await
    {
        return Err(AppError::Privilege(format!(
            "the database user {user} must be able to switch to the API roles to check rows as \
             each subscriber, and cannot grant that to itself ({}). As a superuser (or your \
             provider's admin user): GRANT anon, authenticated, service_role TO {ident}",
            crate::db::DbError::from(e)
        )));
    }
    tracing::info!(%user, roles = %roles, "granted the API roles to the database user");
    Ok(())
}

/// `walcast migrate`: says what it finds, then (unless `dry_run`) applies migrations, creates
/// the publication and a partitioned `realtime.messages`'s partitions, and says what it did.
pub async fn migrate(db: &DatabaseSettings, dry_run: bool) -> Result<Vec<String>, DbError> {
    let pool = Pool::new(&db.db, 1);
    let mut report: Vec<String> = migrations::survey(&pool, &db.publication)
        .await?
        .into_iter()
        .map(|l| format!("found: {l}"))
        .collect();
    if dry_run {
        report.push("--dry-run: nothing was changed".into());
        return Ok(report);
    }
    let applied = migrations::run(&pool).await?;
    report.push(format!("did: applied walcast migrations {applied:?}"));
    if migrations::ensure_publication(&pool, &db.publication).await? {
        report.push(format!("did: created the publication {}", db.publication));
    }
    let created = crate::db::janitor::ensure_partitions(&pool).await?;
    if !created.is_empty() {
        report.push(format!("did: created partitions {}", created.join(", ")));
    }
    Ok(report)
}
