#!/usr/bin/env bash
# The test command: installs what is missing, builds the guest and lab images (cached in
# .cache/), builds blkswarm, then runs every test: unit tests, the tiny-guest VMM tests and
# the Linux guest tests (directly on a VMX/SVM host, in the QEMU lab otherwise).
#
# Extra arguments go to `cargo test` (e.g. `bash test.sh boot_2_of_8`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash guests/build.sh
cargo build --release --locked -p blkswarm
cargo test --release --locked --workspace -- "$@"
