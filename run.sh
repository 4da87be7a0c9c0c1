#!/usr/bin/env bash
# The main job: builds what is missing, boots one Linux guest with blkswarm (directly on a
# VMX/SVM host, in the QEMU lab otherwise), streams its console and prints its result lines.
#
# Arguments go to the guest runner; default: 2 of 8 possible vCPUs, 100 null virtio-blk disks
# with 2 queues each and 4 NVMe controllers with 4 I/O queue pairs each, scenario `disks`
# (the guest lists every disk it sees); blkswarm's closing report follows the guest's lines.
# `bash run.sh s4 [more arguments]` reproduces S4 (writeback starved by a read flood on a slow
# disk under mq-deadline; docs/s4-writeback-starvation.md). See `bash run.sh --help`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash guests/build.sh >&2
cargo build --release --locked -p blkswarm -p blkswarm-tests --bins >&2
if [ "${1:-}" = s4 ]; then
    # One 2-GiB null disk whose reads take 5 ms on average (p99 20 ms) and whose writes are
    # capped at 8 MB/s: a slow disk. Two readers keep 32 random reads each in flight on its
    # first half while a buffered writer puts 256 MiB into its second half and fsyncs.
    shift
    set -- --scenario writeback-starvation --name s4 --cpus 2 --memory 1G --timeout 300 \
        --cmdline "blkswarm.iodepth=32 blkswarm.numjobs=2 blkswarm.runtime=30 blkswarm.write_mb=256 blkswarm.hung_secs=10" \
        --arg=--disk \
        --arg=backend=null,size=2G,num_queues=2,fault_read_latency=exp:20ms,fault_write_bandwidth=8M \
        "$@"
elif [ $# -eq 0 ]; then
    set -- --scenario disks --cpus boot=2,max=8 --cmdline blkswarm.expect=104 --timeout 240 \
        --arg=--disks --arg=count=100,backend=null,size=1G,num_queues=2 \
        --arg=--nvmes --arg=count=4,backend=null,size=1G,max_ioqpairs=4
fi
exec target/release/blkswarm-guest "$@"
