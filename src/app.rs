//! The composition root: builds the shared pieces, serves, and owns shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::auth::JwtVerifier;
use crate::channels::Channels;
use crate::config::{DatabaseSettings, Settings};
use crate::context::Context;
use crate::db::{migrations, Pool};
use crate::error::AppError;
use crate::postgres_changes::PgChanges;
use crate::replication;
use crate::server;

/// Decoded change events waiting for the dispatcher. When full, reading from PostgreSQL pauses.
const CHANGE_QUEUE: usize = 4096;

/// Cluster mode: change messages waiting to go to NATS (on the slot holder) or to this node's
/// dispatcher (on the others).
const CLUSTER_CHANGES_QUEUE: usize = 4096;

/// How long shutdown waits for each background task to stop before aborting it.
const TASK_STOP_WAIT: Duration = Duration::from_secs(2);

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

    let mut tasks = Tasks::new(shutdown_rx.clone());
    let channels = match settings.cluster.clone() {
        None => Channels::local(settings.presence_max_state_bytes),
        Some(cluster) => {
            let (channels, started) = Channels::cluster(
                settings.presence_max_state_bytes,
                cluster,
                shutdown_rx.clone(),
            )
            .await
            .map_err(AppError::Cluster)?;
            for (name, task) in started.tasks {
                tasks.spawn_until_shutdown(name, task);
            }
            tasks.spawn("cluster goodbye", started.goodbye);
            channels
        }
    };
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
            match &channels.cluster {
                None => tasks.spawn(
                    "replication",
                    replication::run(cfg, tx, status.clone(), shutdown_rx.clone(), None),
                ),
                Some(cluster) => {
                    // One node streams the slot, the others receive the stream over NATS.
                    let (tap_tx, tap_rx) = mpsc::channel(CLUSTER_CHANGES_QUEUE);
                    let (in_tx, in_rx) = mpsc::channel(CLUSTER_CHANGES_QUEUE);
                    for (name, task) in
                        cluster.changes_tasks(status.clone(), pg.clone(), tap_rx, in_tx)
                    {
                        tasks.spawn_until_shutdown(name, task);
                    }
                    let peers = cluster.clone();
                    let health = cluster.health();
                    let election = replication::cluster::Election {
                        cfg,
                        node: health.node,
                        link: replication::cluster::Link::new(
                            tap_tx,
                            Arc::new(move || peers.peers_position()),
                            status.clone(),
                            cluster.node_timeout(),
                        ),
                        incoming: in_rx,
                        node_timeout: cluster.node_timeout(),
                    };
                    tasks.spawn(
                        "replication",
                        replication::cluster::run(
                            election,
                            tx,
                            status.clone(),
                            shutdown_rx.clone(),
                        ),
                    );
                }
            }
            tasks.spawn_until_shutdown(
                "replication readiness",
                replication::serve_readiness(pg.pool.clone(), status.clone()),
            );
            // Ends by itself when the replication task has ended and its queue is drained.
            tasks.spawn(
                "dispatcher",
                pg.clone()
                    .dispatch(rx, status, channels.clone(), max_payload_bytes),
            );
            tasks.spawn_until_shutdown(
                "slot watch",
                replication::slot::watch(pg.pool.clone(), db.slot.clone(), db.slot_wal_warn_bytes),
            );
            if let Some(replicas) = pg.authorizer.replicas() {
                tasks.spawn_until_shutdown("replica watch", replicas.watch(pg.delivery.clone()));
            }
            tasks.spawn_until_shutdown(
                "janitor",
                crate::db::janitor::run(pg.pool.clone(), db.messages_retention, db.run_janitor),
            );
            Some(pg)
        }
    };
    let policies = pg
        .as_ref()
        .map(|pg| Arc::new(crate::policies::Checker::new(pg.pool.clone())));

    let limits = crate::limits::Limits::new(settings.limits);
    tasks.spawn_until_shutdown("rate limits", limits.clone().tick_forever());
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
    // Catch-up positions are saved once the sockets are closed and the dispatcher has stopped.
    let pg_at_exit = ctx.pg.clone();
    let router = server::router(ctx.clone());
    drop(ctx);

    // The sender stays owned here until every task has stopped, so no receiver ever sees a
    // closed channel instead of `true`.
    let shutdown_tx = Arc::new(shutdown_tx);
    let signal = {
        let shutdown_tx = shutdown_tx.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new connections and closing sockets");
            shutdown_tx.send_replace(true);
        }
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
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .await;
    // A server stopped by an error rather than the signal still closes its sockets and stops
    // its tasks.
    shutdown_tx.send_replace(true);

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
    // The replication task confirms what was delivered and ends by itself, then the dispatcher
    // drains its queue; the periodic jobs stop at the signal.
    tasks.join(TASK_STOP_WAIT).await;
    if let Some(pg) = pg_at_exit {
        pg.save_positions().await;
    }
    Ok(served?)
}

/// The background tasks of one run, by name: each is awaited on shutdown (in the order they
/// were started), and only one that overstays its deadline is aborted, with its name logged.
struct Tasks {
    shutdown: watch::Receiver<bool>,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Tasks {
    fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self {
            shutdown,
            running: Vec::new(),
        }
    }

    /// A task that ends by itself once shutdown has begun.
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.running.push((name, tokio::spawn(task)));
    }

    /// A task that would run for ever (a periodic job): it is dropped at its next await once
    /// shutdown begins. Only for tasks that hold nothing to hand on.
    fn spawn_until_shutdown(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let mut shutdown = self.shutdown.clone();
        self.spawn(name, async move {
            tokio::select! {
                _ = task => {}
                _ = shutdown.wait_for(|down| *down) => {}
            }
        });
    }

    async fn join(self, each: Duration) {
        for (name, mut handle) in self.running {
            match tokio::time::timeout(each, &mut handle).await {
                Ok(Ok(())) => tracing::debug!(task = name, "stopped"),
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "task failed"),
                Err(_) => {
                    tracing::warn!(task = name, "did not stop in time; aborting it");
                    handle.abort();
                }
            }
        }
    }
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
    crate::db::privileges::check(&pool)
        .await
        .map_err(|e| match e {
            crate::db::privileges::Error::Db(e) => AppError::Database(e),
            crate::db::privileges::Error::Missing(what) => AppError::Privilege(what),
        })?;
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
        replication::slot::unconfirmed_backlog_end(&pool, &db.slot).await?
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
    replication::slot::warn_unbounded_wal(&pool).await;
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
    // Read replicas take row checks once their poll has found them standbys of this database;
    // until then (and whenever one is behind or fails) the primary answers.
    let replicas = crate::db::replicas::Replicas::new(
        &db.replicas,
        db.delivery_pool_size,
        db.replica_max_wait,
    );
    let pg = Arc::new(
        PgChanges::new(
            pool,
            delivery,
            db.publication.clone(),
            db.max_record_bytes,
            // Each check in flight holds a delivery connection: never more than there are.
            db.checks_in_flight.min(db.delivery_pool_size),
        )
        .with_replicas(replicas)
        .with_catchup(db.catchup.clone())
        .with_visibility(db.delete_visibility, db.visibility_memory_bytes),
    );
    pg.catalog.load_types().await?;
    pg.load_positions().await;
    Ok((pg, start))
}
