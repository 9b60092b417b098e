//! `loopgate exec --workload NAME [--user USER] -- CMD ARGS...`
//!
//! Runs a command as a tagged loop: the child moves itself into
//! `<cgroup2>/<root>/<NAME>/<instance>` (so it and every process it starts are
//! redirected), drops to an unprivileged user with `no_new_privs`, and execs.
//! The parent stays outside the cgroup, forwards SIGTERM/SIGHUP, waits, removes
//! the instance cgroup and exits with the child's status.

use std::{
    ffi::CString,
    fs::OpenOptions,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
};

use crate::{
    cgroup,
    config::{validate_name, Config},
};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "loopgate exec must run as root (it moves the loop into its cgroup, then drops privileges)"
    )]
    NotRoot,
    #[error("workload name: {0}")]
    BadWorkload(String),
    #[error("user `{0}` does not exist")]
    NoUser(String),
    #[error("refusing to run a loop as root: pass --user with an unprivileged user")]
    RootLoop,
    #[error("the loopgate programs are not attached to {root} (no pinned link at {pin}); start `loopgate agent` with this config first")]
    NotAttached { root: PathBuf, pin: PathBuf },
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("starting {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct ExecArgs {
    pub workload: String,
    pub user: Option<String>,
    pub command: Vec<String>,
}

struct Account {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    groups: Vec<libc::gid_t>,
}

fn lookup_user(name: &str) -> Result<Account, ExecError> {
    let c = CString::new(name).map_err(|_| ExecError::NoUser(name.into()))?;
    // SAFETY: getpwnam returns static storage or null; fields are copied out at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(ExecError::NoUser(name.into()));
    }
    let (uid, gid, home) = unsafe {
        (
            (*pw).pw_uid,
            (*pw).pw_gid,
            std::ffi::CStr::from_ptr((*pw).pw_dir)
                .to_string_lossy()
                .into_owned(),
        )
    };
    let mut n: libc::c_int = 64;
    let mut groups = vec![0 as libc::gid_t; n as usize];
    // SAFETY: buffer of n entries; getgrouplist updates n.
    let r = unsafe { libc::getgrouplist(c.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    if r < 0 {
        groups.resize(n.max(0) as usize, 0);
        unsafe { libc::getgrouplist(c.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    }
    groups.truncate(n.max(0) as usize);
    Ok(Account {
        name: name.to_owned(),
        uid,
        gid,
        home,
        groups,
    })
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Runs the loop and returns its exit code.
pub fn run(cfg: &Config, args: ExecArgs) -> Result<i32, ExecError> {
    validate_name(&args.workload).map_err(ExecError::BadWorkload)?;
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ExecError::NotRoot);
    }
    let user = args
        .user
        .clone()
        .or_else(|| {
            std::env::var("SUDO_USER")
                .ok()
                .filter(|u| !u.is_empty() && u != "root")
        })
        .unwrap_or_else(|| "nobody".into());
    let account = lookup_user(&user)?;
    if account.uid == 0 {
        return Err(ExecError::RootLoop);
    }

    let mount = cgroup::cgroup2_mount()?;
    let root = mount.join(cfg.agent.cgroup_root.trim_matches('/'));
    let pin = cfg.pin_dir().join("links/root/lg_connect4");
    if !pin.exists() {
        return Err(ExecError::NotAttached { root, pin });
    }
    let instance = format!("i-{}-{:08x}", std::process::id(), rand_u32());
    let dir = root.join(&args.workload).join(&instance);
    cgroup::create_dir(&dir)?;
    let procs = dir.join("cgroup.procs");
    let procs_file = OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|source| cgroup::CgroupError::Io {
            path: procs.clone(),
            source,
        })?;
    let procs_fd = procs_file.as_raw_fd();

    let (prog, rest) = args.command.split_first().ok_or_else(|| ExecError::Spawn {
        cmd: String::new(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no command given"),
    })?;
    let mut cmd = Command::new(prog);
    cmd.args(rest)
        .env("USER", &account.name)
        .env("LOGNAME", &account.name)
        .env("HOME", &account.home)
        .env("LOOPGATE_WORKLOAD", &args.workload)
        .env("LOOPGATE_INSTANCE", &instance)
        .env_remove("SUDO_USER")
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .env_remove("SUDO_COMMAND");
    let (uid, gid, groups) = (account.uid, account.gid, account.groups.clone());
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process (this child) into the cgroup.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // No setuid binary can bring root back (root could leave the cgroup).
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| {
        remove_instance(&dir);
        ExecError::Spawn {
            cmd: prog.clone(),
            source,
        }
    })?;
    drop(procs_file);
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    // SAFETY: installing plain handlers / ignoring signals in the parent only.
    unsafe {
        libc::signal(libc::SIGTERM, forward as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, forward as *const () as libc::sighandler_t);
        // The terminal's SIGINT/SIGQUIT reach the child directly; the parent waits.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = child.wait();
    remove_instance(&dir);
    let status = status.map_err(|source| ExecError::Spawn {
        cmd: prog.clone(),
        source,
    })?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Removes the instance cgroup once its processes are gone (a daemonised
/// grandchild keeps it populated; then it stays, and stays tagged).
fn remove_instance(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(_) => return,
        }
    }
    tracing::debug!(cgroup = %dir.display(), "instance cgroup still populated; left in place");
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom into a 4-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    }
}
