//! Entry points shared by the `cargo fuzz` targets in `fuzz/` and by the regression tests that
//! replay their corpora (`fuzz/regressions/<target>/`) on every test run. Each must return
//! normally for any input.

use bytes::Bytes;

use crate::postgres_changes::{binding, filter};
use crate::protocol::Vsn;
use crate::replication::{pgoutput, values};

/// pgoutput decoding, then the text-to-JSON conversions on every value it yields.
pub fn pgoutput(data: &[u8]) {
    let msg = pgoutput::decode(&Bytes::copy_from_slice(data));
    let convs = [
        values::Conv::Integer,
        values::Conv::Number,
        values::Conv::Json,
        values::Conv::Timestamptz,
        values::Conv::Array(Box::new(values::Conv::Jsonb), b','),
    ];
    if let Ok(pgoutput::Message::Insert { new, .. }) = msg {
        for d in new {
            if let pgoutput::Datum::Text(b) = d {
                let text = String::from_utf8_lossy(&b);
                for c in &convs {
                    let _ = values::to_json(c, &text);
                }
            }
        }
    }
    let text = String::from_utf8_lossy(data);
    for c in &convs {
        let _ = values::to_json(c, &text);
    }
}

/// Client frames under both serializers, the client events they carry, and join payload parsing.
pub fn frames(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for m in [
        Vsn::V1.decode_text(&text),
        Vsn::V2.decode_text(&text),
        Vsn::V2.decode_binary(data),
    ]
    .into_iter()
    .flatten()
    {
        let _ = crate::protocol::event::ClientEvent::parse(&m);
    }
    let _ = crate::protocol::join::parse(&text);
}

/// Filter and binding parsing, LIKE matching and typed comparisons.
pub fn filter(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // Logic trees too: evaluation and the log form never panic.
    if let Ok(conds) = filter::parse(&text) {
        for c in &conds {
            let _ = c.eval(&mut |f| (!f.value.is_empty()).then_some(f.negate));
            let _ = c.to_log();
        }
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&text) {
        let _ = binding::parse(&map, 1);
    }
    let mid = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map_or(text.len(), |(i, _)| i);
    let (a, b) = text.split_at(mid);
    // Patterns as a binding can carry them (at most MAX_PATTERN_CHARS), checked against the
    // obviously-right matcher when small enough for it.
    if b.chars().nth(filter::MAX_PATTERN_CHARS).is_none() {
        let small = a.len().saturating_mul(b.len()) <= 200_000;
        for ci in [false, true] {
            let got = filter::LikePattern::new(b, ci).matches(a);
            if small {
                assert_eq!(got, like_reference(a, b, ci), "{a:?} LIKE {b:?} (ci: {ci})");
            }
        }
    }
    for kind in [
        filter::Kind::Int,
        filter::Kind::Numeric,
        filter::Kind::Float,
        filter::Kind::Timestamp,
        filter::Kind::Date,
        filter::Kind::Time,
        filter::Kind::BpChar,
    ] {
        let _ = kind.compare(a, b);
        let _ = kind.index_key(a);
    }
}

/// SQL LIKE by dynamic programming over characters (`%` any run, `_` one character, `\`
/// escapes, a trailing `\` is literal): O(text × pattern), obviously right; the reference
/// the linear-time matcher is checked against.
pub fn like_reference(text: &str, pattern: &str, case_insensitive: bool) -> bool {
    let (t, p): (Vec<char>, String) = if case_insensitive {
        (
            text.to_lowercase().chars().collect(),
            pattern.to_lowercase(),
        )
    } else {
        (text.chars().collect(), pattern.to_owned())
    };
    // Tokens: Some(Some(c)) a literal, Some(None) `_`, None `%`.
    let mut tokens: Vec<Option<Option<char>>> = Vec::new();
    let mut it = p.chars();
    while let Some(c) = it.next() {
        tokens.push(match c {
            '%' => None,
            '_' => Some(None),
            '\\' => Some(Some(it.next().unwrap_or('\\'))),
            c => Some(Some(c)),
        });
    }
    // row[i]: the tokens so far match the first i characters.
    let mut row = vec![false; t.len() + 1];
    row[0] = true;
    for tok in &tokens {
        let mut next = vec![false; t.len() + 1];
        match tok {
            None => {
                let mut any = false;
                for (n, r) in next.iter_mut().zip(&row) {
                    any |= *r;
                    *n = any;
                }
            }
            Some(want) => {
                for i in 1..=t.len() {
                    next[i] = row[i - 1] && want.is_none_or(|w| w == t[i - 1]);
                }
            }
        }
        row = next;
    }
    row[t.len()]
}

#[cfg(test)]
mod tests {
    /// Replays every input kept in `fuzz/regressions/<target>/` (seeds and past crashers).
    fn replay(target: &str, f: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            f(&std::fs::read(&path).unwrap());
            n += 1;
        }
        assert!(n > 0, "no regression inputs in {}", dir.display());
    }

    #[test]
    fn pgoutput_regressions() {
        replay("pgoutput", super::pgoutput);
    }

    #[test]
    fn frames_regressions() {
        replay("frames", super::frames);
    }

    #[test]
    fn filter_regressions() {
        replay("filter", super::filter);
    }
}
