//! Session identity is the host's: what the project (guest-writable) says is a hint,
//! and no ordinary action (looking, moving a project, a hostile marker or config)
//! loses a session's disk or lowers what the user approved. Real binary, temporary
//! homes, no VM.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Env, index_entries, printed_id, run, session_file_id};

fn sessions_dir(env: &Env, id: &str) -> std::path::PathBuf {
    env.vibebox_home().join("sessions").join(id)
}

/// A session with a stand-in disk, so a test can see whether it survives.
fn with_disk(env: &Env, p: &Path) -> String {
    let out = run(env.init(p));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = printed_id(&out);
    let s = sessions_dir(env, &id);
    fs::create_dir_all(&s).unwrap();
    fs::write(s.join("disk.qcow2"), "the user's work").unwrap();
    id
}

#[test]
fn home_its_ancestors_and_the_vibebox_home_are_never_a_project() {
    let env = Env::new();
    let other = env.project("other");
    let other_id = with_disk(&env, &other);
    let home = env.home().canonicalize().unwrap();
    for dir in [
        home.clone(),
        env.tmp.path().canonicalize().unwrap(),
        env.vibebox_home().canonicalize().unwrap(),
        sessions_dir(&env, &other_id),
    ] {
        let out = run(env.init(&dir));
        assert_eq!(out.code, 2, "{}: {}", dir.display(), out.stderr);
        assert!(
            out.stderr.contains("cannot be a vibebox project") && out.stderr.lines().count() == 1,
            "{}",
            out.stderr
        );
    }
    let out = run(env.init(Path::new("/")));
    assert_eq!(out.code, 2, "{}", out.stderr);
    // The old attack: `cd ~ && vibebox init && vibebox delete` removed the vibebox
    // home. Nothing was created in $HOME, and the other session is untouched.
    assert!(!home.join(".vibebox").exists() && !home.join("vibebox.toml").exists());
    assert_eq!(index_entries(&env).len(), 1);
    assert!(sessions_dir(&env, &other_id).join("disk.qcow2").exists());
}

#[test]
fn a_moved_project_keeps_its_disk_while_others_look_and_rebinds_when_opened() {
    let env = Env::new();
    let a = env.project("a");
    let elsewhere = env.project("elsewhere");
    let id = with_disk(&env, &a);
    let moved = env.tmp.path().join("a2");
    fs::rename(&a, &moved).unwrap();
    // Looking from elsewhere before the moved project is opened.
    for args in [&["list"][..], &["init"][..], &["list", "--json"][..]] {
        let mut c = env.cmd(&elsewhere);
        c.args(args);
        let out = run(c);
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    let mut c = env.cmd(&elsewhere);
    c.args(["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&run(c).stdout).unwrap();
    let entry = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id.as_str())
        .unwrap();
    assert_eq!(entry["state"], "missing");
    assert_eq!(entry["directory"], a.display().to_string());
    assert!(sessions_dir(&env, &id).join("disk.qcow2").exists());

    let out = run(env.init(&moved));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(printed_id(&out), id, "the moved project keeps its session");
    assert!(out.stderr.contains("moved from"), "{}", out.stderr);
    assert_eq!(
        fs::read_to_string(sessions_dir(&env, &id).join("disk.qcow2")).unwrap(),
        "the user's work"
    );
}

#[test]
fn a_forged_marker_never_takes_or_stops_another_session() {
    let env = Env::new();
    let a = env.project("a");
    let b = env.project("b");
    let id_a = with_disk(&env, &a);
    let id_b = with_disk(&env, &b);
    // The guest of b writes a's id into b's marker.
    fs::write(
        b.join(".vibebox/session.toml"),
        format!("id = \"{id_a}\"\n"),
    )
    .unwrap();
    let out = run(env.init(&b));
    assert_eq!(printed_id(&out), id_b, "{}", out.stderr);
    let mut c = env.cmd(&b);
    c.args(["stop"]);
    let out = run(c);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains(&id_b),
        "stop acts on b's own session: {}",
        out.stdout
    );
    let mut c = env.cmd(&b);
    c.args(["explain", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&run(c).stdout).unwrap();
    assert_eq!(v["session"], id_b.as_str());
    // A fresh directory with a's marker while a still exists is a copy: a keeps its
    // session.
    let c_dir = env.project("c");
    fs::create_dir_all(c_dir.join(".vibebox")).unwrap();
    fs::write(
        c_dir.join(".vibebox/session.toml"),
        format!("id = \"{id_a}\"\n"),
    )
    .unwrap();
    let out = run(env.init(&c_dir));
    assert_ne!(printed_id(&out), id_a);
    assert!(index_entries(&env).contains(&(id_a.clone(), a.display().to_string())));
}

#[test]
fn a_fifo_marker_or_config_is_answered_at_once() {
    let env = Env::new();
    for (name, rel) in [("m", ".vibebox/session.toml"), ("c", "vibebox.toml")] {
        let p = env.project(name);
        fs::create_dir_all(p.join(".vibebox")).unwrap();
        nix::unistd::mkfifo(
            &p.join(rel),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let started = Instant::now();
        let out = run(env.init(&p));
        assert!(started.elapsed() < Duration::from_secs(5), "{rel}: hung");
        assert_eq!(out.code, 2, "{rel}: {}", out.stderr);
        assert!(
            out.stderr.contains("a FIFO") && out.stderr.lines().count() == 1,
            "{rel}: {}",
            out.stderr
        );
    }
    // Other projects are not held up by it.
    let other = env.project("other");
    assert_eq!(run(env.init(&other)).code, 0);
}

#[test]
fn approvals_belong_to_the_directory_and_cover_resources() {
    let env = Env::new();
    let p = env.project("p");
    // The user approves a narrower policy than the default.
    fs::write(
        p.join("vibebox.toml"),
        "[network]\nmode = \"allowlist\"\nentries = [\"example.org\"]\n",
    )
    .unwrap();
    assert_eq!(common::approve(|| env.cmd(&p)).code, 0);
    let exec = || {
        let mut c = env.cmd(&p);
        c.args(["exec", "--", "true"]);
        run(c)
    };
    // The guest empties vibebox.toml and deletes the marker: the defaults would
    // allow more than the user approved.
    fs::write(p.join("vibebox.toml"), "").unwrap();
    fs::remove_dir_all(p.join(".vibebox")).unwrap();
    let out = exec();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("more than you last approved") && out.stderr.contains("github.com"),
        "{}",
        out.stderr
    );
    // Resources are grants: more memory than approved needs the user's yes.
    fs::write(
        p.join("vibebox.toml"),
        "[box]\nmemory_mb = 4096\ncpus = 1\n[network]\nmode = \"allowlist\"\nentries = [\"example.org\"]\n",
    )
    .unwrap();
    let out = exec();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("+ memory_mb 4096") && out.stderr.contains("+ cpus 1"),
        "{}",
        out.stderr
    );
    // Beyond the host is refused outright.
    fs::write(p.join("vibebox.toml"), "[box]\ncpus = 100000\n").unwrap();
    let out = exec();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("cpus = 100000 is out of range"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_link_out_of_the_project_is_refused() {
    let env = Env::new();
    let p = env.project("p");
    fs::write(p.join("vibebox.toml"), "").unwrap();
    let secret = env.project("secret");
    // The guest plants a link in the project; the user cds into it.
    std::os::unix::fs::symlink(&secret, p.join("docs")).unwrap();
    let mut c = env.cmd(&p.join("docs"));
    c.env("PWD", p.join("docs")).arg("init");
    let out = run(c);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("symbolic link"), "{}", out.stderr);
    assert_eq!(
        fs::read_dir(&secret).unwrap().count(),
        0,
        "nothing written there"
    );
    // The guest also deletes the project's vibebox.toml and marker: the index still
    // knows the project, so the link is still refused.
    assert_eq!(run(env.init(&p)).code, 0);
    fs::remove_file(p.join("vibebox.toml")).unwrap();
    fs::remove_dir_all(p.join(".vibebox")).unwrap();
    let mut c = env.cmd(&p.join("docs"));
    c.env("PWD", p.join("docs")).arg("init");
    let out = run(c);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(
        fs::read_dir(&secret).unwrap().count(),
        0,
        "nothing written there"
    );
    fs::write(p.join("vibebox.toml"), "").unwrap();
    // A project that is itself a link inside another project: refused too.
    let inner = env.project("inner");
    fs::write(inner.join("vibebox.toml"), "").unwrap();
    std::os::unix::fs::symlink(&inner, p.join("sub")).unwrap();
    let mut c = env.cmd(&p.join("sub"));
    c.env("PWD", p.join("sub")).arg("init");
    let out = run(c);
    assert_eq!(out.code, 2, "{}", out.stderr);
    // A new session says which directory it is for.
    let q = env.project("q");
    let out = run(env.init(&q));
    assert!(
        out.stderr.contains(&format!(
            "new session {} for {}",
            printed_id(&out),
            q.display()
        )),
        "{}",
        out.stderr
    );
    assert_eq!(session_file_id(&q), printed_id(&out));
}

#[test]
fn a_project_path_with_a_newline_is_refused() {
    let env = Env::new();
    let p = env.project("bad\nname");
    let out = run(env.init(&p));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("control"), "{}", out.stderr);
}
