//! Host facts that decide how QEMU runs: the accelerator and the binary.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::Accel;

/// The accelerator actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    Kvm,
    Hvf,
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Hvf => "hvf",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// What the host offers, probed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub macos_hv_support: bool,
    pub kvm_device_rw: bool,
    /// x86: the CPU advertises vmx or svm. Always true on other architectures, where
    /// a usable /dev/kvm is the whole story.
    pub cpu_virt_flags: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccelError {
    #[error("accel = \"{0}\" is not available on this host; use \"auto\" or \"tcg\"")]
    Unavailable(&'static str),
}

/// Picks the accelerator: what `VIBEBOX_ACCEL` or the config asks for, else `hvf`
/// on macOS with hypervisor support, `kvm` with a read-write /dev/kvm and (x86) the
/// virtualisation CPU flags, else `tcg`. The flag check matters: some nested
/// machines expose a /dev/kvm that hangs.
pub fn choose(wanted: Accel, probe: Probe) -> Result<Accelerator, AccelError> {
    let kvm = probe.kvm_device_rw && probe.cpu_virt_flags;
    match wanted {
        Accel::Tcg => Ok(Accelerator::Tcg),
        Accel::Kvm if kvm => Ok(Accelerator::Kvm),
        Accel::Kvm => Err(AccelError::Unavailable("kvm")),
        Accel::Hvf if probe.macos_hv_support => Ok(Accelerator::Hvf),
        Accel::Hvf => Err(AccelError::Unavailable("hvf")),
        Accel::Auto if probe.macos_hv_support => Ok(Accelerator::Hvf),
        Accel::Auto if kvm => Ok(Accelerator::Kvm),
        Accel::Auto => Ok(Accelerator::Tcg),
    }
}

impl Probe {
    pub fn detect() -> Probe {
        Probe {
            macos_hv_support: macos_hv_support(),
            kvm_device_rw: cfg!(target_os = "linux")
                && std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok(),
            cpu_virt_flags: cpu_virt_flags(),
        }
    }
}

fn macos_hv_support() -> bool {
    if !cfg!(target_os = "macos") {
        return false;
    }
    std::process::Command::new("sysctl")
        .args(["-n", "kern.hv_support"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "1")
}

fn cpu_virt_flags() -> bool {
    if !cfg!(target_arch = "x86_64") {
        return true;
    }
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| has_virt_flags(&c))
}

/// Whether a /proc/cpuinfo text shows vmx or svm in a `flags` line.
pub fn has_virt_flags(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The QEMU binary: `VIBEBOX_QEMU`, else `qemu-system-<arch>` on PATH.
pub fn qemu_binary(arch: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VIBEBOX_QEMU").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    which::which(format!("qemu-system-{arch}")).ok()
}

/// Whether this QEMU was built with seccomp (`-sandbox`): Linux builds usually
/// are, macOS ones are not. An unsupported `-sandbox` fails before `-version` is
/// reached, so this costs one short process.
pub fn qemu_sandbox(binary: &std::path::Path) -> bool {
    std::process::Command::new(binary)
        .args(["-sandbox", super::qemu::SANDBOX, "-version"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `PATH` without its relative and empty entries: those name directories relative
/// to wherever vibebox runs, often a project the guest can write, where a planted
/// `ssh` or `qemu-img` would run with the user's rights.
pub fn absolute_path_entries(path: &std::ffi::OsStr) -> std::ffi::OsString {
    let kept: Vec<PathBuf> = std::env::split_paths(path)
        .filter(|p| p.is_absolute())
        .collect();
    std::env::join_paths(kept).unwrap_or_default()
}

/// The oldest QEMU vibebox drives: 7.2 brought `-netdev stream` (the network
/// gateway) and is what Debian 12 ships.
pub const MIN_QEMU: (u32, u32) = (7, 2);

/// `(major, minor, patch)` from `qemu-system-* --version` output
/// ("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)").
pub fn parse_qemu_version(out: &str) -> Option<(u32, u32, u32)> {
    let rest = out.split("version ").nth(1)?;
    let word = rest.split_whitespace().next()?;
    let mut parts = word.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
    });
    let major = parts.next()?.ok()?;
    let minor = parts.next().and_then(Result::ok).unwrap_or(0);
    let patch = parts.next().and_then(Result::ok).unwrap_or(0);
    Some((major, minor, patch))
}

/// Runs `qemu --version` and refuses a QEMU older than [`MIN_QEMU`], in one line
/// that says what to do.
pub fn check_qemu(binary: &std::path::Path) -> Result<(u32, u32, u32), String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot start QEMU {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_qemu_version(&text).ok_or_else(|| {
        format!(
            "{} --version did not print a QEMU version; is it QEMU? (set VIBEBOX_QEMU to a qemu-system binary)",
            binary.display()
        )
    })?;
    if (version.0, version.1) < MIN_QEMU {
        return Err(format!(
            "QEMU {}.{}.{} at {} is too old: vibebox needs {}.{} or newer; install a newer QEMU or point VIBEBOX_QEMU at one",
            version.0,
            version.1,
            version.2,
            binary.display(),
            MIN_QEMU.0,
            MIN_QEMU.1
        ));
    }
    Ok(version)
}

/// The accelerator override from the environment, if set and valid.
pub fn env_accel() -> Option<Accel> {
    std::env::var("VIBEBOX_ACCEL")
        .ok()
        .and_then(|v| Accel::parse(v.trim()))
}

/// Makes the child get SIGTERM when the process that starts it dies (Linux; other
/// systems have no parent-death signal, and `lifetime`'s watchdog is what ends the
/// child there, and here too when this is turned off).
pub fn end_with_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    if !no_pdeathsig_for_test() {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Test-only (debug builds): `VIBEBOX_TEST_NO_PDEATHSIG=1` turns the parent-death
/// signal off, so a test on Linux sees what macOS gets: only the watchdog.
#[cfg(target_os = "linux")]
fn no_pdeathsig_for_test() -> bool {
    cfg!(debug_assertions)
        && std::env::var_os("VIBEBOX_TEST_NO_PDEATHSIG").is_some_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NESTED: Probe = Probe {
        macos_hv_support: false,
        kvm_device_rw: true,
        cpu_virt_flags: false,
    };

    #[test]
    fn relative_path_entries_are_dropped() {
        let p = absolute_path_entries(std::ffi::OsStr::new(".:bin::/usr/bin:/bin:./x"));
        assert_eq!(p, "/usr/bin:/bin");
    }

    #[test]
    fn auto_prefers_hardware_but_not_a_hanging_kvm() {
        let real = Probe {
            cpu_virt_flags: true,
            ..NESTED
        };
        assert_eq!(choose(Accel::Auto, real), Ok(Accelerator::Kvm));
        assert_eq!(choose(Accel::Auto, NESTED), Ok(Accelerator::Tcg));
        let mac = Probe {
            macos_hv_support: true,
            kvm_device_rw: false,
            cpu_virt_flags: true,
        };
        assert_eq!(choose(Accel::Auto, mac), Ok(Accelerator::Hvf));
        assert_eq!(choose(Accel::Tcg, real), Ok(Accelerator::Tcg));
        assert!(choose(Accel::Kvm, NESTED).is_err());
        assert!(choose(Accel::Hvf, real).is_err());
    }

    #[test]
    fn qemu_versions() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright"
            ),
            Some((7, 2, 19))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2"),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 9.1"),
            Some((9, 1, 0))
        );
        assert_eq!(parse_qemu_version("version 8.2.0-rc1"), Some((8, 2, 0)));
        assert_eq!(parse_qemu_version("hello"), None);
        assert!((6, 2) < MIN_QEMU && (7, 2) >= MIN_QEMU && (10, 0) >= MIN_QEMU);
    }

    #[test]
    fn cpu_flags() {
        assert!(has_virt_flags("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(has_virt_flags("flags : svm\n"));
        assert!(!has_virt_flags("flags : fpu vmxnet sse\nvmx\n"));
    }
}
