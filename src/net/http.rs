//! The host a plain-HTTP client asks for, read from the head of its first request.
//! Like the ClientHello parser, a pure function of the bytes so far, called after
//! every segment until it knows; the input is the guest's.

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// A prefix of a plausible request head: wait for more.
    Incomplete,
    /// Does not start like an HTTP/1.x request.
    NotHttp,
    /// An HTTP request whose target cannot be told unambiguously.
    Malformed(&'static str),
    /// The request's host (lowercased, no port) and the port its Host header names,
    /// if any.
    Request { host: String, port: Option<u16> },
}

/// A request head larger than this is refused.
pub const MAX_HEAD: usize = 32 << 10;

/// Parses the guest's first bytes on a connection.
pub fn parse(bytes: &[u8]) -> Head {
    if bytes.is_empty() {
        return Head::Incomplete;
    }
    let Some(end) = find(bytes, b"\r\n\r\n") else {
        if bytes.len() > MAX_HEAD {
            return Head::Malformed("request head too large");
        }
        // Decide early when even the first line cannot be HTTP.
        let line = bytes.split(|b| *b == b'\r').next().unwrap_or(bytes);
        return match request_line(line, bytes.contains(&b'\r')) {
            Err(Some(m)) => Head::Malformed(m),
            Err(None) if !looks_like_method(line) => Head::NotHttp,
            _ => Head::Incomplete,
        };
    };
    if end > MAX_HEAD {
        return Head::Malformed("request head too large");
    }
    let head = &bytes[..end];
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let target = match request_line(first, true) {
        Ok(t) => t,
        Err(Some(m)) => return Head::Malformed(m),
        Err(None) => return Head::NotHttp,
    };
    let mut host = None;
    for line in lines {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Head::Malformed("folded header line");
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return Head::Malformed("header line without a colon");
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || name.iter().any(|b| !b.is_ascii_graphic()) {
            return Head::Malformed("bad header name");
        }
        if name.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                return Head::Malformed("two Host headers");
            }
            host = Some(trim(value));
        }
    }
    let Some(host) = host else {
        return Head::Malformed("no Host header");
    };
    let Some((name, port)) = authority(host) else {
        return Head::Malformed("Host is not a DNS name");
    };
    // An absolute-form target must name the same host (a proxy-style request would
    // otherwise say one thing to the gateway and another to the server).
    if let Some(rest) = target
        .strip_prefix(b"http://")
        .or_else(|| target.strip_prefix(b"HTTP://"))
    {
        let auth = rest
            .split(|b| *b == b'/' || *b == b'?')
            .next()
            .unwrap_or(rest);
        match authority(auth) {
            Some((n, p)) if n == name && p == port => {}
            _ => return Head::Malformed("request target names another host than Host"),
        }
    } else if !target.starts_with(b"/") && target != b"*" {
        return Head::Malformed("request target is neither a path nor an http URL");
    }
    Head::Request { host: name, port }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

fn looks_like_method(line: &[u8]) -> bool {
    let m = line.split(|b| *b == b' ').next().unwrap_or(line);
    !m.is_empty() && m.len() <= 16 && m.iter().all(|b| b.is_ascii_uppercase())
}

/// The request target of `METHOD TARGET HTTP/1.x`. `Err(None)`: not (yet) an HTTP
/// request line; `Err(Some)`: an HTTP request line that is wrong. `complete` says
/// whether the line has ended.
fn request_line(line: &[u8], complete: bool) -> Result<&[u8], Option<&'static str>> {
    let mut parts = line.split(|b| *b == b' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let method = method.unwrap_or_default();
    if !looks_like_method(method) || !complete {
        return Err(None);
    }
    let (Some(target), Some(version), None) = (target, version, parts.next()) else {
        return Err(Some("bad request line"));
    };
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(Some("not HTTP/1.0 or 1.1"));
    }
    if target.is_empty() {
        return Err(Some("empty request target"));
    }
    Ok(target)
}

/// `name[:port]` as a lowercased DNS name and an optional port; None for anything
/// else, IP literals included (no top-level domain is all digits; brackets never
/// parse here).
fn authority(a: &[u8]) -> Option<(String, Option<u16>)> {
    let s = std::str::from_utf8(a).ok()?;
    let (name, port) = match s.rsplit_once(':') {
        Some((n, p)) => (n, Some(p.parse::<u16>().ok().filter(|p| *p != 0)?)),
        None => (s, None),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !name.split('.').any(str::is_empty)
        && !name
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
    ok.then(|| (name.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(host: &str, port: Option<u16>) -> Head {
        Head::Request {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn reads_the_host_whole_or_in_pieces() {
        let r = b"GET /index.html HTTP/1.1\r\nUser-Agent: curl\r\nHOST:  Example.COM.:8080 \r\nAccept: */*\r\n\r\nbody";
        assert_eq!(parse(r), req("example.com", Some(8080)));
        for cut in 0..r.len() - 4 {
            assert_eq!(parse(&r[..cut]), Head::Incomplete, "cut at {cut}");
        }
        assert_eq!(
            parse(b"POST http://deb.debian.org/x HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n"),
            req("deb.debian.org", None)
        );
    }

    #[test]
    fn not_http_is_told_early() {
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.2\r\n"), Head::NotHttp);
        assert_eq!(parse(&[22, 3, 1, 0, 5]), Head::NotHttp);
        assert_eq!(parse(b"get / HTTP/1.1\r\n"), Head::NotHttp);
    }

    #[test]
    fn ambiguous_requests_are_refused() {
        for r in [
            &b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: evil.com\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nAccept: x\r\n\r\n",
            b"GET http://evil.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n".as_slice(),
            b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.com\0.evil.com\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: y\r\n Host: a.com\r\n\r\n",
            b"GET / HTTP/2\r\nHost: a.com\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: a.com\r\n\r\n",
            b"CONNECT evil.com:443 HTTP/1.1\r\nHost: a.com\r\n\r\n",
        ] {
            assert!(
                matches!(parse(r), Head::Malformed(_)),
                "{}",
                String::from_utf8_lossy(r)
            );
        }
        // IP literals never come out as names.
        assert_eq!(authority(b"10.0.0.1"), None);
        assert_eq!(authority(b"1.2.3.4:443"), None);
        let huge = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_HEAD]].concat();
        assert!(matches!(parse(&huge), Head::Malformed(_)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn hosts_round_trip(host in "[a-z0-9-]{1,20}(\\.[a-z0-9-]{1,20}){0,3}\\.[a-z]{2,6}", port in prop::option::of(1u16..)) {
            let h = match port { Some(p) => format!("{host}:{p}"), None => host.clone() };
            let r = format!("GET /x HTTP/1.1\r\nHost: {h}\r\n\r\n");
            prop_assert_eq!(parse(r.as_bytes()), req(&host, port));
        }
    }
}
