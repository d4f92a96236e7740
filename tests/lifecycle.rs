//! Lifecycle properties that need no VM, on the real binary with temporary homes:
//! Ctrl-C still ends a run after an automatic image step, and what vibebox creates
//! under `sudo` in the user's vibebox home belongs to the user.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Env, run};
use sha2::Digest;

/// Serves `body` for every request on a loopback port.
fn serve_text(body: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// After `vibebox exec` pulled its image by itself, Ctrl-C during the wait for the
/// VM ends it. The pull finds its image already in the store (a decoy the config's
/// name does not match, so the automatic step runs), and a silent stand-in
/// supervisor keeps the client waiting: a real boot's wait, without a VM.
#[test]
fn ctrl_c_ends_the_wait_after_an_automatic_pull() {
    let env = Env::new();
    let project = env.project("proj");
    std::fs::write(
        project.join("vibebox.toml"),
        "[box]\nimage = \"debian-13\"\n",
    )
    .unwrap();
    let arch = std::env::consts::ARCH;
    let file = "debian-13-generic.qcow2";
    let sha: String = sha2::Sha512::digest(b"upstream")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let port = serve_text(format!("{sha}  {file}\n"));
    let catalog = env.tmp.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!(
            "[[image]]\nname = \"debian-13\"\nrelease = \"trixie\"\narch = \"{arch}\"\nurl = \"http://127.0.0.1:{port}/{file}\"\nsums_url = \"http://127.0.0.1:{port}/SHA512SUMS\"\nfile = \"{file}\"\n"
        ),
    )
    .unwrap();
    let digest = vibebox::image::recipe::pull_digest(&sha, arch);
    let image = env
        .vibebox_home()
        .join("images")
        .join(format!("debian-13-{arch}-{}", &digest[..12]));
    std::fs::create_dir_all(&image).unwrap();
    vibebox::image::manifest::Manifest {
        name: "decoy".into(),
        arch: arch.into(),
        release: "trixie".into(),
        kernel_cmdline: String::new(),
        root_device: String::new(),
        source: "test".into(),
        vibebox_version: "0".into(),
        created: chrono::Utc::now(),
        files: Default::default(),
    }
    .write(&image)
    .unwrap();

    let out = common::approve(|| env.cmd(&project));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = common::session_file_id(&project);
    let sd = env.vibebox_home().join("sessions").join(&id);
    std::fs::create_dir_all(&sd).unwrap();
    let listener = UnixListener::bind(sd.join(vibebox::paths::CONTROL_SOCKET)).unwrap();

    let mut c = env.cmd(&project);
    // A runner started in the background by a shell without job control hands its
    // children SIGINT ignored; the user's Ctrl-C is what this test is about.
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: sigaction is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                let dfl = nix::sys::signal::SigAction::new(
                    nix::sys::signal::SigHandler::SigDfl,
                    nix::sys::signal::SaFlags::empty(),
                    nix::sys::signal::SigSet::empty(),
                );
                nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGINT, &dfl)
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
    }
    c.args(["exec", "--", "true"])
        .env("VIBEBOX_CATALOG", &catalog)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // The client attaches only after the image step is over (a status question
    // before it, from the approval check, is left unanswered: no supervisor).
    let _conn = loop {
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        let _ = BufReader::new(conn.try_clone().unwrap()).read_line(&mut line);
        if line.contains("\"attach\"") {
            break conn;
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pulling"),
        "the automatic pull did not run: {stderr}"
    );
    let status = status.unwrap_or_else(|| panic!("Ctrl-C was ignored after the pull: {stderr}"));
    assert!(
        status.signal() == Some(2) || status.code() == Some(130),
        "{status:?}: {stderr}"
    );
}

/// Every file and directory under `dir` (itself included) with the owner it has
/// other than `uid:gid`.
fn not_owned_by(dir: &Path, uid: u32, gid: u32) -> Vec<String> {
    let mut bad = Vec::new();
    let m = std::fs::symlink_metadata(dir).unwrap();
    if m.uid() != uid || m.gid() != gid {
        bad.push(format!("{} {}:{}", dir.display(), m.uid(), m.gid()));
    }
    if m.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            bad.extend(not_owned_by(&e.unwrap().path(), uid, gid));
        }
    }
    bad
}

/// Run as root under `sudo` (`SUDO_UID`/`SUDO_GID`) in a home that belongs to the
/// user, vibebox leaves nothing in the vibebox home that the user does not own: the
/// commands' state, and an installed image (the step every image build and pull
/// ends with).
#[test]
fn under_sudo_the_vibebox_home_stays_the_users() {
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs this as root");
        eprintln!("skipped: needs root");
        return;
    }
    let (uid, gid) = (4242u32, 4343u32);
    let env = Env::new();
    let user_home = env.tmp.path().join("user");
    std::fs::create_dir(&user_home).unwrap();
    std::os::unix::fs::chown(&user_home, Some(uid), Some(gid)).unwrap();
    let vhome = user_home.join(".vibebox");
    let project = env.project("proj");
    let mut init = env.init(&project);
    init.env("VIBEBOX_HOME", &vhome)
        .env("SUDO_UID", uid.to_string())
        .env("SUDO_GID", gid.to_string());
    let out = run(init);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(vhome.join("sessions.toml").is_file());
    let bad = not_owned_by(&vhome, uid, gid);
    assert!(bad.is_empty(), "left to root: {bad:?}");

    // The image store's install, in this process (the same helper builds and pulls
    // use), with the same sudo environment.
    // SAFETY: this test binary's other test never reads these variables.
    unsafe {
        std::env::set_var("SUDO_UID", uid.to_string());
        std::env::set_var("SUDO_GID", gid.to_string());
    }
    vibebox::statefile::adopt_sudo_user(&vhome);
    let home = vibebox::paths::Home::from_dir(vhome.clone());
    let store = vibebox::image::store::Store::new(&home);
    let staging = store.staging().unwrap();
    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
        std::fs::write(staging.path().join(f), f).unwrap();
    }
    let mut manifest = vibebox::image::manifest::Manifest {
        name: "img".into(),
        arch: std::env::consts::ARCH.into(),
        release: "trixie".into(),
        kernel_cmdline: String::new(),
        root_device: String::new(),
        source: "test".into(),
        vibebox_version: "0".into(),
        created: chrono::Utc::now(),
        files: Default::default(),
    };
    manifest.hash_files(staging.path()).unwrap();
    let _lock = store.lock("build-img").unwrap();
    let image = store.install(staging, manifest, "0123456789ab").unwrap();
    assert!(image.dir.starts_with(&vhome));
    let bad = not_owned_by(&vhome, uid, gid);
    assert!(bad.is_empty(), "left to root: {bad:?}");
}

/// `vibebox stop` never reports a VM stopped that it could not confirm gone: a
/// supervisor that holds its lock and never answers (here the test holds it) makes
/// stop say what it waits for, then fail, so callers keep the session's state.
#[test]
fn stop_fails_when_the_vm_cannot_be_confirmed_gone() {
    let env = Env::new();
    let project = env.project("proj");
    let out = run(env.init(&project));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = common::session_file_id(&project);
    let sd = env.vibebox_home().join("sessions").join(&id);
    std::fs::create_dir_all(&sd).unwrap();
    let _held =
        vibebox::statefile::Lock::exclusive(&sd.join(vibebox::paths::SUPERVISOR_LOCK)).unwrap();
    let mut stop = env.cmd(&project);
    stop.arg("stop");
    let out = run(stop);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stderr.contains("waiting for the session's supervisor"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("did not stop") && out.stderr.contains("nothing was removed"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("stopped session"), "{}", out.stdout);
}
