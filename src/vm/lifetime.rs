//! QEMU and virtiofsd never outlive the process that started them, on every host, and
//! no pid is signalled unless it is still the process vibebox started.
//!
//! Linux's parent-death signal (`host::end_with_parent`) is one guard; macOS has
//! none, and even on Linux it is tied to the starting thread. So each child also gets
//! a watchdog: `vibebox __watchdog`, whose stdin is the read end of a pipe whose write
//! end only the starter holds. When the starter dies, however it dies, the kernel
//! closes that end and the watchdog reads EOF (it also checks the starter's identity
//! every second, in case another process inherited the write end). It then ends the
//! child: SIGTERM, up to 5 s, SIGKILL, checking the child's identity before each
//! signal. The gateway is a task inside the supervisor and ends with it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::store::procid::ProcId;

/// How long a child gets between SIGTERM and SIGKILL (QEMU flushes its disks).
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// How often the watchdog checks its starter's identity and its children.
const POLL: Duration = Duration::from_secs(1);
/// The hidden subcommand that runs [`watch`].
pub const SUBCOMMAND: &str = "__watchdog";
/// The watchdog's first line on stdout, once it guards its children.
const READY_LINE: &str = "watching";

/// What [`signal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signalled {
    Sent,
    /// No process with that identity runs any more: nothing was sent.
    Gone,
}

/// The one way vibebox signals a process it started: only while `id` still names
/// the same process (pid, start time, executable). On Linux the check and the
/// signal go through one pidfd, so the pid cannot be reused between them.
pub fn signal(id: &ProcId, sig: Signal) -> Signalled {
    #[cfg(target_os = "linux")]
    if let Some(fd) = pidfd::open(id.pid) {
        // The pidfd pins the process that had this pid when it was opened: if that
        // one is ours, the signal reaches it and nothing else.
        if !id.is_running() {
            return Signalled::Gone;
        }
        return if pidfd::send(&fd, sig) {
            Signalled::Sent
        } else {
            Signalled::Gone
        };
    }
    if !id.is_running() {
        return Signalled::Gone;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(id.pid as i32), sig) {
        Ok(()) => Signalled::Sent,
        Err(_) => Signalled::Gone,
    }
}

/// SIGTERM, up to `grace` for it to end, then SIGKILL; identity checked before each.
/// Returns once the process is gone or `grace` has passed after the SIGKILL.
pub fn end(id: &ProcId, grace: Duration) {
    if signal(id, Signal::SIGTERM) == Signalled::Gone {
        return;
    }
    if wait_gone(id, grace) {
        return;
    }
    if signal(id, Signal::SIGKILL) == Signalled::Sent {
        wait_gone(id, grace);
    }
}

fn wait_gone(id: &ProcId, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while id.is_running() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[cfg(target_os = "linux")]
mod pidfd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use nix::libc;
    use nix::sys::signal::Signal;

    /// `None` on kernels without pidfds (before 5.3) or when the pid is gone.
    pub fn open(pid: u32) -> Option<OwnedFd> {
        // SAFETY: a plain syscall; a non-negative result is a new fd we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub fn send(fd: &OwnedFd, sig: Signal) -> bool {
        // SAFETY: a plain syscall on a fd we hold.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }
}

/// A child's lease on life: while this is held the child may run; when it is
/// dropped, or when the process holding it dies, the watchdog ends the child.
pub struct Watchdog {
    child: ProcId,
    /// The write end of the watchdog's stdin; closing it is the signal.
    lease: Option<std::io::PipeWriter>,
    process: Option<Child>,
}

impl Watchdog {
    /// The identity of the guarded child, taken right after it started.
    pub fn child(&self) -> &ProcId {
        &self.child
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.lease.take());
        // The watchdog may take up to TERM_GRACE to end a child that is still up;
        // reap it without holding up the drop.
        if let Some(mut p) = self.process.take() {
            std::thread::spawn(move || {
                let _ = p.wait();
            });
        }
    }
}

/// Why a child could not be guarded.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("the process watchdog cannot start: {0}")]
    Spawn(std::io::Error),
    #[error("cannot read the identity of process {0} (it may have ended already)")]
    NoIdentity(u32),
    #[error("the process watchdog ({exe}) did not start; is it the vibebox binary? ({why})")]
    NotReady { exe: String, why: String },
}

/// Starts a watchdog for `child`, which this process just started (and has not
/// reaped, so its pid cannot have been reused yet). If the watchdog cannot start,
/// the child is killed: no child runs unguarded.
pub fn guard(child: &mut Child) -> Result<Watchdog, GuardError> {
    let result = guard_pid(child.id());
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

fn guard_pid(pid: u32) -> Result<Watchdog, GuardError> {
    let id = ProcId::of(pid).ok_or(GuardError::NoIdentity(pid))?;
    let me = ProcId::me().ok_or(GuardError::NoIdentity(std::process::id()))?;
    let exe = own_exe().map_err(GuardError::Spawn)?;
    // std makes both ends close-on-exec; only the watchdog's stdin (a dup) survives.
    let (read, write) = std::io::pipe().map_err(GuardError::Spawn)?;
    let mut cmd = Command::new(&exe);
    cmd.arg(SUBCOMMAND)
        .arg("--parent")
        .arg(me.to_arg())
        .arg("--child")
        .arg(id.to_arg())
        .stdin(read)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut process = cmd.spawn().map_err(GuardError::Spawn)?;
    let not_ready = |why: String| GuardError::NotReady {
        exe: exe.display().to_string(),
        why,
    };
    let out = process.stdout.take().expect("piped");
    match first_line(out) {
        Ok(l) if l.trim() == READY_LINE => {}
        Ok(l) => {
            let _ = process.kill();
            let _ = process.wait();
            return Err(not_ready(format!("it said {:?}", l.trim())));
        }
        Err(e) => {
            let _ = process.kill();
            let _ = process.wait();
            return Err(not_ready(e.to_string()));
        }
    }
    Ok(Watchdog {
        child: id,
        lease: Some(write),
        process: Some(process),
    })
}

/// This very binary: on Linux through `/proc/self/exe`, which still opens it after
/// an upgrade replaced the file (a long-running supervisor boots again later).
fn own_exe() -> std::io::Result<std::path::PathBuf> {
    if cfg!(target_os = "linux") {
        Ok(std::path::PathBuf::from("/proc/self/exe"))
    } else {
        std::env::current_exe()
    }
}

fn first_line(out: ChildStdout) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(out.take(256)).read_line(&mut line)?;
    Ok(line)
}

/// The watchdog process (`vibebox __watchdog`): waits for its starter to go (EOF on
/// stdin, or the starter's identity no longer running), then ends its children.
/// Returns early when every child has ended on its own.
pub fn watch(parent: &ProcId, children: &[ProcId]) {
    use nix::sys::signal::{SigHandler, signal as set_handler};
    // A terminal's ^C or hangup reaches the whole process group; the starter handles
    // it and the watchdog must stay to clean up if the starter does not.
    for s in [Signal::SIGINT, Signal::SIGHUP, Signal::SIGPIPE] {
        // SAFETY: setting a signal to SIG_IGN runs no handler code.
        let _ = unsafe { set_handler(s, SigHandler::SigIgn) };
    }
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{READY_LINE}");
    let _ = stdout.flush();
    let stdin = std::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        if !children.iter().any(ProcId::is_running) {
            return;
        }
        if !parent.is_running() {
            break;
        }
        let mut fds = [nix::poll::PollFd::new(
            stdin.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let timeout = nix::poll::PollTimeout::try_from(POLL).unwrap_or(nix::poll::PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {
                let revents = fds[0].revents().unwrap_or(nix::poll::PollFlags::empty());
                if revents.intersects(
                    nix::poll::PollFlags::POLLHUP
                        | nix::poll::PollFlags::POLLERR
                        | nix::poll::PollFlags::POLLNVAL,
                ) {
                    break;
                }
                // Nobody writes to the lease; a read of 0 bytes is the starter gone.
                match stdin.lock().read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    let why = if parent.is_running() {
        "let it go"
    } else {
        "is gone"
    };
    let threads: Vec<_> = children
        .iter()
        .filter(|c| c.is_running())
        .cloned()
        .map(|c| {
            tracing::warn!(
                "watchdog: process {} that started {} ({}) {why}; ending it",
                parent.pid,
                c.pid,
                c.exe
            );
            std::thread::spawn(move || end(&c, TERM_GRACE))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// The watchdog's command line, for `commands`: `--parent ID --child ID...`.
pub fn parse_args(parent: &str, children: &[String]) -> Result<(ProcId, Vec<ProcId>), String> {
    let bad = |s: &str| format!("{s:?} is not a process identity (PID:START:EXE)");
    let parent = ProcId::from_arg(parent).ok_or_else(|| bad(parent))?;
    let children = children
        .iter()
        .map(|c| ProcId::from_arg(c).ok_or_else(|| bad(c)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((parent, children))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Here the "own binary" is the test harness, which is no watchdog: the guard
    /// must fail and take the child with it, never leave it running unguarded.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_child_that_cannot_be_guarded_is_not_left_running() {
        let mut child = Command::new("sleep").arg("600").spawn().unwrap();
        let id = ProcId::of(child.id()).unwrap();
        let err = guard(&mut child)
            .err()
            .expect("the test harness is no watchdog");
        assert!(matches!(err, GuardError::NotReady { .. }), "{err}");
        assert!(!id.is_running());
        assert!(child.try_wait().unwrap().is_some());
    }

    #[test]
    fn signals_reach_only_the_same_process() {
        let mut child = Command::new("sleep").arg("600").spawn().unwrap();
        let id = ProcId::of(child.id()).unwrap();
        let impostor = ProcId {
            start: id.start + 1,
            ..id.clone()
        };
        assert_eq!(signal(&impostor, Signal::SIGKILL), Signalled::Gone);
        assert!(id.is_running());
        end(&id, TERM_GRACE);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
        assert_eq!(signal(&id, Signal::SIGKILL), Signalled::Gone);
    }

    #[test]
    fn watchdog_arguments() {
        let (p, c) = parse_args("1:2:/a", &["3:4:/b:c".into()]).unwrap();
        assert_eq!((p.pid, c[0].exe.as_str()), (1, "/b:c"));
        assert!(
            parse_args("x", &[])
                .unwrap_err()
                .contains("not a process identity")
        );
    }
}
