//! The request-head checks of [`super`], reachable from `crate::fuzzing`
//! (they stay private to the handler otherwise).

use hyper::{header::HeaderMap, Request};

use crate::config::TargetAddress;

/// Headers that never reach the upstream.
pub(crate) const HOP_BY_HOP: &[&str] = super::head::HOP_BY_HOP;

pub(crate) fn normalize_path(raw: &str) -> Result<String, &'static str> {
    super::path::normalize_path(raw)
}

/// Whether the request's `Host` (and absolute-form authority) names `addr`:
/// the check made before the stored credential is added.
pub(crate) fn names_target<B>(req: &Request<B>, addr: &TargetAddress) -> Result<(), String> {
    super::head::names_target(req, addr)
}

pub(crate) fn host_matches(named: &str, addr: &TargetAddress) -> bool {
    super::head::host_matches(named, addr)
}

pub(crate) fn bearer(h: &HeaderMap) -> Option<&str> {
    super::head::bearer(h)
}

pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    super::head::strip_hop_by_hop(h)
}
