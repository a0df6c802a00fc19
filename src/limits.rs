//! The server-wide limits of the original (one tenant: the whole server): concurrent users,
//! joins per second, events per second, presence events per second.
//!
//! Rates are measured as the original does (`Realtime.RateCounter`): events are counted into a
//! bucket that closes every tick (5 s by default); the rate is the average over the last 12
//! buckets (one minute), and a limit is triggered while that average is at or above it. Counting
//! is one relaxed atomic add, so the hot paths pay nothing measurable.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Buckets averaged, as the original.
const BUCKETS: usize = 12;

/// Events per second over a sliding window of closed buckets.
pub struct RateCounter {
    /// Per second; 0 means unlimited.
    limit: u64,
    current: AtomicU64,
    closed: Mutex<std::collections::VecDeque<u64>>,
    /// The average (events per second, rounded down) after the last tick.
    avg: AtomicU64,
    triggered: AtomicBool,
}

impl RateCounter {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            current: AtomicU64::new(0),
            closed: Mutex::new(std::collections::VecDeque::with_capacity(BUCKETS)),
            avg: AtomicU64::new(0),
            triggered: AtomicBool::new(false),
        }
    }

    pub fn add(&self, n: u64) {
        if self.limit != 0 {
            self.current.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Whether the average is at or above the limit (as of the last tick).
    pub fn triggered(&self) -> bool {
        self.triggered.load(Ordering::Relaxed)
    }

    pub fn average(&self) -> u64 {
        self.avg.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Closes the current bucket; `tick` is the bucket length.
    pub fn tick(&self, tick: Duration) {
        if self.limit == 0 {
            return;
        }
        let count = self.current.swap(0, Ordering::Relaxed);
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if closed.len() == BUCKETS {
            closed.pop_front();
        }
        closed.push_back(count);
        let total: u64 = closed.iter().sum();
        let secs = (closed.len() as f64 * tick.as_secs_f64()).max(f64::MIN_POSITIVE);
        let avg = total as f64 / secs;
        self.avg.store(avg as u64, Ordering::Relaxed);
        self.triggered
            .store(avg >= self.limit as f64, Ordering::Relaxed);
    }
}

/// The limits, shared by every session and the REST endpoints.
pub struct Limits {
    /// Sockets with at least one joined channel, and the most allowed (0: unlimited).
    users: AtomicUsize,
    max_users: usize,
    pub joins: RateCounter,
    /// Broadcast and presence messages delivered to channels, plus client broadcasts.
    pub events: RateCounter,
    pub presence: RateCounter,
    pub tick: Duration,
}

/// The limits' settings (0 = unlimited).
#[derive(Clone, Copy, Debug)]
pub struct LimitSettings {
    pub max_concurrent_users: usize,
    pub max_joins_per_second: u64,
    pub max_events_per_second: u64,
    pub max_presence_events_per_second: u64,
    pub tick: Duration,
}

impl Limits {
    pub fn new(s: LimitSettings) -> Arc<Self> {
        Arc::new(Self {
            users: AtomicUsize::new(0),
            max_users: s.max_concurrent_users,
            joins: RateCounter::new(s.max_joins_per_second),
            events: RateCounter::new(s.max_events_per_second),
            presence: RateCounter::new(s.max_presence_events_per_second),
            tick: s.tick.max(Duration::from_millis(10)),
        })
    }

    /// Closes the rate buckets every tick; never returns (the caller stops it at shutdown).
    pub async fn tick_forever(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            for c in [&self.joins, &self.events, &self.presence] {
                c.tick(self.tick);
            }
        }
    }

    /// Whether a socket that has no channel yet may become a user.
    pub fn users_full(&self) -> bool {
        self.max_users != 0 && self.users.load(Ordering::Relaxed) >= self.max_users
    }

    /// Counts a socket as a user (its first channel). False, and not counted, when full.
    pub fn try_add_user(&self) -> bool {
        if self.max_users == 0 {
            self.users.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.users
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_users).then_some(n + 1)
            })
            .is_ok()
    }

    /// Counts a socket as a user (its first channel joined).
    pub fn add_user(&self) {
        self.users.fetch_add(1, Ordering::Relaxed);
    }

    /// A counted socket left its last channel or closed.
    pub fn remove_user(&self) {
        let _ = self
            .users
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub fn users(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_triggers_at_the_limit_and_clears_below_it() {
        let tick = Duration::from_secs(5);
        let c = RateCounter::new(10);
        c.add(49); // 9.8/s over one bucket
        c.tick(tick);
        assert!(!c.triggered());
        c.add(51); // (49 + 51) / 10 s = 10/s
        c.tick(tick);
        assert!(c.triggered());
        assert_eq!(c.average(), 10);
        c.tick(tick); // 100 / 15 s
        assert!(!c.triggered());
    }

    #[test]
    fn the_window_is_twelve_buckets() {
        let tick = Duration::from_secs(1);
        let c = RateCounter::new(1);
        c.add(100);
        c.tick(tick);
        for _ in 0..11 {
            c.tick(tick);
        }
        assert!(c.triggered(), "100 over 12 s is still over 1/s");
        c.tick(tick); // the 100 falls out
        assert!(!c.triggered());
        assert_eq!(c.average(), 0);
    }

    #[test]
    fn zero_means_unlimited() {
        let c = RateCounter::new(0);
        c.add(u64::MAX / 2);
        c.tick(Duration::from_millis(1));
        assert!(!c.triggered());
        let l = Limits::new(LimitSettings {
            max_concurrent_users: 0,
            max_joins_per_second: 0,
            max_events_per_second: 0,
            max_presence_events_per_second: 0,
            tick: Duration::from_secs(5),
        });
        for _ in 0..1000 {
            assert!(l.try_add_user());
        }
        assert!(!l.users_full());
    }

    #[test]
    fn users_are_capped_and_released() {
        let l = Limits::new(LimitSettings {
            max_concurrent_users: 2,
            max_joins_per_second: 0,
            max_events_per_second: 0,
            max_presence_events_per_second: 0,
            tick: Duration::from_secs(5),
        });
        assert!(l.try_add_user());
        assert!(l.try_add_user());
        assert!(l.users_full());
        assert!(!l.try_add_user());
        l.remove_user();
        assert!(l.try_add_user());
        l.remove_user();
        l.remove_user();
        l.remove_user(); // never below zero
        assert_eq!(l.users(), 0);
    }
}
