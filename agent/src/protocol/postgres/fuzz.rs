//! The start-up parsing of [`super`], reachable from `crate::fuzzing` (it
//! stays private to the handler otherwise).

use std::collections::BTreeMap;

pub(crate) const SSL_REQUEST: i32 = super::wire::SSL_REQUEST;
pub(crate) const GSSENC_REQUEST: i32 = super::wire::GSSENC_REQUEST;
pub(crate) const PROTOCOL_3: i32 = super::wire::PROTOCOL_3;
pub(crate) const MAX_STARTUP: usize = super::wire::MAX_STARTUP;

/// A refusal or protocol error, as the loop would see it (its message; the
/// SQLSTATE when the agent sends one).
pub(crate) type Refusal = (Option<&'static str>, String);

fn refusal(e: super::StartupError) -> Refusal {
    match e {
        super::StartupError::Refused {
            sqlstate, message, ..
        } => (Some(sqlstate), message),
        other => (None, other.to_string()),
    }
}

/// One length-prefixed start-up packet; its body.
pub(crate) async fn read_startup(
    c: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Vec<u8>, Refusal> {
    super::wire::read_startup(c).await.map_err(refusal)
}

/// The loop's PasswordMessage; the password.
pub(crate) async fn read_password(
    c: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<String, Refusal> {
    super::wire::read_password(c).await.map_err(refusal)
}

/// The NUL-terminated key/value pairs of a protocol 3.0 start-up message.
pub(crate) fn parse_params(b: &[u8]) -> Result<BTreeMap<String, String>, Refusal> {
    super::wire::parse_params(b).map_err(refusal)
}

/// The server's bytes through the relay's server half (see
/// `relay::replay_server`).
pub(crate) fn replay_server(expects: &[u8], data: &[u8]) -> (Vec<u8>, usize, usize) {
    super::relay::replay_server(expects, data)
}
