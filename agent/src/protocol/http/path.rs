//! One spelling of a request path, for the rules and the upstream alike.

/// One spelling of a request path: unreserved `%XX` decoded, `.`/`..`
/// resolved, repeated `/` collapsed. Encodings whose meaning upstreams
/// disagree on (`%2F`, `%5C`, `%2E`, `%00`, a backslash) are refused.
pub(super) fn normalize_path(raw: &str) -> Result<String, &'static str> {
    if raw == "*" {
        return Ok(raw.to_owned());
    }
    if !raw.starts_with('/') {
        return Err("the path does not start with /");
    }
    if raw.contains('\\') {
        return Err("a backslash in the path");
    }
    if raw.contains(';') {
        // Path parameters: `/public/..;/admin` is `/admin` to some servers.
        return Err("a ; in the path");
    }
    let b = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or("a truncated %-escape")?;
            // Two hex digits (from_str_radix alone takes a sign: `%+d`).
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err("a bad %-escape");
            }
            let v = u8::from_str_radix(hex, 16).map_err(|_| "a bad %-escape")?;
            match v {
                b'/' | b'\\' | b'.' | b';' | 0 => {
                    return Err("an encoded /, \\, ., ; or NUL in the path")
                }
                // Characters a path may hold literally (RFC 3986 pchar).
                c if c.is_ascii_alphanumeric() || b"-_~!$&'()*+,=:@".contains(&c) => {
                    decoded.push(c as char)
                }
                c => decoded.push_str(&format!("%{c:02X}")),
            }
            i += 3;
        } else {
            // A whole character: past ASCII, the path is UTF-8 (not one
            // Latin-1 character per byte).
            let c = raw
                .get(i..)
                .and_then(|r| r.chars().next())
                .ok_or("a broken path")?;
            decoded.push(c);
            i += c.len_utf8();
        }
    }
    let trailing = decoded.ends_with('/') && decoded.len() > 1;
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut p = format!("/{}", out.join("/"));
    if trailing && p.len() > 1 {
        p.push('/');
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_have_one_spelling() {
        for (raw, want) in [
            ("/admin/x", "/admin/x"),
            ("//admin//x", "/admin/x"),
            ("/./admin/./x", "/admin/x"),
            ("/items/../admin/x", "/admin/x"),
            ("/../../admin", "/admin"),
            ("/%61dmin/%7Euser", "/admin/~user"),
            ("/a%20b/", "/a%20b/"),
            ("/q%3fx", "/q%3Fx"),
            ("/a%21b", "/a!b"),
            ("/", "/"),
            // UTF-8 stays as sent (found by the http_path fuzz target: it
            // came out as one Latin-1 character per byte, and changed again
            // on every pass).
            ("/caf\u{e9}/./x", "/caf\u{e9}/x"),
            ("/..\u{59e}dmin", "/..\u{59e}dmin"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
        for bad in [
            "/admin%2Fx",
            "/%2e%2e/admin",
            "/a\\b",
            "/a%00",
            "/a%zz",
            "/a%4",
            "admin",
            // A sign is not a hex digit (found by the http_path fuzz target:
            // `%+d` went upstream as `%0D`).
            "/admin%+d",
            "/a%-1",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }
}
