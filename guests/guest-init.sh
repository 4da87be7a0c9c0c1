#!/bin/sh
# blkswarm L2 test guest /init (busybox sh). Built into guest/initramfs.cpio.gz by
# guests/build.sh.
#
# Kernel command line:
#   blkswarm.scenario=NAME   boot (default) | disks
#   blkswarm.expect=N        disks: wait until N disks are visible (else wait for a plateau)
#   blkswarm.timeout=S       disks: give up waiting after S seconds (default 60)
#   blkswarm.exit=MODE       poweroff (default: `poweroff -f`) | reboot (`reboot -f`)
#
# Output: only result lines "@@guest key=value ..." (serial output is expensive in the
# lab), ending with "@@guest done"; then the guest powers off. Whatever fails, "done"
# and the power-off still happen so the VMM exits.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

out() { echo "@@guest $*"; }

# Milliseconds since boot, from /proc/uptime (10 ms resolution).
uptime_ms() {
    local up s c
    read -r up _ </proc/uptime
    s=${up%.*}; c=${up#*.}; c=${c#0}
    echo $((s * 1000 + ${c:-0} * 10))
}

SCEN=boot
EXPECT=
TIMEOUT=60
EXIT_MODE=poweroff

# Mounts and the command line, in the top-level shell (main runs in a subshell).
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for w in $(cat /proc/cmdline 2>/dev/null); do
    case $w in
        blkswarm.scenario=*) SCEN=${w#*=} ;;
        blkswarm.expect=*) EXPECT=${w#*=} ;;
        blkswarm.timeout=*) TIMEOUT=${w#*=} ;;
        blkswarm.exit=*) EXIT_MODE=${w#*=} ;;
    esac
done

load_modules() {
    local m
    while read -r m; do
        [ -n "$m" ] || continue
        insmod "/lib/modules/$m.ko" >/dev/null 2>&1 || out "error=insmod-$m"
    done </etc/modules
}

# Disk names under /sys/block: virtio-blk (vd*) and NVMe namespaces. With
# NVME_MULTIPATH=y the visible nvmeXnY is the multipath head; the hidden per-path
# disks nvmeXcYnZ are skipped so each namespace counts once.
list_disks() {
    local d n
    for d in /sys/block/vd* /sys/block/nvme*; do
        [ -e "$d" ] || continue
        n=${d##*/}
        case $n in nvme*c*n*) continue ;; esac
        echo "$n"
    done
}

count_disks() { list_disks | wc -l; }

# Wait until $EXPECT disks exist, or (no EXPECT) until the count stops changing for
# 0.6 s, bounded by $TIMEOUT seconds either way.
wait_disks() {
    local deadline n last=-1 stable=0
    deadline=$(( $(uptime_ms) + TIMEOUT * 1000 ))
    while [ "$(uptime_ms)" -lt "$deadline" ]; do
        n=$(count_disks)
        if [ -n "$EXPECT" ]; then
            [ "$n" -ge "$EXPECT" ] && return 0
        else
            if [ "$n" = "$last" ]; then stable=$((stable + 1)); else stable=0; last=$n; fi
            [ "$stable" -ge 3 ] && return 0
        fi
        sleep 0.2
    done
    out "error=disk-wait-timeout have=$(count_disks) expect=${EXPECT:-plateau}"
    return 1
}

scenario_boot() {
    out "kernel=$(uname -r)"
    out "cpus_online=$(cat /sys/devices/system/cpu/online)"
    out "cpus_possible=$(cat /sys/devices/system/cpu/possible)"
    out "cpus_present=$(cat /sys/devices/system/cpu/present)"
    out "nproc=$(nproc)"
    out "uptime_ms=$(uptime_ms)"
}

scenario_disks() {
    wait_disks
    local n
    for n in $(list_disks); do
        out "disk=$n size_sectors=$(cat "/sys/block/$n/size")"
    done
    out "disks=$(count_disks)"
    out "uptime_ms=$(uptime_ms)"
}

main() {
    load_modules
    out "scenario=$SCEN"
    case $SCEN in
        boot) scenario_boot ;;
        disks) scenario_disks ;;
        *) out "error=unknown-scenario" ;;
    esac
}

# A subshell, so that an error or `exit` inside a scenario cannot skip the end.
(main)
out "done"
if [ "$EXIT_MODE" = reboot ]; then reboot -f; fi
poweroff -f
# poweroff only returns on failure; leaving /init makes the kernel panic, and with
# panic=-1 that reboots at once, which the VMM also treats as an exit.
exit 1
