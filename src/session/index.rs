//! The global session index, `~/.vibebox/sessions.toml`.
//!
//! Every reader takes the exclusive lock because every reader may prune; the file is
//! replaced atomically, so a crash mid-write leaves the previous index.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Error, SessionId, project};
use crate::paths::Home;
use crate::statefile::{self, Lock};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: SessionId,
    pub directory: PathBuf,
    #[serde(with = "rfc3339")]
    pub last_active: DateTime<Utc>,
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    #[serde(default, rename = "session")]
    sessions: Vec<Entry>,
}

/// The index, read under its lock; the lock is held until this value is dropped, so a
/// read-modify-write through it is atomic with respect to other vibebox processes.
pub struct Index {
    home: Home,
    path: PathBuf,
    entries: Vec<Entry>,
    dirty: bool,
    _lock: Option<Lock>,
}

impl Index {
    /// Opens the index for reading and updating, creating the vibebox home if needed.
    pub fn open(home: &Home) -> Result<Index, Error> {
        statefile::ensure_dir(home.root(), 0o700)?;
        let lock = Lock::exclusive(&home.index_lock())?;
        let mut index = Self::read(home)?;
        index._lock = Some(lock);
        Ok(index)
    }

    /// Opens the index without creating anything: a vibebox home that does not exist
    /// yet reads as an empty index. Used by commands that only look.
    pub fn open_existing(home: &Home) -> Result<Index, Error> {
        if !home.root().is_dir() {
            return Ok(Index {
                home: home.clone(),
                path: home.index(),
                entries: Vec::new(),
                dirty: false,
                _lock: None,
            });
        }
        Self::open(home)
    }

    fn read(home: &Home) -> Result<Index, Error> {
        let path = home.index();
        let text = statefile::read_nofollow(&path)?.unwrap_or_default();
        let file: File = toml::from_str(&text).map_err(|e| {
            let (line, col) = crate::tomlpos::error_line_col(&text, &e);
            Error::CorruptIndex {
                path: path.clone(),
                line,
                col,
                message: e.message().trim().to_string(),
            }
        })?;
        Ok(Index {
            home: home.clone(),
            path,
            entries: file.sessions,
            dirty: false,
            _lock: None,
        })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, id: SessionId) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    pub fn upsert(&mut self, entry: Entry) {
        match self.entries.iter_mut().find(|e| e.id == entry.id) {
            Some(e) => *e = entry,
            None => self.entries.push(entry),
        }
        self.dirty = true;
    }

    pub fn remove(&mut self, id: SessionId) -> Option<Entry> {
        let pos = self.entries.iter().position(|e| e.id == id)?;
        self.dirty = true;
        Some(self.entries.remove(pos))
    }

    /// Drops entries whose directory no longer holds `.vibebox/session.toml` with their
    /// id (the project was deleted, or its `.vibebox/` was), and deletes their state:
    /// that is the documented way to delete a session. Returns what it dropped.
    pub fn prune(&mut self) -> Result<Vec<Entry>, Error> {
        let (keep, gone): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(is_live);
        self.entries = keep;
        if !gone.is_empty() {
            self.dirty = true;
        }
        for e in &gone {
            remove_state(&self.home, e.id)?;
        }
        Ok(gone)
    }

    /// Removes an entry and the session's state directory.
    pub fn delete(&mut self, id: SessionId) -> Result<Option<Entry>, Error> {
        remove_state(&self.home, id)?;
        Ok(self.remove(id))
    }

    /// Writes the index back if anything changed.
    pub fn save(&mut self) -> Result<(), Error> {
        if !self.dirty {
            return Ok(());
        }
        let file = File {
            sessions: std::mem::take(&mut self.entries),
        };
        let text = toml::to_string(&file).expect("index serializes");
        self.entries = file.sessions;
        statefile::write_atomic(&self.path, text.as_bytes(), 0o600)?;
        self.dirty = false;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Deleting a session stops its VM first: a disk is never removed under a running
/// QEMU.
fn remove_state(home: &Home, id: SessionId) -> Result<(), Error> {
    let session = home.session(id);
    if let Err(e) = crate::supervisor::client::stop(&session) {
        tracing::warn!("stopping session {id} before deleting it: {e}");
    }
    let dir = session.dir().to_path_buf();
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Dir { path: dir, source }),
    }
}

/// Whether the entry's directory still holds its session. Unreadable for other reasons
/// (permissions, an unmounted disk that left a stale mount point) counts as live only
/// when the `.vibebox` directory is still there, so a hiccup never drops a session.
fn is_live(e: &Entry) -> bool {
    match project::read_session_id(&crate::paths::Project::new(e.directory.clone())) {
        Ok(Some(id)) => id == e.id,
        Ok(None) => false,
        Err(_) => e.directory.join(crate::paths::CACHE_DIR).exists(),
    }
}

mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("last_active {s:?}: {e}")))
    }
}

/// Current time at the precision the index stores.
pub fn now() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(0)
}
