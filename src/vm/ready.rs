//! The guest's side channel: `vibebox-init` writes plain text lines to the
//! virtio-serial port `org.vibebox.guest` ("hello", "error <msg>", "ipv4 <addr>",
//! "fatal <msg>", "ready"). The host waits on it instead of polling SSH.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The longest line kept (longer ones are cut, the rest of the line skipped).
pub const MAX_LINE: usize = 1024;
/// The most error lines kept; past it the last one says how many more there were.
pub const MAX_ERRORS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Hello(String),
    Error(String),
    Ipv4(String),
    Fatal(String),
    Ready,
    /// Unknown words are ignored (a newer guest may say more).
    Other(String),
}

/// Parses one line of the protocol.
pub fn parse_line(line: &str) -> Event {
    let line = line.trim_end_matches(['\r', '\n']);
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    match word {
        "hello" => Event::Hello(rest.to_string()),
        "error" => Event::Error(rest.to_string()),
        "ipv4" => Event::Ipv4(rest.to_string()),
        "fatal" => Event::Fatal(rest.to_string()),
        "ready" => Event::Ready,
        _ => Event::Other(line.to_string()),
    }
}

/// What the guest said by the time it was ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ready {
    pub ipv4: Option<String>,
    /// Non-fatal problems (a mount that failed), to show the user.
    pub errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the guest did not signal ready within {0:?}")]
    Timeout(Duration),
    #[error("the guest cannot start: {0}")]
    Fatal(String),
    #[error("the VM stopped before it was ready")]
    Closed,
    #[error("cannot read the guest's ready port: {0}")]
    Io(#[from] std::io::Error),
}

/// Connects to QEMU's socket for the ready port (retrying while QEMU starts) and
/// reads until "ready", "fatal", end of stream or `timeout`. `alive` is polled so a
/// QEMU that died is noticed at once rather than at the timeout.
pub fn wait(
    socket: &Path,
    timeout: Duration,
    alive: impl FnMut() -> bool,
    on_event: impl FnMut(&Event),
) -> Result<Ready, WaitError> {
    wait_then(socket, timeout, alive, on_event, || None)
}

/// [`wait`], then at "ready" sends the guest the line `then` gives (the moment
/// matters for a `time` line), before the port is let go.
pub fn wait_then(
    socket: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
    mut on_event: impl FnMut(&Event),
    then: impl FnOnce() -> Option<String>,
) -> Result<Ready, WaitError> {
    let mut then = Some(then);
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline && alive() => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(_) if !alive() => return Err(WaitError::Closed),
            Err(_) => return Err(WaitError::Timeout(timeout)),
        }
    };
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut reader = BufReader::new(stream);
    let mut ready = Ready::default();
    let mut more_errors = 0usize;
    let mut line = Line::default();
    loop {
        if Instant::now() >= deadline {
            return Err(WaitError::Timeout(timeout));
        }
        match line.read(&mut reader) {
            Ok(None) => return Err(WaitError::Closed),
            Ok(Some(false)) => continue,
            Ok(Some(true)) => {
                let ev = parse_line(&String::from_utf8_lossy(&line.take()));
                on_event(&ev);
                match ev {
                    Event::Ready => {
                        if let Some(line) = then.take().and_then(|f| f()) {
                            use std::io::Write;
                            reader.get_mut().write_all(line.as_bytes())?;
                        }
                        if more_errors > 0 {
                            ready
                                .errors
                                .push(format!("... and {more_errors} more errors"));
                        }
                        return Ok(ready);
                    }
                    Event::Fatal(m) => return Err(WaitError::Fatal(m)),
                    Event::Error(_) if ready.errors.len() >= MAX_ERRORS - 1 => more_errors += 1,
                    Event::Error(m) => ready.errors.push(m),
                    Event::Ipv4(a) => ready.ipv4 = Some(a),
                    Event::Hello(_) | Event::Other(_) => {}
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !alive() {
                    return Err(WaitError::Closed);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One line of the port, kept to [`MAX_LINE`] bytes however long the guest makes
/// it (the rest, up to the newline, is read and dropped).
#[derive(Default)]
struct Line {
    buf: Vec<u8>,
}

impl Line {
    /// Reads on: `Some(true)` when a line is complete, `Some(false)` when more is
    /// needed, `None` at the end of the stream.
    fn read(&mut self, r: &mut impl BufRead) -> std::io::Result<Option<bool>> {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok(None);
        }
        let (part, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..=i], true),
            None => (avail, false),
        };
        let room = MAX_LINE.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&part[..part.len().min(room)]);
        let n = part.len();
        r.consume(n);
        Ok(Some(done))
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parses_protocol_lines() {
        assert_eq!(parse_line("ready\n"), Event::Ready);
        assert_eq!(
            parse_line("ipv4 10.0.2.15\n"),
            Event::Ipv4("10.0.2.15".into())
        );
        assert_eq!(
            parse_line("error mount /x failed\r\n"),
            Event::Error("mount /x failed".into())
        );
        assert_eq!(parse_line("fatal no user"), Event::Fatal("no user".into()));
        assert_eq!(
            parse_line("future thing"),
            Event::Other("future thing".into())
        );
    }

    #[test]
    fn waits_through_partial_lines() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("r.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"hello vibebox-init 1\nerror mount failed\nipv4 10.0.2")
                .unwrap();
            std::thread::sleep(Duration::from_millis(700));
            s.write_all(b".15\nready\n").unwrap();
        });
        let r = wait(&sock, Duration::from_secs(10), || true, |_| {}).unwrap();
        t.join().unwrap();
        assert_eq!(r.ipv4.as_deref(), Some("10.0.2.15"));
        assert_eq!(r.errors, ["mount failed"]);
    }

    /// A guest (a boot script it persisted) can write anything to the port: one
    /// endless line, endless error lines. What the host keeps of it is bounded.
    #[test]
    fn what_the_guest_says_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("r.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut long = b"error ".to_vec();
            long.extend(std::iter::repeat_n(b'x', 8 << 20));
            long.push(b'\n');
            s.write_all(&long).unwrap();
            for i in 0..10_000 {
                s.write_all(format!("error mount {i} failed\n").as_bytes())
                    .unwrap();
            }
            s.write_all(b"ipv4 10.0.2.15\nready\n").unwrap();
        });
        let mut longest = 0;
        let r = wait(
            &sock,
            Duration::from_secs(60),
            || true,
            |e| {
                if let Event::Error(m) = e {
                    longest = longest.max(m.len());
                }
            },
        )
        .unwrap();
        t.join().unwrap();
        assert!(longest <= MAX_LINE, "{longest}");
        assert!(r.errors.len() <= MAX_ERRORS, "{}", r.errors.len());
        assert!(r.errors[0].len() <= MAX_LINE);
        assert!(
            r.errors.last().unwrap().contains("more"),
            "{:?}",
            r.errors.last()
        );
        assert_eq!(r.ipv4.as_deref(), Some("10.0.2.15"));
    }

    #[test]
    fn fatal_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("r.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"fatal sshd did not start\n").unwrap();
            let (s2, _) = listener.accept().unwrap();
            drop(s2);
        });
        let e = wait(&sock, Duration::from_secs(10), || true, |_| {}).unwrap_err();
        assert!(matches!(e, WaitError::Fatal(m) if m == "sshd did not start"));
        let e = wait(&sock, Duration::from_secs(10), || true, |_| {}).unwrap_err();
        assert!(matches!(e, WaitError::Closed));
        t.join().unwrap();
    }
}
