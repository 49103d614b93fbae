#!/bin/bash
# Builds coldclone's test guest into $1 (default target/test-guest):
#   vmlinuz       a Debian cloud kernel
#   guest.cpio.gz busybox initramfs whose /init mounts the ext4 data disk /dev/vda,
#                 runs a writer that keeps a counter in a.txt then b.txt (a torn copy
#                 shows them differ) and handles the ACPI power button like a
#                 well-behaved service: stop the writer, write a final equal pair,
#                 sync, unmount, power off.
#   data.raw      a 64 MiB ext4 file system (copy it per VM)
#   guest-qga.cpio.gz  the same with Debian's qemu-ga (package qemu-guest-agent) and the
#                 shared libraries ldd names for it
# Kernel command line knobs read by /init:
#   cc_ip=ADDR/LEN cc_peer=ADDR  bring eth0 up and ping the peer 5 times a second
#   cc_ignore_powerbutton=1      a guest that ignores the power button
#   cc_fill_mb=N                 fill N MiB of RAM with non-zero data (benchmarks: a busy guest)
#   cc_agent=1                   a stand-in guest agent on the virtio port org.qemu.guest_agent.0:
#                                answers guest-sync and guest-ping, and guest-shutdown with the
#                                same clean shutdown as the power button (also when that is ignored);
#                                guest-fsfreeze-freeze/-thaw/-status freeze the data disks for real
#                                (busybox fsfreeze, the FIFREEZE ioctl qemu-ga uses)
#   cc_agent_freeze=hang         the stand-in freezes but never answers guest-fsfreeze-freeze
#                                (the guest stays frozen until a thaw) and keeps serving the
#                                other commands
#   cc_agent_shutdown=ignore     guest-shutdown (stand-in, or /sbin/shutdown under qemu-ga) does nothing
#   cc_qga=1                     Debian's own qemu-ga on the port instead (guest-qga.cpio.gz only);
#                                its guest-shutdown runs /sbin/shutdown, which here runs the same
#                                clean power-off path as the power button
#   cc_disks=N                   N data disks: /dev/vdb.. are mounted on /data_b.., get an
#                                id.txt naming their device, and the writer keeps the same
#                                counter pair on every disk (the heartbeat adds vdb=N ...)
# Needs: apt-get (downloads two Debian packages once), cpio, mkfs.ext4.
set -euo pipefail
OUT=$(realpath -m "${1:-target/test-guest}")
mkdir -p "$OUT/pkgs"
cd "$OUT/pkgs"
if ! ls linux-image-*-cloud-amd64_*.deb >/dev/null 2>&1; then
  apt-get download "$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/{print $2; exit}')"
fi
ls busybox-static_*.deb >/dev/null 2>&1 || apt-get download busybox-static
ls qemu-guest-agent_*.deb >/dev/null 2>&1 || apt-get download qemu-guest-agent
rm -rf k bb; dpkg -x linux-image-*-cloud-amd64_*.deb k; dpkg -x busybox-static_*.deb bb
cd "$OUT"
cp pkgs/k/boot/vmlinuz-* vmlinuz
KM=$(ls -d pkgs/k/lib/modules/*)/kernel
rm -rf ir && mkdir -p ir/bin ir/sbin ir/proc ir/sys ir/dev ir/data ir/tmp ir/lib/modules ir/etc/acpi/PWRF
cp pkgs/bb/bin/busybox ir/bin/
# Load order matters (modules.dep is not used): virtio_ring before virtio, failover before virtio_net.
MODS="drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/char/virtio_console drivers/block/virtio_blk drivers/input/evdev drivers/acpi/button drivers/virtio/virtio_balloon net/core/failover drivers/net/net_failover drivers/net/virtio_net"
for m in $MODS; do
  f=$(ls "$KM/$m".ko* 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "module $m missing in the kernel package" >&2; exit 1; }
  case "$f" in
    *.xz) xz -dc "$f" > "ir/lib/modules/$(basename "$m").ko" ;;
    *.zst) zstd -qdc "$f" > "ir/lib/modules/$(basename "$m").ko" ;;
    *) cp "$f" "ir/lib/modules/$(basename "$m").ko" ;;
  esac
done
cat > ir/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /tmp /var/run; mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console virtio_blk evdev button virtio_balloon failover net_failover virtio_net; do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "INSMOD $m failed"
done
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 /dev/vda /data || echo "MOUNT FAILED"
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -1; }
# Extra data disks, newest mount last (the power button unmounts in reverse).
DIRS=/data
NDISKS=$(arg cc_disks)
for l in b c d e f g h; do
  [ -n "$NDISKS" ] || break
  [ $(echo $DIRS | wc -w) -lt "$NDISKS" ] || break
  for i in $(seq 50); do [ -b /dev/vd$l ] && break; sleep 0.1; done
  mkdir -p /data_$l
  mount -t ext4 /dev/vd$l /data_$l || echo "MOUNT vd$l FAILED"
  echo vd$l > /data_$l/id.txt
  DIRS="$DIRS /data_$l"
done
echo "$DIRS" > /tmp/dirs
IP=$(arg cc_ip); PEER=$(arg cc_peer)
if [ -n "$IP" ]; then
  ip link set eth0 up && ip addr add "$IP" dev eth0 && echo "NET UP $IP"
  [ -n "$PEER" ] && ( ping -i 0.2 "$PEER" > /dev/null 2>&1 & )
fi
FILL=$(arg cc_fill_mb)
# Non-zero pages: QEMU skips zero pages, so an idle guest would flatter every method.
# (1 MiB written N times with cat: far faster under TCG than yes | head.)
if [ -n "$FILL" ]; then
  yes "coldclone fills guest memory with non-zero pages" | head -c 1m > /chunk
  i=0; while [ $i -lt "$FILL" ]; do cat /chunk; i=$((i+1)); done > /fill && echo "FILLED $FILL MiB"
fi
echo "GUEST UP $(cat /proc/uptime)"
# The writer: a.txt then b.txt, as fast as it can; it stops when /tmp/stop appears.
# With several disks, one counter on all of them: a clean stop leaves every disk at the same n.
if [ "$DIRS" = /data ]; then
( n=$(cat /data/a.txt 2>/dev/null || echo 0); while [ ! -e /tmp/stop ]; do n=$((n+1)); echo $n > /data/a.txt; echo $n > /data/b.txt; done; echo $n > /tmp/final ) &
else
( n=$(cat /data/a.txt 2>/dev/null || echo 0); while [ ! -e /tmp/stop ]; do n=$((n+1)); for d in $DIRS; do echo $n > $d/a.txt; echo $n > $d/b.txt; done; done; echo $n > /tmp/final ) &
fi
# The agent's port (no udev here, so no /dev/virtio-ports/ link: found in sysfs).
agent_port() {
  for i in $(seq 100); do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && { echo /dev/${p##*/}; return; }
    done
    sleep 0.1
  done
}
# The stand-in guest agent: the few commands coldclone and libvirt send, one JSON object
# a line (qemu-ga's protocol, qga/qapi-schema.json); guest-shutdown gets no answer, as
# from qemu-ga. fsfreeze: busybox's fsfreeze, the FIFREEZE/FITHAW ioctls qemu-ga issues
# (qga/commands-posix.c, qmp_guest_fsfreeze_freeze_list), on the data disks.
if [ "$(arg cc_agent)" = 1 ]; then
( PORT=$(agent_port)
  [ -n "$PORT" ] || { echo "AGENT NO PORT"; exit 0; }
  echo "AGENT UP $PORT"
  FREEZE=$(arg cc_agent_freeze); SHUT=$(arg cc_agent_shutdown)
  # Reads see EOF while no host end is connected: open again.
  while true; do
    exec 3<>"$PORT"
    while read -r line <&3; do
      id=$(echo "$line" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')
      case "$line" in
        *guest-sync-delimited*) printf '\377{"return": %s}\n' "$id" >&3 ;;
        *guest-sync*) printf '{"return": %s}\n' "$id" >&3 ;;
        *guest-ping*) printf '{"return": {}}\n' >&3 ;;
        *guest-fsfreeze-freeze*)
          touch /tmp/agent-frozen
          n=0; for d in $(cat /tmp/dirs); do fsfreeze --freeze $d && n=$((n+1)); done
          if [ "$FREEZE" = hang ]; then echo "AGENT FREEZE HANGS"; continue; fi
          echo "AGENT FROZE $n"; printf '{"return": %s}\n' "$n" >&3 ;;
        *guest-fsfreeze-thaw*)
          n=0
          if [ -e /tmp/agent-frozen ]; then
            for d in $(cat /tmp/dirs); do fsfreeze --unfreeze $d 2>/dev/null && n=$((n+1)); done
            rm -f /tmp/agent-frozen
          fi
          echo "AGENT THAW $n"; printf '{"return": %s}\n' "$n" >&3 ;;
        *guest-fsfreeze-status*)
          if [ -e /tmp/agent-frozen ]; then printf '{"return": "frozen"}\n' >&3
          else printf '{"return": "thawed"}\n' >&3; fi ;;
        *guest-shutdown*)
          if [ "$SHUT" = ignore ]; then echo "AGENT SHUTDOWN IGNORED"; continue; fi
          echo "AGENT SHUTDOWN"; /etc/acpi/PWRF/00000080 > /dev/console 2>&1 & ;;
        *) printf '{"error": {"class": "CommandNotFound", "desc": "not in the stand-in agent"}}\n' >&3 ;;
      esac
    done
    exec 3<&-
    sleep 0.5
  done ) &
fi
# Debian's qemu-ga (guest-qga.cpio.gz), on the port found above; its state in /tmp.
if [ "$(arg cc_qga)" = 1 ]; then
  PORT=$(agent_port)
  if [ -x /usr/sbin/qemu-ga ] && [ -n "$PORT" ]; then
    /usr/sbin/qemu-ga -m virtio-serial -p "$PORT" -t /tmp -f /tmp/qemu-ga.pid -l /tmp/qemu-ga.log > /dev/console 2>&1 &
    echo "QGA UP $PORT"
  else
    echo "QGA MISSING"
  fi
fi
if [ "$(arg cc_ignore_powerbutton)" != 1 ]; then
  acpid -d -c /etc/acpi > /dev/console 2>&1 &
fi
# The heartbeat reads /data too: it stops when the shutdown starts, or umount could find /data busy.
# It reads the counters with the shell's own `read`, both files within microseconds: with a
# `cat` per file (a fork and exec, milliseconds under TCG) the writer, which runs flat out,
# moved on between the two reads nearly every time, so a == b was rare (none in the first
# 29 heartbeats of an instant restore on a loaded machine) and tests waiting for it timed out.
while true; do
  sleep 1
  [ -e /tmp/stop ] && continue
  x=""; for d in $DIRS; do [ $d = /data ] || { v=""; read -r v < $d/a.txt; x="$x vd${d#/data_}=$v"; }; done
  a=""; b=""; read -r a < /data/a.txt; read -r b < /data/b.txt
  echo "HB a=$a b=$b$x"
done
INIT
cat > ir/etc/acpi/PWRF/00000080 <<'PWR'
#!/bin/sh
echo "POWER BUTTON"
touch /tmp/stop
while [ ! -e /tmp/final ]; do sleep 0.1; done
echo "FINAL a=$(cat /data/a.txt) b=$(cat /data/b.txt)"
sync
# A well-behaved shutdown: unmount for real (retry while a reader finishes), then power off.
for d in $(cat /tmp/dirs | tr ' ' '\n' | sed -n '1!G;h;$p'); do
  for i in $(seq 50); do umount $d 2>/dev/null && echo "UNMOUNTED $d" && break; sleep 0.1; done
done
[ -n "$(grep ' /data' /proc/mounts)" ] || echo "UNMOUNTED"
poweroff -f
PWR
# qemu-ga's guest-shutdown runs `/sbin/shutdown -P +0 "hypervisor initiated shutdown"`
# and waits for it (qemu 7.2, qga/commands-posix.c, qmp_guest_shutdown): this one starts
# the guest's clean power-off path, the power button's, and returns at once.
cat > ir/sbin/shutdown <<'SHUT'
#!/bin/sh
if tr ' ' '\n' < /proc/cmdline | grep -qx cc_agent_shutdown=ignore; then
  echo "SHUTDOWN IGNORED $*" > /dev/console; exit 0
fi
echo "SHUTDOWN $*" > /dev/console
setsid /etc/acpi/PWRF/00000080 > /dev/console 2>&1 < /dev/null &
exit 0
SHUT
chmod +x ir/init ir/etc/acpi/PWRF/00000080 ir/sbin/shutdown
(cd ir && find . | cpio -o -H newc 2>/dev/null | gzip -1 > ../guest.cpio.gz)
# The same with Debian's qemu-ga and the libraries the host's ldd names for it.
rm -rf ir-qga pkgs/qga && cp -a ir ir-qga && dpkg -x pkgs/qemu-guest-agent_*.deb pkgs/qga
mkdir -p ir-qga/usr/sbin && cp pkgs/qga/usr/sbin/qemu-ga ir-qga/usr/sbin/
for lib in $(ldd pkgs/qga/usr/sbin/qemu-ga | awk '/=> \//{print $3} /^\t\/lib/{print $1}'); do
  [ -f "$lib" ] || { echo "qemu-ga needs $lib, which this host lacks" >&2; exit 1; }
  mkdir -p "ir-qga$(dirname "$lib")"; cp -L "$lib" "ir-qga$lib"
done
(cd ir-qga && find . | cpio -o -H newc 2>/dev/null | gzip -1 > ../guest-qga.cpio.gz)
[ -f data.raw ] || mkfs.ext4 -q -F data.raw 64M
echo "test guest built in $OUT"
