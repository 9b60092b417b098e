//! cgroup2: finding the mount, the agent's subtree, and turning the cgroup id
//! the kernel recorded at connect into a workload name.
//!
//! The cgroup id that `bpf_get_current_cgroup_id()` returns is the inode number
//! of the cgroup's directory in cgroup2fs, so the agent maps ids to paths by
//! walking its own subtree (and the SRE-named workload cgroups) and caching
//! `st_ino → path`. An unprivileged loop cannot move itself out of the subtree
//! (it cannot write to `cgroup.procs` files it does not own), which makes the
//! workload identity kernel-attested.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::RwLock,
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(std::io::Error),
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Finds a mount point of the given file system type in `/proc/self/mountinfo`.
pub fn find_mount(fstype: &str) -> Result<Option<PathBuf>, std::io::Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&info, fstype))
}

fn parse_mountinfo(info: &str, fstype: &str) -> Option<PathBuf> {
    mount_points(info, fstype).into_iter().next()
}

/// Every mount point of `fstype` in a mountinfo text.
pub fn mount_points(info: &str, fstype: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in info.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some(fstype) {
            continue;
        }
        if let Some(mp) = left.split_whitespace().nth(4) {
            out.push(PathBuf::from(unescape_mountinfo(mp)));
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mount point (e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    find_mount("cgroup2")
        .map_err(CgroupError::MountInfo)?
        .ok_or(CgroupError::NoCgroup2)
}

pub fn create_dir(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })
}

pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            path: path.to_owned(),
            source,
        })
}

const MAX_CACHED: usize = 100_000;

/// Who a cgroup id belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadId {
    pub workload: String,
    /// The cgroup path relative to the cgroup2 mount.
    pub cgroup: String,
}

/// Resolves cgroup ids to workloads, with a cache refreshed on a miss.
pub struct WorkloadResolver {
    mount: PathBuf,
    root_rel: String,
    /// (workload name, cgroup path relative to the mount) of SRE-named cgroups.
    named: Vec<(String, String)>,
    cache: RwLock<HashMap<u64, WorkloadId>>,
    /// cgroup ids seen outside every attach point. A cgroup never moves, so
    /// an id once outside stays outside.
    outside: RwLock<std::collections::HashSet<u64>>,
}

impl WorkloadResolver {
    pub fn new(mount: PathBuf, root_rel: &str, named: Vec<(String, String)>) -> Self {
        Self {
            mount,
            root_rel: root_rel.trim_matches('/').to_owned(),
            named: named
                .into_iter()
                .map(|(n, c)| (n, c.trim_matches('/').to_owned()))
                .collect(),
            cache: RwLock::new(HashMap::new()),
            outside: RwLock::new(std::collections::HashSet::new()),
        }
    }

    /// Whether cgroup `id` is a tagged loop's (inside the agent's subtree or
    /// a named workload cgroup). Unknown ids cost one rescan, then are
    /// remembered as outside.
    pub fn is_tagged(&self, id: u64) -> bool {
        if id == 0 {
            return false;
        }
        if self
            .outside
            .read()
            .map(|o| o.contains(&id))
            .unwrap_or(false)
        {
            return false;
        }
        if self.resolve(&[id]).is_some() {
            return true;
        }
        if let Ok(mut o) = self.outside.write() {
            if o.len() > MAX_CACHED {
                o.clear();
            }
            o.insert(id);
        }
        false
    }

    /// Resolves the first of `ids` (most specific first: the caller's cgroup,
    /// then its ancestors from the deepest up) that belongs to a workload.
    /// Rescans the subtree once when none is known yet.
    pub fn resolve(&self, ids: &[u64]) -> Option<WorkloadId> {
        // `ids` is most specific first. Only the connecting cgroup itself is
        // trusted from the cache: an ancestor hit there may just mean its
        // new child was not scanned yet (a new workload would otherwise
        // resolve to its parent, the root).
        let first = *ids.iter().find(|&&id| id != 0)?;
        if let Some(w) = self.cache.read().ok().and_then(|c| c.get(&first).cloned()) {
            return Some(w);
        }
        let fresh = self.scan();
        let find = |m: &HashMap<u64, WorkloadId>| {
            ids.iter()
                .filter(|&&id| id != 0)
                .find_map(|id| m.get(id).cloned())
        };
        let Ok(mut c) = self.cache.write() else {
            return find(&fresh);
        };
        // Keep ids of cgroups that are gone (records can arrive late), up to
        // a bound; past it, start over from what exists now.
        if c.len() + fresh.len() > MAX_CACHED {
            *c = fresh;
        } else {
            c.extend(fresh);
        }
        // The cgroup may be gone already (a short-lived loop): its nearest
        // known ancestor names the workload.
        find(&c)
    }

    /// Walks the agent's subtree and the named cgroups.
    fn scan(&self) -> HashMap<u64, WorkloadId> {
        let mut map = HashMap::new();
        let root = self.mount.join(&self.root_rel);
        walk(&root, 0, &mut |path, depth| {
            let rel = path.strip_prefix(&self.mount).unwrap_or(path);
            let rel_s = rel.to_string_lossy().into_owned();
            let below_root = path.strip_prefix(&root).unwrap_or(path);
            let workload = if depth == 0 {
                "(root)".to_owned()
            } else {
                below_root
                    .components()
                    .next()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            if let Ok(m) = std::fs::metadata(path) {
                map.insert(
                    m.ino(),
                    WorkloadId {
                        workload,
                        cgroup: rel_s,
                    },
                );
            }
        });
        for (name, cg) in &self.named {
            let base = self.mount.join(cg);
            walk(&base, 0, &mut |path, _| {
                let rel = path.strip_prefix(&self.mount).unwrap_or(path);
                if let Ok(m) = std::fs::metadata(path) {
                    map.insert(
                        m.ino(),
                        WorkloadId {
                            workload: name.clone(),
                            cgroup: rel.to_string_lossy().into_owned(),
                        },
                    );
                }
            });
        }
        map
    }
}

fn walk(dir: &Path, depth: usize, f: &mut dyn FnMut(&Path, usize)) {
    if depth > 16 {
        return;
    }
    f(dir, depth);
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&e.path(), depth + 1, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "\
24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
31 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            parse_mountinfo(info, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_mountinfo(info, "bpf"), None);
    }

    #[test]
    fn finds_cgroup2_with_optional_fields_and_escapes() {
        let info = "35 24 0:30 / /sys/fs/cgroup\\040x rw shared:9 master:1 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(info, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup x"))
        );
    }
}
