//! `vibebox protected [--accept [--expect DIGEST]]`: what the VM changed in the
//! files host tools run by themselves, in full; and accepting it. The files are
//! guest-writable and may change between the user's look and the accept, so what
//! is accepted is what was shown: asked on a terminal, named by its digest without
//! one (like `vibebox approve --expect`).

use std::io::{IsTerminal, Write};
use std::path::Path;

use super::Error;
use crate::escape::escape;
use crate::paths::Home;
use crate::session::project;
use crate::session::protected::{self, ProtectedError};

pub fn run(home: &Home, start: &Path, accept: bool, expect: Option<&str>) -> Result<(), Error> {
    let root = project::find_root(start, home)?;
    // Only looks: no session is made for a project that has none.
    let id = project::registered(home, &root)?.ok_or(ProtectedError::NothingRecorded)?;
    let pending = protected::pending(home, &root, id)?.ok_or(ProtectedError::NothingRecorded)?;
    let digest = pending.digest();
    let mut out = std::io::stdout().lock();
    if accept {
        let nothing = pending.changes.is_empty() && !pending.now.truncated;
        match expect {
            Some(want) if want.trim() != digest => {
                return Err(Error::Usage(format!(
                    "the protected paths are not what you reviewed (digest {digest}, not {}); nothing accepted: review them with `vibebox protected`",
                    escape(want.trim())
                )));
            }
            Some(_) => {}
            None if nothing => {}
            None if !std::io::stdin().is_terminal() => {
                return Err(Error::Usage(format!(
                    "not accepting without a review: no terminal to ask on; review with `vibebox protected`, then run `vibebox protected --accept --expect {digest}`"
                )));
            }
            None => {
                eprintln!("vibebox: accepting the protected paths (digest {digest}):");
                for line in protected::short(&pending) {
                    eprintln!("  {}", escape(&line));
                }
                if !super::ask("Accept these as they are? [y/N] ")? {
                    return Err(Error::Declined("nothing accepted".into()));
                }
            }
        }
        let accepted = protected::accept(home, id, pending)?;
        if accepted.is_empty() {
            writeln!(
                out,
                "nothing changed; the protected paths are as you accepted them"
            )?;
        } else {
            writeln!(
                out,
                "accepted {} change{} (digest {digest}):",
                accepted.len(),
                if accepted.len() == 1 { "" } else { "s" }
            )?;
            for line in protected::summaries(&accepted) {
                writeln!(out, "  {}", escape(&line))?;
            }
        }
        return Ok(());
    }
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
    writeln!(
        out,
        "\nHost tools run these files by themselves. Review them, then `vibebox protected --accept` (or, without a terminal, `vibebox protected --accept --expect {digest}`: exactly what is shown here)."
    )?;
    Ok(())
}
