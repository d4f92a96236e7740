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
/// followed, so a hostile guest that plants one cannot redirect the write. Temp files
/// that crashed writers of the same file left behind are removed afterwards.
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
        give_to_user(&tmp)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr)?;
    sweep_stale_temps(path);
    Ok(())
}

/// Makes a rename or a new entry in `dir` durable. A failure is returned (the entry
/// may be lost on a power cut), except where the filesystem has no directory fsync
/// at all (EINVAL/ENOTSUP), where there is nothing more to do.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir)?.sync_all() {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EINVAL | nix::libc::ENOTSUP)
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// How old a temp file must be before it counts as left by a crashed writer: every
/// state write finishes in far less.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes `.<name>.tmp-*` and `.<name>.new-*` beside `path` (the temp names of
/// [`write_atomic`] and [`write_new_atomic`]) that are regular files, ours, and older
/// than [`STALE_TEMP_AGE`]. Best effort: a sweep never fails a write.
fn sweep_stale_temps(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let name = name.to_string_lossy();
    let prefixes = [
        format!(".{name}.tmp-"),
        format!(".{name}.new-"),
        format!("..{name}.new-"),
    ];
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for e in rd.filter_map(|e| e.ok()) {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if !prefixes.iter().any(|p| n.starts_with(p.as_str())) {
            continue;
        }
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        let old = m
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if m.file_type().is_file() && m.uid() == me && old {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Like [`write_atomic`], but never replaces an existing file: returns `Ok(false)` when
/// `path` already exists. The content appears whole or not at all (hard link of a
/// finished temp file), so a concurrent reader never sees half a file.
pub fn write_new_atomic(path: &Path, data: &[u8], mode: u32) -> Result<bool, Error> {
    // The common case (every command that opens a project asks for its default
    // config) costs a stat, not a temp file, an fsync and an unlink; a file that
    // appears after this check is still caught by the hard link below.
    if fs::symlink_metadata(path).is_ok() {
        return Ok(false);
    }
    let tmp = sibling_temp(path, "new");
    write_atomic(&tmp, data, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            let dir = tmp.parent().unwrap_or(Path::new("."));
            sync_dir(dir).map_err(|source| Error::Write {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(true)
        }
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

/// Makes sure `dir` is a real directory (not a symlink), creating it (and missing
/// parents) with `mode` if needed. Each new directory's entry is fsynced into its
/// parent, so state recorded inside it survives a power cut.
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
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Parents may be links (macOS's /tmp, a home on another disk); only the
            // final component is vibebox's own.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
                && !fs::metadata(parent).is_ok_and(|m| m.is_dir())
            {
                ensure_dir(parent, mode)?;
            }
            let werr = |source| Error::Write {
                path: dir.to_path_buf(),
                source,
            };
            match fs::DirBuilder::new().mode(mode).create(dir) {
                Ok(()) => {}
                // Made by someone else in between: fine if it is a directory.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return ensure_dir(dir, mode);
                }
                Err(e) => return Err(werr(e)),
            }
            give_to_user(dir).map_err(werr)?;
            sync_dir(
                dir.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new(".")),
            )
            .map_err(werr)
        }
        Err(source) => Err(Error::Read {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Who should own what vibebox creates in its home when run by root under `sudo`:
/// the user who ran sudo, so their next commands (not run as root) can still use it.
struct Owner {
    home: PathBuf,
    uid: u32,
    gid: u32,
}

static OWNER: std::sync::OnceLock<Option<Owner>> = std::sync::OnceLock::new();

/// Called once with the vibebox home: when the process runs as root under `sudo`
/// (`SUDO_UID`/`SUDO_GID`) and the home belongs to that user (it, or its nearest
/// existing ancestor, is owned by `SUDO_UID`), everything vibebox creates inside it
/// from now on is given to that user. A home of root's own (plain `sudo` without
/// `-E`) is left to root.
pub fn adopt_sudo_user(home: &Path) {
    use std::os::unix::fs::MetadataExt;
    let owner = (|| {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let uid: u32 = std::env::var("SUDO_UID").ok()?.parse().ok()?;
        let gid: u32 = std::env::var("SUDO_GID").ok()?.parse().ok()?;
        if uid == 0 {
            return None;
        }
        let owned = home
            .ancestors()
            .find_map(|a| fs::symlink_metadata(a).ok())
            .is_some_and(|m| m.uid() == uid);
        owned.then(|| Owner {
            home: home.to_path_buf(),
            uid,
            gid,
        })
    })();
    let _ = OWNER.set(owner);
}

/// Gives `path` (not following a symlink) to the sudo user when it lies inside the
/// vibebox home (see [`adopt_sudo_user`]); nothing otherwise.
pub fn give_to_user(path: &Path) -> io::Result<()> {
    let Some(Some(o)) = OWNER.get() else {
        return Ok(());
    };
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    if !abs.starts_with(&o.home) {
        return Ok(());
    }
    std::os::unix::fs::lchown(&abs, Some(o.uid), Some(o.gid))
}

/// [`give_to_user`] for `dir` and everything under it (image build outputs, a
/// session's disk and keys made by external tools), without following symlinks.
pub fn give_tree_to_user(dir: &Path) -> io::Result<()> {
    if !matches!(OWNER.get(), Some(Some(_))) {
        return Ok(());
    }
    give_to_user(dir)?;
    if fs::symlink_metadata(dir)?.is_dir() {
        for e in fs::read_dir(dir)? {
            give_tree_to_user(&e?.path())?;
        }
    }
    Ok(())
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

    /// Like [`Lock::exclusive`], but when the lock is still busy after a second, says
    /// on stderr what it waits for (`what`, e.g. "another vibebox building this
    /// image"), so a command that blocks behind another one never looks hung.
    pub fn exclusive_waiting(path: &Path, what: &str) -> Result<Self, Error> {
        Self::exclusive_waiting_to(path, what, &mut io::stderr())
    }

    fn exclusive_waiting_to(path: &Path, what: &str, out: &mut dyn Write) -> Result<Self, Error> {
        let patience = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while std::time::Instant::now() < patience {
            if let Some(l) = Self::try_exclusive(path)? {
                return Ok(l);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = writeln!(out, "vibebox: waiting for {what} ({})", path.display());
        Self::exclusive(path)
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
        give_to_user(path).map_err(lerr)?;
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
        .map(|s| {
            #[allow(clippy::unnecessary_cast)] // u32 on macOS
            let blocks = s.blocks_available() as u64;
            blocks * s.fragment_size()
        })
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
    fn a_write_sweeps_stale_temps_of_the_same_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let make = |name: &str, modified| {
            let f = File::create(dir.path().join(name)).unwrap();
            f.set_modified(modified).unwrap();
        };
        make(".state.toml.tmp-1-aa", old);
        make("..state.toml.new-1-bb.tmp-1-cc", old);
        make(".state.toml.tmp-2-dd", std::time::SystemTime::now());
        make(".other.toml.tmp-1-ee", old);
        write_atomic(&dir.path().join("state.toml"), b"x", 0o600).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".other.toml.tmp-1-ee", ".state.toml.tmp-2-dd", "state.toml"]
        );
    }

    #[test]
    fn a_directory_fsync_failure_is_returned() {
        assert!(sync_dir(Path::new("/nonexistent-vibebox-dir")).is_err());
        let dir = tempfile::tempdir().unwrap();
        sync_dir(dir.path()).unwrap();
    }

    #[test]
    fn ensure_dir_makes_missing_parents() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        ensure_dir(&deep, 0o700).unwrap();
        assert!(deep.is_dir());
        ensure_dir(&deep, 0o700).unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&deep, &link).unwrap();
        assert!(matches!(
            ensure_dir(&link, 0o700),
            Err(Error::Symlink { .. })
        ));
        // A link above the final component is followed (macOS's /tmp is one).
        ensure_dir(&link.join("d"), 0o700).unwrap();
        assert!(deep.join("d").is_dir());
    }

    #[test]
    fn a_lock_wait_says_what_it_waits_for() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let mut said = Vec::new();
        drop(Lock::exclusive_waiting_to(&p, "nothing", &mut said).unwrap());
        assert!(said.is_empty(), "a free lock is taken silently");
        let held = Lock::exclusive(&p).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            drop(held);
        });
        let _got = Lock::exclusive_waiting_to(&p, "the other one", &mut said).unwrap();
        release.join().unwrap();
        let said = String::from_utf8(said).unwrap();
        assert!(
            said.starts_with("vibebox: waiting for the other one ("),
            "{said}"
        );
        assert_eq!(said.lines().count(), 1);
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
