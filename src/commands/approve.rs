//! `vibebox approve`: the host user's explicit yes to what `vibebox.toml` grants
//! the VM. The file is guest-writable and may change between the user's look and
//! this command, so the changes are shown and asked about on a terminal; a script
//! without one must name the digest of the grants it reviewed (`--expect`).

use std::io::{IsTerminal, Write};
use std::path::Path;

use super::{Error, up};
use crate::config::approval;
use crate::escape::escape;
use crate::paths::Home;
use crate::session::open;

pub fn run(home: &Home, start: &Path, expect: Option<&str>) -> Result<(), Error> {
    let (root, outcome, config) = up::open_project(home, start)?;
    let grants = approval::grants(&config);
    let digest = approval::digest(&grants);
    let changes = open::approval_changes(home, &root, outcome.id, &config)?;
    let shown = escape(&root.display().to_string()).into_owned();
    match expect {
        Some(want) if want.trim() != digest => {
            return Err(Error::Usage(format!(
                "vibebox.toml of {shown} now grants something else (digest {digest}, not {}); nothing approved: review the changes ({}) and run `vibebox approve --expect {digest}`",
                want.trim(),
                escape(&changes.join("; "))
            )));
        }
        Some(_) => {}
        None if changes.is_empty() => {}
        None if !std::io::stdin().is_terminal() => {
            return Err(Error::Usage(format!(
                "not approving without a review: no terminal to ask on; the changes are: {}; after reviewing them run `vibebox approve --expect {digest}`",
                escape(&changes.join("; "))
            )));
        }
        None => {
            eprintln!("vibebox: approving for {shown} what vibebox.toml now grants the VM:");
            for line in &changes {
                eprintln!("    {}", escape(line));
            }
            if !super::ask("Approve these for the next start? [y/N] ")? {
                return Err(Error::Declined("nothing approved".into()));
            }
        }
    }
    open::record_approval(home, &root, &config)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "approved for the next start of {shown} (session {}, digest {digest}):",
        outcome.id
    )?;
    for line in &grants {
        let mark = if changes.iter().any(|c| c[2..] == **line) {
            "+ "
        } else {
            "  "
        };
        writeln!(out, "  {mark}{}", escape(line))?;
    }
    Ok(())
}
