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
    #[error("ssh to the guest failed: {0}")]
    Remote(String),
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

/// A connection of the supervisor's own to the guest (its own control master, not
/// the one the user's clients share), from the session's ssh config.
pub async fn guest_session(session: &crate::paths::SessionDir) -> Result<openssh::Session, Error> {
    let config = session.ssh_dir().join("config");
    let alias = std::fs::read_to_string(&config)
        .ok()
        .and_then(|c| {
            c.lines()
                .next()
                .and_then(|l| l.strip_prefix("Host "))
                .map(String::from)
        })
        .ok_or_else(|| Error::Io {
            path: config.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no Host line"),
        })?;
    openssh::SessionBuilder::default()
        .config_file(&config)
        .known_hosts_check(openssh::KnownHosts::Strict)
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect(&alias)
        .await
        .map_err(|e| Error::Remote(e.to_string()))
}

/// Runs a shell script in the guest through the session's ssh config (the `openssh`
/// crate drives the system ssh with its own control master) and returns its stdout.
pub async fn guest_output(
    session: &crate::paths::SessionDir,
    script: &str,
) -> Result<String, Error> {
    guest_output_within(session, script, GUEST_OUTPUT_WAIT).await
}

/// [`guest_output`] with its own bound on the whole exchange, connection included.
pub async fn guest_output_within(
    session: &crate::paths::SessionDir,
    script: &str,
    wait: std::time::Duration,
) -> Result<String, Error> {
    let late = || Error::Remote(format!("the guest did not answer within {wait:?}"));
    let deadline = tokio::time::Instant::now() + wait;
    let guest = tokio::time::timeout_at(deadline, guest_session(session))
        .await
        .map_err(|_| late())??;
    let out = tokio::time::timeout_at(deadline, bounded_output(&guest, script))
        .await
        .unwrap_or_else(|_| Err(late()));
    // Closing the connection ends the command too, whatever it was doing.
    let _ = guest.close().await;
    out
}

/// The guest controls what runs as `sh` and what it prints: a supervisor question
/// gets at most this much, and this long, before it gives up on the answer.
const GUEST_OUTPUT_CAP: usize = 1 << 20;
const GUEST_OUTPUT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn bounded_output(guest: &openssh::Session, script: &str) -> Result<String, Error> {
    use tokio::io::AsyncReadExt;
    let remote = |e: openssh::Error| Error::Remote(e.to_string());
    let mut child = guest
        .command("sh")
        .arg("-c")
        .arg(script)
        .stdin(openssh::Stdio::null())
        .stdout(openssh::Stdio::piped())
        .stderr(openssh::Stdio::null())
        .spawn()
        .await
        .map_err(remote)?;
    let mut stdout = child
        .stdout()
        .take()
        .ok_or_else(|| Error::Remote("no output".into()))?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = stdout
            .read(&mut buf)
            .await
            .map_err(|e| Error::Remote(e.to_string()))?;
        if n == 0 {
            break;
        }
        if out.len() + n > GUEST_OUTPUT_CAP {
            return Err(Error::Remote(format!(
                "the guest's answer is over {GUEST_OUTPUT_CAP} bytes"
            )));
        }
        out.extend_from_slice(&buf[..n]);
    }
    drop(stdout);
    let status = child.wait().await.map_err(remote)?;
    if !status.success() {
        return Err(Error::Remote(format!(
            "the guest command failed ({status})"
        )));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The `Host` alias written in a session's ssh config.
pub fn alias(id: &str) -> String {
    format!("vibebox-{}", &id[..id.len().min(8)])
}

/// Runs the system `ssh` with the session's config: an interactive login shell when
/// `command` is empty, else that command (already shell-quoted). Returns ssh's exit
/// code (the remote command's, or 255 when ssh itself failed).
pub fn run(config: &Path, alias: &str, command: Option<&str>, tty: bool) -> std::io::Result<i32> {
    let status = self::command(config, alias, command, tty).status()?;
    Ok(status.code().unwrap_or(255))
}

/// The ssh command [`run`] runs, for a caller that starts it and waits later.
pub fn command(config: &Path, alias: &str, command: Option<&str>, tty: bool) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.arg("-F").arg(config);
    cmd.arg(if tty { "-t" } else { "-T" });
    cmd.arg(alias);
    if let Some(c) = command {
        cmd.arg("--").arg(c);
    }
    cmd
}

/// Quotes one word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// Everything the ssh client config of a session says.
#[derive(Debug, Clone)]
pub struct ClientConfig<'a> {
    pub alias: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub identity: &'a Path,
    pub known_hosts: &'a Path,
    pub control_path: &'a Path,
}

/// ssh_config quotes values with double quotes; paths are written that way so that
/// spaces work.
fn quoted(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// The `Host` block: pinned host key (never `StrictHostKeyChecking=no`), only the
/// session's key, and a control master so the next terminal attaches without a new
/// handshake.
pub fn config_block(c: &ClientConfig<'_>) -> String {
    format!(
        "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {id}\n  IdentitiesOnly yes\n  IdentityAgent none\n  UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n  CheckHostIP no\n  ControlMaster auto\n  ControlPath {cp}\n  ControlPersist 60s\n  ServerAliveInterval 15\n  LogLevel ERROR\n",
        alias = c.alias,
        port = c.port,
        user = c.user,
        id = quoted(c.identity),
        kh = quoted(c.known_hosts),
        cp = quoted(c.control_path),
    )
}

/// The control socket path: in the session directory when that is short enough for
/// a unix socket (ssh appends a random suffix while creating it), else a hashed name
/// in the temp directory.
pub fn control_path(ssh_dir: &Path) -> PathBuf {
    let p = ssh_dir.join("cm");
    if p.as_os_str().len() <= 80 {
        return p;
    }
    // Too long for a socket path: a private (0700, ours, not a link) directory in
    // the temp dir, never a name in the shared, world-writable one.
    let dir = std::env::temp_dir().join(format!("vibebox-{}", nix::unistd::getuid()));
    if private_dir(&dir) { dir.join("%C") } else { p }
}

/// Makes `dir` a 0700 directory owned by us, or says it cannot be one.
fn private_dir(dir: &Path) -> bool {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let _ = std::fs::DirBuilder::new().mode(0o700).create(dir);
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() && m.uid() == nix::unistd::getuid().as_raw() => {
            m.permissions().mode() & 0o077 == 0
                || std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).is_ok()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_block_pins_and_quotes() {
        let b = config_block(&ClientConfig {
            alias: "vibebox-019bf290",
            port: 2222,
            user: "al",
            identity: Path::new("/h/my home/.vibebox/s/ssh/id_ed25519"),
            known_hosts: Path::new("/h/kh"),
            control_path: Path::new("/h/cm"),
        });
        assert!(b.starts_with("Host vibebox-019bf290\n"));
        assert!(b.contains("  Port 2222\n"));
        assert!(b.contains("  IdentityFile \"/h/my home/.vibebox/s/ssh/id_ed25519\"\n"));
        assert!(b.contains("  StrictHostKeyChecking yes\n"));
        assert!(b.contains("  ControlMaster auto\n"));
        assert!(!b.contains("StrictHostKeyChecking no"));
        assert_eq!(control_path(Path::new("/s/ssh")), Path::new("/s/ssh/cm"));
        let long = Path::new("/x").join("y".repeat(100));
        let cp = control_path(&long);
        assert!(cp.ends_with("%C"), "{}", cp.display());
        let dir = cp.parent().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::symlink_metadata(dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(alias("019bf290-cccc"), "vibebox-019bf290");
    }

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
