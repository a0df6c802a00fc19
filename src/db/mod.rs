//! Ordinary SQL: connection settings, a small pool, the migrations runner, and the read
//! replicas row checks may run on ([`replicas`]).

pub mod handback;
pub mod janitor;
pub mod migrations;
pub mod privileges;
pub mod replicas;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, NoTls};

/// Prepared statements kept per connection; past this many they are deallocated and it starts
/// over.
const STATEMENTS_PER_CONNECTION: usize = 256;

/// Session settings for every walcast connection, replication included: they fix the text form
/// of values (timestamps in UTC and ISO, hex bytea, shortest exact floats), which the value
/// conversion and filter comparison rely on.
pub const SESSION_GUCS: &[(&str, &str)] = &[
    ("DateStyle", "ISO, MDY"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "1"),
];

/// Where the database is. Built from `DB_HOST`/`DB_PORT`/... or `DATABASE_URL`.
#[derive(Clone)]
pub struct DbConfig {
    /// A host name, an IP, or a directory holding the Unix socket.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    /// TLS (`sslmode`/`sslrootcert`, or `DB_SSL`/`DB_SSL_CA_CERT`); never used on a Unix socket.
    pub tls: tls::TlsSettings,
}

impl std::fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.tls.mode.as_str())
            .field("sslrootcert", &self.tls.root_cert)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error: {}", postgres_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("DATABASE_URL is not a valid postgres:// URL: {0}")]
    BadUrl(String),
    #[error("timed out waiting for a database connection")]
    PoolTimeout,
    /// TLS could not be set up or was refused: a setting to fix, not a state to wait out.
    #[error("{0}")]
    Tls(String),
}

/// PostgreSQL's own words for an error it raised (tokio-postgres prints only "db error").
fn postgres_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.hint() {
            Some(hint) => format!("{} ({}; hint: {hint})", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => e.to_string(),
    }
}

impl DbError {
    /// The server's error, when PostgreSQL refused a statement.
    pub fn db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            DbError::Postgres(e) => e.as_db_error(),
            _ => None,
        }
    }
}

impl DbConfig {
    /// Parses `postgres://user:password@host:port/dbname`.
    pub fn from_url(url: &str) -> Result<Self, DbError> {
        let bad = || DbError::BadUrl(url.split('@').next_back().unwrap_or("").to_owned());
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(bad)?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut tls = tls::TlsSettings::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "sslmode" => {
                    tls.mode = tls::SslMode::parse(&v).ok_or_else(|| {
                        DbError::BadUrl(format!(
                            "sslmode={v} is not one of disable, prefer, require, verify-ca, verify-full"
                        ))
                    })?;
                }
                "sslrootcert" => tls.root_cert = Some(v.into_owned().into()),
                _ => {}
            }
        }
        let (auth, hostpart) = rest.rsplit_once('@').unwrap_or(("", rest));
        let (user, password) = match auth.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (auth, None),
        };
        let (hostport, dbname) = hostpart.split_once('/').unwrap_or((hostpart, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
            None => (hostport, 5432),
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Ok(Self {
            host: if host.is_empty() {
                "localhost".into()
            } else {
                decode(host)
            },
            port,
            user: if user.is_empty() {
                "postgres".into()
            } else {
                decode(user)
            },
            password: password.map(decode),
            dbname: if dbname.is_empty() {
                "postgres".into()
            } else {
                decode(dbname)
            },
            tls,
        })
    }

    pub fn pg_config(&self, application_name: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(application_name)
            .connect_timeout(Duration::from_secs(10));
        if let Some(pw) = &self.password {
            c.password(pw);
        }
        let options: Vec<String> = SESSION_GUCS
            .iter()
            .map(|(k, v)| format!("-c {k}={}", v.replace(' ', "\\ ")))
            .collect();
        c.options(options.join(" "));
        c.ssl_mode(match self.tls.mode {
            tls::SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            tls::SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        c
    }

    /// Whether connections go over a Unix socket (where TLS does not apply).
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The rustls configuration to connect with, `None` for plain connections.
    pub fn tls_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, DbError> {
        if self.is_unix_socket() {
            return Ok(None);
        }
        self.tls
            .client_config()
            .map_err(|e| DbError::Tls(format!("TLS to PostgreSQL: {e}")))
    }

    /// Opens one connection with `config` (made from [`DbConfig::pg_config`]) over TLS when
    /// `tls` is given; its I/O runs on a task of its own until the client is dropped.
    pub async fn connect_with(
        &self,
        config: &tokio_postgres::Config,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, DbError> {
        let client = match tls {
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "database connection closed");
                    }
                });
                client
            }
            Some(tls) => {
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
                let (client, connection) = config
                    .connect(connector)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "database connection closed");
                    }
                });
                client
            }
        };
        Ok(client)
    }

    /// A connection error in words that name the cause, for TLS failures.
    fn connect_error(&self, e: tokio_postgres::Error) -> DbError {
        if let Some(msg) = tls::explain(&e, &self.host, &self.tls) {
            return DbError::Tls(msg);
        }
        let refused = std::error::Error::source(&e)
            .is_some_and(|s| s.to_string().contains("server does not support TLS"));
        if refused {
            return DbError::Tls(tls::server_refused_tls(&self.tls));
        }
        DbError::Postgres(e)
    }
}

/// A small pool of SQL connections. Connections are made on demand up to `size`; a broken one
/// is dropped and replaced on the next checkout.
pub struct Pool {
    config: tokio_postgres::Config,
    db: DbConfig,
    /// Built once: a root certificate that cannot be read fails every checkout with its cause.
    tls: Result<Option<Arc<rustls::ClientConfig>>, String>,
    /// Run on every new connection (`DB_AFTER_CONNECT_QUERY`).
    after_connect: Option<String>,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
    size: usize,
}

/// A pooled connection and the statements prepared on it (parsed and planned once, then only
/// executed).
struct Conn {
    client: Client,
    /// SQL-level prepared statements (`PREPARE`), for `EXECUTE` from inside a function:
    /// (parameter types, SQL) → name.
    named: HashMap<(String, String), String>,
    next_name: u64,
    /// Set when the session's state is in doubt: the connection is closed, not reused.
    discard: bool,
}

pub struct PooledClient {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for PooledClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self
            .conn
            .as_ref()
            .expect("client present until drop")
            .client
    }
}

impl std::ops::DerefMut for PooledClient {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self
            .conn
            .as_mut()
            .expect("client present until drop")
            .client
    }
}

impl PooledClient {
    /// The name of a statement prepared with SQL `PREPARE` on this connection (for `EXECUTE`
    /// from SQL), preparing it the first time. `types` is the parameter type list. PostgreSQL
    /// re-plans a prepared statement itself when a table it reads changes.
    pub async fn named_statement(&mut self, sql: &str, types: &str) -> Result<String, DbError> {
        let conn = self.conn.as_mut().expect("client present until drop");
        let key = (types.to_owned(), sql.to_owned());
        if let Some(name) = conn.named.get(&key) {
            return Ok(name.clone());
        }
        if conn.named.len() >= STATEMENTS_PER_CONNECTION {
            for (_, name) in conn.named.drain() {
                conn.client
                    .batch_execute(&format!("DEALLOCATE {name}"))
                    .await?;
            }
        }
        conn.next_name += 1;
        let name = format!("walcast_stmt_{}", conn.next_name);
        conn.client
            .batch_execute(&format!("PREPARE {name}({types}) AS {sql}"))
            .await?;
        conn.named.insert(key, name.clone());
        Ok(name)
    }

    /// Closes this connection instead of returning it to the pool (after an error that leaves
    /// its session state in doubt, such as its prepared statements).
    pub fn discard(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.discard = true;
        }
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            if !c.client.is_closed() && !c.discard {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(c);
            }
        }
    }
}

impl Pool {
    pub fn new(db: &DbConfig, size: usize) -> Arc<Self> {
        Self::with_after_connect(db, size, None)
    }

    pub fn with_after_connect(
        db: &DbConfig,
        size: usize,
        after_connect: Option<String>,
    ) -> Arc<Self> {
        Self::named(db, "walcast", size, after_connect)
    }

    /// A pool whose connections show `application_name` in `pg_stat_activity`.
    pub fn named(
        db: &DbConfig,
        application_name: &str,
        size: usize,
        after_connect: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config: db.pg_config(application_name),
            db: db.clone(),
            tls: db.tls_config().map_err(|e| e.to_string()),
            after_connect: after_connect.filter(|q| !q.trim().is_empty()),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size.max(1))),
            size: size.max(1),
        })
    }

    /// How many connections the pool opens at most.
    pub fn size(&self) -> usize {
        self.size
    }

    pub async fn get(self: &Arc<Self>) -> Result<PooledClient, DbError> {
        let permit = tokio::time::timeout(
            Duration::from_secs(30),
            self.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| DbError::PoolTimeout)?
        .map_err(|_| DbError::PoolTimeout)?;
        let reuse = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let mut found = None;
            while let Some(c) = idle.pop() {
                if !c.client.is_closed() {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let client = match reuse {
            Some(c) => c,
            None => {
                let tls = self.tls.clone().map_err(DbError::Tls)?;
                let client = self.db.connect_with(&self.config, tls).await?;
                if let Some(q) = &self.after_connect {
                    client.batch_execute(q).await?;
                }
                Conn {
                    client,
                    named: HashMap::new(),
                    next_name: 0,
                    discard: false,
                }
            }
        };
        Ok(PooledClient {
            conn: Some(client),
            pool: self.clone(),
            _permit: permit,
        })
    }
}

/// Quotes a string as an SQL literal, correct whatever `standard_conforming_strings` is
/// (backslashes go into an `E'...'` string, doubled), like PostgreSQL's `quote_literal`.
pub fn quote_literal(value: &str) -> String {
    if value.contains('\\') {
        format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

/// A PostgreSQL array literal of text elements: every element double-quoted, with `\` and `"`
/// escaped, so any text (commas, braces, quotes, `NULL`) stays one element.
pub fn text_array_literal<S: AsRef<str>>(items: &[S]) -> String {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for ch in item.as_ref().chars() {
            if ch == '"' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Quotes an identifier for SQL (`"name"`, doubling inner quotes).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_database_urls() {
        let c =
            DbConfig::from_url("postgres://me:p%40ss@db.example:6543/app?sslmode=disable").unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.user.as_str(),
                c.password.as_deref(),
                c.dbname.as_str()
            ),
            ("db.example", 6543, "me", Some("p@ss"), "app")
        );
        let c = DbConfig::from_url("postgresql://localhost/x").unwrap();
        assert_eq!(
            (c.port, c.user.as_str(), c.password),
            (5432, "postgres", None)
        );
        assert!(DbConfig::from_url("mysql://x").is_err());
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
