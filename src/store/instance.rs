//! `instance.toml`: runtime facts of a running VM (pids, SSH endpoint, guest IPv4),
//! written by the supervisor, read by clients and by the next supervisor.

use serde::{Deserialize, Serialize};

use super::paths::SessionDir;
use super::procid::ProcId;
use super::statefile;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub supervisor_pid: u32,
    pub qemu_pid: u32,
    /// QEMU's start time and executable (`procid`): with the pid, its identity, so
    /// a later supervisor never signals a process that merely reuses the pid. A
    /// record without them (older vibebox) identifies nothing.
    #[serde(default)]
    pub qemu_start: u64,
    #[serde(default)]
    pub qemu_exe: String,
    pub ssh_host: String,
    pub ssh_port: u16,
    pub guest_ipv4: Option<String>,
    pub accel: String,
}

impl Instance {
    /// The recorded QEMU's identity.
    pub fn qemu(&self) -> ProcId {
        ProcId {
            pid: self.qemu_pid,
            start: self.qemu_start,
            exe: self.qemu_exe.clone(),
        }
    }

    pub fn read(sd: &SessionDir) -> Option<Instance> {
        let text = statefile::read_nofollow(&sd.instance()).ok()??;
        toml::from_str(&text).ok()
    }

    pub fn write(&self, sd: &SessionDir) -> Result<(), statefile::Error> {
        let text = toml::to_string(self).expect("instance serializes");
        statefile::write_atomic(&sd.instance(), text.as_bytes(), 0o600)
    }
}
