//! What one hostile loop may take of the agent: open sessions (per workload
//! and in all, bounded by the open-file limit less a reserve for the admin
//! socket and the spool), and captured payload per workload and hour.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Descriptors kept free for the admin socket, the admin HTTP port, the
/// spool, policy reloads and the shipper, whatever the loops do.
pub const FD_RESERVE: u64 = 256;
/// Descriptors a session may hold: the loop's socket, the upstream socket
/// and a splice pipe (two descriptors) per direction.
pub const FDS_PER_SESSION: u64 = 6;

/// Raises the soft open-file limit to the hard one and returns it.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        tracing::debug!(from = soft, to = hard, "raised the open file limit");
        return hard;
    }
    soft
}

/// Sessions that fit in `nofile` descriptors after the reserve.
pub fn sessions_for_fds(nofile: u64) -> usize {
    (nofile.saturating_sub(FD_RESERVE) / FDS_PER_SESSION).max(1) as usize
}

#[derive(Debug)]
struct Counts {
    total: usize,
    per_workload: HashMap<String, usize>,
}

/// Open-session caps. A [`Slot`] is held for a session's whole life.
#[derive(Debug)]
pub struct SessionLimits {
    pub max_total: usize,
    pub max_per_workload: usize,
    counts: Mutex<Counts>,
}

/// Why a session did not get a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Full {
    Total(usize),
    Workload(usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Total(n) => write!(
                f,
                "the agent has {n} sessions open, its limit (agent.max_sessions, or the open-file limit)"
            ),
            Full::Workload(n) => write!(
                f,
                "this workload has {n} sessions open, its limit (agent.max_sessions_per_workload)"
            ),
        }
    }
}

impl SessionLimits {
    pub fn new(max_total: usize, max_per_workload: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total: max_total.max(1),
            max_per_workload: max_per_workload.max(1),
            counts: Mutex::new(Counts {
                total: 0,
                per_workload: HashMap::new(),
            }),
        })
    }

    pub fn acquire(self: &Arc<Self>, workload: &str) -> Result<Slot, Full> {
        let mut c = self.counts.lock().map_err(|_| Full::Total(0))?;
        if c.total >= self.max_total {
            return Err(Full::Total(c.total));
        }
        let n = c.per_workload.get(workload).copied().unwrap_or(0);
        if n >= self.max_per_workload {
            return Err(Full::Workload(n));
        }
        c.total += 1;
        *c.per_workload.entry(workload.to_owned()).or_default() += 1;
        Ok(Slot {
            limits: self.clone(),
            workload: workload.to_owned(),
        })
    }

    pub fn open(&self) -> usize {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }
}

/// One open session's place; given back on drop.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<SessionLimits>,
    workload: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.limits.counts.lock() {
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.per_workload.get_mut(&self.workload) {
                *n -= 1;
                if *n == 0 {
                    c.per_workload.remove(&self.workload);
                }
            }
        }
    }
}

/// Captured payload per workload and window (an hour): a workload that opens
/// many sessions cannot fill the spool with payload.
#[derive(Debug)]
pub struct CaptureBudget {
    per_window: u64,
    window: Duration,
    used: Mutex<HashMap<String, (Instant, u64)>>,
}

impl CaptureBudget {
    pub fn new(per_window: u64, window: Duration) -> Self {
        Self {
            per_window,
            window,
            used: Mutex::new(HashMap::new()),
        }
    }

    /// Reserves up to `want` bytes for a session of `workload`; returns what
    /// was granted (0: capture nothing).
    pub fn reserve(&self, workload: &str, want: u64) -> u64 {
        let Ok(mut m) = self.used.lock() else {
            return 0;
        };
        let now = Instant::now();
        if m.len() > 10_000 {
            let window = self.window;
            m.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let e = m.entry(workload.to_owned()).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        let grant = want.min(self.per_window.saturating_sub(e.1));
        e.1 += grant;
        grant
    }

    /// Gives back what a session reserved but did not capture.
    pub fn refund(&self, workload: &str, bytes: u64) {
        if let Ok(mut m) = self.used.lock() {
            if let Some(e) = m.get_mut(workload) {
                e.1 = e.1.saturating_sub(bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_workload_and_in_all_and_given_back() {
        let l = SessionLimits::new(3, 2);
        let a1 = l.acquire("a").unwrap();
        let _a2 = l.acquire("a").unwrap();
        assert_eq!(l.acquire("a").unwrap_err(), Full::Workload(2));
        let _b1 = l.acquire("b").unwrap();
        assert_eq!(l.acquire("c").unwrap_err(), Full::Total(3));
        drop(a1);
        assert_eq!(l.open(), 2);
        let _c1 = l.acquire("c").unwrap();
    }

    #[test]
    fn capture_budget_per_workload_window() {
        let b = CaptureBudget::new(100, Duration::from_secs(3600));
        assert_eq!(b.reserve("a", 60), 60);
        assert_eq!(b.reserve("a", 60), 40);
        assert_eq!(b.reserve("a", 60), 0);
        assert_eq!(
            b.reserve("b", 60),
            60,
            "another workload has its own budget"
        );
        b.refund("a", 50);
        assert_eq!(b.reserve("a", 60), 50);
    }

    #[test]
    fn sessions_fit_the_descriptor_limit_after_the_reserve() {
        assert_eq!(sessions_for_fds(1024), (1024 - 256) / 6);
        assert_eq!(sessions_for_fds(10), 1);
    }
}
