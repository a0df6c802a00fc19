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

/// Most bytes of client-supplied text echoed in an error message or written to the log per
/// field: a 4.5 MB filter echoed whole by 100 refused joins wrote 450 MB of log.
pub const MAX_ECHO_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes (at a character boundary), saying how much was left out.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} more bytes)", &s[..end], s.len() - end))
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clip_cuts_at_a_character_boundary_and_says_how_much() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc… (3 more bytes)");
        // 'é' is two bytes: the cut moves back rather than split it.
        assert_eq!(clip("aéb", 2), "a… (3 more bytes)");
    }
}
