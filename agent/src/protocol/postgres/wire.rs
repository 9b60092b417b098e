//! The start-up messages of the PostgreSQL wire protocol that the agent
//! reads from the loop (start-up packet, parameters, password) and writes
//! to it (`Authentication*`, `ErrorResponse`).

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncReadExt;

use super::{client_io, StartupError};
use crate::kinds::Outcome;

pub(super) const SSL_REQUEST: i32 = 80_877_103;
pub(super) const GSSENC_REQUEST: i32 = 80_877_104;
pub(super) const CANCEL_REQUEST: i32 = 80_877_102;
pub(super) const PROTOCOL_3: i32 = 196_608;
/// Longest start-up or password message accepted from a loop.
pub(super) const MAX_STARTUP: usize = 64 * 1024;
/// Reads one untyped start-up packet (length-prefixed); returns its body.
pub(super) async fn read_startup(
    c: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Vec<u8>, StartupError> {
    let mut len = [0u8; 4];
    c.read_exact(&mut len).await.map_err(client_io)?;
    let len = i32::from_be_bytes(len);
    if !(8..=MAX_STARTUP as i32).contains(&len) {
        return Err(StartupError::Refused {
            sqlstate: "08P01",
            message: format!("loopgate: invalid start-up packet length {len}"),
            outcome: Outcome::ClientError,
        });
    }
    let mut body = vec![0u8; len as usize - 4];
    c.read_exact(&mut body).await.map_err(client_io)?;
    Ok(body)
}

/// Start-up parameters: NUL-terminated key/value pairs, then a NUL.
pub(super) fn parse_params(mut b: &[u8]) -> Result<BTreeMap<String, String>, StartupError> {
    let bad = || StartupError::Refused {
        sqlstate: "08P01",
        message: "loopgate: malformed start-up parameters".into(),
        outcome: Outcome::ClientError,
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
pub(super) async fn read_password(
    c: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<String, StartupError> {
    let mut head = [0u8; 5];
    c.read_exact(&mut head).await.map_err(client_io)?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if head[0] != b'p' || !(5..=MAX_STARTUP as i32).contains(&len) {
        return Err(StartupError::Refused {
            sqlstate: "08P01",
            message: "loopgate: expected a password message".into(),
            outcome: Outcome::ClientError,
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
        outcome: Outcome::Denied,
    })
}

/// An `Authentication*` request (`R`).
pub(super) fn auth_request(code: i32, extra: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(9 + extra.len());
    b.put_u8(b'R');
    b.put_i32(8 + extra.len() as i32);
    b.put_i32(code);
    b.put_slice(extra);
    b.to_vec()
}

/// A FATAL `ErrorResponse` (`E`).
pub(super) fn error_response(sqlstate: &str, message: &str) -> Vec<u8> {
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
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::message::backend::Message;

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
