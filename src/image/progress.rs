//! Phase-by-phase progress for long image jobs (build, pull): a spinner naming the
//! phase and its elapsed time, every child's output in one log file whose path an
//! error names, and Ctrl-C stopping the child instead of leaving it behind.

use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::Error;
use crate::interrupt;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("{phase} failed; the full log is {}", log.display())]
    Failed { phase: &'static str, log: PathBuf },
    #[error("interrupted; nothing was left behind")]
    Interrupted,
    #[error(transparent)]
    Image(#[from] Error),
}

pub struct Phases {
    bar: ProgressBar,
    total: usize,
    n: usize,
    log: PathBuf,
    started: Instant,
}

impl Phases {
    pub fn new(total: usize, log: PathBuf) -> Phases {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .expect("template")
                .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Phases {
            bar,
            total,
            n: 0,
            log,
            started: Instant::now(),
        }
    }

    pub fn start(&mut self, what: &str) {
        if self.n > 0 {
            self.bar.println(format!("  done: {}", self.bar.message()));
        }
        self.n += 1;
        self.bar
            .set_message(format!("[{}/{}] {what}", self.n, self.total));
        self.bar.reset_elapsed();
        let _ = writeln!(self.log_file(), "=== phase {}: {what}", self.n);
    }

    /// Prints a line above the spinner.
    pub fn println(&self, line: &str) {
        self.bar.println(line);
    }

    pub fn log_file(&self) -> File {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log opened before")
    }

    /// Runs a child with its output in the log; stops it on Ctrl-C.
    pub fn run(&self, phase: &'static str, argv: &[String]) -> Result<(), StepError> {
        let log = self.log_file();
        let _ = writeln!(&log, "$ {}", argv.join(" "));
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|source| Error::Io {
                path: self.log.clone(),
                source,
            })?)
            .stderr(log)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C.UTF-8")
            .spawn()
            .map_err(|_| StepError::Failed {
                phase,
                log: self.log.clone(),
            })?;
        let status = wait_interruptible(&mut child)?;
        if !status.success() {
            return Err(StepError::Failed {
                phase,
                log: self.log.clone(),
            });
        }
        Ok(())
    }

    pub fn finish(self) {
        self.bar.println(format!("  done: {}", self.bar.message()));
        self.bar.finish_and_clear();
        let _ = writeln!(
            self.log_file(),
            "=== finished in {:.0?}",
            self.started.elapsed()
        );
    }
}

/// Waits for `child`, killing it (TERM, then KILL) when an interrupt arrives.
pub fn wait_interruptible(
    child: &mut std::process::Child,
) -> Result<std::process::ExitStatus, StepError> {
    loop {
        if let Some(status) = child.try_wait().map_err(|source| Error::Io {
            path: PathBuf::from("child process"),
            source,
        })? {
            if interrupt::requested() {
                return Err(StepError::Interrupted);
            }
            return Ok(status);
        }
        if interrupt::requested() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            for _ in 0..50 {
                if child.try_wait().ok().flatten().is_some() {
                    return Err(StepError::Interrupted);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(StepError::Interrupted);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
