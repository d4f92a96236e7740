//! `network.log`: one line per decision the gateway makes that a user may want to
//! see (every denial, every connection let through), naming the session, the name,
//! the port and the rule. Bounded: past [`MAX_BYTES`] the file moves to
//! `network.log.1` and a new one starts (a guest can make many denials).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAX_BYTES: u64 = 8 << 20;

pub struct NetLog {
    session: String,
    out: Option<Capped>,
}

/// A log file that the guest can make write without end (network decisions, its
/// serial console): past `max` bytes it moves to `<name>.1` (replacing the one
/// before) and starts again, so the two hold at most twice `max`.
pub struct Capped {
    path: PathBuf,
    max: u64,
    file: Option<File>,
    written: u64,
}

impl Capped {
    pub fn new(path: &Path, max: u64) -> Capped {
        Capped {
            path: path.to_path_buf(),
            max,
            file: None,
            written: fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        }
    }

    /// Appends `bytes` (a write larger than `max` is cut to it).
    pub fn write(&mut self, bytes: &[u8]) {
        let bytes = &bytes[..bytes.len().min(self.max as usize)];
        if self.written + bytes.len() as u64 > self.max {
            self.file = None;
            let _ = fs::rename(&self.path, self.path.with_extension("log.1"));
            self.written = 0;
        }
        if self.file.is_none() {
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
        }
        if let Some(f) = &mut self.file
            && f.write_all(bytes).is_ok()
        {
            self.written += bytes.len() as u64;
        }
    }
}

impl NetLog {
    pub fn new(path: &Path, session: &str) -> NetLog {
        NetLog {
            session: session.to_string(),
            out: Some(Capped::new(path, MAX_BYTES)),
        }
    }

    /// A log that writes nowhere (tests that do not look at it).
    pub fn none() -> NetLog {
        NetLog {
            session: String::new(),
            out: None,
        }
    }

    pub fn line(&mut self, what: &str) {
        let Some(out) = &mut self.out else {
            return;
        };
        let line = format!(
            "{} session {} {what}\n",
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            self.session
        );
        out.write(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_the_session_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("network.log");
        let mut log = NetLog::new(&path, "0123");
        log.line("deny dns evil.com: not in the allowlist");
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(" session 0123 deny dns evil.com: not in the allowlist\n"));
        let big = "x".repeat(1 << 20);
        for _ in 0..9 {
            log.line(&big);
        }
        assert!(path.with_extension("log.1").exists());
        assert!(fs::metadata(&path).unwrap().len() <= MAX_BYTES);
    }
}
