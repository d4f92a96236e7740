//! The server name a TLS client asks for, read from its ClientHello: the first thing a
//! guest sends on a TLS connection. The gateway reads the guest's first flight into a
//! bounded buffer and asks this module after every segment until it knows. The input
//! is the guest's, so every length is checked against what is there, and the parse
//! is a pure function of the bytes (no state to corrupt between segments).

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A prefix of a plausible ClientHello: wait for more (the caller bounds how much
    /// and how long).
    Incomplete,
    /// Not a TLS handshake record at all (maybe plain HTTP, maybe anything).
    NotTls,
    /// A TLS handshake that is not a well-formed ClientHello.
    Malformed(&'static str),
    /// A complete ClientHello. `name` is the `host_name` of the server_name extension,
    /// lowercased, if there is one; `ech` is whether it offers Encrypted Client Hello
    /// (whose real destination name is hidden from the gateway).
    ClientHello { name: Option<String>, ech: bool },
}

/// A ClientHello larger than this is refused (real ones are well under 16 KiB, even
/// with post-quantum key shares).
pub const MAX_HELLO: usize = 64 << 10;

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ECH: u16 = 0xfe0d;

/// Parses the guest's first bytes on a connection.
pub fn parse(bytes: &[u8]) -> Hello {
    // Gather the handshake bytes from consecutive handshake records.
    let mut hs = Vec::new();
    let mut rest = bytes;
    let mut need: Option<usize> = None;
    loop {
        if let Some(n) = need
            && hs.len() >= n
        {
            break;
        }
        if rest.is_empty() {
            return Hello::Incomplete;
        }
        if rest[0] != HANDSHAKE {
            return if hs.is_empty() && need.is_none() {
                Hello::NotTls
            } else {
                Hello::Malformed("a non-handshake record inside the ClientHello")
            };
        }
        if rest.len() >= 2 && rest[1] != 3 {
            return if hs.is_empty() {
                Hello::NotTls
            } else {
                Hello::Malformed("bad record version")
            };
        }
        if rest.len() < 5 {
            return Hello::Incomplete;
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > 16384 + 256 {
            return Hello::Malformed("bad record length");
        }
        let Some(body) = rest.get(5..5 + len) else {
            // Take what there is, to learn the handshake length early.
            hs.extend_from_slice(&rest[5..]);
            if let Some(Err(m)) = handshake_len(&hs) {
                return Hello::Malformed(m);
            }
            return Hello::Incomplete;
        };
        hs.extend_from_slice(body);
        rest = &rest[5 + len..];
        match handshake_len(&hs) {
            Some(Ok(n)) => need = Some(n),
            Some(Err(m)) => return Hello::Malformed(m),
            None => {}
        }
    }
    let n = need.unwrap_or(0);
    client_hello(&hs[4..n])
}

/// The total length (header included) of the handshake message starting `hs`, once
/// its 4-byte header is there.
fn handshake_len(hs: &[u8]) -> Option<Result<usize, &'static str>> {
    let h = hs.first_chunk::<4>()?;
    if h[0] != CLIENT_HELLO {
        return Some(Err("the first handshake message is not a ClientHello"));
    }
    let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
    if len > MAX_HELLO {
        return Some(Err("ClientHello too large"));
    }
    Some(Ok(4 + len))
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

fn client_hello(body: &[u8]) -> Hello {
    let mut r = Reader(body);
    let Some(_version) = r.take(2) else {
        return Hello::Malformed("truncated ClientHello");
    };
    if r.take(32).is_none() || r.vec8().is_none_or(|s| s.len() > 32) {
        return Hello::Malformed("bad random or session id");
    }
    if r.vec16().is_none_or(|c| c.is_empty() || c.len() % 2 != 0) {
        return Hello::Malformed("bad cipher suites");
    }
    if r.vec8().is_none_or(|c| c.is_empty()) {
        return Hello::Malformed("bad compression methods");
    }
    if r.0.is_empty() {
        return Hello::ClientHello {
            name: None,
            ech: false,
        };
    }
    let Some(exts) = r.vec16() else {
        return Hello::Malformed("bad extensions length");
    };
    if !r.0.is_empty() {
        return Hello::Malformed("bytes after the extensions");
    }
    let mut exts = Reader(exts);
    let (mut name, mut ech, mut seen_sni) = (None, false, false);
    while !exts.0.is_empty() {
        let (Some(kind), Some(data)) = (exts.u16(), exts.vec16()) else {
            return Hello::Malformed("truncated extension");
        };
        match kind {
            EXT_SERVER_NAME => {
                if seen_sni {
                    return Hello::Malformed("two server_name extensions");
                }
                seen_sni = true;
                match server_name(data) {
                    Ok(n) => name = n,
                    Err(m) => return Hello::Malformed(m),
                }
            }
            EXT_ECH => ech = true,
            _ => {}
        }
    }
    Hello::ClientHello { name, ech }
}

/// The one `host_name` in a server_name extension (RFC 6066 allows one per type).
fn server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader(data);
    let list = r.vec16().ok_or("bad server_name list")?;
    if !r.0.is_empty() {
        return Err("bytes after the server_name list");
    }
    let mut list = Reader(list);
    let mut found = None;
    while !list.0.is_empty() {
        let kind = list.u8().ok_or("truncated server name")?;
        let name = list.vec16().ok_or("truncated server name")?;
        if kind != 0 {
            continue;
        }
        if found.is_some() {
            return Err("two host names");
        }
        if name.is_empty()
            || name.len() > 253
            || !name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.' || *b == b'_')
        {
            return Err("server name is not a DNS name");
        }
        found = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
    }
    Ok(found)
}

/// Builds a minimal ClientHello, for tests of this parser and of the gateway.
pub fn build_client_hello(name: Option<&str>, extra_ext: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(n) = name {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&(n.len() as u16).to_be_bytes());
        entry.extend_from_slice(n.as_bytes());
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
        exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
        exts.extend_from_slice(&list);
    }
    for (kind, data) in extra_ext {
        exts.extend_from_slice(&kind.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(data);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![CLIENT_HELLO];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    records(&hs, 16384)
}

/// Wraps handshake bytes in TLS records of at most `max` bytes each.
pub fn records(hs: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in hs.chunks(max) {
        out.extend_from_slice(&[HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello(name: &str) -> Hello {
        Hello::ClientHello {
            name: Some(name.into()),
            ech: false,
        }
    }

    #[test]
    fn reads_the_name_whole_or_in_pieces() {
        let ch = build_client_hello(Some("Example.COM"), &[(0x0017, vec![])]);
        assert_eq!(parse(&ch), hello("example.com"));
        for cut in 0..ch.len() {
            assert_eq!(parse(&ch[..cut]), Hello::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn reassembles_a_hello_split_over_records() {
        let ch = build_client_hello(Some("api.example.com"), &[(0x0033, vec![9; 1200])]);
        let hs = &ch[5..];
        for max in [1, 7, 100, 1000] {
            let split = records(hs, max);
            assert_eq!(parse(&split), hello("api.example.com"), "records of {max}");
            assert_eq!(parse(&split[..split.len() - 1]), Hello::Incomplete);
        }
    }

    #[test]
    fn no_name_ech_and_not_tls() {
        assert_eq!(
            parse(&build_client_hello(None, &[])),
            Hello::ClientHello {
                name: None,
                ech: false
            }
        );
        assert_eq!(
            parse(&build_client_hello(Some("a.com"), &[(EXT_ECH, vec![1, 2])])),
            Hello::ClientHello {
                name: Some("a.com".into()),
                ech: true
            }
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.2\r\n"), Hello::NotTls);
        assert_eq!(parse(&[22, 2]), Hello::NotTls);
    }

    #[test]
    fn refuses_what_a_hostile_client_might_send() {
        // Two server_name extensions (which one would the server use?).
        let two = build_client_hello(
            Some("allowed.com"),
            &[(EXT_SERVER_NAME, {
                let mut d = vec![0, 13, 0, 0, 10];
                d.extend_from_slice(b"evil.co.uk");
                d
            })],
        );
        assert!(matches!(parse(&two), Hello::Malformed(_)));
        // A name with characters no DNS name has.
        let bad = build_client_hello(Some("allowed.com\0evil"), &[]);
        assert!(matches!(parse(&bad), Hello::Malformed(_)));
        // A handshake message that is not a ClientHello.
        assert!(matches!(
            parse(&records(&[2, 0, 0, 1, 0], 100)),
            Hello::Malformed(_)
        ));
        // A declared length beyond the cap is refused at once, not waited for.
        assert!(matches!(
            parse(&records(&[1, 0xff, 0xff, 0xff], 100)),
            Hello::Malformed(_)
        ));
        // An alert record in the middle.
        let ch = build_client_hello(Some("a.com"), &[]);
        let mut mixed = records(&ch[5..15], 100);
        mixed.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        assert!(matches!(parse(&mixed), Hello::Malformed(_)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&bytes);
        }

        /// Mutations of a valid hello: never a panic, and a name, when found, is a
        /// DNS name.
        #[test]
        fn mutated_hellos_never_panic(pos in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut ch = build_client_hello(Some("www.example.org"), &[(0x002b, vec![2, 3, 4])]);
            let i = pos.index(ch.len());
            ch[i] = val;
            let ch = &ch[..cut.index(ch.len() + 1).max(1).min(ch.len())];
            if let Hello::ClientHello { name: Some(n), .. } = parse(ch) {
                prop_assert!(n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
                prop_assert!(!n.bytes().any(|b| b.is_ascii_uppercase()));
            }
        }

        #[test]
        fn any_name_round_trips(name in "[a-z0-9-]{1,20}(\\.[a-z0-9-]{1,20}){0,4}", max in 1usize..300) {
            let ch = build_client_hello(Some(&name), &[]);
            prop_assert_eq!(parse(&records(&ch[5..], max)), hello(&name));
        }
    }
}
