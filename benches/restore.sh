#!/bin/bash
# Restore benchmark (issue 16): one 4 GiB disk image holding an ext4 file system with
# 3 GiB of files (the repository benchmark's synthetic data, seed 42: 16 MiB regions of
# random, zero and text-like bytes, cut into 192 files of 16 MiB), backed up by coldclone
# (the disk image) and by restic twice: the same image with --stdin (like for like with a
# disk restore) and the mounted file tree (what restic's own `restore --include` needs).
# Then, in one run: a full restore of the disk by each (and coldclone's whole-VM restore,
# qcow2), one 16 MiB file out of the backup by `coldclone files get` and by
# `restic restore --include`, the libguestfs appliance's start alone (`coldclone files ls`),
# and `restore --as --instant`: the test guest's kernel and initramfs (tests/guest) boot
# over the restored disk, whose root holds the guest's counter files, and the time to its
# first heartbeat (`HB a=N b=N`, read from the disk) is taken while the copy runs.
# coldclone's backup is written by cc-bench (the image as disk "xvda" of VM "bench") with
# the QEMU definition a QEMU backup keeps (CC_BENCH_VM_CONFIG), so that `--as` has a VM.
# Prints one markdown table. Works on disk (/var/tmp), not tmpfs: image, three
# repositories and the restores take ~17 GB, more than a shared machine's RAM.
#
#   benches/restore.sh                  # needs root (loop mount), restic, guestfish
#   SIZE_MIB=1024 benches/restore.sh    # a smaller disk (data = SIZE - 1 GiB, at least 256 MiB)
#
# The appliance runs under TCG unless BENCH_KVM=1 (this machine's /dev/kvm cannot run
# guests); with KVM its start is a few seconds instead of tens.
set -euo pipefail
SIZE_MIB=${SIZE_MIB:-4096}
DATA_MIB=$(( SIZE_MIB - 1024 )); [ "$DATA_MIB" -ge 256 ] || DATA_MIB=256
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export RESTIC_PASSWORD=bench-password CC_PASSWORD=bench-password
[ "${BENCH_KVM:-0}" = 1 ] || export LIBGUESTFS_BACKEND_SETTINGS=${LIBGUESTFS_BACKEND_SETTINGS:-force_tcg}

need=()
command -v restic >/dev/null || need+=(restic)
command -v guestfish >/dev/null || need+=(libguestfs-tools)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -z "${CC_BIN:-}" ]; then
    echo "building coldclone and cc-bench (release)..." >&2
    (cd "$ROOT" && cargo build --release -q -p coldclone --bin coldclone \
        && cargo build --release -q -p coldclone-repository --example cc-bench)
fi
CC=${CC_BIN:-$TARGET/release/coldclone}
CCB=${CC_BENCH_BIN:-$TARGET/release/examples/cc-bench}

W=$(mktemp -d /var/tmp/ccrestore.XXXXXX)
cleanup() {
    # The instant restore's VM (ours: its pidfile in our folder) before its folder goes.
    if [ -s "$W/inst/inst.pid" ]; then kill -9 "$(cat "$W/inst/inst.pid")" 2>/dev/null || true; fi
    cd /; umount "$W/mnt" 2>/dev/null || true; rm -rf "$W"
}
trap cleanup EXIT
cd "$W"
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
T=$W/time.txt
run() { /usr/bin/time -f "%e %M" -o "$T" "$@"; read -r SECS RSS < "$T"; }
mbps() { python3 -c "print(f'{$1/1e6/max($2,0.001):.0f}')"; }
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }

echo "making the ${SIZE_MIB} MiB image (${DATA_MIB} MiB of files)..." >&2
truncate -s "${SIZE_MIB}M" disk.img
mkfs.ext4 -q -F disk.img
mkdir mnt
mount -o loop disk.img mnt
mkdir -p mnt/data mnt/etc
echo bench-guest > mnt/etc/hostname
# The test guest mounts this disk at /data and counts on from a.txt/b.txt.
echo 0 > mnt/a.txt; echo 0 > mnt/b.txt
"$CCB" genimage data.bin "$DATA_MIB" 42
split -b 16M -d -a 4 data.bin mnt/data/blob.
rm -f data.bin
FILE=/data/blob.0100
[ -f "mnt$FILE" ] || FILE=/data/blob.0010
FILE_BYTES=$(stat -c %s "mnt$FILE")
IMG_BYTES=$(stat -c %s disk.img)
sync

# restic: the mounted tree (read-only) and the image.
mount -o remount,ro mnt
restic init -q -r restic-tree >/dev/null
run restic backup -q -r restic-tree mnt
RT_B=$SECS
umount mnt
restic init -q -r restic-img >/dev/null
run sh -c 'restic backup -q -r restic-img --stdin --stdin-filename disk.img < disk.img'
RI_B=$SECS

# The test guest (kernel + busybox initramfs) for --instant, and the QEMU definition a
# backup of a VM booting it from this disk would keep.
echo "building the test guest..." >&2
bash "$ROOT/tests/guest/build-guest.sh" "$W/guest" >/dev/null 2>&1 \
    || { echo "tests/guest/build-guest.sh failed" >&2; exit 1; }
python3 - "$W" > vmdef.json <<'PY'
import json, sys
w = sys.argv[1]
print(json.dumps({
    "program": "/usr/bin/qemu-system-x86_64",
    "cwd": w,
    "argv": ["-accel", "tcg", "-m", "256", "-kernel", f"{w}/guest/vmlinuz",
             "-initrd", f"{w}/guest/guest.cpio.gz", "-append", "console=ttyS0 quiet panic=-1",
             "-drive", "file=disk.qcow2,if=none,id=xvda,format=qcow2",
             "-device", "virtio-blk-pci,drive=xvda", "-nic", "none"],
}))
PY

# coldclone: the image as disk "xvda" of VM "bench", one backup run.
printf '%s\n' "$CC_PASSWORD" > pw
cat > c.toml <<CFG
state_dir = "$W/state"
[repository]
path = "$W/cc-repo"
password_file = "$W/pw"
CFG
"$CC" --config c.toml init >/dev/null
run sh -c "CC_BENCH_RUN=bench-run CC_BENCH_VM_CONFIG=$W/vmdef.json '$CCB' backup cc-repo disk.img > backup.json"
CC_B=$SECS

# Full restores of the disk image.
run "$CC" --config c.toml restore bench --disk xvda --to cc-full.img
CC_R=$SECS
cmp -s cc-full.img disk.img || { echo "coldclone's restore differs from the image" >&2; exit 1; }
rm -f cc-full.img
run restic restore -q -r restic-img latest --target restic-full
RI_R=$SECS
cmp -s restic-full/disk.img disk.img || { echo "restic's restore differs from the image" >&2; exit 1; }
rm -rf restic-full
run restic restore -q -r restic-tree latest --target restic-tree-full
RT_R=$SECS
rm -rf restic-tree-full
run "$CC" --config c.toml restore bench --as full --to "$W/full-vm"
CC_VM=$SECS
rm -rf "$W/full-vm"

# One file.
run "$CC" --config c.toml files bench ls
CC_LS=$SECS
run "$CC" --config c.toml files bench get "xvda:$FILE" --to cc-one
CC_ONE=$SECS
# The file's path as restic stored it: restic 0.14 keeps a relative backup target ("mnt")
# as /mnt in the snapshot's tree, so --include "$W/mnt$FILE" matched nothing (and restic
# restored nothing without saying so).
RPATH=$(restic ls -q -r restic-tree latest | grep -x ".*/mnt$FILE" | head -1)
[ -n "$RPATH" ] || { echo "restic's tree has no $FILE" >&2; exit 1; }
run restic restore -q -r restic-tree latest --target restic-one --include "$RPATH"
R_ONE=$SECS
GOT=$(find restic-one -type f | head -1)
[ -n "$GOT" ] || { echo "restic restore --include $RPATH restored nothing" >&2; exit 1; }
cmp -s "cc-one/$(basename "$FILE")" "$GOT" || { echo "the extracted files differ" >&2; exit 1; }

# Instant restore: the VM runs at once over the export; the first heartbeat with equal
# counters, read from the restored disk, while the copy of the 4 GiB runs (unthrottled).
INST=$W/inst
now() { date +%s.%N; }
T0=$(now)
"$CC" --config c.toml --json restore bench --as inst --to "$INST" --instant > inst.json 2> inst.err &
RPID=$!
# The VM runs on after the restore command (which ends when the copy does), so the wait
# for its heartbeat goes on while the VM lives (its pidfile), up to 15 minutes. The serial
# console's lines end in \r\n.
HB_S=""; WHOLE_S=""
for _ in $(seq 9000); do
    if [ -z "$HB_S" ] && tr -d '\r' < "$INST/inst.console.log" 2>/dev/null \
            | grep -qE 'HB a=([0-9]+) b=\1( |$)'; then
        HB_S=$(python3 -c "print(f'{$(now) - $T0:.1f}')")
    fi
    if [ -z "$WHOLE_S" ] && ! kill -0 "$RPID" 2>/dev/null; then
        wait "$RPID" || { echo "restore --instant failed: $(cat inst.err)" >&2; exit 1; }
        WHOLE_S=$(python3 -c "print(f'{$(now) - $T0:.1f}')")
    fi
    [ -n "$HB_S" ] && [ -n "$WHOLE_S" ] && break
    if [ -n "$WHOLE_S" ] && ! kill -0 "$(cat "$INST/inst.pid" 2>/dev/null)" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
[ -n "$WHOLE_S" ] || { echo "the instant restore did not end" >&2; exit 1; }
[ -n "$HB_S" ] || { echo "no heartbeat from the instant VM: $(tail -5 "$INST/inst.console.log")" >&2; exit 1; }
read -r STARTED_MS STREAMED_MS < <(python3 -c "import json; r=json.load(open('inst.json'))['instant']; print(r['vm_started_after_ms'], r['streamed_after_ms'])")
HB_COPY=$(python3 -c "print('during the copy' if $HB_S < $STREAMED_MS / 1000 else 'after the copy')")
python3 - "$INST/inst.qmp" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
for c in ("qmp_capabilities", "quit"):
    f.write(json.dumps({"execute": c}) + "\n"); f.flush(); f.readline()
PY
for _ in $(seq 100); do [ -e "/proc/$(cat "$INST/inst.pid" 2>/dev/null)" ] || break; sleep 0.1; done
INSTANT="$HB_S s ($HB_COPY: VM running after $(python3 -c "print(f'{$STARTED_MS/1000:.1f}')") s, disks whole after $(python3 -c "print(f'{$STREAMED_MS/1000:.1f}')") s, restore done $WHOLE_S s)"

MB=$IMG_BYTES
row "backup (for reference)" "$CC_B s (cc-bench, $(mbps "$MB" "$CC_B") MB/s)" "image --stdin: $RI_B s; file tree: $RT_B s" "restic reads the tree's ${DATA_MIB} MiB of files, coldclone and restic --stdin the whole image"
row "full restore of the ${SIZE_MIB} MiB disk" "$CC_R s ($(mbps "$MB" "$CC_R") MB/s)" "image: $RI_R s ($(mbps "$MB" "$RI_R") MB/s)" "like for like: the disk image, checked byte-equal (restic's file tree restore: $RT_R s)"
row "whole VM (\`restore --as\`, qcow2)" "$CC_VM s" "-" "the disk as qcow2 through the private NBD export, plus the start script"
row "one file ($((FILE_BYTES >> 20)) MiB) out of the backup" "$CC_ONE s (files get)" "$R_ONE s (restore --include, tree backup)" "coldclone: appliance start + chunks read on demand; both copies checked equal"
row "libguestfs appliance start alone" "$CC_LS s (files ls)" "-" "most of files get; ${LIBGUESTFS_BACKEND_SETTINGS:-KVM}"
row "first heartbeat with \`--instant\`" "$INSTANT" "-" "TCG guest (kernel + initramfs) on the restored disk; restic has no instant restore"

echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%Y-%m-%dT%H:%MZ); restic $(restic version | cut -d' ' -f2); image ${SIZE_MIB} MiB on $(df --output=fstype "$W" | tail -1) ($W); load average before $LOAD0, after $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| operation | coldclone | restic | notes |"
echo "| --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
