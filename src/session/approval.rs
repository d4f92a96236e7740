//! What the host user has agreed to give a session's VM: the grants of its
//! `vibebox.toml` (host paths mounted, network policy, image), recorded in the
//! session's state directory when the user approves them.
//!
//! `vibebox.toml` lives in the project, which the guest can write. Without this, a
//! guest could add `~/.ssh` to its mounts, or open its network policy, and get them
//! at the next boot. So a VM only boots with grants the host user approved: the
//! ones the default config gives, or ones approved on the host terminal (`vibebox`
//! asks) or with `vibebox approve`. The supervisor checks again right before it
//! boots, so a change between the question and the boot is refused too.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::paths::SessionDir;
use crate::statefile;
use crate::vm::mounts::Access;

const FILE: &str = "approved.toml";

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error(
        "vibebox.toml gives the VM more than you last approved ({changes}); the VM (or someone) may have edited it: review it, then run `vibebox` in a terminal or `vibebox approve`"
    )]
    NotApproved { changes: String },
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
    out.insert(format!("image {}", config.image));
    out
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
    grants: BTreeSet<String>,
}

fn path(session: &SessionDir) -> PathBuf {
    session.dir().join(FILE)
}

/// The approved grants, if any were recorded.
pub fn read(session: &SessionDir) -> Result<Option<BTreeSet<String>>, ApprovalError> {
    let p = path(session);
    let Some(text) = statefile::read_nofollow(&p)? else {
        return Ok(None);
    };
    let stored: Stored = toml::from_str(&text).map_err(|e| ApprovalError::Corrupt {
        path: p.clone(),
        why: e.message().trim().to_string(),
    })?;
    Ok(Some(stored.grants))
}

pub fn record(session: &SessionDir, grants: &BTreeSet<String>) -> Result<(), ApprovalError> {
    statefile::ensure_dir(session.dir(), 0o700)?;
    let text = toml::to_string(&Stored {
        grants: grants.clone(),
    })
    .expect("grants serialize");
    statefile::write_atomic(&path(session), text.as_bytes(), 0o600)?;
    Ok(())
}

/// The changes `config` makes to what is approved: to the recorded grants, or,
/// before any approval, to the grants of the default config (`baseline`).
pub fn pending(
    session: &SessionDir,
    config: &Config,
    baseline: &Config,
) -> Result<Vec<String>, ApprovalError> {
    let approved = match read(session)? {
        Some(g) => g,
        None => grants(baseline),
    };
    Ok(changes(&approved, &grants(config)))
}

/// Refuses unapproved grants, naming them.
pub fn check(
    session: &SessionDir,
    config: &Config,
    baseline: &Config,
) -> Result<(), ApprovalError> {
    let pending = pending(session, config, baseline)?;
    if pending.is_empty() {
        return Ok(());
    }
    Err(ApprovalError::NotApproved {
        changes: pending.join("; "),
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
    fn stored_grants_round_trip_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let sd = crate::paths::Home::from_dir(dir.path().to_path_buf()).session("x");
        assert_eq!(read(&sd).unwrap(), None);
        let g = set(&["network blocklist", "block evil.example"]);
        record(&sd, &g).unwrap();
        assert_eq!(read(&sd).unwrap(), Some(g));
        std::fs::write(sd.dir().join(FILE), "grants = 3\n").unwrap();
        let err = read(&sd).unwrap_err().to_string();
        assert!(
            err.contains("approved.toml") && err.contains("vibebox approve"),
            "{err}"
        );
    }
}
