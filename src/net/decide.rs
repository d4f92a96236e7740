//! What the gateway lets through: the policy applied to DNS names and to TCP
//! connections, and the pin set that ties the addresses the host resolved to the
//! names they were resolved for. Pure, so every rule is tested without a VM.
//!
//! Allowlist: a name resolves if some entry covers it (on any port); a connection
//! goes through if an entry covers its name on its port (an entry without a port
//! covers 80 and 443). Blocklist: an entry without a port blocks the name entirely
//! (DNS and every port), one with a port blocks that port; everything else goes
//! through the same checks. Either way a connection needs a name: the TLS SNI or the
//! HTTP Host of its first flight, matching a name its destination address is pinned
//! for; or, for a port that an entry names explicitly (`host:22`), a destination
//! pinned for that host (such protocols may wait for the server to speak first).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::Ipv4Addr;

use super::policy::{DEFAULT_PORTS, Mode, Rule, is_ip_literal};

/// A denial, with what the log line needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    pub why: String,
    /// The entry that decided, if one did.
    pub rule: Option<String>,
}

impl fmt::Display for Deny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(r) => write!(f, "{} (rule {r})", self.why),
            None => write!(f, "{}", self.why),
        }
    }
}

fn deny(why: impl Into<String>, rule: Option<&Rule>) -> Deny {
    Deny {
        why: why.into(),
        rule: rule.map(|r| r.to_string()),
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    mode: Mode,
    rules: Vec<Rule>,
}

impl Policy {
    pub fn new(mode: Mode, rules: &[Rule]) -> Policy {
        Policy {
            mode,
            rules: rules.to_vec(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// May the guest learn the addresses of `name` (normalised)?
    pub fn name(&self, name: &str) -> Result<(), Deny> {
        not_an_ip_literal(name)?;
        match self.mode {
            Mode::Allowlist => {
                if self.rules.iter().any(|r| r.matches_name(name)) {
                    Ok(())
                } else {
                    Err(deny("not in the allowlist", None))
                }
            }
            Mode::Blocklist => match self
                .rules
                .iter()
                .find(|r| r.port.is_none() && r.matches_name(name))
            {
                Some(r) => Err(deny("blocked", Some(r))),
                None => Ok(()),
            },
        }
    }

    /// May the guest connect to `name` (normalised) on `port`?
    pub fn connect(&self, name: &str, port: u16) -> Result<(), Deny> {
        not_an_ip_literal(name)?;
        match self.mode {
            Mode::Allowlist => {
                if self.rules.iter().any(|r| r.matches(name, port)) {
                    Ok(())
                } else if self.rules.iter().any(|r| r.matches_name(name)) {
                    Err(deny(
                        format!("port {port} is not allowed for it (add \"{name}:{port}\")"),
                        None,
                    ))
                } else {
                    Err(deny(format!("{name} is not in the allowlist"), None))
                }
            }
            Mode::Blocklist => match self
                .rules
                .iter()
                .find(|r| r.port.is_none_or(|p| p == port) && r.matches_name(name))
            {
                Some(r) => Err(deny("blocked", Some(r))),
                None => Ok(()),
            },
        }
    }

    /// Whether connections to `port` are decided from the destination alone (no
    /// first flight to read): ports some entry names explicitly, in allowlist mode;
    /// in blocklist mode every other port.
    /// The web ports are always checked by name, even where an entry names them.
    fn opaque_port(&self, port: u16) -> bool {
        !DEFAULT_PORTS.contains(&port)
            && match self.mode {
                Mode::Allowlist => self.rules.iter().any(|r| r.port == Some(port)),
                Mode::Blocklist => true,
            }
    }
}

/// In either mode: a name that is an address would be resolved to itself and pinned,
/// so the guest would pick its destination (blocklist mode would let it anywhere).
fn not_an_ip_literal(name: &str) -> Result<(), Deny> {
    if is_ip_literal(name) {
        return Err(deny(
            "an IP address, not a name (connections need a name the gateway resolved)",
            None,
        ));
    }
    Ok(())
}

/// Which addresses the host resolved for which names, this boot. A connection's
/// destination must be pinned for the name it claims, so a guest cannot send an
/// allowed SNI or Host to an address of its choosing. Bounded: the oldest pins go
/// first past [`Pins::MAX`].
#[derive(Debug, Default)]
pub struct Pins {
    by_ip: HashMap<Ipv4Addr, Vec<String>>,
    order: VecDeque<(Ipv4Addr, String)>,
}

impl Pins {
    pub const MAX: usize = 1 << 16;

    pub fn pin(&mut self, name: &str, ips: &[Ipv4Addr]) {
        if is_ip_literal(name) {
            return; // never a name: see `not_an_ip_literal`
        }
        for ip in ips {
            let names = self.by_ip.entry(*ip).or_default();
            if names.iter().any(|n| n == name) {
                continue;
            }
            names.push(name.to_string());
            self.order.push_back((*ip, name.to_string()));
        }
        while self.order.len() > Self::MAX {
            let Some((ip, name)) = self.order.pop_front() else {
                break;
            };
            if let Some(names) = self.by_ip.get_mut(&ip) {
                names.retain(|n| *n != name);
                if names.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    pub fn names(&self, ip: Ipv4Addr) -> &[String] {
        self.by_ip.get(&ip).map_or(&[], |v| v.as_slice())
    }

    pub fn is_pinned(&self, name: &str, ip: Ipv4Addr) -> bool {
        self.names(ip).iter().any(|n| n == name)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// What the guest's first bytes on a connection named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flight {
    Tls {
        name: Option<String>,
        ech: bool,
    },
    Http {
        host: String,
        port: Option<u16>,
    },
    /// Neither TLS nor HTTP.
    Other,
}

/// At the guest's SYN: a connection decided by its destination alone, if its port
/// is one of those, as the name to log and dial. `None` means: read the first flight
/// and call [`by_flight`].
pub fn by_destination(
    policy: &Policy,
    pins: &Pins,
    ip: Ipv4Addr,
    port: u16,
) -> Option<Result<String, Deny>> {
    if !policy.opaque_port(port) {
        return None;
    }
    let names = pins.names(ip);
    if names.is_empty() {
        return Some(Err(deny(
            format!("{ip} was not resolved through the gateway for any name"),
            None,
        )));
    }
    let mut last = None;
    for n in names {
        match policy.connect(n, port) {
            Ok(()) => return Some(Ok(n.clone())),
            Err(d) => last = Some(d),
        }
    }
    Some(Err(last.expect("names is not empty")))
}

/// After the first flight: the name to dial, or why not.
pub fn by_flight(
    policy: &Policy,
    pins: &Pins,
    ip: Ipv4Addr,
    port: u16,
    flight: &Flight,
) -> Result<String, Deny> {
    let name = match flight {
        Flight::Tls { name: None, .. } => return Err(deny("TLS without a server name", None)),
        Flight::Tls { ech: true, .. } => {
            return Err(deny(
                "TLS with Encrypted Client Hello (the real server name is hidden)",
                None,
            ));
        }
        Flight::Tls {
            name: Some(n),
            ech: false,
        } => n,
        Flight::Http { host, port: hp } => {
            if hp.is_some_and(|p| p != port) {
                return Err(deny(
                    format!(
                        "HTTP Host names port {} on a connection to {port}",
                        hp.unwrap_or(0)
                    ),
                    None,
                ));
            }
            host
        }
        Flight::Other => {
            return Err(deny(
                "neither TLS nor HTTP: no name to check (allow the port explicitly, as host:port)",
                None,
            ));
        }
    };
    policy.connect(name, port)?;
    if !pins.is_pinned(name, ip) {
        return Err(deny(
            format!("{ip} is not an address the gateway resolved for {name}"),
            None,
        ));
    }
    Ok(name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: Mode, entries: &[&str]) -> Policy {
        let rules: Vec<Rule> = entries.iter().map(|e| Rule::parse(e).unwrap()).collect();
        Policy::new(mode, &rules)
    }

    const IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

    fn tls(n: &str) -> Flight {
        Flight::Tls {
            name: Some(n.into()),
            ech: false,
        }
    }

    #[test]
    fn allowlist_names_and_ports() {
        let p = policy(
            Mode::Allowlist,
            &[
                "example.com",
                "*.pkg.dev",
                "**.github.com",
                "git.corp.io:22",
            ],
        );
        for ok in [
            "example.com",
            "a.pkg.dev",
            "github.com",
            "api.github.com",
            "git.corp.io",
        ] {
            assert_eq!(p.name(ok), Ok(()), "{ok}");
        }
        for no in [
            "www.example.com",
            "pkg.dev",
            "evilgithub.com",
            "corp.io",
            "com",
        ] {
            assert!(p.name(no).is_err(), "{no}");
        }
        assert_eq!(p.connect("example.com", 443), Ok(()));
        assert_eq!(p.connect("example.com", 80), Ok(()));
        assert!(p.connect("example.com", 22).is_err());
        assert_eq!(p.connect("git.corp.io", 22), Ok(()));
        assert!(p.connect("git.corp.io", 443).is_err());
        // An empty allowlist denies everything.
        let empty = policy(Mode::Allowlist, &[]);
        assert!(empty.name("example.com").is_err());
        assert!(empty.connect("example.com", 443).is_err());
    }

    #[test]
    fn blocklist_blocks_names_or_ports() {
        let p = policy(Mode::Blocklist, &["**.evil.com", "mail.example.com:25"]);
        let d = p.name("x.evil.com").unwrap_err();
        assert_eq!(d.rule.as_deref(), Some("**.evil.com"));
        assert!(
            p.connect("evil.com", 8080).is_err(),
            "a port-less entry blocks every port"
        );
        assert_eq!(p.name("mail.example.com"), Ok(()));
        assert!(p.connect("mail.example.com", 25).is_err());
        assert_eq!(p.connect("mail.example.com", 443), Ok(()));
        assert_eq!(p.connect("good.org", 443), Ok(()));
    }

    #[test]
    fn a_connection_needs_a_pinned_name() {
        let p = policy(Mode::Allowlist, &["example.com", "git.corp.io:22"]);
        let mut pins = Pins::default();
        pins.pin("example.com", &[IP]);
        pins.pin("git.corp.io", &[OTHER]);
        assert_eq!(
            by_destination(&p, &pins, IP, 443),
            None,
            "web ports wait for the flight"
        );
        assert_eq!(
            by_flight(&p, &pins, IP, 443, &tls("example.com")),
            Ok("example.com".into())
        );
        let http = Flight::Http {
            host: "example.com".into(),
            port: None,
        };
        assert_eq!(
            by_flight(&p, &pins, IP, 80, &http),
            Ok("example.com".into())
        );
        // The allowed name sent to an address that is not pinned for it.
        assert!(by_flight(&p, &pins, OTHER, 443, &tls("example.com")).is_err());
        // A name that is not allowed, at a pinned address.
        assert!(by_flight(&p, &pins, IP, 443, &tls("evil.com")).is_err());
        // No SNI, ECH, no recognisable protocol, Host naming another port.
        for f in [
            Flight::Tls {
                name: None,
                ech: false,
            },
            Flight::Tls {
                name: Some("example.com".into()),
                ech: true,
            },
            Flight::Other,
            Flight::Http {
                host: "example.com".into(),
                port: Some(8080),
            },
        ] {
            assert!(by_flight(&p, &pins, IP, 443, &f).is_err(), "{f:?}");
        }
        // An explicit port: decided at the SYN, from the pin alone.
        assert_eq!(
            by_destination(&p, &pins, OTHER, 22),
            Some(Ok("git.corp.io".into()))
        );
        assert!(matches!(by_destination(&p, &pins, IP, 22), Some(Err(_))));
        // Naming 443 explicitly does not turn the SNI check off.
        let p443 = policy(Mode::Allowlist, &["example.com:443", "other.com"]);
        pins.pin("other.com", &[OTHER]);
        assert_eq!(by_destination(&p443, &pins, OTHER, 443), None);
        assert!(by_flight(&p443, &pins, OTHER, 443, &tls("example.com")).is_err());
        // An address nothing resolved to (an IP literal in the guest).
        let lit = Ipv4Addr::new(203, 0, 113, 50);
        assert!(matches!(by_destination(&p, &pins, lit, 22), Some(Err(_))));
        assert!(by_flight(&p, &pins, lit, 443, &tls("example.com")).is_err());
    }

    #[test]
    fn blocklist_opaque_ports_need_a_pin_too() {
        let p = policy(Mode::Blocklist, &["evil.com"]);
        let mut pins = Pins::default();
        pins.pin("good.org", &[IP]);
        pins.pin("evil.com", &[OTHER]);
        assert_eq!(
            by_destination(&p, &pins, IP, 22),
            Some(Ok("good.org".into()))
        );
        assert!(matches!(by_destination(&p, &pins, OTHER, 22), Some(Err(_))));
        let lit = Ipv4Addr::new(203, 0, 113, 50);
        assert!(matches!(by_destination(&p, &pins, lit, 5432), Some(Err(_))));
        assert_eq!(by_destination(&p, &pins, IP, 443), None);
    }

    #[test]
    fn ip_literals_are_refused_in_both_modes() {
        for mode in [Mode::Allowlist, Mode::Blocklist] {
            let p = policy(mode, &["example.com"]);
            let mut pins = Pins::default();
            pins.pin("198.51.100.7", &[IP]);
            assert!(pins.is_empty(), "an address is never pinned as a name");
            assert!(p.name("198.51.100.7").is_err(), "{mode:?}");
            assert!(p.name("3325256711").is_err(), "{mode:?}");
            assert!(p.connect("198.51.100.7", 443).is_err(), "{mode:?}");
            assert!(by_flight(&p, &pins, IP, 443, &tls("198.51.100.7")).is_err());
        }
    }

    #[test]
    fn pins_are_bounded_oldest_first() {
        let mut pins = Pins::default();
        pins.pin("first.com", &[IP]);
        for i in 0..Pins::MAX as u32 {
            pins.pin(&format!("n{i}.com"), &[Ipv4Addr::from(0x0a00_0000 + i)]);
        }
        assert_eq!(pins.len(), Pins::MAX);
        assert!(!pins.is_pinned("first.com", IP));
        assert!(pins.is_pinned("n5.com", Ipv4Addr::from(0x0a00_0005)));
        // Pinning the same pair twice keeps one entry.
        pins.pin("n5.com", &[Ipv4Addr::from(0x0a00_0005)]);
        assert_eq!(pins.len(), Pins::MAX);
    }
}
