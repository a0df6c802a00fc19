//! A PostgreSQL connection in replication mode, on `postgres-protocol`'s codecs: startup with
//! `replication=database`, password/MD5/SCRAM authentication, simple queries, and the CopyBoth
//! stream of `START_REPLICATION` (which `tokio-postgres` cannot do).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::db::DbConfig;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot reach PostgreSQL at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("replication connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL error {code}: {message}")]
    Server { code: String, message: String },
    #[error("authentication method not supported: {0}")]
    UnsupportedAuth(&'static str),
    #[error("a password is required (DB_PASSWORD)")]
    PasswordRequired,
    #[error("unexpected message from PostgreSQL: {0}")]
    Protocol(String),
    #[error("the replication connection was closed by PostgreSQL")]
    Closed,
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Refused(String),
}

impl ConnError {
    /// The SQLSTATE when PostgreSQL refused something.
    pub fn code(&self) -> Option<&str> {
        match self {
            ConnError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One frame of the replication stream.
#[derive(Debug)]
pub enum CopyFrame {
    /// `w`: WAL data, the payload being one pgoutput message.
    XLogData {
        wal_start: u64,
        wal_end: u64,
        data: Bytes,
    },
    /// `k`: keepalive; `reply` asks for a status update now.
    Keepalive { wal_end: u64, reply: bool },
}

pub struct ReplicationConn {
    stream: Box<dyn Stream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// Rows of a simple query, as text.
pub type Rows = Vec<Vec<Option<String>>>;

impl ReplicationConn {
    /// Connects and authenticates. `params` are extra startup parameters (GUCs).
    pub async fn connect(
        db: &DbConfig,
        application_name: &str,
        params: &[(&str, &str)],
    ) -> Result<Self, ConnError> {
        let stream: Box<dyn Stream> = if db.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", db.host, db.port);
            #[cfg(unix)]
            {
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|source| ConnError::Connect {
                        addr: path.clone(),
                        source,
                    })?;
                Box::new(s)
            }
            #[cfg(not(unix))]
            {
                return Err(ConnError::UnsupportedAuth("unix sockets"));
            }
        } else {
            let addr = format!("{}:{}", db.host, db.port);
            let s = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|source| ConnError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            s.set_nodelay(true)?;
            Self::maybe_tls(s, db).await?
        };
        let mut conn = Self {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
        };
        let mut startup = vec![
            ("user", db.user.as_str()),
            ("database", db.dbname.as_str()),
            ("replication", "database"),
            ("application_name", application_name),
        ];
        startup.extend_from_slice(params);
        frontend::startup_message(startup, &mut conn.wbuf)?;
        conn.flush().await?;
        conn.authenticate(db)
            .await
            .map_err(|e| pooler_refusal(e, db))?;
        Ok(conn)
    }

    /// Asks for TLS as `db.tls` says (the SSLRequest message, then a rustls handshake), falling
    /// back to the plain socket only where the mode allows it (`prefer`).
    async fn maybe_tls(
        mut tcp: tokio::net::TcpStream,
        db: &DbConfig,
    ) -> Result<Box<dyn Stream>, ConnError> {
        let config = match db.tls_config() {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(Box::new(tcp)),
            Err(e) => return Err(ConnError::Tls(e.to_string())),
        };
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        tcp.write_all(&buf).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            b'N' if db.tls.mode == crate::db::tls::SslMode::Prefer => return Ok(Box::new(tcp)),
            b'N' => return Err(ConnError::Tls(crate::db::tls::server_refused_tls(&db.tls))),
            other => {
                return Err(ConnError::Protocol(format!(
                    "unexpected answer {other:#04x} to the TLS request"
                )))
            }
        }
        let name = crate::db::tls::server_name(&db.host).map_err(ConnError::Tls)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| {
                ConnError::Tls(
                    crate::db::tls::explain(&e, &db.host, &db.tls)
                        .unwrap_or_else(|| format!("TLS to PostgreSQL failed: {e}")),
                )
            })?;
        Ok(Box::new(tls))
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads one backend message. CopyBothResponse (`W`), which postgres-protocol does not know,
    /// is returned as `None` after being consumed.
    async fn read(&mut self) -> Result<Option<backend::Message>, ConnError> {
        loop {
            if self.rbuf.len() >= 5 && self.rbuf[0] == b'W' {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if self.rbuf.len() > len {
                    self.rbuf.advance(len + 1);
                    return Ok(None);
                }
            } else if let Some(msg) = backend::Message::parse(&mut self.rbuf)? {
                return Ok(Some(msg));
            }
            self.rbuf.reserve(8 * 1024);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ConnError::Closed);
            }
        }
    }

    async fn read_msg(&mut self) -> Result<backend::Message, ConnError> {
        match self.read().await? {
            Some(backend::Message::ErrorResponse(body)) => Err(server_error(&body)),
            Some(m) => Ok(m),
            None => Err(ConnError::Protocol(
                "CopyBothResponse outside START_REPLICATION".into(),
            )),
        }
    }

    async fn authenticate(&mut self, db: &DbConfig) -> Result<(), ConnError> {
        loop {
            match self.read_msg().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = db.password.as_deref().ok_or(ConnError::PasswordRequired)?;
                    frontend::password_message(pw.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = db.password.as_deref().ok_or(ConnError::PasswordRequired)?;
                    let hashed = postgres_protocol::authentication::md5_hash(
                        db.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hashed.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let pw = db.password.as_deref().ok_or(ConnError::PasswordRequired)?;
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == "SCRAM-SHA-256";
                    }
                    if !has_scram {
                        return Err(ConnError::UnsupportedAuth("SASL without SCRAM-SHA-256"));
                    }
                    let mut scram = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        "SCRAM-SHA-256",
                        scram.message(),
                        &mut self.wbuf,
                    )?;
                    self.flush().await?;
                    match self.read_msg().await? {
                        backend::Message::AuthenticationSaslContinue(b) => {
                            scram.update(b.data())?
                        }
                        other => return Err(unexpected(&other)),
                    }
                    frontend::sasl_response(scram.message(), &mut self.wbuf)?;
                    self.flush().await?;
                    match self.read_msg().await? {
                        backend::Message::AuthenticationSaslFinal(b) => scram.finish(b.data())?,
                        other => return Err(unexpected(&other)),
                    }
                }
                backend::Message::AuthenticationKerberosV5
                | backend::Message::AuthenticationScmCredential
                | backend::Message::AuthenticationGss
                | backend::Message::AuthenticationSspi => {
                    return Err(ConnError::UnsupportedAuth("Kerberos/GSS/SSPI"))
                }
                backend::Message::ParameterStatus(_)
                | backend::Message::BackendKeyData(_)
                | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// Runs a simple query (replication commands included) and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, ConnError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read().await? {
                Some(backend::Message::DataRow(row)) => {
                    let buf = row.buffer();
                    let mut values = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(range) = ranges.next()? {
                        values.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(values);
                }
                Some(backend::Message::ErrorResponse(body)) => error = Some(server_error(&body)),
                Some(backend::Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                Some(_) => {}
                None => return Err(ConnError::Protocol("unexpected CopyBothResponse".into())),
            }
        }
    }

    /// Sends `START_REPLICATION` and waits for the CopyBoth stream to open.
    pub async fn start_replication(&mut self, command: &str) -> Result<(), ConnError> {
        frontend::query(command, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            match self.read().await? {
                None => return Ok(()),
                Some(backend::Message::ErrorResponse(body)) => {
                    let e = server_error(&body);
                    // Drain to ReadyForQuery so the connection stays usable.
                    loop {
                        if let Some(backend::Message::ReadyForQuery(_)) = self.read().await? {
                            return Err(e);
                        }
                    }
                }
                Some(backend::Message::NoticeResponse(_))
                | Some(backend::Message::ParameterStatus(_)) => {}
                Some(other) => return Err(unexpected(&other)),
            }
        }
    }

    /// The next frame of the replication stream.
    pub async fn next_frame(&mut self) -> Result<CopyFrame, ConnError> {
        loop {
            match self.read().await? {
                Some(backend::Message::CopyData(body)) => {
                    let data = Bytes::copy_from_slice(body.data());
                    if let Some(frame) = parse_copy_frame(data)? {
                        return Ok(frame);
                    }
                }
                Some(backend::Message::ErrorResponse(body)) => return Err(server_error(&body)),
                Some(backend::Message::CopyDone) => return Err(ConnError::Closed),
                Some(backend::Message::NoticeResponse(_))
                | Some(backend::Message::ParameterStatus(_)) => {}
                Some(other) => return Err(unexpected(&other)),
                None => {
                    return Err(ConnError::Protocol(
                        "CopyBothResponse inside the stream".into(),
                    ))
                }
            }
        }
    }

    /// Standby status update: everything up to `flush` is durably handled.
    pub async fn send_status(
        &mut self,
        write: u64,
        flush: u64,
        reply: bool,
    ) -> Result<(), ConnError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_MICROS;
        let mut p = BytesMut::with_capacity(34);
        p.put_u8(b'r');
        p.put_u64(write);
        p.put_u64(flush);
        p.put_u64(flush);
        p.put_i64(now);
        p.put_u8(u8::from(reply));
        frontend::CopyData::new(p.freeze())?.write(&mut self.wbuf);
        self.flush().await
    }
}

fn parse_copy_frame(mut data: Bytes) -> Result<Option<CopyFrame>, ConnError> {
    if data.is_empty() {
        return Ok(None);
    }
    match data.get_u8() {
        b'w' if data.len() >= 24 => {
            let wal_start = data.get_u64();
            let wal_end = data.get_u64();
            let _clock = data.get_i64();
            Ok(Some(CopyFrame::XLogData {
                wal_start,
                wal_end,
                data,
            }))
        }
        b'k' if data.len() >= 17 => {
            let wal_end = data.get_u64();
            let _clock = data.get_i64();
            let reply = data.get_u8() == 1;
            Ok(Some(CopyFrame::Keepalive { wal_end, reply }))
        }
        other => Err(ConnError::Protocol(format!(
            "unknown CopyData frame {other:#04x}"
        ))),
    }
}

/// A connection pooler (PgBouncer, Supavisor) in front of PostgreSQL refuses the `replication`
/// startup parameter: say that replication needs a direct connection, rather than pass on the
/// pooler's terse words.
fn pooler_refusal(e: ConnError, db: &DbConfig) -> ConnError {
    match &e {
        ConnError::Server { message, .. }
            if message.contains("unsupported startup parameter")
                || message.contains("replication") && message.contains("not supported") =>
        {
            ConnError::Refused(format!(
                "the replication connection to {}:{} was refused ({message}): this looks like a \
                 connection pooler (PgBouncer, Supavisor), and logical replication needs a direct \
                 connection to PostgreSQL (on Supabase: the database host on port 5432, not the \
                 pooler's port 6543)",
                db.host, db.port
            ))
        }
        _ => e,
    }
}

fn server_error(body: &backend::ErrorResponseBody) -> ConnError {
    let mut code = String::new();
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    ConnError::Server { code, message }
}

fn unexpected(m: &backend::Message) -> ConnError {
    let name = match m {
        backend::Message::CopyInResponse(_) => "CopyInResponse",
        backend::Message::CopyOutResponse(_) => "CopyOutResponse",
        backend::Message::RowDescription(_) => "RowDescription",
        backend::Message::CommandComplete(_) => "CommandComplete",
        _ => "other",
    };
    ConnError::Protocol(name.to_owned())
}

/// `0/16B3748` → LSN.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1A/0"), Some(0x1A << 32));
        assert_eq!(format_lsn(0x1_0000_0010), "1/10");
        assert_eq!(parse_lsn("zz"), None);
    }
}
