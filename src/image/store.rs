//! `~/.vibebox/images/`: listing, finding, installing and removing prepared images.
//!
//! An image is made in a staging directory (`.tmp-<pid>-<uuid>`) and renamed into
//! place only when whole, so a crash or Ctrl-C never leaves a half image that looks
//! whole; staging directories of dead processes are swept on the next build.

use std::fs;
use std::path::{Path, PathBuf};

use super::manifest::{self, Manifest};
use super::{Error, qcow2};
use crate::paths::Home;
use crate::statefile::{self, Lock};

#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    /// The directory name: `<name>-<arch>-<digest12>`.
    pub fn id(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join(manifest::DISK)
    }
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(manifest::KERNEL)
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join(manifest::INITRD)
    }
    /// Bytes on disk of the image's files.
    pub fn size(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        [self.disk(), self.kernel(), self.initrd()]
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }
}

pub struct Store {
    dir: PathBuf,
}

const STAGING_PREFIX: &str = ".tmp-";

impl Store {
    pub fn new(home: &Home) -> Store {
        Store { dir: home.images() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes free on the disk holding the store (unknown counts as plenty: the
    /// write itself will report a full disk).
    pub fn free_bytes(&self) -> u64 {
        let _ = statefile::ensure_dir(&self.dir, 0o755);
        statefile::free_bytes(&self.dir)
    }

    /// Every complete image, newest first. Directories without a readable manifest
    /// are skipped: they are not images.
    pub fn list(&self) -> Result<Vec<Image>, Error> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Io {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut images: Vec<Image> = rd
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let dir = e.path();
                Manifest::read(&dir)
                    .ok()
                    .map(|manifest| Image { dir, manifest })
            })
            .collect();
        images.sort_by_key(|i| std::cmp::Reverse(i.manifest.created));
        Ok(images)
    }

    /// The image a config's `image = ...` names for `arch`: `default` is the newest
    /// image for the architecture; any other value matches an image's full id or its
    /// name.
    pub fn find(&self, wanted: &str, arch: &str) -> Result<Option<Image>, Error> {
        let images = self.list()?;
        Ok(images.into_iter().find(|i| {
            i.manifest.arch == arch
                && (wanted == "default" || i.manifest.name == wanted || i.id() == wanted)
        }))
    }

    pub fn get(&self, id: &str) -> Option<Image> {
        let dir = self.dir.join(id);
        Manifest::read(&dir)
            .ok()
            .map(|manifest| Image { dir, manifest })
    }

    /// Serialises builds and pulls of the same image: the second waits, then finds
    /// the first one's result.
    pub fn lock(&self, key: &str) -> Result<Lock, Error> {
        statefile::ensure_dir(&self.dir, 0o755)?;
        Ok(Lock::exclusive_waiting(
            &self.dir.join(format!(".{key}.lock")),
            "another vibebox making the same image",
        )?)
    }

    /// A fresh staging directory, removed again on drop unless installed.
    pub fn staging(&self) -> Result<Staging, Error> {
        statefile::ensure_dir(&self.dir, 0o755)?;
        self.sweep_dead_staging();
        let dir = self.dir.join(format!(
            "{STAGING_PREFIX}{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        fs::create_dir(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Staging { dir: Some(dir) })
    }

    fn sweep_dead_staging(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
                continue;
            };
            let pid: Option<i32> = rest.split('-').next().and_then(|p| p.parse().ok());
            let alive = pid.is_some_and(|p| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
            });
            if !alive {
                remove_tree(&e.path());
            }
        }
    }

    /// Writes the manifest into the staging directory and renames it to
    /// `<name>-<arch>-<digest12>`. If that image already exists (another process
    /// finished first), the existing one is kept and the staging copy dropped.
    pub fn install(
        &self,
        mut staging: Staging,
        manifest: Manifest,
        digest12: &str,
    ) -> Result<Image, Error> {
        let src = staging.dir.clone().expect("staging dir");
        for f in [manifest::DISK, manifest::KERNEL, manifest::INITRD] {
            let p = src.join(f);
            let _ = fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o444));
        }
        manifest.write(&src)?;
        // Made by root under `sudo -E vibebox image build`: the user's own from here.
        statefile::give_tree_to_user(&src).map_err(|source| Error::Io {
            path: src.clone(),
            source,
        })?;
        let id = format!("{}-{}-{digest12}", manifest.name, manifest.arch);
        let dest = self.dir.join(&id);
        if dest.exists() {
            return self.get(&id).ok_or(Error::Broken {
                dir: dest,
                why: "an image directory with this name exists but has no manifest".into(),
            });
        }
        fs::rename(&src, &dest).map_err(|source| Error::Io {
            path: dest.clone(),
            source,
        })?;
        staging.dir = None;
        Ok(Image {
            dir: dest,
            manifest,
        })
    }

    /// Removes an image for good.
    pub fn remove(&self, image: &Image) -> Result<(), Error> {
        // Rename first so a half-removed image never looks whole.
        let doomed = self.dir.join(format!(
            "{STAGING_PREFIX}0-rm-{}",
            uuid::Uuid::now_v7().simple()
        ));
        fs::rename(&image.dir, &doomed).map_err(|source| Error::Io {
            path: image.dir.clone(),
            source,
        })?;
        remove_tree(&doomed);
        Ok(())
    }
}

/// Session disks whose backing file is inside `image`.
pub fn sessions_using(
    home: &Home,
    image: &Image,
    sessions: &[crate::store::SessionId],
) -> Vec<crate::store::SessionId> {
    sessions
        .iter()
        .copied()
        .filter(|id| {
            qcow2::backing_file(&home.session(id).disk()).is_some_and(|b| b.starts_with(&image.dir))
        })
        .collect()
}

/// A staging directory that removes itself unless installed.
pub struct Staging {
    dir: Option<PathBuf>,
}

impl Staging {
    pub fn path(&self) -> &Path {
        self.dir.as_deref().expect("staging dir")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            remove_tree(&dir);
        }
    }
}

/// Removes a tree after detaching anything mounted inside it: a build that was
/// interrupted inside a chroot may leave /proc or /dev mounted there, and deleting
/// through such a mount would delete the host's files.
pub fn remove_tree(dir: &Path) {
    #[cfg(target_os = "linux")]
    {
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let mut inside: Vec<PathBuf> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .map(unescape_mount_path)
                .filter(|m| m.starts_with(dir))
                .collect();
            inside.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for m in &inside {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
            let still = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            if still
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .any(|m| unescape_mount_path(m).starts_with(dir))
            {
                tracing::error!(
                    "not removing {}: something is still mounted inside",
                    dir.display()
                );
                return;
            }
        }
    }
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("could not remove {}: {e}", dir.display());
    }
}

/// /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
#[cfg(target_os = "linux")]
fn unescape_mount_path(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_mount_path("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape_mount_path("/x\\134y"), PathBuf::from("/x\\y"));
    }
}
