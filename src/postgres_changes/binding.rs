//! A postgres_changes binding from the join payload: what it asks for, checked the way the
//! original checks it, with its error strings.

use serde_json::{Map, Value};

use super::filter::{self, inspect, Cond, FilterError, ParsedFilter};
use crate::protocol::{clip, MAX_ECHO_BYTES};

/// Largest binding, in bytes of its JSON text (event, schema, table, filter, select).
/// Room for an `in` list at its bound ([`filter::MAX_IN_LIST_BYTES`]) and the rest of the binding.
pub const MAX_BINDING_BYTES: usize = 64 * 1024;
/// Most postgres_changes bindings one channel may ask for.
pub const MAX_BINDINGS_PER_CHANNEL: usize = 100;

/// Why a channel's postgres_changes bindings are refused before the database is asked. Its
/// `Display` is the whole `system` message (the original's text where it has one; what the
/// client sent is echoed clipped to [`MAX_ECHO_BYTES`]; ERROR_CODES.md lists them).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// walcast only: more than [`MAX_BINDINGS_PER_CHANNEL`] bindings.
    #[error(
        "Too many postgres_changes bindings: {0}. Maximum {MAX_BINDINGS_PER_CHANNEL} per channel"
    )]
    TooMany(usize),
    /// walcast only: a binding over [`MAX_BINDING_BYTES`] of JSON; nothing of it is echoed.
    #[error("Binding too large: {0} bytes. Maximum {MAX_BINDING_BYTES} bytes of JSON per postgres_changes binding")]
    TooLarge(usize),
    #[error("Error parsing `select` params: expected a list of column name strings, e.g. select: [\"col1\", \"col2\"]")]
    BadSelect,
    #[error("Error parsing `filter` params: {}", clip(&.0.to_string(), MAX_ECHO_BYTES))]
    Filter(#[from] FilterError),
    /// Neither schema nor table; carries the binding as Elixir prints a map.
    #[error("No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: {}", clip(.0, MAX_ECHO_BYTES))]
    NoParams(String),
    #[error("Column selection is not supported for wildcard subscriptions. Provide an explicit schema and table name.")]
    WildcardSelect,
    /// walcast only: `leaves` that is not a boolean.
    #[error("Error parsing `leaves` params: expected true or false")]
    BadLeaves,
    /// walcast only: `leaves` on a binding supabase-js would not hand a leave to (a leave is a
    /// DELETE event).
    #[error("`leaves: true` needs a binding whose event is `*` or `DELETE`: a leave is sent as a DELETE event")]
    LeavesNeedDelete,
}

/// The error for a channel with too many bindings (the `system` message).
pub fn too_many_bindings(n: usize) -> String {
    BindingError::TooMany(n).to_string()
}

/// Bytes of `v` as JSON text, counted without building the text.
fn json_len(v: &Map<String, Value>) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, v) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    All,
    Insert,
    Update,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::All => "*",
            Action::Insert => "INSERT",
            Action::Update => "UPDATE",
            Action::Delete => "DELETE",
        }
    }

    pub fn admits(self, change: Action) -> bool {
        self == Action::All || self == change
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingSpec {
    pub id: u32,
    pub action: Action,
    /// `*` means every schema (of tables in the publication).
    pub schema: String,
    /// `*` means every table.
    pub table: String,
    /// Conditions that must all hold.
    pub filters: Vec<Cond<ParsedFilter>>,
    pub select: Option<Vec<String>>,
    /// `leaves: true` (walcast only): an UPDATE that takes a row this subscriber could see out
    /// of its view (row level security) is sent as a leave.
    pub leaves: bool,
}

impl BindingSpec {
    /// The original's log form of the parameters, embedded in its error messages.
    pub fn params_to_log(&self) -> String {
        let filters: Vec<String> = self.filters.iter().map(Cond::to_log).collect();
        let select = match &self.select {
            None => "nil".to_owned(),
            Some(cols) => format!(
                "[{}]",
                cols.iter()
                    .map(|c| inspect(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(
            "event: {}, schema: {}, table: {}, filters: [{}], select: {}",
            self.action.as_str(),
            self.schema,
            self.table,
            filters.join(", "),
            select
        )
    }
}

/// Parses one binding.
pub fn parse(raw: &Map<String, Value>, id: u32) -> Result<BindingSpec, BindingError> {
    let size = json_len(raw);
    if size > MAX_BINDING_BYTES {
        // Nothing of it is echoed: it is what is too large.
        return Err(BindingError::TooLarge(size));
    }
    let action = match raw.get("event") {
        Some(Value::String(e)) => match e.to_ascii_uppercase().as_str() {
            "INSERT" => Action::Insert,
            "UPDATE" => Action::Update,
            "DELETE" => Action::Delete,
            _ => Action::All,
        },
        _ => Action::All,
    };
    let select = match raw.get("select") {
        None | Some(Value::Null) => None,
        Some(Value::Array(cols)) => {
            let cols: Vec<String> = cols
                .iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect();
            (!cols.is_empty()).then_some(cols)
        }
        Some(_) => return Err(BindingError::BadSelect),
    };
    let text = |k: &str| match raw.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    // A null filter is the same as none (supabase-js omits it; some clients send null).
    let has_filter = matches!(raw.get("filter"), Some(v) if !v.is_null());
    let (schema, table, filters) = match (text("schema"), text("table"), text("filter")) {
        (Some(schema), Some(table), Some(filter)) => {
            let filters = filter::parse(&filter)?;
            (schema, table, filters)
        }
        (Some(schema), Some(table), None) if !has_filter => (schema, table, Vec::new()),
        (Some(schema), None, None) if !raw.contains_key("table") && !has_filter => {
            (schema, "*".to_owned(), Vec::new())
        }
        (None, Some(table), None) if !raw.contains_key("schema") && !has_filter => {
            ("public".to_owned(), table, Vec::new())
        }
        _ => return Err(BindingError::NoParams(inspect_map(raw))),
    };
    if select.is_some() && (schema == "*" || table == "*") {
        return Err(BindingError::WildcardSelect);
    }
    let leaves = match raw.get("leaves") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(BindingError::BadLeaves),
    };
    if leaves && !action.admits(Action::Delete) {
        return Err(BindingError::LeavesNeedDelete);
    }
    Ok(BindingSpec {
        leaves,
        id,
        action,
        schema,
        table,
        filters,
        select,
    })
}

/// Elixir-style `%{"k" => v}`, with token values redacted.
fn inspect_map(raw: &Map<String, Value>) -> String {
    if raw.contains_key("user_token") || raw.contains_key("auth_token") {
        return "<redacted>".to_owned();
    }
    let parts: Vec<String> = raw
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => inspect(s),
                Value::Null => "nil".to_owned(),
                other => other.to_string(),
            };
            format!("{} => {}", inspect(k), v)
        })
        .collect();
    format!("%{{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Result<BindingSpec, String> {
        parse(v.as_object().unwrap(), 1).map_err(|e| e.to_string())
    }

    #[test]
    fn shapes() {
        let b = p(json!({"event":"insert","schema":"public","table":"messages","filter":"conversation_id=eq.5"})).unwrap();
        assert_eq!(b.action, Action::Insert);
        assert_eq!(b.filters.len(), 1);
        let b = p(json!({"schema":"public"})).unwrap();
        assert_eq!((b.table.as_str(), b.action), ("*", Action::All));
        let b = p(json!({"table":"messages","event":"whatever"})).unwrap();
        assert_eq!((b.schema.as_str(), b.action), ("public", Action::All));
        let b = p(json!({"schema":"public","table":"t","select":["id", 5, "body"]})).unwrap();
        assert_eq!(b.select, Some(vec!["id".to_owned(), "body".to_owned()]));
    }

    #[test]
    fn errors() {
        assert_eq!(
            p(json!({"event":"*"})).unwrap_err(),
            r#"No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: %{"event" => "*"}"#
        );
        assert_eq!(
            p(json!({"schema":"public","table":"t","filter":"wrong"})).unwrap_err(),
            r#"Error parsing `filter` params: ["wrong"]"#
        );
        assert!(p(json!({"schema":"public","table":"t","select":"id"}))
            .unwrap_err()
            .starts_with("Error parsing `select` params"));
        let b = p(json!({"schema":"public","table":"t","event":"DELETE","leaves":true})).unwrap();
        assert!(b.leaves);
        assert!(
            !p(json!({"schema":"public","table":"t","leaves":false}))
                .unwrap()
                .leaves
        );
        assert_eq!(
            p(json!({"schema":"public","table":"t","event":"UPDATE","leaves":true})).unwrap_err(),
            BindingError::LeavesNeedDelete.to_string()
        );
        assert_eq!(
            p(json!({"schema":"public","table":"t","leaves":"yes"})).unwrap_err(),
            BindingError::BadLeaves.to_string()
        );
        assert!(p(json!({"schema":"public","select":["id"]}))
            .unwrap_err()
            .starts_with("Column selection is not supported"));
    }

    /// The wire strings of ERROR_CODES.md, one per variant.
    #[test]
    fn each_error_displays_its_wire_string() {
        let cases = [
            (
                BindingError::TooMany(101),
                "Too many postgres_changes bindings: 101. Maximum 100 per channel",
            ),
            (
                BindingError::TooLarge(70000),
                "Binding too large: 70000 bytes. Maximum 65536 bytes of JSON per postgres_changes binding",
            ),
            (
                BindingError::BadSelect,
                r#"Error parsing `select` params: expected a list of column name strings, e.g. select: ["col1", "col2"]"#,
            ),
            (
                BindingError::Filter(FilterError::Unparsed(vec!["wrong".into()])),
                r#"Error parsing `filter` params: ["wrong"]"#,
            ),
            (
                BindingError::NoParams(r#"%{"event" => "*"}"#.into()),
                r#"No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: %{"event" => "*"}"#,
            ),
            (
                BindingError::WildcardSelect,
                "Column selection is not supported for wildcard subscriptions. Provide an explicit schema and table name.",
            ),
            (
                BindingError::BadLeaves,
                "Error parsing `leaves` params: expected true or false",
            ),
            (
                BindingError::LeavesNeedDelete,
                "`leaves: true` needs a binding whose event is `*` or `DELETE`: a leave is sent as a DELETE event",
            ),
        ];
        for (e, wire) in cases {
            assert_eq!(e.to_string(), wire);
        }
        // What the client sent is clipped, the rest of the message is not.
        let long = BindingError::NoParams("x".repeat(MAX_ECHO_BYTES + 10)).to_string();
        assert!(long.ends_with("… (10 more bytes)"), "{long}");
        let long = BindingError::Filter(FilterError::Unparsed(vec!["y".repeat(2000)])).to_string();
        assert!(long.starts_with("Error parsing `filter` params: [\"yyy"));
        assert!(long.ends_with(" more bytes)"), "{long}");
    }

    #[test]
    fn log_form() {
        let b =
            p(json!({"event":"*","schema":"public","table":"test","filter":"notacolumn=eq.123"}))
                .unwrap();
        assert_eq!(
            b.params_to_log(),
            r#"event: *, schema: public, table: test, filters: [{"notacolumn", "eq", "123", false}], select: nil"#
        );
    }
}
