//! `vibebox image build`: a Debian root filesystem from Debian's packages
//! (mmdebstrap or debootstrap), configured by `images/debian/setup.sh`, packed with
//! `mke2fs -d` (no loop devices) and converted to qcow2.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use chrono::Utc;

use super::manifest::{self, Manifest};
use super::progress::{Phases, StepError};
use super::recipe;
use super::store::{Image, Store};
use super::{Error, debian_arch, host_arch};
use crate::interrupt;
use crate::paths::Home;

pub const DEFAULT_RELEASE: &str = "trixie";
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The kernel command line for a direct boot of a built image: a raw ext4 filesystem
/// on the whole virtio disk, no partition table.
pub const KERNEL_CMDLINE: &str = "root=/dev/vda rw rootfstype=ext4 quiet";
/// Space a build needs in the images directory: the root tree, the raw filesystem
/// and the qcow2 side by side.
const NEEDED_FREE_BYTES: u64 = 4 << 30;

#[derive(Debug, Clone)]
pub struct Options {
    pub release: String,
    pub arch: String,
    pub mirror: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            release: DEFAULT_RELEASE.to_string(),
            arch: host_arch().to_string(),
            mirror: std::env::var("VIBEBOX_DEBIAN_MIRROR")
                .ok()
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| DEFAULT_MIRROR.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("`vibebox image build` runs on Linux only; on macOS use `vibebox image pull`")]
    NotLinux,
    #[error(
        "neither mmdebstrap nor debootstrap is installed: install one (`sudo apt install mmdebstrap`), or use `vibebox image pull`"
    )]
    NoBootstrapTool,
    #[error(
        "building an image needs root here (`sudo vibebox image build`), or use `vibebox image pull`"
    )]
    NeedsRoot,
    #[error("{tool} is not installed: {hint}")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("unknown architecture {0:?}: use x86_64 or aarch64")]
    BadArch(String),
    #[error(
        "building an {arch} image on this {host} machine needs qemu-user-static (`sudo apt install qemu-user-static`)"
    )]
    ForeignArch { arch: String, host: &'static str },
    #[error("release {0:?} is not a Debian codename (e.g. trixie, bookworm)")]
    BadRelease(String),
    #[error("not enough free space in {dir}: a build needs about {need} GiB, {have} GiB are free")]
    DiskFull { dir: PathBuf, need: u64, have: u64 },
    #[error("image build failed while {phase}; the full log is {}", log.display())]
    Step { phase: &'static str, log: PathBuf },
    #[error("image build interrupted; nothing was left behind")]
    Interrupted,
    #[error(transparent)]
    Image(#[from] Error),
}

impl From<StepError> for BuildError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Failed { phase, log } => BuildError::Step { phase, log },
            StepError::Interrupted => BuildError::Interrupted,
            StepError::Image(e) => BuildError::Image(e),
        }
    }
}

/// The tool that makes the root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrapper {
    Mmdebstrap,
    Debootstrap,
}

/// Picks the bootstrapper: mmdebstrap (faster) when installed, else debootstrap;
/// both need root here (mmdebstrap's rootless mode cannot produce the directory tree
/// `mke2fs -d` reads with the right owners).
pub fn choose_bootstrapper(
    has_mmdebstrap: bool,
    has_debootstrap: bool,
    is_root: bool,
) -> Result<Bootstrapper, BuildError> {
    match (has_mmdebstrap, has_debootstrap) {
        (false, false) => Err(BuildError::NoBootstrapTool),
        _ if !is_root => Err(BuildError::NeedsRoot),
        (true, _) => Ok(Bootstrapper::Mmdebstrap),
        (false, true) => Ok(Bootstrapper::Debootstrap),
    }
}

fn have(tool: &str) -> bool {
    which::which(tool).is_ok()
}

/// The bootstrap command line (pure).
pub fn bootstrap_argv(
    tool: Bootstrapper,
    opts: &Options,
    packages: &[String],
    rootfs: &Path,
    essential_hook: &Path,
) -> Vec<String> {
    let debarch = debian_arch(&opts.arch).unwrap_or("amd64");
    let mut argv = vec![
        match tool {
            Bootstrapper::Mmdebstrap => "mmdebstrap",
            Bootstrapper::Debootstrap => "debootstrap",
        }
        .to_string(),
        "--variant=minbase".to_string(),
        format!("--arch={debarch}"),
        "--components=main".to_string(),
        format!("--include={}", packages.join(",")),
    ];
    if tool == Bootstrapper::Mmdebstrap {
        argv.push("--mode=root".to_string());
        argv.push(format!(
            "--essential-hook=sh {} \"$1\"",
            shell_quote(&essential_hook.display().to_string())
        ));
    }
    argv.push(opts.release.clone());
    argv.push(rootfs.display().to_string());
    argv.push(opts.mirror.clone());
    argv
}

/// One shell word: mmdebstrap runs a hook through `sh -c`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The package list for an architecture: `${ARCH}` in packages.txt becomes Debian's
/// architecture name (the kernel package differs per architecture).
pub fn packages_for(arch: &str) -> Vec<String> {
    let debarch = debian_arch(arch).unwrap_or("amd64");
    recipe::packages()
        .into_iter()
        .map(|p| p.replace("${ARCH}", debarch))
        .collect()
}

/// Size of the root filesystem image for a tree using `used` bytes: a quarter more
/// plus 256 MiB of room, rounded up to 256 MiB. The guest grows it to the session's
/// disk size at boot.
pub fn filesystem_size_mib(used: u64) -> u64 {
    let mib = used / (1 << 20);
    (mib * 5 / 4 + 256).div_ceil(256) * 256
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the image for `opts` unless an identical one (same recipe digest) is
/// already in the store. Two builds of one image at once: the second waits for the
/// first and reuses its result.
pub fn build(home: &Home, opts: &Options) -> Result<(Image, bool), BuildError> {
    if !cfg!(target_os = "linux") {
        return Err(BuildError::NotLinux);
    }
    let debarch = debian_arch(&opts.arch).ok_or_else(|| BuildError::BadArch(opts.arch.clone()))?;
    if !opts.release.bytes().all(|b| b.is_ascii_lowercase()) || opts.release.is_empty() {
        return Err(BuildError::BadRelease(opts.release.clone()));
    }
    if opts.arch != host_arch()
        && !Path::new(&format!("/proc/sys/fs/binfmt_misc/qemu-{}", opts.arch)).exists()
    {
        return Err(BuildError::ForeignArch {
            arch: opts.arch.clone(),
            host: host_arch(),
        });
    }
    let tool = choose_bootstrapper(
        have("mmdebstrap"),
        have("debootstrap"),
        nix::unistd::geteuid().is_root(),
    )?;
    for (tool, hint) in [
        ("mke2fs", "install e2fsprogs"),
        ("qemu-img", "install qemu-utils (Debian) or qemu (Homebrew)"),
        ("chroot", "install coreutils"),
    ] {
        if !have(tool) {
            return Err(BuildError::MissingTool { tool, hint });
        }
    }

    let store = Store::new(home);
    let digest = recipe::digest(&opts.release, &opts.arch);
    let digest12 = &digest[..12];
    let name = recipe::image_name(&opts.release);
    let id = format!("{name}-{}-{digest12}", opts.arch);
    let _lock = store.lock(&format!("build-{id}"))?;
    if let Some(img) = store.get(&id) {
        return Ok((img, false));
    }

    let free = store.free_bytes();
    if free < NEEDED_FREE_BYTES {
        return Err(BuildError::DiskFull {
            dir: store.dir().to_path_buf(),
            need: NEEDED_FREE_BYTES >> 30,
            have: free >> 30,
        });
    }

    let _interrupt = interrupt::install();
    let logs = home.logs();
    crate::statefile::ensure_dir(&logs, 0o700).map_err(Error::from)?;
    let log = logs.join(format!(
        "image-build-{}.log",
        Utc::now().format("%Y%m%dT%H%M%S")
    ));
    File::create(&log).map_err(io(&log))?;
    crate::statefile::give_to_user(&log).map_err(io(&log))?;
    eprintln!(
        "Building {id} from Debian {} ({debarch}) with {}; log: {}",
        opts.release,
        match tool {
            Bootstrapper::Mmdebstrap => "mmdebstrap",
            Bootstrapper::Debootstrap => "debootstrap",
        },
        log.display()
    );

    let staging = store.staging()?;
    let rootfs = staging.path().join("rootfs");
    let mut phases = Phases::new(6, log.clone());

    phases.start("installing Debian packages");
    let packages = packages_for(&opts.arch);
    let hook = staging.path().join("essential-hook.sh");
    fs::write(&hook, recipe::ESSENTIAL_HOOK).map_err(io(&hook))?;
    phases.run(
        "installing Debian packages",
        &bootstrap_argv(tool, opts, &packages, &rootfs, &hook),
    )?;
    fs::remove_file(&hook).map_err(io(&hook))?;

    phases.start("configuring the guest");
    let guest_dir = rootfs.join(recipe::GUEST_DIR);
    fs::create_dir_all(&guest_dir).map_err(io(&guest_dir))?;
    for (name, body) in recipe::GUEST_FILES
        .iter()
        .chain(std::iter::once(&("setup.sh", recipe::SETUP)))
    {
        let p = guest_dir.join(name);
        fs::write(&p, body).map_err(io(&p))?;
    }
    phases.run(
        "configuring the guest",
        &[
            "chroot".into(),
            rootfs.display().to_string(),
            "/bin/sh".into(),
            format!("/{}/setup.sh", recipe::GUEST_DIR),
        ],
    )?;
    if interrupt::requested() {
        return Err(BuildError::Interrupted);
    }

    phases.start("copying out the kernel");
    let out = staging.path();
    copy_boot_file(&rootfs, "vmlinuz-", &out.join(manifest::KERNEL))?;
    copy_boot_file(&rootfs, "initrd.img-", &out.join(manifest::INITRD))?;

    phases.start("making the root filesystem");
    let used = tree_size(&rootfs);
    let raw = out.join("root.img");
    phases.run(
        "making the root filesystem",
        &[
            "mke2fs".into(),
            "-q".into(),
            "-F".into(),
            "-t".into(),
            "ext4".into(),
            "-L".into(),
            "vibebox-root".into(),
            "-d".into(),
            rootfs.display().to_string(),
            raw.display().to_string(),
            format!("{}M", filesystem_size_mib(used)),
        ],
    )?;
    crate::image::store::remove_tree(&rootfs);

    phases.start("converting to qcow2");
    phases.run(
        "converting to qcow2",
        &[
            "qemu-img".into(),
            "convert".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "qcow2".into(),
            raw.display().to_string(),
            out.join(manifest::DISK).display().to_string(),
        ],
    )?;
    fs::remove_file(&raw).map_err(io(&raw))?;

    phases.start("checksumming and installing");
    let mut m = Manifest {
        name,
        arch: opts.arch.clone(),
        release: opts.release.clone(),
        kernel_cmdline: KERNEL_CMDLINE.to_string(),
        root_device: "/dev/vda".to_string(),
        source: format!(
            "build ({}, {})",
            match tool {
                Bootstrapper::Mmdebstrap => "mmdebstrap",
                Bootstrapper::Debootstrap => "debootstrap",
            },
            opts.mirror
        ),
        vibebox_version: env!("CARGO_PKG_VERSION").to_string(),
        created: crate::store::index::now(),
        files: Default::default(),
    };
    m.hash_files(out)?;
    if interrupt::requested() {
        return Err(BuildError::Interrupted);
    }
    let image = store.install(staging, m, digest12)?;
    phases.finish();
    Ok((image, true))
}

/// Copies `/boot/<prefix><version>` out of the tree (the newest version if several).
fn copy_boot_file(rootfs: &Path, prefix: &str, dest: &Path) -> Result<(), Error> {
    let boot = rootfs.join("boot");
    let mut found: Vec<PathBuf> = fs::read_dir(&boot)
        .map_err(io(&boot))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    let src = found.pop().ok_or_else(|| Error::Broken {
        dir: boot.clone(),
        why: format!("no {prefix}* in the built tree (is a linux-image package in packages.txt?)"),
    })?;
    fs::copy(&src, dest).map_err(io(dest))?;
    Ok(())
}

/// Bytes used by a directory tree (files and symlinks, not following links).
fn tree_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrapper_choice() {
        use Bootstrapper::*;
        assert!(matches!(
            choose_bootstrapper(false, false, true),
            Err(BuildError::NoBootstrapTool)
        ));
        assert!(matches!(
            choose_bootstrapper(false, true, false),
            Err(BuildError::NeedsRoot)
        ));
        assert_eq!(choose_bootstrapper(true, true, true).unwrap(), Mmdebstrap);
        assert_eq!(choose_bootstrapper(false, true, true).unwrap(), Debootstrap);
    }

    #[test]
    fn argv_and_sizes() {
        let opts = Options {
            release: "trixie".into(),
            arch: "aarch64".into(),
            mirror: "http://m/debian".into(),
        };
        let argv = bootstrap_argv(
            Bootstrapper::Debootstrap,
            &opts,
            &["a".into(), "b".into()],
            Path::new("/s/rootfs"),
            Path::new("/s/hook.sh"),
        );
        assert_eq!(
            argv,
            [
                "debootstrap",
                "--variant=minbase",
                "--arch=arm64",
                "--components=main",
                "--include=a,b",
                "trixie",
                "/s/rootfs",
                "http://m/debian"
            ]
        );
        let argv = bootstrap_argv(
            Bootstrapper::Mmdebstrap,
            &opts,
            &["a".into()],
            Path::new("/s/rootfs"),
            Path::new("/it's/hook.sh"),
        );
        assert!(argv.contains(&"--mode=root".to_string()));
        assert!(argv.contains(&r#"--essential-hook=sh '/it'\''s/hook.sh' "$1""#.to_string()));
        assert_eq!(filesystem_size_mib(0), 256);
        assert_eq!(filesystem_size_mib(1000 << 20), 1536);
        assert!(
            packages_for("aarch64")
                .iter()
                .any(|p| p == "linux-image-arm64")
        );
        assert!(
            packages_for("x86_64")
                .iter()
                .any(|p| p == "linux-image-amd64")
        );
    }
}
