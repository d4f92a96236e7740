//! `vibebox` with no command: find or create this project's session.

use std::io::Write;
use std::path::Path;

use super::Error;
use crate::config::{self, Host};
use crate::paths::{Home, Project};
use crate::session::project::{self, Found};
use crate::statefile;
use crate::vm::guest::GuestUser;

pub fn run(home: &Home, start: &Path) -> Result<(), Error> {
    let root = project::find_root(start, home)?;
    let paths = Project::new(root.clone());
    let created_config = statefile::write_new_atomic(
        &paths.config(),
        config::default_file_text().as_bytes(),
        0o644,
    )?;
    let host = Host::detect(GuestUser::current().home())?;
    config::load(&paths.config(), &root, &host)?;
    let outcome = project::find_or_create(home, &root)?;

    let mut err = std::io::stderr().lock();
    match &outcome.found {
        Found::Moved { from } => writeln!(
            err,
            "vibebox: this project moved from {}; its session moved with it",
            from.display()
        )?,
        Found::Copied {
            original,
            original_id,
        } => writeln!(
            err,
            "vibebox: this directory is a copy of {} (session {original_id}); it gets its own new session",
            original.display()
        )?,
        Found::Registered => writeln!(
            err,
            "vibebox: this project's session was not in the index; registered it again"
        )?,
        Found::Existing | Found::Created => {}
    }
    if created_config {
        writeln!(
            err,
            "vibebox: wrote {} with the defaults; edit it to change the VM",
            paths.config().display()
        )?;
    }
    let what = match outcome.found {
        Found::Created | Found::Copied { .. } => "new",
        _ => "existing",
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "session {} ({what})", outcome.id)?;
    writeln!(out, "project {}", root.display())?;
    Ok(())
}
