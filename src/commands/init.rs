//! `vibebox init`: set the project up without starting its VM (writes vibebox.toml
//! if missing, finds or creates the session) and report the session.

use std::io::Write;
use std::path::Path;

use super::Error;
use super::up;
use crate::paths::Home;
use crate::session::project::Found;

pub fn run(home: &Home, start: &Path) -> Result<(), Error> {
    let (root, outcome, _config) = up::open_project(home, start)?;
    let what = match outcome.found {
        Found::Created | Found::Copied { .. } => "new",
        _ => "existing",
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "session {} ({what})", outcome.id)?;
    writeln!(out, "project {}", root.display())?;
    Ok(())
}
