//! What the database user must be allowed to do for walcast to run, checked at start so that a
//! managed database's missing grant is named rather than met halfway through.

use std::sync::Arc;

use super::{DbError, Pool};

/// Why the check failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Db(#[from] DbError),
    /// Something the user lacks; the message names the grant to give.
    #[error("{0}")]
    Missing(String),
}

/// What the database user must be able to do, checked before anything else so that a managed
/// database's missing grant is named (rather than met as a failure halfway through): stream
/// (superuser, `REPLICATION`, or RDS's `rds_replication`), and switch to the API roles to check
/// rows as each subscriber (granted here when the user may grant it, as the migration does).
pub async fn check(pool: &Arc<Pool>) -> Result<(), Error> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper, rolreplication
                    OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication')
                        AND pg_has_role(current_user, 'rds_replication', 'MEMBER'))
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(DbError::from)?;
    let (user, superuser, replication): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    // As the user would type it.
    let plain = user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let ident = if plain {
        user.clone()
    } else {
        super::quote_ident(&user)
    };
    if !superuser && !replication {
        return Err(Error::Missing(format!(
            "the database user {user} cannot stream changes: it lacks the REPLICATION attribute. \
             As a superuser (or your provider's admin user): ALTER ROLE {ident} REPLICATION; \
             on Amazon RDS: GRANT rds_replication TO {ident}"
        )));
    }
    if superuser {
        return Ok(());
    }
    let missing: Vec<String> = client
        .query(
            "SELECT rolname::text FROM pg_roles
              WHERE rolname IN ('anon', 'authenticated', 'service_role')
                AND NOT pg_has_role(current_user, oid, 'MEMBER')
              ORDER BY 1",
            &[],
        )
        .await
        .map_err(DbError::from)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let roles = missing.join(", ");
    if let Err(e) = client
        .batch_execute(&format!("GRANT {roles} TO {ident}"))
        .await
    {
        return Err(Error::Missing(format!(
            "the database user {user} must be able to switch to the API roles to check rows as \
             each subscriber, and cannot grant that to itself ({}). As a superuser (or your \
             provider's admin user): GRANT anon, authenticated, service_role TO {ident}",
            DbError::from(e)
        )));
    }
    tracing::info!(%user, roles = %roles, "granted the API roles to the database user");
    Ok(())
}
