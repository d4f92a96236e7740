//! Share roots pinned by file descriptor. The config gives each share the
//! canonical path of the directory that was approved; between that check and the
//! moment the share server opens it, something (another VM writing a parent
//! directory) could put a link or another directory in its place. So at launch
//! each root is opened one component at a time without following links, checked to
//! be the same directory the canonical path names (device and inode), and the
//! server gets that very directory:
//!
//! - where the server has its own mount namespace (Linux, as root or with user
//!   namespaces; the one `protect` makes), the root is opened again inside it, the
//!   same way, checked against the pinned one, and bind-mounted from that
//!   descriptor on a mount point in the session directory (which no guest can
//!   reach); the server is given that mount point;
//! - on Linux without one, the server inherits the descriptor and is given
//!   `/proc/self/fd/N/.`;
//! - elsewhere (macOS) the server gets the path, checked just before it starts.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "share {}: {} is a symbolic link or not a directory, so it is not the directory that was approved; nothing was shared (run vibebox again to see where the path leads now)",
        path.display(),
        at.display()
    )]
    NotReal { path: PathBuf, at: PathBuf },
    #[error(
        "share {}: the directory at that path changed while the VM was starting (it is not the one that was checked); nothing was shared",
        path.display()
    )]
    Changed { path: PathBuf },
    #[error("share {}: cannot open it: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The errno a share server's start fails with when the root it re-opened is not
/// the pinned one.
pub const CHANGED_ERRNO: i32 = nix::libc::ESTALE;

/// How the share server is handed its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// A bind mount in the server's own mount namespace.
    Namespace,
    /// An inherited descriptor, as `/proc/self/fd/N`.
    Inherit,
    /// The checked path.
    Path,
}

impl Handoff {
    /// `namespace`: the server runs in a mount namespace of its own (see
    /// `Protection::confine`).
    pub fn choose(namespace: bool) -> Handoff {
        if !cfg!(target_os = "linux") {
            Handoff::Path
        } else if namespace {
            Handoff::Namespace
        } else {
            Handoff::Inherit
        }
    }
}

/// A share root held open since it was checked.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    components: Vec<CString>,
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
    pub gid: u32,
}

/// The path's components below `/`, for a walk that needs no allocation. Only
/// absolute paths of plain names: the config gives canonical ones.
fn components(path: &Path) -> Option<Vec<CString>> {
    let mut out = Vec::new();
    let mut parts = path.components();
    if parts.next() != Some(Component::RootDir) {
        return None;
    }
    for c in parts {
        match c {
            Component::Normal(name) => out.push(CString::new(name.as_bytes()).ok()?),
            _ => return None,
        }
    }
    Some(out)
}

/// Opens `/` and then each component with `O_NOFOLLOW | O_DIRECTORY`: a link (or a
/// file) anywhere on the way fails. On failure, how many components were walked.
/// Allocation-free, so a child can run it between fork and exec.
fn walk(components: &[CString]) -> Result<OwnedFd, (usize, Errno)> {
    #[cfg(target_os = "linux")]
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    // No O_PATH: each directory on the way must be readable.
    #[cfg(not(target_os = "linux"))]
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut dir = nix::fcntl::open(c"/", flags, Mode::empty()).map_err(|e| (0, e))?;
    for (i, c) in components.iter().enumerate() {
        dir = nix::fcntl::openat(&dir, c.as_c_str(), flags | OFlag::O_NOFOLLOW, Mode::empty())
            .map_err(|e| (i, e))?;
    }
    Ok(dir)
}

impl Root {
    /// Opens the approved directory `path` without following links and checks it
    /// is what `path` names.
    pub fn open(path: &Path) -> Result<Root, Error> {
        let io = |source: std::io::Error| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let components = components(path).ok_or_else(|| {
            io(std::io::Error::other(
                "not an absolute path without '.' or '..'",
            ))
        })?;
        let fd = walk(&components).map_err(|(i, e)| match e {
            Errno::ELOOP | Errno::ENOTDIR => Error::NotReal {
                path: path.to_path_buf(),
                at: components[..=i].iter().fold(PathBuf::from("/"), |p, c| {
                    p.join(std::ffi::OsStr::from_bytes(c.as_bytes()))
                }),
            },
            e => io(e.into()),
        })?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| io(e.into()))?;
        let named = std::fs::metadata(path).map_err(io)?;
        use std::os::unix::fs::MetadataExt;
        if (named.dev(), named.ino()) != (st.st_dev as u64, st.st_ino as u64) {
            return Err(Error::Changed {
                path: path.to_path_buf(),
            });
        }
        Ok(Root {
            fd,
            path: path.to_path_buf(),
            components,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            uid: st.st_uid,
            gid: st.st_gid,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path the share server is given for this root.
    pub fn served_path(&self, how: Handoff, mountpoint: &Path) -> PathBuf {
        match how {
            Handoff::Namespace => mountpoint.to_path_buf(),
            // The trailing `/.` makes the magic link a middle component, so a server
            // that opens its root with O_NOFOLLOW (virtiofsd does) still follows it.
            Handoff::Inherit => PathBuf::from(format!("/proc/self/fd/{}/.", self.fd.as_raw_fd())),
            Handoff::Path => self.path.clone(),
        }
    }

    /// Makes [`Root::served_path`] mean this root in `cmd`. For
    /// [`Handoff::Namespace`], call it after the closure that makes the namespace
    /// (and its read-only mounts, which the bind carries along), and make
    /// `mountpoint` first: an empty directory outside every share.
    pub fn hand_to(&self, cmd: &mut Command, how: Handoff, mountpoint: &Path) {
        use std::os::unix::process::CommandExt;
        match how {
            Handoff::Path => {}
            Handoff::Inherit => {
                let fd = self.fd.as_raw_fd();
                // SAFETY: one fcntl on a descriptor the child inherited.
                unsafe {
                    cmd.pre_exec(move || {
                        nix::fcntl::fcntl(
                            std::os::fd::BorrowedFd::borrow_raw(fd),
                            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                        )?;
                        Ok(())
                    });
                }
            }
            Handoff::Namespace => {
                let components = self.components.clone();
                let id = (self.dev, self.ino);
                let target = CString::new(mountpoint.as_os_str().as_bytes())
                    .unwrap_or_else(|_| c"/nonexistent".to_owned());
                // SAFETY: the closure only makes system calls on data prepared here.
                unsafe {
                    cmd.pre_exec(move || bind_pinned(&components, id, &target));
                }
            }
        }
    }
}

/// In the server's mount namespace: opens the root again the same way, checks it
/// is the pinned directory, and bind-mounts it (with what is mounted below it)
/// from that descriptor on `target`.
#[cfg(target_os = "linux")]
fn bind_pinned(
    components: &[CString],
    id: (u64, u64),
    target: &std::ffi::CStr,
) -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    let fd = walk(components).map_err(|(_, e)| std::io::Error::from(e))?;
    let st = nix::sys::stat::fstat(&fd)?;
    if (st.st_dev as u64, st.st_ino as u64) != id {
        return Err(std::io::Error::from_raw_os_error(CHANGED_ERRNO));
    }
    let mut buf = [0u8; 40];
    let source = proc_fd_path(fd.as_raw_fd(), &mut buf);
    let none: Option<&std::ffi::CStr> = None;
    mount(
        Some(source),
        target,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )?;
    Ok(())
}

/// No mount namespaces off Linux (`Handoff::choose` never picks one there): a
/// server asked to get its root that way does not start.
#[cfg(not(target_os = "linux"))]
fn bind_pinned(_: &[CString], _: (u64, u64), _: &std::ffi::CStr) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// `/proc/self/fd/<fd>` written into `buf`, without allocating.
#[cfg(target_os = "linux")]
fn proc_fd_path(fd: i32, buf: &mut [u8; 40]) -> &std::ffi::CStr {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 12];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    std::ffi::CStr::from_bytes_until_nul(&buf[..]).expect("NUL written above")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    #[test]
    #[cfg(target_os = "linux")]
    fn proc_paths_without_allocation() {
        let mut buf = [0u8; 40];
        assert_eq!(proc_fd_path(0, &mut buf), c"/proc/self/fd/0");
        assert_eq!(proc_fd_path(1234567, &mut buf), c"/proc/self/fd/1234567");
        assert_eq!(
            proc_fd_path(i32::MAX, &mut buf).to_bytes(),
            format!("/proc/self/fd/{}", i32::MAX).as_bytes()
        );
    }

    #[test]
    fn only_plain_absolute_paths() {
        assert_eq!(components(Path::new("/")).unwrap().len(), 0);
        assert_eq!(components(Path::new("/a/b c/é")).unwrap().len(), 3);
        assert!(components(Path::new("a/b")).is_none());
        assert!(components(Path::new("/a/../b")).is_none());
    }

    #[test]
    fn a_real_directory_is_pinned_and_a_file_is_not() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        let d = base.join("a dir, \"x\"");
        fs::create_dir(&d).unwrap();
        let r = Root::open(&d).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(r.ino, fs::metadata(&d).unwrap().ino());
        assert_eq!(r.served_path(Handoff::Path, Path::new("/m")), d);
        assert_eq!(
            r.served_path(Handoff::Namespace, Path::new("/m")),
            Path::new("/m")
        );
        fs::write(base.join("f"), "").unwrap();
        let err = Root::open(&base.join("f")).unwrap_err();
        assert!(matches!(err, Error::NotReal { .. }), "{err}");
        assert!(matches!(
            Root::open(&base.join("missing")).unwrap_err(),
            Error::Open { .. }
        ));
    }

    proptest! {
        /// A link put in place of any component of the approved path, pointing at a
        /// directory that looks the same, is refused, and the message names it.
        #[test]
        fn a_link_in_any_component_is_refused(depth in 1usize..6, at in 0usize..6) {
            let at = at % depth;
            let t = tempfile::tempdir().unwrap();
            let base = t.path().canonicalize().unwrap();
            let names: Vec<String> = (0..depth).map(|i| format!("d{i}")).collect();
            let path = names.iter().fold(base.clone(), |p, n| p.join(n));
            fs::create_dir_all(&path).unwrap();
            prop_assert!(Root::open(&path).is_ok());
            // The swap: component `at` becomes a link to a copy of the same tree.
            let swapped = names[..=at].iter().fold(base.clone(), |p, n| p.join(n));
            let elsewhere = base.join("elsewhere");
            fs::rename(&swapped, &elsewhere).unwrap();
            std::os::unix::fs::symlink(&elsewhere, &swapped).unwrap();
            prop_assert!(path.is_dir(), "the link leads to the same-looking tree");
            let err = Root::open(&path).unwrap_err();
            match &err {
                Error::NotReal { at: named, .. } => prop_assert_eq!(named, &swapped),
                other => prop_assert!(false, "{other}"),
            }
        }
    }

    /// Without a namespace the server inherits the descriptor: its
    /// `/proc/self/fd/N` is the pinned directory even after the path changed.
    #[test]
    fn an_inherited_descriptor_is_the_pinned_directory() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        let share = base.join("share");
        fs::create_dir_all(&share).unwrap();
        fs::write(share.join("approved"), "").unwrap();
        let root = Root::open(&share).unwrap();
        fs::rename(&share, base.join("moved")).unwrap();
        fs::create_dir(&share).unwrap();
        let served = root.served_path(Handoff::Inherit, Path::new("/unused"));
        assert!(served.as_os_str().as_bytes().ends_with(b"/."), "{served:?}");
        let mut cmd = Command::new("ls");
        cmd.arg(&served);
        root.hand_to(&mut cmd, Handoff::Inherit, Path::new("/unused"));
        let out = cmd.output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "approved\n",
            "{out:?}"
        );
    }

    /// The launch-time handoff as a share server gets it: in a mount namespace the
    /// mount point shows the pinned directory; a directory put in its place after
    /// the pin (same path, no link) makes the start fail.
    #[test]
    #[cfg(target_os = "linux")]
    fn the_server_gets_the_pinned_directory_or_does_not_start() {
        if !cfg!(target_os = "linux") || !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root on Linux");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        let share = base.join("share");
        let mnt = base.join("mnt");
        fs::create_dir_all(&share).unwrap();
        fs::create_dir_all(&mnt).unwrap();
        fs::write(share.join("approved"), "").unwrap();
        let run = |root: &Root| {
            let mut cmd = Command::new("ls");
            cmd.arg(&mnt);
            // SAFETY: unshare only.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                    nix::mount::mount(
                        None::<&str>,
                        "/",
                        None::<&str>,
                        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                        None::<&str>,
                    )?;
                    Ok(())
                });
            }
            root.hand_to(&mut cmd, Handoff::Namespace, &mnt);
            cmd.output()
        };
        let root = Root::open(&share).unwrap();
        let out = run(&root).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "approved\n");
        // Nothing reached the host's mount table.
        assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);

        fs::rename(&share, base.join("old")).unwrap();
        fs::create_dir(&share).unwrap();
        let err = run(&root).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(CHANGED_ERRNO), "{err}");
        fs::remove_dir(&share).unwrap();
        std::os::unix::fs::symlink(base.join("old"), &share).unwrap();
        let err = run(&root).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOTDIR), "{err}");
    }
}
