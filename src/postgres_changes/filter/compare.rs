//! Typed comparison for filters: how two values of a column compare under its type (integers,
//! numerics, floats with PostgreSQL's NaN order, booleans, text, `character(n)`, citext,
//! timestamps with offsets and eras, dates, times, enum labels in their sort order), and the
//! equality-index key that agrees with it. Values arrive as PostgreSQL's text output.

use std::cmp::Ordering;

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
            // `true` from the join's cast, `t` from the stream.
            Kind::Bool => parse_bool(text).map(|b| b.to_string()),
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

pub(super) fn parse_bool(s: &str) -> Option<bool> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn equality_keys_agree_with_compare() {
        let cases: [(Kind, &str, &str); 6] = [
            (Kind::Bool, "t", "true"),
            (Kind::Bool, "f", "false"),
            (Kind::Int, "01", "1"),
            (Kind::Numeric, "1.50", "1.5"),
            (Kind::BpChar, "ab  ", "ab"),
            (Kind::CiText, "AB", "ab"),
        ];
        for (kind, a, b) in cases {
            assert_eq!(
                kind.compare(a, b),
                Some(Ordering::Equal),
                "{kind:?} {a} {b}"
            );
            assert_eq!(kind.index_key(a), kind.index_key(b), "{kind:?} {a} {b}");
        }
        assert_ne!(Kind::Bool.index_key("t"), Kind::Bool.index_key("false"));
    }

    use super::super::eval::tests::filt;
    use super::super::Op;
    use super::*;

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
}
