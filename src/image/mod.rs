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
    #[error(
        "VIBEBOX_ARCH={0:?} is not a guest architecture: set it to x86_64 or aarch64, or unset it"
    )]
    BadGuestArch(String),
}

/// The guest architecture: always the host's (no cross-architecture emulation).
pub fn host_arch() -> &'static str {
    std::env::consts::ARCH
}

/// The guest architecture of new boots: `VIBEBOX_ARCH` when set, else the host's.
/// Another architecture than the host's is emulated (TCG), slowly: it is how CI
/// runs the aarch64 guests that Apple Silicon users boot with hvf.
pub fn guest_arch() -> Result<&'static str, Error> {
    match std::env::var("VIBEBOX_ARCH") {
        Ok(v) if !v.is_empty() => ["x86_64", "aarch64"]
            .into_iter()
            .find(|a| *a == v)
            .ok_or(Error::BadGuestArch(v)),
        _ => Ok(host_arch()),
    }
}

/// Debian's name for an architecture.
pub fn debian_arch(arch: &str) -> Option<&'static str> {
    match arch {
        "x86_64" => Some("amd64"),
        "aarch64" => Some("arm64"),
        _ => None,
    }
}
