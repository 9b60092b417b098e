//! The admin API: a unix socket speaking one JSON object per line, and the
//! client side used by `loopgate status`.
//!
//! The socket is mode 0600 (or 0660 with `admin_group`), and every connection
//! is checked again with `SO_PEERCRED`: root, the agent's own uid, and members
//! of `admin_group` are served; anyone else gets a `permission denied` answer.

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
    /// The agent's cgroup root, relative to the cgroup2 mount.
    cgroup_root: Arc<str>,
}

/// Looks a group up by name.
pub fn group_id(name: &str) -> Result<u32, AdminError> {
    let c = std::ffi::CString::new(name).map_err(|_| AdminError::UnknownGroup(name.into()))?;
    // SAFETY: getgrnam returns a pointer into static storage or null; we only read gr_gid.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        return Err(AdminError::UnknownGroup(name.into()));
    }
    Ok(unsafe { (*g).gr_gid })
}

impl Server {
    pub fn bind(path: &Path, group: Option<&str>, cgroup_root: &str) -> Result<Self, AdminError> {
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
        // SAFETY: umask is process-wide but we restore it right after bind.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(path);
        unsafe { libc::umask(old) };
        let listener = listener.map_err(io)?;
        let mode = if let Some(gid) = gid {
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
            // SAFETY: chown on a path we just created; -1 keeps the owner.
            if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
                return Err(io(std::io::Error::last_os_error()));
            }
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            group: gid,
            cgroup_root: cgroup_root.into(),
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
            let root = self.cgroup_root.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, h, group, root).await {
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
    // SAFETY: geteuid has no failure mode.
    if uid == 0 || uid == unsafe { libc::geteuid() } {
        return true;
    }
    group.is_some_and(|g| groups.contains(&g))
}

/// Is the peer a tagged loop (inside the agent's cgroup subtree)? Loops must
/// never administer the agent or decide approvals, whatever their uid.
fn inside_tagged_subtree(pid: Option<i32>, root_rel: &str) -> bool {
    let Some(pid) = pid else { return false };
    let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    let root = format!("/{}", root_rel.trim_matches('/'));
    cg.lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .any(|p| p == root || p.starts_with(&format!("{root}/")))
}

async fn serve_one(
    stream: UnixStream,
    handler: Arc<dyn Handler>,
    group: Option<u32>,
    root_rel: Arc<str>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let groups = {
        use std::os::fd::AsRawFd;
        peer_groups(stream.as_raw_fd(), cred.gid())
    };
    let (r, mut w) = stream.into_split();
    let mut lines = TokioBufReader::new(r.take(64 * 1024)).lines();
    let refusal = if inside_tagged_subtree(cred.pid(), &root_rel) {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "admin request refused: the caller is a tagged loop");
        Some("permission denied: tagged loops may not use the admin socket".to_owned())
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
