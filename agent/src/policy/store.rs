//! The live policy: swapped atomically on reload (file change or SIGHUP). An
//! invalid set is reported and the previous one stays in force.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::{model::load_dir_with, Policy};
use crate::identity::JwtRegistry;

pub struct PolicyStore {
    dir: PathBuf,
    targets: HashSet<String>,
    current: ArcSwap<Policy>,
    state: Mutex<State>,
    /// Bumped on every installed policy (subscribers re-check live sessions).
    version: tokio::sync::watch::Sender<u64>,
    /// JWKS verifiers, kept across reloads (a reload does not re-fetch).
    jwts: JwtRegistry,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyStatus {
    pub dir: String,
    pub files: usize,
    pub rules: usize,
    pub loaded_at: Option<String>,
    pub reloads: u64,
    /// Why the last reload was refused (the previous policy stays in force).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Default)]
struct State {
    fingerprint: Vec<(PathBuf, SystemTime, u64)>,
    status: PolicyStatus,
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((e.path(), m.modified().ok()?, m.len()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl PolicyStore {
    /// Loads the policy directory. A missing directory means "no policies":
    /// everything is allowed, as before policies existed, and the agent says so.
    pub fn open(dir: &Path, targets: HashSet<String>) -> Result<Self, super::PolicyErrors> {
        let store = Self {
            dir: dir.to_owned(),
            targets,
            current: ArcSwap::from_pointee(Policy::default()),
            state: Mutex::new(State::default()),
            version: tokio::sync::watch::Sender::new(0),
            jwts: JwtRegistry::default(),
        };
        if dir.is_dir() {
            let p = load_dir_with(dir, Some(&store.targets), &store.jwts)?;
            store.install(p, fingerprint(dir));
        } else {
            tracing::warn!(dir = %dir.display(), "no policy directory: every registered target is allowed");
            if let Ok(mut st) = store.state.lock() {
                st.status.dir = dir.display().to_string();
            }
        }
        Ok(store)
    }

    fn install(&self, p: Policy, fp: Vec<(PathBuf, SystemTime, u64)>) {
        let (files, rules) = (p.files, p.rule_count());
        self.current.store(Arc::new(p));
        self.version.send_modify(|v| *v += 1);
        if let Ok(mut st) = self.state.lock() {
            st.fingerprint = fp;
            st.status = PolicyStatus {
                dir: self.dir.display().to_string(),
                files,
                rules,
                loaded_at: Some(crate::audit::timestamp(crate::audit::now_micros())),
                reloads: st.status.reloads + 1,
                last_error: None,
            };
        }
        tracing::info!(dir = %self.dir.display(), files, rules, "policy loaded");
    }

    /// Changes whenever a new policy is in force.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn status(&self) -> PolicyStatus {
        self.state
            .lock()
            .map(|s| s.status.clone())
            .unwrap_or_default()
    }

    /// Reloads now (SIGHUP). Returns whether a new policy is in force.
    pub fn reload(&self) -> bool {
        let fp = fingerprint(&self.dir);
        match load_dir_with(&self.dir, Some(&self.targets), &self.jwts) {
            Ok(p) => {
                self.install(p, fp);
                true
            }
            Err(errors) => {
                tracing::error!(dir = %self.dir.display(), errors = %errors,
                    "policy reload refused; the previous policy stays in force");
                if let Ok(mut st) = self.state.lock() {
                    st.fingerprint = fp;
                    st.status.last_error = Some(errors.to_string());
                }
                false
            }
        }
    }

    /// Reloads when a policy file changed since the last look.
    pub fn reload_if_changed(&self) -> bool {
        let fp = fingerprint(&self.dir);
        let changed = self
            .state
            .lock()
            .map(|s| s.fingerprint != fp)
            .unwrap_or(false);
        changed && self.reload()
    }

    /// Watches the directory (polling its files' mtimes and sizes).
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let s = self.clone();
            let _ = tokio::task::spawn_blocking(move || s.reload_if_changed()).await;
        }
    }
}
