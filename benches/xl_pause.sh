#!/bin/bash
# The xl checkpoint's pause against guest RAM, in one Xen lab run (tests/xen-lab): PV
# guests of 128, 256 and 512 MiB, a whole coldclone backup each through the live
# checkpoint (libxl, LIBXL_SUSPEND_LIVE) and through `xl save -p`; the original's
# pause measured from the hypervisor's side (backends/examples/xl_pause_probe.rs polls
# the domain's XEN_DOMINF_* flags through libxenctrl; its resolution is printed), and
# where `lvcreate -s` spends its time. The dom0 half is benches/xl_pause_dom0.sh.
# Needs root and qemu-system-x86_64 (the lab image is built on first use).
#
#   benches/xl_pause.sh                      # 128 256 512
#   BENCH_SIZES="128 512" benches/xl_pause.sh
#
# The table is printed and written to target/xen-lab/last-run/bench-table.md; the raw
# figures are in target/xen-lab/last-run/share/out/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_SIZES=${BENCH_SIZES:-128 256 512}
COLDCLONE_XEN_LAB_SCENARIOS=bench exec cargo test --test xl_lab -- --ignored --nocapture \
  --test-threads=1 needs_xen_lab_pause_bench
