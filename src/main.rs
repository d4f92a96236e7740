//! vibebox: parse the command line, dispatch, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use vibebox::{cli, commands};

fn main() -> ExitCode {
    if let Some(path) = std::env::var_os("PATH") {
        let safe = vibebox::vm::host::absolute_path_entries(&path);
        // SAFETY: the first thing main does, before any other thread exists.
        unsafe { std::env::set_var("PATH", safe) };
    }
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIBEBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // The supervisor's stderr is its log file: no colour codes in it.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A guest command's status is passed through without a message of ours.
        Err(commands::Error::Exit(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            // Errors quote paths, config text and guest reports: escaped, so nothing
            // the guest wrote can act on the host terminal.
            eprintln!("vibebox: {}", vibebox::escape::escape(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}
