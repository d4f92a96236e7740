//! `vibebox exec -- CMD ARGS...`: one command in the VM, for agents and scripts.

use std::path::Path;

use super::Error;
use super::up;
use crate::paths::Home;
use crate::ssh;

pub fn run(home: &Home, start: &Path, command: &[String]) -> Result<(), Error> {
    let (root, outcome, config) = up::open_project(home, start)?;
    // Approval first: no image is fetched for a config that will not start.
    up::approve(home, &root, outcome.id, &config, false)?;
    up::ensure_image(home, &config)?;
    let attached = up::attach(home, &root, outcome.id, true)?;
    let words: Vec<String> = command.iter().map(|w| ssh::shell_quote(w)).collect();
    let script = format!(
        "cd {} && exec {}",
        ssh::shell_quote(&root.to_string_lossy()),
        words.join(" ")
    );
    let sd = home.session(outcome.id);
    let code = ssh::run(
        &sd.ssh_dir().join("config"),
        &ssh::alias(&outcome.id.to_string()),
        Some(&script),
        false,
    )
    .map_err(|e| Error::Usage(format!("cannot run ssh: {e}; install OpenSSH")))?;
    up::tell_protected(home, &root, outcome.id);
    up::finish(attached, code)
}
