//! Pattern matching for filters: the SQL LIKE/ILIKE matcher (linear in the value whatever the
//! pattern) and `match`/`imatch` regular expressions compiled for a linear-time engine.

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

#[cfg(test)]
mod tests {
    use super::super::MAX_PATTERN_CHARS;
    use super::*;

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
}
