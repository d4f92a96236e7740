//! Command-line definitions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A Linux VM per project directory: your coding agent gets full freedom inside it,
/// your machine stays safe. Run `vibebox` in a project to get a shell in its VM.
#[derive(Debug, Parser)]
#[command(name = "vibebox", version, about, long_about = None)]
pub struct Cli {
    /// Run as if vibebox was started in DIR (like `git -C`).
    #[arg(short = 'C', value_name = "DIR", global = true)]
    pub dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Set this project up without starting its VM: write vibebox.toml if missing,
    /// find or create the session, print its id.
    Init,
    /// List all sessions (one per project directory).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a session: its VM disk, keys and index entry.
    Delete {
        /// The session id, or a prefix of it that names one session.
        id: String,
        /// Do not ask for confirmation.
        #[arg(short = 'y', long = "yes")]
        yes: bool,
    },
    /// Delete the sessions whose directory is missing (gone, moved, unmounted or
    /// unreadable): their VM disks, keys and logs. Lists them and asks first.
    Prune {
        /// Do not ask for confirmation.
        #[arg(short = 'y', long = "yes")]
        yes: bool,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run one command in the project's VM (starting it if needed), in the project
    /// directory; stdin, stdout, stderr and the exit code pass through.
    Exec {
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Stop a session's VM now (this project's, or the one named): its state is saved
    /// and the next start resumes it; `--cold` shuts the guest down instead.
    Stop {
        /// A session id or unique prefix; default: this project's session.
        id: Option<String>,
        /// Stop even while tasks run in the VM (they end).
        #[arg(short = 'y', long = "yes")]
        yes: bool,
        /// Shut the guest down instead of saving it: the next start boots cold.
        #[arg(long = "cold")]
        cold: bool,
    },
    /// Start a command (default: your login shell) as a task in the project's VM:
    /// a terminal session that outlives this terminal, ssh and the connection.
    Launch {
        /// The task's name (default: the command's name).
        name: Option<String>,
        /// Attach this terminal to the task at once.
        #[arg(short = 'a', long = "attach")]
        attach: bool,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Attach this terminal to a task (detach with Ctrl-\; the task keeps running).
    Attach {
        /// The task (default: the only one).
        name: Option<String>,
    },
    /// List the tasks in the project's VM.
    Tasks {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a task's output (the last 1 to 2 MiB, kept in the VM).
    Logs {
        name: String,
        /// Keep printing while the task runs.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Wait until a task ends; exits with its exit status.
    Wait { name: String },
    /// End a task and forget it.
    Kill { name: String },
    /// Print an ssh config block for this project's VM (for editors, scp, rsync).
    SshConfig,
    /// Manage base images (`~/.vibebox/images/`).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Approve what vibebox.toml grants the VM (mounts, network, image, resources)
    /// for its next start: shows the changes and asks on a terminal; needed when the
    /// file changed since the last start.
    Approve {
        /// Without a terminal: approve only if the grants still have this digest (the
        /// one the refusal printed), so what is approved is what was reviewed.
        #[arg(long, value_name = "DIGEST")]
        expect: Option<String>,
    },
    /// Show what this project's VM can see and reach: mounts, network, storage.
    Explain {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the VM's ports published on this machine's 127.0.0.1 (`[ports]` in
    /// vibebox.toml; by default every port a process in the VM listens on).
    Ports {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        change: Option<PortsCommand>,
    },
    /// Bring the VM's git branches into this project's repository as
    /// `vibebox/<branch>` (starting the VM if needed), and list their new commits.
    Fetch,
    /// Show what changed in the protected paths (files host tools run by
    /// themselves: .envrc, .vscode/, ...) since you last accepted them, with the
    /// full diff; `--accept` accepts them as they are now.
    Protected {
        /// Accept the protected paths as they are now (asks on a terminal).
        #[arg(long)]
        accept: bool,
        /// Without a terminal: accept only if what would be recorded has this
        /// digest (printed by `vibebox protected`).
        #[arg(long, requires = "accept", value_name = "DIGEST")]
        expect: Option<String>,
    },
    /// The supervisor of one session (started by vibebox itself, detached).
    #[command(name = "__supervise", hide = true)]
    Supervise {
        #[arg(long)]
        id: String,
        #[arg(long)]
        project: PathBuf,
    },
    /// Ends the processes it guards when the process that started it dies (started
    /// by vibebox itself for QEMU and virtiofsd; see `vm::lifetime`).
    #[command(name = "__watchdog", hide = true)]
    Watchdog {
        /// The starter, as PID:START:EXE.
        #[arg(long)]
        parent: String,
        /// A guarded process, as PID:START:EXE.
        #[arg(long, required = true)]
        child: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PortsCommand {
    /// Publish a guest port on 127.0.0.1 now, until the VM stops: "3000" or
    /// "8080:80" (host:guest). For good, put it in `[ports] publish`.
    Add { mapping: String },
    /// Stop publishing a guest port now, until the VM stops: "80" (the guest port)
    /// or "8080:80".
    Rm { mapping: String },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a base image from Debian's packages (Linux, as root).
    Build {
        /// Debian release codename.
        #[arg(long, default_value = "trixie")]
        release: String,
        /// Guest architecture (x86_64 or aarch64); defaults to `VIBEBOX_ARCH`, else the host's.
        #[arg(long)]
        arch: Option<String>,
    },
    /// Download Debian's official cloud image and prepare it (one first boot).
    Pull {
        /// The image's name in the catalog (default: the current Debian, debian-13).
        name: Option<String>,
        /// Guest architecture (x86_64 or aarch64); defaults to `VIBEBOX_ARCH`, else the host's.
        #[arg(long)]
        arch: Option<String>,
    },
    /// List the base images.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a base image (refused while a session uses it).
    Rm {
        /// The image's full name (as `vibebox image list` shows it) or its short name.
        name: String,
    },
}
