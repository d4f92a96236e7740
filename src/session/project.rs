//! The project side of a session: root discovery and find-or-create.
//!
//! The host index is the truth about which session a directory has. The project's
//! `.vibebox/session.toml` is only a hint, read when the index does not know the
//! directory yet (was it moved here? copied?): the guest can write, forge or delete
//! it, so nothing it says can delete a session, take another project's session
//! while that project is still there, or lower what the user approved.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SessionId;
use crate::config::approval;
use crate::paths::{CACHE_DIR, Home, MARKER_FILE, Project};
use crate::store::guestfile::{self, GuestFileError};
use crate::store::index::{self, Entry, Index, IndexError};

/// Markers vibebox writes are a few dozen bytes.
const MARKER_CAP: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{} cannot be a vibebox project: {why}; run vibebox in a project directory", root.display())]
    ForbiddenRoot { root: PathBuf, why: &'static str },
    #[error(
        "{} resolves through a symbolic link to {}, outside the project {}; the VM may have planted that link: cd to the real directory if you mean it",
        logical.display(), real.display(), project.display()
    )]
    SymlinkOut {
        logical: PathBuf,
        real: PathBuf,
        project: PathBuf,
    },
    #[error("the project path {path:?} {why}; rename the directory")]
    BadPath { path: PathBuf, why: &'static str },
    #[error("cannot use {}: {source}", path.display())]
    Dir { path: PathBuf, source: io::Error },
    #[error("{}: {message}; remove it (it is only a hint) and retry", path.display())]
    CorruptMarker { path: PathBuf, message: String },
    #[error(transparent)]
    Marker(#[from] GuestFileError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Approval(#[from] approval::ApprovalError),
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Paths(#[from] crate::paths::Error),
    #[error(transparent)]
    State(#[from] crate::statefile::Error),
}

impl OpenError {
    pub fn exit_code(&self) -> u8 {
        match self {
            OpenError::Approval(approval::ApprovalError::NotApproved { .. }) => 2,
            OpenError::Index(_) | OpenError::Approval(_) | OpenError::State(_) => 1,
            _ => 2,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SessionFile {
    id: SessionId,
}

/// The path as the user typed or `cd`'d it: `$PWD` when it names the working
/// directory (so a symlink on the way is still visible), `..` folded lexically.
pub fn logical_dir(dir: Option<&Path>) -> io::Result<PathBuf> {
    let physical = std::env::current_dir()?;
    let cwd = std::env::var_os("PWD")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .filter(|p| fs::canonicalize(p).ok().as_ref() == Some(&physical))
        .unwrap_or(physical);
    let joined = match dir {
        Some(d) => cwd.join(d),
        None => cwd,
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// A project: it has `vibebox.toml` or a marker, or the index knows it (the guest
/// can delete the first two, not the third).
fn is_project_dir(dir: &Path, home_root: &Path, index: &Index) -> bool {
    let p = Project::new(dir.to_path_buf());
    p.config().is_file()
        || (p.cache() != home_root && p.session_file().is_file())
        || fs::canonicalize(dir).is_ok_and(|real| index.find_dir(&real).is_some())
}

/// The project root for `start` (a logical path, see [`logical_dir`]): the nearest
/// directory up the logical path holding `vibebox.toml` or a `.vibebox/session.toml`
/// (like git looks for `.git`), else `start` itself. Returns its canonical path.
///
/// Refused: a root that resolves through a symlink out of the logical path inside a
/// project (a link the guest planted in a share must not make a new session for
/// whatever it points at), and the roots that can never be a project.
pub fn find_root(start: &Path, home: &Home) -> Result<PathBuf, OpenError> {
    let real_start = fs::canonicalize(start).map_err(|source| OpenError::Dir {
        path: start.to_path_buf(),
        source,
    })?;
    let home_root = fs::canonicalize(home.root()).unwrap_or_else(|_| home.root().to_path_buf());
    let index = Index::snapshot(home)?;
    let logical_root = start
        .ancestors()
        .find(|d| is_project_dir(d, &home_root, &index))
        .unwrap_or(start);
    let root = fs::canonicalize(logical_root).map_err(|source| OpenError::Dir {
        path: logical_root.to_path_buf(),
        source,
    })?;
    if !real_start.starts_with(&root) {
        return Err(OpenError::SymlinkOut {
            logical: start.to_path_buf(),
            real: real_start,
            project: root,
        });
    }
    // The root itself a link, sitting inside another project: that link is in
    // guest-writable space.
    if fs::symlink_metadata(logical_root).is_ok_and(|m| m.file_type().is_symlink())
        && let Some(outer) = logical_root.parent().and_then(|p| {
            p.ancestors()
                .find(|d| is_project_dir(d, &home_root, &index))
        })
    {
        return Err(OpenError::SymlinkOut {
            logical: logical_root.to_path_buf(),
            real: root,
            project: outer.to_path_buf(),
        });
    }
    check_root(&root, &home_root)?;
    Ok(root)
}

/// `/`, `$HOME` and its ancestors, and anything containing or inside the vibebox
/// home are never a project: sharing them would hand the VM the user's keys or
/// vibebox's own state, and deleting such a "project" would delete them.
pub fn check_root(root: &Path, home_root: &Path) -> Result<(), OpenError> {
    let forbid = |why| {
        Err(OpenError::ForbiddenRoot {
            root: root.to_path_buf(),
            why,
        })
    };
    if root.parent().is_none() {
        return forbid("it is the root directory");
    }
    if let Some(user_home) = crate::paths::host_home()
        .ok()
        .map(|h| fs::canonicalize(&h).unwrap_or(h))
        && user_home.starts_with(root)
    {
        return forbid(if user_home == root {
            "it is your home directory"
        } else {
            "it contains your home directory"
        });
    }
    if home_root.starts_with(root) {
        return forbid("it contains the vibebox home (VIBEBOX_HOME or ~/.vibebox)");
    }
    if root.starts_with(home_root) {
        return forbid("it is inside the vibebox home (VIBEBOX_HOME or ~/.vibebox)");
    }
    let Some(text) = root.to_str() else {
        return Err(OpenError::BadPath {
            path: root.to_path_buf(),
            why: "is not valid UTF-8",
        });
    };
    if text
        .chars()
        .any(|c| c.is_control() || crate::escape::is_format_char(c))
    {
        return Err(OpenError::BadPath {
            path: root.to_path_buf(),
            why: "contains control or invisible formatting characters (tab, newline, bidi)",
        });
    }
    Ok(())
}

/// The id in the project's marker, if any, read defensively (see `guestfile`).
pub fn read_marker(project: &Project) -> Result<Option<SessionId>, OpenError> {
    let rel = Path::new(CACHE_DIR).join(MARKER_FILE);
    let Some(text) = guestfile::read(project.root(), &rel, MARKER_CAP)? else {
        return Ok(None);
    };
    let file: SessionFile = toml::from_str(&text).map_err(|e| OpenError::CorruptMarker {
        path: project.session_file(),
        message: e.message().trim().to_string(),
    })?;
    Ok(Some(file.id))
}

fn write_marker(project: &Project, id: SessionId) -> Result<(), OpenError> {
    let text = format!(
        "# The vibebox session of this directory: a hint that lets a moved project keep\n# its VM. Sessions are removed only with `vibebox delete` or `vibebox prune`.\nid = \"{id}\"\n"
    );
    guestfile::write(project.root(), CACHE_DIR, MARKER_FILE, text.as_bytes())?;
    if guestfile::read(project.root(), &Path::new(CACHE_DIR).join(".gitignore"), 64)
        .is_ok_and(|t| t.is_none())
    {
        guestfile::write(project.root(), CACHE_DIR, ".gitignore", b"*\n")?;
    }
    Ok(())
}

/// Removes the marker of session `id` from `project` (only its own files, never the
/// directory's other content, never a directory that is the vibebox home).
pub fn remove_marker(home: &Home, project: &Project, id: SessionId) -> Result<bool, OpenError> {
    use std::os::unix::fs::MetadataExt;
    let same = |a: &Path, b: &Path| match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    };
    if same(&project.cache(), home.root()) {
        return Ok(false);
    }
    if !matches!(read_marker(project), Ok(Some(found)) if found == id) {
        return Ok(false);
    }
    let removed = guestfile::remove(project.root(), CACHE_DIR, MARKER_FILE)?;
    if guestfile::read(project.root(), &Path::new(CACHE_DIR).join(".gitignore"), 64)
        .is_ok_and(|t| t.as_deref() == Some("*\n"))
    {
        guestfile::remove(project.root(), CACHE_DIR, ".gitignore")?;
    }
    guestfile::remove_dir_if_empty(project.root(), CACHE_DIR);
    Ok(removed)
}

/// How find-or-create found the session, so the caller can tell the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The directory's own, registered session.
    Existing,
    /// No session here before: a new one.
    Created,
    /// The directory was moved from `from` (which is gone); the session, its disk
    /// and its approvals now belong here.
    Moved { from: PathBuf },
    /// The directory is a copy of `original`, which still exists and keeps
    /// `original_id`; the copy got a new session.
    Copied {
        original: PathBuf,
        original_id: SessionId,
    },
    /// The directory had a session the index did not know (the index was lost) whose
    /// state is still here; it is registered again.
    Registered,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: SessionId,
    pub project: Project,
    pub found: Found,
}

/// What the marker suggests, decided without the index lock (reading a
/// guest-writable file under a global lock would let the guest stall every vibebox).
enum Hint {
    None,
    Moved { id: SessionId, from: PathBuf },
    Copied { original: PathBuf, id: SessionId },
    Registered(SessionId),
}

fn hint(home: &Home, project: &Project, snapshot: &Index) -> Result<Hint, OpenError> {
    let Some(id) = read_marker(project)? else {
        return Ok(Hint::None);
    };
    Ok(match snapshot.get(id) {
        Some(e) => match fs::symlink_metadata(&e.directory) {
            // The original directory is still there: a copy, even if its own marker
            // is gone (git clean); its session stays with it.
            Ok(_) => Hint::Copied {
                original: e.directory.clone(),
                id,
            },
            Err(err) if err.kind() == io::ErrorKind::NotFound => Hint::Moved {
                id,
                from: e.directory.clone(),
            },
            // Unreadable (a parent without permission): not provably gone, so the
            // session is not taken from it.
            Err(_) => Hint::Copied {
                original: e.directory.clone(),
                id,
            },
        },
        None if home.session(id).dir().is_dir() => Hint::Registered(id),
        None => Hint::None,
    })
}

/// How recent a use leaves the index as it is (`vibebox list` says "just now"
/// below 5 s).
const RECENT_SECS: i64 = 4;

/// Finds the session of the project at `root` (canonical, checked by
/// [`find_root`]), creating one if needed, and records it in the index. The index
/// lock is held only for the read-modify-write, so any number of concurrent calls
/// for one directory agree on one session.
pub fn find_or_create(home: &Home, root: &Path) -> Result<Outcome, OpenError> {
    let project = Project::new(root.to_path_buf());
    let snapshot = Index::snapshot(home)?;
    let known = snapshot.find_dir(root);
    // Used within the last few seconds (an agent running `vibebox exec` in a loop):
    // `vibebox list` would say "just now" either way, so the index is not rewritten
    // (a lock, a temp file and two fsyncs per command).
    if let Some(e) = known
        && (0..RECENT_SECS).contains(&(index::now() - e.last_active).num_seconds())
        && matches!(read_marker(&project), Ok(Some(m)) if m == e.id)
    {
        return Ok(Outcome {
            id: e.id,
            project,
            found: Found::Existing,
        });
    }
    let hint = match known {
        Some(_) => Hint::None,
        None => hint(home, &project, &snapshot)?,
    };
    drop(snapshot);

    let mut index = Index::open(home)?;
    let (id, found) = if let Some(e) = index.find_dir(root) {
        (e.id, Found::Existing)
    } else {
        match hint {
            // Re-checked under the lock: the entry must still point where it did.
            Hint::Moved { id, from } if index.get(id).is_some_and(|e| e.directory == from) => {
                (id, Found::Moved { from })
            }
            Hint::Copied { original, id } => (
                SessionId::new(),
                Found::Copied {
                    original,
                    original_id: id,
                },
            ),
            Hint::Registered(id) if index.get(id).is_none() => (id, Found::Registered),
            _ => (SessionId::new(), Found::Created),
        }
    };
    if found != Found::Existing {
        index.upsert(Entry {
            id,
            directory: root.to_path_buf(),
            last_active: index::now(),
        });
    } else {
        index.touch(id, index::now());
    }
    index.save()?;
    drop(index);

    if let Found::Moved { from } = &found {
        approval::carry(home, from, root)?;
    }
    // The hint is refreshed outside the lock; a guest that keeps breaking it only
    // loses move detection for its own project.
    match read_marker(&project) {
        Ok(Some(m)) if m == id => {}
        Ok(_) | Err(OpenError::CorruptMarker { .. }) => {
            if let Err(e) = write_marker(&project, id) {
                tracing::warn!("cannot write the project's session marker: {e}");
            }
        }
        Err(e) => eprintln!("vibebox: warning: {e}"),
    }
    Ok(Outcome { id, project, found })
}

/// The session the index records for the project at `root`, without creating
/// anything. Commands that act on "this project's session" (`stop`, `explain`)
/// resolve it here, never through the guest-writable marker.
pub fn registered(home: &Home, root: &Path) -> Result<Option<SessionId>, OpenError> {
    Ok(Index::snapshot(home)?.find_dir(root).map(|e| e.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_roots() {
        let vh = Path::new("/srv/x/.vibebox");
        assert!(check_root(Path::new("/"), vh).is_err());
        assert!(check_root(Path::new("/srv"), vh).is_err());
        assert!(check_root(Path::new("/srv/x/.vibebox/sessions"), vh).is_err());
        assert!(check_root(Path::new("/srv/y"), vh).is_ok());
        assert!(check_root(Path::new("/srv/y\tz"), vh).is_err());
        assert!(check_root(Path::new("/srv/y\u{202e}z"), vh).is_err());
        if let Ok(h) = crate::paths::host_home() {
            let h = fs::canonicalize(&h).unwrap_or(h);
            if h.parent().is_some() && !h.starts_with(vh) {
                assert!(check_root(&h, vh).is_err());
            }
        }
    }
}
