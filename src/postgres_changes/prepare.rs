//! Subscription preparation: a channel's bindings checked against the database (the role
//! exists, tables in the publication match, filter and select columns exist and the role may read
//! them, filter values cast to the column type, patterns and regular expressions compile) and
//! turned into live [`Sub`]scriptions, or the original's "Unable to subscribe" message.

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::Claims;
use crate::db::DbError;
use crate::protocol::{clip, MAX_ECHO_BYTES};

use super::binding::BindingSpec;
use super::filter::{self, inspect, Cond, Filter, Kind, Op, Operand};
use super::registry::{Cohort, Sub, Target};
use super::PgChanges;

/// Most values an `in` filter may list (the original's limit is 100, and its matching silently
/// stops at 60-70 values).
pub const MAX_IN_VALUES: usize = 1000;

impl PgChanges {
    /// Checks a channel's bindings against the database and returns the subscriptions to
    /// register, or why the first binding refused was refused. All or nothing, as in the
    /// original.
    pub async fn prepare(
        &self,
        target: Arc<Target>,
        claims: &Claims,
        bindings: &[BindingSpec],
    ) -> Result<Vec<(u32, Sub)>, SubscribeError> {
        let cohort = Arc::new(Cohort::new(
            claims.role.clone(),
            serde_json::to_string(&*claims.raw).unwrap_or_else(|_| "{}".into()),
            claims.sub().unwrap_or_default().to_owned(),
        ));
        let mut out = Vec::new();
        for b in bindings {
            let subs = self
                .prepare_binding(&target, &cohort, b)
                .await
                .map_err(|reason| SubscribeError {
                    params: b.params_to_log(),
                    reason,
                })?;
            out.extend(subs);
        }
        Ok(out)
    }

    async fn prepare_binding(
        &self,
        target: &Arc<Target>,
        cohort: &Arc<Cohort>,
        b: &BindingSpec,
    ) -> Result<Vec<(u32, Sub)>, PrepareError> {
        let client = self.pool.get().await.map_err(PrepareError::db)?;
        let role_ok = client
            .query_one("SELECT to_regrole($1) IS NOT NULL", &[&cohort.role])
            .await
            .map_err(|e| PrepareError::db(e.into()))?
            .get::<_, bool>(0);
        if !role_ok {
            return Err(PrepareError::UnknownRole(cohort.role.clone()));
        }
        let tables = client
            .query(
                "SELECT format('%I.%I', schemaname, tablename)::regclass::oid, schemaname::text, tablename::text
                   FROM pg_publication_tables
                  WHERE pubname = $1
                    AND schemaname LIKE (CASE $2 WHEN '*' THEN '%' ELSE $2 END) ESCAPE ''
                    AND tablename LIKE (CASE $3 WHEN '*' THEN '%' ELSE $3 END) ESCAPE ''
                  ORDER BY 2, 3",
                &[&self.publication, &b.schema, &b.table],
            )
            .await
            .map_err(|e| PrepareError::db(e.into()))?;
        if tables.is_empty() {
            return Err(PrepareError::NoTable);
        }
        let mut out = Vec::new();
        for row in tables {
            let oid: u32 = row.get(0);
            let columns = client
                .query(
                    "SELECT attname::text, atttypid, format_type(atttypid, atttypmod)
                       FROM pg_attribute
                      WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
                        AND has_column_privilege($2, attrelid, attnum, 'SELECT')",
                    &[&oid, &cohort.role],
                )
                .await
                .map_err(|e| PrepareError::db(e.into()))?;
            let columns: HashMap<String, (u32, String)> = columns
                .iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        (r.get::<_, u32>(1), r.get::<_, String>(2)),
                    )
                })
                .collect();
            // Every filter, in trees too, depth first; then the trees rebuilt around them.
            let mut compiled = Vec::new();
            for f in b.filters.iter().flat_map(Cond::leaves) {
                let Some((type_oid, type_name)) = columns.get(&f.column) else {
                    return Err(PrepareError::FilterColumn(f.column.clone()));
                };
                compiled.push(
                    self.compile_filter(&client, f, *type_oid, type_name)
                        .await?,
                );
            }
            let mut compiled = compiled.into_iter();
            let filters = b
                .filters
                .iter()
                .map(|c| {
                    c.try_map(&mut |_| {
                        compiled
                            .next()
                            .ok_or_else(|| PrepareError::Unavailable("filter tree mismatch".into()))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(select) = &b.select {
                for c in select {
                    if !columns.contains_key(c) {
                        return Err(PrepareError::SelectColumn(c.clone()));
                    }
                }
            }
            out.push((
                oid,
                Sub {
                    target: target.clone(),
                    binding_id: b.id,
                    action: b.action,
                    filters,
                    select: b.select.clone().map(Arc::new),
                    cohort: cohort.clone(),
                    leaves: b.leaves,
                },
            ));
        }
        Ok(out)
    }

    async fn compile_filter(
        &self,
        client: &tokio_postgres::Client,
        f: &filter::ParsedFilter,
        type_oid: u32,
        type_name: &str,
    ) -> Result<Filter, PrepareError> {
        self.catalog
            .ensure_types([type_oid])
            .await
            .map_err(PrepareError::db)?;
        let kind = self
            .catalog
            .kind(client, type_oid)
            .await
            .map_err(PrepareError::db)?;
        let operand = match f.op {
            Op::Eq | Op::Neq | Op::Lt | Op::Lte | Op::Gt | Op::Gte | Op::IsDistinct => {
                if matches!(f.op, Op::Lt | Op::Lte | Op::Gt | Op::Gte) && !kind.orderable() {
                    return Err(PrepareError::NotOrderable {
                        op: f.op,
                        type_name: type_name.to_owned(),
                    });
                }
                let sql = format!("SELECT ($1::text::{type_name})::text");
                let row = client
                    .query_one(&sql, &[&f.value])
                    .await
                    .map_err(PrepareError::sql)?;
                Operand::Value(row.get(0))
            }
            Op::In => {
                let sql = format!("SELECT x::text FROM unnest($1::text::{type_name}[]) AS x");
                let rows = client
                    .query(&sql, &[&f.value])
                    .await
                    .map_err(PrepareError::sql)?;
                if rows.len() > MAX_IN_VALUES {
                    return Err(PrepareError::TooManyInValues);
                }
                Operand::in_list(&kind, rows.iter().map(|r| r.get(0)).collect())
            }
            Op::Is => {
                if !matches!(f.value.as_str(), "null" | "true" | "false" | "unknown") {
                    return Err(PrepareError::IsValue);
                }
                if f.value != "null" && kind != Kind::Bool {
                    return Err(PrepareError::IsNeedsBoolean {
                        value: f.value.clone(),
                        type_name: type_name.to_owned(),
                    });
                }
                Operand::Keyword(f.value.clone())
            }
            Op::Like | Op::ILike | Op::Match | Op::IMatch => {
                let opname = match f.op {
                    Op::Like | Op::ILike => "~~",
                    Op::Match => "~",
                    _ => "~*",
                };
                let ok = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_operator WHERE oprname = $1 AND oprleft = $2)",
                        &[&opname, &type_oid],
                    )
                    .await
                    .map_err(PrepareError::sql)?
                    .get::<_, bool>(0);
                if !ok {
                    return Err(PrepareError::PatternNeedsText {
                        op: f.op,
                        type_name: type_name.to_owned(),
                    });
                }
                if matches!(f.op, Op::Match | Op::IMatch) {
                    if let Err(e) = client.query_one("SELECT '' ~ $1", &[&f.value]).await {
                        let msg = e
                            .as_db_error()
                            .map(|d| d.message().to_owned())
                            .unwrap_or_else(|| e.to_string());
                        return Err(PrepareError::Regex {
                            op: f.op,
                            message: msg,
                        });
                    }
                    let re = filter::compile_regex(&f.value, f.op == Op::IMatch).map_err(|e| {
                        PrepareError::RegexUnsupported {
                            op: f.op,
                            message: e.to_string(),
                        }
                    })?;
                    Operand::Regex(re)
                } else {
                    Operand::Pattern(filter::LikePattern::new(&f.value, f.op == Op::ILike))
                }
            }
        };
        Ok(Filter {
            column: f.column.clone(),
            kind,
            op: f.op,
            negate: f.negate,
            operand,
        })
    }
}

/// A channel's bindings refused by the database check: the refused binding's parameters (the
/// original's log form) and why. Its `Display` is the whole `system` message, the original's
/// "Unable to subscribe to changes with given parameters" text; the echoed parameters and the
/// exception text (which can quote the value) are clipped to [`MAX_ECHO_BYTES`] each.
#[derive(Debug, thiserror::Error)]
#[error("Unable to subscribe to changes with given parameters. {}", self.body())]
pub struct SubscribeError {
    /// [`BindingSpec::params_to_log`] of the binding refused.
    pub params: String,
    pub reason: PrepareError,
}

impl SubscribeError {
    fn body(&self) -> String {
        let params = clip(&self.params, MAX_ECHO_BYTES);
        match &self.reason {
            PrepareError::NoTable => format!(
                "Please check Realtime is enabled for the given connect parameters: [{params}]"
            ),
            e => format!(
                "An exception happened so please check your connect parameters: [{params}]. Exception: {}",
                clip(&e.to_string(), MAX_ECHO_BYTES)
            ),
        }
    }

    /// The SQLSTATE the message carries (`None` when it carries none).
    pub fn code(&self) -> Option<&str> {
        self.reason.code()
    }
}

/// Why one binding could not go live. Its `Display` is the exception text of the original's
/// message (`ERROR <SQLSTATE> (<condition>) <text>`; ERROR_CODES.md lists them).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// No table of the publication matches (the message then has no exception text).
    #[error("no table of the publication matches")]
    NoTable,
    #[error("ERROR 42704 (undefined_object) role {} does not exist", inspect(.0))]
    UnknownRole(String),
    /// No such column, or the role may not read it.
    #[error("ERROR P0001 (raise_exception) invalid column for filter {0}")]
    FilterColumn(String),
    #[error("ERROR P0001 (raise_exception) invalid column for select {0}")]
    SelectColumn(String),
    /// walcast only: ordering on a type walcast cannot order.
    #[error("ERROR P0001 (raise_exception) operator {} is not supported by walcast for column type {type_name}", .op.as_str())]
    NotOrderable { op: Op, type_name: String },
    #[error(
        "ERROR P0001 (raise_exception) too many values for `in` filter. Maximum {MAX_IN_VALUES}"
    )]
    TooManyInValues,
    #[error("ERROR P0001 (raise_exception) invalid value for is filter: must be null, true, false, or unknown")]
    IsValue,
    #[error("ERROR P0001 (raise_exception) is {value} filter requires a boolean column, got {type_name}")]
    IsNeedsBoolean { value: String, type_name: String },
    #[error("ERROR P0001 (raise_exception) operator {} requires a text-compatible column type, got {type_name}", .op.as_str())]
    PatternNeedsText { op: Op, type_name: String },
    /// PostgreSQL refused the regular expression; its message.
    #[error("ERROR P0001 (raise_exception) invalid regular expression for {} filter: {message}", .op.as_str())]
    Regex { op: Op, message: String },
    /// walcast only: PostgreSQL takes it but walcast's engine cannot evaluate it.
    #[error("ERROR P0001 (raise_exception) invalid regular expression for {} filter: walcast cannot evaluate it: {message}", .op.as_str())]
    RegexUnsupported { op: Op, message: String },
    /// The database refused a statement (a value that does not cast, ...).
    #[error("ERROR {code} ({}) {message}", condition_name(code))]
    Sql { code: String, message: String },
    /// No answer from the database (connection, pool): the error's text.
    #[error("{0}")]
    Unavailable(String),
}

impl PrepareError {
    /// The SQLSTATE the message carries (`None` when it carries none).
    pub fn code(&self) -> Option<&str> {
        Some(match self {
            PrepareError::NoTable | PrepareError::Unavailable(_) => return None,
            PrepareError::UnknownRole(_) => "42704",
            PrepareError::Sql { code, .. } => code,
            _ => "P0001",
        })
    }

    fn sql(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => PrepareError::Sql {
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
            },
            None => PrepareError::Unavailable(e.to_string()),
        }
    }

    fn db(e: DbError) -> Self {
        match e {
            DbError::Postgres(e) => Self::sql(e),
            other => PrepareError::Unavailable(other.to_string()),
        }
    }
}

/// PostgreSQL's condition names for the SQLSTATEs a filter can hit.
fn condition_name(code: &str) -> &'static str {
    match code {
        "22P02" => "invalid_text_representation",
        "22003" => "numeric_value_out_of_range",
        "22007" => "invalid_datetime_format",
        "22008" => "datetime_field_overflow",
        "22001" => "string_data_right_truncation",
        "22023" => "invalid_parameter_value",
        "2201B" => "invalid_regular_expression",
        "42704" => "undefined_object",
        "42883" => "undefined_function",
        "42846" => "cannot_coerce",
        "42501" => "insufficient_privilege",
        "P0001" => "raise_exception",
        "0A000" => "feature_not_supported",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: &str = r#"event: *, schema: public, table: test, filters: [{"id", "eq", "x", false}], select: nil"#;

    fn wire(reason: PrepareError) -> String {
        SubscribeError {
            params: PARAMS.into(),
            reason,
        }
        .to_string()
    }

    fn exception(text: &str) -> String {
        format!(
            "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: [{PARAMS}]. Exception: {text}"
        )
    }

    /// The wire strings of ERROR_CODES.md, one per variant.
    #[test]
    fn each_error_displays_its_wire_string() {
        assert_eq!(
            wire(PrepareError::NoTable),
            format!("Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [{PARAMS}]")
        );
        let cases = [
            (
                PrepareError::UnknownRole("nob\"ody".into()),
                r#"ERROR 42704 (undefined_object) role "nob\"ody" does not exist"#,
            ),
            (
                PrepareError::FilterColumn("nope".into()),
                "ERROR P0001 (raise_exception) invalid column for filter nope",
            ),
            (
                PrepareError::SelectColumn("nope".into()),
                "ERROR P0001 (raise_exception) invalid column for select nope",
            ),
            (
                PrepareError::NotOrderable {
                    op: Op::Gt,
                    type_name: "uuid".into(),
                },
                "ERROR P0001 (raise_exception) operator gt is not supported by walcast for column type uuid",
            ),
            (
                PrepareError::TooManyInValues,
                "ERROR P0001 (raise_exception) too many values for `in` filter. Maximum 1000",
            ),
            (
                PrepareError::IsValue,
                "ERROR P0001 (raise_exception) invalid value for is filter: must be null, true, false, or unknown",
            ),
            (
                PrepareError::IsNeedsBoolean {
                    value: "true".into(),
                    type_name: "integer".into(),
                },
                "ERROR P0001 (raise_exception) is true filter requires a boolean column, got integer",
            ),
            (
                PrepareError::PatternNeedsText {
                    op: Op::ILike,
                    type_name: "integer".into(),
                },
                "ERROR P0001 (raise_exception) operator ilike requires a text-compatible column type, got integer",
            ),
            (
                PrepareError::Regex {
                    op: Op::Match,
                    message: "invalid regular expression: parentheses () not balanced".into(),
                },
                "ERROR P0001 (raise_exception) invalid regular expression for match filter: invalid regular expression: parentheses () not balanced",
            ),
            (
                PrepareError::RegexUnsupported {
                    op: Op::IMatch,
                    message: "look-around is not supported".into(),
                },
                "ERROR P0001 (raise_exception) invalid regular expression for imatch filter: walcast cannot evaluate it: look-around is not supported",
            ),
            (
                PrepareError::Sql {
                    code: "22P02".into(),
                    message: r#"invalid input syntax for type integer: "abc""#.into(),
                },
                r#"ERROR 22P02 (invalid_text_representation) invalid input syntax for type integer: "abc""#,
            ),
            (
                PrepareError::Sql {
                    code: "XX999".into(),
                    message: "odd".into(),
                },
                "ERROR XX999 (error) odd",
            ),
            (PrepareError::Unavailable("timed out".into()), "timed out"),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
            assert_eq!(wire(e), exception(text));
        }
    }

    #[test]
    fn codes_are_the_sqlstate_in_the_message() {
        assert_eq!(PrepareError::NoTable.code(), None);
        assert_eq!(PrepareError::UnknownRole("x".into()).code(), Some("42704"));
        assert_eq!(PrepareError::TooManyInValues.code(), Some("P0001"));
        let sql = PrepareError::Sql {
            code: "22P02".into(),
            message: "m".into(),
        };
        assert_eq!(sql.code(), Some("22P02"));
        assert_eq!(PrepareError::Unavailable("x".into()).code(), None);
    }

    #[test]
    fn echoed_parameters_and_exception_text_are_clipped_each() {
        let e = SubscribeError {
            params: "p".repeat(MAX_ECHO_BYTES + 5),
            reason: PrepareError::FilterColumn("c".repeat(MAX_ECHO_BYTES)),
        }
        .to_string();
        assert!(
            e.contains("… (5 more bytes)]. Exception: ERROR P0001"),
            "{e}"
        );
        assert!(e.ends_with(" more bytes)"), "{e}");
    }
}
