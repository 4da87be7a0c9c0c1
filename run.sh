#!/usr/bin/env bash
# The main job: builds what is missing, boots one Linux guest with blkswarm (directly on a
# VMX/SVM host, in the QEMU lab otherwise), streams its console and prints its result lines.
#
# Arguments go to the guest runner; default: 2 of 8 possible vCPUs, 100 null virtio-blk disks
# with 2 queues each and 4 NVMe controllers with 4 I/O queue pairs each, scenario `disks`
# (the guest lists every disk it sees); blkswarm's closing report follows the guest's lines.
# See `bash run.sh --help`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash guests/build.sh >&2
cargo build --release --locked -p blkswarm -p blkswarm-tests --bins >&2
if [ $# -eq 0 ]; then
    set -- --scenario disks --cpus boot=2,max=8 --cmdline blkswarm.expect=104 --timeout 240 \
        --arg=--disks --arg=count=100,backend=null,size=1G,num_queues=2 \
        --arg=--nvmes --arg=count=4,backend=null,size=1G,max_ioqpairs=4
fi
exec target/release/blkswarm-guest "$@"
