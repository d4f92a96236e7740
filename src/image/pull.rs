//! `vibebox image pull`: an official Debian cloud image, downloaded and verified,
//! then prepared once into the same format `vibebox image build` makes.
//!
//! Preparing is one firmware boot of the image: cloud-init (NoCloud, seed served by
//! [`super::seed`]) writes the vibebox guest files and runs `prepare.sh`, which runs
//! the same `setup.sh` a build runs and sends the kernel and initrd back over a
//! virtio-serial port, then powers off. Every later boot is a direct kernel boot,
//! seconds faster than firmware plus GRUB under TCG. Copying the kernel out through
//! the guest needs no host tool that reads partitions or ext4, so it works the same
//! on macOS.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use chrono::Utc;

use super::catalog::{self, CatalogError};
use super::download::{self, DownloadError};
use super::export;
use super::manifest::{self, Manifest};
use super::progress::{Phases, StepError, wait_interruptible};
use super::store::{Image, Store};
use super::{Error, recipe, seed};
use crate::config::Accel;
use crate::interrupt;
use crate::paths::Home;
use crate::vm::host::{self, Accelerator, Probe};
use crate::vm::qemu::{Boot, Network, Preset, Spec};

/// The downloaded file, the prepared copy and QEMU's scratch, side by side.
const NEEDED_FREE_BYTES: u64 = 4 << 30;
/// A sums file is a few kilobytes; a server sending more is not one.
const MAX_SUMS_BYTES: usize = 1 << 20;
/// The preparing boot: cloud-init, maybe apt, an initramfs rebuild. Minutes under
/// TCG on two cores; a guest that takes longer is stuck.
const PREPARE_TIMEOUT_TCG: Duration = Duration::from_secs(40 * 60);
const PREPARE_TIMEOUT_HW: Duration = Duration::from_secs(10 * 60);
const PREPARE_MEMORY_MB: u64 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error(
        "{url} does not list {file} (or lists it twice with different sums); the mirror may be mid-update, try again later"
    )]
    NoSum { url: String, file: String },
    #[error(
        "{0} is not installed: install QEMU (`sudo apt install qemu-system-x86` or `qemu-system-arm`, or `brew install qemu`)"
    )]
    NoQemu(String),
    #[error("{0}")]
    Qemu(String),
    #[error("qemu-img is not installed: install qemu-utils (Debian) or qemu (Homebrew)")]
    NoQemuImg,
    #[error(
        "no UEFI firmware for {arch} found (looked for {looked}); install qemu-efi-aarch64 (Debian) or qemu (Homebrew)"
    )]
    NoFirmware { arch: String, looked: String },
    #[error("{0}")]
    Accel(String),
    #[error("not enough free space in {}: a pull needs about {need} GiB, {have} GiB are free", dir.display())]
    DiskFull { dir: PathBuf, need: u64, have: u64 },
    #[error("preparing the image failed: {why}; the guest's console log is {}", console.display())]
    Prepare { why: String, console: PathBuf },
    #[error("image pull failed while {phase}; the full log is {}", log.display())]
    Step { phase: &'static str, log: PathBuf },
    #[error(
        "image pull interrupted; the download is kept and resumes, nothing else was left behind"
    )]
    Interrupted,
    #[error(transparent)]
    Image(#[from] Error),
}

impl From<StepError> for PullError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Failed { phase, log } => PullError::Step { phase, log },
            StepError::Interrupted => PullError::Interrupted,
            StepError::Image(e) => PullError::Image(e),
        }
    }
}

impl PullError {
    /// Whether building from packages could still get an image: the download could
    /// not be had (as opposed to a broken QEMU or a full disk, which a build hits
    /// too).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            PullError::Download(
                DownloadError::Network { .. }
                    | DownloadError::Http { .. }
                    | DownloadError::ConnectionLost { .. }
            ) | PullError::NoSum { .. }
        )
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Pulls and prepares `name` (the catalog's default when `None`) for `arch` unless
/// the same upstream file prepared by the same recipe is in the store already.
/// Returns the image and whether it was made now.
pub fn pull(home: &Home, name: Option<&str>, arch: &str) -> Result<(Image, bool), PullError> {
    let entries = catalog::load()?;
    let name = match name {
        Some(n) => n.to_string(),
        None => catalog::default_name(&entries, arch).unwrap_or_else(|| "debian-13".into()),
    };
    let entry = catalog::find(&entries, &name, arch)?;
    let _interrupt = interrupt::install();

    let sums = download::fetch_text(&entry.sums_url, MAX_SUMS_BYTES)?;
    let upstream = download::parse_sums(&sums, &entry.file).ok_or_else(|| PullError::NoSum {
        url: entry.sums_url.clone(),
        file: entry.file.clone(),
    })?;
    let digest = recipe::pull_digest(&upstream, arch);
    let digest12 = &digest[..12];
    let id = format!("{}-{arch}-{digest12}", entry.name);
    let store = Store::new(home);
    let _lock = store.lock(&format!("pull-{id}"))?;
    if let Some(img) = store.get(&id) {
        return Ok((img, false));
    }

    let preset = Preset::for_arch(arch).ok_or_else(|| CatalogError::Unknown {
        name: name.clone(),
        arch: arch.to_string(),
        known: "none".into(),
    })?;
    let qemu = host::qemu_binary(arch).ok_or_else(|| PullError::NoQemu(preset.binary.clone()))?;
    host::check_qemu(&qemu).map_err(PullError::Qemu)?;
    if which::which("qemu-img").is_err() {
        return Err(PullError::NoQemuImg);
    }
    let bios = firmware(&preset, &qemu, arch)?;
    // Another architecture's image can only be emulated.
    let accel = if arch == super::host_arch() {
        host::choose(host::env_accel().unwrap_or(Accel::Auto), Probe::detect())
            .map_err(|e| PullError::Accel(e.to_string()))?
    } else {
        Accelerator::Tcg
    };
    let free = store.free_bytes();
    if free < NEEDED_FREE_BYTES {
        return Err(PullError::DiskFull {
            dir: store.dir().to_path_buf(),
            need: NEEDED_FREE_BYTES >> 30,
            have: free >> 30,
        });
    }

    eprintln!("Downloading {} ({})", entry.file, entry.url);
    let downloaded = download::fetch(
        &entry.url,
        &home.downloads(),
        &upstream,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    )?;

    let logs = home.logs();
    crate::statefile::ensure_dir(&logs, 0o700).map_err(Error::from)?;
    let stamp = Utc::now().format("%Y%m%dT%H%M%S");
    let log = logs.join(format!("image-pull-{stamp}.log"));
    let console = logs.join(format!("image-pull-{stamp}-console.log"));
    File::create(&log).map_err(io(&log))?;
    eprintln!(
        "Preparing {id} (one boot with {}); log: {}",
        accel.as_str(),
        log.display()
    );

    let staging = store.staging()?;
    let out = staging.path();
    let mut phases = Phases::new(3, log.clone());
    phases.start("copying the disk");
    let disk = out.join(manifest::DISK);
    phases.run(
        "copying the disk",
        &[
            "qemu-img".into(),
            "convert".into(),
            "-O".into(),
            "qcow2".into(),
            downloaded.display().to_string(),
            disk.display().to_string(),
        ],
    )?;

    phases.start(if accel == Accelerator::Tcg {
        "first boot: installing the vibebox guest (minutes without hardware virtualization)"
    } else {
        "first boot: installing the vibebox guest"
    });
    let info = prepare_boot(&PrepareRun {
        preset: &preset,
        qemu: &qemu,
        accel,
        bios: bios.as_deref(),
        dir: out,
        disk: &disk,
        log: &log,
        console: &console,
    })?;
    if !info.missing.is_empty() {
        phases.println(&format!(
            "  warning: the guest could not install {} (no network to a Debian mirror?); `sudo apt install` them in the VM",
            info.missing.join(" ")
        ));
    }

    phases.start("checksumming and installing");
    let mut m = Manifest {
        name: entry.name.clone(),
        arch: arch.to_string(),
        release: entry.release.clone(),
        kernel_cmdline: info.cmdline(),
        root_device: info.root.clone(),
        source: format!("pull {}", entry.url),
        vibebox_version: env!("CARGO_PKG_VERSION").to_string(),
        created: crate::store::index::now(),
        files: Default::default(),
    };
    m.hash_files(out)?;
    if interrupt::requested() {
        return Err(PullError::Interrupted);
    }
    let image = store.install(staging, m, digest12)?;
    phases.finish();
    let _ = fs::remove_file(&console);
    Ok((image, true))
}

/// The `-bios` to boot with: the first UEFI firmware found, else the machine's
/// built-in BIOS where it has one.
fn firmware(preset: &Preset, qemu: &Path, arch: &str) -> Result<Option<PathBuf>, PullError> {
    let candidates = preset.firmware_candidates(qemu);
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(Some(found.clone()));
    }
    if preset.legacy_bios {
        return Ok(None);
    }
    Err(PullError::NoFirmware {
        arch: arch.to_string(),
        looked: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

struct PrepareRun<'a> {
    preset: &'a Preset,
    qemu: &'a Path,
    accel: Accelerator,
    bios: Option<&'a Path>,
    dir: &'a Path,
    disk: &'a Path,
    log: &'a Path,
    console: &'a Path,
}

/// Boots the image once with its seed and reads back what the guest exported.
fn prepare_boot(run: &PrepareRun<'_>) -> Result<export::Info, PullError> {
    let failed = |why: String| PullError::Prepare {
        why,
        console: run.console.to_path_buf(),
    };
    let instance = format!("vibebox-prepare-{}", uuid::Uuid::now_v7().simple());
    let server = seed::Server::start(&instance)
        .map_err(|e| failed(format!("cannot serve the seed: {e}")))?;
    let serial = seed::smbios_serial(server.port());
    let export_file = run.dir.join("export.tar");
    let qmp = run.dir.join("qmp.sock");
    let spec = Spec {
        preset: run.preset,
        accel: run.accel,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get().min(2) as u32),
        memory_mb: PREPARE_MEMORY_MB,
        sandbox: crate::vm::host::qemu_sandbox(run.qemu),
        boot: Boot::Firmware { bios: run.bios },
        disk: run.disk,
        fw_cfg: &[],
        console_log: run.console,
        console_socket: None,
        ready_socket: None,
        export_file: Some(&export_file),
        smbios_serial: Some(&serial),
        qmp_socket: &qmp,
        network: Network::Outbound,
        shares: &[],
    };
    let (mut child, _watchdog) =
        crate::vm::launch::spawn_qemu(run.qemu, &spec, run.dir, run.log, |_| {})
            .map_err(|e| failed(format!("cannot start {}: {e}", run.qemu.display())))?;

    let limit = if run.accel == Accelerator::Tcg {
        PREPARE_TIMEOUT_TCG
    } else {
        PREPARE_TIMEOUT_HW
    };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io(run.log))? {
            break status;
        }
        if interrupt::requested() {
            wait_interruptible(&mut child)?;
            return Err(PullError::Interrupted);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!(
                "the guest did not finish within {} minutes",
                limit.as_secs() / 60
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = fs::remove_file(&qmp);
    if !status.success() {
        return Err(failed(format!(
            "QEMU exited with {status} (its messages are in {})",
            run.log.display()
        )));
    }
    if server.requests() == 0 {
        return Err(failed(
            "the guest never fetched its cloud-init seed: is this a cloud image with cloud-init?"
                .into(),
        ));
    }
    drop(server);
    let info = export::unpack(&export_file, run.dir).map_err(|e| failed(e.to_string()))?;
    let _ = fs::remove_file(&export_file);
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreachable_downloads_fall_back_to_a_build() {
        let net = PullError::Download(DownloadError::Network {
            host: "h".into(),
            detail: "d".into(),
        });
        assert!(net.is_unreachable());
        let sum = PullError::Download(DownloadError::ChecksumMismatch {
            url: "u".into(),
            expected: "a".into(),
            actual: "b".into(),
        });
        assert!(!sum.is_unreachable());
        assert!(!PullError::NoQemuImg.is_unreachable());
        assert!(!PullError::Interrupted.is_unreachable());
    }

    #[test]
    fn firmware_falls_back_to_bios_only_where_there_is_one() {
        let mut p = Preset::for_arch("x86_64").unwrap();
        p.firmware = vec!["/nonexistent/OVMF.fd".into()];
        assert_eq!(
            firmware(&p, Path::new("/usr/bin/q"), "x86_64").unwrap(),
            None
        );
        p.legacy_bios = false;
        let err = firmware(&p, Path::new("/usr/bin/q"), "aarch64").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/OVMF.fd"), "{err}");
    }
}
