//! A stopped VM's saved state: written by QEMU at stop (a migration into a file of
//! the session directory), read by the next QEMU of the session instead of a cold
//! boot. The state only matches the disk exactly as QEMU left it and the machine it
//! was taken from, so a record beside it holds what the resumed machine must match
//! (a digest of the whole QEMU command line, the fw_cfg files and what the host
//! confines QEMU with; the disk's size and mtime after the save); anything else is a
//! cold boot. A state is used at most once: [`take`] unlinks it before QEMU even
//! starts, so a crash at any later point leads to a cold boot, never to a second
//! resume of a state the disk has moved past.
//!
//! The file is passed to QEMU as an open descriptor over QMP (`getfd`, SCM_RIGHTS),
//! never as a path or a shell command: QEMU's sandbox forbids spawning, and the
//! session path may hold anything.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::statefile;

/// The saved state and its record, in the session directory.
pub const STATE: &str = "resume.state";
pub const RECORD: &str = "resume.toml";
/// Where QEMU writes until the save is complete and synced.
const STATE_TMP: &str = "resume.state.tmp";
/// The name the descriptor gets in QEMU's monitor.
const FD_NAME: &str = "vbxstate";
/// Free space kept on the host's disk beyond the largest state a save may write.
const SPACE_MARGIN: u64 = 512 << 20;
/// One QMP reply may take this long (QEMU answers at once but under load).
const REPLY_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("QEMU's control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU refused {command}: {message}")]
    Refused { command: String, message: String },
    #[error("the migration failed: {0}")]
    Failed(String),
    #[error("the migration did not finish within {0:?}")]
    Timeout(Duration),
    #[error("QEMU's control socket closed (QEMU exited)")]
    Closed,
}

/// What the resumed machine must match, written beside the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// [`digest`] of the machine that was saved.
    pub digest: String,
    pub state_len: u64,
    pub disk_len: u64,
    pub disk_mtime_ns: i64,
    /// The guest's address, which a resumed guest does not report again.
    pub ipv4: Option<String>,
}

/// A digest of everything the saved guest depends on: the QEMU binary (path, size,
/// mtime), its whole command line, the contents of the fw_cfg files it names (keys,
/// hostname, shares, explain text) and `extra` (how the host confines QEMU: the
/// protected paths, the ownership model, the shares' identities).
pub fn digest(qemu: &Path, argv: &[OsString], fw_cfg: &[(String, PathBuf)], extra: &str) -> String {
    let mut h = Sha256::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    part(qemu.as_os_str().as_encoded_bytes());
    let meta = fs::metadata(qemu).ok();
    part(
        format!(
            "{:?}",
            meta.map(|m| (m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
        )
        .as_bytes(),
    );
    for a in argv {
        part(a.as_encoded_bytes());
    }
    for (key, file) in fw_cfg {
        part(key.as_bytes());
        part(&fs::read(file).unwrap_or_default());
    }
    part(extra.as_bytes());
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

fn disk_facts(disk: &Path) -> std::io::Result<(u64, i64)> {
    let m = fs::symlink_metadata(disk)?;
    Ok((m.len(), m.mtime() * 1_000_000_000 + m.mtime_nsec()))
}

/// Whether a saved state waits in `dir` (for `list`/`status`; reads nothing else).
pub fn exists(dir: &Path) -> bool {
    fs::symlink_metadata(dir.join(STATE)).is_ok_and(|m| m.is_file())
        && fs::symlink_metadata(dir.join(RECORD)).is_ok()
}

/// Removes any saved state of the session (and a save cut short).
pub fn discard(dir: &Path) {
    let mut any = false;
    for n in [STATE, STATE_TMP, RECORD] {
        any |= fs::remove_file(dir.join(n)).is_ok();
    }
    if any {
        let _ = statefile::sync_dir(dir);
    }
}

/// The outcome of looking for a state to resume.
pub enum Take {
    /// The state, open and already unlinked, with its record.
    Resume(File, Record),
    /// Boot cold; `Some` says why a state there was not used.
    Cold(Option<String>),
}

/// Takes the saved state of `dir` if it matches `digest` and the disk: open, then
/// unlinked (with its record) before it is handed to anyone. Whatever the outcome,
/// no state is left behind.
pub fn take(dir: &Path, disk: &Path, digest: &str) -> Take {
    let taken = (|| {
        let text = match statefile::read_nofollow(&dir.join(RECORD)) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(fs::symlink_metadata(dir.join(STATE))
                    .is_ok()
                    .then(|| "a saved state without its record".to_string()));
            }
            Err(e) => return Err(Some(e.to_string())),
        };
        let record: Record =
            toml::from_str(&text).map_err(|e| Some(format!("its record is damaged: {e}")))?;
        if record.digest != digest {
            return Err(Some(
                "the VM's configuration changed since it was saved (vibebox.toml, grants, image, keys or QEMU)"
                    .into(),
            ));
        }
        let facts = disk_facts(disk).map_err(|e| Some(format!("the disk: {e}")))?;
        if facts != (record.disk_len, record.disk_mtime_ns) {
            return Err(Some("the disk changed since the state was saved".into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(dir.join(STATE))
            .map_err(|e| Some(format!("the saved state: {e}")))?;
        let m = file.metadata().map_err(|e| Some(e.to_string()))?;
        if !m.is_file() || m.len() != record.state_len {
            return Err(Some(format!(
                "the saved state is {} bytes, its record says {}",
                m.len(),
                record.state_len
            )));
        }
        Ok((file, record))
    })();
    discard(dir);
    if taken.is_ok() && fs::symlink_metadata(dir.join(STATE)).is_ok() {
        // Not unlinked: it could be used again after this resume moved the disk on.
        return Take::Cold(Some(
            "the saved state could not be removed before use".into(),
        ));
    }
    match taken {
        Ok((file, record)) => Take::Resume(file, record),
        Err(why) => Take::Cold(why),
    }
}

/// A QMP connection of its own (QEMU serves one client at a time), blocking, able
/// to pass a descriptor.
struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Control {
    fn connect(path: &Path) -> Result<Control, SnapshotError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(REPLY_WAIT))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut c = Control { stream, reader };
        c.reply("greeting")?;
        c.run("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    /// The next reply (events are skipped); QEMU's lines are bounded by what its
    /// monitor writes, not by the guest.
    fn reply(&mut self, command: &str) -> Result<Value, SnapshotError> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(SnapshotError::Closed);
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| SnapshotError::Refused {
                command: command.into(),
                message: e.to_string(),
            })?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(SnapshotError::Refused {
                    command: command.into(),
                    message: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .into(),
                });
            }
            return Ok(v.get("return").cloned().unwrap_or(v));
        }
    }

    fn run(&mut self, command: &str, args: Value) -> Result<Value, SnapshotError> {
        let line = json!({"execute": command, "arguments": args}).to_string();
        self.stream.write_all(line.as_bytes())?;
        self.reply(command)
    }

    /// Runs `command` with `fd` passed alongside (SCM_RIGHTS), as `getfd` needs.
    fn run_with_fd(
        &mut self,
        command: &str,
        args: Value,
        fd: RawFd,
    ) -> Result<Value, SnapshotError> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let line = json!({"execute": command, "arguments": args}).to_string();
        let iov = [std::io::IoSlice::new(line.as_bytes())];
        let fds = [fd];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from)?;
        if sent < line.len() {
            self.stream.write_all(&line.as_bytes()[sent..])?;
        }
        self.reply(command)
    }

    fn status(&mut self) -> Result<String, SnapshotError> {
        let v = self.run("query-status", json!({}))?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string())
    }
}

/// Saves the running VM of the QMP socket `qmp` into `dir`'s temp state file:
/// pauses the guest, migrates into the file, waits for the end and syncs it. The
/// caller then quits QEMU and [`commit`]s. On failure the temp file is removed and
/// the guest runs again (for the cold path's power-off).
pub fn save(qmp: &Path, dir: &Path, within: Duration) -> Result<(), SnapshotError> {
    let mut c = Control::connect(qmp)?;
    let tmp = dir.join(STATE_TMP);
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        // The state can be as big as the guest's memory (a guest may fill it with
        // what does not compress): a save that could fill the host's disk is not
        // started, and the stop powers off instead.
        let memory = c
            .run("query-memory-size-summary", json!({}))?
            .get("base-memory")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|v| {
                #[allow(clippy::unnecessary_cast)] // u32 on macOS
                let blocks = v.blocks_available() as u64;
                blocks * v.fragment_size()
            })
            .unwrap_or(0);
        if free < memory.saturating_add(SPACE_MARGIN) {
            return Err(SnapshotError::Failed(format!(
                "{} MiB free beside the session, the guest has {} MiB of memory: not saved",
                free >> 20,
                memory >> 20
            )));
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        c.run("stop", json!({}))?;
        // QEMU 7.2 throttles a migration to 128 MiB/s by default; a file takes more.
        c.run(
            "migrate-set-parameters",
            json!({"max-bandwidth": 64u64 << 30}),
        )?;
        c.run_with_fd("getfd", json!({"fdname": FD_NAME}), file.as_raw_fd())?;
        c.run("migrate", json!({"uri": format!("fd:{FD_NAME}")}))?;
        let deadline = Instant::now() + within;
        loop {
            let v = c.run("query-migrate", json!({}))?;
            match v.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    let why = v
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(SnapshotError::Failed(why.to_string()));
                }
                _ if Instant::now() > deadline => {
                    let _ = c.run("migrate_cancel", json!({}));
                    return Err(SnapshotError::Timeout(within));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        file.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        let _ = c.run("cont", json!({}));
    }
    result
}

/// Asks QEMU (whose state was saved) to quit, on a connection of its own.
pub fn quit(qmp: &Path) {
    if let Ok(mut c) = Control::connect(qmp) {
        let _ = c.run("quit", json!({}));
    }
}

/// Puts a saved state in place once QEMU has exited: the record (with the disk as
/// QEMU left it), then the state under its final name.
pub fn commit(dir: &Path, disk: &Path, digest: &str, ipv4: Option<String>) -> std::io::Result<u64> {
    let tmp = dir.join(STATE_TMP);
    let done = (|| {
        let state_len = fs::symlink_metadata(&tmp)?.len();
        let (disk_len, disk_mtime_ns) = disk_facts(disk)?;
        let record = Record {
            digest: digest.to_string(),
            state_len,
            disk_len,
            disk_mtime_ns,
            ipv4,
        };
        let text = toml::to_string(&record).map_err(std::io::Error::other)?;
        statefile::write_atomic(&dir.join(RECORD), text.as_bytes(), 0o600)
            .map_err(std::io::Error::other)?;
        fs::rename(&tmp, dir.join(STATE))?;
        statefile::sync_dir(dir)?;
        Ok(state_len)
    })();
    if done.is_err() {
        discard(dir);
    }
    done
}

/// Loads `state` into the QEMU of socket `qmp` (started paused, with `-incoming
/// defer`), then lets the guest run. `alive` is polled: a QEMU that exits (a bad or
/// truncated stream ends it) fails the resume at once.
pub fn resume(
    qmp: &Path,
    state: &File,
    within: Duration,
    alive: impl Fn() -> bool,
) -> Result<(), SnapshotError> {
    let deadline = Instant::now() + within;
    let mut c = loop {
        match Control::connect(qmp) {
            Ok(c) => break c,
            Err(_) if alive() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e),
        }
    };
    c.run_with_fd("getfd", json!({"fdname": FD_NAME}), state.as_raw_fd())?;
    c.run("migrate-incoming", json!({"uri": format!("fd:{FD_NAME}")}))?;
    loop {
        match c.status()?.as_str() {
            "inmigrate" => {}
            "paused" | "prelaunch" | "postmigrate" => break,
            other => {
                return Err(SnapshotError::Failed(format!(
                    "QEMU is {other:?} after loading the state"
                )));
            }
        }
        if !alive() {
            return Err(SnapshotError::Closed);
        }
        if Instant::now() > deadline {
            return Err(SnapshotError::Timeout(within));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = c.run("query-migrate", json!({}))?;
    let status = v.get("status").and_then(Value::as_str).unwrap_or("");
    if status != "completed" {
        return Err(SnapshotError::Failed(format!(
            "the incoming migration is {status:?}"
        )));
    }
    c.run("cont", json!({}))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(dir: &Path, disk: &Path, digest: &str) {
        fs::write(dir.join(STATE_TMP), b"QEVM state").unwrap();
        commit(dir, disk, digest, Some("10.0.2.15".into())).unwrap();
        assert!(exists(dir));
    }

    #[test]
    fn a_state_is_taken_once_and_only_for_the_same_machine_and_disk() {
        let t = tempfile::tempdir().unwrap();
        let (dir, disk) = (t.path(), t.path().join("disk.qcow2"));
        fs::write(&disk, b"disk").unwrap();
        saved(dir, &disk, "d1");
        match take(dir, &disk, "d1") {
            Take::Resume(_, r) => assert_eq!(r.ipv4.as_deref(), Some("10.0.2.15")),
            Take::Cold(why) => panic!("cold: {why:?}"),
        }
        assert!(!exists(dir) && !dir.join(STATE).exists() && !dir.join(RECORD).exists());
        assert!(matches!(take(dir, &disk, "d1"), Take::Cold(None)));

        saved(dir, &disk, "d1");
        let Take::Cold(Some(why)) = take(dir, &disk, "d2") else {
            panic!("another machine resumed")
        };
        assert!(why.contains("configuration changed"), "{why}");
        assert!(!dir.join(STATE).exists());

        saved(dir, &disk, "d1");
        fs::write(&disk, b"disk written after the save").unwrap();
        let Take::Cold(Some(why)) = take(dir, &disk, "d1") else {
            panic!("a changed disk resumed")
        };
        assert!(why.contains("disk changed"), "{why}");

        fs::write(&disk, b"disk").unwrap();
        saved(dir, &disk, "d1");
        let f = OpenOptions::new()
            .write(true)
            .open(dir.join(STATE))
            .unwrap();
        f.set_len(3).unwrap();
        let Take::Cold(Some(why)) = take(dir, &disk, "d1") else {
            panic!("a truncated state resumed")
        };
        assert!(why.contains("bytes"), "{why}");
        assert!(!dir.join(STATE).exists());
    }

    #[test]
    fn a_state_planted_as_a_link_or_without_record_is_not_used() {
        let t = tempfile::tempdir().unwrap();
        let (dir, disk) = (t.path(), t.path().join("disk.qcow2"));
        fs::write(&disk, b"disk").unwrap();
        fs::write(dir.join(STATE), b"x").unwrap();
        assert!(matches!(take(dir, &disk, "d"), Take::Cold(Some(_))));
        assert!(!dir.join(STATE).exists());
        saved(dir, &disk, "d");
        fs::write(dir.join("elsewhere"), b"QEVM state").unwrap();
        fs::remove_file(dir.join(STATE)).unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join(STATE)).unwrap();
        assert!(matches!(take(dir, &disk, "d"), Take::Cold(Some(_))));
        assert!(
            dir.join("elsewhere").exists(),
            "the link's target is left alone"
        );
    }

    #[test]
    fn the_digest_covers_the_command_line_and_the_fw_cfg_contents() {
        let t = tempfile::tempdir().unwrap();
        let fw = t.path().join("explain");
        fs::write(&fw, "a").unwrap();
        let cfg = vec![("explain".to_string(), fw.clone())];
        let argv: Vec<OsString> = vec!["-m".into(), "1024M".into()];
        let q = Path::new("/usr/bin/qemu-system-x86_64");
        let d = digest(q, &argv, &cfg, "x");
        assert_eq!(d, digest(q, &argv, &cfg, "x"));
        assert_ne!(d, digest(q, &["-m".into(), "2048M".into()], &cfg, "x"));
        assert_ne!(d, digest(q, &argv, &cfg, "y"));
        fs::write(&fw, "b").unwrap();
        assert_ne!(d, digest(q, &argv, &cfg, "x"));
    }
}
