//! Live subscriptions, by table, indexed so that matching a change costs in proportion to the
//! subscriptions it matches: a subscription with an equality filter (`conversation_id=eq.42`,
//! the chat case) is filed under that column and value, and a change looks up its own value.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};

use crate::channels::outbound::Outbound;
use crate::channels::ChannelId;
use crate::protocol::Vsn;

use super::binding::Action;
use super::filter::{Cond, Filter, Kind, Op, Operand};

/// Where a channel's events go.
pub struct Target {
    pub channel: ChannelId,
    pub vsn: Vsn,
    pub topic: Arc<str>,
    pub outbound: Arc<Outbound>,
}

/// Subscribers that see the same rows: the same role and the same claims.
#[derive(Debug)]
pub struct Cohort {
    pub role: String,
    /// The full claims as JSON, set as `request.jwt.claims`.
    pub claims: String,
    pub sub: String,
    /// Its name in the visibility memory: a 128-bit keyed hash of role and claims (the keys are
    /// random per process, so no one can aim for a collision).
    pub key: u128,
}

impl Cohort {
    pub fn new(role: String, claims: String, sub: String) -> Self {
        use std::hash::BuildHasher;
        static KEYS: std::sync::OnceLock<(
            std::collections::hash_map::RandomState,
            std::collections::hash_map::RandomState,
        )> = std::sync::OnceLock::new();
        let (a, b) = KEYS.get_or_init(Default::default);
        let half = |s: &std::collections::hash_map::RandomState| {
            let mut h = s.build_hasher();
            role.hash(&mut h);
            claims.hash(&mut h);
            h.finish()
        };
        let key = (u128::from(half(a)) << 64) | u128::from(half(b));
        Self {
            role,
            claims,
            sub,
            key,
        }
    }
}

impl PartialEq for Cohort {
    fn eq(&self, other: &Self) -> bool {
        self.role == other.role && self.claims == other.claims
    }
}
impl Eq for Cohort {}
impl Hash for Cohort {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.role.hash(state);
        self.claims.hash(state);
    }
}

pub struct Sub {
    pub target: Arc<Target>,
    pub binding_id: u32,
    pub action: Action,
    /// Conditions that must all hold.
    pub filters: Vec<Cond<Filter>>,
    /// `select`: only these columns (plus the primary key) are sent.
    pub select: Option<Arc<Vec<String>>>,
    pub cohort: Arc<Cohort>,
    /// `leaves: true`: told when an UPDATE takes a row it could see out of its view.
    pub leaves: bool,
}

/// A column value as a filter sees it.
pub enum Cell<'a> {
    /// Not in this row image (an unchanged TOAST value, or a non-key column of a key-only old row).
    Missing,
    Null,
    Value(&'a str),
}

/// How a column compares, and index key → subscriptions.
type ColumnIndex = (Kind, HashMap<String, Vec<Arc<Sub>>>);

#[derive(Default)]
struct TableSubs {
    /// column → its index.
    indexed: HashMap<String, ColumnIndex>,
    unindexed: Vec<Arc<Sub>>,
}

impl TableSubs {
    fn add(&mut self, sub: Arc<Sub>) {
        let key = sub
            .filters
            .iter()
            .filter_map(|c| match c {
                Cond::Leaf(f) => Some(f),
                Cond::Tree { .. } => None,
            })
            .find_map(|f| match (&f.op, f.negate, &f.operand) {
                (Op::Eq, false, Operand::Value(Some(v))) => f
                    .kind
                    .index_key(v)
                    .map(|k| (f.column.clone(), f.kind.clone(), k)),
                _ => None,
            });
        match key {
            Some((column, kind, k)) => {
                let entry = self
                    .indexed
                    .entry(column)
                    .or_insert_with(|| (kind, HashMap::new()));
                entry.1.entry(k).or_default().push(sub);
            }
            None => self.unindexed.push(sub),
        }
    }

    fn remove_channel(&mut self, channel: ChannelId) {
        self.unindexed.retain(|s| s.target.channel != channel);
        for (_, map) in self.indexed.values_mut() {
            map.retain(|_, subs| {
                subs.retain(|s| s.target.channel != channel);
                !subs.is_empty()
            });
        }
        self.indexed.retain(|_, (_, map)| !map.is_empty());
    }

    fn is_empty(&self) -> bool {
        self.unindexed.is_empty() && self.indexed.is_empty()
    }
}

#[derive(Default)]
struct Inner {
    tables: HashMap<u32, TableSubs>,
    channels: HashMap<ChannelId, HashSet<u32>>,
}

#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces all subscriptions of `channel` with `subs` (table OID, subscription).
    pub fn replace(&self, channel: ChannelId, subs: Vec<(u32, Sub)>) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        Self::remove_locked(&mut inner, channel);
        let mut tables = HashSet::new();
        for (table, sub) in subs {
            inner.tables.entry(table).or_default().add(Arc::new(sub));
            tables.insert(table);
        }
        if !tables.is_empty() {
            inner.channels.insert(channel, tables);
        }
    }

    pub fn remove(&self, channel: ChannelId) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        Self::remove_locked(&mut inner, channel);
    }

    fn remove_locked(inner: &mut Inner, channel: ChannelId) {
        if let Some(tables) = inner.channels.remove(&channel) {
            for t in tables {
                if let Some(ts) = inner.tables.get_mut(&t) {
                    ts.remove_channel(channel);
                    if ts.is_empty() {
                        inner.tables.remove(&t);
                    }
                }
            }
        }
    }

    /// Whether anything is subscribed to this table at all (cheap pre-check).
    pub fn watches(&self, table: u32) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .tables
            .contains_key(&table)
    }

    /// Subscriptions of `table` that take `action` and whose filters all hold on `row`. With
    /// `and_deletes` (an INSERT or UPDATE of a row under row level security), also those that
    /// take DELETEs: their cohorts' verdicts on the row are remembered for its DELETE (and for
    /// leaves), though the change itself is not theirs.
    pub fn matches<'a>(
        &self,
        table: u32,
        action: Action,
        and_deletes: bool,
        row: &dyn Fn(&str) -> Cell<'a>,
    ) -> Vec<Arc<Sub>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let Some(ts) = inner.tables.get(&table) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut consider = |sub: &Arc<Sub>| {
            let wanted =
                sub.action.admits(action) || (and_deletes && sub.action.admits(Action::Delete));
            if !wanted {
                return;
            }
            // A value not in the row image is unknown: it never makes a condition true alone.
            let mut leaf = |f: &Filter| match row(&f.column) {
                Cell::Missing => None,
                Cell::Null => f.eval(None),
                Cell::Value(v) => f.eval(Some(v)),
            };
            let visible = sub.filters.iter().all(|c| c.eval(&mut leaf) == Some(true));
            if visible {
                out.push(sub.clone());
            }
        };
        for (column, (kind, map)) in &ts.indexed {
            if let Cell::Value(v) = row(column) {
                if let Some(subs) = kind.index_key(v).and_then(|k| map.get(&k)) {
                    subs.iter().for_each(&mut consider);
                }
            }
        }
        ts.unindexed.iter().for_each(&mut consider);
        out
    }

    /// (tables, subscriptions) for metrics and tests.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let subs = inner
            .tables
            .values()
            .map(|t| {
                t.unindexed.len()
                    + t.indexed
                        .values()
                        .map(|(_, m)| m.values().map(Vec::len).sum::<usize>())
                        .sum::<usize>()
            })
            .sum();
        (inner.tables.len(), subs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(channel: ChannelId, filters: Vec<Filter>) -> Sub {
        Sub {
            target: Arc::new(Target {
                channel,
                vsn: Vsn::V2,
                topic: Arc::from("realtime:t"),
                outbound: Arc::new(Outbound::new(1 << 20)),
            }),
            binding_id: 1,
            action: Action::Insert,
            filters: filters.into_iter().map(Cond::Leaf).collect(),
            select: None,
            cohort: Arc::new(Cohort::new("anon".into(), "{}".into(), String::new())),
            leaves: false,
        }
    }

    fn eq(col: &str, v: &str) -> Filter {
        Filter {
            column: col.into(),
            kind: Kind::Int,
            op: Op::Eq,
            negate: false,
            operand: Operand::Value(Some(v.into())),
        }
    }

    #[test]
    fn indexed_and_unindexed_matching() {
        let r = Registry::new();
        let (a, b, c) = (ChannelId::next(), ChannelId::next(), ChannelId::next());
        r.replace(a, vec![(7, sub(a, vec![eq("conv", "1")]))]);
        r.replace(b, vec![(7, sub(b, vec![eq("conv", "2")]))]);
        r.replace(c, vec![(7, sub(c, vec![]))]);
        let row = |v: &'static str| {
            move |col: &str| {
                if col == "conv" {
                    Cell::Value(v)
                } else {
                    Cell::Missing
                }
            }
        };
        let hits: Vec<ChannelId> = r
            .matches(7, Action::Insert, false, &row("01"))
            .iter()
            .map(|s| s.target.channel)
            .collect();
        assert!(
            hits.contains(&a) && hits.contains(&c) && !hits.contains(&b),
            "int keys normalise: 01 == 1"
        );
        assert!(
            r.matches(7, Action::Delete, false, &row("1")).is_empty(),
            "action filter"
        );
        r.remove(a);
        assert_eq!(r.matches(7, Action::Insert, false, &row("1")).len(), 1);
        r.remove(b);
        r.remove(c);
        assert_eq!(r.size(), (0, 0));
    }

    #[test]
    fn or_trees_match_on_any_branch_and_never_on_an_unknown_value() {
        let r = Registry::new();
        let a = ChannelId::next();
        // conv=eq.1 AND or=(conv.eq.1,other.eq.5): indexed by its top-level equality only.
        let mut s = sub(a, vec![eq("conv", "1")]);
        s.filters.push(Cond::Tree {
            any: true,
            negate: false,
            of: vec![Cond::Leaf(eq("n", "1")), Cond::Leaf(eq("other", "5"))],
        });
        r.replace(a, vec![(7, s)]);
        let row = |n: Cell<'static>, other: Cell<'static>| {
            move |col: &str| match col {
                "conv" => Cell::Value("1"),
                "n" => clone_cell(&n),
                "other" => clone_cell(&other),
                _ => Cell::Missing,
            }
        };
        let hit = |n, other| r.matches(7, Action::Insert, false, &row(n, other)).len();
        assert_eq!(hit(Cell::Value("1"), Cell::Value("9")), 1);
        assert_eq!(hit(Cell::Value("2"), Cell::Value("5")), 1);
        assert_eq!(hit(Cell::Value("2"), Cell::Value("9")), 0);
        // Unknown (absent from the row image) or NULL: the other branch decides alone.
        assert_eq!(hit(Cell::Missing, Cell::Value("5")), 1);
        assert_eq!(hit(Cell::Missing, Cell::Null), 0);
        assert_eq!(hit(Cell::Null, Cell::Value("9")), 0);
    }

    fn clone_cell(c: &Cell<'static>) -> Cell<'static> {
        match c {
            Cell::Missing => Cell::Missing,
            Cell::Null => Cell::Null,
            Cell::Value(v) => Cell::Value(v),
        }
    }
}
