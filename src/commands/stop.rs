//! `vibebox stop [id]`: shut a session's VM down now.

use std::io::IsTerminal;
use std::path::Path;

use super::Error;
use crate::paths::Home;
use crate::session::project;
use crate::store::index::Index;
use crate::supervisor::client;

pub fn run(
    home: &Home,
    start: &Path,
    id: Option<&str>,
    yes: bool,
    cold: bool,
) -> Result<(), Error> {
    let id = match id {
        Some(q) => super::delete::resolve(Index::snapshot(home)?.entries(), q)?.id,
        // Through the index, never the project's marker: the guest can write that.
        None => {
            let root = project::find_root(start, home)?;
            project::registered(home, &root)?
                .ok_or_else(|| Error::Usage(format!("{} has no vibebox session", root.display())))?
        }
    };
    let sd = home.session(id);
    // Running tasks end with the VM: named, and asked about (or `-y`).
    if !yes && crate::supervisor::status(&sd).state == crate::supervisor::State::Running {
        let running = super::tasks::running_tasks(&sd);
        if !running.is_empty() {
            let what = super::tasks::summary(&running);
            if !std::io::stdin().is_terminal() {
                return Err(Error::InUse(format!(
                    "{what}; stopping the VM ends them: `vibebox stop -y` to stop anyway"
                )));
            }
            if !super::ask(&format!("{what}. Stop the VM and end them? [y/N] "))? {
                return Err(Error::Declined("not stopped".into()));
            }
        }
    }
    if client::stop_as(&sd, cold)? {
        println!("stopped session {id}");
    } else {
        println!("session {id} is not running");
    }
    Ok(())
}
