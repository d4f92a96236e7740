//! `vibebox fetch`: the VM's branches come back to the host by review, never by
//! sharing. The guest commits into its own git layer (the host's `.git` is
//! read-only to it); the host pulls those commits over the session's SSH with the
//! guest's `git upload-pack`, into `refs/remotes/vibebox/<branch>`, where the user
//! reviews them like any other remote's. Host git runs none of the guest's hooks or
//! config: a fetch only receives objects and updates the refs named here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::ssh;

/// Where the VM's branches land in the host repository.
pub const REMOTE_PREFIX: &str = "refs/remotes/vibebox/";

/// At most this many commits are listed per branch.
const MAX_LOG: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "{0} is not a git repository on the host; `vibebox fetch` brings the VM's branches into the project's repository"
    )]
    NotARepo(PathBuf),
    #[error("git is not installed on the host: install git (`sudo apt install git`)")]
    NoGit,
    #[error(
        "fetching from the VM failed: {0}; is the project a git repository in the VM too (`vibebox exec -- git status`)?"
    )]
    Fetch(String),
    #[error("git {args} failed in {}: {message}", dir.display())]
    Git {
        args: String,
        dir: PathBuf,
        message: String,
    },
}

/// One branch of the VM that changed on the host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    /// The branch name in the VM (raw: git refuses control characters in ref
    /// names, but print it through [`escape`] anyway).
    pub name: String,
    /// None: new on the host.
    pub old: Option<String>,
    pub new: String,
    /// `git log --oneline` of the commits the host did not have before, newest
    /// first, at most [`MAX_LOG`] (raw guest text).
    pub log: Vec<String>,
    /// How many new commits there are in all.
    pub count: usize,
}

/// What one fetch changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetched {
    pub branches: Vec<Branch>,
    /// Branches gone from the VM, whose `vibebox/<branch>` was removed.
    pub deleted: Vec<String>,
}

/// Fetches every branch of the VM's repository at `project` (the same path in the
/// guest) over the session's ssh config, into `refs/remotes/vibebox/*` (pruning
/// branches deleted in the VM). The VM must be running.
pub fn fetch(project: &Path, ssh_config: &Path, alias: &str) -> Result<Fetched, FetchError> {
    ensure_repo(project)?;
    let before = refs(project)?;
    let ours = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        m.iter()
            .filter_map(|(r, o)| Some((r.strip_prefix(REMOTE_PREFIX)?.to_string(), o.clone())))
            .collect()
    };
    let url = format!("{alias}:{}", project.display());
    let refspec = format!("+refs/heads/*:{REMOTE_PREFIX}*");
    let out = host_git(project)
        .env(
            "GIT_SSH_COMMAND",
            format!(
                "ssh -F {} -o BatchMode=yes",
                ssh::shell_quote(&ssh_config.to_string_lossy())
            ),
        )
        .env("GIT_SSH_VARIANT", "ssh")
        .args([
            "fetch",
            "--quiet",
            "--prune",
            "--no-tags",
            "--no-recurse-submodules",
            "--no-write-fetch-head",
        ])
        .arg(&url)
        .arg(&refspec)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| FetchError::Fetch(e.to_string()))?;
    if !out.status.success() {
        return Err(FetchError::Fetch(escape(
            String::from_utf8_lossy(&out.stderr).trim(),
        )));
    }
    let after = refs(project)?;
    let (old, new) = (ours(&before), ours(&after));
    let known: Vec<String> = before.values().cloned().collect();
    let mut fetched = Fetched::default();
    for (name, oid) in &new {
        if old.get(name) == Some(oid) {
            continue;
        }
        let mut args = vec![
            "log".to_string(),
            "--no-decorate".into(),
            "--no-color".into(),
            "--format=%h %s".into(),
            oid.clone(),
        ];
        if !known.is_empty() {
            args.push("--not".into());
            args.extend(known.iter().cloned());
        }
        let log = git(
            project,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        let lines: Vec<String> = log.lines().map(String::from).collect();
        fetched.branches.push(Branch {
            name: name.clone(),
            old: old.get(name).cloned(),
            new: oid.clone(),
            count: lines.len(),
            log: lines.into_iter().take(MAX_LOG).collect(),
        });
    }
    fetched.deleted = old
        .keys()
        .filter(|n| !new.contains_key(*n))
        .cloned()
        .collect();
    Ok(fetched)
}

/// Fails unless host git works in `project`: checked before a VM is booted for
/// nothing.
pub fn ensure_repo(project: &Path) -> Result<(), FetchError> {
    if which::which("git").is_err() {
        return Err(FetchError::NoGit);
    }
    if git(project, &["rev-parse", "--git-dir"]).is_err() {
        return Err(FetchError::NotARepo(project.to_path_buf()));
    }
    Ok(())
}

/// Host git, kept away from whatever might run code: no hooks (the
/// reference-transaction hook runs on a fetch), no fsmonitor, and incoming objects
/// checked. Where `.git` is enforced read-only these are the user's own settings
/// anyway; where it is not, they may be the guest's.
fn host_git(project: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(project).args([
        "-c",
        "core.hooksPath=/dev/null",
        "-c",
        "core.fsmonitor=false",
        "-c",
        "transfer.fsckObjects=true",
        "-c",
        "protocol.ext.allow=never",
        "-c",
        "color.ui=false",
    ]);
    c.env("GIT_TERMINAL_PROMPT", "0");
    c
}

fn git(project: &Path, args: &[&str]) -> Result<String, FetchError> {
    let out = host_git(project)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|_| FetchError::NoGit)?;
    if !out.status.success() {
        return Err(FetchError::Git {
            args: args.first().copied().unwrap_or_default().to_string(),
            dir: project.to_path_buf(),
            message: escape(String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every ref of the host repository: name -> object id.
fn refs(project: &Path) -> Result<BTreeMap<String, String>, FetchError> {
    let text = git(
        project,
        &["for-each-ref", "--format=%(objectname) %(refname)"],
    )?;
    Ok(parse_refs(&text))
}

fn parse_refs(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (oid, name) = l.split_once(' ')?;
            Some((name.to_string(), oid.to_string()))
        })
        .collect()
}

/// Guest-made text (branch names, commit subjects) made safe for a terminal:
/// control characters (escape sequences could rewrite the screen or the title) and
/// bidirectional overrides (could reorder what is shown) are written as escapes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}');
        if c.is_control() && (c as u32) < 0x100 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else if c.is_control() || bidi {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

impl Fetched {
    /// What the user reads: each changed branch with its new commits, escaped.
    pub fn summary(&self) -> String {
        if self.branches.is_empty() && self.deleted.is_empty() {
            return "nothing new from the VM\n".to_string();
        }
        let mut out = String::new();
        for b in &self.branches {
            let name = escape(&b.name);
            let what = match (&b.old, b.count) {
                (None, 0) => "new branch, no commits the host lacks".to_string(),
                (None, 1) => "new branch, 1 new commit".to_string(),
                (None, n) => format!("new branch, {n} new commits"),
                (Some(_), 0) => "moved to commits the host already has".to_string(),
                (Some(_), 1) => "1 new commit".to_string(),
                (Some(_), n) => format!("{n} new commits"),
            };
            out.push_str(&format!("vibebox/{name}: {what}\n"));
            for l in &b.log {
                out.push_str(&format!("    {}\n", escape(l)));
            }
            if b.count > b.log.len() {
                out.push_str(&format!("    ... and {} more\n", b.count - b.log.len()));
            }
        }
        for d in &self.deleted {
            out.push_str(&format!(
                "vibebox/{}: deleted in the VM, removed\n",
                escape(d)
            ));
        }
        if let Some(b) = self.branches.first() {
            let name = escape(&b.name);
            out.push_str(&format!(
                "review with `git log -p ..vibebox/{name}`, take it with `git merge vibebox/{name}`\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_obey() {
        assert_eq!(
            escape("agent \u{1b}[31mtwo\u{7}"),
            "agent \\x1b[31mtwo\\x07"
        );
        assert_eq!(escape("tab\tcr\r"), "tab\\x09cr\\x0d");
        assert_eq!(escape("a\u{202e}b\u{9b}c"), "a\\u{202e}b\\x9bc");
        assert_eq!(escape("fix: é ünïcode ✓"), "fix: é ünïcode ✓");
    }

    #[test]
    fn refs_parse() {
        let m = parse_refs("abc refs/heads/main\ndef refs/remotes/vibebox/x y\n\nbad\n");
        assert_eq!(m["refs/heads/main"], "abc");
        assert_eq!(m["refs/remotes/vibebox/x y"], "def");
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn summary_names_branches_commits_and_deletions() {
        assert_eq!(Fetched::default().summary(), "nothing new from the VM\n");
        let f = Fetched {
            branches: vec![
                Branch {
                    name: "agent".into(),
                    old: None,
                    new: "1".into(),
                    log: vec!["abc1234 two \u{1b}[2J".into(), "def5678 one".into()],
                    count: 3,
                },
                Branch {
                    name: "main".into(),
                    old: Some("0".into()),
                    new: "2".into(),
                    log: vec![],
                    count: 0,
                },
            ],
            deleted: vec!["old".into()],
        };
        let s = f.summary();
        assert_eq!(
            s,
            "vibebox/agent: new branch, 3 new commits\n    abc1234 two \\x1b[2J\n    def5678 one\n    ... and 1 more\nvibebox/main: moved to commits the host already has\nvibebox/old: deleted in the VM, removed\nreview with `git log -p ..vibebox/agent`, take it with `git merge vibebox/agent`\n"
        );
    }
}
