//! `vibebox` with no command: find or create this project's session, boot or attach
//! to its VM, and open a shell in the project.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use super::Error;
use crate::config::approval;
use crate::config::{self, Config, Host};
use crate::image::build::{self, Options};
use crate::image::store::Store;
use crate::image::{catalog, pull, recipe};
use crate::paths::{Home, Project};
use crate::session::SessionId;
use crate::session::delete;
use crate::session::project::{self, Found, Outcome};
use crate::ssh;
use crate::statefile;
use crate::store::index::Index;
use crate::supervisor::client::{self, Attached};
use crate::supervisor::protocol::Message;
use crate::vm::guest::GuestUser;

/// Exit status of the guest shell that means `:new` (see images/guest/vibebox.sh).
pub const NEW_SESSION_STATUS: i32 = 75;

/// Root discovery, the default config on first run, validation, find-or-create, and
/// the notes the user should see (moved, copied, config written).
pub fn open_project(home: &Home, start: &Path) -> Result<(PathBuf, Outcome, Config), Error> {
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
    let mut err = std::io::stderr().lock();
    match &outcome.found {
        Found::Moved { from } => writeln!(
            err,
            "vibebox: this project moved from {}; its session moved with it",
            from.display()
        )?,
        Found::Copied {
            original,
            original_id,
        } => writeln!(
            err,
            "vibebox: this directory is a copy of {} (session {original_id}); it gets its own new session",
            original.display()
        )?,
        Found::Registered => writeln!(
            err,
            "vibebox: this project's session was not in the index; registered it again"
        )?,
        Found::Existing | Found::Created => {}
    }
    if matches!(outcome.found, Found::Created | Found::Copied { .. }) {
        // Said every time, so a session made for an unexpected directory (a link,
        // a parent with a stray vibebox.toml) is noticed at once.
        writeln!(
            err,
            "vibebox: new session {} for {}",
            outcome.id,
            root.display()
        )?;
    }
    if created_config {
        writeln!(
            err,
            "vibebox: wrote {} with the defaults; edit it to change the VM",
            paths.config().display()
        )?;
    }
    Ok((root, outcome, config))
}

/// Makes sure a base image exists for the config: a cached one, else the official
/// cloud image pulled and prepared, else (Linux, when the download cannot be had)
/// one built from Debian's packages; saying which, since each takes minutes once.
pub fn ensure_image(home: &Home, config: &Config) -> Result<(), Error> {
    let arch = crate::image::host_arch();
    if Store::new(home).find(&config.image, arch)?.is_some() {
        return Ok(());
    }
    let wanted = (config.image != crate::config::DEFAULT_IMAGE).then_some(config.image.as_str());
    if let Some(name) = wanted {
        let known = catalog::load()
            .ok()
            .is_some_and(|c| catalog::find(&c, name, arch).is_ok());
        if !known {
            return Err(Error::Usage(format!(
                "no base image named {name:?} for {arch}; `vibebox image list` shows the images, or set image = \"default\" in vibebox.toml"
            )));
        }
    }
    eprintln!(
        "vibebox: no base image yet; pulling Debian's official cloud image and preparing it (once)"
    );
    let err = match pull::pull(home, wanted, arch) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let buildable = cfg!(target_os = "linux")
        && wanted.is_none_or(|n| n == recipe::image_name(build::DEFAULT_RELEASE));
    if !err.is_unreachable() || !buildable {
        return Err(err.into());
    }
    eprintln!("vibebox: {err}");
    eprintln!("vibebox: building an image from Debian's packages instead (once, a few minutes)");
    build::build(home, &Options::default())?;
    Ok(())
}

/// Before a VM boots, makes sure the host user approved what `vibebox.toml` grants
/// it (see `session::approval`): asks on a terminal when `interactive`, else refuses
/// with the changes named. A running VM keeps what it booted with, so nothing is
/// asked then.
pub fn approve(
    home: &Home,
    root: &Path,
    id: SessionId,
    config: &Config,
    interactive: bool,
) -> Result<(), Error> {
    let sd = home.session(id);
    use crate::supervisor::State;
    if matches!(
        crate::supervisor::status(&sd).state,
        State::Running | State::Booting
    ) {
        return Ok(());
    }
    let host = Host::detect(GuestUser::current().home())?;
    let baseline = config::defaults(root, &host);
    let pending = approval::pending(home, root, Some(&sd), config, &baseline)?;
    if pending.is_empty() {
        return Ok(());
    }
    if !interactive || !std::io::stdin().is_terminal() {
        return Err(approval::ApprovalError::NotApproved {
            changes: pending.join("; "),
        }
        .into());
    }
    eprintln!(
        "vibebox: {} gives the VM more than you last approved (the VM itself can edit that file):",
        Project::new(root.to_path_buf()).config().display()
    );
    for line in &pending {
        eprintln!("    {line}");
    }
    if !super::ask("Start the VM with this? [y/N] ")? {
        return Err(Error::Declined(
            "not started; edit vibebox.toml back, or approve it with `vibebox approve`".into(),
        ));
    }
    approval::record(home, root, &approval::grants(config))?;
    Ok(())
}

/// Attaches to the session's VM (booting it if needed), printing progress.
pub fn attach(home: &Home, root: &Path, id: SessionId, quiet: bool) -> Result<Attached, Error> {
    let say = |m: &str| {
        if !quiet {
            eprintln!("vibebox: {m}");
        }
    };
    let attached = client::attach(home, root, id, |msg| match msg {
        Message::Booting { accel, image } if accel == "tcg" => say(&format!(
            "booting {image} with tcg (no hardware virtualization here: expect a slow boot)"
        )),
        Message::Booting { accel, image } => say(&format!("booting {image} with {accel}")),
        Message::Stopping => say("the VM is shutting down; it will boot again"),
        _ => {}
    })?;
    for w in &attached.warnings {
        eprintln!("vibebox: the guest reported: {w}");
    }
    Ok(attached)
}

pub fn run(home: &Home, start: &Path) -> Result<(), Error> {
    let (root, outcome, mut config) = open_project(home, start)?;
    let mut id = outcome.id;
    approve(home, &root, id, &config, true)?;
    ensure_image(home, &config)?;
    loop {
        approve(home, &root, id, &config, true)?;
        let attached = attach(home, &root, id, false)?;
        let sd = home.session(id);
        let code = ssh::run(
            &sd.ssh_dir().join("config"),
            &ssh::alias(&id.to_string()),
            None,
            true,
        )
        .map_err(|e| Error::Usage(format!("cannot run ssh: {e}; install OpenSSH")))?;
        if code != NEW_SESSION_STATUS {
            return finish(attached, code);
        }
        // `:new` asked for a fresh session; only the host user can grant it.
        let others = crate::supervisor::status(&sd).clients.saturating_sub(1);
        if !confirm_new(id, &root, others)? {
            eprintln!("vibebox: kept session {id}; back to its shell");
            continue;
        }
        // What the user approved belongs to the directory: the new session has it.
        drop(attached);
        let entry = Index::snapshot(home)?.get(id).cloned();
        if let Some(entry) = entry {
            delete::delete(home, &entry)?;
        }
        let (_, outcome, fresh) = open_project(home, &root)?;
        config = fresh;
        eprintln!("vibebox: deleted session {id}; new session {}", outcome.id);
        id = outcome.id;
    }
}

/// Ends a client: a non-zero status from ssh may mean the VM went away under it;
/// then the user gets the supervisor's reason instead of a bare status.
pub fn finish(attached: Attached, code: i32) -> Result<(), Error> {
    if code == 0 {
        return Ok(());
    }
    if code == 255 {
        match attached.vm_ended(std::time::Duration::from_secs(3)) {
            Some(Message::Error { message, log }) => {
                return Err(client::Error::Failed { message, log }.into());
            }
            Some(_) => {
                eprintln!("vibebox: the VM was shut down");
                return Err(Error::Exit(code));
            }
            None => {}
        }
    }
    Err(Error::Exit(code))
}

fn confirm_new(id: SessionId, root: &Path, others: u32) -> Result<bool, Error> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        eprintln!("vibebox: :new needs a confirmation on the host terminal; none here");
        return Ok(false);
    }
    let cut = match others {
        0 => "no other terminal is attached".to_string(),
        1 => "1 other terminal will be cut off".to_string(),
        n => format!("{n} other terminals will be cut off"),
    };
    super::ask(&format!(
        "Delete session {id} of {} (its VM disk and everything in it outside the project) and start a new one? {cut}. [y/N] ",
        root.display()
    ))
}
