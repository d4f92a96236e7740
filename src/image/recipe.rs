//! The guest recipe, compiled into the binary from `images/` so an installed vibebox
//! needs no data files beside it. The recipe's digest names the image it builds:
//! changing any file here makes a new image instead of reusing a stale one.

/// Debian packages, one per line, `#` comments.
pub const PACKAGES: &str = include_str!("../../images/debian/packages.txt");
/// Runs inside the new root filesystem once, as root.
pub const SETUP: &str = include_str!("../../images/debian/setup.sh");
/// mmdebstrap's essential hook (on the host, the root file system as `$1`).
pub const ESSENTIAL_HOOK: &str = include_str!("../../images/debian/essential-hook.sh");

/// Runs once inside a pulled cloud image, on its first boot (cloud-init runcmd):
/// installs what `setup.sh` needs, runs it, sends the kernel and initrd back.
pub const PREPARE: &str = include_str!("../../images/pull/prepare.sh");

/// Guest files, installed to `/usr/lib/vibebox/` before `setup.sh` runs.
pub const GUEST_FILES: &[(&str, &str)] = &[
    (
        "vibebox-init",
        include_str!("../../images/guest/vibebox-init"),
    ),
    (
        "vibebox-init.service",
        include_str!("../../images/guest/vibebox-init.service"),
    ),
    (
        "vibebox-mounts.service",
        include_str!("../../images/guest/vibebox-mounts.service"),
    ),
    (
        "vibebox-ready.service",
        include_str!("../../images/guest/vibebox-ready.service"),
    ),
    ("vibebox.sh", include_str!("../../images/guest/vibebox.sh")),
    (
        "sshd_config.conf",
        include_str!("../../images/guest/sshd_config.conf"),
    ),
];

/// Where guest files go inside the image.
pub const GUEST_DIR: &str = "usr/lib/vibebox";

/// The packages as a list.
pub fn packages() -> Vec<&'static str> {
    PACKAGES
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Everything that decides a built image's content, hashed: release, architecture,
/// packages, scripts, guest files and the vibebox version.
pub fn digest(release: &str, arch: &str) -> String {
    hash_with(&format!("release {release}\narch {arch}\n"), false)
}

/// Everything that decides a pulled image's content: the upstream file (by its
/// SHA-512), the architecture, and the same recipe plus the prepare script.
pub fn pull_digest(upstream_sha512: &str, arch: &str) -> String {
    hash_with(&format!("pull {upstream_sha512}\narch {arch}\n"), true)
}

fn hash_with(head: &str, prepare: bool) -> String {
    let mut all = format!("vibebox {}\n{head}", env!("CARGO_PKG_VERSION"));
    all.push_str(PACKAGES);
    all.push_str(SETUP);
    all.push_str(ESSENTIAL_HOOK);
    if prepare {
        all.push_str(PREPARE);
    }
    for (name, body) in GUEST_FILES {
        all.push_str(name);
        all.push('\0');
        all.push_str(body);
    }
    super::digest::sha256(all.as_bytes())
}

/// Debian codename to version number, for image names (`debian-13`).
pub fn release_version(codename: &str) -> Option<u32> {
    match codename {
        "bookworm" => Some(12),
        "trixie" => Some(13),
        "forky" => Some(14),
        _ => None,
    }
}

/// The image name for a release: `debian-13`, or `debian-<codename>` when unknown.
pub fn image_name(release: &str) -> String {
    match release_version(release) {
        Some(v) => format!("debian-{v}"),
        None => format!("debian-{release}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_is_sane() {
        let p = packages();
        for needed in [
            "openssh-server",
            "sudo",
            "systemd",
            "dbus",
            "git",
            "curl",
            "ripgrep",
        ] {
            assert!(p.contains(&needed), "{needed} missing from packages.txt");
        }
        assert!(p.iter().all(|p| !p.contains(' ')));
        assert_ne!(digest("trixie", "x86_64"), digest("bookworm", "x86_64"));
        assert_ne!(digest("trixie", "x86_64"), digest("trixie", "aarch64"));
        let a = "a".repeat(128);
        assert_ne!(
            pull_digest(&a, "x86_64"),
            pull_digest(&"b".repeat(128), "x86_64")
        );
        assert_ne!(pull_digest(&a, "x86_64"), pull_digest(&a, "aarch64"));
        assert_ne!(pull_digest(&a, "x86_64"), digest("trixie", "x86_64"));
        assert_eq!(image_name("trixie"), "debian-13");
        assert_eq!(image_name("sid"), "debian-sid");
    }
}
