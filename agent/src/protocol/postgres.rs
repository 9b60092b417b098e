//! PostgreSQL targets (`protocol = "postgres"`): the agent answers the loop's
//! start-up itself and logs in upstream with the stored credential, so the
//! loop never needs (or sees) the database password.
//!
//! 1. `SSLRequest`/`GSSENCRequest` are declined (`N`): the loop's leg is
//!    loopback to the agent. A `CancelRequest` is decided first, like a
//!    session: the connect decision was made before the handler ran, and a
//!    workload that requires a JWT is refused (a cancel carries no token).
//!    Only then is it passed to the upstream (the loop holds the upstream's
//!    real `BackendKeyData`).
//! 2. When the workload requires the JWT second factor, the agent asks the
//!    loop for a cleartext password and takes the JWT from it (`PGPASSWORD`
//!    / `password=`), verifies it and makes the session decision with its
//!    subject. Otherwise the loop is not asked for a password at all: the
//!    kernel-attested identity was decided at connect.
//! 3. Upstream, the start-up parameters are sent with the stored `username`
//!    (when set) and the server's password challenge is answered with the
//!    stored password: SCRAM-SHA-256, MD5 or cleartext (postgres-protocol).
//! 4. The loop gets `AuthenticationOk`, and from then on the session is
//!    relayed and captured like raw TCP (statement-level policy belongs to a
//!    later handler stage).
//!
//! Refusals are `ErrorResponse` messages (SQLSTATE 28000 / 28P01 / 08006), so
//! psql and drivers print them as they would a server's.

use std::{collections::BTreeMap, net::SocketAddr, os::fd::RawFd, sync::Arc, time::Duration};

use bytes::{BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::{
    authentication::{
        md5_hash,
        sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256},
    },
    message::{backend::Message, frontend},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use super::tcp::{self, Capture, Counters, Outcome};
use crate::{
    audit::SessionRow,
    config::TargetAddress,
    identity::JwtVerifier,
    policy::{Request, CONNECT},
    proxy::{session_request, Proxy},
    secrets::StoredCredential,
};

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
const PROTOCOL_3: i32 = 196_608;
/// Longest start-up or password message accepted from a loop.
const MAX_STARTUP: usize = 64 * 1024;
/// A loop has this long to finish its start-up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The upstream has this long to complete the login.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

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
        outcome: &'static str,
    },
    /// The loop broke the protocol or went away.
    #[error("{0}")]
    Client(String),
    /// The upstream failed; `raw` is its ErrorResponse, passed to the loop.
    #[error("{detail}")]
    Upstream {
        outcome: &'static str,
        detail: String,
        raw: Option<Vec<u8>>,
    },
}

/// The agent's connection to the server: plain (relayed with splice) or TLS.
enum ServerConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// One loop connection to a PostgreSQL target.
pub(crate) struct Session {
    pub proxy: Arc<Proxy>,
    pub row: SessionRow,
    /// The target's configured address (the TLS server name).
    pub address: Option<TargetAddress>,
    pub exe: Option<String>,
    pub jwt: Option<(String, Arc<JwtVerifier>)>,
    pub subject: Arc<std::sync::Mutex<Option<String>>>,
    pub upstream: SocketAddr,
    pub credential: StoredCredential,
    pub capture: Option<Capture>,
    pub connect_timeout: Duration,
    pub client_fd: RawFd,
}

pub(crate) async fn serve(
    s: Session,
    mut client: TcpStream,
    counters: Arc<Counters>,
    abort: CancellationToken,
) -> Outcome {
    let _ = client.set_nodelay(true);
    let started = tokio::select! {
        r = s.start(&mut client, &counters) => r,
        _ = abort.cancelled() => {
            return Outcome::new("shutdown", Some("closed by agent shutdown".into()))
        }
    };
    let server = match started {
        Ok(Some(server)) => server,
        // A cancel request, relayed.
        Ok(None) => return Outcome::new("ok", Some("cancel request relayed".into())),
        Err(e) => {
            let (outcome, detail) = match &e {
                StartupError::Refused {
                    sqlstate,
                    message,
                    outcome,
                } => {
                    let _ = client.write_all(&error_response(sqlstate, message)).await;
                    (*outcome, message.clone())
                }
                StartupError::Client(d) => ("client_error", d.clone()),
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
                    (*outcome, detail.clone())
                }
            };
            let _ = client.shutdown().await;
            return Outcome::new(outcome, Some(detail));
        }
    };
    match server {
        ServerConn::Plain(server) => {
            tcp::relay_streams(client, server, counters, s.capture.clone(), abort).await
        }
        ServerConn::Tls(server) => {
            tcp::relay_io(client, *server, counters, s.capture.clone(), abort).await
        }
    }
}

impl Session {
    /// The start-up phase. `Ok(None)`: a cancel request was relayed.
    async fn start(
        &self,
        client: &mut TcpStream,
        counters: &Counters,
    ) -> Result<Option<ServerConn>, StartupError> {
        let params = loop {
            let body = loop_read(read_startup(client)).await?;
            let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
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
                    if let Some((wl, _)) = &self.jwt {
                        let rule_id = format!("jwt-required:{wl}");
                        let reason = format!(
                            "workload {wl} requires a JWT second factor, and a cancel request carries none"
                        );
                        self.proxy.metrics.decision("deny", &rule_id);
                        self.proxy
                            .event(&self.row, "cancel", &text, "deny", &rule_id, &reason, attrs);
                        return Err(StartupError::Refused {
                            sqlstate: "28000",
                            message: format!("loopgate: cancel request refused: {reason}"),
                            outcome: "denied",
                        });
                    }
                    // The connect decision allowed this workload (a refused
                    // one never reaches the handler); the key is the
                    // server's secret for that backend, so the loop can only
                    // cancel a query of a session it holds.
                    self.proxy.event(
                        &self.row,
                        "cancel",
                        &text,
                        "allow",
                        "",
                        "allowed at connect; cancel requests carry the backend's secret key",
                        attrs,
                    );
                    let mut up = tcp::connect(self.upstream, self.connect_timeout).await?;
                    let mut msg = Vec::with_capacity(16);
                    msg.extend_from_slice(&16i32.to_be_bytes());
                    msg.extend_from_slice(&body);
                    up.write_all(&msg).await.map_err(up_io)?;
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
                        outcome: "client_error",
                    })
                }
            }
        };
        let Some(loop_user) = params.get("user").cloned() else {
            return Err(StartupError::Refused {
                sqlstate: "28000",
                message: "loopgate: the start-up message names no user".into(),
                outcome: "client_error",
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
                    outcome: "denied",
                });
            }
        }
        if let Some(k) = params.keys().find(|k| k.starts_with("_pq_.")) {
            return Err(StartupError::Refused {
                sqlstate: "0A000",
                message: format!("loopgate: protocol option {k} is not supported"),
                outcome: "client_error",
            });
        }
        let database = params
            .get("database")
            .cloned()
            .unwrap_or_else(|| loop_user.clone());

        // The second factor, and the session decision made with it.
        if let Some((wl, verifier)) = &self.jwt {
            client
                .write_all(&auth_request(3, &[]))
                .await
                .map_err(client_io)?;
            let token = loop_read(read_password(client)).await?;
            let claims = match verifier.verify(&token).await {
                Ok(c) => c,
                Err(e) => {
                    let reason = e.to_string();
                    let rule_id = format!("jwt:{wl}");
                    self.proxy.metrics.decision("deny", &rule_id);
                    self.proxy.event(
                        &self.row,
                        CONNECT,
                        &format!("connect {} as {loop_user}", self.row.destination),
                        "deny",
                        &rule_id,
                        &reason,
                        vec![("user".into(), loop_user.clone())],
                    );
                    return Err(StartupError::Refused {
                        sqlstate: "28P01",
                        message: format!("loopgate: the JWT second factor was refused: {reason}"),
                        outcome: "denied",
                    });
                }
            };
            let r = Request {
                jwt_subject: Some(&claims.sub),
                ..session_request(&self.row, self.exe.as_deref(), CONNECT)
            };
            let text = format!(
                "connect {} as {loop_user} (jwt sub {})",
                self.row.destination, claims.sub
            );
            let attrs = vec![
                ("user".into(), loop_user.clone()),
                ("jwt_sub".into(), claims.sub.clone()),
            ];
            if let Err((d, reason)) = self
                .proxy
                .decide(&self.row, &r, &text, attrs, self.client_fd)
                .await
            {
                return Err(StartupError::Refused {
                    sqlstate: "28000",
                    message: format!("loopgate: refused by policy (rule {}): {reason}", d.rule_id),
                    outcome: "denied",
                });
            }
            if let Ok(mut g) = self.subject.lock() {
                *g = Some(claims.sub);
            }
        }

        // Upstream, with the stored credential.
        let login = async {
            let tcp = tcp::connect(self.upstream, self.connect_timeout).await?;
            let _ = tcp.set_nodelay(true);
            let mut server = match &self.credential.tls {
                Some(tls) => ServerConn::Tls(Box::new(self.tls(tcp, tls.clone()).await?)),
                None => ServerConn::Plain(tcp),
            };
            let user = self
                .credential
                .username
                .clone()
                .unwrap_or(loop_user.clone());
            let mut up_params: Vec<(&str, &str)> = params
                .iter()
                .filter(|(k, _)| *k != "user")
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            up_params.push(("user", &user));
            let mut buf = BytesMut::new();
            frontend::startup_message(up_params, &mut buf)
                .map_err(|e| StartupError::Client(e.to_string()))?;
            let leftover = match &mut server {
                ServerConn::Plain(s) => self.upstream_login(s, &buf, &user).await?,
                ServerConn::Tls(s) => self.upstream_login(s.as_mut(), &buf, &user).await?,
            };
            Ok::<_, StartupError>((server, user, leftover))
        };
        let (server, user, leftover) =
            tokio::time::timeout(LOGIN_TIMEOUT, login)
                .await
                .map_err(|_| StartupError::Upstream {
                    outcome: "upstream_error",
                    detail: format!(
                        "the server did not complete the login within {LOGIN_TIMEOUT:?}"
                    ),
                    raw: None,
                })??;
        self.proxy.event(
            &self.row,
            "login",
            &format!("login to {database} as {user}"),
            "allow",
            "",
            "logged in upstream with the stored credential",
            vec![
                ("database".into(), database),
                ("user".into(), user),
                ("loop_user".into(), loop_user),
            ],
        );

        // The loop is in: AuthenticationOk, then whatever the server sent
        // after its own (ParameterStatus, BackendKeyData, ReadyForQuery).
        let mut ok = auth_request(0, &[]);
        ok.extend_from_slice(&leftover);
        client.write_all(&ok).await.map_err(client_io)?;
        counters
            .down
            .fetch_add(ok.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(server))
    }

    /// Asks the server for TLS (`SSLRequest`) and verifies its certificate
    /// against the target's `ca_file` and address.
    async fn tls(
        &self,
        mut tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, StartupError> {
        let fail = |detail: String| StartupError::Upstream {
            outcome: "upstream_error",
            detail,
            raw: None,
        };
        let mut req = BytesMut::new();
        frontend::ssl_request(&mut req);
        tcp.write_all(&req).await.map_err(up_io)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(up_io)?;
        if answer[0] != b'S' {
            return Err(fail(format!(
                "the server does not offer TLS, and target {} requires it (credential.ca_file)",
                self.row.target
            )));
        }
        let host = match &self.address {
            Some(TargetAddress::Host { host, .. }) => host.clone(),
            _ => self.upstream.ip().to_string(),
        };
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| fail(format!("{host} is not a TLS server name: {e}")))?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS with the server failed: {e}")))
    }

    /// Answers the server's authentication requests with the stored
    /// password. Returns the bytes read past `AuthenticationOk`.
    async fn upstream_login<S>(
        &self,
        server: &mut S,
        startup: &[u8],
        user: &str,
    ) -> Result<BytesMut, StartupError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        server.write_all(startup).await.map_err(up_io)?;
        let target = &self.row.target;
        let password = || {
            self.credential
                .password
                .as_ref()
                .map(|p| p.expose().as_bytes())
                .ok_or_else(|| StartupError::Upstream {
                    outcome: "upstream_error",
                    detail: format!(
                        "the server asks for a password and target {target} has no stored password (credential.password_file)"
                    ),
                    raw: None,
                })
        };
        let allowed = |method: &str| -> Result<(), StartupError> {
            if self.credential.auth_methods.iter().any(|m| m == method) {
                Ok(())
            } else {
                Err(StartupError::Upstream {
                    outcome: "upstream_error",
                    detail: format!(
                        "the server asks for a {method} login, which target {target} does not allow (auth_methods = {:?}); the stored password was not sent",
                        self.credential.auth_methods
                    ),
                    raw: None,
                })
            }
        };
        let mut rd = BytesMut::with_capacity(8192);
        let mut scram: Option<ScramSha256> = None;
        let mut scram_done = false;
        loop {
            let msg = loop {
                // Complete messages are parsed from the front of `rd`.
                let raw_start = rd.clone();
                match Message::parse(&mut rd) {
                    Ok(Some(m)) => {
                        let used = raw_start.len() - rd.len();
                        break (m, raw_start[..used].to_vec());
                    }
                    Ok(None) => {}
                    Err(e) => {
                        return Err(StartupError::Upstream {
                            outcome: "upstream_error",
                            detail: format!("malformed message from the server: {e}"),
                            raw: None,
                        })
                    }
                }
                if rd.len() > MAX_STARTUP {
                    return Err(StartupError::Upstream {
                        outcome: "upstream_error",
                        detail: "the server sent an oversized authentication message".into(),
                        raw: None,
                    });
                }
                let n = server.read_buf(&mut rd).await.map_err(up_io)?;
                if n == 0 {
                    return Err(StartupError::Upstream {
                        outcome: "upstream_error",
                        detail: "the server closed the connection during authentication".into(),
                        raw: None,
                    });
                }
            };
            let mut out = BytesMut::new();
            let io = |e: std::io::Error| StartupError::Upstream {
                outcome: "upstream_error",
                detail: format!("SCRAM exchange with the server: {e}"),
                raw: None,
            };
            match msg {
                (Message::AuthenticationOk, _) => {
                    if scram.is_some() && !scram_done {
                        // The server never proved it knows the password.
                        return Err(StartupError::Upstream {
                            outcome: "upstream_error",
                            detail: "the server ended SCRAM without its final message".into(),
                            raw: None,
                        });
                    }
                    return Ok(rd);
                }
                (Message::AuthenticationCleartextPassword, _) => {
                    allowed("password")?;
                    frontend::password_message(password()?, &mut out).map_err(io)?;
                }
                (Message::AuthenticationMd5Password(body), _) => {
                    allowed("md5")?;
                    let hash = md5_hash(user.as_bytes(), password()?, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut out).map_err(io)?;
                }
                (Message::AuthenticationSasl(body), _) => {
                    let mechanisms: Vec<String> = body
                        .mechanisms()
                        .map(|m| Ok(m.to_owned()))
                        .collect()
                        .map_err(io)?;
                    if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(StartupError::Upstream {
                            outcome: "upstream_error",
                            detail: format!(
                                "the server offers SASL {mechanisms:?}; loopgate speaks SCRAM-SHA-256"
                            ),
                            raw: None,
                        });
                    }
                    allowed("scram-sha-256")?;
                    let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                        .map_err(io)?;
                    scram = Some(s);
                }
                (Message::AuthenticationSaslContinue(body), _) => {
                    let s = scram.as_mut().ok_or_else(|| io(std::io::Error::other("SASLContinue before SASL")))?;
                    s.update(body.data()).map_err(io)?;
                    frontend::sasl_response(s.message(), &mut out).map_err(io)?;
                }
                (Message::AuthenticationSaslFinal(body), _) => {
                    let s = scram.as_mut().ok_or_else(|| io(std::io::Error::other("SASLFinal before SASL")))?;
                    s.finish(body.data()).map_err(io)?;
                    scram_done = true;
                }
                (Message::ErrorResponse(body), raw) => {
                    let mut fields = body.fields();
                    let mut text = String::new();
                    while let Ok(Some(f)) = fields.next() {
                        if f.type_() == b'M' {
                            text = String::from_utf8_lossy(f.value_bytes()).into_owned();
                        }
                    }
                    return Err(StartupError::Upstream {
                        outcome: "upstream_error",
                        detail: format!("the server refused the login as {user}: {text}"),
                        raw: Some(raw),
                    });
                }
                (Message::NoticeResponse(_), _) => {}
                (_, raw) => {
                    return Err(StartupError::Upstream {
                        outcome: "upstream_error",
                        detail: format!(
                            "the server asked for an authentication loopgate does not speak (message {:?})",
                            raw.first().map(|b| *b as char)
                        ),
                        raw: None,
                    })
                }
            }
            if !out.is_empty() {
                server.write_all(&out).await.map_err(up_io)?;
            }
        }
    }
}

/// The upstream could not be reached.
impl From<Outcome> for StartupError {
    fn from(o: Outcome) -> Self {
        StartupError::Upstream {
            outcome: o.outcome,
            detail: o.detail.unwrap_or_default(),
            raw: None,
        }
    }
}

fn client_io(e: std::io::Error) -> StartupError {
    StartupError::Client(format!("the loop's connection failed during start-up: {e}"))
}

fn up_io(e: std::io::Error) -> StartupError {
    StartupError::Upstream {
        outcome: "upstream_error",
        detail: format!("the server connection failed during authentication: {e}"),
        raw: None,
    }
}

/// Reads one untyped start-up packet (length-prefixed); returns its body.
async fn read_startup(
    c: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Vec<u8>, StartupError> {
    let mut len = [0u8; 4];
    c.read_exact(&mut len).await.map_err(client_io)?;
    let len = i32::from_be_bytes(len);
    if !(8..=MAX_STARTUP as i32).contains(&len) {
        return Err(StartupError::Refused {
            sqlstate: "08P01",
            message: format!("loopgate: invalid start-up packet length {len}"),
            outcome: "client_error",
        });
    }
    let mut body = vec![0u8; len as usize - 4];
    c.read_exact(&mut body).await.map_err(client_io)?;
    Ok(body)
}

/// Start-up parameters: NUL-terminated key/value pairs, then a NUL.
fn parse_params(mut b: &[u8]) -> Result<BTreeMap<String, String>, StartupError> {
    let bad = || StartupError::Refused {
        sqlstate: "08P01",
        message: "loopgate: malformed start-up parameters".into(),
        outcome: "client_error",
    };
    let cstr = |b: &mut &[u8]| -> Result<String, StartupError> {
        let end = b.iter().position(|&c| c == 0).ok_or_else(bad)?;
        let s = std::str::from_utf8(&b[..end])
            .map_err(|_| bad())?
            .to_owned();
        *b = &b[end + 1..];
        Ok(s)
    };
    let mut out = BTreeMap::new();
    loop {
        let k = cstr(&mut b)?;
        if k.is_empty() {
            return Ok(out);
        }
        let v = cstr(&mut b)?;
        out.insert(k, v);
    }
}

/// Reads the loop's PasswordMessage (`p`) and returns the password.
async fn read_password(
    c: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<String, StartupError> {
    let mut head = [0u8; 5];
    c.read_exact(&mut head).await.map_err(client_io)?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if head[0] != b'p' || !(5..=MAX_STARTUP as i32).contains(&len) {
        return Err(StartupError::Refused {
            sqlstate: "08P01",
            message: "loopgate: expected a password message".into(),
            outcome: "client_error",
        });
    }
    let mut body = vec![0u8; len as usize - 4];
    c.read_exact(&mut body).await.map_err(client_io)?;
    if body.last() == Some(&0) {
        body.pop();
    }
    String::from_utf8(body).map_err(|_| StartupError::Refused {
        sqlstate: "28P01",
        message: "loopgate: the password is not UTF-8 (expected a JWT)".into(),
        outcome: "denied",
    })
}

/// An `Authentication*` request (`R`).
fn auth_request(code: i32, extra: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(9 + extra.len());
    b.put_u8(b'R');
    b.put_i32(8 + extra.len() as i32);
    b.put_i32(code);
    b.put_slice(extra);
    b.to_vec()
}

/// A FATAL `ErrorResponse` (`E`).
fn error_response(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = BytesMut::new();
    for (t, v) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.put_u8(t);
        body.put_slice(v.replace('\0', " ").as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.put_u8(b'E');
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(&body);
    b.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_parameters_and_error_responses() {
        let p = parse_params(b"user\0etl\0database\0orders\0\0").unwrap();
        assert_eq!(p["user"], "etl");
        assert_eq!(p["database"], "orders");
        assert!(parse_params(b"user\0etl").is_err());
        // The error parses back as a server's would.
        let mut b = BytesMut::from(&error_response("28000", "no")[..]);
        let Ok(Some(Message::ErrorResponse(body))) = Message::parse(&mut b) else {
            panic!("not an ErrorResponse");
        };
        let fields: Vec<(u8, String)> = body
            .fields()
            .map(|f| {
                Ok((
                    f.type_(),
                    String::from_utf8_lossy(f.value_bytes()).into_owned(),
                ))
            })
            .collect()
            .unwrap();
        assert!(fields.contains(&(b'C', "28000".into())));
        assert!(fields.contains(&(b'M', "no".into())));
        let mut ok = BytesMut::from(&auth_request(0, &[])[..]);
        assert!(matches!(
            Message::parse(&mut ok),
            Ok(Some(Message::AuthenticationOk))
        ));
    }
}

/// The private functions above, for `crate::fuzzing`.
#[doc(hidden)]
pub(crate) mod fuzz;
