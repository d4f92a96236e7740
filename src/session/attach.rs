//! The fast path of `vibebox attach`: no process starts in the guest on the way to
//! the task's screen. `ssh -W` through the session's control master forwards this
//! process's pipes to a daemon in the guest (`images/guest/attach.py`, sent with
//! `vibebox launch` and the fallback attach, started by tasks.sh), which hands the
//! connection a tmux client it already runs. An sshd session, its pty and the login
//! shell cost 250 ms under TCG before the tmux client even started; the forward
//! costs 10-50 ms.
//!
//! Protocol (the script's header says the same):
//! - host -> guest, one line: `VBXATTACH1 VERSION NAME COLS ROWS TERM KEY\n`
//!   (VERSION: [`version`], a digest of the script, so a daemon older than this
//!   host answers `ERR version` and hands over to the new one);
//! - guest -> host, one line: `OK`, `ERR notask`, `ERR version` or `ERR bad`;
//! - then frames both ways, `TYPE LENGTH(4 bytes, big-endian) PAYLOAD` with LENGTH at
//!   most [`MAX_FRAME`]: host -> guest `d` (input bytes) and `w` (window size,
//!   columns and rows, 2 bytes each); guest -> host `d` (the terminal's bytes) and
//!   `x` (the end: `detached` or `ended N`).
//!
//! The guest is hostile: the reply is bounded and must be one of those words,
//! frames are bounded, the end must parse, and nothing the guest writes is printed
//! except the terminal stream itself (which goes to the terminal, as `ssh -t`'s
//! does). Whatever fails before the screen shows leaves the caller to take the
//! `ssh -t` path, which works in any image with tmux.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};
use sha2::Digest;

use crate::paths::SessionDir;

/// The guest side, sent with `launch` and the fallback attach.
pub const SCRIPT: &str = include_str!("../../images/guest/attach.py");

/// The largest frame either side sends.
pub const MAX_FRAME: usize = 65536;

/// How long the guest may take to answer the handshake before the `ssh -t` path
/// takes over: a loaded host under TCG answers in well under a second, and the
/// daemon gives tmux 20 s.
const REPLY_WAIT: Duration = Duration::from_secs(30);

/// The script's version: its digest, so host and daemon agree on the protocol.
pub fn version() -> String {
    let d = sha2::Sha256::digest(SCRIPT.as_bytes());
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The environment words that let the guest's tasks.sh start the daemon.
pub fn daemon_env(term: Option<&str>) -> Vec<(String, String)> {
    let mut env = vec![
        ("VIBEBOX_ATTACH_PY".to_string(), SCRIPT.to_string()),
        ("VIBEBOX_ATTACH_VERSION".to_string(), version()),
        (
            "VIBEBOX_ATTACH_PORT".to_string(),
            crate::supervisor::ports::GUEST_ATTACH_PORT.to_string(),
        ),
    ];
    if let Some(t) = term.filter(|t| valid_term(t)) {
        env.push(("VIBEBOX_ATTACH_TERM".to_string(), t.to_string()));
    }
    env
}

/// A TERM value the guest takes: a terminfo name.
fn valid_term(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// The guest's answer to the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    NoTask,
    /// Anything else (an old daemon, garbage, no daemon): take the `ssh -t` path.
    Fallback,
}

/// Reads the guest's reply line: one of the protocol's words, else [`Reply::Fallback`].
pub fn parse_reply(line: &[u8]) -> Reply {
    match line {
        b"OK" => Reply::Ok,
        b"ERR notask" => Reply::NoTask,
        _ => Reply::Fallback,
    }
}

/// How an attach ended, as the guest said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Detached,
    /// The task's command ended with this status (128 + a signal).
    Ended(i32),
}

/// A frame from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Output(Vec<u8>),
    End(End),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the guest broke the attach protocol")]
pub struct ProtocolError;

/// Frames from the guest, out of the bytes as they come.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame; `None` until one is complete. A frame over
    /// [`MAX_FRAME`], of an unknown type, or an end that does not parse is an error
    /// (nothing of it is printed).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let n = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if n > MAX_FRAME {
            return Err(ProtocolError);
        }
        if self.buf.len() < 5 + n {
            return Ok(None);
        }
        let kind = self.buf[0];
        let payload: Vec<u8> = self.buf.drain(..5 + n).skip(5).collect();
        match kind {
            b'd' => Ok(Some(Frame::Output(payload))),
            b'x' => parse_end(&payload).map(|e| Some(Frame::End(e))),
            _ => Err(ProtocolError),
        }
    }
}

fn parse_end(p: &[u8]) -> Result<End, ProtocolError> {
    if p == b"detached" {
        return Ok(End::Detached);
    }
    let digits = p.strip_prefix(b"ended ").ok_or(ProtocolError)?;
    if digits.is_empty() || digits.len() > 3 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ProtocolError);
    }
    let code: i32 = std::str::from_utf8(digits)
        .map_err(|_| ProtocolError)?
        .parse()
        .map_err(|_| ProtocolError)?;
    Ok(End::Ended(code))
}

/// A frame to the guest.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + payload.len());
    f.push(kind);
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn size_frame((cols, rows): (u16, u16)) -> Vec<u8> {
    let mut p = cols.to_be_bytes().to_vec();
    p.extend_from_slice(&rows.to_be_bytes());
    frame(b'w', &p)
}

/// An attach under way: `ssh -W` started and the handshake sent, its answer not
/// read yet (the caller checks in with the supervisor meanwhile).
pub struct Pending {
    child: Child,
    to: ChildStdin,
    from: ChildStdout,
    /// The detach key (tmux's name), which the host also watches for.
    key: String,
}

/// Starts the fast path to task `name` (validated) with detach key `key`
/// (validated), when this process's stdin and stdout are a terminal; `None` when
/// they are not, or ssh cannot start.
pub fn start(sd: &SessionDir, alias: &str, name: &str, key: &str) -> Option<Pending> {
    let stdin = std::io::stdin();
    if !nix::unistd::isatty(stdin.as_fd()).unwrap_or(false)
        || !nix::unistd::isatty(std::io::stdout().as_fd()).unwrap_or(false)
    {
        return None;
    }
    let (cols, rows) = size();
    let term = std::env::var("TERM")
        .ok()
        .filter(|t| valid_term(t))
        .unwrap_or_else(|| "xterm-256color".into());
    let mut child = Command::new("ssh")
        .arg("-F")
        .arg(sd.ssh_dir().join("config"))
        .arg("-W")
        .arg(format!(
            "127.0.0.1:{}",
            crate::supervisor::ports::GUEST_ATTACH_PORT
        ))
        .arg(alias)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut to = child.stdin.take()?;
    let from = child.stdout.take()?;
    let hello = format!(
        "VBXATTACH1 {} {name} {cols} {rows} {term} {key}\n",
        version()
    );
    if to.write_all(hello.as_bytes()).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    Some(Pending {
        child,
        to,
        from,
        key: key.to_string(),
    })
}

/// The terminal's size (columns, rows), bounded as the guest bounds it.
fn size() -> (u16, u16) {
    terminal_size::terminal_size_of(std::io::stdin())
        .or_else(terminal_size::terminal_size)
        .map(|(w, h)| (w.0.clamp(1, 1000), h.0.clamp(1, 1000)))
        .unwrap_or((80, 24))
}

/// How a fast attach came out.
#[derive(Debug)]
pub enum Outcome {
    /// The attach ran; its exit status (0 after a detach, 255 when the link died,
    /// 128 + N after signal N), and the task's end status when it ended.
    Done(i32, Option<i32>),
    NoTask,
    /// It failed before the screen showed: take the `ssh -t` path.
    Fallback,
}

impl Pending {
    /// Ends it before it ran (the check-in failed).
    pub fn cancel(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the guest's answer and, when it is yes, runs the attach: the
    /// terminal in raw mode (restored on every way out), input and window size to
    /// the guest, its output to the terminal.
    pub fn run(mut self) -> Outcome {
        let mut dec = Decoder::default();
        match read_reply(&mut self.from, &mut dec) {
            Reply::Ok => {}
            Reply::NoTask => {
                self.cancel();
                return Outcome::NoTask;
            }
            Reply::Fallback => {
                self.cancel();
                return Outcome::Fallback;
            }
        }
        let outcome = match Raw::enter() {
            Some(raw) => {
                let r = relay(
                    raw.signals(),
                    std::io::stdin().as_fd(),
                    &mut std::io::stdout().lock(),
                    &mut self.to,
                    &mut self.from,
                    &mut dec,
                    key_byte(&self.key),
                );
                drop(raw);
                r
            }
            None => (255, None),
        };
        drop(self.to);
        // ssh ends once the guest closed its side; a stuck one is not waited for.
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return Outcome::Done(outcome.0, outcome.1);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Outcome::Done(outcome.0, outcome.1)
    }
}

/// The reply line (at most 64 bytes, within [`REPLY_WAIT`]); what came after it
/// goes to `dec`.
fn read_reply(from: &mut ChildStdout, dec: &mut Decoder) -> Reply {
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + REPLY_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if ms == 0 {
            return Reply::Fallback;
        }
        let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Reply::Fallback,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Reply::Fallback,
            Ok(_) => {}
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return Reply::Fallback,
            Ok(n) => n,
        };
        line.extend_from_slice(&buf[..n]);
        if let Some(i) = line.iter().position(|b| *b == b'\n') {
            dec.push(&line[i + 1..]);
            return parse_reply(&line[..i]);
        }
        if line.len() > 64 {
            return Reply::Fallback;
        }
    }
}

/// The terminal in raw mode until dropped (also on a panic's unwind); signals that
/// end the attach come to the relay as bytes on a pipe.
struct Raw {
    saved: Termios,
    old: Vec<(Signal, SigAction)>,
    /// The signal pipe: read end, write end.
    pipe: (OwnedFd, OwnedFd),
}

/// The write end of the signal pipe, for the handler.
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: nix::libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the fd lives as long as the handler.
        unsafe {
            nix::libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

const SIGNALS: [Signal; 5] = [
    Signal::SIGWINCH,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
];

impl Raw {
    fn enter() -> Option<Raw> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let (r, w) = nix::unistd::pipe().ok()?;
        for fd in [&r, &w] {
            let _ = nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            );
        }
        SIGNAL_FD.store(w.as_raw_fd(), Ordering::Relaxed);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut old = Vec::new();
        for s in SIGNALS {
            // SAFETY: the handler only calls write(2).
            if let Ok(prev) = unsafe { sigaction(s, &action) } {
                old.push((s, prev));
            }
        }
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let guard = Raw {
            saved,
            old,
            pipe: (r, w),
        };
        tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw).ok()?;
        Some(guard)
    }

    fn signals(&self) -> BorrowedFd<'_> {
        self.pipe.0.as_fd()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
        for (s, prev) in &self.old {
            // SAFETY: puts back what was there.
            let _ = unsafe { sigaction(*s, prev) };
        }
        SIGNAL_FD.store(-1, Ordering::Relaxed);
    }
}

/// The byte a tmux key name such as `C-\\` or `C-]` sends, for the host's own
/// check of the detach key; `None` for a key that is not one control byte.
pub fn key_byte(key: &str) -> Option<u8> {
    let rest = key.strip_prefix("C-")?;
    let [c] = rest.as_bytes() else {
        return None;
    };
    let c = c.to_ascii_uppercase();
    (b'@'..=b'_').contains(&c).then_some(c & 0x1f)
}

/// How long the guest gets to end the attach after the detach key before the host
/// ends it itself: a guest gone silent cannot hold the terminal.
const DETACH_WAIT: Duration = Duration::from_secs(2);
/// Input not yet taken by ssh (a guest that stopped reading): past this, what is
/// typed is dropped (still watched for the detach key), so the relay never blocks on
/// a write and signals and the detach key still end it.
const MAX_BACKLOG: usize = 1 << 20;

/// Relays until the guest says the attach ended, the link dies, a signal ends it,
/// or the detach key (`detach`) went unanswered for [`DETACH_WAIT`]:
/// (exit status, the task's end status). Writes to ssh never block.
fn relay(
    sigs: BorrowedFd<'_>,
    input: BorrowedFd<'_>,
    out: &mut dyn Write,
    to: &mut ChildStdin,
    from: &mut ChildStdout,
    dec: &mut Decoder,
    detach: Option<u8>,
) -> (i32, Option<i32>) {
    let _ = nix::fcntl::fcntl(
        to.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut buf = vec![0u8; MAX_FRAME];
    let mut last = size();
    let mut stdin_open = true;
    let mut backlog: Vec<u8> = Vec::new();
    let mut detach_by: Option<std::time::Instant> = None;
    loop {
        // Frames already here (the first come with the reply).
        loop {
            match dec.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Output(b))) => {
                    if out.write_all(&b).and_then(|_| out.flush()).is_err() {
                        return (255, None);
                    }
                }
                Ok(Some(Frame::End(End::Detached))) => return (0, None),
                Ok(Some(Frame::End(End::Ended(c)))) => return (0, Some(c)),
                Err(ProtocolError) => return (255, None),
            }
        }
        let timeout = match detach_by {
            Some(t) => {
                let left = t.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return (0, None);
                }
                PollTimeout::from(u16::try_from(left.as_millis()).unwrap_or(u16::MAX).max(1))
            }
            None => PollTimeout::NONE,
        };
        let mut fds = vec![
            PollFd::new(from.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigs, PollFlags::POLLIN),
        ];
        let writing = !backlog.is_empty();
        if writing {
            fds.push(PollFd::new(to.as_fd(), PollFlags::POLLOUT));
        }
        let reading = stdin_open;
        if reading {
            fds.push(PollFd::new(input, PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return (255, None),
            Ok(_) => {}
        }
        let ready = |f: &PollFd| {
            f.revents().is_some_and(|r| {
                r.intersects(
                    PollFlags::POLLIN
                        | PollFlags::POLLOUT
                        | PollFlags::POLLHUP
                        | PollFlags::POLLERR,
                )
            })
        };
        let guest = ready(&fds[0]);
        let sig = ready(&fds[1]);
        let can_write = writing && ready(&fds[2]);
        let typed = reading && fds.last().is_some_and(ready);
        drop(fds);
        if sig {
            let mut s = [0u8; 16];
            let n = nix::unistd::read(sigs, &mut s).unwrap_or(0);
            for &b in &s[..n] {
                if i32::from(b) == Signal::SIGWINCH as i32 {
                    let now = size();
                    if now != last {
                        last = now;
                        backlog.extend(size_frame(now));
                    }
                } else {
                    return (128 + i32::from(b), None);
                }
            }
        }
        if typed {
            match nix::unistd::read(input, &mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    if detach_by.is_none() && detach.is_some_and(|k| buf[..n].contains(&k)) {
                        detach_by = Some(std::time::Instant::now() + DETACH_WAIT);
                    }
                    if backlog.len() < MAX_BACKLOG {
                        backlog.extend(frame(b'd', &buf[..n]));
                    }
                }
            }
        }
        if can_write || (!backlog.is_empty() && !writing) {
            match to.write(&backlog) {
                Ok(n) => {
                    backlog.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return (255, None),
            }
        }
        if guest {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return (255, None),
                Ok(n) => dec.push(&buf[..n]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_frames_split_anywhere() {
        let mut all = frame(b'd', b"\x1b[2Jhello");
        all.extend(frame(b'd', b""));
        all.extend(frame(b'x', b"ended 7"));
        for cut in 0..all.len() {
            let mut d = Decoder::default();
            d.push(&all[..cut]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.push(&all[cut..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(
                got,
                vec![
                    Frame::Output(b"\x1b[2Jhello".to_vec()),
                    Frame::Output(vec![]),
                    Frame::End(End::Ended(7))
                ]
            );
        }
    }

    /// A hostile guest: a huge frame, an unknown type, an end status with escape
    /// sequences or out of range is refused, never passed on to be printed.
    #[test]
    fn refuses_what_a_hostile_guest_sends() {
        let bad: Vec<Vec<u8>> = vec![
            frame(b'x', b"ended 1\x1b]0;pwned\x07"),
            frame(b'x', b"ended \x1b[2J"),
            frame(b'x', b"ended 99999"),
            frame(b'x', b"ended -1"),
            frame(b'x', b"\x1b[31mdetached"),
            frame(b'q', b"x"),
            {
                let mut f = vec![b'd'];
                f.extend_from_slice(&u32::MAX.to_be_bytes());
                f
            },
            {
                let mut f = vec![b'd'];
                f.extend_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
                f
            },
        ];
        for b in bad {
            let mut d = Decoder::default();
            d.push(&b);
            assert_eq!(d.next_frame(), Err(ProtocolError), "{b:?}");
        }
        assert_eq!(parse_reply(b"OK"), Reply::Ok);
        assert_eq!(parse_reply(b"ERR notask"), Reply::NoTask);
        for r in [
            &b"OK "[..],
            b"ok",
            b"\x1b[2JOK",
            b"ERR version",
            b"",
            b"ERR notask\r",
        ] {
            assert_eq!(parse_reply(r), Reply::Fallback, "{r:?}");
        }
    }

    /// A stand-in for the attach's `ssh -W`: `sh -c SCRIPT ARG0` on pipes.
    fn stand_in(script: &str, arg0: &std::ffi::OsStr) -> (Child, ChildStdin, ChildStdout) {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(arg0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let to = child.stdin.take().unwrap();
        let from = child.stdout.take().unwrap();
        (child, to, from)
    }

    /// A stand-in guest: `ssh` that prints `bytes` and ends. Returns what reached
    /// the terminal and how the attach came out (`None`: the `ssh -t` path).
    fn against(bytes: &[u8]) -> (Vec<u8>, Option<(i32, Option<i32>)>) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("guest");
        std::fs::write(&f, bytes).unwrap();
        let (mut child, mut to, mut from) = stand_in("cat \"$0\"", f.as_os_str());
        let mut dec = Decoder::default();
        let mut term = Vec::new();
        let outcome = (read_reply(&mut from, &mut dec) == Reply::Ok).then(|| {
            let (sig_r, _sig_w) = nix::unistd::pipe().unwrap();
            let (in_r, in_w) = nix::unistd::pipe().unwrap();
            drop(in_w);
            relay(
                sig_r.as_fd(),
                in_r.as_fd(),
                &mut term,
                &mut to,
                &mut from,
                &mut dec,
                None,
            )
        });
        drop(to);
        let _ = child.kill();
        let _ = child.wait();
        (term, outcome)
    }

    #[test]
    fn detach_keys_are_control_bytes() {
        assert_eq!(key_byte("C-\\"), Some(0x1c));
        assert_eq!(key_byte("C-]"), Some(0x1d));
        assert_eq!(key_byte("C-a"), Some(0x01));
        assert_eq!(key_byte("M-x"), None);
        assert_eq!(key_byte("C-ab"), None);
        assert_eq!(key_byte("C-1"), None);
    }

    /// The attack: a guest that says OK, then neither reads nor answers (its ssh
    /// takes no input). Typing a lot must not block the host, and the detach key
    /// ends the attach on the host within DETACH_WAIT.
    #[test]
    fn a_silent_guest_cannot_hold_the_terminal() {
        let (mut child, mut to, mut from) =
            stand_in("printf 'OK\\n'; exec sleep 60", "sh".as_ref());
        let mut dec = Decoder::default();
        assert_eq!(read_reply(&mut from, &mut dec), Reply::Ok);
        let (sig_r, _sig_w) = nix::unistd::pipe().unwrap();
        let (in_r, in_w) = nix::unistd::pipe().unwrap();
        // 8 MiB of typing, more than any pipe takes, then the detach key.
        let writer = std::thread::spawn(move || {
            let mut w = std::fs::File::from(in_w);
            let chunk = vec![b'a'; 1 << 16];
            for _ in 0..128 {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
            let _ = w.write_all(&[0x1c]);
            std::thread::sleep(Duration::from_secs(30));
        });
        let mut term = Vec::new();
        let end = relay(
            sig_r.as_fd(),
            in_r.as_fd(),
            &mut term,
            &mut to,
            &mut from,
            &mut dec,
            key_byte("C-\\"),
        );
        assert_eq!(end, (0, None), "ended on the host by the detach key");
        assert!(term.is_empty());
        // The same guest, a signal (SIGTERM) instead: it ends the relay at once.
        let (in_r, _in_w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&_sig_w, &[Signal::SIGTERM as u8]).unwrap();
        let end = relay(
            sig_r.as_fd(),
            in_r.as_fd(),
            &mut term,
            &mut to,
            &mut from,
            &mut dec,
            None,
        );
        assert_eq!(end, (128 + Signal::SIGTERM as i32, None));
        let _ = child.kill();
        let _ = child.wait();
        drop(writer);
    }

    /// The attack: a guest answering with garbage, escape sequences, huge frames or
    /// a forged end status gets the `ssh -t` path or an ended attach, and nothing
    /// of what it sent outside the terminal stream reaches the terminal.
    #[test]
    fn a_hostile_guest_cannot_reach_the_terminal() {
        for reply in [
            &b"\x1b]0;pwned\x07OK\n"[..],
            b"OK\x1b[2J\n",
            &[b'O'; 100_000],
            b"",
        ] {
            assert_eq!(against(reply), (vec![], None), "{reply:?}");
        }
        let mut huge = b"OK\n".to_vec();
        huge.extend(frame(b'd', b"screen"));
        huge.push(b'd');
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend(vec![b'A'; 200_000]);
        assert_eq!(against(&huge), (b"screen".to_vec(), Some((255, None))));
        let mut forged = b"OK\n".to_vec();
        forged.extend(frame(b'x', b"ended 3\x1b]0;pwned\x07"));
        assert_eq!(against(&forged), (vec![], Some((255, None))));
        let mut fine = b"OK\n".to_vec();
        fine.extend(frame(b'd', b"\x1b[Hscreen"));
        fine.extend(frame(b'x', b"ended 3"));
        assert_eq!(
            against(&fine),
            (b"\x1b[Hscreen".to_vec(), Some((0, Some(3))))
        );
        // The link's end without an end frame: ssh's own status for a lost link.
        let mut cut = b"OK\n".to_vec();
        cut.extend(frame(b'd', b"x"));
        assert_eq!(against(&cut), (b"x".to_vec(), Some((255, None))));
    }

    #[test]
    fn the_version_is_the_scripts_digest() {
        let v = version();
        assert_eq!(v.len(), 12);
        assert!(v.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(SCRIPT.contains("VBXATTACH1"));
    }

    proptest! {
        /// Any bytes: no panic, frames bounded, an end only of the two shapes.
        #[test]
        fn decoding_any_bytes_is_bounded(chunks in proptest::collection::vec(any::<Vec<u8>>(), 0..8)) {
            let mut d = Decoder::default();
            'outer: for c in chunks {
                d.push(&c);
                loop {
                    match d.next_frame() {
                        Ok(Some(Frame::Output(b))) => prop_assert!(b.len() <= MAX_FRAME),
                        Ok(Some(Frame::End(End::Ended(n)))) => prop_assert!((0..1000).contains(&n)),
                        Ok(Some(Frame::End(End::Detached))) | Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
        }

        #[test]
        fn frames_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut d = Decoder::default();
            d.push(&frame(b'd', &payload));
            prop_assert_eq!(d.next_frame(), Ok(Some(Frame::Output(payload))));
            prop_assert_eq!(d.next_frame(), Ok(None));
        }
    }
}
