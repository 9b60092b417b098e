//! JWKS fetched from a URL: on first use, cached, refreshed after 10
//! minutes, re-fetched (at most every 30 s) for a token with an unknown key
//! id, single-flight, with the cached keys kept when a fetch fails.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use jsonwebtoken::{
    jwk::{Jwk, JwkSet},
    DecodingKey,
};

use super::{decoding_key, pick, JwtError};
use crate::http_client::{self, HttpClient};

/// Keys fetched from a URL are refreshed when older than this.
pub(super) const JWKS_MAX_AGE: Duration = Duration::from_secs(600);
/// At most one fetch per this interval once keys are cached (unknown key ids,
/// refreshes), so tokens with made-up key ids cannot hammer the IdP.
pub(super) const JWKS_MIN_REFETCH: Duration = Duration::from_secs(30);
/// At most one fetch per this interval while no keys are cached.
const JWKS_MIN_RETRY_EMPTY: Duration = Duration::from_secs(5);
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const JWKS_MAX_BYTES: usize = 1 << 20;

pub(super) struct RemoteJwks {
    url: hyper::Uri,
    /// The URL without its query, for errors.
    pub(super) shown: String,
    client: HttpClient,
    pub(super) cached: ArcSwapOption<Fetched>,
    /// Held while fetching: concurrent verifies wait for one fetch.
    refresh: tokio::sync::Mutex<FetchState>,
}

pub(super) struct Fetched {
    pub(super) keys: JwkSet,
    pub(super) at: Instant,
}

#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// Why the last fetch failed (cleared by a successful one).
    last_error: Option<String>,
}

impl RemoteJwks {
    /// Checks `url` (`https://`, or `http://` on loopback only) and builds
    /// its client; nothing is fetched here.
    pub(super) fn new(url: &str, ca_file: Option<&Path>) -> Result<Self, JwtError> {
        let uri = http_client::parse_url(url).map_err(|r| JwtError::Jwks {
            // The query may carry a token.
            path: url.split('?').next().unwrap_or_default().to_owned(),
            reason: format!("jwks_url {r}"),
        })?;
        let shown = http_client::without_query(&uri);
        // Keys fetched in clear text could be swapped by anyone on the path,
        // who could then sign any token.
        let loopback = match uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        {
            Some("localhost") => true,
            Some(h) => h
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
            None => false,
        };
        if uri.scheme_str() != Some("https") && !loopback {
            return Err(JwtError::Jwks {
                path: shown,
                reason: "jwks_url must be https:// (http:// only on loopback)".into(),
            });
        }
        let client = http_client::build(ca_file).map_err(|e| JwtError::Jwks {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Ok(RemoteJwks {
            url: uri,
            shown,
            client,
            cached: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(FetchState::default()),
        })
    }

    fn host(&self) -> &str {
        self.url.host().unwrap_or("?")
    }

    pub(super) async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, JwtError> {
        // Fast path: fresh keys holding this kid.
        let cached = self.cached.load_full();
        if let Some(c) = &cached {
            if let Some(jwk) = pick(&c.keys, kid) {
                if c.at.elapsed() < JWKS_MAX_AGE {
                    return decoding_key(jwk);
                }
                // Stale: refresh unless another verify already is.
                let Ok(state) = self.refresh.try_lock() else {
                    return decoding_key(jwk);
                };
                return self.refresh_then(state, kid).await;
            }
        }
        let state = self.refresh.lock().await;
        self.refresh_then(state, kid).await
    }

    /// With the refresh lock held: fetches unless the keys are fresh and hold
    /// `kid` (another verify fetched while this one waited) or the last fetch
    /// was too recent, then looks `kid` up.
    async fn refresh_then(
        &self,
        mut state: tokio::sync::MutexGuard<'_, FetchState>,
        kid: Option<&str>,
    ) -> Result<DecodingKey, JwtError> {
        let cached = self.cached.load_full();
        let usable = cached
            .as_ref()
            .is_some_and(|c| c.at.elapsed() < JWKS_MAX_AGE && pick(&c.keys, kid).is_some());
        let gap = if cached.is_some() {
            JWKS_MIN_REFETCH
        } else {
            JWKS_MIN_RETRY_EMPTY
        };
        if !usable && state.last_attempt.is_none_or(|t| t.elapsed() >= gap) {
            state.last_attempt = Some(Instant::now());
            match self.fetch().await {
                Ok(keys) => {
                    tracing::debug!(jwks_host = %self.host(), keys = keys.keys.len(), "fetched the JWKS");
                    state.last_error = None;
                    self.cached.store(Some(Arc::new(Fetched {
                        keys,
                        at: Instant::now(),
                    })));
                }
                Err(reason) => {
                    if cached.is_some() {
                        tracing::warn!(jwks_host = %self.host(), error = %reason, "JWKS refresh failed; keeping the cached keys");
                    } else {
                        tracing::warn!(jwks_host = %self.host(), error = %reason, "JWKS fetch failed");
                    }
                    state.last_error = Some(reason);
                }
            }
        }
        match self.cached.load_full() {
            Some(c) => pick(&c.keys, kid)
                .ok_or_else(|| JwtError::UnknownKey(kid.map(str::to_owned)))
                .and_then(decoding_key),
            None => Err(JwtError::Jwks {
                path: self.shown.clone(),
                reason: state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not fetched yet".into()),
            }),
        }
    }

    /// One GET; the reason never holds the URL (its query may carry a token).
    async fn fetch(&self) -> Result<JwkSet, String> {
        let req = hyper::Request::get(self.url.clone())
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "loopgate")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let get = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| http_client::error_chain(&e))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(format!("the server answered {status}"));
            }
            let ctype = resp
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            let body = Limited::new(resp.into_body(), JWKS_MAX_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok((ctype, body))
        };
        let (ctype, body) = tokio::time::timeout(JWKS_FETCH_TIMEOUT, get)
            .await
            .map_err(|_| format!("no answer within {}s", JWKS_FETCH_TIMEOUT.as_secs()))??;
        parse_jwks(&body).map_err(|r| format!("{r} (content-type {ctype})"))
    }

    #[cfg(test)]
    pub(super) async fn age_by(&self, d: Duration) {
        let back = |t: Instant| t.checked_sub(d).unwrap_or(t);
        let mut st = self.refresh.lock().await;
        st.last_attempt = st.last_attempt.map(back);
        if let Some(c) = self.cached.load_full() {
            self.cached.store(Some(Arc::new(Fetched {
                keys: c.keys.clone(),
                at: back(c.at),
            })));
        }
    }
}

/// A fetched JWKS: keys this agent cannot use (other key types, encryption
/// keys with unknown parameters) are skipped rather than failing the set.
fn parse_jwks(body: &[u8]) -> Result<JwkSet, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let Some(keys) = v.get("keys").and_then(|k| k.as_array()) else {
        return Err("the answer is not a JWKS (no \"keys\" array)".into());
    };
    let keys: Vec<Jwk> = keys
        .iter()
        .filter_map(|k| match serde_json::from_value::<Jwk>(k.clone()) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::debug!(error = %e, "skipping a JWKS key this agent cannot use");
                None
            }
        })
        .collect();
    if keys.is_empty() {
        return Err("the JWKS has no usable key".into());
    }
    Ok(JwkSet { keys })
}
