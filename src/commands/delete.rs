//! `vibebox delete <id>`: remove a session for good.

use std::io::{BufRead, IsTerminal, Write};

use super::Error;
use crate::paths::{Home, Project};
use crate::session::index::{Entry, Index};
use crate::session::project;

/// Finds the one entry whose id is `query` or starts with it.
pub fn resolve(entries: &[Entry], query: &str) -> Result<Entry, Error> {
    let q = query.trim().to_ascii_lowercase();
    if q.is_empty() {
        return Err(Error::Usage(
            "give a session id or a prefix of one (see `vibebox list`)".into(),
        ));
    }
    let matches: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.id.to_string().starts_with(&q))
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::Usage(format!(
            "no session matches {query:?}; `vibebox list` shows the sessions"
        ))),
        many => Err(Error::Usage(format!(
            "{query:?} matches {} sessions: {}; give more of the id",
            many.len(),
            many.iter()
                .map(|e| format!("{} ({})", e.id, e.directory.display()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub fn run(home: &Home, query: &str, yes: bool) -> Result<(), Error> {
    // Match against every entry, stale ones included: a session whose directory is
    // gone must still be deletable by the id the user saw.
    let target = resolve(Index::open_existing(home)?.entries(), query)?;
    let gone = !target.directory.exists();
    if !yes {
        confirm(&target, gone)?;
    }
    let mut index = Index::open(home)?;
    let removed_dir = project::remove_cache(&Project::new(target.directory.clone()), target.id)?;
    index.delete(target.id)?;
    index.prune()?;
    index.save()?;
    let mut out = std::io::stdout().lock();
    let detail = if gone {
        format!(
            "its directory {} no longer exists",
            target.directory.display()
        )
    } else if removed_dir {
        format!(
            "removed {}",
            Project::new(target.directory.clone()).cache().display()
        )
    } else {
        format!("{} no longer held it", target.directory.display())
    };
    writeln!(out, "deleted session {} ({detail})", target.id)?;
    Ok(())
}

fn confirm(target: &Entry, gone: bool) -> Result<(), Error> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Error::Usage(format!(
            "not deleting session {} without confirmation: no terminal to ask on; pass -y",
            target.id
        )));
    }
    let mut err = std::io::stderr().lock();
    if gone {
        write!(
            err,
            "Delete session {} (its directory {} is gone)? [y/N] ",
            target.id,
            target.directory.display()
        )?;
    } else {
        write!(
            err,
            "Delete session {} of {}? Its VM disk and keys are removed for good. [y/N] ",
            target.id,
            target.directory.display(),
        )?;
    }
    err.flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(Error::Declined(format!(
            "kept session {}; nothing was deleted",
            target.id
        )))
    }
}
