//! Subscription preparation: a channel's bindings checked against the database (the role
//! exists, tables in the publication match, filter and select columns exist and the role may read
//! them, filter values cast to the column type, patterns and regular expressions compile) and
//! turned into live [`Sub`]scriptions, or the original's "Unable to subscribe" message.

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::Claims;
use crate::db::DbError;
use crate::error::{clip, MAX_ECHO_BYTES};

use super::binding::BindingSpec;
use super::filter::{self, Filter, Kind, Op, Operand};
use super::registry::{Cohort, Sub, Target};
use super::PgChanges;

/// Most values an `in` filter may list.
const MAX_IN_VALUES: usize = 100;

impl PgChanges {
    /// Checks a channel's bindings against the database and returns the subscriptions to
    /// register, or the `system` error message. All or nothing, as in the original.
    pub async fn prepare(
        &self,
        target: Arc<Target>,
        claims: &Claims,
        bindings: &[BindingSpec],
    ) -> Result<Vec<(u32, Sub)>, String> {
        let cohort = Arc::new(Cohort {
            role: claims.role.clone(),
            claims: serde_json::to_string(&*claims.raw).unwrap_or_else(|_| "{}".into()),
            sub: claims.sub().unwrap_or_default().to_owned(),
        });
        let mut out = Vec::new();
        for b in bindings {
            let subs = self
                .prepare_binding(&target, &cohort, b)
                .await
                .map_err(|e| e.message(b))?;
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
            return Err(PrepareError::Exception(format!(
                "ERROR 42704 (undefined_object) role {} does not exist",
                filter::inspect(&cohort.role)
            )));
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
            let mut filters = Vec::with_capacity(b.filters.len());
            for f in &b.filters {
                let Some((type_oid, type_name)) = columns.get(&f.column) else {
                    return Err(PrepareError::raise(format!(
                        "invalid column for filter {}",
                        f.column
                    )));
                };
                filters.push(
                    self.compile_filter(&client, f, *type_oid, type_name)
                        .await?,
                );
            }
            if let Some(select) = &b.select {
                for c in select {
                    if !columns.contains_key(c) {
                        return Err(PrepareError::raise(format!(
                            "invalid column for select {c}"
                        )));
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
                    return Err(PrepareError::raise(format!(
                        "operator {} is not supported by walcast for column type {type_name}",
                        f.op.as_str()
                    )));
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
                    return Err(PrepareError::raise(
                        "too many values for `in` filter. Maximum 100".into(),
                    ));
                }
                Operand::List(rows.iter().map(|r| r.get(0)).collect())
            }
            Op::Is => {
                if !matches!(f.value.as_str(), "null" | "true" | "false" | "unknown") {
                    return Err(PrepareError::raise(
                        "invalid value for is filter: must be null, true, false, or unknown".into(),
                    ));
                }
                if f.value != "null" && kind != Kind::Bool {
                    return Err(PrepareError::raise(format!(
                        "is {} filter requires a boolean column, got {type_name}",
                        f.value
                    )));
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
                    return Err(PrepareError::raise(format!(
                        "operator {} requires a text-compatible column type, got {type_name}",
                        f.op.as_str()
                    )));
                }
                if matches!(f.op, Op::Match | Op::IMatch) {
                    if let Err(e) = client.query_one("SELECT '' ~ $1", &[&f.value]).await {
                        let msg = e
                            .as_db_error()
                            .map(|d| d.message().to_owned())
                            .unwrap_or_else(|| e.to_string());
                        return Err(PrepareError::raise(format!(
                            "invalid regular expression for {} filter: {msg}",
                            f.op.as_str()
                        )));
                    }
                    let re = filter::compile_regex(&f.value, f.op == Op::IMatch).map_err(|e| {
                            PrepareError::raise(format!(
                                "invalid regular expression for {} filter: walcast cannot evaluate it: {e}",
                                f.op.as_str()
                            ))
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

/// Why a binding could not go live.
enum PrepareError {
    NoTable,
    /// The original's "An exception happened" message, with the database error text.
    Exception(String),
}

impl PrepareError {
    fn raise(msg: String) -> Self {
        PrepareError::Exception(format!("ERROR P0001 (raise_exception) {msg}"))
    }

    fn sql(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => PrepareError::Exception(format!(
                "ERROR {} ({}) {}",
                db.code().code(),
                condition_name(db.code().code()),
                db.message()
            )),
            None => PrepareError::Exception(e.to_string()),
        }
    }

    fn db(e: DbError) -> Self {
        match e {
            DbError::Postgres(e) => Self::sql(e),
            other => PrepareError::Exception(other.to_string()),
        }
    }

    /// The original's message. The echoed parameters and the database's error text (which can
    /// quote the value) are clipped to [`MAX_ECHO_BYTES`] each.
    fn message(&self, b: &BindingSpec) -> String {
        let params = b.params_to_log();
        let params = clip(&params, MAX_ECHO_BYTES);
        match self {
            PrepareError::NoTable => format!(
                "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [{params}]"
            ),
            PrepareError::Exception(e) => format!(
                "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: [{params}]. Exception: {}",
                clip(e, MAX_ECHO_BYTES)
            ),
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
