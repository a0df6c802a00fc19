//! The `phx_join` payload. Parsed the way the original does: tolerant (an invalid payload is
//! logged and replaced by best-effort values, never a refused join), booleans also as strings.

use serde_json::{Map, Value};

/// What a channel asked for when joining.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinConfig {
    pub broadcast_self: bool,
    pub broadcast_ack: bool,
    /// Empty means "let the server choose" (a fresh UUID per channel).
    pub presence_key: String,
    pub presence_enabled: bool,
    pub private: bool,
    /// Each binding object exactly as sent (nulls dropped), to be echoed in the join reply.
    pub postgres_changes: Vec<Map<String, Value>>,
    /// `access_token`, or the legacy `user_token`.
    pub access_token: Option<String>,
    /// `broadcast.replay`: `Some(Ok((since_ms, limit)))`, or `Some(Err(()))` when it is there
    /// but not valid (`since` must be an integer; `limit`, when given, too).
    pub replay: Option<Result<(i64, i64), ()>>,
    /// `broadcast.replication_ready`: tell the channel once the change stream (which carries
    /// broadcasts from the database) has passed its join.
    pub replication_ready: bool,
    /// Problems found while parsing; the join goes on with defaults for those fields.
    pub problems: Vec<String>,
}

/// Replayed messages when `limit` is not given, and the most a replay returns.
pub const DEFAULT_REPLAY_LIMIT: i64 = 25;
pub const MAX_REPLAY_LIMIT: i64 = 25;

/// Parses a join payload. Never fails.
pub fn parse(payload: &str) -> JoinConfig {
    let mut cfg = JoinConfig::default();
    let root = match serde_json::from_str::<Value>(payload) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            cfg.problems.push("payload is not an object".into());
            return cfg;
        }
        Err(e) => {
            cfg.problems.push(format!("payload is not JSON: {e}"));
            return cfg;
        }
    };
    cfg.access_token = ["access_token", "user_token"]
        .iter()
        .find_map(|k| root.get(*k).and_then(Value::as_str))
        .map(str::to_owned);

    let config = match root.get("config") {
        None | Some(Value::Null) => return cfg,
        Some(Value::Object(c)) => c,
        Some(_) => {
            cfg.problems.push("config is not an object".into());
            return cfg;
        }
    };
    if let Some(b) = section(config, "broadcast", &mut cfg.problems) {
        cfg.broadcast_self = flag(b, "self", &mut cfg.problems);
        cfg.broadcast_ack = flag(b, "ack", &mut cfg.problems);
        cfg.replication_ready = flag(b, "replication_ready", &mut cfg.problems);
        cfg.replay = match b.get("replay") {
            None | Some(Value::Null) => None,
            Some(Value::Object(r)) => {
                let since = r.get("since").and_then(Value::as_i64);
                let limit = match r.get("limit") {
                    None | Some(Value::Null) => Some(DEFAULT_REPLAY_LIMIT),
                    Some(v) => v.as_i64(),
                };
                match (since, limit) {
                    (Some(s), Some(l)) => Some(Ok((s, l.clamp(1, MAX_REPLAY_LIMIT)))),
                    _ => Some(Err(())),
                }
            }
            Some(_) => Some(Err(())),
        };
    }
    if let Some(p) = section(config, "presence", &mut cfg.problems) {
        cfg.presence_enabled = flag(p, "enabled", &mut cfg.problems);
        match p.get("key") {
            None | Some(Value::Null) => {}
            Some(Value::String(k)) => cfg.presence_key = k.clone(),
            // Numbers are fine as keys; anything else is not.
            Some(Value::Number(n)) => cfg.presence_key = n.to_string(),
            Some(_) => cfg.problems.push("presence.key is not a string".into()),
        }
    }
    cfg.private = flag(config, "private", &mut cfg.problems);
    match config.get("postgres_changes") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for item in list {
                match item {
                    Value::Null => {}
                    Value::Object(b) => cfg.postgres_changes.push(b.clone()),
                    _ => cfg
                        .problems
                        .push("postgres_changes entries must be objects".into()),
                }
            }
        }
        Some(_) => cfg.problems.push("postgres_changes is not a list".into()),
    }
    cfg
}

fn section<'a>(
    config: &'a Map<String, Value>,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<&'a Map<String, Value>> {
    match config.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            problems.push(format!("{name} is not an object"));
            None
        }
    }
}

/// `true`/`false`, or the strings "true"/"false" in any case; anything else is `false`.
fn flag(map: &Map<String, Value>, key: &str, problems: &mut Vec<String>) -> bool {
    match map.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
        Some(other) => {
            problems.push(format!("{key} is not a boolean: {other}"));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_supabase_js_sends() {
        let c = parse(
            r#"{"config":{"broadcast":{"ack":true,"self":false},"presence":{"key":"u1","enabled":true},
                "postgres_changes":[{"event":"INSERT","schema":"public","table":"m","filter":"id=eq.1"}],"private":false},
                "access_token":"tok"}"#,
        );
        assert!(c.broadcast_ack && !c.broadcast_self && c.presence_enabled && !c.private);
        assert_eq!(c.presence_key, "u1");
        assert_eq!(c.postgres_changes.len(), 1);
        assert_eq!(c.access_token.as_deref(), Some("tok"));
        assert!(c.problems.is_empty());
    }

    #[test]
    fn string_booleans_and_legacy_token() {
        let c = parse(
            r#"{"config":{"broadcast":{"self":"TRUE","ack":"false"},"private":"True"},"user_token":"t"}"#,
        );
        assert!(c.broadcast_self && !c.broadcast_ack && c.private);
        assert!(!c.replication_ready);
        assert_eq!(c.access_token.as_deref(), Some("t"));
        assert!(
            parse(r#"{"config":{"broadcast":{"replication_ready":"true"}}}"#).replication_ready
        );
    }

    #[test]
    fn invalid_payloads_are_tolerated() {
        let c = parse(
            r#"{"config":{"broadcast":{"self":5},"postgres_changes":[null,{"event":"*"},3]}}"#,
        );
        assert!(!c.broadcast_self);
        assert_eq!(c.postgres_changes.len(), 1);
        assert_eq!(c.problems.len(), 2);
        assert_eq!(parse("[]").problems.len(), 1);
        assert_eq!(
            parse(r#"{"config":{"postgres_changes":null}}"#)
                .postgres_changes
                .len(),
            0
        );
    }
}

#[cfg(test)]
mod replay_tests {
    use super::*;

    #[test]
    fn replay_params() {
        let c = parse(r#"{"config":{"broadcast":{"replay":{"since":1700000000000,"limit":100}}}}"#);
        assert_eq!(c.replay, Some(Ok((1_700_000_000_000, 25))));
        let c = parse(r#"{"config":{"broadcast":{"replay":{"since":5,"limit":0}}}}"#);
        assert_eq!(c.replay, Some(Ok((5, 1))));
        let c = parse(r#"{"config":{"broadcast":{"replay":{"since":5}}}}"#);
        assert_eq!(c.replay, Some(Ok((5, 25))));
        assert_eq!(
            parse(r#"{"config":{"broadcast":{"replay":{"since":"x"}}}}"#).replay,
            Some(Err(()))
        );
        assert_eq!(
            parse(r#"{"config":{"broadcast":{"replay":{"limit":3}}}}"#).replay,
            Some(Err(()))
        );
        assert_eq!(parse(r#"{"config":{"broadcast":{}}}"#).replay, None);
    }
}
