//! Guest ports on the host's loopback. While the VM runs, the supervisor watches the
//! guest's listening TCP sockets (one long-lived ssh channel printing
//! `/proc/net/tcp{,6}` every second) and publishes each on `127.0.0.1` through its
//! own ssh connection's local forwards, so a dev server bound to the guest's
//! `localhost` is reachable as well as one bound to every address.
//!
//! What the guest prints is hostile input: lines are bounded, anything that does not
//! parse is skipped, and the guest only ever chooses guest ports. Host ports are the
//! host's choice (the same number, or the next free one), always on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc, oneshot};

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
}

fn loopback_addr() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::LOCALHOST
}

/// Where a guest port is wanted on the host: address, port, and why.
pub type Want = (std::net::Ipv4Addr, u16, &'static str);

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

/// The TCP ports in LISTEN state in `/proc/net/tcp` / `tcp6` text.
pub fn listening(text: &str) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
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
        let Some((_, port)) = local.rsplit_once(':') else {
            continue;
        };
        if let Ok(p) = u16::from_str_radix(port, 16)
            && p != 0
        {
            ports.insert(p);
        }
    }
    ports
}

/// Which guest ports should be published now, each with the host port it would
/// like: the configured mappings always, and with `auto` every listener from 1024
/// up but SSH.
pub fn wanted(
    ports: &Ports,
    listening: &BTreeSet<u16>,
    withheld: &BTreeSet<u16>,
) -> BTreeMap<u16, Want> {
    let mut want = BTreeMap::new();
    for p in &ports.publish {
        want.insert(p.guest, (p.addr, p.host, "config"));
    }
    if ports.auto {
        let auto = listening
            .iter()
            .filter(|&&g| g >= FIRST_AUTO_PORT && !NOT_AUTO.contains(&g) && !withheld.contains(&g))
            .filter(|g| !want.contains_key(g))
            .take(MAX_AUTO)
            .copied()
            .collect::<Vec<u16>>();
        for g in auto {
            want.insert(g, (loopback_addr(), g, "auto"));
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
) -> Result<(), String> {
    let session = crate::ssh::guest_session(sd)
        .await
        .map_err(|e| e.to_string())?;
    // A reconnect starts over: the old connection's forwards went with it.
    published.clear();
    save(sd, published);
    let mut guest = Guest {
        session: &session,
        sd,
        notices,
        failed: BTreeSet::new(),
    };
    let mut last = BTreeSet::new();
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
#[derive(Default)]
struct Lines {
    line: Vec<u8>,
    block: String,
}

impl Lines {
    /// Takes bytes; returns the listings they completed.
    fn push(&mut self, bytes: &[u8]) -> Vec<BTreeSet<u16>> {
        let mut done = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() <= MAX_LINE {
                    self.line.push(b);
                }
                continue;
            }
            if self.line == b"." {
                done.push(listening(&self.block));
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
        let mut taken: BTreeSet<u16> = published.values().map(|p| p.host).collect();
        for (&g, &(addr, host, how)) in want {
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
                match self
                    .session
                    .request_port_forward(
                        openssh::ForwardType::Local,
                        listen(addr, h),
                        guest_end(g),
                    )
                    .await
                {
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
            // A failure is said once, not at every retry.
            if got.is_some() || self.failed.insert(g) {
                tracing::info!("ports: {line}");
                let _ = self.notices.send(line);
            }
            if got.is_some() {
                self.failed.remove(&g);
            }
        }
        save(self.sd, published);
    }

    async fn close(&mut self, p: &Published) {
        let _ = self
            .session
            .close_port_forward(
                openssh::ForwardType::Local,
                listen(p.addr, p.host),
                guest_end(p.guest),
            )
            .await;
        tracing::info!("ports: unpublished localhost:{} (VM:{})", p.host, p.guest);
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

    #[test]
    fn reads_the_listeners_of_both_families() {
        assert_eq!(listening(PROC), BTreeSet::from([22, 8000, 5173]));
        assert!(listening("garbage\n0: x:y 0A\n: :zz z 0A\n").is_empty());
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
        let want = wanted(&ports, &listening(PROC), &BTreeSet::new());
        assert_eq!(
            want,
            BTreeMap::from([
                (8000, (loopback_addr(), 9000, "config")),
                (5173, (loopback_addr(), 5173, "auto"))
            ])
        );
        let off = Ports {
            auto: false,
            publish: vec![],
            host: vec![],
        };
        assert!(wanted(&off, &listening(PROC), &BTreeSet::new()).is_empty());
        // A database's port is not taken over automatically.
        assert!(
            wanted(&off_auto(), &BTreeSet::from([5432, 3000]), &BTreeSet::new())
                .keys()
                .eq([3000].iter())
        );
        // At most MAX_AUTO automatic ones, however many the guest opens.
        let many: BTreeSet<u16> = (2000..6000).collect();
        assert_eq!(wanted(&off_auto(), &many, &BTreeSet::new()).len(), MAX_AUTO);
        // `rm` of an automatic port keeps it away while its listener stays.
        assert!(!wanted(&ports, &listening(PROC), &BTreeSet::from([5173])).contains_key(&5173));
    }

    #[test]
    fn listings_are_cut_at_dots_and_bounded() {
        let mut l = Lines::default();
        assert!(
            l.push(b"   1: 0100007F:1F40 00000000:0000 0A x\n")
                .is_empty()
        );
        let got = l.push(b".\n   1: 0100007F:1F41 00000000:0000 0A x\n.\n");
        assert_eq!(got, vec![BTreeSet::from([8000]), BTreeSet::from([8001])]);
        // A line without end does not grow without bound.
        l.push(&vec![b'x'; 100_000]);
        assert!(l.line.len() <= MAX_LINE + 1);
        assert_eq!(l.push(b"\n.\n"), vec![BTreeSet::new()]);
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
            let got = listening(&text);
            prop_assert!(got.len() <= MAX_SOCKETS);
            prop_assert!(!got.contains(&0));
        }
    }
}
