//! Who a process is, not just its number: pid, start time and executable. A pid read
//! from state (or held after the process may have been reaped) can name an unrelated
//! process by the time it is used; the start time and executable cannot both match
//! by chance, so a signal is only ever sent to a process whose identity still matches.

use serde::{Deserialize, Serialize};

/// A process as vibebox started it. `start` is in the platform's own unit (clock
/// ticks since boot on Linux, microseconds since the epoch on macOS): it is only ever
/// compared with a value read the same way on the same host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: u32,
    pub start: u64,
    /// The executable's path as the kernel reports it (an upgraded binary's
    /// "(deleted)" mark dropped, so an upgrade does not hide the process).
    pub exe: String,
}

impl ProcId {
    /// The identity of live process `pid` now; `None` when there is none (or only a
    /// zombie, which no signal can reach) or it cannot be read.
    pub fn of(pid: u32) -> Option<ProcId> {
        if pid == 0 || pid > i32::MAX as u32 {
            return None;
        }
        let (start, exe) = sys::read(pid)?;
        Some(ProcId { pid, start, exe })
    }

    /// The identity of this process.
    pub fn me() -> Option<ProcId> {
        ProcId::of(std::process::id())
    }

    /// Whether the process this identity names still runs (same pid, start time and
    /// executable, not a zombie).
    pub fn is_running(&self) -> bool {
        ProcId::of(self.pid).is_some_and(|now| now == *self)
    }

    /// `PID:START:EXE`, for the watchdog's command line.
    pub fn to_arg(&self) -> String {
        format!("{}:{}:{}", self.pid, self.start, self.exe)
    }

    /// The inverse of [`ProcId::to_arg`] (the executable may itself hold `:`).
    pub fn from_arg(s: &str) -> Option<ProcId> {
        let mut it = s.splitn(3, ':');
        let pid = it.next()?.parse().ok()?;
        let start = it.next()?.parse().ok()?;
        let exe = it.next()?.to_string();
        Some(ProcId { pid, start, exe })
    }
}

fn clean_exe(path: String) -> String {
    match path.strip_suffix(" (deleted)") {
        Some(p) => p.to_string(),
        None => path,
    }
}

#[cfg(target_os = "linux")]
mod sys {
    /// Start time (field 22 of `/proc/PID/stat`) and `/proc/PID/exe`.
    pub fn read(pid: u32) -> Option<(u64, String)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let start = parse_stat(&stat)?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        Some((start, super::clean_exe(exe.to_string_lossy().into_owned())))
    }

    /// `PID (COMM) STATE ...`: COMM may hold spaces and parentheses, so the fields
    /// start after the last `)`. A zombie has no identity.
    pub fn parse_stat(stat: &str) -> Option<u64> {
        let (_, rest) = stat.rsplit_once(')')?;
        let mut fields = rest.split_whitespace();
        let state = fields.next()?;
        if state == "Z" || state == "X" {
            return None;
        }
        // `state` was field 3; starttime is field 22.
        fields.nth(18)?.parse().ok()
    }
}

#[cfg(target_vendor = "apple")]
mod sys {
    use nix::libc;

    /// Start time from `proc_pidinfo(PROC_PIDTBSDINFO)`, path from `proc_pidpath`.
    pub fn read(pid: u32) -> Option<(u64, String)> {
        // SAFETY: proc_bsdinfo is plain data; the kernel fills at most `size` bytes.
        let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
        let n = unsafe {
            libc::proc_pidinfo(
                pid as libc::c_int,
                libc::PROC_PIDTBSDINFO,
                0,
                (&mut info as *mut libc::proc_bsdinfo).cast(),
                size,
            )
        };
        if n != size {
            return None;
        }
        // SZOMB: a zombie has no identity.
        if info.pbi_status == 5 {
            return None;
        }
        let start = info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec;
        let mut buf = vec![0u8; libc::PROC_PIDPATHINFO_MAXSIZE as usize];
        // SAFETY: `buf` is as long as the size passed.
        let len = unsafe {
            libc::proc_pidpath(
                pid as libc::c_int,
                buf.as_mut_ptr().cast(),
                buf.len() as u32,
            )
        };
        if len <= 0 {
            return None;
        }
        buf.truncate(len as usize);
        Some((
            start,
            super::clean_exe(String::from_utf8_lossy(&buf).into_owned()),
        ))
    }
}

#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
mod sys {
    /// No way to tell processes apart: nothing is ever identified, so nothing is
    /// signalled by pid.
    pub fn read(_pid: u32) -> Option<(u64, String)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_stable_identity() {
        let me = ProcId::me().expect("own identity");
        assert_eq!(me.pid, std::process::id());
        assert!(me.is_running());
        assert_eq!(ProcId::me(), Some(me.clone()));
        let later = ProcId {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(!later.is_running());
        let other = ProcId {
            exe: "/bin/not-this".into(),
            ..me.clone()
        };
        assert!(!other.is_running());
        assert_eq!(ProcId::from_arg(&me.to_arg()), Some(me));
    }

    #[test]
    fn args_keep_colons_in_the_path() {
        let id = ProcId {
            pid: 7,
            start: 99,
            exe: "/opt/a:b/qemu (deleted)x".into(),
        };
        assert_eq!(ProcId::from_arg(&id.to_arg()), Some(id));
        assert_eq!(ProcId::from_arg("7:x:/bin/sh"), None);
        assert_eq!(ProcId::from_arg("7"), None);
        assert_eq!(clean_exe("/usr/bin/q (deleted)".into()), "/usr/bin/q");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stat_fields_after_a_hostile_comm() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(sys::parse_stat(stat), Some(123456));
        let zombie = "42 (a) Z 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(sys::parse_stat(zombie), None);
        assert_eq!(ProcId::of(0), None);
    }
}
