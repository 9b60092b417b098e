//! The agent's own outbound HTTP(S) requests (JWKS fetches, approval
//! webhooks): one client builder, `http://` and `https://` URLs, rustls with
//! the `ring` provider. Trust is a CA PEM file when one is configured, else the
//! system roots (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`).
//!
//! Callers apply their own timeouts (`tokio::time::timeout`). URLs may carry
//! secrets (a Slack webhook URL carries its token): errors and logs built from
//! this module name the host at most, never the path or query.

use std::{
    path::Path,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use rustls::{pki_types::pem::PemObject, pki_types::CertificateDer, RootCertStore};

/// The shared client type: `http` and `https`, HTTP/1.1, `Full<Bytes>` bodies.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpClientError {
    #[error("cannot read the CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
}

/// Builds a client trusting the certificates of `ca_file` (PEM, one or more),
/// or the system roots without one.
pub fn build(ca_file: Option<&Path>) -> Result<HttpClient, HttpClientError> {
    let tls = tls_config(ca_file)?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// A TLS client configuration (ring) trusting `ca_file`, or the system roots
/// without one. Also used for the agent's upstream PostgreSQL connections.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, HttpClientError> {
    let roots = match ca_file {
        Some(p) => Arc::new(ca_roots(p)?),
        None => system_roots(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("the ring provider supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// Parses an outbound URL: `http://` or `https://` with a host.
pub fn parse_url(url: &str) -> Result<hyper::Uri, &'static str> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err("must be an http:// or https:// URL");
    }
    let uri: hyper::Uri = url.parse().map_err(|_| "is not a valid URL")?;
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("must not carry credentials (user:password@)");
    }
    Ok(uri)
}

/// `scheme://host[:port]/path`: a URL without its query (which may carry a
/// token), for error messages that must say which URL.
pub fn without_query(uri: &hyper::Uri) -> String {
    format!(
        "{}://{}{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.host().unwrap_or("?"),
        uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default(),
        uri.path()
    )
}

/// An error with its causes (`client error (Connect): invalid peer
/// certificate: UnknownIssuer`): hyper's own message alone says little.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

fn ca_roots(path: &Path) -> Result<RootCertStore, HttpClientError> {
    let err = |reason: String| HttpClientError::CaFile {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| err(e.to_string()))?;
    }
    Ok(roots)
}

/// The system roots, loaded once per process. Without any, `https` URLs fail
/// with an unknown-issuer error and `http` ones still work.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "skipping a system CA certificate source");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    "no system CA certificates found: https requests without a CA file will fail"
                );
            } else {
                tracing::debug!(added, ignored, "loaded the system CA certificates");
            }
            Arc::new(roots)
        })
        .clone()
}

/// In-test HTTP(S) servers and certificates, shared by the unit tests of the
/// modules that make outbound requests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::{
        convert::Infallible,
        net::SocketAddr,
        sync::{Arc, Mutex},
    };

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{body::Incoming, Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;

    /// A test CA and a server certificate for `127.0.0.1` it signed.
    pub struct TestPki {
        pub ca_pem: String,
        pub server: Arc<rustls::ServerConfig>,
    }

    pub fn pki() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "loopgate test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        TestPki {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
        }
    }

    /// What the server saw, and what it answers next.
    #[derive(Default)]
    pub struct State {
        /// `(path and query, body)` of every request.
        pub requests: Vec<(String, String)>,
        /// Answers, first to last; the last one repeats.
        pub answers: Vec<(StatusCode, &'static str, String)>,
    }

    pub struct Server {
        pub addr: SocketAddr,
        pub state: Arc<Mutex<State>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        pub fn hits(&self) -> usize {
            self.state.lock().unwrap().requests.len()
        }

        /// Replaces the answers.
        pub fn answer(&self, status: StatusCode, content_type: &'static str, body: String) {
            self.state.lock().unwrap().answers = vec![(status, content_type, body)];
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// An HTTP (or, with `tls`, HTTPS) server on 127.0.0.1.
    pub async fn serve(
        tls: Option<Arc<rustls::ServerConfig>>,
        answers: Vec<(StatusCode, &'static str, String)>,
    ) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            requests: Vec::new(),
            answers,
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (st, acceptor) = (st.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let st = st.clone();
                        async move {
                            let path = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut s = st.lock().unwrap();
                            s.requests
                                .push((path, String::from_utf8_lossy(&body).into_owned()));
                            let (status, ct, body) = if s.answers.len() > 1 {
                                s.answers.remove(0)
                            } else {
                                s.answers.first().cloned().unwrap_or((
                                    StatusCode::OK,
                                    "text/plain",
                                    String::new(),
                                ))
                            };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header(hyper::header::CONTENT_TYPE, ct)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        Server { addr, state, task }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(parse_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(parse_url("https://hooks.slack.com/services/T/B/x").is_ok());
        assert_eq!(
            parse_url("ftp://x/y").unwrap_err(),
            "must be an http:// or https:// URL"
        );
        assert_eq!(
            parse_url("/just/a/path").unwrap_err(),
            "must be an http:// or https:// URL"
        );
        assert_eq!(
            parse_url("file:///etc/jwks.json").unwrap_err(),
            "must be an http:// or https:// URL"
        );
        assert_eq!(parse_url("https://a b/").unwrap_err(), "is not a valid URL");
        assert!(parse_url("HTTPS://idp.example/jwks").is_ok());
        assert!(parse_url("https://user:pw@idp.example/jwks").is_err());
        let u = parse_url("https://idp.example:8443/jwks.json?token=secret").unwrap();
        assert_eq!(without_query(&u), "https://idp.example:8443/jwks.json");
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        assert!(matches!(
            build(Some(&p)),
            Err(HttpClientError::CaFile { .. })
        ));
        std::fs::write(&p, "not a certificate\n").unwrap();
        let Err(HttpClientError::CaFile { reason, .. }) = build(Some(&p)) else {
            panic!("a file without certificates is refused")
        };
        assert!(reason.contains("no PEM certificate"), "{reason}");
    }
}
