//! PostgREST's logic trees in a `filter` string (walcast only; the original takes ANDed filters
//! only): a segment `or=(a.eq.1,b.gt.3)`, `and=(...)`, `not.or=(...)` or `not.and=(...)`, whose
//! items are `column.[not.]op.value` filters or nested `or(...)`, `and(...)`, `not.or(...)`,
//! `not.and(...)`. A leaf takes the same operators and values as a top-level filter (`in.(a,b)`,
//! quoted values, `"col.name"` for a column with a dot) and gets the same errors. Evaluation is
//! SQL's three-valued logic: NULL (or a value not in the row image) is unknown, and a change is
//! delivered only when its whole condition is true.

use super::{parse_op_value, split_top_level, FilterError, ParsedFilter};

/// Deepest nesting of `and`/`or` (the top-level `or=(...)` is level 1).
pub const MAX_DEPTH: usize = 16;

/// A condition: one filter, or `and`/`or` of conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cond<F> {
    Leaf(F),
    Tree {
        /// `or` (any) rather than `and` (all).
        any: bool,
        /// `not.or(...)` / `not.and(...)`.
        negate: bool,
        of: Vec<Cond<F>>,
    },
}

impl<F> Cond<F> {
    /// The condition's value, given each leaf's (`None`: SQL NULL, unknown).
    pub fn eval(&self, leaf: &mut impl FnMut(&F) -> Option<bool>) -> Option<bool> {
        let (any, negate, of) = match self {
            Cond::Leaf(f) => return leaf(f),
            Cond::Tree { any, negate, of } => (*any, *negate, of),
        };
        // OR: true if any is true, else unknown if any is; AND the other way round.
        let mut unknown = false;
        let mut decided = false;
        for c in of {
            match c.eval(leaf) {
                Some(v) if v == any => {
                    decided = true;
                    break;
                }
                Some(_) => {}
                None => unknown = true,
            }
        }
        let value = if decided {
            Some(any)
        } else if unknown {
            None
        } else {
            Some(!any)
        };
        value.map(|v| v != negate)
    }

    /// The filters, depth first.
    pub fn leaves(&self) -> Vec<&F> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a F>) {
        match self {
            Cond::Leaf(f) => out.push(f),
            Cond::Tree { of, .. } => of.iter().for_each(|c| c.collect(out)),
        }
    }

    /// The same tree with each filter replaced, depth first.
    pub fn try_map<G, E>(&self, f: &mut impl FnMut(&F) -> Result<G, E>) -> Result<Cond<G>, E> {
        Ok(match self {
            Cond::Leaf(x) => Cond::Leaf(f(x)?),
            Cond::Tree { any, negate, of } => Cond::Tree {
                any: *any,
                negate: *negate,
                of: of.iter().map(|c| c.try_map(f)).collect::<Result<_, _>>()?,
            },
        })
    }
}

impl Cond<ParsedFilter> {
    /// The log form: a filter as the original logs it, a tree as `or({...}, {...})`.
    pub fn to_log(&self) -> String {
        match self {
            Cond::Leaf(f) => f.to_log(),
            Cond::Tree { any, negate, of } => {
                let items: Vec<String> = of.iter().map(Cond::to_log).collect();
                format!(
                    "{}{}({})",
                    if *negate { "not." } else { "" },
                    if *any { "or" } else { "and" },
                    items.join(", ")
                )
            }
        }
    }
}

/// `or`, `and`, `not.or`, `not.and` → (any, negate).
fn logic_key(key: &str) -> Option<(bool, bool)> {
    let (negate, key) = match key.strip_prefix("not.") {
        Some(k) => (true, k),
        None => (false, key),
    };
    match key {
        "or" => Some((true, negate)),
        "and" => Some((false, negate)),
        _ => None,
    }
}

/// A top-level segment `key=value` that is a logic tree (`or=(...)`); `None` when it is not one
/// (a column named `or` keeps working: `or=eq.5`).
pub(super) fn parse_segment(
    key: &str,
    value: &str,
) -> Result<Option<Cond<ParsedFilter>>, FilterError> {
    let Some((any, negate)) = logic_key(key) else {
        return Ok(None);
    };
    let Some(inner) = value.strip_prefix('(').and_then(|v| v.strip_suffix(')')) else {
        return Ok(None);
    };
    parse_tree(any, negate, inner, 1).map(Some)
}

fn parse_tree(
    any: bool,
    negate: bool,
    inner: &str,
    depth: usize,
) -> Result<Cond<ParsedFilter>, FilterError> {
    if depth > MAX_DEPTH {
        return Err(FilterError::TooDeep);
    }
    let of = split_top_level(inner)
        .iter()
        .map(|item| parse_item(item, depth))
        .collect::<Result<_, _>>()?;
    Ok(Cond::Tree { any, negate, of })
}

fn parse_item(item: &str, depth: usize) -> Result<Cond<ParsedFilter>, FilterError> {
    let item = item.trim();
    if item.is_empty() {
        return Err(FilterError::EmptySegment);
    }
    if let Some(open) = item.find('(') {
        if let Some((any, negate)) = logic_key(&item[..open]) {
            let Some(inner) = item[open + 1..].strip_suffix(')') else {
                return Err(FilterError::Unparsed(vec![item.to_owned()]));
            };
            return parse_tree(any, negate, inner, depth + 1);
        }
    }
    // `column.[not.]op.value`, the column quoted when it has a dot.
    let (column, rest) = match item.strip_prefix('"') {
        Some(quoted) => quoted
            .split_once('"')
            .and_then(|(c, r)| Some((c, r.strip_prefix('.')?))),
        None => item.split_once('.'),
    }
    .ok_or_else(|| FilterError::Unparsed(vec![item.to_owned()]))?;
    parse_op_value(column, rest).map(Cond::Leaf)
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Op};
    use super::*;

    fn leaf(column: &str, op: Op, value: &str, negate: bool) -> Cond<ParsedFilter> {
        Cond::Leaf(ParsedFilter {
            column: column.into(),
            op,
            value: value.into(),
            negate,
        })
    }

    #[test]
    fn parses_postgrest_or_and_nesting() {
        assert_eq!(
            parse("or=(status.eq.open,priority.gt.3)").unwrap(),
            vec![Cond::Tree {
                any: true,
                negate: false,
                of: vec![
                    leaf("status", Op::Eq, "open", false),
                    leaf("priority", Op::Gt, "3", false)
                ],
            }]
        );
        assert_eq!(
            parse(r#"team=eq.7,not.or=(a.not.in.(1,2),and(b.eq."x,y",not.or(c.is.null,"d.e".like.f%)))"#)
                .unwrap(),
            vec![
                leaf("team", Op::Eq, "7", false),
                Cond::Tree {
                    any: true,
                    negate: true,
                    of: vec![
                        leaf("a", Op::In, "{1,2}", true),
                        Cond::Tree {
                            any: false,
                            negate: false,
                            of: vec![
                                leaf("b", Op::Eq, "x,y", false),
                                Cond::Tree {
                                    any: true,
                                    negate: true,
                                    of: vec![
                                        leaf("c", Op::Is, "null", false),
                                        leaf("d.e", Op::Like, "f%", false)
                                    ],
                                },
                            ],
                        },
                    ],
                },
            ]
        );
        // A column named `or` is still a column.
        assert_eq!(
            parse("or=eq.5").unwrap(),
            vec![leaf("or", Op::Eq, "5", false)]
        );
        assert_eq!(
            parse("and=(x.eq.1)").unwrap()[0].to_log(),
            r#"and({"x", "eq", "1", false})"#
        );
    }

    #[test]
    fn bad_trees_get_the_filter_errors() {
        let err = |s: &str| parse(s).unwrap_err().to_string();
        assert_eq!(err("or=(status.foo.open)"), r#"["foo", "open"]"#);
        assert_eq!(err("or=(status)"), r#"["status"]"#);
        assert_eq!(err("or=(a.eq)"), r#"["eq"]"#);
        assert_eq!(
            err("or=(a.in.1)"),
            "`in` filter value must be wrapped by parentheses"
        );
        assert_eq!(
            err("or=(a.eq.1,,b.eq.2)"),
            "filter must not contain empty segments (check for extra commas)"
        );
        assert_eq!(
            err("or=()"),
            "filter must not contain empty segments (check for extra commas)"
        );
        assert_eq!(err("or=(and(a.eq.1)"), r#"["and(a.eq.1"]"#);
        let deep = |levels: usize| {
            format!(
                "or=({}a.eq.1{})",
                "or(".repeat(levels - 1),
                ")".repeat(levels - 1)
            )
        };
        assert!(parse(&deep(MAX_DEPTH)).is_ok());
        assert_eq!(
            parse(&deep(MAX_DEPTH + 1)).unwrap_err().to_string(),
            "`and`/`or` nested too deeply. Maximum 16 levels"
        );
    }

    #[test]
    fn three_valued_logic() {
        let t = |any, negate, of: Vec<Option<bool>>| {
            let tree = Cond::Tree {
                any,
                negate,
                of: of.into_iter().map(Cond::Leaf).collect(),
            };
            tree.eval(&mut |v: &Option<bool>| *v)
        };
        let (y, n, u) = (Some(true), Some(false), None);
        assert_eq!(t(true, false, vec![n, y]), y);
        assert_eq!(t(true, false, vec![n, u]), u);
        assert_eq!(t(true, false, vec![u, y]), y);
        assert_eq!(t(true, false, vec![n, n]), n);
        assert_eq!(t(false, false, vec![y, u]), u);
        assert_eq!(t(false, false, vec![u, n]), n);
        assert_eq!(t(false, false, vec![y, y]), y);
        assert_eq!(t(true, true, vec![n, n]), y);
        assert_eq!(t(true, true, vec![n, u]), u);
        assert_eq!(t(false, true, vec![y, n]), y);
    }
}
