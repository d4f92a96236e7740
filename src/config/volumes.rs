//! `[box] volumes`: project directories (build caches: `node_modules`, `target`,
//! `.venv`) that the guest keeps on its own disk, mounted over the shared tree so
//! their many small files never cross the share (5-50x slower than the disk).
//!
//! vibebox.toml is guest-writable, so each entry is checked as hostile text. The host
//! never touches the paths themselves: the guest creates and mounts them (see
//! `setup_volumes` in `images/guest/vibebox-init`), so a link planted in the project
//! can only misdirect a mount inside the guest, and the guest refuses that too.

use super::protect::{self, Glob};

/// A handful is what a project has; the bound keeps the guest's boot work small.
pub const MAX_VOLUMES: usize = 16;
const MAX_LEN: usize = 256;
const MAX_COMPONENTS: usize = 16;

/// Names the host reads in the project: a volume would hide them from the guest
/// and make the host's copy stale in its eyes.
const RESERVED: &[&str] = &[".git", ".vibebox", "vibebox.toml"];

/// Checks one entry; the error is the line's message (what is wrong, what to do).
/// `protected` is every protected-path glob (defaults and the user's).
pub fn check(v: &str, protected: &[Glob]) -> Result<(), String> {
    let plain = "write a path relative to the project, like \"node_modules\" or \"web/.venv\"";
    if v.is_empty() {
        return Err(format!("volume \"\" is empty; {plain}"));
    }
    if v.len() > MAX_LEN {
        return Err(format!(
            "volume {v:?} is longer than {MAX_LEN} bytes; {plain}"
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("volume {v:?} holds a control character; {plain}"));
    }
    if v.chars().any(crate::escape::is_format_char) {
        return Err(format!(
            "volume \"{}\" holds an invisible formatting character (bidi, zero-width); {plain}",
            crate::escape::escape(v)
        ));
    }
    if v.starts_with('/') || v.starts_with('~') {
        return Err(format!("volume {v:?} is absolute; {plain}"));
    }
    let parts: Vec<&str> = v.trim_end_matches('/').split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(format!(
            "volume {v:?} has an empty, \".\" or \"..\" component; {plain}"
        ));
    }
    if parts.len() > MAX_COMPONENTS {
        return Err(format!(
            "volume {v:?} has more than {MAX_COMPONENTS} components; {plain}"
        ));
    }
    if RESERVED.contains(&parts[0]) {
        return Err(format!(
            "volume {v:?} is vibebox's or git's own ({}); pick a build directory instead",
            parts[0]
        ));
    }
    if protect::covered(protected, &parts.join("/"))
        || protected.iter().any(|g| g.could_hold(&parts))
    {
        return Err(format!(
            "volume {v:?} is or holds a protected path; the host watches those, so they stay on the share"
        ));
    }
    Ok(())
}

/// The entry as stored: no trailing `/`.
pub fn normalize(v: &str) -> String {
    v.trim_end_matches('/').to_string()
}

/// Whether one volume is the other or lies inside it (mounted over each other, one
/// would hide the other).
pub fn overlap(a: &str, b: &str) -> bool {
    let inside = |x: &str, y: &str| x == y || x.starts_with(&format!("{y}/"));
    inside(a, b) || inside(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_pass_and_the_rest_is_refused_with_a_reason() {
        let globs = protect::default_globs();
        for ok in [
            "node_modules",
            "target",
            ".venv",
            "web/node_modules",
            "a b/é,\"x\"",
            "target/",
        ] {
            assert_eq!(check(ok, &globs), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("/abs", "absolute"),
            ("~/x", "absolute"),
            ("..", "\"..\""),
            ("a/../b", "\"..\""),
            ("./a", "\".\""),
            ("a//b", "empty,"),
            ("a\tb", "control"),
            ("a\nb", "control"),
            ("node\u{202e}x", "invisible"),
            (".git", "git's own"),
            (".git/objects", "git's own"),
            (".vibebox", "vibebox's"),
            ("vibebox.toml", "vibebox's"),
            (".vscode", "protected"),
            (".vscode/x", "protected"),
            (".claude", "protected"),
        ] {
            let e = check(bad, &globs).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(
            check(&"a/".repeat(20), &globs)
                .unwrap_err()
                .contains("components")
        );
        assert!(
            check(&"a".repeat(300), &globs)
                .unwrap_err()
                .contains("longer")
        );
        // A directory holding a user's protected glob is refused too.
        let user = vec![Glob::parse("web/.env").unwrap()];
        assert!(check("web", &user).unwrap_err().contains("protected"));
        assert!(check("web2", &user).is_ok());
    }

    #[test]
    fn nesting_is_overlap() {
        assert!(overlap("a", "a"));
        assert!(overlap("a", "a/b"));
        assert!(overlap("a/b", "a"));
        assert!(!overlap("a", "ab"));
        assert!(!overlap("web/a", "web/b"));
    }
}
