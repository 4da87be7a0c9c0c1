#!/usr/bin/env bash
# The main job: builds what is missing, boots one Linux guest with blkswarm (directly on a
# VMX/SVM host, in the QEMU lab otherwise), streams its console and prints its result lines.
#
# Arguments go to the guest runner; default: 2 of 8 possible vCPUs, 100 null virtio-blk disks
# with 2 queues each and 4 NVMe controllers with 4 I/O queue pairs each, scenario `disks`
# (the guest lists every disk it sees); blkswarm's closing report follows the guest's lines.
# `bash run.sh s4 [more arguments]` reproduces S4 (writeback starved by a read flood on a slow
# disk under mq-deadline; docs/s4-writeback-starvation.md); `bash run.sh s3` reproduces S3
# (controller failure, ANA changes and a subsystem reset under fio verify on a multipath disk).
# `bash run.sh stress [--runs N] [--vmm both] ...` runs the stress suite (fio at full rate on
# 16 raw and 100 null disks, 4 NVMe controllers x 8 queues, a multipath disk through ANA
# flips and a controller failure, 1000 disks booting) and prints its survival table, with
# QEMU as the L2 VMM beside blkswarm on `--vmm both` (blkswarm-stress --help).
# See `bash run.sh --help`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash guests/build.sh >&2
cargo build --release --locked -p blkswarm -p blkswarm-tests --bins >&2
if [ "${1:-}" = stress ]; then
    shift
    exec target/release/blkswarm-stress "$@"
elif [ "${1:-}" = s4 ]; then
    # A disk like a 7200-rpm one (a 2-GiB image, one queue of 32 like SATA NCQ, every read
    # and write occupying its one actuator for ~12 ms on average: exp, p99 55 ms) with ext4
    # on it and mq-deadline. Two readers keep 32 random reads each in flight for 40 s
    # while a buffered writer puts 256 MiB into a file and a committer appends 4 KiB and
    # runs `sync` every 0.5 s; writeback starts at 16 MiB dirty. The detector's timeout is
    # 10 s. docs/s4-writeback-starvation.md.
    shift
    set -- --scenario writeback-starvation --name s4 --cpus 2 --memory 1G --timeout 400 \
        --cmdline "blkswarm.iodepth=32 blkswarm.numjobs=2 blkswarm.runtime=40 blkswarm.write_mb=256 blkswarm.hung_secs=10" \
        --cmdline "blkswarm.s4_fs=ext4 blkswarm.s4_commit_ms=500 blkswarm.s4_commit=sync blkswarm.dirty_background_kib=16384" \
        --setup 'dd if=/dev/zero of={scratch}/s4.img bs=1M count=0 seek=2048 2>/dev/null' \
        --arg=--disk \
        --arg='path={scratch}/s4.img,num_queues=1,queue_size=32,fault_service_time=exp:55ms' \
        "$@"
elif [ "${1:-}" = s3 ]; then
    # Two controllers (A, B) of one NVM subsystem share a 64-MiB image; the guest runs fio
    # with crc32c verify on the multipath disk for 40 s (QD 8, full rate) and prints
    # its paths' ANA states once a second. The host, through the control socket: A
    # inaccessible (4 s after the first disk), optimized again through 1.5 s of change
    # (8 s), fatal (13 s: the guest resets A at its 5-s I/O timeout), an NVM Subsystem
    # Reset of both (25 s). The report's path_event lines give each one's host-side stall.
    shift
    a=0000:00:01.0
    set -- --scenario multipath --name s3 --cpus 2 --timeout 300 \
        --cmdline "nvme_core.io_timeout=5 blkswarm.iodepth=8 blkswarm.runtime=40" \
        --setup 'dd if=/dev/zero of={scratch}/shared.img bs=1M count=0 seek=64 2>/dev/null' \
        --arg=--nvme --arg='path={scratch}/shared.img,controllers=2,max_ioqpairs=2' \
        --ctl "0:ana pci=$a group=1 state=inaccessible" \
        --ctl "4:ana pci=$a group=1 state=optimized via_change_ms=1500" \
        --ctl "5:fatal pci=$a" \
        --ctl "12:reset pci=$a" \
        "$@"
elif [ $# -eq 0 ]; then
    set -- --scenario disks --cpus boot=2,max=8 --cmdline blkswarm.expect=104 --timeout 240 \
        --arg=--disks --arg=count=100,backend=null,size=1G,num_queues=2 \
        --arg=--nvmes --arg=count=4,backend=null,size=1G,max_ioqpairs=4
fi
exec target/release/blkswarm-guest "$@"
