//! virtiofs on Linux: finding a usable `virtiofsd`, its command line, and starting one
//! per share before QEMU connects to it. Where none is usable the shares stay 9p
//! (`-virtfs`, QEMU's own server), which is also the macOS path.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::mounts::Access;
use super::ownership::{self, Owner};
use super::pin::{self, Handoff, Root};
use super::protect::Protection;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "VIBEBOX_VIRTIOFSD={0} is not a virtiofsd with --readonly and --shared-dir (the Rust virtiofsd, `cargo install virtiofsd`); set it to such a binary or to `off` to share with 9p"
    )]
    Unusable(PathBuf),
    #[error("cannot start virtiofsd for {}: {source}", host.display())]
    Spawn {
        host: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pin(#[from] pin::Error),
    #[error(
        "virtiofsd for {} did not start ({why}); see {}, or set VIBEBOX_VIRTIOFSD=off to share with 9p",
        host.display(),
        log.display()
    )]
    NotListening {
        host: PathBuf,
        why: String,
        log: PathBuf,
    },
}

/// Where distributions put virtiofsd outside `PATH`.
const LIBEXEC: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/virtiofsd"];

/// How long a virtiofsd may take to create its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The virtiofsd to use, or None for 9p. `VIBEBOX_VIRTIOFSD` picks one (a path, or
/// `off`); otherwise the first usable one on `PATH` or in libexec. Only the Rust
/// virtiofsd qualifies: the C one QEMU 7.2 ships (`/usr/lib/qemu/virtiofsd`) has no
/// read-only mode, and read-only must be enforced on the host.
pub fn find() -> Result<Option<PathBuf>, Error> {
    if !cfg!(target_os = "linux") {
        return Ok(None);
    }
    match std::env::var_os("VIBEBOX_VIRTIOFSD") {
        Some(v) if v == "off" || v.is_empty() => Ok(None),
        Some(v) => {
            let path = PathBuf::from(v);
            if usable(&path) {
                Ok(Some(path))
            } else {
                Err(Error::Unusable(path))
            }
        }
        None => Ok(which::which("virtiofsd")
            .ok()
            .into_iter()
            .chain(LIBEXEC.iter().map(PathBuf::from))
            .find(|p| usable(p))),
    }
}

fn usable(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--help")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| is_rust_virtiofsd(&String::from_utf8_lossy(&o.stdout)))
}

/// The Rust virtiofsd's help names both options; the C one's has neither.
pub fn is_rust_virtiofsd(help: &str) -> bool {
    help.contains("--shared-dir") && help.contains("--readonly")
}

/// The command line for one share. As root (`owner` given: who owns the share),
/// virtiofsd's namespace sandbox (pivot_root into the share), every guest uid and
/// gid squashed to the owner's and no CAP_MKNOD (see `ownership`). As a user, it
/// cannot make that sandbox without privileges, so it runs unsandboxed with the
/// user's rights, like QEMU's 9p server: every file the guest creates is the user's.
pub fn argv(host: &Path, socket: &Path, access: Access, owner: Option<Owner>) -> Vec<OsString> {
    let as_root = owner.is_some();
    let mut a: Vec<OsString> = vec![
        "--shared-dir".into(),
        host.into(),
        "--socket-path".into(),
        socket.into(),
        "--sandbox".into(),
        if as_root { "namespace" } else { "none" }.into(),
        "--cache".into(),
        "auto".into(),
        "--log-level".into(),
        "warn".into(),
    ];
    if access == Access::ReadOnly {
        a.push("--readonly".into());
    }
    if let Some(owner) = owner {
        a.extend(
            ownership::virtiofsd_args(owner)
                .into_iter()
                .map(OsString::from),
        );
    }
    a
}

/// A started virtiofsd; killed when dropped (it also exits when QEMU goes away).
pub struct Daemon {
    child: Child,
    /// Ends it if the supervisor dies; dropped after the child is reaped.
    _watchdog: super::lifetime::Watchdog,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One share as its virtiofsd gets it.
pub struct Served<'a> {
    /// The pinned root (its path is the approved one, for messages).
    pub root: &'a Root,
    pub how: Handoff,
    /// Where the root is mounted for [`Handoff::Namespace`].
    pub mountpoint: &'a Path,
    pub socket: &'a Path,
    pub access: Access,
}

/// Starts virtiofsd for one share in `dir` (the session directory, so the socket
/// path stays short) and waits until its socket exists, so QEMU can connect.
pub fn start(
    binary: &Path,
    dir: &Path,
    share: &Served<'_>,
    log: &Path,
    protection: &Protection,
) -> Result<Daemon, Error> {
    let host = share.root.path();
    let socket = share.socket;
    let spawn_err = |source: std::io::Error| {
        if source.raw_os_error() == Some(pin::CHANGED_ERRNO) {
            return Error::Pin(pin::Error::Changed {
                path: host.to_path_buf(),
            });
        }
        Error::Spawn {
            host: host.to_path_buf(),
            source,
        }
    };
    let _ = fs::remove_file(dir.join(socket));
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(spawn_err)?;
    let owner = nix::unistd::geteuid().is_root().then_some(Owner {
        uid: share.root.uid,
        gid: share.root.gid,
    });
    let served = share.root.served_path(share.how, share.mountpoint);
    let mut cmd = Command::new(binary);
    cmd.args(argv(&served, socket, share.access, owner))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(spawn_err)?)
        .stderr(out);
    // Never outlives the supervisor that owns it.
    super::host::end_with_parent(&mut cmd);
    // Its own mount namespace with `.git` read-only; its namespace sandbox (as root)
    // starts from that view, so the guest cannot reach a writable `.git`.
    protection.confine(&mut cmd);
    // The approved directory itself, opened in that namespace (so `.git` stays
    // read-only in what it serves).
    share.root.hand_to(&mut cmd, share.how, share.mountpoint);
    if let Some(owner) = owner {
        ownership::Filter::new(&[owner]).confine(&mut cmd);
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let watchdog =
        super::lifetime::guard(&mut child).map_err(|e| spawn_err(std::io::Error::other(e)))?;
    let mut daemon = Daemon {
        child,
        _watchdog: watchdog,
    };
    let not_listening = |why: String| Error::NotListening {
        host: host.to_path_buf(),
        why,
        log: log.to_path_buf(),
    };
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        if dir.join(socket).exists() {
            return Ok(daemon);
        }
        if let Ok(Some(status)) = daemon.child.try_wait() {
            return Err(not_listening(format!("it exited: {status}")));
        }
        if Instant::now() > deadline {
            return Err(not_listening(format!(
                "no socket after {} s",
                LISTEN_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_the_rust_virtiofsd_from_the_c_one() {
        let rust = "Usage: virtiofsd --shared-dir <SHARED_DIR> --socket-path <SOCKET_PATH>\n      --readonly\n";
        let c =
            "usage: virtiofsd [options]\n    -o source=PATH             shared directory tree\n";
        assert!(is_rust_virtiofsd(rust));
        assert!(!is_rust_virtiofsd(c));
    }

    #[test]
    fn read_only_and_sandbox_follow_access_and_privilege() {
        let s = |a: &[OsString]| {
            a.iter()
                .map(|x| x.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let host = Path::new("/home/al/my proj, \"x\"");
        let owner = Some(Owner { uid: 0, gid: 5 });
        let ro = s(&argv(host, Path::new("vfs0.sock"), Access::ReadOnly, owner));
        assert_eq!(
            ro,
            "--shared-dir /home/al/my proj, \"x\" --socket-path vfs0.sock --sandbox namespace --cache auto --log-level warn --readonly --translate-uid squash-guest:0:0:4294967295 --translate-gid squash-guest:0:5:4294967295 --modcaps=-mknod"
        );
        let rw = s(&argv(host, Path::new("vfs1.sock"), Access::ReadWrite, None));
        assert!(rw.contains("--sandbox none"), "{rw}");
        assert!(!rw.contains("--readonly"), "{rw}");
        assert!(!rw.contains("--translate"), "{rw}");
        // The path is one argument, never split or escaped.
        let a = argv(host, Path::new("s"), Access::ReadWrite, owner);
        assert_eq!(a[1], OsString::from(host));
    }
}
