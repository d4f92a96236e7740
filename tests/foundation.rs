//! The host commands that need no VM, run through the real binary.

mod common;

use std::fs;
use std::process::Stdio;

use common::{Env, index_entries, printed_id, run, session_file_id};

#[test]
fn first_run_writes_config_and_session_then_reuses_it() {
    let env = Env::new();
    let p = env.project("proj");
    let out = run(env.init(&p));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = printed_id(&out);
    assert!(out.stdout.contains("(new)"));
    assert!(out.stderr.contains("wrote") && out.stderr.contains("vibebox.toml"));
    let config = fs::read_to_string(p.join("vibebox.toml")).unwrap();
    assert!(config.contains("[box]") && config.contains("mode = \"allowlist\""));
    assert_eq!(session_file_id(&p), id);
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "7", "UUIDv7");
    assert_eq!(
        index_entries(&env),
        vec![(id.clone(), p.display().to_string())]
    );

    let again = run(env.init(&p));
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(printed_id(&again), id);
    assert!(again.stdout.contains("(existing)"));
    assert!(!again.stderr.contains("wrote"));
    assert_eq!(fs::read_to_string(p.join("vibebox.toml")).unwrap(), config);
}

#[test]
fn root_discovery_walks_up_and_dash_c_works() {
    let env = Env::new();
    let p = env.project("proj");
    let id = printed_id(&run(env.init(&p)));
    let deep = p.join("src/deep");
    fs::create_dir_all(&deep).unwrap();
    let out = run(env.init(&deep));
    assert_eq!(printed_id(&out), id);
    assert!(!deep.join("vibebox.toml").exists() && !deep.join(".vibebox").exists());

    let elsewhere = env.project("elsewhere");
    let mut c = env.init(&elsewhere);
    c.args(["-C", p.join("src").to_str().unwrap()]);
    let out = run(c);
    assert_eq!(printed_id(&out), id);
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);

    let mut c = env.init(&elsewhere);
    c.args(["-C", "does-not-exist"]);
    let out = run(c);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("does-not-exist"), "{}", out.stderr);
}

#[test]
fn fifty_concurrent_starts_in_one_directory_make_one_session() {
    let env = Env::new();
    let p = env.project("proj");
    let children: Vec<_> = (0..50)
        .map(|_| {
            let mut c = env.init(&p);
            c.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for child in children {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = common::Out {
            code: 0,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::new(),
        };
        ids.insert(printed_id(&out));
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids.into_iter().next().unwrap();
    assert_eq!(session_file_id(&p), id);
    assert_eq!(index_entries(&env), vec![(id, p.display().to_string())]);
}

#[test]
fn fifty_concurrent_starts_in_fifty_directories_lose_none() {
    let env = Env::new();
    let dirs: Vec<_> = (0..50).map(|i| env.project(&format!("p{i}"))).collect();
    let children: Vec<_> = dirs
        .iter()
        .map(|d| {
            let mut c = env.init(d);
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for child in children {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let entries = index_entries(&env);
    assert_eq!(entries.len(), 50);
    for d in &dirs {
        let id = session_file_id(d);
        assert!(
            entries.contains(&(id, d.display().to_string())),
            "{} missing",
            d.display()
        );
    }
}

#[test]
fn looking_never_deletes_and_prune_removes_only_missing_directories() {
    let env = Env::new();
    let a = env.project("a");
    let b = env.project("b");
    let c = env.project("c");
    for p in [&a, &b, &c] {
        assert_eq!(run(env.init(p)).code, 0);
    }
    let state = |p: &std::path::Path| env.vibebox_home().join("sessions").join(session_file_id(p));
    let (id_a, id_b, id_c) = (
        session_file_id(&a),
        session_file_id(&b),
        session_file_id(&c),
    );
    let (state_a, state_b, state_c) = (state(&a), state(&b), state(&c));
    for s in [&state_a, &state_b, &state_c] {
        fs::create_dir_all(s).unwrap();
        fs::write(s.join("disk.qcow2"), "disk").unwrap();
    }
    // The marker deleted (the guest, or git clean) and a directory gone: looking
    // (list, and commands in another project) keeps every session and its disk.
    fs::remove_dir_all(a.join(".vibebox")).unwrap();
    fs::remove_dir_all(&b).unwrap();
    let list = || {
        let out = run({
            let mut cmd = env.cmd(&c);
            cmd.args(["list", "--json"]);
            cmd
        });
        assert_eq!(out.code, 0, "{}", out.stderr);
        serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = list();
    assert_eq!(v.as_array().unwrap().len(), 3);
    let state_of = |v: &serde_json::Value, id: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(state_of(&v, &id_b), "missing");
    assert_eq!(state_of(&v, &id_a), "stopped");
    assert_eq!(run(env.init(&c)).code, 0);
    assert_eq!(index_entries(&env).len(), 3);
    for s in [&state_a, &state_b, &state_c] {
        assert!(
            s.join("disk.qcow2").exists(),
            "{} lost its disk",
            s.display()
        );
    }

    let prune = |args: &[&str]| {
        let mut cmd = env.cmd(&c);
        cmd.arg("prune").args(args);
        run(cmd)
    };
    let dry = prune(&["--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(
        dry.stdout.contains(&id_b) && !dry.stdout.contains(&id_a),
        "{}",
        dry.stdout
    );
    assert!(state_b.exists());
    let refused = prune(&[]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("pass -y"), "{}", refused.stderr);
    assert!(state_b.exists());
    let done = prune(&["-y"]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    assert!(
        done.stdout.contains(&format!("deleted session {id_b}")),
        "{}",
        done.stdout
    );
    assert!(!state_b.exists());
    assert!(state_a.join("disk.qcow2").exists() && state_c.join("disk.qcow2").exists());
    let mut left: Vec<String> = index_entries(&env).into_iter().map(|(id, _)| id).collect();
    left.sort();
    let mut want = vec![id_a.clone(), id_c.clone()];
    want.sort();
    assert_eq!(left, want);
    // The project whose marker went keeps its session: the index is the truth.
    assert_eq!(printed_id(&run(env.init(&a))), id_a);
    assert_eq!(session_file_id(&a), id_a, "the hint is written again");
}

#[test]
fn renamed_project_keeps_its_session() {
    let env = Env::new();
    let a = env.project("a");
    let id = printed_id(&run(env.init(&a)));
    let moved = env.tmp.path().join("moved here");
    fs::rename(&a, &moved).unwrap();
    let out = run(env.init(&moved));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(printed_id(&out), id);
    assert!(out.stderr.contains("moved from"), "{}", out.stderr);
    assert_eq!(
        index_entries(&env),
        vec![(id, moved.canonicalize().unwrap().display().to_string())]
    );
}

#[test]
fn copied_project_gets_a_new_session_and_is_told() {
    let env = Env::new();
    let a = env.project("a");
    let id = printed_id(&run(env.init(&a)));
    let state_a = env.vibebox_home().join("sessions").join(&id);
    fs::create_dir_all(state_a.join("ssh")).unwrap();
    fs::write(state_a.join("ssh/id_ed25519"), "secret of a").unwrap();
    let b = env.project("b");
    let status = std::process::Command::new("cp")
        .args(["-a", &format!("{}/.", a.display()), b.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = run(env.init(&b));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let new_id = printed_id(&out);
    assert_ne!(new_id, id);
    assert!(
        out.stderr.contains("copy of") && out.stderr.contains(&id),
        "{}",
        out.stderr
    );
    assert_eq!(session_file_id(&a), id);
    assert_eq!(session_file_id(&b), new_id);
    assert!(
        !env.vibebox_home().join("sessions").join(&new_id).exists(),
        "the copy starts with fresh state, not the original's keys"
    );
    assert!(state_a.join("ssh/id_ed25519").exists());
    let mut entries = index_entries(&env);
    entries.sort();
    let mut want = vec![
        (id, a.display().to_string()),
        (new_id.clone(), b.display().to_string()),
    ];
    want.sort();
    assert_eq!(entries, want);
    // And it stays the copy's own from then on.
    assert_eq!(printed_id(&run(env.init(&b))), new_id);
}

#[test]
fn corrupt_index_is_reported_and_left_byte_for_byte() {
    let env = Env::new();
    let p = env.project("p");
    assert_eq!(run(env.init(&p)).code, 0);
    let garbage =
        b"[[session]]\nid = \"019bf290-cccc-7c23-ba1d-dce7e6d40693\"\ndirectory = \n\xff junk";
    fs::write(env.index(), garbage).unwrap();
    for args in [
        vec!["list"],
        vec!["list", "--json"],
        vec!["init"],
        vec!["delete", "-y", "0"],
    ] {
        let mut c = env.cmd(&p);
        c.args(&args);
        let out = run(c);
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(&env.index().display().to_string()),
            "{args:?}: {}",
            out.stderr
        );
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert_eq!(fs::read(env.index()).unwrap(), garbage);
    }
    fs::write(env.index(), "[[session]]\nid = \"x\"\n").unwrap();
    let mut c = env.cmd(&p);
    c.arg("list");
    let out = run(c);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("sessions.toml:2:"), "{}", out.stderr);
    assert_eq!(
        fs::read_to_string(env.index()).unwrap(),
        "[[session]]\nid = \"x\"\n"
    );
}

/// Each invalid config gives exit 2, one line naming file:line:col, and the file is
/// left as the user wrote it.
#[test]
fn every_validation_error_names_file_line_and_column() {
    let env = Env::new();
    let p = env.project("p");
    let cases: &[(&str, &str, &str)] = &[
        ("[box]\ncpus = 0\n", ":2:8:", "cpus = 0"),
        ("[box]\ncpus = 100000\n", ":2:8:", "cores"),
        ("[box]\nmemory_mb = 0\n", ":2:13:", "memory_mb = 0"),
        ("[box]\nmemory_mb = 999999999999\n", ":2:13:", "memory"),
        ("[box]\ndisk_gb = 0\n", ":2:11:", "disk_gb = 0"),
        ("[box]\ndisk_gb = 99999999\n", ":2:11:", "disk"),
        ("[box]\ncpu = 2\n", ":2:1:", "did you mean `cpus`"),
        ("[box]\nmounts = [\"/tmp\"]\n", ":2:11:", "no guest path"),
        (
            "[box]\nmounts = [\"/tmp:/x:rx\"]\n",
            ":2:11:",
            "unknown mode",
        ),
        (
            "[box]\nmounts = [\"/tmp:/x:ro\", \"/var:/x\"]\n",
            ":2:25:",
            "also used",
        ),
        (
            "[box]\nmounts = [\"/tmp:/\"]\n",
            ":2:11:",
            "whole filesystem",
        ),
        ("[network]\nmode = \"open\"\n", ":2:8:", "allowlist"),
        ("[network]\nentries = [\"*\"]\n", ":2:12:", "every name"),
        (
            "[network]\nentries = [\"*.com\"]\n",
            ":2:12:",
            "public suffix",
        ),
        (
            "[network]\nentries = [\"https://github.com\"]\n",
            ":2:12:",
            "URL",
        ),
        (
            "[network]\nentries = [\"github.com/org\"]\n",
            ":2:12:",
            "path",
        ),
        (
            "[network]\nentries = [\"github.com:ssh\"]\n",
            ":2:12:",
            "port",
        ),
        (
            "[supervisor]\nauto_shutdown = 5\n",
            ":2:1:",
            "auto_shutdown_ms",
        ),
    ];
    let mut system = Vec::new();
    for dir in [
        "/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/lib", "/boot", "/run",
    ] {
        system.push(format!("[box]\nmounts = [\"/tmp:{dir}\"]\n"));
    }
    let all = cases
        .iter()
        .map(|(t, at, msg)| (t.to_string(), *at, *msg))
        .chain(
            system
                .iter()
                .map(|t| (t.clone(), ":2:11:", "system directory")),
        );
    for (text, at, msg) in all {
        fs::write(p.join("vibebox.toml"), &text).unwrap();
        for args in [vec!["init"], vec!["explain"]] {
            let mut c = env.cmd(&p);
            c.args(&args);
            let out = run(c);
            assert_eq!(out.code, 2, "{text:?}: {}", out.stderr);
            let want = format!("{}{at}", p.join("vibebox.toml").display());
            assert!(
                out.stderr.contains(&want),
                "{text:?}: want {want} in {}",
                out.stderr
            );
            assert!(
                out.stderr.contains(msg),
                "{text:?}: want {msg:?} in {}",
                out.stderr
            );
            assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
            assert_eq!(fs::read_to_string(p.join("vibebox.toml")).unwrap(), text);
        }
    }
    assert!(
        !p.join(".vibebox").exists(),
        "no session for an invalid config"
    );
}

#[test]
fn list_table_json_and_empty() {
    let env = Env::new();
    let empty = env.project("empty");
    let mut c = env.cmd(&empty);
    c.arg("list");
    let out = run(c);
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout.lines().count(), 1);
    assert!(out.stdout.contains("No sessions"), "{}", out.stdout);
    let mut c = env.cmd(&empty);
    c.args(["list", "--json"]);
    assert_eq!(run(c).stdout.trim(), "[]");

    let a = env.project("a");
    let long = env.project(&format!("b-{}", "x".repeat(80)));
    let id_a = printed_id(&run(env.init(&a)));
    let id_b = printed_id(&run(env.init(&long)));
    let mut c = env.cmd(&empty);
    c.arg("list").env("COLUMNS", "100");
    let out = run(c);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    for h in ["ID", "DIRECTORY", "STATE", "CLIENTS", "LAST ACTIVE"] {
        assert!(lines[0].contains(h), "{}", lines[0]);
    }
    let state_col = lines[0].find("STATE").unwrap();
    for l in &lines {
        assert!(l.chars().count() <= 100, "{l:?} is wider than the terminal");
    }
    // Newest first, columns aligned (compare character positions: "…" is multi-byte).
    assert!(lines[1].starts_with(&id_b) && lines[2].starts_with(&id_a));
    for l in &lines[1..] {
        let chars: Vec<char> = l.chars().collect();
        let at: String = chars[state_col..state_col + 7].iter().collect();
        assert_eq!(at, "stopped", "{l:?}");
        assert!(l.ends_with("just now") || l.ends_with("s ago"), "{l:?}");
    }
    assert!(lines[1].contains('…'));

    let mut c = env.cmd(&empty);
    c.args(["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&run(c).stdout).unwrap();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[1]["id"], id_a);
    assert_eq!(items[1]["directory"], a.display().to_string());
    assert_eq!(items[1]["state"], "stopped");
    assert_eq!(items[1]["clients"], 0);
    let t = items[1]["last_active"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(t).is_ok(), "{t}");
}

#[test]
fn commands_that_concern_no_project_create_nothing_in_the_working_directory() {
    let env = Env::new();
    let cwd = env.project("cwd");
    for args in [
        vec!["list"],
        vec!["list", "--json"],
        vec!["--version"],
        vec!["--help"],
        vec!["delete", "-y", "0190"],
    ] {
        let mut c = env.cmd(&cwd);
        c.args(&args);
        run(c);
        assert_eq!(
            fs::read_dir(&cwd).unwrap().count(),
            0,
            "{args:?} wrote a file"
        );
    }
    assert!(!env.index().exists());
}

fn delete(env: &Env, dir: &std::path::Path, args: &[&str]) -> common::Out {
    let mut c = env.cmd(dir);
    c.arg("delete").args(args);
    run(c)
}

#[test]
fn delete_by_full_id_prefix_and_the_errors() {
    let env = Env::new();
    let a = env.project("a");
    let b = env.project("b");
    let c = env.project("c");
    let id_a = printed_id(&run(env.init(&a)));
    let id_b = printed_id(&run(env.init(&b)));
    let id_c = printed_id(&run(env.init(&c)));

    // Ambiguous: ids made within the same second share a prefix.
    let common: String = id_a
        .chars()
        .zip(id_b.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect();
    let out = delete(&env, &a, &["-y", &common]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains(&id_a) && out.stderr.contains(&id_b),
        "{}",
        out.stderr
    );
    assert_eq!(index_entries(&env).len(), 3);

    let out = delete(&env, &a, &["-y", "ffffffff"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("no session matches"), "{}", out.stderr);

    // No terminal to confirm on and no -y: refused, nothing lost.
    let out = delete(&env, &a, &[&id_a]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("-y"), "{}", out.stderr);
    assert!(a.join(".vibebox").exists());

    let state_a = env.vibebox_home().join("sessions").join(&id_a);
    fs::create_dir_all(&state_a).unwrap();
    fs::write(state_a.join("disk.qcow2"), "disk").unwrap();
    let out = delete(&env, &a, &["-y", &id_a]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!a.join(".vibebox").exists());
    assert!(!state_a.exists(), "delete removes the VM disk and keys");
    assert!(
        a.join("vibebox.toml").exists(),
        "the config is the user's; it stays"
    );

    let unique = &id_b[..id_b.len() - 4];
    let out = delete(&env, &a, &["-y", unique]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!b.join(".vibebox").exists());
    assert_eq!(index_entries(&env), vec![(id_c, c.display().to_string())]);
}

#[test]
fn delete_stale_entry_whose_directory_is_gone() {
    let env = Env::new();
    let a = env.project("a");
    let id = printed_id(&run(env.init(&a)));
    fs::remove_dir_all(&a).unwrap();
    let cwd = env.project("cwd");
    let out = delete(&env, &cwd, &["-y", &id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("is missing"), "{}", out.stdout);
    assert!(index_entries(&env).is_empty());
}

#[test]
fn delete_asks_on_a_terminal() {
    if which::which("script").is_err() {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    }
    let env = Env::new();
    let a = env.project("a");
    let id = printed_id(&run(env.init(&a)));
    let bin = env!("CARGO_BIN_EXE_vibebox");
    let on_tty = |answer: &str| {
        let mut c = std::process::Command::new("script");
        c.args(["-qec", &format!("{bin} delete {id}"), "/dev/null"])
            .current_dir(&a)
            .env("VIBEBOX_HOME", env.vibebox_home())
            .env("HOME", env.home());
        let o = common::run_with_input(c, answer.as_bytes());
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, screen) = on_tty("n\n");
    assert_eq!(code, Some(1), "{screen}");
    assert!(
        screen.contains("[y/N]") && screen.contains("kept session"),
        "{screen}"
    );
    assert!(a.join(".vibebox").exists());
    let (code, screen) = on_tty("y\n");
    assert_eq!(code, Some(0), "{screen}");
    assert!(screen.contains("deleted session"), "{screen}");
    assert!(!a.join(".vibebox").exists());
}

#[test]
fn explain_text_and_json() {
    let env = Env::new();
    let p = env.project("my proj, \"quoted\" é");
    fs::create_dir_all(env.home().join(".gitconfig.d")).unwrap();
    fs::write(
        p.join("vibebox.toml"),
        "[box]\nmounts = [\"~/.gitconfig.d:~/.gitconfig.d:ro\", \"~/.claude:~/.claude\"]\n[network]\nmode = \"blocklist\"\nentries = [\"Tracker.Example.COM\"]\n",
    )
    .unwrap();
    let mut c = env.cmd(&p);
    c.arg("explain");
    let out = run(c);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let t = out.stdout;
    let mounts: Vec<&str> = t.lines().filter(|l| l.starts_with("  /")).collect();
    assert_eq!(mounts.len(), 3, "{t}");
    assert_eq!(
        mounts[0],
        format!("  {0} -> {0}  rw  (the project)", p.display())
    );
    assert!(
        mounts[1].contains(".gitconfig.d") && mounts[1].contains("  ro"),
        "{t}"
    );
    // Root on the host is root in the guest; anyone else gets /home/<name>.
    let guest_home = if nix::unistd::getuid().is_root() {
        "-> /root/"
    } else {
        "-> /home/"
    };
    assert!(
        mounts[1].contains(guest_home),
        "guest side is the guest home: {t}"
    );
    assert!(mounts[2].contains("skipped: not on this host"), "{t}");
    assert!(t.contains("Network: blocklist"), "{t}");
    assert!(
        t.contains("(enforced on the host: these names do not resolve"),
        "{t}"
    );
    assert!(t.contains("  tracker.example.com\n"), "{t}");
    assert!(t.contains("vibebox.toml") && t.contains(".vibebox/"), "{t}");
    assert!(!p.join(".vibebox").exists(), "explain creates no session");

    let mut c = env.cmd(&p);
    c.args(["explain", "--json"]);
    let out = run(c);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["project"], p.display().to_string());
    assert_eq!(v["mounts"][0]["origin"], "project");
    assert_eq!(v["mounts"][1]["access"], "ro");
    assert_eq!(v["mounts"][2]["present"], false);
    assert_eq!(v["mounts"][2]["optional"], true);
    assert_eq!(v["network"]["mode"], "blocklist");
    assert_eq!(v["network"]["enforced"], true);
    assert_eq!(v["network"]["entries"][0], "tracker.example.com");
    assert_eq!(v["storage"]["config"], "vibebox.toml");
    assert_eq!(v["storage"]["state"], ".vibebox/");
}

#[test]
fn a_symlinked_state_directory_is_refused() {
    let env = Env::new();
    let p = env.project("p");
    let victim = env.project("victim");
    std::os::unix::fs::symlink(&victim, p.join(".vibebox")).unwrap();
    fs::write(p.join("vibebox.toml"), "").unwrap();
    let out = run(env.init(&p));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("symbolic link"), "{}", out.stderr);
    assert_eq!(fs::read_dir(&victim).unwrap().count(), 0);
}

/// `vibebox fetch` outside a git repository: one line saying so, exit 2, and
/// nothing written or booted (no vibebox.toml, no session).
#[test]
fn fetch_outside_a_repository_says_so_and_writes_nothing() {
    let env = Env::new();
    let p = env.project("not a repo");
    let mut c = env.cmd(&p);
    c.arg("fetch")
        .env("GIT_CEILING_DIRECTORIES", env.tmp.path());
    let out = run(c);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("is not a git repository on the host"),
        "{}",
        out.stderr
    );
    assert!(!p.join("vibebox.toml").exists());
    assert!(!p.join(".vibebox").exists());
}

/// A guest architecture vibebox has no image or QEMU preset for is refused in one
/// line, before anything is pulled, built or booted; `image build` and `image pull`
/// without `--arch` follow `VIBEBOX_ARCH` like a boot does.
#[test]
fn an_unknown_guest_arch_is_one_clear_line() {
    let env = Env::new();
    let p = env.project("arch");
    for args in [
        &["exec", "--", "true"][..],
        &["image", "build"][..],
        &["image", "pull"][..],
    ] {
        let mut c = env.cmd(&p);
        c.env("VIBEBOX_ARCH", "riscv64").args(args);
        let out = run(c);
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(
                "VIBEBOX_ARCH=\"riscv64\" is not a guest architecture: set it to x86_64 or aarch64"
            ),
            "{args:?}: {}",
            out.stderr
        );
        // The error is the last line, and the only one about it.
        let last = out.stderr.trim_end().lines().last().unwrap_or_default();
        assert!(last.contains("VIBEBOX_ARCH"), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.matches("VIBEBOX_ARCH").count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
        assert!(!env.vibebox_home().join("images").exists(), "{args:?}");
    }
}
