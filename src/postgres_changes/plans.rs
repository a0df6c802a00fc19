//! How PostgreSQL plans the row checks' key lookups, chosen per table by measuring.
//!
//! A lookup runs either as one generic plan per connection (the keys a parameter, no planning
//! per lookup) or as a statement per distinct key set with the keys as literals (planned once
//! per key set, then run by every cohort asking about those keys). Which is cheaper depends on
//! the policy: measured on issue #13's shapes, the generic plan of an `EXISTS` over a small
//! analyzed table reads the whole table per lookup (a hashed SubPlan) and costs 3-4x a plan
//! for the key, while for `(SELECT auth.uid())`-style policies planning per lookup costs 2x the
//! generic plan. So each table's lookups are timed: now and then a batch's lookups of a table
//! are split between the two modes (its cohorts alternately), each half timed as a call of its
//! own, and the mode with the lower time per checked key is kept. The choice changes only how
//! PostgreSQL plans a lookup, never what it answers.

use std::collections::HashMap;

/// How PostgreSQL plans a table's key lookup (`plan_cache_mode` for the calls running it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum PlanMode {
    /// One plan for any keys, made once per connection: no planning per lookup, but the
    /// planner cannot see the keys (a policy's `EXISTS` may become a hashed SubPlan that reads
    /// its whole table for every lookup).
    Generic,
    /// Planned for the keys: one statement per distinct key set of the batch, with the keys
    /// as literals, prepared for the call and run by every cohort asking about those keys
    /// (the original's method: one plan per change, run for each subscriber). Planning once
    /// per key set, but the planner sees the keys (index probes per key).
    Keys,
}

impl PlanMode {
    fn other(self) -> Self {
        match self {
            PlanMode::Generic => PlanMode::Keys,
            PlanMode::Keys => PlanMode::Generic,
        }
    }
}

/// Which plan mode is cheaper depends on the policy (measured: the generic plan costs 3-4x
/// a plan for the key for an `EXISTS` on a small analyzed table; planning per key costs 2x for
/// `(SELECT auth.uid())`-style policies, whose generic plan needs no planning), so it is
/// measured per table: now and then a batch's lookups of a table are split between the two
/// modes, each half timed, and the mode with the lower PostgreSQL time per key is used.
#[derive(Default)]
pub(super) struct PlanChoice {
    /// Batches that checked this table.
    batches: u64,
    keys: bool,
    /// Moving averages of microseconds per key, from calls that held only this table.
    generic_us: Option<f64>,
    keys_us: Option<f64>,
}

/// The first batches of a table all compare both modes; after that one batch in this many.
const PLAN_WARMUP_BATCHES: u64 = 4;
const PLAN_EXPLORE_EVERY: u64 = 32;
/// The other mode must be this much cheaper to be switched to.
const PLAN_SWITCH_RATIO: f64 = 0.85;

impl PlanChoice {
    pub(super) fn mode(&self) -> PlanMode {
        if self.keys {
            PlanMode::Keys
        } else {
            PlanMode::Generic
        }
    }

    /// Counts a batch; whether this one compares both modes.
    fn explore(&mut self) -> bool {
        self.batches += 1;
        self.batches <= PLAN_WARMUP_BATCHES || self.batches.is_multiple_of(PLAN_EXPLORE_EVERY)
    }

    pub(super) fn record(&mut self, mode: PlanMode, micros: f64, keys: usize) {
        if keys == 0 {
            return;
        }
        let sample = micros / keys as f64;
        let avg = match mode {
            PlanMode::Generic => &mut self.generic_us,
            PlanMode::Keys => &mut self.keys_us,
        };
        *avg = Some(match *avg {
            Some(a) => 0.7 * a + 0.3 * sample,
            None => sample,
        });
        if let (Some(g), Some(c)) = (self.generic_us, self.keys_us) {
            if self.keys && g < c * PLAN_SWITCH_RATIO {
                self.keys = false;
            } else if !self.keys && c < g * PLAN_SWITCH_RATIO {
                self.keys = true;
            }
        }
    }
}

/// One `walcast.check_cohorts` call of a check: the requests it runs (indexes into the
/// batch's requests), their plan mode, and the table its time is recorded for.
#[derive(Debug, PartialEq)]
pub(super) struct Call {
    pub(super) mode: PlanMode,
    pub(super) members: Vec<usize>,
    pub(super) timed: Option<u32>,
}

/// Groups a batch's requests (given by their table's oid) into calls: one per plan mode in
/// use, each table in its chosen mode; a table being compared gets two calls of its own (its
/// requests alternately in each mode, or one request in the other mode), both timed. A call
/// with only one table's requests is timed for that table too.
pub(super) fn plan_calls(plans: &mut HashMap<u32, PlanChoice>, tables_of: &[u32]) -> Vec<Call> {
    let mut tables: Vec<u32> = tables_of.to_vec();
    tables.sort_unstable();
    tables.dedup();
    let mut calls: Vec<Call> = Vec::new();
    let mut shared: HashMap<PlanMode, Vec<usize>> = HashMap::new();
    for &t in &tables {
        let choice = plans.entry(t).or_default();
        let mode = choice.mode();
        let members: Vec<usize> = (0..tables_of.len())
            .filter(|&i| tables_of[i] == t)
            .collect();
        if choice.explore() {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            if members.len() == 1 {
                b = members;
            } else {
                for (n, i) in members.into_iter().enumerate() {
                    if n.is_multiple_of(2) {
                        a.push(i)
                    } else {
                        b.push(i)
                    }
                }
            }
            for (members, mode) in [(a, mode), (b, mode.other())] {
                if !members.is_empty() {
                    calls.push(Call {
                        mode,
                        members,
                        timed: Some(t),
                    });
                }
            }
        } else {
            shared.entry(mode).or_default().extend(members);
        }
    }
    for mode in [PlanMode::Generic, PlanMode::Keys] {
        let Some(members) = shared.remove(&mode) else {
            continue;
        };
        let Some(&table) = members.first().and_then(|&i| tables_of.get(i)) else {
            continue;
        };
        let pure = members.iter().all(|&i| tables_of[i] == table);
        calls.push(Call {
            mode,
            members,
            timed: pure.then_some(table),
        });
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request is in exactly one call.
    fn covered(calls: &[Call], n: usize) -> bool {
        let mut all: Vec<usize> = calls.iter().flat_map(|c| c.members.clone()).collect();
        all.sort_unstable();
        all == (0..n).collect::<Vec<_>>()
    }

    #[test]
    fn a_table_switches_to_the_mode_measured_cheaper_and_back() {
        let mut plans = HashMap::new();
        let batch = [7, 7, 7, 7];
        // The first batches compare: half generic, half per key set, both timed.
        let calls = plan_calls(&mut plans, &batch);
        assert!(covered(&calls, 4));
        assert_eq!(
            calls,
            vec![
                Call {
                    mode: PlanMode::Generic,
                    members: vec![0, 2],
                    timed: Some(7)
                },
                Call {
                    mode: PlanMode::Keys,
                    members: vec![1, 3],
                    timed: Some(7)
                },
            ]
        );
        let choice = plans.get_mut(&7).unwrap();
        choice.record(PlanMode::Generic, 4000.0, 2);
        assert_eq!(choice.mode(), PlanMode::Generic, "one side measured only");
        choice.record(PlanMode::Keys, 800.0, 2);
        assert_eq!(choice.mode(), PlanMode::Keys);
        // Within the switch margin: no change.
        choice.record(PlanMode::Generic, 700.0, 2);
        choice.record(PlanMode::Generic, 700.0, 2);
        choice.record(PlanMode::Generic, 700.0, 2);
        choice.record(PlanMode::Generic, 700.0, 2);
        choice.record(PlanMode::Generic, 700.0, 2);
        choice.record(PlanMode::Generic, 700.0, 2);
        choice.record(PlanMode::Generic, 700.0, 2);
        choice.record(PlanMode::Generic, 700.0, 2);
        choice.record(PlanMode::Generic, 700.0, 2);
        assert_eq!(choice.mode(), PlanMode::Keys);
        // Clearly cheaper: back.
        for _ in 0..10 {
            choice.record(PlanMode::Generic, 200.0, 2);
        }
        assert_eq!(choice.mode(), PlanMode::Generic);
        choice.record(PlanMode::Keys, 500.0, 0);
        assert_eq!(choice.mode(), PlanMode::Generic, "no keys, no sample");
    }

    #[test]
    fn after_the_warm_up_one_batch_in_so_many_compares() {
        let mut plans = HashMap::new();
        let mut compared = 0;
        for _ in 0..(PLAN_WARMUP_BATCHES + 3 * PLAN_EXPLORE_EVERY) {
            let calls = plan_calls(&mut plans, &[1, 2, 1]);
            assert!(covered(&calls, 3));
            if calls
                .iter()
                .any(|c| c.members.contains(&0) && c.timed == Some(1) && c.members.len() == 1)
            {
                compared += 1;
            } else {
                // Both tables in one generic call, timed for neither.
                assert!(calls
                    .iter()
                    .any(|c| c.members == vec![0, 2] || c.members.len() == 3));
            }
        }
        assert_eq!(compared, PLAN_WARMUP_BATCHES + 3);
    }

    #[test]
    fn a_single_request_is_compared_whole_in_the_other_mode() {
        let mut plans = HashMap::new();
        let calls = plan_calls(&mut plans, &[5]);
        assert_eq!(
            calls,
            vec![Call {
                mode: PlanMode::Keys,
                members: vec![0],
                timed: Some(5)
            }]
        );
    }
}
