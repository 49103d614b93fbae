#!/bin/bash
# Boots the Xen lab once: boot.sh IMAGE_DIR SHARE_DIR WORK_DIR
#   IMAGE_DIR  what build.sh made (never written to: dom0 writes into a qcow2 overlay)
#   SHARE_DIR  shared with dom0 over 9p as /lab; dom0 runs /lab/run.sh, then powers off
#              (without run.sh: a root shell on the console, for people)
#   WORK_DIR   the overlay, the LVM disk (/dev/vdb in dom0, sparse) and serial.log
# QEMU software emulation (TCG). SMAP must be hidden from Xen 4.17 under TCG or dom0
# dies at its first instruction ("d0v0 Unhandled: vec 14, #PF"). AVX is hidden too: with
# QEMU 7.2's young AVX2 emulation, dom0 programs died of heap corruption ("malloc():
# unsorted double linked list corrupted") where glibc picked its AVX2 string functions.
# PCID is hidden and off in Xen as well (TLB flushes by PCID are a suspect for those
# crashes: they touched unrelated processes). One TCG thread for both vCPUs: with multi-threaded TCG on a loaded 2-core host, dom0
# programs (xl, xenstored, hotplug scripts) crashed at random (heap corruption, SIGSEGV).
set -euo pipefail
IMG=$(realpath "$1"); SHARE=$(realpath "$2"); WORK=$(realpath -m "$3")
mkdir -p "$WORK"
rm -f "$WORK/rootfs.qcow2" "$WORK/lvm.img"
qemu-img create -q -f qcow2 -b "$IMG/rootfs.ext4" -F raw "$WORK/rootfs.qcow2"
truncate -s 2G "$WORK/lvm.img"
QEMU=(qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt,+ssse3,+sse4.1,+sse4.2,+popcnt -m "${LAB_MEM_MIB:-2048}" -smp 2 -nographic -no-reboot -nic none
  -kernel "$IMG/boot/xen"
  -append "dom0_mem=1024M,max:1024M dom0_max_vcpus=2 pcid=0 console=com1 com1=115200,8n1 guest_loglvl=all noreboot"
  -initrd "$IMG/boot/vmlinuz root=/dev/vda rw init=/sbin/xenlab-init console=hvc0 quiet,$IMG/boot/initrd.img"
  -drive "file=$WORK/rootfs.qcow2,if=virtio,format=qcow2"
  -drive "file=$WORK/lvm.img,if=virtio,format=raw"
  -virtfs "local,path=$SHARE,mount_tag=lab,security_model=none,id=lab")
if [ ! -f "$SHARE/run.sh" ] && [ -t 0 ]; then exec "${QEMU[@]}"; fi
timeout "${LAB_TIMEOUT:-3600}" "${QEMU[@]}" </dev/null >"$WORK/serial.log" 2>&1
