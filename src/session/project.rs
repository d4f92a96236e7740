//! The project side of a session: root discovery and find-or-create.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::index::{self, Entry, Index};
use super::{Error, SessionId};
use crate::paths::{Home, Project};
use crate::statefile;

#[derive(Serialize, Deserialize)]
struct SessionFile {
    id: SessionId,
}

/// Walks up from `start` to the nearest directory holding `vibebox.toml` or a
/// `.vibebox/session.toml` (like git looks for `.git`); without one, `start` itself is
/// the project. The vibebox home never counts as a project's `.vibebox`.
pub fn find_root(start: &Path, home: &Home) -> Result<PathBuf, Error> {
    let start = fs::canonicalize(start).map_err(|source| Error::Dir {
        path: start.to_path_buf(),
        source,
    })?;
    let home_root = fs::canonicalize(home.root()).unwrap_or_else(|_| home.root().to_path_buf());
    for dir in start.ancestors() {
        let p = Project::new(dir.to_path_buf());
        if p.config().is_file() {
            return Ok(dir.to_path_buf());
        }
        let cache = p.cache();
        if cache != home_root && p.session_file().is_file() {
            return Ok(dir.to_path_buf());
        }
    }
    Ok(start)
}

/// The id recorded in the project's `.vibebox/session.toml`, if any. The file is in
/// guest-writable space, so it is read without following links and checked strictly.
pub fn read_session_id(project: &Project) -> Result<Option<SessionId>, Error> {
    if fs::symlink_metadata(project.cache()).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(statefile::Error::Symlink {
            path: project.cache(),
        }
        .into());
    }
    let path = project.session_file();
    let Some(text) = statefile::read_nofollow(&path)? else {
        return Ok(None);
    };
    let file: SessionFile = toml::from_str(&text).map_err(|e| Error::CorruptProjectSession {
        path: path.clone(),
        dir: project.cache(),
        message: e.message().trim().to_string(),
    })?;
    Ok(Some(file.id))
}

fn write_session_file(project: &Project, id: SessionId) -> Result<(), Error> {
    statefile::ensure_dir(&project.cache(), 0o700)?;
    let text = format!(
        "# The vibebox session of this directory. Deleting .vibebox/ deletes the session.\nid = \"{id}\"\n"
    );
    statefile::write_atomic(&project.session_file(), text.as_bytes(), 0o644)?;
    // Keep the VM disk, keys and logs out of version control.
    let ignore = project.cache().join(".gitignore");
    if !ignore.exists() {
        statefile::write_atomic(&ignore, b"*\n", 0o644)?;
    }
    Ok(())
}

/// How find-or-create found the session, so the caller can tell the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The directory's own, registered session.
    Existing,
    /// No session here before: a new one.
    Created,
    /// The directory was renamed or moved from `from`; the index now points here.
    Moved { from: PathBuf },
    /// The directory is a copy of `original`, which still holds `original_id`; the copy
    /// got a new session (with a fresh VM: the original's disk and keys are its own).
    Copied {
        original: PathBuf,
        original_id: SessionId,
    },
    /// The directory had a session the index did not know (the index was lost or the
    /// project came from elsewhere); it is registered again.
    Registered,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: SessionId,
    pub project: Project,
    pub found: Found,
}

/// Finds the session of the project at `root` (canonical), creating one if needed,
/// and records it in the index. Serialised by the index lock, so any number of
/// concurrent calls for one directory agree on one session.
pub fn find_or_create(home: &Home, root: &Path) -> Result<Outcome, Error> {
    if root.to_str().is_none() {
        return Err(Error::NonUtf8Path(root.to_path_buf()));
    }
    let project = Project::new(root.to_path_buf());
    let mut index = Index::open(home)?;
    let existing = read_session_id(&project)?;

    let (id, found) = match existing {
        None => (SessionId::new(), Found::Created),
        Some(id) => match index.get(id) {
            Some(e) if e.directory == root => (id, Found::Existing),
            Some(e) => {
                let other = Project::new(e.directory.clone());
                if matches!(read_session_id(&other), Ok(Some(other_id)) if other_id == id) {
                    let original = e.directory.clone();
                    (
                        SessionId::new(),
                        Found::Copied {
                            original,
                            original_id: id,
                        },
                    )
                } else {
                    (
                        id,
                        Found::Moved {
                            from: e.directory.clone(),
                        },
                    )
                }
            }
            None => (id, Found::Registered),
        },
    };
    if existing != Some(id) {
        write_session_file(&project, id)?;
    }
    index.upsert(Entry {
        id,
        directory: root.to_path_buf(),
        last_active: index::now(),
    });
    index.prune()?;
    index.save()?;
    Ok(Outcome { id, project, found })
}

/// Removes a project's `.vibebox/` if it still belongs to `id`. A symlink planted in
/// its place is removed as a link, never followed.
pub fn remove_cache(project: &Project, id: SessionId) -> Result<bool, Error> {
    let cache = project.cache();
    let owned = matches!(read_session_id(project), Ok(Some(found)) if found == id);
    if !owned {
        return Ok(false);
    }
    let res = match fs::symlink_metadata(&cache) {
        Ok(m) if m.file_type().is_symlink() => fs::remove_file(&cache),
        Ok(_) => fs::remove_dir_all(&cache),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => Err(e),
    };
    res.map_err(|source| Error::Dir {
        path: cache,
        source,
    })?;
    Ok(true)
}
