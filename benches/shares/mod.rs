//! The share table (`VIBEBOX_BENCH_ONLY=shares`): what reading and writing the
//! project costs through each share type and candidate tuning, against the guest's
//! own disk (the floor a share can approach) and the host, on the generated tree
//! of [`tree`]. One bare boot per host-side setup (QEMU's or virtiofsd's options);
//! the columns that differ only inside the guest (9p mount options, git settings)
//! share their boot, each starting from the index as the host's git wrote it. The
//! guest-disk floor rides on the first boot, seeded from one tar the host writes
//! into the share (a walk of the share to copy it took over 20 minutes on 9p).
//! Every step is bounded: one that runs out prints "stopped after N s".
//! `VIBEBOX_BENCH_SHARES` (a comma-separated list of column names) runs only some
//! (a boot runs if any of its columns is wanted); virtiofs needs
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
    /// A virtiofsd with vibebox's own arguments, its `--cache` mode replaced by
    /// `cache`, plus `extra`.
    Virtiofs {
        binary: PathBuf,
        cache: &'static str,
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
        let Sharing::Virtiofs {
            binary,
            cache,
            extra,
        } = self
        else {
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
        let mut argv = vibebox::vm::virtiofsd::argv(project, &socket, Access::ReadWrite, owner);
        let at = argv.iter().position(|a| a == "--cache").unwrap() + 1;
        argv[at] = OsString::from(*cache);
        let child = Command::new(binary)
            .args(argv)
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

/// The timed operations, as a shell file the guest (or, for the host column, the
/// host) sources; run with `OPS_RUN=NAME` it runs that one function (so `timeout`
/// can bound a function). Each timed line is `COLUMN op micros status`; a step that
/// runs out of its `LIM` seconds prints "stopped after N s" and its status (124 or
/// 137) marks it stopped in the table. `DROP=1` drops the guest's caches before
/// the cold ones (never on the host: the machine is shared).
const OPS: &str = r##"
drop() { [ "$DROP" = 1 ] || return 0; sync; echo 3 > /proc/sys/vm/drop_caches; }
t() {
  l=$1; shift; s=$(date +%s%N)
  timeout -k 5 "$LIM" "$@" >/dev/null 2>&1; r=$?
  e=$(date +%s%N); echo "$P $l $(( (e - s) / 1000 )) $r"
  case $r in 124|137) echo "# $P $l: stopped after $LIM s" ;; esac
}
unlock() { rm -f .git/index.lock; }
walk() { find . -type f ! -path './.git/*' ! -path ./big/seed.tar ! -path ./big/index.host -print0 | xargs -0 cat > /dev/null; }
writes() { mkdir -p scratch/w || return 1; i=0; while [ $i -lt 2000 ]; do echo "$i" > scratch/w/f$i || return 1; i=$((i + 1)); done; }
seed() { rm -rf "$FLOOR" && mkdir -p "$FLOOR/big" && tar -C "$FLOOR" -xf big/seed.tar && cp big/seq.bin "$FLOOR/big/"; }
listing() { find . -type f ! -path './.git/*' \( ! -path './big/*' -o -path ./big/seq.bin \) -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64; }
mount9p() { cd / && { umount "$G" || umount -l "$G"; } && mount -t 9p -o "rw,trans=virtio,version=9p2000.L,msize=512000,access=user,$1" vbx0 "$G" && cd "$G"; }
gitcfg() { n=0; for kv in "$@"; do export "GIT_CONFIG_KEY_$n=${kv%%=*}" "GIT_CONFIG_VALUE_$n=${kv#*=}"; n=$((n + 1)); done; export GIT_CONFIG_COUNT=$n; }
first() { [ -f big/index.host ] && cp big/index.host .git/index; drop; LIM=${FIRST_LIM:-$LIM} t first git status --porcelain; unlock; }
gitops() { drop; t cold git status --porcelain; unlock; for i in 1 2 3; do t warm git status --porcelain; unlock; done; }
column() {
  if [ "$1" != nofirst ]; then
    first
    case $r in 124|137) echo "# $P: its other git rows left out (each would re-read the tree as the first did)"; r=stopped ;; esac
  fi
  [ "$r" = stopped ] || gitops
  [ "$1" = git ] && return 0
  drop; t walk env OPS_RUN=walk sh "$OPSF"
  t write env OPS_RUN=writes sh "$OPSF"; rm -rf scratch/w
  drop; t read cat big/seq.bin
}
if [ -n "${OPS_RUN:-}" ]; then "$OPS_RUN"; fi
"##;

/// One column: its name, the guest-side shell that sets it up (in a subshell of
/// its boot, after the columns before it), and whether it times only the git rows
/// (a git setting changes nothing else).
struct Column {
    name: &'static str,
    prep: &'static str,
    git_only: bool,
}

const fn col(name: &'static str, prep: &'static str, git_only: bool) -> Column {
    Column {
        name,
        prep,
        git_only,
    }
}

/// One boot: QEMU's or virtiofsd's options, and the columns measured in it.
struct Boot {
    sharing: Sharing,
    columns: Vec<Column>,
}

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

/// What each column is, printed under the table.
const LEGEND: &str = "columns: disk = the guest's own disk (the floor); 9p = the 9p options \
before git's checkStat=minimal (QEMU `multidevs=remap`, guest msize 512000, `cache=mmap`, git \
defaults); -minimal = git `core.checkStat=minimal` in the guest (today's image); -none = guest \
`cache=none`; -uc = git `core.untrackedCache=true`; 9p-warn = QEMU `multidevs=warn`; -loose = \
guest `cache=loose` (not coherent: host edits are not seen; a reference only); virtiofs = \
today's virtiofsd options (`--cache auto`); virtiofs-always = `--cache always` (not coherent: \
breaks the 1 s host-edit rule; a reference only); host = the same commands on the host, caches \
warm.";

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

/// Per column, per operation: each sample's time and its command's exit status.
type Samples = BTreeMap<String, BTreeMap<String, Vec<(Duration, String)>>>;

/// Parses `COLUMN op micros status` lines into per-column, per-op samples.
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
                .push((Duration::from_micros(us), rc.to_string()));
        }
    }
}

/// The tree's files (not `.git`, not the seeding files in `big/`) hashed as the
/// guest hashes its copy: the floor is checked to be the same bytes.
fn listing(root: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{OPS}\nlisting"))
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "listing the bench tree failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn bench(b: &mut Bench, images: &Path) {
    let image = find_image(images);
    let limit: u64 = std::env::var("VIBEBOX_BENCH_SHARE_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let root = b.tmp.path().join("share-tree");
    let t = Instant::now();
    let made = tree::generate(&root, tree::Shape::BENCH).unwrap();
    let root = root.canonicalize().unwrap();
    git(&root, &["init", "-q"]);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-q", "-m", "bench tree"]);
    let digest = tree::digest(&root).unwrap();
    let host_listing = listing(&root);
    b.line("");
    b.line(&format!(
        "share bench tree: {} files, {:.0} MiB, sha256 {digest} (generated and committed in {:.1} s)",
        made.files,
        made.bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    ));
    // The floor's seed: one tar of the tree and its .git (the big file is copied
    // beside it: both are big sequential reads, which any share does well), and the
    // index as the host's git leaves it, restored before each column's first look.
    git(&root, &["status", "--porcelain"]);
    let mut c = Command::new("tar");
    c.arg("-C")
        .arg(&root)
        .args(["--exclude=./big", "-cf"])
        .arg(root.join("big/seed.tar"))
        .arg(".");
    super::must(c);
    fs::copy(root.join(".git/index"), root.join("big/index.host")).unwrap();

    let virtiofsd = std::env::var_os("VIBEBOX_TEST_VIRTIOFSD")
        .map(PathBuf::from)
        .or_else(|| which::which("virtiofsd").ok());
    // Today's options first in each boot, then candidates (the floor rides on the
    // first boot).
    // A git setting changes only the git rows, so those columns time only them.
    let mut boots = vec![
        Boot {
            sharing: Sharing::NineP { argv_from: &[] },
            columns: vec![
                // The image sets checkStat=minimal for 9p shares now: the columns
                // before it say `default`, so they measure the options before it.
                col("9p", "gitcfg core.checkStat=default", false),
                col("9p-minimal", "gitcfg core.checkStat=minimal", true),
                col(
                    "9p-none-minimal",
                    "mount9p cache=none && gitcfg core.checkStat=minimal",
                    false,
                ),
                col(
                    "9p-minimal-uc",
                    "mount9p cache=mmap && gitcfg core.checkStat=minimal core.untrackedCache=true",
                    true,
                ),
            ],
        },
        Boot {
            sharing: Sharing::NineP {
                argv_from: &[("multidevs=remap", "multidevs=warn")],
            },
            columns: vec![
                col("9p-warn", "gitcfg core.checkStat=default", false),
                col(
                    "9p-warn-loose",
                    "mount9p cache=loose && gitcfg core.checkStat=default",
                    false,
                ),
            ],
        },
    ];
    if let Some(bin) = &virtiofsd {
        for (name, cache) in [("virtiofs", "auto"), ("virtiofs-always", "always")] {
            boots.push(Boot {
                sharing: Sharing::Virtiofs {
                    binary: bin.clone(),
                    cache,
                    extra: &[],
                },
                columns: vec![col(name, "", false)],
            });
        }
    } else {
        b.line("(virtiofs columns skipped: set VIBEBOX_TEST_VIRTIOFSD to a Rust virtiofsd)");
    }
    if let Ok(only) = std::env::var("VIBEBOX_BENCH_SHARES") {
        for boot in &mut boots {
            boot.columns
                .retain(|c| only.split(',').any(|o| o == c.name));
        }
        boots.retain(|boot| !boot.columns.is_empty());
    }

    let ops_file = b.tmp.path().join("share-ops.sh");
    fs::write(&ops_file, OPS).unwrap();
    let mut samples = Samples::new();
    // The host itself (caches never dropped: the machine is shared).
    let host = Command::new("sh")
        .arg("-c")
        .arg(". \"$OPSF\"; P=host; column all")
        .current_dir(&root)
        .env("OPSF", &ops_file)
        .env("DROP", "0")
        .env("LIM", limit.to_string())
        .output()
        .unwrap();
    parse(&String::from_utf8_lossy(&host.stdout), &mut samples);

    let mut floor_done = false;
    for boot in &boots {
        let g = root.display().to_string();
        let mut script = format!(
            "export DROP=1 LIM={limit} FIRST_LIM={} G='{g}' FLOOR=/var/tmp/tree OPSF=/tmp/vibebox-bench-ops.sh\n\
             cat > \"$OPSF\" <<'VIBEBOX_OPS_END'\n{OPS}\nVIBEBOX_OPS_END\n. \"$OPSF\"\ncd \"$G\" || exit 1\n",
            limit / 2
        );
        if !floor_done {
            // The floor: the tree on the guest's own disk, its index refreshed there
            // once before timing (the extracted files' stat data are new).
            script.push_str(&format!(
                "P=seed; t seed env OPS_RUN=seed sh \"$OPSF\"\n\
                 if [ \"$r\" = 0 ]; then (cd \"$FLOOR\" && echo \"disk-listing $(listing)\" && \
                 LIM={} t refresh git status --porcelain && P=disk column nofirst); fi\n",
                limit * 2
            ));
            floor_done = true;
        }
        for c in &boot.columns {
            let prep = if c.prep.is_empty() { "true" } else { c.prep };
            let what = if c.git_only { "git" } else { "all" };
            // From `/`: a remount needs the share unused by this shell.
            script.push_str(&format!(
                "cd /; ( P={name}; if cd \"$G\" && {prep}; then column {what}; else echo \"# {name}: its setup failed\"; fi ) 2>&1\n",
                name = c.name
            ));
        }
        script.push_str("exit 0\n");
        let names: Vec<&str> = boot.columns.iter().map(|c| c.name).collect();
        let t = Instant::now();
        let (_, out) = boot_sharing(&image, &root, b.tmp.path(), &boot.sharing, Some(&script));
        println!(
            "  {}: boot and operations in {:.0} s",
            names.join(", "),
            t.elapsed().as_secs_f64()
        );
        // The raw samples as they come (a long run's partial results survive it).
        for l in out.lines() {
            println!("    {l}");
            if let Some(guest) = l.strip_prefix("disk-listing ") {
                b.line(&format!(
                    "floor tree on the guest's disk: {}",
                    if guest.trim() == host_listing {
                        "the same bytes as the host's (listing sha256 matches)".to_string()
                    } else {
                        format!("DIFFERS from the host's (guest {guest}, host {host_listing})")
                    }
                ));
            }
            if let Some(note) = l.strip_prefix("# ") {
                b.line(&format!("({note})"));
            }
        }
        parse(&out, &mut samples);
    }
    if let Some(seed) = samples.get("seed").and_then(|s| s.get("seed")) {
        b.line(&format!(
            "floor seeded (tar over the share, extracted on the guest's disk) in {}",
            human(seed[0].0)
        ));
    }

    // The table: one row per operation, one column per variant, ratio to the disk.
    let mut cols: Vec<&str> = vec!["disk"];
    cols.extend(boots.iter().flat_map(|b| b.columns.iter().map(|c| c.name)));
    cols.push("host");
    let stopped = |rc: &str| rc == "124" || rc == "137";
    let median = |col: &str, op: &str| -> Option<(Duration, &'static str)> {
        let s = samples.get(col)?.get(op)?;
        let mut d: Vec<Duration> = s.iter().map(|x| x.0).collect();
        d.sort();
        let mark = if s.iter().any(|x| stopped(&x.1)) {
            "stopped"
        } else if s.iter().all(|x| x.1 == "0") {
            ""
        } else {
            "failed"
        };
        Some((d[d.len() / 2], mark))
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
                Some((d, mark)) => {
                    let ratio = match floor {
                        Some((f, _)) if *c != "disk" => {
                            let r = d.as_secs_f64() / f.as_secs_f64();
                            if r < 0.1 {
                                format!(" ({r:.3}x)")
                            } else {
                                format!(" ({r:.1}x)")
                            }
                        }
                        _ => String::new(),
                    };
                    match mark {
                        "stopped" => {
                            // The first `git status` has half the limit.
                            let bound = if *op == "first" { limit / 2 } else { limit };
                            format!("> {bound} s, stopped{}", ratio.replace('(', "(> "))
                        }
                        "failed" => format!("{} (failed){ratio}", human(d)),
                        _ => format!("{}{ratio}", human(d)),
                    }
                }
            })
            .collect();
        b.line(&format!("| {what} | {} |", cells.join(" | ")));
    }
    b.line("");
    b.line(LEGEND);
}
