//! Base images: the immutable, prepared guest images under `~/.vibebox/images/`.

pub mod build;
pub mod catalog;
pub mod digest;
pub mod download;
pub mod export;
pub mod manifest;
pub mod progress;
pub mod pull;
pub mod qcow2;
pub mod recipe;
pub mod seed;
pub mod store;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {dir} is broken: {why}; remove it with `vibebox image rm` and get it again")]
    Broken { dir: PathBuf, why: String },
    #[error(transparent)]
    State(#[from] crate::statefile::Error),
}

/// The guest architecture: always the host's (no cross-architecture emulation).
pub fn host_arch() -> &'static str {
    std::env::consts::ARCH
}

/// Debian's name for an architecture.
pub fn debian_arch(arch: &str) -> Option<&'static str> {
    match arch {
        "x86_64" => Some("amd64"),
        "aarch64" => Some("arm64"),
        _ => None,
    }
}
