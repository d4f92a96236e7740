//! The gateway: the guest's only link to the world. QEMU's NIC is a `-netdev stream`
//! connected to a unix socket here; frames go into a userspace TCP/IP stack
//! (smoltcp) that answers for every address, so each guest TCP connection ends in the
//! gateway. The gateway serves DHCP and DNS itself, reads the first flight of each
//! connection (TLS SNI or HTTP Host), checks it against the policy and the pin set
//! ([`super::decide`]), and only then dials from the host and relays. Everything else
//! (UDP but DNS to the gateway, ICMP beyond it, IPv6) goes nowhere.
//!
//! One task owns the stack; host sockets live in small tasks that talk to it over
//! channels, with credit-based flow control both ways so neither side can make the
//! gateway buffer without bound.
//!
//! The other way, host connections come in: to the guest's SSH port (the
//! supervisor's own listener), and to published guest ports ([`Inbound`]: the
//! supervisor accepts on the host's loopback and hands each connection over). Both
//! are opened from the gateway's address to the guest's, in clear: the link is a
//! unix socket between this process and QEMU, no network sees it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr, IpEndpoint,
    IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;

use super::decide::{self, Deny, Flight, Pins, Policy};
use super::device::Queues;
use super::dhcp::{self, Lan};
use super::dns::{self, Reply};
use super::frame;
use super::http::{self, Head};
use super::netlog::NetLog;
use super::ranges::{self, HostAddrs};
use super::sni::{self, Hello};
use super::upstream::{Dialer, Resolver};

/// How long a guest may take to send the first flight of a connection.
pub const FLIGHT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a first flight may be before the gateway gives up on reading a name.
pub const MAX_FLIGHT: usize = sni::MAX_HELLO + 1024;
/// Guest connections at once (each costs its socket buffers and a host socket).
pub const MAX_CONNECTIONS: usize = 1024;
/// Host SSH connections at once, on top of the guest's: the user's way in must not
/// depend on how many connections the guest holds.
pub const SSH_CONNECTIONS: usize = 32;
/// Host connections to published guest ports at once (their own share, so neither
/// a guest's connections nor a host client opening many can take the others').
pub const RELAY_CONNECTIONS: usize = 512;
/// How often an idle relayed connection is probed (TCP keep-alive, both ends).
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// The name the guest uses for this machine's granted loopback services
/// (`[ports] host`), and the address the gateway answers for it (on the guest's LAN,
/// so the guest routes it here; the host end is always 127.0.0.1).
pub const HOST_NAME: &str = "host.vibebox.internal";
pub const HOST_ALIAS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 4);
/// Host resolutions in flight at once; past this the guest gets SERVFAIL (a guest
/// must not be able to make the host resolve without bound).
const MAX_RESOLVING: usize = 256;
/// TTL given to the guest for DNS answers.
const DNS_TTL: u32 = 60;
/// Socket buffers of a guest's own connection (there may be a thousand of them).
const RX_BUF: usize = 64 << 10;
const TX_BUF: usize = 64 << 10;
/// Socket buffers of a host connection into the guest (SSH, a published port):
/// fewer of them, and a window of 64 KiB caps a transfer to a fraction of what
/// the link carries (64 MiB took 12 s through 64 KiB, under 2 s through 512 KiB).
const INBOUND_BUF: usize = 512 << 10;
/// Chunks in flight from a host socket to the guest per connection.
const HOST_CREDIT: usize = 4;
const CHUNK: usize = 64 << 10;

pub struct Settings {
    pub lan: Lan,
    pub policy: Policy,
    pub log: NetLog,
    /// Where host-side SSH connections go in the guest.
    pub ssh_port: u16,
    /// The host's own addresses, refused like loopback.
    pub host: HostAddrs,
    /// Host loopback ports the guest may reach at [`HOST_NAME`] (granted).
    pub host_ports: Vec<u16>,
    pub limits: Limits,
}

/// Bounds on what the guest can hold open. The defaults are what the supervisor
/// uses unless its file-descriptor limit is too low for them; tests shrink them to
/// reach the bounds quickly.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Guest connections at once.
    pub connections: usize,
    /// Host SSH connections at once, never taken by guest connections.
    pub ssh: usize,
    /// Host connections to published guest ports at once.
    pub relays: usize,
    /// Keep-alive interval toward the guest; a guest end that answers nothing (not
    /// even the probes) for four intervals is dropped.
    pub keep_alive: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections: MAX_CONNECTIONS,
            ssh: SSH_CONNECTIONS,
            relays: RELAY_CONNECTIONS,
            keep_alive: KEEP_ALIVE,
        }
    }
}

enum Event {
    Resolved {
        query: dns::Query,
        from: IpEndpoint,
        result: io::Result<Vec<Ipv4Addr>>,
    },
    Dialed {
        id: u64,
        result: io::Result<TcpStream>,
    },
    HostData {
        id: u64,
        data: Vec<u8>,
    },
    HostEof {
        id: u64,
    },
    /// The host end failed (reset, or it stopped taking data): the guest's end is
    /// reset too, not left waiting for a peer that is gone.
    HostGone {
        id: u64,
    },
}

/// A host connection for a published guest port, accepted by the supervisor: the
/// gateway opens `guest_port` on the guest's address and relays.
pub struct Inbound {
    pub stream: TcpStream,
    pub guest_port: u16,
}

/// Who opened a connection, for the bound it counts against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The guest, to the world ([`Limits::connections`]).
    Guest,
    /// The host, to the guest's SSH port ([`Limits::ssh`]).
    Ssh,
    /// The host, to a published guest port ([`Limits::relays`]).
    Relay,
}

/// Every phase but `Relay` has a deadline, so a connection the guest (or the far
/// end) leaves half-done never holds a slot and a host socket for good; a relayed
/// one is kept as long as both ends answer keep-alives, however silent.
enum Phase {
    /// Reading the guest's first bytes (the handshake included).
    Flight {
        buf: Vec<u8>,
        deadline: SInstant,
    },
    /// Decided by destination already; waiting for the guest to complete the
    /// handshake before the host dials (a SYN alone costs the host nothing).
    Handshake {
        deadline: SInstant,
    },
    /// Dialling; `pending` is what the guest already sent.
    Dialing {
        pending: Vec<u8>,
        deadline: SInstant,
    },
    Relay(Relay),
    /// Waiting for the stack to finish with the socket.
    Closing {
        deadline: SInstant,
    },
}

impl Phase {
    fn deadline(&self) -> Option<SInstant> {
        match self {
            Phase::Flight { deadline, .. }
            | Phase::Handshake { deadline }
            | Phase::Dialing { deadline, .. }
            | Phase::Closing { deadline } => Some(*deadline),
            Phase::Relay(_) => None,
        }
    }

    fn closing() -> Phase {
        Phase::Closing {
            deadline: now() + CLOSE_TIMEOUT.into(),
        }
    }
}

/// How long a refused or finished connection may take to close before it is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a dial may take before the connection is dropped (the dialer's own
/// timeout, with room to spare, for dialers that have none).
const DIAL_DEADLINE: Duration = Duration::from_secs(20);
/// Unanswered keep-alive intervals after which an end is taken for dead.
const KEEP_ALIVE_MISSES: u32 = 4;

struct Relay {
    to_host: Option<mpsc::Sender<Vec<u8>>>,
    /// What the guest sent before its socket closed and the writer has not taken
    /// yet: still delivered (bounded by the socket's receive buffer).
    tail: VecDeque<Vec<u8>>,
    from_host: VecDeque<Vec<u8>>,
    credit: Arc<Semaphore>,
    host_eof: bool,
    /// Writer, reader. The writer is never aborted while it has the guest's last
    /// bytes to deliver, only past `closed_at` + [`CLOSE_TIMEOUT`].
    tasks: [AbortHandle; 2],
    /// When the guest's socket closed.
    closed_at: Option<SInstant>,
}

/// An IPv4 address and port.
type Addr = (Ipv4Addr, u16);

struct Conn {
    handle: SocketHandle,
    /// The guest's end, as its SYN gave it (for telling retransmits apart).
    src: Addr,
    dst: Addr,
    name: Option<String>,
    phase: Phase,
    origin: Origin,
}

/// The stack's clock: monotonic, counted from the first call. smoltcp's own
/// `Instant::now()` reads the wall clock, which a clock step or an NTP correction
/// moves by any amount: every retransmit, keep-alive and timeout would fire at once.
/// (The monotonic clock also stands still while the host sleeps, so a laptop's
/// resume does not time connections out either.)
fn now() -> SInstant {
    static START: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    SInstant::from_micros(START.elapsed().as_micros() as i64)
}

struct Engine {
    s: Settings,
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    dns_socket: SocketHandle,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    next_local_port: u16,
    pins: Pins,
    resolving: usize,
    events_tx: mpsc::UnboundedSender<Event>,
    resolver: Arc<dyn Resolver>,
    dialer: Arc<dyn Dialer>,
    /// When an oversized frame was last logged, and how many were dropped since.
    oversized: (Option<SInstant>, usize),
    /// Rung by a host writer when it took a chunk, so the guest's window reopens
    /// at once rather than at the next frame or timer.
    wake: Arc<tokio::sync::Notify>,
}

/// Serves the guest on `link` (QEMU's stream socket) until QEMU closes it. `ssh`, if
/// given, is a host listener whose connections are relayed to the guest's SSH port;
/// `inbound`, if given, brings host connections for published guest ports.
pub async fn serve(
    link: UnixStream,
    settings: Settings,
    resolver: Arc<dyn Resolver>,
    dialer: Arc<dyn Dialer>,
    ssh: Option<TcpListener>,
    mut inbound: Option<mpsc::Receiver<Inbound>>,
) -> io::Result<()> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut e = Engine::new(settings, resolver, dialer, events_tx);
    let wake = e.wake.clone();
    let (mut rd, mut wr) = link.into_split();
    let mut decoder = frame::Decoder::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut out = Vec::new();
    loop {
        e.step();
        // One write for everything the stack sent: a frame a syscall costs more
        // than the copy.
        for f in std::mem::take(&mut e.dev.tx) {
            frame::encode_into(&f, &mut out);
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
        let delay = e.next_wake();
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                decoder.push(&buf[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(f)) => e.ingress(f),
                        Ok(None) => break,
                        Err(err) => return Err(io::Error::new(io::ErrorKind::InvalidData, err)),
                    }
                }
                if let Some((count, len)) = decoder.take_dropped() {
                    e.oversized(count, len);
                }
            }
            ev = events.recv() => {
                if let Some(ev) = ev {
                    e.event(ev);
                }
                // Take whatever else is ready before polling the stack again.
                while let Ok(ev) = events.try_recv() {
                    e.event(ev);
                }
            }
            conn = async { ssh.as_ref().expect("guarded").accept().await }, if ssh.is_some() => {
                if let Ok((stream, _)) = conn {
                    let port = e.s.ssh_port;
                    e.inbound(stream, port, Origin::Ssh);
                }
            }
            conn = async { inbound.as_mut().expect("guarded").recv().await }, if inbound.is_some() => {
                match conn {
                    Some(c) => e.inbound(c.stream, c.guest_port, Origin::Relay),
                    None => inbound = None,
                }
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

impl Engine {
    fn new(
        s: Settings,
        resolver: Arc<dyn Resolver>,
        dialer: Arc<dyn Dialer>,
        events_tx: mpsc::UnboundedSender<Event>,
    ) -> Engine {
        let mut dev = Queues::default();
        let mut cfg = IfaceConfig::new(HardwareAddress::Ethernet(s.lan.gateway_mac));
        cfg.random_seed = u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
        let mut iface = Interface::new(cfg, &mut dev, now());
        let (gw, dns_ip, len) = (s.lan.gateway, s.lan.dns, s.lan.prefix_len);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(gw), len));
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(dns_ip), len));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
        // Answer for every destination: each guest connection ends here.
        iface.set_any_ip(true);
        let mut sockets = SocketSet::new(Vec::new());
        let mut udp_sock = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 << 10]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 << 10]),
        );
        let _ = udp_sock.bind(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(dns_ip)),
            port: 53,
        });
        let dns_socket = sockets.add(udp_sock);
        Engine {
            s,
            iface,
            dev,
            sockets,
            dns_socket,
            conns: HashMap::new(),
            next_id: 1,
            next_local_port: 49152,
            pins: Pins::default(),
            resolving: 0,
            events_tx,
            resolver,
            dialer,
            oversized: (None, 0),
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Frames over the MTU are dropped (the guest's TCP still works: the gateway
    /// offers a 1460-byte MSS). Logged at most once a second, with a count, since a
    /// guest can send them as fast as it likes.
    fn oversized(&mut self, count: usize, len: usize) {
        let (last, pending) = &mut self.oversized;
        *pending += count;
        if last.is_some_and(|t| now() < t + Duration::from_secs(1).into()) {
            return;
        }
        let n = std::mem::take(pending);
        *last = Some(now());
        let more = if n > 1 {
            format!(" ({n} such frames dropped)")
        } else {
            String::new()
        };
        self.s.log.line(&format!(
            "drop frame: {len} bytes, over the link's 1500-byte MTU{more}"
        ));
    }

    fn guest_conns(&self) -> usize {
        self.count(Origin::Guest)
    }

    fn count(&self, origin: Origin) -> usize {
        self.conns.values().filter(|c| c.origin == origin).count()
    }

    /// A frame from the guest: DHCP is answered here, new TCP connections decided,
    /// IPv4 and ARP go to the stack, anything else is dropped.
    fn ingress(&mut self, f: Vec<u8>) {
        if let Some(reply) = dhcp::answer(&f, &self.s.lan) {
            self.dev.tx.push(reply);
            return;
        }
        let Ok(eth) = EthernetFrame::new_checked(&f[..]) else {
            return;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => {}
            EthernetProtocol::Ipv4 => {
                if let Some((src, (dst, port))) = syn_endpoints(eth.payload()) {
                    self.on_syn(src, dst, port);
                }
            }
            _ => return,
        }
        self.dev.rx.push_back(f);
    }

    fn on_syn(&mut self, src: Addr, dst: Ipv4Addr, port: u16) {
        // A retransmitted SYN: its listener exists. (The stack may give a SYN to any
        // listener of the same destination; all of them were decided alike.)
        let remote = IpEndpoint::new(src.0.into(), src.1);
        let taken = self.conns.values().any(|c| {
            let sock = self.sockets.get::<tcp::Socket>(c.handle);
            c.dst == (dst, port) && (c.src == src || sock.remote_endpoint() == Some(remote))
        });
        if taken {
            return;
        }
        if dst == HOST_ALIAS {
            self.host_service(src, port);
            return;
        }
        let lan = &self.s.lan;
        if dst == lan.gateway || dst == lan.dns {
            return; // nothing listens there: the stack resets it
        }
        if let Some(why) = ranges::forbidden(IpAddr::V4(dst)) {
            self.s
                .log
                .line(&format!("deny tcp {dst}:{port}: {why} address"));
            return;
        }
        if self.s.host.contains(IpAddr::V4(dst)) {
            self.s
                .log
                .line(&format!("deny tcp {dst}:{port}: an address of this host"));
            return;
        }
        if self.guest_conns() >= self.s.limits.connections {
            self.s.log.line(&format!(
                "deny tcp {dst}:{port}: {} guest connections open already",
                self.s.limits.connections
            ));
            return;
        }
        let (phase, name) = match decide::by_destination(&self.s.policy, &self.pins, dst, port) {
            Some(Err(d)) => {
                self.deny_log("tcp", dst, port, None, &d);
                return;
            }
            Some(Ok(name)) => (
                Phase::Handshake {
                    deadline: now() + FLIGHT_TIMEOUT.into(),
                },
                Some(name),
            ),
            None => (
                Phase::Flight {
                    buf: Vec::new(),
                    deadline: now() + FLIGHT_TIMEOUT.into(),
                },
                None,
            ),
        };
        self.accept_guest(src, (dst, port), name, phase);
    }

    /// A listener for the guest's SYN to `dst`, decided already: the stack completes
    /// the handshake on it, and `phase` goes on from there.
    fn accept_guest(&mut self, src: Addr, dst: Addr, name: Option<String>, phase: Phase) {
        let mut sock = tcp_socket(&self.s.limits, RX_BUF, TX_BUF);
        if sock
            .listen(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(dst.0)),
                port: dst.1,
            })
            .is_err()
        {
            return;
        }
        let handle = self.sockets.add(sock);
        let id = self.new_id();
        self.conns.insert(
            id,
            Conn {
                handle,
                src,
                dst,
                name,
                phase,
                origin: Origin::Guest,
            },
        );
    }

    /// A guest connection to [`HOST_ALIAS`]: to a granted port it goes to the same
    /// port on the host's 127.0.0.1 once the handshake completes; to any other it is
    /// refused and logged.
    fn host_service(&mut self, src: Addr, port: u16) {
        if !self.s.host_ports.contains(&port) {
            self.s.log.line(&format!(
                "deny tcp {HOST_NAME}:{port}: not a granted host port ([ports] host)"
            ));
            return;
        }
        if self.guest_conns() >= self.s.limits.connections {
            self.s.log.line(&format!(
                "deny tcp {HOST_NAME}:{port}: {} guest connections open already",
                self.s.limits.connections
            ));
            return;
        }
        self.accept_guest(
            src,
            (HOST_ALIAS, port),
            Some(HOST_NAME.to_string()),
            Phase::Handshake {
                deadline: now() + FLIGHT_TIMEOUT.into(),
            },
        );
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn dial(&self, id: u64, ip: Ipv4Addr, port: u16) {
        let dialer = self.dialer.clone();
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let result = dialer.dial(ip, port).await;
            let _ = tx.send(Event::Dialed { id, result });
        });
    }

    /// A host connection to the guest's SSH server or to a published guest port.
    fn inbound(&mut self, stream: TcpStream, port: u16, origin: Origin) {
        let open = self.count(origin);
        let (limit, what) = match origin {
            Origin::Ssh => (self.s.limits.ssh, "SSH connections"),
            _ => (self.s.limits.relays, "connections to published ports"),
        };
        if open >= limit {
            self.s.log.line(&format!(
                "refuse a host connection to VM:{port}: {open} {what} open already"
            ));
            return;
        }
        let mut sock = tcp_socket(&self.s.limits, INBOUND_BUF, INBOUND_BUF);
        // A local port no open connection to the guest uses (the guest would take
        // a reused pair for a retransmit of the old one).
        let mut local = self.next_local_port;
        for _ in 0..=(u16::MAX - 49152) {
            let used = self
                .conns
                .values()
                .any(|c| c.src == (self.s.lan.gateway, local));
            if !used {
                break;
            }
            local = if local == u16::MAX { 49152 } else { local + 1 };
        }
        self.next_local_port = if local == u16::MAX { 49152 } else { local + 1 };
        let guest = IpEndpoint::new(IpAddress::Ipv4(self.s.lan.guest), port);
        let from = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(self.s.lan.gateway)),
            port: local,
        };
        if sock.connect(self.iface.context(), guest, from).is_err() {
            return;
        }
        let handle = self.sockets.add(sock);
        let id = self.new_id();
        let relay = self.relay(id, stream);
        self.conns.insert(
            id,
            Conn {
                handle,
                src: (self.s.lan.gateway, local),
                dst: (self.s.lan.guest, port),
                name: None,
                phase: Phase::Relay(relay),
                origin,
            },
        );
    }

    /// Starts the two tasks that move bytes between a host socket and the stack.
    fn relay(&self, id: u64, stream: TcpStream) -> Relay {
        let _ = stream.set_nodelay(true);
        keep_alive(&stream, self.s.limits.keep_alive);
        let (mut rd, mut wr) = stream.into_split();
        let (to_host, mut chunks) = mpsc::channel::<Vec<u8>>(HOST_CREDIT);
        let writer = {
            let tx = self.events_tx.clone();
            let wake = self.wake.clone();
            tokio::spawn(async move {
                while let Some(c) = chunks.recv().await {
                    if wr.write_all(&c).await.is_err() {
                        let _ = tx.send(Event::HostGone { id });
                        return;
                    }
                    wake.notify_one();
                }
                let _ = wr.shutdown().await;
                wake.notify_one();
            })
        };
        let credit = Arc::new(Semaphore::new(HOST_CREDIT));
        let reader = {
            let credit = credit.clone();
            let tx = self.events_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let Ok(permit) = credit.acquire().await else {
                        return;
                    };
                    permit.forget();
                    match rd.read(&mut buf).await {
                        Ok(0) => {
                            let _ = tx.send(Event::HostEof { id });
                            return;
                        }
                        Err(_) => {
                            let _ = tx.send(Event::HostGone { id });
                            return;
                        }
                        Ok(n) => {
                            if tx
                                .send(Event::HostData {
                                    id,
                                    data: buf[..n].to_vec(),
                                })
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            })
        };
        Relay {
            to_host: Some(to_host),
            tail: VecDeque::new(),
            from_host: VecDeque::new(),
            credit,
            host_eof: false,
            tasks: [writer.abort_handle(), reader.abort_handle()],
            closed_at: None,
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Resolved {
                query,
                from,
                result,
            } => self.resolved(query, from, result),
            Event::Dialed { id, result } => {
                let Some(c) = self.conns.get_mut(&id) else {
                    return;
                };
                let Phase::Dialing { pending, .. } = &mut c.phase else {
                    return;
                };
                let pending = std::mem::take(pending);
                let (dst, name, handle) = (c.dst, c.name.clone(), c.handle);
                match result {
                    Ok(stream) => {
                        let relay = self.relay(id, stream);
                        if !pending.is_empty()
                            && let Some(tx) = &relay.to_host
                        {
                            let _ = tx.try_send(pending);
                        }
                        if let Some(c) = self.conns.get_mut(&id) {
                            c.phase = Phase::Relay(relay);
                        }
                    }
                    Err(err) => {
                        self.s.log.line(&format!(
                            "fail tcp {}:{} ({}): cannot connect from the host: {err}",
                            dst.0,
                            dst.1,
                            name.unwrap_or_default()
                        ));
                        self.sockets.get_mut::<tcp::Socket>(handle).abort();
                        if let Some(c) = self.conns.get_mut(&id) {
                            c.phase = Phase::closing();
                        }
                    }
                }
            }
            Event::HostData { id, data } => {
                if let Some(Conn {
                    phase: Phase::Relay(r),
                    ..
                }) = self.conns.get_mut(&id)
                {
                    r.from_host.push_back(data);
                }
            }
            Event::HostEof { id } => {
                if let Some(Conn {
                    phase: Phase::Relay(r),
                    ..
                }) = self.conns.get_mut(&id)
                {
                    r.host_eof = true;
                }
            }
            Event::HostGone { id } => {
                if let Some(c) = self.conns.get_mut(&id)
                    && let Phase::Relay(r) = &mut c.phase
                {
                    self.sockets.get_mut::<tcp::Socket>(c.handle).abort();
                    r.to_host = None;
                    r.tail.clear();
                    r.from_host.clear();
                }
            }
        }
    }

    /// Polls the stack and moves every connection forward, until nothing changes.
    fn step(&mut self) {
        for _ in 0..64 {
            self.iface.poll(now(), &mut self.dev, &mut self.sockets);
            let moved = self.dns() | self.pump();
            if !moved && self.dev.rx.is_empty() {
                break;
            }
        }
    }

    fn next_wake(&mut self) -> Duration {
        let mut d = self
            .iface
            .poll_delay(now(), &self.sockets)
            .map_or(Duration::from_secs(1), Duration::from);
        // A closed relay waiting for its writer is looked at again soon.
        if self
            .conns
            .values()
            .any(|c| matches!(&c.phase, Phase::Relay(r) if r.closed_at.is_some()))
        {
            d = d.min(Duration::from_millis(50));
        }
        for c in self.conns.values() {
            if let Some(deadline) = c.phase.deadline() {
                let left = if deadline > now() {
                    Duration::from(deadline - now())
                } else {
                    Duration::ZERO
                };
                d = d.min(left);
            }
        }
        d.min(Duration::from_secs(1))
    }

    /// Guest DNS queries: denied names are answered here and never leave the host;
    /// allowed ones are resolved on the host (see `resolved`).
    fn dns(&mut self) -> bool {
        let mut moved = false;
        loop {
            let sock = self.sockets.get_mut::<udp::Socket>(self.dns_socket);
            let Ok((bytes, meta)) = sock.recv() else {
                break;
            };
            moved = true;
            let from = meta.endpoint;
            let q = match dns::parse_query(bytes) {
                Ok(q) => q,
                Err(dns::Bad::Answer(reply)) => {
                    let _ = sock.send_slice(&reply, from);
                    continue;
                }
                Err(dns::Bad::Drop) => continue,
            };
            if q.name == HOST_NAME {
                let reply = if self.s.host_ports.is_empty() {
                    self.s.log.line(&format!(
                        "deny dns {HOST_NAME}: no host port is granted ([ports] host)"
                    ));
                    Reply::NxDomain
                } else if q.qtype == hickory_proto::rr::RecordType::A {
                    Reply::Addresses(vec![HOST_ALIAS], DNS_TTL)
                } else {
                    Reply::NoData
                };
                let _ = sock.send_slice(&dns::reply(&q, &reply), from);
                continue;
            }
            if let Err(d) = self.s.policy.name(&q.name) {
                let reply = dns::reply(&q, &Reply::NxDomain);
                let _ = sock.send_slice(&reply, from);
                self.s.log.line(&format!("deny dns {}: {d}", q.name));
                continue;
            }
            if q.qtype != hickory_proto::rr::RecordType::A {
                // Only IPv4 addresses are offered (no AAAA, HTTPS, TXT, ...).
                let _ = sock.send_slice(&dns::reply(&q, &Reply::NoData), from);
                continue;
            }
            if self.resolving >= MAX_RESOLVING {
                let _ = sock.send_slice(&dns::reply(&q, &Reply::ServFail), from);
                continue;
            }
            self.resolving += 1;
            let resolver = self.resolver.clone();
            let tx = self.events_tx.clone();
            tokio::spawn(async move {
                let result = resolver.resolve(&q.name).await;
                let _ = tx.send(Event::Resolved {
                    query: q,
                    from,
                    result,
                });
            });
        }
        moved
    }

    fn resolved(&mut self, q: dns::Query, from: IpEndpoint, result: io::Result<Vec<Ipv4Addr>>) {
        self.resolving = self.resolving.saturating_sub(1);
        let reply = match result {
            Ok(ips) if ips.is_empty() => Reply::NoData,
            Ok(ips) => {
                let host = &mut self.s.host;
                if let Some((ip, why)) = ips.iter().find_map(|ip| {
                    ranges::forbidden(IpAddr::V4(*ip))
                        .map(|w| (ip, format!("a {w} address")))
                        .or_else(|| {
                            host.contains(IpAddr::V4(*ip))
                                .then(|| (ip, "an address of this host".to_string()))
                        })
                }) {
                    self.s
                        .log
                        .line(&format!("deny dns {}: it resolves to {ip}, {why}", q.name));
                    Reply::ServFail
                } else {
                    self.pins.pin(&q.name, &ips);
                    Reply::Addresses(ips, DNS_TTL)
                }
            }
            Err(err) => {
                self.s.log.line(&format!(
                    "fail dns {}: the host cannot resolve it: {err}",
                    q.name
                ));
                Reply::ServFail
            }
        };
        let sock = self.sockets.get_mut::<udp::Socket>(self.dns_socket);
        let _ = sock.send_slice(&dns::reply(&q, &reply), from);
    }

    /// Moves bytes and decisions along for every connection; true if anything moved.
    fn pump(&mut self) -> bool {
        let mut moved = false;
        let mut gone = Vec::new();
        let mut reaped = Vec::new();
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let sock = self.sockets.get_mut::<tcp::Socket>(c.handle);
            let expired = c.phase.deadline().is_some_and(|d| now() > d);
            let handshaking = matches!(sock.state(), tcp::State::Listen | tcp::State::SynReceived);
            // An established connection past its flight deadline is refused below,
            // in words the guest understands; anything else past its deadline goes.
            let reap = expired && (handshaking || !matches!(c.phase, Phase::Flight { .. }));
            match &mut c.phase {
                _ if reap => {
                    // A handshake never completed, a dial or a close that hangs.
                    sock.abort();
                    gone.push(id);
                    let what = match c.phase {
                        Phase::Flight { .. } | Phase::Handshake { .. } => {
                            "the guest's TCP handshake did not complete within 10 s"
                        }
                        Phase::Dialing { .. } => "the host's connection did not open in time",
                        _ => "the connection did not close in time",
                    };
                    reaped.push((c.dst, c.name.clone(), what));
                }
                Phase::Flight { .. } | Phase::Handshake { .. } if handshaking => {}
                Phase::Handshake { .. } => {
                    if matches!(sock.state(), tcp::State::Closed) {
                        gone.push(id);
                        continue;
                    }
                    let (dst, name) = (c.dst, c.name.clone().unwrap_or_default());
                    c.phase = Phase::Dialing {
                        pending: Vec::new(),
                        deadline: now() + DIAL_DEADLINE.into(),
                    };
                    moved = true;
                    self.allow_log(dst.0, dst.1, &name);
                    // A granted host service is this machine's loopback, never the
                    // alias itself.
                    let to = if dst.0 == HOST_ALIAS {
                        Ipv4Addr::LOCALHOST
                    } else {
                        dst.0
                    };
                    self.dial(id, to, dst.1);
                }
                Phase::Flight { buf, deadline } => {
                    let mut tmp = [0u8; 4096];
                    while buf.len() < MAX_FLIGHT
                        && let Ok(n) = sock.recv_slice(&mut tmp)
                        && n > 0
                    {
                        buf.extend_from_slice(&tmp[..n]);
                        moved = true;
                    }
                    let verdict = read_flight(buf);
                    let closed = guest_sent_fin(sock);
                    let expired = now() > *deadline || matches!(sock.state(), tcp::State::Closed);
                    let dst = c.dst;
                    let flight = match verdict {
                        FlightRead::Wait if !(closed || expired || buf.len() >= MAX_FLIGHT) => {
                            continue;
                        }
                        FlightRead::Wait => Err(Deny {
                            why: if expired {
                                "no TLS ClientHello or HTTP request within 10 s".into()
                            } else {
                                "the first flight ended before it named a server".into()
                            },
                            rule: None,
                        }),
                        FlightRead::Bad(m) => Err(Deny {
                            why: m.into(),
                            rule: None,
                        }),
                        FlightRead::Got(f) => Ok(f),
                    };
                    // The name the flight claimed, for the log line of a denial.
                    let claimed = match &flight {
                        Ok(Flight::Tls { name, .. }) => name.clone(),
                        Ok(Flight::Http { host, .. }) => Some(host.clone()),
                        _ => None,
                    };
                    let decided = flight.and_then(|f| {
                        decide::by_flight(&self.s.policy, &self.pins, dst.0, dst.1, &f)
                    });
                    moved = true;
                    match decided {
                        Ok(name) => {
                            let pending = std::mem::take(buf);
                            c.name = Some(name.clone());
                            c.phase = Phase::Dialing {
                                pending,
                                deadline: now() + DIAL_DEADLINE.into(),
                            };
                            self.allow_log(dst.0, dst.1, &name);
                            self.dial(id, dst.0, dst.1);
                        }
                        Err(d) => {
                            refuse(sock, first_flight_kind(buf), &d);
                            c.phase = Phase::closing();
                            self.deny_log("tcp", dst.0, dst.1, claimed.as_deref(), &d);
                        }
                    }
                }
                Phase::Dialing { pending, .. } => {
                    // Keep what the guest sends meanwhile, within the flight bound.
                    let mut tmp = [0u8; 4096];
                    while pending.len() < MAX_FLIGHT
                        && let Ok(n) = sock.recv_slice(&mut tmp)
                        && n > 0
                    {
                        pending.extend_from_slice(&tmp[..n]);
                    }
                    if matches!(sock.state(), tcp::State::Closed) {
                        gone.push(id);
                    }
                }
                Phase::Relay(r) => {
                    moved |= pump_relay(sock, r);
                    if matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait) {
                        // The guest's last bytes still go to the host: the socket
                        // goes now, the writer once it has delivered them.
                        let closed_at = *r.closed_at.get_or_insert_with(now);
                        moved |= take_tail(sock, r);
                        let delivered = r.to_host.is_none() && r.tasks[0].is_finished();
                        if delivered || now() > closed_at + CLOSE_TIMEOUT.into() {
                            gone.push(id);
                        }
                    }
                }
                Phase::Closing { .. } => {
                    if matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait) {
                        gone.push(id);
                    }
                }
            }
        }
        for ((ip, port), name, what) in reaped {
            let who = match name {
                Some(n) => format!("{ip}:{port} ({n})"),
                None => format!("{ip}:{port}"),
            };
            self.s.log.line(&format!("drop tcp {who}: {what}"));
        }
        for id in gone {
            if let Some(c) = self.conns.remove(&id) {
                if let Phase::Relay(r) = &c.phase {
                    for t in &r.tasks {
                        t.abort();
                    }
                }
                self.sockets.remove(c.handle);
                moved = true;
            }
        }
        moved
    }

    fn deny_log(&mut self, proto: &str, ip: Ipv4Addr, port: u16, name: Option<&str>, d: &Deny) {
        let who = match name {
            Some(n) => format!("{n}:{port} ({ip})"),
            None => format!("{ip}:{port}"),
        };
        self.s.log.line(&format!("deny {proto} {who}: {d}"));
    }

    fn allow_log(&mut self, ip: Ipv4Addr, port: u16, name: &str) {
        self.s.log.line(&format!("allow tcp {name}:{port} -> {ip}"));
    }
}

/// Whether the guest has closed its sending side (not merely: not connected yet).
fn guest_sent_fin(sock: &tcp::Socket) -> bool {
    use tcp::State::*;
    matches!(
        sock.state(),
        CloseWait | LastAck | Closing | TimeWait | Closed
    )
}

fn tcp_socket(limits: &Limits, rx: usize, tx: usize) -> tcp::Socket<'static> {
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; rx]),
        tcp::SocketBuffer::new(vec![0u8; tx]),
    );
    sock.set_nagle_enabled(false);
    // smoltcp's timeout counts the guest's silence, not only unanswered data: alone,
    // it would cut an idle connection (a long poll, an idle database session).
    // With keep-alive probes a live guest answers every interval, so only a guest
    // end that is gone runs into it.
    sock.set_keep_alive(Some(limits.keep_alive.into()));
    sock.set_timeout(Some((limits.keep_alive * KEEP_ALIVE_MISSES).into()));
    sock
}

/// TCP keep-alive on the host socket of a relayed connection: a far end that went
/// away without a word is noticed (and the guest's connection closed) after about
/// the same time the guest side allows, without a timer of our own that would cut
/// a silent but healthy connection.
fn keep_alive(stream: &TcpStream, interval: Duration) {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = u32::try_from(interval.as_secs().max(1)).unwrap_or(u32::MAX);
    let _ = setsockopt(stream, sockopt::KeepAlive, &true);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = setsockopt(stream, sockopt::TcpKeepIdle, &secs);
    #[cfg(target_vendor = "apple")]
    let _ = setsockopt(stream, sockopt::TcpKeepAlive, &secs);
    let _ = setsockopt(stream, sockopt::TcpKeepInterval, &secs);
    let _ = setsockopt(stream, sockopt::TcpKeepCount, &KEEP_ALIVE_MISSES);
}

/// Once the guest's socket is closed: everything left in its receive buffer into
/// `tail`, and `tail` to the writer as it has room; the writer's channel is closed
/// (its FIN to the host) after the last of it. True if anything moved.
fn take_tail(sock: &mut tcp::Socket, r: &mut Relay) -> bool {
    let mut moved = false;
    // Called on every pass for every closed relay: a buffer only when there is
    // something to read (a guest holding many closed relays must not cost a
    // 64 KiB allocation each per pass).
    if r.to_host.is_none() && r.tail.is_empty() && sock.recv_queue() == 0 {
        return false;
    }
    let mut chunk = vec![0u8; CHUNK.min(sock.recv_queue().max(1))];
    while let Ok(n) = sock.recv_slice(&mut chunk) {
        if n == 0 {
            break;
        }
        r.tail.push_back(chunk[..n].to_vec());
        moved = true;
    }
    let Some(tx) = &r.to_host else {
        return moved;
    };
    while let Some(front) = r.tail.pop_front() {
        match tx.try_reserve() {
            Ok(permit) => {
                permit.send(front);
                moved = true;
            }
            Err(mpsc::error::TrySendError::Full(())) => {
                r.tail.push_front(front);
                return moved;
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                r.tail.clear();
                break;
            }
        }
    }
    r.to_host = None;
    true
}

/// Moves bytes both ways for one relayed connection.
fn pump_relay(sock: &mut tcp::Socket, r: &mut Relay) -> bool {
    let mut moved = false;
    // Guest -> host, as long as the writer task has room (else the guest's window
    // closes: backpressure).
    let mut host_gone = false;
    if let Some(tx) = &r.to_host {
        while sock.can_recv() {
            let permit = match tx.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Full(())) => break,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    host_gone = true;
                    break;
                }
            };
            let mut chunk = vec![0u8; CHUNK];
            match sock.recv_slice(&mut chunk) {
                Ok(n) if n > 0 => {
                    chunk.truncate(n);
                    permit.send(chunk);
                    moved = true;
                }
                _ => break,
            }
        }
        if guest_sent_fin(sock) && !sock.can_recv() {
            r.to_host = None; // the guest is done sending: FIN to the host
            moved = true;
        }
    }
    if host_gone {
        // The host end is gone: so is the guest's.
        sock.abort();
        r.to_host = None;
        return true;
    }
    // Host -> guest, into the socket's send buffer; credit goes back as chunks drain.
    if sock.may_send() {
        while let Some(front) = r.from_host.front_mut() {
            match sock.send_slice(front) {
                Ok(n) if n == front.len() => {
                    r.from_host.pop_front();
                    r.credit.add_permits(1);
                    moved = true;
                }
                Ok(n) => {
                    front.drain(..n);
                    moved |= n > 0;
                    break;
                }
                Err(_) => break,
            }
        }
        if r.host_eof && r.from_host.is_empty() {
            sock.close();
            moved = true;
        }
    } else if !sock.is_open() {
        r.from_host.clear();
    }
    moved
}

enum FlightRead {
    Wait,
    Bad(&'static str),
    Got(Flight),
}

fn read_flight(buf: &[u8]) -> FlightRead {
    match sni::parse(buf) {
        Hello::ClientHello { name, ech } => FlightRead::Got(Flight::Tls { name, ech }),
        Hello::Malformed(m) => FlightRead::Bad(m),
        Hello::Incomplete => FlightRead::Wait,
        Hello::NotTls => match http::parse(buf) {
            Head::Request { host, port } => FlightRead::Got(Flight::Http { host, port }),
            Head::Malformed(m) => FlightRead::Bad(m),
            Head::Incomplete => FlightRead::Wait,
            Head::NotHttp => FlightRead::Got(Flight::Other),
        },
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Tls,
    Http,
    Other,
}

fn first_flight_kind(buf: &[u8]) -> Kind {
    if buf.first() == Some(&22) {
        Kind::Tls
    } else if buf.first().is_some_and(|b| b.is_ascii_uppercase()) {
        Kind::Http
    } else {
        Kind::Other
    }
}

/// Tells the guest no in its own protocol where there is one: a TLS alert
/// (access_denied), an HTTP 403 naming the reason, else a reset.
fn refuse(sock: &mut tcp::Socket, kind: Kind, d: &Deny) {
    match kind {
        Kind::Tls => {
            let _ = sock.send_slice(&[21, 3, 3, 0, 2, 2, 49]);
            sock.close();
        }
        Kind::Http => {
            let body = format!("vibebox: denied by the network policy: {d}\n");
            let resp = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.send_slice(resp.as_bytes());
            sock.close();
        }
        Kind::Other => sock.abort(),
    }
}

/// The source and destination of a TCP SYN (without ACK) in an IPv4 packet, if its
/// checksums hold: the stack drops a bad one, so a connection made for it would
/// never see its handshake.
fn syn_endpoints(ip_packet: &[u8]) -> Option<(Addr, Addr)> {
    let ip = Ipv4Packet::new_checked(ip_packet).ok()?;
    if ip.next_header() != IpProtocol::Tcp || !ip.verify_checksum() {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    if !tcp.verify_checksum(&src.into(), &dst.into()) {
        return None;
    }
    (tcp.syn() && !tcp.ack()).then(|| {
        (
            (ip.src_addr(), tcp.src_port()),
            (ip.dst_addr(), tcp.dst_port()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stack's clock counts from the process's first use, not from the epoch:
    /// the wall clock (smoltcp's default) steps with NTP and jumps on resume.
    #[test]
    fn the_stack_clock_is_monotonic_not_the_wall_clock() {
        let a = now();
        let wall = SInstant::now();
        assert!(a.total_millis() < wall.total_millis() / 2, "{a} vs {wall}");
        std::thread::sleep(Duration::from_millis(20));
        assert!(now() >= a + smoltcp::time::Duration::from_millis(20));
    }
}
