//! `vibebox.toml`: schema, defaults, validation.
//!
//! The file lives in the project directory, which the guest can write, so it is
//! untrusted input: parsed strictly (unknown keys are errors), bounded in size, never
//! followed through a symlink, and every error names the file, line and column.

pub mod approval;
pub mod protect;
pub mod volumes;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::net::policy::{Mode, Rule};
use crate::statefile;
use crate::vm::mounts::{self, Homes, Mount, MountSpec};

pub const DEFAULT_MEMORY_MB: u64 = 2048;
pub const DEFAULT_DISK_GB: u64 = 20;
pub const DEFAULT_AUTO_SHUTDOWN_MS: u64 = 30_000;
pub const DEFAULT_IMAGE: &str = "default";
/// An hour: longer than that is a VM left running by mistake.
const MAX_AUTO_SHUTDOWN_MS: i64 = 3_600_000;
const MIN_MEMORY_MB: i64 = 256;

/// Domains a coding agent commonly needs; written into a new vibebox.toml so the user
/// sees exactly what the VM may reach and edits it there.
pub const DEFAULT_ALLOWLIST: &[&str] = &[
    "deb.debian.org",
    "security.debian.org",
    "github.com",
    "**.github.com",
    "*.githubusercontent.com",
    "registry.npmjs.org",
    "pypi.org",
    "files.pythonhosted.org",
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    "api.anthropic.com",
    "api.openai.com",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Auto,
    Kvm,
    Hvf,
    Tcg,
}

impl Accel {
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "auto" => Some(Accel::Auto),
            "kvm" => Some(Accel::Kvm),
            "hvf" => Some(Accel::Hvf),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// The validated configuration of one project.
#[derive(Debug, Clone)]
pub struct Config {
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub image: String,
    pub accel: Accel,
    pub mounts: Vec<Mount>,
    pub network: Network,
    pub auto_shutdown_ms: u64,
    /// Save the VM at stop and resume it at the next start (`[supervisor] resume`).
    pub resume: bool,
    /// Globs the user added to the protected paths (the defaults are not here).
    pub protect: Vec<protect::Glob>,
    pub protect_mode: protect::Mode,
    /// Project-relative directories the guest keeps on its own disk (`[box] volumes`).
    pub volumes: Vec<String>,
    pub ports: Ports,
}

/// Guest TCP ports shown on the host's loopback (`[ports]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    /// Publish every port a guest process listens on (1024 and up, not SSH).
    pub auto: bool,
    /// Fixed mappings, published whether or not anything listens yet.
    pub publish: Vec<Publish>,
    /// Ports of this machine's loopback the VM may reach at `host.vibebox.internal`
    /// (a grant: approved like mounts).
    pub host: Vec<u16>,
}

/// One `publish` entry: a host port (on 127.0.0.1 unless another address is
/// given) -> a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Publish {
    pub addr: std::net::Ipv4Addr,
    pub host: u16,
    pub guest: u16,
}

impl Publish {
    /// `"3000"`, `"8080:80"` (host:guest) or `"ADDRESS:8080:80"`. An address other
    /// than loopback exposes the VM to the network around the host: the approval
    /// prompt names it.
    pub fn parse(s: &str) -> Result<Publish, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let port = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!(
                    "publish {s:?}: {p:?} is not a port (1 to 65535); write \"3000\" or \"8080:80\" (host:guest)"
                )),
            }
        };
        let loopback = std::net::Ipv4Addr::LOCALHOST;
        match parts[..] {
            [g] => Ok(Publish {
                addr: loopback,
                host: port(g)?,
                guest: port(g)?,
            }),
            [h, g] => Ok(Publish {
                addr: loopback,
                host: port(h)?,
                guest: port(g)?,
            }),
            [addr, h, g] => {
                let addr = match addr {
                    "localhost" => loopback,
                    a => a.parse().map_err(|_| {
                        format!(
                            "publish {s:?}: {a:?} is not an IPv4 address of this machine; write \"127.0.0.1:8080:80\" (or \"0.0.0.0:8080:80\" to expose the VM's port to your network)"
                        )
                    })?,
                };
                Ok(Publish {
                    addr,
                    host: port(h)?,
                    guest: port(g)?,
                })
            }
            _ => Err(format!(
                "publish {s:?} is not a mapping; write \"3000\" or \"8080:80\" (host:guest)"
            )),
        }
    }

    /// Whether only this machine can reach it.
    pub fn is_loopback(&self) -> bool {
        self.addr.is_loopback()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub mode: Mode,
    pub entries: Vec<Rule>,
}

/// Host facts validation depends on; passed in so validation stays pure.
#[derive(Debug, Clone)]
pub struct Host {
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub home: PathBuf,
    pub guest_home: PathBuf,
    /// The vibebox home as configured (not resolved): no mount may reach it, nor
    /// any directory on the way to it (see `pin_mounts`).
    pub state: PathBuf,
}

impl Host {
    pub fn detect(guest_home: PathBuf) -> Result<Host, crate::paths::Error> {
        let home = crate::paths::host_home()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let memory_mb = host_memory_mb().unwrap_or(u64::MAX);
        let disk_gb = nix::sys::statvfs::statvfs(&home)
            .map(|s| {
                #[allow(clippy::unnecessary_cast)] // u32 on macOS
                let blocks = s.blocks() as u64;
                blocks * s.fragment_size() / (1 << 30)
            })
            .unwrap_or(u64::MAX);
        let state = crate::store::paths::Home::from_env()?.root().to_path_buf();
        Ok(Host {
            cpus,
            memory_mb,
            disk_gb,
            home,
            guest_home,
            state,
        })
    }
}

fn host_memory_mb() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let info = nix::sys::sysinfo::sysinfo().ok()?;
        Some(info.ram_total() / (1 << 20))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let out = std::process::Command::new("sysctl")
            .args(["-n", "hw.memsize"])
            .output()
            .ok()?;
        let bytes: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        Some(bytes / (1 << 20))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}:{line}:{col}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{}: mount {}: {message}", path.display(), host.display())]
    Mount {
        path: PathBuf,
        host: PathBuf,
        message: String,
    },
    #[error(transparent)]
    File(#[from] statefile::Error),
    #[error(transparent)]
    Guest(#[from] crate::store::guestfile::GuestFileError),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(rename = "box", default)]
    box_: RawBox,
    network: Option<Spanned<RawNetwork>>,
    #[serde(default)]
    supervisor: RawSupervisor,
    #[serde(default)]
    ports: RawPorts,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPorts {
    auto: Option<bool>,
    publish: Option<Vec<Spanned<String>>>,
    host: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBox {
    cpus: Option<Spanned<i64>>,
    memory_mb: Option<Spanned<i64>>,
    disk_gb: Option<Spanned<i64>>,
    image: Option<Spanned<String>>,
    accel: Option<Spanned<String>>,
    mounts: Option<Vec<Spanned<String>>>,
    protect: Option<Vec<Spanned<String>>>,
    protect_mode: Option<Spanned<String>>,
    volumes: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    mode: Option<Spanned<String>>,
    entries: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSupervisor {
    auto_shutdown_ms: Option<Spanned<i64>>,
    resume: Option<bool>,
}

/// `vibebox.toml` is a few KiB; a bigger one is not a config anybody wrote.
const CONFIG_CAP: u64 = 1 << 20;

/// Reads and validates `path` (the project's `vibebox.toml`) as the guest-writable
/// file it is (see `store::guestfile`); a missing file gives the defaults.
pub fn load(path: &Path, project: &Path, host: &Host) -> Result<Config, Error> {
    let dir = path.parent().unwrap_or(project);
    let name = Path::new(path.file_name().unwrap_or_default());
    let mut config = match crate::store::guestfile::read(dir, name, CONFIG_CAP)? {
        Some(text) => parse(&text, path, project, host)?,
        None => parse("", path, project, host)?,
    };
    pin_mounts(&mut config, path, &host.state)?;
    Ok(config)
}

/// Mount sources are what they really are: each host path is replaced by its
/// canonical path (so a grant names a real directory, and a link changed later
/// changes the grant and asks again), and a source reached through a directory the
/// VM can write (the project, any rw mount) is refused: the guest could swap it for
/// a link to any host directory before the next start. Nor may a mount reach the
/// vibebox home (`state`): it holds every session's ssh key and the approvals, so a
/// VM reading it could log in to other VMs, and one writing it could approve its
/// own grants.
fn pin_mounts(config: &mut Config, path: &Path, state: &Path) -> Result<(), Error> {
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    // The home as written and where each directory on the way to it really is: a
    // mount holding any of them could swap a link on that way (`~/.vibebox` linked
    // to a bigger disk, `~` mounted rw) and hand the host a home the VM wrote.
    let guarded: Vec<PathBuf> = state
        .ancestors()
        .map(real)
        .chain(std::iter::once(state.to_path_buf()))
        .collect();
    let writable: Vec<(usize, PathBuf, PathBuf)> = config
        .mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| m.access == mounts::Access::ReadWrite)
        .map(|(i, m)| (i, m.host.clone(), real(&m.host)))
        .collect();
    for (i, m) in config.mounts.iter_mut().enumerate() {
        if m.origin == mounts::Origin::Project {
            continue;
        }
        let pinned = real(&m.host);
        if let Some(reached) = [&m.host, &pinned]
            .iter()
            .find_map(|p| reaches(p, state, &guarded))
        {
            return Err(Error::Mount {
                path: path.to_path_buf(),
                host: m.host.clone(),
                message: format!(
                    "it reaches the vibebox home {} ({}: every session's keys and the approvals); mount a directory that neither holds nor lies inside it",
                    state.display(),
                    reached
                ),
            });
        }
        if let Some((_, shown, _)) = writable.iter().find(|(j, lexical, canonical)| {
            *j != i
                && [&m.host, &pinned]
                    .iter()
                    .any(|p| p.starts_with(lexical) || p.starts_with(canonical))
        }) {
            return Err(Error::Mount {
                path: path.to_path_buf(),
                host: m.host.clone(),
                message: format!(
                    "its host path lies inside {}, which the VM can write (it could replace it with a link to any directory); mount a directory outside the project and outside read-write mounts",
                    shown.display()
                ),
            });
        }
        m.host = pinned;
    }
    Ok(())
}

/// How a mount source `p` reaches the vibebox home `state`, if it does: `p` lies
/// inside it (as written or resolved), or holds it or a directory on the way to it
/// (`guarded`: the home and each of its ancestors resolved, and the home as
/// written).
fn reaches(p: &Path, state: &Path, guarded: &[PathBuf]) -> Option<&'static str> {
    let home_real = guarded.first().map_or(state, |h| h.as_path());
    if p.starts_with(state) || p.starts_with(home_real) {
        return Some("it lies inside it");
    }
    guarded
        .iter()
        .any(|g| g.starts_with(p))
        .then_some("it holds it or a link on the way to it")
}

/// The config a project without `vibebox.toml` gets: the baseline of what a VM may
/// have without the host user approving anything (see `session::approval`).
pub fn defaults(project: &Path, host: &Host) -> Config {
    parse("", Path::new("vibebox.toml"), project, host)
        .expect("the empty config is valid for any project (tested)")
}

/// Parses and validates config text. `path` only labels errors.
pub fn parse(text: &str, path: &Path, project: &Path, host: &Host) -> Result<Config, Error> {
    let at = |span: std::ops::Range<usize>, message: String| {
        let (line, col) = crate::tomlpos::line_col(text, span.start);
        Error::Invalid {
            path: path.to_path_buf(),
            line,
            col,
            message,
        }
    };
    let raw: Raw = toml::from_str(text)
        .map_err(|e| at(e.span().unwrap_or(0..0), explain_toml_error(e.message())))?;

    let int =
        |v: &Option<Spanned<i64>>, default: u64, min: i64, max: u64, what: &str, fix: &str| match v
        {
            None => Ok(default),
            Some(s) => {
                let n = *s.get_ref();
                if n < min || n as u64 > max {
                    Err(at(
                        s.span(),
                        format!("{what} = {n} is out of range ({min} to {max}); {fix}"),
                    ))
                } else {
                    Ok(n as u64)
                }
            }
        };
    let b = &raw.box_;
    let cpus = int(
        &b.cpus,
        u64::from(host.cpus.min(2)),
        1,
        u64::from(host.cpus),
        "cpus",
        "this host has that many cores",
    )? as u32;
    let memory_mb = int(
        &b.memory_mb,
        DEFAULT_MEMORY_MB
            .min(host.memory_mb / 2)
            .max(MIN_MEMORY_MB as u64),
        MIN_MEMORY_MB,
        host.memory_mb,
        "memory_mb",
        "the upper bound is this host's memory",
    )?;
    let disk_gb = int(
        &b.disk_gb,
        DEFAULT_DISK_GB.min(host.disk_gb),
        1,
        host.disk_gb,
        "disk_gb",
        "the upper bound is the size of the disk holding your home directory",
    )?;
    let image = match &b.image {
        None => DEFAULT_IMAGE.to_string(),
        Some(s) => {
            let v = s.get_ref();
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
                && !v.starts_with('.');
            if !ok {
                return Err(at(
                    s.span(),
                    format!(
                        "image = {v:?} is not an image name; use \"default\" or a name from `vibebox image list`"
                    ),
                ));
            }
            v.clone()
        }
    };
    let accel = match &b.accel {
        None => Accel::Auto,
        Some(s) => Accel::parse(s.get_ref()).ok_or_else(|| {
            at(
                s.span(),
                format!(
                    "accel = {:?} is unknown; use \"auto\", \"kvm\", \"hvf\" or \"tcg\"",
                    s.get_ref()
                ),
            )
        })?,
    };

    let mut specs = Vec::new();
    let mut spans = Vec::new();
    for m in b.mounts.iter().flatten() {
        let spec = MountSpec::parse(m.get_ref()).map_err(|e| at(m.span(), e.to_string()))?;
        specs.push(spec);
        spans.push(m.span());
    }
    let homes = Homes {
        host_home: &host.home,
        guest_home: &host.guest_home,
        project,
    };
    let resolved = mounts::resolve(&specs, &homes);
    for (i, m) in resolved.iter().enumerate() {
        // Index 0 is the project mount, which has no line in the file.
        let span = if i == 0 { 0..0 } else { spans[i - 1].clone() };
        let label = if i == 0 {
            format!("the project directory {}", project.display())
        } else {
            format!("mount guest path {}", m.guest.display())
        };
        if let Some(problem) = mounts::guest_path_problem(&m.guest, &host.guest_home) {
            return Err(at(span, format!("{label} cannot be used: {problem}")));
        }
        if let Some(prev) = resolved[..i].iter().find(|p| p.guest == m.guest) {
            let what = if prev.origin == mounts::Origin::Project {
                "the project directory".to_string()
            } else {
                format!("another mount ({})", prev.host.display())
            };
            return Err(at(
                span,
                format!("{label} is also used by {what}; give each mount its own guest path"),
            ));
        }
    }

    let network = match &raw.network {
        None => Network {
            mode: Mode::Allowlist,
            entries: DEFAULT_ALLOWLIST
                .iter()
                .map(|e| Rule::parse(e).expect("default allowlist parses"))
                .collect(),
        },
        Some(n) => {
            let n_ref = n.get_ref();
            let mode = match &n_ref.mode {
                None => Mode::Allowlist,
                Some(s) => Mode::parse(s.get_ref()).ok_or_else(|| {
                    at(
                        s.span(),
                        format!(
                            "network mode {:?} is unknown; use \"allowlist\" or \"blocklist\"",
                            s.get_ref()
                        ),
                    )
                })?,
            };
            let mut entries = Vec::new();
            for e in n_ref.entries.iter().flatten() {
                entries.push(
                    Rule::parse(e.get_ref())
                        .map_err(|err| at(e.span(), format!("network entry {err}")))?,
                );
            }
            Network { mode, entries }
        }
    };

    let mut protect = Vec::new();
    for g in b.protect.iter().flatten() {
        let glob = protect::Glob::parse(g.get_ref()).map_err(|e| at(g.span(), e))?;
        if !protect.contains(&glob) {
            protect.push(glob);
        }
    }
    let protect_mode = match &b.protect_mode {
        None => protect::Mode::default(),
        Some(s) => protect::Mode::parse(s.get_ref()).ok_or_else(|| {
            at(
                s.span(),
                format!(
                    "protect_mode = {:?} is unknown; use \"watch\" or \"ro\"",
                    s.get_ref()
                ),
            )
        })?,
    };

    let mut volumes: Vec<String> = Vec::new();
    let all_protected: Vec<protect::Glob> = protect::default_globs()
        .into_iter()
        .chain(protect.iter().cloned())
        .collect();
    let project_guest = &resolved[0].guest;
    for v in b.volumes.iter().flatten() {
        volumes::check(v.get_ref(), &all_protected).map_err(|e| at(v.span(), e))?;
        let name = volumes::normalize(v.get_ref());
        if let Some(prev) = volumes.iter().find(|p| volumes::overlap(p, &name)) {
            return Err(at(
                v.span(),
                format!(
                    "volume {name:?} overlaps volume {prev:?}; keep one of them (each is mounted on its own)"
                ),
            ));
        }
        let guest = project_guest.join(&name);
        if let Some(m) = resolved[1..].iter().find(|m| {
            m.guest.starts_with(&guest)
                || (m.guest.starts_with(project_guest) && guest.starts_with(&m.guest))
        }) {
            return Err(at(
                v.span(),
                format!(
                    "volume {name:?} overlaps the mount at {}; give the mount a guest path outside it",
                    m.guest.display()
                ),
            ));
        }
        volumes.push(name);
    }
    if volumes.len() > volumes::MAX_VOLUMES {
        let span = b.volumes.iter().flatten().next_back().map(|v| v.span());
        return Err(at(
            span.unwrap_or(0..0),
            format!(
                "{} volumes is more than {}; keep the build directories that are heavy",
                volumes.len(),
                volumes::MAX_VOLUMES
            ),
        ));
    }

    let auto_shutdown_ms = int(
        &raw.supervisor.auto_shutdown_ms,
        DEFAULT_AUTO_SHUTDOWN_MS,
        0,
        MAX_AUTO_SHUTDOWN_MS as u64,
        "auto_shutdown_ms",
        "it is the wait in milliseconds before an unused VM stops",
    )?;

    let mut publish = Vec::new();
    for p in raw.ports.publish.iter().flatten() {
        let entry = Publish::parse(p.get_ref()).map_err(|e| at(p.span(), e))?;
        if let Some(prev) = publish
            .iter()
            .find(|q: &&Publish| q.host == entry.host || q.guest == entry.guest)
        {
            return Err(at(
                p.span(),
                format!(
                    "publish {:?} uses a port that \"{}:{}\" uses already; give each mapping its own ports",
                    p.get_ref(),
                    prev.host,
                    prev.guest
                ),
            ));
        }
        publish.push(entry);
    }
    let mut host_ports = Vec::new();
    for p in raw.ports.host.iter().flatten() {
        let text = p.get_ref();
        let port = text.strip_prefix("127.0.0.1:").unwrap_or(text);
        match port.parse::<u16>() {
            Ok(n) if n > 0 => {
                if !host_ports.contains(&n) {
                    host_ports.push(n);
                }
            }
            _ => {
                return Err(at(
                    p.span(),
                    format!(
                        "host {text:?}: the VM may reach only ports of this machine's loopback; write \"5432\" or \"127.0.0.1:5432\""
                    ),
                ));
            }
        }
    }
    host_ports.sort_unstable();
    let ports = Ports {
        auto: raw.ports.auto.unwrap_or(true),
        publish,
        host: host_ports,
    };

    Ok(Config {
        cpus,
        memory_mb,
        disk_gb,
        image,
        accel,
        ports,
        mounts: resolved,
        network,
        auto_shutdown_ms,
        resume: raw.supervisor.resume.unwrap_or(true),
        protect,
        protect_mode,
        volumes,
    })
}

/// Turns serde's "unknown field `x`, expected one of `a`, `b`" into a line with a
/// did-you-mean hint.
fn explain_toml_error(message: &str) -> String {
    let message = message.trim();
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((field, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = known
        .iter()
        .map(|k| (strsim::jaro_winkler(field, k), *k))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((_, k)) => format!("unknown key `{field}`; did you mean `{k}`?"),
        None => format!(
            "unknown key `{field}`; known keys here: {}",
            known.join(", ")
        ),
    }
}

/// The file the first `vibebox` in a directory writes: every setting shown with its
/// default, and the network allowlist spelled out so the user sees what the VM reaches.
pub fn default_file_text() -> String {
    let entries: String = DEFAULT_ALLOWLIST
        .iter()
        .map(|e| format!("  \"{e}\",\n"))
        .collect();
    format!(
        r#"# vibebox.toml: this project's VM. Commit it with the project.
# vibebox reads it when the VM starts; edits take effect at the next start.
# Reference: the "Configuration" section of vibebox's README.

[box]
# Virtual CPUs (default: 2, or fewer on a smaller host).
# cpus = 2
# Memory in MiB (default: 2048, or half the host's memory if that is less).
# memory_mb = {DEFAULT_MEMORY_MB}
# Disk size in GiB. The disk is sparse: only what the guest writes takes space.
# disk_gb = {DEFAULT_DISK_GB}
# Base image: "default" uses a cached image, else downloads, else builds one.
# image = "{DEFAULT_IMAGE}"
# Accelerator: "auto" (hvf on macOS, kvm on Linux, else the slow tcg), "kvm", "hvf", "tcg".
# accel = "auto"
# Extra shares, "host:guest[:ro|rw]" (default rw). `~` is your home on the host side and
# the guest user's home on the guest side. The project itself is always shared
# read-write at the same path as on the host.
# Sharing an agent's config (~/.claude, ~/.codex) saves logging in again in the VM, but
# lets the guest change settings your host agent will obey: share it only if you trust
# what runs in the VM. Those entries are skipped on machines where they do not exist.
mounts = [
  # "~/.gitconfig:~/.gitconfig:ro",
  # "~/.claude:~/.claude:rw",
  # "~/.codex:~/.codex:rw",
]
# Host tools run some project files by themselves (.envrc, .vscode/, .idea/, .claude/,
# .mcp.json, .devcontainer/): vibebox watches them and names every change the VM makes
# at your next vibebox command. Add your own globs ("scripts/*.sh", "tools/**"):
# protect = []
# "ro" also makes the protected paths that exist at the VM's start read-only to it.
# protect_mode = "watch"
# Build caches kept on the VM's own disk instead of the shared project, paths relative
# to it: much faster for many small files, kept across restarts, deleted with the
# session (`vibebox delete`). The host sees only an empty directory there.
# volumes = ["node_modules", "target", ".venv"]

[network]
# "allowlist": the VM reaches only the entries below. "blocklist": everything but them.
# Entries: "example.com" (that name), "*.example.com" (names below it),
# "**.example.com" (both); add ":port" for a port other than 80/443, e.g. "github.com:22".
mode = "allowlist"
entries = [
{entries}]

[supervisor]
# How long an unused VM (no terminal attached) keeps running before it shuts down.
# auto_shutdown_ms = {DEFAULT_AUTO_SHUTDOWN_MS}
# A stop saves the VM's state and the next start resumes it (seconds instead of a
# boot); false always shuts the guest down and boots it cold.
# resume = true

[ports]
# A port a process in the VM listens on (1024 and up) appears on this machine's
# 127.0.0.1 at the same port, or the next free one (`vibebox ports` lists them).
# auto = true
# Fixed mappings, "host:guest" or "port", on 127.0.0.1; "0.0.0.0:8080:80" would expose
# the VM's port to your network.
# publish = ["8080:80"]
# Services on this machine's 127.0.0.1 the VM may use, at host.vibebox.internal:<port>
# (a database, an MCP server). Nothing else on this machine is reachable.
# host = ["5432"]
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            cpus: 4,
            memory_mb: 8192,
            disk_gb: 100,
            home: "/home/al".into(),
            guest_home: "/home/al".into(),
            state: "/home/al/.vibebox".into(),
        }
    }

    fn load_text(text: &str) -> Result<Config, Error> {
        parse(text, Path::new("/p/vibebox.toml"), Path::new("/p"), &host())
    }

    fn err(text: &str) -> String {
        load_text(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_generated_file_agree() {
        let empty = load_text("").unwrap();
        let generated = load_text(&default_file_text()).unwrap();
        for c in [&empty, &generated] {
            assert_eq!(c.cpus, 2);
            assert_eq!(c.memory_mb, 2048);
            assert_eq!(c.disk_gb, 20);
            assert_eq!(c.accel, Accel::Auto);
            assert_eq!(c.auto_shutdown_ms, DEFAULT_AUTO_SHUTDOWN_MS);
            assert_eq!(c.mounts.len(), 1);
        }
        assert_eq!(empty.network, generated.network);
    }

    #[test]
    fn ports_are_loopback_mappings() {
        let c = load_text(
            "[ports]\nauto = false\npublish = [\"3000\", \"8080:80\", \"127.0.0.1:9000:9001\"]\n",
        )
        .unwrap();
        assert!(!c.ports.auto);
        assert_eq!(
            c.ports.publish,
            vec![
                Publish {
                    addr: std::net::Ipv4Addr::LOCALHOST,
                    host: 3000,
                    guest: 3000
                },
                Publish {
                    addr: std::net::Ipv4Addr::LOCALHOST,
                    host: 8080,
                    guest: 80
                },
                Publish {
                    addr: std::net::Ipv4Addr::LOCALHOST,
                    host: 9000,
                    guest: 9001
                },
            ]
        );
        assert!(load_text("").unwrap().ports.auto);
        let c = load_text("[ports]\npublish = [\"0.0.0.0:8080:80\"]\n").unwrap();
        assert!(!c.ports.publish[0].is_loopback());
        let e = err("[ports]\npublish = [\"example.com:8080:80\"]\n");
        assert!(
            e.contains(":2:12:") && e.contains("not an IPv4 address"),
            "{e}"
        );
        for bad in ["0", "70000", "a:b", "1:2:3:4", ""] {
            let e = err(&format!("[ports]\npublish = [{bad:?}]\n"));
            assert!(e.contains("publish"), "{bad}: {e}");
        }
        let e = err("[ports]\npublish = [\"3000\", \"3000:80\"]\n");
        assert!(e.contains("its own ports"), "{e}");
    }

    #[test]
    fn errors_have_line_and_column() {
        let e = err("[box]\ncpus = 0\n");
        assert!(
            e.starts_with("/p/vibebox.toml:2:8: cpus = 0 is out of range"),
            "{e}"
        );
        let e = err("[box]\n  cpu = 2\n");
        assert!(
            e.contains(":2:3:") && e.contains("did you mean `cpus`"),
            "{e}"
        );
        let e = err("[boxx]\n");
        assert!(e.contains("did you mean `box`"), "{e}");
    }

    #[test]
    fn absurd_sizes() {
        assert!(err("[box]\ncpus = 5").contains("cpus = 5 is out of range"));
        assert!(err("[box]\nmemory_mb = 0").contains("memory_mb = 0"));
        assert!(err("[box]\nmemory_mb = 9000").contains("out of range"));
        assert!(err("[box]\ndisk_gb = 0").contains("disk_gb = 0"));
        assert!(err("[box]\ndisk_gb = 101").contains("disk_gb = 101"));
        assert!(err("[box]\ncpus = -1").contains("cpus = -1"));
        assert!(err("[box]\ncpus = \"2\"").contains(":2:8:"));
        assert!(err("[supervisor]\nauto_shutdown_ms = -5").contains("auto_shutdown_ms"));
    }

    #[test]
    fn mount_errors() {
        let e = err("[box]\nmounts = [\"/a:/b\", \"/c\"]");
        assert!(e.contains(":2:20:") && e.contains("no guest path"), "{e}");
        let e = err("[box]\nmounts = [\"/a:/x\", \"/c:/x:ro\"]");
        assert!(
            e.contains(":2:20:") && e.contains("also used by another mount"),
            "{e}"
        );
        let e = err("[box]\nmounts = [\"/a:/p\"]");
        assert!(e.contains("also used by the project directory"), "{e}");
        let e = err("[box]\nmounts = [\"/a:~/x\", \"/b:/home/al/x\"]");
        assert!(e.contains("also used"), "{e}");
        for bad in [
            "/", "/proc", "/sys/x", "/dev", "/etc", "/usr", "/bin", "/lib", "/boot", "/run",
        ] {
            let e = err(&format!("[box]\nmounts = [\"/a:{bad}\"]"));
            assert!(e.contains("cannot be used"), "{bad}: {e}");
        }
        assert!(err("[box]\nmounts = [\"/a:/b:rx\"]").contains("unknown mode"));
    }

    #[test]
    fn volume_errors_name_the_line() {
        let c = load_text("[box]\nvolumes = [\"node_modules\", \"target/\", \".venv\"]").unwrap();
        assert_eq!(c.volumes, ["node_modules", "target", ".venv"]);
        assert!(load_text("").unwrap().volumes.is_empty());
        let e = err("[box]\nvolumes = [\"a\", \"../x\"]");
        assert!(e.contains(":2:17:") && e.contains("\"..\""), "{e}");
        let e = err("[box]\nvolumes = [\"/abs\"]");
        assert!(e.contains(":2:12:") && e.contains("absolute"), "{e}");
        let e = err("[box]\nvolumes = [\"web\", \"web/node_modules\"]");
        assert!(e.contains("overlaps volume \"web\""), "{e}");
        let e = err("[box]\nvolumes = [\"x\", \"x/\"]");
        assert!(e.contains("overlaps"), "{e}");
        let e = err("[box]\nmounts = [\"/a:/p/web/data\"]\nvolumes = [\"web\"]");
        assert!(
            e.contains(":3:") && e.contains("overlaps the mount at /p/web/data"),
            "{e}"
        );
        // A mount above the project does not overlap a volume in it.
        load_text("[box]\nmounts = [\"/a:/data\"]\nvolumes = [\"web\"]").unwrap();
        let e = err("[box]\nprotect = [\"web/.env\"]\nvolumes = [\"web\"]");
        assert!(e.contains("protected"), "{e}");
        let e = err("[box]\nvolumes = [\".git\"]");
        assert!(e.contains("git's own"), "{e}");
        let many: Vec<String> = (0..=volumes::MAX_VOLUMES)
            .map(|i| format!("\"v{i}\""))
            .collect();
        let e = err(&format!("[box]\nvolumes = [{}]", many.join(", ")));
        assert!(e.contains("more than 16"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn network_errors() {
        let e = err("[network]\nmode = \"open\"");
        assert!(e.contains(":2:8:") && e.contains("allowlist"), "{e}");
        for bad in [
            "*",
            "*.com",
            "https://x.com",
            "x.com/a",
            "x.com:ssh",
            "1.2.3.4",
        ] {
            let e = err(&format!("[network]\nentries = [\"{bad}\"]"));
            assert!(e.contains(":2:12: network entry"), "{bad}: {e}");
        }
        let c = load_text("[network]\nmode = \"blocklist\"\nentries = []").unwrap();
        assert_eq!(c.network.mode, Mode::Blocklist);
        assert!(c.network.entries.is_empty());
    }
}
