//! Sessions: one VM per project directory, recorded in the global index and in the
//! project's own `.vibebox/session.toml`.

pub mod approval;
pub mod fetch;
pub mod index;
pub mod project;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A session id: a UUIDv7 with the RFC 4122 variant, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(Uuid);

impl SessionId {
    pub fn new() -> SessionId {
        SessionId(Uuid::now_v7())
    }
}

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for SessionId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let u = Uuid::try_parse(s).map_err(|_| format!("{s:?} is not a session id"))?;
        if u.get_version_num() != 7 || u.get_variant() != uuid::Variant::RFC4122 {
            return Err(format!("{s:?} is not a UUIDv7 session id"));
        }
        Ok(SessionId(u))
    }
}

impl TryFrom<String> for SessionId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> String {
        id.to_string()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path}:{line}:{col}: {message}; the file is left as it is: fix it, or move it away to start a new index"
    )]
    CorruptIndex {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{path}: {message}; fix it, or delete {dir} to give this project a new session")]
    CorruptProjectSession {
        path: PathBuf,
        dir: PathBuf,
        message: String,
    },
    #[error("{0} is not valid UTF-8; vibebox needs UTF-8 paths (rename the directory)")]
    NonUtf8Path(PathBuf),
    #[error("cannot use {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::statefile::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7() {
        let id = SessionId::new();
        let s = id.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "7");
        assert_eq!(s.parse::<SessionId>().unwrap(), id);
        assert!(
            "019bf290-cccc-7c23-ba1d-dce7e6d40693"
                .parse::<SessionId>()
                .is_ok()
        );
        // v4
        assert!(
            "f47ac10b-58cc-4372-a567-0e02b2c3d479"
                .parse::<SessionId>()
                .is_err()
        );
        // v7 but wrong variant
        assert!(
            "019bf290-cccc-7c23-fa1d-dce7e6d40693"
                .parse::<SessionId>()
                .is_err()
        );
        assert!("nope".parse::<SessionId>().is_err());
    }
}
