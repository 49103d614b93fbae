#!/bin/bash
# Builds coldclone's Xen lab image into $1: a real Xen 4.17 host (hypervisor + Debian 12 PV
# dom0 with xl, xenstored, LVM2) that boots under QEMU/TCG, and a PV test guest.
#
#   boot/xen          the hypervisor (gunzipped: QEMU loads it as a multiboot kernel)
#   boot/vmlinuz      dom0 kernel (Debian generic: the cloud flavour has no CONFIG_XEN_DOM0)
#   boot/initrd.img   dom0 initramfs (just enough to mount /dev/vda)
#   rootfs.ext4       dom0 root file system; /sbin/xenlab-init is PID 1 (image/dom0-init)
#                     /root/domu/{vmlinuz,initrd.gz}: the test guest (image/domu-init)
#   .done             written last: the image is complete
#
# Everything comes from one debootstrap, so hypervisor, tools and kernels match. The
# debootstrap tree is kept beside $1 (debootstrap-<hash of the package list>) so that a
# change to the later stages does not download again. Needs root, debootstrap (installed
# from Debian's registry when missing), mke2fs, cpio; network only for debootstrap.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: build.sh OUTDIR}")
mkdir -p "$(dirname "$OUT")"
HERE=$(cd "$(dirname "$0")" && pwd)
MIRROR=${MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
T0=$(date +%s)

# qemu-system-xen + seabios: the device model for the HVM guest try-out.
PKGS=xen-hypervisor-4.17-amd64,xen-utils-4.17,xenstore-utils,lvm2,thin-provisioning-tools,linux-image-amd64,busybox-static,iproute2,kmod,procps,e2fsprogs,initramfs-tools,qemu-system-xen,seabios
PKG_HASH=$(echo "bookworm $PKGS" | sha256sum | cut -c1-12)
BASE=$(dirname "$OUT")/debootstrap-$PKG_HASH

command -v debootstrap >/dev/null || { apt-get update -qq; apt-get install -y -qq debootstrap; }
command -v mke2fs >/dev/null || apt-get install -y -qq e2fsprogs
command -v cpio >/dev/null || apt-get install -y -qq cpio

if [ ! -e "$BASE/.debootstrap-done" ]; then
  rm -rf "$BASE"
  echo "xen-lab: debootstrap of the dom0 root file system into $BASE (takes a few minutes)"
  debootstrap --variant=minbase --include="$PKGS" bookworm "$BASE" "$MIRROR" > "$BASE.log" 2>&1 \
    || { tail -30 "$BASE.log"; echo "xen-lab: debootstrap failed (log: $BASE.log)"; exit 1; }
  rm -f "$BASE"/var/cache/apt/archives/*.deb
  touch "$BASE/.debootstrap-done"
  echo "xen-lab: debootstrap took $(( $(date +%s) - T0 ))s"
fi

rm -rf "$OUT"
mkdir -p "$OUT/boot"
STAGE=$OUT/stage
R=$STAGE/rootfs
mkdir -p "$STAGE"
cp -a "$BASE" "$R"
rm -f "$R/.debootstrap-done"
KVER=$(basename "$R"/boot/vmlinuz-* | sed 's/^vmlinuz-//')

# ---- the test guest: Debian generic kernel (has Xen PV support) + busybox initramfs --------
IR=$STAGE/domu-ir
mkdir -p "$IR"/{bin,sbin,dev,proc,sys,tmp,data,lib,etc/acpi/PWRF}
cp "$R/bin/busybox" "$IR/bin/busybox"
# Modules in load order, with their dependencies, as the rootfs's own modprobe resolves them.
: > "$IR/lib/modules.list"
chroot "$R" modprobe -a -S "$KVER" --show-depends xen-blkfront xen-netfront ext4 button evdev ata_piix sd_mod \
  | awk '$1=="insmod"{print $2}' | while read -r ko; do
    name=$(basename "$ko"); name=${name%.xz}; name=${name%.zst}
    grep -qx "$name" "$IR/lib/modules.list" && continue
    case "$ko" in
      *.xz) xz -dc "$R$ko" > "$IR/lib/$name" ;;
      *.zst) zstd -qdc "$R$ko" > "$IR/lib/$name" ;;
      *) cp "$R$ko" "$IR/lib/$name" ;;
    esac
    echo "$name" >> "$IR/lib/modules.list"
  done
install -m 755 "$HERE/image/domu-init" "$IR/init"
install -m 755 "$HERE/image/domu-poweroff" "$IR/bin/cc-poweroff"
ln -s /bin/cc-poweroff "$IR/etc/acpi/PWRF/00000080"
mkdir -p "$R/root/domu"
(cd "$IR" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$R/root/domu/initrd.gz")
cp "$R/boot/vmlinuz-$KVER" "$R/root/domu/vmlinuz"

# ---- dom0 --------------------------------------------------------------------------------
install -m 755 "$HERE/image/dom0-init" "$R/sbin/xenlab-init"
# LVM without udev or dmeventd (no udev runs in the lab dom0).
sed -i -e 's/^\t# obtain_device_list_from_udev = .*/\tobtain_device_list_from_udev = 0/' \
       -e 's/^\t# udev_sync = 1/\tudev_sync = 0/' -e 's/^\t# udev_rules = 1/\tudev_rules = 0/' \
       -e 's/^\t# monitoring = 1/\tmonitoring = 0/' "$R/etc/lvm/lvm.conf"
echo xendom0 > "$R/etc/hostname"
echo MODULES=list > "$R/etc/initramfs-tools/conf.d/xenlab"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$R/etc/initramfs-tools/modules"
mount -t proc proc "$R/proc"
chroot "$R" update-initramfs -u -k "$KVER" > "$STAGE/initramfs.log" 2>&1 || { umount "$R/proc"; cat "$STAGE/initramfs.log"; exit 1; }
umount "$R/proc"
rm -rf "$R"/usr/share/doc/* "$R"/usr/share/locale/* "$R"/usr/share/man/*
mkdir -p "$R/lab"

zcat "$R/boot/xen-4.17-amd64.gz" > "$OUT/boot/xen"
cp "$R/boot/vmlinuz-$KVER" "$OUT/boot/vmlinuz"
cp "$R/boot/initrd.img-$KVER" "$OUT/boot/initrd.img"
mke2fs -q -t ext4 -d "$R" -L xenroot "$OUT/rootfs.ext4" 2G
rm -rf "$STAGE"
touch "$OUT/.done"
echo "xen-lab: image built in $OUT in $(( $(date +%s) - T0 ))s"
