#!/bin/bash
# The demo: installs what it needs, boots a throwaway test VM that writes a
# counter into two files as fast as it can, backs it up with coldclone while it
# writes, restores the backup to a file and checks it: e2fsck clean, the file
# system cleanly unmounted, both counters equal. The original keeps running.
# Everything lives in a network namespace and a folder of its own, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
bash scripts/setup.sh
cargo build --release
CC=$ROOT/target/release/coldclone
GUEST=$ROOT/target/test-guest/demo
[ -f "$GUEST/guest.cpio.gz" ] || bash tests/guest/build-guest.sh "$GUEST"

W=$(mktemp -d /tmp/coldclone-demo.XXXXXX)
NS=ccdemo$$
cleanup() {
  ip netns pids "$NS" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a network namespace standing for the host, with the VM's network (bridge obr, 10.78.0.1)"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add obr type bridge
ip -n "$NS" addr add 10.78.0.1/24 dev obr
ip -n "$NS" link set obr up

say "boot the original VM (QEMU, TCG): ext4 data disk, two-file counter writer, pings 10.78.0.1"
qemu-img convert -O qcow2 "$GUEST/data.raw" "$W/web1.qcow2"
ip netns exec "$NS" qemu-system-x86_64 -accel tcg -m 256 -nographic \
  -kernel "$GUEST/vmlinuz" -initrd "$GUEST/guest.cpio.gz" \
  -append "console=ttyS0 quiet panic=-1 cc_ip=10.78.0.2/24 cc_peer=10.78.0.1" \
  -drive file="$W/web1.qcow2",if=none,id=disk0,format=qcow2 -device virtio-blk-pci,drive=disk0 \
  -netdev tap,id=n0,ifname=web1tap,script=no,downscript=no -device virtio-net-pci,netdev=n0 \
  -qmp unix:"$W/web1.qmp",server=on,wait=off </dev/null >"$W/web1.console" 2>&1 &
for _ in $(seq 100); do ip -n "$NS" link set web1tap master obr up 2>/dev/null && break; sleep 0.1; done
for _ in $(seq 600); do grep -q "GUEST UP" "$W/web1.console" && break; sleep 0.2; done
sleep 3
counter() { tr '\r' '\n' < "$W/web1.console" | grep -o 'HB a=[0-9]*' | tail -1 | cut -d= -f2; }
echo "the guest is writing: counter at $(counter)"

say "configure coldclone: the VM is named once, by its QMP socket"
echo "demo password" > "$W/password"
cat > "$W/coldclone.toml" <<CFG
state_dir = "$W/state"
[repository]
path = "$W/repository"
password_file = "$W/password"
[[vm]]
name = "web1"
qmp = "$W/web1.qmp"
stop_timeout_secs = 120
CFG
cat "$W/coldclone.toml"
"$CC" --config "$W/coldclone.toml" init

say "coldclone backup (while the guest writes)"
ip netns exec "$NS" "$CC" --config "$W/coldclone.toml" -v backup
ip netns exec "$NS" "$CC" --config "$W/coldclone.toml" --json backup > "$W/report.json"
echo "second (incremental) backup's report:"
head -1 "$W/report.json" | python3 -m json.tool
echo "summary: $(tail -1 "$W/report.json")"

say "the original keeps running"
a=$(counter); sleep 2; b=$(counter)
echo "counter $a -> $b two seconds later"
[ "$b" -gt "$a" ] || { echo "DEMO FAILED: the original stopped writing"; exit 1; }

say "coldclone snapshots"
"$CC" --config "$W/coldclone.toml" snapshots

say "restore the latest backup of disk0 and check it"
"$CC" --config "$W/coldclone.toml" restore web1 --disk disk0 --to "$W/restored.raw"
e2fsck -fn "$W/restored.raw"
dumpe2fs -h "$W/restored.raw" 2>/dev/null | grep '^Filesystem state'
A=$(debugfs -R 'cat /a.txt' "$W/restored.raw" 2>/dev/null)
B=$(debugfs -R 'cat /b.txt' "$W/restored.raw" 2>/dev/null)
echo "a.txt=$A b.txt=$B"
if dumpe2fs -h "$W/restored.raw" 2>/dev/null | grep '^Filesystem features:' | grep -q needs_recovery; then
  echo "DEMO FAILED: the journal needs recovery: the file system was not unmounted"; exit 1
fi
dumpe2fs -h "$W/restored.raw" 2>/dev/null | grep -q '^Filesystem state: *clean$' \
  && [ -n "$A" ] && [ "$A" = "$B" ] \
  || { echo "DEMO FAILED: the restored copy is not clean-shutdown consistent"; exit 1; }
say "DEMO PASSED: e2fsck clean, file system cleanly unmounted, both counters equal ($A)"
