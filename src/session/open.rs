//! Opening a project: root discovery, the default config on first run, validation,
//! find-or-create, what the user approved, and a base image. The commands that
//! boot or attach (`vibebox`, `exec`, `ssh-config`) and the ones that only set up
//! (`init`, `approve`) all come through here, so they agree on every rule.

use std::path::{Path, PathBuf};

use super::SessionId;
use super::project::{self, Found, OpenError, Outcome};
use crate::config::{self, Config, Host, approval};
use crate::image::build::{self, BuildError, Options};
use crate::image::pull::{self, PullError};
use crate::image::store::Store;
use crate::image::{catalog, recipe};
use crate::paths::{Home, Project};
use crate::statefile;
use crate::vm::guest::GuestUser;

/// An opened project.
pub struct Opened {
    pub root: PathBuf,
    pub outcome: Outcome,
    pub config: Config,
    /// What the user should be told (moved, copied, a new session, config written).
    pub notes: Vec<String>,
}

pub fn open(home: &Home, start: &Path) -> Result<Opened, OpenError> {
    let root = project::find_root(start, home)?;
    let paths = Project::new(root.clone());
    let created_config = statefile::write_new_atomic(
        &paths.config(),
        config::default_file_text().as_bytes(),
        0o644,
    )?;
    let host = Host::detect(GuestUser::current().home())?;
    let config = config::load(&paths.config(), &root, &host)?;
    let outcome = project::find_or_create(home, &root)?;
    let mut notes = Vec::new();
    match &outcome.found {
        Found::Moved { from } => notes.push(format!(
            "this project moved from {}; its session moved with it",
            from.display()
        )),
        Found::Copied {
            original,
            original_id,
        } => notes.push(format!(
            "this directory is a copy of {} (session {original_id}); it gets its own new session",
            original.display()
        )),
        Found::Registered => {
            notes.push("this project's session was not in the index; registered it again".into())
        }
        Found::Existing | Found::Created => {}
    }
    if matches!(outcome.found, Found::Created | Found::Copied { .. }) {
        // Said every time, so a session made for an unexpected directory (a link,
        // a parent with a stray vibebox.toml) is noticed at once.
        notes.push(format!("new session {} for {}", outcome.id, root.display()));
    }
    // Host tools may run a protected path at any moment: say what the VM changed
    // at every command that opens the project.
    notes.extend(super::protected::notes(home, &root, outcome.id));
    if created_config {
        notes.push(format!(
            "wrote {} with the defaults; edit it to change the VM",
            paths.config().display()
        ));
    }
    Ok(Opened {
        root,
        outcome,
        config,
        notes,
    })
}

/// What `config` grants beyond what the user approved for the project at `root`
/// (empty when nothing is to ask). A running VM keeps what it booted with, so
/// nothing is pending then.
pub fn pending_approval(
    home: &Home,
    root: &Path,
    id: SessionId,
    config: &Config,
) -> Result<Vec<String>, OpenError> {
    use crate::supervisor::State;
    if matches!(
        crate::supervisor::status(&home.session(id)).state,
        State::Running | State::Booting
    ) {
        return Ok(Vec::new());
    }
    approval_changes(home, root, id, config)
}

/// What `config` changes against what was approved for `root`, even while the VM
/// runs (for `vibebox approve`, which shows it before recording).
pub fn approval_changes(
    home: &Home,
    root: &Path,
    id: SessionId,
    config: &Config,
) -> Result<Vec<String>, OpenError> {
    let host = Host::detect(GuestUser::current().home())?;
    Ok(approval::pending(
        home,
        root,
        Some(&home.session(id)),
        config,
        &config::defaults(root, &host),
    )?)
}

/// Records the user's yes to what `config` grants the project at `root`.
pub fn record_approval(home: &Home, root: &Path, config: &Config) -> Result<(), OpenError> {
    Ok(approval::record(home, root, &approval::grants(config))?)
}

#[derive(Debug, thiserror::Error)]
pub enum EnsureImageError {
    #[error(
        "no base image named {name:?} for {arch}; `vibebox image list` shows the images, or set image = \"default\" in vibebox.toml"
    )]
    Unknown { name: String, arch: &'static str },
    #[error(transparent)]
    Store(#[from] crate::image::Error),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Makes sure a base image exists for the config: a cached one, else the official
/// cloud image pulled and prepared, else (Linux, when the download cannot be had)
/// one built from Debian's packages; `say` tells which, since each takes minutes.
pub fn ensure_image(
    home: &Home,
    config: &Config,
    mut say: impl FnMut(&str),
) -> Result<(), EnsureImageError> {
    let arch = crate::image::guest_arch()?;
    if Store::new(home).find(&config.image, arch)?.is_some() {
        return Ok(());
    }
    let wanted = (config.image != config::DEFAULT_IMAGE).then_some(config.image.as_str());
    if let Some(name) = wanted {
        let known = catalog::load()
            .ok()
            .is_some_and(|c| catalog::find(&c, name, arch).is_ok());
        if !known {
            return Err(EnsureImageError::Unknown {
                name: name.to_string(),
                arch,
            });
        }
    }
    say("no base image yet; pulling Debian's official cloud image and preparing it (once)");
    let err = match pull::pull(home, wanted, arch) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let buildable = cfg!(target_os = "linux")
        && wanted.is_none_or(|n| n == recipe::image_name(build::DEFAULT_RELEASE));
    if !err.is_unreachable() || !buildable {
        return Err(err.into());
    }
    say(&err.to_string());
    say("building an image from Debian's packages instead (once, a few minutes)");
    build::build(
        home,
        &Options {
            arch: arch.to_string(),
            ..Options::default()
        },
    )?;
    Ok(())
}
