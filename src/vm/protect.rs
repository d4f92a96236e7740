//! Keeping the host's `.git` out of the guest's reach. Host tools execute what
//! `.git` holds (`core.fsmonitor`, hooks, filters) with the user's rights, so a
//! guest that could write it could run code on the host. The guest is root, so a
//! guest-side read-only mount is no protection: the process that serves the share
//! (each virtiofsd, or QEMU itself for 9p) runs in its own mount namespace in which
//! `.git` is bind-mounted read-only over itself. The guest then writes its own
//! commits into an overlay on its disk (see `vibebox-init`), and `vibebox fetch`
//! brings them back for review.

#[cfg(target_os = "linux")]
use std::ffi::CString;
use std::fs;
#[cfg(target_os = "linux")]
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::config::Config;
use crate::config::protect::{self, Glob};
use crate::store::watched::Entry;

/// How the protected paths are kept from the guest on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Guard {
    /// The share's server sees the paths through read-only bind mounts in its own
    /// mount namespace: no guest action can write them.
    Enforced,
    /// Nothing on the host stops a write (macOS, or no namespaces here).
    NotEnforced,
}

impl Guard {
    pub fn as_str(self) -> &'static str {
        match self {
            Guard::Enforced => "read-only (enforced on the host)",
            Guard::NotEnforced => {
                "NOT enforced: the guest can write it (no mount namespace for the share server on this host)"
            }
        }
    }
}

/// What protects the project's git metadata, decided once per boot; the explain
/// text and the launch use the same value, so what vibebox says is what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protection {
    /// `.git` (directory, or a worktree's `.git` file) and the git directories it
    /// points to, each existing on the host.
    pub paths: Vec<PathBuf>,
    pub guard: Guard,
    /// The project's `.git` when it is a directory the guest should see through an
    /// overlay on its own disk (so guest git can write).
    pub overlay: Option<PathBuf>,
    /// The other protected paths (see `config::protect`): every glob watched.
    pub watched: Vec<Glob>,
    /// With `protect_mode = "ro"` and `guard` enforced: the watched paths that
    /// existed at the start, read-only to the guest like `.git`.
    pub read_only: Vec<PathBuf>,
    /// With `protect_mode = "ro"`: files left watched because they have other hard
    /// links (a bind makes a path read-only, not the file: the VM could write it
    /// through another of its names).
    pub linked: Vec<PathBuf>,
    /// `protect_mode` as configured (what it achieved is in `read_only`).
    pub mode: protect::Mode,
}

/// At most this many paths are made read-only for globs: each is a mount in the
/// share server's namespace; past it, the rest are watched (explain says so).
const MAX_READ_ONLY: usize = 64;

impl Protection {
    /// The project's protection on this host. `as_root`: namespaces need no user
    /// namespace; otherwise they need unprivileged user namespaces.
    pub fn detect(project: &Path) -> Protection {
        #[cfg(target_os = "linux")]
        let guard = if nix::unistd::geteuid().is_root() || user_namespaces_work() {
            Guard::Enforced
        } else {
            Guard::NotEnforced
        };
        // No mount namespaces: nothing on the host can keep the guest from writing.
        #[cfg(not(target_os = "linux"))]
        let guard = Guard::NotEnforced;
        Protection::new(project, guard)
    }

    pub fn new(project: &Path, guard: Guard) -> Protection {
        let paths = git_paths(project);
        let dot = project.join(".git");
        let overlay = fs::symlink_metadata(&dot)
            .is_ok_and(|m| m.is_dir())
            .then_some(dot);
        Protection {
            paths,
            guard,
            overlay,
            watched: Vec::new(),
            read_only: Vec::new(),
            linked: Vec::new(),
            mode: protect::Mode::Watch,
        }
    }

    /// The project's whole protection for `config` on this host: `.git`, and the
    /// watched paths (with `.git`'s parts among them where `.git` is not
    /// enforced), made read-only where `protect_mode = "ro"` asks and the host can.
    pub fn for_config(project: &Path, config: &Config) -> Protection {
        Protection::detect(project).watching(project, config)
    }

    /// Adds the watched paths of `config` to a protection.
    pub fn watching(mut self, project: &Path, config: &Config) -> Protection {
        self.watched = protect::watch_set(config, self.guard == Guard::Enforced);
        self.mode = config.protect_mode;
        if config.protect_mode == protect::Mode::Ro && self.guard == Guard::Enforced {
            (self.read_only, self.linked) = read_only_paths(project, &self.watched);
        }
        self
    }

    /// How `glob` is protected, for the explain text.
    pub fn how(&self, project: &Path, glob: &Glob) -> Vec<PathBuf> {
        Protection::matching(project, glob, &self.read_only)
    }

    /// The files `glob` matches that were left watched for their other hard links.
    pub fn linked(&self, project: &Path, glob: &Glob) -> Vec<PathBuf> {
        Protection::matching(project, glob, &self.linked)
    }

    fn matching(project: &Path, glob: &Glob, paths: &[PathBuf]) -> Vec<PathBuf> {
        let parts = |p: &Path| -> Option<Vec<String>> {
            let rel = p.strip_prefix(project).ok()?;
            Some(
                rel.iter()
                    .map(|c| c.to_string_lossy().into_owned())
                    .collect(),
            )
        };
        paths
            .iter()
            .filter(|p| {
                parts(p).is_some_and(|v| {
                    let v: Vec<&str> = v.iter().map(String::as_str).collect();
                    glob.matches(&v)
                })
            })
            .cloned()
            .collect()
    }

    /// Makes `cmd` (a share server) run with the protected paths read-only, when
    /// enforced. Call it last: the closure runs after every earlier one. When
    /// enforced it always gives `cmd` a mount namespace of its own, even with
    /// nothing to protect: the share roots are bind-mounted there (`pin`).
    pub fn confine(&self, cmd: &mut Command) {
        #[cfg(target_os = "linux")]
        if self.guard == Guard::Enforced {
            let all: Vec<PathBuf> = self.paths.iter().chain(&self.read_only).cloned().collect();
            confine(cmd, &all, user_ids());
        }
        // Only Linux enforces (`detect`); anything else claiming to must not start.
        #[cfg(not(target_os = "linux"))]
        if self.guard == Guard::Enforced {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure makes no system call.
            unsafe {
                cmd.pre_exec(|| Err(std::io::ErrorKind::Unsupported.into()));
            }
        }
    }
}

/// The paths the globs match that exist now as directories or regular files (a
/// link is left to the watch: a bind mount would follow it), outermost first, none
/// inside another, at most `MAX_READ_ONLY`.
fn read_only_paths(project: &Path, globs: &[Glob]) -> (Vec<PathBuf>, Vec<PathBuf>) {
    // A literal glob is looked up directly, not through the capped walk: a
    // directory the guest filled cannot keep another path writable.
    let mut found: Vec<PathBuf> = globs
        .iter()
        .filter(|g| g.is_literal())
        .filter_map(|g| literal_path(project, &g.literal_prefix()))
        .collect();
    let wild: Vec<Glob> = globs.iter().filter(|g| !g.is_literal()).cloned().collect();
    if !wild.is_empty() {
        let snap = protect::take(project, &wild);
        for (rel, entry) in &snap.entries {
            let parts: Vec<&str> = rel.split('/').collect();
            if !wild.iter().any(|g| g.matches(&parts)) {
                continue;
            }
            if !matches!(entry, Entry::Dir | Entry::File { .. } | Entry::Large { .. }) {
                continue;
            }
            // Only names that are plain text: the key of any other is escaped.
            if rel.contains('\\') {
                continue;
            }
            found.push(project.join(rel));
        }
    }
    found.sort();
    let (found, linked): (Vec<PathBuf>, Vec<PathBuf>) = found
        .into_iter()
        .partition(|p| fs::symlink_metadata(p).is_ok_and(|m| !(m.is_file() && m.nlink() > 1)));
    let mut out: Vec<PathBuf> = Vec::new();
    for p in found {
        if out.iter().any(|k| p.starts_with(k)) {
            continue;
        }
        if out.len() == MAX_READ_ONLY {
            break;
        }
        out.push(p);
    }
    (out, linked)
}

/// `project/parts` when each directory on the way is a directory (no link) and it
/// is a directory or a regular file.
fn literal_path(project: &Path, parts: &[&str]) -> Option<PathBuf> {
    let mut p = project.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        p.push(part);
        let meta = fs::symlink_metadata(&p).ok()?;
        let last = i + 1 == parts.len();
        if !(meta.is_dir() || (last && meta.is_file())) {
            return None;
        }
    }
    Some(p)
}

/// `<project>/.git`, and for a worktree or submodule (`.git` is a file `gitdir: X`)
/// the git directory X and its common directory: host git reads config and hooks
/// from all of them. Only paths that exist; one inside another is left out (its
/// parent's read-only mount covers it).
pub fn git_paths(project: &Path) -> Vec<PathBuf> {
    let dot = project.join(".git");
    let Ok(meta) = fs::symlink_metadata(&dot) else {
        return Vec::new();
    };
    let mut out = vec![dot.clone()];
    if meta.is_file() {
        if let Some(gitdir) = fs::read_to_string(&dot)
            .ok()
            .and_then(|t| parse_gitdir(&t))
            .and_then(|g| project.join(g).canonicalize().ok())
        {
            if let Some(common) = fs::read_to_string(gitdir.join("commondir"))
                .ok()
                .and_then(|c| {
                    gitdir
                        .join(c.trim_end_matches(['\n', '\r']))
                        .canonicalize()
                        .ok()
                })
            {
                out.push(common);
            }
            out.push(gitdir);
        }
    } else if meta.is_symlink() {
        // A linked .git: protect what it points to (the link itself lives in the
        // share; README says so).
        if let Ok(target) = dot.canonicalize() {
            out.push(target);
        }
    }
    let mut kept: Vec<PathBuf> = Vec::new();
    for p in out {
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.retain(|k| !k.starts_with(&p));
            kept.push(p);
        }
    }
    kept
}

/// The path of a `.git` file's `gitdir: <path>` line.
pub fn parse_gitdir(text: &str) -> Option<PathBuf> {
    let line = text.lines().next()?;
    let path = line.strip_prefix("gitdir:")?.trim();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Whether this host lets an unprivileged process make a user and mount namespace
/// (Debian allows it by default; some hardened kernels do not). Tried in a child,
/// since a threaded process cannot unshare a user namespace.
#[cfg(target_os = "linux")]
fn user_namespaces_work() -> bool {
    let Ok(sh) = which::which("true") else {
        return false;
    };
    let mut cmd = Command::new(sh);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let probe = Path::new("/");
    confine(&mut cmd, &[probe.to_path_buf()], user_ids());
    cmd.status().is_ok_and(|s| s.success())
}

/// Who the share server runs as, when that needs a user namespace: None as root.
#[cfg(target_os = "linux")]
fn user_ids() -> Option<(u32, u32)> {
    let uid = nix::unistd::geteuid();
    (!uid.is_root()).then(|| (uid.as_raw(), nix::unistd::getegid().as_raw()))
}

/// Runs `cmd` in a new mount namespace in which each of `paths` is bind-mounted
/// read-only over itself. As a user, in a new user namespace too (the user's own
/// uid and gid mapped to themselves, so files keep belonging to the user); the
/// process loses every capability in that namespace at exec, so neither it nor
/// anything that drives it can undo the read-only mounts. A failure makes the spawn
/// fail: the share never starts unprotected.
#[cfg(target_os = "linux")]
fn confine(cmd: &mut Command, paths: &[PathBuf], user: Option<(u32, u32)>) {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    use std::os::unix::process::CommandExt;

    // Everything is prepared before the fork: the closure must not allocate.
    let targets: Vec<(CString, MsFlags)> = paths
        .iter()
        .filter_map(|p| {
            let c = CString::new(p.as_os_str().as_bytes()).ok()?;
            Some((c, locked_flags(p)))
        })
        .collect();
    let (uid, gid) = user.unwrap_or((0, 0));
    let (uid_map, gid_map) = (format!("{uid} {uid} 1\n"), format!("{gid} {gid} 1\n"));
    let no_path: Option<&std::ffi::CStr> = None;
    let write = |path: &std::ffi::CStr, data: &[u8]| -> std::io::Result<()> {
        use nix::fcntl::{OFlag, open};
        use nix::sys::stat::Mode;
        let fd = open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
        nix::unistd::write(&fd, data)?;
        Ok(())
    };
    // SAFETY: the closure only makes system calls on data prepared above.
    unsafe {
        cmd.pre_exec(move || {
            if user.is_none() {
                unshare(CloneFlags::CLONE_NEWNS)?;
            } else {
                unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)?;
                write(c"/proc/self/setgroups", b"deny")?;
                write(c"/proc/self/uid_map", uid_map.as_bytes())?;
                write(c"/proc/self/gid_map", gid_map.as_bytes())?;
            }
            // Nothing done here may reach the host's own mount table.
            mount(
                no_path,
                c"/",
                no_path,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                no_path,
            )?;
            for (target, locked) in &targets {
                let t = target.as_c_str();
                mount(
                    Some(t),
                    t,
                    no_path,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    no_path,
                )?;
                mount(
                    no_path,
                    t,
                    no_path,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | *locked,
                    no_path,
                )?;
            }
            Ok(())
        });
    }
}

/// The flags of the mount holding `path` that a remount must keep: in a user
/// namespace the kernel refuses to clear them (they are locked), so the read-only
/// remount restates them.
#[cfg(target_os = "linux")]
fn locked_flags(path: &Path) -> nix::mount::MsFlags {
    use nix::mount::MsFlags;
    use nix::sys::statvfs::{FsFlags, statvfs};
    let Ok(s) = statvfs(path) else {
        return MsFlags::empty();
    };
    let f = s.flags();
    let mut m = MsFlags::empty();
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(st) {
            m |= ms;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory the guest filled past the walk's limits does not keep the
    /// literal paths after it writable.
    #[test]
    fn read_only_paths_do_not_depend_on_the_walk() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        let mut d = p.join(".claude");
        for _ in 0..40 {
            d = d.join("a");
        }
        fs::create_dir_all(&d).unwrap();
        fs::create_dir_all(p.join(".vscode")).unwrap();
        fs::write(p.join(".envrc"), "x").unwrap();
        fs::write(p.join(".mcp.json"), "{}").unwrap();
        std::os::unix::fs::symlink("/etc", p.join(".idea")).unwrap();
        let (ro, _) = read_only_paths(p, &protect::default_globs());
        let names: Vec<&str> = ro
            .iter()
            .map(|x| x.strip_prefix(p).unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, [".claude", ".envrc", ".mcp.json", ".vscode"]);
    }

    #[test]
    fn gitdir_lines() {
        assert_eq!(
            parse_gitdir("gitdir: /w/main/.git/worktrees/x\n"),
            Some(PathBuf::from("/w/main/.git/worktrees/x"))
        );
        assert_eq!(
            parse_gitdir("gitdir: ../.git/modules/sub"),
            Some(PathBuf::from("../.git/modules/sub"))
        );
        assert_eq!(parse_gitdir("gitdir:   \n"), None);
        assert_eq!(parse_gitdir("ref: refs/heads/main\n"), None);
        assert_eq!(parse_gitdir(""), None);
    }

    #[test]
    fn paths_of_a_repo_a_worktree_and_no_repo() {
        let t = tempfile::tempdir().unwrap();
        let t = t.path().canonicalize().unwrap();
        let main = t.join("main");
        fs::create_dir_all(main.join(".git/worktrees/wt")).unwrap();
        fs::write(main.join(".git/worktrees/wt/commondir"), "../..\n").unwrap();
        assert_eq!(git_paths(&main), vec![main.join(".git")]);
        let p = Protection::new(&main, Guard::Enforced);
        assert_eq!(p.overlay, Some(main.join(".git")));

        let wt = t.join("wt");
        fs::create_dir_all(&wt).unwrap();
        fs::write(
            wt.join(".git"),
            format!("gitdir: {}\n", main.join(".git/worktrees/wt").display()),
        )
        .unwrap();
        // The worktree's gitdir lies inside the common dir, which covers it.
        assert_eq!(git_paths(&wt), vec![wt.join(".git"), main.join(".git")]);
        assert_eq!(Protection::new(&wt, Guard::Enforced).overlay, None);

        let sub = t.join("sub");
        fs::create_dir_all(t.join("modules/sub")).unwrap();
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(".git"), "gitdir: ../modules/sub\n").unwrap();
        assert_eq!(
            git_paths(&sub),
            vec![sub.join(".git"), t.join("modules/sub")]
        );

        let none = t.join("none");
        fs::create_dir_all(&none).unwrap();
        assert!(git_paths(&none).is_empty());
        assert_eq!(Protection::new(&none, Guard::Enforced).overlay, None);
    }

    #[test]
    fn ro_mode_binds_what_exists_and_leaves_links_and_the_rest_watched() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().canonicalize().unwrap();
        fs::create_dir_all(p.join(".vscode")).unwrap();
        fs::create_dir_all(p.join("tools")).unwrap();
        fs::write(p.join("tools/a.sh"), "x").unwrap();
        fs::write(p.join("tools/b.txt"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", p.join(".claude")).unwrap();
        let host = crate::config::Host {
            cpus: 2,
            memory_mb: 4096,
            disk_gb: 50,
            home: "/home/al".into(),
            guest_home: "/home/al".into(),
            state: "/home/al/.vibebox".into(),
        };
        let config =
            |text: &str| crate::config::parse(text, &p.join("vibebox.toml"), &p, &host).unwrap();
        let ro = config("[box]\nprotect_mode = \"ro\"\nprotect = [\"tools/*.sh\"]\n");
        let prot = Protection::new(&p, Guard::Enforced).watching(&p, &ro);
        assert_eq!(
            prot.read_only,
            vec![p.join(".vscode"), p.join("tools/a.sh")]
        );
        let glob = |s: &str| Glob::parse(s).unwrap();
        assert_eq!(
            prot.how(&p, &glob("tools/*.sh")),
            vec![p.join("tools/a.sh")]
        );
        assert!(prot.how(&p, &glob(".claude/")).is_empty());
        // A file with another hard link is not bound: the VM could write it
        // through the other name. It stays watched, and explain says why.
        fs::write(p.join(".envrc"), "x").unwrap();
        fs::hard_link(p.join(".envrc"), p.join("other")).unwrap();
        fs::hard_link(p.join("tools/a.sh"), p.join("other2")).unwrap();
        let linked = Protection::new(&p, Guard::Enforced).watching(&p, &ro);
        assert_eq!(linked.read_only, vec![p.join(".vscode")]);
        assert_eq!(linked.linked, vec![p.join(".envrc"), p.join("tools/a.sh")]);
        assert_eq!(linked.linked(&p, &glob(".envrc")), vec![p.join(".envrc")]);
        fs::remove_file(p.join("other")).unwrap();
        fs::remove_file(p.join("other2")).unwrap();
        fs::remove_file(p.join(".envrc")).unwrap();
        assert!(!prot.watched.iter().any(|g| g.as_str() == ".git/config"));
        // Where the host cannot enforce, nothing is bound and .git is watched.
        let prot = Protection::new(&p, Guard::NotEnforced).watching(&p, &ro);
        assert!(prot.read_only.is_empty());
        assert!(prot.watched.iter().any(|g| g.as_str() == ".git/config"));
        // Watch mode binds nothing.
        let prot = Protection::new(&p, Guard::Enforced).watching(&p, &config(""));
        assert!(prot.read_only.is_empty());
        assert_eq!(prot.watched.len(), protect::default_globs().len());
    }

    /// The mechanism itself, without a VM: a process confined like a share server
    /// cannot write, create, rename or delete under the protected path, and its
    /// parent can still write next to it. As root, and (when the host allows user
    /// namespaces) as an unprivileged user.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_confined_process_cannot_write_git() {
        if !cfg!(target_os = "linux") || !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root on Linux");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("proj");
        fs::create_dir_all(p.join(".git/hooks")).unwrap();
        fs::write(p.join(".git/config"), "[core]\n").unwrap();
        let run = |uid: Option<u32>| {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(
                "echo x >> .git/config; echo x > .git/hooks/post-checkout; mv .git .moved; rm -f .git/config; echo ok > free.txt",
            );
            cmd.current_dir(&p);
            if let Some(u) = uid {
                use std::os::unix::process::CommandExt;
                cmd.uid(u).gid(u);
                // Dropping root made the child non-dumpable, which leaves its
                // /proc/self/uid_map root's; a user's supervisor never changed uid.
                unsafe {
                    cmd.pre_exec(|| Ok(nix::sys::prctl::set_dumpable(true)?));
                }
            }
            confine(&mut cmd, &[p.join(".git")], uid.map(|u| (u, u)));
            cmd.output()
        };
        let out = run(None).unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            fs::read_to_string(p.join(".git/config")).unwrap(),
            "[core]\n"
        );
        assert!(!p.join(".git/hooks/post-checkout").exists());
        assert!(!p.join(".moved").exists());
        assert_eq!(fs::read_to_string(p.join("free.txt")).unwrap(), "ok\n");
        // The host's own mount table is untouched.
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(&p.join(".git").display().to_string()));

        // Unprivileged: the user owns the project, as in real use.
        use std::os::unix::fs::{PermissionsExt, chown};
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
        for d in [
            &p,
            &p.join(".git"),
            &p.join(".git/hooks"),
            &p.join(".git/config"),
        ] {
            chown(d, Some(65534), Some(65534)).unwrap();
        }
        fs::remove_file(p.join("free.txt")).unwrap();
        let out = match run(Some(65534)) {
            Ok(out) => out,
            Err(e) => {
                eprintln!("no unprivileged user namespaces here: {e}");
                return;
            }
        };
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            fs::read_to_string(p.join(".git/config")).unwrap(),
            "[core]\n"
        );
        assert!(!p.join(".git/hooks/post-checkout").exists());
        assert_eq!(fs::read_to_string(p.join("free.txt")).unwrap(), "ok\n");
    }
}
