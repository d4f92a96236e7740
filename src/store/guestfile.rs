//! Files in the project directory, which the guest can write: `vibebox.toml` and the
//! `.vibebox/` marker. They are hostile input to the host, so they are read and
//! written only through directory descriptors opened without following links, never
//! opened unless they are regular files (a FIFO would block the reader forever, a
//! device could act on open), and read with a size cap.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::libc;
use nix::sys::stat::SFlag;

#[derive(Debug, thiserror::Error)]
pub enum GuestFileError {
    #[error(
        "{} is {kind}, not a regular file; the VM may have planted it: remove it and retry",
        path.display()
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{} is a symbolic link; vibebox does not follow links in the project's own files: remove it and retry",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error("{} is larger than {cap} bytes; that is not a file vibebox wrote: remove it and retry", path.display())]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("{} is not UTF-8 text: fix or remove it", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

fn cstr(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `openat` relative to `dir` (or an absolute path when `dir` is `None`).
fn openat(
    dir: Option<&OwnedFd>,
    name: &std::ffi::OsStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let base = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a valid C string and a valid (or AT_FDCWD) directory descriptor.
    let fd = unsafe {
        libc::openat(
            base,
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory without following a link at its last component.
fn open_dir(dir: Option<&OwnedFd>, name: &std::ffi::OsStr) -> io::Result<OwnedFd> {
    openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// The file-type bits of a mode (`mode_t` is 16 bits on macOS, 32 on Linux).
#[allow(clippy::unnecessary_cast)]
fn format(mode: u32) -> SFlag {
    SFlag::from_bits_truncate(mode as libc::mode_t) & SFlag::S_IFMT
}

fn kind_of(mode: u32) -> &'static str {
    match format(mode) {
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symbolic link",
        _ => "not a regular file",
    }
}

/// Reads `root/rel` (a relative path of plain components), following no link on the
/// way below `root`. `Ok(None)` when it (or a directory on the way) does not exist.
pub fn read(root: &Path, rel: &Path, cap: u64) -> Result<Option<String>, GuestFileError> {
    let path = root.join(rel);
    let rerr = |source| GuestFileError::Read {
        path: path.clone(),
        source,
    };
    let not_found = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let mut dir = match open_dir(None, root.as_os_str()) {
        Ok(d) => d,
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(rerr(e)),
    };
    let parts: Vec<_> = rel.iter().collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Err(rerr(io::Error::from(io::ErrorKind::InvalidInput)));
    };
    for part in dirs {
        dir = match open_dir(Some(&dir), part) {
            Ok(d) => d,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e)
                if e.raw_os_error() == Some(libc::ELOOP)
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                return Err(GuestFileError::Symlink {
                    path: root.join(part),
                });
            }
            Err(e) => return Err(rerr(e)),
        };
    }
    // Look before opening: a FIFO or a device is never opened at all.
    let st = match nix::sys::stat::fstatat(&dir, *last, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(rerr(io::Error::from(e))),
    };
    #[allow(clippy::unnecessary_cast)]
    let mode = st.st_mode as u32;
    if format(mode) == SFlag::S_IFLNK {
        return Err(GuestFileError::Symlink { path });
    }
    if format(mode) != SFlag::S_IFREG {
        return Err(GuestFileError::NotRegular {
            path,
            kind: kind_of(mode),
        });
    }
    // O_NONBLOCK: should it have been swapped for a FIFO since, the open still
    // returns, and the check below refuses it.
    let fd = openat(
        Some(&dir),
        last,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => GuestFileError::Symlink { path: path.clone() },
        _ => rerr(e),
    })?;
    let mut file = File::from(fd);
    let meta = file.metadata().map_err(rerr)?;
    if !meta.file_type().is_file() || meta.ino() != st.st_ino as u64 {
        return Err(GuestFileError::NotRegular {
            path,
            kind: kind_of(meta.mode()),
        });
    }
    if meta.len() > cap {
        return Err(GuestFileError::TooLarge { path, cap });
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(rerr)?;
    if bytes.len() as u64 > cap {
        return Err(GuestFileError::TooLarge { path, cap });
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| GuestFileError::NotUtf8 { path })
}

/// The directory `root/name`, created (0700) if missing, opened without following a
/// link: every later write goes through this descriptor, so a guest that swaps the
/// directory for a link after the check cannot redirect the write.
fn subdir(root: &Path, name: &str) -> io::Result<OwnedFd> {
    let top = open_dir(None, root.as_os_str())?;
    let c = cstr(std::ffi::OsStr::new(name))?;
    // SAFETY: valid descriptor and C string.
    let r = unsafe { libc::mkdirat(top.as_raw_fd(), c.as_ptr(), 0o700) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    open_dir(Some(&top), std::ffi::OsStr::new(name))
}

/// Writes `root/dir/name` atomically (temp file, fsync, rename, directory fsync),
/// all through a descriptor of `root/dir` opened without following links.
pub fn write(root: &Path, dir: &str, name: &str, data: &[u8]) -> Result<(), GuestFileError> {
    let path = root.join(dir).join(name);
    let werr = |source| GuestFileError::Write {
        path: path.clone(),
        source,
    };
    let d = subdir(root, dir).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => GuestFileError::Symlink {
            path: root.join(dir),
        },
        _ => werr(e),
    })?;
    let tmp = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    );
    let tmp_os = std::ffi::OsStr::new(&tmp);
    let result = (|| {
        let fd = openat(
            Some(&d),
            tmp_os,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o644,
        )?;
        let mut f = File::from(fd);
        f.write_all(data)?;
        f.sync_all()?;
        let (from, to) = (cstr(tmp_os)?, cstr(std::ffi::OsStr::new(name))?);
        // SAFETY: valid descriptors and C strings.
        if unsafe { libc::renameat(d.as_raw_fd(), from.as_ptr(), d.as_raw_fd(), to.as_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        File::from(d.try_clone()?).sync_all()
    })();
    if result.is_err()
        && let Ok(c) = cstr(tmp_os)
    {
        // SAFETY: valid descriptor and C string.
        unsafe { libc::unlinkat(d.as_raw_fd(), c.as_ptr(), 0) };
    }
    result.map_err(werr)
}

/// Removes `root/dir/name` (a link is removed as a link), through a descriptor of
/// `root/dir`. Missing is fine. Returns whether something was removed.
pub fn remove(root: &Path, dir: &str, name: &str) -> Result<bool, GuestFileError> {
    let path = root.join(dir).join(name);
    let d = match open_dir(None, root.as_os_str())
        .and_then(|top| open_dir(Some(&top), std::ffi::OsStr::new(dir)))
    {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
            return Ok(false);
        }
        Err(source) => return Err(GuestFileError::Write { path, source }),
    };
    let c = cstr(std::ffi::OsStr::new(name)).map_err(|source| GuestFileError::Write {
        path: path.clone(),
        source,
    })?;
    // SAFETY: valid descriptor and C string.
    if unsafe { libc::unlinkat(d.as_raw_fd(), c.as_ptr(), 0) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::NotFound {
            return Ok(false);
        }
        return Err(GuestFileError::Write { path, source: e });
    }
    Ok(true)
}

/// Removes the directory `root/dir` if it is empty (never recursively: what else is
/// in it is not ours to delete).
pub fn remove_dir_if_empty(root: &Path, dir: &str) {
    if let (Ok(top), Ok(c)) = (
        open_dir(None, root.as_os_str()),
        cstr(std::ffi::OsStr::new(dir)),
    ) {
        // SAFETY: valid descriptor and C string; fails harmlessly when not empty.
        unsafe { libc::unlinkat(top.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn reads_regular_files_and_refuses_the_rest_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/ok"), "hello").unwrap();
        assert_eq!(
            read(root, Path::new("d/ok"), 100).unwrap().as_deref(),
            Some("hello")
        );
        assert!(read(root, Path::new("d/missing"), 100).unwrap().is_none());
        assert!(read(root, Path::new("nodir/x"), 100).unwrap().is_none());
        assert!(matches!(
            read(root, Path::new("d/ok"), 3),
            Err(GuestFileError::TooLarge { .. })
        ));
        nix::unistd::mkfifo(
            &root.join("d/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let t = Instant::now();
        let e = read(root, Path::new("d/fifo"), 100).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(e.to_string().contains("a FIFO"), "{e}");
        std::os::unix::fs::symlink("/etc/hostname", root.join("d/link")).unwrap();
        assert!(matches!(
            read(root, Path::new("d/link"), 100),
            Err(GuestFileError::Symlink { .. })
        ));
        // A link in the middle is not followed either.
        std::os::unix::fs::symlink(root.join("d"), root.join("via")).unwrap();
        assert!(matches!(
            read(root, Path::new("via/ok"), 100),
            Err(GuestFileError::Symlink { .. })
        ));
    }

    #[test]
    fn writes_go_through_the_directory_never_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("p");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        write(&root, ".m", "f", b"one").unwrap();
        assert_eq!(std::fs::read_to_string(root.join(".m/f")).unwrap(), "one");
        write(&root, ".m", "f", b"two").unwrap();
        assert_eq!(std::fs::read_to_string(root.join(".m/f")).unwrap(), "two");
        assert_eq!(std::fs::read_dir(root.join(".m")).unwrap().count(), 1);
        assert!(remove(&root, ".m", "f").unwrap());
        assert!(!remove(&root, ".m", "f").unwrap());
        remove_dir_if_empty(&root, ".m");
        assert!(!root.join(".m").exists());
        std::os::unix::fs::symlink(&elsewhere, root.join(".m")).unwrap();
        assert!(matches!(
            write(&root, ".m", "f", b"x"),
            Err(GuestFileError::Symlink { .. })
        ));
        assert!(!remove(&root, ".m", "f").unwrap());
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }
}
