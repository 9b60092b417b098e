//! Stored credentials: read from files or environment variables named in the
//! config, held in [`Secret`]s that never print their value, and collected
//! into the [`SecretMasker`] that keeps them out of every audit record.

use std::{fmt, path::PathBuf};

use secrecy::{ExposeSecret, SecretString};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("config {file}: key `{key}`: cannot read {path}: {source}")]
    File {
        file: PathBuf,
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {file}: key `{key}`: environment variable {var} is not set")]
    Env {
        file: PathBuf,
        key: String,
        var: String,
    },
    #[error("config {file}: key `{key}`: the value cannot be sent in an HTTP header (control characters or non-ASCII)")]
    NotAHeader { file: PathBuf, key: String },
    /// The file is read but not usable as that key says (a CA bundle, an
    /// SSH private key).
    #[error("config {file}: key `{key}`: {reason}")]
    Unusable {
        file: PathBuf,
        key: String,
        reason: String,
    },
    #[error("config {file}: key `{key}`: {path} is empty")]
    Empty {
        file: PathBuf,
        key: String,
        path: PathBuf,
    },
}

/// A secret value (`secrecy`: zeroized when dropped). `Debug` and
/// `Display` print `[redacted]`.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    fn new(v: String) -> Self {
        Secret(SecretString::from(v))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    #[cfg(test)]
    pub fn for_tests(v: &str) -> Self {
        Secret::new(v.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Reads a secret file; a trailing newline is not part of the secret.
pub fn read_file(cfg: &Config, key: &str, path: &std::path::Path) -> Result<Secret, SecretError> {
    let v = std::fs::read_to_string(path).map_err(|source| SecretError::File {
        file: cfg.source.clone(),
        key: key.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    let v = v.trim_end_matches(['\n', '\r']).to_owned();
    if v.is_empty() {
        return Err(SecretError::Empty {
            file: cfg.source.clone(),
            key: key.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(v))
}

fn read_env(cfg: &Config, key: &str, var: &str) -> Result<Secret, SecretError> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
        _ => Err(SecretError::Env {
            file: cfg.source.clone(),
            key: key.to_owned(),
            var: var.to_owned(),
        }),
    }
}

/// Every password and token the config references (checked at start-up, so a
/// missing credential is a start-up error naming the key, not a failed session).
pub fn target_secrets(cfg: &Config) -> Result<Vec<Secret>, SecretError> {
    let mut out = Vec::new();
    for (i, t) in cfg.targets.iter().enumerate() {
        let Some(c) = &t.credential else { continue };
        let key = |k: &str| format!("targets[{i}].credential.{k}");
        if let Some(p) = &c.password_file {
            out.push(read_file(cfg, &key("password_file"), p)?);
        }
        if let Some(v) = &c.password_env {
            out.push(read_env(cfg, &key("password_env"), v)?);
        }
        if let Some(p) = &c.token_file {
            out.push(read_file(cfg, &key("token_file"), p)?);
        }
        if let Some(v) = &c.token_env {
            out.push(read_env(cfg, &key("token_env"), v)?);
        }
    }
    // The header values as sent (a Basic value is base64 of user:password).
    out.extend(
        target_credentials(cfg)?
            .into_values()
            .filter_map(|c| c.authorization),
    );
    if let Some(p) = &cfg.audit.password_file {
        out.push(read_file(cfg, "audit.password_file", p)?);
    }
    Ok(out)
}

/// A target's stored credential, as its handler uses it.
#[derive(Clone, Debug)]
pub struct StoredCredential {
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// HTTP targets: the `Authorization` header value (`Bearer <token>` from
    /// `token_*`, else `Basic` from `username` + `password_*`).
    pub authorization: Option<Secret>,
    /// PostgreSQL: login methods the stored password may answer.
    pub auth_methods: Vec<String>,
    /// PostgreSQL: TLS to the server, verified against `credential.ca_file`
    /// (set: TLS is required).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// PostgreSQL: logins kept for reuse per key (0: none), and how long.
    pub pool_size: usize,
    pub pool_idle_timeout: std::time::Duration,
    /// PostgreSQL: the largest message read from the loop and the server.
    pub max_message: usize,
    pub max_result_message: usize,
    /// SSH: the private key the agent logs in upstream with, and the
    /// known_hosts file the upstream's host key is checked against.
    pub ssh_key: Option<std::sync::Arc<russh::keys::PrivateKey>>,
    pub known_hosts: Option<PathBuf>,
}

impl Default for StoredCredential {
    fn default() -> Self {
        Self {
            username: None,
            password: None,
            authorization: None,
            auth_methods: Vec::new(),
            tls: None,
            pool_size: 0,
            pool_idle_timeout: std::time::Duration::from_secs(60),
            max_message: crate::protocol::postgres::messages::MAX_LOOP_MESSAGE,
            max_result_message: crate::protocol::postgres::messages::MAX_SERVER_MESSAGE,
            ssh_key: None,
            known_hosts: None,
        }
    }
}

/// The stored credential of every target that has one, by target name.
pub fn target_credentials(
    cfg: &Config,
) -> Result<std::collections::HashMap<String, StoredCredential>, SecretError> {
    use base64::Engine;
    let mut out = std::collections::HashMap::new();
    for (i, t) in cfg.targets.iter().enumerate() {
        let auth_methods = t
            .auth_methods
            .clone()
            .unwrap_or_else(|| vec!["scram-sha-256".to_owned()]);
        let pool_size = match t.protocol {
            crate::config::Protocol::Postgres => t.pool_size.unwrap_or(4),
            _ => 0,
        };
        let pool_idle_timeout =
            std::time::Duration::from_secs(t.pool_idle_timeout_secs.unwrap_or(60).max(1));
        let max_message = t
            .max_message_bytes
            .map_or(crate::protocol::postgres::messages::MAX_LOOP_MESSAGE, |v| {
                v as usize
            });
        let max_result_message = t.max_result_message_bytes.map_or(
            crate::protocol::postgres::messages::MAX_SERVER_MESSAGE,
            |v| v as usize,
        );
        let Some(c) = &t.credential else {
            out.insert(
                t.name.clone(),
                StoredCredential {
                    auth_methods,
                    pool_size,
                    pool_idle_timeout,
                    max_message,
                    max_result_message,
                    ..Default::default()
                },
            );
            continue;
        };
        let key = |k: &str| format!("targets[{i}].credential.{k}");
        let token = match (&c.token_file, &c.token_env) {
            (Some(p), _) => Some(read_file(cfg, &key("token_file"), p)?),
            (None, Some(v)) => Some(read_env(cfg, &key("token_env"), v)?),
            (None, None) => None,
        };
        let password = match (&c.password_file, &c.password_env) {
            (Some(p), _) => Some(read_file(cfg, &key("password_file"), p)?),
            (None, Some(v)) => Some(read_env(cfg, &key("password_env"), v)?),
            (None, None) => None,
        };
        let authorization = match (&token, &c.username, &password) {
            _ if t.protocol != crate::config::Protocol::Http => None,
            (Some(t), _, _) => Some(Secret::new(format!("Bearer {}", t.expose()))),
            (None, Some(u), Some(p)) => Some(Secret::new(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{}", p.expose()))
            ))),
            _ => None,
        };
        if let Some(a) = &authorization {
            if !a
                .expose()
                .bytes()
                .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
            {
                return Err(SecretError::NotAHeader {
                    file: cfg.source.clone(),
                    key: key(if token.is_some() {
                        "token_file"
                    } else {
                        "password_file"
                    }),
                });
            }
        }
        let tls = match (&c.ca_file, t.protocol) {
            (Some(ca), crate::config::Protocol::Postgres) => Some(std::sync::Arc::new(
                crate::http_client::tls_config(Some(ca)).map_err(|e| SecretError::Unusable {
                    file: cfg.source.clone(),
                    key: key("ca_file"),
                    reason: e.to_string(),
                })?,
            )),
            _ => None,
        };
        let ssh_key = match (&c.key_file, t.protocol) {
            (Some(p), crate::config::Protocol::Ssh) => {
                let text = read_file(cfg, &key("key_file"), p)?;
                let k = russh::keys::PrivateKey::from_openssh(text.expose().as_bytes()).map_err(
                    |e| SecretError::Unusable {
                        file: cfg.source.clone(),
                        key: key("key_file"),
                        reason: format!("not an unencrypted OpenSSH private key ({e})"),
                    },
                )?;
                Some(std::sync::Arc::new(k))
            }
            _ => None,
        };
        out.insert(
            t.name.clone(),
            StoredCredential {
                username: c.username.clone(),
                password,
                authorization,
                auth_methods,
                tls,
                pool_size,
                pool_idle_timeout,
                max_message,
                max_result_message,
                ssh_key,
                known_hosts: c.known_hosts_file.clone(),
            },
        );
    }
    Ok(out)
}

/// A masking hook: runs on captured bytes before anything is recorded.
pub trait Masker: Send + Sync {
    /// Masks in place, keeping the length (offsets stay valid). Returns whether
    /// anything changed.
    fn mask(&self, data: &mut [u8]) -> bool;
    /// Length of the longest value masked (callers hold back one byte less, so
    /// a value split across two reads is still found).
    fn max_len(&self) -> usize;
    /// How many trailing bytes of `data` to hold back until more arrive: by
    /// default `max_len - 1`; a masker that knows its values holds back only
    /// a tail that could start one (streams are not delayed otherwise).
    fn holdback(&self, data: &[u8]) -> usize {
        self.max_len().saturating_sub(1).min(data.len())
    }
}

/// Replaces every occurrence of a stored credential with `*`.
pub struct SecretMasker {
    secrets: Vec<Vec<u8>>,
    /// One searcher per secret, built once (building one per call showed in
    /// the HTTP handler's profile).
    finders: Vec<memchr::memmem::Finder<'static>>,
}

impl SecretMasker {
    pub fn new(secrets: &[Secret]) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .iter()
            // Very short values would mask ordinary bytes everywhere.
            .filter(|s| s.expose().len() >= 4)
            .map(|s| s.expose().as_bytes().to_vec())
            .collect();
        secrets.sort();
        secrets.dedup();
        let finders = secrets
            .iter()
            .map(|s| memchr::memmem::Finder::new(s).into_owned())
            .collect();
        Self { secrets, finders }
    }
}

impl Masker for SecretMasker {
    fn max_len(&self) -> usize {
        self.secrets.iter().map(Vec::len).max().unwrap_or(0)
    }

    fn holdback(&self, data: &[u8]) -> usize {
        // The longest tail of `data` that is a proper prefix of a secret.
        self.secrets
            .iter()
            .map(|s| {
                (1..s.len().min(data.len() + 1))
                    .rev()
                    .find(|&k| data.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    fn mask(&self, data: &mut [u8]) -> bool {
        let mut changed = false;
        for f in &self.finders {
            let n = f.needle().len();
            let mut from = 0;
            while let Some(at) = f.find(&data[from..]) {
                let at = from + at;
                data[at..at + n].fill(b'*');
                changed = true;
                from = at + n;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_never_printed() {
        let s = Secret::for_tests("hunter2-db-pass");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        let m = SecretMasker::new(&[s]);
        let mut data = b"user=app password=hunter2-db-pass; again hunter2-db-pass".to_vec();
        let len = data.len();
        assert!(m.mask(&mut data));
        let text = String::from_utf8(data).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(text.len(), len, "masking keeps offsets");
        let mut clean = b"nothing here".to_vec();
        assert!(!m.mask(&mut clean));
        // Only a tail that could start a secret is held back.
        assert_eq!(m.holdback(b"data: event\n\n"), 0);
        assert_eq!(m.holdback(b"token hunter2-d"), 9);
        assert_eq!(m.holdback(b"h"), 1);
    }
}
