//! Tasks: named terminal sessions in the project's VM that outlive every client
//! (`vibebox launch`, `attach`, `tasks`, `logs`, `wait`, `kill`), so an agent keeps
//! working when the laptop sleeps, the terminal closes or the connection drops.
//!
//! The guest side is `images/guest/tasks.sh` (tmux with its own socket and config),
//! sent with every operation over the session's ssh control master rather than
//! installed in the image: host and guest always agree on it, and it works in any
//! image that has tmux. Everything the guest reports (names, commands, output) is
//! guest text: names are validated here, and what is printed is escaped or stripped
//! of terminal control sequences.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::paths::SessionDir;
use crate::session::attach;
use crate::ssh;

/// The guest side, sent with each operation.
pub const SCRIPT: &str = include_str!("../../images/guest/tasks.sh");

/// The guest script's exit codes (see its header).
const NO_TMUX: i32 = 3;
const NO_SUCH_TASK: i32 = 4;
const ALREADY_RUNNING: i32 = 5;

const MAX_NAME: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(
        "{0:?} is not a task name: use up to 32 letters, digits, '-' and '_', starting with a letter or digit"
    )]
    BadName(String),
    #[error("{0:?} is not a detach key: use a tmux key name such as C-\\\\ or C-]")]
    BadKey(String),
    #[error("no task runs: this project's VM is not running (start one with `vibebox launch`)")]
    NotRunning,
    #[error("no task named {0} (see `vibebox tasks`)")]
    NoSuchTask(String),
    #[error("no task runs in this project's VM (start one with `vibebox launch`)")]
    NoTasks,
    #[error("more than one task runs ({0}): name one, e.g. `vibebox attach {1}`")]
    WhichTask(String, String),
    #[error(
        "task {0} is already running: attach with `vibebox attach {0}`, end it with `vibebox kill {0}`"
    )]
    AlreadyRunning(String),
    #[error("the VM has no tmux (its image predates tasks): run `sudo apt-get install tmux` in it")]
    NoTmux,
    #[error("the task command in the VM failed: {0}")]
    Guest(String),
    #[error("cannot run ssh: {0}; install OpenSSH")]
    Ssh(std::io::Error),
}

impl TaskError {
    /// 2 for what the user typed wrong, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            TaskError::BadName(_) | TaskError::BadKey(_) | TaskError::WhichTask(..) => 2,
            _ => 1,
        }
    }
}

/// A task as the guest reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    pub name: String,
    pub command: String,
    /// `running`, or `exited N` (N: the exit status, or 128 + the signal).
    pub state: String,
    pub exit_code: Option<i32>,
    pub started: Option<DateTime<Utc>>,
    /// Terminals attached to it now.
    pub attached: u32,
    pub last_output: String,
}

impl Task {
    pub fn running(&self) -> bool {
        self.exit_code.is_none()
    }
}

/// Task names are tmux session names and directory names in the guest, and words
/// in the commands the host prints: a small alphabet keeps all three plain.
pub fn validate_name(name: &str) -> Result<(), TaskError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(TaskError::BadName(name.to_string()))
    }
}

/// The name a task gets when none is given: its command's name (`claude` for
/// `/usr/bin/claude --resume`), `shell` for the login shell.
pub fn default_name(command: &[String]) -> Result<String, TaskError> {
    let Some(first) = command.first() else {
        return Ok("shell".into());
    };
    let base = first.rsplit('/').next().unwrap_or(first);
    let name: String = base
        .chars()
        .map(|c| if c == '.' { '-' } else { c })
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(MAX_NAME)
        .collect();
    let name = name.trim_start_matches(['-', '_']).to_string();
    validate_name(&name).map_err(|_| TaskError::BadName(first.clone()))?;
    Ok(name)
}

/// The detach key from `VIBEBOX_DETACH_KEY` (a tmux key name), checked: it is
/// written into the guest tmux's configuration.
pub fn detach_key() -> Result<Option<String>, TaskError> {
    let Ok(key) = std::env::var("VIBEBOX_DETACH_KEY") else {
        return Ok(None);
    };
    let ok = !key.is_empty()
        && key.len() <= 16
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-\\]^[_".contains(&b));
    if ok {
        Ok(Some(key))
    } else {
        Err(TaskError::BadKey(key))
    }
}

/// The remote command: the script with its operation and arguments, shell-quoted.
fn remote(op: &str, args: &[&str]) -> Result<String, TaskError> {
    let mut words = Vec::new();
    if let Some(key) = detach_key()? {
        words.push(format!("VIBEBOX_DETACH_KEY={}", ssh::shell_quote(&key)));
    }
    // The operations that start the fast attach's daemon get its script.
    if op == "launch" || op == "daemon" {
        let term = std::env::var("TERM").ok();
        for (k, v) in attach::daemon_env(term.as_deref()) {
            words.push(format!("{k}={}", ssh::shell_quote(&v)));
        }
    }
    words.push("sh".into());
    words.push("-c".into());
    words.push(ssh::shell_quote(SCRIPT));
    words.push("vibebox-task".into());
    words.push(op.into());
    words.extend(args.iter().map(|a| ssh::shell_quote(a)));
    Ok(words.join(" "))
}

fn ssh_command(sd: &SessionDir, op: &str, args: &[&str], tty: bool) -> Result<Command, TaskError> {
    ssh_command_with(sd, &[], op, args, tty)
}

/// The remote command of the `ssh -t` attach to task `name` (validated), the path
/// when the fast one ([`attach`](super::attach)) cannot be taken: the fast path's
/// daemon started in the background (for the next attach), then the tmux client,
/// run by the login shell itself, and the script only after it (`attached`: says
/// when the task ended) or when it failed (`attach`: the full path, which says what
/// is wrong). Under TCG the `sh` the script needs costs an exec before the screen
/// shows; the tmux socket is found from XDG_RUNTIME_DIR, set in an ssh login, as
/// the script finds it.
fn remote_attach(name: &str) -> Result<String, TaskError> {
    let key = detach_key()?.unwrap_or_else(|| "C-\\".into());
    Ok(format!(
        "({daemon} &) </dev/null >/dev/null 2>&1; tmux -S \"$XDG_RUNTIME_DIR/vibebox-tasks/tmux.sock\" unbind-key -a -T root \\; bind-key -n {key} detach-client \\; attach-session -t ={name} 2>/dev/null && {attached} || {attach}",
        daemon = remote("daemon", &[])?,
        key = ssh::shell_quote(&key),
        attached = remote("attached", &[name])?,
        attach = remote("attach", &[name])?,
    ))
}

/// The session's host alias in its ssh config (the directory is named by its id).
fn alias(sd: &SessionDir) -> String {
    let id = sd.dir().file_name().unwrap_or_default().to_string_lossy();
    ssh::alias(&id)
}

/// [`ssh_command`] with ssh options of the caller's.
fn ssh_command_with(
    sd: &SessionDir,
    opts: &[&str],
    op: &str,
    args: &[&str],
    tty: bool,
) -> Result<Command, TaskError> {
    let mut cmd = Command::new("ssh");
    cmd.arg("-F")
        .arg(sd.ssh_dir().join("config"))
        .arg(if tty { "-t" } else { "-T" })
        .args(opts)
        .arg(alias(sd))
        .arg("--")
        .arg(remote(op, args)?);
    Ok(cmd)
}

/// Runs one operation without a terminal; returns (status, stdout, stderr).
fn run(sd: &SessionDir, op: &str, args: &[&str]) -> Result<(i32, String, String), TaskError> {
    let out = ssh_command(sd, op, args, false)?
        .stdin(Stdio::null())
        .output()
        .map_err(TaskError::Ssh)?;
    Ok((
        out.status.code().unwrap_or(255),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

fn failed(code: i32, name: &str, stderr: String) -> TaskError {
    match code {
        NO_TMUX => TaskError::NoTmux,
        NO_SUCH_TASK => TaskError::NoSuchTask(name.to_string()),
        ALREADY_RUNNING => TaskError::AlreadyRunning(name.to_string()),
        _ if stderr.is_empty() => TaskError::Guest(format!("exit status {code}")),
        _ => TaskError::Guest(stderr),
    }
}

/// Starts `command` (the login shell when empty) as task `name` in `dir`, with a
/// terminal of `size` (columns, rows) until a client attaches; `vibebox tasks`
/// shows it as `shown` (default: the command).
pub fn launch(
    sd: &SessionDir,
    name: &str,
    dir: &str,
    size: (u16, u16),
    command: &[String],
    shown: Option<&str>,
) -> Result<(), TaskError> {
    validate_name(name)?;
    let text = if let Some(s) = shown {
        s.to_string()
    } else if command.is_empty() {
        "(login shell)".to_string()
    } else {
        command
            .iter()
            .map(|w| ssh::shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // One line in the guest's list.
    let text = text.replace(['\n', '\t', '\r'], " ");
    let cols = size.0.clamp(20, 1000).to_string();
    let rows = size.1.clamp(5, 1000).to_string();
    let mut args = vec![name, dir, &cols, &rows, &text];
    args.extend(command.iter().map(String::as_str));
    match run(sd, "launch", &args)? {
        (0, _, _) => Ok(()),
        (code, _, err) => Err(failed(code, name, err)),
    }
}

/// How many tasks run in each of these running VMs, asked of all at once and
/// waited for until `within` has passed: `None` for a VM that did not answer in
/// time or answered nonsense, so a hung guest never holds up the caller. The
/// question uses a control master that is there but never starts one, and its
/// shell in the guest carries the name the idle check skips: asking keeps no VM up.
pub fn running_counts(sds: &[SessionDir], within: Duration) -> Vec<Option<u32>> {
    let deadline = Instant::now() + within;
    let timeout = format!("ConnectTimeout={}", within.as_secs().max(1));
    let opts = [
        "-o",
        "ControlMaster=no",
        "-o",
        "BatchMode=yes",
        "-o",
        timeout.as_str(),
    ];
    let mut children: Vec<Option<std::process::Child>> = sds
        .iter()
        .map(|sd| {
            ssh_command_with(sd, &opts, "count", &[], false)
                .ok()?
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        })
        .collect();
    let mut counts = vec![None; sds.len()];
    loop {
        let mut waiting = false;
        for (i, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    let mut out = String::new();
                    if let Some(o) = child.stdout.take() {
                        // Guest text: a count is a few bytes.
                        let _ = o.take(64).read_to_string(&mut out);
                    }
                    counts[i] = status.success().then(|| out.trim().parse().ok()).flatten();
                    *slot = None;
                }
                Ok(None) => waiting = true,
                Err(_) => *slot = None,
            }
        }
        if !waiting || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for mut child in children.into_iter().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
    counts
}

/// The tasks in the VM, in the guest's order (by name).
pub fn list(sd: &SessionDir) -> Result<Vec<Task>, TaskError> {
    match run(sd, "list", &[])? {
        (0, out, _) => Ok(parse_list(&out)),
        (code, _, err) => Err(failed(code, "", err)),
    }
}

/// Parses `tasks.sh list`: per task a tab-separated `task` line, then its screen
/// between `screen` and `end` lines. Guest text: a malformed line is skipped,
/// never trusted.
pub fn parse_list(text: &str) -> Vec<Task> {
    let mut tasks: Vec<Task> = Vec::new();
    // Whether the last `task` line was taken: a screen after a skipped one is not
    // the screen of the task before it.
    let mut current = false;
    let mut in_screen = false;
    for line in text.lines() {
        if in_screen {
            if line == "end" {
                in_screen = false;
            } else if current
                && !line.trim().is_empty()
                && !line.starts_with("[vibebox: the task ended")
                && let Some(t) = tasks.last_mut()
            {
                t.last_output = strip_terminal(line.trim_end().as_bytes());
            }
            continue;
        }
        if line == "screen" {
            in_screen = true;
            continue;
        }
        let Some(rest) = line.strip_prefix("task\t") else {
            continue;
        };
        let f: Vec<&str> = rest.splitn(6, '\t').collect();
        current = f.len() >= 5 && validate_name(f[0]).is_ok();
        if !current {
            continue;
        }
        let exit_code = if f[3] == "1" {
            Some(f[4].trim().parse().unwrap_or(-1))
        } else {
            None
        };
        tasks.push(Task {
            name: f[0].to_string(),
            command: f.get(5).unwrap_or(&"").trim().to_string(),
            state: match exit_code {
                None => "running".into(),
                Some(-1) => "exited".into(),
                Some(c) => format!("exited {c}"),
            },
            exit_code,
            started: f[1]
                .parse::<i64>()
                .ok()
                .and_then(|s| DateTime::from_timestamp(s, 0)),
            attached: f[2].parse().unwrap_or(0),
            last_output: String::new(),
        });
    }
    tasks
}

/// The task to attach to: `name`, or the only one when none is given.
pub fn resolve(sd: &SessionDir, name: Option<&str>) -> Result<String, TaskError> {
    if let Some(n) = name {
        validate_name(n)?;
        return Ok(n.to_string());
    }
    let tasks = list(sd)?;
    match tasks.as_slice() {
        [] => Err(TaskError::NoTasks),
        [only] => Ok(only.name.clone()),
        many => Err(TaskError::WhichTask(
            many.iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            many[0].name.clone(),
        )),
    }
}

/// How an attach ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detached {
    /// The exit status for the client: 0 after a detach, else ssh's or the signal's.
    pub code: i32,
    /// The task's own status when it ended (the fast path says; the `ssh -t` path's
    /// guest script prints it itself).
    pub task_ended: Option<i32>,
}

/// Attaches this terminal to task `name` until the detach key (or the task ends).
pub fn attach(sd: &SessionDir, name: &str) -> Result<Detached, TaskError> {
    let started = start_attach(sd, name)?;
    attached(sd, started, name)
}

/// An attach under way: the fast path's handshake sent (a terminal), or the
/// `ssh -t` path started (no terminal, or the fast path could not start).
pub enum Attaching {
    Fast(attach::Pending),
    Ssh(Child),
}

impl Attaching {
    /// Ends it before it ran (the check-in failed).
    pub fn cancel(self) {
        match self {
            Attaching::Fast(p) => p.cancel(),
            Attaching::Ssh(mut child) => {
                // SIGTERM: ssh puts the terminal back as it was.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let _ = child.wait();
            }
        }
    }
}

/// [`attach`], started: a caller may check in with the supervisor while it
/// connects (that round trip took a sixth of an attach).
pub fn start_attach(sd: &SessionDir, name: &str) -> Result<Attaching, TaskError> {
    validate_name(name)?;
    let key = detach_key()?.unwrap_or_else(|| "C-\\".into());
    if let Some(p) = attach::start(sd, &alias(sd), name, &key) {
        return Ok(Attaching::Fast(p));
    }
    start_ssh_attach(sd, name).map(Attaching::Ssh)
}

fn start_ssh_attach(sd: &SessionDir, name: &str) -> Result<Child, TaskError> {
    ssh::command(
        &sd.ssh_dir().join("config"),
        &alias(sd),
        Some(&remote_attach(name)?),
        true,
    )
    .spawn()
    .map_err(TaskError::Ssh)
}

/// Waits for an attach [`start_attach`] started, taking the `ssh -t` path when the
/// fast one failed before the screen showed.
pub fn attached(sd: &SessionDir, started: Attaching, name: &str) -> Result<Detached, TaskError> {
    let mut child = match started {
        Attaching::Fast(p) => match p.run() {
            attach::Outcome::Done(code, task_ended) => return Ok(Detached { code, task_ended }),
            attach::Outcome::NoTask => return Err(TaskError::NoSuchTask(name.to_string())),
            attach::Outcome::Fallback => start_ssh_attach(sd, name)?,
        },
        Attaching::Ssh(child) => child,
    };
    let status = child.wait().map_err(TaskError::Ssh)?;
    match status.code().unwrap_or(255) {
        NO_SUCH_TASK => Err(TaskError::NoSuchTask(name.to_string())),
        NO_TMUX => Err(TaskError::NoTmux),
        code => Ok(Detached {
            code,
            task_ended: None,
        }),
    }
}

/// Writes the task's kept output to `out` (following it while it runs with
/// `follow`), stripped of terminal control sequences.
pub fn logs(
    sd: &SessionDir,
    name: &str,
    follow: bool,
    out: &mut dyn Write,
) -> Result<(), TaskError> {
    validate_name(name)?;
    let args: &[&str] = if follow { &[name, "-f"] } else { &[name] };
    let mut child = ssh_command(sd, "logs", args, false)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(TaskError::Ssh)?;
    let stdout = child.stdout.take().expect("piped");
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = strip_terminal(&line);
        // A reader that went away (`| head`) ends the copy, not an error.
        if out.write_all(text.as_bytes()).is_err() || (follow && out.flush().is_err()) {
            let _ = child.kill();
            break;
        }
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let status = child.wait().map_err(TaskError::Ssh)?;
    match status.code() {
        Some(0) | None => Ok(()),
        Some(code) => Err(failed(code, name, err.trim().to_string())),
    }
}

/// Waits until the task ends; its exit status (128 + the signal when killed).
pub fn wait(sd: &SessionDir, name: &str) -> Result<i32, TaskError> {
    validate_name(name)?;
    match run(sd, "wait", &[name])? {
        (0, out, _) => out
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("exit ")?.trim().parse().ok())
            .ok_or_else(|| TaskError::Guest("no exit status".into())),
        (code, _, err) => Err(failed(code, name, err)),
    }
}

/// Ends the task (SIGTERM to its processes, then SIGHUP, then SIGKILL) and forgets it.
pub fn kill(sd: &SessionDir, name: &str) -> Result<(), TaskError> {
    validate_name(name)?;
    match run(sd, "kill", &[name])? {
        (0, _, _) => Ok(()),
        (code, _, err) => Err(failed(code, name, err)),
    }
}

/// Text for the host terminal from a task's raw output: terminal control sequences
/// (colours, cursor movement, titles, ...) removed, a line redrawn after a carriage
/// return kept as last drawn, other control and format characters shown escaped.
/// Keeps newlines and tabs.
pub fn strip_terminal(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                Some('[') => skip_csi(&mut chars),
                Some(']' | 'P' | 'X' | '^' | '_') => skip_string(&mut chars),
                // Charset designations take one more character.
                Some('(' | ')' | '*' | '+' | '#' | '%') => {
                    chars.next();
                }
                _ => {}
            },
            '\u{9b}' => skip_csi(&mut chars),
            '\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}' => skip_string(&mut chars),
            // A carriage return inside a line redraws it (progress bars, spinners):
            // what it overwrote goes, as on a terminal.
            '\r' => {
                if !matches!(chars.peek(), None | Some('\n' | '\r')) {
                    out.truncate(out.rfind('\n').map_or(0, |i| i + 1));
                }
            }
            '\x07' | '\x08' | '\x0e' | '\x0f' => {}
            '\n' | '\t' => out.push(c),
            c if c.is_control() || crate::escape::is_format_char(c) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// Skips a CSI sequence's parameters up to its final byte.
fn skip_csi(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    for c in chars.by_ref() {
        if ('\u{40}'..='\u{7e}').contains(&c) {
            return;
        }
    }
}

/// Skips an OSC/DCS/... string up to BEL or ST (ESC \ or U+9C).
fn skip_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(c) = chars.next() {
        match c {
            '\x07' | '\u{9c}' => return,
            '\x1b' => {
                if chars.peek() == Some(&'\\') {
                    chars.next();
                }
                return;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for ok in ["claude", "a", "my-task_2", "X1"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "_x",
            "a.b",
            "a:b",
            "a b",
            "é",
            "a\n",
            &"x".repeat(33),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let words = |s: &[&str]| s.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(default_name(&[]).unwrap(), "shell");
        assert_eq!(
            default_name(&words(&["/usr/bin/claude", "--x"])).unwrap(),
            "claude"
        );
        assert_eq!(default_name(&words(&["python3.12"])).unwrap(), "python3-12");
        assert_eq!(default_name(&words(&["./run.sh"])).unwrap(), "run-sh");
        assert!(default_name(&words(&["/"])).is_err());
        assert!(default_name(&words(&["ééé"])).is_err());
    }

    /// The `ssh -t` attach command line, run by a real `sh` against a stand-in tmux:
    /// after the daemon's start in the background, the client comes first with the
    /// detach key bound; the script follows it (`after`)
    /// or, when the client failed, takes the full path and says what is wrong.
    #[test]
    fn an_attach_runs_the_tmux_client_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        let fake = dir.path().join("tmux");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\nexit ${{FAKE_RC:-0}}\n",
                log.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The attach daemon the line starts first: a stand-in too, never this
        // host's python3.
        let py = dir.path().join("python3");
        std::fs::write(&py, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).unwrap();
        let line = remote_attach("job-1").unwrap();
        let run = |rc: &str| {
            let _ = std::fs::remove_file(&log);
            let status = Command::new("sh")
                .arg("-c")
                .arg(&line)
                .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
                .env("XDG_RUNTIME_DIR", dir.path())
                .env("FAKE_RC", rc)
                .env_remove("VIBEBOX_DETACH_KEY")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            let calls = std::fs::read_to_string(&log).unwrap_or_default();
            (status.code(), calls)
        };
        let first = format!(
            "-S {}/vibebox-tasks/tmux.sock unbind-key -a -T root ; bind-key -n C-\\ detach-client ; attach-session -t =job-1",
            dir.path().display()
        );
        let (code, calls) = run("0");
        assert_eq!(code, Some(0));
        assert_eq!(calls.lines().next(), Some(first.as_str()), "{calls}");
        // Detached: the script asks whether the task ended, and attaches nothing more.
        assert!(
            calls.lines().skip(1).all(|l| !l.contains("attach-session")),
            "{calls}"
        );
        let (code, calls) = run("1");
        assert_eq!(code, Some(NO_SUCH_TASK), "{calls}");
        assert_eq!(calls.lines().next(), Some(first.as_str()), "{calls}");
    }

    #[test]
    fn a_count_is_named_for_the_idle_check_to_skip() {
        let rename = format!(
            "[ \"$op\" = count ] && echo {} > /proc/$$/comm",
            crate::supervisor::daemon::PROBE_NAME
        );
        assert!(SCRIPT.contains(&rename), "{rename}");
    }

    #[test]
    fn parses_the_guest_list() {
        let out = "task\tclaude\t1796228741\t2\t0\t\tclaude --resume \nscreen\n\x1b[1mWorking\x1b[0m…\r\n\n\nend\n\
                   task\tdone\t1796228741\t0\t1\t3\tmake\tx\nscreen\nok\n[vibebox: the task ended (status 3)]\nend\n\
                   task\tkilled\t1\t0\t1\t\tx\n\
                   task\tbad name\t1\t0\t0\t\tevil\nscreen\nevil\nend\n\
                   garbage line\n";
        let t = parse_list(out);
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(t[0].name, "claude");
        assert!(t[0].running());
        assert_eq!(t[0].state, "running");
        assert_eq!(t[0].attached, 2);
        assert_eq!(t[0].command, "claude --resume");
        assert_eq!(t[0].last_output, "Working…");
        assert_eq!(t[0].started.unwrap().timestamp(), 1796228741);
        assert_eq!(t[1].state, "exited 3");
        assert_eq!(t[1].exit_code, Some(3));
        assert_eq!(t[1].command, "make\tx");
        assert_eq!(t[1].last_output, "ok");
        assert_eq!(t[2].state, "exited");
        // The bad name's screen is not given to the task before it.
        assert_eq!(t[2].last_output, "");
    }

    #[test]
    fn strips_terminal_control() {
        assert_eq!(strip_terminal(b"\x1b[31mred\x1b[0m\r\n"), "red\n");
        assert_eq!(strip_terminal(b"a\x1b]0;pwned\x07b"), "ab");
        assert_eq!(strip_terminal(b"a\x1b]52;c;Zm9v\x1b\\b"), "ab");
        assert_eq!(strip_terminal(b"a\x1bPqdata\x1b\\b\tc"), "ab\tc");
        assert_eq!(strip_terminal(b"\x1b(Bx\x1b=y"), "xy");
        assert_eq!(strip_terminal("x\u{202e}y".as_bytes()), "x\\u{202e}y");
        assert_eq!(strip_terminal(b"\x00\x7f"), "\\u{0}\\u{7f}");
        assert_eq!(strip_terminal(b"a\n10%\r50%\r\x1b[Kdone\r\n"), "a\ndone\n");
    }

    proptest! {
        #[test]
        fn stripped_output_cannot_drive_the_terminal(s in any::<Vec<u8>>()) {
            let out = strip_terminal(&s);
            prop_assert!(!out.chars().any(|c| (c.is_control() && c != '\n' && c != '\t')
                || crate::escape::is_format_char(c)));
        }

        #[test]
        fn list_parsing_never_panics_and_names_are_valid(s in any::<String>()) {
            for t in parse_list(&s) {
                prop_assert!(validate_name(&t.name).is_ok());
            }
        }
    }
}
