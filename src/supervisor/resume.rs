//! Stop saves the VM and the next start resumes it (`vm::snapshot` keeps the state
//! and its record): the guest's side of both, over the session's ssh, and the save
//! as the supervisor runs it. Any failure on the way to a save falls back to the
//! power-off; a resume that fails boots cold.

use std::path::Path;
use std::time::Duration;

use crate::paths::{self, SessionDir};
use crate::ssh;
use crate::vm::snapshot;

/// The guest side (`prepare`, `resume`), sent with each use as tasks.sh is.
const SCRIPT: &str = include_str!("../../images/guest/suspend.sh");

/// The guest's prepare step gets this long, connection included: a guest that
/// hangs or refuses costs a stop no more than this before the power-off path.
pub const PREPARE_WAIT: Duration = Duration::from_secs(15);
/// The migration into the file (a paused guest's memory, caches dropped).
const SAVE_WAIT: Duration = Duration::from_secs(20);
/// The remount after a resume.
const RESUMED_WAIT: Duration = Duration::from_secs(30);
/// At most this many guest lines, this long each, reach the log or the user.
const MAX_LINES: usize = 8;
const MAX_LINE: usize = 300;
/// The most of the resumed guest's answer read.
const OUTPUT_CAP: u64 = 64 << 10;

/// The script run as root in the guest (the session user has passwordless sudo).
fn remote(op: &str) -> String {
    format!(
        "exec sudo -n sh -c {} vibebox-suspend {op}",
        ssh::shell_quote(SCRIPT)
    )
}

/// Guest text for the host: a few lines, cut and escaped.
fn guest_lines(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .take(MAX_LINES)
        .map(|l| {
            let cut: String = l.chars().take(MAX_LINE).collect();
            crate::escape::escape(&cut).into_owned()
        })
        .collect()
}

/// Readies the guest for a save: tasks and other logins ended, shares unmounted,
/// caches dropped. `Err` says why not (guest text escaped).
pub async fn prepare(sd: &SessionDir) -> Result<(), String> {
    let out = ssh::guest_output_within(sd, &remote("prepare"), PREPARE_WAIT)
        .await
        .map_err(|e| format!("the guest's prepare step failed: {e}"))?;
    if out.lines().last() == Some("prepared") {
        return Ok(());
    }
    Err(format!(
        "the guest's prepare step said: {}",
        guest_lines(&out).join(" | ")
    ))
}

/// Saves the VM whose QMP socket is in the supervisor's working directory, quits
/// QEMU, and puts the state in place once QEMU has exited. `Ok(MiB)`: the state's
/// size; on `Err` the guest runs on (no state left behind) for the power-off.
pub async fn save(
    sd: &SessionDir,
    digest: &str,
    ipv4: Option<String>,
    exit_rx: &mut tokio::sync::oneshot::Receiver<String>,
    quit_wait: Duration,
) -> Result<u64, String> {
    let dir = sd.dir().to_path_buf();
    tokio::task::spawn_blocking(move || {
        snapshot::save(Path::new(paths::QMP_SOCKET), &dir, SAVE_WAIT)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(|| snapshot::quit(Path::new(paths::QMP_SOCKET)))
        .await
        .map_err(|e| e.to_string())?;
    if tokio::time::timeout(quit_wait, &mut *exit_rx)
        .await
        .is_err()
    {
        // The guest is paused after its save: nothing to shut down gracefully, but
        // the state is used only from a disk QEMU let go of cleanly.
        snapshot::discard(sd.dir());
        return Err("QEMU did not quit after the save".into());
    }
    let len = snapshot::commit(sd.dir(), &sd.disk(), digest, ipv4)
        .map_err(|e| format!("cannot keep the saved state: {e}"))?;
    Ok(len >> 20)
}

/// After a resume: the shares mounted again as at boot. Returns the guest's
/// complaints (escaped) as warnings for the user; `Err` when the guest did not
/// answer (then it is not usable). It runs through the session's own ssh config, so
/// the control master it opens (`ControlPersist`) is the one the waiting client
/// uses next: one ssh handshake with the guest on the way to the user's command
/// instead of two (each is seconds under TCG).
pub async fn resumed(sd: &SessionDir, alias: &str) -> Result<Vec<String>, String> {
    use tokio::io::AsyncReadExt;
    let config = sd.ssh_dir().join("config");
    let mut cmd =
        tokio::process::Command::from(ssh::command(&config, alias, Some(&remote("resume")), false));
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let run = async {
        let mut child = cmd.spawn()?;
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            stdout.take(OUTPUT_CAP).read_to_end(&mut out).await?;
        }
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out))
    };
    let (status, out) = tokio::time::timeout(RESUMED_WAIT, run)
        .await
        .map_err(|_| format!("the resumed guest did not answer within {RESUMED_WAIT:?}"))?
        .map_err(|e| format!("ssh to the resumed guest: {e}"))?;
    if !status.success() {
        return Err(format!("ssh to the resumed guest failed ({status})"));
    }
    let out = String::from_utf8_lossy(&out);
    if out.lines().last() != Some("resumed") {
        return Err(format!(
            "the resumed guest said: {}",
            guest_lines(&out).join(" | ")
        ));
    }
    Ok(guest_lines(&out)
        .into_iter()
        .filter_map(|l| l.strip_prefix("error ").map(String::from))
        .collect())
}

/// The `time` line the guest's ready port takes: the host's clock now.
pub fn time_line() -> Option<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!(
        "time {}.{:09}\n",
        now.as_secs(),
        now.subsec_nanos()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_bounded_and_escaped() {
        let out = format!("busy /a\x1b[2J\n\n{}\n", "x".repeat(5000)) + &"l\n".repeat(100);
        let lines = guest_lines(&out);
        assert_eq!(lines.len(), MAX_LINES);
        assert!(!lines[0].contains('\x1b'), "{:?}", lines[0]);
        assert!(lines[1].chars().count() <= MAX_LINE);
    }

    #[test]
    fn the_remote_line_runs_the_script_as_root_with_its_operation() {
        let r = remote("prepare");
        assert!(r.starts_with("exec sudo -n sh -c '"), "{r}");
        assert!(r.ends_with(" vibebox-suspend prepare"), "{r}");
    }
}
