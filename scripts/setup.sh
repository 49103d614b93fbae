#!/bin/bash
# Installs what coldclone's build, demo and tests need on Debian 12, as root:
# QEMU, qemu-img, iproute2, e2fsprogs, tcpdump, the test guest's build tools,
# the peers the benchmarks compare against, and a Rust toolchain new enough
# for the workspace (Debian's rustc-web/cargo-web when the system has none).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need_apt=()
for pair in qemu-system-x86_64:qemu-system-x86 ip:iproute2 e2fsck:e2fsprogs tcpdump:tcpdump cpio:cpio \
            gcc:build-essential pkg-config:pkg-config xz:xz-utils zstd:zstd curl:curl python3:python3 \
            pip3:python3-pip restic:restic borg:borgbackup /usr/bin/time:time \
            sfdisk:fdisk xfs_repair:xfsprogs blkid:util-linux debugfs:e2fsprogs \
            libvirtd:libvirt-daemon-system virsh:libvirt-clients; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# libvirt's QEMU driver (tests/libvirt_pipeline.rs starts virtlogd and libvirtd itself).
if [ ! -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends libvirt-daemon-driver-qemu
fi
# qemu-img separately: some images carry a newer qemu-utils that conflicts when both come at once.
if ! command -v qemu-img >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-utils
fi
# Rust >= 1.89 (std's File::try_lock). Debian 12's rustc is 1.63; rustc-web is current.
rust_ok() {
  command -v cargo >/dev/null 2>&1 || return 1
  local v; v=$(rustc --version 2>/dev/null | awk '{print $2}')
  [ "$(printf '%s\n1.89.0\n' "$v" | sort -V | head -1)" = "1.89.0" ]
}
if ! rust_ok; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends rustc-web cargo-web
fi
rust_ok || { echo "setup: no Rust >= 1.89 could be installed" >&2; exit 1; }
# The repository's S3 tests start real S3-compatible servers on 127.0.0.1: s3s-fs
# (file-backed, checks signatures; built once from crates.io) and moto.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v s3s-fs >/dev/null 2>&1; then
  cargo install -q s3s-fs@0.14.1 --features binary --locked
fi
if ! command -v moto_server >/dev/null 2>&1; then
  pip3 install -q 'moto[server]' 2>/dev/null || pip3 install -q --break-system-packages 'moto[server]'
fi
# Fleet tests (repository/tests/fleet_garage.rs, benches/fleet.sh): a three-node Garage
# cluster (crates.io `garage`, AGPL-3.0; run only as a separate test server process, never
# linked). Opt-in, COLDCLONE_GARAGE=1: building it from source does not fit a fresh CI
# machine's budget (docs/testing.md has the measured build time). Built once into
# /var/cache/coldclone/garage-<version>/ (CARGO_TARGET_DIR beside it, removed afterwards).
GARAGE_VERSION=2.5.0
GARAGE_ROOT=/var/cache/coldclone/garage-$GARAGE_VERSION
if [ "${COLDCLONE_GARAGE:-0}" = 1 ] && [ ! -x "$GARAGE_ROOT/bin/garage" ]; then
  mkdir -p /var/cache/coldclone
  CARGO_TARGET_DIR=/var/cache/coldclone/garage-build \
    cargo install -q garage --version "$GARAGE_VERSION" --locked \
      --no-default-features --features bundled-libs,lmdb --root "$GARAGE_ROOT"
  rm -rf /var/cache/coldclone/garage-build
fi
# File-level restore (`coldclone files`, tests/files_restore.rs): libguestfs's guestfish
# with its xfs support, run with the direct backend (its own QEMU appliance). supermin
# builds the appliance from the host's kernel: a Debian kernel under /boot, readable.
if ! command -v guestfish >/dev/null 2>&1 || [ ! -e /usr/lib/x86_64-linux-gnu/guestfs/supermin.d/packages-xfs ] \
   || ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends libguestfs-tools libguestfs-xfs linux-image-amd64
fi
