//! The gateway's DHCP server: the guest's one NIC gets the one guest address, the
//! gateway as router and DNS server. Answered at the frame level, before the TCP/IP
//! stack: a client without an address cannot answer ARP, so the reply goes straight
//! to its MAC (or to broadcast when it asks), as real DHCP servers do.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};

/// The addresses of the guest's little network (the same plan as QEMU's slirp, so
/// nothing in a guest that assumed it changes).
#[derive(Debug, Clone, Copy)]
pub struct Lan {
    pub gateway_mac: EthernetAddress,
    pub gateway: Ipv4Address,
    pub dns: Ipv4Address,
    pub guest: Ipv4Address,
    pub prefix_len: u8,
    pub lease_secs: u32,
}

impl Default for Lan {
    fn default() -> Lan {
        Lan {
            // Locally administered, unicast.
            gateway_mac: EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]),
            gateway: Ipv4Address::new(10, 0, 2, 2),
            dns: Ipv4Address::new(10, 0, 2, 3),
            guest: Ipv4Address::new(10, 0, 2, 15),
            prefix_len: 24,
            lease_secs: 24 * 3600,
        }
    }
}

impl Lan {
    fn netmask(&self) -> Ipv4Address {
        Ipv4Address::from_bits(u32::MAX << (32 - self.prefix_len as u32))
    }
}

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;

/// The reply to `frame` if it is a DHCP DISCOVER or REQUEST from the guest; `None`
/// for every other frame (including malformed ones, which are just dropped).
pub fn answer(frame: &[u8], lan: &Lan) -> Option<Vec<u8>> {
    let caps = ChecksumCapabilities::default();
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let ip_repr = Ipv4Repr::parse(&ip, &caps).ok()?;
    if ip_repr.next_header != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    if udp.dst_port() != SERVER_PORT || udp.src_port() != CLIENT_PORT {
        return None;
    }
    let dhcp = DhcpPacket::new_checked(udp.payload()).ok()?;
    let req = DhcpRepr::parse(&dhcp).ok()?;
    let reply_type = match req.message_type {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        DhcpMessageType::Request => {
            // A request for another address (a lease from an earlier network) is
            // refused, so the client starts over with a DISCOVER.
            let wanted = req.requested_ip.unwrap_or(req.client_ip);
            let for_us = req.server_identifier.is_none_or(|s| s == lan.gateway);
            if !for_us {
                return None;
            }
            if wanted == lan.guest {
                DhcpMessageType::Ack
            } else {
                DhcpMessageType::Nak
            }
        }
        _ => return None,
    };
    let ack_like = reply_type != DhcpMessageType::Nak;
    let mut dns = heapless::Vec::new();
    let _ = dns.push(lan.dns);
    let reply = DhcpRepr {
        message_type: reply_type,
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        client_ip: Ipv4Address::UNSPECIFIED,
        your_ip: if ack_like {
            lan.guest
        } else {
            Ipv4Address::UNSPECIFIED
        },
        server_ip: Ipv4Address::UNSPECIFIED,
        router: ack_like.then_some(lan.gateway),
        subnet_mask: ack_like.then(|| lan.netmask()),
        relay_agent_ip: Ipv4Address::UNSPECIFIED,
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(lan.gateway),
        parameter_request_list: None,
        dns_servers: ack_like.then_some(dns),
        max_size: None,
        lease_duration: ack_like.then_some(lan.lease_secs),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    // To the client's MAC; to the broadcast address when it asked for that or for
    // a NAK (it may not hold the address any more).
    let (dst_mac, dst_ip) = if req.broadcast || !ack_like {
        (EthernetAddress::BROADCAST, Ipv4Address::BROADCAST)
    } else {
        (req.client_hardware_address, lan.guest)
    };
    Some(emit(lan, dst_mac, dst_ip, &reply))
}

fn emit(lan: &Lan, dst_mac: EthernetAddress, dst_ip: Ipv4Address, reply: &DhcpRepr) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let dhcp_len = reply.buffer_len();
    let udp_repr = UdpRepr {
        src_port: SERVER_PORT,
        dst_port: CLIENT_PORT,
    };
    let udp_len = udp_repr.header_len() + dhcp_len;
    let ip_repr = Ipv4Repr {
        src_addr: lan.gateway,
        dst_addr: dst_ip,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let eth_repr = EthernetRepr {
        src_addr: lan.gateway_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let total = eth_repr.buffer_len() + ip_repr.buffer_len() + udp_len;
    let mut buf = vec![0u8; total];
    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    eth_repr.emit(&mut eth);
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip_repr.emit(&mut ip, &caps);
    let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
    udp_repr.emit(
        &mut udp,
        &IpAddress::Ipv4(lan.gateway),
        &IpAddress::Ipv4(dst_ip),
        dhcp_len,
        |payload| {
            let mut p = DhcpPacket::new_unchecked(payload);
            let _ = reply.emit(&mut p);
        },
        &caps,
    );
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The guest configures itself from the plan vibebox hands it (fw_cfg
    /// `network`) and asks DHCP only without it: both must give the same answer.
    #[test]
    fn the_lease_is_the_plan_the_guest_is_given() {
        let (lan, plan) = (Lan::default(), crate::vm::fwcfg::NETWORK);
        assert_eq!(lan.guest, plan.address);
        assert_eq!(lan.prefix_len, plan.prefix_len);
        assert_eq!(lan.gateway, plan.gateway);
        assert_eq!(lan.dns, plan.dns);
    }

    const CLIENT: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    /// A client's DISCOVER or REQUEST, built with the same wire code.
    fn client(kind: DhcpMessageType, requested: Option<Ipv4Address>, broadcast: bool) -> Vec<u8> {
        let req = DhcpRepr {
            message_type: kind,
            transaction_id: 0xdead_beef,
            secs: 0,
            client_hardware_address: CLIENT,
            client_ip: Ipv4Address::UNSPECIFIED,
            your_ip: Ipv4Address::UNSPECIFIED,
            server_ip: Ipv4Address::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Address::UNSPECIFIED,
            broadcast,
            requested_ip: requested,
            client_identifier: Some(CLIENT),
            server_identifier: None,
            parameter_request_list: Some(&[1, 3, 6]),
            dns_servers: None,
            max_size: Some(1500),
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let lan = Lan {
            gateway_mac: CLIENT,
            gateway: Ipv4Address::UNSPECIFIED,
            ..Lan::default()
        };
        let mut f = emit(
            &lan,
            EthernetAddress::BROADCAST,
            Ipv4Address::BROADCAST,
            &req,
        );
        // emit() writes server->client ports; flip them to client->server.
        let ip_off = 14 + 20;
        f[ip_off..ip_off + 2].copy_from_slice(&CLIENT_PORT.to_be_bytes());
        f[ip_off + 2..ip_off + 4].copy_from_slice(&SERVER_PORT.to_be_bytes());
        f[ip_off + 6..ip_off + 8].copy_from_slice(&[0, 0]); // no UDP checksum
        f
    }

    fn parse_reply(
        frame: &[u8],
    ) -> (
        EthernetAddress,
        DhcpMessageType,
        Ipv4Address,
        Option<Ipv4Address>,
        Vec<Ipv4Address>,
    ) {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((udp.src_port(), udp.dst_port()), (SERVER_PORT, CLIENT_PORT));
        let dhcp = DhcpPacket::new_checked(udp.payload()).unwrap();
        let r = DhcpRepr::parse(&dhcp).unwrap();
        assert_eq!(r.transaction_id, 0xdead_beef);
        assert_eq!(r.client_hardware_address, CLIENT);
        (
            eth.dst_addr(),
            r.message_type,
            r.your_ip,
            r.router,
            r.dns_servers.map(|d| d.to_vec()).unwrap_or_default(),
        )
    }

    #[test]
    fn discover_then_request() {
        let lan = Lan::default();
        let offer = answer(&client(DhcpMessageType::Discover, None, false), &lan).unwrap();
        let (mac, kind, yi, router, dns) = parse_reply(&offer);
        assert_eq!((mac, kind, yi), (CLIENT, DhcpMessageType::Offer, lan.guest));
        assert_eq!((router, dns), (Some(lan.gateway), vec![lan.dns]));

        let ack = answer(
            &client(DhcpMessageType::Request, Some(lan.guest), true),
            &lan,
        )
        .unwrap();
        let (mac, kind, yi, _, _) = parse_reply(&ack);
        assert_eq!(
            (mac, kind, yi),
            (EthernetAddress::BROADCAST, DhcpMessageType::Ack, lan.guest)
        );

        // A lease from elsewhere is refused.
        let nak = answer(
            &client(
                DhcpMessageType::Request,
                Some(Ipv4Address::new(192, 168, 1, 9)),
                false,
            ),
            &lan,
        )
        .unwrap();
        let (mac, kind, _, router, _) = parse_reply(&nak);
        assert_eq!(
            (mac, kind, router),
            (EthernetAddress::BROADCAST, DhcpMessageType::Nak, None)
        );
    }

    #[test]
    fn other_frames_are_not_answered() {
        let lan = Lan::default();
        let mut f = client(DhcpMessageType::Discover, None, false);
        f[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(answer(&f, &lan), None);
        assert_eq!(
            answer(&client(DhcpMessageType::Release, None, false), &lan),
            None
        );
        assert_eq!(answer(&[0u8; 10], &lan), None);
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..700)) {
            let _ = answer(&bytes, &Lan::default());
        }

        #[test]
        fn mutated_requests_never_panic(pos in any::<prop::sample::Index>(), val in any::<u8>()) {
            let mut f = client(DhcpMessageType::Discover, None, false);
            let i = pos.index(f.len());
            f[i] = val;
            let _ = answer(&f, &Lan::default());
        }
    }
}
