//! A real PostgreSQL for the tests: one cluster per test binary (created with walcast's own
//! dev-cluster code, logical replication on), a fresh database per test, and a watchdog that
//! stops the cluster when the test process exits.

use std::sync::OnceLock;

use tokio_postgres::{Client, NoTls};

pub struct Cluster {
    pub port: u16,
    dev: walcast::dev::DevCluster,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("walcast-test-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = walcast::dev::DevCluster::start(&dir)
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL for tests: {e}"));
        stop_when_this_process_ends(&c, &dir);
        Cluster {
            port: c.port,
            dev: c,
        }
    })
}

/// Starts a watchdog that stops `cluster` (and removes `dir`) once this test process is gone,
/// however it ends.
pub fn stop_when_this_process_ends(cluster: &walcast::dev::DevCluster, dir: &std::path::Path) {
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        stop = cluster.stop_shell_command(),
        dir = dir.display()
    );
    // Started in the background by a shell that exits at once, so nothing is left to reap.
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("( {watchdog} ) </dev/null >/dev/null 2>&1 &"),
        ])
        .status()
        .expect("start the cluster watchdog");
    assert!(status.success(), "cluster watchdog did not start");
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub port: u16,
}

impl TestDb {
    pub async fn create(hint: &str) -> TestDb {
        let c = cluster();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name: String = format!("t_{}_{}_{}", hint, std::process::id(), n)
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() {
                    ch.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(60)
            .collect();
        let admin = connect(c.port, "postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        TestDb { name, port: c.port }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, self.name)
    }

    /// The environment walcast needs to use this database.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.url()),
            ("SLOT_NAME", format!("s_{}", self.name)),
        ]
    }

    pub async fn client(&self) -> Client {
        connect(self.port, &self.name).await
    }
}

pub async fn connect(port: u16, dbname: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname={dbname}"),
        NoTls,
    )
    .await
    .expect("connect to the test PostgreSQL");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The `ticks` table the change-stream tests write to: readable by anon, in the publication.
/// Call it after walcast's migrations have made the roles.
pub async fn create_ticks(sql: &Client) {
    sql.batch_execute(
        "CREATE TABLE ticks (id serial PRIMARY KEY, k int);
         GRANT SELECT ON ticks TO anon;
         ALTER PUBLICATION supabase_realtime ADD TABLE ticks;",
    )
    .await
    .expect("create ticks");
}

/// The binding the change-stream tests join `realtime:t` with: every INSERT into `ticks`.
pub fn ticks_binding() -> serde_json::Value {
    serde_json::json!({"postgres_changes":[{"event":"INSERT","schema":"public","table":"ticks"}]})
}

/// An anon client joined to `realtime:t` with [`ticks_binding`], once "Subscribed to
/// PostgreSQL" has arrived; and the join's ref.
pub async fn subscribe_to_ticks(server: &crate::Server) -> (crate::Client, String) {
    let mut c = server.connect(crate::Vsn::V2, &crate::token("anon")).await;
    let join_ref = c.join_ok("realtime:t", ticks_binding()).await;
    let f = c.recv_until("subscribed", |f| f.event() == "system").await;
    assert_eq!(f.payload()["message"], "Subscribed to PostgreSQL");
    (c, join_ref)
}

/// Commits a row to `ticks`; returns the WAL position after its commit record (the statement
/// returns before the commit record is written, so the position is read afterwards): a slot
/// confirmed past it has confirmed the transaction.
pub async fn insert_tick(sql: &Client, k: i32) -> String {
    sql.execute("INSERT INTO ticks (k) VALUES ($1)", &[&k])
        .await
        .expect("insert a tick");
    sql.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("current WAL position")
        .get(0)
}

/// Whether `slot` has confirmed everything up to `lsn`.
pub async fn slot_confirmed(sql: &Client, slot: &str, lsn: &str) -> bool {
    sql.query_one(
        "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot, &lsn],
    )
    .await
    .expect("read the slot")
    .get(0)
}

/// Waits (at most `crate::WAIT`) until `slot` has confirmed everything up to `lsn`.
pub async fn wait_slot_confirmed(sql: &Client, slot: &str, lsn: &str) {
    let deadline = std::time::Instant::now() + crate::WAIT;
    while !slot_confirmed(sql, slot, lsn).await {
        assert!(
            std::time::Instant::now() < deadline,
            "{slot} never confirmed {lsn}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A streaming replica of the test binary's cluster (`pg_basebackup -R`, a hot standby on a
/// port of its own, run as `postgres` like the cluster): it holds every test database.
/// Stopped when the test process ends, or by [`Replica::kill`].
pub struct Replica {
    pub port: u16,
    dev: walcast::dev::DevCluster,
}

impl Replica {
    pub fn start() -> Replica {
        Self::start_with(&[])
    }

    /// With more settings for the replica (`name=value`, e.g. `recovery_min_apply_delay=30ms`).
    pub fn start_with(settings: &[&str]) -> Replica {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let c = cluster();
        // One base backup at a time: each forces a checkpoint, and PostgreSQL 15 can end a
        // concurrent backup's WAL stream at another's checkpoint ("terminating process ... to
        // release replication slot"); such a backup is tried again.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let mut attempt = 0;
        let dev = loop {
            attempt += 1;
            match c
                .dev
                .start_replica(&format!("replica{n}-{attempt}"), settings)
            {
                Ok(dev) => break dev,
                Err(e) if attempt < 3 => eprintln!("replica base backup failed, again: {e}"),
                Err(e) => panic!("cannot start a replica for tests: {e}"),
            }
        };
        stop_when_this_process_ends(&dev, &dev.root);
        Replica {
            port: dev.port,
            dev,
        }
    }

    /// `DB_REPLICA_URLS` for walcast on `db`.
    pub fn url(&self, db: &TestDb) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db.name)
    }

    pub async fn client(&self, db: &TestDb) -> Client {
        connect(self.port, &db.name).await
    }

    /// Waits (at most `crate::WAIT`) until the replica has replayed everything the primary
    /// (`primary`, a connection to it) has written so far.
    pub async fn wait_caught_up(&self, primary: &Client, replica: &Client) {
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("primary WAL position")
            .get(0);
        let deadline = std::time::Instant::now() + crate::WAIT;
        loop {
            let done: bool = replica
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .await
                .expect("replica replay position")
                .get(0);
            if done {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the replica never replayed {lsn}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Stops replaying WAL (it keeps receiving it) and waits until replay has stopped.
    pub async fn pause(&self, replica: &Client) {
        replica
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .expect("pause replay");
        let deadline = std::time::Instant::now() + crate::WAIT;
        loop {
            let state: String = replica
                .query_one("SELECT pg_get_wal_replay_pause_state()", &[])
                .await
                .expect("replay state")
                .get(0);
            if state == "paused" {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "replay never paused");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub async fn resume(&self, replica: &Client) {
        replica
            .batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .expect("resume replay");
    }

    /// How many times `walcast.check_cohorts` ran on the replica (its own statistics:
    /// the replica runs with `track_functions = all`).
    pub async fn check_calls(&self, replica: &Client) -> i64 {
        replica
            .query_opt(
                "SELECT calls FROM pg_stat_user_functions
                  WHERE schemaname = 'walcast' AND funcname = 'check_cohorts'",
                &[],
            )
            .await
            .expect("replica function statistics")
            .map_or(0, |r| r.get(0))
    }

    /// Stops the replica at once, as a crash would.
    pub fn kill(&self) {
        self.dev.kill().expect("kill the replica");
    }
}
