//! Who could see a row at its last change: a bounded memory, keyed by (table, primary key), of
//! the row checks made at the row's last INSERT or UPDATE (one verdict per claims cohort that
//! was checked). A DELETE of a row under row level security goes only to the cohorts recorded as
//! allowed (see `deliver`), and an UPDATE that a cohort recorded as allowed may no longer see is
//! a leave for the subscribers that asked for them.
//!
//! Bounded by `VISIBILITY_MEMORY_BYTES`: the rows changed longest ago go first. A row it does not
//! know (changed before walcast saw it, evicted, or not checked for that cohort) is "unknown":
//! `deliver` decides those exactly from the old row when the table has `REPLICA IDENTITY FULL`,
//! and by `DELETE_VISIBILITY` otherwise.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// A claims cohort as the memory names it (see [`super::registry::Cohort::key`]).
pub type CohortKey = u128;

/// What a DELETE-time lookup says about one cohort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    Allowed,
    Denied,
    Unknown,
}

/// The verdicts of a row's last change.
///
/// A row check reads the row as it is when the check runs, which can be after later changes
/// of the same row committed: a row deleted meanwhile is simply not there, so the check
/// answers "denied" for every cohort. Such a verdict says nothing about who could see the
/// row before. `checked_upto` is a WAL position at or past the end of the check (0: not
/// known); [`Verdicts::for_delete`] turns a denial into "unknown" for a DELETE of another
/// transaction whose commit record starts before it (the check may have seen the DELETE). A
/// DELETE in the row's own transaction keeps the denial: that row was never visible to anyone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdicts {
    cohorts: Vec<(CohortKey, bool)>,
    checked_upto: u64,
    xid: u32,
}

impl Verdicts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Verdicts of the change of transaction `xid`, from a check that ended before WAL
    /// position `lsn` (see the type's comment).
    pub fn checked_upto(mut self, xid: u32, lsn: u64) -> Self {
        self.xid = xid;
        self.checked_upto = lsn;
        self
    }

    /// What these verdicts say about `cohort` for a DELETE of transaction `delete_xid` whose
    /// commit record starts at `delete_lsn`: a denial from a check that may have run after a
    /// DELETE of another transaction (the row was gone, not hidden) is unknown.
    pub fn for_delete(&self, cohort: CohortKey, delete_xid: u32, delete_lsn: u64) -> Known {
        match self.get(cohort) {
            Known::Denied if delete_xid != self.xid && delete_lsn < self.checked_upto => {
                Known::Unknown
            }
            k => k,
        }
    }

    pub fn set(&mut self, cohort: CohortKey, allowed: bool) {
        match self.cohorts.iter_mut().find(|(c, _)| *c == cohort) {
            Some(v) => v.1 = allowed,
            None => self.cohorts.push((cohort, allowed)),
        }
    }

    pub fn get(&self, cohort: CohortKey) -> Known {
        match self.cohorts.iter().find(|(c, _)| *c == cohort) {
            Some((_, true)) => Known::Allowed,
            Some((_, false)) => Known::Denied,
            None => Known::Unknown,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cohorts.is_empty()
    }
}

type RowKey = (u32, Vec<String>);

struct Entry {
    verdicts: Verdicts,
    /// When it was last written (the position of its newest mark in `order`).
    stamp: u64,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    rows: HashMap<RowKey, Entry>,
    /// Rows in the order they were written; a mark whose stamp is not its entry's is stale.
    order: VecDeque<(RowKey, u64)>,
    next: u64,
    bytes: usize,
}

pub struct VisibilityMemory {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

/// What one remembered row costs: its key, its verdicts and the bookkeeping around them.
fn cost(key: &RowKey, verdicts: &Verdicts) -> usize {
    let key_bytes: usize = key.1.iter().map(|k| k.len() + 24).sum();
    // The key is held twice (map and order queue).
    2 * (key_bytes + 48) + verdicts.cohorts.len() * std::mem::size_of::<(CohortKey, bool)>() + 64
}

impl VisibilityMemory {
    /// A memory of at most `max_bytes` (0: remember nothing, every row is unknown).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_bytes,
        }
    }

    /// The verdicts of a row's last change, replacing what was known before.
    pub fn record(&self, table: u32, pk: Vec<String>, verdicts: Verdicts) {
        if self.max_bytes == 0 {
            return;
        }
        let key = (table, pk);
        let bytes = cost(&key, &verdicts);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *g;
        let stamp = inner.next;
        inner.next += 1;
        if let Some(old) = inner.rows.insert(
            key.clone(),
            Entry {
                verdicts,
                stamp,
                bytes,
            },
        ) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
        inner.order.push_back((key, stamp));
        let mut evicted = 0u64;
        while inner.bytes > self.max_bytes {
            let Some((k, s)) = inner.order.pop_front() else {
                break;
            };
            if inner.rows.get(&k).is_some_and(|e| e.stamp == s) {
                if let Some(e) = inner.rows.remove(&k) {
                    inner.bytes -= e.bytes;
                    evicted += 1;
                }
            }
        }
        // Stale marks (rows written again since) are dropped once they outnumber the rows.
        if inner.order.len() > 2 * inner.rows.len() + 64 {
            let rows = &inner.rows;
            inner
                .order
                .retain(|(k, s)| rows.get(k).is_some_and(|e| e.stamp == *s));
        }
        if evicted > 0 {
            metrics::counter!(crate::telemetry::VISIBILITY_MEMORY_EVICTED).increment(evicted);
        }
        self.gauges(inner);
    }

    /// The verdicts of a row's last change, if remembered.
    pub fn get(&self, table: u32, pk: &[String]) -> Option<Verdicts> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.rows
            .get(&(table, pk.to_vec()))
            .map(|e| e.verdicts.clone())
    }

    /// Forgets a row (deleted, or its key changed) and returns what was known of it.
    pub fn take(&self, table: u32, pk: &[String]) -> Option<Verdicts> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *g;
        let e = inner.rows.remove(&(table, pk.to_vec()))?;
        inner.bytes -= e.bytes;
        self.gauges(inner);
        Some(e.verdicts)
    }

    /// Forgets every row of a table (its definition changed: the key may not mean the same).
    pub fn forget_table(&self, table: u32) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *g;
        let before = inner.rows.len();
        let mut freed = 0;
        inner.rows.retain(|(t, _), e| {
            if *t == table {
                freed += e.bytes;
                false
            } else {
                true
            }
        });
        if inner.rows.len() != before {
            inner.bytes -= freed;
            inner.order.retain(|((t, _), _)| *t != table);
            self.gauges(inner);
        }
    }

    /// (rows, bytes) remembered now.
    pub fn size(&self) -> (usize, usize) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g.rows.len(), g.bytes)
    }

    fn gauges(&self, inner: &Inner) {
        metrics::gauge!(crate::telemetry::VISIBILITY_MEMORY_ROWS).set(inner.rows.len() as f64);
        metrics::gauge!(crate::telemetry::VISIBILITY_MEMORY_BYTES).set(inner.bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(pairs: &[(CohortKey, bool)]) -> Verdicts {
        let mut out = Verdicts::new();
        for &(c, a) in pairs {
            out.set(c, a);
        }
        out
    }

    #[test]
    fn the_last_change_decides_and_a_delete_forgets() {
        let m = VisibilityMemory::new(1 << 20);
        m.record(1, vec!["k".into()], v(&[(1, true), (2, false)]));
        // The row's next change replaces every verdict: cohort 2 was not checked this time.
        m.record(1, vec!["k".into()], v(&[(1, false), (3, true)]));
        let got = m.take(1, &["k".into()]).unwrap();
        assert_eq!(got.get(1), Known::Denied);
        assert_eq!(got.get(2), Known::Unknown);
        assert_eq!(got.get(3), Known::Allowed);
        assert!(m.take(1, &["k".into()]).is_none());
        assert_eq!(m.size(), (0, 0));
    }

    #[test]
    fn a_denial_from_a_check_that_may_have_seen_the_delete_is_unknown() {
        let checked = v(&[(1, true), (2, false)]).checked_upto(7, 1_000);
        // The DELETE committed before the check ended: the row may simply have been gone.
        assert_eq!(checked.for_delete(2, 8, 999), Known::Unknown);
        assert_eq!(checked.for_delete(1, 8, 999), Known::Allowed);
        // Committed after the check ended: the check saw the row, and it was hidden.
        assert_eq!(checked.for_delete(2, 8, 1_000), Known::Denied);
        assert_eq!(checked.for_delete(3, 8, 1_000), Known::Unknown);
        // Deleted in the transaction that wrote it: nobody ever saw that row.
        assert_eq!(checked.for_delete(2, 7, 999), Known::Denied);
    }

    #[test]
    fn bounded_in_bytes_oldest_change_first() {
        let one = cost(&(1, vec!["0000".into()]), &v(&[(1, true)]));
        let m = VisibilityMemory::new(3 * one);
        for i in 0..5 {
            m.record(1, vec![format!("{i:04}")], v(&[(1, true)]));
        }
        assert_eq!(m.size(), (3, 3 * one));
        assert!(m.get(1, &["0000".into()]).is_none());
        assert!(m.get(1, &["0001".into()]).is_none());
        // Written again, a row is young again.
        m.record(1, vec!["0002".into()], v(&[(1, false)]));
        m.record(1, vec!["0005".into()], v(&[(1, true)]));
        assert!(m.get(1, &["0002".into()]).is_some());
        assert!(m.get(1, &["0003".into()]).is_none());
        assert!(m.size().1 <= 3 * one);
        let off = VisibilityMemory::new(0);
        off.record(1, vec!["k".into()], v(&[(1, true)]));
        assert_eq!(off.size(), (0, 0));
        m.forget_table(1);
        assert_eq!(m.size(), (0, 0));
    }
}
