#!/bin/bash
# Repository benchmark (issue 3): a 4 GiB synthetic VM image (16 MiB regions: 40 % random,
# 30 % zero = holes, 30 % text-like), full backup, then an incremental after 1 % of the
# 4 KiB blocks changed at random; coldclone vs restic --stdin, borg create, zstd -T0, cat.
# Prints one markdown table. Image and repositories live on a tmpfs, so the figures are the
# tools' own speed, not the disk's (see docs/performance.md).
#
#   benches/repository.sh            # needs root (tmpfs mount, apt-get for missing tools)
#   SIZE_MIB=1024 CHUNKS="16384 65536" benches/repository.sh
set -euo pipefail
SIZE_MIB=${SIZE_MIB:-4096}
CHUNKS=${CHUNKS:-16384 65536}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export RESTIC_PASSWORD=bench-password BORG_PASSPHRASE=bench-password CC_PASSWORD=bench-password
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

need=()
command -v restic >/dev/null || need+=(restic)
command -v borg >/dev/null || need+=(borgbackup)
command -v zstd >/dev/null || need+=(zstd)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ -z "${CC_BENCH_BIN:-}" ]; then
    echo "building cc-bench (release)..." >&2
    (cd "$ROOT" && cargo build --release -q -p coldclone-repository --example cc-bench)
fi
CC=${CC_BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/cc-bench}

W=$(mktemp -d /tmp/ccbench.XXXXXX)
mount -t tmpfs -o size=20g tmpfs "$W"
cleanup() { cd /; umount "$W" 2>/dev/null || true; rmdir "$W" 2>/dev/null || true; }
trap cleanup EXIT
cd "$W"

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
MB=$(python3 -c "print($SIZE_MIB*1048576/1e6)")
T=$W/time.txt
# run NAME CMD... : time a command, remember seconds and peak RSS (KiB)
run() { /usr/bin/time -f "%e %M %U %S" -o "$T" "$@"; read -r SECS RSS U S < "$T"; CPU=$(python3 -c "print(f'{$U+$S:.1f}')"); }
mbps() { python3 -c "print(f'{$MB/max($1,0.001):.0f}')"; }
mbytes() { python3 -c "print(f'{$1/1e6:.0f}')"; }
dus() { du -sb "$1" | cut -f1; }
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 |"); }

# The same image (seed 42) for every tool, regenerated to spare memory.
fresh() { rm -f img.img; $CC genimage img.img "$SIZE_MIB" 42; }

# read limit and zstd
fresh
run sh -c 'cat img.img > /dev/null'
row "cat > /dev/null (read limit)" "$(mbps "$SECS")" "-" "$((RSS/1024))" "-" "$CPU" "$SECS s"
run sh -c 'zstd -T0 -q -c img.img > img.zst'
row "zstd -T0 (level 3) of the raw image" "$(mbps "$SECS")" "$(mbytes "$(stat -c %s img.zst)")" "$((RSS/1024))" "-" "$CPU" "$SECS s"
rm -f img.zst

# restic
fresh
restic init -q -r restic-repo >/dev/null
run sh -c 'restic backup -q -r restic-repo --stdin --stdin-filename disk.img < img.img'
F_S=$SECS; F_R=$RSS; F_C=$CPU; F_B=$(dus restic-repo)
$CC mutate img.img 1 7 ranges1
run sh -c 'restic backup -q -r restic-repo --stdin --stdin-filename disk.img < img.img'
I_S=$SECS; I_R=$RSS; I_C=$CPU; I_B=$(( $(dus restic-repo) - F_B ))
run sh -c 'restic dump -q -r restic-repo latest /disk.img > out.img'
row "restic $(restic version | cut -d' ' -f2) --stdin: full" "$(mbps "$F_S")" "$(mbytes "$F_B")" "$((F_R/1024))" "$(mbps "$SECS")" "$F_C" "$F_S s"
row "restic: incremental (1 % of 4 KiB blocks)" "$(mbps "$I_S")" "$(mbytes "$I_B")" "$((I_R/1024))" "-" "$I_C" "$I_S s"
rm -rf restic-repo out.img

# borg
fresh
borg init -e repokey borg-repo >/dev/null 2>&1
run sh -c 'borg create borg-repo::full - < img.img'
F_S=$SECS; F_R=$RSS; F_C=$CPU; F_B=$(dus borg-repo)
$CC mutate img.img 1 7 ranges1
run sh -c 'borg create borg-repo::inc - < img.img'
I_S=$SECS; I_R=$RSS; I_C=$CPU; I_B=$(( $(dus borg-repo) - F_B ))
run sh -c 'borg extract --stdout borg-repo::inc > out.img'
row "borg $(borg --version | cut -d' ' -f2) create (lz4): full" "$(mbps "$F_S")" "$(mbytes "$F_B")" "$((F_R/1024))" "$(mbps "$SECS")" "$F_C" "$F_S s"
row "borg: incremental (1 % of 4 KiB blocks)" "$(mbps "$I_S")" "$(mbytes "$I_B")" "$((I_R/1024))" "-" "$I_C" "$I_S s"
rm -rf borg-repo out.img

# coldclone
for cs in $CHUNKS; do
    fresh
    $CC init cc-repo "$cs"
    run sh -c "$CC backup cc-repo img.img > full.json"
    F_S=$SECS; F_R=$RSS; F_C=$CPU; F_B=$(dus cc-repo)
    FULL_ID=$(python3 -c "import json;print(json.load(open('full.json'))['snapshot_id'])")
    $CC mutate img.img 1 7 ranges1
    run sh -c "$CC backup cc-repo img.img $FULL_ID ranges1 > inc.json"
    I_S=$SECS; I_R=$RSS; I_C=$CPU; I_B=$(( $(dus cc-repo) - F_B ))
    # backup_disk's own time (without process start and the password key derivation)
    LIB=$(python3 -c "import json;f=json.load(open('full.json'))['duration'];i=json.load(open('inc.json'))['duration'];a=f['secs']+f['nanos']/1e9;b=i['secs']+i['nanos']/1e9;print(f'{a:.2f} s / {b:.2f} s = {a/b:.1f}x')")
    INC_ID=$(python3 -c "import json;print(json.load(open('inc.json'))['snapshot_id'])")
    run sh -c "$CC restore cc-repo $INC_ID out.img > /dev/null"
    R_S=$SECS
    cmp -s out.img img.img || { echo "coldclone restore differs from the image!" >&2; exit 1; }
    rm -f out.img
    B0=$(dus cc-repo)
    $CC mutate img.img 1 8 ranges2
    run sh -c "$CC backup cc-repo img.img $INC_ID > inc2.json"
    N_S=$SECS; N_R=$RSS; N_C=$CPU; N_B=$(( $(dus cc-repo) - B0 ))
    k=$((cs/1024))
    row "coldclone ($k KiB chunks): full" "$(mbps "$F_S")" "$(mbytes "$F_B")" "$((F_R/1024))" "$(mbps "$R_S")" "$F_C" "$F_S s"
    row "coldclone ($k KiB): incremental with changed-block map" "$(mbps "$I_S")" "$(mbytes "$I_B")" "$((I_R/1024))" "-" "$I_C" "$I_S s ($(python3 -c "print(f'{$F_S/max($I_S,0.001):.1f}')")x faster than full; backup_disk alone $LIB)"
    row "coldclone ($k KiB): incremental without map (another 1 %)" "$(mbps "$N_S")" "$(mbytes "$N_B")" "$((N_R/1024))" "-" "$N_C" "$N_S s"
    rm -rf cc-repo
done

echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%Y-%m-%d); image ${SIZE_MIB} MiB on tmpfs; load average before $LOAD0, after $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| tool | backup MB/s | bytes added (MB) | peak RSS (MiB) | restore MB/s | CPU s (user+sys) | wall time |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
printf '%s\n' "${ROWS[@]}"
