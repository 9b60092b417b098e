//! The agent's SSH host CA: a loop's `ssh` meets the agent, which answers
//! as the target with a host certificate for the target's names and
//! address, signed here. A host trusts the CA once (`loopgate trust
//! install` writes an `@cert-authority` line for the SSH targets into
//! `/etc/ssh/ssh_known_hosts`), so no loop needs a per-client option and
//! none ever accepts an unknown host key.
//!
//! Made on the agent's first start in `state_dir/ssh/` (`host_ca`, an
//! Ed25519 key in OpenSSH format, mode 0600 in a 0700 directory, with
//! `host_ca.pub`; and `host_key`, the key the certificates certify), reused
//! after. Certificates are made in memory per set of names and cached; each
//! is valid for 30 days and remade after 7.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use russh::keys::{
    ssh_key::{
        certificate::{Builder, CertType},
        private::Ed25519Keypair,
        LineEnding,
    },
    Certificate, HashAlg, PrivateKey,
};

use crate::ca::CaError;

const CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
const CERT_RENEW_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// Certificates start an hour back, for hosts whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(3600);

/// The CA's public key line (`ssh-ed25519 AAAA...`), for known_hosts.
pub fn ca_pub_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh").join("host_ca.pub")
}

fn ca_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh").join("host_ca")
}

fn host_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh").join("host_key")
}

/// A certificate issued for a set of names, and when.
type Issued = (Instant, Arc<Certificate>);

/// The CA, the host key it certifies, and the certificates issued.
pub struct SshHostCa {
    ca: PrivateKey,
    host_key: Arc<PrivateKey>,
    certs: Mutex<HashMap<Vec<String>, Issued>>,
}

impl SshHostCa {
    /// Loads the CA of `state_dir`, creating it first if there is none.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, CaError> {
        let dir = state_dir.join("ssh");
        crate::ca::private_dir(&dir)?;
        let ca = load_or_make_key(&ca_key_path(state_dir))?;
        let line = ca.public_key().to_openssh().map_err(|e| CaError::Invalid {
            path: ca_key_path(state_dir),
            err: e.to_string(),
        })?;
        let pub_path = ca_pub_path(state_dir);
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(&format!("{line}\n")) {
            crate::ca::write_atomic(&pub_path, format!("{line}\n").as_bytes(), 0o644)?;
        }
        let host_key = load_or_make_key(&host_key_path(state_dir))?;
        Ok(SshHostCa {
            ca,
            host_key: Arc::new(host_key),
            certs: Mutex::new(HashMap::new()),
        })
    }

    /// The CA's public key in OpenSSH's one-line form.
    pub fn public_line(&self) -> String {
        self.ca.public_key().to_openssh().unwrap_or_default()
    }

    /// The host key the agent answers with.
    pub fn host_key(&self) -> Arc<PrivateKey> {
        self.host_key.clone()
    }

    /// A host certificate of the host key for `names` (the target's host
    /// name and addresses, as a client types them), issued once and cached.
    pub fn host_cert(&self, names: &[String]) -> Result<Arc<Certificate>, CaError> {
        let mut key = names.to_vec();
        key.sort();
        key.dedup();
        let mut certs = self.certs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((made, c)) = certs.get(&key) {
            if made.elapsed() < CERT_RENEW_AFTER {
                return Ok(c.clone());
            }
        }
        let issue = |err: String| CaError::Issue {
            names: key.clone(),
            err,
        };
        let now = SystemTime::now();
        let mut nonce = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| issue("no randomness".into()))?;
        let mut b = Builder::new_with_validity_times(
            nonce.to_vec(),
            self.host_key.public_key().key_data().clone(),
            now - BACKDATE,
            now + CERT_VALIDITY,
        )
        .map_err(|e| issue(e.to_string()))?;
        b.cert_type(CertType::Host)
            .and_then(|b| b.key_id(format!("loopgate host certificate for {}", key.join(","))))
            .map_err(|e| issue(e.to_string()))?;
        for n in &key {
            b.valid_principal(n.clone())
                .map_err(|e| issue(e.to_string()))?;
        }
        let cert = Arc::new(b.sign(&self.ca).map_err(|e| issue(e.to_string()))?);
        if certs.len() >= 1024 {
            certs.clear();
        }
        certs.insert(key, (Instant::now(), cert.clone()));
        Ok(cert)
    }

    /// The CA's fingerprint (SHA-256), naming its known_hosts line.
    pub fn fingerprint(&self) -> String {
        self.ca
            .public_key()
            .fingerprint(HashAlg::Sha256)
            .to_string()
    }
}

/// The known_hosts patterns of the SSH targets: their host name or address
/// as a client types it (`[host]:port` off port 22).
pub fn host_patterns(cfg: &crate::config::Config) -> Vec<String> {
    use crate::config::{Protocol, TargetAddress};
    let mut out = Vec::new();
    for t in cfg.targets.iter().filter(|t| t.protocol == Protocol::Ssh) {
        let Ok(a) = TargetAddress::parse(&t.address) else {
            continue;
        };
        let (host, port) = match a {
            TargetAddress::Ip(a) => (a.ip().to_string(), a.port()),
            TargetAddress::Host { host, port } => (host, port),
        };
        let p = if port == 22 {
            host
        } else {
            format!("[{host}]:{port}")
        };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// An Ed25519 key in OpenSSH format at `path` (mode 0600), made if absent.
fn load_or_make_key(path: &Path) -> Result<PrivateKey, CaError> {
    let invalid = |err: String| CaError::Invalid {
        path: path.to_owned(),
        err,
    };
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|err| CaError::Io {
            path: path.to_owned(),
            err,
        })?;
        return PrivateKey::from_openssh(text).map_err(|e| invalid(e.to_string()));
    }
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| invalid("no randomness".into()))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| invalid(e.to_string()))?;
    crate::ca::write_atomic(path, text.as_bytes(), 0o600)?;
    Ok(key)
}

/// `loopgate trust install|uninstall` for SSH: an `@cert-authority` line
/// for the SSH targets' host patterns in `/etc/ssh/ssh_known_hosts`, named
/// by the CA's fingerprint, so it is replaced (never repeated) and removed
/// alone.
pub mod known_hosts {
    use std::path::Path;

    use anyhow::Context as _;

    /// The system-wide known_hosts every OpenSSH client reads.
    pub const SYSTEM: &str = "/etc/ssh/ssh_known_hosts";

    fn marker(fingerprint: &str) -> String {
        format!("loopgate-ssh-ca:{fingerprint}")
    }

    /// The file's text with this CA's line (for `patterns`) in place of any
    /// earlier one; unchanged text when there are no patterns.
    pub fn with_line(text: &str, patterns: &[String], ca_line: &str, fingerprint: &str) -> String {
        let mut out = without_line(text, fingerprint);
        if !patterns.is_empty() {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!(
                "@cert-authority {} {} {}\n",
                patterns.join(","),
                ca_line.trim(),
                marker(fingerprint)
            ));
        }
        out
    }

    /// The file's text without this CA's line.
    pub fn without_line(text: &str, fingerprint: &str) -> String {
        let m = marker(fingerprint);
        let mut out = String::with_capacity(text.len());
        for line in text.lines() {
            if line.starts_with("@cert-authority ") && line.split_whitespace().last() == Some(&m) {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// Writes this CA's line for `patterns` into `file`; whether it changed.
    pub fn install(
        file: &Path,
        patterns: &[String],
        ca_line: &str,
        fingerprint: &str,
    ) -> anyhow::Result<bool> {
        let old = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        let new = with_line(&old, patterns, ca_line, fingerprint);
        if new == old {
            return Ok(false);
        }
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::ca::write_atomic(file, new.as_bytes(), 0o644)
            .with_context(|| format!("writing {}", file.display()))?;
        Ok(true)
    }

    /// Removes this CA's line from `file`; whether there was one.
    pub fn uninstall(file: &Path, fingerprint: &str) -> anyhow::Result<bool> {
        let Ok(old) = std::fs::read_to_string(file) else {
            return Ok(false);
        };
        let new = without_line(&old, fingerprint);
        if new == old {
            return Ok(false);
        }
        crate::ca::write_atomic(file, new.as_bytes(), 0o644)
            .with_context(|| format!("writing {}", file.display()))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_certificates_are_signed_by_the_ca_for_the_targets_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SshHostCa::load_or_create(dir.path()).unwrap();
        let cert = ca
            .host_cert(&["db.internal".into(), "10.0.0.5".into()])
            .unwrap();
        assert_eq!(cert.cert_type(), CertType::Host);
        assert_eq!(cert.valid_principals(), ["10.0.0.5", "db.internal"]);
        assert_eq!(
            cert.signature_key(),
            ca.ca.public_key().key_data(),
            "signed by the CA"
        );
        assert!(cert.verify_signature().is_ok());
        assert_eq!(cert.public_key(), ca.host_key().public_key().key_data());
        // Cached per set of names, in any order.
        let again = ca
            .host_cert(&["10.0.0.5".into(), "db.internal".into()])
            .unwrap();
        assert!(Arc::ptr_eq(&cert, &again));
        // The keys are the agent's alone, and the same CA after a restart.
        use std::os::unix::fs::PermissionsExt;
        for p in [ca_key_path(dir.path()), host_key_path(dir.path())] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
        let line = ca.public_line();
        let reloaded = SshHostCa::load_or_create(dir.path()).unwrap();
        assert_eq!(reloaded.public_line(), line);
        assert_eq!(
            std::fs::read_to_string(ca_pub_path(dir.path())).unwrap(),
            format!("{line}\n")
        );
    }

    #[test]
    fn the_known_hosts_line_is_replaced_not_repeated_and_removed_alone() {
        let theirs = "github.com ssh-ed25519 AAAAother\n";
        let pats = vec!["build-host".to_owned(), "127.10.7.1".to_owned()];
        let once = known_hosts::with_line(theirs, &pats, "ssh-ed25519 AAAAca", "SHA256:x");
        assert_eq!(
            once,
            "github.com ssh-ed25519 AAAAother\n@cert-authority build-host,127.10.7.1 ssh-ed25519 AAAAca loopgate-ssh-ca:SHA256:x\n"
        );
        let twice = known_hosts::with_line(&once, &pats[..1], "ssh-ed25519 AAAAca", "SHA256:x");
        assert_eq!(twice.matches("@cert-authority").count(), 1);
        assert!(twice.contains("@cert-authority build-host ssh-ed25519"));
        // Another agent's CA line stays.
        let both = known_hosts::with_line(&twice, &pats, "ssh-ed25519 AAAAb", "SHA256:y");
        assert_eq!(
            known_hosts::without_line(&both, "SHA256:x"),
            format!("{theirs}@cert-authority build-host,127.10.7.1 ssh-ed25519 AAAAb loopgate-ssh-ca:SHA256:y\n")
        );
        assert_eq!(
            known_hosts::without_line(&known_hosts::without_line(&both, "SHA256:y"), "SHA256:x"),
            theirs
        );
    }
}
