//! Mount specs (`host:guest[:ro|rw]`) and their resolution to absolute paths.
//!
//! Parsing and resolution are pure so that config validation and the explain text
//! agree with what the VM will really mount.

use std::path::{Component, Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Access {
    #[serde(rename = "ro")]
    ReadOnly,
    #[serde(rename = "rw")]
    ReadWrite,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::ReadOnly => "ro",
            Access::ReadWrite => "rw",
        }
    }
}

/// One entry of `[box] mounts` as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub host: String,
    pub guest: String,
    pub access: Access,
}

/// Agent configuration directories: a mount of one of these whose host path is
/// missing is skipped rather than refused, so one vibebox.toml works on machines
/// with and without that agent installed.
pub const OPTIONAL_HOST_PATHS: &[&str] = &["~/.claude", "~/.claude.json", "~/.codex"];

/// Guest directories a share must never cover: the guest would stop working, or the
/// share would shadow what vibebox-init writes there.
pub const SYSTEM_DIRS: &[&str] = &[
    "/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot", "/run",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("mount {0:?} has no guest path; write \"host:guest\" or \"host:guest:ro\"")]
    MissingGuest(String),
    #[error("mount {0:?} has an empty path; write \"host:guest\" or \"host:guest:ro\"")]
    EmptyPath(String),
    #[error("mount {spec:?}: unknown mode {mode:?}; use ro, rw, read-only or read-write")]
    BadMode { spec: String, mode: String },
    #[error("mount {0:?} has too many ':' (paths containing ':' are not supported)")]
    TooManyColons(String),
    #[error("mount {0:?} contains a control character (tab, newline); rename the path")]
    ControlChar(String),
    #[error("mount {0:?}: '..' is not allowed in a mount path; write the path it means")]
    DotDot(String),
    #[error(
        "mount {0:?} contains an invisible formatting character (bidi, zero-width); rename the path"
    )]
    FormatChar(String),
}

impl MountSpec {
    pub fn parse(spec: &str) -> Result<MountSpec, SpecError> {
        if spec.chars().any(char::is_control) {
            return Err(SpecError::ControlChar(spec.to_string()));
        }
        if spec.chars().any(crate::escape::is_format_char) {
            return Err(SpecError::FormatChar(spec.to_string()));
        }
        let mut parts: Vec<&str> = spec.split(':').collect();
        let mut access = Access::ReadWrite;
        if parts.len() >= 2 {
            match *parts.last().unwrap() {
                "ro" | "read-only" => access = Access::ReadOnly,
                "rw" | "read-write" => access = Access::ReadWrite,
                mode if parts.len() == 3 => {
                    return Err(SpecError::BadMode {
                        spec: spec.to_string(),
                        mode: mode.to_string(),
                    });
                }
                _ => {}
            }
            if parts.len() == 3 || (parts.len() == 2 && is_mode(parts[1])) {
                parts.pop();
            }
        }
        match parts.as_slice() {
            [_] => Err(SpecError::MissingGuest(spec.to_string())),
            [h, g] if h.is_empty() || g.is_empty() => Err(SpecError::EmptyPath(spec.to_string())),
            [h, g] => {
                if [h, g]
                    .iter()
                    .any(|p| Path::new(p).components().any(|c| c == Component::ParentDir))
                {
                    return Err(SpecError::DotDot(spec.to_string()));
                }
                Ok(MountSpec {
                    host: h.to_string(),
                    guest: g.to_string(),
                    access,
                })
            }
            _ => Err(SpecError::TooManyColons(spec.to_string())),
        }
    }

    pub fn is_optional(&self) -> bool {
        let host = self.host.trim_end_matches('/');
        OPTIONAL_HOST_PATHS.contains(&host)
    }
}

fn is_mode(s: &str) -> bool {
    matches!(s, "ro" | "rw" | "read-only" | "read-write")
}

/// Where a resolved mount came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The project directory itself, always first.
    Project,
    /// `[box] mounts`, with its position in the list.
    Config,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub host: PathBuf,
    pub guest: PathBuf,
    pub access: Access,
    pub origin: Origin,
    pub optional: bool,
}

/// Host and guest facts needed to turn specs into absolute paths.
#[derive(Debug, Clone)]
pub struct Homes<'a> {
    pub host_home: &'a Path,
    pub guest_home: &'a Path,
    pub project: &'a Path,
}

/// The project mount (same path on both sides, read-write) followed by the configured
/// ones, with `~` expanded on each side, relative host paths taken from the project
/// directory and relative guest paths from the guest home.
pub fn resolve(specs: &[MountSpec], homes: &Homes<'_>) -> Vec<Mount> {
    let mut out = vec![Mount {
        host: homes.project.to_path_buf(),
        guest: homes.project.to_path_buf(),
        access: Access::ReadWrite,
        origin: Origin::Project,
        optional: false,
    }];
    out.extend(specs.iter().map(|s| Mount {
        host: normalize(&expand(&s.host, homes.host_home, homes.project)),
        guest: normalize(&expand(&s.guest, homes.guest_home, homes.guest_home)),
        access: s.access,
        origin: Origin::Config,
        optional: s.is_optional(),
    }));
    out
}

fn expand(p: &str, home: &Path, base: &Path) -> PathBuf {
    if p == "~" {
        home.to_path_buf()
    } else if let Some(rest) = p.strip_prefix("~/") {
        home.join(rest)
    } else if p.starts_with('/') {
        PathBuf::from(p)
    } else {
        base.join(p)
    }
}

/// Lexical clean-up: drops `.` components and trailing slashes.
fn normalize(p: &Path) -> PathBuf {
    p.components().filter(|c| *c != Component::CurDir).collect()
}

/// Why a guest path cannot be used, if it cannot.
pub fn guest_path_problem(guest: &Path, guest_home: &Path) -> Option<String> {
    if guest == Path::new("/") {
        return Some("it would cover the guest's whole filesystem".into());
    }
    if let Some(dir) = SYSTEM_DIRS.iter().find(|d| guest.starts_with(d)) {
        return Some(format!(
            "it would cover the system directory {dir}; pick a path under ~ or /mnt"
        ));
    }
    if guest_home.starts_with(guest) {
        return Some(format!(
            "it would hide the guest home {} (and the SSH keys in it); mount into a subdirectory",
            guest_home.display()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> MountSpec {
        MountSpec::parse(s).unwrap()
    }

    #[test]
    fn parses_modes() {
        assert_eq!(spec("/a:/b").access, Access::ReadWrite);
        assert_eq!(spec("/a:/b:ro").access, Access::ReadOnly);
        assert_eq!(spec("/a:/b:read-only").access, Access::ReadOnly);
        assert_eq!(spec("/a:/b:read-write").access, Access::ReadWrite);
        assert_eq!(spec("~/x y,z:~/x y,z:rw").host, "~/x y,z");
    }

    #[test]
    fn rejects_malformed() {
        use SpecError::*;
        let err = |s| MountSpec::parse(s).unwrap_err();
        assert!(matches!(err("/a"), MissingGuest(_)));
        assert!(matches!(err("/a:ro"), MissingGuest(_)));
        assert!(matches!(err(":/b"), EmptyPath(_)));
        assert!(matches!(err("/a:"), EmptyPath(_)));
        assert!(matches!(err("/a:/b:rx"), BadMode { .. }));
        assert!(matches!(err("/a:/b:/c:ro"), TooManyColons(_)));
        assert!(matches!(err("/a\t:/b"), ControlChar(_)));
        assert!(matches!(err("/a:/b/../etc"), DotDot(_)));
        assert!(matches!(err("/a/../etc:/b"), DotDot(_)));
        assert!(matches!(err("/a\u{202e}b:/b"), FormatChar(_)));
    }

    #[test]
    fn resolves_homes_and_relative_paths() {
        let homes = Homes {
            host_home: Path::new("/Users/al"),
            guest_home: Path::new("/home/al"),
            project: Path::new("/Users/al/p"),
        };
        let m = resolve(
            &[
                spec("~/.gitconfig:~/.gitconfig:ro"),
                spec("data/:cache/./x"),
            ],
            &homes,
        );
        assert_eq!(m[0].origin, Origin::Project);
        assert_eq!(m[0].guest, Path::new("/Users/al/p"));
        assert_eq!(m[1].host, Path::new("/Users/al/.gitconfig"));
        assert_eq!(m[1].guest, Path::new("/home/al/.gitconfig"));
        assert_eq!(m[2].host, Path::new("/Users/al/p/data"));
        assert_eq!(m[2].guest, Path::new("/home/al/cache/x"));
    }

    #[test]
    fn guest_path_rules() {
        let home = Path::new("/home/al");
        assert!(guest_path_problem(Path::new("/"), home).is_some());
        assert!(guest_path_problem(Path::new("/etc"), home).is_some());
        assert!(guest_path_problem(Path::new("/usr/local/x"), home).is_some());
        assert!(guest_path_problem(Path::new("/home"), home).is_some());
        assert!(guest_path_problem(Path::new("/home/al"), home).is_some());
        assert!(guest_path_problem(Path::new("/home/al/x"), home).is_none());
        assert!(guest_path_problem(Path::new("/etcetera"), home).is_none());
        assert!(guest_path_problem(Path::new("/mnt/data"), home).is_none());
        assert!(spec("~/.claude:~/.claude").is_optional());
        assert!(!spec("~/.ssh:~/.ssh").is_optional());
    }
}
