#!/usr/bin/env bash
# Runs every fuzz target for a bounded time with cargo-fuzz (libFuzzer), on the machine's
# stable toolchain (RUSTC_BOOTSTRAP lets cargo-fuzz pass its nightly flags).
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]    (default 60 s, every target)
#
# Installs cargo-fuzz from crates.io if it is missing. Corpora stay in fuzz/corpus/ and
# crashes in fuzz/artifacts/ (both git-ignored); a crash fails the run. Each finding is fixed
# and its input kept as a unit test next to the code it broke.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(virtio_request nvme_io_command nvme_admin_commands)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    echo "== fuzz $target for ${seconds}s"
    cargo fuzz run --release "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len=16384 -print_final_stats=1 2>&1 |
        grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE)|ERROR|panicked|SUMMARY" || true
    # grep's status says nothing about the fuzzer's: a crash leaves an artifact.
    if compgen -G "artifacts/$target/crash-*" >/dev/null; then
        echo "fuzz: $target crashed; inputs in fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
