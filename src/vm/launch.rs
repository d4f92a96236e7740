//! Turning a session into a running QEMU: the disk overlay, keys, fw_cfg entries,
//! shares and the command line, then the process itself. Runs in the supervisor,
//! whose working directory is the session directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::fwcfg::{FsType, GuestConfig, GuestMount};
use super::guest::GuestUser;
use super::host::{self, Accelerator};
use super::protect::Protection;
use super::qemu::{self, Boot, Network, Preset, Share, ShareKind, Spec};
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
    pub ssh_port: u16,
    pub user: GuestUser,
    /// For the gateway the supervisor runs.
    pub net: NetEnds,
    /// The virtiofsd processes of the shares; keep them until QEMU has exited.
    pub daemons: Vec<virtiofsd::Daemon>,
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
/// Made under a temp name and renamed, so a failure (disk full) leaves no half disk.
pub fn ensure_disk(disk: &Path, base: &Path, size_gb: u64) -> Result<bool, Error> {
    if disk.exists() {
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
        .map_err(|e| Error::Disk {
            path: disk.to_path_buf(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Disk {
            path: disk.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    fs::rename(&tmp, disk).map_err(|e| Error::Disk {
        path: disk.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(true)
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
    let port = net.ssh.local_addr().map_err(Error::Port)?.port();
    statefile::write_atomic(
        &known_hosts(s),
        ssh::known_hosts_line("127.0.0.1", port, &host.public_key()?).as_bytes(),
        0o600,
    )?;
    let user = GuestUser::current();
    let virtiofsd = virtiofsd::find()?;
    let (shares, mounts) = shares(plan.config, virtiofsd.is_some())?;
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
        ready_socket: Some(Path::new(paths::READY_SOCKET)),
        export_file: None,
        smbios_serial: None,
        qmp_socket: Path::new(paths::QMP_SOCKET),
        network: Network::Gateway {
            socket: PathBuf::from(paths::NET_SOCKET),
        },
        shares: &shares,
    };
    let mut daemons = Vec::new();
    if let Some(binary) = &virtiofsd {
        for share in &shares {
            if let ShareKind::Virtiofs { socket } = &share.kind {
                daemons.push(virtiofsd::start(
                    binary,
                    s.dir(),
                    &share.host,
                    socket,
                    share.access,
                    &s.logs().join("virtiofsd.log"),
                    plan.protection,
                )?);
            }
        }
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.qemu_log())
        .map_err(Error::Spawn)?;
    let mut cmd = Command::new(&plan.qemu);
    cmd.args(qemu::argv(&spec))
        .current_dir(s.dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(Error::Spawn)?)
        .stderr(log);
    // QEMU never outlives its supervisor: SIGTERM makes it quit cleanly.
    host::end_with_parent(&mut cmd);
    if virtiofsd.is_none() {
        // 9p: QEMU itself serves the files, so it gets the read-only `.git`.
        plan.protection.confine(&mut cmd);
    }
    let child = cmd.spawn().map_err(Error::Spawn)?;
    Ok(Started {
        child,
        ssh_port: port,
        user,
        net,
        daemons,
    })
}
