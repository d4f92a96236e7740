//! The explain text: what this VM can see and reach. The host prints it (`vibebox
//! explain`) and the guest prints the same text (`:explain`), so it is a pure function
//! of the resolved config.

use std::path::Path;

use serde_json::json;

use crate::config::Config;
use crate::paths::{CACHE_DIR, CONFIG_FILE};
use crate::store::SessionId;
use crate::vm::mounts::{Mount, Origin};
use crate::vm::protect::{Guard, Protection};

/// Everything the explain text depends on.
pub struct Facts<'a> {
    pub project: &'a Path,
    pub session: Option<SessionId>,
    pub config: &'a Config,
    /// One per `config.mounts`: whether the host path exists.
    pub present: &'a [bool],
    pub protection: &'a Protection,
}

const ENFORCED_ALLOW: &str = "enforced on the host: DNS answers only these names, and a connection must name one of them (TLS SNI or HTTP Host) at an address the host resolved for it; ports other than 80 and 443 only where an entry names them; denials are logged in the session's network.log";
const ENFORCED_BLOCK: &str = "enforced on the host: these names do not resolve and connections naming them are refused; every other connection must still name its server (TLS SNI or HTTP Host) at an address the host resolved for it; denials are logged in the session's network.log";

fn mount_note(m: &Mount, present: bool) -> Option<&'static str> {
    match (m.origin == Origin::Project, present, m.optional) {
        (true, _, _) => Some("the project"),
        (false, false, true) => Some("skipped: not on this host"),
        (false, false, false) => Some("missing on the host: the VM will not start"),
        _ => None,
    }
}

pub fn text(f: &Facts<'_>) -> String {
    let mut out = String::new();
    out.push_str(&format!("Project {}", f.project.display()));
    if let Some(id) = f.session {
        out.push_str(&format!(" (session {id})"));
    }
    out.push_str("\n\nMounts (host -> guest):\n");
    for (m, &present) in f.config.mounts.iter().zip(f.present) {
        out.push_str(&format!(
            "  {} -> {}  {}",
            m.host.display(),
            m.guest.display(),
            m.access.as_str()
        ));
        if let Some(note) = mount_note(m, present) {
            out.push_str(&format!("  ({note})"));
        }
        out.push('\n');
    }
    out.push_str(&volumes_text(f.project, &f.config.volumes));
    out.push_str(&protected_text(f.protection));
    out.push_str(&watched_text(f.project, f.protection));
    let net = &f.config.network;
    out.push_str(&format!("\nNetwork: {}", net.mode.as_str()));
    // Every VM vibebox starts has its network behind the gateway.
    let how = match net.mode {
        crate::net::policy::Mode::Allowlist => ENFORCED_ALLOW,
        crate::net::policy::Mode::Blocklist => ENFORCED_BLOCK,
    };
    out.push_str(&format!(" ({how})"));
    out.push('\n');
    if net.entries.is_empty() {
        out.push_str(match net.mode {
            crate::net::policy::Mode::Allowlist => "  (no entries: nothing is allowed)\n",
            crate::net::policy::Mode::Blocklist => "  (no entries: nothing is blocked)\n",
        });
    }
    for e in &net.entries {
        out.push_str(&format!("  {e}\n"));
    }
    out.push_str(&ports_text(&f.config.ports));
    out.push_str(&format!(
        "\nStorage (relative to the project):\n  {:<13} configuration (commit it)\n  {:<13} this session's marker (deleting it deletes the session, VM disk included)\n",
        CONFIG_FILE,
        format!("{CACHE_DIR}/")
    ));
    // Decided by who runs vibebox, like the protection: the launch uses the same.
    out.push_str(&ownership_text(crate::vm::ownership::Model::detect()));
    out
}

/// The user must know that what a build writes there never reaches the host.
fn volumes_text(project: &Path, volumes: &[String]) -> String {
    if volumes.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nVolumes (on the VM's own disk, over the project; the host sees an empty directory, `vibebox delete` removes them):\n",
    );
    for v in volumes {
        out.push_str(&format!("  {}\n", project.join(v).display()));
    }
    out
}

/// Both directions across the host's loopback: what of the VM this machine's
/// programs reach, and what of this machine the VM reaches.
fn ports_text(p: &crate::config::Ports) -> String {
    let mut out = String::from("\nPorts (`vibebox ports` lists what is published now):\n");
    if p.auto {
        out.push_str("  VM -> this machine: every port a process in the VM listens on (1024 and up) appears on 127.0.0.1 here\n");
    } else {
        out.push_str("  VM -> this machine: only the mappings below (auto = false)\n");
    }
    for m in &p.publish {
        out.push_str(&format!("  localhost:{} -> VM:{}\n", m.host, m.guest));
    }
    if p.host.is_empty() {
        out.push_str("  this machine -> VM: nothing (no [ports] host grant)\n");
    } else {
        for port in &p.host {
            out.push_str(&format!(
                "  VM host.vibebox.internal:{port} -> this machine's 127.0.0.1:{port} (granted)\n"
            ));
        }
    }
    out
}

/// Host git runs what `.git` holds (hooks, `core.fsmonitor`) with the user's rights,
/// so the user must know whether the VM can write it, and how commits come back.
fn protected_text(p: &Protection) -> String {
    if p.paths.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nGit metadata (host git runs what it holds):\n");
    for path in &p.paths {
        out.push_str(&format!("  {}  {}\n", path.display(), p.guard.as_str()));
    }
    if p.overlay.is_some() {
        out.push_str("  In the VM, git writes (commit, branch, stash) go to a layer on the VM's disk;\n  on the host, `vibebox fetch` brings the VM's branches as vibebox/<branch> for review.\n");
    }
    out
}

const WATCHED: &str =
    "watched: the VM can change it; vibebox names each change at your next vibebox command";

/// What each protected path is, read-only or watched: the user decides what to
/// trust by it.
fn watched_text(project: &Path, p: &Protection) -> String {
    if p.watched.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nProtected paths (host tools run them by themselves; `vibebox protected` shows changes):\n",
    );
    for (glob, how) in watched_lines(project, p) {
        out.push_str(&format!("  {glob}  {how}\n"));
    }
    out
}

fn watched_lines(project: &Path, p: &Protection) -> Vec<(String, String)> {
    p.watched
        .iter()
        .map(|g| {
            let ro = p.how(project, g);
            let asked = p.mode == crate::config::protect::Mode::Ro;
            let how = if !ro.is_empty() && g.is_literal() {
                "read-only (enforced on the host)".to_string()
            } else if !ro.is_empty() {
                format!(
                    "read-only (enforced on the host) for what matched at the start ({}); anything new is {WATCHED}",
                    ro.len()
                )
            } else if asked && !p.linked(project, g).is_empty() {
                format!(
                    "{WATCHED} (it has other hard links: a read-only bind would leave it writable through them)"
                )
            } else if asked && p.guard == Guard::NotEnforced {
                format!("{WATCHED} (protect_mode = \"ro\" cannot be enforced on this host)")
            } else if asked {
                format!("{WATCHED} (it was not there at the start; \"ro\" covers what exists then)")
            } else {
                WATCHED.to_string()
            };
            (g.to_string(), how)
        })
        .collect()
}

/// Who owns what the VM writes through the shares (see `vm::ownership`).
fn ownership_text(model: crate::vm::ownership::Model) -> String {
    format!("\nFiles the VM writes: {}\n", model.as_str())
}

pub fn json(f: &Facts<'_>) -> serde_json::Value {
    let mounts: Vec<_> = f
        .config
        .mounts
        .iter()
        .zip(f.present)
        .map(|(m, &present)| {
            json!({
                "host": m.host,
                "guest": m.guest,
                "access": m.access,
                "origin": m.origin,
                "optional": m.optional,
                "present": present,
            })
        })
        .collect();
    json!({
        "project": f.project,
        "session": f.session.map(|s| s.to_string()),
        "mounts": mounts,
        "network": {
            "mode": f.config.network.mode,
            "entries": f.config.network.entries.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            "enforced": true,
        },
        "protected": f.protection.paths.iter().map(|p| json!({
            "path": p,
            "guard": f.protection.guard,
        })).collect::<Vec<_>>(),
        "watched": watched_lines(f.project, f.protection).into_iter().map(|(glob, how)| json!({
            "glob": glob,
            "enforced": how.starts_with("read-only"),
            "how": how,
        })).collect::<Vec<_>>(),
        "volumes": f.config.volumes.iter().map(|v| f.project.join(v)).collect::<Vec<_>>(),
        "ports": {
            "auto": f.config.ports.auto,
            "publish": f.config.ports.publish.iter().map(|m| json!({"host": m.host, "guest": m.guest})).collect::<Vec<_>>(),
            "host": f.config.ports.host,
        },
        "storage": { "config": CONFIG_FILE, "state": format!("{CACHE_DIR}/") },
        "ownership": crate::vm::ownership::Model::detect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Host, parse};

    fn config(text: &str) -> Config {
        let host = Host {
            cpus: 4,
            memory_mb: 8192,
            disk_gb: 100,
            home: "/home/al".into(),
            guest_home: "/home/al".into(),
            state: "/home/al/.vibebox".into(),
        };
        parse(text, Path::new("/p/vibebox.toml"), Path::new("/p"), &host).unwrap()
    }

    #[test]
    fn text_lists_mounts_project_first_network_and_storage() {
        let c = config(
            "[box]\nmounts = [\"~/.gitconfig:~/.gitconfig:ro\", \"~/.claude:~/.claude\"]\n[network]\nmode = \"blocklist\"\nentries = [\"evil.example\"]\n",
        );
        let t = text(&Facts {
            project: Path::new("/p"),
            session: None,
            config: &c,
            present: &[true, true, false],
            protection: &Protection::new(Path::new("/p"), Guard::Enforced),
        });
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "Project /p");
        assert_eq!(lines[3], "  /p -> /p  rw  (the project)");
        assert_eq!(lines[4], "  /home/al/.gitconfig -> /home/al/.gitconfig  ro");
        assert_eq!(
            lines[5],
            "  /home/al/.claude -> /home/al/.claude  rw  (skipped: not on this host)"
        );
        assert!(
            lines[7].starts_with(
                "Network: blocklist (enforced on the host: these names do not resolve"
            )
        );
        assert_eq!(lines[8], "  evil.example");
        assert!(t.contains("\n  vibebox.toml  configuration"));
        assert!(t.contains("\n  this machine -> VM: nothing (no [ports] host grant)\n"));
        let c = config("[ports]\nauto = false\npublish = [\"8080:80\"]\nhost = [\"5432\"]\n");
        let t = text(&Facts {
            project: Path::new("/p"),
            session: None,
            config: &c,
            present: &[true],
            protection: &Protection::new(Path::new("/p"), Guard::Enforced),
        });
        assert!(t.contains("\n  VM -> this machine: only the mappings below (auto = false)\n  localhost:8080 -> VM:80\n"), "{t}");
        assert!(
            t.contains(
                "\n  VM host.vibebox.internal:5432 -> this machine's 127.0.0.1:5432 (granted)\n"
            ),
            "{t}"
        );
        assert!(t.contains("\n  .vibebox/     this session's marker"));
        assert!(!t.contains("Volumes"), "{t}");
        let c = config("[box]\nvolumes = [\"node_modules\", \"web/.venv/\"]\n");
        let f = Facts {
            project: Path::new("/p"),
            session: None,
            config: &c,
            present: &[true],
            protection: &Protection::new(Path::new("/p"), Guard::Enforced),
        };
        let t = text(&f);
        assert!(
            t.contains("\nVolumes (on the VM's own disk, over the project; the host sees an empty directory, `vibebox delete` removes them):\n  /p/node_modules\n  /p/web/.venv\n"),
            "{t}"
        );
        assert_eq!(json(&f)["volumes"][1], "/p/web/.venv");
    }

    #[test]
    fn json_has_same_facts() {
        let c = config("");
        let id = SessionId::new();
        let j = json(&Facts {
            project: Path::new("/p"),
            session: Some(id),
            config: &c,
            present: &[true],
            protection: &Protection {
                paths: vec!["/p/.git".into()],
                guard: Guard::NotEnforced,
                overlay: Some("/p/.git".into()),
                watched: vec![crate::config::protect::Glob::parse(".envrc").unwrap()],
                read_only: vec![],
                linked: vec![],
                mode: crate::config::protect::Mode::Watch,
            },
        });
        assert_eq!(j["session"], id.to_string());
        assert_eq!(j["mounts"][0]["guest"], "/p");
        assert_eq!(j["mounts"][0]["access"], "rw");
        assert_eq!(j["mounts"][0]["origin"], "project");
        assert_eq!(j["network"]["mode"], "allowlist");
        assert_eq!(j["network"]["enforced"], true);
        assert_eq!(j["network"]["entries"][0], "deb.debian.org");
        assert_eq!(j["storage"]["state"], ".vibebox/");
        assert_eq!(j["protected"][0]["path"], "/p/.git");
        assert_eq!(j["protected"][0]["guard"], "not-enforced");
        let t = text(&Facts {
            project: Path::new("/p"),
            session: Some(id),
            config: &c,
            present: &[true],
            protection: &Protection {
                paths: vec!["/p/.git".into()],
                guard: Guard::Enforced,
                overlay: Some("/p/.git".into()),
                watched: vec![
                    crate::config::protect::Glob::parse(".envrc").unwrap(),
                    crate::config::protect::Glob::parse(".vscode/").unwrap(),
                ],
                read_only: vec!["/p/.vscode".into()],
                linked: vec!["/p/.envrc".into()],
                mode: crate::config::protect::Mode::Ro,
            },
        });
        assert!(
            t.contains("\n  /p/.git  read-only (enforced on the host)\n"),
            "{t}"
        );
        assert!(t.contains("`vibebox fetch`"), "{t}");
        assert!(
            t.contains("\n  .vscode/  read-only (enforced on the host)\n"),
            "{t}"
        );
        assert!(
            t.contains("\n  .envrc  watched: the VM can change it"),
            "{t}"
        );
        assert!(t.contains("(it has other hard links"), "{t}");
        assert_eq!(j["watched"][0]["glob"], ".envrc");
        assert_eq!(j["watched"][0]["enforced"], false);
        assert!(t.contains("\nFiles the VM writes: "), "{t}");
        let model = crate::vm::ownership::Model::detect();
        assert!(t.contains(model.as_str()), "{t}");
        assert_eq!(j["ownership"], serde_json::to_value(model).unwrap());
    }
}
