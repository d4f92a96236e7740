//! `vibebox ssh-config`: the session's ssh config block, for editors, scp and rsync.

use std::path::Path;

use super::Error;
use super::up;
use crate::paths::Home;

pub fn run(home: &Home, start: &Path) -> Result<(), Error> {
    let (root, outcome, config) = up::open_project(home, start)?;
    up::ensure_image(home, &config)?;
    let attached = up::attach(home, &root, outcome.id, true)?;
    let path = home.session(outcome.id).ssh_dir().join("config");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Dir {
        path: path.clone(),
        source,
    })?;
    print!("{text}");
    eprintln!(
        "vibebox: the port changes when the VM restarts; run `vibebox ssh-config` again after a restart"
    );
    drop(attached);
    Ok(())
}
