//! The guest user: derived from the host user so that files written through a share
//! carry the same owner on both sides.

use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestUser {
    pub name: String,
    pub uid: u32,
}

/// Used when the host name cannot be a Linux login (root, a name Debian already uses,
/// characters `useradd` refuses).
const FALLBACK_NAME: &str = "vibebox";
const FALLBACK_UID: u32 = 1000;

/// Names the base image already owns (Debian system accounts).
const RESERVED: &[&str] = &[
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "_apt",
    "nobody",
    "sshd",
    "messagebus",
    "systemd-network",
    "systemd-resolve",
    "systemd-timesync",
    "polkitd",
];

impl GuestUser {
    /// Root on the host logs in as root in the guest (key only), so that files
    /// written through a share are owned by root on both sides.
    pub fn from_host(name: &str, uid: u32) -> GuestUser {
        if uid == 0 {
            return GuestUser {
                name: "root".to_string(),
                uid: 0,
            };
        }
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            && !RESERVED.contains(&name);
        GuestUser {
            name: if valid { name } else { FALLBACK_NAME }.to_string(),
            // Debian's system users sit below 500 and above 60000; anything else is free.
            uid: if (500..60000).contains(&uid) {
                uid
            } else {
                FALLBACK_UID
            },
        }
    }

    /// The user running vibebox on the host.
    pub fn current() -> GuestUser {
        let uid = nix::unistd::getuid();
        let name = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_default();
        GuestUser::from_host(&name, uid.as_raw())
    }

    pub fn home(&self) -> PathBuf {
        if self.uid == 0 {
            PathBuf::from("/root")
        } else {
            PathBuf::from("/home").join(&self.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_host_users() {
        assert_eq!(
            GuestUser::from_host("alice", 1001),
            GuestUser {
                name: "alice".into(),
                uid: 1001
            }
        );
        assert_eq!(GuestUser::from_host("bob", 501).uid, 501);
        let root = GuestUser::from_host("root", 0);
        assert_eq!((root.name.as_str(), root.uid), ("root", 0));
        assert_eq!(root.home(), PathBuf::from("/root"));
        assert_eq!(GuestUser::from_host("root", 1000).name, "vibebox");
        assert_eq!(GuestUser::from_host("Alice Smith", 1000).name, "vibebox");
        assert_eq!(GuestUser::from_host("sshd", 1000).name, "vibebox");
        assert_eq!(GuestUser::from_host("alice", 65534).uid, 1000);
        assert_eq!(
            GuestUser::from_host("alice", 1000).home(),
            PathBuf::from("/home/alice")
        );
    }
}
