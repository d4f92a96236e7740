//! Agent presets (`agents/<name>.toml`): what `vibebox launch claude` installs in the
//! VM on first use, runs as a task, needs to reach, and where it keeps its login.
//! Data, not code: a new agent is a new file. `VIBEBOX_AGENTS` names a directory
//! of more presets (a file there wins over a built-in one of the same name).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::Config;
use crate::net::policy::Mode;

/// The presets in the repository, compiled in.
const BUILTIN: &[(&str, &str)] = &[
    ("claude", include_str!("../../agents/claude.toml")),
    ("codex", include_str!("../../agents/codex.toml")),
];

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    #[serde(skip)]
    pub name: String,
    pub description: String,
    /// The npm package.
    pub package: String,
    /// `latest`, an exact version or a range.
    pub version: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub login: Vec<String>,
    /// The npm registry to install from (default: npm's own).
    #[serde(default)]
    pub registry: Option<String>,
    /// Build caches to suggest as `[box] volumes` (relative to the project).
    #[serde(default)]
    pub volumes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent preset {path}: {message}")]
    Bad { path: PathBuf, message: String },
}

/// The preset named `name`, if there is one.
pub fn find(name: &str) -> Result<Option<Agent>, AgentError> {
    if let Some(dir) = std::env::var_os("VIBEBOX_AGENTS") {
        let path = Path::new(&dir).join(format!("{name}.toml"));
        if let Ok(text) = std::fs::read_to_string(&path) {
            return parse(name, &text, &path).map(Some);
        }
    }
    match BUILTIN.iter().find(|(n, _)| *n == name) {
        Some((n, text)) => parse(n, text, &Path::new("agents").join(format!("{n}.toml"))).map(Some),
        None => Ok(None),
    }
}

fn parse(name: &str, text: &str, path: &Path) -> Result<Agent, AgentError> {
    let bad = |message: String| AgentError::Bad {
        path: path.to_path_buf(),
        message,
    };
    let mut agent: Agent = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    agent.name = name.to_string();
    let word_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"@/._-^~<>=*+ |".contains(&b))
    };
    if !word_ok(&agent.package) || agent.package.starts_with('-') {
        return Err(bad(format!(
            "package {:?} is not an npm package name",
            agent.package
        )));
    }
    if !word_ok(&agent.version) || agent.version.starts_with('-') {
        return Err(bad(format!("version {:?} is not a version", agent.version)));
    }
    if agent.command.is_empty() || agent.command[0].is_empty() || agent.command[0].contains('/') {
        return Err(bad("command must start with the program's name".into()));
    }
    Ok(agent)
}

impl Agent {
    /// The task's command: installs the package on first use (into the VM user's
    /// home, on the session's disk), then runs the agent with `args`. The install
    /// runs inside the task, so attaching shows it and `logs` keeps it.
    pub fn task_command(&self, args: &[String]) -> Vec<String> {
        let script = r#"name=$1 pkg=$2 ver=$3 reg=$4 prog=$5
shift 5
p=$HOME/.local/share/vibebox/agents/$name
want="$pkg@$ver${reg:+ from $reg}"
if [ "$(cat "$p/.vibebox-installed" 2>/dev/null)" != "$want" ] || [ ! -x "$p/bin/$prog" ]; then
    command -v npm >/dev/null 2>&1 || { echo "vibebox: npm is not installed in the VM (sudo apt-get install npm)"; exit 127; }
    echo "vibebox: installing $want (first use; kept in $p)"
    mkdir -p "$p" || exit 1
    npm install --global --no-fund --no-audit --update-notifier=false --prefix "$p" ${reg:+--registry "$reg"} "$pkg@$ver" ||
        { echo "vibebox: installing $pkg failed"; exit 1; }
    printf '%s\n' "$want" > "$p/.vibebox-installed"
fi
PATH=$p/bin:$PATH
export PATH
exec "$prog" "$@""#;
        let mut cmd = vec![
            "sh".to_string(),
            "-c".to_string(),
            script.to_string(),
            "vibebox-agent".to_string(),
            self.name.clone(),
            self.package.clone(),
            self.version.clone(),
            self.registry.clone().unwrap_or_default(),
            self.command[0].clone(),
        ];
        cmd.extend(self.command[1..].iter().cloned());
        cmd.extend(args.iter().cloned());
        cmd
    }

    /// What `vibebox tasks` shows as the command.
    pub fn display(&self, args: &[String]) -> String {
        let mut words = self.command.clone();
        words.extend(args.iter().cloned());
        words
            .iter()
            .map(|w| crate::ssh::shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The preset's build caches that sit on the share in `project` now (directories
    /// there, not yet volumes): worth suggesting, since the agent will fill them.
    pub fn suggested_volumes(&self, config: &Config, project: &Path) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|v| !config.volumes.contains(v))
            .filter(|v| {
                std::fs::symlink_metadata(project.join(v)).is_ok_and(|m| m.file_type().is_dir())
            })
            .cloned()
            .collect()
    }

    /// The domains the project's network policy does not let through.
    pub fn missing_domains(&self, config: &Config) -> Vec<String> {
        self.domains
            .iter()
            .filter(|d| {
                let Some(name) = crate::net::policy::normalize_name(d) else {
                    return true;
                };
                let listed = config.network.entries.iter().any(|r| r.matches(&name, 443));
                match config.network.mode {
                    Mode::Allowlist => !listed,
                    Mode::Blocklist => listed,
                }
            })
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_presets_parse() {
        for (name, _) in BUILTIN {
            let a = find(name).unwrap().unwrap();
            assert_eq!(&a.name, name);
            assert!(!a.domains.is_empty() && !a.login.is_empty());
            let cmd = a.task_command(&["--x".into()]);
            assert_eq!(cmd[4], *name);
            assert_eq!(cmd.last().unwrap(), "--x");
        }
        assert!(find("nope").unwrap().is_none());
    }

    #[test]
    fn bad_presets_are_refused() {
        let p = Path::new("x.toml");
        let base = "description = \"d\"\nversion = \"latest\"\ncommand = [\"x\"]\n";
        assert!(parse("x", &format!("package = \"--evil\"\n{base}"), p).is_err());
        assert!(parse("x", &format!("package = \"a;b\"\n{base}"), p).is_err());
        assert!(parse("x", &format!("package = \"ok\"\nunknown = 1\n{base}"), p).is_err());
        assert!(parse("x", &format!("package = \"@scope/ok\"\n{base}"), p).is_ok());
    }

    fn host() -> crate::config::Host {
        crate::config::Host {
            cpus: 2,
            memory_mb: 4096,
            disk_gb: 100,
            home: "/h".into(),
            guest_home: "/g".into(),
            state: "/state".into(),
        }
    }

    #[test]
    fn missing_domains_follow_the_policy() {
        let host = host();
        let config = crate::config::defaults(Path::new("/p"), &host);
        let claude = find("claude").unwrap().unwrap();
        let missing = claude.missing_domains(&config);
        assert!(
            !missing.contains(&"api.anthropic.com".to_string()),
            "{missing:?}"
        );
        assert_eq!(missing, ["console.anthropic.com"]);
    }

    #[test]
    fn suggests_the_caches_the_project_has_on_the_share() {
        let host = host();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir(p.join("node_modules")).unwrap();
        std::fs::create_dir(p.join("target")).unwrap();
        std::fs::write(p.join(".venv"), "a file").unwrap();
        let claude = find("claude").unwrap().unwrap();
        let config = crate::config::defaults(p, &host);
        assert_eq!(
            claude.suggested_volumes(&config, p),
            ["node_modules", "target"]
        );
        let config = crate::config::parse(
            "[box]\nvolumes = [\"target\"]\n",
            Path::new("vibebox.toml"),
            p,
            &host,
        )
        .unwrap();
        assert_eq!(claude.suggested_volumes(&config, p), ["node_modules"]);
    }
}
