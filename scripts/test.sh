#!/bin/bash
# Runs every test: unit tests, the real-QEMU pipeline tests, the network
# isolation tests, the Xen lab and the repository tests (real S3 servers).
# Needs root. In CI (CI=true) a missing prerequisite fails its test; elsewhere
# it is counted as skipped in the closing line (coldclone-testkit's require).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: run as root (the tests make network namespaces, bridges, taps, loop and tmpfs mounts)" >&2
  exit 2
fi
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# In CI the S3 tests must run against both servers, never skip.
export COLDCLONE_REQUIRE_S3S=1
# Every backup a test makes from a changed-block map is checked against a read of the
# whole disk (withdrawn and failed on a difference): a wrong map can never pass CI.
export COLDCLONE_VERIFY_INCREMENTAL=1
cargo build --workspace --all-targets
mkdir -p target
export COLDCLONE_SKIP_LOG="$PWD/target/test-skips.log"
rm -f "$COLDCLONE_SKIP_LOG"
# The QEMU tests serialize their guests themselves (2 cores, TCG).
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.txt
rc=${PIPESTATUS[0]}
set -e
if [ -s "$COLDCLONE_SKIP_LOG" ]; then
  echo "Tests that could not run here (a missing tool or privilege; in CI they fail instead):"
  sed 's/^/  skipped: /' "$COLDCLONE_SKIP_LOG"
fi
# One closing line over every test binary: a test that skipped itself returned
# early and libtest counted it as passed; it is moved to the skipped count.
skips=$( [ -f "$COLDCLONE_SKIP_LOG" ] && wc -l < "$COLDCLONE_SKIP_LOG" || echo 0 )
awk -v s="$skips" '/^test result:/ {p+=$4; f+=$6; i+=$8} END {print p - s " passed, " f " failed, " i + s " skipped"}' target/test-output.txt
exit "$rc"
