//! Column values, as pgoutput sends them (PostgreSQL's text output), to JSON exactly as
//! `to_jsonb(value)` renders them: numbers as numbers, NaN/Infinity as strings, json/jsonb
//! nested, arrays as arrays, `timestamp`/`timestamptz` in ISO 8601 with `T`, bytea as hex
//! without `\x`, everything else as its text. The replication connection runs with `DateStyle
//! ISO`, `TimeZone UTC`, `IntervalStyle postgres`, `bytea_output hex` and `extra_float_digits 1`
//! so the text forms are the ones these conversions expect.

use std::fmt::Write as _;

/// How one type's text output becomes JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conv {
    Bool,
    /// int2, int4, int8: the text is a JSON number.
    Integer,
    /// numeric, float4, float8: a JSON number, except NaN and infinities, which are strings.
    Number,
    Json,
    Jsonb,
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
    /// Anything else: the text as a JSON string.
    Text,
    /// An array of the element conversion; `delim` is the element delimiter (`,` for all but box).
    Array(Box<Conv>, u8),
}

/// Appends `text` as a JSON string literal.
pub fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends the JSON form of one non-null value.
pub fn push_json(out: &mut String, conv: &Conv, text: &str) {
    match conv {
        Conv::Bool => out.push_str(match text {
            "t" | "true" => "true",
            "f" | "false" => "false",
            _ => "null",
        }),
        Conv::Integer => {
            if is_json_number(text) {
                out.push_str(text)
            } else {
                push_json_string(out, text)
            }
        }
        Conv::Number => {
            if is_json_number(text) {
                out.push_str(text)
            } else {
                // NaN, Infinity, -Infinity: to_jsonb renders them as strings.
                push_json_string(out, text)
            }
        }
        Conv::Json => match serde_json::from_str::<serde_json::Value>(text) {
            // to_jsonb(json) normalises (no whitespace, last duplicate key wins).
            Ok(v) => out.push_str(&v.to_string()),
            Err(_) => push_json_string(out, text),
        },
        Conv::Jsonb => {
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                out.push_str(text)
            } else {
                push_json_string(out, text)
            }
        }
        Conv::Bytea => push_json_string(out, text.strip_prefix("\\x").unwrap_or(text)),
        Conv::Date => push_json_string(out, text),
        Conv::Timestamp => push_json_string(out, &iso_timestamp(text, false)),
        Conv::Timestamptz => push_json_string(out, &iso_timestamp(text, true)),
        Conv::Text => push_json_string(out, text),
        Conv::Array(elem, delim) => match parse_array(text, *delim) {
            Some(arr) => push_array(out, elem, &arr),
            None => push_json_string(out, text),
        },
    }
}

/// The JSON form of one value as a new string.
pub fn to_json(conv: &Conv, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    push_json(&mut out, conv, text);
    out
}

fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'-') {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i == int_start {
        return false;
    }
    // JSON forbids leading zeros ("01"); PostgreSQL never prints them, but be strict.
    if b[int_start] == b'0' && i - int_start > 1 {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let frac = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == frac {
            return false;
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let exp = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp {
            return false;
        }
    }
    i == b.len()
}

/// `2024-01-01 10:00:00.5+00` → `2024-01-01T10:00:00.5+00:00` (to_jsonb's XSD form).
fn iso_timestamp(text: &str, with_zone: bool) -> String {
    if text == "infinity" || text == "-infinity" || text.ends_with(" BC") {
        return text.to_owned();
    }
    let mut s = text.replacen(' ', "T", 1);
    if with_zone {
        // The offset is the trailing [+-]HH[:MM[:SS]]; to_jsonb always prints minutes.
        if let Some(pos) = s.rfind(['+', '-']) {
            if pos > 10 {
                let offset = &s[pos + 1..];
                if offset.len() == 2 && offset.bytes().all(|b| b.is_ascii_digit()) {
                    s.push_str(":00");
                }
            }
        }
    }
    s
}

/// One element of a parsed array literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrayItem {
    Null,
    Value(String),
    Nested(Vec<ArrayItem>),
}

/// Parses PostgreSQL's array text form: `{1,2}`, `{{a,"b c"},{NULL,"d\"e"}}`, with an optional
/// `[lo:hi]=` dimension prefix. `None` when the text is not a well-formed array literal.
pub fn parse_array(text: &str, delim: u8) -> Option<Vec<ArrayItem>> {
    let mut s = text.trim();
    if s.starts_with('[') {
        s = &s[s.find('=')? + 1..];
    }
    let b = s.as_bytes();
    let mut at = 0;
    let out = parse_level(b, &mut at, delim, 0)?;
    if b[at..].iter().all(|c| c.is_ascii_whitespace()) {
        Some(out)
    } else {
        None
    }
}

fn parse_level(b: &[u8], at: &mut usize, delim: u8, depth: usize) -> Option<Vec<ArrayItem>> {
    if depth > 6 || b.get(*at) != Some(&b'{') {
        return None;
    }
    *at += 1;
    let mut items = Vec::new();
    skip_ws(b, at);
    if b.get(*at) == Some(&b'}') {
        *at += 1;
        return Some(items);
    }
    loop {
        skip_ws(b, at);
        match b.get(*at)? {
            b'{' => items.push(ArrayItem::Nested(parse_level(b, at, delim, depth + 1)?)),
            b'"' => {
                *at += 1;
                let mut v = Vec::new();
                loop {
                    match *b.get(*at)? {
                        b'\\' => {
                            v.push(*b.get(*at + 1)?);
                            *at += 2;
                        }
                        b'"' => {
                            *at += 1;
                            break;
                        }
                        c => {
                            v.push(c);
                            *at += 1;
                        }
                    }
                }
                items.push(ArrayItem::Value(String::from_utf8(v).ok()?));
            }
            _ => {
                let start = *at;
                let mut v = Vec::new();
                while let Some(&c) = b.get(*at) {
                    if c == delim || c == b'}' {
                        break;
                    }
                    if c == b'\\' {
                        v.push(*b.get(*at + 1)?);
                        *at += 2;
                        continue;
                    }
                    v.push(c);
                    *at += 1;
                }
                if *at == start {
                    return None;
                }
                let raw = String::from_utf8(v).ok()?;
                let trimmed = raw.trim();
                if trimmed.eq_ignore_ascii_case("NULL") {
                    items.push(ArrayItem::Null);
                } else {
                    items.push(ArrayItem::Value(trimmed.to_owned()));
                }
            }
        }
        skip_ws(b, at);
        match *b.get(*at)? {
            c if c == delim => *at += 1,
            b'}' => {
                *at += 1;
                return Some(items);
            }
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], at: &mut usize) {
    while b.get(*at).is_some_and(|c| c.is_ascii_whitespace()) {
        *at += 1;
    }
}

fn push_array(out: &mut String, elem: &Conv, items: &[ArrayItem]) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            ArrayItem::Null => out.push_str("null"),
            ArrayItem::Value(v) => push_json(out, elem, v),
            ArrayItem::Nested(inner) => push_array(out, elem, inner),
        }
    }
    out.push(']');
}

/// `commit_timestamp` as the original formats it: UTC, milliseconds, `Z`.
pub fn commit_timestamp(micros_since_2000: i64) -> String {
    const EPOCH_2000_DAYS: i64 = 10_957; // days from 1970-01-01 to 2000-01-01
    let micros = micros_since_2000;
    let days = micros.div_euclid(86_400_000_000) + EPOCH_2000_DAYS;
    let in_day = micros.rem_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    let secs = in_day / 1_000_000;
    let millis = (in_day % 1_000_000) / 1_000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars() {
        assert_eq!(to_json(&Conv::Integer, "-42"), "-42");
        assert_eq!(
            to_json(&Conv::Integer, "9223372036854775807"),
            "9223372036854775807"
        );
        assert_eq!(to_json(&Conv::Number, "12.50"), "12.50");
        assert_eq!(to_json(&Conv::Number, "NaN"), "\"NaN\"");
        assert_eq!(to_json(&Conv::Number, "-Infinity"), "\"-Infinity\"");
        assert_eq!(to_json(&Conv::Number, "1e+100"), "1e+100");
        assert_eq!(to_json(&Conv::Bool, "t"), "true");
        assert_eq!(to_json(&Conv::Bytea, "\\x0102ff"), "\"0102ff\"");
        assert_eq!(to_json(&Conv::Text, "a \"q\"\n\\"), r#""a \"q\"\n\\""#);
        assert_eq!(to_json(&Conv::Json, r#"{"a": 1, "a": 2}"#), r#"{"a":2}"#);
        assert_eq!(
            to_json(&Conv::Jsonb, r#"{"a": [1, 2]}"#),
            r#"{"a": [1, 2]}"#
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            to_json(&Conv::Timestamp, "2024-01-01 10:00:00"),
            "\"2024-01-01T10:00:00\""
        );
        assert_eq!(
            to_json(&Conv::Timestamp, "2024-01-01 10:00:00.123"),
            "\"2024-01-01T10:00:00.123\""
        );
        assert_eq!(
            to_json(&Conv::Timestamptz, "2024-01-01 10:00:00+00"),
            "\"2024-01-01T10:00:00+00:00\""
        );
        assert_eq!(
            to_json(&Conv::Timestamptz, "2024-01-01 10:00:00.5-03:30"),
            "\"2024-01-01T10:00:00.5-03:30\""
        );
        assert_eq!(to_json(&Conv::Timestamptz, "infinity"), "\"infinity\"");
        assert_eq!(commit_timestamp(0), "2000-01-01T00:00:00.000Z");
        assert_eq!(
            commit_timestamp(777_123_456_789_012),
            "2024-08-16T11:37:36.789Z"
        );
    }

    #[test]
    fn arrays() {
        let ints = Conv::Array(Box::new(Conv::Integer), b',');
        assert_eq!(to_json(&ints, "{1,2,3}"), "[1,2,3]");
        assert_eq!(to_json(&ints, "{{1,2},{3,NULL}}"), "[[1,2],[3,null]]");
        assert_eq!(to_json(&ints, "{}"), "[]");
        assert_eq!(to_json(&ints, "[0:1]={5,6}"), "[5,6]");
        let texts = Conv::Array(Box::new(Conv::Text), b',');
        assert_eq!(
            to_json(&texts, r#"{a,"b c","d\"e","NULL",NULL}"#),
            r#"["a","b c","d\"e","NULL",null]"#
        );
        let jsons = Conv::Array(Box::new(Conv::Jsonb), b',');
        assert_eq!(
            to_json(&jsons, r#"{"{\"a\": 1}","[2]"}"#),
            r#"[{"a": 1},[2]]"#
        );
        // Malformed literals fall back to a string rather than failing.
        assert_eq!(to_json(&ints, "{1,2"), "\"{1,2\"");
    }
}
