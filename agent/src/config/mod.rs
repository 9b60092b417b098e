//! Agent configuration: `agent.toml`.
//!
//! Parsing is strict: unknown keys, bad values and inconsistent settings are
//! errors that name the file, the key and the reason (and the line and column
//! when the TOML parser knows them). Credentials are only *references* (file
//! paths, environment variable names); this module never reads a secret, and
//! nothing here formats one.

use std::path::{Path, PathBuf};

mod schema;
mod validate;

pub use schema::*;
pub use validate::validate_name;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/loopgate/agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {file}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {file}{location}: key `{key}`: {reason}")]
    Invalid {
        file: PathBuf,
        /// " line L, column C" when known.
        location: String,
        key: String,
        reason: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let location = inner
                .span()
                .map(|s| {
                    let (line, col) = line_col(text, s.start);
                    format!(" line {line}, column {col}")
                })
                .unwrap_or_default();
            ConfigError::Invalid {
                file: path.to_owned(),
                location,
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                reason: inner.message().trim().to_owned(),
            }
        })?;
        cfg.source = path.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.clone(),
            location: String::new(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// Where programs, links and maps are pinned.
    pub fn pin_dir(&self) -> PathBuf {
        match &self.agent.bpf_pin_dir {
            Some(d) => d.clone(),
            None => PathBuf::from("/sys/fs/bpf/loopgate")
                .join(self.agent.cgroup_root.trim_matches('/').replace('/', "_")),
        }
    }
}

/// 1-based line and column of a byte offset (for file:line:column messages).
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl Config {
    /// Approver uid → name, resolving `user` entries.
    pub fn approver_uids(&self) -> Result<std::collections::HashMap<u32, String>, ConfigError> {
        let mut m = std::collections::HashMap::new();
        for (i, a) in self.approvers.iter().enumerate() {
            let uid = match (a.uid, &a.user) {
                (Some(u), _) => u,
                (None, Some(user)) => match nix::unistd::User::from_name(user) {
                    Ok(Some(u)) => u.uid.as_raw(),
                    _ => {
                        return Err(self.invalid(
                            format!("approvers[{i}].user"),
                            format!("no user `{user}` on this host"),
                        ))
                    }
                },
                (None, None) => continue,
            };
            if let Some(other) = m.insert(uid, a.name.clone()) {
                return Err(self.invalid(
                    format!("approvers[{i}]"),
                    format!("uid {uid} is already approver `{other}`"),
                ));
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/loopgate/agent.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("[agent]\n").unwrap();
        assert_eq!(c.agent.proxy_port, 975);
        assert_eq!(c.agent.cgroup_root, "loopgate");
        assert_eq!(c.agent.egress, Egress::Allow);
        assert_eq!(c.pin_dir(), PathBuf::from("/sys/fs/bpf/loopgate/loopgate"));
    }

    #[test]
    fn unknown_key_names_file_key_and_line() {
        let e = parse("[agent]\nproxy_port = 15001\nproxy_prot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/loopgate/agent.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("proxy_prot"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let e = parse("[agent]\negress = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.egress"), "{e}");
        assert!(e.contains("sometimes"), "{e}");
        let e = parse("[agent]\n[[targets]]\nname = \"db\"\naddress = \"10.0.0.5\"\nprotocol = \"postgres\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("targets[0].address"), "{e}");
        assert!(e.contains("no port"), "{e}");
    }

    #[test]
    fn unknown_credential_key_is_an_error() {
        let e = parse(
            "[agent]\n[[targets]]\nname = \"db\"\naddress = \"10.0.0.5:5432\"\nprotocol = \"postgres\"\n[targets.credential]\npasword_file = \"/x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("targets[0].credential.pasword_file"), "{e}");
    }

    #[test]
    fn postgres_credentials_name_their_role_and_login_methods() {
        let t = |extra: &str| {
            parse(&format!(
                "[agent]\n[[targets]]\nname = \"db\"\naddress = \"10.0.0.5:5432\"\nprotocol = \"postgres\"\n{extra}"
            ))
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let e = t("[targets.credential]\npassword_file = \"/x\"\n").unwrap_err();
        assert!(
            e.contains("targets[0].credential") && e.contains("needs its username"),
            "{e}"
        );
        assert!(t("auth_methods = [\"scram-sha-256\", \"md5\"]\n").is_ok());
        assert!(t("max_message_bytes = 1048576\nmax_result_message_bytes = 1073741824\n").is_ok());
        let e = t("max_message_bytes = 1024\n").unwrap_err();
        assert!(
            e.contains("targets[0].max_message_bytes") && e.contains("between 65536"),
            "{e}"
        );
        let e = t("max_result_message_bytes = 2147483648\n").unwrap_err();
        assert!(e.contains("targets[0].max_result_message_bytes"), "{e}");
        let e = t("auth_methods = [\"trust\"]\n").unwrap_err();
        assert!(
            e.contains("`trust` is not scram-sha-256, md5 or password"),
            "{e}"
        );
    }

    #[test]
    fn webhooks_may_be_https_and_nothing_else() {
        let c =
            parse("[agent]\n[approvals]\nwebhooks = [\"https://hooks.example/T0/B0/secret\"]\n");
        assert!(c.is_ok(), "{:?}", c.err().map(|e| e.to_string()));
        let e = parse("[agent]\n[approvals]\nwebhooks = [\"ftp://hooks.example/secret\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("approvals.webhooks[0]"), "{e}");
        assert!(e.contains("must be an http:// or https:// URL"), "{e}");
        assert!(!e.contains("secret"), "the URL is a secret: {e}");
    }

    #[test]
    fn target_addresses() {
        assert_eq!(
            TargetAddress::parse("127.10.0.5:5432").unwrap(),
            TargetAddress::Ip("127.10.0.5:5432".parse().unwrap())
        );
        assert_eq!(
            TargetAddress::parse("[::1]:80").unwrap(),
            TargetAddress::Ip("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            TargetAddress::parse("db.internal:5432").unwrap(),
            TargetAddress::Host {
                host: "db.internal".into(),
                port: 5432
            }
        );
        assert!(TargetAddress::parse("::1:80").is_err());
        assert!(TargetAddress::parse("db:0").is_err());
        assert!(TargetAddress::parse("db:99999").is_err());
        assert!(TargetAddress::parse("bad host:1").is_err());
    }

    #[test]
    fn duplicate_targets_rejected() {
        let e = parse(
            "[agent]\n[[targets]]\nname = \"a\"\naddress = \"127.0.0.2:1\"\nprotocol = \"tcp\"\n[[targets]]\nname = \"a\"\naddress = \"127.0.0.3:1\"\nprotocol = \"tcp\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("targets[1].name"), "{e}");
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/agent.toml");
        let c = Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.agent.proxy_port, 975);
        assert_eq!(c.targets[0].name, "orders-db");
        assert_eq!(c.approvers[0].name, "alice");
    }

    #[test]
    fn credential_debug_hides_paths_and_values() {
        let c = CredentialConfig {
            username: Some("app".into()),
            password_file: Some("/etc/loopgate/secrets/hunter2".into()),
            ..Default::default()
        };
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2"), "{d}");
    }
}
