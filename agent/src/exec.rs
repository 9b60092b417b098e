//! `loopgate exec --workload NAME [--user USER] [--env NAME]... -- CMD ARGS...`
//!
//! Runs a command as a tagged loop: the child moves itself into
//! `<cgroup2>/<root>/<NAME>/<instance>` (so it and every process it starts are
//! redirected), drops to an unprivileged user with `no_new_privs`, and execs.
//! The parent stays outside the cgroup, forwards SIGTERM/SIGHUP/SIGINT/SIGQUIT,
//! waits, removes the instance cgroup and exits with the child's status.
//!
//! The loop never shares the caller's terminal or secrets (as `sudo` with
//! `use_pty` and `env_reset`):
//! - it starts a new session, so it has no controlling terminal of the caller
//!   (no `TIOCSTI` into the caller's shell, no signals to its jobs); when stdin
//!   is a terminal (and `exec` is in its foreground), the loop gets a private
//!   pty as stdin (and as stdout/stderr where those are the terminal) and the
//!   parent relays bytes between it and the caller's terminal (raw mode while
//!   relaying, window size changes forwarded);
//! - descriptors above 2 are closed at exec;
//! - the environment is rebuilt: `PATH`, `LANG`, `TERM` from the caller,
//!   `HOME`, `USER`, `LOGNAME`, `SHELL` of the loop's user,
//!   `LOOPGATE_WORKLOAD`, `LOOPGATE_INSTANCE`, and what `--env NAME` names.

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
    #[error("--env `{0}`: give a variable name (letters, digits, `_`), not a value")]
    BadEnv(String),
    #[error("setting up the loop's terminal: {0}")]
    Terminal(std::io::Error),
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
    /// Caller variables passed to the loop on top of the kept ones.
    pub env: Vec<String>,
    pub command: Vec<String>,
}

struct Account {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
    groups: Vec<libc::gid_t>,
}

/// Caller variables every loop gets (when set).
const KEPT: &[&str] = &["PATH", "LANG", "TERM"];
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

fn valid_env_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with(|c: char| c.is_ascii_digit())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The loop's whole environment: nothing of the caller's but [`KEPT`] and the
/// names in `pass` (`caller` looks a caller variable up).
fn loop_env(
    caller: impl Fn(&str) -> Option<std::ffi::OsString>,
    account: &Account,
    pass: &[String],
    workload: &str,
    instance: &str,
) -> Vec<(String, std::ffi::OsString)> {
    let mut env: Vec<(String, std::ffi::OsString)> = Vec::new();
    let mut set = |k: &str, v: std::ffi::OsString| {
        env.retain(|(n, _)| n != k);
        env.push((k.to_owned(), v));
    };
    for k in KEPT {
        if let Some(v) = caller(k) {
            set(k, v);
        }
    }
    if caller("PATH").is_none() {
        set("PATH", DEFAULT_PATH.into());
    }
    set("HOME", account.home.clone().into());
    set("USER", account.name.clone().into());
    set("LOGNAME", account.name.clone().into());
    set("SHELL", account.shell.clone().into());
    for k in pass {
        if let Some(v) = caller(k) {
            set(k, v);
        }
    }
    set("LOOPGATE_WORKLOAD", workload.into());
    set("LOOPGATE_INSTANCE", instance.into());
    env
}

/// The account `name` (thread-safe lookups: `getpwnam_r`, `getgrouplist`).
fn lookup_user(name: &str) -> Result<Account, ExecError> {
    let no_user = || ExecError::NoUser(name.into());
    let user = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .ok_or_else(no_user)?;
    let c = CString::new(name).map_err(|_| no_user())?;
    let groups = nix::unistd::getgrouplist(&c, user.gid)
        .map_err(|_| no_user())?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    let shell = user.shell.to_string_lossy().into_owned();
    Ok(Account {
        name: name.to_owned(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir.to_string_lossy().into_owned(),
        shell: if shell.is_empty() {
            "/bin/sh".to_owned()
        } else {
            shell
        },
        groups,
    })
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // kill(2) is async-signal-safe; a signal number we were given.
        if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}

/// Runs the loop and returns its exit code.
pub fn run(cfg: &Config, args: ExecArgs) -> Result<i32, ExecError> {
    validate_name(&args.workload).map_err(ExecError::BadWorkload)?;
    if let Some(bad) = args.env.iter().find(|n| !valid_env_name(n)) {
        return Err(ExecError::BadEnv(bad.clone()));
    }
    if !nix::unistd::geteuid().is_root() {
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
    cmd.args(rest).env_clear().envs(loop_env(
        |k| std::env::var_os(k),
        &account,
        &args.env,
        &args.workload,
        &instance,
    ));
    let pty = match terminal::Pty::for_caller(account.uid) {
        Ok(p) => p,
        Err(e) => {
            remove_instance(&dir);
            return Err(ExecError::Terminal(e));
        }
    };
    if let Some(p) = &pty {
        if let Err(e) = p.attach(&mut cmd) {
            remove_instance(&dir);
            return Err(ExecError::Terminal(e));
        }
    }
    let with_tty = pty.is_some();
    let (uid, gid) = (
        nix::unistd::Uid::from_raw(account.uid),
        nix::unistd::Gid::from_raw(account.gid),
    );
    let groups: Vec<nix::unistd::Gid> = account
        .groups
        .iter()
        .map(|&g| nix::unistd::Gid::from_raw(g))
        .collect();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process (this child) into the cgroup.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            // A session of its own: the caller's terminal is not its
            // controlling terminal (no TIOCSTI into the caller's shell).
            nix::unistd::setsid()?;
            // Its private pty (already on 0, 1 or 2) becomes its terminal.
            if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing the caller had open beyond stdio reaches the loop.
            if libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            // No setuid binary can bring root back (root could leave the cgroup).
            nix::sys::prctl::set_no_new_privs()?;
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // The parent keeps no copy of the pty's follower side (the loop's exit
    // then reads as EOF on the leader).
    drop(cmd);
    let mut child = spawned.map_err(|source| {
        remove_instance(&dir);
        ExecError::Spawn {
            cmd: prog.clone(),
            source,
        }
    })?;
    drop(procs_file);
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    // SAFETY: installing plain handlers in the parent only. The loop is in a
    // session of its own, so the terminal's signals reach this process, which
    // passes them on.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
            libc::signal(sig, forward as *const () as libc::sighandler_t);
        }
    }
    let status = match pty {
        Some(p) => p.relay(&mut child),
        None => child.wait(),
    };
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
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_ok() {
        u32::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> Account {
        Account {
            name: "etl".into(),
            uid: 1001,
            gid: 1001,
            home: "/home/etl".into(),
            shell: "/bin/bash".into(),
            groups: vec![],
        }
    }

    #[test]
    fn the_environment_is_rebuilt_from_the_kept_list() {
        let caller = |k: &str| {
            let v = match k {
                "PATH" => "/root/bin:/usr/bin",
                "TERM" => "xterm",
                "HOME" => "/root",
                "USER" => "root",
                "AWS_SECRET_ACCESS_KEY" => "x",
                "EDITOR" => "vi",
                _ => return None,
            };
            Some(std::ffi::OsString::from(v))
        };
        let env = loop_env(
            caller,
            &account(),
            &["EDITOR".into(), "UNSET".into()],
            "w",
            "i-1",
        );
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(get("PATH").as_deref(), Some("/root/bin:/usr/bin"));
        assert_eq!(get("TERM").as_deref(), Some("xterm"));
        assert_eq!(get("HOME").as_deref(), Some("/home/etl"));
        assert_eq!(get("USER").as_deref(), Some("etl"));
        assert_eq!(get("LOGNAME").as_deref(), Some("etl"));
        assert_eq!(get("SHELL").as_deref(), Some("/bin/bash"));
        assert_eq!(get("EDITOR").as_deref(), Some("vi"));
        assert_eq!(get("LOOPGATE_WORKLOAD").as_deref(), Some("w"));
        assert_eq!(get("LOOPGATE_INSTANCE").as_deref(), Some("i-1"));
        assert_eq!(get("AWS_SECRET_ACCESS_KEY"), None);
        assert_eq!(get("UNSET"), None);
        assert_eq!(get("LANG"), None);
        assert_eq!(env.len(), 9);
        // No PATH at all: a safe default.
        let env = loop_env(|_| None, &account(), &[], "w", "i-1");
        assert!(env.iter().any(|(k, v)| k == "PATH" && v == DEFAULT_PATH));
    }

    #[test]
    fn env_names_only() {
        assert!(valid_env_name("PGPASSWORD"));
        assert!(valid_env_name("_X1"));
        assert!(!valid_env_name("X=1"));
        assert!(!valid_env_name(""));
        assert!(!valid_env_name("1X"));
        assert!(!valid_env_name("A B"));
    }
}

/// The loop's private pty and the relay between it and the caller's terminal.
mod terminal {
    use std::{
        io,
        os::fd::{AsFd, BorrowedFd, OwnedFd},
        process::{Child, Command, ExitStatus, Stdio},
        sync::atomic::{AtomicBool, Ordering},
    };

    use nix::{
        errno::Errno,
        fcntl::{fcntl, FcntlArg, FdFlag, OFlag},
        poll::{poll, PollFd, PollFlags, PollTimeout},
        pty::{openpty, Winsize},
        sys::{
            signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal},
            termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios},
        },
        unistd::{self, Uid},
    };

    static WINCH: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_winch(_: libc::c_int) {
        WINCH.store(true, Ordering::SeqCst);
    }

    /// Only interrupts `poll` when the loop exits.
    extern "C" fn on_chld(_: libc::c_int) {}

    nix::ioctl_read_bad!(get_winsize, libc::TIOCGWINSZ, Winsize);
    nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, Winsize);

    fn fd(n: i32) -> BorrowedFd<'static> {
        // SAFETY: 0, 1 and 2 stay open for the life of the process (at worst
        // on /dev/null); a closed one only makes the calls fail.
        unsafe { BorrowedFd::borrow_raw(n) }
    }

    fn is_tty(n: i32) -> bool {
        unistd::isatty(fd(n)).unwrap_or(false)
    }

    fn winsize(of: i32) -> Option<Winsize> {
        let mut ws = Winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize.
        unsafe { get_winsize(of, &mut ws) }.ok().map(|_| ws)
    }

    pub struct Pty {
        leader: OwnedFd,
        follower: OwnedFd,
        /// The caller's terminal settings, restored after relaying.
        saved: Termios,
        stdout_tty: bool,
        stderr_tty: bool,
    }

    /// Puts the caller's terminal back as it was, however the relay ends.
    struct Restore(Termios);

    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = tcsetattr(fd(0), SetArg::TCSADRAIN, &self.0);
        }
    }

    impl Pty {
        /// A pty for a loop run as `uid`, when stdin is a terminal and this
        /// process is in its foreground (else `None`: the loop just gets a
        /// session of its own).
        pub fn for_caller(uid: u32) -> io::Result<Option<Pty>> {
            if !is_tty(0) || unistd::tcgetpgrp(fd(0)).ok() != Some(unistd::getpgrp()) {
                return Ok(None);
            }
            let saved = tcgetattr(fd(0))?;
            let ws = winsize(0);
            let p = openpty(ws.as_ref(), &saved)?;
            for f in [&p.master, &p.slave] {
                fcntl(f, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
            }
            // The loop's own terminal, as login does.
            unistd::fchown(&p.slave, Some(Uid::from_raw(uid)), None)?;
            Ok(Some(Pty {
                leader: p.master,
                follower: p.slave,
                saved,
                stdout_tty: is_tty(1),
                stderr_tty: is_tty(2),
            }))
        }

        /// The pty as the loop's stdin, and as stdout/stderr where the
        /// caller's are the terminal (redirected ones are passed as they are).
        pub fn attach(&self, cmd: &mut Command) -> io::Result<()> {
            cmd.stdin(Stdio::from(self.follower.try_clone()?));
            if self.stdout_tty {
                cmd.stdout(Stdio::from(self.follower.try_clone()?));
            }
            if self.stderr_tty {
                cmd.stderr(Stdio::from(self.follower.try_clone()?));
            }
            Ok(())
        }

        /// Relays until the loop exits, then returns its status.
        pub fn relay(self, child: &mut Child) -> io::Result<ExitStatus> {
            let Pty {
                leader,
                follower,
                saved,
                stdout_tty,
                stderr_tty,
            } = self;
            drop(follower);
            let out = if stdout_tty || !stderr_tty { 1 } else { 2 };
            let no_restart = |h: extern "C" fn(libc::c_int)| {
                SigAction::new(SigHandler::Handler(h), SaFlags::empty(), SigSet::empty())
            };
            // SAFETY: the handlers only store to an atomic (or do nothing).
            unsafe {
                sigaction(Signal::SIGWINCH, &no_restart(on_winch))?;
                sigaction(Signal::SIGCHLD, &no_restart(on_chld))?;
            }
            let flags = OFlag::from_bits_truncate(fcntl(&leader, FcntlArg::F_GETFL)?);
            fcntl(&leader, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
            let mut raw = saved.clone();
            cfmakeraw(&mut raw);
            tcsetattr(fd(0), SetArg::TCSADRAIN, &raw)?;
            let _restore = Restore(saved);

            let mut input: Vec<u8> = Vec::new();
            let mut stdin_open = true;
            let mut buf = [0u8; 16 * 1024];
            loop {
                if WINCH.swap(false, Ordering::SeqCst) {
                    if let Some(ws) = winsize(0) {
                        // SAFETY: TIOCSWINSZ reads one winsize.
                        let _ =
                            unsafe { set_winsize(std::os::fd::AsRawFd::as_raw_fd(&leader), &ws) };
                    }
                }
                if let Some(st) = child.try_wait()? {
                    // What the loop wrote before it exited.
                    while let Ok(n @ 1..) = unistd::read(&leader, &mut buf) {
                        write_all(out, &buf[..n]);
                    }
                    return Ok(st);
                }
                let mut want = PollFlags::POLLIN;
                if !input.is_empty() {
                    want |= PollFlags::POLLOUT;
                }
                let mut fds = vec![PollFd::new(leader.as_fd(), want)];
                if stdin_open && input.is_empty() {
                    fds.push(PollFd::new(fd(0), PollFlags::POLLIN));
                }
                match poll(&mut fds, PollTimeout::from(200u16)) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
                let revents = |i: usize| {
                    fds.get(i)
                        .and_then(|f| f.revents())
                        .unwrap_or(PollFlags::empty())
                };
                let (l, i) = (revents(0), revents(1));
                drop(fds);
                let ready = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
                if l.intersects(ready) {
                    match unistd::read(&leader, &mut buf) {
                        Ok(0) => return child.wait(),
                        Ok(n) => write_all(out, &buf[..n]),
                        Err(Errno::EAGAIN | Errno::EINTR) => {}
                        // EIO: the loop closed its terminal; wait for it.
                        Err(_) => return child.wait(),
                    }
                }
                if l.contains(PollFlags::POLLOUT) {
                    match unistd::write(&leader, &input) {
                        Ok(n) => {
                            input.drain(..n);
                        }
                        Err(Errno::EAGAIN | Errno::EINTR) => {}
                        Err(_) => input.clear(),
                    }
                }
                if i.intersects(ready) {
                    match unistd::read(fd(0), &mut buf) {
                        Ok(0) => stdin_open = false,
                        Ok(n) => input.extend_from_slice(&buf[..n]),
                        Err(Errno::EAGAIN | Errno::EINTR) => {}
                        Err(_) => stdin_open = false,
                    }
                }
            }
        }
    }

    /// Output for the caller's terminal; dropped if it went away.
    fn write_all(to: i32, mut b: &[u8]) {
        while !b.is_empty() {
            match unistd::write(fd(to), b) {
                Ok(n) => b = &b[n..],
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(_) => return,
            }
        }
    }
}
