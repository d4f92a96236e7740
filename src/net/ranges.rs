//! Addresses the gateway never dials for the guest, whatever a DNS answer says: the
//! host itself, the networks it sits in, and the cloud metadata services. An allowed
//! name whose answer points there is refused (DNS rebinding would otherwise turn an
//! allowed name into a door to the host's loopback services or the LAN).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// The addresses of the host's own interfaces. A service bound to `0.0.0.0` listens
/// on all of them, public ones included, so a DNS answer or a connection naming one
/// would reach the host itself. Read again at most every [`HostAddrs::REFRESH`] (a
/// laptop changes networks; a VPN comes up) rather than once at start.
pub struct HostAddrs {
    source: Source,
    addrs: Vec<IpAddr>,
    read_at: Option<Instant>,
}

enum Source {
    Interfaces,
    Fixed,
}

impl HostAddrs {
    pub const REFRESH: Duration = Duration::from_secs(2);

    /// The host's interfaces, as `getifaddrs` lists them.
    pub fn system() -> HostAddrs {
        HostAddrs {
            source: Source::Interfaces,
            addrs: Vec::new(),
            read_at: None,
        }
    }

    /// A fixed set, for tests that cannot give the host a public address.
    pub fn fixed(addrs: Vec<IpAddr>) -> HostAddrs {
        HostAddrs {
            source: Source::Fixed,
            addrs,
            read_at: None,
        }
    }

    pub fn contains(&mut self, ip: IpAddr) -> bool {
        if let Source::Interfaces = self.source
            && self.read_at.is_none_or(|t| t.elapsed() >= Self::REFRESH)
        {
            self.addrs = interface_addrs();
            self.read_at = Some(Instant::now());
        }
        self.addrs.contains(&ip)
    }
}

fn interface_addrs() -> Vec<IpAddr> {
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = ifs
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Why an address is refused, for the log line.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

/// The documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) pass: no
/// real host has them, and the tests give them to their servers as public addresses.
fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const NETS: &[([u8; 4], u32, &str)] = &[
        ([0, 0, 0, 0], 8, "this-network"),
        ([10, 0, 0, 0], 8, "private"),
        ([100, 64, 0, 0], 10, "carrier-grade NAT"),
        ([127, 0, 0, 0], 8, "loopback"),
        ([169, 254, 0, 0], 16, "link-local (cloud metadata)"),
        ([172, 16, 0, 0], 12, "private"),
        ([192, 0, 0, 0], 24, "IETF protocol assignments"),
        ([192, 168, 0, 0], 16, "private"),
        ([198, 18, 0, 0], 15, "benchmarking"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([240, 0, 0, 0], 4, "reserved"),
    ];
    NETS.iter()
        .find(|(net, bits, _)| in_v4(ip, *net, *bits))
        .map(|(_, _, why)| *why)
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let s = ip.segments();
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if s[0] & 0xfe00 == 0xfc00 {
        Some("unique local (private)")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if s[0] & 0xff00 == 0xff00 {
        Some("multicast")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64: the embedded IPv4 address decides.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        forbidden_v4(v4)
    } else if s[0..6] == [0; 6] {
        Some("IPv4-compatible")
    } else if s[0] == 0xfd00 && s[1] == 0x0ec2 {
        Some("cloud metadata")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Option<&'static str> {
        forbidden(s.parse().unwrap())
    }

    #[test]
    fn the_host_its_networks_and_metadata_are_refused() {
        for a in [
            "127.0.0.1",
            "127.255.1.2",
            "10.0.2.2",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "224.0.0.251",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "64:ff9b::7f00:1",
            "::127.0.0.1",
        ] {
            assert!(f(a).is_some(), "{a} must be refused");
        }
        assert_eq!(f("169.254.169.254"), Some("link-local (cloud metadata)"));
    }

    #[test]
    fn the_host_interfaces_are_listed() {
        let mut h = HostAddrs::system();
        assert!(
            h.contains(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "lo has 127.0.0.1"
        );
        assert!(!h.contains("192.0.2.250".parse().unwrap()));
        let mut f = HostAddrs::fixed(vec!["198.51.100.1".parse().unwrap()]);
        assert!(f.contains("198.51.100.1".parse().unwrap()));
        assert!(!f.contains(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn public_addresses_pass() {
        for a in [
            "1.1.1.1",
            "151.101.2.132",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.2.10",
            "198.51.100.7",
            "203.0.113.9",
            "2a04:4e42::644",
            "64:ff9b::101:101",
        ] {
            assert_eq!(f(a), None, "{a} must pass");
        }
    }
}
