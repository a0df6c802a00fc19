//! Evaluation of one compiled filter: [`Filter`] (the column, its kind, the operator) and its
//! right-hand side [`Operand`] (a value, an `in` list by value or by equality key, a LIKE
//! pattern, a regular expression, an `is` keyword), answering in SQL's three-valued logic.

use std::cmp::Ordering;

use super::compare::parse_bool;
use super::{Kind, LikePattern, Op};

/// The right-hand side of a compiled filter.
#[derive(Clone, Debug)]
pub enum Operand {
    /// A normalised value (None: SQL NULL, which no comparison matches).
    Value(Option<String>),
    /// An `in` list, compared value by value (kinds without exact equality keys: floats).
    List(Vec<Option<String>>),
    /// An `in` list under a kind with exact equality keys ([`Kind::index_key`]): the values'
    /// keys, and whether the list holds a NULL. One lookup per row, whatever the list's length.
    Keys {
        keys: std::collections::HashSet<String>,
        null: bool,
    },
    Pattern(LikePattern),
    Regex(regex::Regex),
    /// `is`: null, true, false or unknown.
    Keyword(String),
}

impl Operand {
    /// An `in` list's operand: keyed when every value has an equality key under `kind`.
    pub fn in_list(kind: &Kind, items: Vec<Option<String>>) -> Operand {
        let keys: Option<std::collections::HashSet<String>> =
            items.iter().flatten().map(|v| kind.index_key(v)).collect();
        match keys {
            Some(keys) => Operand::Keys {
                keys,
                null: items.iter().any(Option::is_none),
            },
            None => Operand::List(items),
        }
    }
}

/// A filter ready to run: the column it reads, the column's kind, the operator.
#[derive(Clone, Debug)]
pub struct Filter {
    pub column: String,
    pub kind: Kind,
    pub op: Op,
    pub negate: bool,
    pub operand: Operand,
}

impl Filter {
    /// Three-valued result: `None` is SQL NULL (treated as "not visible").
    pub fn eval(&self, value: Option<&str>) -> Option<bool> {
        let result = match (&self.operand, self.op) {
            (Operand::Keyword(k), Op::Is) => {
                let r = match (k.as_str(), value) {
                    ("null", v) => v.is_none(),
                    ("unknown", v) => v.is_none(),
                    ("true", Some(v)) => parse_bool(v) == Some(true),
                    ("false", Some(v)) => parse_bool(v) == Some(false),
                    (_, None) => false,
                    _ => false,
                };
                // IS / IS NOT never yield NULL.
                return Some(r != self.negate);
            }
            (Operand::Value(rhs), Op::IsDistinct) => {
                let distinct = match (value, rhs.as_deref()) {
                    (None, None) => false,
                    (None, Some(_)) | (Some(_), None) => true,
                    (Some(a), Some(b)) => self.kind.compare(a, b) != Some(Ordering::Equal),
                };
                return Some(distinct != self.negate);
            }
            (Operand::Value(rhs), op) => {
                let (a, b) = (value?, rhs.as_deref()?);
                let ord = self.kind.compare(a, b)?;
                match op {
                    Op::Eq => ord == Ordering::Equal,
                    Op::Neq => ord != Ordering::Equal,
                    Op::Lt => ord == Ordering::Less,
                    Op::Lte => ord != Ordering::Greater,
                    Op::Gt => ord == Ordering::Greater,
                    Op::Gte => ord != Ordering::Less,
                    _ => return None,
                }
            }
            (Operand::List(items), Op::In) => {
                let a = value?;
                let mut saw_null = false;
                let mut hit = false;
                for item in items {
                    match item {
                        None => saw_null = true,
                        Some(b) => {
                            if self.kind.compare(a, b) == Some(Ordering::Equal) {
                                hit = true;
                                break;
                            }
                        }
                    }
                }
                if !hit && saw_null {
                    return None;
                }
                hit
            }
            (Operand::Keys { keys, null }, Op::In) => {
                let hit = self
                    .kind
                    .index_key(value?)
                    .is_some_and(|k| keys.contains(&k));
                if !hit && *null {
                    return None;
                }
                hit
            }
            (Operand::Pattern(p), Op::Like | Op::ILike) => p.matches(value?),
            (Operand::Regex(re), Op::Match | Op::IMatch) => re.is_match(value?),
            _ => return None,
        };
        Some(result != self.negate)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn filt(kind: Kind, op: Op, rhs: &str) -> Filter {
        Filter {
            column: "c".into(),
            kind,
            op,
            negate: false,
            operand: Operand::Value(Some(rhs.into())),
        }
    }

    #[test]
    fn is_in_distinct_and_negation() {
        let is_null = Filter {
            column: "c".into(),
            kind: Kind::Int,
            op: Op::Is,
            negate: false,
            operand: Operand::Keyword("null".into()),
        };
        assert_eq!(is_null.eval(None), Some(true));
        assert_eq!(is_null.eval(Some("1")), Some(false));
        let is_not_null = Filter {
            negate: true,
            ..is_null.clone()
        };
        assert_eq!(is_not_null.eval(None), Some(false));
        let inl = Filter {
            column: "c".into(),
            kind: Kind::Int,
            op: Op::In,
            negate: false,
            operand: Operand::List(vec![Some("1".into()), Some("2".into())]),
        };
        assert_eq!(inl.eval(Some("2")), Some(true));
        assert_eq!(inl.eval(Some("3")), Some(false));
        let not_in = Filter {
            negate: true,
            ..inl
        };
        assert_eq!(not_in.eval(Some("3")), Some(true));
        assert_eq!(not_in.eval(None), None);
        let distinct = Filter {
            column: "c".into(),
            kind: Kind::Int,
            op: Op::IsDistinct,
            negate: false,
            operand: Operand::Value(Some("1".into())),
        };
        assert_eq!(distinct.eval(None), Some(true));
        assert_eq!(distinct.eval(Some("1")), Some(false));
        let neq_negated = Filter {
            negate: true,
            ..filt(Kind::Int, Op::Neq, "1")
        };
        assert_eq!(neq_negated.eval(Some("1")), Some(true));
    }

    /// A keyed `in` list answers as the list compared value by value, NULLs and negation
    /// included, and costs one lookup per row: 1,000 values took 1,000 comparisons a row.
    #[test]
    fn keyed_in_lists_answer_as_compared_lists() {
        for kind in [
            Kind::Int,
            Kind::Numeric,
            Kind::Text,
            Kind::Bool,
            Kind::BpChar,
        ] {
            let items: Vec<Option<String>> = if kind == Kind::Bool {
                vec![Some("true".into())]
            } else {
                (0..1000).map(|i| Some(format!("{}", i * 2))).collect()
            };
            for with_null in [false, true] {
                let mut items = items.clone();
                if with_null {
                    items.push(None);
                }
                let keyed = Operand::in_list(&kind, items.clone());
                assert!(matches!(keyed, Operand::Keys { .. }), "{kind:?}");
                for negate in [false, true] {
                    let make = |operand| Filter {
                        column: "c".into(),
                        kind: kind.clone(),
                        op: Op::In,
                        negate,
                        operand,
                    };
                    let (list, keys) = (make(Operand::List(items.clone())), make(keyed.clone()));
                    for v in [
                        None,
                        Some("0"),
                        Some("1998"),
                        Some("0001998"),
                        Some("1999"),
                        Some("2000"),
                        Some("t"),
                        Some("x"),
                        Some("1998.0"),
                    ] {
                        assert_eq!(
                            list.eval(v),
                            keys.eval(v),
                            "{kind:?} {v:?} null={with_null} not={negate}"
                        );
                    }
                }
            }
        }
        assert!(matches!(
            Operand::in_list(&Kind::Float, vec![Some("1".into())]),
            Operand::List(_)
        ));
        let keyed = Filter {
            column: "c".into(),
            kind: Kind::Int,
            op: Op::In,
            negate: false,
            operand: Operand::in_list(&Kind::Int, (0..1000).map(|i| Some(i.to_string())).collect()),
        };
        let listed = Filter {
            operand: Operand::List((0..1000).map(|i| Some(i.to_string())).collect()),
            ..keyed.clone()
        };
        let time = |f: &Filter| {
            let started = std::time::Instant::now();
            for _ in 0..200 {
                assert_eq!(f.eval(Some("5000")), Some(false));
            }
            started.elapsed() / 200
        };
        let (keyed_took, listed_took) = (time(&keyed), time(&listed));
        println!("1,000-value in, a miss: {listed_took:?} compared, {keyed_took:?} keyed");
        assert!(
            keyed_took < listed_took,
            "{keyed_took:?} vs {listed_took:?}"
        );
    }
}
