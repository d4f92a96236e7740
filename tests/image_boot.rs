//! A built base image boots under QEMU (TCG here) with a direct kernel boot, and
//! vibebox-init applies the fw_cfg entries: user, key, host key, hostname, shares.
//!
//! Needs a built image: `.ci/run` builds one into `VIBEBOX_TEST_IMAGES` (cached under
//! /var/tmp between runs). Without that variable the test says so and does nothing;
//! on CI (`CI` set) a missing image is a failure.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vibebox::image::store::{Image, Store};
use vibebox::paths::Home;
use vibebox::ssh;
use vibebox::vm::fwcfg::{FsType, GuestConfig, GuestMount};
use vibebox::vm::guest::GuestUser;
use vibebox::vm::host::Accelerator;
use vibebox::vm::mounts::Access;
use vibebox::vm::qemu::{self, Boot, Network, Preset, Share, ShareKind, Spec};
use vibebox::vm::ready;

fn test_image() -> Option<Image> {
    let dir = common::test_images()?;
    let home = Home::from_dir(dir.parent().unwrap().to_path_buf());
    let image = Store::new(&home)
        .find("default", std::env::consts::ARCH)
        .unwrap();
    assert!(
        image.is_some(),
        "no {} image in {}",
        std::env::consts::ARCH,
        dir.display()
    );
    image
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Vm {
    child: Child,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ssh(dir: &Path, port: u16, user: &str, script: &str) -> std::process::Output {
    Command::new("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(dir.join("id_ed25519"))
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            dir.join("known_hosts").display()
        ))
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-p"])
        .arg(port.to_string())
        .arg(format!("{user}@127.0.0.1"))
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn built_image_boots_and_applies_fw_cfg() {
    let Some(image) = test_image() else { return };
    let tmp = tempfile::Builder::new()
        .prefix("vbx-boot-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();

    let disk = dir.join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image.disk())
        .arg(&disk)
        .arg("6G")
        .status()
        .unwrap();
    assert!(st.success());

    let client = ssh::ensure_keypair(&dir.join("id_ed25519"), "client").unwrap();
    let host = ssh::ensure_keypair(&dir.join("host_ed25519"), "host").unwrap();
    let port = free_port();
    fs::write(
        dir.join("known_hosts"),
        ssh::known_hosts_line("127.0.0.1", port, &host.public_key().unwrap()),
    )
    .unwrap();

    let rw = dir.join("proj, with \"quotes\" and é");
    let ro = dir.join("read only");
    fs::create_dir_all(&rw).unwrap();
    fs::create_dir_all(&ro).unwrap();
    fs::write(ro.join("given.txt"), "from host").unwrap();

    let user = GuestUser::current();
    let cfg = GuestConfig {
        user: user.name.clone(),
        uid: user.uid,
        authorized_keys: client.public_key().unwrap(),
        host_key: fs::read_to_string(&host.private).unwrap(),
        host_key_pub: host.public_key().unwrap(),
        hostname: "vibebox-imgtest".into(),
        workdir: Some(rw.clone()),
        explain: "EXPLAIN-MARKER\n".into(),
        mounts: vec![
            GuestMount {
                fstype: FsType::NineP,
                tag: "vbx0".into(),
                access: Access::ReadWrite,
                guest_path: rw.clone(),
            },
            GuestMount {
                fstype: FsType::NineP,
                tag: "vbx1".into(),
                access: Access::ReadOnly,
                guest_path: "/mnt/ro share".into(),
            },
        ],
        git_overlays: Vec::new(),
        volumes: Default::default(),
    };
    let fw = cfg.write(&dir.join("fwcfg")).unwrap();
    let shares = [
        Share {
            tag: "vbx0".into(),
            host: rw.clone(),
            access: Access::ReadWrite,
            kind: ShareKind::NineP,
        },
        Share {
            tag: "vbx1".into(),
            host: ro.clone(),
            access: Access::ReadOnly,
            kind: ShareKind::NineP,
        },
    ];
    let preset = Preset::for_arch(std::env::consts::ARCH).unwrap();
    let console = dir.join("console.log");
    let spec = Spec {
        preset: &preset,
        accel: Accelerator::Tcg,
        sandbox: vibebox::vm::host::qemu_sandbox(std::path::Path::new(&preset.binary)),
        cpus: 2,
        memory_mb: 1024,
        boot: Boot::Kernel {
            kernel: &image.kernel(),
            initrd: &image.initrd(),
            cmdline: &image.manifest.kernel_cmdline,
        },
        disk: &disk,
        fw_cfg: &fw,
        console_log: &console,
        console_socket: None,
        ready_socket: Some(Path::new("ready.sock")),
        export_file: None,
        smbios_serial: None,
        qmp_socket: Path::new("qmp.sock"),
        network: Network::User { ssh_port: port },
        shares: &shares,
    };
    let child = Command::new(&preset.binary)
        .args(qemu::argv(&spec))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("qemu.stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut vm = Vm { child };
    let mut events = Vec::new();
    let waited = ready::wait(
        &dir.join("ready.sock"),
        Duration::from_secs(300),
        || vm.child.try_wait().ok().flatten().is_none(),
        |e| events.push(e.clone()),
    );
    let console_text = || fs::read_to_string(&console).unwrap_or_default();
    let r = waited.unwrap_or_else(|e| {
        panic!(
            "{e}\nqemu stderr: {}\nconsole:\n{}",
            fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default(),
            console_text()
        )
    });
    assert!(r.errors.is_empty(), "guest reported errors: {:?}", r.errors);
    assert!(
        events.iter().any(|e| matches!(e, ready::Event::Hello(_))),
        "{events:?}"
    );
    assert!(r.ipv4.is_some(), "{events:?}");

    // The injected host key is the one presented (StrictHostKeyChecking=yes against
    // a known_hosts holding only it), and the injected client key is accepted.
    let rw_q = rw.display().to_string().replace('\'', "'\\''");
    let script = format!(
        "set -e; hostname; id -un; id -u; \
         grep -c ' 9p ' /proc/mounts; \
         cd '{rw_q}' && echo from-guest > made-in-guest.txt; \
         cat '/mnt/ro share/given.txt'; echo; \
         if sudo touch '/mnt/ro share/nope' 2>/dev/null; then echo RO-WRITABLE; else echo RO-REFUSED; fi; \
         df -B1G --output=size / | tail -1; \
         cat /run/vibebox/explain; \
         test -s /etc/machine-id && cat /etc/machine-id"
    );
    let out = ssh(dir, port, &user.name, &script);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ssh failed: {}\n{stdout}\nconsole:\n{}",
        String::from_utf8_lossy(&out.stderr),
        console_text()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "vibebox-imgtest");
    assert_eq!(lines[1], user.name);
    assert_eq!(lines[2], user.uid.to_string());
    assert_eq!(lines[3], "2", "two 9p shares mounted");
    assert_eq!(lines[4], "from host");
    assert_eq!(lines[5], "RO-REFUSED", "read-only is enforced by the host");
    let size: u64 = lines[6].trim().trim_end_matches('G').parse().unwrap();
    assert!(
        size >= 5,
        "root filesystem grown to the overlay size: {size}G"
    );
    assert_eq!(lines[7], "EXPLAIN-MARKER");
    assert_eq!(lines[8].len(), 32, "machine-id: {}", lines[8]);
    assert_eq!(
        fs::read_to_string(rw.join("made-in-guest.txt")).unwrap(),
        "from-guest\n"
    );
    assert!(!ro.join("nope").exists());

    // The modules the image stores uncompressed are dpkg's files under their new
    // names: `dpkg -V` of the kernel finds nothing missing or changed, and its file
    // list names 9p's module as the plain `.ko` that is on disk.
    // (Before: `missing /usr/lib/modules/.../9p.ko.xz`, for every such module.)
    let out = ssh(
        dir,
        port,
        &user.name,
        "set -e; m=$(readlink -f \"$(modinfo -n 9p)\"); p=$(dpkg -S \"$m\" | cut -d: -f1); \
         echo \"$p\"; sudo dpkg -V \"$p\"; echo VERIFIED; echo \"$m\"",
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("linux-image-"), "{stdout}");
    // The image leaves out documentation (dpkg names it missing); nothing else.
    let verify = &lines[1..lines.len() - 2];
    assert!(
        verify.iter().all(|l| l.contains(" /usr/share/doc/")),
        "dpkg -V found differences: {stdout}"
    );
    assert_eq!(lines[lines.len() - 2], "VERIFIED", "{stdout}");
    assert!(lines[lines.len() - 1].ends_with("/9p.ko"), "{stdout}");

    // A wrong host key must be refused: the pin is real.
    let other = ssh::ensure_keypair(&dir.join("other_host"), "other").unwrap();
    fs::write(
        dir.join("known_hosts"),
        ssh::known_hosts_line("127.0.0.1", port, &other.public_key().unwrap()),
    )
    .unwrap();
    let out = ssh(dir, port, &user.name, "true");
    assert!(
        !out.status.success(),
        "ssh must refuse an unpinned host key"
    );
}
