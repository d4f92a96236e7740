//! The boot plan: everything one boot needs, read and checked before anything
//! starts (the config as it is now, approved; the image; the accelerator; QEMU; the
//! DNS upstream; the explain text). A failure here starts nothing, and its error
//! names the operation and knows its exit code.

use std::path::{Path, PathBuf};

use crate::config::{self, Config, Host, approval};
use crate::explain::{self, Facts};
use crate::image::store::{Image, Store};
use crate::net::upstream::{self, Resolver};
use crate::paths::{self, Home, SessionDir};
use crate::vm::guest::GuestUser;
use crate::vm::host::{self, AccelError, Accelerator, Probe};
use crate::vm::protect::Protection;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Home(#[from] paths::Error),
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Approval(#[from] approval::ApprovalError),
    #[error(transparent)]
    Images(#[from] crate::image::Error),
    #[error("no base image {name:?} for {arch}: run `vibebox image pull` or `vibebox image build`")]
    NoImage { name: String, arch: &'static str },
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error(
        "qemu-system-{arch} is not installed: install QEMU (Debian: `sudo apt install qemu-system-x86`, macOS: `brew install qemu`), or set VIBEBOX_QEMU"
    )]
    NoQemu { arch: &'static str },
    #[error("{0}")]
    Qemu(String),
    #[error("{0}")]
    Upstream(String),
    #[error(transparent)]
    Watched(#[from] crate::store::watched::WatchedError),
}

impl BootError {
    /// 2 for what the user fixes in vibebox.toml or by approving; 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            BootError::Config(_)
            | BootError::NoImage { .. }
            | BootError::Approval(approval::ApprovalError::NotApproved { .. }) => 2,
            _ => 1,
        }
    }
}

pub struct BootPlan {
    pub config: Config,
    pub image: Image,
    pub accel: Accelerator,
    pub qemu: PathBuf,
    pub resolver: Box<dyn Resolver>,
    pub explain: String,
    /// What of the project the guest must not change (`.git`), and how.
    pub protection: Protection,
}

/// Reads and checks what a boot of the session `sd` for `project` needs.
pub fn prepare(home: &Home, project: &Path, sd: &SessionDir) -> Result<BootPlan, BootError> {
    let user = GuestUser::current();
    let host_facts = Host::detect(user.home())?;
    let project_paths = paths::Project::new(project.to_path_buf());
    let config = config::load(&project_paths.config(), project, &host_facts)?;
    // Checked here, right before the boot: the guest may have edited vibebox.toml
    // after the client asked.
    approval::check(
        home,
        project,
        Some(sd),
        &config,
        &config::defaults(project, &host_facts),
    )?;
    let arch = crate::image::guest_arch()?;
    let image = Store::new(home)
        .find(&config.image, arch)?
        .ok_or_else(|| BootError::NoImage {
            name: config.image.clone(),
            arch,
        })?;
    // Another architecture's guest can only be emulated, whatever was asked for.
    let accel = if arch == crate::image::host_arch() {
        let wanted = host::env_accel().unwrap_or(config.accel);
        host::choose(wanted, Probe::detect())?
    } else {
        Accelerator::Tcg
    };
    let qemu = host::qemu_binary(arch).ok_or(BootError::NoQemu { arch })?;
    host::check_qemu(&qemu).map_err(BootError::Qemu)?;
    let resolver = upstream::resolver_from_env().map_err(BootError::Upstream)?;
    let present: Vec<bool> = config.mounts.iter().map(|m| m.host.exists()).collect();
    let protection = Protection::for_config(project, &config);
    // Before the guest runs: what the protected paths were when it got them.
    crate::config::protect::record_at_start(sd.dir(), project, &protection.watched)?;
    let explain = explain::text(&Facts {
        project,
        session: sd
            .dir()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok()),
        config: &config,
        present: &present,
        protection: &protection,
    });
    Ok(BootPlan {
        config,
        image,
        accel,
        qemu,
        resolver,
        explain,
        protection,
    })
}
