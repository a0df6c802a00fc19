//! JWT verification: the tenant secret (HS256/384/512) and a static JWKS (RS*, PS*, ES256/384,
//! EdDSA, and `oct` keys), picked by the token's `kid` the way the original picks them.
//!
//! The claims checks are done here rather than by the JWT library so that every failure maps to
//! the exact message the protocol uses (see [`AuthError`]).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Why a token was refused. `Display` is the reason without a code, as used in `system` shutdown
/// messages; [`AuthError::join_reason`] and [`AuthError::connect_message`] give the other forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("API key is missing")]
    Missing,
    #[error("The token provided is not a valid JWT")]
    Malformed,
    #[error("Failed to validate JWT signature")]
    Signature,
    #[error("Failed to generate JWT signer, check your JWT secret or JWKS configuration")]
    Signer,
    #[error("Failed to generate JWT signer for key ID (kid) {0:?}, check your JWT secret or JWKS configuration")]
    SignerForKid(String),
    #[error("Token has expired {0} seconds ago")]
    Expired(i64),
    #[error("Token is not valid yet, it becomes valid in {0} seconds")]
    NotYetValid(i64),
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
    #[error("Token claim `{0}` does not have the expected value")]
    ClaimMismatch(String),
}

impl AuthError {
    /// The `{"reason": ...}` of a refused `phx_join` (`Code: message`).
    pub fn join_reason(&self) -> String {
        let code = self.join_code();
        let msg = match self {
            AuthError::Missing => AuthError::Malformed.to_string(),
            other => other.to_string(),
        };
        format!("{code}: {msg}")
    }

    /// The code of a refused `phx_join` (the part of [`AuthError::join_reason`] before `:`).
    pub fn join_code(&self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::Malformed => "MalformedJWT",
            AuthError::Signature => "JwtSignatureError",
            AuthError::Signer | AuthError::SignerForKid(_) => "JwtSignerError",
            AuthError::Expired(_)
            | AuthError::NotYetValid(_)
            | AuthError::MissingClaims
            | AuthError::ClaimMismatch(_) => "InvalidJWTToken",
        }
    }

    /// The `{"error": ...}` body of a refused WebSocket upgrade (always HTTP 401).
    pub fn connect_message(&self) -> String {
        match self {
            AuthError::Expired(_) => "Token has expired".to_owned(),
            AuthError::NotYetValid(_) | AuthError::ClaimMismatch(_) => {
                AuthError::Malformed.to_string()
            }
            other => other.to_string(),
        }
    }

    /// A short stable label for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Signature => "signature",
            AuthError::Signer | AuthError::SignerForKid(_) => "signer",
            AuthError::Expired(_) => "expired",
            AuthError::NotYetValid(_) => "not_yet_valid",
            AuthError::MissingClaims => "missing_claims",
            AuthError::ClaimMismatch(_) => "claim_mismatch",
        }
    }
}

/// The verified claims of a token.
#[derive(Debug, Clone)]
pub struct Claims {
    /// Every claim, with `exp`/`iat` rounded to integers as the original does.
    pub raw: Arc<Map<String, Value>>,
    pub role: String,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: i64,
}

impl Claims {
    pub fn sub(&self) -> Option<&str> {
        self.raw.get("sub").and_then(Value::as_str)
    }
}

/// Verifies tokens against the configured secret and JWKS.
pub struct JwtVerifier {
    secret: Option<Vec<u8>>,
    jwks: Option<JwkSet>,
    /// Extra `claim == value` checks (`JWT_CLAIM_VALIDATORS`).
    validators: Map<String, Value>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("JwtVerifier")
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("jwks_keys", &self.jwks.as_ref().map(|j| j.keys.len()))
            .field("validators", &self.validators.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A configuration problem with the JWT settings, reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("JWT_JWKS is not a valid JWKS (expected {{\"keys\": [...]}}): {0}")]
    Jwks(serde_json::Error),
    #[error("JWT_CLAIM_VALIDATORS must be a JSON object: {0}")]
    Validators(String),
}

impl JwtVerifier {
    pub fn new(
        secret: Option<&str>,
        jwks: Option<&str>,
        validators: Option<&str>,
    ) -> Result<Self, JwtConfigError> {
        let jwks = match jwks.map(str::trim).filter(|s| !s.is_empty()) {
            Some(text) => Some(serde_json::from_str::<JwkSet>(text).map_err(JwtConfigError::Jwks)?),
            None => None,
        };
        let validators = match validators.map(str::trim).filter(|s| !s.is_empty()) {
            Some(text) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(map)) => map,
                Ok(other) => return Err(JwtConfigError::Validators(other.to_string())),
                Err(e) => return Err(JwtConfigError::Validators(e.to_string())),
            },
            None => Map::new(),
        };
        Ok(Self {
            secret: secret
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec()),
            jwks,
            validators,
        })
    }

    /// Verifies a token and requires `role` and `exp`, as sockets, channels and REST all do.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_at(token, now_secs())
    }

    /// Verifies the signature and the time claims only (no `role` needed): admin and metrics
    /// tokens.
    pub fn verify_signature(&self, token: &str) -> Result<(), AuthError> {
        match self.verify_at(token, now_secs()) {
            Ok(_) | Err(AuthError::MissingClaims) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn verify_at(&self, token: &str, now: i64) -> Result<Claims, AuthError> {
        let token = clean_token(token);
        if token.is_empty() {
            return Err(AuthError::Malformed);
        }
        let header = peek_header(&token)?;
        let (alg, key) = self.signer(&header)?;
        let mut validation = Validation::new(alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(&token, &key, &validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => AuthError::Signature,
                    jsonwebtoken::errors::ErrorKind::InvalidKeyFormat
                    | jsonwebtoken::errors::ErrorKind::InvalidRsaKey(_)
                    | jsonwebtoken::errors::ErrorKind::InvalidEcdsaKey
                    | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => match &header.kid {
                        Some(kid) => AuthError::SignerForKid(kid.clone()),
                        None => AuthError::Signer,
                    },
                    _ => AuthError::Malformed,
                }
            })?;
        self.check_claims(data.claims, now)
    }

    fn check_claims(&self, mut raw: Map<String, Value>, now: i64) -> Result<Claims, AuthError> {
        for (claim, expected) in &self.validators {
            if raw.get(claim) != Some(expected) {
                return Err(AuthError::ClaimMismatch(claim.clone()));
            }
        }
        let exp = match raw.get("exp") {
            None => None,
            Some(v) => Some(rounded(v).ok_or(AuthError::Malformed)?),
        };
        if let Some(exp) = exp {
            if exp <= now {
                return Err(AuthError::Expired(now - exp));
            }
            raw.insert("exp".into(), Value::from(exp));
        }
        if let Some(iat) = raw.get("iat") {
            let iat = rounded(iat).ok_or(AuthError::Malformed)?;
            raw.insert("iat".into(), Value::from(iat));
        }
        if let Some(nbf) = raw.get("nbf") {
            let nbf = rounded(nbf).ok_or(AuthError::Malformed)?;
            if nbf > now {
                return Err(AuthError::NotYetValid(nbf - now));
            }
        }
        let role = match raw.get("role") {
            Some(Value::String(role)) => role.clone(),
            Some(_) => return Err(AuthError::MissingClaims),
            None => return Err(AuthError::MissingClaims),
        };
        let exp = exp.ok_or(AuthError::MissingClaims)?;
        Ok(Claims {
            raw: Arc::new(raw),
            role,
            exp,
        })
    }

    fn signer(&self, header: &PeekedHeader) -> Result<(Algorithm, DecodingKey), AuthError> {
        let signer_error = || match &header.kid {
            Some(kid) => AuthError::SignerForKid(kid.clone()),
            None => AuthError::Signer,
        };
        let alg = match header.alg.as_str() {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" | "Ed25519" => Algorithm::EdDSA,
            // `none`, ES512, Ed448 and anything unknown: no signer can be built.
            _ => return Err(AuthError::Signer),
        };
        let is_hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        if is_hmac {
            // An `oct` JWK with the token's kid wins; otherwise the secret (Supabase Auth tokens
            // carry a kid but the secret is not published as a JWK).
            if let Some(jwk) = self.find_jwk(header.kid.as_deref(), |p| {
                matches!(p, AlgorithmParameters::OctetKey(_))
            }) {
                let AlgorithmParameters::OctetKey(oct) = &jwk.algorithm else {
                    return Err(signer_error());
                };
                let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(oct.value.trim_end_matches('='))
                    .map_err(|_| signer_error())?;
                return Ok((alg, DecodingKey::from_secret(&secret)));
            }
            let secret = self.secret.as_deref().ok_or(AuthError::Signer)?;
            return Ok((alg, DecodingKey::from_secret(secret)));
        }
        // Asymmetric: only a JWK of the matching key type, found by kid, may verify it. The
        // secret is never used, so an RSA public key cannot be replayed as an HMAC secret.
        let kid = header.kid.as_deref().ok_or(AuthError::Signer)?;
        let jwk = self
            .find_jwk(Some(kid), |p| match alg {
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => matches!(p, AlgorithmParameters::RSA(_)),
                Algorithm::ES256 | Algorithm::ES384 => {
                    matches!(p, AlgorithmParameters::EllipticCurve(_))
                }
                Algorithm::EdDSA => matches!(p, AlgorithmParameters::OctetKeyPair(_)),
                _ => false,
            })
            .ok_or_else(signer_error)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| signer_error())?;
        Ok((alg, key))
    }

    fn find_jwk(
        &self,
        kid: Option<&str>,
        kind: impl Fn(&AlgorithmParameters) -> bool,
    ) -> Option<&Jwk> {
        let kid = kid?;
        self.jwks
            .as_ref()?
            .keys
            .iter()
            .find(|jwk| jwk.common.key_id.as_deref() == Some(kid) && kind(&jwk.algorithm))
    }
}

struct PeekedHeader {
    alg: String,
    kid: Option<String>,
}

/// Reads the header without trusting it: a token that is not three base64url parts with a JSON
/// object header and a JSON object payload is malformed.
fn peek_header(token: &str) -> Result<PeekedHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let decode = |part: &str| -> Result<Map<String, Value>, AuthError> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .map_err(|_| AuthError::Malformed)?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(AuthError::Malformed),
        }
    };
    decode(payload)?;
    let header = decode(header)?;
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg.clone(),
        _ => return Err(AuthError::Signer),
    };
    let kid = match header.get("kid") {
        Some(Value::String(kid)) => Some(kid.clone()),
        _ => None,
    };
    Ok(PeekedHeader { alg, kid })
}

/// URI-decodes and strips all whitespace, as the original does before verifying.
pub fn clean_token(token: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(token).decode_utf8_lossy();
    decoded.chars().filter(|c| !c.is_whitespace()).collect()
}

fn rounded(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.round() as i64)
        }),
        _ => None,
    }
}

/// Signs `claims` with the HS256 `secret`: the tokens `walcast token` and `walcast dev` hand
/// out (development and operator use; apps get theirs from their auth server).
pub fn mint(
    secret: &str,
    claims: &serde_json::Value,
) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// `claims` with `role`, `iat` now and `exp` `expires_in` seconds from now, and `sub` when
/// given; other claims kept as given.
pub fn claims_for(
    mut claims: serde_json::Map<String, serde_json::Value>,
    role: &str,
    sub: Option<&str>,
    expires_in: u64,
) -> serde_json::Value {
    let now = now_secs();
    claims.insert("role".into(), role.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), now.saturating_add(expires_in as i64).into());
    if let Some(sub) = sub {
        claims.insert("sub".into(), sub.into());
    }
    serde_json::Value::Object(claims)
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

    fn hs(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(Some(SECRET), None, None).unwrap()
    }

    #[test]
    fn accepts_a_valid_token_and_rounds_exp() {
        let c = verifier()
            .verify_at(&hs(json!({"role":"anon","exp":1000.4,"sub":"u1"})), 10)
            .unwrap();
        assert_eq!(c.role, "anon");
        assert_eq!(c.exp, 1000);
        assert_eq!(c.sub(), Some("u1"));
    }

    #[test]
    fn exact_errors() {
        let v = verifier();
        assert_eq!(
            v.verify_at(&hs(json!({"role":"anon","exp":100})), 130)
                .unwrap_err(),
            AuthError::Expired(30)
        );
        assert_eq!(
            v.verify_at(&hs(json!({"exp":1000})), 10).unwrap_err(),
            AuthError::MissingClaims
        );
        assert_eq!(
            v.verify_at(&hs(json!({"role":"anon"})), 10).unwrap_err(),
            AuthError::MissingClaims
        );
        assert_eq!(
            v.verify_at("garbage", 10).unwrap_err(),
            AuthError::Malformed
        );
        assert_eq!(v.verify_at("a.b.c", 10).unwrap_err(), AuthError::Malformed);
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({"role":"anon","exp":1000}),
            &EncodingKey::from_secret(b"other"),
        )
        .unwrap();
        assert_eq!(v.verify_at(&other, 10).unwrap_err(), AuthError::Signature);
        assert_eq!(
            AuthError::SignerForKid("k1".into()).to_string(),
            "Failed to generate JWT signer for key ID (kid) \"k1\", check your JWT secret or JWKS configuration"
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let token = format!(
            "{}.{}.",
            b64(json!({"alg":"none","typ":"JWT"})),
            b64(json!({"role":"service_role","exp":9999999999i64}))
        );
        assert_eq!(
            verifier().verify_at(&token, 10).unwrap_err(),
            AuthError::Signer
        );
    }

    #[test]
    fn whitespace_and_percent_encoding_are_cleaned() {
        let t = hs(json!({"role":"anon","exp":1000}));
        let messy = format!(" {}\n{} ", &t[..10], &t[10..]);
        assert!(verifier().verify_at(&messy, 10).is_ok());
    }

    #[test]
    fn claim_validators() {
        let v = JwtVerifier::new(Some(SECRET), None, Some(r#"{"iss":"me"}"#)).unwrap();
        assert!(v
            .verify_at(&hs(json!({"role":"anon","exp":1000,"iss":"me"})), 10)
            .is_ok());
        assert_eq!(
            v.verify_at(&hs(json!({"role":"anon","exp":1000,"iss":"you"})), 10)
                .unwrap_err(),
            AuthError::ClaimMismatch("iss".into())
        );
    }

    #[test]
    fn not_before_in_the_future_is_refused() {
        assert_eq!(
            verifier()
                .verify_at(&hs(json!({"role":"anon","exp":1000,"nbf":50})), 10)
                .unwrap_err(),
            AuthError::NotYetValid(40)
        );
    }

    #[test]
    fn join_reasons() {
        assert_eq!(
            AuthError::Expired(3).join_reason(),
            "InvalidJWTToken: Token has expired 3 seconds ago"
        );
        assert_eq!(
            AuthError::Malformed.join_reason(),
            "MalformedJWT: The token provided is not a valid JWT"
        );
        assert_eq!(
            AuthError::Signature.join_reason(),
            "JwtSignatureError: Failed to validate JWT signature"
        );
    }
}
