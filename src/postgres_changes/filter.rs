//! `filter` strings of postgres_changes bindings: parsing (with the original's error strings)
//! and evaluation against a row with the column type's semantics.
//!
//! Syntax: `column=op.value`, optionally `column=not.op.value`; several joined by top-level
//! commas are ANDed. Operators: eq, neq, lt, lte, gt, gte, in, like, ilike, is, match, imatch,
//! isdistinct. `in` takes `(a,b,c)` (a PostgreSQL array literal inside), at most 100 values.

use std::cmp::Ordering;

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

fn inspect_list(items: &[&str]) -> String {
    let parts: Vec<String> = items.iter().map(|s| inspect(s)).collect();
    format!("[{}]", parts.join(", "))
}

/// Parses a filter string. The error is the reason without the ``Error parsing `filter` params: ``
/// prefix.
pub fn parse(filter: &str) -> Result<Vec<ParsedFilter>, String> {
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

fn parse_segment(segment: &str) -> Result<ParsedFilter, String> {
    let trimmed = segment.trim();
    if trimmed.is_empty() {
        return Err("filter must not contain empty segments (check for extra commas)".into());
    }
    let Some((column, rest)) = trimmed.split_once('=') else {
        return Err(inspect_list(&[trimmed]));
    };
    let (negate, op_value) = match rest.strip_prefix("not.") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let Some((op_str, value)) = op_value.split_once('.') else {
        return Err(inspect_list(&[op_value]));
    };
    let Some(op) = Op::parse(op_str) else {
        return Err(inspect_list(&[op_str, value]));
    };
    let value = if op == Op::In {
        let inner = value
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| "`in` filter value must be wrapped by parentheses".to_owned())?;
        if inner.len() > MAX_IN_LIST_BYTES {
            return Err(format!(
                "`in` filter value too long. Maximum {MAX_IN_LIST_BYTES} bytes"
            ));
        }
        format!("{{{inner}}}")
    } else {
        unquote(value)
    };
    if matches!(op, Op::Like | Op::ILike | Op::Match | Op::IMatch)
        && value.chars().nth(MAX_PATTERN_CHARS).is_some()
    {
        return Err(format!(
            "pattern of `{}` filter too long. Maximum {MAX_PATTERN_CHARS} characters",
            op.as_str()
        ));
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

/// How values of a column compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Int,
    Numeric,
    Float,
    Bool,
    Text,
    /// `character(n)`: trailing spaces do not count.
    BpChar,
    /// citext: case-insensitive.
    CiText,
    Timestamp,
    Date,
    Time,
    /// Enum labels in their sort order.
    Enum(Vec<String>),
    /// Canonical text equality only (uuid, jsonb, inet, ...): ordering is not offered.
    Canonical,
}

impl Kind {
    /// Whether <, <=, >, >= are defined for this kind here.
    pub fn orderable(&self) -> bool {
        !matches!(self, Kind::Canonical | Kind::Bool)
    }

    /// A key for the equality index: two values are equal under this kind exactly when their
    /// keys are equal. `None` when no such key is cheap (floats).
    pub fn index_key(&self, text: &str) -> Option<String> {
        match self {
            Kind::Int => text.trim().parse::<i64>().ok().map(|v| v.to_string()),
            Kind::Numeric => normalize_decimal(text),
            Kind::Float => None,
            Kind::BpChar => Some(text.trim_end_matches(' ').to_owned()),
            Kind::CiText => Some(text.to_lowercase()),
            _ => Some(text.to_owned()),
        }
    }

    pub fn compare(&self, a: &str, b: &str) -> Option<Ordering> {
        match self {
            Kind::Int => Some(
                a.trim()
                    .parse::<i64>()
                    .ok()?
                    .cmp(&b.trim().parse::<i64>().ok()?),
            ),
            Kind::Numeric => compare_decimal(a, b),
            Kind::Float => compare_float(a, b),
            Kind::Bool => Some(parse_bool(a)?.cmp(&parse_bool(b)?)),
            Kind::Text | Kind::Canonical => Some(a.cmp(b)),
            Kind::BpChar => Some(a.trim_end_matches(' ').cmp(b.trim_end_matches(' '))),
            Kind::CiText => Some(a.to_lowercase().cmp(&b.to_lowercase())),
            Kind::Timestamp => Some(parse_timestamp(a)?.cmp(&parse_timestamp(b)?)),
            Kind::Date => Some(parse_date_key(a)?.cmp(&parse_date_key(b)?)),
            Kind::Time => Some(parse_time(a)?.cmp(&parse_time(b)?)),
            Kind::Enum(labels) => {
                let pa = labels.iter().position(|l| l == a)?;
                let pb = labels.iter().position(|l| l == b)?;
                Some(pa.cmp(&pb))
            }
        }
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "t" | "true" => Some(true),
        "f" | "false" => Some(false),
        _ => None,
    }
}

fn compare_float(a: &str, b: &str) -> Option<Ordering> {
    let parse = |s: &str| -> Option<f64> {
        match s {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => s.parse().ok(),
        }
    };
    let (x, y) = (parse(a)?, parse(b)?);
    // PostgreSQL: NaN equals NaN and sorts above everything.
    Some(match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => x.partial_cmp(&y)?,
    })
}

/// A decimal's canonical text (`-1.50` → `-1.5`, `0.0` → `0`), or the special values.
fn normalize_decimal(s: &str) -> Option<String> {
    let s = s.trim();
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Some(s.to_owned());
    }
    let (neg, digits) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let body = match (int.is_empty(), frac.is_empty()) {
        (true, true) => return Some("0".into()),
        (false, true) => int.to_owned(),
        (true, false) => format!("0.{frac}"),
        (false, false) => format!("{int}.{frac}"),
    };
    Some(if neg { format!("-{body}") } else { body })
}

fn compare_decimal(a: &str, b: &str) -> Option<Ordering> {
    let (a, b) = (normalize_decimal(a)?, normalize_decimal(b)?);
    let rank = |s: &str| match s {
        "NaN" => 3,
        "Infinity" => 2,
        "-Infinity" => 0,
        _ => 1,
    };
    let (ra, rb) = (rank(&a), rank(&b));
    if ra != 1 || rb != 1 {
        return Some(ra.cmp(&rb));
    }
    let (na, ma) = (a.starts_with('-'), a.trim_start_matches('-'));
    let (nb, mb) = (b.starts_with('-'), b.trim_start_matches('-'));
    let mag = |x: &str, y: &str| {
        let (xi, xf) = x.split_once('.').unwrap_or((x, ""));
        let (yi, yf) = y.split_once('.').unwrap_or((y, ""));
        xi.len()
            .cmp(&yi.len())
            .then_with(|| xi.cmp(yi))
            .then_with(|| xf.cmp(yf))
    };
    Some(match (na, nb) {
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
        (false, false) => mag(ma, mb),
        (true, true) => mag(mb, ma),
    })
}

/// A field of at most `max_digits` ASCII digits (so that date arithmetic cannot overflow).
fn field(s: &str, max_digits: usize) -> Option<i64> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Days since 1970-01-01 for a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `infinity` / `-infinity` as the extremes (`Err`); otherwise the text without a trailing
/// ` BC`, and whether it had one.
fn era(s: &str) -> Result<(&str, bool), i128> {
    match s {
        "infinity" => Err(i128::MAX),
        "-infinity" => Err(i128::MIN),
        _ => Ok(match s.strip_suffix(" BC") {
            Some(b) => (b, true),
            None => (s, false),
        }),
    }
}

/// `YYYY-MM-DD[ BC]` → days, `infinity` at the ends.
fn parse_date_key(s: &str) -> Option<i128> {
    let (body, bc) = match era(s) {
        Ok(split) => split,
        Err(extreme) => return Some(extreme),
    };
    let mut parts = body.splitn(3, '-');
    let y = field(parts.next()?, 7)?;
    let m = field(parts.next()?, 2)? as u32;
    let d = field(parts.next()?.get(..2)?, 2)? as u32;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if bc { 1 - y } else { y };
    Some(days_from_civil(y, m, d) as i128)
}

/// `HH:MM:SS[.ffffff]` → microseconds.
fn parse_time(s: &str) -> Option<i128> {
    let (hms, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut p = hms.split(':');
    let h = field(p.next()?, 3)? as i128;
    let m = field(p.next()?, 2)? as i128;
    let sec = field(p.next()?, 2)? as i128;
    let frac_digits: String = frac.chars().take_while(|c| c.is_ascii_digit()).collect();
    let micros: i128 = if frac_digits.is_empty() {
        0
    } else {
        format!("{:0<6}", &frac_digits[..frac_digits.len().min(6)])
            .parse()
            .ok()?
    };
    Some(((h * 60 + m) * 60 + sec) * 1_000_000 + micros)
}

/// `YYYY-MM-DD HH:MM:SS[.f][+HH[:MM[:SS]]][ BC]` → microseconds since the epoch, in UTC.
fn parse_timestamp(s: &str) -> Option<i128> {
    let (body, bc) = match era(s) {
        Ok(split) => split,
        Err(extreme) => return Some(extreme),
    };
    let (date, rest) = body.split_once(' ').or_else(|| body.split_once('T'))?;
    // " BC" was taken off the whole string; apply it to the date part.
    let days = if bc {
        parse_date_key(&format!("{date} BC"))?
    } else {
        parse_date_key(date)?
    };
    let tz_at = rest.find(['+', '-']);
    let (time, offset) = match tz_at {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    let mut micros = days
        .checked_mul(86_400_000_000)?
        .checked_add(parse_time(time)?)?;
    if let Some(off) = offset {
        let sign: i128 = if off.starts_with('-') { -1 } else { 1 };
        let mut p = off[1..].split(':');
        let h = field(p.next()?, 2)? as i128;
        let m = p.next().map_or(Some(0), |x| field(x, 2))? as i128;
        let sec = p.next().map_or(Some(0), |x| field(x, 2))? as i128;
        micros = micros.checked_sub(sign * ((h * 60 + m) * 60 + sec) * 1_000_000)?;
    }
    Some(micros)
}

/// Longest LIKE/ILIKE/match/imatch pattern a filter may carry, in characters. The matchers
/// below run in time linear in the value whatever the pattern, but a bound keeps the compiled
/// form small and the error specific.
pub const MAX_PATTERN_CHARS: usize = 1024;
/// Longest `in` list, in bytes of the text between the parentheses (besides the original's
/// limit of 100 values).
pub const MAX_IN_LIST_BYTES: usize = 8192;

/// A compiled SQL LIKE pattern (`%` any run, `_` one character, `\` escapes the next one).
///
/// The pattern is split on `%` into fixed-length segments. A value matches when the first
/// segment matches its start, the last its end, and every segment in between occurs, in order,
/// without overlap; taking each middle segment at its leftmost occurrence is optimal, so no
/// backtracking is needed. Literal segments are found with `memchr::memmem` (linear), segments
/// with `_` with a bit-parallel shift-and scan (linear in the value times the segment length
/// in 64-character words). A match therefore costs O(value × (1 + pattern / 64)) at worst,
/// where the old backtracking matcher cost O(value × pattern): a 10,000-character pattern
/// against a 100,000-character value took 2 s per match.
#[derive(Clone, Debug)]
pub struct LikePattern {
    case_insensitive: bool,
    /// Before the first `%` (the whole pattern when there is none).
    head: Segment,
    /// Between `%`s, non-empty ones only.
    middle: Vec<Segment>,
    /// After the last `%`; `None` when the pattern has no `%` (then `head` must match the
    /// whole value).
    tail: Option<Segment>,
}

/// A run of the pattern without `%`: characters, `None` for `_`.
#[derive(Clone, Debug)]
struct Segment {
    chars: Vec<Option<char>>,
    /// The text of a segment without `_`, for `memmem`.
    literal: Option<String>,
}

impl Segment {
    fn new(chars: Vec<Option<char>>) -> Self {
        let literal = chars.iter().copied().collect::<Option<String>>();
        Segment { chars, literal }
    }

    /// Whether the segment matches `text` at its start; the byte length matched.
    fn match_prefix(&self, text: &str) -> Option<usize> {
        let mut it = text.char_indices();
        for want in &self.chars {
            let (_, c) = it.next()?;
            if want.is_some_and(|w| w != c) {
                return None;
            }
        }
        Some(it.next().map_or(text.len(), |(i, _)| i))
    }

    /// Whether the segment matches the end of `text`; the byte offset where the match starts.
    fn match_suffix(&self, text: &str) -> Option<usize> {
        let mut it = text.char_indices().rev();
        let mut start = text.len();
        for want in self.chars.iter().rev() {
            let (i, c) = it.next()?;
            if want.is_some_and(|w| w != c) {
                return None;
            }
            start = i;
        }
        Some(start)
    }

    /// The end (byte offset) of the leftmost occurrence in `text`.
    fn find_end(&self, text: &str) -> Option<usize> {
        if let Some(lit) = &self.literal {
            return memchr::memmem::find(text.as_bytes(), lit.as_bytes()).map(|i| i + lit.len());
        }
        // Shift-and: bit j of `state` says the segment's first j+1 characters end here.
        let len = self.chars.len();
        let words = len.div_ceil(64);
        let any: Vec<u64> = mask_for(&self.chars, None, words);
        let mut masks: Vec<(char, Vec<u64>)> = Vec::new();
        for c in self.chars.iter().flatten() {
            if !masks.iter().any(|(m, _)| m == c) {
                masks.push((*c, mask_for(&self.chars, Some(*c), words)));
            }
        }
        masks.sort_by_key(|(c, _)| *c);
        let last_word = (len - 1) / 64;
        let last_bit = 1u64 << ((len - 1) % 64);
        let mut state = vec![0u64; words];
        for (i, c) in text.char_indices() {
            let mask = match masks.binary_search_by_key(&c, |(m, _)| *m) {
                Ok(at) => &masks[at].1,
                Err(_) => &any,
            };
            let mut carry = 1u64;
            for (s, m) in state.iter_mut().zip(mask) {
                let next_carry = *s >> 63;
                *s = ((*s << 1) | carry) & m;
                carry = next_carry;
            }
            if state[last_word] & last_bit != 0 {
                return Some(i + c.len_utf8());
            }
        }
        None
    }
}

/// The positions of `chars` that accept `c` (`None`: a character the segment does not name).
fn mask_for(chars: &[Option<char>], c: Option<char>, words: usize) -> Vec<u64> {
    let mut mask = vec![0u64; words];
    for (j, want) in chars.iter().enumerate() {
        if want.is_none() || *want == c {
            mask[j / 64] |= 1 << (j % 64);
        }
    }
    mask
}

impl LikePattern {
    pub fn new(pattern: &str, case_insensitive: bool) -> Self {
        let pattern = if case_insensitive {
            pattern.to_lowercase()
        } else {
            pattern.to_owned()
        };
        let mut segments: Vec<Vec<Option<char>>> = vec![Vec::new()];
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            let current = segments.last_mut().expect("never empty");
            match c {
                '%' => segments.push(Vec::new()),
                '_' => current.push(None),
                // A trailing backslash stands for itself, as the matcher always did.
                '\\' => current.push(Some(chars.next().unwrap_or('\\'))),
                c => current.push(Some(c)),
            }
        }
        let mut segments = segments.into_iter();
        let head = Segment::new(segments.next().unwrap_or_default());
        let mut rest: Vec<Segment> = segments.map(Segment::new).collect();
        let tail = rest.pop();
        rest.retain(|s| !s.chars.is_empty());
        LikePattern {
            case_insensitive,
            head,
            middle: rest,
            tail,
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        if self.case_insensitive {
            self.matches_folded(&text.to_lowercase())
        } else {
            self.matches_folded(text)
        }
    }

    fn matches_folded(&self, text: &str) -> bool {
        let Some(mut at) = self.head.match_prefix(text) else {
            return false;
        };
        let Some(tail) = &self.tail else {
            return at == text.len();
        };
        let Some(end) = tail.match_suffix(text) else {
            return false;
        };
        if end < at {
            return false;
        }
        for seg in &self.middle {
            match seg.find_end(&text[at..end]) {
                Some(len) => at += len,
                None => return false,
            }
        }
        true
    }
}

/// A `match`/`imatch` pattern, compiled for a linear-time engine (no backtracking): the lazy DFA
/// (the `perf-dfa` feature) runs typical patterns in time linear in the value; without it every
/// search ran on the PikeVM, and `(?:.*a){300}b` took 1.2 s per 100,000-character value.
/// Adversarial patterns that defeat the DFA's cache still cost O(value x pattern): up to ~0.5 s
/// per 100,000 characters was measured (RELIABILITY.md).
pub fn compile_regex(pattern: &str, case_insensitive: bool) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .size_limit(1 << 20)
        .build()
}

/// SQL LIKE: `%` any run, `_` one character, `\` escapes.
pub fn like(text: &str, pattern: &str, case_insensitive: bool) -> bool {
    LikePattern::new(pattern, case_insensitive).matches(text)
}

/// The right-hand side of a compiled filter.
#[derive(Clone, Debug)]
pub enum Operand {
    /// A normalised value (None: SQL NULL, which no comparison matches).
    Value(Option<String>),
    List(Vec<Option<String>>),
    Pattern(LikePattern),
    Regex(regex::Regex),
    /// `is`: null, true, false or unknown.
    Keyword(String),
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
            (Operand::Pattern(p), Op::Like | Op::ILike) => p.matches(value?),
            (Operand::Regex(re), Op::Match | Op::IMatch) => re.is_match(value?),
            _ => return None,
        };
        Some(result != self.negate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(column: &str, op: Op, value: &str, negate: bool) -> ParsedFilter {
        ParsedFilter {
            column: column.into(),
            op,
            value: value.into(),
            negate,
        }
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
        assert_eq!(parse("subject=foo.hey").unwrap_err(), r#"["foo", "hey"]"#);
        assert_eq!(parse("undefined").unwrap_err(), r#"["undefined"]"#);
        assert_eq!(parse("wrong").unwrap_err(), r#"["wrong"]"#);
        assert_eq!(parse("id=eq").unwrap_err(), r#"["eq"]"#);
        assert_eq!(
            parse("id=in.1,2").unwrap_err(),
            "`in` filter value must be wrapped by parentheses"
        );
        assert_eq!(
            parse("id=eq.1,,id=eq.2").unwrap_err(),
            "filter must not contain empty segments (check for extra commas)"
        );
    }

    fn filt(kind: Kind, op: Op, rhs: &str) -> Filter {
        Filter {
            column: "c".into(),
            kind,
            op,
            negate: false,
            operand: Operand::Value(Some(rhs.into())),
        }
    }

    #[test]
    fn typed_comparisons() {
        assert_eq!(filt(Kind::Int, Op::Gt, "9").eval(Some("10")), Some(true));
        assert_eq!(filt(Kind::Text, Op::Gt, "9").eval(Some("10")), Some(false));
        assert_eq!(
            filt(Kind::Numeric, Op::Eq, "1.5").eval(Some("1.50")),
            Some(true)
        );
        assert_eq!(
            filt(Kind::Numeric, Op::Lt, "-1.5").eval(Some("-2")),
            Some(true)
        );
        assert_eq!(
            filt(Kind::Numeric, Op::Gt, "99.9").eval(Some("100")),
            Some(true)
        );
        assert_eq!(
            filt(Kind::Float, Op::Eq, "NaN").eval(Some("NaN")),
            Some(true)
        );
        assert_eq!(filt(Kind::Float, Op::Eq, "0").eval(Some("-0")), Some(true));
        assert_eq!(
            filt(Kind::Timestamp, Op::Eq, "2024-01-01 10:00:00+00")
                .eval(Some("2024-01-01 12:00:00+02")),
            Some(true)
        );
        assert_eq!(
            filt(Kind::Timestamp, Op::Lt, "2024-01-01 10:00:00.5")
                .eval(Some("2024-01-01 10:00:00.25")),
            Some(true)
        );
        assert_eq!(
            filt(Kind::Date, Op::Gt, "2023-12-31").eval(Some("2024-01-01")),
            Some(true)
        );
        assert_eq!(
            filt(Kind::BpChar, Op::Eq, "ab").eval(Some("ab   ")),
            Some(true)
        );
        assert_eq!(filt(Kind::Int, Op::Eq, "1").eval(None), None);
        let e = Kind::Enum(vec!["low".into(), "high".into()]);
        assert_eq!(filt(e, Op::Gt, "low").eval(Some("high")), Some(true));
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

    #[test]
    fn like_patterns() {
        assert!(like("hello world", "hello%", false));
        assert!(like("hello", "h_llo", false));
        assert!(!like("Hello", "hello", false));
        assert!(like("Hello", "hello", true));
        assert!(like("100%", "100\\%", false));
        assert!(!like("1000", "100\\%", false));
        assert!(like("abc", "%%c", false));
        assert!(like("", "%", false));
        assert!(!like("abc", "a%d", false));
    }

    #[test]
    fn like_segments_with_wildcards_and_unicode() {
        assert!(like("xxabcyy", "%a_c%", false));
        assert!(!like("xxabyy", "%a_c%", false));
        assert!(like("héllo wörld", "h_llo%w_rld", false));
        assert!(like("ÀB", "àb", true));
        assert!(!like("ab", "ab%b", false), "head and tail must not overlap");
        assert!(like("abb", "ab%b", false));
        assert!(like("a%b", "a\\%b", false));
        assert!(!like("axb", "a\\%b", false));
        assert!(
            like("ends with \\", "%\\", false),
            "a trailing backslash is literal"
        );
        assert!(like("abc", "___", false));
        assert!(!like("abcd", "___", false));
        // A segment over 64 characters spans several shift-and words.
        let long: String = "ab".repeat(50);
        let pattern = format!("%{}_%", "a_".repeat(50));
        assert!(like(&format!("zz{long}q"), &pattern, false));
        assert!(!like(&format!("zz{long}"), &pattern, false));
    }

    #[test]
    fn like_agrees_with_the_reference_on_small_inputs() {
        let alphabet = ['a', 'b', '%', '_', '\\'];
        let texts = [
            "", "a", "b", "ab", "ba", "aab", "abab", "bbaab", "a%b", "a_b", "\\",
        ];
        // Every pattern of up to 5 tokens over the alphabet.
        let mut patterns = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for p in &patterns {
                for c in alphabet {
                    next.push(format!("{p}{c}"));
                }
            }
            patterns.extend(next.iter().cloned());
            patterns.dedup();
            patterns = {
                let mut all: Vec<String> = patterns.clone();
                all.sort();
                all.dedup();
                all
            };
        }
        for p in &patterns {
            for t in texts {
                assert_eq!(
                    like(t, p, false),
                    crate::fuzzing::like_reference(t, p, false),
                    "{t:?} LIKE {p:?}"
                );
            }
        }
    }

    /// The cost that stalled the dispatcher: a pattern at the bound, built to make a
    /// backtracking matcher retry at every position, against a 100,000-character value.
    #[test]
    fn like_at_the_pattern_bound_runs_in_linear_time() {
        let value = "a".repeat(100_000);
        let hostile = [
            format!("%{}b", "a".repeat(MAX_PATTERN_CHARS - 2)),
            format!("%{}b%", "a_".repeat((MAX_PATTERN_CHARS - 3) / 2)),
            format!("{}b", "%a".repeat((MAX_PATTERN_CHARS - 1) / 2)),
            "%_".repeat(MAX_PATTERN_CHARS / 2),
        ];
        for p in &hostile {
            assert!(p.chars().count() <= MAX_PATTERN_CHARS);
            for ci in [false, true] {
                let compiled = LikePattern::new(p, ci);
                let started = std::time::Instant::now();
                let _ = compiled.matches(&value);
                let took = started.elapsed();
                // Unoptimised builds on a shared machine: generous (a few ms measured), and
                // still under the old matcher's cost for these inputs (0.3 s in release).
                assert!(
                    took < std::time::Duration::from_millis(1000),
                    "{took:?} for a {}-character pattern",
                    p.len()
                );
            }
        }
    }

    #[test]
    fn a_regex_that_starves_an_nfa_simulation_runs_on_the_dfa() {
        let re = compile_regex("(?:.*a){300}b", false).unwrap();
        let value = "a".repeat(100_000);
        let started = std::time::Instant::now();
        assert!(!re.is_match(&value));
        let took = started.elapsed();
        // 3 ms measured (release); 1.2 s (release) without the lazy DFA.
        assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    }

    #[test]
    fn pattern_and_in_list_bounds() {
        let at = "a".repeat(MAX_PATTERN_CHARS);
        assert!(parse(&format!("c=like.{at}")).is_ok());
        assert_eq!(
            parse(&format!("c=ilike.{at}b")).unwrap_err(),
            "pattern of `ilike` filter too long. Maximum 1024 characters"
        );
        assert_eq!(
            parse(&format!("c=not.match.{at}b")).unwrap_err(),
            "pattern of `match` filter too long. Maximum 1024 characters"
        );
        // Characters, not bytes.
        assert!(parse(&format!("c=like.{}", "é".repeat(MAX_PATTERN_CHARS))).is_ok());
        let list = "x".repeat(MAX_IN_LIST_BYTES);
        assert!(parse(&format!("c=in.({list})")).is_ok());
        assert_eq!(
            parse(&format!("c=in.({list}y)")).unwrap_err(),
            "`in` filter value too long. Maximum 8192 bytes"
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
