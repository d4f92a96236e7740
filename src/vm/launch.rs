//! Turning a session into a running QEMU: the disk overlay, keys, fw_cfg entries,
//! shares and the command line, then the process itself. Runs in the supervisor,
//! whose working directory is the session directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::fwcfg::{FsType, GuestConfig, GuestMount};
use super::guest::GuestUser;
use super::host::{self, Accelerator};
use super::lifetime;
use super::ownership::{self, Model, Owner};
use super::pin::{self, Handoff, Root};
use super::protect::{Guard, Protection};
use super::qemu::{self, Boot, Network, Preset, Share, ShareKind, Spec};
use super::snapshot::{self, Take};
use super::virtiofsd;
use crate::config::Config;
use crate::image::store::Image;
use crate::paths::{self, SessionDir};
use crate::ssh::{self, KeyPair};
use crate::statefile;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "mount {host} -> {guest}: the host path does not exist; create it or remove the line from vibebox.toml"
    )]
    MissingMount { host: PathBuf, guest: PathBuf },
    #[error(
        "not enough free space in {}: {free_mib} MiB free, a VM needs at least {need_mib} MiB to start (its disk grows there); free some space (`vibebox delete` of old sessions, `vibebox image rm`) and run vibebox again",
        dir.display()
    )]
    DiskFull {
        dir: PathBuf,
        free_mib: u64,
        need_mib: u64,
    },
    #[error("cannot create the VM disk {path}: {message}")]
    Disk { path: PathBuf, message: String },
    #[error(
        "the VM disk {path} is damaged ({why}); it holds this session's files, so vibebox leaves it as it is: inspect it with `qemu-img check`, move it away to start this session on a fresh disk, or `vibebox delete` the session"
    )]
    BadDisk { path: PathBuf, why: String },
    #[error("qemu-img is not installed: install qemu-utils (Debian) or qemu (Homebrew)")]
    NoQemuImg,
    #[error(
        "{binary} is not installed: install QEMU (Debian: `sudo apt install qemu-system-x86`, macOS: `brew install qemu`), or set VIBEBOX_QEMU"
    )]
    NoQemu { binary: String },
    #[error("no QEMU machine preset for the {0} architecture")]
    NoPreset(String),
    #[error("cannot start QEMU: {0}")]
    Spawn(std::io::Error),
    #[error("cannot open the VM's network sockets (its link and the local SSH port): {0}")]
    Port(std::io::Error),
    #[error(transparent)]
    Ssh(#[from] ssh::Error),
    #[error(transparent)]
    Virtiofsd(#[from] virtiofsd::Error),
    #[error(transparent)]
    Pin(#[from] pin::Error),
    #[error(
        "mount {}: vibebox runs as root and shares it over 9p, whose server (QEMU) creates files as root, but the directory belongs to uid {uid}; install virtiofsd (it gives the VM's files to the directory's owner), share it read-only, or run vibebox as that user",
        host.display()
    )]
    NinePOwner { host: PathBuf, uid: u32 },
    #[error(
        "mount {}: vibebox runs as root and this host cannot keep the VM from creating set-uid or root-owned files in a read-write share; run vibebox as a user, or share it read-only",
        host.display()
    )]
    Unconfined { host: PathBuf },
    #[error(transparent)]
    State(#[from] statefile::Error),
}

/// Free space a VM needs on the disk holding its session directory to start: the
/// overlay grows as the guest writes, and QEMU pauses a guest whose writes fail.
pub const MIN_FREE_MIB: u64 = 1024;

/// Refuses to start with less than [`MIN_FREE_MIB`] free where the overlay lives.
pub fn check_free_space(dir: &Path) -> Result<(), Error> {
    let free = statefile::free_bytes(dir);
    if free < MIN_FREE_MIB << 20 {
        return Err(Error::DiskFull {
            dir: dir.to_path_buf(),
            free_mib: free >> 20,
            need_mib: MIN_FREE_MIB,
        });
    }
    Ok(())
}

/// What a started VM needs the supervisor to know.
pub struct Started {
    pub child: Child,
    /// QEMU's lease on life (and its identity): hold it until QEMU has exited.
    pub watchdog: lifetime::Watchdog,
    pub ssh_port: u16,
    pub user: GuestUser,
    /// For the gateway the supervisor runs.
    pub net: NetEnds,
    /// The virtiofsd processes of the shares; keep them until QEMU has exited.
    pub daemons: Vec<virtiofsd::Daemon>,
    /// What a state saved at stop must match to be resumed (`snapshot::digest`);
    /// `None` when this machine cannot be saved, and `unsaveable` says why.
    pub digest: Option<String>,
    pub unsaveable: Option<&'static str>,
    /// QEMU was started paused, waiting for this state (`-incoming defer`): the
    /// supervisor hands it over with `snapshot::resume`, else the guest never runs.
    pub incoming: Option<(fs::File, snapshot::Record)>,
    /// Why a saved state was not resumed (it is gone either way), for the log.
    pub cold_because: Option<String>,
}

pub fn client_key(session: &SessionDir) -> KeyPair {
    KeyPair::at(session.ssh_dir().join("id_ed25519"))
}

pub fn host_key(session: &SessionDir) -> KeyPair {
    KeyPair::at(session.ssh_dir().join("host_ed25519"))
}

pub fn known_hosts(session: &SessionDir) -> PathBuf {
    session.ssh_dir().join("known_hosts")
}

/// Creates the session's qcow2 overlay on the base image if it does not exist yet.
/// Made under a temp name, fsynced, renamed and the rename fsynced: a failure (disk
/// full) leaves no half disk, and a power cut never leaves a name pointing at an
/// empty file. An existing disk is checked, never replaced: the user's work is in it.
pub fn ensure_disk(disk: &Path, base: &Path, size_gb: u64) -> Result<bool, Error> {
    let derr = |message: String| Error::Disk {
        path: disk.to_path_buf(),
        message,
    };
    if fs::symlink_metadata(disk).is_ok() {
        check_disk(disk)?;
        return Ok(false);
    }
    let qemu_img = which::which("qemu-img").map_err(|_| Error::NoQemuImg)?;
    let tmp = disk.with_extension("qcow2.tmp");
    let _ = fs::remove_file(&tmp);
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(&tmp)
        .arg(format!("{size_gb}G"))
        .output()
        .map_err(|e| derr(e.to_string()))?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(derr(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let made = (|| {
        fs::File::open(&tmp)?.sync_all()?;
        statefile::give_to_user(&tmp)?;
        fs::rename(&tmp, disk)?;
        statefile::sync_dir(disk.parent().unwrap_or(Path::new(".")))
    })();
    if let Err(e) = made {
        let _ = fs::remove_file(&tmp);
        return Err(derr(e.to_string()));
    }
    Ok(true)
}

/// qcow2 header fields vibebox checks (big-endian, see QEMU's docs/interop/qcow2.txt).
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Refuses a session disk that is not a whole qcow2 image: wrong magic or version,
/// or a file too short to hold the tables its header points at (truncated by a
/// crash). Only reads; the caller reports, the user decides.
pub fn check_disk(disk: &Path) -> Result<(), Error> {
    use std::io::Read;
    let bad = |why: String| Error::BadDisk {
        path: disk.to_path_buf(),
        why,
    };
    let meta = fs::symlink_metadata(disk).map_err(|e| bad(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mut header = [0u8; 72];
    let mut f = fs::File::open(disk).map_err(|e| bad(e.to_string()))?;
    let mut got = 0;
    while got < header.len() {
        match f.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    qcow2_header_problem(&header[..got], meta.len()).map_or(Ok(()), |why| Err(bad(why)))
}

/// What is wrong with a qcow2 header of a file `len` bytes long, if anything.
fn qcow2_header_problem(h: &[u8], len: u64) -> Option<String> {
    if h.len() < 72 {
        return Some(format!(
            "{len} bytes long, too short for a qcow2 header; it was probably cut short by a crash"
        ));
    }
    if &h[..4] != QCOW2_MAGIC {
        return Some("not a qcow2 image".into());
    }
    let be32 = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let be64 = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let version = be32(4);
    if !(2..=3).contains(&version) {
        return Some(format!("qcow2 version {version}, expected 2 or 3"));
    }
    let cluster_bits = be32(20);
    if !(9..=21).contains(&cluster_bits) {
        return Some(format!("bad cluster size 2^{cluster_bits}"));
    }
    let cluster = 1u64 << cluster_bits;
    let l1_end = be64(40).saturating_add(u64::from(be32(36)).saturating_mul(8));
    let refcount_end = be64(48).saturating_add(u64::from(be32(56)).saturating_mul(cluster));
    let need = l1_end.max(refcount_end);
    if need > len {
        return Some(format!(
            "{len} bytes long, but its tables end at byte {need}; it was probably cut short by a crash"
        ));
    }
    None
}

/// The host's end of the guest's network: QEMU connects its NIC to `link`; `ssh`
/// (on 127.0.0.1) is where host SSH connections enter, relayed by the gateway to the
/// guest's sshd. Both are bound before QEMU starts, so neither can be taken by
/// another process in between.
pub struct NetEnds {
    pub link: std::os::unix::net::UnixListener,
    pub ssh: std::net::TcpListener,
}

/// Binds in the working directory (the session directory), by a short relative name.
fn net_ends() -> Result<NetEnds, Error> {
    let path = Path::new(paths::NET_SOCKET);
    let _ = fs::remove_file(path);
    let link = std::os::unix::net::UnixListener::bind(path).map_err(Error::Port)?;
    let ssh = std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::Port)?;
    Ok(NetEnds { link, ssh })
}

/// The most `console.log` holds before it moves to `console.log.1`.
pub const CONSOLE_MAX: u64 = 8 << 20;

/// Copies the guest's serial console (QEMU connects to `listener` as it starts)
/// into `log`, capped and rotated: the guest decides how much it prints, and
/// QEMU's own file backend would let it fill the host's disk. Ends when QEMU closes
/// the console; a QEMU that never connects leaves only this thread waiting.
pub fn console(
    listener: std::os::unix::net::UnixListener,
    log: PathBuf,
) -> std::thread::JoinHandle<()> {
    use std::io::Read;
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        drop(listener);
        let mut out = crate::net::netlog::Capped::new(&log, CONSOLE_MAX);
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => out.write(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// The shares for the config's mounts: present ones get a tag; a missing optional
/// one is skipped; a missing required one is an error naming it. With `virtiofs`
/// they are virtiofs shares on sockets `vfs<N>.sock` (relative to the session
/// directory), else 9p.
pub fn shares(config: &Config, virtiofs: bool) -> Result<(Vec<Share>, Vec<GuestMount>), Error> {
    let mut shares = Vec::new();
    let mut mounts = Vec::new();
    for m in &config.mounts {
        if !m.host.exists() {
            if m.optional {
                continue;
            }
            return Err(Error::MissingMount {
                host: m.host.clone(),
                guest: m.guest.clone(),
            });
        }
        let n = shares.len();
        let tag = format!("vbx{n}");
        let (kind, fstype) = if virtiofs {
            (
                ShareKind::Virtiofs {
                    socket: PathBuf::from(format!("vfs{n}.sock")),
                },
                FsType::Virtiofs,
            )
        } else {
            (ShareKind::NineP, FsType::NineP)
        };
        shares.push(Share {
            tag: tag.clone(),
            host: m.host.clone(),
            access: m.access,
            kind,
        });
        mounts.push(GuestMount {
            fstype,
            tag,
            access: m.access,
            guest_path: m.guest.clone(),
        });
    }
    Ok((shares, mounts))
}

/// Refuses what the ownership model cannot keep the owner's (see `ownership`): as
/// root, a read-write 9p share of a directory root does not own (QEMU would create
/// root's files in it), and any read-write share where no filter can be installed.
pub fn check_ownership(model: Model, shares: &[Share], roots: &[Root]) -> Result<(), Error> {
    for (share, root) in shares.iter().zip(roots) {
        if share.access != crate::vm::mounts::Access::ReadWrite {
            continue;
        }
        match model {
            Model::User => {}
            Model::RootUnconfined => {
                return Err(Error::Unconfined {
                    host: root.path().to_path_buf(),
                });
            }
            Model::RootConfined => {
                if share.kind == ShareKind::NineP && root.uid != 0 {
                    return Err(Error::NinePOwner {
                        host: root.path().to_path_buf(),
                        uid: root.uid,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Where share `tag`'s root is mounted in its server's namespace.
fn mountpoint(s: &SessionDir, tag: &str) -> PathBuf {
    s.dir().join("shares").join(tag)
}

pub struct Plan<'a> {
    pub session: &'a SessionDir,
    pub project: &'a Path,
    pub config: &'a Config,
    pub image: &'a Image,
    pub accel: Accelerator,
    pub qemu: PathBuf,
    pub explain: String,
    /// What keeps `.git` from the guest; the explain text says the same.
    pub protection: &'a Protection,
    /// Resume a state saved at the last stop if it matches this machine.
    pub resume: bool,
}

/// Prepares everything and starts QEMU (with the session directory as its working
/// directory, so its sockets are short relative paths).
pub fn start(plan: &Plan<'_>) -> Result<Started, Error> {
    let s = plan.session;
    for d in [s.dir().to_path_buf(), s.logs(), s.ssh_dir(), s.fw_cfg()] {
        statefile::ensure_dir(&d, 0o700)?;
    }
    check_free_space(s.dir())?;
    ensure_disk(&s.disk(), &plan.image.disk(), plan.config.disk_gb)?;
    let client = ssh::ensure_keypair(&client_key(s).private, "vibebox client")?;
    let host = ssh::ensure_keypair(&host_key(s).private, "vibebox guest host key")?;
    let net = net_ends()?;
    let _ = fs::remove_file(paths::CONSOLE_SOCKET);
    let console_socket =
        std::os::unix::net::UnixListener::bind(paths::CONSOLE_SOCKET).map_err(Error::Port)?;
    let port = net.ssh.local_addr().map_err(Error::Port)?.port();
    statefile::write_atomic(
        &known_hosts(s),
        ssh::known_hosts_line("127.0.0.1", port, &host.public_key()?).as_bytes(),
        0o600,
    )?;
    let user = GuestUser::current();
    let virtiofsd = virtiofsd::find()?;
    let (mut shares, mounts) = shares(plan.config, virtiofsd.is_some())?;
    // Each root opened without following links and checked, before anything runs.
    let roots = shares
        .iter()
        .map(|sh| Root::open(&sh.host))
        .collect::<Result<Vec<_>, _>>()?;
    let model = Model::detect();
    check_ownership(model, &shares, &roots)?;
    let how = Handoff::choose(plan.protection.guard == Guard::Enforced);
    if how == Handoff::Namespace {
        statefile::ensure_dir(&s.dir().join("shares"), 0o700)?;
        for sh in &shares {
            statefile::ensure_dir(&mountpoint(s, &sh.tag), 0o700)?;
        }
    }
    for (sh, root) in shares.iter_mut().zip(&roots) {
        sh.host = root.served_path(how, &mountpoint(s, &sh.tag));
    }
    let guest = GuestConfig {
        user: user.name.clone(),
        uid: user.uid,
        authorized_keys: client.public_key()?,
        host_key: fs::read_to_string(&host.private).map_err(|source| ssh::Error::Io {
            path: host.private.clone(),
            source,
        })?,
        host_key_pub: host.public_key()?,
        hostname: super::fwcfg::hostname_for(plan.project),
        workdir: Some(plan.project.to_path_buf()),
        explain: plan.explain.clone(),
        mounts,
        git_overlays: plan.protection.overlay.iter().cloned().collect(),
        volumes: super::fwcfg::Volumes {
            root: plan.project.to_path_buf(),
            paths: plan.config.volumes.clone(),
        },
    };
    let fw = guest.write(&s.fw_cfg())?;
    let arch = plan.image.manifest.arch.clone();
    let preset = Preset::for_arch(&arch).ok_or(Error::NoPreset(arch))?;
    for p in [paths::QMP_SOCKET, paths::READY_SOCKET] {
        let _ = fs::remove_file(s.dir().join(p));
    }
    let spec = Spec {
        preset: &preset,
        accel: plan.accel,
        cpus: plan.config.cpus,
        memory_mb: plan.config.memory_mb,
        boot: Boot::Kernel {
            kernel: &plan.image.kernel(),
            initrd: &plan.image.initrd(),
            cmdline: &plan.image.manifest.kernel_cmdline,
        },
        disk: &s.disk(),
        fw_cfg: &fw,
        console_log: &s.console_log(),
        console_socket: Some(Path::new(paths::CONSOLE_SOCKET)),
        ready_socket: Some(Path::new(paths::READY_SOCKET)),
        export_file: None,
        smbios_serial: None,
        qmp_socket: Path::new(paths::QMP_SOCKET),
        sandbox: host::qemu_sandbox(&plan.qemu),
        network: Network::Gateway {
            socket: PathBuf::from(paths::NET_SOCKET),
        },
        shares: &shares,
    };
    // A state saved at the last stop is used only by this very machine, and never
    // left behind for a later boot: a cold boot writes the disk it matched.
    let argv = qemu::argv(&spec);
    // The host's kernel and CPU features too: under KVM the guest runs on `-cpu
    // host`, and a state resumed onto another CPU (a kernel or microcode update, a
    // home restored elsewhere) may crash the guest.
    let host_cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("flags") || l.starts_with("Features"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    let extra = format!(
        "{:?} {model:?} {how:?} {:?} {:?} {host_cpu:?}",
        plan.protection,
        roots
            .iter()
            .map(|r| (r.dev, r.ino, r.uid, r.gid))
            .collect::<Vec<_>>(),
        fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default(),
    );
    let unsaveable = if virtiofsd.is_some() {
        Some("the VM has a virtiofs share, which QEMU 7.2 cannot save")
    } else if plan.accel == Accelerator::Hvf {
        // Not tried under hvf; a resume that fails would cost a minute's wait.
        Some("saving an hvf guest is not supported yet")
    } else {
        None
    };
    let digest = unsaveable
        .is_none()
        .then(|| snapshot::digest(&plan.qemu, &argv, &fw, &extra));
    let (incoming, cold_because) = match &digest {
        Some(d) if plan.resume => match snapshot::take(s.dir(), &s.disk(), d) {
            Take::Resume(file, record) => (Some((file, record)), None),
            Take::Cold(why) => (None, why),
        },
        _ => {
            let had = snapshot::exists(s.dir());
            snapshot::discard(s.dir());
            let why = if plan.resume {
                unsaveable.unwrap_or_default()
            } else {
                "resuming is off"
            };
            (None, had.then(|| why.to_string()))
        }
    };
    let paused = incoming.is_some();
    let mut daemons = Vec::new();
    if let Some(binary) = &virtiofsd {
        for (share, root) in shares.iter().zip(&roots) {
            if let ShareKind::Virtiofs { socket } = &share.kind {
                let served = virtiofsd::Served {
                    root,
                    how,
                    mountpoint: &mountpoint(s, &share.tag),
                    socket,
                    access: share.access,
                };
                daemons.push(virtiofsd::start(
                    binary,
                    s.dir(),
                    &served,
                    &s.logs().join("virtiofsd.log"),
                    plan.protection,
                )?);
            }
        }
    }
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.qemu_log())
        .map_err(Error::Spawn)?;
    // What ssh-keygen, qemu-img and the logs made, for a VM started under sudo.
    statefile::give_tree_to_user(s.dir()).map_err(|source| {
        Error::State(statefile::Error::Write {
            path: s.dir().to_path_buf(),
            source,
        })
    })?;
    let (child, watchdog) = spawn_qemu(&plan.qemu, &spec, s.dir(), &s.qemu_log(), |cmd| {
        if paused {
            // Paused until the supervisor has loaded the state and says `cont`.
            cmd.args(["-S", "-incoming", "defer"]);
        }
        if virtiofsd.is_none() {
            // 9p: QEMU itself serves the files, so it gets the read-only `.git`,
            // the pinned roots, and (as root) the ownership filter.
            plan.protection.confine(cmd);
            for (share, root) in shares.iter().zip(&roots) {
                root.hand_to(cmd, how, &mountpoint(s, &share.tag));
            }
            if model == Model::RootConfined {
                // Only the writable shares' owners: a read-only share's owner is
                // nobody the guest may give files to.
                let owners: Vec<Owner> = shares
                    .iter()
                    .zip(&roots)
                    .filter(|(sh, _)| sh.access == crate::vm::mounts::Access::ReadWrite)
                    .map(|(_, r)| Owner {
                        uid: r.uid,
                        gid: r.gid,
                    })
                    .collect();
                ownership::Filter::new(&owners).confine(cmd);
            }
        }
    })
    .map_err(|e| {
        if e.raw_os_error() == Some(pin::CHANGED_ERRNO) {
            let changed = roots
                .iter()
                .find(|r| !Root::open(r.path()).is_ok_and(|n| (n.dev, n.ino) == (r.dev, r.ino)))
                .or(roots.first());
            Error::Pin(pin::Error::Changed {
                path: changed.map(|r| r.path().to_path_buf()).unwrap_or_default(),
            })
        } else {
            Error::Spawn(e)
        }
    })?;
    console(console_socket, s.console_log());
    Ok(Started {
        child,
        watchdog,
        ssh_port: port,
        user,
        net,
        daemons,
        digest,
        unsaveable,
        incoming,
        cold_because,
    })
}

/// The one place QEMU is started, for sessions and for image preparation alike: in
/// `dir` (the sockets in `spec` are relative to it), stdio to `log`, and never
/// outliving the process that started it (SIGTERM makes it quit cleanly; the
/// returned watchdog ends it when the starter dies or drops it); `confine` may
/// restrict it further (a mount namespace with a read-only `.git`).
pub fn spawn_qemu(
    binary: &Path,
    spec: &Spec<'_>,
    dir: &Path,
    log: &Path,
    confine: impl FnOnce(&mut Command),
) -> std::io::Result<(std::process::Child, lifetime::Watchdog)> {
    let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = Command::new(binary);
    cmd.args(qemu::argv(spec))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    host::end_with_parent(&mut cmd);
    confine(&mut cmd);
    let mut child = cmd.spawn()?;
    let watchdog = lifetime::guard(&mut child).map_err(std::io::Error::other)?;
    Ok((child, watchdog))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn qemu_img(args: &[&str], dir: &Path) -> bool {
        Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn as_root_9p_serves_only_root_owned_writable_shares() {
        use crate::vm::mounts::Access;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().canonicalize().unwrap();
        let share = |access, kind| Share {
            tag: "vbx0".into(),
            host: dir.clone(),
            access,
            kind,
        };
        let vfs = ShareKind::Virtiofs {
            socket: "vfs0.sock".into(),
        };
        let mut root = Root::open(&dir).unwrap();
        root.uid = 1000;
        let rw9p = [share(Access::ReadWrite, ShareKind::NineP)];
        let err = check_ownership(Model::RootConfined, &rw9p, std::slice::from_ref(&root));
        let msg = err.unwrap_err().to_string();
        assert!(
            msg.contains("uid 1000") && msg.contains("install virtiofsd"),
            "{msg}"
        );
        for ok in [
            share(Access::ReadOnly, ShareKind::NineP),
            share(Access::ReadWrite, vfs.clone()),
        ] {
            check_ownership(Model::RootConfined, &[ok], std::slice::from_ref(&root)).unwrap();
        }
        check_ownership(Model::User, &rw9p, std::slice::from_ref(&root)).unwrap();
        let err = check_ownership(Model::RootUnconfined, &rw9p, std::slice::from_ref(&root));
        assert!(matches!(err, Err(Error::Unconfined { .. })));
        root.uid = 0;
        check_ownership(Model::RootConfined, &rw9p, std::slice::from_ref(&root)).unwrap();
    }

    #[test]
    fn a_damaged_disk_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.qcow2");
        fs::write(&disk, b"").unwrap();
        let err = ensure_disk(&disk, &dir.path().join("base.qcow2"), 1).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::BadDisk { .. }), "{msg}");
        assert!(msg.contains(&disk.display().to_string()), "{msg}");
        assert!(disk.exists(), "the disk was removed");
        fs::write(&disk, [b'x'; 4096]).unwrap();
        let msg = ensure_disk(&disk, &dir.path().join("base.qcow2"), 1)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a qcow2 image"), "{msg}");
    }

    #[test]
    fn a_made_disk_passes_and_a_truncated_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        if !qemu_img(
            &["create", "-q", "-f", "qcow2", "base.qcow2", "1G"],
            dir.path(),
        ) {
            eprintln!("skipped: no qemu-img");
            return;
        }
        let disk = dir.path().join("disk.qcow2");
        assert!(ensure_disk(&disk, &dir.path().join("base.qcow2"), 2).unwrap());
        assert!(!dir.path().join("disk.qcow2.tmp").exists());
        assert!(!ensure_disk(&disk, &dir.path().join("base.qcow2"), 2).unwrap());
        let len = fs::metadata(&disk).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.set_len(len / 2).unwrap();
        let err = ensure_disk(&disk, &dir.path().join("base.qcow2"), 2).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        assert_eq!(fs::metadata(&disk).unwrap().len(), len / 2);
    }

    #[test]
    fn the_console_log_is_capped_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("console.sock");
        let log = dir.path().join("console.log");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let reader = console(listener, log.clone());
        // QEMU's side: a guest printing three times the cap, and a last line.
        let mut qemu = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..3 * (CONSOLE_MAX >> 20) {
            qemu.write_all(&chunk).unwrap();
        }
        qemu.write_all(b"\nlast words\n").unwrap();
        drop(qemu);
        reader.join().unwrap();
        let len = |p: &Path| fs::metadata(p).unwrap().len();
        assert!(len(&log) <= CONSOLE_MAX, "{}", len(&log));
        let old = log.with_extension("log.1");
        assert!(len(&old) <= CONSOLE_MAX, "{}", len(&old));
        assert!(fs::read_to_string(&log).unwrap().ends_with("last words\n"));
    }
}
