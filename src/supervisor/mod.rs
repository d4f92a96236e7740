//! The per-session supervisor that owns QEMU, and the client side that talks to it.

pub mod boot;
pub mod client;
pub mod daemon;
pub mod limits;
pub mod network;
pub mod ports;
pub mod protocol;
pub mod resume;

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

/// The ids of the sessions whose supervisor announced itself in `live/` (see
/// `Home::live`). A supervisor killed with -9 leaves its name behind; asking it
/// then finds nobody, so such a session still shows as stopped.
pub fn live_sessions(
    home: &crate::paths::Home,
) -> std::collections::HashSet<crate::store::SessionId> {
    std::fs::read_dir(home.live())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Announces a live supervisor in `live/` for as long as this value lives.
pub struct LiveMark(std::path::PathBuf);

impl LiveMark {
    pub fn new(home: &crate::paths::Home, id: &str) -> LiveMark {
        let path = home.live().join(id);
        if crate::statefile::ensure_dir(&home.live(), 0o700).is_ok() {
            let _ = crate::statefile::write_atomic(&path, b"", 0o600);
        }
        LiveMark(path)
    }
}

impl Drop for LiveMark {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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
