#!/bin/bash
# Fleet benchmark (issue 18): full and incremental backup throughput of one synthetic VM
# image (cc-bench genimage: 40 % random, 30 % zero, 30 % text-like) into
#   - a local folder repository (coldclone),
#   - a three-node Garage cluster on 127.0.0.1, replication factor 3 (coldclone's S3
#     backend), and
#   - restic's s3: backend against the same cluster,
# in one run, printed as one markdown table. The incremental changes 1 % of the 4 KiB
# blocks at random; coldclone's incremental is given those ranges (a changed-block map, as
# the pipeline has), restic reads everything. Everything lives on a tmpfs, so the figures
# are the tools' and Garage's own cost, not a disk's; Garage's compression is off so that
# "stored" is what was sent (times three replicas).
#
#   COLDCLONE_GARAGE=1 bash scripts/setup.sh   # Garage, once (see docs/testing.md)
#   benches/fleet.sh                           # root (tmpfs); SIZE_MIB=512 by default
set -euo pipefail
SIZE_MIB=${SIZE_MIB:-512}
CHUNK=${CHUNK:-65536}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GARAGE=${COLDCLONE_GARAGE_BIN:-/var/cache/coldclone/garage-2.5.0/bin/garage}
[ -x "$GARAGE" ] || { echo "no Garage at $GARAGE: COLDCLONE_GARAGE=1 bash scripts/setup.sh" >&2; exit 2; }
command -v restic >/dev/null || { apt-get update -qq && apt-get install -y -qq restic >/dev/null; }
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
export RESTIC_PASSWORD=bench-password CC_PASSWORD=bench-password

if [ -z "${CC_BENCH_BIN:-}" ]; then
    echo "building cc-bench (release)..." >&2
    (cd "$ROOT" && cargo build --release -q -p coldclone-repository --example cc-bench)
fi
CC=${CC_BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/cc-bench}

W=$(mktemp -d /tmp/ccfleet.XXXXXX)
mount -t tmpfs -o size=$((SIZE_MIB * 12 + 2048))m tmpfs "$W"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    cd /; umount "$W" 2>/dev/null || true; rmdir "$W" 2>/dev/null || true
}
trap cleanup EXIT
cd "$W"

# ---- the cluster (as repository/tests/common/garage.rs starts it) ----
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
S3PORTS=()
for i in 0 1 2; do
    rpc=$(port); s3=$(port); S3PORTS+=("$s3")
    mkdir -p "g$i"
    cat > "g$i/garage.toml" <<EOF
metadata_dir = "$W/g$i/meta"
data_dir = "$W/g$i/data"
db_engine = "lmdb"
replication_factor = 3
consistency_mode = "consistent"
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$SECRET"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
EOF
    RUST_LOG=warn "$GARAGE" -c "g$i/garage.toml" server > "g$i/log" 2>&1 &
    PIDS+=("$!")
done
g() { RUST_LOG=warn "$GARAGE" -c "g0/garage.toml" "$@"; }
retry() { for _ in $(seq 120); do if "$@" >/dev/null 2>&1; then return 0; fi; sleep 0.5; done; echo "failed: $*" >&2; "$@"; }
IDS=()
for i in 0 1 2; do
    retry "$GARAGE" -c "g$i/garage.toml" node id -q
    IDS+=("$(RUST_LOG=warn "$GARAGE" -c "g$i/garage.toml" node id -q)")
done
retry g node connect "${IDS[1]}"; retry g node connect "${IDS[2]}"
for id in "${IDS[@]}"; do retry g layout assign -z dc1 -c 1G "${id%@*}"; done
retry g layout apply --version 1
KEY=$(g key create bench)
# "Key ID:" and "Secret key:" lines, the value after spaces (Garage 2.5 aligns with spaces).
export AWS_ACCESS_KEY_ID=$(sed -n 's/^Key ID:[[:space:]]*//p' <<<"$KEY" | xargs)
export AWS_SECRET_ACCESS_KEY=$(sed -n 's/^Secret key:[[:space:]]*//p' <<<"$KEY" | xargs)
[ -n "$AWS_ACCESS_KEY_ID" ] && [ -n "$AWS_SECRET_ACCESS_KEY" ] || { echo "no key in \`garage key create\`: $KEY" >&2; exit 1; }
export AWS_REGION=garage AWS_DEFAULT_REGION=garage
retry g bucket create bench
retry g bucket allow --read --write --owner bench --key bench
for _ in $(seq 240); do g health 2>/dev/null | grep -q 'Cluster health:.*HEALTHY' && break; sleep 0.5; done
g health | grep -q 'Cluster health:.*HEALTHY' || { echo "Garage not healthy" >&2; exit 1; }
EP=http://127.0.0.1:${S3PORTS[0]}

# ---- measurements ----
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
MB=$(python3 -c "print($SIZE_MIB*1048576/1e6)")
T=$W/time.txt
run() { /usr/bin/time -f "%e %M %U %S" -o "$T" "$@"; read -r SECS RSS U S < "$T"; CPU=$(python3 -c "print(f'{$U+$S:.1f}')"); }
mbps() { python3 -c "print(f'{$MB/max($1,0.001):.0f}')"; }
mbytes() { python3 -c "print(f'{$1/1e6:.0f}')"; }
dus() { du -sb "$@" | awk '{s+=$1} END {print s}'; }
garage_bytes() { dus g0/data g1/data g2/data; }
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }
fresh() { rm -f img.img; $CC genimage img.img "$SIZE_MIB" 42; }

# cc NAME REPO STORED_FN: full, then an incremental of 1 % with its changed ranges.
cc() {
    local name=$1 repo=$2 stored=$3
    fresh
    $CC init "$repo" "$CHUNK"
    local b0; b0=$($stored)
    run sh -c "$CC backup '$repo' img.img > full.json"
    local fs=$SECS fc=$CPU fr=$RSS fb=$(( $($stored) - b0 ))
    local id; id=$(python3 -c "import json;print(json.load(open('full.json'))['snapshot_id'])")
    $CC mutate img.img 1 7 ranges1
    b0=$($stored)
    run sh -c "$CC backup '$repo' img.img $id ranges1 > inc.json"
    local is=$SECS ic=$CPU ib=$(( $($stored) - b0 ))
    local inc; inc=$(python3 -c "import json;print(json.load(open('inc.json'))['snapshot_id'])")
    run sh -c "$CC restore '$repo' $inc out.img > /dev/null"
    cmp -s out.img img.img || { echo "$name: restore differs from the image" >&2; exit 1; }
    row "coldclone → $name: full" "$(mbps "$fs")" "$(mbytes "$fb")" "$((fr/1024))" "$fc" "$fs s (restore $(mbps "$SECS") MB/s)"
    row "coldclone → $name: incremental (1 %, changed-block map)" "$(mbps "$is")" "$(mbytes "$ib")" "-" "$ic" "$is s"
    rm -f out.img
}
local_bytes() { [ -d cc-local ] && dus cc-local || echo 0; }
cc "local folder (tmpfs)" "$W/cc-local" local_bytes
cc "Garage, 3 nodes, RF 3 (S3)" "s3:$EP/bench/coldclone" garage_bytes

fresh
R="s3:$EP/bench/restic"
restic -q -r "$R" -o s3.bucket-lookup=path init >/dev/null
b0=$(garage_bytes)
run sh -c "restic -q -r '$R' -o s3.bucket-lookup=path backup --stdin --stdin-filename disk.img < img.img"
fs=$SECS; fc=$CPU; fr=$RSS; fb=$(( $(garage_bytes) - b0 ))
$CC mutate img.img 1 7 ranges1
b0=$(garage_bytes)
run sh -c "restic -q -r '$R' -o s3.bucket-lookup=path backup --stdin --stdin-filename disk.img < img.img"
is=$SECS; ic=$CPU; ib=$(( $(garage_bytes) - b0 ))
run sh -c "restic -q -r '$R' -o s3.bucket-lookup=path dump latest /disk.img > out.img"
cmp -s out.img img.img || { echo "restic: restore differs" >&2; exit 1; }
row "restic $(restic version | cut -d' ' -f2) → Garage (s3:): full" "$(mbps "$fs")" "$(mbytes "$fb")" "$((fr/1024))" "$fc" "$fs s (restore $(mbps "$SECS") MB/s)"
row "restic → Garage: incremental (1 %, reads everything)" "$(mbps "$is")" "$(mbytes "$ib")" "-" "$ic" "$is s"
rm -f out.img

echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%Y-%m-%d); image ${SIZE_MIB} MiB, coldclone chunks $((CHUNK/1024)) KiB; Garage 2.5.0, 3 nodes on 127.0.0.1, RF 3, compression off, all on tmpfs; load average before $LOAD0, after $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Stored: bytes added to the folder, or to the three Garage nodes' data folders together (three replicas)."
echo
echo "| tool → target | backup MB/s | stored (MB) | peak RSS (MiB) | CPU s (user+sys, the client only) | wall time |"
echo "| --- | ---: | ---: | ---: | ---: | --- |"
printf '%s\n' "${ROWS[@]}"
