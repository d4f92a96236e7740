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
    let script = remote_script(&root, command);
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

/// The line the guest's login shell runs for `exec`.
fn remote_script(root: &Path, command: &[String]) -> String {
    // The command runs as `ssh HOST CMD` runs it: the login shell's last command,
    // which bash execs without a fork, and a builtin (`true`, `echo`) as the
    // builtin, not a second program (under TCG each exec costs ~20 ms). The name
    // is always quoted, so it is never a keyword (`time`, `if`, `!`).
    // A name starting with `%` is a job to bash even when quoted: `exec` runs it
    // as the program it names.
    let mut words: Vec<String> = command.iter().map(|w| ssh::shell_quote(w)).collect();
    if let Some(first) = words.first_mut() {
        if !first.starts_with('\'') {
            *first = format!("'{first}'");
        }
        if first.starts_with("'%") {
            *first = format!("exec {first}");
        }
    }
    format!(
        "cd {} && {}",
        ssh::shell_quote(&root.to_string_lossy()),
        words.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command runs with exactly its words, whatever they are, by the shell
    /// the guest's login runs (bash), and a name bash would read otherwise (a
    /// keyword, an assignment, a job) still names a program.
    #[test]
    fn the_remote_line_runs_exactly_the_command() {
        let bin = tempfile::tempdir().unwrap();
        let show = "#!/bin/sh\nprintf '%s|' \"$(basename \"$0\")\" \"$@\"\n";
        for name in ["%1", "if", "A=1", "!", "time", "-x", "my prog"] {
            let p = bin.path().join(name);
            std::fs::write(&p, show).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            let args = [name, "a b", "", "$HOME", "`x`", "*", "'q'", "l1\nl2", "-n"];
            let command: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(remote_script(bin.path(), &command))
                .env("PATH", format!("{}:/usr/bin:/bin", bin.path().display()))
                .output()
                .unwrap();
            let want: String = args.iter().map(|a| format!("{a}|")).collect();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                want,
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
