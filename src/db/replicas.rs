//! Read replicas (`DB_REPLICA_URLS`) that take row checks off the primary, and which of them a
//! batch's checks may run on.
//!
//! Exactness rests on one rule: a batch's checks run on a replica only if, inside the check's
//! own transaction and before its first lookup, the replica has replayed past every commit of
//! the batch (`pg_last_wal_replay_lsn()`, the end of the last record it replayed, beyond the
//! start of the batch's last commit record). A standby makes a transaction visible to new
//! snapshots when it replays its commit record, and each later statement of the check takes a
//! new snapshot, so the lookups see the committed rows and every policy, grant and membership
//! change committed before them, as the primary's check would. Replay only moves forward while
//! the standby runs, and the check's connection does not outlive the standby process (after a
//! restart a standby may be back at an older point), so the guard is asked on that connection.
//! The cached replay positions here only choose where to try; they never decide exactness.
//!
//! Any failure on a replica (behind after the wait, an error, a query cancelled by a recovery
//! conflict, a lost connection) sends the whole batch to the primary, which then answers it as
//! if there were no replica: nothing is lost, and nothing the primary would deny is allowed.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DbConfig, Pool};

/// How often each replica's replay position and health are read.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long a replica that failed is left out before it is tried again (its poll must succeed
/// too).
const DOWN_FOR: Duration = Duration::from_secs(1);

/// One replica: its pool, what is known of its replay position, and its load.
pub struct Replica {
    /// 1-based position in `DB_REPLICA_URLS`: the metric label and the log's name.
    pub index: usize,
    /// `host:port` for logs.
    pub label: String,
    pub pool: Arc<Pool>,
    /// The last replay position seen (0: unknown). Only a hint for choosing.
    replay: AtomicU64,
    /// A wait for this LSN timed out: not chosen for later commits until it has replayed this
    /// far (0: not behind).
    behind_at: AtomicU64,
    /// Left out until then after a failure.
    down_until: Mutex<Option<Instant>>,
    /// Its last poll succeeded, it is a standby, and of the primary's system.
    healthy: AtomicBool,
    in_flight: AtomicUsize,
}

impl Replica {
    fn usable(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self
                .down_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none_or(|t| Instant::now() >= t)
    }

    /// Whether a batch whose last commit record starts at `commit_lsn` may be tried here:
    /// known to have replayed it, or not known to be behind.
    fn candidate(&self, commit_lsn: u64) -> bool {
        if !self.usable() {
            return false;
        }
        let behind = self.behind_at.load(Ordering::Relaxed);
        self.replay.load(Ordering::Relaxed) > commit_lsn || behind == 0
    }

    /// Records a replay position seen (at least this far).
    pub fn replayed(&self, lsn: u64) {
        let now = self.replay.fetch_max(lsn, Ordering::Relaxed).max(lsn);
        let behind = self.behind_at.load(Ordering::Relaxed);
        if behind != 0 && now > behind {
            self.behind_at.store(0, Ordering::Relaxed);
        }
    }

    /// A wait for `commit_lsn` timed out.
    pub fn behind(&self, commit_lsn: u64) {
        self.behind_at.fetch_max(commit_lsn, Ordering::Relaxed);
    }

    /// Left out for a while (a lost connection, a refused one, a timeout).
    pub fn down(&self) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + DOWN_FOR);
        self.healthy.store(false, Ordering::Relaxed);
    }
}

/// Counts a check in flight on a replica or the primary until dropped.
pub struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn busy(n: &AtomicUsize) -> Busy<'_> {
    n.fetch_add(1, Ordering::Relaxed);
    Busy(n)
}

/// The replicas and the primary's share of the checks in flight.
pub struct Replicas {
    pub list: Vec<Arc<Replica>>,
    primary_in_flight: AtomicUsize,
    /// `DB_REPLICA_MAX_WAIT_MS`.
    pub max_wait: Duration,
    /// The primary's system identifier, once read: a replica of another system is never used.
    /// `Some(None)`: the server refused `pg_control_system()` to the user (PostgreSQL lets
    /// any user call it, but a provider may revoke it), so it is not compared.
    system: Mutex<Option<Option<i64>>>,
}

impl Replicas {
    /// Pools for `configs` (`size` connections each); nothing is connected yet.
    pub fn new(configs: &[DbConfig], size: usize, max_wait: Duration) -> Arc<Self> {
        let list = configs
            .iter()
            .enumerate()
            .map(|(i, db)| {
                Arc::new(Replica {
                    index: i + 1,
                    label: format!("{}:{}", db.host, db.port),
                    pool: Pool::named(db, "walcast_replica_checks", size, None),
                    replay: AtomicU64::new(0),
                    behind_at: AtomicU64::new(0),
                    down_until: Mutex::new(None),
                    healthy: AtomicBool::new(false),
                    in_flight: AtomicUsize::new(0),
                })
            })
            .collect();
        Arc::new(Self {
            list,
            primary_in_flight: AtomicUsize::new(0),
            max_wait,
            system: Mutex::new(None),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Where a batch whose last commit record starts at `commit_lsn` should be tried first: the
    /// least busy usable replica that has replayed it (or is not known to be behind), unless
    /// the primary has fewer checks in flight, so that checks in flight spread over all of
    /// them. `None`: the primary.
    pub fn pick(&self, commit_lsn: u64) -> Option<(Arc<Replica>, Busy<'_>)> {
        let best = self
            .list
            .iter()
            .filter(|r| r.candidate(commit_lsn))
            .min_by_key(|r| {
                (
                    r.in_flight.load(Ordering::Relaxed),
                    // Among equally busy ones, one known to have replayed the batch first.
                    r.replay.load(Ordering::Relaxed) <= commit_lsn,
                )
            })?;
        if best.in_flight.load(Ordering::Relaxed) > self.primary_in_flight.load(Ordering::Relaxed) {
            return None;
        }
        // The guard borrows the replica through the list, which lives as long as `self`.
        let b = busy(&best.in_flight);
        Some((best.clone(), b))
    }

    /// Counts a check on the primary until dropped.
    pub fn primary_busy(&self) -> Busy<'_> {
        busy(&self.primary_in_flight)
    }

    /// Reads every replica's replay position and health every [`POLL_EVERY`], for ever;
    /// `primary` gives the system identifier replicas must share.
    pub async fn watch(self: Arc<Self>, primary: Arc<Pool>) {
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let system = *self.system.lock().unwrap_or_else(|p| p.into_inner());
            let system = match system {
                Some(s) => s,
                None => match system_identifier(&primary).await {
                    Ok(s) => {
                        *self.system.lock().unwrap_or_else(|p| p.into_inner()) = Some(Some(s));
                        Some(s)
                    }
                    Err(e) if e.db_error().is_some_and(|d| d.code().code() == "42501") => {
                        tracing::warn!("the database user may not call pg_control_system(): replicas are not checked to be of the primary's system");
                        *self.system.lock().unwrap_or_else(|p| p.into_inner()) = Some(None);
                        None
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the primary's system identifier; replicas unused until it can be read");
                        continue;
                    }
                },
            };
            for r in &self.list {
                poll(r, system).await;
            }
            publish_usable_gauge(&self.list);
        }
    }
}

/// One replica's poll: a standby of the primary's system, and how far it has replayed.
async fn poll(r: &Replica, system: Option<i64>) {
    let was = r.healthy.load(Ordering::Relaxed);
    let answer = async {
        let client = r.pool.get().await?;
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8",
                &[],
            )
            .await?;
        let sys = match system {
            Some(_) => Some(
                client
                    .query_one("SELECT system_identifier FROM pg_control_system()", &[])
                    .await?
                    .try_get::<_, i64>(0)?,
            ),
            None => None,
        };
        Ok::<_, super::DbError>((
            row.try_get::<_, bool>(0)?,
            row.try_get::<_, Option<i64>>(1)?,
            sys,
        ))
    };
    let healthy = match tokio::time::timeout(Duration::from_secs(2), answer).await {
        Ok(Ok((true, Some(lsn), sys))) if sys == system => {
            r.replayed(u64::try_from(lsn).unwrap_or(0));
            true
        }
        Ok(Ok((true, _, sys))) if sys != system => {
            if was || r.replay.load(Ordering::Relaxed) == 0 {
                tracing::error!(replica = %r.label, "DB_REPLICA_URLS: this server is not a replica of the primary (another system identifier); it is not used");
            }
            false
        }
        Ok(Ok(_)) => {
            if was {
                tracing::warn!(replica = %r.label, "replica is no longer a standby (promoted?): row checks go to the primary");
            }
            false
        }
        Ok(Err(e)) => {
            if was {
                tracing::warn!(replica = %r.label, error = %e, "replica unreachable: row checks go to the primary");
            }
            false
        }
        Err(_) => {
            if was {
                tracing::warn!(replica = %r.label, "replica did not answer within 2 s: row checks go to the primary");
            }
            false
        }
    };
    if healthy && !was {
        tracing::info!(replica = %r.label, "replica in use for row checks");
    }
    r.healthy.store(healthy, Ordering::Relaxed);
}

async fn system_identifier(pool: &Arc<Pool>) -> Result<i64, super::DbError> {
    let client = pool.get().await?;
    Ok(client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await?
        .try_get(0)?)
}

fn publish_usable_gauge(list: &[Arc<Replica>]) {
    let n = list.iter().filter(|r| r.usable()).count();
    metrics::gauge!(crate::telemetry::REPLICAS_USABLE).set(n as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(n: usize) -> Arc<Replicas> {
        let db = DbConfig::from_url("postgres://u@127.0.0.1:1/db").expect("url");
        let r = Replicas::new(&vec![db; n], 2, Duration::from_millis(20));
        for replica in &r.list {
            replica.healthy.store(true, Ordering::Relaxed);
        }
        r
    }

    #[test]
    fn a_replica_is_chosen_only_while_usable_and_not_known_to_be_behind() {
        let r = replicas(1);
        let one = &r.list[0];
        // Position unknown, not behind: tried (the check's own guard decides).
        assert!(r.pick(100).is_some());
        // A wait for commit 100 ran out: not tried for 100 or later until it is past 100.
        one.behind(100);
        assert!(r.pick(100).is_none());
        assert!(r.pick(150).is_none());
        one.replayed(100);
        assert!(
            r.pick(150).is_none(),
            "at the commit's start is not past it"
        );
        one.replayed(101);
        assert!(
            r.pick(150).is_some(),
            "caught up with the LSN it was behind at"
        );
        // Known past an older commit: tried for it whatever else happens.
        one.behind(200);
        assert!(r.pick(50).is_some());
        assert!(r.pick(200).is_none());
        // Down (a failure), or unhealthy (a failed poll): never tried.
        one.replayed(1_000);
        one.down();
        assert!(r.pick(10).is_none());
        let r = replicas(1);
        r.list[0].healthy.store(false, Ordering::Relaxed);
        assert!(r.pick(10).is_none());
    }

    #[test]
    fn checks_in_flight_spread_over_the_primary_and_the_replicas() {
        let r = replicas(2);
        // Equally idle: a replica first (the primary is spared).
        let (a, _a) = r.pick(1).expect("a replica");
        // One replica busy, the other idle: the idle one.
        let (b, _b) = r.pick(1).expect("the other replica");
        assert_ne!(a.index, b.index);
        // Both replicas busy, the primary idle: the primary.
        assert!(r.pick(1).is_none());
        let _p = r.primary_busy();
        // All equally busy again: a replica.
        let (c, _c) = r.pick(1).expect("a replica");
        drop(_a);
        // A check ended on `a`: it is the least busy.
        let (d, _d) = r.pick(1).expect("a replica");
        assert_eq!(d.index, a.index);
        assert!(c.index == a.index || c.index == b.index);
    }
}
