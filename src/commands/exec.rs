//! `vibebox exec -- CMD ARGS...`: one command in the VM, for agents and scripts.

use std::path::Path;
use std::process::Child;

use super::Error;
use super::up;
use crate::paths::Home;
use crate::ssh;
use crate::supervisor::{self, State};

pub fn run(home: &Home, start: &Path, command: &[String]) -> Result<(), Error> {
    let (root, outcome, config) = up::open_project(home, start)?;
    let sd = home.session(outcome.id);
    // The command runs as `ssh HOST CMD` runs it: the login shell's last command,
    // which bash execs without a fork, and a builtin (`true`, `echo`) as the
    // builtin, not a second program (under TCG each exec costs ~20 ms). The name
    // is always quoted, so it is never a keyword (`time`, `if`, `!`).
    let mut words: Vec<String> = command.iter().map(|w| ssh::shell_quote(w)).collect();
    if let Some(first) = words.first_mut()
        && !first.starts_with('\'')
    {
        *first = format!("'{first}'");
    }
    let script = format!(
        "cd {} && {}",
        ssh::shell_quote(&root.to_string_lossy()),
        words.join(" ")
    );
    let ssh_config = sd.ssh_dir().join("config");
    let alias = ssh::alias(&outcome.id.to_string());
    let spawn = || {
        ssh::command(&ssh_config, &alias, Some(&script), false)
            .spawn()
            .map_err(|e| Error::Usage(format!("cannot run ssh: {e}; install OpenSSH")))
    };
    // A running VM: the command starts now, through the control master, while this
    // client checks in with the supervisor (a third of the time `exec` took on a
    // running VM was that check-in before ssh). Only ssh's connection to the guest
    // can run it, and that exists only while the VM runs.
    let early = match supervisor::status(&sd).state {
        State::Running => Some(spawn()?),
        _ => None,
    };
    let attached = (|| {
        // Approval first: no image is fetched for a config that will not start.
        up::approve(home, &root, outcome.id, &config, false)?;
        up::ensure_image(home, &config)?;
        up::attach(home, &root, outcome.id, true)
    })();
    let attached = match attached {
        Ok(a) => a,
        Err(e) => {
            if let Some(child) = early {
                stop(child);
            }
            return Err(e);
        }
    };
    let mut child = match early {
        Some(child) => child,
        None => spawn()?,
    };
    let code = child
        .wait()
        .map_err(|e| Error::Usage(format!("cannot run ssh: {e}")))?
        .code()
        .unwrap_or(255);
    up::tell_protected(home, &root, outcome.id);
    up::finish(attached, code)
}

/// Ends an ssh started before the check-in that then failed.
fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}
