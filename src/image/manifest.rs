//! `image.toml`: what a prepared image is, and the sha256 of every file in it.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Error, digest};
use crate::statefile;

pub const FILE: &str = "image.toml";
/// The files every prepared image holds.
pub const DISK: &str = "disk.qcow2";
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// e.g. `debian-13`.
    pub name: String,
    /// `x86_64` or `aarch64`.
    pub arch: String,
    /// Debian release codename, e.g. `trixie`.
    pub release: String,
    pub kernel_cmdline: String,
    pub root_device: String,
    /// How it was made: `build (debootstrap, <mirror>)` or `pull <url>`.
    pub source: String,
    pub vibebox_version: String,
    pub created: DateTime<Utc>,
    /// File name → sha256.
    pub files: BTreeMap<String, String>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest, Error> {
        let path = dir.join(FILE);
        let text = statefile::read_nofollow(&path)?.ok_or_else(|| Error::Broken {
            dir: dir.to_path_buf(),
            why: format!("{FILE} is missing"),
        })?;
        toml::from_str(&text).map_err(|e| {
            let (line, col) = crate::tomlpos::error_line_col(&text, &e);
            Error::Broken {
                dir: dir.to_path_buf(),
                why: format!("{FILE}:{line}:{col}: {}", e.message().trim()),
            }
        })
    }

    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let text = toml::to_string(self).expect("manifest serializes");
        statefile::write_atomic(&dir.join(FILE), text.as_bytes(), 0o444)?;
        Ok(())
    }

    /// Hashes the three image files in `dir` into `files`.
    pub fn hash_files(&mut self, dir: &Path) -> Result<(), Error> {
        for name in [DISK, KERNEL, INITRD] {
            let path = dir.join(name);
            let sum = digest::sha256_file(&path).map_err(|source| Error::Io { path, source })?;
            self.files.insert(name.to_string(), sum);
        }
        Ok(())
    }

    /// Checks every file against its recorded sha256.
    pub fn verify(&self, dir: &Path) -> Result<(), Error> {
        for name in [DISK, KERNEL, INITRD] {
            let want = self.files.get(name).ok_or_else(|| Error::Broken {
                dir: dir.to_path_buf(),
                why: format!("{FILE} has no checksum for {name}"),
            })?;
            let path = dir.join(name);
            let got = digest::sha256_file(&path).map_err(|source| Error::Io { path, source })?;
            if &got != want {
                return Err(Error::Broken {
                    dir: dir.to_path_buf(),
                    why: format!("{name} has sha256 {got}, the manifest says {want}"),
                });
            }
        }
        Ok(())
    }
}
