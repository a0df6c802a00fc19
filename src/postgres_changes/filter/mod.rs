//! `filter` strings of postgres_changes bindings: the grammar (parsing `column=op.value` with the
//! original's error strings, [`ParsedFilter`], Elixir's [`inspect`]) and its errors. A compiled
//! [`Filter`] is evaluated in [`eval`]; how values compare by column type lives in [`compare`];
//! LIKE/ILIKE and regular-expression matching in [`pattern`].
//!
//! Syntax: `column=op.value`, optionally `column=not.op.value`; several joined by top-level
//! commas are ANDed. Operators: eq, neq, lt, lte, gt, gte, in, like, ilike, is, match, imatch,
//! isdistinct. `in` takes `(a,b,c)` (a PostgreSQL array literal inside), at most 1,000 values.
//! PostgREST's `or=(...)`/`and=(...)` trees (walcast only) are parsed and evaluated in [`logic`].

pub mod compare;
pub mod eval;
pub mod logic;
pub mod pattern;

pub use compare::Kind;
pub use eval::{Filter, Operand};
pub use logic::Cond;
pub use pattern::{compile_regex, like, LikePattern};

pub const OPS: &[&str] = &[
    "eq",
    "neq",
    "lt",
    "lte",
    "gt",
    "gte",
    "in",
    "like",
    "ilike",
    "is",
    "match",
    "imatch",
    "isdistinct",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    Like,
    ILike,
    Is,
    Match,
    IMatch,
    IsDistinct,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "in" => Op::In,
            "like" => Op::Like,
            "ilike" => Op::ILike,
            "is" => Op::Is,
            "match" => Op::Match,
            "imatch" => Op::IMatch,
            "isdistinct" => Op::IsDistinct,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Neq => "neq",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::In => "in",
            Op::Like => "like",
            Op::ILike => "ilike",
            Op::Is => "is",
            Op::Match => "match",
            Op::IMatch => "imatch",
            Op::IsDistinct => "isdistinct",
        }
    }
}

/// One parsed filter, before it is checked against a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedFilter {
    pub column: String,
    pub op: Op,
    /// For `in`, the PostgreSQL array literal `{a,b}`; otherwise the unquoted value.
    pub value: String,
    pub negate: bool,
}

impl ParsedFilter {
    /// The original's log form: `{"col", "eq", "5", false}`.
    pub fn to_log(&self) -> String {
        format!(
            "{{{}, {}, {}, {}}}",
            inspect(&self.column),
            inspect(self.op.as_str()),
            inspect(&self.value),
            self.negate
        )
    }
}

/// Elixir's `inspect` of a string, which the original's error messages embed.
pub fn inspect(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '#' => out.push('#'),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn inspect_list(items: &[String]) -> String {
    let parts: Vec<String> = items.iter().map(|s| inspect(s)).collect();
    format!("[{}]", parts.join(", "))
}

/// Why a filter string does not parse. Its `Display` is the reason clients see after
/// ``Error parsing `filter` params: `` (the original's text where it has one; ERROR_CODES.md).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// The parts that did not parse, as the original prints them: `["foo", "hey"]`.
    #[error("{}", inspect_list(.0))]
    Unparsed(Vec<String>),
    #[error("filter must not contain empty segments (check for extra commas)")]
    EmptySegment,
    #[error("`in` filter value must be wrapped by parentheses")]
    InNotParenthesized,
    /// walcast only: an `in` list over [`MAX_IN_LIST_BYTES`].
    #[error("`in` filter value too long. Maximum {MAX_IN_LIST_BYTES} bytes")]
    InListTooLong,
    /// walcast only: a like/ilike/match/imatch pattern over [`MAX_PATTERN_CHARS`].
    #[error("pattern of `{}` filter too long. Maximum {MAX_PATTERN_CHARS} characters", .0.as_str())]
    PatternTooLong(Op),
    /// walcast only: `and`/`or` nested deeper than [`logic::MAX_DEPTH`].
    #[error("`and`/`or` nested too deeply. Maximum {} levels", logic::MAX_DEPTH)]
    TooDeep,
}

/// Parses a filter string: its top-level conditions, all of which must hold.
pub fn parse(filter: &str) -> Result<Vec<Cond<ParsedFilter>>, FilterError> {
    let trimmed = filter.trim();
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    split_top_level(trimmed)
        .iter()
        .map(|segment| parse_segment(segment))
        .collect()
}

/// Splits on commas outside parentheses and double quotes (a quote opens only after `.`, `(`
/// or `,`, as in the original).
fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut prev = '\0';
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '\\' => {
                    current.push('\\');
                    if let Some(n) = chars.next() {
                        current.push(n);
                        prev = n;
                    }
                    continue;
                }
                '"' => quoted = false,
                _ => {}
            }
            current.push(c);
            prev = c;
            continue;
        }
        match c {
            '"' if matches!(prev, '.' | '(' | ',') => {
                quoted = true;
                current.push(c);
            }
            '(' => {
                depth += 1;
                current.push(c);
            }
            ')' => {
                depth = depth.saturating_sub(1);
                current.push(c);
            }
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut current));
                prev = '\0';
                continue;
            }
            _ => current.push(c),
        }
        prev = c;
    }
    out.push(current);
    out
}

fn parse_segment(segment: &str) -> Result<Cond<ParsedFilter>, FilterError> {
    let trimmed = segment.trim();
    if trimmed.is_empty() {
        return Err(FilterError::EmptySegment);
    }
    let Some((column, rest)) = trimmed.split_once('=') else {
        return Err(FilterError::Unparsed(vec![trimmed.to_owned()]));
    };
    if let Some(tree) = logic::parse_segment(column, rest)? {
        return Ok(tree);
    }
    parse_op_value(column, rest).map(Cond::Leaf)
}

/// `[not.]op.value` of a filter on `column` (after `=` at the top level, after `.` in a tree).
fn parse_op_value(column: &str, rest: &str) -> Result<ParsedFilter, FilterError> {
    let (negate, op_value) = match rest.strip_prefix("not.") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let Some((op_str, value)) = op_value.split_once('.') else {
        return Err(FilterError::Unparsed(vec![op_value.to_owned()]));
    };
    let Some(op) = Op::parse(op_str) else {
        return Err(FilterError::Unparsed(vec![
            op_str.to_owned(),
            value.to_owned(),
        ]));
    };
    let value = if op == Op::In {
        let inner = value
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or(FilterError::InNotParenthesized)?;
        if inner.len() > MAX_IN_LIST_BYTES {
            return Err(FilterError::InListTooLong);
        }
        format!("{{{inner}}}")
    } else {
        unquote(value)
    };
    if matches!(op, Op::Like | Op::ILike | Op::Match | Op::IMatch)
        && value.chars().nth(MAX_PATTERN_CHARS).is_some()
    {
        return Err(FilterError::PatternTooLong(op));
    }
    Ok(ParsedFilter {
        column: column.to_owned(),
        op,
        value,
        negate,
    })
}

/// `"a \"b\""` → `a "b"`; anything not a complete quoted string is kept as is.
fn unquote(value: &str) -> String {
    let Some(rest) = value.strip_prefix('"') else {
        return value.to_owned();
    };
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => out.push(n),
                None => return value.to_owned(),
            },
            '"' => {
                return if chars.as_str().is_empty() {
                    out
                } else {
                    value.to_owned()
                };
            }
            c => out.push(c),
        }
    }
    value.to_owned()
}

/// Longest LIKE/ILIKE/match/imatch pattern a filter may carry, in characters. The matchers
/// below run in time linear in the value whatever the pattern, but a bound keeps the compiled
/// form small and the error specific.
pub const MAX_PATTERN_CHARS: usize = 1024;
/// Longest `in` list, in bytes of the text between the parentheses (besides the limit of 1,000
/// values): room for 1,000 uuids (37,000 bytes) or quoted 40-character strings.
pub const MAX_IN_LIST_BYTES: usize = 48 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn f(column: &str, op: Op, value: &str, negate: bool) -> Cond<ParsedFilter> {
        Cond::Leaf(ParsedFilter {
            column: column.into(),
            op,
            value: value.into(),
            negate,
        })
    }

    #[test]
    fn parses_like_the_original() {
        assert_eq!(
            parse("subject=eq.hey").unwrap(),
            vec![f("subject", Op::Eq, "hey", false)]
        );
        assert_eq!(
            parse("subject=in.(hidee,ho)").unwrap(),
            vec![f("subject", Op::In, "{hidee,ho}", false)]
        );
        assert_eq!(
            parse("subject=not.like.hey%").unwrap(),
            vec![f("subject", Op::Like, "hey%", true)]
        );
        assert_eq!(
            parse("id=gt.0,id=lt.100").unwrap(),
            vec![f("id", Op::Gt, "0", false), f("id", Op::Lt, "100", false)]
        );
        assert_eq!(parse("   ").unwrap(), vec![]);
        assert_eq!(
            parse(r#"name=eq."a,b""#).unwrap(),
            vec![f("name", Op::Eq, "a,b", false)]
        );
        assert_eq!(
            parse(r#"name=eq."say \"hi\"""#).unwrap(),
            vec![f("name", Op::Eq, "say \"hi\"", false)]
        );
        assert_eq!(parse("id=in.(1,2),x=eq.y").unwrap().len(), 2);
        // A value with `=` and `.` in it stays whole.
        assert_eq!(
            parse("url=eq.a=b.c").unwrap(),
            vec![f("url", Op::Eq, "a=b.c", false)]
        );
    }

    #[test]
    fn parse_errors_match_the_original() {
        assert_eq!(
            parse("subject=foo.hey").unwrap_err().to_string(),
            r#"["foo", "hey"]"#
        );
        assert_eq!(
            parse("undefined").unwrap_err().to_string(),
            r#"["undefined"]"#
        );
        assert_eq!(parse("wrong").unwrap_err().to_string(), r#"["wrong"]"#);
        assert_eq!(parse("id=eq").unwrap_err().to_string(), r#"["eq"]"#);
        assert_eq!(
            parse("id=in.1,2").unwrap_err().to_string(),
            "`in` filter value must be wrapped by parentheses"
        );
        assert_eq!(
            parse("id=eq.1,,id=eq.2").unwrap_err().to_string(),
            "filter must not contain empty segments (check for extra commas)"
        );
    }

    /// The wire strings of ERROR_CODES.md, one per variant.
    #[test]
    fn each_error_displays_its_wire_string() {
        let cases = [
            (
                FilterError::Unparsed(vec!["foo".into(), "he\"y".into()]),
                r#"["foo", "he\"y"]"#,
            ),
            (
                FilterError::EmptySegment,
                "filter must not contain empty segments (check for extra commas)",
            ),
            (
                FilterError::InNotParenthesized,
                "`in` filter value must be wrapped by parentheses",
            ),
            (
                FilterError::InListTooLong,
                "`in` filter value too long. Maximum 49152 bytes",
            ),
            (
                FilterError::PatternTooLong(Op::ILike),
                "pattern of `ilike` filter too long. Maximum 1024 characters",
            ),
        ];
        for (e, wire) in cases {
            assert_eq!(e.to_string(), wire);
        }
    }

    #[test]
    fn pattern_and_in_list_bounds() {
        let at = "a".repeat(MAX_PATTERN_CHARS);
        assert!(parse(&format!("c=like.{at}")).is_ok());
        assert_eq!(
            parse(&format!("c=ilike.{at}b")).unwrap_err().to_string(),
            "pattern of `ilike` filter too long. Maximum 1024 characters"
        );
        assert_eq!(
            parse(&format!("c=not.match.{at}b"))
                .unwrap_err()
                .to_string(),
            "pattern of `match` filter too long. Maximum 1024 characters"
        );
        // Characters, not bytes.
        assert!(parse(&format!("c=like.{}", "é".repeat(MAX_PATTERN_CHARS))).is_ok());
        let list = "x".repeat(MAX_IN_LIST_BYTES);
        assert!(parse(&format!("c=in.({list})")).is_ok());
        assert_eq!(
            parse(&format!("c=in.({list}y)")).unwrap_err().to_string(),
            "`in` filter value too long. Maximum 49152 bytes"
        );
    }

    #[test]
    fn inspect_quotes_like_elixir() {
        assert_eq!(inspect("a\"b"), r#""a\"b""#);
        assert_eq!(
            ParsedFilter {
                column: "notacolumn".into(),
                op: Op::Eq,
                value: "123".into(),
                negate: false
            }
            .to_log(),
            r#"{"notacolumn", "eq", "123", false}"#
        );
    }
}
