//! The messages of the v3 protocol after the login: frames read from either
//! side (bounded), the loop's messages decoded as far as the rules need
//! them, and the few messages the agent writes itself.
//!
//! Building messages uses `postgres-protocol` where it has them; it has no
//! reader for frontend messages (a server's side), so those are decoded here,
//! refusing anything malformed rather than guessing.

use bytes::{Buf, BufMut, BytesMut};

/// A loop's message longer than this ends its session (COPY data rows and
/// bound parameters included): the default of a target's
/// `max_message_bytes`.
pub const MAX_LOOP_MESSAGE: usize = 64 << 20;
/// A server's message longer than this ends the session: a hostile server
/// must not make the agent buffer without bound (the server's own limit on
/// a field is 1 GiB). The default of `max_result_message_bytes`.
pub const MAX_SERVER_MESSAGE: usize = 256 << 20;

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a message of type {kind:?} declares length {len}")]
    Length { kind: char, len: i64 },
    #[error("a message of type {kind:?} of {len} bytes is over the limit of {max} bytes")]
    TooLong { kind: char, len: usize, max: usize },
}

/// Splits the next complete message (type byte, length, body) off `buf`;
/// `None` until it is complete. `max` bounds the whole message.
pub fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let bad = || FrameError::Length {
        kind: char::from(buf[0]),
        len: i64::from(len),
    };
    let len = usize::try_from(len).map_err(|_| bad())?;
    if len < 4 {
        return Err(bad());
    }
    if len >= max {
        return Err(FrameError::TooLong {
            kind: char::from(buf[0]),
            len: len + 1,
            max,
        });
    }
    if buf.len() < len + 1 {
        // Room for what is coming, not for what a header claims.
        buf.reserve((len + 1 - buf.len()).min(64 * 1024));
        return Ok(None);
    }
    Ok(Some(buf.split_to(len + 1)))
}

/// A loop's message, decoded (borrowing the frame).
#[derive(Debug, PartialEq, Eq)]
pub enum Front<'a> {
    Query(&'a str),
    Parse {
        name: &'a str,
        query: &'a str,
        /// Parameter types the loop named (0: the server infers it).
        types: Vec<u32>,
    },
    Bind {
        portal: &'a str,
        statement: &'a str,
        /// Parameters as sent ([`read_param`] reads them).
        params: Vec<Param<'a>>,
        /// Result-column formats (none: all text; one: all the same).
        result_formats: Vec<i16>,
    },
    /// `S` (a statement) or `P` (a portal), and its name.
    Describe {
        what: u8,
        name: &'a str,
    },
    Execute {
        portal: &'a str,
    },
    /// `S` (a statement) or `P` (a portal), and its name.
    Close {
        what: u8,
        name: &'a str,
    },
    Sync,
    Flush,
    Terminate,
    FunctionCall {
        oid: u32,
    },
    /// CopyData, CopyDone, CopyFail: relayed as they are.
    Copy,
}

/// A bound parameter: its format and its bytes (`None`: SQL NULL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param<'a> {
    pub binary: bool,
    pub value: Option<&'a [u8]>,
}

/// A parameter as the rules, the record and an approver read it (`None`:
/// SQL NULL): text-format values as sent, binary ones decoded for the
/// common types (`oid`: its type, from the `Parse` or the server's
/// `ParameterDescription`; 0 unknown), others shown as their length; and
/// whether that text is the value (not a stand-in showing its length).
pub fn read_param(p: &Param<'_>, oid: u32) -> (Option<String>, bool) {
    use postgres_protocol::types as t;
    let Some(v) = p.value else {
        return (None, true);
    };
    if !p.binary {
        return match std::str::from_utf8(v) {
            Ok(s) => (Some(s.to_owned()), true),
            Err(_) => (Some(format!("<{} bytes, not UTF-8>", v.len())), false),
        };
    }
    let text = |v: &[u8]| std::str::from_utf8(v).ok().map(str::to_owned);
    let shown = match oid {
        // bool, int8, int2, int4, oid, float4, float8
        16 => t::bool_from_sql(v).ok().map(|b| b.to_string()),
        20 => t::int8_from_sql(v).ok().map(|n| n.to_string()),
        21 => t::int2_from_sql(v).ok().map(|n| n.to_string()),
        23 => t::int4_from_sql(v).ok().map(|n| n.to_string()),
        26 => t::oid_from_sql(v).ok().map(|n| n.to_string()),
        700 => t::float4_from_sql(v).ok().map(|n| n.to_string()),
        701 => t::float8_from_sql(v).ok().map(|n| n.to_string()),
        // text, varchar, bpchar, name, json, xml, unknown: the bytes are
        // the text; jsonb: a version byte, then the text.
        25 | 1043 | 1042 | 19 | 114 | 142 | 705 => text(v),
        3802 => match v.split_first() {
            Some((1, rest)) => text(rest),
            _ => None,
        },
        2950 => t::uuid_from_sql(v).ok().map(|u| {
            let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }),
        _ => None,
    };
    match shown {
        Some(s) => (Some(s), true),
        None => (Some(format!("<{} bytes, binary>", v.len())), false),
    }
}

/// Why a loop's message was refused (SQLSTATE 08P01 or 22021).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrontError {
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("the {0} message is not valid UTF-8 (set client_encoding to UTF8)")]
    Encoding(&'static str),
    #[error("unexpected message type {0:?} after the start-up")]
    Unknown(char),
}

impl FrontError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            FrontError::Encoding(_) => "22021",
            _ => "08P01",
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn bad(&self) -> FrontError {
        FrontError::Malformed(self.what)
    }
    fn cstr(&mut self) -> Result<&'a str, FrontError> {
        let end = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| self.bad())?;
        let s = std::str::from_utf8(&self.b[..end]).map_err(|_| FrontError::Encoding(self.what))?;
        self.b = &self.b[end + 1..];
        Ok(s)
    }
    fn i16(&mut self) -> Result<i16, FrontError> {
        if self.b.len() < 2 {
            return Err(self.bad());
        }
        Ok(self.b.get_i16())
    }
    fn i32(&mut self) -> Result<i32, FrontError> {
        if self.b.len() < 4 {
            return Err(self.bad());
        }
        Ok(self.b.get_i32())
    }
    fn u8(&mut self) -> Result<u8, FrontError> {
        if self.b.is_empty() {
            return Err(self.bad());
        }
        Ok(self.b.get_u8())
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrontError> {
        if self.b.len() < n {
            return Err(self.bad());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn count(&mut self) -> Result<usize, FrontError> {
        usize::try_from(self.i16()?).map_err(|_| self.bad())
    }
    fn end(self) -> Result<(), FrontError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.bad())
        }
    }
}

/// Decodes a loop's message (`frame` includes the type and length).
pub fn decode(frame: &[u8]) -> Result<Front<'_>, FrontError> {
    let (t, body) = (frame[0], &frame[5..]);
    let name = match t {
        b'Q' => "Query",
        b'P' => "Parse",
        b'B' => "Bind",
        b'D' => "Describe",
        b'E' => "Execute",
        b'C' => "Close",
        b'S' => "Sync",
        b'H' => "Flush",
        b'X' => "Terminate",
        b'F' => "FunctionCall",
        b'd' | b'c' | b'f' => return Ok(Front::Copy),
        other => return Err(FrontError::Unknown(char::from(other))),
    };
    let mut r = Reader {
        b: body,
        what: name,
    };
    let out = match t {
        b'Q' => Front::Query(r.cstr()?),
        b'P' => {
            let name = r.cstr()?;
            let query = r.cstr()?;
            let n = r.count()?;
            let mut types = Vec::with_capacity(n);
            for _ in 0..n {
                types.push(r.i32()? as u32);
            }
            Front::Parse { name, query, types }
        }
        b'B' => {
            let portal = r.cstr()?;
            let statement = r.cstr()?;
            let nformats = r.count()?;
            let mut formats = Vec::with_capacity(nformats);
            for _ in 0..nformats {
                formats.push(r.i16()?);
            }
            let n = r.count()?;
            if nformats > 1 && nformats != n {
                return Err(r.bad());
            }
            let mut params = Vec::with_capacity(n);
            for i in 0..n {
                let len = r.i32()?;
                if len == -1 {
                    params.push(Param {
                        binary: false,
                        value: None,
                    });
                    continue;
                }
                let len = usize::try_from(len).map_err(|_| r.bad())?;
                let v = r.bytes(len)?;
                let format = match nformats {
                    0 => 0,
                    1 => formats[0],
                    _ => formats[i],
                };
                params.push(Param {
                    binary: format != 0,
                    value: Some(v),
                });
            }
            let nres = r.count()?;
            let mut result_formats = Vec::with_capacity(nres);
            for _ in 0..nres {
                result_formats.push(r.i16()?);
            }
            Front::Bind {
                portal,
                statement,
                params,
                result_formats,
            }
        }
        b'D' | b'C' => {
            let what = r.u8()?;
            if what != b'S' && what != b'P' {
                return Err(r.bad());
            }
            let name = r.cstr()?;
            if t == b'D' {
                Front::Describe { what, name }
            } else {
                Front::Close { what, name }
            }
        }
        b'E' => {
            let portal = r.cstr()?;
            r.i32()?;
            Front::Execute { portal }
        }
        b'S' => Front::Sync,
        b'H' => Front::Flush,
        b'X' => Front::Terminate,
        b'F' => {
            let oid = r.i32()? as u32;
            // Argument formats and values, and the result format: relayed.
            return Ok(Front::FunctionCall { oid });
        }
        _ => unreachable!("every type above returns or is decoded"),
    };
    r.end()?;
    Ok(out)
}

/// A `Parse` of the unnamed statement that the server refuses with a
/// syntax error (nothing runs): sent in place of a refused message when the
/// server must fail its batch.
pub const FAILING_PARSE: [u8; 40] = *b"P\0\0\0\x27\0loopgate refused this statement\0\0\0";

/// An `ErrorResponse` of severity `ERROR` (the statement failed; the
/// session goes on).
pub fn error(sqlstate: &str, message: &str) -> Vec<u8> {
    notice_like(b'E', "ERROR", sqlstate, message)
}

fn notice_like(t: u8, severity: &str, sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = BytesMut::new();
    for (f, v) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.put_u8(f);
        body.put_slice(v.replace('\0', " ").as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut b = Vec::with_capacity(body.len() + 5);
    b.put_u8(t);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(&body);
    b
}

/// `ReadyForQuery` with a transaction status (`I`, `T` or `E`).
pub fn ready(status: u8) -> [u8; 6] {
    [b'Z', 0, 0, 0, 5, status]
}

/// A field of an `ErrorResponse`/`NoticeResponse` frame (`C`: SQLSTATE).
pub fn error_field(frame: &[u8], field: u8) -> Option<&str> {
    let mut b = frame.get(5..)?;
    while let Some((&f, rest)) = b.split_first() {
        if f == 0 {
            return None;
        }
        let end = rest.iter().position(|&c| c == 0)?;
        if f == field {
            return std::str::from_utf8(&rest[..end]).ok();
        }
        b = &rest[end + 1..];
    }
    None
}

/// The command tag of a `CommandComplete` frame (`INSERT 0 5`).
pub fn command_tag(frame: &[u8]) -> &str {
    let body = frame.get(5..).unwrap_or_default();
    let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
    std::str::from_utf8(&body[..end]).unwrap_or("")
}

/// The rows a command tag reports (`UPDATE 3`, `SELECT 10`, `INSERT 0 5`).
pub fn tag_rows(tag: &str) -> Option<u64> {
    tag.rsplit(' ').next()?.parse().ok()
}

/// The columns of a `DataRow` frame, as text (`None`: NULL or not text).
pub fn columns(frame: &[u8]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let Some(mut b) = frame.get(5..) else {
        return out;
    };
    if b.len() < 2 {
        return out;
    }
    let n = b.get_i16();
    for _ in 0..n.max(0) {
        if b.len() < 4 {
            break;
        }
        let len = b.get_i32();
        let Ok(len) = usize::try_from(len) else {
            out.push(None);
            continue;
        };
        let Some(v) = b.get(..len) else {
            break;
        };
        out.push(std::str::from_utf8(v).ok().map(str::to_owned));
        b = &b[len..];
    }
    out
}

/// A result column, as `RowDescription` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub type_oid: u32,
    pub format: i16,
}

/// The parameter types of a `ParameterDescription` frame (`None`:
/// malformed).
pub fn parameter_description(frame: &[u8]) -> Option<Vec<u32>> {
    let mut b = frame.get(5..)?;
    if b.len() < 2 {
        return None;
    }
    let n = usize::try_from(b.get_i16()).ok()?;
    if b.len() != n * 4 {
        return None;
    }
    Some((0..n).map(|_| b.get_u32()).collect())
}

/// The fields of a `RowDescription` frame (`None`: malformed).
pub fn row_description(frame: &[u8]) -> Option<Vec<Field>> {
    let mut b = frame.get(5..)?;
    if b.len() < 2 {
        return None;
    }
    let n = b.get_i16();
    let mut out = Vec::with_capacity(usize::try_from(n).ok()?);
    for _ in 0..n {
        let end = b.iter().position(|&c| c == 0)?;
        let name = String::from_utf8_lossy(&b[..end]).into_owned();
        b = &b[end + 1..];
        if b.len() < 18 {
            return None;
        }
        b.advance(6); // table OID, column number
        let type_oid = b.get_u32();
        b.advance(6); // type size, type modifier
        let format = b.get_i16();
        out.push(Field {
            name,
            type_oid,
            format,
        });
    }
    Some(out)
}

/// The values of a `DataRow` frame (`None` values: NULL); `None` when
/// malformed.
pub fn data_row(frame: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut b = frame.get(5..)?;
    if b.len() < 2 {
        return None;
    }
    let n = b.get_i16();
    let mut out = Vec::with_capacity(usize::try_from(n).ok()?);
    for _ in 0..n {
        if b.len() < 4 {
            return None;
        }
        let len = b.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = usize::try_from(len).ok()?;
        let v = b.get(..len)?;
        out.push(Some(v));
        b = &b[len..];
    }
    Some(out)
}

/// A `DataRow` frame of `values`.
pub fn build_data_row(values: &[Option<Vec<u8>>]) -> Vec<u8> {
    let body: usize = 2 + values
        .iter()
        .map(|v| 4 + v.as_ref().map_or(0, Vec::len))
        .sum::<usize>();
    let mut b = Vec::with_capacity(body + 5);
    b.put_u8(b'D');
    b.put_i32(body as i32 + 4);
    b.put_i16(values.len() as i16);
    for v in values {
        match v {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v);
            }
            None => b.put_i32(-1),
        }
    }
    b
}

/// A simple `Query` message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    // A text without NUL: the agent's own lookups only.
    let _ = postgres_protocol::message::frontend::query(sql, &mut b);
    b.to_vec()
}

/// A `Flush` message.
pub const FLUSH: [u8; 5] = [b'H', 0, 0, 0, 4];

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    fn one(build: impl FnOnce(&mut BytesMut)) -> BytesMut {
        let mut b = BytesMut::new();
        build(&mut b);
        b
    }

    #[test]
    fn frames_are_bounded_and_split_where_they_end() {
        let mut b = one(|b| frontend::query("select 1", b).unwrap());
        b.extend_from_slice(&one(frontend::sync)[..3]);
        let f = next_frame(&mut b, MAX_LOOP_MESSAGE).unwrap().unwrap();
        assert_eq!(decode(&f), Ok(Front::Query("select 1")));
        // Half a Sync: wait for the rest.
        assert_eq!(next_frame(&mut b, MAX_LOOP_MESSAGE), Ok(None));
        for len in [-1i32, 0, 3, 1 << 30] {
            let mut b = BytesMut::from(&[b'Q'][..]);
            b.put_i32(len);
            assert!(next_frame(&mut b, MAX_LOOP_MESSAGE).is_err(), "{len}");
        }
    }

    #[test]
    fn the_failing_parse_is_one_well_formed_parse() {
        let mut b = BytesMut::from(&FAILING_PARSE[..]);
        let f = next_frame(&mut b, MAX_LOOP_MESSAGE).unwrap().unwrap();
        assert!(b.is_empty());
        assert_eq!(
            decode(&f),
            Ok(Front::Parse {
                name: "",
                query: "loopgate refused this statement",
                types: vec![],
            })
        );
    }

    #[test]
    fn binary_parameters_read_as_their_values_for_common_types() {
        let param_text = |p: &Param<'_>, oid: u32| read_param(p, oid).0;
        let bin = |v: &'static [u8]| Param {
            binary: true,
            value: Some(v),
        };
        assert_eq!(param_text(&bin(&[0, 0, 0, 42]), 23).as_deref(), Some("42"));
        assert_eq!(param_text(&bin(&[255, 254]), 21).as_deref(), Some("-2"));
        assert_eq!(
            param_text(&bin(&[0, 0, 0, 0, 0, 0, 1, 0]), 20).as_deref(),
            Some("256")
        );
        assert_eq!(param_text(&bin(&[1]), 16).as_deref(), Some("true"));
        assert_eq!(
            param_text(&bin(b"ann@example.com"), 25).as_deref(),
            Some("ann@example.com")
        );
        assert_eq!(
            param_text(&bin(b"\x01{\"a\": 1}"), 3802).as_deref(),
            Some("{\"a\": 1}")
        );
        assert_eq!(
            param_text(&bin(&[0x12; 16]), 2950).as_deref(),
            Some("12121212-1212-1212-1212-121212121212")
        );
        // Unknown types and malformed values: their length, never a guess.
        assert_eq!(
            param_text(&bin(&[0, 0, 0, 42]), 0).as_deref(),
            Some("<4 bytes, binary>")
        );
        assert_eq!(
            param_text(&bin(&[0, 42]), 23).as_deref(),
            Some("<2 bytes, binary>")
        );
        assert_eq!(
            param_text(&bin(&[2, b'x']), 3802).as_deref(),
            Some("<2 bytes, binary>")
        );
        let text = |v: &'static [u8]| Param {
            binary: false,
            value: Some(v),
        };
        assert_eq!(param_text(&text(b"42"), 0).as_deref(), Some("42"));
        assert_eq!(
            param_text(&text(&[0xff]), 25).as_deref(),
            Some("<1 bytes, not UTF-8>")
        );
        let null = Param {
            binary: true,
            value: None,
        };
        assert_eq!(param_text(&null, 23), None);
        // Which of these are the values themselves.
        assert!(read_param(&bin(&[0, 0, 0, 42]), 23).1 && read_param(&null, 23).1);
        assert!(!read_param(&bin(&[0, 0, 0, 42]), 0).1);
        assert!(!read_param(&bin(&[0, 42]), 23).1);
        assert!(!read_param(&text(&[0xff]), 25).1);
    }

    #[test]
    fn extended_protocol_messages_decode_and_malformed_ones_are_refused() {
        let p = one(|b| frontend::parse("s1", "select $1", [23], b).unwrap());
        assert_eq!(
            decode(&p),
            Ok(Front::Parse {
                name: "s1",
                query: "select $1",
                types: vec![23],
            })
        );
        let b = one(|b| {
            frontend::bind(
                "p",
                "s1",
                [0, 1],
                [Some("42"), None::<&str>],
                |v, buf| match v {
                    Some(v) => {
                        buf.put_slice(v.as_bytes());
                        Ok(postgres_protocol::IsNull::No)
                    }
                    None => Ok(postgres_protocol::IsNull::Yes),
                },
                [1],
                b,
            )
            .map_err(|_| "bind")
            .unwrap()
        });
        assert_eq!(
            decode(&b),
            Ok(Front::Bind {
                portal: "p",
                statement: "s1",
                params: vec![
                    Param {
                        binary: false,
                        value: Some(b"42")
                    },
                    Param {
                        binary: false,
                        value: None
                    }
                ],
                result_formats: vec![1],
            })
        );
        let e = one(|b| frontend::execute("p", 10, b).unwrap());
        assert_eq!(decode(&e), Ok(Front::Execute { portal: "p" }));
        let c = one(|b| frontend::close(b'S', "s1", b).unwrap());
        assert_eq!(
            decode(&c),
            Ok(Front::Close {
                what: b'S',
                name: "s1"
            })
        );
        // Truncated bodies, trailing bytes, unknown types, bad UTF-8.
        let mut cut = p.to_vec();
        cut.truncate(cut.len() - 2);
        let len = (cut.len() - 1) as i32;
        cut[1..5].copy_from_slice(&len.to_be_bytes());
        assert!(decode(&cut).is_err());
        let mut long = e.to_vec();
        long.push(0);
        assert!(decode(&long).is_err());
        assert_eq!(decode(&[b'p', 0, 0, 0, 4]), Err(FrontError::Unknown('p')));
        assert_eq!(
            decode(&[b'Q', 0, 0, 0, 6, 0xff, 0]),
            Err(FrontError::Encoding("Query"))
        );
    }

    #[test]
    fn server_messages_read_back() {
        let e = error("42501", "no");
        assert_eq!(error_field(&e, b'C'), Some("42501"));
        assert_eq!(error_field(&e, b'M'), Some("no"));
        assert_eq!(tag_rows("INSERT 0 5"), Some(5));
        assert_eq!(tag_rows("BEGIN"), None);
    }
}
