//! Every path vibebox uses, in one place.

use std::path::{Path, PathBuf};

/// Name of the project configuration file.
pub const CONFIG_FILE: &str = "vibebox.toml";
/// Name of the per-project marker directory (a hint for rename and copy detection).
pub const CACHE_DIR: &str = ".vibebox";
/// The marker file in it, naming the session id.
pub const MARKER_FILE: &str = "session.toml";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot find your home directory: set HOME or VIBEBOX_HOME")]
    NoHome,
    #[error("VIBEBOX_HOME must be an absolute path, got {0:?}")]
    RelativeHome(PathBuf),
}

/// The user's home directory on the host.
pub fn host_home() -> Result<PathBuf, Error> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .ok_or(Error::NoHome)
}

/// The global vibebox directory (`~/.vibebox`, or `VIBEBOX_HOME`).
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn from_env() -> Result<Self, Error> {
        let root = match std::env::var_os("VIBEBOX_HOME").filter(|v| !v.is_empty()) {
            Some(v) => {
                let p = PathBuf::from(v);
                if !p.is_absolute() {
                    return Err(Error::RelativeHome(p));
                }
                p
            }
            None => host_home()?.join(".vibebox"),
        };
        Ok(Home { root })
    }

    pub fn from_dir(root: PathBuf) -> Self {
        Home { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn index(&self) -> PathBuf {
        self.root.join("sessions.toml")
    }
    pub fn index_lock(&self) -> PathBuf {
        self.root.join("sessions.lock")
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    /// Verified downloads (cloud images), cached by URL so a second pull is free.
    pub fn downloads(&self) -> PathBuf {
        self.root.join("downloads")
    }
    /// What the host user approved, one file per canonical project directory: the
    /// grants belong to the directory, not to a session or a marker the guest can
    /// delete or forge.
    pub fn approvals(&self) -> PathBuf {
        self.root.join("approvals")
    }
    /// One empty file per live supervisor, named by session id: `list` reads this
    /// one directory instead of knocking on every session's control socket.
    pub fn live(&self) -> PathBuf {
        self.root.join("live")
    }
    /// Logs of image builds and pulls (sessions keep theirs in their own dir).
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// Per-session runtime state lives here, keyed by id, not in the project: the
    /// guest can write the whole project directory, and a guest that could edit the
    /// VM's disk header, the ssh config or the sockets the host uses would escape.
    pub fn session(&self, id: impl std::fmt::Display) -> SessionDir {
        SessionDir {
            dir: self.root.join("sessions").join(id.to_string()),
        }
    }
}

/// `~/.vibebox/sessions/<id>/`: everything a session owns besides its project marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDir {
    dir: PathBuf,
}

impl SessionDir {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn ssh_dir(&self) -> PathBuf {
        self.dir.join("ssh")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn instance(&self) -> PathBuf {
        self.dir.join("instance.toml")
    }
    pub fn fw_cfg(&self) -> PathBuf {
        self.dir.join("fwcfg")
    }
    pub fn console_log(&self) -> PathBuf {
        self.logs().join("console.log")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.logs().join("supervisor.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.logs().join("qemu.log")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join(CONTROL_SOCKET)
    }
}

/// Socket and lock names inside a session directory. The supervisor runs with the
/// session directory as its working directory and binds these relative names, so a
/// deep `VIBEBOX_HOME` never hits the 104/108-byte limit of unix socket paths.
pub const CONTROL_SOCKET: &str = "control.sock";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const READY_SOCKET: &str = "ready.sock";
/// QEMU's NIC, connected to the supervisor's network gateway.
pub const NET_SOCKET: &str = "net.sock";
/// The guest's serial console, which QEMU connects to (see `vm::launch::console`).
pub const CONSOLE_SOCKET: &str = "console.sock";
pub const SUPERVISOR_LOCK: &str = "supervisor.lock";

/// Paths inside one project directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    root: PathBuf,
}

impl Project {
    pub fn new(root: PathBuf) -> Self {
        Project { root }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }
    pub fn cache(&self) -> PathBuf {
        self.root.join(CACHE_DIR)
    }
    pub fn session_file(&self) -> PathBuf {
        self.cache().join(MARKER_FILE)
    }
}
