//! [`Idp`]: a test identity provider that signs real ES256 JWTs and
//! publishes its key as a JWKS file.

use std::path::{Path, PathBuf};

/// The issuer of [`Idp`] tokens.
pub const ISSUER: &str = "https://idp.loopgate.test";

/// A test identity provider: a real P-256 key (rcgen), its JWKS file, and
/// signed tokens.
pub struct Idp {
    key: jsonwebtoken::EncodingKey,
    pub jwks: PathBuf,
}

impl Idp {
    /// A new key; its JWKS is written to `dir/jwks.json`.
    pub fn new(dir: &Path) -> Idp {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        let jwks = dir.join("jwks.json");
        std::fs::write(
            &jwks,
            serde_json::json!({"keys": [{
                "kty": "EC", "crv": "P-256", "kid": "test-1", "alg": "ES256", "use": "sig",
                "x": b64url(&raw[1..33]),
                "y": b64url(&raw[33..65]),
            }]})
            .to_string(),
        )
        .unwrap();
        Idp {
            key: jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwks,
        }
    }

    /// A policy: workloads `signed-*` must present a JWT for `audience`, and
    /// only they may use `target` (its default is deny).
    pub fn signed_bots_policy(&self, target: &str, audience: &str, rule: &str) -> String {
        format!(
            r#"
[[workloads]]
name = "signed-bots"
workload = "signed-*"
jwt = {{ issuer = "{ISSUER}", audience = "{audience}", jwks_file = "{}" }}

[[targets]]
name = "{target}"
default = "deny"
reason = "{target} is open to signed bots only"

[[rules]]
id = "{rule}"
workloads = ["signed-bots"]
targets = ["{target}"]
action = "allow"
"#,
            self.jwks.display()
        )
    }

    /// A token for `sub` and `aud` that expires `exp_in` seconds from now
    /// (negative: already expired).
    pub fn token(&self, sub: &str, aud: &str, exp_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("test-1".into());
        jsonwebtoken::encode(
            &h,
            &serde_json::json!({"sub": sub, "iss": ISSUER, "aud": aud, "iat": now, "exp": now + exp_in}),
            &self.key,
        )
        .unwrap()
    }
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}
