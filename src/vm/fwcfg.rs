//! The per-boot guest configuration handed to `vibebox-init` through QEMU fw_cfg
//! entries (`opt/org.vibebox/<key>`). The contract is documented at the top of
//! `images/guest/vibebox-init`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::mounts::Access;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    NineP,
    Virtiofs,
}

/// One share as the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    pub fstype: FsType,
    pub tag: String,
    pub access: Access,
    pub guest_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub user: String,
    pub uid: u32,
    pub authorized_keys: String,
    pub host_key: String,
    pub host_key_pub: String,
    pub hostname: String,
    pub workdir: Option<PathBuf>,
    pub explain: String,
    pub mounts: Vec<GuestMount>,
    /// Guest paths of git directories the guest sees through an overlay on its own
    /// disk: the share beneath is read-only there, and guest git must still write.
    pub git_overlays: Vec<PathBuf>,
    /// `[box] volumes` under the project's guest path: the guest mounts its own disk
    /// there.
    pub volumes: Volumes,
}

/// The project's guest path and its volumes (relative, validated by config).
#[derive(Debug, Clone, Default)]
pub struct Volumes {
    pub root: PathBuf,
    pub paths: Vec<String>,
}

impl Volumes {
    /// The `volumes` entry: `rel<TAB>root` per line; the root goes last since a path
    /// may hold a tab, and config validation keeps tabs and newlines out of `rel`.
    pub fn entry(&self) -> String {
        self.paths
            .iter()
            .map(|v| format!("{v}\t{}\n", self.root.display()))
            .collect()
    }
}

/// The guest's address plan, handed to it so `vibebox-init` configures the NIC at
/// once instead of asking DHCP after udev has settled (seconds of every boot under
/// TCG). Both networks a guest meets use this plan: vibebox's gateway (whose DHCP
/// server still answers the same, see `net::dhcp::Lan`) and QEMU's user networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNetwork {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
}

pub const NETWORK: GuestNetwork = GuestNetwork {
    address: Ipv4Addr::new(10, 0, 2, 15),
    prefix_len: 24,
    gateway: Ipv4Addr::new(10, 0, 2, 2),
    dns: Ipv4Addr::new(10, 0, 2, 3),
};

impl GuestNetwork {
    /// The `network` entry: `address A/P`, `gateway G`, `dns D`, one per line.
    pub fn entry(&self) -> String {
        format!(
            "address {}/{}\ngateway {}\ndns {}\n",
            self.address, self.prefix_len, self.gateway, self.dns
        )
    }
}

/// The mount table: `fstype<TAB>tag<TAB>mode<TAB>guest_path` per line. Paths with a
/// newline cannot be represented; config validation refuses control characters.
pub fn mounts_table(mounts: &[GuestMount]) -> String {
    mounts
        .iter()
        .map(|m| {
            format!(
                "{}\t{}\t{}\t{}\n",
                match m.fstype {
                    FsType::NineP => "9p",
                    FsType::Virtiofs => "virtiofs",
                },
                m.tag,
                m.access.as_str(),
                m.guest_path.display()
            )
        })
        .collect()
}

/// One path per line (config validation refuses control characters in paths).
fn lines(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| format!("{}\n", p.display())).collect()
}

/// Guest hostnames are DNS labels: `vibebox-<project dir name>`, lowercased, other
/// characters turned into '-', at most 63 characters.
pub fn hostname_for(project: &Path) -> String {
    let base = project
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut label: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    label = label.trim_matches('-').to_string();
    while label.contains("--") {
        label = label.replace("--", "-");
    }
    let mut h = if label.is_empty() {
        "vibebox".to_string()
    } else {
        format!("vibebox-{label}")
    };
    h.truncate(63);
    h.trim_end_matches('-').to_string()
}

impl GuestConfig {
    /// The entries as (key, value) pairs.
    pub fn entries(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut e = vec![
            ("user", self.user.clone().into_bytes()),
            ("uid", self.uid.to_string().into_bytes()),
            (
                "authorized_keys",
                format!("{}\n", self.authorized_keys.trim()).into_bytes(),
            ),
            ("ssh_host_ed25519_key", self.host_key.clone().into_bytes()),
            (
                "ssh_host_ed25519_key.pub",
                format!("{}\n", self.host_key_pub.trim()).into_bytes(),
            ),
            ("hostname", self.hostname.clone().into_bytes()),
            ("explain", self.explain.clone().into_bytes()),
            ("mounts", mounts_table(&self.mounts).into_bytes()),
            ("git_overlay", lines(&self.git_overlays).into_bytes()),
            ("volumes", self.volumes.entry().into_bytes()),
            ("network", NETWORK.entry().into_bytes()),
        ];
        if let Some(w) = &self.workdir {
            e.push(("workdir", w.display().to_string().into_bytes()));
        }
        e
    }

    /// Writes each entry to a file in `dir` (private: it holds the guest's host key)
    /// and returns the (key, file) list for the QEMU command line.
    pub fn write(&self, dir: &Path) -> Result<Vec<(String, PathBuf)>, crate::statefile::Error> {
        crate::statefile::ensure_dir(dir, 0o700)?;
        let mut out = Vec::new();
        for (key, value) in self.entries() {
            let path = dir.join(key);
            crate::statefile::write_atomic(&path, &value, 0o600)?;
            out.push((key.to_string(), path));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_hostname() {
        let t = mounts_table(&[
            GuestMount {
                fstype: FsType::NineP,
                tag: "vbx0".into(),
                access: Access::ReadWrite,
                guest_path: "/home/al/my proj, \"x\"".into(),
            },
            GuestMount {
                fstype: FsType::Virtiofs,
                tag: "vbx1".into(),
                access: Access::ReadOnly,
                guest_path: "/mnt/ro".into(),
            },
        ]);
        assert_eq!(
            t,
            "9p\tvbx0\trw\t/home/al/my proj, \"x\"\nvirtiofs\tvbx1\tro\t/mnt/ro\n"
        );
        assert_eq!(
            hostname_for(Path::new("/x/My Project_2")),
            "vibebox-my-project-2"
        );
        assert_eq!(hostname_for(Path::new("/x/ééé")), "vibebox");
        assert_eq!(
            NETWORK.entry(),
            "address 10.0.2.15/24\ngateway 10.0.2.2\ndns 10.0.2.3\n"
        );
        assert!(hostname_for(Path::new(&format!("/x/{}", "a".repeat(100)))).len() <= 63);
    }

    #[test]
    fn volumes_entry_puts_the_root_last() {
        let v = Volumes {
            root: "/home/al/my\tproj, \"x\"".into(),
            paths: vec!["node_modules".into(), "web/.venv".into()],
        };
        assert_eq!(
            v.entry(),
            "node_modules\t/home/al/my\tproj, \"x\"\nweb/.venv\t/home/al/my\tproj, \"x\"\n"
        );
        assert_eq!(Volumes::default().entry(), "");
    }
}
