//! [`PgServer`]: a real PostgreSQL server (Debian's), optionally with TLS
//! from a test CA.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::free_port;
use crate::util::set_mode;

/// A real PostgreSQL server (Debian's, run as `postgres`) on `ip`, with its
/// data in a temporary directory; stopped on drop. Host logins use
/// SCRAM-SHA-256; `postgres` logs in over the unix socket for set-up.
pub struct PgServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// With [`PgServer::start_tls`]: the CA (PEM) that signed the server's
    /// certificate.
    pub ca: Option<PathBuf>,
    child: Option<Child>,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (cargo xtask setup installs it)")
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("no PostgreSQL version")
        .join("bin")
        .join(name)
}

impl PgServer {
    pub fn start(ip: &str) -> PgServer {
        Self::start_with(ip, false)
    }

    /// A server with TLS on (a certificate for `ip` from a test CA, rcgen)
    /// that refuses logins without TLS.
    pub fn start_tls(ip: &str) -> PgServer {
        let pg = Self::start_with(ip, true);
        pg.prepend_hba("hostnossl all all 0.0.0.0/0 reject");
        pg
    }

    fn start_with(ip: &str, tls: bool) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("lgt-pg-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().display().to_string();
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres", &d])
            .status()
            .unwrap();
        assert!(chown.success());
        let as_pg = |cmd: &Path, args: &[&str]| {
            let out = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(cmd)
                .args(args)
                .output()
                .expect("runuser postgres");
            assert!(
                out.status.success(),
                "{}: {}",
                cmd.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        as_pg(
            &pg_bin("initdb"),
            &[
                "-D",
                &format!("{d}/data"),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
        );
        let mut ssl_args = Vec::new();
        let mut ca = None;
        if tls {
            use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
            let ca_key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "loopgate test database CA");
            let ca_cert = params.self_signed(&ca_key).unwrap();
            let issuer = Issuer::new(params, ca_key);
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![ip.to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let data = dir.path().join("data");
            std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
            std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
            set_mode(&data.join("server.key"), 0o600);
            let chown = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.crt"))
                .arg(data.join("server.key"))
                .status()
                .unwrap();
            assert!(chown.success());
            let ca_path = dir.path().join("ca.pem");
            std::fs::write(&ca_path, ca_cert.pem()).unwrap();
            set_mode(&ca_path, 0o644);
            ca = Some(ca_path);
            ssl_args = vec!["-c".to_owned(), "ssl=on".to_owned()];
        }
        let port = free_port();
        // setpriv execs (no forking wrapper): the child is the postmaster.
        let child = Command::new("setpriv")
            .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(pg_bin("postgres"))
            .args([
                "-D",
                &format!("{d}/data"),
                "-p",
                &port.to_string(),
                "-k",
                &d,
                "-c",
                &format!("listen_addresses={ip}"),
                "-c",
                "fsync=off",
            ])
            .args(&ssl_args)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("postgres.log"))
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .spawn()
            .expect("start postgres");
        let pg = PgServer {
            addr: format!("{ip}:{port}").parse().unwrap(),
            dir,
            ca,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(pg_bin("pg_isready"))
                .args(["-h", &d, "-p", &port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                std::fs::read_to_string(pg.dir.path().join("postgres.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    /// Puts an `pg_hba.conf` line first (first match wins) and reloads.
    pub fn prepend_hba(&self, line: &str) {
        let path = self.dir.path().join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&path).expect("read pg_hba.conf");
        std::fs::write(&path, format!("{line}\n{old}")).expect("write pg_hba.conf");
        self.admin("SELECT pg_reload_conf()");
    }

    /// The directory of the server's unix socket (`-h` for tools run as
    /// the `postgres` superuser).
    pub fn socket_dir(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// `pgbench -i -s SCALE` as the `postgres` superuser (the tables
    /// pgbench's scripts use, in database `postgres`).
    pub fn pgbench_init(&self, scale: u32) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--", "pgbench", "-i", "-q", "-s"])
            .arg(scale.to_string())
            .args([
                "-h",
                &self.socket_dir(),
                "-p",
                &self.addr.port().to_string(),
            ])
            .arg("postgres")
            .output()
            .expect("pgbench");
        assert!(
            out.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs SQL as the `postgres` superuser over the unix socket.
    pub fn admin(&self, sql: &str) -> String {
        let out = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "psql",
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-h", &self.dir.path().display().to_string()])
            .args([
                "-p",
                &self.addr.port().to_string(),
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: fast shutdown.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
