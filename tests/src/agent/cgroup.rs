//! cgroup v2 helpers: where the hierarchy is mounted, removing a tree, and
//! workload cgroups an SRE names outside any agent's root.

use std::{
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

/// Where the cgroup2 hierarchy is mounted (from `/proc/self/mountinfo`),
/// if it is.
pub fn find_cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Where the cgroup2 hierarchy is mounted (tests need one).
pub fn cgroup2_mount() -> PathBuf {
    find_cgroup2_mount().expect("a cgroup2 mount")
}

/// Kills every process in the tree under `dir` and removes it.
pub fn remove_cgroup_tree(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// An SRE-named workload cgroup (`[[workloads]] cgroup = ...`) outside any
/// agent's root, as systemd would make for a unit: `rel` below the cgroup2
/// mount. Its top-level directory (the first component of `rel`) is removed
/// first (leftovers) and again on drop.
pub struct NamedCgroup {
    top: PathBuf,
    /// The path relative to the cgroup2 mount, as the config names it.
    pub rel: String,
}

impl NamedCgroup {
    pub fn create(rel: &str) -> NamedCgroup {
        let first = rel.split('/').next().expect("a cgroup path");
        let top = cgroup2_mount().join(first);
        remove_cgroup_tree(&top);
        std::fs::create_dir_all(cgroup2_mount().join(rel)).expect("create named cgroup");
        NamedCgroup {
            top,
            rel: rel.to_owned(),
        }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> PathBuf {
        cgroup2_mount().join(&self.rel)
    }

    /// Its `cgroup.procs`: a pid written here moves that process in.
    pub fn procs(&self) -> PathBuf {
        self.path().join("cgroup.procs")
    }
}

impl Drop for NamedCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.top);
    }
}
