//! [`SshServer`]: a real OpenSSH sshd (Debian's) on a loopback address,
//! with its own host key and config in a temporary directory; the user
//! [`SSH_USER`] logs in with the key the agent stores (the loop never has
//! it).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::free_port;
use crate::util::set_mode;

/// The local account the tests' sshd lets in (made if missing).
pub const SSH_USER: &str = "lgdeploy";

pub struct SshServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a set-up command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keygen(path: &std::path::Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "loopgate-test", "-f"])
        .arg(path));
}

impl SshServer {
    pub fn start(ip: &str) -> SshServer {
        assert!(
            std::path::Path::new("/usr/sbin/sshd").exists(),
            "sshd is not installed (cargo xtask setup installs openssh-server)"
        );
        if Command::new("id")
            .arg(SSH_USER)
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            run(Command::new("useradd").args(["-m", "-s", "/bin/sh", SSH_USER]));
        }
        // No password, but not locked: sshd without PAM lets no locked
        // account in, not even with a key.
        run(Command::new("usermod").args(["-p", "*", SSH_USER]));
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let dir = tempfile::Builder::new()
            .prefix("lgt-ssh-")
            .tempdir()
            .expect("tempdir");
        // sshd reads authorized_keys as the user.
        set_mode(dir.path(), 0o755);
        let p = |n: &str| dir.path().join(n);
        keygen(&p("host_key"));
        keygen(&p("stored_key"));
        std::fs::copy(p("stored_key.pub"), p("authorized_keys")).unwrap();
        set_mode(&p("authorized_keys"), 0o644);
        let port = free_port();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        std::fs::write(
            p("sshd_config"),
            format!(
                "Port {port}\nListenAddress {ip}\nHostKey {hk}\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin no\nAllowUsers {SSH_USER}\nLogLevel VERBOSE\n\
                 Subsystem sftp internal-sftp\n",
                hk = p("host_key").display(),
                d = dir.path().display()
            ),
        )
        .unwrap();
        // known_hosts for the agent: this server's host key under the name
        // a client uses for it.
        let host_pub = std::fs::read_to_string(p("host_key.pub")).unwrap();
        std::fs::write(p("known_hosts"), format!("[{ip}]:{port} {host_pub}")).unwrap();
        let log = std::fs::File::create(p("sshd.log")).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(p("sshd_config"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let server = SshServer {
            addr,
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                server.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The stored key's path (the agent's `credential.key_file`).
    pub fn stored_key(&self) -> PathBuf {
        self.dir.path().join("stored_key")
    }

    /// A known_hosts file with this server's host key (the agent's
    /// `credential.known_hosts_file`).
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// `ssh` straight to the server with the stored key (as root): what a
    /// command gives without loopgate.
    pub fn direct(&self, command: &str) -> std::process::Output {
        Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"])
            .arg(self.stored_key())
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.known_hosts().display()
            ))
            .args(["-o", "GlobalKnownHostsFile=/dev/null", "-p"])
            .arg(self.addr.port().to_string())
            .arg(format!("{SSH_USER}@{}", self.addr.ip()))
            .arg(command)
            .output()
            .expect("ssh")
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
