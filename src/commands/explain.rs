//! `vibebox explain`: the same text `:explain` prints in the VM.

use std::io::Write;
use std::path::Path;

use super::Error;
use crate::config::{self, Host};
use crate::explain::{self, Facts};
use crate::paths::{Home, Project};
use crate::session::project;
use crate::vm::guest::GuestUser;

pub fn run(home: &Home, start: &Path, as_json: bool) -> Result<(), Error> {
    let root = project::find_root(start, home)?;
    let paths = Project::new(root.clone());
    let host = Host::detect(GuestUser::current().home())?;
    let config = config::load(&paths.config(), &root, &host)?;
    let session = project::registered(home, &root)?;
    let present: Vec<bool> = config.mounts.iter().map(|m| m.host.exists()).collect();
    let protection = crate::vm::protect::Protection::for_config(&root, &config);
    let facts = Facts {
        project: &root,
        session,
        config: &config,
        present: &present,
        protection: &protection,
    };
    let mut out = std::io::stdout().lock();
    if as_json {
        return super::write_json(&mut out, &explain::json(&facts));
    }
    write!(out, "{}", explain::text(&facts))?;
    Ok(())
}
