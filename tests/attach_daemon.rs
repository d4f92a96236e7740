//! The fast attach's guest daemon (`images/guest/attach.py`) run on this host
//! against a real tmux with its own socket: the protocol as the host speaks it,
//! hostile handshakes, the window size, a dropped connection, the detach key, a
//! task's end, and a newer daemon taking over from an older one. (The VM test
//! `tasks_outlive_their_clients_and_keep_the_vm_up` runs it in the guest.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vibebox::session::attach::{Decoder, End, Frame, SCRIPT, frame};

struct Lab {
    dir: tempfile::TempDir,
    port: u16,
    daemons: Vec<Child>,
}

impl Lab {
    fn sock(&self) -> std::path::PathBuf {
        self.dir.path().join("tmux.sock")
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(self.sock())
            .arg("-f")
            .arg(self.dir.path().join("tmux.conf"))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn daemon(&mut self, version: &str) {
        let d = self.dir.path();
        let child = Command::new("python3")
            .arg(d.join("attach.py"))
            .arg(d)
            .arg(self.sock())
            .arg(d.join("tmux.conf"))
            .arg(version)
            .arg(self.port.to_string())
            .arg("xterm-256color")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.daemons.push(child);
    }

    fn pid_version(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("attach.pid")).unwrap_or_default()
    }

    /// Connects and sends `hello`; the reply line and the connection.
    fn hello(&self, hello: &[u8]) -> (String, TcpStream) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(hello).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        (String::from_utf8_lossy(&line).into_owned(), s)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(self.sock())
            .arg("kill-server")
            .output();
    }
}

/// Reads frames until `until` says stop or the connection ends; the output seen.
fn read_until(
    s: &mut TcpStream,
    dec: &mut Decoder,
    until: &dyn Fn(&[u8], &Option<End>) -> bool,
) -> (Vec<u8>, Option<End>) {
    let mut out = Vec::new();
    let mut end = None;
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        while let Some(f) = dec.next_frame().expect("a well-formed frame") {
            match f {
                Frame::Output(b) => out.extend(b),
                Frame::End(e) => end = Some(e),
            }
        }
        if until(&out, &end) || Instant::now() > deadline {
            return (out, end);
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return (out, end),
            Ok(n) => dec.push(&buf[..n]),
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn wait_for(what: &str, f: &dyn Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_attach_daemon_serves_attaches_and_hands_over_to_a_newer_one() {
    for tool in ["tmux", "python3"] {
        if which::which(tool).is_err() {
            assert!(std::env::var_os("CI").is_none(), "CI must install {tool}");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut lab = Lab {
        dir,
        port,
        daemons: vec![],
    };
    let d = lab.dir.path().to_path_buf();
    std::fs::write(d.join("attach.py"), SCRIPT).unwrap();
    std::fs::write(
        d.join("tmux.conf"),
        "set -g status off\nset -g remain-on-exit on\nset -g window-size latest\n",
    )
    .unwrap();
    lab.tmux(&[
        "new-session",
        "-d",
        "-s",
        "job",
        "-x",
        "80",
        "-y",
        "24",
        "sh -c 'echo JOB-SCREEN; exec sleep 1000'",
    ]);
    // As tasks.sh's wrapper does, the task's status is written where the daemon
    // reads it (tmux 3.3 may show a pane dead without its status).
    let short = format!(
        "sh -c 'echo SHORT; read x; mkdir -p {0}/logs/short; echo 3 > {0}/logs/short/status; exit 3'",
        lab.dir.path().display()
    );
    lab.tmux(&["new-session", "-d", "-s", "short", &short]);
    lab.daemon("v1");
    wait_for("the daemon listens", &|| {
        TcpStream::connect(("127.0.0.1", port)).is_ok() && lab.pid_version().contains("v1")
    });
    let hello = |name: &str, version: &str| {
        format!("VBXATTACH1 {version} {name} 100 30 xterm-256color C-\\\n")
    };

    // Hostile or wrong handshakes get a refusal, never a client.
    for bad in [
        "garbage\n".to_string(),
        "VBXATTACH1 v1 _spare 100 30 xterm C-\\\n".into(),
        "VBXATTACH1 v1 job 100 30 x;rm C-\\\n".into(),
        "VBXATTACH1 v1 job -1 30 xterm C-\\\n".into(),
        "VBXATTACH1 v1 job 100 30 xterm C-';run-shell\n".into(),
        "x".repeat(4000),
    ] {
        let (reply, _) = lab.hello(bad.as_bytes());
        assert_eq!(reply, "ERR bad", "{bad:?}");
    }
    assert_eq!(lab.hello(hello("nope", "v1").as_bytes()).0, "ERR notask");

    // An attach: the screen, the window size and its change, input.
    let (reply, mut s) = lab.hello(hello("job", "v1").as_bytes());
    assert_eq!(reply, "OK");
    let mut dec = Decoder::default();
    let (out, _) = read_until(&mut s, &mut dec, &|o, _| contains(o, "JOB-SCREEN"));
    assert!(
        contains(&out, "JOB-SCREEN"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let size = || {
        lab.tmux(&[
            "display-message",
            "-p",
            "-t",
            "=job:",
            "#{window_width}x#{window_height}",
        ])
    };
    wait_for("the client's size", &|| size() == "100x30");
    let mut w = 90u16.to_be_bytes().to_vec();
    w.extend(20u16.to_be_bytes());
    s.write_all(&frame(b'w', &w)).unwrap();
    wait_for("the resize", &|| size() == "90x20");
    let attached = || {
        lab.tmux(&[
            "display-message",
            "-p",
            "-t",
            "=job:",
            "#{session_attached}",
        ])
    };
    assert_eq!(attached(), "1");
    // The spare's session is hidden, its own.
    assert!(
        lab.tmux(&["list-sessions", "-F", "#{session_name}"])
            .contains("_spare")
    );
    // The connection dropped (a killed client): the tmux client goes with it.
    drop(s);
    wait_for("no client left on the task", &|| attached() == "0");

    // The detach key: the end says `detached`.
    let (reply, mut s) = lab.hello(hello("job", "v1").as_bytes());
    assert_eq!(reply, "OK");
    let mut dec = Decoder::default();
    read_until(&mut s, &mut dec, &|o, _| contains(o, "JOB-SCREEN"));
    s.write_all(&frame(b'd', b"\x1c")).unwrap();
    let (_, end) = read_until(&mut s, &mut dec, &|_, e| e.is_some());
    assert_eq!(end, Some(End::Detached));

    // A task that ends: its status.
    let (reply, mut s) = lab.hello(hello("short", "v1").as_bytes());
    assert_eq!(reply, "OK");
    let mut dec = Decoder::default();
    read_until(&mut s, &mut dec, &|o, _| contains(o, "SHORT"));
    s.write_all(&frame(b'd', b"\r")).unwrap();
    wait_for("the task's end", &|| {
        lab.tmux(&["display-message", "-p", "-t", "=short:", "#{pane_dead}"]) == "1"
    });
    lab.tmux(&["detach-client", "-s", "=short"]);
    let (_, end) = read_until(&mut s, &mut dec, &|_, e| e.is_some());
    assert_eq!(end, Some(End::Ended(3)));

    // A newer daemon takes over: the older one, still serving an attach, lets go
    // of the port, and a host of the newer version is served by the newer one.
    let (reply, mut held) = lab.hello(hello("job", "v1").as_bytes());
    assert_eq!(reply, "OK");
    let mut held_dec = Decoder::default();
    read_until(&mut held, &mut held_dec, &|o, _| contains(o, "JOB-SCREEN"));
    lab.daemon("v2");
    wait_for("the newer daemon", &|| lab.pid_version().contains("v2"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Refused while the port changes hands.
        let reply = TcpStream::connect(("127.0.0.1", port))
            .map(|_| lab.hello(hello("job", "v2").as_bytes()).0)
            .unwrap_or_default();
        if reply == "OK" {
            break;
        }
        assert!(Instant::now() < deadline, "v2 never answered: {reply}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The older daemon's attach ends (its connection dropped) ...
    drop(held);
    // ... and then it ends.
    let first = &mut lab.daemons[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the older daemon stayed");
        std::thread::sleep(Duration::from_millis(100));
    }
}
