//! Passive state on disk: every filename (`paths`), the one discipline for state
//! writes (`statefile`), the session index, instance records, and defensive reads of
//! guest-writable files (`guestfile`). Nothing here starts or stops a process: the
//! layers above decide what a state change means for a running VM.

pub mod guestfile;
pub mod index;
pub mod instance;
pub mod paths;
pub mod procid;
pub mod statefile;
pub mod watched;

use std::fmt;
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
