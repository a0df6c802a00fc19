//! Errors that stop the server from starting or running. Errors a client can see are typed
//! where they arise ([`crate::auth::AuthError`], [`crate::protocol::DecodeError`]) and listed
//! with their wire strings in `ERROR_CODES.md`.

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Jwt(#[from] crate::auth::JwtConfigError),
    #[error(transparent)]
    Database(#[from] crate::db::DbError),
    #[error("replication setup failed: {0}")]
    Replication(crate::replication::conn::ConnError),
    #[error("server I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the database lacks walcast migrations {0} and MIGRATE_ON_START is off: run `walcast migrate` (or start once with MIGRATE_ON_START=true)")]
    MigrationsPending(String),
    /// The database user lacks something walcast needs; the message names the grant.
    #[error("{0}")]
    Privilege(String),
    /// Cluster mode could not start (a credentials file, NATS URLs).
    #[error(transparent)]
    Cluster(#[from] crate::channels::cluster::ClusterError),
}
