//! `vibebox list`: every session, newest first.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Error;
use crate::paths::Home;
use crate::session::delete::is_missing;
use crate::session::tasks;
use crate::store::index::{Entry, Index};
use crate::supervisor::{self, State, Status};

/// One row: the entry, its VM's state, whether its directory is missing, and its
/// running tasks (`None`: a running VM that did not answer in time).
type Row<'a> = (&'a Entry, Status, bool, Option<u32>);

/// All running VMs together get this long to say how many tasks they run
/// (`VIBEBOX_LIST_TASKS_WAIT_MS` for tests on a loaded host).
fn tasks_wait() -> Duration {
    std::env::var("VIBEBOX_LIST_TASKS_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(3), Duration::from_millis)
}

/// A `--json` item, serialised straight from the rows (no intermediate values: a
/// list of 10,000 sessions stays fast).
#[derive(serde::Serialize)]
struct Item<'a> {
    id: String,
    directory: &'a std::path::Path,
    state: &'static str,
    missing: bool,
    clients: u32,
    /// Running tasks; null for a running VM that did not answer in time.
    tasks: Option<u32>,
    last_active: String,
}

/// Only looks: no lock, no write, no project file read, nothing stopped or removed,
/// nothing booted; a running VM is asked how many tasks it runs, all of them at once
/// within 3 s, without counting as a client.
pub fn run(home: &Home, as_json: bool) -> Result<(), Error> {
    let index = Index::snapshot(home)?;
    let live = supervisor::live_sessions(home);
    let stopped = Status {
        state: State::Stopped,
        clients: 0,
    };
    let entries = index.entries();
    let missing = missing_flags(entries);
    let mut rows: Vec<Row<'_>> = entries
        .iter()
        .zip(missing)
        .map(|(e, missing)| {
            let status = if live.contains(&e.id) {
                supervisor::status(&home.session(e.id))
            } else {
                stopped
            };
            (e, status, missing, Some(0))
        })
        .collect();
    let asked: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].1.state == State::Running)
        .collect();
    if !asked.is_empty() {
        let sds: Vec<_> = asked.iter().map(|&i| home.session(rows[i].0.id)).collect();
        for (i, n) in asked
            .into_iter()
            .zip(tasks::running_counts(&sds, tasks_wait()))
        {
            rows[i].3 = n;
        }
    }
    // Ties within a second fall back to the id: UUIDv7 ids sort by creation time.
    rows.sort_unstable_by_key(|(e, _, _, _)| std::cmp::Reverse((e.last_active, e.id)));

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if as_json {
        let items: Vec<Item<'_>> = rows
            .iter()
            .map(|(e, s, missing, tasks)| Item {
                id: e.id.to_string(),
                directory: &e.directory,
                state: state_word(s, *missing),
                missing: *missing,
                clients: s.clients,
                tasks: *tasks,
                last_active: e
                    .last_active
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            })
            .collect();
        super::write_json(&mut out, &items)?;
        out.flush()?;
        return Ok(());
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
        .map(|(e, s, missing, tasks)| {
            vec![
                e.id.to_string(),
                crate::escape::escape(&e.directory.display().to_string()).into_owned(),
                state_word(s, *missing).to_string(),
                s.clients.to_string(),
                tasks.map_or_else(|| "?".to_string(), |n| n.to_string()),
                relative_time(e.last_active, now),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        super::table::render(&HEADERS, &table, terminal_width().map(|w| (w, 1)))
    )?;
    out.flush()?;
    Ok(())
}

/// Whether each entry's directory is missing. One `stat` per project is most of
/// what a long list costs, so a long list spreads them over the cores.
fn missing_flags(entries: &[Entry]) -> Vec<bool> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if threads < 2 || entries.len() < 512 {
        return entries.iter().map(is_missing).collect();
    }
    let chunk = entries.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = entries
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(is_missing).collect::<Vec<bool>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("a stat does not panic"))
            .collect()
    })
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

const HEADERS: [&str; 6] = [
    "ID",
    "DIRECTORY",
    "STATE",
    "CLIENTS",
    "TASKS",
    "LAST ACTIVE",
];

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
