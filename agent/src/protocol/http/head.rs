//! Checks of a request's head: hop-by-hop headers, the loop's bearer
//! token, `Connection` naming end-to-end headers, and whether `Host` names
//! the target.

use hyper::{
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Request as HttpRequest,
};

use crate::config::TargetAddress;

/// Headers that describe one hop, not the request (RFC 9110 §7.6.1), plus
/// the loop's proxy credentials.
pub(super) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// End-to-end headers a `Connection` header may not name: the agent checks
/// or sets them (Host, credentials, framing, codings), and a hop-by-hop
/// strip after the check would undo it.
pub(super) const END_TO_END: &[&str] = &[
    "host",
    "authorization",
    "content-length",
    "transfer-encoding",
    "content-encoding",
    "content-type",
    "accept-encoding",
    "cookie",
    "expect",
];

/// Headers some frameworks read as the request's real method: a `POST` with
/// `X-HTTP-Method-Override: DELETE` would act as a DELETE the rules never
/// saw. They are stripped.
pub(super) const METHOD_OVERRIDES: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The loop's bearer token, if it sent one.
pub(super) fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The first end-to-end header a `Connection` header names, if any.
pub(super) fn connection_names_end_to_end(h: &HeaderMap) -> Option<String> {
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .find(|t| END_TO_END.contains(&t.as_str()))
}

pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

/// Whether the request's `Host` (and absolute-form authority) names the
/// target's address `addr` (pure; fuzzed).
pub(super) fn names_target<B>(req: &HttpRequest<B>, addr: &TargetAddress) -> Result<(), String> {
    let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
    let host = match hosts.as_slice() {
        [h] => h
            .to_str()
            .map_err(|_| "the Host header is not text".to_owned())?,
        [] => return Err("the request names no Host".to_owned()),
        _ => return Err("the request has more than one Host header".to_owned()),
    };
    // Both the Host header and an absolute-form authority must name it.
    for named in std::iter::once(host).chain(req.uri().authority().map(|a| a.as_str())) {
        if !host_matches(named, addr) {
            return Err(format!("Host {named} is not the target's address {addr}"));
        }
    }
    Ok(())
}

/// Whether a `Host` value (`name[:port]`, `[v6][:port]`) names `addr`.
pub(super) fn host_matches(named: &str, addr: &TargetAddress) -> bool {
    let (host, port) = match named.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            // `host:` or a port out of range names nothing.
            Err(_) => return false,
        },
        _ => (named, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let (want_host, want_port) = match addr {
        TargetAddress::Ip(a) => (a.ip().to_string(), a.port()),
        TargetAddress::Host { host, port } => (host.clone(), *port),
    };
    host.trim_end_matches('.').eq_ignore_ascii_case(&want_host)
        && port.is_none_or(|p| p == want_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_and_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  tok.en "),
        );
        assert_eq!(bearer(&h), Some("tok.en"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-trace"),
        );
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-trace").is_none() && h.get("upgrade").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn connection_may_not_name_end_to_end_headers() {
        let named = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
            h.append(header::CONNECTION, HeaderValue::from_static(v));
            connection_names_end_to_end(&h)
        };
        assert_eq!(named("close"), None);
        assert_eq!(named("te, x-trace"), None);
        assert_eq!(named("Host").as_deref(), Some("host"));
        assert_eq!(
            named("x-a ,  Authorization").as_deref(),
            Some("authorization")
        );
        assert_eq!(named("content-length").as_deref(), Some("content-length"));
        assert_eq!(
            named("transfer-encoding").as_deref(),
            Some("transfer-encoding")
        );
    }

    #[test]
    fn host_must_name_the_target() {
        let by_name = TargetAddress::Host {
            host: "orders.internal".into(),
            port: 8080,
        };
        assert!(host_matches("orders.internal:8080", &by_name));
        assert!(host_matches("ORDERS.internal", &by_name));
        assert!(!host_matches("orders.internal:9090", &by_name));
        assert!(!host_matches("attacker.example", &by_name));
        let by_ip = TargetAddress::Ip("127.10.4.1:80".parse().unwrap());
        assert!(host_matches("127.10.4.1", &by_ip));
        assert!(host_matches("127.10.4.1:80", &by_ip));
        assert!(!host_matches("orders.internal", &by_ip));
        let v6 = TargetAddress::Ip("[::1]:8080".parse().unwrap());
        assert!(host_matches("[::1]:8080", &v6));
        assert!(!host_matches("127.10.4.1:99999", &by_ip));
        assert!(!host_matches("127.10.4.1:", &by_ip));
    }
}
