//! The client side of the control socket: find or start the supervisor, attach (hold
//! a reference), ask for status, ask it to stop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::protocol::{self, Endpoint, Message, Op, Request};
use crate::paths::{self, Home, SessionDir};
use crate::session::SessionId;
use crate::statefile;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}; see {log}")]
    Failed { message: String, log: String },
    #[error("the supervisor did not start; see {0}")]
    NoSupervisor(PathBuf),
    #[error("the supervisor stopped answering; see {0}")]
    Lost(PathBuf),
    #[error("cannot start the supervisor: {0}")]
    Spawn(std::io::Error),
    #[error(
        "the VM was stopped (`vibebox stop`) before it was ready; run vibebox again to start it"
    )]
    StoppedWhileStarting,
    #[error(
        "the VM of this session did not stop within {}s (its supervisor still holds {}); nothing was removed: see {} and try again",
        waited.as_secs(),
        lock.display(),
        log.display()
    )]
    NotStopped {
        lock: PathBuf,
        log: PathBuf,
        waited: Duration,
    },
    #[error("the VM is not running; start it with `vibebox` (or `vibebox exec`) first")]
    NotRunning,
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    State(#[from] statefile::Error),
}

/// Connects to a unix socket whatever the length of its path: paths past the
/// sockaddr limit go through /proc/self/fd on Linux.
pub fn connect(path: &Path) -> std::io::Result<UnixStream> {
    if path.as_os_str().len() < 100 {
        return UnixStream::connect(path);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let dir = std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?;
        let name = path.file_name().unwrap_or_default();
        let short = Path::new("/proc/self/fd")
            .join(dir.as_raw_fd().to_string())
            .join(name);
        UnixStream::connect(short)
    }
    #[cfg(not(target_os = "linux"))]
    {
        UnixStream::connect(path)
    }
}

fn send(stream: &mut UnixStream, op: Op) -> std::io::Result<()> {
    stream.write_all(
        protocol::encode(&Request {
            v: protocol::VERSION,
            op,
        })
        .as_bytes(),
    )
}

/// `(state, clients)` from a live supervisor, or `None` when none answers.
pub fn query_status(session: &SessionDir) -> Option<(String, u32)> {
    let mut s = connect(&session.control_socket()).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    send(&mut s, Op::Status).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    match serde_json::from_str(&line).ok()? {
        Message::Status { vm, clients } => Some((vm, clients)),
        _ => None,
    }
}

/// Asks a running VM's supervisor to publish or unpublish a port now; the reply
/// says what it did (or why not).
pub fn change_ports(session: &SessionDir, op: Op) -> Result<String, Error> {
    let mut s = connect(&session.control_socket()).map_err(|_| Error::NotRunning)?;
    // Publishing asks the guest's ssh for a forward: seconds under emulation.
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(Error::Spawn)?;
    send(&mut s, op).map_err(|_| Error::NotRunning)?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|_| Error::Lost(session.supervisor_log()))?;
    match serde_json::from_str(&line) {
        Ok(Message::Notice { text }) => Ok(text),
        Ok(Message::Error { message, .. }) => Err(Error::Refused(message)),
        _ => Err(Error::Lost(session.supervisor_log())),
    }
}

/// Starts a supervisor for the session, detached: its own session (no controlling
/// terminal), stdio to its log. A second one started at the same time loses the lock
/// race and exits quietly.
pub fn spawn_supervisor(home: &Home, project: &Path, id: SessionId) -> Result<(), Error> {
    let sd = home.session(id);
    statefile::ensure_dir(sd.dir(), 0o700)?;
    statefile::ensure_dir(&sd.logs(), 0o700)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sd.supervisor_log())
        .map_err(Error::Spawn)?;
    statefile::give_to_user(&sd.supervisor_log()).map_err(Error::Spawn)?;
    let exe = std::env::current_exe().map_err(Error::Spawn)?;
    let mut cmd = Command::new(exe);
    cmd.arg("__supervise")
        .arg("--id")
        .arg(id.to_string())
        .arg("--project")
        .arg(project)
        .env("VIBEBOX_HOME", home.root())
        // Its log is a file read after the fact: what it decided (idle checks,
        // published ports) belongs there, not only warnings.
        .env(
            "VIBEBOX_LOG",
            std::env::var("VIBEBOX_LOG").unwrap_or_else(|_| "warn,vibebox=info".into()),
        )
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(Error::Spawn)?)
        .stderr(log);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().map_err(Error::Spawn)?;
    // Reap it in the background so it never lingers as a zombie of this client.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

/// A held reference on a running VM: dropping it (or this process dying) releases it.
pub struct Attached {
    pub endpoint: Endpoint,
    pub warnings: Vec<String>,
    /// The connection, shared with the watcher thread; shut down on drop so the
    /// reference goes now, not when the process ends.
    stream: UnixStream,
    /// What the supervisor said after "ready" (the VM stopping or dying).
    later: std::sync::mpsc::Receiver<Message>,
}

impl Attached {
    /// After the shell or command ended abnormally: why, if the VM stopped or died
    /// under it. Waits up to `wait` for the supervisor to say so.
    pub fn vm_ended(&self, wait: Duration) -> Option<Message> {
        let deadline = Instant::now() + wait;
        let mut last = None;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let got = self.later.recv_timeout(left);
            tracing::debug!("after the session: {got:?}");
            match got {
                Ok(m @ Message::Error { .. }) => return Some(m),
                Ok(m @ (Message::Stopping | Message::Stopped)) => last = Some(m),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        last
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Connects to (or starts) the session's supervisor and attaches; `progress` sees
/// each state until the VM is ready. After that a watcher thread keeps the
/// connection (the reference) and reports if the VM goes away.
pub fn attach(
    home: &Home,
    project: &Path,
    id: SessionId,
    mut progress: impl FnMut(&Message),
) -> Result<Attached, Error> {
    let sd = home.session(id);
    // A failure met on every attempt is not stale: it is the answer.
    let mut last_error = None;
    for _attempt in 0..3 {
        let mut stream = match connect(&sd.control_socket()) {
            Ok(s) => s,
            Err(_) => {
                spawn_supervisor(home, project, id)?;
                wait_for_socket(home, project, id)?
            }
        };
        send(&mut stream, Op::Attach).map_err(|_| Error::Lost(sd.supervisor_log()))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(Error::Spawn)?);
        let mut line = String::new();
        let mut first = true;
        // `stopped` after a boot this client waited for, then the end of the
        // connection: that boot was cancelled by `vibebox stop` (a shutdown that is
        // not asked for boots again while a client is attached). A client that only
        // arrived during a stop saw no boot, and starts a fresh one instead.
        let mut waited_for_boot = false;
        let mut stopped = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let Ok(msg) = serde_json::from_str::<Message>(&line) else {
                continue;
            };
            // A supervisor that is already finishing (its VM failed or stopped just
            // before we connected) answers with its last state: start over with a
            // fresh one rather than report an old failure, once it has let go.
            if std::mem::take(&mut first) && matches!(msg, Message::Error { .. } | Message::Stopped)
            {
                if let Message::Error { message, log } = msg {
                    last_error = Some(Error::Failed { message, log });
                }
                drop(reader);
                drop(stream);
                wait_unlocked(&sd, Duration::from_secs(5))?;
                break;
            }
            match msg {
                Message::Starting | Message::Booting { .. } => {
                    waited_for_boot = true;
                    stopped = false;
                }
                Message::Stopped => stopped = true,
                _ => {}
            }
            progress(&msg);
            match msg {
                Message::Ready { ssh, warnings } => {
                    let (tx, later) = std::sync::mpsc::channel();
                    std::thread::spawn(move || watch(reader, tx));
                    return Ok(Attached {
                        endpoint: ssh,
                        warnings,
                        stream,
                        later,
                    });
                }
                Message::Error { message, log } => return Err(Error::Failed { message, log }),
                _ => {}
            }
        }
        if stopped && waited_for_boot {
            return Err(Error::StoppedWhileStarting);
        }
        // The supervisor went away before the VM was ready (it was finishing a
        // shutdown as we arrived): start over with a fresh one.
    }
    Err(last_error.unwrap_or_else(|| Error::Lost(sd.supervisor_log())))
}

/// Waits for the supervisor's socket. A supervisor started while an old one was
/// still exiting loses the lock and quits, so every second without a socket another
/// one is started (the spare ones exit quietly).
fn wait_for_socket(home: &Home, project: &Path, id: SessionId) -> Result<UnixStream, Error> {
    let sd = home.session(id);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut respawn = Instant::now() + Duration::from_secs(1);
    loop {
        if let Ok(s) = connect(&sd.control_socket()) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(Error::NoSupervisor(sd.supervisor_log()));
        }
        if Instant::now() > respawn {
            spawn_supervisor(home, project, id)?;
            respawn = Instant::now() + Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads what the supervisor says after "ready" and hands it to the main thread,
/// which reports it once the shell or command has ended.
fn watch(mut reader: BufReader<UnixStream>, tx: std::sync::mpsc::Sender<Message>) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        tracing::debug!("supervisor says: {}", line.trim());
        match serde_json::from_str::<Message>(&line) {
            // Said now, while the shell runs (its terminal is in raw mode, hence the
            // carriage returns); a command's output in a pipe or file is left alone.
            Ok(Message::Notice { text }) => {
                use std::io::IsTerminal;
                if std::io::stderr().is_terminal() {
                    eprint!("\r\nvibebox: {}\r\n", crate::escape::escape(&text));
                }
            }
            Ok(m) => {
                if tx.send(m).is_err() {
                    return;
                }
            }
            Err(_) => {}
        }
    }
}

/// How long `stop` waits for a supervisor's shutdown: the save (the guest's prepare
/// step 15 s, the state written 20 s) and, when it fails, the graceful power-off,
/// QMP quit and kill (40 s) take up to 75 s together.
const STOP_WAIT: Duration = Duration::from_secs(80);

/// Asks the session's supervisor to shut the VM down (cancelling a boot in
/// progress) and waits until the supervisor has let go of its lock, which it holds
/// for as long as it owns a QEMU. `Ok(true)`: it was running and is gone now;
/// `Ok(false)`: nothing was running. An error means the VM could not be confirmed
/// gone, so callers must keep the session's state (its disk may be in use).
pub fn stop(session: &SessionDir) -> Result<bool, Error> {
    stop_as(session, false)
}

/// [`stop`]; `cold`: the guest is shut down, not saved (the next start boots cold).
pub fn stop_as(session: &SessionDir, cold: bool) -> Result<bool, Error> {
    let lock = session.dir().join(paths::SUPERVISOR_LOCK);
    let deadline = Instant::now() + STOP_WAIT;
    let not_stopped = || Error::NotStopped {
        lock: lock.clone(),
        log: session.supervisor_log(),
        waited: STOP_WAIT,
    };
    let started = Instant::now();
    let mut said = false;
    let mut s = loop {
        if let Ok(s) = connect(&session.control_socket()) {
            break s;
        }
        // No socket: either nothing runs (the lock is free), or a supervisor is
        // starting (it binds the socket after stopping an old QEMU) or ending (it
        // removed the socket and is about to exit).
        // Nothing runs. A cold stop still means a cold next start: a state saved by
        // the last stop goes, under the lock a start takes first.
        let discard = || {
            if cold {
                crate::vm::snapshot::discard(session.dir());
            }
        };
        if lock_free_then(&lock, discard)? {
            return Ok(false);
        }
        if Instant::now() > deadline {
            return Err(not_stopped());
        }
        if !said && started.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "vibebox: waiting for the session's supervisor to answer or exit (it holds {})",
                lock.display()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let supervisor = peer_pid(&s);
    let op = if cold { Op::StopCold } else { Op::Stop };
    send(&mut s, op).map_err(|_| Error::Lost(session.supervisor_log()))?;
    let _ = s.set_read_timeout(Some(STOP_WAIT));
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    let mut refused = false;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        match serde_json::from_str::<Message>(&line) {
            Ok(Message::Stopped) => break,
            Ok(Message::Error { .. }) => {
                refused = true;
                break;
            }
            _ => {}
        }
    }
    drop(reader);
    if refused && cold {
        // A supervisor of an older vibebox (before saved states: it never saves)
        // does not know the cold stop; its plain stop is one.
        return stop_as(session, false);
    }
    // The supervisor exits right after it has stopped QEMU (which also dies with
    // it). Its process ending is the proof; where the peer's pid is unknown, its
    // lock coming free. A client that arrived during the stop may already have
    // started a new supervisor, so the lock alone would not tell.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(10));
    let gone = match supervisor {
        Some(pid) => wait_exited(pid, left),
        None => wait_unlocked(session, left)?,
    };
    if gone { Ok(true) } else { Err(not_stopped()) }
}

/// The pid of the process at the other end of a unix socket (the supervisor that
/// bound the control socket), where the host tells it.
fn peer_pid(s: &UnixStream) -> Option<i32> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|c| c.pid())
            .filter(|p| *p > 0)
    }
    #[cfg(target_vendor = "apple")]
    {
        nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::LocalPeerPid)
            .ok()
            .filter(|p| *p > 0)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_vendor = "apple")))]
    {
        let _ = s;
        None
    }
}

/// Waits up to `wait` for process `pid` to end (a zombie counts as ended).
fn wait_exited(pid: i32, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            });
        if !alive {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether nobody holds the supervisor lock at `lock` (a missing session directory
/// counts as free: nothing can run there).
fn lock_free(lock: &Path) -> Result<bool, Error> {
    lock_free_then(lock, || ())
}

/// [`lock_free`], running `then` while the lock is held when it was free.
fn lock_free_then(lock: &Path, then: impl FnOnce()) -> Result<bool, Error> {
    match statefile::Lock::try_exclusive(lock) {
        Ok(Some(_held)) => {
            then();
            Ok(true)
        }
        Ok(None) => Ok(false),
        Err(statefile::Error::Lock { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

/// Waits up to `wait` for the session's supervisor lock to be free; whether it is.
fn wait_unlocked(session: &SessionDir, wait: Duration) -> Result<bool, Error> {
    let lock = session.dir().join(paths::SUPERVISOR_LOCK);
    let deadline = Instant::now() + wait;
    loop {
        if lock_free(&lock)? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
