//! `vibebox protected [--accept]`: what the VM changed in the files host tools run
//! by themselves, in full; and accepting it.

use std::io::Write;
use std::path::Path;

use super::Error;
use crate::escape::escape;
use crate::paths::Home;
use crate::session::project;
use crate::session::protected::{self, ProtectedError};

pub fn run(home: &Home, start: &Path, accept: bool) -> Result<(), Error> {
    let root = project::find_root(start, home)?;
    // Only looks: no session is made for a project that has none.
    let id = project::registered(home, &root)?.ok_or(ProtectedError::NothingRecorded)?;
    let mut out = std::io::stdout().lock();
    if accept {
        let accepted = protected::accept(home, &root, id)?;
        if accepted.is_empty() {
            writeln!(
                out,
                "nothing changed; the protected paths are as you accepted them"
            )?;
        } else {
            writeln!(
                out,
                "accepted {} change{}:",
                accepted.len(),
                if accepted.len() == 1 { "" } else { "s" }
            )?;
            for c in &accepted {
                writeln!(out, "  {}", escape(&protected::summary(c)))?;
            }
        }
        return Ok(());
    }
    let pending = protected::pending(home, &root, id)?.ok_or(ProtectedError::NothingRecorded)?;
    if pending.changes.is_empty() && !pending.now.truncated {
        writeln!(
            out,
            "no changes: the protected paths are as you last accepted them"
        )?;
        return Ok(());
    }
    for line in protected::full(&pending) {
        writeln!(out, "{}", escape(&line))?;
    }
    if !pending.changes.is_empty() {
        writeln!(
            out,
            "\nHost tools run these files by themselves. Review them, then `vibebox protected --accept`."
        )?;
    }
    Ok(())
}
