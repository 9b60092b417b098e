//! The optional second identity factor: an OIDC JWT presented by the loop,
//! verified against a JWKS (issuer, audience, expiry, signature), then stripped
//! so the upstream only ever sees the stored credential.
//!
//! The kernel-attested workload is the first factor. A protocol handler that
//! finds a token where the loop would put a credential (HTTP `Authorization:
//! Bearer`, the PostgreSQL password, the SSH password) calls
//! [`JwtVerifier::verify`]; which workloads require it is policy.

use std::path::Path;

use jsonwebtoken::{
    decode, decode_header,
    errors::ErrorKind,
    jwk::{Jwk, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("cannot read the JWKS {path}: {reason}")]
    Jwks { path: String, reason: String },
    #[error("the token is not a JWT: {0}")]
    Malformed(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not yet valid")]
    NotYetValid,
    #[error("the token's audience is not {expected}")]
    WrongAudience { expected: String },
    #[error("the token's issuer is not {expected}")]
    WrongIssuer { expected: String },
    #[error("the token's key id {0:?} is not in the JWKS")]
    UnknownKey(Option<String>),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token's algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("the token is invalid: {0}")]
    Invalid(String),
}

/// Claims the agent records with the session (never the token itself).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    #[serde(default)]
    pub email: Option<String>,
}

pub struct JwtVerifier {
    keys: JwkSet,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("keys", &self.keys.keys.len())
            .finish()
    }
}

impl JwtVerifier {
    pub fn new(keys: JwkSet, issuer: &str, audience: &str) -> Self {
        Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        }
    }

    pub fn from_jwks_file(path: &Path, issuer: &str, audience: &str) -> Result<Self, JwtError> {
        let err = |reason: String| JwtError::Jwks {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let keys: JwkSet = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        Ok(Self::new(keys, issuer, audience))
    }

    fn key(&self, kid: Option<&str>) -> Option<&Jwk> {
        match kid {
            Some(k) => self.keys.find(k),
            None if self.keys.keys.len() == 1 => self.keys.keys.first(),
            None => None,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        let header = decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::PS256
                | Algorithm::EdDSA
        ) {
            // Symmetric algorithms would let anyone holding the "public" JWKS sign.
            return Err(JwtError::Algorithm(header.alg));
        }
        let jwk = self
            .key(header.kid.as_deref())
            .ok_or_else(|| JwtError::UnknownKey(header.kid.clone()))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| JwtError::Invalid(e.to_string()))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 30;
        decode::<Claims>(token, &key, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => JwtError::Expired,
                ErrorKind::ImmatureSignature => JwtError::NotYetValid,
                ErrorKind::InvalidAudience => JwtError::WrongAudience {
                    expected: self.audience.clone(),
                },
                ErrorKind::InvalidIssuer => JwtError::WrongIssuer {
                    expected: self.issuer.clone(),
                },
                ErrorKind::InvalidSignature => JwtError::BadSignature,
                _ => JwtError::Invalid(e.to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    use jsonwebtoken::{encode, EncodingKey, Header};

    use super::*;

    struct Issuer {
        key: EncodingKey,
        jwks: JwkSet,
    }

    /// A real P-256 key pair (rcgen) and its JWKS.
    fn issuer() -> Issuer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw(); // 0x04 || x || y
        let jwks: JwkSet = serde_json::from_value(serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }]}))
        .unwrap();
        Issuer {
            key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwks,
        }
    }

    fn token(i: &Issuer, aud: &str, exp_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        encode(
            &h,
            &serde_json::json!({"sub": "etl-bot", "iss": "https://idp.example", "aud": aud, "exp": now + exp_in, "iat": now}),
            &i.key,
        )
        .unwrap()
    }

    #[test]
    fn good_expired_and_wrong_audience_tokens() {
        let i = issuer();
        let v = JwtVerifier::new(i.jwks.clone(), "https://idp.example", "loopgate");
        let c = v.verify(&token(&i, "loopgate", 300)).unwrap();
        assert_eq!(c.sub, "etl-bot");
        assert_eq!(
            v.verify(&token(&i, "loopgate", -3600)),
            Err(JwtError::Expired)
        );
        assert_eq!(
            v.verify(&token(&i, "someone-else", 300)),
            Err(JwtError::WrongAudience {
                expected: "loopgate".into()
            })
        );
        let other = JwtVerifier::new(i.jwks.clone(), "https://other-idp.example", "loopgate");
        assert!(matches!(
            other.verify(&token(&i, "loopgate", 300)),
            Err(JwtError::WrongIssuer { .. })
        ));
        // Signed by another key with the same kid.
        let forged = issuer();
        assert_eq!(
            v.verify(&token(&forged, "loopgate", 300)),
            Err(JwtError::BadSignature)
        );
        assert!(matches!(v.verify("not-a-jwt"), Err(JwtError::Malformed(_))));
    }

    #[test]
    fn symmetric_tokens_are_refused() {
        let i = issuer();
        let v = JwtVerifier::new(i.jwks, "https://idp.example", "loopgate");
        let t = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "x", "iss": "https://idp.example", "aud": "loopgate", "exp": 4_000_000_000u64}),
            &EncodingKey::from_secret(b"guessable"),
        )
        .unwrap();
        assert_eq!(v.verify(&t), Err(JwtError::Algorithm(Algorithm::HS256)));
    }
}
