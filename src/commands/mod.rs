//! One module per command. Each returns [`Error`], which knows its exit code.

pub mod approve;
pub mod delete;
pub mod exec;
pub mod explain;
pub mod fetch;
pub mod image;
pub mod init;
pub mod list;
pub mod ports;
pub mod protected;
pub mod prune;
pub mod ssh_config;
pub mod stop;
pub mod table;
pub mod tasks;
pub mod up;

use std::path::PathBuf;

use crate::cli::{Cli, Command};
use crate::paths::Home;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Open(#[from] crate::session::project::OpenError),
    #[error(transparent)]
    Delete(#[from] crate::session::delete::DeleteError),
    #[error(transparent)]
    Index(#[from] crate::store::index::IndexError),
    #[error(transparent)]
    EnsureImage(#[from] crate::session::open::EnsureImageError),
    #[error(transparent)]
    Paths(#[from] crate::paths::Error),
    #[error(transparent)]
    State(#[from] crate::statefile::Error),
    #[error(transparent)]
    Image(#[from] crate::image::Error),
    #[error(transparent)]
    Build(#[from] crate::image::build::BuildError),
    #[error(transparent)]
    Approval(#[from] crate::config::approval::ApprovalError),
    #[error(transparent)]
    Pull(#[from] crate::image::pull::PullError),
    #[error(transparent)]
    Client(#[from] crate::supervisor::client::Error),
    #[error(transparent)]
    Fetch(#[from] crate::session::fetch::FetchError),
    #[error(transparent)]
    Protected(#[from] crate::session::protected::ProtectedError),
    #[error(transparent)]
    Task(#[from] crate::session::tasks::TaskError),
    #[error(transparent)]
    Agent(#[from] crate::session::agents::AgentError),
    /// A guest command's exit status, passed through.
    #[error("exit status {0}")]
    Exit(i32),
    #[error("supervisor: {0}")]
    Supervisor(String),
    /// Refused because something still uses it; the message names what.
    #[error("{0}")]
    InUse(String),
    /// Bad arguments: the message says what to type instead.
    #[error("{0}")]
    Usage(String),
    /// The user said no; nothing was changed.
    #[error("{0}")]
    Declined(String),
    #[error("cannot use directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write to the terminal: {0}")]
    Output(#[from] std::io::Error),
}

impl Error {
    /// 2 for what the user can fix in the command line or config, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_)
            | Error::Usage(_)
            | Error::Dir { .. }
            | Error::Paths(_)
            | Error::Fetch(crate::session::fetch::FetchError::NotARepo(_))
            | Error::Approval(crate::config::approval::ApprovalError::NotApproved { .. }) => 2,
            Error::Exit(c) => u8::try_from(*c).unwrap_or(1),
            Error::Open(e) => e.exit_code(),
            Error::EnsureImage(crate::session::open::EnsureImageError::Unknown { .. }) => 2,
            Error::EnsureImage(crate::session::open::EnsureImageError::Pull(
                crate::image::pull::PullError::Interrupted
                | crate::image::pull::PullError::Download(
                    crate::image::download::DownloadError::Interrupted,
                ),
            ))
            | Error::EnsureImage(crate::session::open::EnsureImageError::Build(
                crate::image::build::BuildError::Interrupted,
            )) => 130,
            Error::Delete(e) => e.exit_code(),
            Error::Protected(e) => e.exit_code(),
            Error::Task(e) => e.exit_code(),
            Error::Build(crate::image::build::BuildError::Interrupted)
            | Error::Pull(crate::image::pull::PullError::Interrupted)
            | Error::Pull(crate::image::pull::PullError::Download(
                crate::image::download::DownloadError::Interrupted,
            )) => 130,
            Error::Pull(crate::image::pull::PullError::Catalog(
                crate::image::catalog::CatalogError::Unknown { .. },
            )) => 2,
            Error::Build(
                crate::image::build::BuildError::BadArch(_)
                | crate::image::build::BuildError::BadRelease(_),
            ) => 2,
            _ => 1,
        }
    }
}

/// The one yes/no question on the terminal; anything but y/yes is no.
pub fn ask(question: &str) -> Result<bool, Error> {
    use std::io::{BufRead, IsTerminal, Write};
    if std::io::stderr().is_terminal() {
        // The guest's shell may just have had this terminal: undo what it could have
        // set (hidden or coloured text, a hidden cursor, the alternate screen) so the
        // question is seen as the host asks it.
        eprint!("\x1b[0m\x1b[?25h\x1b[?1049l\r");
    }
    eprint!("{question}");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// `--json` output: pretty, one trailing newline.
fn write_json(out: &mut impl std::io::Write, value: &impl serde::Serialize) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value).expect("values built here serialize");
    writeln!(out, "{text}")?;
    Ok(())
}

/// The directory commands act on: `-C DIR` or the working directory, as a logical
/// path (a symlink on the way stays visible, see `project::find_root`).
fn start_dir(cli: &Cli) -> Result<PathBuf, Error> {
    let dir =
        crate::session::project::logical_dir(cli.dir.as_deref()).map_err(|source| Error::Dir {
            path: PathBuf::from("."),
            source,
        })?;
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(Error::Usage(format!(
            "-C {}: not a directory",
            dir.display()
        ))),
        Err(source) => Err(Error::Dir { path: dir, source }),
    }
}

pub fn run(cli: Cli) -> Result<(), Error> {
    // Needs no home: it only watches processes, and must start even where the home
    // cannot be read.
    if let Some(Command::Watchdog { parent, child }) = &cli.command {
        let (parent, children) =
            crate::vm::lifetime::parse_args(parent, child).map_err(Error::Usage)?;
        crate::vm::lifetime::watch(&parent, &children);
        return Ok(());
    }
    let home = Home::from_env()?;
    // `sudo -E vibebox image build` must not leave root-owned files in the user's home.
    crate::statefile::adopt_sudo_user(home.root());
    match &cli.command {
        None => up::run(&home, &start_dir(&cli)?),
        Some(Command::List { json }) => list::run(&home, *json),
        Some(Command::Delete { id, yes }) => delete::run(&home, id, *yes),
        Some(Command::Prune { yes, dry_run }) => prune::run(&home, *yes, *dry_run),
        Some(Command::Init) => init::run(&home, &start_dir(&cli)?),
        Some(Command::Approve { expect }) => {
            approve::run(&home, &start_dir(&cli)?, expect.as_deref())
        }
        Some(Command::Image(cmd)) => image::run(&home, cmd),
        Some(Command::Exec { command }) => exec::run(&home, &start_dir(&cli)?, command),
        Some(Command::Stop { id, yes, cold }) => {
            stop::run(&home, &start_dir(&cli)?, id.as_deref(), *yes, *cold)
        }
        Some(Command::Launch {
            name,
            attach,
            command,
        }) => tasks::launch(&home, &start_dir(&cli)?, name.as_deref(), *attach, command),
        Some(Command::Attach { name }) => tasks::attach(&home, &start_dir(&cli)?, name.as_deref()),
        Some(Command::Tasks { json }) => tasks::list(&home, &start_dir(&cli)?, *json),
        Some(Command::Logs { name, follow }) => {
            tasks::logs(&home, &start_dir(&cli)?, name, *follow)
        }
        Some(Command::Wait { name }) => tasks::wait(&home, &start_dir(&cli)?, name),
        Some(Command::Kill { name }) => tasks::kill(&home, &start_dir(&cli)?, name),
        Some(Command::SshConfig) => ssh_config::run(&home, &start_dir(&cli)?),
        Some(Command::Supervise { id, project }) => {
            let id = id.parse().map_err(|e: String| Error::Usage(e))?;
            crate::supervisor::daemon::run(&home, project, id).map_err(Error::Supervisor)
        }
        Some(Command::Watchdog { .. }) => unreachable!("handled before the home is read"),
        Some(Command::Explain { json }) => explain::run(&home, &start_dir(&cli)?, *json),
        Some(Command::Fetch) => fetch::run(&home, &start_dir(&cli)?),
        Some(Command::Ports { json, change }) => {
            ports::run(&home, &start_dir(&cli)?, *json, change.as_ref())
        }
        Some(Command::Protected { accept, expect }) => {
            protected::run(&home, &start_dir(&cli)?, *accept, expect.as_deref())
        }
    }
}
