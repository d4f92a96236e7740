//! The global session index, `~/.vibebox/sessions.toml`: the truth about which
//! session belongs to which directory (the project's marker is only a hint).
//!
//! Writers take the exclusive lock for a read-modify-write and hold it only for that:
//! never while a VM stops, never while a guest-writable file is read. The file is
//! replaced atomically, so a reader without the lock sees a whole index, old or new.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::SessionId;
use super::paths::Home;
use super::statefile::{self, Lock};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(
        "{path}:{line}:{col}: {message}; the file is left as it is: fix it, or move it away to start a new index"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error(transparent)]
    State(#[from] statefile::Error),
}

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
    path: PathBuf,
    entries: Vec<Entry>,
    dirty: bool,
    _lock: Option<Lock>,
}

impl Index {
    /// Opens the index for reading and updating, creating the vibebox home if needed.
    pub fn open(home: &Home) -> Result<Index, IndexError> {
        statefile::ensure_dir(home.root(), 0o700)?;
        // Held only for short read-modify-writes; a long wait means a stuck vibebox,
        // and the user is told which file it waits for.
        let lock = Lock::exclusive_waiting(&home.index_lock(), "another vibebox command")?;
        let mut index = Self::read(home)?;
        index._lock = Some(lock);
        Ok(index)
    }

    /// The index as it is now, without the lock and without creating anything (a
    /// vibebox home that does not exist yet reads as empty). For commands that only
    /// look, and for decisions re-checked under the lock. Cannot be saved.
    pub fn snapshot(home: &Home) -> Result<Index, IndexError> {
        Self::read(home)
    }

    fn read(home: &Home) -> Result<Index, IndexError> {
        let path = home.index();
        let text = statefile::read_nofollow(&path)?.unwrap_or_default();
        if let Some(sessions) = parse_plain(&text) {
            return Ok(Index {
                path,
                entries: sessions,
                dirty: false,
                _lock: None,
            });
        }
        let file: File = toml::from_str(&text).map_err(|e| {
            let (line, col) = crate::tomlpos::error_line_col(&text, &e);
            IndexError::Corrupt {
                path: path.clone(),
                line,
                col,
                message: e.message().trim().to_string(),
            }
        })?;
        Ok(Index {
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

    /// Records that the session was used now.
    pub fn touch(&mut self, id: SessionId, at: DateTime<Utc>) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id)
            && e.last_active != at
        {
            e.last_active = at;
            self.dirty = true;
        }
    }

    pub fn remove(&mut self, id: SessionId) -> Option<Entry> {
        let pos = self.entries.iter().position(|e| e.id == id)?;
        self.dirty = true;
        Some(self.entries.remove(pos))
    }

    /// The entry whose directory is `dir` (canonical), if any.
    pub fn find_dir(&self, dir: &Path) -> Option<&Entry> {
        self.entries.iter().find(|e| e.directory == dir)
    }

    /// Writes the index back if anything changed.
    pub fn save(&mut self) -> Result<(), IndexError> {
        assert!(
            self._lock.is_some(),
            "the index is saved only under its lock"
        );
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

/// The index exactly as vibebox writes it (`[[session]]` tables of three plain
/// basic strings), read without the general TOML parser: `vibebox list` reads the
/// whole index, and with thousands of sessions the general parser is most of its
/// time. Anything else (a hand edit, an escape, another key) returns `None` and
/// goes through `toml`, which also gives the error messages.
fn parse_plain(text: &str) -> Option<Vec<Entry>> {
    let mut out = Vec::new();
    let mut cur: Option<[Option<&str>; 3]> = None;
    let finish = |cur: [Option<&str>; 3], out: &mut Vec<Entry>| -> Option<()> {
        let [id, dir, at] = cur;
        out.push(Entry {
            id: id?.parse().ok()?,
            directory: PathBuf::from(dir?),
            last_active: DateTime::parse_from_rfc3339(at?).ok()?.with_timezone(&Utc),
        });
        Some(())
    };
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if line == "[[session]]" {
            if let Some(c) = cur.take() {
                finish(c, &mut out)?;
            }
            cur = Some([None; 3]);
            continue;
        }
        let (key, value) = line.split_once(" = ")?;
        let value = value.strip_prefix('"')?.strip_suffix('"')?;
        if value.contains(['"', '\\']) || value.chars().any(char::is_control) {
            return None;
        }
        let slot = match key {
            "id" => 0,
            "directory" => 1,
            "last_active" => 2,
            _ => return None,
        };
        let c = cur.as_mut()?;
        if c[slot].replace(value).is_some() {
            return None;
        }
    }
    if let Some(c) = cur {
        finish(c, &mut out)?;
    }
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn via_toml(text: &str) -> Vec<Entry> {
        toml::from_str::<File>(text).unwrap().sessions
    }

    #[test]
    fn plain_reading_agrees_with_toml_and_steps_aside() {
        let text = "[[session]]\nid = \"019bf290-cccc-7c23-ba1d-dce7e6d40693\"\ndirectory = \"/p/a b\"\nlast_active = \"2026-11-01T00:00:00Z\"\n";
        assert_eq!(parse_plain(text), Some(via_toml(text)));
        assert_eq!(parse_plain(""), Some(vec![]));
        // What vibebox writes takes the plain path.
        let written = toml::to_string(&File {
            sessions: via_toml(text),
        })
        .unwrap();
        assert_eq!(parse_plain(&written), Some(via_toml(text)), "{written}");
        // Escapes, comments, other keys, missing keys: left to toml.
        assert_eq!(parse_plain(&text.replace("/p/a b", "/p/a\\\\b")), None);
        assert_eq!(parse_plain(&format!("# hi\n{text}")), None);
        assert_eq!(parse_plain(&format!("{text}x = \"1\"\n")), None);
        assert_eq!(parse_plain(&text.replace("directory", "dir")), None);
        assert_eq!(parse_plain("id = \"x\"\n"), None);
    }

    proptest! {
        #[test]
        fn whatever_vibebox_writes_reads_back_the_same(
            dirs in proptest::collection::vec("/[^\\x00]{0,40}", 0..6),
        ) {
            let sessions: Vec<Entry> = dirs
                .iter()
                .map(|d| Entry {
                    id: SessionId::new(),
                    directory: PathBuf::from(d),
                    last_active: now(),
                })
                .collect();
            let text = toml::to_string(&File { sessions: sessions.clone() }).unwrap();
            prop_assert_eq!(via_toml(&text), sessions.clone());
            if let Some(fast) = parse_plain(&text) {
                prop_assert_eq!(fast, sessions);
            }
        }
    }
}
