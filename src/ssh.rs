//! SSH: per-session keys made with the system `ssh-keygen`, the pinned known_hosts
//! line, and the client config the system `ssh` runs with.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ssh-keygen is not installed: install OpenSSH (`sudo apt install openssh-client`)")]
    NoKeygen,
    #[error("ssh-keygen failed for {path}: {message}")]
    Keygen { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Paths of one key pair.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private: PathBuf,
    pub public: PathBuf,
}

impl KeyPair {
    pub fn at(private: PathBuf) -> KeyPair {
        let mut public = private.clone().into_os_string();
        public.push(".pub");
        KeyPair {
            private,
            public: PathBuf::from(public),
        }
    }

    pub fn exists(&self) -> bool {
        self.private.is_file() && self.public.is_file()
    }

    pub fn public_key(&self) -> Result<String, Error> {
        std::fs::read_to_string(&self.public)
            .map(|s| s.trim().to_string())
            .map_err(|source| Error::Io {
                path: self.public.clone(),
                source,
            })
    }
}

/// Makes an ed25519 key pair at `private` (and `private.pub`) unless one exists.
pub fn ensure_keypair(private: &Path, comment: &str) -> Result<KeyPair, Error> {
    let pair = KeyPair::at(private.to_path_buf());
    if pair.exists() {
        return Ok(pair);
    }
    let keygen = which::which("ssh-keygen").map_err(|_| Error::NoKeygen)?;
    // ssh-keygen refuses to overwrite; a half pair from a crash is removed first.
    let _ = std::fs::remove_file(&pair.private);
    let _ = std::fs::remove_file(&pair.public);
    let out = Command::new(keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(private)
        .output()
        .map_err(|source| Error::Io {
            path: private.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Keygen {
            path: private.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(pair)
}

/// The known_hosts line pinning `host_public_key` for `[host]:port`.
pub fn known_hosts_line(host: &str, port: u16, host_public_key: &str) -> String {
    let mut fields = host_public_key.split_whitespace();
    let kind = fields.next().unwrap_or_default();
    let key = fields.next().unwrap_or_default();
    if port == 22 {
        format!("{host} {kind} {key}\n")
    } else {
        format!("[{host}]:{port} {kind} {key}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_format() {
        assert_eq!(
            known_hosts_line("127.0.0.1", 2222, "ssh-ed25519 AAAAC3 host@x"),
            "[127.0.0.1]:2222 ssh-ed25519 AAAAC3\n"
        );
        assert_eq!(
            known_hosts_line("10.0.2.15", 22, "ssh-ed25519 AAAAC3"),
            "10.0.2.15 ssh-ed25519 AAAAC3\n"
        );
    }

    #[test]
    fn makes_keys_once() {
        if which::which("ssh-keygen").is_err() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id_ed25519");
        let pair = ensure_keypair(&p, "test").unwrap();
        let public = pair.public_key().unwrap();
        assert!(public.starts_with("ssh-ed25519 "));
        let again = ensure_keypair(&p, "test").unwrap();
        assert_eq!(again.public_key().unwrap(), public);
    }
}
