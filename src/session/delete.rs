//! Removing sessions: `vibebox delete`, `vibebox prune` and a confirmed `:new` all
//! come here. Nothing else removes a session's disk, keys or logs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::SessionId;
use super::project::{self, OpenError};
use crate::paths::{self, Home, Project};
use crate::statefile::{self, Lock};
use crate::store::index::{Entry, Index, IndexError};
use crate::supervisor::client;

#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error(
        "session {id}'s VM did not stop, so nothing was deleted; see {log}, then `vibebox stop {id}` and retry"
    )]
    StillRunning { id: SessionId, log: PathBuf },
    #[error("stopping session {id} before deleting it: {source}; nothing was deleted")]
    Stop {
        id: SessionId,
        source: client::Error,
    },
    #[error(
        "session {id} changed while it was being deleted (its project was opened again, or its directory is back); nothing was deleted"
    )]
    Changed { id: SessionId },
    #[error("cannot remove {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] statefile::Error),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Marker(#[from] OpenError),
}

impl DeleteError {
    pub fn exit_code(&self) -> u8 {
        1
    }
}

/// What a deletion did, for the caller to tell.
#[derive(Debug)]
pub struct Deleted {
    pub entry: Entry,
    /// Whether the project's marker was removed (its directory still held it).
    pub marker_removed: bool,
}

/// How long a supervisor may take to let go of its lock after its VM stopped.
const RELEASE_WAIT: Duration = Duration::from_secs(15);

/// Deletes session `entry.id` for good: stops its VM (with no global lock held, so
/// other vibebox commands go on meanwhile), holds its supervisor lock so none can
/// start again, drops it from the index, then removes its state and the project's
/// marker. State is removed only once no VM can be running on its disk.
pub fn delete(home: &Home, entry: &Entry, only_if_gone: bool) -> Result<Deleted, DeleteError> {
    let id = entry.id;
    let sd = home.session(id);
    let held = if sd.dir().is_dir() {
        client::stop_as(&sd, true).map_err(|source| DeleteError::Stop { id, source })?;
        let lock = sd.dir().join(paths::SUPERVISOR_LOCK);
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            if let Some(l) = Lock::try_exclusive(&lock)? {
                break Some(l);
            }
            if Instant::now() > deadline {
                return Err(DeleteError::StillRunning {
                    id,
                    log: sd.supervisor_log(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        None
    };
    let mut index = Index::open(home)?;
    // Decided on what the caller saw: if the session was re-bound meanwhile (the
    // project opened in its new place), or prune's directory is back, it stays.
    let now = index.get(id).cloned();
    if now.as_ref().is_some_and(|e| e.directory != entry.directory)
        || (only_if_gone && !is_gone(entry))
    {
        return Err(DeleteError::Changed { id });
    }
    index.remove(id);
    index.save()?;
    drop(index);
    match std::fs::remove_dir_all(sd.dir()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DeleteError::Dir {
                path: sd.dir().to_path_buf(),
                source,
            });
        }
    }
    drop(held);
    let marker_removed =
        project::remove_marker(home, &Project::new(entry.directory.clone()), id).unwrap_or(false);
    Ok(Deleted {
        entry: entry.clone(),
        marker_removed,
    })
}

/// Whether a session's directory is missing: gone, moved, on an unmounted disk, or
/// unreadable. Such a session keeps everything; only `prune` offers to remove it.
pub fn is_missing(entry: &Entry) -> bool {
    !std::fs::metadata(&entry.directory).is_ok_and(|m| m.is_dir())
}

/// Whether a session's directory is provably gone (not there at all). An unreadable
/// one is missing for `list` but not gone: a guest with write access to a parent
/// could make it unreadable, and that must not get another project's disk pruned.
pub fn is_gone(entry: &Entry) -> bool {
    std::fs::symlink_metadata(&entry.directory)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// The sessions `vibebox prune` would remove: those whose directory is gone.
pub fn prunable(home: &Home) -> Result<Vec<Entry>, IndexError> {
    let index = Index::snapshot(home)?;
    Ok(index
        .entries()
        .iter()
        .filter(|e| is_gone(e))
        .cloned()
        .collect())
}
