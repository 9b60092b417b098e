//! Helpers for the environments xtask builds, and clean-up of what an
//! interrupted test run can leave behind: pinned programs
//! of test agents (`/sys/fs/bpf/loopgate/lgt-*`) and their cgroups (`lgt-*`
//! below the cgroup2 mount).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

// The e2e harness's: one reading of mountinfo, one tree removal.
pub use loopgate_e2e::{find_cgroup2_mount as cgroup2_mount, remove_cgroup_tree};

pub fn clean_leftovers() {
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf/loopgate") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("lgt-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Some(m) = cgroup2_mount() {
        if let Ok(rd) = std::fs::read_dir(&m) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("lgt-") {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
    }
}

/// Waits until `loopgate status` answers for this config (20 s at most).
pub fn wait_ready(lg: &Path, config: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let ok = Command::new(lg)
            .arg("--config")
            .arg(config)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("the agent did not answer `loopgate status` within 20 s")
}
