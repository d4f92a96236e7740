//! What the host user has agreed to give a project's VM: the grants of its
//! `vibebox.toml` (host paths mounted, network policy, image, cpus, memory, disk),
//! recorded in host state by canonical project directory when the user approves
//! them. They belong to the directory, not to a session: deleting or forging the
//! project's marker, or re-creating the session, can never lower the baseline.
//!
//! `vibebox.toml` lives in the project, which the guest can write. Without this, a
//! guest could add `~/.ssh` to its mounts, or open its network policy, and get them
//! at the next boot. So a VM only boots with grants the host user approved: the
//! ones the default config gives, or ones approved on the host terminal (`vibebox`
//! asks) or with `vibebox approve`. The supervisor checks again right before it
//! boots, so a change between the question and the boot is refused too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::paths::{Home, SessionDir};
use crate::statefile;
use crate::vm::mounts::Access;

/// Where sessions before approvals by directory kept theirs; still read.
const LEGACY_FILE: &str = "approved.toml";

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error(
        "vibebox.toml gives the VM more than you last approved ({changes}); the VM (or someone) may have edited it: review it, then run `vibebox` in a terminal or `vibebox approve --expect {digest}`"
    )]
    NotApproved { changes: String, digest: String },
    #[error("{}: {why}; remove it and approve again with `vibebox approve`", path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error(transparent)]
    State(#[from] statefile::Error),
}

/// One line per grant, readable on its own in a prompt.
pub fn grants(config: &Config) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for m in &config.mounts {
        let access = match m.access {
            Access::ReadOnly => "ro",
            Access::ReadWrite => "rw",
        };
        out.insert(format!(
            "mount {access} {} -> {}",
            m.host.display(),
            m.guest.display()
        ));
    }
    out.insert(format!("network {}", config.network.mode.as_str()));
    let verb = match config.network.mode {
        crate::net::policy::Mode::Allowlist => "allow",
        crate::net::policy::Mode::Blocklist => "block",
    };
    for rule in &config.network.entries {
        out.insert(format!("{verb} {rule}"));
    }
    // Services on the host's loopback the VM may reach.
    for port in &config.ports.host {
        out.insert(format!("host port 127.0.0.1:{port}"));
    }
    // Host loopback ports the VM may take: a guest that publishes 5432 gets the
    // connections meant for a host database that is down. Only what differs from
    // the default is a line, so approvals made before ports existed still match.
    if !config.ports.auto {
        out.insert("ports auto off".to_string());
    }
    for p in &config.ports.publish {
        let reach = if p.is_loopback() {
            ""
        } else {
            " (reachable from your network)"
        };
        out.insert(format!(
            "publish {}:{} -> VM:{}{reach}",
            p.addr, p.host, p.guest
        ));
    }
    out.insert(format!("image {}", config.image));
    // Resources are grants too: a guest that edits vibebox.toml must not give itself
    // all of the host's memory or disk at the next start.
    out.insert(format!("cpus {}", config.cpus));
    out.insert(format!("memory_mb {}", config.memory_mb));
    out.insert(format!("disk_gb {}", config.disk_gb));
    // Dropping a glob, or going back to watching, lets the guest write (or hide a
    // change in) what host tools run. Only what differs from the default is a line,
    // so approvals recorded before these keys existed still match.
    for g in &config.protect {
        out.insert(format!("protect {g}"));
    }
    if config.protect_mode != crate::config::protect::Mode::default() {
        out.insert(format!("protect_mode {}", config.protect_mode.as_str()));
    }
    out
}

/// A short digest of a set of grants: what `vibebox approve --expect` checks, so a
/// script approves exactly what was shown to the user, not whatever the file says
/// by the time it runs.
pub fn digest(grants: &BTreeSet<String>) -> String {
    let mut h = Sha256::new();
    for g in grants {
        h.update(g.as_bytes());
        h.update(b"\n");
    }
    // 128 bits: the guest writes both the reviewed file and its swap, so it could
    // search for a collision; a short digest would make that cheap.
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lines of `now` not in `approved` (`+ ...`) and of `approved` not in `now`
/// (`- ...`): any change asks, narrowing ones too, since in blocklist mode a removed
/// line widens.
pub fn changes(approved: &BTreeSet<String>, now: &BTreeSet<String>) -> Vec<String> {
    let added = now.difference(approved).map(|l| format!("+ {l}"));
    let removed = approved.difference(now).map(|l| format!("- {l}"));
    added.chain(removed).collect()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    /// The canonical project directory, for a person reading the file (the file
    /// name is its digest).
    #[serde(default)]
    directory: Option<PathBuf>,
    grants: BTreeSet<String>,
}

/// `~/.vibebox/approvals/<sha256 of the directory>.toml`.
fn path(home: &Home, dir: &Path) -> PathBuf {
    let digest = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    home.approvals().join(format!("{hex}.toml"))
}

fn read_file(p: &Path) -> Result<Option<BTreeSet<String>>, ApprovalError> {
    let Some(text) = statefile::read_nofollow(p)? else {
        return Ok(None);
    };
    let stored: Stored = toml::from_str(&text).map_err(|e| ApprovalError::Corrupt {
        path: p.to_path_buf(),
        why: e.message().trim().to_string(),
    })?;
    Ok(Some(stored.grants))
}

/// The grants approved for the project at `dir` (canonical), if any were recorded;
/// `legacy` is the session whose own `approved.toml` (from before approvals by
/// directory) counts when the directory has none.
pub fn read(
    home: &Home,
    dir: &Path,
    legacy: Option<&SessionDir>,
) -> Result<Option<BTreeSet<String>>, ApprovalError> {
    if let Some(g) = read_file(&path(home, dir))? {
        return Ok(Some(g));
    }
    match legacy {
        Some(sd) => read_file(&sd.dir().join(LEGACY_FILE)),
        None => Ok(None),
    }
}

pub fn record(home: &Home, dir: &Path, grants: &BTreeSet<String>) -> Result<(), ApprovalError> {
    statefile::ensure_dir(home.root(), 0o700)?;
    statefile::ensure_dir(&home.approvals(), 0o700)?;
    let text = toml::to_string(&Stored {
        directory: Some(dir.to_path_buf()),
        grants: grants.clone(),
    })
    .expect("grants serialize");
    statefile::write_atomic(&path(home, dir), text.as_bytes(), 0o600)?;
    Ok(())
}

/// A project moved from `from` to `to` keeps what was approved for it, unless the
/// new place has approvals of its own.
pub fn carry(home: &Home, from: &Path, to: &Path) -> Result<(), ApprovalError> {
    if read_file(&path(home, to))?.is_some() {
        return Ok(());
    }
    match read_file(&path(home, from))? {
        Some(g) => record(home, to, &g),
        None => Ok(()),
    }
}

/// The changes `config` makes to what is approved for `dir`: to the recorded
/// grants, or, before any approval, to the grants of the default config
/// (`baseline`).
pub fn pending(
    home: &Home,
    dir: &Path,
    legacy: Option<&SessionDir>,
    config: &Config,
    baseline: &Config,
) -> Result<Vec<String>, ApprovalError> {
    let approved = match read(home, dir, legacy)? {
        Some(g) => g,
        None => grants(baseline),
    };
    Ok(changes(&approved, &grants(config)))
}

/// Refuses unapproved grants, naming them.
pub fn check(
    home: &Home,
    dir: &Path,
    legacy: Option<&SessionDir>,
    config: &Config,
    baseline: &Config,
) -> Result<(), ApprovalError> {
    let pending = pending(home, dir, legacy, config, baseline)?;
    if pending.is_empty() {
        return Ok(());
    }
    Err(ApprovalError::NotApproved {
        changes: pending.join("; "),
        digest: digest(&grants(config)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(lines: &[&str]) -> BTreeSet<String> {
        lines.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn changes_name_both_directions() {
        let a = set(&["mount rw /p -> /p", "network allowlist", "allow github.com"]);
        let b = set(&[
            "mount rw /p -> /p",
            "mount rw /home/u/.ssh -> /root/.ssh",
            "network allowlist",
        ]);
        assert_eq!(
            changes(&a, &b),
            [
                "+ mount rw /home/u/.ssh -> /root/.ssh",
                "- allow github.com"
            ]
        );
        assert!(changes(&a, &a).is_empty());
    }

    #[test]
    fn stored_grants_round_trip_carry_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::from_dir(dir.path().to_path_buf());
        let (p, q) = (Path::new("/p/one"), Path::new("/p/two"));
        assert_eq!(read(&home, p, None).unwrap(), None);
        let g = set(&["network blocklist", "block evil.example"]);
        record(&home, p, &g).unwrap();
        assert_eq!(read(&home, p, None).unwrap(), Some(g.clone()));
        assert_eq!(read(&home, q, None).unwrap(), None);
        carry(&home, p, q).unwrap();
        assert_eq!(read(&home, q, None).unwrap(), Some(g.clone()));
        // A legacy per-session record counts only where the directory has none.
        let sd = home.session("x");
        std::fs::create_dir_all(sd.dir()).unwrap();
        std::fs::write(
            sd.dir().join(LEGACY_FILE),
            "grants = [\"network allowlist\"]\n",
        )
        .unwrap();
        assert_eq!(read(&home, p, Some(&sd)).unwrap(), Some(g));
        assert_eq!(
            read(&home, Path::new("/p/three"), Some(&sd)).unwrap(),
            Some(set(&["network allowlist"]))
        );
        std::fs::write(path(&home, p), "grants = 3\n").unwrap();
        let err = read(&home, p, None).unwrap_err().to_string();
        assert!(
            err.contains(&path(&home, p).display().to_string()) && err.contains("vibebox approve"),
            "{err}"
        );
    }
}
