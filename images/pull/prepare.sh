#!/bin/sh
# prepare.sh: turn a booted official Debian cloud image into a vibebox base
# image, once, at `vibebox image pull`.
#
# The host boots the downloaded image (firmware boot) with a NoCloud seed over
# HTTP whose user-data writes images/guest/*, images/debian/setup.sh,
# images/debian/packages.txt and this script to /usr/lib/vibebox/ and runs
#     runcmd: [[sh, /usr/lib/vibebox/prepare.sh]]
# This script detaches from cloud-init (a transient unit vibebox-prepare,
# ordered after cloud-final.service: cloud-init finishes its boot undisturbed
# and the masking below cannot hit a running cloud-init unit), then
#   1. installs what packages.txt lists and the image lacks (best effort: no
#      network access at all when nothing is missing; offline -> "missing=")
#   2. disables cloud-init for good (cloud-init.disabled, units and generator
#      masked), removes its state, network configs and any default user
#   3. purges boot loaders (grub, shim, systemd-boot): later boots are direct
#      kernel boots; a kernel upgrade in a box must not try to install them
#   4. runs setup.sh with VIBEBOX_ROOT_DEVICE=<root partition> (fstab with
#      the root only, initramfs for root=/dev/vda1 without udev, ...)
#   5. writes an uncompressed ustar archive to the virtio-serial port
#      org.vibebox.export:  vmlinuz, initrd.img, then prepare.info
#         root=/dev/vda1          root device for the kernel command line
#         rootfstype=ext4
#         kernel=<version>
#         missing=<packages>      could not be installed (space-separated)
#         result=ok
#      On failure: only prepare.info with "result=error <message>".
#   6. syncs and powers off (forced: no service stop actions that would write
#      per-instance state, e.g. a random seed, back into the base image)
# Progress and errors go to the console (the host keeps console.log).
set -u
umask 022

G=/usr/lib/vibebox
EXPORT_PORT=org.vibebox.export
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Everything (apt, setup.sh, update-initramfs) goes to the serial console.
if { true >/dev/console; } 2>/dev/null; then exec >/dev/console 2>&1; fi

log() {
    read -r _up _ < /proc/uptime 2>/dev/null || _up=?
    printf 'vibebox-prepare: [%s] %s\n' "$_up" "$*"
}

if [ "${1:-}" != --detached ]; then
    # From cloud-init's runcmd: start the real work as its own unit and return.
    if systemd-run --no-block --collect --unit=vibebox-prepare \
            --description='vibebox: prepare the pulled image' \
            --property=After=cloud-final.service \
            /bin/sh "$G/prepare.sh" --detached; then
        log "started as vibebox-prepare.service (after cloud-final.service)"
        exit 0
    fi
    log "warning: systemd-run failed; preparing inside cloud-init"
fi
T0=$(cut -d' ' -f1 /proc/uptime)

WORK=$(mktemp -d /run/vibebox-prepare.XXXXXX) || WORK=/run/vibebox-prepare.$$
mkdir -p "$WORK"

PORT_DEV=
find_port() {
    for n in /sys/class/virtio-ports/*/name; do
        [ -r "$n" ] || continue
        name=
        read -r name < "$n" || true
        if [ "$name" = "$EXPORT_PORT" ]; then
            d=${n%/name}
            PORT_DEV=/dev/${d##*/}
            [ -c "$PORT_DEV" ] && return 0
        fi
    done
    return 1
}

power_off() {
    # Anything written to the image after setup.sh's cleaning would be baked
    # into every box: the journal of this boot, systemd's random seed.
    rm -rf /var/log/journal/* /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
    sync
    log "powering off ($(cut -d' ' -f1 /proc/uptime)s since boot)"
    # --force: no service stop actions, but processes are killed and file
    # systems unmounted / remounted read-only before the power-off.
    systemctl poweroff --force 2>/dev/null || poweroff -f 2>/dev/null ||
        { sync; echo o > /proc/sysrq-trigger; }
    # Do not return (into cloud-init, when not detached) while powering off.
    sleep 600
    exit 0
}

# send_tar FILE...: the archive to the host (members in the given order).
send_tar() {
    if [ -z "$PORT_DEV" ] && ! find_port; then
        log "error: no virtio-serial port named $EXPORT_PORT; nothing sent"
        return 1
    fi
    tar --format=ustar --dereference --owner=0 --group=0 --numeric-owner \
        -C "$WORK" -cf - "$@" > "$PORT_DEV"
}

die() {
    msg=$(printf '%s' "$*" | tr '\r\n\t' '   ')
    log "error: $msg"
    printf 'result=error %s\n' "$msg" > "$WORK/prepare.info"
    rm -f "$WORK/vmlinuz" "$WORK/initrd.img"
    send_tar prepare.info || log "error: could not send the error report"
    power_off
}

[ "$(id -u)" = 0 ] || die "prepare.sh must run as root"
for f in setup.sh packages.txt vibebox-init; do
    [ -r "$G/$f" ] || die "$G/$f is missing (user-data write_files)"
done
find_port || log "warning: no virtio-serial port named $EXPORT_PORT (yet)"
log "started; $(. /etc/os-release && printf '%s' "$PRETTY_NAME"), kernel $(uname -r)"

# --- root device ------------------------------------------------------------
ROOT_DEV=$(findmnt -n -o SOURCE /) || die "findmnt / failed"
ROOT_FSTYPE=$(findmnt -n -o FSTYPE /) || die "findmnt / failed"
case $ROOT_DEV in /dev/*) ROOT_DEV=$(readlink -f "$ROOT_DEV") ;; esac
[ -b "$ROOT_DEV" ] || die "the root file system is not on a block device ($ROOT_DEV)"
[ "$ROOT_FSTYPE" = ext4 ] || die "the root file system is $ROOT_FSTYPE, not ext4"
case ${ROOT_DEV#/dev/} in
    *[!a-z0-9]*|'') die "unexpected root device name $ROOT_DEV" ;;
esac
log "root: $ROOT_DEV ($ROOT_FSTYPE)"

# --- packages ----------------------------------------------------------------
ARCH=$(dpkg --print-architecture) || die "dpkg --print-architecture failed"
WANT=$(sed 's/#.*//' "$G/packages.txt" | tr -s ' \t\r\n' '\n' | grep -v '^$' |
    sed "s/\${ARCH}/$ARCH/g")
[ -n "$WANT" ] || die "no packages in $G/packages.txt"

not_installed() {
    for p in $WANT; do
        case $(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null) in
            ii*) ;;
            *) printf '%s\n' "$p" ;;
        esac
    done
}

MISSING=$(not_installed | paste -sd' ' -)
if [ -n "$MISSING" ]; then
    log "installing: $MISSING"
    APT_OPTS="-q -y --no-install-recommends -o Acquire::Retries=1 -o Acquire::http::Timeout=30"
    APT_OPTS="$APT_OPTS -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confold"
    # shellcheck disable=SC2086
    if apt-get $APT_OPTS update; then
        # shellcheck disable=SC2086
        if ! apt-get $APT_OPTS install $MISSING; then
            log "warning: installing them together failed; trying one by one"
            for p in $MISSING; do
                # shellcheck disable=SC2086
                apt-get $APT_OPTS install "$p" || log "warning: cannot install $p"
            done
        fi
    else
        log "warning: apt-get update failed (offline?); not installing"
    fi
    MISSING=$(not_installed | paste -sd' ' -)
    [ -z "$MISSING" ] || log "warning: still missing: $MISSING"
else
    log "all packages of packages.txt are installed"
fi

# --- cloud-init: never again ---------------------------------------------------
log "disabling cloud-init"
mkdir -p /etc/cloud /etc/systemd/system-generators
: > /etc/cloud/cloud-init.disabled
# The generator is what enables cloud-init.target at every boot; mask it and
# the units (saves its run and the units' condition checks under TCG).
ln -sf /dev/null /etc/systemd/system-generators/cloud-init-generator
units=$(systemctl list-unit-files --no-legend --no-pager 'cloud-init*' 'cloud-config*' 'cloud-final*' \
    2>/dev/null | awk '$2 != "masked" && $2 != "alias" { print $1 }')
# shellcheck disable=SC2086
[ -z "$units" ] || systemctl --no-reload mask $units >/dev/null 2>&1 ||
    log "warning: could not mask $units"
# Default user(s) of cloud.cfg (Debian: "debian"); user-data "users: []"
# keeps cloud-init from creating it, this catches images that have it anyway.
for u in debian $(sed -n '/^ *default_user:/,/^[^ ]/s/^ *name: *\([a-z_][a-z0-9_-]*\) *$/\1/p' \
        /etc/cloud/cloud.cfg 2>/dev/null); do
    uid=$(id -u "$u" 2>/dev/null) || continue
    [ "$uid" -ge 1000 ] || continue
    log "removing the default user $u (uid $uid)"
    pkill -KILL -u "$u" 2>/dev/null
    userdel -r -f "$u" 2>/dev/null || userdel -f "$u" || die "userdel $u failed"
done
rm -f /etc/sudoers.d/90-cloud-init-users
# cloud-init's state and logs (the seed, user-data with these files, ...).
rm -rf /var/lib/cloud/* /var/log/cloud-init.log /var/log/cloud-init-output.log

# --- boot loaders: direct kernel boots from now on -----------------------------------
loaders=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' 'grub*' 'shim*' 'systemd-boot' \
    'systemd-boot-signed' 2>/dev/null | awk '$1 ~ /^.i/ { print $2 }' | paste -sd' ' -)
if [ -n "$loaders" ]; then
    log "purging boot loaders: $loaders"
    # dpkg, not apt: no dependency resolution that could remove more.
    # shellcheck disable=SC2086
    dpkg --purge $loaders || log "warning: could not purge $loaders (kept)"
fi

# --- setup.sh (partitioned, booted mode) ------------------------------------------
log "running setup.sh for root $ROOT_DEV"
VIBEBOX_ROOT_DEVICE=$ROOT_DEV sh "$G/setup.sh" || die "setup.sh failed (see the console log)"

# --- kernel + initrd ------------------------------------------------------------
KVER=$(ls /boot | sed -n 's/^vmlinuz-//p' | sort -V | tail -n 1)
[ -n "$KVER" ] || die "no kernel in /boot"
[ -r "/boot/initrd.img-$KVER" ] || die "no /boot/initrd.img-$KVER"
case $KVER in *[!A-Za-z0-9.+~_-]*) die "unexpected kernel version $KVER" ;; esac
ln -sf "/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
ln -sf "/boot/initrd.img-$KVER" "$WORK/initrd.img"
{
    printf 'root=%s\n' "$ROOT_DEV"
    printf 'rootfstype=%s\n' "$ROOT_FSTYPE"
    printf 'kernel=%s\n' "$KVER"
    printf 'missing=%s\n' "$MISSING"
    printf 'result=ok\n'
} > "$WORK/prepare.info"
log "sending vmlinuz, initrd.img ($(du -kL "$WORK/initrd.img" | cut -f1) KiB), prepare.info (kernel $KVER)"
send_tar vmlinuz initrd.img prepare.info || die "sending the export archive failed"
T1=$(cut -d' ' -f1 /proc/uptime)
log "done: prepare.sh took $(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%d", b - a }')s"
power_off
