//! `vibebox delete <id>`: remove a session for good.

use std::io::{IsTerminal, Write};

use super::Error;
use crate::paths::{Home, Project};
use crate::session::delete::{self, Deleted};
use crate::store::index::{Entry, Index};

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
    // Every entry, missing ones included: a session whose directory is gone must
    // still be deletable by the id the user saw.
    let target = resolve(Index::snapshot(home)?.entries(), query)?;
    let missing = delete::is_missing(&target);
    if !yes {
        confirm(&target, missing)?;
    }
    let done = delete::delete(home, &target, false)?;
    writeln!(std::io::stdout().lock(), "{}", describe(&done, missing))?;
    Ok(())
}

/// `deleted session <id> (...)`: one line per removed session.
pub fn describe(done: &Deleted, missing: bool) -> String {
    let e = &done.entry;
    let detail = if missing {
        format!("its directory {} is missing", e.directory.display())
    } else if done.marker_removed {
        format!(
            "removed {}",
            Project::new(e.directory.clone()).session_file().display()
        )
    } else {
        format!("{} no longer held its marker", e.directory.display())
    };
    format!("deleted session {} ({detail})", e.id)
}

fn confirm(target: &Entry, missing: bool) -> Result<(), Error> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage(format!(
            "not deleting session {} without confirmation: no terminal to ask on; pass -y",
            target.id
        )));
    }
    let question = if missing {
        format!(
            "Delete session {} (its directory {} is missing)? Its VM disk and keys are removed for good. [y/N] ",
            target.id,
            target.directory.display()
        )
    } else {
        format!(
            "Delete session {} of {}? Its VM disk and keys are removed for good. [y/N] ",
            target.id,
            target.directory.display(),
        )
    };
    if super::ask(&question)? {
        Ok(())
    } else {
        Err(Error::Declined(format!(
            "kept session {}; nothing was deleted",
            target.id
        )))
    }
}
