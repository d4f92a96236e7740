//! `vibebox stop [id]`: shut a session's VM down now.

use std::path::Path;

use super::Error;
use crate::paths::Home;
use crate::session::index::Index;
use crate::session::project;
use crate::supervisor::client;

pub fn run(home: &Home, start: &Path, id: Option<&str>) -> Result<(), Error> {
    let id = match id {
        Some(q) => super::delete::resolve(Index::open_existing(home)?.entries(), q)?.id,
        None => {
            let root = project::find_root(start, home)?;
            project::read_session_id(&crate::paths::Project::new(root.clone()))?
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
