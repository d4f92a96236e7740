//! `instance.toml`: runtime facts of a running VM (pids, SSH endpoint, guest IPv4),
//! written by the supervisor, read by clients and by the next supervisor.

use serde::{Deserialize, Serialize};

use super::paths::SessionDir;
use super::statefile;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub supervisor_pid: u32,
    pub qemu_pid: u32,
    pub ssh_host: String,
    pub ssh_port: u16,
    pub guest_ipv4: Option<String>,
    pub accel: String,
}

impl Instance {
    pub fn read(sd: &SessionDir) -> Option<Instance> {
        let text = statefile::read_nofollow(&sd.instance()).ok()??;
        toml::from_str(&text).ok()
    }

    pub fn write(&self, sd: &SessionDir) -> Result<(), statefile::Error> {
        let text = toml::to_string(self).expect("instance serializes");
        statefile::write_atomic(&sd.instance(), text.as_bytes(), 0o600)
    }
}
