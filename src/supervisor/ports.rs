//! Guest ports on the host's loopback. While the VM runs, the supervisor watches the
//! guest's listening TCP sockets (one long-lived ssh channel printing
//! `/proc/net/tcp{,6}` every second) and publishes each on `127.0.0.1`. A listener
//! the guest's network reaches (bound to every address, or to the guest's own) is
//! relayed by the gateway ([`Via::Gateway`]: the supervisor accepts here and hands
//! each connection to it, no encryption, several times faster than ssh); one bound
//! only to the guest's `localhost` goes through the supervisor's ssh connection's
//! local forwards ([`Via::Ssh`]), which the guest's sshd connects from inside.
//!
//! A listener on `::` alone is taken for dual-stack (Linux's default): with
//! `IPV6_V6ONLY` set it takes no IPv4 connection, and the gateway's (from
//! 10.0.2.2) are refused; such a server is published with `vibebox ports add`
//! after it binds `0.0.0.0` or `localhost` too (the listing cannot tell).
//!
//! What the guest prints is hostile input: lines are bounded, anything that does not
//! parse is skipped, and the guest only ever chooses guest ports. Host ports are the
//! host's choice (the same number, or the next free one), always on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::net::gateway::Inbound;

use crate::config::{Ports, Publish};
use crate::paths::SessionDir;
use crate::statefile;

/// Guest listeners never published automatically: SSH (the session's own way in),
/// the guest's name service (systemd-resolved's LLMNR), and the usual ports of
/// databases, caches, brokers and local model servers: while the host's own service
/// is down, a VM holding its port would get the host clients' connections (and
/// their passwords). A `publish` entry, which is approved, still publishes them.
const NOT_AUTO: &[u16] = &[
    22, 5355, // ssh, LLMNR
    1433, 1521, 3306, 5432, 5984, 6379, 7474, 7687, 8529, 9042, 9200, 9300, 11211, 26257, 27017,
    28015, // databases, caches, search
    1883, 4222, 5672, 9092, 15672, 61616, // brokers
    2181, 2379, 8500, 6443,  // coordination, Kubernetes
    11434, // ollama
];
/// The guest's attach daemon (`session::attach`) listens on the guest's loopback
/// here; never published (on the host's loopback any local user could attach to
/// the tasks). A fixed port, because `ssh -W` (OpenSSH 9.2) takes no Unix socket
/// path; below Linux's ephemeral range (32768-60999) so no outgoing connection of
/// the guest can hold it, and away from the ports development servers pick.
pub const GUEST_ATTACH_PORT: u16 = 29541;
/// Auto-published guest ports start here: lower ones are system services, and on
/// the host they would need root.
const FIRST_AUTO_PORT: u16 = 1024;
/// Host ports tried for one guest port when its own number is busy.
const HOST_PORT_TRIES: u16 = 32;
/// Guest listeners published automatically at once: each is a forward (an ssh
/// process to set up and to close), and a guest can listen on thousands.
const MAX_AUTO: usize = 64;
/// How often a wanted port that could not be published is tried again.
const RETRY: Duration = Duration::from_secs(5);
/// A listing line longer than this is not one the kernel writes.
const MAX_LINE: usize = 512;
/// Sockets per listing taken into account (more is a guest flooding the host).
const MAX_SOCKETS: usize = 4096;
/// The watcher renames its shell so the idle check does not count it as a login
/// (see `daemon::count_ssh_sessions`).
pub const WATCHER_NAME: &str = "vibebox-ports";

/// One published port, as `vibebox ports` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The host address it listens on (127.0.0.1 unless a `publish` entry said).
    #[serde(default = "loopback_addr")]
    pub addr: std::net::Ipv4Addr,
    pub host: u16,
    pub guest: u16,
    /// `auto` (a guest listener) or `config` (`[ports] publish`).
    pub how: String,
    /// How connections reach the guest.
    #[serde(default)]
    pub via: Via,
}

/// How a published port's connections reach the guest: relayed by the gateway to
/// the guest's address, or forwarded by the guest's sshd to its `localhost`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Gateway,
    #[default]
    Ssh,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Gateway => "gateway",
            Via::Ssh => "ssh",
        }
    }
}

fn loopback_addr() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::LOCALHOST
}

/// Where a guest port is wanted on the host: address, port, why, and how.
pub type Want = (std::net::Ipv4Addr, u16, &'static str, Via);

/// The file the supervisor keeps current for `vibebox ports`.
pub fn state_file(sd: &SessionDir) -> PathBuf {
    sd.dir().join("ports.json")
}

/// What the supervisor last published; empty when nothing is (or the file is
/// missing or unreadable: it is only a report).
pub fn read(sd: &SessionDir) -> Vec<Published> {
    statefile::read_nofollow(&state_file(sd))
        .ok()
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// The TCP ports in LISTEN state in `/proc/net/tcp` / `tcp6` text, each with how
/// the host can reach it: [`Via::Gateway`] if any of its listeners takes
/// connections to `guest` (the guest's address), else [`Via::Ssh`].
pub fn listening(text: &str, guest: Ipv4Addr) -> BTreeMap<u16, Via> {
    let mut ports = BTreeMap::new();
    for line in text.lines().take(MAX_SOCKETS) {
        if line.len() > MAX_LINE {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if state != "0A" {
            continue;
        }
        let Some((addr, port)) = local.rsplit_once(':') else {
            continue;
        };
        if let Ok(p) = u16::from_str_radix(port, 16)
            && p != 0
        {
            let via = match bound_to(addr) {
                Some(a) if a.is_unspecified() || a == guest => Via::Gateway,
                _ => Via::Ssh,
            };
            let v = ports.entry(p).or_insert(via);
            if via == Via::Gateway {
                *v = via;
            }
        }
    }
    ports
}

/// The IPv4 address a listener's local address (hex, as `/proc/net/tcp{,6}` prints
/// it: 32-bit words in the guest's byte order, little-endian on every guest
/// vibebox runs) takes connections for: itself, the IPv4 of a v4-mapped IPv6
/// address, 0.0.0.0 for `::` (dual-stack, see the module's note); None for any
/// other IPv6 address or text that is not an address.
fn bound_to(hex: &str) -> Option<Ipv4Addr> {
    // from_str_radix takes a sign too: only hex digits are an address.
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_le_bytes);
    match hex.len() {
        8 => word(hex).map(Ipv4Addr::from),
        32 => {
            let mut b = [0u8; 16];
            for (i, c) in b.chunks_mut(4).enumerate() {
                c.copy_from_slice(&word(&hex[i * 8..i * 8 + 8])?);
            }
            let v6 = std::net::Ipv6Addr::from(b);
            if v6.is_unspecified() {
                Some(Ipv4Addr::UNSPECIFIED)
            } else {
                v6.to_ipv4_mapped()
            }
        }
        _ => None,
    }
}

/// Which guest ports should be published now, each with the host port it would
/// like: the configured mappings always, and with `auto` every listener from 1024
/// up but SSH.
pub fn wanted(
    ports: &Ports,
    listening: &BTreeMap<u16, Via>,
    withheld: &BTreeSet<u16>,
) -> BTreeMap<u16, Want> {
    let via = |g: &u16| listening.get(g).copied().unwrap_or_default();
    let mut want = BTreeMap::new();
    for p in &ports.publish {
        want.insert(p.guest, (p.addr, p.host, "config", via(&p.guest)));
    }
    if ports.auto {
        let auto = listening
            .keys()
            .filter(|&&g| {
                g >= FIRST_AUTO_PORT
                    && !NOT_AUTO.contains(&g)
                    && g != GUEST_ATTACH_PORT
                    && !withheld.contains(&g)
            })
            .filter(|g| !want.contains_key(g))
            .take(MAX_AUTO)
            .copied()
            .collect::<Vec<u16>>();
        for g in auto {
            want.insert(g, (loopback_addr(), g, "auto", via(&g)));
        }
    }
    want
}

/// A line for the attached terminals.
pub type Notices = broadcast::Sender<String>;

/// A change asked for while the VM runs (`vibebox ports add|rm`), lasting until it
/// stops.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    Publish(Publish),
    Unpublish(u16),
}

/// A change and where its outcome goes: what was done, or why not.
pub type Request = (Change, oneshot::Sender<Result<String, String>>);

/// Publishes and unpublishes for as long as the VM runs (the caller aborts it when
/// the boot ends). Errors are logged and retried: a missing forward is never worth
/// ending the session.
pub async fn run(
    sd: SessionDir,
    mut ports: Ports,
    notices: Notices,
    mut requests: mpsc::Receiver<Request>,
    gateway: mpsc::Sender<Inbound>,
) {
    let mut published: BTreeMap<u16, Published> = BTreeMap::new();
    // Guest ports `rm` took away from the automatic publishing, for this boot.
    let mut withheld = BTreeSet::new();
    loop {
        if let Err(e) = watch(
            &sd,
            &mut ports,
            &mut withheld,
            &notices,
            &mut requests,
            &mut published,
            &gateway,
        )
        .await
        {
            tracing::warn!("ports: {e}; trying again");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn watch(
    sd: &SessionDir,
    ports: &mut Ports,
    withheld: &mut BTreeSet<u16>,
    notices: &Notices,
    requests: &mut mpsc::Receiver<Request>,
    published: &mut BTreeMap<u16, Published>,
    gateway: &mpsc::Sender<Inbound>,
) -> Result<(), String> {
    let session = crate::ssh::guest_session(sd)
        .await
        .map_err(|e| e.to_string())?;
    // A reconnect starts over: the old connection's forwards went with it (and
    // the relays' listeners with the old `Guest`).
    published.clear();
    save(sd, published);
    let mut guest = Guest {
        session: &session,
        sd,
        notices,
        failed: BTreeSet::new(),
        gateway,
        relays: BTreeMap::new(),
    };
    let mut last = BTreeMap::new();
    guest.sync(&wanted(ports, &last, withheld), published).await;
    let script = format!(
        "echo {WATCHER_NAME} > /proc/$$/comm 2>/dev/null; \
         while :; do cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; echo .; sleep 1; done"
    );
    // Without `auto` nothing needs watching; the connection is still checked now
    // and then, so a broken one is made again.
    let mut child = if ports.auto {
        Some(
            session
                .command("sh")
                .arg("-c")
                .arg(&script)
                .stdin(openssh::Stdio::null())
                .stdout(openssh::Stdio::piped())
                .stderr(openssh::Stdio::null())
                .spawn()
                .await
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let mut out = match child.as_mut() {
        Some(c) => Some(c.stdout().take().ok_or("no output from the watcher")?),
        None => None,
    };
    let mut lines = Lines::default();
    let mut retry_at = None;
    let mut buf = [0u8; 4096];
    loop {
        let read = async {
            match out.as_mut() {
                Some(o) => o.read(&mut buf).await.map_err(|e| e.to_string()),
                None => {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    session.check().await.map_err(|e| e.to_string())?;
                    Ok(usize::MAX)
                }
            }
        };
        tokio::select! {
            n = read => {
                let n = n?;
                if n == 0 {
                    return Err("the watcher ended".into());
                }
                if n == usize::MAX {
                    continue;
                }
                if let Some(now) = lines.push(&buf[..n]).pop() {
                    // A mapping that could not be had (its host port was busy, or an
                    // old connection still held it) is tried again now and then.
                    let retry = retry_at.is_some_and(|t| std::time::Instant::now() >= t);
                    if now != last || retry {
                        last = now;
                        let want = wanted(ports, &last, withheld);
                        guest.sync(&want, published).await;
                        retry_at = want
                            .keys()
                            .any(|g| !published.contains_key(g))
                            .then(|| std::time::Instant::now() + RETRY);
                    }
                }
            }
            req = requests.recv() => {
                let Some((change, reply)) = req else {
                    // The supervisor is gone with its boot.
                    return Ok(());
                };
                let said = match change {
                    Change::Publish(p) => {
                        withheld.remove(&p.guest);
                        ports.publish.retain(|q| q.guest != p.guest && q.host != p.host);
                        if let Some(old) = published.get(&p.guest).cloned()
                            && old.host != p.host
                        {
                            // Moved to another host port: the old forward goes.
                            guest.close(&old).await;
                            published.remove(&p.guest);
                        }
                        ports.publish.push(p);
                        guest.sync(&wanted(ports, &last, withheld), published).await;
                        match published.get(&p.guest) {
                            Some(q) if q.host == p.host => {
                                Ok(format!("localhost:{} -> VM:{}", q.host, q.guest))
                            }
                            _ => {
                                ports.publish.retain(|q| q.guest != p.guest);
                                Err(format!(
                                    "cannot publish VM:{} on localhost:{}: the port is in use on this machine",
                                    p.guest, p.host
                                ))
                            }
                        }
                    }
                    Change::Unpublish(g) => {
                        let had = published.contains_key(&g)
                            || ports.publish.iter().any(|q| q.guest == g);
                        ports.publish.retain(|q| q.guest != g);
                        withheld.insert(g);
                        guest.sync(&wanted(ports, &last, withheld), published).await;
                        if had {
                            Ok(format!("VM:{g} is no longer published (until the VM restarts)"))
                        } else {
                            Err(format!("VM:{g} is not published"))
                        }
                    }
                };
                let _ = reply.send(said);
            }
        }
    }
}

/// The watcher's output cut into listings (each ends with a `.` line), with lines
/// and listings bounded whatever the guest prints.
struct Lines {
    line: Vec<u8>,
    block: String,
    /// The guest's address (what the gateway connects to).
    guest: Ipv4Addr,
}

impl Default for Lines {
    fn default() -> Lines {
        Lines {
            line: Vec::new(),
            block: String::new(),
            guest: crate::net::dhcp::Lan::default().guest,
        }
    }
}

impl Lines {
    /// Takes bytes; returns the listings they completed.
    fn push(&mut self, bytes: &[u8]) -> Vec<BTreeMap<u16, Via>> {
        let mut done = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() <= MAX_LINE {
                    self.line.push(b);
                }
                continue;
            }
            if self.line == b"." {
                done.push(listening(&self.block, self.guest));
                self.block.clear();
            } else if self.line.len() <= MAX_LINE && self.block.len() < MAX_SOCKETS * 160 {
                self.block.push_str(&String::from_utf8_lossy(&self.line));
                self.block.push('\n');
            }
            self.line.clear();
        }
        done
    }
}

struct Guest<'a> {
    session: &'a openssh::Session,
    sd: &'a SessionDir,
    notices: &'a Notices,
    /// Guest ports whose failure to publish was said already.
    failed: BTreeSet<u16>,
    gateway: &'a mpsc::Sender<Inbound>,
    /// The accept loops of the ports the gateway relays, by guest port (aborting
    /// one closes its listener; connections already relayed go on).
    relays: BTreeMap<u16, RelayListener>,
}

/// An accept loop handing connections to the gateway; stopped when dropped.
struct RelayListener(JoinHandle<()>);

impl RelayListener {
    /// Stops it and waits until its listener is closed, so the same host port can
    /// be listened on again at once (by an ssh forward, when the guest's listener
    /// moved to its localhost).
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for RelayListener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Guest<'_> {
    /// Brings the forwards in line with what is wanted now.
    async fn sync(&mut self, want: &BTreeMap<u16, Want>, published: &mut BTreeMap<u16, Published>) {
        let gone: Vec<u16> = published
            .keys()
            .filter(|g| !want.contains_key(g))
            .copied()
            .collect();
        for g in gone {
            let p = published.remove(&g).expect("listed");
            self.close(&p).await;
            let _ = self.notices.send(format!(
                "localhost:{} closed (VM:{} is not published any more)",
                p.host, p.guest
            ));
        }
        // A listener that moved (to every address, or to localhost only) changes
        // the way there: the same host port, the other path.
        let moved: Vec<Published> = published
            .values()
            .filter(|p| want.get(&p.guest).is_some_and(|w| w.3 != p.via))
            .cloned()
            .collect();
        let mut quiet = BTreeSet::new();
        for p in moved {
            self.close(&p).await;
            published.remove(&p.guest);
            quiet.insert(p.guest);
        }
        let mut taken: BTreeSet<u16> = published.values().map(|p| p.host).collect();
        for (&g, &(addr, host, how, via)) in want {
            if published.contains_key(&g) {
                continue;
            }
            // A fixed mapping gets its own host port or nothing (the user chose it).
            let tries = if how == "config" { 1 } else { HOST_PORT_TRIES };
            let mut got = None;
            for h in (0..tries).filter_map(|i| host.checked_add(i)) {
                if taken.contains(&h) {
                    continue;
                }
                match self.open(addr, h, g, via).await {
                    Ok(()) => {
                        got = Some(h);
                        break;
                    }
                    Err(e) => tracing::debug!("ports: localhost:{h} for VM:{g}: {e}"),
                }
            }
            let line = match got {
                Some(h) => {
                    taken.insert(h);
                    published.insert(
                        g,
                        Published {
                            addr,
                            host: h,
                            guest: g,
                            how: how.to_string(),
                            via,
                        },
                    );
                    if !addr.is_loopback() {
                        format!("{addr}:{h} -> VM:{g} (reachable from your network)")
                    } else if h == host {
                        format!("localhost:{h} -> VM:{g}")
                    } else {
                        format!(
                            "localhost:{h} -> VM:{g} (localhost:{host} is in use on this machine)"
                        )
                    }
                }
                None if tries == 1 => format!(
                    "cannot publish VM:{g} on localhost:{host}: the port is in use on this machine"
                ),
                None => format!(
                    "cannot publish VM:{g}: localhost:{host} to localhost:{} are in use on this machine",
                    host.saturating_add(tries - 1)
                ),
            };
            // A failure is said once, not at every retry; a port that only changed
            // its path is not news.
            if quiet.remove(&g) && got == Some(host) {
                tracing::info!("ports: VM:{g} now via {}", via.as_str());
            } else if got.is_some() || self.failed.insert(g) {
                tracing::info!("ports: {line}");
                let _ = self.notices.send(line);
            }
            if got.is_some() {
                self.failed.remove(&g);
            }
        }
        save(self.sd, published);
    }

    /// Listens on `addr:host` for guest port `guest`, the way `via` says.
    async fn open(
        &mut self,
        addr: Ipv4Addr,
        host: u16,
        guest: u16,
        via: Via,
    ) -> Result<(), String> {
        match via {
            Via::Ssh => self
                .session
                .request_port_forward(
                    openssh::ForwardType::Local,
                    listen(addr, host),
                    guest_end(guest),
                )
                .await
                .map_err(|e| e.to_string()),
            Via::Gateway => {
                let l = bind_relay(addr, host).await.map_err(|e| e.to_string())?;
                let to = self.gateway.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((stream, _)) => {
                                let c = Inbound {
                                    stream,
                                    guest_port: guest,
                                };
                                if to.send(c).await.is_err() {
                                    return; // the gateway is gone with the VM
                                }
                            }
                            // Out of descriptors, or a client gone before it was
                            // accepted: waited out, the port stays published.
                            Err(e) => {
                                tracing::debug!("ports: accept on localhost:{host}: {e}");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                });
                self.relays.insert(guest, RelayListener(task));
                Ok(())
            }
        }
    }

    async fn close(&mut self, p: &Published) {
        match p.via {
            Via::Ssh => {
                let _ = self
                    .session
                    .close_port_forward(
                        openssh::ForwardType::Local,
                        listen(p.addr, p.host),
                        guest_end(p.guest),
                    )
                    .await;
            }
            Via::Gateway => {
                if let Some(r) = self.relays.remove(&p.guest) {
                    r.stop().await;
                }
            }
        }
        tracing::info!("ports: unpublished localhost:{} (VM:{})", p.host, p.guest);
    }
}

/// A relayed port's host listener. On macOS SO_REUSEADDR (which tokio sets) lets a
/// socket bind 127.0.0.1:P beside a host service listening on *:P and take its
/// local connections to the guest, so there it is bound without it. On Linux
/// that bind fails anyway, and the option lets a port come back while its last
/// connections are in TIME_WAIT (a listener that moves between ssh and the relay
/// keeps its host port).
async fn bind_relay(
    addr: std::net::Ipv4Addr,
    port: u16,
) -> std::io::Result<tokio::net::TcpListener> {
    if cfg!(target_os = "macos") {
        let l = std::net::TcpListener::bind((addr, port))?;
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    } else {
        tokio::net::TcpListener::bind((addr, port)).await
    }
}

fn listen(addr: std::net::Ipv4Addr, port: u16) -> openssh::Socket<'static> {
    openssh::Socket::TcpSocket {
        host: addr.to_string().into(),
        port,
    }
}

/// The guest end as the guest's sshd resolves it: `localhost` reaches a listener on
/// 127.0.0.1, ::1 or every address.
fn guest_end(port: u16) -> openssh::Socket<'static> {
    openssh::Socket::TcpSocket {
        host: "localhost".into(),
        port,
    }
}

fn save(sd: &SessionDir, published: &BTreeMap<u16, Published>) {
    let list: Vec<&Published> = published.values().collect();
    let text = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
    if let Err(e) = statefile::write_atomic(&state_file(sd), text.as_bytes(), 0o600) {
        tracing::warn!("ports: cannot record the published ports: {e}");
    }
}

/// Nothing is published once the VM is gone.
pub fn clear(sd: &SessionDir) {
    let _ = std::fs::remove_file(state_file(sd));
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PROC: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 100 0 0 10 0
   2: 0F02000A:0016 0202000A:C350 01 00000000:00000000 02:0009C2E2 00000000     0        0 3 4 0 20 4 30 10 -1
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1435 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5 1 0 100 0 0 10 0
";

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    fn ports_of(text: &str) -> BTreeSet<u16> {
        listening(text, GUEST).into_keys().collect()
    }

    #[test]
    fn reads_the_listeners_of_both_families() {
        assert_eq!(ports_of(PROC), BTreeSet::from([22, 8000, 5173]));
        assert!(ports_of("garbage\n0: x:y 0A\n: :zz z 0A\n").is_empty());
    }

    /// The gateway reaches listeners on every address and on the guest's own;
    /// loopback-only ones (127.0.0.1, ::1) and other addresses need ssh.
    #[test]
    fn listeners_the_gateway_reaches_are_told_apart() {
        let line = |addr: &str, port: u16| {
            format!(
                "   0: {addr}:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n"
            )
        };
        let cases = [
            ("00000000", Via::Gateway),                         // 0.0.0.0
            ("0F02000A", Via::Gateway),                         // 10.0.2.15
            ("0100007F", Via::Ssh),                             // 127.0.0.1
            ("0202000A", Via::Ssh),                             // 10.0.2.2: not the guest
            ("00000000000000000000000000000000", Via::Gateway), // ::
            ("0000000000000000FFFF00000F02000A", Via::Gateway), // ::ffff:10.0.2.15
            ("0000000000000000FFFF00000100007F", Via::Ssh),     // ::ffff:127.0.0.1
            ("00000000000000000000000001000000", Via::Ssh),     // ::1
            ("000080FE00000000FF005452FE123456", Via::Ssh),     // fe80::...
        ];
        for (addr, via) in cases {
            assert_eq!(
                listening(&line(addr, 3000), GUEST),
                BTreeMap::from([(3000, via)]),
                "{addr}"
            );
        }
        // One listener the gateway reaches is enough, in either order.
        let both = line("0100007F", 3000) + &line("00000000000000000000000000000000", 3000);
        assert_eq!(listening(&both, GUEST)[&3000], Via::Gateway);
        let both = line("00000000", 3000) + &line("00000000000000000000000001000000", 3000);
        assert_eq!(listening(&both, GUEST)[&3000], Via::Gateway);
        // Not hex, or not an address's length: not the gateway's.
        for bad in ["0000000G", "000000000", "ÿÿÿÿ0000", "+0000000", ""] {
            assert_eq!(bound_to(bad), None, "{bad}");
        }
    }

    #[test]
    fn auto_publishes_listeners_from_1024_but_ssh_and_config_wins() {
        let ports = Ports {
            auto: true,
            publish: vec![Publish {
                addr: std::net::Ipv4Addr::LOCALHOST,
                host: 9000,
                guest: 8000,
            }],
            host: vec![],
        };
        let want = wanted(&ports, &listening(PROC, GUEST), &BTreeSet::new());
        assert_eq!(
            want,
            BTreeMap::from([
                (8000, (loopback_addr(), 9000, "config", Via::Ssh)),
                (5173, (loopback_addr(), 5173, "auto", Via::Ssh))
            ])
        );
        let off = Ports {
            auto: false,
            publish: vec![],
            host: vec![],
        };
        assert!(wanted(&off, &listening(PROC, GUEST), &BTreeSet::new()).is_empty());
        // A database's port is not taken over automatically, nor the guest's
        // attach daemon (on the host any local user could attach to the tasks).
        assert!(
            wanted(
                &off_auto(),
                &any([5432, 3000, GUEST_ATTACH_PORT]),
                &BTreeSet::new()
            )
            .keys()
            .eq([3000].iter())
        );
        // At most MAX_AUTO automatic ones, however many the guest opens.
        let many = any(2000..6000);
        assert_eq!(wanted(&off_auto(), &many, &BTreeSet::new()).len(), MAX_AUTO);
        // A configured mapping goes the way its guest listener allows.
        assert_eq!(
            wanted(&ports, &any([8000]), &BTreeSet::new())[&8000].3,
            Via::Gateway
        );
        // `rm` of an automatic port keeps it away while its listener stays.
        assert!(
            !wanted(&ports, &listening(PROC, GUEST), &BTreeSet::from([5173])).contains_key(&5173)
        );
    }

    #[test]
    fn listings_are_cut_at_dots_and_bounded() {
        let mut l = Lines::default();
        assert!(
            l.push(b"   1: 0100007F:1F40 00000000:0000 0A x\n")
                .is_empty()
        );
        let got = l.push(b".\n   1: 0100007F:1F41 00000000:0000 0A x\n.\n");
        assert_eq!(
            got,
            vec![
                BTreeMap::from([(8000, Via::Ssh)]),
                BTreeMap::from([(8001, Via::Ssh)])
            ]
        );
        // A line without end does not grow without bound.
        l.push(&vec![b'x'; 100_000]);
        assert!(l.line.len() <= MAX_LINE + 1);
        assert_eq!(l.push(b"\n.\n"), vec![BTreeMap::new()]);
    }

    /// Ports listening on every address.
    fn any(ports: impl IntoIterator<Item = u16>) -> BTreeMap<u16, Via> {
        ports.into_iter().map(|p| (p, Via::Gateway)).collect()
    }

    fn off_auto() -> Ports {
        Ports {
            auto: true,
            publish: vec![],
            host: vec![],
        }
    }

    proptest! {
        #[test]
        fn any_text_is_read_without_panic_and_bounded(text in "\\PC{0,2000}") {
            let got = listening(&text, GUEST);
            prop_assert!(got.len() <= MAX_SOCKETS);
            prop_assert!(!got.contains_key(&0));
        }

        /// Listing lines with any address text: never a panic, and the gateway
        /// only for the guest's address or every address.
        #[test]
        fn any_address_is_classified_without_panic(
            addr in "[0-9A-Fa-f:x+ -]{0,40}|\\PC{0,40}",
            port in 1u16..,
        ) {
            let text = format!("   0: {addr}:{port:04X} 00000000:0000 0A 0\n");
            let got = listening(&text, GUEST);
            prop_assert!(got.len() <= 1);
            if got.values().any(|v| *v == Via::Gateway) {
                let a = bound_to(&addr);
                prop_assert!(a == Some(GUEST) || a == Some(Ipv4Addr::UNSPECIFIED), "{addr}");
            }
        }
    }
}
