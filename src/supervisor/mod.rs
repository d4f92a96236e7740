//! The per-session supervisor that owns QEMU, and the client side that talks to it.

pub mod client;
pub mod daemon;
pub mod instance;
pub mod limits;
pub mod network;
pub mod protocol;

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

    fn parse(s: &str) -> State {
        match s {
            "running" => State::Running,
            "booting" => State::Booting,
            "stopping" => State::Stopping,
            _ => State::Stopped,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub clients: u32,
}

/// What the session's supervisor reports; a session without a live supervisor is
/// stopped with no clients.
pub fn status(session: &SessionDir) -> Status {
    match client::query_status(session) {
        Some((state, clients)) => Status {
            state: State::parse(&state),
            clients,
        },
        None => Status {
            state: State::Stopped,
            clients: 0,
        },
    }
}
