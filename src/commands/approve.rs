//! `vibebox approve`: the host user's explicit yes to what `vibebox.toml` grants
//! the VM, for scripts and agents that start it without a terminal to ask on.

use std::io::Write;
use std::path::Path;

use super::{Error, up};
use crate::config::approval;
use crate::paths::Home;

pub fn run(home: &Home, start: &Path) -> Result<(), Error> {
    let (root, outcome, config) = up::open_project(home, start)?;
    let grants = approval::grants(&config);
    let before = approval::read(home, &root, Some(&home.session(outcome.id)))?;
    approval::record(home, &root, &grants)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "approved for the next start of {} (session {}):",
        root.display(),
        outcome.id
    )?;
    for line in &grants {
        let mark = match &before {
            Some(b) if !b.contains(line) => "+ ",
            _ => "  ",
        };
        writeln!(out, "  {mark}{line}")?;
    }
    Ok(())
}
