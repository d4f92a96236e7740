//! Protected paths: project files that host tools run by themselves (`.envrc`,
//! `.vscode/`, ...). The defaults are data (`protect/defaults.toml`); the user adds
//! globs with `protect = [...]` in vibebox.toml, a grant approved like mounts, since
//! a guest that could drop one from the list could hide its change there.
//!
//! A glob is relative to the project: `/` separates components, `*` matches within
//! one component, `?` one character, `**` any number of components. A path is
//! protected when the glob matches it or a directory above it, so a directory is
//! protected with everything it holds.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::watched::{self, Accepted, Entry, Snapshot, WatchedError};

const DEFAULTS: &str = include_str!("../../protect/defaults.toml");

/// Longest glob accepted, in bytes and in components: the matcher's work is the
/// product of these and the path's, and vibebox.toml is guest-writable.
const MAX_GLOB_LEN: usize = 256;
const MAX_GLOB_COMPONENTS: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    paths: Vec<String>,
    git: Vec<String>,
}

fn defaults() -> Defaults {
    toml::from_str(DEFAULTS).expect("protect/defaults.toml parses (tested)")
}

/// The default protected paths, as globs.
pub fn default_globs() -> Vec<Glob> {
    defaults()
        .paths
        .iter()
        .map(|p| Glob::parse(p).expect("default globs are valid (tested)"))
        .collect()
}

/// What is watched in place of `.git` where the host cannot make it read-only.
pub fn git_globs() -> Vec<Glob> {
    defaults()
        .git
        .iter()
        .map(|p| Glob::parse(p).expect("git globs are valid (tested)"))
        .collect()
}

/// `protect_mode`: whether the host only watches the protected paths (the default:
/// the VM may edit them, every change is named on the host), or also makes the ones
/// that exist when the VM starts read-only to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Watch,
    Ro,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "watch" => Some(Mode::Watch),
            "ro" | "read-only" => Some(Mode::Ro),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Watch => "watch",
            Mode::Ro => "ro",
        }
    }
}

/// One validated glob.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Glob {
    text: String,
}

impl TryFrom<String> for Glob {
    type Error = String;
    fn try_from(s: String) -> Result<Glob, String> {
        Glob::parse(&s)
    }
}

impl From<Glob> for String {
    fn from(g: Glob) -> String {
        g.text
    }
}

impl std::fmt::Display for Glob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Glob {
    /// A glob relative to the project; a trailing `/` is allowed (a directory is
    /// protected with what it holds either way).
    pub fn parse(s: &str) -> Result<Glob, String> {
        let body = s.strip_suffix('/').unwrap_or(s);
        if body.is_empty() {
            return Err(format!(
                "protect entry {s:?} is empty; name a path in the project, e.g. \".envrc\" or \"scripts/*.sh\""
            ));
        }
        if s.len() > MAX_GLOB_LEN {
            return Err(format!("protect entry is longer than {MAX_GLOB_LEN} bytes"));
        }
        if body.starts_with('/') || body.starts_with('~') {
            return Err(format!(
                "protect entry {s:?} must be relative to the project (it protects files in it)"
            ));
        }
        let parts: Vec<&str> = body.split('/').collect();
        if parts.len() > MAX_GLOB_COMPONENTS {
            return Err(format!(
                "protect entry {s:?} has more than {MAX_GLOB_COMPONENTS} components"
            ));
        }
        for p in &parts {
            if p.is_empty() || *p == "." || *p == ".." {
                return Err(format!(
                    "protect entry {s:?} has an empty, `.` or `..` component; write a plain path below the project"
                ));
            }
            if p.contains("**") && *p != "**" {
                return Err(format!(
                    "protect entry {s:?}: `**` must be a whole component, as in \"a/**/b\""
                ));
            }
            if p.chars()
                .any(|c| c.is_control() || crate::escape::is_format_char(c))
            {
                return Err(format!(
                    "protect entry {:?} has control or invisible characters",
                    crate::escape::escape(s)
                ));
            }
        }
        Ok(Glob {
            text: s.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn parts(&self) -> impl Iterator<Item = &str> {
        self.text.strip_suffix('/').unwrap_or(&self.text).split('/')
    }

    /// The components before the first one with a wildcard: the only directory a
    /// walk for this glob has to start from.
    pub fn literal_prefix(&self) -> Vec<&str> {
        self.parts().take_while(|p| !is_wild(p)).collect()
    }

    /// Whether the glob has no wildcard at all (it names one path).
    pub fn is_literal(&self) -> bool {
        !self.parts().any(is_wild)
    }

    /// Whether the glob matches `path` (components of a relative path) exactly.
    pub fn matches(&self, path: &[&str]) -> bool {
        let pat: Vec<&str> = self.parts().collect();
        match_parts(&pat, path)
    }

    /// Whether something below `path` could match (so a walk must enter it).
    pub fn could_hold(&self, path: &[&str]) -> bool {
        let pat: Vec<&str> = self.parts().collect();
        match_below(&pat, path)
    }

    /// Whether `path` is a directory on the way to the glob's literal prefix.
    pub fn on_the_way(&self, path: &[&str]) -> bool {
        let pre = self.literal_prefix();
        path.len() < pre.len() && pre.starts_with(path)
    }

    /// Whether `path` is protected by this glob: it matches the path or a
    /// directory above it.
    pub fn covers(&self, path: &[&str]) -> bool {
        (1..=path.len()).any(|n| self.matches(&path[..n]))
    }
}

fn is_wild(p: &str) -> bool {
    p.contains(['*', '?'])
}

/// Component-wise match with `**`, by dynamic programming over (pattern, path)
/// positions: no backtracking blow-up, whatever the input.
fn match_parts(pat: &[&str], path: &[&str]) -> bool {
    // ok[j] = pat[i..] matches path[j..], computed for i from the end.
    let mut ok = vec![false; path.len() + 1];
    ok[path.len()] = true;
    for p in pat.iter().rev() {
        let mut next = vec![false; path.len() + 1];
        for j in (0..=path.len()).rev() {
            next[j] = if *p == "**" {
                ok[j] || (j < path.len() && next[j + 1])
            } else {
                j < path.len() && ok[j + 1] && match_component(p, path[j])
            };
        }
        ok = next;
    }
    ok[0]
}

/// Whether `pat` matches some path strictly below `path` (or `path` itself: the
/// answer only decides whether a walk enters it).
fn match_below(pat: &[&str], path: &[&str]) -> bool {
    // ok[j] = pat[i..] matches path[j..] followed by anything.
    let mut ok: Vec<bool> = (0..=path.len()).map(|j| j == path.len()).collect();
    for p in pat.iter().rev() {
        let mut next = vec![false; path.len() + 1];
        next[path.len()] = true;
        for j in (0..path.len()).rev() {
            next[j] = if *p == "**" {
                ok[j] || next[j + 1]
            } else {
                ok[j + 1] && match_component(p, path[j])
            };
        }
        ok = next;
    }
    ok[0]
}

/// `*` and `?` within one component, by the same kind of table.
fn match_component(pat: &str, name: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let mut ok = vec![false; n.len() + 1];
    ok[n.len()] = true;
    for &c in p.iter().rev() {
        let mut next = vec![false; n.len() + 1];
        for j in (0..=n.len()).rev() {
            next[j] = match c {
                '*' => ok[j] || (j < n.len() && next[j + 1]),
                '?' => j < n.len() && ok[j + 1],
                c => j < n.len() && n[j] == c && ok[j + 1],
            };
        }
        ok = next;
    }
    ok[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn g(s: &str) -> Glob {
        Glob::parse(s).unwrap()
    }
    fn split(s: &str) -> Vec<&str> {
        s.split('/').collect()
    }

    #[test]
    fn defaults_are_valid_and_name_the_usual_suspects() {
        let d: Vec<String> = default_globs().iter().map(|g| g.to_string()).collect();
        for p in [
            ".envrc",
            ".vscode/",
            ".idea/",
            ".claude/",
            ".mcp.json",
            ".devcontainer/",
        ] {
            assert!(d.contains(&p.to_string()), "{p}");
        }
        assert!(git_globs().iter().any(|g| g.as_str() == ".git/hooks/"));
        assert!(default_globs().iter().all(Glob::is_literal));
    }

    #[test]
    fn globs_match_like_a_shell() {
        assert!(g(".vscode/").covers(&split(".vscode/tasks.json")));
        assert!(g(".vscode/").covers(&split(".vscode")));
        assert!(!g(".vscode/").covers(&split(".vscode2/x")));
        assert!(g("scripts/*.sh").covers(&split("scripts/a.sh")));
        assert!(!g("scripts/*.sh").covers(&split("scripts/sub/a.sh")));
        assert!(g("**/*.sh").covers(&split("a.sh")));
        assert!(g("**/*.sh").covers(&split("x/y/a.sh")));
        assert!(g("a/**/b").covers(&split("a/b")));
        assert!(g("a/**/b").covers(&split("a/x/y/b/c")));
        assert!(g("?.txt").covers(&split("a.txt")));
        assert!(!g("?.txt").covers(&split("ab.txt")));
        assert_eq!(g("a/b*/c").literal_prefix(), vec!["a"]);
        assert_eq!(g(".vscode/").literal_prefix(), vec![".vscode"]);
    }

    #[test]
    fn bad_globs_are_refused() {
        for bad in [
            "",
            "/",
            "/etc/passwd",
            "~/.ssh",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a**",
            "a\u{202e}b",
            "a\nb",
        ] {
            assert!(Glob::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Glob::parse(&"a/".repeat(40)).is_err());
        assert!(Glob::parse(&"a".repeat(300)).is_err());
    }

    #[test]
    fn compare_names_each_change_but_not_a_bare_directory() {
        let file = |t: &str| Entry::File {
            sha256: t.into(),
            size: 1,
            executable: false,
            text: None,
        };
        let snap = |e: &[(&str, Entry)]| Snapshot {
            entries: e.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            ..Default::default()
        };
        let was = snap(&[
            (".claude", Entry::Dir),
            (".envrc", file("a")),
            (".idea", Entry::Dir),
        ]);
        let now = snap(&[
            (".claude", Entry::Link { target: "/".into() }),
            (".envrc", file("b")),
            (".vscode", Entry::Dir),
            (".vscode/t", file("c")),
        ]);
        let paths: Vec<String> = compare(&was, &now).into_iter().map(|c| c.path).collect();
        assert_eq!(paths, [".claude", ".envrc", ".vscode/t"]);
        assert!(compare(&now, &now).is_empty());
    }

    #[test]
    fn a_start_keeps_what_was_accepted_and_adds_new_globs() {
        let t = tempfile::tempdir().unwrap();
        let (sd, p) = (t.path().join("s"), t.path().join("p"));
        std::fs::create_dir_all(&sd).unwrap();
        std::fs::create_dir_all(p.join("tools")).unwrap();
        std::fs::write(p.join(".envrc"), "a\n").unwrap();
        std::fs::write(p.join("tools/x.sh"), "x\n").unwrap();
        let mut globs = default_globs();
        record_at_start(&sd, &p, &globs).unwrap();
        std::fs::write(p.join(".envrc"), "evil\n").unwrap();
        globs.push(g("tools/*.sh"));
        // Restarted with a new glob: the .envrc change stays, tools/x.sh is taken.
        record_at_start(&sd, &p, &globs).unwrap();
        let pending = changes(&sd, &p).unwrap().unwrap();
        let paths: Vec<&str> = pending.changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, [".envrc"]);
        assert!(pending.globs.contains(&"tools/*.sh".to_string()));
        std::fs::write(p.join("tools/x.sh"), "y\n").unwrap();
        assert_eq!(changes(&sd, &p).unwrap().unwrap().changes.len(), 2);
        accept(&sd, changes(&sd, &p).unwrap().unwrap()).unwrap();
        assert!(changes(&sd, &p).unwrap().unwrap().changes.is_empty());
        // The glob approved away: no longer watched.
        globs.pop();
        record_at_start(&sd, &p, &globs).unwrap();
        std::fs::write(p.join("tools/x.sh"), "z\n").unwrap();
        assert!(changes(&sd, &p).unwrap().unwrap().changes.is_empty());
    }

    /// The guest fills one protected directory past the limits: the others are
    /// still watched, what the walk did not reach is not "removed", and accepting
    /// keeps it recorded.
    #[test]
    fn a_filled_directory_hides_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let (sd, p) = (t.path().join("s"), t.path().join("p"));
        std::fs::create_dir_all(&sd).unwrap();
        std::fs::create_dir_all(p.join(".vscode")).unwrap();
        std::fs::create_dir_all(p.join(".claude")).unwrap();
        std::fs::write(p.join(".vscode/tasks.json"), "a\n").unwrap();
        std::fs::write(p.join(".claude/settings.json"), "s\n").unwrap();
        let globs = default_globs();
        record_at_start(&sd, &p, &globs).unwrap();
        // Deeper than the depth limit, and more entries than the entry limit,
        // all sorting before settings.json.
        let mut d = p.join(".claude/a");
        for _ in 0..40 {
            d = d.join("a");
        }
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..=watched::LIMITS.entries {
            std::fs::create_dir(p.join(format!(".claude/d{i:05}"))).unwrap();
        }
        std::fs::write(p.join(".envrc"), "evil\n").unwrap();
        std::fs::write(p.join(".vscode/tasks.json"), "b\n").unwrap();
        let pending = changes(&sd, &p).unwrap().unwrap();
        let got: Vec<(&str, bool)> = pending
            .changes
            .iter()
            .map(|c| (c.path.as_str(), c.now.is_some()))
            .collect();
        assert_eq!(got, [(".envrc", true), (".vscode/tasks.json", true)]);
        assert_eq!(pending.now.unchecked, [".claude"]);
        accept(&sd, pending).unwrap();
        // Later edits are still seen, in and out of the filled directory.
        std::fs::write(p.join(".vscode/tasks.json"), "c\n").unwrap();
        let paths = |sd: &std::path::Path| -> Vec<String> {
            changes(sd, &p)
                .unwrap()
                .unwrap()
                .changes
                .into_iter()
                .map(|c| c.path)
                .collect()
        };
        assert_eq!(paths(&sd), [".vscode/tasks.json"]);
        for i in 0..=watched::LIMITS.entries {
            std::fs::remove_dir(p.join(format!(".claude/d{i:05}"))).unwrap();
        }
        std::fs::write(p.join(".claude/settings.json"), "evil\n").unwrap();
        assert_eq!(paths(&sd), [".claude/settings.json", ".vscode/tasks.json"]);
    }

    /// Replacing a directory on the way to a watched path is named as what it
    /// became, not only as the watched paths gone.
    #[test]
    fn a_replaced_directory_on_the_way_is_named() {
        let t = tempfile::tempdir().unwrap();
        let (sd, p) = (t.path().join("s"), t.path().join("p"));
        std::fs::create_dir_all(&sd).unwrap();
        std::fs::create_dir_all(p.join(".git/hooks")).unwrap();
        std::fs::write(p.join(".git/config"), "[core]\n").unwrap();
        std::fs::create_dir_all(p.join("tools")).unwrap();
        std::fs::write(p.join("tools/x.sh"), "x\n").unwrap();
        let mut globs = git_globs();
        globs.push(g("tools/*.sh"));
        record_at_start(&sd, &p, &globs).unwrap();
        std::fs::rename(p.join(".git"), p.join("evil")).unwrap();
        std::fs::write(p.join(".git"), "gitdir: evil\n").unwrap();
        std::fs::rename(p.join("tools"), p.join("tools2")).unwrap();
        std::os::unix::fs::symlink("tools2", p.join("tools")).unwrap();
        let pending = changes(&sd, &p).unwrap().unwrap();
        let find = |path: &str| pending.changes.iter().find(|c| c.path == path).cloned();
        let git = find(".git").expect(".git named");
        assert_eq!(git.was, Some(Entry::Dir));
        assert!(
            matches!(&git.now, Some(Entry::File { text: Some(t), .. }) if t == "gitdir: evil\n"),
            "{git:?}"
        );
        let tools = find("tools").expect("tools named");
        assert_eq!(
            tools.now,
            Some(Entry::Link {
                target: "tools2".into()
            })
        );
    }

    /// The obvious exponential matcher, as the reference.
    fn naive(p: &[&str], s: &[&str]) -> bool {
        fn comp(p: &[char], n: &[char]) -> bool {
            match p.split_first() {
                None => n.is_empty(),
                Some(('*', rest)) => (0..=n.len()).any(|k| comp(rest, &n[k..])),
                Some(('?', rest)) => !n.is_empty() && comp(rest, &n[1..]),
                Some((c, rest)) => n.first() == Some(c) && comp(rest, &n[1..]),
            }
        }
        match p.split_first() {
            None => s.is_empty(),
            Some((&"**", rest)) => (0..=s.len()).any(|k| naive(rest, &s[k..])),
            Some((c, rest)) => {
                !s.is_empty()
                    && comp(
                        &c.chars().collect::<Vec<_>>(),
                        &s[0].chars().collect::<Vec<_>>(),
                    )
                    && naive(rest, &s[1..])
            }
        }
    }

    proptest! {
        #[test]
        fn matcher_agrees_with_the_reference(
            pat in prop::collection::vec("(\\*\\*|[ab*?]{1,4})", 1..5),
            path in prop::collection::vec("[ab]{1,4}", 0..6),
        ) {
            let text = pat.join("/");
            // `**` inside a component is refused by the parser, not matched.
            let Ok(glob) = Glob::parse(&text) else {
                prop_assert!(pat.iter().any(|p| p.contains("**") && p != "**"));
                return Ok(());
            };
            let p: Vec<&str> = pat.iter().map(String::as_str).collect();
            let s: Vec<&str> = path.iter().map(String::as_str).collect();
            prop_assert_eq!(glob.matches(&s), naive(&p, &s));
        }

        /// The walk enters every directory above a path a glob matches.
        #[test]
        fn could_hold_every_directory_above_a_match(
            pat in prop::collection::vec("(\\*\\*|[ab*?]{1,3})", 1..5),
            path in prop::collection::vec("[ab]{1,3}", 1..6),
        ) {
            let Ok(glob) = Glob::parse(&pat.join("/")) else { return Ok(()) };
            let s: Vec<&str> = path.iter().map(String::as_str).collect();
            if glob.matches(&s) {
                for n in 0..s.len() {
                    prop_assert!(glob.could_hold(&s[..n]), "{:?} {:?}", pat, &s[..n]);
                }
            }
        }

        /// Hostile text never panics the parser, and what it accepts stays
        /// inside the project.
        #[test]
        fn parse_is_total_and_safe(s in any::<String>()) {
            if let Ok(g) = Glob::parse(&s) {
                prop_assert!(!g.as_str().starts_with('/'));
                prop_assert!(g.parts().all(|p| p != ".." && !p.is_empty()));
            }
        }

        /// Many stars against a long name finish (no backtracking blow-up).
        #[test]
        fn stars_are_cheap(n in 1usize..60) {
            let pat = format!("{}b", "*a".repeat(n));
            let glob = Glob::parse(&pat).unwrap();
            let name = "a".repeat(200);
            prop_assert!(!glob.matches(&[name.as_str()]));
        }
    }
}

/// Everything watched for a project with `config`: the defaults, `.git`'s parts
/// when the host does not make `.git` read-only (`git_enforced` false), and the
/// user's globs.
pub fn watch_set(config: &crate::config::Config, git_enforced: bool) -> Vec<Glob> {
    let mut out = default_globs();
    if !git_enforced {
        out.extend(git_globs());
    }
    for g in &config.protect {
        if !out.contains(g) {
            out.push(g.clone());
        }
    }
    out
}

/// Whether one of `globs` protects `path` (a relative path, `/`-separated).
pub fn covered(globs: &[Glob], path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    globs.iter().any(|g| g.covers(&parts))
}

/// Whether `path` is recorded for `globs`: protected by one, or a directory on
/// the way to one's literal prefix (replacing it is a change).
pub fn recorded(globs: &[Glob], path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    globs
        .iter()
        .any(|g| g.covers(&parts) || g.on_the_way(&parts))
}

/// What `globs` cover in `project` now. The literal globs are walked first (the
/// hashing and text budgets are shared), each starting point with its own limits.
pub fn take(project: &std::path::Path, globs: &[Glob]) -> Snapshot {
    let mut ordered: Vec<&Glob> = globs.iter().filter(|g| g.is_literal()).collect();
    ordered.extend(globs.iter().filter(|g| !g.is_literal()));
    let starts: Vec<Vec<String>> = ordered
        .iter()
        .map(|g| g.literal_prefix().into_iter().map(String::from).collect())
        .collect();
    let covers = |parts: &[&str]| globs.iter().any(|g| g.covers(parts));
    let holds = |parts: &[&str]| globs.iter().any(|g| g.could_hold(parts));
    watched::snapshot(project, &starts, &covers, &holds, watched::LIMITS)
}

/// At a VM's start: the accepted snapshot, made from what is there now if there is
/// none yet, and extended by globs watched for the first time. What was accepted
/// before is kept as it is: a change the VM made in an earlier run and nobody
/// accepted stays named, the restart does not accept it.
pub fn record_at_start(
    session_dir: &std::path::Path,
    project: &std::path::Path,
    globs: &[Glob],
) -> Result<(), WatchedError> {
    let now = take(project, globs);
    let names: Vec<String> = globs.iter().map(|g| g.to_string()).collect();
    let accepted = match watched::read(session_dir)? {
        None => Accepted {
            globs: names,
            snapshot: now,
        },
        Some(old) => {
            let before: Vec<Glob> = old
                .globs
                .iter()
                .filter_map(|g| Glob::parse(g).ok())
                .collect();
            if before == globs {
                return Ok(());
            }
            // The approved globs changed: what stays watched keeps what was
            // accepted; what is watched for the first time is taken as it is.
            let mut entries: std::collections::BTreeMap<String, Entry> = old
                .snapshot
                .entries
                .into_iter()
                .filter(|(p, _)| recorded(globs, p))
                .collect();
            for (path, entry) in now.entries {
                if !recorded(&before, &path) {
                    entries.insert(path, entry);
                }
            }
            Accepted {
                globs: names,
                snapshot: Snapshot {
                    entries,
                    truncated: now.truncated,
                    unchecked: now.unchecked,
                    checked: now.checked,
                },
            }
        }
    };
    watched::write(session_dir, &accepted)
}

/// How one protected path differs from what was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub was: Option<Entry>,
    pub now: Option<Entry>,
}

/// The changes since the last acceptance, for the globs the accepted snapshot
/// was taken with (what the VM started with, approved; not the current
/// vibebox.toml, which the guest can edit to drop a glob). None when nothing
/// has been recorded for the session.
pub fn changes(
    session_dir: &std::path::Path,
    project: &std::path::Path,
) -> Result<Option<Pending>, WatchedError> {
    let Some(accepted) = watched::read(session_dir)? else {
        return Ok(None);
    };
    let globs: Vec<Glob> = accepted
        .globs
        .iter()
        .filter_map(|g| Glob::parse(g).ok())
        .collect();
    let now = take(project, &globs);
    // What accepting records: what was checked as it is now, and for what a
    // limit kept the walk from, what was accepted before.
    let mut record = now.clone();
    for (path, entry) in &accepted.snapshot.entries {
        if !now.reached(path) && !record.entries.contains_key(path) {
            record.entries.insert(path.clone(), entry.clone());
        }
    }
    Ok(Some(Pending {
        changes: compare(&accepted.snapshot, &now),
        now,
        record,
        globs: accepted.globs,
    }))
}

impl Pending {
    /// A digest of what accepting records (128 bits, like the approval digest:
    /// the guest writes what is digested, so a short one would let it search for
    /// a collision). The user names it to accept exactly what they reviewed.
    pub fn digest(&self) -> String {
        let text = serde_json::to_vec(&(&self.globs, &self.record)).expect("snapshots serialize");
        Sha256::digest(&text)[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The protected paths against what was accepted.
pub struct Pending {
    pub changes: Vec<Change>,
    /// The paths as they are now.
    pub now: Snapshot,
    /// What `accept` records: `now`, and the accepted entries `now` did not reach.
    pub record: Snapshot,
    pub globs: Vec<String>,
}

/// Every path added, removed or changed between two snapshots, in path order. A
/// directory that appears or goes is no change by itself (what it holds is named);
/// one that becomes a link or a file is. A path `now` did not reach (a limit
/// stopped the walk) is not checked, so not named as removed.
pub fn compare(was: &Snapshot, now: &Snapshot) -> Vec<Change> {
    let mut out = Vec::new();
    for (path, w) in &was.entries {
        match now.entries.get(path) {
            Some(n) if n.same(w) => {}
            None if !now.reached(path) => {}
            n => out.push(Change {
                path: path.clone(),
                was: Some(w.clone()),
                now: n.cloned(),
            }),
        }
    }
    for (path, n) in &now.entries {
        if !was.entries.contains_key(path) {
            out.push(Change {
                path: path.clone(),
                was: None,
                now: Some(n.clone()),
            });
        }
    }
    out.retain(|c| {
        !matches!(
            (&c.was, &c.now),
            (None, Some(Entry::Dir)) | (Some(Entry::Dir), None)
        )
    });
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Accepts the protected paths as they are now.
pub fn accept(session_dir: &std::path::Path, pending: Pending) -> Result<(), WatchedError> {
    watched::write(
        session_dir,
        &Accepted {
            globs: pending.globs,
            snapshot: pending.record,
        },
    )
}
