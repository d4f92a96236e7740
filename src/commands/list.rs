//! `vibebox list`: every session, newest first.

use std::io::{IsTerminal, Write};

use chrono::{DateTime, Utc};
use serde_json::json;

use super::Error;
use crate::paths::Home;
use crate::session::delete::is_missing;
use crate::store::index::{Entry, Index};
use crate::supervisor::{self, State, Status};

/// One row: the entry, its VM's state, and whether its directory is missing.
type Row = (Entry, Status, bool);

/// Only looks: no lock, no write, no project file read, nothing stopped or removed.
pub fn run(home: &Home, as_json: bool) -> Result<(), Error> {
    let index = Index::snapshot(home)?;
    let live = supervisor::live_sessions(home);
    let stopped = Status {
        state: State::Stopped,
        clients: 0,
    };
    let mut rows: Vec<Row> = index
        .entries()
        .iter()
        .map(|e| {
            let status = if live.contains(&e.id.to_string()) {
                supervisor::status(&home.session(e.id))
            } else {
                stopped
            };
            (e.clone(), status, is_missing(e))
        })
        .collect();
    drop(index);
    // Ties within a second fall back to the id: UUIDv7 ids sort by creation time.
    rows.sort_by_key(|(e, _, _)| std::cmp::Reverse((e.last_active, e.id)));

    let mut out = std::io::stdout().lock();
    if as_json {
        let items: Vec<_> = rows
            .iter()
            .map(|(e, s, missing)| {
                json!({
                    "id": e.id.to_string(),
                    "directory": e.directory,
                    "state": state_word(s, *missing),
                    "missing": missing,
                    "clients": s.clients,
                    "last_active": e.last_active.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                })
            })
            .collect();
        return super::write_json(&mut out, &items);
    }
    if rows.is_empty() {
        writeln!(
            out,
            "No sessions yet. Run `vibebox` in a project directory to create one."
        )?;
        return Ok(());
    }
    let now = Utc::now();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(e, s, missing)| {
            vec![
                e.id.to_string(),
                e.directory.display().to_string(),
                state_word(s, *missing).to_string(),
                s.clients.to_string(),
                relative_time(e.last_active, now),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        super::table::render(&HEADERS, &table, terminal_width().map(|w| (w, 1)))
    )?;
    Ok(())
}

/// A stopped session whose directory is missing shows as `missing`: it keeps its
/// disk, and `vibebox` in the moved directory, or `vibebox prune`, decides.
fn state_word(s: &Status, missing: bool) -> &'static str {
    if missing && s.state == State::Stopped {
        "missing"
    } else {
        s.state.as_str()
    }
}

const HEADERS: [&str; 5] = ["ID", "DIRECTORY", "STATE", "CLIENTS", "LAST ACTIVE"];

/// `COLUMNS` wins (scripts and tests set it); else the terminal's width when stdout is
/// one; else no limit.
fn terminal_width() -> Option<usize> {
    if let Some(n) = std::env::var("COLUMNS").ok().and_then(|v| v.parse().ok()) {
        return Some(n);
    }
    if std::io::stdout().is_terminal() {
        terminal_size::terminal_size().map(|(w, _)| w.0 as usize)
    } else {
        None
    }
}

/// "just now", "5 s ago", "2 min ago", "3 h ago", "4 days ago".
pub fn relative_time(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds();
    match secs {
        i64::MIN..=4 => "just now".to_string(),
        5..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        86_400..=172_799 => "1 day ago".to_string(),
        _ => format!("{} days ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times() {
        let now = Utc::now();
        let ago = |s| relative_time(now - chrono::Duration::seconds(s), now);
        assert_eq!(ago(0), "just now");
        assert_eq!(ago(-30), "just now");
        assert_eq!(ago(30), "30 s ago");
        assert_eq!(ago(150), "2 min ago");
        assert_eq!(ago(7200), "2 h ago");
        assert_eq!(ago(90_000), "1 day ago");
        assert_eq!(ago(3 * 86_400), "3 days ago");
    }
}
