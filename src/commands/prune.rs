//! `vibebox prune`: remove the sessions whose directory is missing, after showing
//! them. The only way besides `delete` and `:new` that a session's disk goes.

use std::io::{IsTerminal, Write};

use super::Error;
use crate::paths::Home;
use crate::session::delete;

pub fn run(home: &Home, yes: bool, dry_run: bool) -> Result<(), Error> {
    let gone = delete::prunable(home)?;
    let mut out = std::io::stdout().lock();
    if gone.is_empty() {
        writeln!(
            out,
            "nothing to prune: no session's directory is gone (unreadable ones are kept)"
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{} session{} whose directory is gone:",
        gone.len(),
        if gone.len() == 1 { "" } else { "s" }
    )?;
    for e in &gone {
        writeln!(out, "  {}  {}", e.id, e.directory.display())?;
    }
    if dry_run {
        writeln!(out, "(dry run: nothing removed)")?;
        return Ok(());
    }
    drop(out);
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(Error::Usage(
                "not pruning without confirmation: no terminal to ask on; pass -y (or --dry-run to only look)".into(),
            ));
        }
        if !super::ask("Delete these sessions, their VM disks and keys, for good? [y/N] ")? {
            return Err(Error::Declined("nothing was deleted".into()));
        }
    }
    let mut out = std::io::stdout().lock();
    for e in &gone {
        // Looked at again: a directory that came back (a disk mounted again) keeps
        // its session.
        if !delete::is_gone(e) {
            writeln!(
                out,
                "kept session {} ({} is back)",
                e.id,
                e.directory.display()
            )?;
            continue;
        }
        let done = delete::delete(home, e, true)?;
        writeln!(out, "{}", super::delete::describe(&done, true))?;
    }
    Ok(())
}
