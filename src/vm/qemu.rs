//! The QEMU command line, built by a pure function from host facts, the machine
//! preset (data in `qemu/`), the image and the session's paths, so every option can
//! be tested without running QEMU. No shell is involved: the result is an argv.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::host::Accelerator;
use super::mounts::Access;

/// Per-architecture machine data from `qemu/<arch>.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub binary: String,
    pub machine: String,
    pub console: String,
    pub cpu: CpuModels,
    /// UEFI firmware images for booting an image that is not direct-kernel-bootable
    /// yet (the first boot of a pulled cloud image). Tried in order; a relative name
    /// is looked up in QEMU's own data directory (`<prefix>/share/qemu`, where
    /// Homebrew's QEMU keeps its edk2 builds).
    pub firmware: Vec<String>,
    /// Whether the machine can boot without `-bios` (SeaBIOS on x86): the fallback
    /// when no UEFI firmware is installed.
    pub legacy_bios: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuModels {
    pub kvm: String,
    pub hvf: String,
    pub tcg: String,
}

impl Preset {
    pub fn for_arch(arch: &str) -> Option<Preset> {
        let text = match arch {
            "x86_64" => include_str!("../../qemu/x86_64.toml"),
            "aarch64" => include_str!("../../qemu/aarch64.toml"),
            _ => return None,
        };
        Some(toml::from_str(text).expect("qemu presets are valid (tested)"))
    }

    /// Where to look for UEFI firmware, in order: absolute names as they are,
    /// relative ones in the `share/qemu` beside the QEMU binary's `bin/` (symlinks
    /// resolved first, as Homebrew links `bin/` into its cellar).
    pub fn firmware_candidates(&self, qemu_binary: &Path) -> Vec<PathBuf> {
        let real = qemu_binary
            .canonicalize()
            .unwrap_or_else(|_| qemu_binary.to_path_buf());
        let share = real
            .parent()
            .and_then(Path::parent)
            .map(|prefix| prefix.join("share").join("qemu"));
        self.firmware
            .iter()
            .filter_map(|f| {
                let f = Path::new(f);
                if f.is_absolute() {
                    Some(f.to_path_buf())
                } else {
                    share.as_ref().map(|s| s.join(f))
                }
            })
            .collect()
    }

    fn cpu(&self, accel: Accelerator) -> &str {
        match accel {
            Accelerator::Kvm => &self.cpu.kvm,
            Accelerator::Hvf => &self.cpu.hvf,
            Accelerator::Tcg => &self.cpu.tcg,
        }
    }
}

/// The guest NIC's MAC address (locally administered), fixed so the guest's network
/// configuration is the same every boot.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

/// How a share reaches the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareKind {
    /// QEMU's own 9p server (`-virtfs`).
    NineP,
    /// A virtiofsd listening on this socket.
    Virtiofs { socket: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host: PathBuf,
    pub access: Access,
    pub kind: ShareKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// QEMU user networking with SSH forwarded from 127.0.0.1:`ssh_port`.
    User { ssh_port: u16 },
    /// QEMU user networking without any forward (the first boot of a pulled image:
    /// it fetches its seed from the host and maybe packages, nothing comes in).
    Outbound,
    /// The guest's NIC wired to vibebox's gateway on this unix socket (QEMU
    /// connects to it): the policy-enforcing network of every session.
    Gateway { socket: PathBuf },
    /// No network device (tests).
    None,
}

/// How the guest starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot<'a> {
    /// Sessions: QEMU loads the image's kernel and initrd itself, which skips the
    /// firmware and the boot loader (seconds under TCG).
    Kernel {
        kernel: &'a Path,
        initrd: &'a Path,
        cmdline: &'a str,
    },
    /// A disk that boots through firmware and its own boot loader; `None` is the
    /// machine's built-in BIOS.
    Firmware { bios: Option<&'a Path> },
}

/// Everything one VM's command line depends on.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    pub preset: &'a Preset,
    pub accel: Accelerator,
    pub cpus: u32,
    pub memory_mb: u64,
    pub boot: Boot<'a>,
    pub disk: &'a Path,
    /// `opt/org.vibebox/<key>` → file holding the value.
    pub fw_cfg: &'a [(String, PathBuf)],
    pub console_log: &'a Path,
    /// When set, the serial console goes to this unix socket (QEMU connects to it)
    /// instead of straight into `console_log`: the supervisor reads it and writes
    /// the log with a cap, since QEMU's file backend grows without bound.
    pub console_socket: Option<&'a Path>,
    /// Socket QEMU serves for the guest's ready port; relative to QEMU's working
    /// directory so it works whatever the length of the absolute path.
    pub ready_socket: Option<&'a Path>,
    /// A virtio-serial port `org.vibebox.export` whose bytes QEMU writes to this
    /// file (what a preparing guest sends back: its kernel and initrd).
    pub export_file: Option<&'a Path>,
    /// SMBIOS system serial number: where cloud-init's NoCloud looks for its seed.
    pub smbios_serial: Option<&'a str>,
    pub qmp_socket: &'a Path,
    pub network: Network,
    pub shares: &'a [Share],
    /// QEMU's seccomp filter (`-sandbox`), where this QEMU has it (see
    /// `host::qemu_sandbox`): a guest that breaks into QEMU then cannot exec, raise
    /// privileges or use obsolete system calls.
    pub sandbox: bool,
}

/// The `-sandbox` value: everything QEMU lets a filter deny.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU option values use `,` as separator: a literal comma is written `,,`.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn esc_path(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

/// The fw_cfg name vibebox-init reads.
pub fn fw_cfg_name(key: &str) -> String {
    format!("opt/org.vibebox/{key}")
}

pub fn argv(spec: &Spec<'_>) -> Vec<OsString> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(|s| s.to_string()));
    let virtiofs = spec
        .shares
        .iter()
        .any(|s| matches!(s.kind, ShareKind::Virtiofs { .. }));

    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    if spec.sandbox {
        push(&["-sandbox", SANDBOX]);
    }
    push(&["-machine", &spec.preset.machine]);
    push(&["-accel", spec.accel.as_str()]);
    push(&["-cpu", spec.preset.cpu(spec.accel)]);
    push(&["-smp", &spec.cpus.to_string()]);
    push(&["-m", &format!("{}M", spec.memory_mb)]);
    if virtiofs {
        // vhost-user devices need guest RAM that virtiofsd can map.
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                spec.memory_mb
            ),
            "-numa",
            "node,memdev=mem",
        ]);
    }
    match spec.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            // -kernel/-initrd/-append take the whole value: no comma escaping there.
            push(&["-kernel", &kernel.to_string_lossy()]);
            push(&["-initrd", &initrd.to_string_lossy()]);
            // A kernel oops reboots the guest at once (QEMU resets it and boots the same
            // kernel again) instead of leaving a dead VM: under multi-threaded TCG the
            // guest kernel now and then hits a spurious int3 oops while it patches its
            // own code early in boot, and a second boot gets past it.
            // Under TCG nothing executes speculatively, so the kernel's Spectre and
            // Meltdown mitigations protect nothing there, and cost the most there
            // (page-table isolation switches page tables, so TCG flushes its TLB,
            // at every system call). The crypto self-tests run every registered
            // algorithm at boot; under TCG that is seconds before /init (kernel start
            // to /init, interleaved boots on a loaded host: 5.0 -> 2.3 s and
            // 8.8 -> 7.5 s). They check the implementation, not the guest's
            // security, and an accelerated guest still runs them.
            let tcg = if spec.accel == Accelerator::Tcg {
                " mitigations=off cryptomgr.notests"
            } else {
                ""
            };
            push(&[
                "-append",
                &format!(
                    "{cmdline} console={} oops=panic panic=-1{tcg}",
                    spec.preset.console
                ),
            ]);
        }
        Boot::Firmware { bios } => {
            // The guest powers off when done; a reboot would run it again.
            push(&["-no-reboot"]);
            if let Some(bios) = bios {
                push(&["-bios", &bios.to_string_lossy()]);
            }
        }
    }
    push(&[
        "-drive",
        &format!(
            "file={},if=virtio,format=qcow2,discard=unmap,cache=writeback",
            esc_path(spec.disk)
        ),
    ]);
    push(&["-device", "virtio-rng-pci"]);
    push(&[
        "-chardev",
        &match spec.console_socket {
            Some(sock) => format!("socket,id=console,path={}", esc_path(sock)),
            None => format!("file,id=console,path={}", esc_path(spec.console_log)),
        },
        "-serial",
        "chardev:console",
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", esc_path(spec.qmp_socket)),
    ]);
    if spec.ready_socket.is_some() || spec.export_file.is_some() {
        push(&["-device", "virtio-serial-pci,id=vbxserial"]);
    }
    if let Some(ready) = spec.ready_socket {
        push(&[
            "-chardev",
            &format!(
                "socket,id=vbxguest,path={},server=on,wait=off",
                esc_path(ready)
            ),
            "-device",
            "virtserialport,bus=vbxserial.0,chardev=vbxguest,name=org.vibebox.guest",
        ]);
    }
    if let Some(export) = spec.export_file {
        push(&[
            "-chardev",
            &format!("file,id=vbxexport,path={}", esc_path(export)),
            "-device",
            "virtserialport,bus=vbxserial.0,chardev=vbxexport,name=org.vibebox.export",
        ]);
    }
    if let Some(serial) = spec.smbios_serial {
        push(&["-smbios", &format!("type=1,serial={}", escape(serial))]);
    }
    for (key, file) in spec.fw_cfg {
        push(&[
            "-fw_cfg",
            &format!("name={},file={}", fw_cfg_name(key), esc_path(file)),
        ]);
    }
    match &spec.network {
        Network::User { ssh_port } => push(&[
            "-netdev",
            &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"),
            "-device",
            "virtio-net-pci,netdev=net0",
        ]),
        Network::Outbound => push(&[
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0",
        ]),
        Network::Gateway { socket } => push(&[
            "-netdev",
            &format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                esc_path(socket)
            ),
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={GUEST_MAC}"),
        ]),
        Network::None => {}
    }
    for (i, share) in spec.shares.iter().enumerate() {
        match &share.kind {
            ShareKind::NineP => {
                let mut v = format!(
                    "local,id=fs{i},path={},mount_tag={},security_model=none,multidevs=remap",
                    esc_path(&share.host),
                    escape(&share.tag)
                );
                if share.access == Access::ReadOnly {
                    v.push_str(",readonly=on");
                }
                push(&["-virtfs", &v]);
            }
            ShareKind::Virtiofs { socket } => push(&[
                "-chardev",
                &format!("socket,id=vfs{i},path={}", esc_path(socket)),
                "-device",
                &format!(
                    "vhost-user-fs-pci,chardev=vfs{i},tag={}",
                    escape(&share.tag)
                ),
            ]),
        }
    }
    a.into_iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base<'a>(preset: &'a Preset, shares: &'a [Share], fw: &'a [(String, PathBuf)]) -> Spec<'a> {
        Spec {
            preset,
            accel: Accelerator::Tcg,
            cpus: 2,
            memory_mb: 1024,
            boot: Boot::Kernel {
                kernel: Path::new("/img/vmlinuz"),
                initrd: Path::new("/img/initrd.img"),
                cmdline: "root=/dev/vda rw",
            },
            disk: Path::new("/s/disk.qcow2"),
            fw_cfg: fw,
            console_log: Path::new("logs/console.log"),
            console_socket: None,
            ready_socket: Some(Path::new("ready.sock")),
            export_file: None,
            smbios_serial: None,
            qmp_socket: Path::new("qmp.sock"),
            network: Network::User { ssh_port: 2222 },
            shares,
            sandbox: true,
        }
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn presets_parse() {
        let x = Preset::for_arch("x86_64").unwrap();
        assert_eq!(x.binary, "qemu-system-x86_64");
        assert_eq!(x.console, "ttyS0");
        let a = Preset::for_arch("aarch64").unwrap();
        assert_eq!(a.machine, "virt,gic-version=max");
        assert!(Preset::for_arch("riscv64").is_none());
    }

    /// An Apple Silicon Mac: hvf, the host's CPU, a GIC that takes more than 8
    /// vCPUs, 9p shares (no virtiofs on macOS, so no shared-memory backend), the
    /// PL011 console, no display.
    #[test]
    fn aarch64_on_macos_runs_under_hvf_with_the_host_cpu() {
        let p = Preset::for_arch("aarch64").unwrap();
        let shares = [Share {
            tag: "vbx0".into(),
            host: PathBuf::from("/Users/al/proj"),
            access: Access::ReadWrite,
            kind: ShareKind::NineP,
        }];
        let mut spec = base(&p, &shares, &[]);
        spec.accel = Accelerator::Hvf;
        spec.cpus = 12;
        let a = strings(argv(&spec));
        assert_eq!(after(&a, "-accel"), ["hvf"]);
        assert_eq!(after(&a, "-machine"), ["virt,gic-version=max"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert_eq!(after(&a, "-smp"), ["12"]);
        assert_eq!(after(&a, "-display"), ["none"]);
        assert!(a.contains(&"-nodefaults".to_string()));
        assert!(!a.iter().any(|x| x.contains("memory-backend")), "{a:?}");
        assert!(after(&a, "-virtfs")[0].contains("mount_tag=vbx0"), "{a:?}");
        let append = after(&a, "-append")[0];
        assert!(append.contains("console=ttyAMA0"), "{append}");
        // The TCG-only kernel options stay off under hardware virtualization.
        assert!(!append.contains("mitigations=off"), "{append}");
        // Under TCG (the CI lane) only the CPU model differs.
        spec.accel = Accelerator::Tcg;
        let t = strings(argv(&spec));
        assert_eq!(after(&t, "-accel"), ["tcg"]);
        assert_eq!(after(&t, "-cpu"), ["max,pauth-impdef=on"]);
        assert_eq!(after(&t, "-machine"), ["virt,gic-version=max"]);
    }

    #[test]
    fn the_console_goes_to_the_supervisors_socket_when_given() {
        let p = Preset::for_arch("x86_64").unwrap();
        let mut spec = base(&p, &[], &[]);
        let file = strings(argv(&spec));
        assert!(after(&file, "-chardev").contains(&"file,id=console,path=logs/console.log"));
        spec.console_socket = Some(Path::new("console.sock"));
        let sock = strings(argv(&spec));
        assert!(after(&sock, "-chardev").contains(&"socket,id=console,path=console.sock"));
        assert!(!sock.iter().any(|a| a.contains("console.log")));
    }

    #[test]
    fn direct_kernel_boot_with_escaped_values() {
        let p = Preset::for_arch("x86_64").unwrap();
        let shares = [Share {
            tag: "vbx0".into(),
            host: PathBuf::from("/home/al/my proj, \"v2\" é"),
            access: Access::ReadOnly,
            kind: ShareKind::NineP,
        }];
        let fw = [("user".to_string(), PathBuf::from("/s/fw,cfg/user"))];
        let argv = strings(argv(&base(&p, &shares, &fw)));
        assert_eq!(after(&argv, "-accel"), ["tcg"]);
        assert_eq!(after(&argv, "-cpu"), ["max"]);
        assert_eq!(after(&argv, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(
            after(&argv, "-append"),
            [
                "root=/dev/vda rw console=ttyS0 oops=panic panic=-1 mitigations=off cryptomgr.notests"
            ]
        );
        assert_eq!(
            after(&argv, "-drive"),
            ["file=/s/disk.qcow2,if=virtio,format=qcow2,discard=unmap,cache=writeback"]
        );
        assert_eq!(
            after(&argv, "-fw_cfg"),
            ["name=opt/org.vibebox/user,file=/s/fw,,cfg/user"]
        );
        assert_eq!(
            after(&argv, "-virtfs"),
            [
                "local,id=fs0,path=/home/al/my proj,, \"v2\" é,mount_tag=vbx0,security_model=none,multidevs=remap,readonly=on"
            ]
        );
        assert!(after(&argv, "-netdev")[0].contains("hostfwd=tcp:127.0.0.1:2222-:22"));
        assert!(argv.iter().any(|a| a.contains("name=org.vibebox.guest")));
        assert_eq!(after(&argv, "-qmp"), ["unix:qmp.sock,server=on,wait=off"]);
        assert!(!argv.iter().any(|a| a.contains("memory-backend")));
    }

    #[test]
    fn mitigations_off_only_under_tcg() {
        let p = Preset::for_arch("x86_64").unwrap();
        let mut spec = base(&p, &[], &[]);
        spec.accel = Accelerator::Kvm;
        let kvm = strings(argv(&spec));
        assert!(!after(&kvm, "-append")[0].contains("mitigations"));
        assert!(!after(&kvm, "-append")[0].contains("cryptomgr"));
        spec.accel = Accelerator::Tcg;
        let tcg = strings(argv(&spec));
        assert!(after(&tcg, "-append")[0].contains("mitigations=off cryptomgr.notests"));
    }

    #[test]
    fn sandbox_only_where_asked() {
        let p = Preset::for_arch("x86_64").unwrap();
        let words = |sandbox| -> Vec<String> {
            let mut spec = base(&p, &[], &[]);
            spec.sandbox = sandbox;
            argv(&spec)
                .into_iter()
                .map(|w| w.to_string_lossy().into_owned())
                .collect()
        };
        let on = words(true);
        let i = on.iter().position(|w| w == "-sandbox").unwrap();
        assert_eq!(
            on[i + 1],
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        );
        assert!(!words(false).iter().any(|w| w == "-sandbox"));
    }

    #[test]
    fn virtiofs_needs_shared_memory() {
        let p = Preset::for_arch("x86_64").unwrap();
        let shares = [Share {
            tag: "vbx0".into(),
            host: PathBuf::from("/p"),
            access: Access::ReadWrite,
            kind: ShareKind::Virtiofs {
                socket: PathBuf::from("vfs0.sock"),
            },
        }];
        let argv = strings(argv(&base(&p, &shares, &[])));
        assert_eq!(
            after(&argv, "-object"),
            ["memory-backend-memfd,id=mem,size=1024M,share=on"]
        );
        assert!(after(&argv, "-device").contains(&"vhost-user-fs-pci,chardev=vfs0,tag=vbx0"));
        assert!(after(&argv, "-chardev").contains(&"socket,id=vfs0,path=vfs0.sock"));
    }

    #[test]
    fn firmware_is_looked_up_beside_qemu() {
        let x = Preset::for_arch("x86_64").unwrap();
        let c = x.firmware_candidates(Path::new("/nonexistent/opt/qemu/bin/qemu-system-x86_64"));
        assert_eq!(c[0], Path::new("/usr/share/ovmf/OVMF.fd"));
        assert!(c.contains(&PathBuf::from(
            "/nonexistent/opt/qemu/share/qemu/edk2-x86_64-code.fd"
        )));
        assert!(x.legacy_bios);
        let a = Preset::for_arch("aarch64").unwrap();
        assert!(!a.legacy_bios);
        assert!(
            a.firmware_candidates(Path::new("/b/bin/q"))
                .contains(&PathBuf::from("/b/share/qemu/edk2-aarch64-code.fd"))
        );
    }

    #[test]
    fn firmware_boot_for_preparing_a_pulled_image() {
        let p = Preset::for_arch("x86_64").unwrap();
        let mut spec = base(&p, &[], &[]);
        spec.boot = Boot::Firmware {
            bios: Some(Path::new("/usr/share/ovmf/OVMF.fd")),
        };
        spec.ready_socket = None;
        spec.export_file = Some(Path::new("/i/.tmp-1/export,1.tar"));
        spec.smbios_serial = Some("ds=nocloud;s=http://10.0.2.2:8000/");
        spec.network = Network::Outbound;
        let argv = strings(argv(&spec));
        assert!(after(&argv, "-kernel").is_empty());
        assert!(after(&argv, "-append").is_empty());
        assert_eq!(after(&argv, "-bios"), ["/usr/share/ovmf/OVMF.fd"]);
        assert!(argv.contains(&"-no-reboot".to_string()));
        assert_eq!(
            after(&argv, "-smbios"),
            ["type=1,serial=ds=nocloud;s=http://10.0.2.2:8000/"]
        );
        assert_eq!(after(&argv, "-netdev"), ["user,id=net0"]);
        assert!(
            after(&argv, "-chardev").contains(&"file,id=vbxexport,path=/i/.tmp-1/export,,1.tar")
        );
        assert!(!argv.iter().any(|a| a.contains("org.vibebox.guest")));
        assert!(argv.iter().any(|a| a.ends_with("name=org.vibebox.export")));
        assert_eq!(
            argv.iter()
                .filter(|a| *a == "virtio-serial-pci,id=vbxserial")
                .count(),
            1
        );

        spec.boot = Boot::Firmware { bios: None };
        let argv = strings(super::argv(&spec));
        assert!(after(&argv, "-bios").is_empty());
    }
}
