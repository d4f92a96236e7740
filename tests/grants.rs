//! A grant names a real directory: mount sources are canonical when shown and
//! approved, and a source the VM could redirect (inside the project or a
//! read-write mount) is refused. Real binary, temporary homes, no VM.

mod common;

use std::fs;
use std::path::Path;

use common::{Env, Out, run};

#[test]
fn mount_sources_inside_writable_shares_are_refused() {
    let env = Env::new();
    let p = env.project("p");
    let outside = env.project("scratch");
    fs::create_dir_all(p.join("data")).unwrap();
    fs::create_dir_all(outside.join("inner")).unwrap();
    for (config, inside) in [
        // The documented relative form: under the project, which the guest writes.
        (
            "[box]\nmounts = [\"data:/mnt/data:ro\"]\n".to_string(),
            p.display().to_string(),
        ),
        (
            format!("[box]\nmounts = [\"{}/data:/mnt/data:ro\"]\n", p.display()),
            p.display().to_string(),
        ),
        // A ro mount inside an rw mount.
        (
            format!(
                "[box]\nmounts = [\"{0}:/mnt/s\", \"{0}/inner:/mnt/i:ro\"]\n",
                outside.display()
            ),
            outside.display().to_string(),
        ),
    ] {
        fs::write(p.join("vibebox.toml"), &config).unwrap();
        let out = run(env.init(&p));
        assert_eq!(out.code, 2, "{config}: {}", out.stderr);
        assert!(
            out.stderr.contains(&format!("lies inside {inside}"))
                && out.stderr.lines().count() == 1,
            "{config}: {}",
            out.stderr
        );
    }
    // `..` and invisible characters in a host path.
    for bad in ["/tmp/../etc:/mnt/x", "/tmp/a\u{202e}b:/mnt/x"] {
        fs::write(
            p.join("vibebox.toml"),
            format!("[box]\nmounts = [\"{bad}\"]\n"),
        )
        .unwrap();
        assert_eq!(run(env.init(&p)).code, 2, "{bad}");
    }
}

#[test]
fn a_grant_names_the_real_directory_and_a_swapped_link_asks_again() {
    let env = Env::new();
    let p = env.project("p");
    let real = env.project("real data");
    let other = env.project("other");
    let link = env.tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    fs::write(
        p.join("vibebox.toml"),
        format!("[box]\nmounts = [\"{}:/mnt/d:ro\"]\n", link.display()),
    )
    .unwrap();
    let out = common::approve(|| env.cmd(&p));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("mount ro {} -> /mnt/d", real.display())),
        "the grant shows where the link leads: {}",
        out.stdout
    );
    // Someone points the link elsewhere: the next start is refused, naming it.
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&other, &link).unwrap();
    let mut c = env.cmd(&p);
    c.args(["exec", "--", "true"]);
    let out = run(c);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("+ mount ro {} -> /mnt/d", other.display())),
        "{}",
        out.stderr
    );
}

#[test]
fn approve_shows_what_it_approves_and_needs_the_reviewed_digest() {
    let env = Env::new();
    let p = env.project("p");
    fs::write(
        p.join("vibebox.toml"),
        "[network]\nmode = \"blocklist\"\nentries = []\n",
    )
    .unwrap();
    let approve = |args: &[&str]| {
        let mut c = env.cmd(&p);
        c.arg("approve").args(args);
        run(c)
    };
    // No terminal: nothing is approved blindly; the refusal names the changes and
    // the digest of what the file grants now.
    let out = approve(&[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("+ network blocklist"), "{}", out.stderr);
    let digest = common::expected_digest(&out.stderr).unwrap();
    assert_eq!(digest.len(), 32);
    // The guest edits the file between the review and the approval.
    fs::write(
        p.join("vibebox.toml"),
        "[box]\nmounts = [\"/etc:/mnt/etc:ro\"]\n[network]\nmode = \"blocklist\"\nentries = []\n",
    )
    .unwrap();
    let out = approve(&["--expect", &digest]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("now grants something else"),
        "{}",
        out.stderr
    );
    let mut c = env.cmd(&p);
    c.args(["exec", "--", "true"]);
    assert_eq!(run(c).code, 2, "still not approved");
    // What was reviewed is what gets approved.
    let now = common::expected_digest(&approve(&[]).stderr).unwrap();
    let out = approve(&["--expect", &now]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("+ mount ro /etc -> /mnt/etc"),
        "{}",
        out.stdout
    );
}

#[test]
fn guest_text_reaches_the_terminal_escaped() {
    let env = Env::new();
    let p = env.project("p");
    // An unknown key carrying a terminal escape (sets the window title).
    fs::write(
        p.join("vibebox.toml"),
        "[box]\n\"x\\u001b]0;pwned\\u0007\" = 1\n",
    )
    .unwrap();
    let out = run(env.init(&p));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        !out.stderr.contains('\u{1b}') && !out.stderr.contains('\u{7}'),
        "{:?}",
        out.stderr
    );
    assert!(out.stderr.contains("\\u{1b}"), "{}", out.stderr);
}

/// A host service the VM may reach is a grant: the file alone does not give it.
#[test]
fn host_ports_and_published_ports_need_approval() {
    let env = Env::new();
    let p = env.project("p");
    fs::write(
        p.join("vibebox.toml"),
        "[ports]\nauto = false\npublish = [\"5433:5432\", \"0.0.0.0:8080:80\"]\nhost = [\"5432\"]\n",
    )
    .unwrap();
    let mut c = env.cmd(&p);
    c.args(["exec", "--", "true"]);
    let out = run(c);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("+ host port 127.0.0.1:5432"),
        "{}",
        out.stderr
    );
    // Published host ports too: the VM taking 127.0.0.1:5433 (or turning `auto`
    // back on) is the user's choice.
    for line in [
        "+ publish 127.0.0.1:5433 -> VM:5432",
        "+ publish 0.0.0.0:8080 -> VM:80 (reachable from your network)",
        "+ ports auto off",
    ] {
        assert!(out.stderr.contains(line), "{line}: {}", out.stderr);
    }
    let digest = common::expected_digest(&out.stderr).unwrap();
    let mut c = env.cmd(&p);
    c.args(["approve", "--expect", &digest]);
    let out = run(c);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("+ host port 127.0.0.1:5432"),
        "{}",
        out.stdout
    );
    // The guest turns `auto` back on: asked again.
    fs::write(
        p.join("vibebox.toml"),
        "[ports]\npublish = [\"5433:5432\", \"0.0.0.0:8080:80\"]\nhost = [\"5432\"]\n",
    )
    .unwrap();
    let mut c = env.cmd(&p);
    c.args(["exec", "--", "true"]);
    let out = run(c);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("- ports auto off"), "{}", out.stderr);
}

/// The vibebox home holds every session's ssh key, disk and the approvals: a mount
/// that reaches it (the home itself, a directory holding it, one inside it, or a
/// link to any of those) would let the VM read other sessions' keys or approve its
/// own grants. Refused before anything is asked, whatever the mode.
#[test]
fn mounts_reaching_the_vibebox_home_are_refused() {
    let env = Env::new();
    let p = env.project("p");
    // `vibebox init` with one mount of `source`, the vibebox home at `vibebox_home`.
    let init_mounting = |source: &Path, mode: &str, vibebox_home: &Path| {
        fs::write(
            p.join("vibebox.toml"),
            format!("[box]\nmounts = [\"{}:/mnt/x:{mode}\"]\n", source.display()),
        )
        .unwrap();
        let mut c = env.init(&p);
        c.env("VIBEBOX_HOME", vibebox_home);
        run(c)
    };
    let refused = |out: Out, what: String| {
        assert_eq!(out.code, 2, "{what}: {}", out.stderr);
        assert!(
            out.stderr.contains("vibebox home") && out.stderr.lines().count() == 1,
            "{what}: {}",
            out.stderr
        );
    };
    let vhome = env.vibebox_home().canonicalize().unwrap();
    fs::create_dir_all(vhome.join("sessions")).unwrap();
    let link = env.tmp.path().join("innocent");
    std::os::unix::fs::symlink(&vhome, &link).unwrap();
    for source in [
        vhome.clone(),
        vhome.parent().unwrap().to_path_buf(),
        vhome.join("sessions"),
        link.clone(),
    ] {
        for mode in ["ro", "rw"] {
            let out = init_mounting(&source, mode, &env.vibebox_home());
            refused(out, format!("{} {mode}", source.display()));
        }
    }
    // A vibebox home reached through a link (`VIBEBOX_HOME=/data/vb` with `/data`
    // linked to a bigger disk): a rw mount of the directory holding the link could
    // swap it for a home the VM wrote, so it is refused though it does not hold where
    // the home really is.
    let disk = env.project("disk");
    fs::create_dir_all(disk.join("vb")).unwrap();
    let holder = env.project("holder");
    std::os::unix::fs::symlink(&disk, holder.join("data")).unwrap();
    for source in [holder.clone(), holder.join("data")] {
        let out = init_mounting(&source, "rw", &holder.join("data/vb"));
        refused(out, source.display().to_string());
    }
    // A sibling of the vibebox home is a normal grant.
    let sibling = env.project("data");
    let out = init_mounting(&sibling, "ro", &env.vibebox_home());
    assert_eq!(out.code, 0, "{}", out.stderr);
}
