//! Who owns what the guest writes through a share. Run as a user, the share server
//! (each virtiofsd, or QEMU for 9p) has only that user's rights, so the kernel
//! already keeps every file the user's. Run as root (as on CI), the server could
//! create anything the guest asks for: set-uid root binaries, files of any owner,
//! device nodes. Two layers stop that:
//!
//! - a seccomp filter installed in the server before it starts (stacked under
//!   QEMU's and virtiofsd's own), which makes the kernel refuse (EPERM) a mode
//!   with a set-uid or set-gid bit, a character or block device node, an owner or
//!   group other than the share's own, a switch to any other identity, and every
//!   extended attribute (`security.capability` would be a set-uid in disguise).
//!   `openat2` answers ENOSYS, since its mode sits in a struct the filter cannot
//!   read; virtiofsd then falls back to `openat`.
//! - virtiofsd maps every guest uid and gid to the share owner's
//!   (`--translate-uid squash-guest`), so a file the guest makes, or gives to
//!   anyone, is the owner's; and it runs without CAP_MKNOD.
//!
//! QEMU's 9p server creates files as itself (root) and then tries to give them to
//! the guest's uid, which the filter refuses (9p ignores that failure in
//! `security_model=none`), so files are root's: a read-write 9p share is served as
//! root only when root owns it (see `launch`).
//!
//! FIFOs and sockets are allowed: they give no privilege (a FIFO can make a host
//! program that opens it wait, which any file the guest writes can do too).
//!
//! Why this and not the alternatives (virtiofsd 1.14 read, the attacks run on VMs):
//! virtiofsd's uid translation alone leaves set-uid bits, and device nodes when the
//! owner is root (its threads then keep their capabilities); a user namespace for
//! the server (`--uid-map`) maps root to root when the owner is root, so it stops
//! neither; 9p's `security_model=mapped-xattr` stores modes in xattrs and leaves
//! every host file 0600 and QEMU's. The filter holds for both servers, whatever
//! their own code does with the guest's request, and costs nothing measurable: 186
//! BPF instructions, about 30 run for an unfiltered call; 300k `fchmod` calls timed
//! the same with and without it (within this busy machine's noise, ~1 µs each).

use std::process::Command;

use serde::Serialize;

/// Which ownership rules are in force, decided by who runs vibebox; the explain
/// text and the launch use the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Model {
    /// The share server runs as the user: the kernel keeps every file theirs.
    User,
    /// Linux, as root: the seccomp filter and virtiofsd's uid/gid translation.
    RootConfined,
    /// As root where no filter can be installed (macOS): read-write shares are
    /// refused.
    RootUnconfined,
}

impl Model {
    pub fn detect() -> Model {
        if !nix::unistd::geteuid().is_root() {
            Model::User
        } else if cfg!(target_os = "linux") {
            Model::RootConfined
        } else {
            Model::RootUnconfined
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Model::User => {
                "yours: the share server runs as you, so every file the VM writes is yours (set-uid bits it sets are set-uid to you)"
            }
            Model::RootConfined => {
                "yours although vibebox runs as root: every file the VM writes belongs to the owner of the shared directory; set-uid and set-gid bits, device nodes, other owners and extended attributes are refused on the host"
            }
            Model::RootUnconfined => {
                "NOT confined: vibebox runs as root and this host cannot restrict the share server, so read-write shares are refused"
            }
        }
    }
}

/// The owner and group a share's files may have when the server runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// virtiofsd's options that give everything the guest creates, or chowns, to
/// `owner`, and drop its power to make device nodes.
pub fn virtiofsd_args(owner: Owner) -> Vec<String> {
    vec![
        "--translate-uid".into(),
        format!("squash-guest:0:{}:4294967295", owner.uid),
        "--translate-gid".into(),
        format!("squash-guest:0:{}:4294967295", owner.gid),
        "--modcaps=-mknod".into(),
    ]
}

/// A seccomp filter for a share server run as root, allowing only `owners` (and
/// the server's own identity, for switching back) as file owners.
#[derive(Debug, Clone)]
pub struct Filter {
    program: Vec<bpf::Insn>,
}

impl Filter {
    pub fn new(owners: &[Owner]) -> Filter {
        let me = Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        Filter {
            program: bpf::program(owners, me),
        }
    }

    /// Makes `cmd` run under the filter. Call it after every other `pre_exec`
    /// (namespaces and mounts first: the filter does not forbid them, but nothing
    /// should run after it but the exec).
    pub fn confine(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let program = self.program.clone();
        // SAFETY: the closure only makes two system calls on data prepared here.
        unsafe {
            cmd.pre_exec(move || install(&program));
        }
    }
}

#[cfg(target_os = "linux")]
fn install(program: &[bpf::Insn]) -> std::io::Result<()> {
    use nix::libc;
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls; `prog` points at a live, well-formed program.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn install(_program: &[bpf::Insn]) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Seccomp is Linux's: elsewhere there is no program, and `install` refuses, so a
/// share server meant to run confined does not start at all.
#[cfg(not(target_os = "linux"))]
mod bpf {
    pub type Insn = ();
    pub fn program(_owners: &[super::Owner], _me: super::Owner) -> Vec<Insn> {
        Vec::new()
    }
}

/// A classic BPF program for seccomp, built by hand (a few dozen instructions; no
/// dependency).
#[cfg(target_os = "linux")]
mod bpf {
    use super::Owner;

    /// `struct sock_filter`, laid out as the kernel reads it.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Insn {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }

    /// BPF_LD | BPF_W | BPF_ABS (the first two are 0).
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x05 | 0x10;
    const JGE_K: u16 = 0x05 | 0x30;
    const JSET_K: u16 = 0x05 | 0x40;
    const AND_K: u16 = 0x04 | 0x50;
    const RET_K: u16 = 0x06;

    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;

    const EPERM: u32 = 1;
    const ENOSYS: u32 = 38;
    const EOPNOTSUPP: u32 = 95;

    const S_ISUID_GID: u32 = 0o6000;
    const S_IFMT: u32 = 0o170000;
    const S_IFCHR: u32 = 0o020000;
    const S_IFBLK: u32 = 0o060000;
    const O_CREAT: u32 = 0o100;
    const O_TMPFILE_BIT: u32 = 0o20000000;

    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const ARCH: u32 = 0;

    /// Syscall numbers not every libc names yet (the same on x86_64 and aarch64).
    const SYS_OPENAT2: i64 = 437;
    const SYS_FCHMODAT2: i64 = 452;
    const SYS_SETXATTRAT: i64 = 463;

    fn stmt(code: u16, k: u32) -> Insn {
        Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }

    fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
        Insn { code, jt, jf, k }
    }

    /// The low 32 bits of argument `n` (uids, modes and flags are 32-bit; the
    /// kernel ignores the rest).
    fn arg(n: u32) -> Insn {
        let low = if cfg!(target_endian = "little") { 0 } else { 4 };
        stmt(LD_W_ABS, 16 + 8 * n + low)
    }

    fn ret(k: u32) -> Insn {
        stmt(RET_K, k)
    }

    fn errno(e: u32) -> Insn {
        ret(RET_ERRNO | e)
    }

    /// EPERM when argument `n` has any of `bits`.
    fn deny_bits(n: u32, bits: u32) -> Vec<Insn> {
        vec![
            arg(n),
            jump(JSET_K, bits, 0, 1),
            errno(EPERM),
            ret(RET_ALLOW),
        ]
    }

    /// EPERM when the open flags (argument `flags`) create a file and its mode
    /// (argument `mode`, garbage otherwise) has a set-id bit.
    fn deny_create_bits(flags: u32, mode: u32) -> Vec<Insn> {
        vec![
            arg(flags),
            jump(JSET_K, O_CREAT | O_TMPFILE_BIT, 0, 3),
            arg(mode),
            jump(JSET_K, S_ISUID_GID, 0, 1),
            errno(EPERM),
            ret(RET_ALLOW),
        ]
    }

    /// EPERM for a character or block device, or a set-id mode, in argument `n`.
    fn deny_devices(n: u32) -> Vec<Insn> {
        vec![
            arg(n),
            stmt(AND_K, S_IFMT),
            jump(JEQ_K, S_IFCHR, 3, 0),
            jump(JEQ_K, S_IFBLK, 2, 0),
            arg(n),
            jump(JSET_K, S_ISUID_GID, 0, 1),
            errno(EPERM),
            ret(RET_ALLOW),
        ]
    }

    /// EPERM unless each listed argument is -1 (unchanged) or one of its allowed ids.
    fn only_ids(checks: &[(u32, &[u32])]) -> Vec<Insn> {
        let mut out = Vec::new();
        for (n, allowed) in checks {
            let ids: Vec<u32> = std::iter::once(u32::MAX)
                .chain(allowed.iter().copied())
                .collect();
            out.push(arg(*n));
            let size = ids.len() + 1;
            for (i, id) in ids.iter().enumerate() {
                // To the start of the next argument's check, past the EPERM.
                out.push(jump(JEQ_K, *id, (size - i - 1) as u8, 0));
            }
            out.push(errno(EPERM));
        }
        out.push(ret(RET_ALLOW));
        out
    }

    fn dedup(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The rules, per syscall.
    fn rules(owners: &[Owner], me: Owner) -> Vec<(i64, Vec<Insn>)> {
        use nix::libc;
        let uids = dedup(owners.iter().map(|o| o.uid).collect());
        let gids = dedup(owners.iter().map(|o| o.gid).collect());
        let self_uids = dedup(uids.iter().copied().chain([me.uid]).collect());
        let self_gids = dedup(gids.iter().copied().chain([me.gid]).collect());
        let (u, g, su, sg) = (&uids[..], &gids[..], &self_uids[..], &self_gids[..]);
        let mut r: Vec<(i64, Vec<Insn>)> = vec![
            (libc::SYS_fchmod, deny_bits(1, S_ISUID_GID)),
            (libc::SYS_fchmodat, deny_bits(2, S_ISUID_GID)),
            (SYS_FCHMODAT2, deny_bits(2, S_ISUID_GID)),
            (libc::SYS_openat, deny_create_bits(2, 3)),
            (SYS_OPENAT2, vec![errno(ENOSYS)]),
            (libc::SYS_mknodat, deny_devices(2)),
            (libc::SYS_fchown, only_ids(&[(1, u), (2, g)])),
            (libc::SYS_fchownat, only_ids(&[(2, u), (3, g)])),
            (libc::SYS_setuid, only_ids(&[(0, su)])),
            (libc::SYS_setgid, only_ids(&[(0, sg)])),
            (libc::SYS_setreuid, only_ids(&[(0, su), (1, su)])),
            (libc::SYS_setregid, only_ids(&[(0, sg), (1, sg)])),
            (libc::SYS_setresuid, only_ids(&[(0, su), (1, su), (2, su)])),
            (libc::SYS_setresgid, only_ids(&[(0, sg), (1, sg), (2, sg)])),
            (libc::SYS_setfsuid, only_ids(&[(0, su)])),
            (libc::SYS_setfsgid, only_ids(&[(0, sg)])),
            (libc::SYS_setxattr, vec![errno(EOPNOTSUPP)]),
            (libc::SYS_lsetxattr, vec![errno(EOPNOTSUPP)]),
            (libc::SYS_fsetxattr, vec![errno(EOPNOTSUPP)]),
            (SYS_SETXATTRAT, vec![errno(EOPNOTSUPP)]),
        ];
        #[cfg(target_arch = "x86_64")]
        r.extend([
            (libc::SYS_chmod, deny_bits(1, S_ISUID_GID)),
            (libc::SYS_open, deny_create_bits(1, 2)),
            (libc::SYS_creat, deny_bits(1, S_ISUID_GID)),
            (libc::SYS_mknod, deny_devices(1)),
            (libc::SYS_chown, only_ids(&[(1, u), (2, g)])),
            (libc::SYS_lchown, only_ids(&[(1, u), (2, g)])),
        ]);
        r
    }

    pub fn program(owners: &[Owner], me: Owner) -> Vec<Insn> {
        let mut p = vec![
            stmt(LD_W_ABS, 4),
            jump(JEQ_K, ARCH, 1, 0),
            errno(ENOSYS),
            stmt(LD_W_ABS, 0),
        ];
        if cfg!(target_arch = "x86_64") {
            // The x32 ABI's numbers would bypass every rule below.
            p.push(jump(JGE_K, 0x4000_0000, 0, 1));
            p.push(errno(ENOSYS));
        }
        for (nr, block) in rules(owners, me) {
            assert!(block.len() < 256, "a rule too long for a BPF jump");
            p.push(jump(JEQ_K, nr as u32, 0, block.len() as u8));
            p.extend(block);
        }
        p.push(ret(RET_ALLOW));
        p
    }

    /// Runs `program` on one system call, as the kernel would: the test's check
    /// that the jumps land where they should.
    #[cfg(test)]
    pub fn run(program: &[Insn], nr: i64, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_ne_bytes());
        data[4..8].copy_from_slice(&ARCH.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = program[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => {
                    let k = i.k as usize;
                    a = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                AND_K => a &= i.k,
                RET_K => return i.k,
                JEQ_K | JGE_K | JSET_K => {
                    let taken = match i.code {
                        JEQ_K => a == i.k,
                        JGE_K => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c => panic!("unknown instruction {c:#x}"),
            }
        }
    }

    #[cfg(test)]
    pub use self::consts::*;
    #[cfg(test)]
    mod consts {
        pub const ALLOW: u32 = super::RET_ALLOW;
        pub const DENY: u32 = super::RET_ERRNO | super::EPERM;
        pub const NOSYS: u32 = super::RET_ERRNO | super::ENOSYS;
        pub const NOTSUP: u32 = super::RET_ERRNO | super::EOPNOTSUPP;
        pub const OPENAT2: i64 = super::SYS_OPENAT2;
        pub const FCHMODAT2: i64 = super::SYS_FCHMODAT2;
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::bpf::{self, ALLOW, DENY, FCHMODAT2, NOSYS, NOTSUP, OPENAT2};
    use super::*;
    use nix::libc;

    const OWNER: Owner = Owner {
        uid: 1000,
        gid: 1000,
    };
    const ROOT: Owner = Owner { uid: 0, gid: 0 };

    fn verdict(nr: i64, args: &[u64]) -> u32 {
        let program = bpf::program(&[OWNER], ROOT);
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        bpf::run(&program, nr, a)
    }

    #[test]
    fn set_id_modes_are_refused_and_plain_ones_pass() {
        for mode in [0o4755, 0o2755, 0o6777, 0o104755] {
            assert_eq!(verdict(libc::SYS_fchmod, &[3, mode]), DENY, "{mode:o}");
            assert_eq!(verdict(libc::SYS_fchmodat, &[3, 0, mode]), DENY);
            assert_eq!(verdict(FCHMODAT2, &[3, 0, mode, 0]), DENY);
        }
        for mode in [0o755, 0o1777, 0o644, 0] {
            assert_eq!(verdict(libc::SYS_fchmod, &[3, mode]), ALLOW, "{mode:o}");
            assert_eq!(verdict(libc::SYS_fchmodat, &[3, 0, mode]), ALLOW);
        }
        // Only the low 32 bits count, as for the kernel.
        assert_eq!(
            verdict(libc::SYS_fchmod, &[3, 0x1_0000_0000 | 0o644]),
            ALLOW
        );
    }

    #[test]
    fn creating_with_set_id_modes_is_refused_and_opening_is_not() {
        let creat = libc::O_CREAT as u64 | libc::O_WRONLY as u64;
        assert_eq!(verdict(libc::SYS_openat, &[3, 0, creat, 0o4755]), DENY);
        assert_eq!(verdict(libc::SYS_openat, &[3, 0, creat, 0o644]), ALLOW);
        let tmpfile = libc::O_TMPFILE as u64 | libc::O_RDWR as u64;
        assert_eq!(verdict(libc::SYS_openat, &[3, 0, tmpfile, 0o2700]), DENY);
        // Without O_CREAT the mode register is garbage and must not matter.
        assert_eq!(
            verdict(libc::SYS_openat, &[3, 0, libc::O_RDONLY as u64, 0o6777]),
            ALLOW
        );
        assert_eq!(verdict(OPENAT2, &[3, 0, 0, 24]), NOSYS);
    }

    #[test]
    fn device_nodes_are_refused_fifos_and_files_are_not() {
        let chr = (libc::S_IFCHR | 0o644) as u64;
        let blk = (libc::S_IFBLK | 0o644) as u64;
        assert_eq!(verdict(libc::SYS_mknodat, &[3, 0, chr, 0x103]), DENY);
        assert_eq!(verdict(libc::SYS_mknodat, &[3, 0, blk, 0x700]), DENY);
        assert_eq!(verdict(libc::SYS_mknodat, &[3, 0, chr, 0]), DENY);
        let fifo = (libc::S_IFIFO | 0o644) as u64;
        let sock = (libc::S_IFSOCK | 0o644) as u64;
        let reg = (libc::S_IFREG | 0o644) as u64;
        assert_eq!(verdict(libc::SYS_mknodat, &[3, 0, fifo, 0]), ALLOW);
        assert_eq!(verdict(libc::SYS_mknodat, &[3, 0, sock, 0]), ALLOW);
        assert_eq!(verdict(libc::SYS_mknodat, &[3, 0, reg, 0]), ALLOW);
        let suid = (libc::S_IFREG | 0o4755) as u64;
        assert_eq!(verdict(libc::SYS_mknodat, &[3, 0, suid, 0]), DENY);
    }

    #[test]
    fn owners_other_than_the_share_owner_are_refused() {
        let keep = u32::MAX as u64;
        let ok = [(1000, 1000), (keep, 1000), (1000, keep), (keep, keep)];
        for (u, g) in ok {
            assert_eq!(verdict(libc::SYS_fchownat, &[3, 0, u, g, 0]), ALLOW);
            assert_eq!(verdict(libc::SYS_fchown, &[3, u, g]), ALLOW);
        }
        for (u, g) in [(0, 1000), (1001, keep), (keep, 0), (1000, 1001)] {
            assert_eq!(
                verdict(libc::SYS_fchownat, &[3, 0, u, g, 0]),
                DENY,
                "{u} {g}"
            );
            assert_eq!(verdict(libc::SYS_fchown, &[3, u, g]), DENY, "{u} {g}");
        }
        // The server may become the owner and switch back to itself, nobody else.
        assert_eq!(verdict(libc::SYS_setresuid, &[keep, 1000, keep]), ALLOW);
        assert_eq!(verdict(libc::SYS_setresuid, &[keep, 0, keep]), ALLOW);
        assert_eq!(verdict(libc::SYS_setresuid, &[keep, 1001, keep]), DENY);
        assert_eq!(verdict(libc::SYS_setresgid, &[keep, 5, keep]), DENY);
        assert_eq!(verdict(libc::SYS_setfsuid, &[1001]), DENY);
    }

    #[test]
    fn extended_attributes_are_unsupported_and_the_rest_passes() {
        assert_eq!(verdict(libc::SYS_fsetxattr, &[3, 0, 0, 20, 0]), NOTSUP);
        assert_eq!(verdict(libc::SYS_lsetxattr, &[3, 0, 0, 20, 0]), NOTSUP);
        assert_eq!(verdict(libc::SYS_read, &[3, 0, 10]), ALLOW);
        assert_eq!(verdict(libc::SYS_write, &[3, 0, 0o4755]), ALLOW);
        assert_eq!(verdict(libc::SYS_mkdirat, &[3, 0, 0o2755]), ALLOW);
    }

    /// The real thing: a process under the filter (as root) tries what a guest
    /// would ask a share server for.
    #[test]
    fn a_filtered_process_cannot_make_set_id_files_devices_or_other_owners() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if !cfg!(target_os = "linux") || !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root on Linux");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::write(d.join("f"), "x").unwrap();
        let mut cmd = Command::new("sh");
        cmd.current_dir(d).arg("-c").arg(
            "chmod 4755 f; chmod 2755 f; chown 1001 f; mknod null c 1 3; mkfifo fifo; \
             install -m 4755 f suid; chown 0:0 f && echo chowned; chmod 700 f && echo chmodded",
        );
        Filter::new(&[ROOT]).confine(&mut cmd);
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout, "chowned\nchmodded\n", "{out:?}");
        let f = std::fs::metadata(d.join("f")).unwrap();
        assert_eq!((f.mode() & 0o7777, f.uid()), (0o700, 0));
        assert!(!d.join("null").exists());
        assert!(
            std::fs::metadata(d.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        if let Ok(m) = std::fs::metadata(d.join("suid")) {
            assert_eq!(m.mode() & 0o6000, 0);
        }
    }

    #[test]
    fn virtiofsd_squashes_every_guest_id_to_the_owner() {
        assert_eq!(
            virtiofsd_args(Owner { uid: 7, gid: 8 }).join(" "),
            "--translate-uid squash-guest:0:7:4294967295 --translate-gid squash-guest:0:8:4294967295 --modcaps=-mknod"
        );
    }
}
