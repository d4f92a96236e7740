//! The watchdog (`vibebox __watchdog`) without a VM: stand-in processes (`sleep`)
//! for the supervisor and its children. What macOS relies on (it has no parent-death
//! signal): a guarded child ends after `kill -9` of its starter, and a process that
//! merely has a guarded pid (another start time or executable) is never signalled.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vibebox::store::procid::ProcId;

fn sleeper() -> Child {
    Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn id(c: &Child) -> ProcId {
    ProcId::of(c.id()).expect("a running process has an identity")
}

/// Waits for `c` to end (bounded, so a broken watchdog fails the test instead of
/// hanging it).
fn wait_end(c: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A starter stand-in holding the only write end of the watchdog's stdin, and the
/// watchdog for `children`, ready (it has said so).
fn starter_and_watchdog(children: &[ProcId]) -> (Child, Child) {
    let (read, write) = std::io::pipe().unwrap();
    let starter = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .stdout(write)
        .spawn()
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vibebox"));
    cmd.arg("__watchdog")
        .arg("--parent")
        .arg(id(&starter).to_arg());
    for c in children {
        cmd.arg("--child").arg(c.to_arg());
    }
    let mut dog = cmd.stdin(read).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(dog.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "watching");
    (starter, dog)
}

#[test]
fn a_guarded_child_ends_after_kill_9_of_its_starter_and_a_reused_pid_is_spared() {
    let mut guarded = sleeper();
    // Processes that hold a pid the watchdog was told about, but are not the
    // process it names: one started at another time, one running another program.
    let mut reused = sleeper();
    let mut other_exe = sleeper();
    let reused_id = ProcId {
        start: id(&reused).start + 1,
        ..id(&reused)
    };
    let other_exe_id = ProcId {
        exe: "/usr/bin/qemu-system-x86_64".into(),
        ..id(&other_exe)
    };
    let (mut starter, mut dog) = starter_and_watchdog(&[id(&guarded), reused_id, other_exe_id]);

    // The watchdog guards while its starter lives.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(guarded.try_wait().unwrap().is_none(), "ended too early");
    assert!(dog.try_wait().unwrap().is_none(), "watchdog left early");

    starter.kill().unwrap();
    starter.wait().unwrap();
    let status = wait_end(&mut guarded, "the guarded child");
    assert_eq!(status.signal(), Some(libc_sigterm()), "{status:?}");
    let dog_status = wait_end(&mut dog, "the watchdog");
    assert!(dog_status.success(), "{dog_status:?}");

    // Neither look-alike was touched.
    assert!(
        reused.try_wait().unwrap().is_none(),
        "a reused pid was signalled"
    );
    assert!(
        other_exe.try_wait().unwrap().is_none(),
        "a pid running another executable was signalled"
    );
    for mut c in [reused, other_exe] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

#[test]
fn a_watchdog_leaves_when_its_children_end_on_their_own() {
    let mut guarded = sleeper();
    let (mut starter, mut dog) = starter_and_watchdog(&[id(&guarded)]);
    guarded.kill().unwrap();
    guarded.wait().unwrap();
    assert!(wait_end(&mut dog, "the watchdog").success());
    // Its starter was never touched.
    assert!(starter.try_wait().unwrap().is_none());
    starter.kill().unwrap();
    starter.wait().unwrap();
}

#[test]
fn a_watchdog_refuses_a_malformed_identity() {
    let out = Command::new(env!("CARGO_BIN_EXE_vibebox"))
        .args([
            "__watchdog",
            "--parent",
            "12:x:/bin/sh",
            "--child",
            "1:2:/bin/sh",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a process identity"), "{err}");
}

fn libc_sigterm() -> i32 {
    nix::sys::signal::Signal::SIGTERM as i32
}
