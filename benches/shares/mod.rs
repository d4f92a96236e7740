//! The share table (`VIBEBOX_BENCH_ONLY=shares`): what reading and writing the
//! project costs through each share type and candidate tuning, against the guest's
//! own disk (the floor a share can approach) and the host, on the generated tree
//! of [`tree`]. One bare boot per variant (the guest-disk floor rides on the first),
//! the variants interleaved with nothing else. `VIBEBOX_BENCH_SHARES` (a
//! comma-separated list of variant names) runs only some; virtiofs needs
//! `VIBEBOX_TEST_VIRTIOFSD` (as the VM tests do) or a `virtiofsd` on `PATH`.

pub mod tree;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vibebox::vm::fwcfg::FsType;
use vibebox::vm::mounts::Access;
use vibebox::vm::ownership::Owner;
use vibebox::vm::qemu::ShareKind;

use super::{Bench, boot_sharing, find_image, human};

/// How a bench boot shares the project.
pub enum Sharing {
    /// QEMU's 9p server; each `(from, to)` rewrites QEMU's argv (host-side options).
    NineP {
        argv_from: &'static [(&'static str, &'static str)],
    },
    /// A virtiofsd with vibebox's own arguments plus `extra`.
    Virtiofs {
        binary: PathBuf,
        extra: &'static [&'static str],
    },
}

/// A virtiofsd the bench started; killed when dropped.
pub struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Sharing {
    pub fn fstype(&self) -> FsType {
        match self {
            Sharing::NineP { .. } => FsType::NineP,
            Sharing::Virtiofs { .. } => FsType::Virtiofs,
        }
    }

    pub fn kind(&self, dir: &Path) -> ShareKind {
        match self {
            Sharing::NineP { .. } => ShareKind::NineP,
            Sharing::Virtiofs { .. } => ShareKind::Virtiofs {
                socket: dir.join("vfs.sock"),
            },
        }
    }

    pub fn rewrite(&self, argv: Vec<OsString>) -> Vec<OsString> {
        let Sharing::NineP { argv_from } = self else {
            return argv;
        };
        argv.into_iter()
            .map(|a| {
                let mut s = a.to_string_lossy().into_owned();
                for (from, to) in *argv_from {
                    s = s.replace(from, to);
                }
                OsString::from(s)
            })
            .collect()
    }

    /// Starts the virtiofsd (as vibebox would: sandboxed and squashing ids to the
    /// project's owner when root) and waits for its socket.
    pub fn start(&self, project: &Path, dir: &Path) -> Option<Daemon> {
        let Sharing::Virtiofs { binary, extra } = self else {
            return None;
        };
        let socket = dir.join("vfs.sock");
        let owner = nix::unistd::geteuid().is_root().then(|| {
            use std::os::unix::fs::MetadataExt;
            let m = fs::metadata(project).unwrap();
            Owner {
                uid: m.uid(),
                gid: m.gid(),
            }
        });
        let log = fs::File::create(dir.join("virtiofsd.log")).unwrap();
        let child = Command::new(binary)
            .args(vibebox::vm::virtiofsd::argv(
                project,
                &socket,
                Access::ReadWrite,
                owner,
            ))
            .args(*extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "virtiofsd made no socket; see {}",
                dir.join("virtiofsd.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(daemon)
    }
}

/// The operations, timed in microseconds by the shell that runs them (in the guest,
/// or on the host for the host column). `DROP=1` drops the guest's caches before the
/// cold ones (never on the host: the machine is shared).
const OPS: &str = r#"
drop() { [ "$DROP" = 1 ] || return 0; sync; echo 3 > /proc/sys/vm/drop_caches; }
t() { l=$1; shift; s=$(date +%s%N); "$@" >/dev/null 2>&1; r=$?; e=$(date +%s%N); echo "$P $l $(( (e - s) / 1000 )) $r"; }
walk() { find . -type f ! -path './.git/*' -print0 | xargs -0 cat > /dev/null; }
writes() { mkdir -p scratch/w || return 1; i=0; while [ $i -lt 2000 ]; do echo "$i" > scratch/w/f$i || return 1; i=$((i + 1)); done; }
ops() {
  drop; t cold git status --porcelain
  for i in 1 2 3; do t warm git status --porcelain; done
  drop; t walk walk
  t write writes; rm -rf scratch/w
  drop; t read cat big/seq.bin
}
"#;

/// The rows of the table, in order: (key, what the row measures).
const ROWS: &[(&str, &str)] = &[
    (
        "first",
        "`git status`, first in the guest (index written by the host)",
    ),
    ("cold", "`git status`, guest caches dropped"),
    ("warm", "`git status`, warm (median of 3)"),
    ("walk", "`find` + read every file (caches dropped)"),
    ("write", "write 2,000 small files"),
    ("read", "read one 256 MiB file (caches dropped)"),
];

fn git(project: &Path, args: &[&str]) {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(project)
        .args(args)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.invalid")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.invalid")
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .stdout(Stdio::null());
    super::must(c);
}

/// Per column, per operation: each sample's time and whether its command succeeded.
type Samples = BTreeMap<String, BTreeMap<String, Vec<(Duration, bool)>>>;

/// Parses `PREFIX op micros status` lines into per-column, per-op samples.
fn parse(out: &str, into: &mut Samples) {
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let [col, op, us, rc] = f[..]
            && let Ok(us) = us.parse::<u64>()
        {
            into.entry(col.to_string())
                .or_default()
                .entry(op.to_string())
                .or_default()
                .push((Duration::from_micros(us), rc == "0"));
        }
    }
}

pub fn bench(b: &mut Bench, images: &Path) {
    let image = find_image(images);
    let root = b.tmp.path().join("share-tree");
    let t = Instant::now();
    let made = tree::generate(&root, tree::Shape::BENCH).unwrap();
    let root = root.canonicalize().unwrap();
    git(&root, &["init", "-q"]);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-q", "-m", "bench tree"]);
    let digest = tree::digest(&root).unwrap();
    b.line("");
    b.line(&format!(
        "share bench tree: {} files, {:.0} MiB, sha256 {digest} (generated and committed in {:.1} s)",
        made.files,
        made.bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    ));

    let virtiofsd = std::env::var_os("VIBEBOX_TEST_VIRTIOFSD")
        .map(PathBuf::from)
        .or_else(|| which::which("virtiofsd").ok());
    // Today's options first (the floor rides on the first boot), then candidates.
    let mut variants: Vec<(&str, Sharing)> = Vec::new();
    if let Some(bin) = &virtiofsd {
        for (name, extra) in [
            ("virtiofs", &[][..]),
            ("virtiofs-tp2", &["--thread-pool-size", "2"][..]),
            (
                "virtiofs-tp2-fh",
                &["--thread-pool-size", "2", "--inode-file-handles=prefer"][..],
            ),
        ] {
            variants.push((
                name,
                Sharing::Virtiofs {
                    binary: bin.clone(),
                    extra,
                },
            ));
        }
    } else {
        b.line("(virtiofs columns skipped: set VIBEBOX_TEST_VIRTIOFSD to a Rust virtiofsd)");
    }
    variants.push(("9p", Sharing::NineP { argv_from: &[] }));
    variants.push((
        "9p-warn",
        Sharing::NineP {
            argv_from: &[("multidevs=remap", "multidevs=warn")],
        },
    ));
    if let Ok(only) = std::env::var("VIBEBOX_BENCH_SHARES") {
        variants.retain(|(n, _)| only.split(',').any(|o| o == *n));
    }

    let mut samples = Samples::new();
    // The host itself (caches never dropped: the machine is shared).
    let host = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{OPS}\nP=host; t first git status --porcelain; ops"
        ))
        .current_dir(&root)
        .env("DROP", "0")
        .output()
        .unwrap();
    parse(&String::from_utf8_lossy(&host.stdout), &mut samples);

    let mut floor_done = false;
    for (name, sharing) in &variants {
        // The index as the host last wrote it, so "first" is the first guest look.
        git(&root, &["status", "--porcelain"]);
        let guest_path = root.display().to_string();
        let mut script = format!("{OPS}\nexport DROP=1\ncd '{guest_path}' || exit 1\n");
        if !floor_done {
            // The floor: the same tree copied onto the guest's own disk, its index
            // refreshed there once before timing.
            script.push_str(
                "cp -a . /var/tmp/tree && cd /var/tmp/tree && git status >/dev/null 2>&1 && P=disk ops\n",
            );
            script.push_str(&format!("cd '{guest_path}' || exit 1\n"));
            floor_done = true;
        }
        script.push_str(&format!(
            "P={name}; t first timeout 600 git status --porcelain; rm -f .git/index.lock; ops\n"
        ));
        let t = Instant::now();
        let (_, out) = boot_sharing(&image, &root, b.tmp.path(), sharing, Some(&script));
        println!(
            "  {name}: boot and operations in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        // The raw samples as they come (a long run's partial results survive it).
        for l in out.lines() {
            println!("    {l}");
        }
        parse(&out, &mut samples);
    }

    // The table: one row per operation, one column per variant, ratio to the disk.
    let mut cols: Vec<&str> = vec!["disk"];
    cols.extend(variants.iter().map(|(n, _)| *n));
    cols.push("host");
    let median = |col: &str, op: &str| -> Option<(Duration, bool)> {
        let s = samples.get(col)?.get(op)?;
        let mut d: Vec<Duration> = s.iter().map(|x| x.0).collect();
        d.sort();
        Some((d[d.len() / 2], s.iter().all(|x| x.1)))
    };
    b.line("");
    b.line(&format!("| operation | {} |", cols.join(" | ")));
    b.line(&format!("| --- |{}", " --- |".repeat(cols.len())));
    for (op, what) in ROWS {
        let floor = median("disk", op);
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match median(c, op) {
                None => "—".into(),
                Some((d, ok)) => {
                    let failed = if ok { "" } else { " (failed)" };
                    match floor {
                        Some((f, _)) if *c != "disk" => format!(
                            "{}{failed} ({:.1}x)",
                            human(d),
                            d.as_secs_f64() / f.as_secs_f64()
                        ),
                        _ => format!("{}{failed}", human(d)),
                    }
                }
            })
            .collect();
        b.line(&format!("| {what} | {} |", cells.join(" | ")));
    }
    b.line("");
    b.line("columns: disk = the guest's own disk (the floor); virtiofs = today's virtiofsd options (`--cache auto`); -tp2 = `--thread-pool-size 2`; -fh = `--inode-file-handles=prefer`; 9p = today's options (msize 512000, cache=mmap, multidevs=remap); 9p-warn = multidevs=warn; host = the same commands on the host, caches warm.");
}
