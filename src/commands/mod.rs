//! One module per command. Each returns [`Error`], which knows its exit code.

pub mod delete;
pub mod explain;
pub mod image;
pub mod list;
pub mod table;
pub mod up;

use std::path::PathBuf;

use crate::cli::{Cli, Command};
use crate::paths::Home;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Session(#[from] crate::session::Error),
    #[error(transparent)]
    Paths(#[from] crate::paths::Error),
    #[error(transparent)]
    State(#[from] crate::statefile::Error),
    #[error(transparent)]
    Image(#[from] crate::image::Error),
    #[error(transparent)]
    Build(#[from] crate::image::build::BuildError),
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
            Error::Config(_) | Error::Usage(_) | Error::Dir { .. } | Error::Paths(_) => 2,
            Error::Build(crate::image::build::BuildError::Interrupted) => 130,
            Error::Build(
                crate::image::build::BuildError::BadArch(_)
                | crate::image::build::BuildError::BadRelease(_),
            ) => 2,
            _ => 1,
        }
    }
}

/// The directory commands act on: `-C DIR` or the working directory.
fn start_dir(cli: &Cli) -> Result<PathBuf, Error> {
    let cwd = std::env::current_dir().map_err(|source| Error::Dir {
        path: PathBuf::from("."),
        source,
    })?;
    let dir = match &cli.dir {
        Some(d) => cwd.join(d),
        None => cwd,
    };
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
    let home = Home::from_env()?;
    match &cli.command {
        None => up::run(&home, &start_dir(&cli)?),
        Some(Command::List { json }) => list::run(&home, *json),
        Some(Command::Delete { id, yes }) => delete::run(&home, id, *yes),
        Some(Command::Image(cmd)) => image::run(&home, cmd),
        Some(Command::Explain { json }) => explain::run(&home, &start_dir(&cli)?, *json),
    }
}
