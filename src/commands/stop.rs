//! `vibebox stop [id]`: shut a session's VM down now.

use std::path::Path;

use super::Error;
use crate::paths::Home;
use crate::session::project;
use crate::store::index::Index;
use crate::supervisor::client;

pub fn run(home: &Home, start: &Path, id: Option<&str>) -> Result<(), Error> {
    let id = match id {
        Some(q) => super::delete::resolve(Index::snapshot(home)?.entries(), q)?.id,
        // Through the index, never the project's marker: the guest can write that.
        None => {
            let root = project::find_root(start, home)?;
            project::registered(home, &root)?
                .ok_or_else(|| Error::Usage(format!("{} has no vibebox session", root.display())))?
        }
    };
    if client::stop(&home.session(id))? {
        println!("stopped session {id}");
    } else {
        println!("session {id} is not running");
    }
    Ok(())
}
