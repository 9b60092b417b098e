//! PostgreSQL targets (`protocol = "postgres"`): the agent answers the loop's
//! start-up itself and logs in upstream with the stored credential, so the
//! loop never needs (or sees) the database password.
//!
//! 1. An `SSLRequest` is answered `S` and the loop gets TLS with a
//!    certificate for the target's host name and address, issued by the
//!    agent's CA ([`crate::ca`]; `sslmode=verify-full` with that CA, which
//!    `loopgate trust install` adds to the host's store); without a CA it is
//!    declined (`N`). `GSSENCRequest` is declined. A `CancelRequest` is decided first, like a
//!    session: the connect decision was made before the handler ran, and a
//!    workload that requires a JWT is refused (a cancel carries no token).
//!    Only then is it passed on: loops hold keys of the agent's own
//!    ([`pool`]), each mapped to the server connection its session holds.
//! 2. When the workload requires the JWT second factor, the agent asks the
//!    loop for a cleartext password and takes the JWT from it (`PGPASSWORD`
//!    / `password=`), verifies it and makes the session decision with its
//!    subject. Otherwise the loop is not asked for a password at all: the
//!    kernel-attested identity was decided at connect.
//! 3. Upstream, the start-up parameters are sent with the stored `username`
//!    (when set) and the server's password challenge is answered with the
//!    stored password: SCRAM-SHA-256, MD5 or cleartext (postgres-protocol).
//!    A pooled login of the same target, database, role and start-up
//!    settings is taken instead when one is idle ([`pool`]).
//! 4. The loop gets `AuthenticationOk`, the server's parameters, a cancel
//!    key of the agent's and `ReadyForQuery`; from then on every message is
//!    read and every statement judged ([`relay`]), and results are masked.
//!
//! Refusals are `ErrorResponse` messages (SQLSTATE 28000 / 28P01 / 08006), so
//! psql and drivers print them as they would a server's.

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::ProtocolHandler;
use crate::{
    kinds::{EventKind, OpKind, Outcome, Protocol, Refusal},
    secrets::StoredCredential,
    session::{Attempt, Counters, Event, SecondFactorError, Session},
};

/// A loop has this long to finish its start-up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The upstream has this long to complete the login.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

mod login;
pub mod messages;
mod pool;
mod relay;
pub mod sql;
mod wire;

use wire::{
    auth_request, error_response, parse_params, read_password, read_startup, CANCEL_REQUEST,
    GSSENC_REQUEST, PROTOCOL_3, SSL_REQUEST,
};

/// A read from the loop during start-up, within `STARTUP_TIMEOUT` (an
/// approval wait is not part of it).
async fn loop_read<T>(
    f: impl std::future::Future<Output = Result<T, StartupError>>,
) -> Result<T, StartupError> {
    tokio::time::timeout(STARTUP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(StartupError::Client(format!(
                "the loop did not finish its start-up within {STARTUP_TIMEOUT:?}"
            )))
        })
}

#[derive(Debug, thiserror::Error)]
enum StartupError {
    /// Refused for the loop (SQLSTATE, message sent to it).
    #[error("{message}")]
    Refused {
        sqlstate: &'static str,
        message: String,
        /// `Outcome::Denied` or `Outcome::ClientError`.
        outcome: fn(String) -> Outcome,
    },
    /// The loop broke the protocol or went away.
    #[error("{0}")]
    Client(String),
    /// The upstream failed; `raw` is its ErrorResponse, passed to the loop.
    #[error("{detail}")]
    Upstream {
        outcome: fn(String) -> Outcome,
        detail: String,
        raw: Option<Vec<u8>>,
    },
}

/// The agent's connection to the server: plain (relayed with splice) or TLS.
enum ServerConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Distinct query texts kept classified (shared by every session).
const CLASSIFIER_CAPACITY: usize = 4096;

/// The PostgreSQL handler.
pub struct Postgres {
    classifier: Arc<sql::Classifier>,
    pool: Arc<pool::Pool>,
    masks: Arc<crate::masking::MaskCache>,
    /// The agent's CA: a loop that asks for TLS gets a certificate for the
    /// target's name (without one it is answered `N`, plain).
    ca: Option<Arc<crate::ca::AgentCa>>,
}

impl Postgres {
    pub fn new(ca: Option<Arc<crate::ca::AgentCa>>) -> Self {
        Postgres {
            classifier: Arc::new(sql::Classifier::new(CLASSIFIER_CAPACITY)),
            masks: Arc::default(),
            pool: Arc::default(),
            ca,
        }
    }
}

#[async_trait::async_trait]
impl ProtocolHandler for Postgres {
    fn protocol(&self) -> Protocol {
        Protocol::Postgres
    }

    fn sees_requests(&self) -> bool {
        true
    }

    fn carries_second_factor(&self) -> bool {
        true
    }

    fn sends_credential(&self) -> bool {
        true
    }

    async fn serve(&self, session: Arc<Session>, client: TcpStream) -> Outcome {
        let conn = Conn {
            credential: session.shared_credential().unwrap_or_default(),
            s: session,
            classifier: self.classifier.clone(),
            masks: self.masks.clone(),
            pool: self.pool.clone(),
            ca: self.ca.clone(),
        };
        serve(conn, client).await
    }
}

/// One loop connection to a PostgreSQL target.
struct Conn {
    s: Arc<Session>,
    credential: Arc<StoredCredential>,
    classifier: Arc<sql::Classifier>,
    masks: Arc<crate::masking::MaskCache>,
    pool: Arc<pool::Pool>,
    ca: Option<Arc<crate::ca::AgentCa>>,
}

/// The loop's connection: plain, or TLS with the agent's certificate.
pub(super) enum Client {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Client {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Client::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Client {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Client::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Client::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Client::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

async fn serve(s: Conn, tcp: TcpStream) -> Outcome {
    let _ = tcp.set_nodelay(true);
    let abort = s.s.closed().clone();
    let counters = s.s.counters().clone();
    // Encryption requests, on plain TCP: TLS with the agent's certificate
    // when the agent has a CA, GSSAPI never.
    let negotiated = tokio::select! {
        r = s.negotiate(tcp) => r,
        _ = abort.cancelled() => return Outcome::Shutdown,
    };
    let (mut client, first) = match negotiated {
        Ok(v) => v,
        Err(Negotiation::Failed(mut tcp, e)) => return fail(&mut tcp, e).await,
        Err(Negotiation::Gone(o)) => return o,
    };
    let started = tokio::select! {
        r = s.start(&mut client, &counters, first) => r,
        _ = abort.cancelled() => return Outcome::Shutdown,
    };
    let (server, start, pooling) = match started {
        Ok(Some(server)) => server,
        // A cancel request, relayed.
        Ok(None) => return Outcome::Ok(Some("cancel request relayed".into())),
        Err(e) => return fail(&mut client, e).await,
    };
    let classifier = s.classifier.clone();
    let (cr, cw): (
        Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    ) = match client {
        Client::Plain(tcp) => {
            let (r, w) = tcp.into_split();
            (Box::new(r), Box::new(w))
        }
        Client::Tls(tls) => {
            let (r, w) = tokio::io::split(*tls);
            (Box::new(r), Box::new(w))
        }
    };
    let session = s.s.clone();
    let (outcome, back) = match server {
        ServerConn::Plain(server) => {
            let (o, back) = relay::relay(session, classifier, cr, cw, server, start).await;
            (o, back.map(ServerConn::Plain))
        }
        ServerConn::Tls(server) => {
            let (o, back) = relay::relay(session, classifier, cr, cw, *server, start).await;
            (o, back.map(|b| ServerConn::Tls(Box::new(b))))
        }
    };
    drop(pooling.loop_key);
    if let Some(conn) = back {
        let pool = s.pool.clone();
        let (size, idle) = (s.credential.pool_size, s.credential.pool_idle_timeout);
        tokio::spawn(async move {
            let login = pool::Login {
                conn,
                hello: pooling.hello,
                backend: pooling.backend,
                born: pooling.born,
            };
            pool.give_back(pooling.key, login, size, idle).await;
        });
    }
    outcome
}

/// Ends a session that failed before the relay: the refusal (or the
/// server's own error) for the loop, then the outcome.
async fn fail<S: tokio::io::AsyncWrite + Unpin>(client: &mut S, e: StartupError) -> Outcome {
    let out = match &e {
        StartupError::Refused {
            sqlstate,
            message,
            outcome,
        } => {
            let _ = client.write_all(&error_response(sqlstate, message)).await;
            outcome(message.clone())
        }
        StartupError::Client(d) => Outcome::ClientError(d.clone()),
        StartupError::Upstream {
            outcome,
            detail,
            raw,
        } => {
            let msg = match raw {
                Some(raw) => raw.clone(),
                None => error_response("08006", &format!("loopgate: {detail}")),
            };
            let _ = client.write_all(&msg).await;
            outcome(detail.clone())
        }
    };
    let _ = client.shutdown().await;
    out
}

/// Why the encryption negotiation did not end in a start-up packet.
enum Negotiation {
    /// An error to answer on the plain connection.
    Failed(TcpStream, StartupError),
    /// The connection is gone (a failed TLS handshake).
    Gone(Outcome),
}

fn code_of(body: &[u8]) -> i32 {
    i32::from_be_bytes([body[0], body[1], body[2], body[3]])
}

impl Conn {
    /// The TLS configuration for this target's names (its host name and
    /// the address the loop connected to), from the agent's CA.
    fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let ca = self.ca.as_ref()?;
        match ca.server_config(&self.s.target_names()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no TLS certificate for the loop; answering its TLS request with N");
                None
            }
        }
    }

    /// Answers the loop's encryption requests on plain TCP; returns its
    /// connection (TLS when it asked and the agent has a CA) and, when it
    /// asked for nothing more, the first start-up packet it sent.
    async fn negotiate(
        &self,
        mut tcp: TcpStream,
    ) -> Result<(Client, Option<Vec<u8>>), Negotiation> {
        loop {
            let body = match loop_read(read_startup(&mut tcp)).await {
                Ok(b) => b,
                Err(e) => return Err(Negotiation::Failed(tcp, e)),
            };
            match code_of(&body) {
                GSSENC_REQUEST => {
                    if let Err(e) = tcp.write_all(b"N").await {
                        return Err(Negotiation::Failed(tcp, client_io(e)));
                    }
                }
                SSL_REQUEST => {
                    let Some(config) = self.tls_config() else {
                        if let Err(e) = tcp.write_all(b"N").await {
                            return Err(Negotiation::Failed(tcp, client_io(e)));
                        }
                        continue;
                    };
                    if let Err(e) = tcp.write_all(b"S").await {
                        return Err(Negotiation::Failed(tcp, client_io(e)));
                    }
                    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                    // The socket goes with a failed handshake: no error
                    // message can reach the loop.
                    return match tokio::time::timeout(STARTUP_TIMEOUT, accept).await {
                        Ok(Ok(tls)) => Ok((Client::Tls(Box::new(tls)), None)),
                        Ok(Err(e)) => Err(Negotiation::Gone(Outcome::ClientError(format!(
                            "TLS with the loop failed: {e}"
                        )))),
                        Err(_) => Err(Negotiation::Gone(Outcome::ClientError(
                            "the loop did not finish its TLS handshake".into(),
                        ))),
                    };
                }
                _ => return Ok((Client::Plain(tcp), Some(body))),
            }
        }
    }

    /// The start-up phase. `Ok(None)`: a cancel request was relayed.
    async fn start(
        &self,
        client: &mut Client,
        counters: &Counters,
        mut first: Option<Vec<u8>>,
    ) -> Result<Option<(ServerConn, relay::Start, Pooling)>, StartupError> {
        let params = loop {
            let body = match first.take() {
                Some(b) => b,
                None => loop_read(read_startup(client)).await?,
            };
            let code = code_of(&body);
            match code {
                SSL_REQUEST | GSSENC_REQUEST => {
                    client.write_all(b"N").await.map_err(client_io)?;
                }
                CANCEL_REQUEST => {
                    // code + backend pid + secret key
                    if body.len() != 12 {
                        return Err(StartupError::Client(format!(
                            "a cancel request of {} bytes (want 16)",
                            body.len() + 4
                        )));
                    }
                    let pid = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                    let text = format!("cancel backend {pid}");
                    let attrs = vec![("backend_pid".into(), pid.to_string())];
                    // Decided before anything reaches the server. Without a
                    // token there is no identity to decide a JWT workload on.
                    if let Some(wl) = self.s.second_factor_selector() {
                        let r = Refusal::new(
                            format!("jwt-required:{wl}"),
                            format!(
                                "workload {wl} requires a JWT second factor, and a cancel request carries none"
                            ),
                        );
                        self.s.refuse(EventKind::Cancel, &text, &r, attrs);
                        return Err(StartupError::Refused {
                            sqlstate: "28000",
                            message: format!("loopgate: cancel request refused: {}", r.reason),
                            outcome: Outcome::Denied,
                        });
                    }
                    // The connect decision allowed this workload (a refused
                    // one never reaches the handler); the key is the
                    // server's secret for that backend, so the loop can only
                    // cancel a query of a session it holds.
                    self.s.record(
                        Event::note(
                            EventKind::Cancel,
                            text,
                            "allowed at connect; cancel requests carry the backend's secret key",
                        )
                        .with_attrs(attrs),
                    );
                    // The loop's key is the agent's: it leads to the server
                    // connection its session holds now, or nowhere.
                    let secret = i32::from_be_bytes([body[8], body[9], body[10], body[11]]);
                    let Some((upstream, (bpid, bsecret))) = self.pool.resolve((pid, secret)) else {
                        return Ok(None);
                    };
                    let sent = async {
                        let mut up =
                            crate::session::connect(upstream, self.s.connect_timeout()).await?;
                        let mut msg = Vec::with_capacity(16);
                        msg.extend_from_slice(&16i32.to_be_bytes());
                        msg.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
                        msg.extend_from_slice(&bpid.to_be_bytes());
                        msg.extend_from_slice(&bsecret.to_be_bytes());
                        up.write_all(&msg).await.map_err(up_io)
                    }
                    .await;
                    self.pool.cancel_sent((bpid, bsecret));
                    sent?;
                    return Ok(None);
                }
                PROTOCOL_3 => break parse_params(&body[4..])?,
                v => {
                    return Err(StartupError::Refused {
                        sqlstate: "0A000",
                        message: format!(
                            "loopgate: unsupported frontend protocol {}.{}",
                            v >> 16,
                            v & 0xffff
                        ),
                        outcome: Outcome::ClientError,
                    })
                }
            }
        };
        let Some(loop_user) = params.get("user").cloned() else {
            return Err(StartupError::Refused {
                sqlstate: "28000",
                message: "loopgate: the start-up message names no user".into(),
                outcome: Outcome::ClientError,
            });
        };
        // A replication connection speaks another protocol (BASE_BACKUP
        // copies every file), and `_pq_.` options are protocol extensions
        // loopgate does not negotiate.
        if let Some(r) = params.get("replication") {
            if !matches!(
                r.to_ascii_lowercase().as_str(),
                "false" | "0" | "off" | "no"
            ) {
                return Err(StartupError::Refused {
                    sqlstate: "28000",
                    message: "loopgate: replication connections are not allowed".into(),
                    outcome: Outcome::Denied,
                });
            }
        }
        if let Some(k) = params.keys().find(|k| k.starts_with("_pq_.")) {
            return Err(StartupError::Refused {
                sqlstate: "0A000",
                message: format!("loopgate: protocol option {k} is not supported"),
                outcome: Outcome::ClientError,
            });
        }
        let search_path = start_up_settings(&params)?;
        let database = params
            .get("database")
            .cloned()
            .unwrap_or_else(|| loop_user.clone());

        // The second factor, and the session decision made with it.
        if self.s.requires_second_factor() {
            client
                .write_all(&auth_request(3, &[]))
                .await
                .map_err(client_io)?;
            let token = loop_read(read_password(client)).await?;
            let connect = format!("connect {} as {loop_user}", self.s.row().destination);
            let attempt = Attempt {
                kind: EventKind::Op(OpKind::Connect),
                text: connect.clone(),
                attrs: vec![("user".into(), loop_user.clone())],
                how: "send it as the password",
                connect,
            };
            match self.s.second_factor(Some(&token), &attempt).await {
                Ok(_) => {}
                Err(SecondFactorError::Invalid(r)) => {
                    return Err(StartupError::Refused {
                        sqlstate: "28P01",
                        message: format!(
                            "loopgate: the JWT second factor was refused: {}",
                            r.reason
                        ),
                        outcome: Outcome::Denied,
                    })
                }
                Err(SecondFactorError::Refused(r) | SecondFactorError::SubjectChanged(r)) => {
                    return Err(StartupError::Refused {
                        sqlstate: "28000",
                        message: format!(
                            "loopgate: refused by policy (rule {}): {}",
                            r.rule_id, r.reason
                        ),
                        outcome: Outcome::Denied,
                    })
                }
            }
        }

        // Upstream: a pooled login of the same key, else a login with the
        // stored credential.
        let user = self
            .credential
            .username
            .clone()
            .unwrap_or(loop_user.clone());
        let mut up_params: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| *k != "user")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        up_params.sort();
        let key = pool::Key {
            target: self.s.target().to_owned(),
            upstream: self.s.upstream(),
            database: database.clone(),
            user: user.clone(),
            params: up_params.clone(),
        };
        let pooled = self.pool.take(&key, self.credential.pool_idle_timeout);
        let reused = pooled.is_some();
        let login = match pooled {
            Some(login) => login,
            None => {
                let login = async {
                    let tcp = self.s.connect_upstream().await?;
                    let _ = tcp.set_nodelay(true);
                    let mut server = match &self.credential.tls {
                        Some(tls) => ServerConn::Tls(Box::new(self.tls(tcp, tls.clone()).await?)),
                        None => ServerConn::Plain(tcp),
                    };
                    let mut startup: Vec<(&str, &str)> = up_params
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    startup.push(("user", &user));
                    let mut buf = BytesMut::new();
                    frontend::startup_message(startup, &mut buf)
                        .map_err(|e| StartupError::Client(e.to_string()))?;
                    let leftover = match &mut server {
                        ServerConn::Plain(s) => self.upstream_login(s, &buf, &user).await?,
                        ServerConn::Tls(s) => self.upstream_login(s.as_mut(), &buf, &user).await?,
                    };
                    let (hello, backend) = pool::split_hello(&leftover);
                    Ok::<_, StartupError>(pool::Login {
                        conn: server,
                        hello,
                        backend: backend.unwrap_or((0, 0)),
                        born: std::time::Instant::now(),
                    })
                };
                tokio::time::timeout(LOGIN_TIMEOUT, login)
                    .await
                    .map_err(|_| StartupError::Upstream {
                        outcome: Outcome::UpstreamError,
                        detail: format!(
                            "the server did not complete the login within {LOGIN_TIMEOUT:?}"
                        ),
                        raw: None,
                    })??
            }
        };
        self.s.record(
            Event::note(
                EventKind::Login,
                format!("login to {database} as {user}"),
                if reused {
                    "a pooled login with the stored credential (reset with DISCARD ALL)"
                } else {
                    "logged in upstream with the stored credential"
                },
            )
            .with_attrs(vec![
                ("database".into(), database),
                ("user".into(), user.clone()),
                ("loop_user".into(), loop_user),
                ("pooled".into(), reused.to_string()),
            ]),
        );

        // The loop is in: AuthenticationOk, the server's parameters, a
        // cancel key of the agent's, ReadyForQuery.
        let loop_key = pool::KeyGuard {
            key: self.pool.issue_key(self.s.upstream(), login.backend),
            pool: self.pool.clone(),
        };
        let mut ok = auth_request(0, &[]);
        ok.extend_from_slice(&login.hello);
        ok.extend_from_slice(&pool::greeting(loop_key.key));
        client.write_all(&ok).await.map_err(client_io)?;
        counters
            .down
            .fetch_add(ok.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(Some((
            login.conn,
            relay::Start {
                user,
                search_path,
                masks: self.masks.clone(),
                max_message: self.credential.max_message,
                max_result_message: self.credential.max_result_message,
            },
            Pooling {
                key,
                hello: login.hello,
                backend: login.backend,
                born: login.born,
                loop_key,
            },
        )))
    }
}

/// What the session needs to give its server connection back.
struct Pooling {
    key: pool::Key,
    hello: Vec<u8>,
    backend: (i32, i32),
    born: std::time::Instant,
    loop_key: pool::KeyGuard,
}

/// Run-time settings a loop may give in its start-up packet (as a
/// parameter or in `options`), compared without case as the server does.
/// Others are refused: `role` or `session_authorization` there would start
/// the session as another role, out of the rules' sight.
const START_UP_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "geqo",
    "jit",
    "work_mem",
];

/// Checks the start-up parameters; returns the search path they set.
fn start_up_settings(
    params: &std::collections::BTreeMap<String, String>,
) -> Result<Option<String>, StartupError> {
    let refuse = |what: String| StartupError::Refused {
        sqlstate: "42501",
        message: format!(
            "loopgate: {what} is not allowed at start-up (allowed: {})",
            START_UP_SETTINGS.join(", ")
        ),
        outcome: Outcome::Denied,
    };
    let mut search_path = None;
    let mut settings: Vec<(String, String)> = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => settings.extend(parse_options(v).map_err(refuse)?),
            _ => settings.push((k.clone(), v.clone())),
        }
    }
    for (k, v) in settings {
        let name = k.to_ascii_lowercase().replace('-', "_");
        if !START_UP_SETTINGS.contains(&name.as_str()) {
            return Err(refuse(format!("setting {k}")));
        }
        if name == "search_path" {
            search_path = Some(v);
        }
    }
    Ok(search_path)
}

/// The `options` start-up parameter split as the server splits it
/// (whitespace; a backslash takes the next character literally) into
/// `-c name=value` / `--name=value` settings; any other switch is refused.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
                in_word = true;
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
            Some(rest.to_owned())
        } else {
            return Err(format!("the start-up option {w:?}"));
        };
        match setting.as_deref().and_then(|s| s.split_once('=')) {
            Some((k, v)) => out.push((k.to_owned(), v.to_owned())),
            None => return Err(format!("the start-up option {setting:?}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_settings_are_an_allow_list_read_as_the_server_reads_them() {
        let p = |kv: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ok = p(&[
            ("user", "x"),
            ("application_name", "psql"),
            ("DateStyle", "ISO"),
            ("options", "-c search_path=app\\,pii --statement-timeout=5s"),
        ]);
        assert_eq!(start_up_settings(&ok).unwrap().as_deref(), Some("app,pii"));
        for bad in [
            p(&[("role", "admin")]),
            p(&[("options", "-c role=admin")]),
            p(&[("options", "-crole=admin")]),
            p(&[("options", "--session_authorization=admin")]),
            p(&[("options", "-d 5")]),
            p(&[("Session_Authorization", "admin")]),
        ] {
            assert!(start_up_settings(&bad).is_err(), "{bad:?}");
        }
    }
}

/// The upstream could not be reached.
impl From<Outcome> for StartupError {
    fn from(o: Outcome) -> Self {
        let outcome: fn(String) -> Outcome = match o {
            Outcome::UpstreamUnreachable(_) => Outcome::UpstreamUnreachable,
            _ => Outcome::UpstreamError,
        };
        StartupError::Upstream {
            outcome,
            detail: o.detail().to_owned(),
            raw: None,
        }
    }
}

fn client_io(e: std::io::Error) -> StartupError {
    StartupError::Client(format!("the loop's connection failed during start-up: {e}"))
}

fn up_io(e: std::io::Error) -> StartupError {
    StartupError::Upstream {
        outcome: Outcome::UpstreamError,
        detail: format!("the server connection failed during authentication: {e}"),
        raw: None,
    }
}

/// The private functions above, for `crate::fuzzing`.
#[doc(hidden)]
pub(crate) mod fuzz;
