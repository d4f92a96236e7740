//! The allowlist / blocklist rule language: parsing, normalisation and matching.
//!
//! Rules are validated when the config is loaded so that a typo never silently widens
//! the policy: `*`, public-suffix wildcards, URLs, paths and IP literals are refused
//! with a line saying what to write instead.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

/// Ports a rule without `:port` covers: the web.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Allowlist,
    Blocklist,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "allowlist" => Some(Mode::Allowlist),
            "blocklist" => Some(Mode::Blocklist),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Allowlist => "allowlist",
            Mode::Blocklist => "blocklist",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `example.com`: that name only.
    Exact(String),
    /// `*.example.com`: names below it, not the apex.
    Subdomains(String),
    /// `**.example.com`: the apex and every name below it.
    ApexAndSubdomains(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: Pattern,
    /// `None` means the web ports ([`DEFAULT_PORTS`]).
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("empty entry; write a domain such as \"example.com\"")]
    Empty,
    #[error("{0:?} looks like a URL; write only the domain, e.g. \"example.com\"")]
    Url(String),
    #[error("{0:?} contains a path; write only the domain, e.g. \"example.com\"")]
    Path(String),
    #[error("{0:?} would match every name; list the domains to allow, or use mode = \"blocklist\"")]
    MatchAll(String),
    #[error(
        "{0:?}: a wildcard may only be the first label, as \"*.example.com\" or \"**.example.com\""
    )]
    MisplacedWildcard(String),
    #[error(
        "{0:?} is an IP address; name the domain instead (the gateway pins the addresses DNS returns)"
    )]
    IpLiteral(String),
    #[error("{entry:?}: port {port:?} is not a number from 1 to 65535")]
    BadPort { entry: String, port: String },
    #[error(
        "{0:?} is not a valid domain name (letters, digits, '-' and dots, at least two labels)"
    )]
    BadName(String),
    #[error("{0:?} covers a whole public suffix (every site under it); name the domains you mean")]
    PublicSuffix(String),
}

impl Rule {
    pub fn parse(input: &str) -> Result<Rule, RuleError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(RuleError::Empty);
        }
        if s.contains("://") {
            return Err(RuleError::Url(s.to_string()));
        }
        if s.contains('/') {
            return Err(RuleError::Path(s.to_string()));
        }
        if s.parse::<IpAddr>().is_ok() || (s.starts_with('[') && s.contains(']')) {
            return Err(RuleError::IpLiteral(s.to_string()));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|&n| n > 0 && p.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| RuleError::BadPort {
                        entry: s.to_string(),
                        port: p.to_string(),
                    })?;
                (h, Some(port))
            }
            None => (s, None),
        };
        if host.contains(':') {
            return Err(RuleError::BadName(s.to_string()));
        }
        if host.parse::<IpAddr>().is_ok() {
            return Err(RuleError::IpLiteral(s.to_string()));
        }
        let (kind, base): (fn(String) -> Pattern, &str) =
            if let Some(rest) = host.strip_prefix("**.") {
                (Pattern::ApexAndSubdomains, rest)
            } else if let Some(rest) = host.strip_prefix("*.") {
                (Pattern::Subdomains, rest)
            } else {
                (Pattern::Exact, host)
            };
        if base.contains('*') {
            return Err(if host.trim_matches(['*', '.']).is_empty() {
                RuleError::MatchAll(s.to_string())
            } else {
                RuleError::MisplacedWildcard(s.to_string())
            });
        }
        let wildcard = base.len() != host.len();
        if wildcard && !base.trim_end_matches('.').contains('.') {
            return Err(RuleError::PublicSuffix(s.to_string()));
        }
        let name = normalize_name(base).ok_or_else(|| RuleError::BadName(s.to_string()))?;
        if wildcard && is_public_suffix(&name) {
            return Err(RuleError::PublicSuffix(s.to_string()));
        }
        Ok(Rule {
            pattern: kind(name),
            port,
        })
    }

    /// Whether this rule covers `name` (already normalised) on `port`.
    pub fn matches(&self, name: &str, port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => DEFAULT_PORTS.contains(&port),
        };
        port_ok && self.matches_name(name)
    }

    /// Whether this rule covers `name` on any port (DNS answers are per name).
    pub fn matches_name(&self, name: &str) -> bool {
        let below = |d: &str| {
            name.len() > d.len() + 1
                && name.ends_with(d)
                && name.as_bytes()[name.len() - d.len() - 1] == b'.'
        };
        match &self.pattern {
            Pattern::Exact(d) => name == d,
            Pattern::Subdomains(d) => below(d),
            Pattern::ApexAndSubdomains(d) => name == d || below(d),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pattern {
            Pattern::Exact(d) => write!(f, "{d}")?,
            Pattern::Subdomains(d) => write!(f, "*.{d}")?,
            Pattern::ApexAndSubdomains(d) => write!(f, "**.{d}")?,
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Lowercases, drops one trailing dot, converts to punycode (IDNA) and checks the
/// label syntax. `None` when it is not a usable host name.
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    let ascii = idna::domain_to_ascii(name).ok()?;
    if ascii.len() > 253 {
        return None;
    }
    let labels: Vec<&str> = ascii.split('.').collect();
    if labels.len() < 2 {
        return None;
    }
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !labels.iter().all(label_ok) {
        return None;
    }
    // An all-numeric last label means an IP-ish string such as 10.0.0.256.
    if labels.last()?.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(ascii)
}

/// Whether the host's resolver would read `name` as an address rather than look it
/// up: the dotted form, and the forms `inet_aton` also reads (`3325256724`,
/// `0xc6336414`, `198.51.25620`). Such a "name" resolves to itself, so allowing or
/// pinning it would let the guest choose its destination; no top-level domain is
/// numeric, so the last label alone decides.
pub fn is_ip_literal(name: &str) -> bool {
    let n = name.strip_suffix('.').unwrap_or(name);
    if n.parse::<IpAddr>().is_ok() || n.starts_with('[') {
        return true;
    }
    let last = n.rsplit('.').next().unwrap_or("").as_bytes();
    let hex = last.len() >= 2
        && last[..2].eq_ignore_ascii_case(b"0x")
        && last[2..].iter().all(u8::is_ascii_hexdigit);
    !last.is_empty() && (hex || last.iter().all(u8::is_ascii_digit))
}

/// Only the ICANN section counts: the private section lists hosting domains such as
/// `githubusercontent.com`, whose subdomains agents legitimately need.
fn is_public_suffix(name: &str) -> bool {
    psl::suffix(name.as_bytes())
        .is_some_and(|s| s.as_bytes() == name.as_bytes() && s.typ() == Some(psl::Type::Icann))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> String {
        Rule::parse(s).unwrap().to_string()
    }

    #[test]
    fn accepted_forms_normalise() {
        assert_eq!(ok("Example.COM."), "example.com");
        assert_eq!(ok("*.example.com"), "*.example.com");
        assert_eq!(ok("**.example.com:8443"), "**.example.com:8443");
        assert_eq!(ok("github.com:22"), "github.com:22");
        assert_eq!(ok("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(ok("*.githubusercontent.com"), "*.githubusercontent.com");
    }

    #[test]
    fn rejected_forms() {
        use RuleError::*;
        let err = |s: &str| Rule::parse(s).unwrap_err();
        assert!(matches!(err(""), Empty));
        assert!(matches!(err("*"), MatchAll(_)));
        assert!(matches!(err("**"), MatchAll(_)));
        assert!(matches!(err("*.*"), MatchAll(_)));
        assert!(matches!(err("*.com"), PublicSuffix(_)));
        assert!(matches!(err("**.com"), PublicSuffix(_)));
        assert!(matches!(err("*.co.uk"), PublicSuffix(_)));
        assert!(matches!(err("https://example.com"), Url(_)));
        assert!(matches!(err("example.com/path"), Path(_)));
        assert!(matches!(err("example.com:https"), BadPort { .. }));
        assert!(matches!(err("example.com:0"), BadPort { .. }));
        assert!(matches!(err("example.com:70000"), BadPort { .. }));
        assert!(matches!(err("example.com:+80"), BadPort { .. }));
        assert!(matches!(err("foo.*.com"), MisplacedWildcard(_)));
        assert!(matches!(err("1.2.3.4"), IpLiteral(_)));
        assert!(matches!(err("1.2.3.4:443"), IpLiteral(_)));
        assert!(matches!(err("[::1]:443"), IpLiteral(_)));
        assert!(matches!(err("::1"), IpLiteral(_)));
        assert!(matches!(err("localhost"), BadName(_)));
        assert!(matches!(err("exa mple.com"), BadName(_)));
        assert!(matches!(err("-bad.com"), BadName(_)));
        assert!(matches!(err("a..com"), BadName(_)));
    }

    #[test]
    fn ip_literals_in_every_form_the_resolver_reads() {
        for lit in [
            "198.51.100.20",
            "198.51.100.20.",
            "3325256724",
            "0xc6336414",
            "0XC6336414",
            "198.51.25620",
            "0306.063.0144.024",
            "127.1",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_ip_literal(lit), "{lit}");
        }
        for name in [
            "example.com",
            "1.2.3.4.nip.io",
            "0x.example",
            "a1",
            "123.example",
        ] {
            assert!(!is_ip_literal(name), "{name}");
        }
    }

    proptest::proptest! {
        /// Every address, written as the resolver would read it, is a literal; every
        /// name the rule language accepts is not.
        #[test]
        fn literals_and_names_never_mix(ip in proptest::prelude::any::<u32>(), label in "[a-z][a-z0-9-]{0,10}[a-z0-9]", tld in "[a-z]{2,6}") {
            let a = std::net::Ipv4Addr::from(ip);
            for form in [a.to_string(), ip.to_string(), format!("{ip:#x}")] {
                proptest::prop_assert!(is_ip_literal(&form), "{}", form);
            }
            let name = format!("{label}.{tld}");
            proptest::prop_assert!(normalize_name(&name).is_some());
            proptest::prop_assert!(!is_ip_literal(&name), "{}", name);
            let under = format!("{a}.{name}");
            proptest::prop_assert!(!is_ip_literal(&under), "{}", under);
        }
    }

    #[test]
    fn matching() {
        let r = Rule::parse("example.com").unwrap();
        assert!(r.matches("example.com", 443));
        assert!(r.matches("example.com", 80));
        assert!(!r.matches("example.com", 22));
        assert!(!r.matches("www.example.com", 443));
        let r = Rule::parse("*.example.com").unwrap();
        assert!(r.matches("a.b.example.com", 443));
        assert!(!r.matches("example.com", 443));
        assert!(!r.matches("badexample.com", 443));
        let r = Rule::parse("**.example.com:22").unwrap();
        assert!(r.matches("example.com", 22));
        assert!(r.matches("git.example.com", 22));
        assert!(!r.matches("git.example.com", 443));
    }
}
