//! The guest's side channel: `vibebox-init` writes plain text lines to the
//! virtio-serial port `org.vibebox.guest` ("hello", "error <msg>", "ipv4 <addr>",
//! "fatal <msg>", "ready"). The host waits on it instead of polling SSH.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

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
    mut alive: impl FnMut() -> bool,
    mut on_event: impl FnMut(&Event),
) -> Result<Ready, WaitError> {
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
    let mut line = String::new();
    loop {
        if Instant::now() >= deadline {
            return Err(WaitError::Timeout(timeout));
        }
        match reader.read_line(&mut line) {
            Ok(0) => return Err(WaitError::Closed),
            Ok(_) if !line.ends_with('\n') => continue,
            Ok(_) => {
                let ev = parse_line(&line);
                line.clear();
                on_event(&ev);
                match ev {
                    Event::Ready => return Ok(ready),
                    Event::Fatal(m) => return Err(WaitError::Fatal(m)),
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
