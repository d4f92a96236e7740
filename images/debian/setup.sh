#!/bin/sh
# setup.sh: turn a fresh Debian rootfs into a vibebox base image.
#
# Two modes, by the root device the image will boot from (kernel root=):
#
# raw (default, `vibebox image build`): runs INSIDE the chroot, once, after
# debootstrap/mmdebstrap (minbase + packages.txt). The builder copies, before
# running it:
#     images/guest/*          -> <rootfs>/usr/lib/vibebox/
#     images/debian/setup.sh  -> <rootfs>/usr/lib/vibebox/setup.sh
# and then runs:  chroot <rootfs> /bin/sh /usr/lib/vibebox/setup.sh
# No /proc, /sys or /dev mounts are needed. The root is raw ext4 on /dev/vda.
#
# partitioned (`vibebox image pull`, from images/pull/prepare.sh): runs in an
# official cloud image that is booted (firmware boot) for this, with
#     VIBEBOX_ROOT_DEVICE=/dev/vda1   (the root partition, ext4, the last one)
# Later boots are direct kernel boots with root=/dev/vda1: fstab has the root
# only (no /boot/efi), cloud-init's network configs are removed.
#
# Idempotent.
set -eu

G=/usr/lib/vibebox
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

say() {
    # With the uptime when there is a /proc (booted mode): where the time goes.
    if [ -r /proc/uptime ] && read -r _up _ < /proc/uptime 2>/dev/null; then
        printf 'setup.sh: [%s] %s\n' "$_up" "$*"
    else
        printf 'setup.sh: %s\n' "$*"
    fi
}

ROOT_DEV=${VIBEBOX_ROOT_DEVICE:-/dev/vda}
case $ROOT_DEV in
    /dev/[a-z]*) ;;
    *) say "error: VIBEBOX_ROOT_DEVICE must be a /dev path, not '$ROOT_DEV'" >&2; exit 1 ;;
esac

. /etc/os-release
CODENAME=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}

# --- vibebox guest files ------------------------------------------------------
say "installing guest files"
# systemctl --no-reload everywhere: in a booted cloud image each reload re-runs
# every generator (seconds under TCG); all of this is for the next boot.
chmod 0755 "$G/vibebox-init"
install -m 0644 "$G/vibebox-init.service" /etc/systemd/system/vibebox-init.service
install -m 0644 "$G/vibebox-mounts.service" /etc/systemd/system/vibebox-mounts.service
install -m 0644 "$G/vibebox-ready.service" /etc/systemd/system/vibebox-ready.service
install -m 0644 "$G/vibebox.sh" /etc/profile.d/vibebox.sh
install -m 0644 "$G/sshd_config.conf" /etc/ssh/sshd_config.d/10-vibebox.conf
# No login records in wtmpdb: sshd writes one for every terminal it opens (each
# `vibebox`, each task attach) as an SQLite transaction with its fsyncs, which
# under TCG cost 60-300 ms before the first byte reached the terminal (as much
# as the rest of `ssh -t true`). A directory in the database's place makes the
# write fail at once; sshd goes on silently. `last` in the VM shows nothing.
# Both paths: libwtmpdb before 0.73.0-3 (an older cloud image that `image pull`
# prepares) keeps it in /var/lib/wtmpdb, later ones link that to /var/log. What
# else writes or rotates the database is off, so no unit fails on a directory.
for db in /var/log/wtmp.db /var/lib/wtmpdb/wtmp.db; do
    if [ ! -d "$db" ] && [ ! -L "$db" ]; then
        rm -f "$db" "$db-journal"
        mkdir -p -m 0755 "$db"
    fi
done
rm -f /etc/logrotate.d/wtmpdb
systemctl --no-reload mask wtmpdb-update-boot.service wtmpdb-rotate.service wtmpdb-rotate.timer >/dev/null 2>&1 || true
# Also in non-login interactive bash shells (:help, :explain).
if ! grep -q 'profile.d/vibebox.sh' /etc/bash.bashrc; then
    printf '\n# vibebox commands (:help, :explain, ...)\n[ -r /etc/profile.d/vibebox.sh ] && . /etc/profile.d/vibebox.sh\n' \
        >> /etc/bash.bashrc
fi
# git settings vibebox-init makes each boot (core.checkStat for 9p shares).
git config --system include.path /run/vibebox/gitconfig
systemctl --no-reload enable vibebox-init.service vibebox-mounts.service vibebox-ready.service
# fw_cfg: loaded by the initramfs; 9p or virtiofs: by vibebox-init when it
# mounts a share (systemd-modules-load loading them took 5 s of a TCG boot).
rm -f /etc/modules-load.d/vibebox.conf
# The host client prints its own banner.
: > /etc/motd
rm -f /etc/update-motd.d/10-uname

# --- network: from the host's plan, set by vibebox-init ---------------------------
say "configuring network"
# vibebox-init configures the NIC from the fw_cfg entry "network" at the start of
# the boot (no DHCP round, no wait for udev) and writes /run/vibebox/resolv.conf.
# systemd-networkd and resolved stay installed, not started: vibebox-init starts
# them (DHCP) only for a host that passes no plan. The kernel's name for the NIC
# (eth0) is kept, so udev never renames an interface that is already up.
# Cloud images: cloud-init rendered the first boot's network for netplan or
# ifupdown. netplan's generated 10-netplan-*.network would win over ours.
rm -f /etc/netplan/*.yaml /etc/network/interfaces.d/50-cloud-init \
    /etc/network/interfaces.d/50-cloud-init.cfg
mkdir -p /etc/systemd/network
cat > /etc/systemd/network/20-vibebox.network <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
UseDomains=yes
EOF
ln -sf /dev/null /etc/systemd/network/99-default.link
for u in systemd-networkd.service systemd-networkd.socket \
        systemd-network-generator.service systemd-resolved.service; do
    systemctl --no-reload disable "$u" >/dev/null 2>&1 || true
done
# Nothing in the box should wait for "network online".
systemctl --no-reload disable systemd-networkd-wait-online.service 2>/dev/null || true
ln -sf ../run/vibebox/resolv.conf /etc/resolv.conf
# vibebox-init sets the real hostname (fw_cfg) and adds it to /etc/hosts.
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts
printf 'vibebox\n' > /etc/hostname

# --- sshd ------------------------------------------------------------------------
# Config is in /etc/ssh/sshd_config.d/10-vibebox.conf (installed above).
# Host keys are injected at every boot; never bake any into the image.
rm -f /etc/ssh/ssh_host_*
# ssh.socket would race vibebox-ready's port check; use the plain service.
systemctl --no-reload disable ssh.socket 2>/dev/null || true
systemctl --no-reload enable ssh.service
# sshd -t before every start re-reads the config and keys in a second sshd (an
# exec that costs ~0.5 s under TCG); sshd itself refuses a bad config the same way.
# sshd needs its host key (vibebox-init) and the journal, not the rest of
# sysinit.target/basic.target (udev's coldplug, tmpfiles, ...): it starts in
# parallel with them. Logins still wait for systemd-user-sessions, and the host
# for vibebox-ready, which is ordered after that.
mkdir -p /etc/systemd/system/ssh.service.d
cat > /etc/systemd/system/ssh.service.d/10-vibebox.conf <<'EOF'
[Unit]
DefaultDependencies=no
After=vibebox-init.service systemd-journald.socket local-fs.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStartPre=
EOF

# --- root filesystem ------------------------------------------------------------
# Raw ext4 on /dev/vda (no partition table), or the root partition of a cloud
# image (its ESP, /boot/efi, is not used by direct kernel boots). vibebox-init
# grows it (and the partition) online. No fsck pass: the initramfs mounted it
# rw already, and systemd-fsck-root would wait for udev to announce the disk
# (dev-vda.device, ~10 s into a TCG boot) only to skip itself.
if [ "$ROOT_DEV" = /dev/vda ]; then
    cat > /etc/fstab <<'EOF'
# vibebox: raw ext4 on the whole virtio disk; grown to the disk size at boot.
/dev/vda  /  ext4  rw,discard,errors=remount-ro  0  0
EOF
else
    cat > /etc/fstab <<EOF
# vibebox: ext4 on the last partition of the virtio disk (direct kernel boot,
# root=$ROOT_DEV); partition and file system grown to the disk size at boot.
$ROOT_DEV  /  ext4  rw,discard,errors=remount-ro  0  0
EOF
fi

# --- initramfs: only what direct kernel boot from /dev/vda(1) needs ----------------
say "configuring initramfs"
cat > /etc/initramfs-tools/conf.d/vibebox.conf <<'EOF'
# vibebox: the initramfs only has to find ext4 on a virtio disk.
MODULES=list
RESUME=none
# lz4: the kernel unpacks it several times faster than zstd, which counts
# under TCG; the modules in it are stored uncompressed (below).
COMPRESS=lz4
EOF
# No udev in the initramfs: the modules listed below are loaded explicitly and
# devtmpfs creates /dev/vda (and /dev/vda1: the kernel scans the partition
# table); udev's coldplug there costs seconds under TCG. (initramfs-tools'
# wait_for_udev is a no-op without udevadm.) Cloud images'
# cloud-initramfs-growroot would run growpart at every boot; vibebox-init
# grows the root partition online instead.
cat > /etc/initramfs-tools/hooks/zz-vibebox-no-udev <<'EOF'
#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
rm -f "$DESTDIR/scripts/init-top/udev" "$DESTDIR/scripts/init-bottom/udev" \
    "$DESTDIR/usr/bin/udevadm" "$DESTDIR/usr/lib/systemd/systemd-udevd"
rm -rf "$DESTDIR/usr/lib/udev" "$DESTDIR/etc/udev"
rm -f "$DESTDIR/scripts/local-bottom/growroot" "$DESTDIR/scripts/local-premount/growroot"
EOF
chmod 0755 /etc/initramfs-tools/hooks/zz-vibebox-no-udev
# Package hooks whose output the image does not use are diverted out of the
# hooks directory, so mkinitramfs does not run them at all: udev (removed
# again above), growroot (cloud-initramfs-growroot) and fsck (/ is mounted
# rw; ext4's journal covers unclean shutdowns). In a booted cloud image under
# TCG they took 75 of 133 s of each initramfs build.
mkdir -p "$G/initramfs-hooks-off"
for h in udev growroot fsck; do
    dpkg-divert --quiet --local --rename --divert "$G/initramfs-hooks-off/$h" \
        --add "/usr/share/initramfs-tools/hooks/$h"
done
# What udev's init-bottom script did: move the initramfs' /dev (devtmpfs) onto
# the root file system. Without it run-init needs a static /dev/console in the
# root fs (debootstrap makes one; cloud images have an empty /dev).
mkdir -p /etc/initramfs-tools/scripts/init-bottom
cat > /etc/initramfs-tools/scripts/init-bottom/vibebox-dev <<'EOF'
#!/bin/sh
case "$1" in prereqs) exit 0 ;; esac
[ -d "${rootmnt:?}/dev" ] || exit 0
mount -n -o move /dev "${rootmnt}/dev" || mount -n --move /dev "${rootmnt}/dev" || exit 0
# Later initramfs code may still use /dev: point it at the moved one.
rm -rf /dev 2>/dev/null
ln -s "${rootmnt}/dev" /dev
EOF
chmod 0755 /etc/initramfs-tools/scripts/init-bottom/vibebox-dev
cat > /etc/initramfs-tools/modules <<'EOF'
# vibebox: direct kernel boot with root=/dev/vda or /dev/vda1
virtio_pci
virtio_blk
virtio_mmio
ext4
crc32c_generic
# What vibebox-init needs before udev's coldplug: its NIC, its port to the
# host and the fw_cfg entries.
virtio_net
virtio_console
qemu_fw_cfg
EOF

# --- boot speed: nothing a throwaway VM needs -------------------------------------
# Under TCG every module load and every process costs; udev's coldplug would
# load drivers for emulated legacy hardware nobody uses.
say "blacklisting modules, masking units"
cat > /etc/modprobe.d/vibebox-blacklist.conf <<'EOF'
# vibebox: drivers a VM never needs (legacy PC devices, host virtualisation,
# wireless). Saves seconds of boot under TCG.
blacklist floppy
blacklist pcspkr
blacklist kvm
blacklist kvm_amd
blacklist kvm_intel
blacklist ccp
blacklist ata_piix
blacklist ata_generic
blacklist pata_acpi
blacklist i2c_piix4
blacklist serio_raw
blacklist cfg80211
blacklist rfkill
blacklist drm
blacklist bochs
blacklist vmw_vmci
blacklist vmw_vsock_vmci_transport
blacklist intel_rapl_msr
blacklist intel_rapl_common
blacklist powernow_k8
blacklist acpi_cpufreq
blacklist edac_mce_amd
blacklist sg
blacklist sr_mod
# q35's ICH9 LPC bridge is always there: its driver only adds the TCO watchdog.
blacklist lpc_ich
blacklist iTCO_wdt
blacklist iTCO_vendor_support
blacklist intel_pmc_bxt
blacklist i2c_i801
blacklist psmouse
EOF

# Debian ships every module xz-compressed, and the kernel decompresses a module
# at each load: under TCG that was most of vibebox-mounts (5.1 s of a boot for
# 9p's modules) and of the initramfs' module loads. The modules a box loads at
# boot (and when it mounts a share) are stored uncompressed instead; the rest
# (~4000, ~300 MiB uncompressed) stay as Debian ships them. Names missing on an
# architecture or built into its kernel are skipped.
say "decompressing the modules a box loads"
: > /tmp/vibebox-plain-modules
BOOT_MODULES="virtio_blk virtio_net virtio_console virtio_rng virtio_mmio virtio_pci
    qemu_fw_cfg ext4 crc32c crc32c_generic crc16 9p 9pnet_virtio virtiofs overlay
    vsock vmw_vsock_virtio_transport evdev button binfmt_misc autofs4 nfnetlink
    ip_tables x_tables efivarfs
    crc32c_intel crc32_pclmul crct10dif_pclmul ghash_clmulni_intel aesni_intel
    sha1_ssse3 sha256_ssse3 sha512_ssse3
    crct10dif_ce ghash_ce polyval_ce aes_ce_blk aes_ce_cipher aes_neon_blk
    sha1_ce sha2_ce sha3_ce sha512_ce sm3_ce sm4_ce sha256_arm64 sha512_arm64"
for kdir in /lib/modules/*/; do
    [ -r "${kdir}modules.dep" ] || continue
    kver=${kdir%/}
    kver=${kver##*/}
    for m in $BOOT_MODULES; do
        modprobe -S "$kver" --show-depends --ignore-install "$m" 2>/dev/null || true
    done | awk '$1 == "insmod" { print $2 }' | sort -u | while read -r ko; do
        case $ko in
            *.ko.xz) xz -d -f -- "$ko" ;;
            *.ko.zst) zstd -q -d -f --rm -- "$ko" ;;
            *.ko.gz) gzip -d -f -- "$ko" ;;
            *) continue ;;
        esac
        echo "$ko"
    done >> /tmp/vibebox-plain-modules
    depmod -a "$kver"
done
# dpkg is told what is on disk now: each decompressed module replaces its
# compressed name in its package's file list and checksums. Without this,
# `dpkg -V` reported the .ko.xz missing, and reinstalling the kernel package
# left both forms side by side (dpkg did not know the .ko was its file).
if [ -s /tmp/vibebox-plain-modules ]; then
    # A list names a module by /usr/lib/modules or by /lib/modules (before and
    # after the /usr merge), whichever modprobe printed: both are mapped.
    awk '{ p = $0; if (p ~ /^\/lib\//) q = "/usr" p; else if (p ~ /^\/usr\/lib\//) q = substr(p, 5); else q = p
           for (i = 0; i < 2; i++) { x = i ? q : p; y = x; sub(/\.(xz|zst|gz)$/, "", y); print x "\t" y } }' \
        /tmp/vibebox-plain-modules | sort -u > /tmp/vibebox-plain-map
    cut -f1 /tmp/vibebox-plain-map > /tmp/vibebox-plain-modules
    for list in /var/lib/dpkg/info/*.list; do
        grep -qF -f /tmp/vibebox-plain-modules "$list" 2>/dev/null || continue
        sums=${list%.list}.md5sums
        awk -F'\t' 'NR == FNR { to[$1] = $2; next } ($0 in to) { $0 = to[$0] } { print }' \
            /tmp/vibebox-plain-map "$list" > "$list.new" && mv "$list.new" "$list"
        [ -f "$sums" ] || continue
        while IFS="$(printf '\t')" read -r from to; do
            grep -qF "  ${from#/}" "$sums" || continue
            sum=$(md5sum < "$to" | cut -d' ' -f1)
            awk -v from="${from#/}" -v line="$sum  ${to#/}" \
                'substr($0, 35) == from { $0 = line } { print }' "$sums" > "$sums.new" &&
                mv "$sums.new" "$sums"
        done < /tmp/vibebox-plain-map
    done
fi
rm -f /tmp/vibebox-plain-modules /tmp/vibebox-plain-map
# The ssh generator probes AF_VSOCK (loads vsock/vmci) to offer sshd on vsock.
# The others are for hardware and set-ups a VM booted from its host's kernel
# never has (encrypted or verity disks, GPT auto-discovery, hibernation, boot
# counting, TPMs, a login prompt on a console); PID 1 runs every generator
# before it starts anything, each an exec of its own under TCG.
mkdir -p /etc/systemd/system-generators
for g in ssh bless-boot cryptsetup gpt-auto hibernate-resume integritysetup \
        veritysetup tpm2 getty system-update; do
    ln -sf /dev/null "/etc/systemd/system-generators/systemd-$g-generator"
done
# Keep the per-user manager once started (vibebox-ready starts it right after
# "ready"), so ssh logins do not wait for it.
mkdir -p /etc/systemd/logind.conf.d
printf '[Login]\nUserStopDelaySec=infinity\n' > /etc/systemd/logind.conf.d/vibebox.conf
systemctl --no-reload mask \
    apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service \
    dpkg-db-backup.timer dpkg-db-backup.service \
    e2scrub_all.timer e2scrub_all.service e2scrub_reap.service \
    man-db.timer man-db.service \
    getty@.service serial-getty@.service console-getty.service \
    systemd-firstboot.service sshd-keygen.service \
    systemd-pstore.service modprobe@drm.service \
    apparmor.service \
    dev-hugepages.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
    sys-fs-fuse-connections.mount sys-kernel-config.mount \
    modprobe@configfs.service modprobe@dm_mod.service modprobe@efi_pstore.service \
    modprobe@fuse.service modprobe@loop.service \
    systemd-udev-load-credentials.service \
    >/dev/null
# Not every unit exists in every release: masking a missing one is harmless.
# The mounts are kernel debugging and control file systems nothing in a box
# uses (a user can still mount them); the modprobe@ units load modules that load
# themselves when their device node (made by kmod-static-nodes) is opened. Each
# was a unit of ~2.7 s of the crowded start of a TCG boot.
# systemd-udev-load-credentials: udev rules passed as credentials, which vibebox
# never passes (1.9 s of a TCG boot).
# apparmor.service: cloud images have AppArmor (the kernel's Recommends), the
# built image does not; loading its profiles took 10 s per boot under TCG.

# kmod-static-nodes heads the chain to sysinit.target (and so to sshd's logins):
# at every boot it turns the kernel's modules.devname into device nodes that
# load their module when opened (/dev/fuse, /dev/loop-control, /dev/net/tun).
# A box always boots the image's own kernel, so that list is made here, once.
for kdir in /lib/modules/*/; do
    [ -r "${kdir}modules.devname" ] || continue
    awk '/^#/ || NF != 3 { next }
        { n = split($2, p, "/"); d = "/dev"
          for (i = 1; i < n; i++) { d = d "/" p[i]; if (!(d in seen)) { seen[d]; print "d " d " 0755 - - -" } }
          printf "%s! /dev/%s 0600 - - - %s\n", substr($3, 1, 1), $2, substr($3, 2) }' \
        "${kdir}modules.devname" > /etc/tmpfiles.d/vibebox-static-nodes.conf
    systemctl --no-reload mask kmod-static-nodes.service >/dev/null
done

systemctl --no-reload set-default multi-user.target

# --- locale, apt ------------------------------------------------------------------
printf 'LANG=C.UTF-8\n' > /etc/default/locale
printf 'LANG=C.UTF-8\n' > /etc/locale.conf
# No docs/man/locales in the image, now or from later installs in the box.
cat > /etc/dpkg/dpkg.cfg.d/vibebox-nodoc <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
EOF
find /usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find /usr/share/doc -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/lintian/*
find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true

rm -f /etc/apt/sources.list
cat > /etc/apt/sources.list.d/debian.sources <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $CODENAME $CODENAME-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $CODENAME-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# --- initramfs (after all config above) ------------------------------------------
say "rebuilding initramfs"
# essential-hook.sh (mmdebstrap builds) diverted update-initramfs to a no-op
# while the packages were installed: put it back and build each kernel's
# initramfs once here. Otherwise (debootstrap, a cloud image) one exists: update.
if [ -e /usr/sbin/update-initramfs.vibebox ]; then
    rm -f /usr/sbin/update-initramfs
    dpkg-divert --quiet --local --rename \
        --divert /usr/sbin/update-initramfs.vibebox --remove /usr/sbin/update-initramfs
    for kdir in /lib/modules/*/; do
        kver=${kdir%/}
        kver=${kver##*/}
        update-initramfs -c -k "$kver"
    done
else
    update-initramfs -u -k all
fi

# First-boot caches, done now rather than in every new VM (ldconfig.service,
# systemd-journal-catalog-update.service, systemd-update-done.service check
# ConditionNeedsUpdate against these stamps).
ldconfig
journalctl --update-catalog 2>/dev/null || true
touch /etc/.updated /var/.updated

# --- per-instance state: every overlay gets its own -----------------------------
say "cleaning"
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
: > /etc/machine-id                       # empty = generated at first boot
rm -f /var/lib/dbus/machine-id
ln -sf /etc/machine-id /var/lib/dbus/machine-id
rm -f /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
rm -rf /var/log/journal/* /tmp/* /var/tmp/*
find /var/log -type f -exec truncate -s 0 {} +
rm -f /etc/sudoers.d/vibebox /etc/ssh/sshd_config.d/05-vibebox-root.conf

say "done"
