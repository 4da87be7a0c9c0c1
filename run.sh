#!/usr/bin/env bash
# The main job: builds what is missing, boots one Linux guest with blkswarm (directly on a
# VMX/SVM host, in the QEMU lab otherwise), streams its console and prints its result lines.
#
# Arguments go to the guest runner; defaults: --scenario boot --cpus boot=2,max=8.
# See `bash run.sh --help`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash guests/build.sh >&2
cargo build --release --locked -p blkswarm -p blkswarm-tests --bins >&2
if [ $# -eq 0 ]; then set -- --scenario boot --cpus boot=2,max=8; fi
exec target/release/blkswarm-guest "$@"
