//! `vibebox fetch`: the VM's branches into the host repository as
//! `vibebox/<branch>`, for review.

use std::io::Write;
use std::path::Path;

use super::Error;
use super::up;
use crate::paths::Home;
use crate::session::fetch;
use crate::ssh;

pub fn run(home: &Home, start: &Path) -> Result<(), Error> {
    // Before anything is written or booted for nothing.
    fetch::ensure_repo(start)?;
    let (root, outcome, config) = up::open_project(home, start)?;
    up::ensure_image(home, &config)?;
    up::approve(home, &root, outcome.id, &config, false)?;
    // Held for the fetch: the VM stays up while it runs.
    let attached = up::attach(home, &root, outcome.id, false)?;
    let sd = home.session(outcome.id);
    let fetched = fetch::fetch(
        &root,
        &sd.ssh_dir().join("config"),
        &ssh::alias(&outcome.id.to_string()),
    )?;
    drop(attached);
    write!(std::io::stdout().lock(), "{}", fetched.summary())?;
    Ok(())
}
