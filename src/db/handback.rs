//! `walcast migrate --hand-back`: leaves the database ready for supabase/realtime again.
//!
//! What walcast leaves behind that the original would trip over or pay for:
//! - its replication slot, which keeps WAL for ever once nobody reads it (dropped; refused while
//!   a walcast still streams from it);
//! - the `walcast` schema (its migrations table and two functions; dropped);
//! - on a database where the original never ran (no rows in `realtime.schema_migrations`), the
//!   `realtime` objects walcast created: the original loads its schema dump there, whose plain
//!   `CREATE TABLE realtime.messages` and `CREATE FUNCTION realtime.send(...)` fail when they exist.
//!   They are dropped with the publication for broadcast from the database, after the app's
//!   policies on `realtime.messages` are written into the report as statements to run again once
//!   the original has made its schema. Anything else that depends on them (a view, a foreign key)
//!   stops the hand-back, named, before anything is changed.
//!
//! On a database the original set up, its `realtime` objects are walcast's too (walcast replaced
//! none of them), so they stay as they are.

use std::sync::Arc;

use super::migrations::MESSAGES_PUBLICATION;
use super::{quote_ident, DbError, Pool};

/// The objects walcast creates in `realtime` when they are missing, dropped on a hand-back where
/// the original never ran.
const CREATED_FUNCTIONS: &[&str] = &[
    "realtime.broadcast_changes(text, text, text, text, text, record, record, text)",
    "realtime.send_binary(bytea, text, text, boolean)",
    "realtime.send(jsonb, text, text, boolean)",
    "realtime.topic()",
];

/// Why a hand-back could not go ahead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Db(#[from] DbError),
    /// Something must change first; the message says what.
    #[error("{0}")]
    Refused(String),
}

/// Hands the database back (or, with `dry_run`, only says what it would do), one line per
/// finding or action.
pub async fn hand_back(pool: &Arc<Pool>, slot: &str, dry_run: bool) -> Result<Vec<String>, Error> {
    let client = pool.get().await?;
    let mut plan: Vec<String> = Vec::new();
    let mut report: Vec<String> = Vec::new();

    let streaming = client
        .query_opt(
            "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(DbError::from)?;
    let drop_slot = matches!(&streaming, Some(row) if !row.get::<_, bool>(0));
    match streaming {
        Some(row) if row.get::<_, bool>(0) => {
            let pid: Option<i32> = row.get(1);
            return Err(Error::Refused(format!(
                "the replication slot {slot} is in use (walsender pid {}): stop every walcast first",
                pid.map_or_else(|| "unknown".into(), |p| p.to_string())
            )));
        }
        Some(_) => plan.push(format!("drop the replication slot {slot}")),
        None => report.push(format!("found: no replication slot {slot}")),
    }
    let has_schema: bool = client
        .query_one("SELECT to_regnamespace('walcast') IS NOT NULL", &[])
        .await
        .map_err(DbError::from)?
        .get(0);
    if has_schema {
        plan.push("drop the schema walcast (its migrations table and functions)".into());
    }

    let has_migrations_table: bool = client
        .query_one(
            "SELECT to_regclass('realtime.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(DbError::from)?
        .get(0);
    let original_ran = has_migrations_table
        && client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM realtime.schema_migrations)",
                &[],
            )
            .await
            .map_err(DbError::from)?
            .get::<_, bool>(0);

    let mut policies = Vec::new();
    let mut drop_realtime = Vec::new();
    if original_ran {
        report.push(
            "found: the original's realtime schema (realtime.schema_migrations has rows): kept as it is"
                .into(),
        );
    } else {
        let messages: bool = client
            .query_one("SELECT to_regclass('realtime.messages') IS NOT NULL", &[])
            .await
            .map_err(DbError::from)?
            .get(0);
        if messages {
            // Dependents other than its own index, constraints, policies and publication
            // membership would be dropped with it: refuse and name them.
            let blockers: Vec<String> = client
                .query(
                    "SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid)
                       FROM pg_depend d
                      WHERE d.refclassid = 'pg_class'::regclass
                        AND d.refobjid = 'realtime.messages'::regclass
                        AND d.deptype = 'n'
                        AND d.classid NOT IN ('pg_policy'::regclass, 'pg_publication_rel'::regclass,
                                              'pg_constraint'::regclass, 'pg_class'::regclass,
                                              'pg_attrdef'::regclass)
                     UNION
                     SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid)
                       FROM pg_depend d JOIN pg_constraint c ON d.classid = 'pg_constraint'::regclass
                                                            AND c.oid = d.objid
                      WHERE d.refobjid = 'realtime.messages'::regclass
                        AND c.conrelid <> 'realtime.messages'::regclass
                     ORDER BY 1",
                    &[],
                )
                .await
                .map_err(DbError::from)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !blockers.is_empty() {
                return Err(Error::Refused(format!(
                    "realtime.messages was created by walcast and must go for the original to make its own, but these depend on it: {}; drop or change them first",
                    blockers.join(", ")
                )));
            }
            for row in client
                .query(
                    "SELECT policyname::text, permissive::text, cmd::text,
                            array_to_string(ARRAY(SELECT quote_ident(r) FROM unnest(roles) r), ', '),
                            qual, with_check
                       FROM pg_policies WHERE schemaname = 'realtime' AND tablename = 'messages'
                      ORDER BY policyname",
                    &[],
                )
                .await
                .map_err(DbError::from)?
            {
                let (name, permissive, cmd, roles): (String, String, String, String) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                let (using, check): (Option<String>, Option<String>) = (row.get(4), row.get(5));
                let mut stmt = format!(
                    "CREATE POLICY {} ON realtime.messages AS {permissive} FOR {cmd} TO {roles}",
                    quote_ident(&name)
                );
                if let Some(u) = using {
                    stmt.push_str(&format!(" USING ({u})"));
                }
                if let Some(c) = check {
                    stmt.push_str(&format!(" WITH CHECK ({c})"));
                }
                policies.push(format!("{stmt};"));
            }
            drop_realtime.push("DROP TABLE realtime.messages CASCADE".to_owned());
            plan.push(format!(
                "drop realtime.messages, created by walcast ({} policies saved below as statements)",
                policies.len()
            ));
        }
        for f in CREATED_FUNCTIONS {
            let exists: bool = client
                .query_one("SELECT to_regprocedure($1) IS NOT NULL", &[f])
                .await
                .map_err(DbError::from)?
                .get(0);
            if exists {
                drop_realtime.push(format!("DROP FUNCTION {f} CASCADE"));
                plan.push(format!("drop {f}, created by walcast"));
            }
        }
        let publication: bool = client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&MESSAGES_PUBLICATION],
            )
            .await
            .map_err(DbError::from)?
            .is_some();
        if publication {
            drop_realtime.push(format!(
                "DROP PUBLICATION {}",
                quote_ident(MESSAGES_PUBLICATION)
            ));
            plan.push(format!("drop the publication {MESSAGES_PUBLICATION}"));
        }
    }

    if dry_run {
        report.extend(plan.iter().map(|p| format!("would: {p}")));
        report.push("--dry-run: nothing was changed".into());
    } else {
        if drop_slot {
            // A walcast that began streaming since the check above: refused as if seen then.
            if let Err(e) = client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
            {
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) {
                    return Err(Error::Refused(format!(
                        "the replication slot {slot} is in use ({}): stop every walcast first",
                        e.as_db_error().map_or("in use", |d| d.message())
                    )));
                }
                return Err(DbError::from(e).into());
            }
        }
        let mut sql = String::from("BEGIN;\n");
        if has_schema {
            sql.push_str("DROP SCHEMA walcast CASCADE;\n");
        }
        for stmt in &drop_realtime {
            sql.push_str(stmt);
            sql.push_str(";\n");
        }
        sql.push_str("COMMIT;");
        client.batch_execute(&sql).await.map_err(DbError::from)?;
        report.extend(plan.iter().map(|p| format!("did: {p}")));
    }
    if !policies.is_empty() {
        report.push(
            "then: start supabase/realtime once (it makes its realtime schema), and run these again:"
                .into(),
        );
        report.extend(policies);
    }
    Ok(report)
}
