//! SSH (`protocol = "ssh"`), with russh on both sides.
//!
//! Toward the loop the agent answers as the target: its host key with a
//! host certificate for the target's name or address, signed by the
//! agent's SSH host CA (`ssh_ca`; hosts trust it once with `loopgate trust
//! install`). The loop logs in with `none`: its identity is the kernel's;
//! the user it asks for must be the target's (`credential.username`).
//! Toward the target the agent logs in with the stored private key, after
//! checking the target's host key against `credential.known_hosts_file`
//! (never trust on first use).
//!
//! Every `exec` request is one `ssh` operation (`ssh.command`, `ssh.argv`,
//! `ssh.user`), judged before it reaches the target: a refusal ends the
//! channel with exit status 126 and the rule and reason on stderr; an
//! `approve` holds it. An allowed command runs on its own channel of a
//! logged-in upstream connection, shared by the loop connections to the
//! same target (at most 8 channels each, under sshd's default MaxSessions of
//! 10; a connection idle for a minute is closed): a loop that runs `ssh host
//! cmd` a thousand times logs in upstream once. Its output, exit status and
//! end are relayed; the event records the exit status and the
//! duration. Shells, subsystems (sftp), forwards, agent and X11 forwarding
//! are refused in this version.

use std::{collections::HashMap, sync::Arc, time::Instant};

use russh::{
    keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate},
    server::{self, ChannelOpenHandle, Msg, Session as SshSession},
    Channel, ChannelId, ChannelMsg,
};
use tokio::net::TcpStream;

use super::ProtocolHandler;
use crate::audit::capture::{CaptureStream, Side as CaptureSide};
use crate::{
    kinds::{EventKind, OpKind, Outcome, Protocol},
    policy::{Operation, SshOp},
    secrets::StoredCredential,
    session::Session,
    ssh_ca::SshHostCa,
};

/// The exit status of a refused command (as a shell's "cannot execute").
pub const REFUSED_STATUS: u32 = 126;
/// Session channels one loop connection may have open at once.
const MAX_CHANNELS: usize = 64;
/// How long connecting and logging in to the target may take.
const UPSTREAM_LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The session's payload capture, decrypted: what the loop sent to its
/// commands and what they wrote back (all channels, in arrival order; the
/// first `audit.capture_bytes` of each direction, secrets masked), for
/// `loopgate replay`.
struct Recording {
    up: std::sync::Mutex<(CaptureStream, u64)>,
    down: std::sync::Mutex<(CaptureStream, u64)>,
}

impl Recording {
    fn new(c: crate::audit::capture::Capture) -> Self {
        let left = c.limit;
        Recording {
            up: std::sync::Mutex::new((CaptureStream::new(c.clone(), CaptureSide::Client), left)),
            down: std::sync::Mutex::new((CaptureStream::new(c, CaptureSide::Upstream), left)),
        }
    }

    fn push(side: &std::sync::Mutex<(CaptureStream, u64)>, b: &[u8]) {
        let mut g = side.lock().unwrap_or_else(|e| e.into_inner());
        let (stream, left) = &mut *g;
        if *left > 0 {
            let n = b.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            stream.push(&b[..n]);
            *left -= n as u64;
        }
    }
}

/// The SSH handler.
pub struct Ssh {
    pub ca: Option<Arc<SshHostCa>>,
    pub pool: Arc<UpstreamPool>,
}

/// Channels one upstream connection carries at once (sshd's MaxSessions
/// is 10 by default).
const CHANNELS_PER_UPSTREAM: usize = 8;
/// An upstream connection with no channel for this long is closed.
const UPSTREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Logged-in upstream connections, by target address, shared by the loop
/// connections to that target.
#[derive(Default)]
pub struct UpstreamPool {
    conns: std::sync::Mutex<HashMap<std::net::SocketAddr, Vec<Arc<Pooled>>>>,
}

struct Pooled {
    handle: russh::client::Handle<UpstreamSide>,
    /// Channels open on it now.
    channels: std::sync::atomic::AtomicUsize,
    /// When its last channel closed.
    idle_since: std::sync::Mutex<Instant>,
}

/// A channel's claim on its upstream connection, given back on drop.
struct Lease(Arc<Pooled>);

impl Drop for Lease {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.0.channels.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut t) = self.0.idle_since.lock() {
                *t = Instant::now();
            }
        }
    }
}

impl UpstreamPool {
    /// A connection to `addr` with room for a channel, claimed; `None` when
    /// a new one is needed. Closed and long-idle connections go.
    fn claim(&self, addr: std::net::SocketAddr) -> Option<Lease> {
        use std::sync::atomic::Ordering;
        let mut g = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = g.entry(addr).or_default();
        list.retain(|p| {
            let idle = p.channels.load(Ordering::Acquire) == 0
                && p.idle_since
                    .lock()
                    .map(|t| t.elapsed() > UPSTREAM_IDLE)
                    .unwrap_or(true);
            !p.handle.is_closed() && !idle
        });
        for p in list.iter() {
            let n = p.channels.load(Ordering::Acquire);
            if n < CHANNELS_PER_UPSTREAM
                && p.channels
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(Lease(p.clone()));
            }
        }
        None
    }

    /// Adds a new connection with one channel claimed.
    fn add(
        &self,
        addr: std::net::SocketAddr,
        handle: russh::client::Handle<UpstreamSide>,
    ) -> Lease {
        let p = Arc::new(Pooled {
            handle,
            channels: std::sync::atomic::AtomicUsize::new(1),
            idle_since: std::sync::Mutex::new(Instant::now()),
        });
        let mut g = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        g.entry(addr).or_default().push(p.clone());
        Lease(p)
    }
}

#[async_trait::async_trait]
impl ProtocolHandler for Ssh {
    fn protocol(&self) -> Protocol {
        Protocol::Ssh
    }

    fn sees_requests(&self) -> bool {
        true
    }

    fn sends_credential(&self) -> bool {
        true
    }

    async fn serve(&self, s: Arc<Session>, client: TcpStream) -> Outcome {
        let Some(ca) = &self.ca else {
            return Outcome::Denied("the agent has no SSH host CA (state_dir)".into());
        };
        let Some(credential) = s
            .shared_credential()
            .filter(|c| c.ssh_key.is_some() && c.username.is_some())
        else {
            return Outcome::Denied(
                "the SSH target has no stored key and username (credential.key_file, credential.username)"
                    .into(),
            );
        };
        let cert = match ca.host_cert(&s.target_names()) {
            Ok(c) => c,
            Err(e) => return Outcome::AgentError(e.to_string()),
        };
        let config = server::Config {
            keys: vec![(*ca.host_key()).clone()],
            certificates: vec![(*cert).clone()],
            methods: russh::MethodSet::from(&[russh::MethodKind::None][..]),
            auth_rejection_time: std::time::Duration::from_millis(200),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            inactivity_timeout: Some(std::time::Duration::from_secs(3600)),
            nodelay: true,
            ..Default::default()
        };
        let handler = LoopSide {
            s: s.clone(),
            credential,
            pool: self.pool.clone(),
            user: String::new(),
            open: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            recording: s.capture().map(|c| Arc::new(Recording::new(c))),
        };
        let running = match server::run_stream(Arc::new(config), client, handler).await {
            Ok(r) => r,
            Err(e) => return Outcome::ClientError(e.to_string()),
        };
        let handle = running.handle();
        tokio::select! {
            r = running => match r {
                Ok(()) => Outcome::ok(),
                Err(e) => Outcome::ClientError(e.to_string()),
            },
            // A reload that withdrew the permission, or the agent's
            // shutdown: the connection ends (its channels' tasks end with
            // the session's token).
            _ = s.closed().cancelled() => {
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "loopgate: session closed".into(),
                        String::new(),
                    )
                    .await;
                Outcome::Shutdown
            }
        }
    }
}

/// The loop's side of one SSH connection.
struct LoopSide {
    s: Arc<Session>,
    credential: Arc<StoredCredential>,
    pool: Arc<UpstreamPool>,
    /// The user the loop logged in as (checked against the target's).
    user: String,
    /// Session channels open now.
    open: Arc<std::sync::atomic::AtomicUsize>,
    recording: Option<Arc<Recording>>,
}

#[derive(Debug, thiserror::Error)]
enum SshError {
    #[error(transparent)]
    Russh(#[from] russh::Error),
}

impl server::Handler for LoopSide {
    type Error = SshError;

    async fn auth_none(&mut self, user: &str) -> Result<server::Auth, Self::Error> {
        // The loop's identity is the kernel's; the user it asks for must be
        // the one the agent logs in as.
        if self.credential.username.as_deref() != Some(user) {
            self.s.refuse(
                EventKind::Op(OpKind::Ssh),
                &format!("login as {user}"),
                &crate::kinds::Refusal::new(
                    "ssh:user",
                    format!(
                        "this target is reached as {:?} only",
                        self.credential.username.as_deref().unwrap_or("")
                    ),
                ),
                Vec::new(),
            );
            return Ok(server::Auth::reject());
        }
        self.user = user.to_owned();
        Ok(server::Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        use std::sync::atomic::Ordering;
        if self.open.fetch_add(1, Ordering::AcqRel) >= MAX_CHANNELS {
            self.open.fetch_sub(1, Ordering::AcqRel);
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        }
        reply.accept().await;
        let open = self.open.clone();
        let ctx = ChannelCtx {
            handle: session.handle(),
            s: self.s.clone(),
            credential: self.credential.clone(),
            pool: self.pool.clone(),
            user: self.user.clone(),
            recording: self.recording.clone(),
        };
        let closed = self.s.closed().clone();
        tokio::spawn(async move {
            tokio::select! {
                () = ctx.run(channel) => {}
                () = closed.cancelled() => {}
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        // Judged by the channel's task; a refusal is an exit status.
        session.channel_success(channel)?;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        // Not relayed in this version (a command runs without a terminal).
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        self.not_supported("an interactive shell");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        self.not_supported(&format!("the {name} subsystem"));
        session.channel_failure(channel)?;
        Ok(())
    }
}

impl LoopSide {
    fn not_supported(&self, what: &str) {
        self.s.refuse(
            EventKind::Op(OpKind::Ssh),
            what,
            &crate::kinds::Refusal::new(
                "ssh:unsupported",
                format!("{what} is not relayed by this version of loopgate"),
            ),
            Vec::new(),
        );
    }
}

/// What one channel's task needs.
struct ChannelCtx {
    handle: server::Handle,
    s: Arc<Session>,
    credential: Arc<StoredCredential>,
    pool: Arc<UpstreamPool>,
    user: String,
    recording: Option<Arc<Recording>>,
}

impl ChannelCtx {
    async fn run(self, mut chan: Channel<Msg>) {
        // The first request decides what the channel is; only exec runs.
        let command = loop {
            match chan.wait().await {
                Some(ChannelMsg::Exec { command, .. }) => break command,
                Some(ChannelMsg::RequestShell { .. } | ChannelMsg::RequestSubsystem { .. }) => {
                    let _ = chan.close().await;
                    return;
                }
                None => return,
                // Environment variables are not passed on; window sizes
                // and the like have nothing to apply to yet.
                Some(_) => {}
            }
        };
        let command = String::from_utf8_lossy(&command).into_owned();
        let masked = self.shown(&command);
        // A line that does not split into words (an unclosed quote) could
        // hide words from the rules: refused.
        let (judged, mut event) = match shell_words::split(&command) {
            Ok(argv) => {
                let op = Operation::Ssh(SshOp {
                    command: &command,
                    argv: &argv,
                    user: &self.user,
                });
                let judged = self.s.judge(op, &masked, &[], None).await;
                let event = judged.event(EventKind::Op(OpKind::Ssh), masked, Vec::new());
                (judged, event)
            }
            Err(e) => {
                let judged = crate::session::Judged::refusal(crate::kinds::Refusal::new(
                    "ssh:parse",
                    format!("the command line does not split into words ({e})"),
                ));
                let event = judged.event(EventKind::Op(OpKind::Ssh), masked, Vec::new());
                (judged, event)
            }
        };
        if let Some(r) = &judged.refused {
            let msg = format!(
                "loopgate: command refused by rule {}: {}\r\n",
                r.rule_id, r.reason
            );
            end_with(&chan, &msg, REFUSED_STATUS).await;
            event.attrs.push(("result".into(), "refused".into()));
            event
                .attrs
                .push(("exit_status".into(), REFUSED_STATUS.to_string()));
            self.s.record(event);
            return;
        }
        let started = Instant::now();
        let (result, status) = match self.open_upstream(&command).await {
            Ok((up, lease)) => {
                let status = self.relay(chan, up).await;
                drop(lease);
                ("ok", status)
            }
            Err(e) => {
                end_with(&chan, &format!("loopgate: {e}\r\n"), 255).await;
                tracing::warn!(session = %self.s.id(), error = %e, "ssh command failed upstream");
                event.attrs.push(("error".into(), e));
                ("error", Some(255))
            }
        };
        event.attrs.push(("result".into(), result.into()));
        if let Some(st) = status {
            event.attrs.push(("exit_status".into(), st.to_string()));
        }
        event.attrs.push((
            "duration_us".into(),
            started.elapsed().as_micros().to_string(),
        ));
        self.s.record(event);
    }

    fn shown(&self, text: &str) -> String {
        let mut b = text.as_bytes().to_vec();
        self.s.masker().mask(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    }

    /// A channel of a logged-in upstream connection (a pooled one with
    /// room, else a new one) running `command`, and its claim on it.
    async fn open_upstream(
        &self,
        command: &str,
    ) -> Result<(Channel<russh::client::Msg>, Lease), String> {
        let addr = self.s.upstream();
        let lease = match self.pool.claim(addr) {
            Some(l) => l,
            None => {
                let login = connect(&self.s, &self.credential);
                let handle = tokio::time::timeout(UPSTREAM_LOGIN_TIMEOUT, login)
                    .await
                    .map_err(|_| {
                        format!(
                            "the target did not complete the login within {}s",
                            UPSTREAM_LOGIN_TIMEOUT.as_secs()
                        )
                    })??;
                self.pool.add(addr, handle)
            }
        };
        let up = tokio::time::timeout(
            UPSTREAM_LOGIN_TIMEOUT,
            lease.0.handle.channel_open_session(),
        )
        .await
        .map_err(|_| "the target did not open a channel in time".to_owned())?
        .map_err(|e| format!("opening a channel on the target: {e}"))?;
        up.exec(true, command.as_bytes())
            .await
            .map_err(|e| format!("running the command on the target: {e}"))?;
        Ok((up, lease))
    }

    /// Relays both ways until the command ends; its exit status.
    async fn relay(&self, chan: Channel<Msg>, up: Channel<russh::client::Msg>) -> Option<u32> {
        use std::sync::atomic::Ordering::Relaxed;
        let counters = self.s.counters().clone();
        let (mut loop_rx, loop_tx) = chan.split();
        let (mut up_rx, up_tx) = up.split();
        // Two directions, each on its own: one that waits for the other
        // side's window never stops the other.
        let to_target = async {
            while let Some(m) = loop_rx.wait().await {
                match m {
                    ChannelMsg::Data { data } => {
                        counters.up.fetch_add(data.len() as u64, Relaxed);
                        if let Some(r) = &self.recording {
                            Recording::push(&r.up, &data);
                        }
                        if up_tx.data(&data[..]).await.is_err() {
                            break;
                        }
                    }
                    ChannelMsg::Eof => {
                        let _ = up_tx.eof().await;
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            let _ = up_tx.close().await;
        };
        let to_loop = async {
            let mut status = None;
            while let Some(m) = up_rx.wait().await {
                match m {
                    ChannelMsg::Data { data } => {
                        counters.down.fetch_add(data.len() as u64, Relaxed);
                        if let Some(r) = &self.recording {
                            Recording::push(&r.down, &data);
                        }
                        if loop_tx.data(&data[..]).await.is_err() {
                            break;
                        }
                    }
                    ChannelMsg::ExtendedData { data, ext } => {
                        counters.down.fetch_add(data.len() as u64, Relaxed);
                        if let Some(r) = &self.recording {
                            Recording::push(&r.down, &data);
                        }
                        if loop_tx.extended_data(ext, &data[..]).await.is_err() {
                            break;
                        }
                    }
                    ChannelMsg::ExitStatus { exit_status } => {
                        status = Some(exit_status);
                        let _ = loop_tx.exit_status(exit_status).await;
                    }
                    ChannelMsg::ExitSignal {
                        signal_name,
                        core_dumped,
                        error_message,
                        lang_tag,
                    } => {
                        let _ = self
                            .handle
                            .exit_signal_request(
                                loop_tx.id(),
                                signal_name,
                                core_dumped,
                                error_message,
                                lang_tag,
                            )
                            .await;
                    }
                    ChannelMsg::Eof => {
                        let _ = loop_tx.eof().await;
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            let _ = loop_tx.eof().await;
            let _ = loop_tx.close().await;
            status
        };
        // The command's end (the target closed its channel) ends both.
        tokio::pin!(to_target);
        let status = tokio::select! {
            st = to_loop => st,
            () = &mut to_target => {
                // The loop closed its channel: the target's answer is moot.
                None
            }
        };
        status
    }
}

/// Ends a loop's channel the agent answers itself: `msg` on stderr, then
/// `status`.
async fn end_with(chan: &Channel<Msg>, msg: &str, status: u32) {
    let _ = chan.extended_data(1, msg.as_bytes()).await;
    let _ = chan.exit_status(status).await;
    let _ = chan.eof().await;
    let _ = chan.close().await;
}

/// Connects and logs in to the target with the stored key, after checking
/// its host key against the known_hosts file.
async fn connect(
    s: &Arc<Session>,
    credential: &StoredCredential,
) -> Result<russh::client::Handle<UpstreamSide>, String> {
    let (Some(key), Some(user)) = (&credential.ssh_key, &credential.username) else {
        return Err("no stored key".into());
    };
    let tcp = s
        .connect_upstream()
        .await
        .map_err(|o| o.detail().to_owned())?;
    let addr = s.upstream();
    // known_hosts names the target as configured: its host name, else the
    // address.
    let host = match s.address() {
        Some(crate::config::TargetAddress::Host { host, .. }) => host.clone(),
        _ => addr.ip().to_string(),
    };
    let side = UpstreamSide {
        host,
        port: addr.port(),
        known_hosts: credential.known_hosts.clone(),
        rejected: Arc::new(std::sync::Mutex::new(None)),
    };
    let rejected = side.rejected.clone();
    let config = russh::client::Config {
        inactivity_timeout: Some(std::time::Duration::from_secs(3600)),
        nodelay: true,
        ..Default::default()
    };
    let mut handle = match russh::client::connect_stream(Arc::new(config), tcp, side).await {
        Ok(h) => h,
        Err(e) => {
            let why = rejected
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_else(|| e.to_string());
            return Err(format!("connecting to the target: {why}"));
        }
    };
    let auth = handle
        .authenticate_publickey(user.clone(), PrivateKeyWithHashAlg::new(key.clone(), None))
        .await
        .map_err(|e| format!("logging in to the target: {e}"))?;
    if !auth.success() {
        return Err(format!("the target refused the stored key for user {user}"));
    }
    Ok(handle)
}

/// The agent's side toward the target.
pub struct UpstreamSide {
    host: String,
    port: u16,
    known_hosts: Option<std::path::PathBuf>,
    /// Why the host key was refused, for the error.
    rejected: Arc<std::sync::Mutex<Option<String>>>,
}

impl russh::client::Handler for UpstreamSide {
    type Error = russh::Error;

    // Channels the target opens toward the agent are refused, whatever
    // kind (dropping the reply refuses).
    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<russh::client::Msg>,
        _reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn server_channel_open_unknown(
        &mut self,
        _channel: Channel<russh::client::Msg>,
        _reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<russh::client::Msg>,
        _reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<russh::client::Msg>,
        _socket_path: &str,
        _reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<russh::client::Msg>,
        _socket_path: &str,
        _reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<russh::client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        _reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: Channel<russh::client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        _reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<russh::client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        _reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let reject = |why: String| {
            if let Ok(mut g) = self.rejected.lock() {
                *g = Some(why);
            }
            Ok(false)
        };
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return reject(
                "the target offered a host certificate; give its host key in known_hosts_file"
                    .into(),
            );
        };
        let Some(file) = &self.known_hosts else {
            return reject(
                "the target has no known_hosts_file: its host key cannot be checked".into(),
            );
        };
        match russh::keys::check_known_hosts_path(&self.host, self.port, key, file) {
            Ok(true) => Ok(true),
            Ok(false) => reject(format!(
                "the target's host key ({}) is not in {}",
                key.fingerprint(russh::keys::HashAlg::Sha256),
                file.display()
            )),
            Err(e) => reject(format!(
                "the target's host key ({}) does not match {}: {e}",
                key.fingerprint(russh::keys::HashAlg::Sha256),
                file.display()
            )),
        }
    }
}
