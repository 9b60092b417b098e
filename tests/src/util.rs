//! Small helpers: a process's output as text, file modes, and the tools
//! `cargo xtask setup` installs in the dev cache.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `rel` in the dev cache (`LOOPGATE_DEV_CACHE`, by default
/// /var/cache/loopgate-dev).
pub(crate) fn in_dev_cache(rel: &str) -> PathBuf {
    PathBuf::from(
        std::env::var("LOOPGATE_DEV_CACHE").unwrap_or_else(|_| "/var/cache/loopgate-dev".into()),
    )
    .join(rel)
}

/// `p`, or a panic that says how to get it.
pub(crate) fn must_exist(p: PathBuf) -> PathBuf {
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// playwright-core's directory (`cargo xtask setup` installs it).
pub fn playwright_core() -> PathBuf {
    must_exist(in_dev_cache("playwright/node_modules/playwright-core"))
}

/// The Python of the PyPI loops' venv (asyncpg; `cargo xtask setup`
/// installs it).
pub fn loops_python() -> String {
    must_exist(in_dev_cache("loops-venv/bin/python"))
        .display()
        .to_string()
}
