//! The agent's login upstream: TLS when the target asks for it, then the
//! server's password challenge answered with the stored password
//! (SCRAM-SHA-256, MD5 or cleartext, as `auth_methods` allows).

use std::sync::Arc;

use bytes::BytesMut;
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

use super::{up_io, wire::MAX_STARTUP, Conn, StartupError};
use crate::{config::TargetAddress, kinds::Outcome};

impl Conn {
    /// Asks the server for TLS (`SSLRequest`) and verifies its certificate
    /// against the target's `ca_file` and address.
    pub(super) async fn tls(
        &self,
        mut tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, StartupError> {
        let fail = |detail: String| StartupError::Upstream {
            outcome: Outcome::UpstreamError,
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
                self.s.target()
            )));
        }
        let host = match self.s.address() {
            Some(TargetAddress::Host { host, .. }) => host.clone(),
            _ => self.s.upstream().ip().to_string(),
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
    pub(super) async fn upstream_login<S>(
        &self,
        server: &mut S,
        startup: &[u8],
        user: &str,
    ) -> Result<BytesMut, StartupError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        server.write_all(startup).await.map_err(up_io)?;
        let target = self.s.target();
        let password = || {
            self.credential
                .password
                .as_ref()
                .map(|p| p.expose().as_bytes())
                .ok_or_else(|| StartupError::Upstream {
                    outcome: Outcome::UpstreamError,
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
                    outcome: Outcome::UpstreamError,
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
                            outcome: Outcome::UpstreamError,
                            detail: format!("malformed message from the server: {e}"),
                            raw: None,
                        })
                    }
                }
                if rd.len() > MAX_STARTUP {
                    return Err(StartupError::Upstream {
                        outcome: Outcome::UpstreamError,
                        detail: "the server sent an oversized authentication message".into(),
                        raw: None,
                    });
                }
                let n = server.read_buf(&mut rd).await.map_err(up_io)?;
                if n == 0 {
                    return Err(StartupError::Upstream {
                        outcome: Outcome::UpstreamError,
                        detail: "the server closed the connection during authentication".into(),
                        raw: None,
                    });
                }
            };
            let mut out = BytesMut::new();
            let io = |e: std::io::Error| StartupError::Upstream {
                outcome: Outcome::UpstreamError,
                detail: format!("SCRAM exchange with the server: {e}"),
                raw: None,
            };
            match msg {
                (Message::AuthenticationOk, _) => {
                    if scram.is_some() && !scram_done {
                        // The server never proved it knows the password.
                        return Err(StartupError::Upstream {
                            outcome: Outcome::UpstreamError,
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
                            outcome: Outcome::UpstreamError,
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
                        outcome: Outcome::UpstreamError,
                        detail: format!("the server refused the login as {user}: {text}"),
                        raw: Some(raw),
                    });
                }
                (Message::NoticeResponse(_), _) => {}
                (_, raw) => {
                    return Err(StartupError::Upstream {
                        outcome: Outcome::UpstreamError,
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
