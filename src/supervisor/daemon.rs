//! The supervisor process: one per running session, detached from any terminal.
//! It holds `supervisor.lock` for its whole life, owns QEMU, serves the control
//! socket, counts attached clients, and shuts the VM down when nobody uses it.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, watch};

use super::protocol::{self, Endpoint, Message, Op, Request};
use crate::paths::{self, Home, SessionDir};
use crate::session::SessionId;
use crate::ssh;
use crate::statefile::{self, Lock};
use crate::store::instance::Instance;
use crate::store::procid::ProcId;
use crate::vm::launch::{self, Plan};
use crate::vm::lifetime;
use crate::vm::qmp::Qmp;
use crate::vm::ready;

/// How long the guest may take from QEMU start to "ready" before the boot is
/// declared failed. TCG on a slow machine takes about a minute;
/// `VIBEBOX_READY_TIMEOUT_MS` overrides it.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

fn ready_timeout() -> Duration {
    std::env::var("VIBEBOX_READY_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(READY_TIMEOUT)
}
/// Bounded waits of the shutdown sequence: guest power-off, QMP quit, kill.
const POWEROFF_WAIT: Duration = Duration::from_secs(30);
const QUIT_WAIT: Duration = Duration::from_secs(5);
/// Loading a saved state and the resumed guest's first answer.
const RESUME_WAIT: Duration = Duration::from_secs(60);
/// While idle with live login sessions in the guest, look again this often.
const LOGIN_RECHECK: Duration = Duration::from_secs(15);

struct Shared {
    state: watch::Sender<Message>,
    /// Lines for every attached terminal (see `ports`).
    notices: super::ports::Notices,
    /// The running VM's port watcher, for `vibebox ports add|rm`.
    port_requests: std::sync::Mutex<Option<tokio::sync::mpsc::Sender<super::ports::Request>>>,
    clients: watch::Sender<u32>,
    /// Taken by an attach (count it, read the state) and by the idle shutdown's
    /// decision (no clients, so state becomes `stopping`): whichever comes second
    /// sees the first, so no client is ever told "ready" by a VM that is going down.
    life: std::sync::Mutex<()>,
    stop: Notify,
    stop_requested: AtomicBool,
    /// `vibebox stop --cold`: power the guest off instead of saving it.
    cold_requested: AtomicBool,
    /// Whether any client has attached: a supervisor that fails before the client
    /// that spawned it connects must wait for it, or the error is never told.
    attached_ever: AtomicBool,
}

impl Shared {
    fn set(&self, m: Message) {
        if let Message::Error { message, .. } = &m {
            tracing::error!("{message}");
        } else {
            tracing::info!("state: {m:?}");
        }
        self.state.send_replace(m);
    }
}

/// How long a failed supervisor waits for its first client to read the error.
const ERROR_LINGER: Duration = Duration::from_secs(10);

/// Runs the supervisor of session `id` for the project at `project`. Returns at once
/// (quietly) when another supervisor already holds the lock.
pub fn run(home: &Home, project: &Path, id: SessionId) -> Result<(), String> {
    let sd = home.session(id);
    statefile::ensure_dir(sd.dir(), 0o700).map_err(|e| e.to_string())?;
    std::env::set_current_dir(sd.dir()).map_err(|e| e.to_string())?;
    let Some(_lock) =
        Lock::try_exclusive(Path::new(paths::SUPERVISOR_LOCK)).map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    let _live = super::LiveMark::new(home, &id.to_string());
    stop_orphan(&sd);
    let _ = fs::remove_file(paths::CONTROL_SOCKET);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener =
            UnixListener::bind(paths::CONTROL_SOCKET).map_err(|e| format!("bind: {e}"))?;
        let shared = Arc::new(Shared {
            state: watch::Sender::new(Message::Starting),
            clients: watch::Sender::new(0),
            notices: tokio::sync::broadcast::channel(64).0,
            port_requests: std::sync::Mutex::new(None),
            life: std::sync::Mutex::new(()),
            stop: Notify::new(),
            stop_requested: AtomicBool::new(false),
            cold_requested: AtomicBool::new(false),
            attached_ever: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let on = |(stream, _)| drop(tokio::spawn(handle(stream, shared.clone())));
                super::limits::accept_loop(|| listener.accept(), on).await;
            })
        };
        lifecycle(&shared, home, project, &sd).await;
        if matches!(*shared.state.borrow(), Message::Error { .. }) {
            let deadline = tokio::time::Instant::now() + ERROR_LINGER;
            while !shared.attached_ever.load(Ordering::SeqCst)
                && !shared.stop_requested.load(Ordering::SeqCst)
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // No new clients from here on; those attached get a moment to read the
        // final state.
        acceptor.abort();
        let _ = fs::remove_file(paths::CONTROL_SOCKET);
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<(), String>(())
    })
}

/// A QEMU left by an earlier supervisor (killed with SIGKILL, and its watchdog too)
/// is stopped before a new boot, so a disk never has two writers. Only the process
/// recorded (pid, start time, executable) is signalled, never whatever reuses its pid.
fn stop_orphan(sd: &SessionDir) {
    let Some(inst) = Instance::read(sd) else {
        return;
    };
    let qemu = inst.qemu();
    // The record names the process to signal; a record that names anything but a
    // QEMU (a forged or damaged file) signals nothing.
    let is_qemu = Path::new(&qemu.exe)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("qemu"));
    if !is_qemu {
        tracing::warn!(
            "instance.toml names {:?}, not a QEMU: not signalled",
            qemu.exe
        );
        return;
    }
    if !qemu.is_running() {
        return;
    }
    tracing::warn!("stopping QEMU {} left by an earlier supervisor", qemu.pid);
    lifetime::end(&qemu, lifetime::TERM_GRACE);
}

enum Outcome {
    Crashed(String),
    Stopped,
    /// The saved VM could not be resumed (its state is gone): boot again, cold.
    ResumeFailed,
}

async fn lifecycle(shared: &Arc<Shared>, home: &Home, project: &Path, sd: &SessionDir) {
    loop {
        shared.set(Message::Starting);
        let outcome = match boot_and_run(shared, home, project, sd).await {
            Ok(o) => o,
            Err(message) => {
                shared.set(Message::Error {
                    message,
                    log: sd.supervisor_log().display().to_string(),
                });
                return;
            }
        };
        let _ = fs::remove_file(sd.instance());
        super::ports::clear(sd);
        match outcome {
            Outcome::Crashed(message) => {
                shared.set(Message::Error {
                    message,
                    log: sd.qemu_log().display().to_string(),
                });
                return;
            }
            Outcome::Stopped => {}
            Outcome::ResumeFailed => continue,
        }
        // A client that attached while the VM was stopping gets a new boot, never a
        // dead VM; an explicit stop or nobody attached ends the supervisor. Decided
        // under the attach lock, so a client that sees `stopped` first knows this
        // supervisor is ending, and one attached before it gets the new boot.
        let _life = shared.life.lock().unwrap_or_else(|e| e.into_inner());
        shared.set(Message::Stopped);
        if shared.stop_requested.load(Ordering::SeqCst) || *shared.clients.borrow() == 0 {
            return;
        }
        shared.set(Message::Starting);
    }
}

impl Shared {
    /// The idle shutdown's decision: only with no client attached, and in the same
    /// step the state becomes `stopping`, so a client attaching right after waits for
    /// the next boot instead of being told "ready".
    fn begin_idle_stop(&self) -> bool {
        let _life = self.life.lock().unwrap_or_else(|e| e.into_inner());
        if *self.clients.borrow() > 0 {
            return false;
        }
        self.set(Message::Stopping);
        true
    }

    fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }
}

/// Test-only: widens the window between the idle checks and the shutdown decision
/// (`VIBEBOX_TEST_IDLE_DECIDE_DELAY_MS`), so a test can attach inside it.
fn idle_decide_delay() -> Option<Duration> {
    std::env::var("VIBEBOX_TEST_IDLE_DECIDE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

async fn boot_and_run(
    shared: &Arc<Shared>,
    home: &Home,
    project: &Path,
    sd: &SessionDir,
) -> Result<Outcome, String> {
    if shared.stop_requested() {
        return Ok(Outcome::Stopped);
    }
    let super::boot::BootPlan {
        config,
        image,
        accel,
        qemu,
        resolver,
        explain: explain_text,
        protection,
    } = super::boot::prepare(home, project, sd).map_err(|e| e.to_string())?;
    shared.set(Message::Booting {
        accel: accel.as_str().to_string(),
        image: image.id(),
    });
    let started = launch::start(&Plan {
        session: sd,
        project,
        config: &config,
        image: &image,
        accel,
        qemu,
        explain: explain_text,
        protection: &protection,
        resume: config.resume,
    })
    .map_err(|e| e.to_string())?;
    if let Some(why) = &started.cold_because {
        tracing::info!("booting cold, not resuming the saved VM: {why}");
    }
    // Declared first so it is dropped last: QEMU's lease on life, ending it if this
    // boot ends any way but through QEMU's exit.
    let watchdog = started.watchdog;
    let qemu = watchdog.child().clone();
    // Dropped (killed) when this boot is over, after QEMU.
    let _daemons = started.daemons;
    let incoming = started.incoming;
    let digest = started.digest;
    let unsaveable = started.unsaveable;
    let gateway = match super::network::start(started.net, &config, sd, &sd_id(sd), resolver) {
        Ok(g) => g,
        Err(e) => {
            kill(&qemu);
            return Err(e);
        }
    };
    let exited = Arc::new(AtomicBool::new(false));
    let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel();
    {
        let exited = exited.clone();
        let mut child = started.child;
        std::thread::spawn(move || {
            let status = child.wait();
            exited.store(true, Ordering::SeqCst);
            let _ = exit_tx.send(status.map(|s| s.to_string()).unwrap_or_default());
        });
    }
    Instance {
        supervisor_pid: std::process::id(),
        qemu_pid: qemu.pid,
        qemu_start: qemu.start,
        qemu_exe: qemu.exe.clone(),
        ssh_host: "127.0.0.1".into(),
        ssh_port: started.ssh_port,
        guest_ipv4: None,
        accel: accel.as_str().to_string(),
    }
    .write(sd)
    .map_err(|e| e.to_string())?;

    // A saved VM: its state loaded into the paused QEMU, then the guest runs on
    // from where it was stopped. The state file is already gone (`snapshot::take`).
    let resumed = match incoming {
        None => None,
        Some((file, record)) => {
            let alive = exited.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                crate::vm::snapshot::resume(
                    Path::new(paths::QMP_SOCKET),
                    &file,
                    RESUME_WAIT,
                    || !alive.load(Ordering::SeqCst),
                )
            })
            .await
            .map_err(|e| e.to_string())?;
            if let Err(e) = loaded {
                tracing::warn!("cannot resume the saved VM ({e}); booting cold");
                return Ok(resume_failed(&qemu, &mut exit_rx).await);
            }
            tracing::info!("resumed the VM saved at the last stop");
            Some(record)
        }
    };

    let ready_path = sd.dir().join(paths::READY_SOCKET);
    let alive = exited.clone();
    let asked = shared.clone();
    let is_resumed = resumed.is_some();
    // A resumed guest's clock stands where it was stopped: the host's clock goes
    // with the first line it reads.
    let ready_wait = if is_resumed {
        RESUME_WAIT
    } else {
        ready_timeout()
    };
    // A stop during the boot ends the wait at its next poll (half a second), not at
    // the ready timeout.
    let waited = tokio::task::spawn_blocking(move || {
        ready::wait_then(
            &ready_path,
            ready_wait,
            || !alive.load(Ordering::SeqCst) && !asked.stop_requested(),
            |e| tracing::info!("guest: {e:?}"),
            || is_resumed.then(super::resume::time_line).flatten(),
        )
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut r = match waited {
        // Ready as the stop came: the stop below powers the guest off gracefully.
        Ok(r) => r,
        Err(e) if is_resumed && !shared.stop_requested() => {
            tracing::warn!("the resumed guest did not answer ({e}); booting cold");
            return Ok(resume_failed(&qemu, &mut exit_rx).await);
        }
        Err(_) if shared.stop_requested() => {
            cancel_boot(shared, &qemu, &mut exit_rx).await;
            return Ok(Outcome::Stopped);
        }
        Err(e) => {
            kill(&qemu);
            return Err(format!(
                "{e}; the guest console log is {}",
                sd.console_log().display()
            ));
        }
    };
    let alias = ssh::alias(&sd_id(sd));
    let cfg = ssh::config_block(&ssh::ClientConfig {
        alias: &alias,
        port: started.ssh_port,
        user: &started.user.name,
        identity: &launch::client_key(sd).private,
        known_hosts: &launch::known_hosts(sd),
        control_path: &ssh::control_path(&sd.ssh_dir()),
    });
    statefile::write_atomic(&sd.ssh_dir().join("config"), cfg.as_bytes(), 0o600)
        .map_err(|e| e.to_string())?;
    if let Some(record) = resumed {
        r.ipv4 = r.ipv4.or(record.ipv4);
        match super::resume::resumed(sd, &alias).await {
            Ok(warnings) => r.errors.extend(warnings),
            Err(e) => {
                tracing::warn!("{e}; booting cold");
                return Ok(resume_failed(&qemu, &mut exit_rx).await);
            }
        }
    }
    let mut inst = Instance::read(sd).unwrap_or_default();
    inst.guest_ipv4 = r.ipv4.clone();
    let _ = inst.write(sd);
    let ipv4 = r.ipv4.clone();

    let qmp = Qmp::connect(Path::new(paths::QMP_SOCKET)).await.ok();
    shared.set(Message::Ready {
        ssh: Endpoint {
            host: "127.0.0.1".into(),
            port: started.ssh_port,
            user: started.user.name.clone(),
            guest_ipv4: r.ipv4,
        },
        warnings: r.errors,
    });
    let (port_tx, port_rx) = tokio::sync::mpsc::channel(8);
    *shared
        .port_requests
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(port_tx);
    let ports = PortsTask(
        tokio::spawn(super::ports::run(
            sd.clone(),
            config.ports.clone(),
            shared.notices.clone(),
            port_rx,
            gateway.inbound.clone(),
        )),
        shared.clone(),
    );

    let auto_shutdown = Duration::from_millis(config.auto_shutdown_ms);
    tokio::select! {
        status = &mut exit_rx => {
            return Ok(Outcome::Crashed(format!(
                "QEMU exited unexpectedly ({})",
                status.unwrap_or_default()
            )));
        }
        _ = shared.stop.notified() => shared.set(Message::Stopping),
        // Already `stopping`: set in the same step as the decision.
        _ = idle(shared, sd, auto_shutdown) => {}
    }
    drop(ports);
    let mut qmp = qmp;
    let cold = !config.resume || shared.cold_requested.load(Ordering::SeqCst);
    if let Some(why) = unsaveable.filter(|_| !cold) {
        tracing::info!("shutting the VM down, not saving it: {why}");
    }
    if let Some(digest) = digest.filter(|_| !cold) {
        match save_vm(sd, qmp.take(), &digest, ipv4, &mut exit_rx).await {
            Ok(mib) => {
                tracing::info!("saved the VM ({mib} MiB) for the next start to resume");
                return Ok(Outcome::Stopped);
            }
            Err(why) => {
                tracing::warn!(
                    "cannot save the VM ({why}); shutting it down (the next start boots cold)"
                );
                qmp = Qmp::connect(Path::new(paths::QMP_SOCKET)).await.ok();
            }
        }
    }
    shutdown(qmp, &qemu, &mut exit_rx).await;
    Ok(Outcome::Stopped)
}

/// A resume that failed: its QEMU ends (its state is gone already) and the
/// lifecycle boots again, cold.
async fn resume_failed(
    qemu: &ProcId,
    exit_rx: &mut tokio::sync::oneshot::Receiver<String>,
) -> Outcome {
    kill(qemu);
    let _ = tokio::time::timeout(QUIT_WAIT, &mut *exit_rx).await;
    Outcome::ResumeFailed
}

/// The save path of a stop: the guest readied, QMP's connection handed over (QEMU
/// serves one client), the state written and put in place once QEMU has quit.
async fn save_vm(
    sd: &SessionDir,
    qmp: Option<Qmp>,
    digest: &str,
    ipv4: Option<String>,
    exit_rx: &mut tokio::sync::oneshot::Receiver<String>,
) -> Result<u64, String> {
    super::resume::prepare(sd).await?;
    drop(qmp);
    super::resume::save(sd, digest, ipv4, exit_rx, QUIT_WAIT).await
}

/// The port watcher of one boot; ends with it, whichever way it ends.
struct PortsTask(tokio::task::JoinHandle<()>, Arc<Shared>);

impl Drop for PortsTask {
    fn drop(&mut self) {
        *self
            .1
            .port_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.0.abort();
    }
}

/// A stop asked for while the guest boots: nothing in the guest is worth a graceful
/// power-off yet, so QEMU gets SIGTERM (it flushes its disks and quits), then SIGKILL.
async fn cancel_boot(
    shared: &Shared,
    qemu: &ProcId,
    exit_rx: &mut tokio::sync::oneshot::Receiver<String>,
) {
    shared.set(Message::Stopping);
    tracing::info!("stop asked during the boot; ending QEMU {}", qemu.pid);
    lifetime::signal(qemu, nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(QUIT_WAIT, &mut *exit_rx).await.is_ok() {
        return;
    }
    kill(qemu);
    let _ = tokio::time::timeout(QUIT_WAIT, &mut *exit_rx).await;
}

fn sd_id(sd: &SessionDir) -> String {
    sd.dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn kill(qemu: &ProcId) {
    lifetime::signal(qemu, nix::sys::signal::Signal::SIGKILL);
}

/// Resolves when no client has been attached for `grace` and the guest has no live
/// login session (an ssh the user opened by hand, an editor's remote session).
async fn idle(shared: &Arc<Shared>, sd: &SessionDir, grace: Duration) {
    let mut clients = shared.clients.subscribe();
    loop {
        while *clients.borrow_and_update() > 0 {
            if clients.changed().await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = clients.changed() => continue,
            _ = tokio::time::sleep(grace) => {}
        }
        // Running tasks (`vibebox launch`) keep the VM up like clients do.
        if let Some(n) = guest_running_tasks(sd).await.filter(|n| *n > 0) {
            tracing::info!("idle, but {n} task(s) run in the guest; keeping the VM up");
            tokio::select! {
                _ = clients.changed() => {}
                _ = tokio::time::sleep(LOGIN_RECHECK) => {}
            }
            continue;
        }
        match guest_login_sessions(sd).await {
            Some(0) | None => {
                if let Some(delay) = idle_decide_delay() {
                    tracing::warn!("test delay: deciding the idle shutdown in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
                if shared.begin_idle_stop() {
                    return;
                }
            }
            Some(n) => {
                tracing::info!(
                    "idle, but {n} login session(s) live in the guest; keeping the VM up"
                );
                tokio::select! {
                    _ = clients.changed() => {}
                    _ = tokio::time::sleep(LOGIN_RECHECK) => {}
                }
            }
        }
    }
}

/// Shells and commands that ssh connections run in the guest, other than this check's
/// own. A connection that runs nothing (the host's control master kept alive for its
/// `ControlPersist` after the last client left) does not count: counting logind
/// sessions did, and it kept every VM up a minute past its idle timeout. `None` when
/// the guest cannot be asked (then nothing keeps it up).
async fn guest_login_sessions(sd: &SessionDir) -> Option<usize> {
    let script = "echo \"self $$\"; cat /proc/[0-9]*/stat 2>/dev/null; true";
    let first = count_ssh_sessions(&ssh::guest_output(sd, script).await.ok()?)?;
    if first == 0 {
        return Some(0);
    }
    // A question about tasks (`vibebox list`) is a plain `sh` under sshd until its
    // first line renames it (PROBE_NAME): caught in that moment it looked like a
    // login, and the VM stayed up another LOGIN_RECHECK. A login is still there a
    // moment later; a question has been renamed or is gone.
    tokio::time::sleep(PROBE_SETTLE).await;
    let second = count_ssh_sessions(&ssh::guest_output(sd, script).await.ok()?)?;
    Some(first.min(second))
}

/// How long a login seen once is given to prove it is one (see above).
const PROBE_SETTLE: Duration = Duration::from_secs(2);

/// The guest side of tasks (`session::tasks` sends the same script).
const TASKS_SCRIPT: &str = include_str!("../../images/guest/tasks.sh");

/// Tasks running in the guest, from the task script's `count`: a probe of its own,
/// apart from the login sessions. `None` when the guest cannot be asked.
async fn guest_running_tasks(sd: &SessionDir) -> Option<usize> {
    let script = format!("set -- count\n{TASKS_SCRIPT}");
    let out = ssh::guest_output(sd, &script).await.ok()?;
    out.trim().parse().ok()
}

/// The name the task script's `count` gives its shell (`echo NAME > /proc/$$/comm`),
/// so that `vibebox list` asking every running VM for its tasks is not taken for a
/// login that keeps the VM up.
pub const PROBE_NAME: &str = "vibebox-probe";

/// Counts processes whose parent is an `sshd*` process and which are not one
/// themselves (a channel's shell or command), minus the asker's own chain. Input: a
/// `self PID` line, then `/proc/PID/stat` lines. The guest writes it; a line that does
/// not parse is skipped, and output with no `self` line is `None`.
pub fn count_ssh_sessions(output: &str) -> Option<usize> {
    let mut me = None;
    let mut procs: std::collections::HashMap<u32, (u32, bool)> = Default::default();
    for line in output.lines() {
        if let Some(pid) = line.strip_prefix("self ") {
            me = pid.trim().parse::<u32>().ok();
            continue;
        }
        // `PID (COMM) STATE PPID ...`: COMM may hold spaces and parentheses, so it
        // ends at the last `)`.
        let (Some(open), Some(close)) = (line.find('('), line.rfind(')')) else {
            continue;
        };
        if close < open {
            continue;
        }
        let pid = line[..open].trim().parse::<u32>();
        let comm = &line[open + 1..close];
        let ppid = line[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if let (Ok(pid), Some(ppid)) = (pid, ppid) {
            if comm == super::ports::WATCHER_NAME || comm == PROBE_NAME {
                // The supervisor's own port watcher, or a question about tasks
                // (`vibebox list`): never a reason to stay up.
                continue;
            }
            procs.insert(pid, (ppid, comm.starts_with("sshd")));
        }
    }
    let me = me?;
    let mut mine = std::collections::HashSet::new();
    let mut p = me;
    while p > 1 && mine.insert(p) {
        match procs.get(&p) {
            Some(&(ppid, _)) => p = ppid,
            None => break,
        }
    }
    Some(
        procs
            .iter()
            .filter(|(pid, (ppid, is_sshd))| {
                !is_sshd
                    && !mine.contains(pid)
                    && procs.get(ppid).is_some_and(|&(_, parent_sshd)| parent_sshd)
            })
            .count(),
    )
}

/// Graceful first (ACPI power button through QMP), then QMP `quit`, then SIGKILL,
/// each with a bounded wait. The disk stays for the next boot.
async fn shutdown(
    qmp: Option<Qmp>,
    qemu: &ProcId,
    exit_rx: &mut tokio::sync::oneshot::Receiver<String>,
) {
    if let Some(q) = &qmp {
        if q.powerdown().await.is_ok()
            && tokio::time::timeout(POWEROFF_WAIT, &mut *exit_rx)
                .await
                .is_ok()
        {
            return;
        }
        tracing::warn!("guest did not power off in {POWEROFF_WAIT:?}; quitting QEMU");
        let _ = q.quit().await;
        if tokio::time::timeout(QUIT_WAIT, &mut *exit_rx).await.is_ok() {
            return;
        }
    }
    tracing::warn!("QEMU did not quit; killing it");
    kill(qemu);
    let _ = tokio::time::timeout(QUIT_WAIT, &mut *exit_rx).await;
}

async fn handle(stream: UnixStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let req: Option<Request> =
        match tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await {
            Ok(Ok(Some(l))) => serde_json::from_str(&l).ok(),
            _ => None,
        };
    let Some(req) = req.filter(|r| r.v == protocol::VERSION) else {
        let _ = write
            .write_all(
                protocol::encode(&Message::Error {
                    message: format!(
                        "this supervisor speaks control protocol {}; upgrade or stop it (`vibebox stop`)",
                        protocol::VERSION
                    ),
                    log: String::new(),
                })
                .as_bytes(),
            )
            .await;
        return;
    };
    match req.op {
        Op::Status => {
            let vm = match &*shared.state.borrow() {
                Message::Starting | Message::Booting { .. } => "booting",
                Message::Ready { .. } => "running",
                Message::Stopping => "stopping",
                _ => "stopped",
            }
            .to_string();
            let clients = *shared.clients.borrow();
            let _ = write
                .write_all(protocol::encode(&Message::Status { vm, clients }).as_bytes())
                .await;
        }
        Op::Publish { host, guest, addr } => {
            let change = super::ports::Change::Publish(crate::config::Publish {
                addr: addr.unwrap_or(std::net::Ipv4Addr::LOCALHOST),
                host,
                guest,
            });
            port_change(&shared, change, &mut write).await;
        }
        Op::Unpublish { guest } => {
            port_change(&shared, super::ports::Change::Unpublish(guest), &mut write).await;
        }
        Op::Attach | Op::Stop | Op::StopCold => {
            let attach = req.op == Op::Attach;
            if req.op == Op::StopCold {
                shared.cold_requested.store(true, Ordering::SeqCst);
            }
            let mut state = {
                let _life = shared.life.lock().unwrap_or_else(|e| e.into_inner());
                if attach {
                    shared.attached_ever.store(true, Ordering::SeqCst);
                    shared.clients.send_modify(|c| *c += 1);
                } else {
                    shared.stop_requested.store(true, Ordering::SeqCst);
                    shared.stop.notify_one();
                }
                shared.state.subscribe()
            };
            let mut notices = shared.notices.subscribe();
            loop {
                let msg = state.borrow_and_update().clone();
                if write
                    .write_all(protocol::encode(&msg).as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
                if !attach && matches!(msg, Message::Stopped | Message::Error { .. }) {
                    break;
                }
                // Until the state changes (or the client leaves), pass notices on.
                let go_on = loop {
                    tokio::select! {
                        changed = state.changed() => break changed.is_ok(),
                        notice = notices.recv(), if attach => {
                            let Ok(text) = notice else { continue };
                            let m = Message::Notice { text };
                            if write.write_all(protocol::encode(&m).as_bytes()).await.is_err() {
                                break false;
                            }
                        }
                        line = lines.next_line() => match line {
                            Ok(Some(_)) => break true,
                            _ => break false,
                        },
                    }
                };
                if !go_on {
                    break;
                }
            }
            if attach {
                shared.clients.send_modify(|c| *c = c.saturating_sub(1));
            }
        }
    }
}

/// Hands a `ports add|rm` to the running VM's port watcher and answers with what it
/// did.
async fn port_change(
    shared: &Shared,
    change: super::ports::Change,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) {
    let tx = shared
        .port_requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let outcome = match tx {
        None => Err("the VM is not running; start it with `vibebox` first".to_string()),
        Some(tx) => match tx.send((change, reply_tx)).await {
            Err(_) => Err("the VM is stopping".to_string()),
            Ok(()) => match tokio::time::timeout(Duration::from_secs(50), reply_rx).await {
                Ok(Ok(r)) => r,
                _ => Err("the VM's ssh did not answer; try again".to_string()),
            },
        },
    };
    let m = match outcome {
        Ok(text) => Message::Notice { text },
        Err(message) => Message::Error {
            message,
            log: String::new(),
        },
    };
    let _ = write.write_all(protocol::encode(&m).as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_shells_of_ssh_connections_but_not_its_own_or_idle_masters() {
        let out = "self 900\n\
            1 (systemd) S 0 1 1\n\
            500 (sshd) S 1 500 500\n\
            600 (sshd-session) S 500 600 600\n\
            601 (sshd-session) S 600 600 600\n\
            602 (bash) S 601 602 602\n\
            610 (sshd-session) S 500 610 610\n\
            611 (sshd-session) S 610 610 610\n\
            700 (sshd-session) S 500 700 700\n\
            701 (sshd-session) S 700 700 700\n\
            900 (sh) S 701 900 900\n\
            901 (cat) S 900 900 900\n\
            950 (tmux: server) S 1 950 950\n\
            970 (vibebox-probe) S 701 970 970\n\
            971 (vibebox-probe) S 601 971 971\n\
            972 (tmux: client) S 971 971 971\n\
            960 (odd) name)) S 601 960 960\n";
        // 602 (a shell on connection 600) and 960 (a command with a hostile name on
        // the same connection); 611 is an idle master; 900 is the asker; 971 is a
        // task count (`vibebox list`) and 972 its child.
        assert_eq!(count_ssh_sessions(out), Some(2));
        assert_eq!(count_ssh_sessions("self 5\n"), Some(0));
        assert_eq!(count_ssh_sessions("garbage\n"), None);
        assert_eq!(
            count_ssh_sessions("self 3\n3 (sh) S 4 x\n4 (sh) S 3 x\n"),
            Some(0),
            "a parent loop ends"
        );
    }
}
