#!/bin/bash
# Runs every test: unit tests, the real-QEMU pipeline tests, the network
# isolation tests and the repository tests (real S3 server). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# In CI the S3 tests must run against both servers, never skip.
export COLDCLONE_REQUIRE_S3S=1
cargo build --workspace --all-targets
mkdir -p target
# The QEMU tests serialize their guests themselves (2 cores, TCG).
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.txt
rc=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
awk '/^test result:/ {p+=$4; f+=$6; i+=$8} END {print p " passed, " f " failed, " i " skipped"}' target/test-output.txt
exit "$rc"
