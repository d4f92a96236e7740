//! Shared test fixtures: a private VIBEBOX_HOME and HOME per test, and the real binary.
#![allow(dead_code)]

pub mod netlab;

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Env {
    pub tmp: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("vbx-test-")
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(tmp.path().join("home")).unwrap();
        std::fs::create_dir_all(tmp.path().join("vhome")).unwrap();
        Env { tmp }
    }

    /// A host home directory for the test, so nothing touches the real one.
    pub fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    pub fn vibebox_home(&self) -> PathBuf {
        self.tmp.path().join("vhome")
    }

    pub fn index(&self) -> PathBuf {
        self.vibebox_home().join("sessions.toml")
    }

    /// Creates (and canonicalises) a project directory under the test's temp dir.
    pub fn project(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p.canonicalize().unwrap()
    }

    /// `vibebox` run in `dir`, with the test's homes and no terminal.
    pub fn cmd(&self, dir: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vibebox"));
        c.current_dir(dir)
            .env("VIBEBOX_HOME", self.vibebox_home())
            .env("HOME", self.home())
            .env_remove("COLUMNS")
            .env_remove("VIBEBOX_LOG")
            // Shares are 9p unless a test asks for virtiofs (a virtiofsd on the
            // machine's PATH must not change what a test covers).
            .env("VIBEBOX_VIRTIOFSD", "off");
        c
    }
}

impl Env {
    /// Shares the prebuilt images with this test's vibebox home.
    pub fn link_images(&self, images: &Path) {
        std::os::unix::fs::symlink(images, self.vibebox_home().join("images")).unwrap();
    }

    /// `vibebox init` in `dir`: find or create the session without booting.
    pub fn init(&self, dir: &Path) -> Command {
        let mut c = self.cmd(dir);
        c.arg("init");
        c
    }
}

/// A path a test needs from `.ci/run` through the environment variable `var`:
/// `None` (the test says it skipped, and why) outside CI when it is unset; on CI
/// (`CI` set) a missing one fails the test instead of skipping it.
pub fn ci_dir(var: &str, what: &str) -> Option<PathBuf> {
    let Some(dir) = std::env::var_os(var) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set {var} to {what}"
        );
        eprintln!("skipped: set {var} to {what}");
        return None;
    };
    Some(PathBuf::from(dir))
}

/// The Rust virtiofsd the virtiofs tests use (`VIBEBOX_TEST_VIRTIOFSD`, which
/// `.ci/run` installs).
pub fn test_virtiofsd() -> Option<PathBuf> {
    let bin = ci_dir("VIBEBOX_TEST_VIRTIOFSD", "the Rust virtiofsd binary")?;
    assert!(bin.is_file(), "no virtiofsd at {}", bin.display());
    Some(bin)
}

/// The directory of prebuilt images the VM tests use (`VIBEBOX_TEST_IMAGES`, which
/// `.ci/run` sets after building the image).
pub fn test_images() -> Option<PathBuf> {
    let dir = ci_dir("VIBEBOX_TEST_IMAGES", "a directory holding a built image")?;
    let has_image = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.path().join("image.toml").is_file())
        })
        .unwrap_or(false);
    assert!(has_image, "no image in {}", dir.display());
    Some(dir)
}

/// Runs `c` with `input` on its stdin (stdout and stderr captured).
pub fn run_with_input(mut c: Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(mut c: Command) -> Out {
    let o = c.stdin(std::process::Stdio::null()).output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The session id `vibebox` printed ("session <id> (...)").
pub fn printed_id(out: &Out) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no session line in {:?} / {:?}", out.stdout, out.stderr))
        .to_string()
}

pub fn session_file_id(project: &Path) -> String {
    let text = std::fs::read_to_string(project.join(".vibebox/session.toml")).unwrap();
    let v: toml::Table = toml::from_str(&text).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// The index as (id, directory) pairs.
pub fn index_entries(env: &Env) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(env.index()).unwrap_or_default();
    let v: toml::Table = toml::from_str(&text).unwrap();
    v.get("session")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["id"].as_str().unwrap().to_string(),
                        e["directory"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The digest a refusal names in `vibebox approve --expect <digest>`.
pub fn expected_digest(text: &str) -> Option<String> {
    let rest = text.split("approve --expect ").nth(1)?;
    Some(rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect())
}

/// `vibebox approve` as a script does it after reviewing: the refusal without a
/// terminal names the digest of what the file grants, and approving that digest
/// records it. `cmd` makes a fresh `vibebox` command each time.
pub fn approve(cmd: impl Fn() -> Command) -> Out {
    let mut c = cmd();
    c.arg("approve");
    let first = run(c);
    let Some(digest) = expected_digest(&first.stderr) else {
        return first;
    };
    let mut c = cmd();
    c.args(["approve", "--expect", &digest]);
    run(c)
}
