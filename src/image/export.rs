//! What a preparing guest sends back over its `org.vibebox.export` port: a tar of
//! `vmlinuz`, `initrd.img` and, last, `prepare.info` (see images/pull/prepare.sh).
//!
//! The guest is the verified official image running our own script, but its output
//! still lands in the host's image store, so it is read like any foreign input:
//! only the three expected regular files, each with a size cap, and the kernel
//! command line built only from values of a narrow alphabet.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::manifest;

const MAX_KERNEL: u64 = 256 << 20;
const MAX_INITRD: u64 = 1 << 30;
const MAX_INFO: u64 = 64 << 10;
pub const INFO: &str = "prepare.info";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the guest sent nothing back")]
    Empty,
    #[error("the guest's export is not a valid tar: {0}")]
    Tar(io::Error),
    #[error("the guest's export holds an unexpected entry {0:?}")]
    Unexpected(String),
    #[error("the guest's {name} is larger than {max} bytes")]
    TooLarge { name: String, max: u64 },
    #[error("the guest's export is missing {0}")]
    Missing(&'static str),
    #[error("preparing failed inside the guest: {0}")]
    GuestFailed(String),
    #[error("the guest's {INFO} has a bad {key}: {value:?}")]
    BadValue { key: &'static str, value: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The facts `prepare.info` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The root block device for `root=`, e.g. `/dev/vda1`.
    pub root: String,
    pub rootfstype: String,
    pub kernel: String,
    /// Packages of the recipe the guest could not install (offline).
    pub missing: Vec<String>,
}

impl Info {
    /// The kernel command line for direct kernel boots of the prepared image.
    pub fn cmdline(&self) -> String {
        format!("root={} rw rootfstype={} quiet", self.root, self.rootfstype)
    }
}

fn plain(value: &str, extra: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= 200
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b) || extra.contains(&b))
}

/// Parses `prepare.info` (`key=value` lines; unknown keys ignored).
pub fn parse_info(text: &str) -> Result<Info, ExportError> {
    let mut result = None;
    let (mut root, mut fstype, mut kernel, mut missing) = (None, None, None, Vec::new());
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "result" => result = Some(value.to_string()),
            "root" => root = Some(value.to_string()),
            "rootfstype" => fstype = Some(value.to_string()),
            "kernel" => kernel = Some(value.to_string()),
            "missing" => missing = value.split_whitespace().map(str::to_string).collect(),
            _ => {}
        }
    }
    match result.as_deref() {
        Some("ok") => {}
        Some(other) => {
            let why = other.strip_prefix("error").unwrap_or(other).trim();
            return Err(ExportError::GuestFailed(why.chars().take(300).collect()));
        }
        None => return Err(ExportError::Missing("the result line of prepare.info")),
    }
    let root = root.ok_or(ExportError::Missing("root= in prepare.info"))?;
    // `/dev/vda1`, or `PARTUUID=...`/`UUID=...`: nothing that could add another
    // kernel parameter.
    if !plain(&root, b"/=") {
        return Err(ExportError::BadValue {
            key: "root",
            value: root,
        });
    }
    let rootfstype = fstype.unwrap_or_else(|| "ext4".to_string());
    if !plain(&rootfstype, b"") {
        return Err(ExportError::BadValue {
            key: "rootfstype",
            value: rootfstype,
        });
    }
    let kernel = kernel.unwrap_or_default();
    if !kernel.is_empty() && !plain(&kernel, b"+~") {
        return Err(ExportError::BadValue {
            key: "kernel",
            value: kernel,
        });
    }
    missing.retain(|p| plain(p, b"+:"));
    Ok(Info {
        root,
        rootfstype,
        kernel,
        missing,
    })
}

/// Unpacks the export at `tar_path` into `dir` (as `vmlinuz`, `initrd.img`) and
/// returns its info. A guest that failed reports why; that error wins over the
/// missing files.
pub fn unpack(tar_path: &Path, dir: &Path) -> Result<Info, ExportError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    let file = File::open(tar_path).map_err(io_err(tar_path))?;
    if file.metadata().map_err(io_err(tar_path))?.len() == 0 {
        return Err(ExportError::Empty);
    }
    let mut archive = tar::Archive::new(file);
    let mut info_text = None;
    let mut got = Vec::new();
    for entry in archive.entries().map_err(ExportError::Tar)? {
        let mut entry = entry.map_err(ExportError::Tar)?;
        let name = entry
            .path()
            .map_err(ExportError::Tar)?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if !entry.header().entry_type().is_file() {
            return Err(ExportError::Unexpected(name));
        }
        let (dest, max) = match name.as_str() {
            "vmlinuz" => (manifest::KERNEL, MAX_KERNEL),
            "initrd.img" => (manifest::INITRD, MAX_INITRD),
            INFO => ("", MAX_INFO),
            _ => return Err(ExportError::Unexpected(name)),
        };
        if entry.size() > max {
            return Err(ExportError::TooLarge { name, max });
        }
        if name == INFO {
            let mut text = String::new();
            entry
                .by_ref()
                .take(max)
                .read_to_string(&mut text)
                .map_err(ExportError::Tar)?;
            info_text = Some(text);
            // The last member; anything after it is the port's trailing noise.
            break;
        }
        let path = dir.join(dest);
        let mut out = File::create(&path).map_err(io_err(&path))?;
        let copied = io::copy(&mut entry.by_ref().take(max), &mut out).map_err(io_err(&path))?;
        if copied != entry.size() {
            return Err(ExportError::Tar(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name} is cut short"),
            )));
        }
        out.sync_all().map_err(io_err(&path))?;
        got.push(dest);
    }
    let info = parse_info(&info_text.ok_or(ExportError::Missing(INFO))?)?;
    for needed in [manifest::KERNEL, manifest::INITRD] {
        if !got.contains(&needed) {
            return Err(ExportError::Missing(needed));
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str =
        "root=/dev/vda1\nrootfstype=ext4\nkernel=6.12.48+deb13-amd64\nmissing=\nresult=ok\n";

    #[test]
    fn info_gives_the_command_line() {
        let info = parse_info(OK).unwrap();
        assert_eq!(info.root, "/dev/vda1");
        assert_eq!(info.cmdline(), "root=/dev/vda1 rw rootfstype=ext4 quiet");
        assert!(info.missing.is_empty());
        let info = parse_info("root=PARTUUID=ab-12\nmissing=git ripgrep\nresult=ok").unwrap();
        assert_eq!(info.root, "PARTUUID=ab-12");
        assert_eq!(info.missing, ["git", "ripgrep"]);
    }

    #[test]
    fn info_refuses_failures_and_injection() {
        let err = parse_info("result=error apt is broken\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "preparing failed inside the guest: apt is broken"
        );
        assert!(matches!(
            parse_info("root=/dev/vda1\n"),
            Err(ExportError::Missing(_))
        ));
        assert!(matches!(
            parse_info("result=ok\n"),
            Err(ExportError::Missing(_))
        ));
        for bad in ["/dev/vda1 init=/bin/sh", "/dev/vda1\tx", "", "a\"b"] {
            let text = format!("root={bad}\nresult=ok\n");
            assert!(
                matches!(
                    parse_info(&text),
                    Err(ExportError::BadValue { .. }) | Err(ExportError::Missing(_))
                ),
                "{bad:?}"
            );
        }
        let err = parse_info("root=/dev/vda1\nrootfstype=ext4 init=/x\nresult=ok").unwrap_err();
        assert!(matches!(
            err,
            ExportError::BadValue {
                key: "rootfstype",
                ..
            }
        ));
    }

    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, body) in members {
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *body).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn unpack_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<Info, ExportError>) {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("export.tar");
        std::fs::write(&tar, bytes).unwrap();
        let r = unpack(&tar, dir.path());
        (dir, r)
    }

    #[test]
    fn unpacks_the_three_members() {
        let mut bytes = tar_of(&[
            ("vmlinuz", b"KERNEL"),
            ("initrd.img", b"INITRD"),
            ("prepare.info", OK.as_bytes()),
        ]);
        bytes.extend_from_slice(b"trailing noise");
        let (dir, r) = unpack_bytes(&bytes);
        assert_eq!(r.unwrap().kernel, "6.12.48+deb13-amd64");
        assert_eq!(
            std::fs::read(dir.path().join("vmlinuz")).unwrap(),
            b"KERNEL"
        );
        assert_eq!(
            std::fs::read(dir.path().join("initrd.img")).unwrap(),
            b"INITRD"
        );
    }

    #[test]
    fn refuses_what_is_not_expected() {
        let (_d, r) = unpack_bytes(b"");
        assert!(matches!(r, Err(ExportError::Empty)));
        let (_d, r) = unpack_bytes(&tar_of(&[("prepare.info", OK.as_bytes())]));
        assert!(matches!(r, Err(ExportError::Missing("vmlinuz"))));
        let (_d, r) = unpack_bytes(&tar_of(&[("etc/passwd", b"x")]));
        assert!(matches!(r, Err(ExportError::Unexpected(_))));
        let (_d, r) = unpack_bytes(&tar_of(&[("vmlinuz", b"K")]));
        assert!(matches!(r, Err(ExportError::Missing(INFO))));
        // A failed guest says why, even without the files.
        let (_d, r) = unpack_bytes(&tar_of(&[("prepare.info", b"result=error no space\n")]));
        assert_eq!(
            r.unwrap_err().to_string(),
            "preparing failed inside the guest: no space"
        );
        // Garbage is an error, never a panic.
        let (_d, r) = unpack_bytes(&[0xffu8; 1500]);
        assert!(r.is_err());
        // Cut off in the middle of a member.
        let full = tar_of(&[("vmlinuz", &[7u8; 4096]), ("prepare.info", OK.as_bytes())]);
        let (_d, r) = unpack_bytes(&full[..2048]);
        assert!(r.is_err());
    }
}
