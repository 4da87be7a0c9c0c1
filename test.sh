#!/usr/bin/env bash
# The test command: installs what is missing, builds the guest and lab images (cached in
# .cache/), builds blkswarm, then runs every test: unit tests, the tiny-guest VMM tests and
# the Linux guest tests (directly on a VMX/SVM host, in the QEMU lab otherwise).
#
# Every test binary runs even when an earlier one failed (--no-fail-fast); the failures are
# listed at the end, followed by every lab failure of the run (L2 triple faults, L1 deaths
# and hangs), retried or not.
#
# Extra arguments go to `cargo test` (e.g. `bash test.sh boot_2_of_8`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash guests/build.sh
# The user's kernel tree tests/tests/own_kernel.rs boots (Debian's linux-source-6.1, a
# minimal config; ~8 min on 2 cores the first time, cached in .cache/src after).
bash guests/kernel-from-source.sh >/dev/null
cargo build --release --locked -p blkswarm

# The harness appends one line per lab failure and one summary per lab run here.
export BLKSWARM_LAB_LOG="${BLKSWARM_LAB_LOG:-$PWD/target/lab-log.txt}"
mkdir -p "$(dirname "$BLKSWARM_LAB_LOG")"
: >"$BLKSWARM_LAB_LOG"

rc=0
cargo test --release --locked --workspace --no-fail-fast -- "$@" || rc=$?

echo "== lab: what the QEMU lab did during these tests ($BLKSWARM_LAB_LOG)"
if [ -s "$BLKSWARM_LAB_LOG" ]; then
    cat "$BLKSWARM_LAB_LOG"
    echo "lab failures in all: $(grep -c '^harness: LAB FAILURE' "$BLKSWARM_LAB_LOG" || true)"
else
    echo "no lab run (direct KVM, or no guest test selected)"
fi
exit "$rc"
