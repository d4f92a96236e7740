//! `vibebox` with no command: find or create this project's session, boot or attach
//! to its VM, and open a shell in the project.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use super::Error;
use crate::config::Config;
use crate::config::approval;
use crate::escape::escape;
use crate::paths::{Home, Project};
use crate::session::SessionId;
use crate::session::project::Outcome;
use crate::session::{delete, open};
use crate::ssh;
use crate::store::index::Index;
use crate::supervisor::client::{self, Attached};
use crate::supervisor::protocol::Message;

/// Exit status of the guest shell that means `:new` (see images/guest/vibebox.sh).
pub const NEW_SESSION_STATUS: i32 = 75;

/// Opens the project (see `session::open`) and tells the user what happened.
pub fn open_project(home: &Home, start: &Path) -> Result<(PathBuf, Outcome, Config), Error> {
    let opened = open::open(home, start)?;
    for note in &opened.notes {
        eprintln!("vibebox: {}", escape(note));
    }
    Ok((opened.root, opened.outcome, opened.config))
}

/// When a client ends: what the VM changed in the protected paths meanwhile.
pub fn tell_protected(home: &Home, root: &Path, id: SessionId) {
    for note in crate::session::protected::notes(home, root, id) {
        eprintln!("vibebox: {}", escape(&note));
    }
}

/// A base image for the config, saying what it does to get one.
pub fn ensure_image(home: &Home, config: &Config) -> Result<(), Error> {
    Ok(open::ensure_image(home, config, |m| {
        eprintln!("vibebox: {m}")
    })?)
}

/// Before a VM boots, makes sure the host user approved what `vibebox.toml` grants
/// it: asks on a terminal when `interactive`, else refuses with the changes named.
pub fn approve(
    home: &Home,
    root: &Path,
    id: SessionId,
    config: &Config,
    interactive: bool,
) -> Result<(), Error> {
    let pending = open::pending_approval(home, root, id, config)?;
    if pending.is_empty() {
        return Ok(());
    }
    if !interactive || !std::io::stdin().is_terminal() {
        return Err(approval::ApprovalError::NotApproved {
            changes: pending.join("; "),
            digest: approval::digest(&approval::grants(config)),
        }
        .into());
    }
    eprintln!(
        "vibebox: {} gives the VM more than you last approved (the VM itself can edit that file):",
        escape(
            &Project::new(root.to_path_buf())
                .config()
                .display()
                .to_string()
        )
    );
    for line in &pending {
        eprintln!("    {}", escape(line));
    }
    if !super::ask("Start the VM with this? [y/N] ")? {
        return Err(Error::Declined(
            "not started; edit vibebox.toml back, or approve it with `vibebox approve`".into(),
        ));
    }
    open::record_approval(home, root, config)?;
    Ok(())
}

/// Attaches to the session's VM (booting it if needed), printing progress.
pub fn attach(home: &Home, root: &Path, id: SessionId, quiet: bool) -> Result<Attached, Error> {
    let attached = check_in(home, root, id, quiet)?;
    report_warnings(&attached);
    Ok(attached)
}

/// What the guest reported at boot (a failed mount, a bad volume), escaped.
pub fn report_warnings(attached: &Attached) {
    for w in &attached.warnings {
        eprintln!("vibebox: the guest reported: {}", escape(w));
    }
}

/// [`attach`] without the guest's warnings: for a caller whose ssh already has the
/// terminal (raw mode, a full-screen task), which prints them once it is back.
pub fn check_in(home: &Home, root: &Path, id: SessionId, quiet: bool) -> Result<Attached, Error> {
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
    Ok(attached)
}

pub fn run(home: &Home, start: &Path) -> Result<(), Error> {
    let (root, outcome, mut config) = open_project(home, start)?;
    let mut id = outcome.id;
    approve(home, &root, id, &config, true)?;
    ensure_image(home, &config)?;
    let mut renewed = false;
    loop {
        // After a `:new` the config is read again right after the guest's shell had
        // the terminal; what it grants beyond the approval then needs a deliberate
        // `vibebox approve` (or a fresh `vibebox`), not a keystroke in this flow.
        approve(home, &root, id, &config, !renewed)?;
        let sd = home.session(id);
        let was_running = crate::supervisor::status(&sd).state == crate::supervisor::State::Running;
        let attached = attach(home, &root, id, false)?;
        // Only a VM that was running can have tasks: a fresh boot costs nothing here.
        if was_running {
            let running = super::tasks::running_tasks(&sd);
            if !running.is_empty() {
                eprintln!("vibebox: {}", super::tasks::summary(&running));
            }
        }
        let code = ssh::run(
            &sd.ssh_dir().join("config"),
            &ssh::alias(&id.to_string()),
            None,
            true,
        )
        .map_err(|e| Error::Usage(format!("cannot run ssh: {e}; install OpenSSH")))?;
        tell_protected(home, &root, id);
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
            delete::delete(home, &entry, false)?;
        }
        let (_, outcome, fresh) = open_project(home, &root)?;
        config = fresh;
        renewed = true;
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
