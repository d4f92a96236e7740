//! The per-session supervisor that owns QEMU. For now only the status query exists:
//! with no supervisor implemented, every session is stopped with no clients.

use serde::Serialize;

use crate::paths::SessionDir;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Booting,
    Stopping,
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Booting => "booting",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub clients: u32,
}

/// What the supervisor of a session reports.
pub fn status(_session: &SessionDir) -> Status {
    Status {
        state: State::Stopped,
        clients: 0,
    }
}
