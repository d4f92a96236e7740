//! Locked, atomic state files.
//!
//! Every file vibebox owns is replaced, never edited in place: a reader sees the old
//! content or the new one, and a crash leaves one of the two. Read-modify-write cycles
//! hold an exclusive `flock` on a separate lock file, because the data file itself is
//! replaced by `rename` and a lock on it would be lost with the old inode.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error(
        "{path} is a symbolic link; vibebox does not follow links in its state (remove it and retry)"
    )]
    Symlink { path: PathBuf },
}

/// A unique hidden name beside `path` (same directory, so a rename is atomic).
fn sibling_temp(path: &Path, tag: &str) -> std::path::PathBuf {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    dir.join(format!(
        ".{name}.{tag}-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ))
}

/// Writes `data` to `path` through a temp file in the same directory, fsyncs it, renames
/// it over the target and fsyncs the directory. A symlink at `path` is replaced, not
/// followed, so a hostile guest that plants one cannot redirect the write.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let werr = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = sibling_temp(path, "tmp");
    let dir = tmp.parent().unwrap_or(Path::new(".")).to_path_buf();
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            // Directory fsync makes the rename durable; some filesystems refuse it.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

/// Like [`write_atomic`], but never replaces an existing file: returns `Ok(false)` when
/// `path` already exists. The content appears whole or not at all (hard link of a
/// finished temp file), so a concurrent reader never sees half a file.
pub fn write_new_atomic(path: &Path, data: &[u8], mode: u32) -> Result<bool, Error> {
    let tmp = sibling_temp(path, "new");
    write_atomic(&tmp, data, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(Error::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads a state file without following a symlink at its final component. Returns
/// `Ok(None)` when it does not exist.
pub fn read_nofollow(path: &Path) -> Result<Option<String>, Error> {
    let rerr = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Error::Symlink {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(rerr(e)),
    }
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(rerr(e)),
    };
    let mut s = String::new();
    // Bounded: state files are small, and a guest could plant a huge one.
    (&mut f)
        .take(16 * 1024 * 1024)
        .read_to_string(&mut s)
        .map_err(rerr)?;
    Ok(Some(s))
}

/// Makes sure `dir` is a real directory (not a symlink), creating it with `mode` if
/// needed.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), Error> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::Symlink {
            path: dir.to_path_buf(),
        }),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Write {
            path: dir.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .map_err(|source| Error::Write {
                path: dir.to_path_buf(),
                source,
            }),
        Err(source) => Err(Error::Read {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// An exclusive advisory lock, released when dropped (or when the process dies).
pub struct Lock {
    _flock: Flock<File>,
}

impl Lock {
    /// Blocks until the exclusive lock on `path` is held. The lock file is created if
    /// missing and never removed: removing it would let two processes lock two inodes.
    pub fn exclusive(path: &Path) -> Result<Self, Error> {
        Self::acquire(path, FlockArg::LockExclusive).map(|l| l.expect("blocking lock"))
    }

    /// Takes the exclusive lock only if nobody holds it.
    pub fn try_exclusive(path: &Path) -> Result<Option<Self>, Error> {
        Self::acquire(path, FlockArg::LockExclusiveNonblock)
    }

    fn acquire(path: &Path, arg: FlockArg) -> Result<Option<Self>, Error> {
        let lerr = |source| Error::Lock {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(lerr)?;
        loop {
            match Flock::lock(file, arg) {
                Ok(flock) => return Ok(Some(Lock { _flock: flock })),
                Err((f, nix::errno::Errno::EINTR)) => file = f,
                Err((_, nix::errno::Errno::EWOULDBLOCK))
                    if arg == FlockArg::LockExclusiveNonblock =>
                {
                    return Ok(None);
                }
                Err((_, errno)) => return Err(lerr(io::Error::from(errno))),
            }
        }
    }
}

/// Bytes free for unprivileged writes on the filesystem holding `path` (unknown
/// counts as plenty: the write itself then reports a full disk).
pub fn free_bytes(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        fs::write(&target, "precious").unwrap();
        let link = dir.path().join("state.toml");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_atomic(&link, b"new", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(fs::read_to_string(&link).unwrap(), "new");
        assert!(
            !fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn write_new_never_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert!(write_new_atomic(&p, b"one", 0o644).unwrap());
        assert!(!write_new_atomic(&p, b"two", 0o644).unwrap());
        assert_eq!(fs::read_to_string(&p).unwrap(), "one");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn read_refuses_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("s");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        assert!(matches!(read_nofollow(&link), Err(Error::Symlink { .. })));
        assert!(
            read_nofollow(&dir.path().join("missing"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn try_lock_fails_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let held = Lock::exclusive(&p).unwrap();
        assert!(Lock::try_exclusive(&p).unwrap().is_none());
        drop(held);
        assert!(Lock::try_exclusive(&p).unwrap().is_some());
    }
}
