//! `vibebox launch`, `attach`, `tasks`, `logs`, `wait`, `kill`: detachable tasks in
//! the project's VM (see `session::tasks`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use super::{Error, up};
use crate::escape::escape;
use crate::paths::{Home, SessionDir};
use crate::session::SessionId;
use crate::session::tasks::{self, Task, TaskError};
use crate::session::{agents, project};
use crate::supervisor::client::Attached;
use crate::supervisor::{self, State};

/// The project's running VM, held (a client reference) while the command runs.
/// Tasks live only in a running VM, so nothing here boots one.
fn running(home: &Home, start: &Path) -> Result<(SessionDir, Attached), Error> {
    let vm = running_vm(home, start)?.ok_or(TaskError::NotRunning)?;
    let attached = up::attach(home, &vm.root, vm.id, true)?;
    Ok((vm.sd, attached))
}

/// A project's session whose VM runs now.
struct RunningVm {
    root: PathBuf,
    id: SessionId,
    sd: SessionDir,
}

/// The project's session when its VM runs now (asked without a check-in), else
/// `None`.
fn running_vm(home: &Home, start: &Path) -> Result<Option<RunningVm>, Error> {
    let root = project::find_root(start, home)?;
    let Some(id) = project::registered(home, &root)? else {
        return Ok(None);
    };
    let sd = home.session(id);
    Ok((supervisor::status(&sd).state == State::Running).then_some(RunningVm { root, id, sd }))
}

pub fn launch(
    home: &Home,
    start: &Path,
    name: Option<&str>,
    attach_now: bool,
    command: &[String],
) -> Result<(), Error> {
    // A bad name fails before anything boots.
    let name = match name {
        Some(n) => {
            tasks::validate_name(n)?;
            n.to_string()
        }
        None => tasks::default_name(command)?,
    };
    tasks::detach_key()?;
    // `vibebox launch claude [-- ARGS]`: a preset's name runs that agent (installed
    // on first use), with ARGS as its arguments.
    let agent = agents::find(&name)?;
    let (root, outcome, config) = up::open_project(home, start)?;
    if let Some(a) = &agent {
        let missing = a.missing_domains(&config);
        if !missing.is_empty() {
            eprintln!(
                "vibebox: {} needs {}, which this project's [network] policy does not let through: add them to `entries` in vibebox.toml (the next start asks you to approve it)",
                a.name,
                missing.join(", ")
            );
        }
        let caches = a.suggested_volumes(&config, &root);
        if !caches.is_empty() {
            let list: Vec<String> = caches.iter().map(|v| format!("{v:?}")).collect();
            eprintln!(
                "vibebox: {} are on the shared project, slow for {}'s builds: `volumes = [{}]` under [box] in vibebox.toml keeps them on the VM's disk",
                caches.join(", "),
                a.name,
                list.join(", ")
            );
        }
    }
    up::approve(home, &root, outcome.id, &config, true)?;
    up::ensure_image(home, &config)?;
    let attached = up::attach(home, &root, outcome.id, false)?;
    let sd = home.session(outcome.id);
    let size = terminal_size::terminal_size()
        .map(|(w, h)| (w.0, h.0))
        .unwrap_or((160, 48));
    let dir = root.to_string_lossy();
    match &agent {
        Some(a) => tasks::launch(
            &sd,
            &name,
            &dir,
            size,
            &a.task_command(command),
            Some(&a.display(command)),
        )?,
        None => tasks::launch(&sd, &name, &dir, size, command, None)?,
    }
    if attach_now {
        let end = tasks::attach(&sd, &name)?;
        return up::finish(attached, detached(&name, end));
    }
    println!(
        "started task {name}: attach with `vibebox attach {name}` (detach: {}), output with `vibebox logs {name}`",
        detach_hint()
    );
    Ok(())
}

fn detach_hint() -> String {
    match tasks::detach_key() {
        Ok(Some(k)) => k,
        _ => "Ctrl-\\".into(),
    }
}

pub fn attach(home: &Home, start: &Path, name: Option<&str>) -> Result<(), Error> {
    if let Some(n) = name {
        tasks::validate_name(n)?;
    }
    tasks::detach_key()?;
    // A named task in a running VM: the attach starts at once (its handshake
    // sent through the control master) while this client checks in with the
    // supervisor.
    if let Some(n) = name
        && let Some(vm) = running_vm(home, start)?
    {
        let started = tasks::start_attach(&vm.sd, n)?;
        // The guest's warnings wait until the attach gives the terminal back: printed
        // now they would land in the task's screen, in raw mode, and be redrawn over.
        // Still running once the attach is off: a VM that stopped meanwhile is not booted
        // again by the check-in (tasks never boot one).
        let checked_in = match supervisor::status(&vm.sd).state {
            State::Running => up::check_in(home, &vm.root, vm.id, true),
            _ => Err(TaskError::NotRunning.into()),
        };
        let attached = match checked_in {
            Ok(attached) => attached,
            Err(e) => {
                started.cancel();
                return Err(e);
            }
        };
        let end = tasks::attached(&vm.sd, started, n);
        up::report_warnings(&attached);
        return up::finish(attached, detached(n, end?));
    }
    let (sd, attached) = running(home, start)?;
    let name = tasks::resolve(&sd, name)?;
    let end = tasks::attach(&sd, &name)?;
    up::finish(attached, detached(&name, end))
}

/// The client's exit status; says when the task itself ended.
fn detached(name: &str, end: tasks::Detached) -> i32 {
    if let Some(status) = end.task_ended {
        println!("vibebox: task {name} ended with status {status}");
    }
    end.code
}

pub fn list(home: &Home, start: &Path, json: bool) -> Result<(), Error> {
    let found = match running(home, start) {
        Ok((sd, _attached)) => tasks::list(&sd)?,
        Err(Error::Task(TaskError::NotRunning)) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut out = std::io::stdout().lock();
    if json {
        return super::write_json(&mut out, &found);
    }
    if found.is_empty() {
        writeln!(
            out,
            "No tasks. Start one with `vibebox launch [NAME] [-- CMD ARGS…]`."
        )?;
        return Ok(());
    }
    let now = chrono::Utc::now();
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                escape(&t.command).into_owned(),
                t.state.clone(),
                t.started
                    .map(|s| super::list::relative_time(s, now))
                    .unwrap_or_default(),
                t.attached.to_string(),
                escape(&t.last_output).into_owned(),
            ]
        })
        .collect();
    let width = terminal_size::terminal_size().map(|(w, _)| (w.0 as usize, 5));
    write!(
        out,
        "{}",
        super::table::render(
            &[
                "NAME",
                "COMMAND",
                "STATE",
                "STARTED",
                "ATTACHED",
                "LAST OUTPUT"
            ],
            &rows,
            width.filter(|_| std::io::stdout().is_terminal()),
        )
    )?;
    Ok(())
}

pub fn logs(home: &Home, start: &Path, name: &str, follow: bool) -> Result<(), Error> {
    tasks::validate_name(name)?;
    let (sd, _attached) = running(home, start)?;
    let mut out = std::io::stdout().lock();
    tasks::logs(&sd, name, follow, &mut out)?;
    let _ = out.flush();
    Ok(())
}

pub fn wait(home: &Home, start: &Path, name: &str) -> Result<(), Error> {
    tasks::validate_name(name)?;
    let (sd, _attached) = running(home, start)?;
    match tasks::wait(&sd, name)? {
        0 => Ok(()),
        code => Err(Error::Exit(code)),
    }
}

pub fn kill(home: &Home, start: &Path, name: &str) -> Result<(), Error> {
    tasks::validate_name(name)?;
    let (sd, _attached) = running(home, start)?;
    tasks::kill(&sd, name)?;
    println!("ended task {name}");
    Ok(())
}

/// The running tasks of a running VM (none when it cannot be asked).
pub fn running_tasks(sd: &SessionDir) -> Vec<Task> {
    tasks::list(sd)
        .map(|ts| ts.into_iter().filter(Task::running).collect())
        .unwrap_or_default()
}

/// `2 tasks running: claude (vibebox attach claude), make (vibebox attach make)`.
pub fn summary(running: &[Task]) -> String {
    let list: Vec<String> = running
        .iter()
        .map(|t| format!("{0} (vibebox attach {0})", t.name))
        .collect();
    format!(
        "{} task{} running: {}",
        running.len(),
        if running.len() == 1 { "" } else { "s" },
        list.join(", ")
    )
}
