#!/bin/sh
# essential-hook.sh: mmdebstrap --essential-hook, run on the host with the new
# root file system as $1, after the Essential packages and before packages.txt.
#
# Installing packages.txt would build the initramfs three times (the kernel's
# postinst, then initramfs-tools' trigger for each of kmod, udev, zstd, ...),
# each thrown away by the next and by setup.sh's own build with the final
# config. Under qemu-user (a foreign-arch build) each build is minutes of CPU.
# update-initramfs is diverted to a no-op here; setup.sh puts it back and
# builds the initramfs once. (debootstrap has no hooks: builds there keep the
# package-time builds; setup.sh handles both.)
set -eu
root=${1:?usage: essential-hook.sh ROOTFS}
chroot "$root" dpkg-divert --quiet --local --rename \
    --divert /usr/sbin/update-initramfs.vibebox --add /usr/sbin/update-initramfs
printf '#!/bin/sh\n# vibebox: builds of the image skip this until setup.sh.\nexit 0\n' \
    > "$root/usr/sbin/update-initramfs"
chmod 0755 "$root/usr/sbin/update-initramfs"
