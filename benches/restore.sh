#!/bin/bash
# Restore benchmark (issue 16): one 4 GiB disk image holding an ext4 file system with
# 3 GiB of files (the repository benchmark's synthetic data, seed 42: 16 MiB regions of
# random, zero and text-like bytes, cut into 192 files of 16 MiB), backed up by coldclone
# (the disk image) and by restic twice: the same image with --stdin (like for like with a
# disk restore) and the mounted file tree (what restic's own `restore --include` needs).
# Then, in one run: a full restore of the disk by each, one 16 MiB file out of the backup
# by `coldclone files get` and by `restic restore --include`, the libguestfs appliance's
# start alone (`coldclone files ls`), and `restore --instant` if this coldclone has it.
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
cleanup() { cd /; umount "$W/mnt" 2>/dev/null || true; rm -rf "$W"; }
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

# coldclone: the image as disk "xvda" of VM "bench", one backup run.
printf '%s\n' "$CC_PASSWORD" > pw
cat > c.toml <<CFG
state_dir = "$W/state"
[repository]
path = "$W/cc-repo"
password_file = "$W/pw"
CFG
"$CC" --config c.toml init >/dev/null
run sh -c "CC_BENCH_RUN=bench-run '$CCB' backup cc-repo disk.img > backup.json"
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

# One file.
run "$CC" --config c.toml files bench ls
CC_LS=$SECS
run "$CC" --config c.toml files bench get "xvda:$FILE" --to cc-one
CC_ONE=$SECS
run restic restore -q -r restic-tree latest --target restic-one --include "$W/mnt$FILE"
R_ONE=$SECS
GOT=$(find restic-one -type f | head -1)
cmp -s "cc-one/$(basename "$FILE")" "$GOT" || { echo "the extracted files differ" >&2; exit 1; }

if "$CC" restore --help 2>/dev/null | grep -q -- '--instant'; then
    INSTANT="not measured: this benchmark's disk is a data disk with no OS to boot; see docs/performance.md"
else
    INSTANT="not measured: --instant not merged yet"
fi

MB=$IMG_BYTES
row "backup (for reference)" "$CC_B s (cc-bench, $(mbps "$MB" "$CC_B") MB/s)" "image --stdin: $RI_B s; file tree: $RT_B s" "restic reads the tree's ${DATA_MIB} MiB of files, coldclone and restic --stdin the whole image"
row "full restore of the ${SIZE_MIB} MiB disk" "$CC_R s ($(mbps "$MB" "$CC_R") MB/s)" "image: $RI_R s ($(mbps "$MB" "$RI_R") MB/s)" "like for like: the disk image, checked byte-equal (restic's file tree restore: $RT_R s)"
row "one file ($((FILE_BYTES >> 20)) MiB) out of the backup" "$CC_ONE s (files get)" "$R_ONE s (restore --include, tree backup)" "coldclone: appliance start + chunks read on demand; both copies checked equal"
row "libguestfs appliance start alone" "$CC_LS s (files ls)" "-" "most of files get; ${LIBGUESTFS_BACKEND_SETTINGS:-KVM}"
row "first heartbeat with --instant" "$INSTANT" "-" "restic has no instant restore"

echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%Y-%m-%dT%H:%MZ); restic $(restic version | cut -d' ' -f2); image ${SIZE_MIB} MiB on $(df --output=fstype "$W" | tail -1) ($W); load average before $LOAD0, after $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| operation | coldclone | restic | notes |"
echo "| --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
