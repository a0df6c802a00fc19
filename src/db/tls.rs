//! TLS to PostgreSQL, with rustls: the modes of libpq's `sslmode` (and the original's `DB_SSL` /
//! `DB_SSL_CA_CERT`), one client configuration for the SQL pool and the replication stream
//! alike, and errors that name the cause.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// libpq's `sslmode`, as walcast applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not verified (unless a
    /// root certificate is given, as libpq does). libpq's default.
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is not verified (unless a root certificate is given).
    Require,
    /// TLS, and the server's certificate must chain to a trusted root.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host walcast connected to.
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "prefer" | "allow" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// How walcast talks TLS to PostgreSQL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// Trusted roots (PEM): `sslrootcert` or `DB_SSL_CA_CERT`. Without it, verifying modes
    /// trust the system's roots.
    pub root_cert: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the root certificate {path}: {detail}")]
    RootCert { path: String, detail: String },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

impl TlsSettings {
    /// The rustls configuration for these settings; `None` for `disable`.
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        let verify_chain = match self.mode {
            SslMode::Disable => return Ok(None),
            // libpq: with a root certificate, `require` (and `prefer`) verify the chain.
            SslMode::Prefer | SslMode::Require => self.root_cert.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let verifier: Arc<dyn ServerCertVerifier> = if verify_chain {
            let roots = Arc::new(self.roots()?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::RootCert {
                    path: self.root_label(),
                    detail: e.to_string(),
                })?;
            if self.mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        } else {
            Arc::new(Unverified(provider))
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Some(Arc::new(config)))
    }

    fn root_label(&self) -> String {
        self.root_cert
            .as_deref()
            .map_or("the system's roots".into(), |p| p.display().to_string())
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certs = read_pem_certs(path)?;
                for c in certs {
                    roots.add(c).map_err(|e| TlsError::RootCert {
                        path: path.display().to_string(),
                        detail: e.to_string(),
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err(TlsError::RootCert {
                        path: "the system's roots".into(),
                        detail: "none found: set sslrootcert (DATABASE_URL) or DB_SSL_CA_CERT"
                            .into(),
                    });
                }
            }
        }
        Ok(roots)
    }
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |detail: String| TlsError::RootCert {
        path: path.display().to_string(),
        detail,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not PEM certificates: {e:?}")))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The server name rustls checks and sends (SNI) for `host`.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host} is not a host name: {e}"))
}

/// `verify-ca`: the chain must be trusted; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` without a root certificate: encrypted, the certificate not verified (the
/// handshake's signatures still are), as libpq does.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS failure in words an operator can act on, when `error` (or one of its sources) is one;
/// `host` and `settings` are what walcast was asked to do.
pub fn explain(
    error: &(dyn std::error::Error + 'static),
    host: &str,
    settings: &TlsSettings,
) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return Some(describe(tls, host, settings));
        }
        next = e.source();
    }
    None
}

fn describe(e: &rustls::Error, host: &str, settings: &TlsSettings) -> String {
    let mode = settings.mode.as_str();
    let roots = settings.root_label();
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "TLS to PostgreSQL: the server's certificate is not trusted: it is not signed by \
                 a root in {roots} (sslmode={mode}; {e})"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "TLS to PostgreSQL: the server's certificate does not name the host {host} \
                     (sslmode=verify-full checks the host name; connect by a name the \
                     certificate lists, or use verify-ca; {e})"
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("TLS to PostgreSQL: the server's certificate has expired ({e})")
            }
            _ => format!("TLS to PostgreSQL: the server's certificate was refused ({e})"),
        },
        _ => format!("TLS to PostgreSQL failed (sslmode={mode}): {e}"),
    }
}

/// What walcast says when the server answers "no TLS" and the mode requires it.
pub fn server_refused_tls(settings: &TlsSettings) -> String {
    format!(
        "TLS to PostgreSQL: the server does not support TLS (it answered the TLS request with \
         'N'), and sslmode={} requires it: enable ssl on the server, or use sslmode=prefer \
         or disable (DB_SSL=false)",
        settings.mode.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_like_libpq() {
        for (s, m) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(SslMode::parse(s), Some(m));
            if s != "allow" {
                assert_eq!(m.as_str(), s);
            }
        }
        assert_eq!(SslMode::parse("verify_full"), None);
        assert_eq!(SslMode::parse(""), None);
    }

    #[test]
    fn a_missing_root_certificate_is_named() {
        let s = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
        };
        let e = s.client_config().err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("/nonexistent/ca.pem")),
            "{e:?}"
        );
        assert!(TlsSettings {
            mode: SslMode::Disable,
            root_cert: None
        }
        .client_config()
        .is_ok_and(|c| c.is_none()));
    }
}
