//! The agent's certificate authority: loops that ask for TLS get a
//! certificate for the target's name, issued here (rcgen), so `sslmode=
//! verify-full` (and, later, HTTPS and SSH host certificates) verify
//! against one CA a host trusts once (`loopgate trust install`).
//!
//! Created on the agent's first start in `state_dir/ca/` (`ca.pem`, and
//! `ca.key` mode 0600 in a 0700 directory; written to a temporary file and
//! renamed, so a crash never leaves half a key) and reused after. Leaf
//! certificates are made in memory per set of names and cached; each is
//! valid for 30 days and remade after 7.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 30;
const LEAF_RENEW_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a usable CA ({err})")]
    Invalid { path: PathBuf, err: String },
    #[error("issuing a certificate for {names:?}: {err}")]
    Issue { names: Vec<String>, err: String },
}

/// A leaf's server configuration and when it was made.
type Leaf = (Instant, Arc<rustls::ServerConfig>);

/// The agent's CA and the leaf certificates it has issued.
pub struct AgentCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_path: PathBuf,
    leaves: Mutex<HashMap<Vec<String>, Leaf>>,
}

/// Where the CA certificate is (`state_dir/ca/ca.pem`).
pub fn cert_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ca").join("ca.pem")
}

fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ca").join("ca.key")
}

impl AgentCa {
    /// Loads the CA of `state_dir`, creating it first if there is none.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, CaError> {
        let (cert, key) = (cert_path(state_dir), key_path(state_dir));
        if !key.exists() {
            create(state_dir)?;
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |err| CaError::Io { path, err }
        };
        let key_pem = std::fs::read_to_string(&key).map_err(io(&key))?;
        let cert_pem = std::fs::read_to_string(&cert).map_err(io(&cert))?;
        let invalid = |path: &Path| {
            let path = path.to_owned();
            move |e: rcgen::Error| CaError::Invalid {
                path,
                err: e.to_string(),
            }
        };
        let key_pair = KeyPair::from_pem(&key_pem).map_err(invalid(&key))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(invalid(&cert))?;
        Ok(AgentCa {
            issuer,
            cert_pem,
            cert_path: cert,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate (PEM), for loops' trust stores.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// A TLS server configuration with a certificate for `names` (host
    /// names and IP addresses), issued once and cached.
    pub fn server_config(&self, names: &[String]) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let key = names.to_vec();
        if let Some((made, c)) = self.leaves.lock().ok().and_then(|m| m.get(&key).cloned()) {
            if made.elapsed() < LEAF_RENEW_AFTER {
                return Ok(c);
            }
        }
        let fail = |err: String| CaError::Issue {
            names: key.clone(),
            err,
        };
        let leaf_key = KeyPair::generate().map_err(|e| fail(e.to_string()))?;
        let mut params = CertificateParams::new(key.clone()).map_err(|e| fail(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, key.first().cloned().unwrap_or_default());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(LEAF_VALIDITY_DAYS);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&leaf_key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .map_err(|e| fail(e.to_string()))?;
        let config = Arc::new(config);
        if let Ok(mut m) = self.leaves.lock() {
            // Bounded: names come from the targets, addresses from DNS.
            if m.len() >= 1024 {
                m.clear();
            }
            m.insert(key, (Instant::now(), config.clone()));
        }
        Ok(config)
    }
}

/// Makes a new CA in `state_dir/ca/`.
/// A directory only the agent can read (0700, an existing one too).
pub(crate) fn private_dir(dir: &Path) -> Result<(), CaError> {
    let io = |err| CaError::Io {
        path: dir.to_owned(),
        err,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    // An existing directory too: the keys are the agent's alone.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(io)
}

fn create(state_dir: &Path) -> Result<(), CaError> {
    let dir = state_dir.join("ca");
    private_dir(&dir)?;
    let invalid = |e: rcgen::Error| CaError::Invalid {
        path: dir.clone(),
        err: e.to_string(),
    };
    let key = KeyPair::generate().map_err(invalid)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "loopgate");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("loopgate agent CA {host}"));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key).map_err(invalid)?;
    write_atomic(&key_path(state_dir), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path(state_dir), cert.pem().as_bytes(), 0o644)?;
    tracing::info!(path = %cert_path(state_dir).display(), "created the agent's CA (loopgate trust install adds it to this host's trust store)");
    Ok(())
}

/// Writes `data` to a temporary file of `mode`, syncs it and renames it
/// over `path` (a crash never leaves half a file).
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let io = |err| CaError::Io {
        path: path.to_owned(),
        err,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// `loopgate trust install|uninstall`: the agent's CA in this host's trust
/// store (Debian's `update-ca-certificates`), idempotently.
pub mod trust {
    use std::path::{Path, PathBuf};

    use anyhow::{bail, Context as _};

    /// Debian's directory of local CA certificates.
    pub const LOCAL_CA_DIR: &str = "/usr/local/share/ca-certificates";

    /// The file name of this agent's CA in the store: the first bytes of its
    /// fingerprint, so agents of different state directories do not clash.
    fn store_path(dir: &Path, pem: &str) -> PathBuf {
        let digest = ring::digest::digest(&ring::digest::SHA256, pem.trim().as_bytes());
        let hex: String = digest.as_ref()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        dir.join(format!("loopgate-{hex}.crt"))
    }

    /// Adds the CA of `state_dir`; returns the file written (or already there).
    pub fn install(state_dir: &Path) -> anyhow::Result<PathBuf> {
        let ca = super::cert_path(state_dir);
        let pem = std::fs::read_to_string(&ca).with_context(|| {
            format!(
                "{}: the agent's CA is made on the agent's first start",
                ca.display()
            )
        })?;
        let path = store_path(Path::new(LOCAL_CA_DIR), &pem);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(pem.as_str()) {
            std::fs::create_dir_all(LOCAL_CA_DIR)
                .with_context(|| format!("creating {LOCAL_CA_DIR}"))?;
            std::fs::write(&path, &pem).with_context(|| format!("writing {}", path.display()))?;
        }
        update()?;
        Ok(path)
    }

    /// Removes the CA of `state_dir`; returns the file removed, if any.
    pub fn uninstall(state_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
        let ca = super::cert_path(state_dir);
        let pem = std::fs::read_to_string(&ca).with_context(|| format!("{}", ca.display()))?;
        let path = store_path(Path::new(LOCAL_CA_DIR), &pem);
        if !path.exists() {
            return Ok(None);
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        update()?;
        Ok(Some(path))
    }

    fn update() -> anyhow::Result<()> {
        let out = std::process::Command::new("update-ca-certificates")
            .arg("--fresh")
            .output()
            .context("running update-ca-certificates (Debian's ca-certificates package)")?;
        if !out.status.success() {
            bail!(
                "update-ca-certificates failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_ca_is_made_once_with_a_private_key_and_issues_verifiable_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let ca = AgentCa::load_or_create(dir.path()).unwrap();
        let key = std::fs::metadata(key_path(dir.path())).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        let ca_dir = std::fs::metadata(dir.path().join("ca")).unwrap();
        assert_eq!(ca_dir.permissions().mode() & 0o777, 0o700);
        // A second start reuses it.
        let again = AgentCa::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        // A leaf verifies against the CA for its names (rustls as a client).
        let names = vec!["db.internal".to_owned(), "127.10.0.5".to_owned()];
        let server = again.server_config(&names).unwrap();
        assert!(Arc::ptr_eq(&server, &again.server_config(&names).unwrap()));
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = Arc::new(client);
        for (name, ok) in [
            ("db.internal", true),
            ("127.10.0.5", true),
            ("other.internal", false),
        ] {
            let mut c = rustls::ClientConnection::new(
                client.clone(),
                rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
            )
            .unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            let mut result = Ok(());
            for _ in 0..10 {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut &buf[..]).unwrap();
                if let Err(e) = s.process_new_packets() {
                    result = Err(e.to_string());
                    break;
                }
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut &buf[..]).unwrap();
                if let Err(e) = c.process_new_packets() {
                    result = Err(e.to_string());
                    break;
                }
                if !c.is_handshaking() && !s.is_handshaking() {
                    break;
                }
            }
            assert_eq!(result.is_ok(), ok, "{name}: {result:?}");
        }
    }
}
