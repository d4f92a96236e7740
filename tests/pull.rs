//! `vibebox image pull` on the real binary, against a real HTTP server on loopback
//! and a catalog pointing at it (`VIBEBOX_CATALOG`):
//! - bad downloads are refused with nothing installed (no VM needed);
//! - the whole path on a fixture that behaves like Debian's official cloud image
//!   (firmware boot, cloud-init NoCloud; built by tests/fixtures/cloud-image/build.sh
//!   from Debian's packages): download, verify, prepare by a real first boot, then a
//!   session boots the prepared image with a direct kernel boot.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Env, run};
use sha2::Digest;

/// Serves the files of one directory under `/cloud/<name>`, streamed from disk, and
/// records the paths asked for.
struct FileServer {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl FileServer {
    fn start(dir: &Path) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let (dir, log) = (dir.to_path_buf(), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (dir, log) = (dir.clone(), log.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &dir, &log);
                });
            }
        });
        FileServer { port, seen }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/cloud/{name}", self.port)
    }

    fn count(&self, name: &str) -> usize {
        let want = format!("/cloud/{name}");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|p| **p == want)
            .count()
    }
}

fn serve(conn: TcpStream, dir: &Path, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
    seen.lock().unwrap().push(path.clone());
    let mut conn = conn;
    let file = path
        .strip_prefix("/cloud/")
        .filter(|n| !n.contains('/') && !n.is_empty())
        .and_then(|n| std::fs::File::open(dir.join(n)).ok());
    match file {
        Some(mut f) => {
            let len = f.metadata()?.len();
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            )?;
            std::io::copy(&mut f, &mut conn)?;
        }
        None => conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
    }
    conn.flush()
}

fn sha512_hex(data: &[u8]) -> String {
    sha2::Sha512::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const IMAGE_FILE: &str = "debian-13-generic-amd64.qcow2";

/// A catalog with one x86_64/aarch64 entry `debian-13` served by `server`.
fn write_catalog(env: &Env, server: &FileServer, file: &str) -> PathBuf {
    let path = env.tmp.path().join("catalog.toml");
    let arch = std::env::consts::ARCH;
    std::fs::write(
        &path,
        format!(
            "[[image]]\nname = \"debian-13\"\nrelease = \"trixie\"\narch = \"{arch}\"\nurl = \"{}\"\nsums_url = \"{}\"\nfile = \"{file}\"\n",
            server.url(file),
            server.url("SHA512SUMS"),
        ),
    )
    .unwrap();
    path
}

fn pull_cmd(env: &Env, catalog: &Path) -> std::process::Command {
    let mut c = env.cmd(env.tmp.path());
    c.args(["image", "pull"])
        .env("VIBEBOX_CATALOG", catalog)
        .env("VIBEBOX_ACCEL", "tcg");
    c
}

fn images_in(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.vibebox_home().join("images"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn bad_downloads_are_refused_and_nothing_is_installed() {
    let env = Env::new();
    let served = env.tmp.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let body = vec![42u8; 300_000];
    std::fs::write(served.join(IMAGE_FILE), &body).unwrap();
    let wrong = sha512_hex(b"something else");
    std::fs::write(
        served.join("SHA512SUMS"),
        format!("{}  other.qcow2\n{wrong}  {IMAGE_FILE}\n", sha512_hex(b"x")),
    )
    .unwrap();
    let server = FileServer::start(&served);
    let catalog = write_catalog(&env, &server, IMAGE_FILE);

    // Checksum mismatch: refused, both sums shown, the bad file removed.
    let out = run(pull_cmd(&env, &catalog));
    assert_eq!(out.code, 1, "{}", out.stderr);
    let line = out.stderr.lines().last().unwrap();
    assert!(
        line.contains("arrived corrupt or was tampered with"),
        "{line}"
    );
    assert!(
        line.contains(&wrong) && line.contains(&sha512_hex(&body)),
        "{line}"
    );
    assert!(images_in(&env).is_empty(), "{:?}", images_in(&env));
    let downloads: Vec<_> = std::fs::read_dir(env.vibebox_home().join("downloads"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(downloads.is_empty(), "bad file kept: {downloads:?}");

    // The sums file does not list the image.
    std::fs::write(served.join("SHA512SUMS"), "nothing here\n").unwrap();
    let out = run(pull_cmd(&env, &catalog));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("does not list debian-13-generic-amd64.qcow2"),
        "{}",
        out.stderr
    );

    // An image the catalog does not have: a usage error naming the known ones.
    let mut c = pull_cmd(&env, &catalog);
    c.arg("debian-99");
    let out = run(c);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("no image \"debian-99\""),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("known: debian-13"), "{}", out.stderr);

    // A broken catalog file is named with its position.
    let bad = env.tmp.path().join("bad.toml");
    std::fs::write(&bad, "[[image]]\nname = \"x\"\nflavour = 1\n").unwrap();
    let out = run(pull_cmd(&env, &bad));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!("{}:", bad.display())),
        "{}",
        out.stderr
    );

    // The server gone: one line saying so, pointing at the alternative.
    drop(server);
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    std::fs::write(
        &catalog,
        std::fs::read_to_string(&catalog)
            .unwrap()
            .replace(&format!(":{}/", port_of(&catalog)), &format!(":{port}/")),
    )
    .unwrap();
    let out = run(pull_cmd(&env, &catalog));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("cannot reach 127.0.0.1"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("vibebox image build"), "{}", out.stderr);
    assert!(images_in(&env).is_empty());
}

/// The port in the catalog's first URL.
fn port_of(catalog: &Path) -> String {
    let text = std::fs::read_to_string(catalog).unwrap();
    let rest = text.split("http://127.0.0.1:").nth(1).unwrap();
    rest.split('/').next().unwrap().to_string()
}

/// The fixture directory (`VIBEBOX_TEST_CLOUD_FIXTURE`, set by `.ci/run`): required
/// on CI, skipped elsewhere when unset.
fn cloud_fixture() -> Option<PathBuf> {
    let dir = common::ci_dir(
        "VIBEBOX_TEST_CLOUD_FIXTURE",
        "the cloud-image fixture directory (tests/fixtures/cloud-image/build.sh)",
    )?;
    assert!(
        dir.join(IMAGE_FILE).is_file(),
        "no {IMAGE_FILE} in {}",
        dir.display()
    );
    assert!(
        dir.join("SHA512SUMS").is_file(),
        "no SHA512SUMS in {}",
        dir.display()
    );
    Some(dir)
}

#[test]
fn pulled_fixture_is_prepared_and_boots_a_session() {
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("skipped: the fixture is built for x86_64");
        return;
    }
    let Some(fixture) = cloud_fixture() else {
        return;
    };
    let env = Env::new();
    let server = FileServer::start(&fixture);
    let catalog = write_catalog(&env, &server, IMAGE_FILE);

    let out = run(pull_cmd(&env, &catalog));
    assert_eq!(out.code, 0, "pull failed: {}", out.stderr);
    let id = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("pulled "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no 'pulled' line: {} / {}", out.stdout, out.stderr))
        .to_string();
    assert!(id.starts_with("debian-13-x86_64-"), "{id}");
    assert_eq!(server.count(IMAGE_FILE), 1);

    // The same format as a built image, with the root device the guest reported.
    let dir = env.vibebox_home().join("images").join(&id);
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("image.toml")).unwrap()).unwrap();
    assert_eq!(manifest["release"].as_str(), Some("trixie"));
    assert_eq!(manifest["root_device"].as_str(), Some("/dev/vda1"));
    assert_eq!(
        manifest["kernel_cmdline"].as_str(),
        Some("root=/dev/vda1 rw rootfstype=ext4 quiet")
    );
    assert!(
        manifest["source"]
            .as_str()
            .unwrap()
            .starts_with("pull http://127.0.0.1:")
    );
    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        let sum: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(manifest["files"][f].as_str(), Some(sum.as_str()), "{f}");
    }
    // The kernel really is a Linux kernel (bzImage "HdrS" magic at 0x202).
    let kernel = std::fs::read(dir.join("vmlinuz")).unwrap();
    assert_eq!(&kernel[0x202..0x206], b"HdrS");
    // Nothing half-made is left beside it.
    assert_eq!(images_in(&env), vec![id.clone()]);

    // Pulled again: the cache and the store answer, no download.
    let out = run(pull_cmd(&env, &catalog));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!("{id} is already pulled")),
        "{}",
        out.stdout
    );
    assert_eq!(server.count(IMAGE_FILE), 1);

    let list = run({
        let mut c = env.cmd(env.tmp.path());
        c.args(["image", "list", "--json"]);
        c
    });
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(v[0]["name"].as_str(), Some(id.as_str()), "{}", list.stdout);
    assert!(v[0]["source"].as_str().unwrap().starts_with("pull "));

    // A session boots the pulled image (direct kernel boot): the project is
    // mounted at the same path, the root filesystem grew to the session's disk,
    // cloud-init stays off and its default user does not exist.
    let project = env.project("pulled project");
    std::fs::write(project.join("hello.txt"), "from the host\n").unwrap();
    let mut c = env.cmd(&project);
    c.env("VIBEBOX_ACCEL", "tcg").args([
        "exec",
        "--",
        "sh",
        "-c",
        "cat hello.txt; pwd; findmnt -no SOURCE /; df -BG --output=size / | tail -1; \
         id -u debian >/dev/null 2>&1 && echo has-debian-user; \
         test -e /etc/cloud/cloud-init.disabled && echo cloud-init-off; \
         test -e /run/cloud-init/result.json && echo cloud-init-ran; \
         test -e /run/cloud-init/instance-data.json && echo cloud-init-ran; \
         echo done",
    ]);
    let out = run(c);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "from the host");
    assert_eq!(lines[1], project.to_str().unwrap());
    assert_eq!(lines[2], "/dev/vda1");
    let size_gb: u64 = lines[3].trim().trim_end_matches('G').parse().unwrap();
    assert!(size_gb >= 15, "root not grown: {}", lines[3]);
    assert!(!out.stdout.contains("has-debian-user"), "{}", out.stdout);
    assert!(out.stdout.contains("cloud-init-off"), "{}", out.stdout);
    assert!(!out.stdout.contains("cloud-init-ran"), "{}", out.stdout);
    assert_eq!(lines.last(), Some(&"done"));

    let mut stop = env.cmd(&project);
    stop.arg("stop");
    assert_eq!(run(stop).code, 0);
}
