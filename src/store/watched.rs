//! Snapshots of the project paths host tools run by themselves (see
//! `config::protect`), and the accepted snapshot kept in the session's state.
//!
//! The project is guest-writable, so the walk treats it as hostile: it follows no
//! link (each directory is opened relative to its parent with `O_NOFOLLOW`), never
//! opens anything but a regular file (a FIFO would block, a device could act on
//! open), and caps what it visits, how deep it goes and how much it hashes. Each
//! starting point has its own caps, so one the guest fills cannot hide another;
//! past a cap the snapshot names the starting point (`unchecked`) instead of
//! quietly watching less, and what it did not reach is "not checked", never gone.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::statefile;

/// The bounds of one snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Entries the globs cover, per starting point.
    pub entries: usize,
    /// Entries looked at, covered or not, per starting point (a walk from a
    /// wildcard's prefix reads what no glob covers to find what one does).
    pub looked: usize,
    /// Directory levels below the project.
    pub depth: usize,
    /// A bigger file is fingerprinted by size and times instead of hashed.
    pub hash_file: u64,
    /// Bytes hashed in all; past it, files are fingerprinted.
    pub hash_total: u64,
    /// A text file up to this size is kept, so a change can be shown as a diff.
    pub text_file: u64,
    /// Text kept in all (the accepted snapshot is a state file).
    pub text_total: u64,
}

pub const LIMITS: Limits = Limits {
    entries: 10_000,
    looked: 100_000,
    depth: 32,
    hash_file: 16 << 20,
    hash_total: 256 << 20,
    text_file: 256 << 10,
    text_total: 4 << 20,
};

/// What one path is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Entry {
    File {
        sha256: String,
        size: u64,
        executable: bool,
        /// The content, when it is UTF-8 text small enough to keep.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// Too big to hash: size, modification and change times and inode. The guest
    /// can set a file's mtime, never its ctime.
    Large {
        size: u64,
        stamp: String,
    },
    Dir,
    Link {
        target: String,
    },
    /// A FIFO, socket or device: named, never opened.
    Special {
        what: String,
    },
    Unreadable {
        why: String,
    },
}

impl Entry {
    /// Whether two entries are the same file as far as a host tool could tell
    /// (the kept text is only for showing; the digest decides).
    pub fn same(&self, other: &Entry) -> bool {
        match (self, other) {
            (
                Entry::File {
                    sha256: a,
                    size: sa,
                    executable: xa,
                    ..
                },
                Entry::File {
                    sha256: b,
                    size: sb,
                    executable: xb,
                    ..
                },
            ) => a == b && sa == sb && xa == xb,
            (a, b) => a == b,
        }
    }

    /// A few words for a person: "file", "link to X", ...
    pub fn describe(&self) -> String {
        match self {
            Entry::File {
                size, executable, ..
            } => format!(
                "{}file, {size} bytes",
                if *executable { "executable " } else { "" }
            ),
            Entry::Large { size, .. } => format!("file, {size} bytes"),
            Entry::Dir => "directory".into(),
            Entry::Link { target } => format!("symbolic link to {target}"),
            Entry::Special { what } => what.clone(),
            Entry::Unreadable { why } => format!("unreadable ({why})"),
        }
    }
}

/// The watched paths as they are now: relative paths (see [`name`]) to entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub entries: BTreeMap<String, Entry>,
    /// A limit stopped the walk: some paths were not looked at.
    #[serde(default)]
    pub truncated: bool,
    /// The starting points a limit stopped (relative paths, `""` for the project).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchecked: Vec<String>,
    /// The starting points walked whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checked: Vec<String>,
}

/// Whether `path` is `start` or below it.
fn under(path: &str, start: &str) -> bool {
    start.is_empty()
        || path == start
        || (path.starts_with(start) && path.as_bytes().get(start.len()) == Some(&b'/'))
}

impl Snapshot {
    /// Whether the walk looked everywhere `path` could be: when it did not, the
    /// path missing from the snapshot says nothing about it.
    pub fn reached(&self, path: &str) -> bool {
        self.checked.iter().any(|s| under(path, s))
            || !self.unchecked.iter().any(|s| under(path, s))
    }
}

/// A file name as text, reversibly: UTF-8 stays as it is, a backslash becomes
/// `\\` and each byte that is not UTF-8 `\xNN`, so two different names never
/// become one key (a guest could otherwise hide one file behind another).
pub fn name(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

struct Walk<'a> {
    limits: Limits,
    covers: &'a dyn Fn(&[&str]) -> bool,
    /// Whether something below this directory could be covered.
    holds: &'a dyn Fn(&[&str]) -> bool,
    /// Covered entries and entries looked at, for the current starting point.
    seen: usize,
    looked: usize,
    /// The current starting point stopped at a limit (`full`: it stops now).
    partial: bool,
    full: bool,
    hashed: u64,
    kept: u64,
    out: Snapshot,
}

fn stat_at(dir: &impl AsFd, name: &OsStr) -> nix::Result<FileStat> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

#[allow(clippy::unnecessary_cast)]
fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode as nix::libc::mode_t) & SFlag::S_IFMT
}

fn open_dir(dir: &impl AsFd, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

impl Walk<'_> {
    /// Counts one covered entry; false once the limit is reached.
    fn count(&mut self) -> bool {
        self.seen += 1;
        if self.seen > self.limits.entries {
            self.stop();
            return false;
        }
        true
    }

    /// Counts one entry looked at; false once the limit is reached.
    fn look(&mut self) -> bool {
        self.looked += 1;
        if self.looked > self.limits.looked {
            self.stop();
            return false;
        }
        true
    }

    fn stop(&mut self) {
        self.partial = true;
        self.full = true;
    }

    fn entry(&mut self, dir: &OwnedFd, name: &OsStr, st: &FileStat) -> Entry {
        let k = kind(st);
        if k == SFlag::S_IFDIR {
            return Entry::Dir;
        }
        if k == SFlag::S_IFLNK {
            let target = nix::fcntl::readlinkat(dir, name)
                .map(|t| self::name(t.as_bytes()))
                .unwrap_or_else(|e| format!("(unreadable: {e})"));
            return Entry::Link { target };
        }
        if k != SFlag::S_IFREG {
            let what = match k {
                SFlag::S_IFIFO => "a FIFO",
                SFlag::S_IFSOCK => "a socket",
                SFlag::S_IFCHR => "a character device",
                SFlag::S_IFBLK => "a block device",
                _ => "not a regular file",
            };
            return Entry::Special { what: what.into() };
        }
        match self.file(dir, name, st) {
            Ok(e) => e,
            Err(e) => Entry::Unreadable { why: e.to_string() },
        }
    }

    fn file(&mut self, dir: &OwnedFd, name: &OsStr, st: &FileStat) -> std::io::Result<Entry> {
        let size = st.st_size as u64;
        let stamp = || {
            format!(
                "{}.{}/{}.{}/{}",
                st.st_mtime, st.st_mtime_nsec, st.st_ctime, st.st_ctime_nsec, st.st_ino
            )
        };
        if size > self.limits.hash_file || self.hashed + size > self.limits.hash_total {
            return Ok(Entry::Large {
                size,
                stamp: stamp(),
            });
        }
        // O_NONBLOCK: swapped for a FIFO since the look, the open still returns
        // and the check below refuses it.
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let now = nix::sys::stat::fstat(&fd)?;
        if kind(&now) != SFlag::S_IFREG || now.st_ino != st.st_ino {
            return Ok(Entry::Special {
                what: "a file replaced while it was read".into(),
            });
        }
        let mut bytes = Vec::new();
        std::fs::File::from(fd)
            .take(self.limits.hash_file + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > self.limits.hash_file {
            return Ok(Entry::Large {
                size: bytes.len() as u64,
                stamp: stamp(),
            });
        }
        self.hashed += bytes.len() as u64;
        let sha256 = hex(&Sha256::digest(&bytes));
        let executable = now.st_mode & 0o111 != 0;
        let size = bytes.len() as u64;
        let text = (size <= self.limits.text_file && self.kept + size <= self.limits.text_total)
            .then(|| String::from_utf8(bytes).ok())
            .flatten();
        if text.is_some() {
            self.kept += size;
        }
        Ok(Entry::File {
            sha256,
            size,
            executable,
            text,
        })
    }

    /// Walks `start` (literal components below the project), recording each
    /// component on the way (a directory there swapped for a file or a link is a
    /// change of its own) and what the globs cover below.
    fn from(&mut self, root: &Path, start: &[String]) {
        let Ok(mut dir) = nix::fcntl::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            return;
        };
        let mut rel: Vec<String> = Vec::new();
        for part in start {
            let os = OsStr::new(part);
            let Ok(st) = stat_at(&dir, os) else {
                return;
            };
            rel.push(part.clone());
            let is_dir = kind(&st) == SFlag::S_IFDIR;
            if !self.count() {
                return;
            }
            let e = self.entry(&dir, os, &st);
            self.out.entries.insert(rel.join("/"), e);
            if !is_dir {
                return;
            }
            match open_dir(&dir, os) {
                Ok(d) => dir = d,
                Err(_) => return,
            }
        }
        self.below(dir, rel, 0);
    }

    /// Everything below `dir` that the globs cover, depth first, in name order.
    fn below(&mut self, dir: OwnedFd, rel: Vec<String>, depth: usize) {
        if depth >= self.limits.depth {
            self.partial = true;
            return;
        }
        let names: Vec<Vec<u8>> = {
            let Ok(dup) = dir.try_clone() else { return };
            let Ok(mut d) = nix::dir::Dir::from_fd(dup) else {
                return;
            };
            let mut names = Vec::new();
            for e in d.iter().flatten() {
                let n = e.file_name().to_bytes();
                if n == b"." || n == b".." {
                    continue;
                }
                if names.len() > self.limits.looked {
                    self.partial = true;
                    break;
                }
                names.push(n.to_vec());
            }
            names.sort();
            names
        };
        for raw in names {
            if !self.look() {
                return;
            }
            let os = OsStr::from_bytes(&raw);
            let Ok(st) = stat_at(&dir, os) else {
                continue;
            };
            let mut path = rel.clone();
            path.push(name(&raw));
            let parts: Vec<&str> = path.iter().map(String::as_str).collect();
            let covered = (self.covers)(&parts);
            if covered {
                if !self.count() {
                    return;
                }
                let e = self.entry(&dir, os, &st);
                self.out.entries.insert(path.join("/"), e);
            }
            if kind(&st) == SFlag::S_IFDIR
                && (covered || (self.holds)(&parts))
                && let Ok(sub) = open_dir(&dir, os)
            {
                self.below(sub, path, depth + 1);
            }
            if self.full {
                return;
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A snapshot of what `covers` protects under `root`, walking from each of
/// `starts` in order (each a list of literal components; an empty list walks the
/// whole project), each with its own limits; `holds` says whether a directory
/// could hold something covered (the walk enters no other).
pub fn snapshot(
    root: &Path,
    starts: &[Vec<String>],
    covers: &dyn Fn(&[&str]) -> bool,
    holds: &dyn Fn(&[&str]) -> bool,
    limits: Limits,
) -> Snapshot {
    let mut w = Walk {
        limits,
        covers,
        holds,
        seen: 0,
        looked: 0,
        partial: false,
        full: false,
        hashed: 0,
        kept: 0,
        out: Snapshot::default(),
    };
    let mut done: Vec<&Vec<String>> = Vec::new();
    for s in starts {
        if done.contains(&s) {
            continue;
        }
        done.push(s);
        (w.seen, w.looked, w.partial, w.full) = (0, 0, false, false);
        w.from(root, s);
        let key = s.join("/");
        if w.partial {
            w.out.truncated = true;
            w.out.unchecked.push(key);
        } else {
            w.out.checked.push(key);
        }
    }
    w.out
}

/// What the user last accepted (or what was there when watching began): the
/// globs that were watched and the snapshot of what they covered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    pub globs: Vec<String>,
    pub snapshot: Snapshot,
}

/// `<session>/protected.json`.
pub fn path(session_dir: &Path) -> PathBuf {
    session_dir.join("protected.json")
}

#[derive(Debug, thiserror::Error)]
pub enum WatchedError {
    #[error(transparent)]
    State(#[from] statefile::Error),
    #[error(
        "{}: {why}; remove it, and vibebox records the protected paths again at the VM's next start",
        path.display()
    )]
    Corrupt { path: PathBuf, why: String },
}

pub fn read(session_dir: &Path) -> Result<Option<Accepted>, WatchedError> {
    let p = path(session_dir);
    let Some(text) = statefile::read_nofollow(&p)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| WatchedError::Corrupt {
            path: p,
            why: e.to_string(),
        })
}

pub fn write(session_dir: &Path, accepted: &Accepted) -> Result<(), WatchedError> {
    let text = serde_json::to_vec(accepted).expect("snapshots serialize");
    statefile::write_atomic(&path(session_dir), &text, 0o600)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    fn everything(_: &[&str]) -> bool {
        true
    }

    #[test]
    fn walks_without_following_links_or_opening_fifos() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        let secret = p.join("secret");
        fs::create_dir_all(&secret).unwrap();
        fs::write(secret.join("key"), "hidden").unwrap();
        let proj = p.join("proj");
        fs::create_dir_all(proj.join(".vscode/sub")).unwrap();
        fs::write(proj.join(".vscode/tasks.json"), "{}\n").unwrap();
        fs::write(proj.join(".vscode/sub/x"), [0xff, 0xfe]).unwrap();
        std::os::unix::fs::symlink(&secret, proj.join(".vscode/link")).unwrap();
        nix::unistd::mkfifo(&proj.join(".vscode/fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        std::os::unix::fs::symlink(&secret, proj.join(".claude")).unwrap();
        let s = snapshot(
            &proj,
            &[
                vec![".vscode".into()],
                vec![".claude".into()],
                vec![".envrc".into()],
            ],
            &everything,
            &everything,
            LIMITS,
        );
        let keys: Vec<&str> = s.entries.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                ".claude",
                ".vscode",
                ".vscode/fifo",
                ".vscode/link",
                ".vscode/sub",
                ".vscode/sub/x",
                ".vscode/tasks.json"
            ]
        );
        assert!(matches!(s.entries[".claude"], Entry::Link { .. }));
        assert!(matches!(s.entries[".vscode/fifo"], Entry::Special { .. }));
        match &s.entries[".vscode/tasks.json"] {
            Entry::File { text, size, .. } => {
                assert_eq!(text.as_deref(), Some("{}\n"));
                assert_eq!(*size, 3);
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            &s.entries[".vscode/sub/x"],
            Entry::File { text: None, .. }
        ));
        assert!(!s.truncated);
        assert!(!format!("{s:?}").contains("hidden"));
    }

    #[test]
    fn limits_say_so_instead_of_watching_less_quietly() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join(".idea");
        fs::create_dir_all(&d).unwrap();
        for i in 0..50 {
            fs::write(d.join(format!("f{i}")), "x").unwrap();
        }
        let small = Limits {
            entries: 20,
            ..LIMITS
        };
        let s = snapshot(
            t.path(),
            &[vec![".idea".into()]],
            &everything,
            &everything,
            small,
        );
        assert!(s.truncated);
        assert!(s.entries.len() <= 20);
        // Deep trees stop at the depth limit, also said.
        let mut deep = t.path().join(".deep");
        for _ in 0..10 {
            deep = deep.join("d");
        }
        fs::create_dir_all(&deep).unwrap();
        let s = snapshot(
            t.path(),
            &[vec![".deep".into()]],
            &everything,
            &everything,
            Limits { depth: 4, ..LIMITS },
        );
        assert!(s.truncated);
        // A big file is fingerprinted, not read whole.
        fs::write(t.path().join(".envrc"), vec![b'a'; 5000]).unwrap();
        let s = snapshot(
            t.path(),
            &[vec![".envrc".into()]],
            &everything,
            &everything,
            Limits {
                hash_file: 1000,
                ..LIMITS
            },
        );
        assert!(matches!(
            s.entries[".envrc"],
            Entry::Large { size: 5000, .. }
        ));
    }

    #[test]
    fn accepted_round_trips_and_corruption_is_named() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(read(t.path()).unwrap(), None);
        let mut a = Accepted {
            globs: vec![".envrc".into()],
            ..Default::default()
        };
        a.snapshot.entries.insert(
            "a\\x\u{1b}".into(),
            Entry::File {
                sha256: "00".into(),
                size: 1,
                executable: true,
                text: Some("\u{1b}]0;x\u{7}".into()),
            },
        );
        write(t.path(), &a).unwrap();
        assert_eq!(read(t.path()).unwrap(), Some(a));
        fs::write(path(t.path()), "{").unwrap();
        assert!(matches!(read(t.path()), Err(WatchedError::Corrupt { .. })));
    }

    proptest! {
        /// Different names never share a key.
        #[test]
        fn names_are_reversible(a in prop::collection::vec(any::<u8>(), 0..12), b in prop::collection::vec(any::<u8>(), 0..12)) {
            if a != b {
                prop_assert_ne!(name(&a), name(&b));
            }
        }
    }
}
