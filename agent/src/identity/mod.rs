//! The optional second identity factor: an OIDC JWT presented by the loop,
//! verified against a JWKS (issuer, audience, expiry, signature), then stripped
//! so the upstream only ever sees the stored credential.
//!
//! The kernel-attested workload is the first factor. A protocol handler that
//! finds a token where the loop would put a credential (HTTP `Authorization:
//! Bearer`, the PostgreSQL password, the SSH password) calls
//! [`JwtVerifier::verify`]; which workloads require it is policy.

use std::{collections::HashMap, path::Path, sync::Arc};

use jsonwebtoken::{
    decode, decode_header,
    errors::ErrorKind,
    jwk::{Jwk, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;

mod jwks;

use jwks::RemoteJwks;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    /// The JWKS could not be read: `path` is the file, or the URL without
    /// its query.
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
    /// Every claim of the verified token (`jwt.claims` in rule conditions).
    #[serde(skip)]
    pub all: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    fn from_map(all: serde_json::Map<String, serde_json::Value>) -> Result<Self, JwtError> {
        let mut c: Claims = serde_json::from_value(serde_json::Value::Object(all.clone()))
            .map_err(|e| JwtError::Invalid(format!("claims: {e}")))?;
        c.all = all;
        Ok(c)
    }

    /// Claims as a verified token would carry them.
    #[doc(hidden)]
    pub fn for_tests(sub: &str, all: serde_json::Value) -> Self {
        Claims {
            sub: sub.to_owned(),
            iss: all["iss"].as_str().unwrap_or_default().to_owned(),
            email: None,
            all: all.as_object().cloned().unwrap_or_default(),
        }
    }
}

pub struct JwtVerifier {
    keys: Keys,
    issuer: String,
    audience: String,
}

enum Keys {
    /// Given, or read from a file when the policy compiled.
    Static(JwkSet),
    /// Fetched from a URL on first use, cached, refreshed.
    Remote(Box<RemoteJwks>),
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("JwtVerifier");
        d.field("issuer", &self.issuer)
            .field("audience", &self.audience);
        match &self.keys {
            Keys::Static(k) => d.field("keys", &k.keys.len()),
            Keys::Remote(r) => d
                .field("jwks_url", &r.shown)
                .field("keys", &r.cached.load().as_ref().map(|c| c.keys.keys.len())),
        };
        d.finish()
    }
}

fn pick<'a>(keys: &'a JwkSet, kid: Option<&str>) -> Option<&'a Jwk> {
    match kid {
        Some(k) => keys.find(k),
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    }
}

fn decoding_key(jwk: &Jwk) -> Result<DecodingKey, JwtError> {
    DecodingKey::from_jwk(jwk).map_err(|e| JwtError::Invalid(e.to_string()))
}

impl JwtVerifier {
    pub fn new(keys: JwkSet, issuer: &str, audience: &str) -> Self {
        Self {
            keys: Keys::Static(keys),
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

    /// A JWKS served at `url` (`http://` or `https://`; `ca_file` is the CA
    /// to trust instead of the system roots). Nothing is fetched here: keys
    /// are fetched on first use, cached, refreshed after 10 minutes, and
    /// re-fetched (at most every 30 s) for a token with an unknown key id.
    pub fn from_jwks_url(
        url: &str,
        ca_file: Option<&Path>,
        issuer: &str,
        audience: &str,
    ) -> Result<Self, JwtError> {
        Ok(Self {
            keys: Keys::Remote(Box::new(RemoteJwks::new(url, ca_file)?)),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        })
    }

    async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, JwtError> {
        match &self.keys {
            Keys::Static(keys) => pick(keys, kid)
                .ok_or_else(|| JwtError::UnknownKey(kid.map(str::to_owned)))
                .and_then(decoding_key),
            Keys::Remote(r) => r.key(kid).await,
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, JwtError> {
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
        let key = self.key(header.kid.as_deref()).await?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 30;
        let all = decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
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
            })?;
        Claims::from_map(all)
    }
}

/// Verifiers that fetch their keys from a URL, kept across policy reloads:
/// a reload reuses them (and their cached keys) instead of fetching the
/// JWKS again. Verifiers of a `jwks_file` are rebuilt on each reload, so a
/// rotated file takes effect.
#[derive(Default)]
pub struct JwtRegistry {
    remote: std::sync::Mutex<HashMap<RemoteKey, Arc<JwtVerifier>>>,
}

type RemoteKey = (String, Option<std::path::PathBuf>, String, String);

impl JwtRegistry {
    /// The verifier of `url` for this issuer and audience (created once).
    pub fn remote(
        &self,
        url: &str,
        ca_file: Option<&Path>,
        issuer: &str,
        audience: &str,
    ) -> Result<Arc<JwtVerifier>, JwtError> {
        let key = (
            url.to_owned(),
            ca_file.map(Path::to_path_buf),
            issuer.to_owned(),
            audience.to_owned(),
        );
        let mut m = self
            .remote
            .lock()
            .map_err(|_| JwtError::Invalid("the verifier registry is poisoned".into()))?;
        if let Some(v) = m.get(&key) {
            return Ok(v.clone());
        }
        let v = Arc::new(JwtVerifier::from_jwks_url(url, ca_file, issuer, audience)?);
        m.insert(key, v.clone());
        Ok(v)
    }

    /// How many URL verifiers it holds.
    pub fn len(&self) -> usize {
        self.remote.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    use hyper::StatusCode;
    use jsonwebtoken::{encode, EncodingKey, Header};

    use super::jwks::{JWKS_MAX_AGE, JWKS_MIN_REFETCH};
    use super::*;
    use crate::http_client::test_support::{pki, serve, Server};
    use std::time::Duration;

    struct Issuer {
        kid: String,
        key: EncodingKey,
        jwks: JwkSet,
    }

    /// A real P-256 key pair (rcgen) and its JWKS, key id `kid`.
    fn issuer_with(kid: &str) -> Issuer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw(); // 0x04 || x || y
        let jwks: JwkSet = serde_json::from_value(serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }]}))
        .unwrap();
        Issuer {
            kid: kid.to_owned(),
            key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwks,
        }
    }

    fn issuer() -> Issuer {
        issuer_with("k1")
    }

    fn token_kid(i: &Issuer, kid: &str, aud: &str, exp_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        encode(
            &h,
            &serde_json::json!({"sub": "etl-bot", "iss": "https://idp.example", "aud": aud, "exp": now + exp_in, "iat": now}),
            &i.key,
        )
        .unwrap()
    }

    /// A verifier of `https://idp.example` tokens for audience `loopgate`,
    /// with keys from `url` (no CA file).
    fn url_verifier(url: &str) -> JwtVerifier {
        JwtVerifier::from_jwks_url(url, None, "https://idp.example", "loopgate").unwrap()
    }

    fn token(i: &Issuer, aud: &str, exp_in: i64) -> String {
        token_kid(i, &i.kid, aud, exp_in)
    }

    #[tokio::test]
    async fn good_expired_and_wrong_audience_tokens() {
        let i = issuer();
        let v = JwtVerifier::new(i.jwks.clone(), "https://idp.example", "loopgate");
        let c = v.verify(&token(&i, "loopgate", 300)).await.unwrap();
        assert_eq!(c.sub, "etl-bot");
        assert_eq!(
            v.verify(&token(&i, "loopgate", -3600)).await,
            Err(JwtError::Expired)
        );
        assert_eq!(
            v.verify(&token(&i, "someone-else", 300)).await,
            Err(JwtError::WrongAudience {
                expected: "loopgate".into()
            })
        );
        let other = JwtVerifier::new(i.jwks.clone(), "https://other-idp.example", "loopgate");
        assert!(matches!(
            other.verify(&token(&i, "loopgate", 300)).await,
            Err(JwtError::WrongIssuer { .. })
        ));
        // Signed by another key with the same kid.
        let forged = issuer();
        assert_eq!(
            v.verify(&token(&forged, "loopgate", 300)).await,
            Err(JwtError::BadSignature)
        );
        assert!(matches!(
            v.verify("not-a-jwt").await,
            Err(JwtError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn symmetric_tokens_are_refused() {
        let i = issuer();
        let v = JwtVerifier::new(i.jwks, "https://idp.example", "loopgate");
        let t = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "x", "iss": "https://idp.example", "aud": "loopgate", "exp": 4_000_000_000u64}),
            &EncodingKey::from_secret(b"guessable"),
        )
        .unwrap();
        assert_eq!(
            v.verify(&t).await,
            Err(JwtError::Algorithm(Algorithm::HS256))
        );
    }

    fn jwks_json(sets: &[&Issuer]) -> String {
        let keys: Vec<&Jwk> = sets.iter().flat_map(|i| i.jwks.keys.iter()).collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    async fn jwks_server(tls: Option<Arc<rustls::ServerConfig>>, body: String) -> Server {
        serve(tls, vec![(StatusCode::OK, "application/json", body)]).await
    }

    fn remote(v: &JwtVerifier) -> &RemoteJwks {
        match &v.keys {
            Keys::Remote(r) => r,
            Keys::Static(_) => panic!("not a URL verifier"),
        }
    }

    #[test]
    fn jwks_urls_are_checked_without_fetching() {
        // Nothing listens there: construction must not try.
        let v = url_verifier("http://127.0.0.1:9/jwks.json?key=secret");
        assert!(format!("{v:?}").contains("http://127.0.0.1:9/jwks.json"));
        assert!(!format!("{v:?}").contains("secret"));
        let e = JwtVerifier::from_jwks_url("file:///etc/jwks.json", None, "i", "a").unwrap_err();
        assert_eq!(
            e,
            JwtError::Jwks {
                path: "file:///etc/jwks.json".into(),
                reason: "jwks_url must be an http:// or https:// URL".into()
            }
        );
        let e = JwtVerifier::from_jwks_url(
            "https://idp.example/jwks",
            Some(Path::new("/nonexistent/ca.pem")),
            "i",
            "a",
        )
        .unwrap_err();
        assert!(
            matches!(&e, JwtError::Jwks { path, reason } if path == "https://idp.example/jwks" && reason.contains("/nonexistent/ca.pem")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn jwks_url_fetched_once_and_shared_by_concurrent_verifies() {
        let i = issuer();
        let srv = jwks_server(None, jwks_json(&[&i])).await;
        let v = url_verifier(&format!("http://{}/jwks.json?tenant=t1", srv.addr));
        assert_eq!(srv.hits(), 0, "nothing fetched at construction");
        let t = token(&i, "loopgate", 300);
        let all = futures_util::future::join_all((0..8).map(|_| v.verify(&t))).await;
        assert!(all
            .iter()
            .all(|r| r.as_ref().is_ok_and(|c| c.sub == "etl-bot")));
        for _ in 0..3 {
            v.verify(&t).await.unwrap();
        }
        assert_eq!(
            v.verify(&token(&i, "loopgate", -3600)).await,
            Err(JwtError::Expired)
        );
        assert_eq!(srv.hits(), 1);
        assert_eq!(
            srv.state.lock().unwrap().requests[0].0,
            "/jwks.json?tenant=t1"
        );
        // Older than 10 minutes: refreshed on the next verify.
        remote(&v).age_by(Duration::from_secs(601)).await;
        v.verify(&t).await.unwrap();
        assert_eq!(srv.hits(), 2);
    }

    #[tokio::test]
    async fn unknown_kids_refetch_at_most_every_30s() {
        let (k1, k2) = (issuer_with("k1"), issuer_with("k2"));
        let srv = jwks_server(None, jwks_json(&[&k1])).await;
        let v = url_verifier(&format!("http://{}/jwks", srv.addr));
        v.verify(&token(&k1, "loopgate", 300)).await.unwrap();
        assert_eq!(srv.hits(), 1);
        // The IdP rotates; a token signed with the new key arrives 30 s later.
        srv.answer(StatusCode::OK, "application/json", jwks_json(&[&k1, &k2]));
        remote(&v).age_by(JWKS_MIN_REFETCH).await;
        let c = v.verify(&token(&k2, "loopgate", 300)).await.unwrap();
        assert_eq!(c.sub, "etl-bot");
        assert_eq!(srv.hits(), 2);
        // Made-up key ids: one refetch per 30 s at most.
        for n in 0..10 {
            assert_eq!(
                v.verify(&token_kid(&k1, &format!("bogus{n}"), "loopgate", 300))
                    .await,
                Err(JwtError::UnknownKey(Some(format!("bogus{n}"))))
            );
        }
        assert_eq!(srv.hits(), 2);
        remote(&v).age_by(JWKS_MIN_REFETCH).await;
        for _ in 0..10 {
            assert!(matches!(
                v.verify(&token_kid(&k1, "bogus", "loopgate", 300)).await,
                Err(JwtError::UnknownKey(_))
            ));
        }
        assert_eq!(srv.hits(), 3);
        // Known keys keep verifying without fetching.
        v.verify(&token(&k1, "loopgate", 300)).await.unwrap();
        v.verify(&token(&k2, "loopgate", 300)).await.unwrap();
        assert_eq!(srv.hits(), 3);
    }

    #[tokio::test]
    async fn fetch_failures() {
        let i = issuer();
        let t = token(&i, "loopgate", 300);
        // Nothing listening, nothing cached.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let v = url_verifier(&format!("http://127.0.0.1:{port}/jwks?secret=s3"));
        for _ in 0..2 {
            match v.verify(&t).await {
                Err(JwtError::Jwks { path, reason }) => {
                    assert_eq!(path, format!("http://127.0.0.1:{port}/jwks"));
                    assert!(reason.contains("onnect"), "{reason}");
                    assert!(!reason.contains("s3"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        // Not 2xx, not JSON, not a JWKS.
        for (status, ctype, body, want) in [
            (
                StatusCode::NOT_FOUND,
                "text/plain",
                "no",
                "the server answered 404 Not Found",
            ),
            (
                StatusCode::OK,
                "text/html",
                "<html>login</html>",
                "the answer is not JSON",
            ),
            (
                StatusCode::OK,
                "application/json",
                "{\"k\": 1}",
                "not a JWKS",
            ),
        ] {
            let srv = serve(None, vec![(status, ctype, body.to_owned())]).await;
            let v = url_verifier(&format!("http://{}/jwks", srv.addr));
            match v.verify(&t).await {
                Err(JwtError::Jwks { reason, .. }) => assert!(reason.contains(want), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
        // Cached keys outlive a failing IdP.
        let srv = jwks_server(None, jwks_json(&[&i])).await;
        let v = url_verifier(&format!("http://{}/jwks", srv.addr));
        v.verify(&t).await.unwrap();
        srv.answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "down".into(),
        );
        remote(&v).age_by(JWKS_MAX_AGE).await;
        v.verify(&t).await.unwrap();
        assert_eq!(srv.hits(), 2);
        // The failed refresh counts against the 30 s limit.
        v.verify(&t).await.unwrap();
        assert_eq!(srv.hits(), 2);
    }

    #[tokio::test]
    async fn https_jwks_needs_its_ca() {
        let i = issuer();
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let srv = jwks_server(Some(pki.server.clone()), jwks_json(&[&i])).await;
        let url = format!("https://{}/jwks", srv.addr);
        let t = token(&i, "loopgate", 300);
        let v =
            JwtVerifier::from_jwks_url(&url, Some(&ca), "https://idp.example", "loopgate").unwrap();
        assert_eq!(v.verify(&t).await.unwrap().sub, "etl-bot");
        assert_eq!(srv.hits(), 1);
        let untrusting =
            JwtVerifier::from_jwks_url(&url, None, "https://idp.example", "loopgate").unwrap();
        match untrusting.verify(&t).await {
            Err(JwtError::Jwks { path, reason }) => {
                assert_eq!(path, url);
                assert!(reason.contains("invalid peer certificate"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(srv.hits(), 1);
    }
}
