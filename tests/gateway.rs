//! The network gateway end to end in one process: a guest TCP/IP stack (smoltcp, as
//! a VM's kernel would be) on one end of QEMU's stream framing, the real gateway on
//! the other, servers on loopback behind test names. No VM: these run everywhere in
//! seconds; the VM tests show the same through a real guest kernel.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use vibebox::net::decide::Policy;
use vibebox::net::device::Queues;
use vibebox::net::dhcp::Lan;
use vibebox::net::gateway::{self, FLIGHT_TIMEOUT, Inbound, Limits, Settings};
use vibebox::net::netlog::NetLog;
use vibebox::net::policy::{Mode, Rule};
use vibebox::net::ranges::HostAddrs;
use vibebox::net::upstream::{BoxFuture, Dialer, Resolver};
use vibebox::net::{dns, frame, sni};

// ---- the world behind the gateway: names, their addresses, servers on loopback ----

/// Names to addresses (what a test DNS upstream would answer), recording every
/// question it is asked.
#[derive(Default)]
struct World {
    names: HashMap<String, Vec<Ipv4Addr>>,
    asked: Mutex<Vec<String>>,
    /// Public test address and port -> the loopback port of the server behind it.
    servers: Mutex<HashMap<(Ipv4Addr, u16), u16>>,
    dialed: Mutex<Vec<(Ipv4Addr, u16)>>,
}

struct WorldResolver(Arc<World>);
struct WorldDialer(Arc<World>);

impl Resolver for WorldResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Vec<Ipv4Addr>>> {
        Box::pin(async move {
            self.0.asked.lock().unwrap().push(name.to_string());
            Ok(self.0.names.get(name).cloned().unwrap_or_default())
        })
    }
}

impl Dialer for WorldDialer {
    fn dial(&self, ip: Ipv4Addr, port: u16) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            self.0.dialed.lock().unwrap().push((ip, port));
            let local = self.0.servers.lock().unwrap().get(&(ip, port)).copied();
            match local {
                Some(p) => TcpStream::connect(("127.0.0.1", p)).await,
                None => Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "no server",
                )),
            }
        })
    }
}

/// A server that answers each connection: `banner` first (if any), then echoes
/// everything it reads prefixed with "echo:" once the client stops sending.
async fn server(world: &Arc<World>, ip: Ipv4Addr, port: u16, banner: &'static [u8]) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = l.local_addr().unwrap().port();
    world.servers.lock().unwrap().insert((ip, port), local);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.write_all(banner).await;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                        Err(_) if !got.is_empty() => break,
                        Err(_) => {}
                    }
                }
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(&got);
                let _ = s.write_all(&out).await;
                let _ = s.shutdown().await;
            });
        }
    });
}

// ---- the guest: a TCP/IP stack on the other end of the frame stream ----

struct Guest {
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    link: UnixStream,
    decoder: frame::Decoder,
    next_port: u16,
}

const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

impl Guest {
    fn new(link: UnixStream, lan: &Lan) -> Guest {
        let mut dev = Queues::default();
        let iface_cfg = IfaceConfig::new(HardwareAddress::Ethernet(GUEST_MAC));
        let mut iface = Interface::new(iface_cfg, &mut dev, SInstant::now());
        let (ip, len, gw) = (lan.guest, lan.prefix_len, lan.gateway);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), len));
        });
        iface.routes_mut().add_default_ipv4_route(gw).unwrap();
        Guest {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            link,
            decoder: frame::Decoder::new(),
            next_port: 40000,
        }
    }

    /// Runs the guest stack until `done` says so (or panics after 20 s).
    async fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Guest) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            self.iface
                .poll(SInstant::now(), &mut self.dev, &mut self.sockets);
            for f in std::mem::take(&mut self.dev.tx) {
                self.link.write_all(&frame::encode(&f)).await.unwrap();
            }
            if done(self) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "guest: timed out waiting for {what}"
            );
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(5), self.link.read(&mut buf)).await
            {
                assert!(n > 0, "the gateway closed the link");
                self.decoder.push(&buf[..n]);
                while let Some(f) = self.decoder.next_frame().unwrap() {
                    self.dev.rx.push_back(f);
                }
            }
        }
    }

    async fn dns(&mut self, name: &str, qtype: RecordType) -> Message {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        );
        self.next_port += 1;
        s.bind(self.next_port).unwrap();
        let h = self.sockets.add(s);
        let q = dns::build_query(0x4242, name, qtype);
        let server = IpEndpoint::new(IpAddress::v4(10, 0, 2, 3), 53);
        self.sockets
            .get_mut::<udp::Socket>(h)
            .send_slice(&q, server)
            .unwrap();
        let mut answer = None;
        self.run_until("a DNS answer", |g| {
            if let Ok((data, _)) = g.sockets.get_mut::<udp::Socket>(h).recv() {
                answer = Some(data.to_vec());
            }
            answer.is_some()
        })
        .await;
        self.sockets.remove(h);
        Message::from_vec(&answer.unwrap()).unwrap()
    }

    async fn resolve(&mut self, name: &str) -> Vec<Ipv4Addr> {
        let m = self.dns(name, RecordType::A).await;
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    fn connect(&mut self, ip: Ipv4Addr, port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 << 10]),
            tcp::SocketBuffer::new(vec![0; 64 << 10]),
        );
        self.next_port += 1;
        s.connect(
            self.iface.context(),
            (IpAddress::Ipv4(ip), port),
            self.next_port,
        )
        .unwrap();
        self.sockets.add(s)
    }

    /// Connects, sends `data`, and collects what comes back until the connection ends.
    async fn exchange(&mut self, ip: Ipv4Addr, port: u16, data: &[u8]) -> Exchange {
        let h = self.connect(ip, port);
        let ex = self.exchange_on(vec![(h, data.to_vec())]).await;
        ex.into_iter().next().unwrap()
    }

    /// Many connections at once, each sending its data.
    async fn exchange_on(&mut self, conns: Vec<(SocketHandle, Vec<u8>)>) -> Vec<Exchange> {
        let mut state: Vec<(SocketHandle, Vec<u8>, Exchange)> = conns
            .into_iter()
            .map(|(h, d)| (h, d, Exchange::default()))
            .collect();
        self.run_until("connections to finish", |g| {
            let mut all = true;
            for (h, to_send, ex) in state.iter_mut() {
                let s = g.sockets.get_mut::<tcp::Socket>(*h);
                if s.state() == tcp::State::Established || s.state() == tcp::State::CloseWait {
                    ex.established = true;
                }
                if s.can_send() && !to_send.is_empty() {
                    let n = s.send_slice(to_send).unwrap_or(0);
                    to_send.drain(..n);
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.recv_slice(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    ex.received.extend_from_slice(&buf[..n]);
                }
                match s.state() {
                    tcp::State::Closed | tcp::State::TimeWait => ex.closed = true,
                    tcp::State::CloseWait => {
                        s.close();
                        all = false;
                    }
                    _ => all = false,
                }
            }
            all
        })
        .await;
        state
            .into_iter()
            .map(|(h, _, ex)| {
                self.sockets.remove(h);
                ex
            })
            .collect()
    }
}

impl Guest {
    /// Keeps the guest stack running (answering whatever arrives) for `d`.
    async fn idle(&mut self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < end {
            let left = end - tokio::time::Instant::now();
            let until = tokio::time::Instant::now() + left.min(Duration::from_secs(10));
            self.run_until("idling", |_| tokio::time::Instant::now() >= until)
                .await;
        }
    }

    /// Sends a bare TCP SYN from `sport`, outside the guest's stack (no socket answers
    /// the gateway's SYN-ACK but with a reset): a handshake that never completes.
    async fn raw_syn(&mut self, dst: Ipv4Addr, dport: u16, sport: u16, good_checksum: bool) {
        let src = Lan::default().guest.octets();
        let dst = dst.octets();
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&sport.to_be_bytes());
        tcp.extend_from_slice(&dport.to_be_bytes());
        tcp.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        tcp.extend_from_slice(&0u32.to_be_bytes());
        tcp.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&tcp);
        let mut sum = checksum(&pseudo);
        if !good_checksum {
            sum ^= 0x5555;
        }
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let ipsum = checksum(&ip);
        ip[10..12].copy_from_slice(&ipsum.to_be_bytes());
        let mut f = Vec::new();
        f.extend_from_slice(&Lan::default().gateway_mac.0);
        f.extend_from_slice(&GUEST_MAC.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp);
        self.link.write_all(&frame::encode(&f)).await.unwrap();
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Default, Debug)]
struct Exchange {
    established: bool,
    received: Vec<u8>,
    closed: bool,
}

// ---- the setup ----

const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const GIT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
/// An address the tests give the host's own interfaces.
const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 40);

fn world() -> Arc<World> {
    let mut w = World::default();
    w.names.insert("allowed.test".into(), vec![ALLOWED]);
    w.names.insert("other.test".into(), vec![OTHER]);
    w.names.insert("git.test".into(), vec![GIT]);
    w.names
        .insert("rebind.allowed.test".into(), vec![Ipv4Addr::LOCALHOST]);
    w.names.insert(
        "lan.allowed.test".into(),
        vec![Ipv4Addr::new(192, 168, 1, 1)],
    );
    // The host's resolver answers an IP literal with itself (getaddrinfo does, for
    // the dotted form and the others inet_aton reads).
    w.names.insert("198.51.100.20".into(), vec![OTHER]);
    w.names.insert("3325256724".into(), vec![OTHER]);
    w.names.insert("0xc6336414".into(), vec![OTHER]);
    w.names.insert("self.test".into(), vec![HOST]);
    Arc::new(w)
}

fn policy(mode: Mode, entries: &[&str]) -> Policy {
    let rules: Vec<Rule> = entries.iter().map(|e| Rule::parse(e).unwrap()).collect();
    Policy::new(mode, &rules)
}

/// Starts a gateway for `policy` and returns the guest attached to it, plus the
/// network log's path.
async fn start(
    world: &Arc<World>,
    policy: Policy,
    log_dir: &std::path::Path,
    ssh: Option<TcpListener>,
) -> (Guest, std::path::PathBuf) {
    start_with(
        world,
        policy,
        log_dir,
        ssh,
        HostAddrs::fixed(Vec::new()),
        Limits::default(),
    )
    .await
}

/// [`start`] with the host's own addresses and the gateway's bounds given.
async fn start_with(
    world: &Arc<World>,
    policy: Policy,
    log_dir: &std::path::Path,
    ssh: Option<TcpListener>,
    host: HostAddrs,
    limits: Limits,
) -> (Guest, std::path::PathBuf) {
    start_full(world, policy, log_dir, ssh, host, limits, None).await
}

/// A gateway that also relays host connections to published guest ports: each
/// connection to the returned address goes to `guest_port` in the guest (as the
/// supervisor hands them over).
async fn start_relaying(
    log_dir: &std::path::Path,
    limits: Limits,
    guest_port: u16,
) -> (Guest, std::path::PathBuf, SocketAddr) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = tx.send(Inbound { stream, guest_port }).await;
        }
    });
    let (g, log) = start_full(
        &world(),
        policy(Mode::Allowlist, &[]),
        log_dir,
        None,
        HostAddrs::fixed(Vec::new()),
        limits,
        Some(rx),
    )
    .await;
    (g, log, addr)
}

async fn start_full(
    world: &Arc<World>,
    policy: Policy,
    log_dir: &std::path::Path,
    ssh: Option<TcpListener>,
    host: HostAddrs,
    limits: Limits,
    inbound: Option<tokio::sync::mpsc::Receiver<Inbound>>,
) -> (Guest, std::path::PathBuf) {
    let (g_end, gw_end) = UnixStream::pair().unwrap();
    let lan = Lan::default();
    let log = log_dir.join("network.log");
    let settings = Settings {
        lan,
        policy,
        log: NetLog::new(&log, "test-session"),
        ssh_port: 22,
        host,
        host_ports: HOST_PORTS.lock().unwrap().clone(),
        limits,
    };
    let resolver: Arc<dyn Resolver> = Arc::new(WorldResolver(world.clone()));
    let dialer: Arc<dyn Dialer> = Arc::new(WorldDialer(world.clone()));
    tokio::spawn(async move {
        let _ = gateway::serve(gw_end, settings, resolver, dialer, ssh, inbound).await;
    });
    (Guest::new(g_end, &lan), log)
}

/// Host ports granted by the gateways [`start_with`] makes (none unless a test
/// sets them; only one test does, so the others are unaffected).
static HOST_PORTS: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

fn http_get(host: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n\r\n").into_bytes()
}

fn log_text(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

// ---- the tests ----

#[tokio::test]
async fn allowlist_dns_and_connections() {
    let w = world();
    server(&w, ALLOWED, 443, b"").await;
    server(&w, ALLOWED, 80, b"").await;
    server(&w, OTHER, 443, b"").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut g, log) = start(
        &w,
        policy(Mode::Allowlist, &["**.allowed.test"]),
        dir.path(),
        None,
    )
    .await;

    // DNS: allowed names resolve (on the host), others never leave the gateway.
    assert_eq!(g.resolve("allowed.test").await, vec![ALLOWED]);
    let nx = g.dns("other.test", RecordType::A).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(!w.asked.lock().unwrap().iter().any(|n| n == "other.test"));
    // AAAA: the gateway offers IPv4 only.
    let aaaa = g.dns("allowed.test", RecordType::AAAA).await;
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty());
    // An allowed name pointing at loopback or the LAN is refused (DNS rebinding).
    for n in ["rebind.allowed.test", "lan.allowed.test"] {
        let m = g.dns(n, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail, "{n}");
    }

    // HTTPS by name: the ClientHello reaches the server as sent, the answer returns.
    let hello = sni::build_client_hello(Some("allowed.test"), &[]);
    let ex = g.exchange(ALLOWED, 443, &hello).await;
    let mut expect = b"echo:".to_vec();
    expect.extend_from_slice(&hello);
    assert_eq!(ex.received, expect);

    // HTTP by name.
    let ex = g.exchange(ALLOWED, 80, &http_get("allowed.test")).await;
    assert!(ex.received.starts_with(b"echo:GET / HTTP/1.1"), "{ex:?}");

    // The allowed name sent to an address not pinned for it: refused with an alert.
    g.resolve("allowed.test").await;
    let ex = g.exchange(OTHER, 443, &hello).await;
    assert_eq!(ex.received, [21, 3, 3, 0, 2, 2, 49]);
    // An HTTP Host other than the pinned name: 403.
    let ex = g.exchange(ALLOWED, 80, &http_get("other.test")).await;
    assert!(ex.received.starts_with(b"HTTP/1.1 403"), "{ex:?}");
    // No SNI.
    let ex = g
        .exchange(ALLOWED, 443, &sni::build_client_hello(None, &[]))
        .await;
    assert!(!ex.received.starts_with(b"echo:"));
    // An IP literal nothing resolved to.
    let ex = g.exchange(Ipv4Addr::new(203, 0, 113, 5), 443, &hello).await;
    assert!(!ex.received.starts_with(b"echo:"));
    // The host's loopback and LAN: reset at the SYN.
    for ip in [
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::new(10, 0, 2, 2),
        Ipv4Addr::new(192, 168, 1, 1),
    ] {
        let ex = g.exchange(ip, 80, &http_get("allowed.test")).await;
        assert!(!ex.established || ex.received.is_empty(), "{ip}: {ex:?}");
    }
    // Only the allowed connections were dialled.
    let dialed = w.dialed.lock().unwrap().clone();
    assert_eq!(dialed, vec![(ALLOWED, 443), (ALLOWED, 80)]);

    let text = log_text(&log);
    assert!(
        text.contains("session test-session deny dns other.test: not in the allowlist"),
        "{text}"
    );
    assert!(
        text.contains("allow tcp allowed.test:443 -> 198.51.100.10"),
        "{text}"
    );
    assert!(
        text.contains("deny tcp allowed.test:443 (198.51.100.20)"),
        "{text}"
    );
    assert!(
        text.contains("deny dns rebind.allowed.test: it resolves to 127.0.0.1, a loopback address"),
        "{text}"
    );
}

#[tokio::test]
async fn explicit_port_entries_let_servers_speak_first() {
    let w = world();
    server(&w, GIT, 22, b"SSH-2.0-test\r\n").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut g, _) = start(
        &w,
        policy(Mode::Allowlist, &["git.test:22"]),
        dir.path(),
        None,
    )
    .await;
    assert_eq!(g.resolve("git.test").await, vec![GIT]);
    let ex = g.exchange(GIT, 22, b"SSH-2.0-client\r\n").await;
    assert!(
        ex.received
            .starts_with(b"SSH-2.0-test\r\necho:SSH-2.0-client"),
        "{ex:?}"
    );
    // Not on the web ports, not to another address.
    let ex = g
        .exchange(GIT, 443, &sni::build_client_hello(Some("git.test"), &[]))
        .await;
    assert!(!ex.received.starts_with(b"echo:"));
    let ex = g.exchange(OTHER, 22, b"x").await;
    assert!(ex.received.is_empty());
}

#[tokio::test]
async fn blocklist_blocks_at_dns_and_lets_the_rest_through_the_same_checks() {
    let w = world();
    server(&w, ALLOWED, 443, b"").await;
    server(&w, OTHER, 443, b"").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut g, _) = start(
        &w,
        policy(Mode::Blocklist, &["other.test"]),
        dir.path(),
        None,
    )
    .await;
    let nx = g.dns("other.test", RecordType::A).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(!w.asked.lock().unwrap().iter().any(|n| n == "other.test"));
    assert_eq!(g.resolve("allowed.test").await, vec![ALLOWED]);
    let hello = sni::build_client_hello(Some("allowed.test"), &[]);
    assert!(
        g.exchange(ALLOWED, 443, &hello)
            .await
            .received
            .starts_with(b"echo:")
    );
    // The blocked name by SNI at an allowed name's address.
    let blocked = sni::build_client_hello(Some("other.test"), &[]);
    assert!(
        !g.exchange(ALLOWED, 443, &blocked)
            .await
            .received
            .starts_with(b"echo:")
    );
}

#[tokio::test]
async fn hundreds_of_concurrent_connections() {
    let w = world();
    server(&w, ALLOWED, 80, b"").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut g, _) = start(
        &w,
        policy(Mode::Allowlist, &["allowed.test"]),
        dir.path(),
        None,
    )
    .await;
    g.resolve("allowed.test").await;
    let conns: Vec<_> = (0..300)
        .map(|i| {
            let h = g.connect(ALLOWED, 80);
            let mut req = http_get("allowed.test");
            req.extend_from_slice(format!("conn {i}").as_bytes());
            (h, req)
        })
        .collect();
    let out = g.exchange_on(conns).await;
    for (i, ex) in out.iter().enumerate() {
        assert!(ex.received.starts_with(b"echo:GET /"), "conn {i}: {ex:?}");
        assert!(
            ex.received.ends_with(format!("conn {i}").as_bytes()),
            "conn {i}"
        );
    }
}

#[tokio::test]
async fn host_connections_reach_the_guest_ssh_port() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (mut g, _) = start(&w, policy(Mode::Allowlist, &[]), dir.path(), Some(listener)).await;
    // The guest's sshd.
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 8192]),
        tcp::SocketBuffer::new(vec![0; 8192]),
    );
    s.listen(22).unwrap();
    let h = g.sockets.add(s);
    let client = tokio::spawn(async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"hello guest").await.unwrap();
        let mut buf = vec![0u8; 64];
        let n = c.read(&mut buf).await.unwrap();
        buf.truncate(n);
        buf
    });
    let mut got = Vec::new();
    let mut answered = false;
    g.run_until("the host's connection", |g| {
        let s = g.sockets.get_mut::<tcp::Socket>(h);
        let mut buf = [0u8; 64];
        if let Ok(n) = s.recv_slice(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        if got == b"hello guest" && !answered && s.can_send() {
            s.send_slice(b"hello host").unwrap();
            answered = true;
        }
        answered && s.send_queue() == 0
    })
    .await;
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if client.is_finished() {
                return client.await.unwrap();
            }
            g.run_until("a moment", |_| true).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(reply, b"hello host");
}

#[tokio::test]
async fn garbage_on_the_link_closes_it_without_a_panic() {
    let w = world();
    let (mut g_end, gw_end) = UnixStream::pair().unwrap();
    let settings = Settings {
        lan: Lan::default(),
        policy: policy(Mode::Allowlist, &[]),
        log: NetLog::none(),
        ssh_port: 22,
        host: HostAddrs::fixed(Vec::new()),
        host_ports: Vec::new(),
        limits: Limits::default(),
    };
    let task = tokio::spawn(gateway::serve(
        gw_end,
        settings,
        Arc::new(WorldResolver(w.clone())),
        Arc::new(WorldDialer(w)),
        None,
        None,
    ));
    // Valid-length frames of noise, then an impossible length.
    for i in 0..200u32 {
        let noise: Vec<u8> = (0..60 + i).map(|j| (j * 7 + i) as u8).collect();
        g_end.write_all(&frame::encode(&noise)).await.unwrap();
    }
    g_end.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_err(), "an impossible frame length must end the link");
}

#[tokio::test]
async fn ip_literal_names_are_refused_in_both_modes() {
    for mode in [Mode::Blocklist, Mode::Allowlist] {
        let w = world();
        server(&w, OTHER, 443, b"").await;
        server(&w, OTHER, 80, b"").await;
        let dir = tempfile::tempdir().unwrap();
        let entries: &[&str] = match mode {
            Mode::Blocklist => &["blocked.test"],
            Mode::Allowlist => &["**.other.test"],
        };
        let (mut g, log) = start(&w, policy(mode, entries), dir.path(), None).await;
        // Asked as names, in the forms the host's resolver would read as addresses:
        // never resolved, never pinned.
        for lit in ["198.51.100.20", "3325256724", "0xc6336414"] {
            let m = g.dns(lit, RecordType::A).await;
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::NXDomain,
                "{mode:?} {lit}"
            );
        }
        assert!(w.asked.lock().unwrap().is_empty(), "{mode:?}");
        // As the TLS server name or the HTTP Host, at the very address it names.
        let hello = sni::build_client_hello(Some("198.51.100.20"), &[]);
        let ex = g.exchange(OTHER, 443, &hello).await;
        assert_eq!(ex.received, [21, 3, 3, 0, 2, 2, 49], "{mode:?}");
        let ex = g.exchange(OTHER, 80, &http_get("198.51.100.20")).await;
        assert!(ex.received.starts_with(b"HTTP/1.1 403"), "{mode:?} {ex:?}");
        assert!(w.dialed.lock().unwrap().is_empty(), "{mode:?}");
        let text = log_text(&log);
        assert!(
            text.contains("deny dns 198.51.100.20: an IP address, not a name"),
            "{text}"
        );
        assert!(
            text.contains("deny tcp 198.51.100.20:443 (198.51.100.20): an IP address, not a name"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn the_hosts_own_addresses_are_refused() {
    let w = world();
    server(&w, HOST, 443, b"").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut g, log) = start_with(
        &w,
        policy(Mode::Blocklist, &[]),
        dir.path(),
        None,
        HostAddrs::fixed(vec![HOST.into()]),
        Limits::default(),
    )
    .await;
    let m = g.dns("self.test", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let ex = g
        .exchange(HOST, 443, &sni::build_client_hello(Some("self.test"), &[]))
        .await;
    assert!(ex.received.is_empty(), "{ex:?}");
    assert!(w.dialed.lock().unwrap().is_empty());
    let text = log_text(&log);
    assert!(
        text.contains("deny dns self.test: it resolves to 198.51.100.40, an address of this host"),
        "{text}"
    );
    assert!(
        text.contains("deny tcp 198.51.100.40:443: an address of this host"),
        "{text}"
    );
}

#[tokio::test]
async fn an_oversized_frame_is_dropped_and_the_link_stays_up() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let (mut g, log) = start(
        &w,
        policy(Mode::Allowlist, &["allowed.test"]),
        dir.path(),
        None,
    )
    .await;
    assert_eq!(g.resolve("allowed.test").await, vec![ALLOWED]);
    // What a guest that set its MTU to 9000 sends: a jumbo frame, cut anywhere.
    let mut jumbo = vec![0u8; 9014];
    jumbo[..6].copy_from_slice(&Lan::default().gateway_mac.0);
    jumbo[6..12].copy_from_slice(&GUEST_MAC.0);
    jumbo[12..14].copy_from_slice(&[0x08, 0x00]);
    let bytes = frame::encode(&jumbo);
    for part in bytes.chunks(1000) {
        g.link.write_all(part).await.unwrap();
    }
    assert_eq!(g.resolve("allowed.test").await, vec![ALLOWED]);
    let text = log_text(&log);
    assert!(
        text.contains("drop frame: 9014 bytes, over the link's 1500-byte MTU"),
        "{text}"
    );
}

#[tokio::test]
async fn an_idle_connection_outlives_the_socket_timeout() {
    let w = world();
    server(&w, GIT, 22, b"SSH-2.0-test\r\n").await;
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        keep_alive: Duration::from_millis(300),
        ..Limits::default()
    };
    let (mut g, _) = start_with(
        &w,
        policy(Mode::Allowlist, &["git.test:22"]),
        dir.path(),
        None,
        HostAddrs::fixed(Vec::new()),
        limits,
    )
    .await;
    g.resolve("git.test").await;
    let h = g.connect(GIT, 22);
    let mut got = Vec::new();
    g.run_until("the banner", |g| {
        let s = g.sockets.get_mut::<tcp::Socket>(h);
        let mut buf = [0u8; 256];
        while let Ok(n) = s.recv_slice(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got.ends_with(b"\r\n")
    })
    .await;
    // Silent both ways for many times the keep-alive interval (and so many times
    // any timeout that counted silence).
    g.idle(limits.keep_alive * 20).await;
    let ex = g.exchange_on(vec![(h, b"still there".to_vec())]).await;
    assert_eq!(ex[0].received, b"echo:still there", "{:?}", ex[0]);
}

#[tokio::test]
async fn host_ssh_has_slots_guest_connections_cannot_take() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let limits = Limits {
        connections: 3,
        ssh: 1,
        ..Limits::default()
    };
    let (mut g, log) = start_with(
        &w,
        policy(Mode::Allowlist, &["allowed.test"]),
        dir.path(),
        Some(listener),
        HostAddrs::fixed(Vec::new()),
        limits,
    )
    .await;
    g.resolve("allowed.test").await;
    let mut sshd = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 8192]),
        tcp::SocketBuffer::new(vec![0; 8192]),
    );
    sshd.listen(22).unwrap();
    let sshd = g.sockets.add(sshd);
    // The guest fills its share: three connections held open (silent).
    let held: Vec<_> = (0..3).map(|_| g.connect(ALLOWED, 443)).collect();
    g.run_until("the guest's connections", |g| {
        held.iter()
            .all(|h| g.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Established)
    })
    .await;
    // A fourth is refused.
    let extra = g.connect(ALLOWED, 443);
    g.idle(Duration::from_millis(500)).await;
    assert_ne!(
        g.sockets.get::<tcp::Socket>(extra).state(),
        tcp::State::Established
    );
    // The host's SSH connection still gets through.
    let client = tokio::spawn(async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"hello guest").await.unwrap();
    });
    let mut got = Vec::new();
    g.run_until("the host's SSH connection", |g| {
        let s = g.sockets.get_mut::<tcp::Socket>(sshd);
        let mut buf = [0u8; 64];
        if let Ok(n) = s.recv_slice(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        got == b"hello guest"
    })
    .await;
    client.await.unwrap();
    let text = log_text(&log);
    assert!(
        text.contains("deny tcp 198.51.100.10:443: 3 guest connections open already"),
        "{text}"
    );
}

#[tokio::test]
async fn half_open_connections_are_never_dialled_and_are_reaped() {
    let w = world();
    server(&w, GIT, 22, b"SSH-2.0-test\r\n").await;
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        connections: 2,
        ..Limits::default()
    };
    let (mut g, log) = start_with(
        &w,
        policy(Mode::Allowlist, &["git.test:22"]),
        dir.path(),
        None,
        HostAddrs::fixed(Vec::new()),
        limits,
    )
    .await;
    g.resolve("git.test").await;
    // A SYN with a bad checksum (the stack drops it) and two that never complete.
    g.raw_syn(GIT, 22, 50001, false).await;
    g.raw_syn(GIT, 22, 50002, true).await;
    g.raw_syn(GIT, 22, 50003, true).await;
    g.idle(Duration::from_secs(1)).await;
    assert!(
        w.dialed.lock().unwrap().is_empty(),
        "the host dialled for a handshake that never completed"
    );
    // Once they are reaped, their slots serve a real connection.
    g.idle(FLIGHT_TIMEOUT + Duration::from_secs(2)).await;
    let ex = g.exchange(GIT, 22, b"hi").await;
    assert!(ex.received.starts_with(b"SSH-2.0-test\r\n"), "{ex:?}");
    assert_eq!(w.dialed.lock().unwrap().clone(), vec![(GIT, 22)]);
    let text = log_text(&log);
    assert!(
        text.contains(
            "drop tcp 198.51.100.30:22 (git.test): the guest's TCP handshake did not complete within 10 s"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn granted_host_ports_reach_the_hosts_loopback_and_nothing_else_does() {
    let w = world();
    server(&w, Ipv4Addr::LOCALHOST, 5432, b"pg ").await;
    server(&w, Ipv4Addr::LOCALHOST, 6379, b"redis ").await;
    let dir = tempfile::tempdir().unwrap();
    let settings = {
        let mut ports = HOST_PORTS.lock().unwrap();
        *ports = vec![5432];
        ports.clone()
    };
    let (mut g, log) = start(&w, policy(Mode::Allowlist, &[]), dir.path(), None).await;
    HOST_PORTS.lock().unwrap().clear();
    assert_eq!(settings, vec![5432]);

    // The name resolves (whatever the allowlist says) to the alias on the LAN.
    assert_eq!(
        g.resolve(gateway::HOST_NAME).await,
        vec![gateway::HOST_ALIAS]
    );
    // A granted port: the host's 127.0.0.1, same port.
    let ex = g.exchange(gateway::HOST_ALIAS, 5432, b"select 1").await;
    assert!(ex.received.starts_with(b"pg echo:select 1"), "{ex:?}");
    // Any other port of the host, though something listens there: refused.
    let ex = g.exchange(gateway::HOST_ALIAS, 6379, b"ping").await;
    assert!(ex.received.is_empty(), "{ex:?}");
    let dialed = w.dialed.lock().unwrap().clone();
    assert_eq!(dialed, vec![(Ipv4Addr::LOCALHOST, 5432)]);
    let text = log_text(&log);
    assert!(
        text.contains("allow tcp host.vibebox.internal:5432"),
        "{text}"
    );
    assert!(
        text.contains("deny tcp host.vibebox.internal:6379: not a granted host port"),
        "{text}"
    );

    // Without a grant the name does not exist.
    let (mut g, log) = start(&w, policy(Mode::Blocklist, &[]), dir.path(), None).await;
    let nx = g.dns(gateway::HOST_NAME, RecordType::A).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    let ex = g.exchange(gateway::HOST_ALIAS, 5432, b"x").await;
    assert!(ex.received.is_empty(), "{ex:?}");
    assert!(
        log_text(&log).contains("deny dns host.vibebox.internal: no host port is granted"),
        "{}",
        log_text(&log)
    );
}

// ---- published guest ports, relayed by the gateway ----

/// A guest listener with room for a large transfer.
fn guest_listener(g: &mut Guest, port: u16) -> SocketHandle {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 << 10]),
        tcp::SocketBuffer::new(vec![0; 256 << 10]),
    );
    s.listen(port).unwrap();
    g.sockets.add(s)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Drives the guest stack until the host-side task is done, and returns its result.
async fn guest_while<T>(g: &mut Guest, task: tokio::task::JoinHandle<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !task.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "host side timed out"
        );
        g.run_until("a moment", |_| true).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    task.await.unwrap()
}

#[tokio::test]
async fn published_ports_are_relayed_whole_both_ways_up_to_the_fin() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, _, addr) = start_relaying(dir.path(), Limits::default(), 8000).await;
    let server = guest_listener(&mut g, 8000);
    let up = pattern(3 << 20, 1);
    let down = pattern(3 << 20, 2);
    // The host client sends everything and closes its side first; the guest answers
    // after reading it all and closes at once: the last bytes travel right before
    // the FIN, while the gateway's end is already half-closed.
    let client = {
        let up = up.clone();
        tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&up).await.unwrap();
            c.shutdown().await.unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            got
        })
    };
    let mut got = Vec::new();
    let mut to_send = down.clone();
    let mut closed = false;
    g.run_until("the guest's side of the transfer", |g| {
        let s = g.sockets.get_mut::<tcp::Socket>(server);
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = s.recv_slice(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        if got.len() == up.len() && s.can_send() {
            let n = s.send_slice(&to_send).unwrap_or(0);
            to_send.drain(..n);
        }
        if to_send.is_empty() && !closed {
            s.close();
            closed = true;
        }
        closed
    })
    .await;
    assert!(
        got == up,
        "host -> guest: {} of {} bytes, or not the same",
        got.len(),
        up.len()
    );
    let back = guest_while(&mut g, client).await;
    assert_eq!(
        back.len(),
        down.len(),
        "guest -> host: bytes lost before the FIN"
    );
    assert!(back == down, "guest -> host: not the same bytes");
}

#[tokio::test]
async fn a_host_end_that_goes_away_resets_the_guests() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, _, addr) = start_relaying(dir.path(), Limits::default(), 8000).await;
    let server = guest_listener(&mut g, 8000);
    // A host client that connects, reads a little and goes away without reading
    // the rest (its kernel resets the connection).
    let client = tokio::spawn(async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1000];
        c.read_exact(&mut buf).await.unwrap();
    });
    let chunk = pattern(64 << 10, 3);
    let mut finished = false;
    g.run_until("the guest's connection to be reset", |g| {
        finished |= client.is_finished();
        let s = g.sockets.get_mut::<tcp::Socket>(server);
        // The guest keeps sending, as a dev server streaming a response would.
        if s.can_send() {
            let _ = s.send_slice(&chunk);
        }
        finished && s.state() == tcp::State::Closed
    })
    .await;
}

#[tokio::test]
async fn relayed_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        relays: 2,
        ..Limits::default()
    };
    let (mut g, log, addr) = start_relaying(dir.path(), limits, 8000).await;
    let servers: Vec<_> = (0..3).map(|_| guest_listener(&mut g, 8000)).collect();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    g.run_until("two relayed connections", |g| {
        servers
            .iter()
            .filter(|h| g.sockets.get::<tcp::Socket>(**h).state() == tcp::State::Established)
            .count()
            == 2
    })
    .await;
    // A third is closed by the gateway without reaching the guest.
    let third = tokio::spawn(async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        c.read(&mut buf).await.unwrap_or(0)
    });
    assert_eq!(guest_while(&mut g, third).await, 0);
    let established = servers
        .iter()
        .filter(|h| g.sockets.get::<tcp::Socket>(**h).state() == tcp::State::Established)
        .count();
    assert_eq!(established, 2);
    let text = log_text(&log);
    assert!(
        text.contains(
            "refuse a host connection to VM:8000: 2 connections to published ports open already"
        ),
        "{text}"
    );
    drop(held);
}
