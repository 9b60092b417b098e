//! The admin API: a unix socket speaking one JSON object per line, and the
//! client side used by `loopgate status`.
//!
//! The socket is mode 0600 (or 0660 with `admin_group`), and every connection
//! is checked again with `SO_PEERCRED`: root, the agent's own uid, and members
//! of `admin_group` are served; anyone else gets a `permission denied` answer.
//!
//! Tagged loops are refused whatever their uid. The check is made on the
//! process that connected, through the pidfd the kernel hands out for it
//! (`SO_PEERPIDFD`): its cgroup is read, then the pidfd confirms that the
//! process is still the one the pid named. A caller whose cgroup cannot be
//! established (it exited, it is in a pid namespace the agent cannot see) is
//! refused: a loop must not pass by forking a child to connect and exit.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin group `{0}` does not exist")]
    UnknownGroup(String),
    #[error("cannot reach the agent at {path}: {source} (is `loopgate agent` running with this config?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent answered: {0}")]
    Remote(String),
    #[error("bad answer from the agent: {0}")]
    Protocol(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    ApprovalsList,
    ApprovalsDecide {
        id: uuid::Uuid,
        approve: bool,
        #[serde(default)]
        reason: String,
    },
}

/// Who is calling, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub pid: Option<i32>,
    /// Root, the agent's uid, or a member of `admin_group`.
    pub admin: bool,
}

/// Answers requests; implemented by the daemon. Errors are `{"error": ...}`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request, caller: Caller) -> serde_json::Value;
    /// Whether a caller that is not an administrator may still talk (approvers).
    fn is_approver(&self, uid: u32) -> bool;
}

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
    /// Where tagged loops live: the cgroup root and every `[[workloads]]
    /// cgroup`, relative to the cgroup2 mount.
    tagged: Arc<[String]>,
}

/// Looks a group up by name (thread-safe: `getgrnam_r`).
pub fn group_id(name: &str) -> Result<u32, AdminError> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| AdminError::UnknownGroup(name.into()))
}

impl Server {
    /// `tagged`: every attach point (the cgroup root, each `[[workloads]]
    /// cgroup`), relative to the cgroup2 mount; callers inside any of them are
    /// refused.
    pub fn bind(path: &Path, group: Option<&str>, tagged: &[&str]) -> Result<Self, AdminError> {
        let io = |source| AdminError::Io {
            path: path.to_owned(),
            source,
        };
        let gid = group.map(group_id).transpose()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // A stale socket from a crashed agent: only remove it when nobody answers.
        if path.exists() {
            if StdUnixStream::connect(path).is_ok() {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another agent is listening on it",
                )));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        // Create the socket with no access for anyone, then open it up as configured.
        // (The umask is process-wide: it is restored right after the bind.)
        use nix::sys::stat::{umask, Mode};
        let old = umask(Mode::from_bits_truncate(0o177));
        let listener = UnixListener::bind(path);
        umask(old);
        let listener = listener.map_err(io)?;
        let mode = if let Some(gid) = gid {
            // The owner stays; the group is the admin group.
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| io(e.into()))?;
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            group: gid,
            tagged: tagged
                .iter()
                .map(|t| format!("/{}", t.trim_matches('/')))
                .collect(),
        })
    }

    pub async fn serve(self, handler: Arc<dyn Handler>, stop: CancellationToken) {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => break,
                c = self.listener.accept() => c,
            };
            let (stream, _) = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let h = handler.clone();
            let group = self.group;
            let tagged = self.tagged.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, h, group, tagged).await {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Groups of the peer as they were when it connected (`SO_PEERGROUPS`), plus
/// its gid from `SO_PEERCRED`: not re-read from /proc, where a later setgid
/// exec or a reused pid could answer.
fn peer_groups(fd: i32, gid: u32) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: getsockopt into a buffer of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let n = if r == 0 {
        len as usize / std::mem::size_of::<libc::gid_t>()
    } else {
        0
    };
    groups.truncate(n);
    groups.push(gid);
    groups
}

fn authorised(uid: u32, groups: &[u32], group: Option<u32>) -> bool {
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return true;
    }
    group.is_some_and(|g| groups.contains(&g))
}

/// Where the process that connected is, as far as the agent can tell.
#[derive(Debug, PartialEq, Eq)]
enum Peer {
    /// Alive, outside every attach point.
    Untagged,
    /// Inside an attach point (its cgroup path).
    Tagged(String),
    /// Not established (why): refused like a tagged loop.
    Unknown(String),
}

/// Is `cgroup` (a `0::` path, maybe with ` (deleted)`) at or below one of
/// `tagged`?
fn in_subtrees(cgroup: &str, tagged: &[String]) -> bool {
    let cg = cgroup.strip_suffix(" (deleted)").unwrap_or(cgroup);
    tagged.iter().any(|t| {
        let t = t.trim_end_matches('/');
        t.is_empty() || cg == t || cg.strip_prefix(t).is_some_and(|r| r.starts_with('/'))
    })
}

/// The cgroup2 path in a `/proc/<pid>/cgroup` text.
fn unified_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The pid a pidfd names, in the agent's pid namespace (`Pid:` in its fdinfo:
/// -1 once the process was reaped, 0 when it is not visible from here).
fn pidfd_pid(pidfd: &std::os::fd::OwnedFd) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether the process behind `pidfd` is still there (signal 0: nothing is
/// sent). A pid reused by another process does not answer for this one.
fn pidfd_alive(pidfd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal with signal 0 and no siginfo only checks.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    // EPERM: it exists, we may not signal it.
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Decides on the process that connected (`SO_PEERPIDFD`), never on a pid
/// alone: read its cgroup, then check with the pidfd that the pid still named
/// that process while it was read. Anything unknown is [`Peer::Unknown`].
fn locate_peer(sock: &impl std::os::fd::AsFd, tagged: &[String]) -> Peer {
    use nix::sys::socket::{getsockopt, sockopt::PeerPidfd};
    let pidfd = match getsockopt(sock, PeerPidfd) {
        Ok(fd) => fd,
        Err(e) => return Peer::Unknown(format!("no pidfd for the peer ({e})")),
    };
    let pid = match pidfd_pid(&pidfd) {
        Some(p) if p > 0 => p,
        Some(-1) => return Peer::Unknown("the process that connected has exited".into()),
        Some(_) => {
            return Peer::Unknown("the process that connected is not visible to the agent".into())
        }
        None => return Peer::Unknown("the peer's pidfd cannot be read".into()),
    };
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"));
    if !pidfd_alive(&pidfd) {
        return Peer::Unknown("the process that connected has exited".into());
    }
    let text = match text {
        Ok(t) => t,
        Err(e) => return Peer::Unknown(format!("its cgroup cannot be read ({e})")),
    };
    match unified_path(&text) {
        Some(p) if in_subtrees(p, tagged) => Peer::Tagged(p.to_owned()),
        Some(_) => Peer::Untagged,
        None => Peer::Unknown("it has no cgroup2 path".into()),
    }
}

async fn serve_one(
    stream: UnixStream,
    handler: Arc<dyn Handler>,
    group: Option<u32>,
    tagged: Arc<[String]>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let groups = {
        use std::os::fd::AsRawFd;
        peer_groups(stream.as_raw_fd(), cred.gid())
    };
    let peer = locate_peer(&stream, &tagged);
    let (r, mut w) = stream.into_split();
    let mut lines = TokioBufReader::new(r.take(64 * 1024)).lines();
    let refusal = if let Peer::Tagged(cgroup) = &peer {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), %cgroup, "admin request refused: the caller is a tagged loop");
        Some("permission denied: tagged loops may not use the admin socket".to_owned())
    } else if let Peer::Unknown(why) = &peer {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), why = %why, "admin request refused: the caller's cgroup is unknown");
        Some(format!(
            "permission denied: cannot establish that the caller is not a tagged loop ({why})"
        ))
    } else if !authorised(cred.uid(), &groups, group) && !handler.is_approver(cred.uid()) {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "admin request refused: caller is not an administrator");
        Some(format!(
            "permission denied: uid {} may not use the admin socket",
            cred.uid()
        ))
    } else {
        None
    };
    if let Some(error) = refusal {
        // Read the request first, so the caller is not cut off mid-write
        // (EPIPE) before it can read why.
        let _ = tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await;
        let msg = serde_json::json!({ "error": error });
        w.write_all(format!("{msg}\n").as_bytes()).await?;
        return Ok(());
    }
    let admin = authorised(cred.uid(), &groups, group);
    while let Some(line) = lines.next_line().await? {
        let caller = Caller {
            uid: cred.uid(),
            pid: cred.pid(),
            admin,
        };
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handler.handle(req, caller),
            Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
        };
        w.write_all(format!("{answer}\n").as_bytes()).await?;
    }
    Ok(())
}

use tokio::io::AsyncReadExt as _;

/// Sends one request and returns the answer (blocking; used by the CLI).
pub fn call(path: &Path, req: &Request) -> Result<serde_json::Value, AdminError> {
    let mut s = StdUnixStream::connect(path).map_err(|source| AdminError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let io = |source| AdminError::Io {
        path: path.to_owned(),
        source,
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let line = serde_json::to_string(req).map_err(|e| AdminError::Protocol(e.to_string()))?;
    let sent = s.write_all(format!("{line}\n").as_bytes());
    // Even when the write failed, the agent may have said why it refused.
    let mut answer = String::new();
    let read = BufReader::new(&s).read_line(&mut answer);
    if answer.trim().is_empty() {
        sent.map_err(io)?;
        read.map_err(io)?;
    }
    let v: serde_json::Value =
        serde_json::from_str(&answer).map_err(|e| AdminError::Protocol(e.to_string()))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(AdminError::Remote(err.to_owned()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(x: &[&str]) -> Vec<String> {
        x.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn subtrees_match_whole_path_components_only() {
        let t = v(&["/loopgate", "/system.slice/etl.service"]);
        assert!(in_subtrees("/loopgate", &t));
        assert!(in_subtrees("/loopgate/w/i-1", &t));
        assert!(in_subtrees("/loopgate/w/i-1 (deleted)", &t));
        assert!(in_subtrees("/system.slice/etl.service", &t));
        assert!(in_subtrees("/system.slice/etl.service/sub", &t));
        assert!(!in_subtrees("/loopgate2/w", &t));
        assert!(!in_subtrees("/system.slice/etl.service2", &t));
        assert!(!in_subtrees("/user.slice", &t));
        // A workload cgroup at the mount itself tags everyone.
        assert!(in_subtrees("/user.slice", &v(&["/"])));
    }

    #[test]
    fn the_unified_line_is_found() {
        assert_eq!(unified_path("0::/a/b\n"), Some("/a/b"));
        assert_eq!(
            unified_path("12:pids:/x\n0::/user.slice/s\n"),
            Some("/user.slice/s")
        );
        assert_eq!(unified_path("12:pids:/x\n"), None);
    }

    fn own_cgroup() -> String {
        let t = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        unified_path(&t).unwrap().to_owned()
    }

    #[test]
    fn a_live_peer_is_located_by_its_cgroup() {
        let (a, _b) = StdUnixStream::pair().unwrap();
        assert_eq!(locate_peer(&a, &v(&["/no-such-subtree"])), Peer::Untagged);
        let mine = own_cgroup();
        assert_eq!(locate_peer(&a, &v(&[&mine])), Peer::Tagged(mine.clone()));
    }

    /// The attack: a child connects and exits, another process talks on the
    /// socket. The peer cannot be located, so it is refused.
    #[test]
    fn a_peer_that_connected_and_exited_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let st = std::process::Command::new("/usr/bin/python3")
            .arg("-c")
            .arg("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])")
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success());
        let (conn, _) = l.accept().unwrap();
        match locate_peer(&conn, &v(&["/no-such-subtree"])) {
            Peer::Unknown(why) => assert!(why.contains("exited"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
