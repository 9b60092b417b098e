//! Pooled upstream logins and the loops' cancel keys.
//!
//! A server connection a loop left idle (no transaction, nothing owed) is
//! reset with `DISCARD ALL` (prepared statements, temporary tables, session
//! settings, advisory locks, LISTEN, cursors, `SET ROLE`) and kept for the
//! next loop session with the same target, address, database, role and
//! start-up settings: that session skips the connect and the SCRAM
//! exchange. At most `pool_size` are kept per key, each at most
//! `pool_idle_timeout_secs`; a connection that fails its reset, or that
//! the server closed or wrote to while idle, is dropped.
//!
//! Loops never see a server's real `BackendKeyData`: each session gets a
//! key of its own, mapped to the server connection it holds while it holds
//! it, so a cancel request reaches only the query of the session that
//! holds that key (and not the next loop's on a pooled connection).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{messages, ServerConn};

/// A `BackendKeyData` key: process id and secret.
pub(super) type CancelKey = (i32, i32);

/// What identifies interchangeable logins.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub target: String,
    pub upstream: SocketAddr,
    pub database: String,
    pub user: String,
    /// The start-up parameters sent upstream (sorted).
    pub params: Vec<(String, String)>,
}

/// A logged-in server connection and what its login said.
pub(super) struct Login {
    pub conn: ServerConn,
    /// ParameterStatus (and notice) messages of the login, for the loop.
    pub hello: Vec<u8>,
    /// The server's own cancel key for this connection.
    pub backend: (i32, i32),
    /// When the agent logged in: a login is not reused past
    /// [`MAX_LIFETIME`] (settings of the role or database changed since
    /// would otherwise never be seen).
    pub born: Instant,
}

/// The longest a pooled login is reused.
pub(super) const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Idle logins kept per target, whatever their keys: `pool_size` times this
/// (loops choose start-up settings, and so keys).
const TARGET_FACTOR: usize = 4;

struct Idle {
    login: Login,
    since: Instant,
}

/// Live loop keys, and the cancels on their way to a server connection
/// (by its real key): a connection is not reset for the next loop while
/// one is in flight.
#[derive(Default)]
struct Keys {
    live: HashMap<CancelKey, (SocketAddr, CancelKey)>,
    cancelling: HashMap<CancelKey, usize>,
}

/// The pool and the cancel keys of one handler.
#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    keys: Mutex<Keys>,
}

/// How long the reset may take.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

impl Pool {
    /// An idle login for `key`, if a live one is kept.
    pub fn take(&self, key: &Key, idle_timeout: Duration) -> Option<Login> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(key)?;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < idle_timeout
                && i.login.born.elapsed() < MAX_LIFETIME
                && quiet(&i.login.conn)
            {
                return Some(i.login);
            }
        }
        None
    }

    /// Resets `login` and keeps it (at most `max` per key, for
    /// `idle_timeout`).
    pub async fn give_back(
        self: &Arc<Self>,
        key: Key,
        mut login: Login,
        max: usize,
        idle_timeout: Duration,
    ) {
        if max == 0 || login.born.elapsed() >= MAX_LIFETIME {
            return;
        }
        // A cancel of the last loop's query may still be on its way.
        let mut waited = Duration::ZERO;
        while self.cancelling(login.backend) {
            if waited > RESET_TIMEOUT {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += Duration::from_millis(10);
        }
        let ok = match &mut login.conn {
            ServerConn::Plain(s) => reset(s).await,
            ServerConn::Tls(s) => reset(s.as_mut()).await,
        };
        if !ok {
            return;
        }
        {
            let Ok(mut idle) = self.idle.lock() else {
                return;
            };
            let of_target: usize = idle
                .iter()
                .filter(|(k, _)| k.target == key.target)
                .map(|(_, l)| l.len())
                .sum();
            if of_target >= max * TARGET_FACTOR {
                return;
            }
            let list = idle.entry(key).or_default();
            list.retain(|i| i.since.elapsed() < idle_timeout);
            if list.len() >= max {
                return;
            }
            list.push(Idle {
                login,
                since: Instant::now(),
            });
        }
        // Closed when no session takes it in time.
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(idle_timeout).await;
            if let Some(pool) = pool.upgrade() {
                if let Ok(mut idle) = pool.idle.lock() {
                    for list in idle.values_mut() {
                        list.retain(|i| i.since.elapsed() < idle_timeout);
                    }
                    idle.retain(|_, l| !l.is_empty());
                }
            }
        });
    }

    /// A cancel key for a loop session holding the server connection whose
    /// real key is `backend` at `upstream`.
    pub fn issue_key(&self, upstream: SocketAddr, backend: (i32, i32)) -> (i32, i32) {
        let mut guard = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let keys = &mut guard.live;
        loop {
            let mut b = [0u8; 8];
            if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
                // No randomness: a key that maps nowhere.
                return (0, 0);
            }
            let k = (
                i32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]).max(1),
                i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            );
            if let std::collections::hash_map::Entry::Vacant(e) = keys.entry(k) {
                e.insert((upstream, backend));
                return k;
            }
        }
    }

    /// Where a loop's cancel key leads, if it is live; the cancel counts as
    /// in flight until [`Pool::cancel_sent`] (checked and counted under one
    /// lock with [`Pool::retire_key`], so a session that ends meanwhile waits
    /// for it before its connection is reset for another loop).
    pub fn resolve(&self, key: CancelKey) -> Option<(SocketAddr, CancelKey)> {
        let mut k = self.keys.lock().ok()?;
        let (addr, backend) = *k.live.get(&key)?;
        *k.cancelling.entry(backend).or_default() += 1;
        Some((addr, backend))
    }

    pub fn cancel_sent(&self, backend: CancelKey) {
        if let Ok(mut k) = self.keys.lock() {
            if let Some(n) = k.cancelling.get_mut(&backend) {
                *n -= 1;
                if *n == 0 {
                    k.cancelling.remove(&backend);
                }
            }
        }
    }

    fn cancelling(&self, backend: CancelKey) -> bool {
        self.keys
            .lock()
            .map(|k| k.cancelling.contains_key(&backend))
            .unwrap_or(true)
    }

    pub fn retire_key(&self, key: CancelKey) {
        if let Ok(mut k) = self.keys.lock() {
            k.live.remove(&key);
        }
    }
}

/// A loop's cancel key, retired when the session lets go of it (however
/// it ends).
pub(super) struct KeyGuard {
    pub pool: Arc<Pool>,
    pub key: CancelKey,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.pool.retire_key(self.key);
    }
}

/// Whether an idle connection has nothing to say (a server that closed it,
/// or sent a FATAL error, has).
fn quiet(conn: &ServerConn) -> bool {
    let tcp = match conn {
        ServerConn::Plain(s) => s,
        ServerConn::Tls(s) => s.get_ref().0,
    };
    let mut b = [0u8; 1];
    matches!(tcp.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `DISCARD ALL`, read up to its `ReadyForQuery`: true when the server
/// confirmed it and is idle.
async fn reset<S>(s: &mut S) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let work = async {
        s.write_all(&messages::query("DISCARD ALL")).await.ok()?;
        let mut buf = bytes::BytesMut::with_capacity(1024);
        let mut discarded = false;
        loop {
            while let Some(f) = messages::next_frame(&mut buf, 1 << 20).ok()? {
                match f[0] {
                    b'C' => discarded = messages::command_tag(&f) == "DISCARD ALL",
                    b'E' => return Some(false),
                    b'Z' => return Some(discarded && f.get(5) == Some(&b'I')),
                    // Notices, notifications, parameter changes: dropped.
                    _ => {}
                }
            }
            if s.read_buf(&mut buf).await.ok()? == 0 {
                return Some(false);
            }
        }
    };
    matches!(
        tokio::time::timeout(RESET_TIMEOUT, work).await,
        Ok(Some(true))
    )
}

/// Splits a login's messages after `AuthenticationOk`: the ParameterStatus
/// and notice messages for the loop, and the server's cancel key.
pub(super) fn split_hello(leftover: &[u8]) -> (Vec<u8>, Option<(i32, i32)>) {
    let mut buf = bytes::BytesMut::from(leftover);
    let mut hello = Vec::new();
    let mut key = None;
    while let Ok(Some(f)) = messages::next_frame(&mut buf, 1 << 20) {
        match f[0] {
            b'K' if f.len() == 13 => {
                key = Some((
                    i32::from_be_bytes([f[5], f[6], f[7], f[8]]),
                    i32::from_be_bytes([f[9], f[10], f[11], f[12]]),
                ));
            }
            b'S' | b'N' => hello.extend_from_slice(&f),
            _ => {}
        }
    }
    (hello, key)
}

/// `BackendKeyData` then `ReadyForQuery` (idle).
pub(super) fn greeting(key: (i32, i32)) -> Vec<u8> {
    let mut b = Vec::with_capacity(19);
    b.push(b'K');
    b.extend_from_slice(&12i32.to_be_bytes());
    b.extend_from_slice(&key.0.to_be_bytes());
    b.extend_from_slice(&key.1.to_be_bytes());
    b.extend_from_slice(&messages::ready(b'I'));
    b
}
