//! `make bench`: the daily loop, measured against floors taken in the same run on the
//! same image and QEMU flags, so the ratios mean something on a noisy machine.
//!
//! - `list` with 10,000 sessions in the index, against `list` with one;
//! - creating a session (`vibebox init` in a new directory), against `vibebox
//!   --version` (the process start), and the disk a session costs after its first
//!   boot;
//! - (VM) a stopped session to a command (`vibebox exec -- true`), resumed from the
//!   state `vibebox stop` saved, and booted cold after `vibebox stop --cold`, both
//!   against a bare QEMU boot of the same image with the same flags to the guest's
//!   ready line plus one `ssh true`: the floor; and the saved state's size;
//! - (VM) a running session (`vibebox exec -- true`) against a plain `ssh true`
//!   through the session's open control master: the floor;
//! - (VM) attaching to a running task (`vibebox attach NAME` until the task's
//!   screen is drawn on a pty) against the same `ssh true`, and against `ssh -t`
//!   running `tmux attach` of the task in the guest (the guest side alone).
//!
//! - (VM, root) the network gateway against QEMU's user networking, one boot of each
//!   on the same image: download throughput of 64 MiB over HTTP from a server in a
//!   network namespace, and the time of a small HTTP request on a new connection.
//!
//! - (VM) the project share: `git status`, a walk reading every file, small-file
//!   writes and a 256 MiB read on a generated tree, over virtiofs and 9p with
//!   today's options and candidate tunings, against the guest's own disk (the
//!   floor) and the host (`benches/shares/`).
//!
//! The VM parts need `VIBEBOX_TEST_IMAGES` (a directory of built images, as for the
//! tests); without it they are skipped and say so. `VIBEBOX_BENCH_BASELINE_IMAGES`
//! adds bare boots of another image (built before a recipe change) interleaved
//! with the others, for a before/after on a shared host. `VIBEBOX_BENCH_BOOTS` sets how
//! many cold boots each side gets (default 3); `VIBEBOX_BENCH_ONLY=network` (or a
//! comma-separated list of list, create, vm, attach, network, git, ports, shares) runs only those parts. Results are printed and written to
//! `target/bench-results.txt`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vibebox::image::store::{Image, Store};
use vibebox::paths::Home;
use vibebox::ssh;
use vibebox::vm::fwcfg::{GuestConfig, GuestMount};
use vibebox::vm::guest::GuestUser;
use vibebox::vm::host::Accelerator;
use vibebox::vm::mounts::Access;
use vibebox::vm::qemu::{self, Boot, Network, Preset, Share, Spec};
use vibebox::vm::ready;

const BIN: &str = env!("CARGO_BIN_EXE_vibebox");

#[allow(dead_code)]
#[path = "../tests/common/netlab.rs"]
mod netlab;
mod shares;

struct Bench {
    tmp: tempfile::TempDir,
    report: String,
}

impl Bench {
    fn home(&self) -> PathBuf {
        self.tmp.path().join("vhome")
    }

    fn cmd(&self, dir: &Path) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(dir)
            .env("VIBEBOX_HOME", self.home())
            .env("HOME", self.tmp.path().join("home"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    fn line(&mut self, s: &str) {
        println!("{s}");
        self.report.push_str(s);
        self.report.push('\n');
    }

    fn row(&mut self, what: &str, subject: Stats, floor_name: &str, floor: Stats) {
        let ratio = subject.median.as_secs_f64() / floor.median.as_secs_f64();
        self.line(&format!(
            "| {what} | {} | {floor_name} | {} | {ratio:.2}x |",
            subject, floor
        ));
    }
}

#[derive(Clone, Copy)]
struct Stats {
    median: Duration,
    min: Duration,
    n: usize,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (min {}, n={})",
            human(self.median),
            human(self.min),
            self.n
        )
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1000.0)
    }
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    Stats {
        median: samples[samples.len() / 2],
        min: samples[0],
        n: samples.len(),
    }
}

/// Times `n` runs of `f`, each of which must succeed.
fn time_n(n: usize, mut f: impl FnMut()) -> Stats {
    stats(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

/// `f` and `g` `n` times each, interleaved, so drift on a shared host hits both.
fn time_pair(n: usize, mut f: impl FnMut(), mut g: impl FnMut()) -> (Stats, Stats) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        f();
        a.push(t.elapsed());
        let t = Instant::now();
        g();
        b.push(t.elapsed());
    }
    (stats(a), stats(b))
}

/// `ssh` through the session's control master running `command`: the floor of
/// the running-session rows.
fn plain_ssh(cfg: &Path, alias: &str, command: &str) -> Command {
    let mut c = Command::new("ssh");
    c.arg("-F").arg(cfg).arg(alias).arg(command);
    c
}

fn must(mut c: Command) {
    let out = c.output().expect("runs");
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary
    // without it, and must not spend minutes booting VMs.
    if !std::env::args().any(|a| a == "--bench") {
        println!("vibebox bench: run it with `make bench` (cargo bench)");
        return;
    }
    let mut b = Bench {
        tmp: tempfile::Builder::new()
            .prefix("vbx-bench-")
            .tempdir()
            .unwrap(),
        report: String::new(),
    };
    fs::create_dir_all(b.home()).unwrap();
    fs::create_dir_all(b.tmp.path().join("home")).unwrap();
    b.line(&format!(
        "vibebox bench, {} cores, {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::env::consts::ARCH
    ));
    b.line("");
    b.line("| measured | median | floor | median | ratio |");
    b.line("| --- | --- | --- | --- | --- |");

    // VIBEBOX_BENCH_ONLY=list,create,vm,network runs just those parts.
    let only = std::env::var("VIBEBOX_BENCH_ONLY").ok();
    let want = |part: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|p| p == part))
    };
    if want("list") {
        bench_list(&mut b);
    }
    if want("create") {
        bench_create(&mut b);
    }
    match std::env::var_os("VIBEBOX_TEST_IMAGES") {
        Some(images) => {
            if want("vm") {
                bench_vm(&mut b, Path::new(&images));
            }
            if want("attach") {
                bench_attach(&mut b, Path::new(&images));
            }
            if want("network") {
                bench_network(&mut b, Path::new(&images));
            }
            if want("git") {
                bench_git(&mut b, Path::new(&images));
            }
            if want("ports") {
                bench_ports(&mut b, Path::new(&images));
            }
            if want("shares") {
                shares::bench(&mut b, Path::new(&images));
            }
        }
        None => b.line(
            "\n(VM benchmarks skipped: set VIBEBOX_TEST_IMAGES to a directory of built images, as `.ci/run` does)",
        ),
    }

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results.txt");
    let _ = fs::write(&out, &b.report);
    println!("\nwritten to {}", out.display());
}

/// `vibebox list --json` with 10,000 sessions, against the same with one.
fn bench_list(b: &mut Bench) {
    let one = b.tmp.path().join("list-one");
    let many = b.tmp.path().join("list-many");
    for (root, count) in [(&one, 1usize), (&many, 10_000)] {
        let home = root.join("vhome");
        fs::create_dir_all(&home).unwrap();
        let mut index = String::new();
        for i in 0..count {
            let id = uuid::Uuid::now_v7();
            let dir = root.join(format!("p{i}"));
            fs::create_dir_all(dir.join(".vibebox")).unwrap();
            fs::write(
                dir.join(".vibebox/session.toml"),
                format!("id = \"{id}\"\n"),
            )
            .unwrap();
            writeln!(
                index,
                "[[session]]\nid = \"{id}\"\ndirectory = \"{}\"\nlast_active = \"2026-11-01T00:00:00Z\"\n",
                dir.display()
            )
            .unwrap();
        }
        fs::write(home.join("sessions.toml"), index).unwrap();
    }
    let run = |root: &Path| {
        let mut c = Command::new(BIN);
        c.args(["list", "--json"])
            .env("VIBEBOX_HOME", root.join("vhome"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        must(c);
    };
    run(&many); // warm the page cache
    let floor = time_n(10, || run(&one));
    let subject = time_n(10, || run(&many));
    b.row(
        "`vibebox list --json`, 10,000 sessions",
        subject,
        "the same, 1 session",
        floor,
    );
}

/// A new session (`vibebox init` in a fresh directory) against starting the binary.
fn bench_create(b: &mut Bench) {
    let tmp = b.tmp.path().to_path_buf();
    let floor = time_n(20, || {
        let mut c = b.cmd(&tmp);
        c.arg("--version");
        must(c);
    });
    let mut i = 0;
    let subject = time_n(20, || {
        i += 1;
        let dir = tmp.join(format!("new{i}"));
        fs::create_dir_all(&dir).unwrap();
        let mut c = b.cmd(&dir);
        c.arg("init");
        must(c);
    });
    b.row(
        "new session (`vibebox init`, new directory)",
        subject,
        "`vibebox --version`",
        floor,
    );
}

fn find_image(images: &Path) -> Image {
    let home = Home::from_dir(images.parent().unwrap().to_path_buf());
    Store::new(&home)
        .find("default", std::env::consts::ARCH)
        .unwrap()
        .expect("an image in VIBEBOX_TEST_IMAGES")
}

fn du(path: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn bench_vm(b: &mut Bench, images: &Path) {
    let boots: usize = std::env::var("VIBEBOX_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let image = find_image(images);
    std::os::unix::fs::symlink(images, b.home().join("images")).unwrap();
    let project = b.tmp.path().join("project");
    fs::create_dir_all(&project).unwrap();
    let project = project.canonicalize().unwrap();
    fs::write(
        project.join("vibebox.toml"),
        "[supervisor]\nauto_shutdown_ms = 600000\n",
    )
    .unwrap();
    let exec_true = |b: &Bench| {
        let mut c = b.cmd(&project);
        c.args(["exec", "--", "true"]).env("VIBEBOX_ACCEL", "tcg");
        must(c);
    };
    let stop = |b: &Bench| {
        let mut c = b.cmd(&project);
        c.arg("stop");
        must(c);
    };
    let stop_cold = |b: &Bench| {
        let mut c = b.cmd(&project);
        c.args(["stop", "--cold"]);
        must(c);
    };

    // First boot (creates the disk), then the session's disk cost (before any
    // saved VM state: that is reported apart).
    exec_true(b);
    stop_cold(b);
    let id = fs::read_to_string(project.join(".vibebox/session.toml")).unwrap();
    let id = id.split('"').nth(1).unwrap().to_string();
    let sdir = b.home().join("sessions").join(&id);
    let disk = du(&sdir.join("disk.qcow2"));
    let state = du(&sdir);
    let saved = sdir.join("resume.state");
    exec_true(b);
    stop(b);

    // Another image's bare boot beside them (an image built before a change to
    // the recipe): on a shared host only boots interleaved in one run compare.
    let baseline =
        std::env::var_os("VIBEBOX_BENCH_BASELINE_IMAGES").map(|d| find_image(Path::new(&d)));

    // A stop saves the VM and the next start resumes it; `stop --cold` shuts it
    // down and the next start boots. Both, then the bare boot floor, interleaved
    // so drift hits all three.
    let mut ours = Vec::new();
    let mut cold = Vec::new();
    let mut bare = Vec::new();
    let mut before = Vec::new();
    let mut state_mib = Vec::new();
    for _ in 0..boots {
        assert!(saved.is_file(), "the stop saved no state");
        let t = Instant::now();
        exec_true(b);
        ours.push(t.elapsed());
        stop_cold(b);
        let t = Instant::now();
        exec_true(b);
        cold.push(t.elapsed());
        stop(b);
        state_mib.push(fs::metadata(&saved).map(|m| m.len() >> 20).unwrap_or(0));
        bare.push(bare_boot(&image, &project, b.tmp.path(), None).0);
        if let Some(old) = &baseline {
            before.push(bare_boot(old, &project, b.tmp.path(), None).0);
        }
    }
    let (ours, cold, bare) = (stats(ours), stats(cold), stats(bare));
    b.row(
        "stopped session to a command (`vibebox exec -- true`, resumed)",
        ours,
        "bare QEMU boot to ready + `ssh true`",
        bare,
    );
    b.row(
        "the same after `stop --cold` (a cold boot)",
        cold,
        "bare QEMU boot to ready + `ssh true`",
        bare,
    );
    state_mib.sort_unstable();
    let state_median = state_mib[state_mib.len() / 2];
    if let Some(old) = &baseline {
        b.row(
            &format!("bare QEMU boot to ready + `ssh true`, {}", image.id()),
            bare,
            &format!("the same, {} (VIBEBOX_BENCH_BASELINE_IMAGES)", old.id()),
            stats(before),
        );
    }

    // Running: vibebox against plain ssh through the open control master, on a VM
    // booted cold (the breakdown below is of its boot).
    let _ = fs::remove_file(&saved);
    exec_true(b);
    let cfg = sdir.join("ssh/config");
    let alias = ssh::alias(&id);
    let plain = |command: &str| must(plain_ssh(&cfg, &alias, command));
    plain("true");
    let (subject, floor) = time_pair(20, || exec_true(b), || plain("true"));
    b.row(
        "running session to a command (`vibebox exec -- true`)",
        subject,
        "`ssh true` through the control master",
        floor,
    );
    // `true` is a builtin of the guest's shell on both sides; a program costs an
    // exec in the guest (~20 ms under TCG), on both sides too.
    let (subject, floor) = time_pair(
        20,
        || {
            let mut c = b.cmd(&project);
            c.args(["exec", "--", "/usr/bin/true"]);
            must(c);
        },
        || plain("/usr/bin/true"),
    );
    b.row(
        "the same, a program (`vibebox exec -- /usr/bin/true`)",
        subject,
        "`ssh /usr/bin/true` through the control master",
        floor,
    );
    // That VM's boot was a cold one from a stopped session, like the rows above.
    boot_breakdown(b, &cfg, &alias);
    stop(b);
    b.line("");
    b.line(&format!(
        "session disk after its first boot: {:.1} MiB overlay, {:.1} MiB session state in all (the base image is shared: {:.0} MiB); a saved VM state (`vibebox stop`): {state_median} MiB",
        disk as f64 / 1048576.0,
        state as f64 / 1048576.0,
        image.size() as f64 / 1048576.0
    ));
}

/// Attaching to a running task, from `vibebox attach NAME` starting until the
/// task's screen shows on the terminal (then the detach key), against `ssh true`
/// through the control master, and against the guest side alone: `ssh -t` running
/// `tmux attach` of the same task, on the same kind of terminal. Interleaved, so
/// drift hits all three.
fn bench_attach(b: &mut Bench, images: &Path) {
    const MARK: &str = "TASK-SCREEN-MARK";
    if !b.home().join("images").exists() {
        std::os::unix::fs::symlink(images, b.home().join("images")).unwrap();
    }
    let project = b.tmp.path().join("attach-project");
    fs::create_dir_all(&project).unwrap();
    let project = project.canonicalize().unwrap();
    let project = project.as_path();
    fs::write(
        project.join("vibebox.toml"),
        "[supervisor]\nauto_shutdown_ms = 600000\n",
    )
    .unwrap();
    let mut c = b.cmd(project);
    c.args(["exec", "--", "true"]).env("VIBEBOX_ACCEL", "tcg");
    must(c);
    let id = fs::read_to_string(project.join(".vibebox/session.toml")).unwrap();
    let id = id.split('"').nth(1).unwrap().to_string();
    let cfg = b.home().join("sessions").join(&id).join("ssh/config");
    let cfg = cfg.as_path();
    let alias = ssh::alias(&id);
    let alias = alias.as_str();
    let mut c = b.cmd(project);
    c.args([
        "launch",
        "bench",
        "--",
        "sh",
        "-c",
        &format!("echo {MARK}; exec sleep 100000"),
    ]);
    must(c);
    let attach = || {
        let mut c = b.cmd(project);
        c.args(["attach", "bench"]);
        time_to_screen(c, MARK)
    };
    let plain = || {
        let t = Instant::now();
        must(plain_ssh(cfg, alias, "true"));
        t.elapsed()
    };
    let guest =
        || {
            let mut c = Command::new("ssh");
            c.arg("-F").arg(cfg).arg("-t").arg(alias).arg(
                "tmux -S \"$XDG_RUNTIME_DIR/vibebox-tasks/tmux.sock\" attach-session -t =bench",
            );
            time_to_screen(c, MARK)
        };
    attach();
    let (mut ours, mut floor, mut tmux) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..10 {
        ours.push(attach());
        floor.push(plain());
        tmux.push(guest());
    }
    let (ours, floor, tmux) = (stats(ours), stats(floor), stats(tmux));
    b.row(
        "attach to a running task (`vibebox attach`, to its screen drawn)",
        ours,
        "`ssh true` through the control master",
        floor,
    );
    b.row(
        "the same",
        ours,
        "`ssh -t` + `tmux attach` of the task in the guest",
        tmux,
    );
    let mut c = b.cmd(project);
    c.args(["kill", "bench"]);
    must(c);
    let mut c = b.cmd(project);
    c.arg("stop");
    must(c);
}

/// Starts `cmd` on a new terminal (120x30) and times it until `mark` shows on
/// that terminal; then sends the detach key (Ctrl-\) and waits for it to end.
fn time_to_screen(mut cmd: Command, mark: &str) -> Duration {
    use std::io::{Read, Write};
    let size = nix::pty::Winsize {
        ws_row: 30,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let tty = |f: &std::os::fd::OwnedFd| Stdio::from(f.try_clone().unwrap());
    cmd.stdin(tty(&pty.slave))
        .stdout(tty(&pty.slave))
        .stderr(tty(&pty.slave))
        .env("TERM", "xterm-256color");
    let t = Instant::now();
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    drop(pty.slave);
    let mut master = fs::File::from(pty.master);
    let mut seen = Vec::new();
    let mut buf = [0u8; 1 << 16];
    let took = loop {
        let n = master.read(&mut buf).unwrap_or(0);
        assert!(
            n > 0,
            "the terminal closed before {mark} showed: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(mark.len()).any(|w| w == mark.as_bytes()) {
            break t.elapsed();
        }
    };
    master.write_all(b"\x1c").unwrap();
    let mut drain = master.try_clone().unwrap();
    let reader =
        std::thread::spawn(move || while matches!(drain.read(&mut buf), Ok(n) if n > 0) {});
    assert!(child.wait().unwrap().success());
    drop(master);
    let _ = reader.join();
    took
}

/// Where the last cold boot's time went, by the guest's own clock: systemd's
/// kernel/initrd/userspace split, the chain of units "ready" waited for, and the
/// slowest units. Under TCG these shares are what a change to the image moves.
fn boot_breakdown(b: &mut Bench, cfg: &Path, alias: &str) {
    // `systemd-analyze time` refuses while units are still starting; the boot
    // settles within seconds of "ready".
    let script = r"i=0; until systemd-analyze time >/dev/null 2>&1 || [ $i -ge 120 ]; do i=$((i+1)); sleep 0.5; done
systemd-analyze time --no-pager 2>&1 | sed -n 1p
echo '--- kernel log: initramfs, root mounted, systemd'
{ sudo -n dmesg 2>/dev/null || dmesg; } | grep -E 'Run /init|Freeing unused kernel|EXT4-fs \(vd|Run /sbin/init|systemd\[1\]: systemd [0-9]' | head -n 6
echo '--- critical chain to vibebox-ready.service'
systemd-analyze critical-chain vibebox-ready.service --no-pager 2>&1 | sed '1,/^The time/d; /^$/d'
echo '--- 10 slowest units'
systemd-analyze blame --no-pager 2>&1 | head -n 10";
    let out = Command::new("ssh")
        .arg("-F")
        .arg(cfg)
        .arg(alias)
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    b.line("");
    b.line("boot of the cold row (after `stop --cold`), by the guest's clock (systemd-analyze):");
    b.line("```");
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        b.line(l.trim_end());
    }
    b.line("```");
}

/// A boot of the image with the flags vibebox uses (same preset, CPUs, memory,
/// project share) on QEMU's user networking, to the ready line and one `ssh true`:
/// that time, and the output of `then` run in the guest afterwards (if any).
fn bare_boot(image: &Image, project: &Path, tmp: &Path, then: Option<&str>) -> (Duration, String) {
    boot_sharing(
        image,
        project,
        tmp,
        &shares::Sharing::NineP { argv_from: &[] },
        then,
    )
}

/// [`bare_boot`] with the project shared as `sharing` says (9p or a virtiofsd the
/// bench starts, each with the candidate options of the share table).
fn boot_sharing(
    image: &Image,
    project: &Path,
    tmp: &Path,
    sharing: &shares::Sharing,
    then: Option<&str>,
) -> (Duration, String) {
    let dir = tempfile::Builder::new()
        .prefix("bare-")
        .tempdir_in(tmp)
        .unwrap();
    let d = dir.path();
    let disk = d.join("disk.qcow2");
    must({
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.disk())
            .arg(&disk)
            .arg("20G");
        c
    });
    let client = ssh::ensure_keypair(&d.join("id_ed25519"), "client").unwrap();
    let host = ssh::ensure_keypair(&d.join("host_ed25519"), "host").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fs::write(
        d.join("known_hosts"),
        ssh::known_hosts_line("127.0.0.1", port, &host.public_key().unwrap()),
    )
    .unwrap();
    let user = GuestUser::current();
    let fw = GuestConfig {
        user: user.name.clone(),
        uid: user.uid,
        authorized_keys: client.public_key().unwrap(),
        host_key: fs::read_to_string(&host.private).unwrap(),
        host_key_pub: host.public_key().unwrap(),
        hostname: "vibebox-bench".into(),
        workdir: Some(project.to_path_buf()),
        explain: String::new(),
        mounts: vec![GuestMount {
            fstype: sharing.fstype(),
            tag: "vbx0".into(),
            access: Access::ReadWrite,
            guest_path: project.to_path_buf(),
        }],
        git_overlays: Vec::new(),
        volumes: Default::default(),
    }
    .write(&d.join("fwcfg"))
    .unwrap();
    let shares = [Share {
        tag: "vbx0".into(),
        host: project.to_path_buf(),
        access: Access::ReadWrite,
        kind: sharing.kind(d),
    }];
    // Its virtiofsd, if any, listening before QEMU connects (killed when dropped).
    let _daemon = sharing.start(project, d);
    let preset = Preset::for_arch(std::env::consts::ARCH).unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(2) as u32);
    let console = d.join("console.log");
    let spec = Spec {
        preset: &preset,
        accel: Accelerator::Tcg,
        // As vibebox runs it (the filter costs nothing measurable at boot).
        sandbox: vibebox::vm::host::qemu_sandbox(std::path::Path::new(&preset.binary)),
        cpus,
        memory_mb: 2048,
        boot: Boot::Kernel {
            kernel: &image.kernel(),
            initrd: &image.initrd(),
            cmdline: &image.manifest.kernel_cmdline,
        },
        disk: &disk,
        fw_cfg: &fw,
        console_log: &console,
        console_socket: None,
        ready_socket: Some(Path::new("ready.sock")),
        export_file: None,
        smbios_serial: None,
        qmp_socket: Path::new("qmp.sock"),
        network: Network::User { ssh_port: port },
        shares: &shares,
    };
    let t = Instant::now();
    let mut child = Command::new(&preset.binary)
        .args(sharing.rewrite(qemu::argv(&spec)))
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let r = ready::wait(
        &d.join("ready.sock"),
        Duration::from_secs(900),
        || true,
        |_| {},
    );
    let ssh = |command: &str| {
        let out = Command::new("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(d.join("id_ed25519"))
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!(
                "UserKnownHostsFile={}",
                d.join("known_hosts").display()
            ))
            .arg("-p")
            .arg(port.to_string())
            .arg(format!("{}@127.0.0.1", user.name))
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bare ssh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    if let Err(e) = r {
        let _ = child.kill();
        let _ = child.wait();
        panic!("bare boot: {e}; console: {}", console.display());
    }
    ssh("true");
    let elapsed = t.elapsed();
    let extra = then.map(ssh).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    (elapsed, extra)
}

/// The gateway against QEMU user networking, one VM each: a 64 MiB download and 20
/// small requests on new connections, from a server in a network namespace (the
/// gateway never dials the host's own networks, so the server cannot be on loopback).
fn bench_network(b: &mut Bench, images: &Path) {
    if !nix::unistd::geteuid().is_root() {
        b.line("\n(network benchmark skipped: it makes a network namespace, which needs root)");
        return;
    }
    let lab = netlab::NetLab::new();
    let image = find_image(images);
    let project = b.tmp.path().join("netproject");
    fs::create_dir_all(&project).unwrap();
    let project = project.canonicalize().unwrap();
    fs::write(
        project.join("vibebox.toml"),
        "[network]\nmode = \"allowlist\"\nentries = [\"bench.test\"]\n",
    )
    .unwrap();
    // Approved as a script does: the digest the refusal names, then --expect it.
    let mut c = b.cmd(&project);
    c.arg("approve").stderr(Stdio::piped());
    let refusal = c.output().unwrap();
    let text = String::from_utf8_lossy(&refusal.stderr);
    let digest: String = text
        .split("approve --expect ")
        .nth(1)
        .expect("the refusal names a digest")
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    let mut c = b.cmd(&project);
    c.args(["approve", "--expect", &digest]);
    must(c);
    // The same script on both sides; `URL_HOST` is the name (gateway) or the address
    // (user networking, which has no DNS for the test's names).
    let script = |host: &str, resolve: &str| {
        format!(
            "curl -s {resolve} -o /dev/null -w '%{{speed_download}}\\n' http://{host}/bytes/67108864; \
             for i in $(seq 20); do curl -s {resolve} -o /dev/null -w '%{{time_total}}\\n' http://{host}/bytes/1; done"
        )
    };
    let parse = |out: &str| -> (f64, Vec<Duration>) {
        let mut lines = out.lines().filter_map(|l| l.trim().parse::<f64>().ok());
        let speed = lines
            .next()
            .unwrap_or_else(|| panic!("no download speed in the guest's output: {out:?}"));
        (speed, lines.map(Duration::from_secs_f64).collect())
    };
    // The gateway: vibebox's session (the name is resolved once and pinned; the
    // requests then skip DNS, as the user-networking side does).
    let mut c = b.cmd(&project);
    c.env(
        "VIBEBOX_DNS_UPSTREAM",
        format!("127.0.0.1:{}", lab.dns_port),
    )
    .env("VIBEBOX_ACCEL", "tcg")
    .args([
        "exec",
        "--",
        "sh",
        "-c",
        &format!(
            "getent hosts bench.test >/dev/null && {}",
            script("bench.test", "--resolve bench.test:80:198.51.100.10")
        ),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (gw_speed, gw_lat) = parse(&String::from_utf8_lossy(&out.stdout));
    let mut c = b.cmd(&project);
    c.arg("stop");
    must(c);
    // QEMU user networking, the same image and flags.
    let (_, out) = bare_boot(
        &image,
        &project,
        b.tmp.path(),
        Some(&script("198.51.100.10", "")),
    );
    let (slirp_speed, slirp_lat) = parse(&out);
    let (gw_lat, slirp_lat) = (stats(gw_lat), stats(slirp_lat));
    b.line("");
    b.line(
        "| network (one VM each, same image and flags) | gateway | QEMU user networking | ratio |",
    );
    b.line("| --- | --- | --- | --- |");
    b.line(&format!(
        "| 64 MiB over HTTP, throughput | {:.1} MiB/s | {:.1} MiB/s | {:.2}x |",
        gw_speed / 1048576.0,
        slirp_speed / 1048576.0,
        gw_speed / slirp_speed
    ));
    b.line(&format!(
        "| small HTTP request on a new connection | {gw_lat} | {slirp_lat} | {:.2}x |",
        gw_lat.median.as_secs_f64() / slirp_lat.median.as_secs_f64()
    ));
}

/// What protecting `.git` costs the agent: `git status` in the guest on a repository
/// of 10,000 files, through the overlay vibebox mounts on the read-only `.git`,
/// against the same command on the share directly (the overlay unmounted, in the
/// same VM and the same run).
fn bench_git(b: &mut Bench, images: &Path) {
    let link = b.home().join("images");
    if !link.exists() {
        std::os::unix::fs::symlink(images, &link).unwrap();
    }
    let project = b.tmp.path().join("git-10k");
    fs::create_dir_all(&project).unwrap();
    let project = project.canonicalize().unwrap();
    fs::write(
        project.join("vibebox.toml"),
        "[supervisor]\nauto_shutdown_ms = 600000\n",
    )
    .unwrap();
    for d in 0..100 {
        let dir = project.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            fs::write(dir.join(format!("f{f:02}.txt")), format!("{d} {f}\n")).unwrap();
        }
    }
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.arg("-C")
            .arg(&project)
            .args([
                "-c",
                "user.name=bench",
                "-c",
                "user.email=bench@example.invalid",
            ])
            .args(args)
            .stdout(Stdio::null());
        must(c);
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "10,000 files"]);
    let runs = 5;
    let script = format!(
        r#"t() {{ s=$(date +%s%N); git status --porcelain >/dev/null; e=$(date +%s%N); echo "$1 $(( (e - s) / 1000 ))"; }}
S=; [ "$(id -u)" = 0 ] || S="sudo -n"
git status >/dev/null
for i in $(seq {runs}); do t on; done
$S umount .git || exit 1
git status >/dev/null
for i in $(seq {runs}); do t off; done
"#
    );
    let mut c = b.cmd(&project);
    c.args(["exec", "--", "sh", "-c", &script])
        .env("VIBEBOX_ACCEL", "tcg")
        .stdout(Stdio::piped());
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut stop = b.cmd(&project);
    stop.arg("stop");
    must(stop);
    let text = String::from_utf8_lossy(&out.stdout);
    let side = |name: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .map(Duration::from_micros)
            .collect::<Vec<_>>()
    };
    b.row(
        "`git status`, 10,000 files, `.git` protected (overlay on the read-only share)",
        stats(side("on ")),
        "the same on the share directly",
        stats(side("off ")),
    );
}

/// 64 MiB from a guest server to the host through a published port, against the
/// same through `ssh -L` on the session's control master (what a user would do by
/// hand without vibebox's publishing). The guest servers listen on every address
/// (as `python3 -m http.server` does), so the gateway relays them.
fn bench_ports(b: &mut Bench, images: &Path) {
    let images_link = b.home().join("images");
    if !images_link.exists() {
        std::os::unix::fs::symlink(images, &images_link).unwrap();
    }
    let project = b.tmp.path().join("portsproject");
    fs::create_dir_all(&project).unwrap();
    let project = project.canonicalize().unwrap();
    fs::write(
        project.join("vibebox.toml"),
        "[supervisor]\nauto_shutdown_ms = 600000\n",
    )
    .unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (guest, by_hand, sink, sink_by_hand) = (free(), free(), free(), free());
    // Each connection gets 64 MiB, then the end of the stream.
    let mut c = b.cmd(&project);
    c.args([
        "exec",
        "--",
        "sh",
        "-c",
        &format!(
            "setsid nohup perl -MIO::Socket::INET -e '$SIG{{PIPE}} = q(IGNORE); $s = IO::Socket::INET->new(LocalAddr => \"0.0.0.0\", LocalPort => {guest}, Listen => 16, ReuseAddr => 1) or die; $b = \"\\0\" x 1048576; while ($c = $s->accept) {{ print $c $b for 1..64; close $c }}' > /dev/null 2>&1 < /dev/null &"
        ),
    ]);
    must(c);
    // And one that takes whatever comes, then says how much.
    let mut c = b.cmd(&project);
    c.args([
        "exec",
        "--",
        "sh",
        "-c",
        &format!(
            "setsid nohup perl -MIO::Socket::INET -e '$SIG{{PIPE}} = q(IGNORE); $s = IO::Socket::INET->new(LocalAddr => \"0.0.0.0\", LocalPort => {sink}, Listen => 16, ReuseAddr => 1) or die; while ($c = $s->accept) {{ $n = 0; while (($k = sysread($c, $b, 1048576)) > 0) {{ $n += $k }} print $c \"$n\\n\"; close $c }}' > /dev/null 2>&1 < /dev/null &"
        ),
    ]);
    must(c);
    let send_all = |port: u16| -> usize {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..64 {
            std::io::Write::write_all(&mut s, &chunk).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut s, &mut got).unwrap();
        got.trim().parse().unwrap_or(0)
    };
    let read_all = |port: u16| -> usize {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) => return n,
                Ok(k) => n += k,
                Err(e) => panic!("reading localhost:{port}: {e}"),
            }
        }
    };
    // Published by the watcher within a second or two.
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", guest)).is_err() || read_all(guest) != 64 << 20
    {
        if Instant::now() > deadline {
            let logs = fs::read_dir(b.home().join("sessions"))
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| {
                    fs::read_to_string(e.path().join("logs/supervisor.log")).unwrap_or_default()
                })
                .collect::<Vec<_>>()
                .join("\n---\n");
            panic!("VM:{guest} was never published:\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    while std::net::TcpStream::connect(("127.0.0.1", sink)).is_err() || send_all(sink) != 64 << 20 {
        assert!(Instant::now() < deadline, "VM:{sink} was never published");
        std::thread::sleep(Duration::from_millis(250));
    }
    // Both relayed by the gateway, not forwarded by ssh (the row would compare ssh
    // with itself).
    let mut c = b.cmd(&project);
    c.args(["ports", "--json"]).stdout(Stdio::piped());
    let out = c.output().unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for port in [guest, sink] {
        let p = list
            .iter()
            .find(|p| p["guest"] == port)
            .unwrap_or_else(|| panic!("VM:{port} not in {list:?}"));
        assert_eq!(p["via"], "gateway", "VM:{port}: {p}");
    }
    let id = fs::read_to_string(project.join(".vibebox/session.toml")).unwrap();
    let id = id.split('"').nth(1).unwrap().to_string();
    let cfg = b.home().join("sessions").join(&id).join("ssh/config");
    let alias = ssh::alias(&id);
    // The control master is up (the exec above made it, ControlPersist keeps it).
    let forward = |local: u16, to: u16| {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args(["-O", "forward", "-L"])
            .arg(format!("127.0.0.1:{local}:localhost:{to}"))
            .arg(&alias)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ssh -O forward: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    forward(by_hand, guest);
    assert_eq!(read_all(by_hand), 64 << 20);
    forward(sink_by_hand, sink);
    assert_eq!(send_all(sink_by_hand), 64 << 20);
    // Five rounds, the published port and `ssh -L` interleaved so drift hits both.
    let compare = |b: &mut Bench, what: &str, move_64: &dyn Fn(u16) -> usize, ports: (u16, u16)| {
        let mut published = Vec::new();
        let mut forwarded = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            assert_eq!(move_64(ports.0), 64 << 20);
            published.push(t.elapsed());
            let t = Instant::now();
            assert_eq!(move_64(ports.1), 64 << 20);
            forwarded.push(t.elapsed());
        }
        b.row(
            what,
            stats(published),
            "the same through `ssh -L` on the control master",
            stats(forwarded),
        );
    };
    compare(
        b,
        "64 MiB guest -> host through a published port",
        &read_all,
        (guest, by_hand),
    );
    compare(
        b,
        "64 MiB host -> guest through a published port",
        &send_all,
        (sink, sink_by_hand),
    );
    let mut c = b.cmd(&project);
    c.arg("stop");
    must(c);
}
