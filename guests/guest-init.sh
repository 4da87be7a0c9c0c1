#!/bin/sh
# shellcheck shell=dash
# (busybox ash, checked as dash: both have `local`)
# blkswarm L2 test guest /init (busybox sh). Built into guest/initramfs.cpio.gz by
# guests/build.sh.
#
# Kernel command line (guests/README.md has the full table):
#   blkswarm.scenario=NAME   boot (default) | disks | disk-info | fio | stress |
#                            pattern-write | ro-check | probe | nvme-info (nvme-cli: id-ctrl,
#                            id-ns, list, smart-log, get-feature -f 7, blk-mq map, vectors)
#   blkswarm.expect=N        wait until N disks are visible (else wait for a plateau)
#   blkswarm.timeout=S       give up waiting for disks after S seconds (default 60)
#   blkswarm.exit=MODE       poweroff (default: `poweroff -f`) | reboot (`reboot -f`)
#   blkswarm.disk=NAME       fio, pattern-write, ro-check: the disk (default: the first)
#   fio: blkswarm.rw= bs= iodepth= numjobs= runtime= size= ioengine= direct= verify=
#   pattern-write: blkswarm.seed=N blkswarm.sectors=N
#   durability: blkswarm.seed=N blkswarm.sectors=N (a multiple of 128)
#   disk-info: blkswarm.irqs=0 (no per-vector irq= lines)
#   multipath (S3): fio verify over the first NVMe multipath disk for blkswarm.runtime= s
#                   (iodepth=), the paths' ANA and controller states once a second;
#                   blkswarm.reset=PCI@S: the guest resets the controller at PCI S s in;
#                   blkswarm.rate_iops=N caps fio's writes (0: as fast as it can);
#                   blkswarm.mp_watch=1: no fio, only the samples for runtime= s (null
#                   namespaces, several per subsystem: ANA groups spanning them)
#   writeback-starvation (S4): blkswarm.iodepth= numjobs= runtime= (the read flood),
#                            blkswarm.write_mb=N (buffered writer), blkswarm.hung_secs=N;
#                            blkswarm.s4_fs=raw (default: the writer on the raw disk's
#                            second half) | ext4 (a filesystem on the whole disk, the
#                            writer's file in it); blkswarm.s4_commit_ms=N: a committer
#                            appends 4 KiB to a log file and fsyncs it every N ms (ext4;
#                            0: none); blkswarm.s4_flood=0: no read flood (the control);
#                            blkswarm.dirty_background_kib= dirty_kib= (vm sysctls)
#   stress: fio on every disk at once (one job per disk, one fio): blkswarm.stress=verify
#           (default: randwrite + crc32c verify) | randrw (70 % reads) | both (verify, then
#           randrw); blkswarm.stress_disks=N (the first N disks; default all); iodepth=
#           (default 8) runtime= (default 60) size= (per disk, default 32m)
#   run: the user's command from /etc/blkswarm/run after the disks are up (blkswarm-guest
#        --run), its output as "@@run LINE", run_status=N, then the files to fetch back
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
DISK=
FIO_RW=randread
FIO_BS=4k
FIO_QD=1
FIO_JOBS=1
FIO_RUNTIME=
FIO_SIZE=
FIO_ENGINE=libaio
FIO_DIRECT=1
FIO_VERIFY=
SEED=1
SECTORS=2048
IRQS=1
WRITE_MB=256
HUNG_SECS=10
RESET_AT=
FIO_RATE_IOPS=0
MP_WATCH=
STRESS=verify
STRESS_DISKS=
S4_FS=raw
S4_FLOOD=1
S4_COMMIT_MS=0
S4_COMMIT=fsync
DIRTY_BG_KIB=
DIRTY_KIB=

# Mounts and the command line, in the top-level shell (main runs in a subshell).
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
CMDLINE=
read -r CMDLINE </proc/cmdline 2>/dev/null
for w in $CMDLINE; do
    case $w in
        blkswarm.scenario=*) SCEN=${w#*=} ;;
        blkswarm.expect=*) EXPECT=${w#*=} ;;
        blkswarm.timeout=*) TIMEOUT=${w#*=} ;;
        blkswarm.exit=*) EXIT_MODE=${w#*=} ;;
        blkswarm.disk=*) DISK=${w#*=} ;;
        blkswarm.rw=*) FIO_RW=${w#*=} ;;
        blkswarm.bs=*) FIO_BS=${w#*=} ;;
        blkswarm.iodepth=*) FIO_QD=${w#*=} ;;
        blkswarm.numjobs=*) FIO_JOBS=${w#*=} ;;
        blkswarm.runtime=*) FIO_RUNTIME=${w#*=} ;;
        blkswarm.size=*) FIO_SIZE=${w#*=} ;;
        blkswarm.ioengine=*) FIO_ENGINE=${w#*=} ;;
        blkswarm.direct=*) FIO_DIRECT=${w#*=} ;;
        blkswarm.verify=*) FIO_VERIFY=${w#*=} ;;
        blkswarm.seed=*) SEED=${w#*=} ;;
        blkswarm.sectors=*) SECTORS=${w#*=} ;;
        blkswarm.irqs=*) IRQS=${w#*=} ;;
        blkswarm.write_mb=*) WRITE_MB=${w#*=} ;;
        blkswarm.hung_secs=*) HUNG_SECS=${w#*=} ;;
        blkswarm.reset=*) RESET_AT=${w#*=} ;;
        blkswarm.rate_iops=*) FIO_RATE_IOPS=${w#*=} ;;
        blkswarm.mp_watch=*) MP_WATCH=${w#*=} ;;
        blkswarm.stress=*) STRESS=${w#*=} ;;
        blkswarm.stress_disks=*) STRESS_DISKS=${w#*=} ;;
        blkswarm.s4_fs=*) S4_FS=${w#*=} ;;
        blkswarm.s4_flood=*) S4_FLOOD=${w#*=} ;;
        blkswarm.s4_commit_ms=*) S4_COMMIT_MS=${w#*=} ;;
        blkswarm.s4_commit=*) S4_COMMIT=${w#*=} ;;
        blkswarm.dirty_background_kib=*) DIRTY_BG_KIB=${w#*=} ;;
        blkswarm.dirty_kib=*) DIRTY_KIB=${w#*=} ;;
    esac
done

# MODULE.PARAM=VALUE words of the kernel command line for module $1 (nvme_core.io_timeout=5),
# as PARAM=VALUE: modprobe would pass them, busybox insmod needs them spelled out (without
# this, nvme_core.io_timeout on the command line silently stayed 30 s).
module_params() {
    local w prefix
    prefix="$(echo "$1" | tr - _)."
    for w in $CMDLINE; do
        case $w in "$prefix"*=*) echo "${w#"$prefix"}" ;; esac
    done
}

load_modules() {
    local m
    while read -r m; do
        [ -n "$m" ] || continue
        # shellcheck disable=SC2046 # one word per parameter
        insmod "/lib/modules/$m.ko" $(module_params "$m") >/dev/null 2>&1 || out "error=insmod-$m"
    done <"${1:-/etc/modules}"
}

# The modules only some scenarios need (ext4), not loaded at boot (guests/build.sh).
load_ondemand_modules() { load_modules /etc/modules.ondemand; }

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

# The disk a single-disk scenario works on: blkswarm.disk=NAME (waited for), else the
# first disk once the disk count settles (or blkswarm.expect disks are there). Sets DISK.
pick_disk() {
    local deadline
    if [ -n "$DISK" ]; then
        deadline=$(( $(uptime_ms) + TIMEOUT * 1000 ))
        while [ ! -b "/dev/$DISK" ] && [ "$(uptime_ms)" -lt "$deadline" ]; do sleep 0.1; done
    else
        wait_disks
        DISK=$(list_disks | head -n 1)
    fi
    if [ -z "$DISK" ] || [ ! -b "/dev/$DISK" ]; then
        out "error=no-disk disk=${DISK:-none} have=$(count_disks)"
        return 1
    fi
    out "disk=$DISK"
    # The PCI function behind the disk (the last PCI address on its sysfs device path), so
    # the host's per-disk report can be matched.
    out "disk_pci=$(readlink -f "/sys/block/$DISK/device" | grep -o '[0-9a-f]\{4\}:[0-9a-f]\{2\}:[0-9a-f]\{2\}\.[0-9a-f]' | tail -n 1)"
}

# What the block layer completed on disk $1 since boot (/sys/block/$1/stat: read, write,
# discard and flush I/Os), and the interrupts of its device's vectors, as result lines:
# the host's per-disk request and per-vector interrupt counts must match them.
disk_accounting() {
    local dev
    awk '{ print "@@guest disk_requests=" $1 + $5 + $12 + $16; print "@@guest disk_flushes=" $16 }' "/sys/block/$1/stat"
    dev=$(readlink -f "/sys/block/$1/device"); dev=${dev##*/}
    irq_counts | awk -v d="$dev" 'index($1, d "-") == 1 || ($1 ~ "^" d "q[0-9]+$") {
        print "@@guest disk_irq=" $1 " count=" $2 }'
}

# First line of file $1 (an error message) as one result-line value, at most 160 chars.
first_line() { head -n 1 "$1" 2>/dev/null | cut -c1-160; }

# /proc/interrupts -> "NAME COUNT" (count summed over CPUs) for virtio and NVMe vectors.
irq_counts() {
    awk 'NR == 1 { ncpu = NF; next }
         $NF ~ /^(virtio[0-9]+-|nvme[0-9]+q[0-9]+$)/ {
             c = 0; for (i = 2; i <= ncpu + 1; i++) c += $i; print $NF, c }' /proc/interrupts
}

scenario_disk_info() {
    wait_disks
    local n p m dev mq irqs
    irq_counts >/tmp/irqs
    for n in $(list_disks); do
        # An NVMe multipath head nvme<S>n<H> (bio-based, no mq/) reports its first
        # path disk nvme<S>c<C>n<H>, whose device is the controller nvme<C>.
        p=$n
        case $n in
            nvme*n*)
                m=${n#nvme}
                for m in "/sys/block/nvme${m%%n*}c"*"n${n##*n}"; do
                    if [ -e "$m" ]; then p=${m##*/}; fi
                    break
                done ;;
        esac
        set -- "/sys/block/$p/mq/"*
        if [ -e "$1" ]; then mq=$#; else mq=0; fi
        dev=$(readlink -f "/sys/block/$p/device"); dev=${dev##*/}
        # Vectors of this disk's device: virtioN-config, virtioN-req.Q; nvmeNqQ.
        irqs=$(awk -v d="$dev" 'index($1, d "-") == 1 || ($1 ~ "^" d "q[0-9]+$") { k++ } END { print k + 0 }' /tmp/irqs)
        out "disk=$n size_sectors=$(cat "/sys/block/$n/size") mq=$mq lbs=$(cat "/sys/block/$n/queue/logical_block_size") ro=$(cat "/sys/block/$n/ro") dev=$dev vectors=$irqs"
    done
    if [ "$IRQS" = 1 ]; then
        while read -r n c; do out "irq=$n count=$c"; done </tmp/irqs
    fi
    out "disks=$(count_disks)"
    out "uptime_ms=$(uptime_ms)"
}

# Every virtio-blk PCI function as "PCI_ADDRESS VIRTIO_DEVICE DISK" ("none" where there
# is none: virtio_pci or virtio_blk failed its probe), in PCI address order (the order
# of the host's `@@vmm disk` lines). Shell builtins only: no process per device.
list_virtio_blk_functions() {
    local p v b vendor device dev disk
    for p in /sys/bus/pci/devices/*; do
        read -r vendor <"$p/vendor" 2>/dev/null || continue
        read -r device <"$p/device" 2>/dev/null || continue
        # Virtio block: 0x1042 modern, 0x1001 transitional.
        [ "$vendor" = 0x1af4 ] || continue
        case $device in 0x1042 | 0x1001) ;; *) continue ;; esac
        dev=none
        disk=none
        for v in "$p"/virtio*; do
            [ -e "$v" ] || continue
            dev=${v##*/}
            for b in "$v"/block/*; do
                if [ -e "$b" ]; then disk=${b##*/}; fi
            done
        done
        echo "${p##*/} $dev $disk"
    done
}

# The probe report from $1 (/proc/interrupts), $2 (dmesg probe failures) and $3
# (list_virtio_blk_functions). irq_mode, as Linux's vp_find_vqs named the IRQs:
# virtioN-req.K (one per queue) -> per-queue; virtioN-virtqueues -> shared; virtioN on a
# legacy line -> intx; no IRQ at all -> none. vectors counts virtioN-* MSI-X vectors.
# Lines stay short (guest console output costs ~0.3 ms per character in the lab):
#   @@guest vdisk=vda pci=0000:00:01.0 irq_mode=per-queue vectors=3
#   @@guest probe_failed=0000:00:05.0 error=-28   (error: from dmesg, else "none")
probe_report() {
    awk -v interrupts="$1" -v failures="$2" '
    FILENAME == interrupts {
        if (FNR == 1) next
        for (i = 2; i <= NF; i++) {
            f = $i
            if (f ~ /^virtio[0-9]+-/) {
                d = f; sub(/-.*/, "", d); what = substr(f, length(d) + 2)
                vectors[d]++
                if (what == "virtqueues") shared[d] = 1
                else if (what != "config") per_queue[d] = 1
            } else if (f ~ /^virtio[0-9]+,?$/) {
                sub(/,$/, "", f); intx[f] = 1
            }
        }
        next
    }
    FILENAME == failures {
        # 6.12: "virtio_blk virtio7: probe with driver virtio_blk failed with error -28";
        # older: "virtio_blk: probe of virtio7 failed with error -16".
        d = ""
        for (i = 1; i < NF; i++) { f = $i; sub(/:$/, "", f); if (f ~ /^virtio[0-9]+$/) { d = f; break } }
        if (d == "") next
        code = $NF; errors++
        if (!(code in per_code)) codes[++ncodes] = code
        per_code[code]++
        error_of[d] = code
        next
    }
    {
        total++
        if ($3 == "none") {
            failed++; code = "none"
            if ($2 in error_of) code = error_of[$2]
            print "@@guest probe_failed=" $1 " error=" code
            next
        }
        d = $2; mode = "none"
        if (d in shared) mode = "shared"
        else if (d in per_queue) mode = "per-queue"
        else if (d in intx) mode = "intx"
        modes[mode]++
        print "@@guest vdisk=" $3 " pci=" $1 " irq_mode=" mode " vectors=" vectors[d] + 0
    }
    END {
        print "@@guest probe_errors=" errors + 0
        for (i = 1; i <= ncodes; i++) print "@@guest probe_error_code=" codes[i] " count=" per_code[codes[i]]
        print "@@guest virtio_disks=" total + 0 " per_queue=" modes["per-queue"] + 0 \
            " shared=" modes["shared"] + 0 " intx=" modes["intx"] + 0 " none=" modes["none"] + 0 \
            " probe_failed=" failed + 0
    }' "$1" "$2" "$3"
}

# What became of every virtio-blk PCI function, to match disk by disk against the host's
# `@@vmm disk` lines (SCENARIOS.md S1).
scenario_probe() {
    wait_disks
    list_virtio_blk_functions >/tmp/virtio-blk
    # The whole ring buffer: 500 disks log more than busybox reads by default.
    dmesg -s 4194304 2>/dev/null | grep 'failed with error' >/tmp/probe-failures
    probe_report /proc/interrupts /tmp/probe-failures /tmp/virtio-blk
    out "disks=$(count_disks)"
    out "uptime_ms=$(uptime_ms)"
}

# fio's JSON output (one key per line) flattened to "a.b.c=value" lines; array
# elements are numbered from 0: jobs.0.read.iops=1234.5,
# jobs.0.read.clat_ns.percentile.99.000000=12345.
flatten_json() {
    awk '
    function key(l) { sub(/^"/, "", l); sub(/"[ \t]*:.*$/, "", l); return l }
    function path(  i, p) { p = st[1]; for (i = 2; i <= d; i++) p = p "." st[i]; return p }
    {
        l = $0; gsub(/^[ \t]+/, "", l); gsub(/[ \t,]+$/, "", l)
        if (l ~ /^"[^"]*"[ \t]*:[ \t]*[{[]$/) { st[++d] = key(l); idx[d] = 0; next }
        if (l == "{") { if (d > 0) { st[d + 1] = idx[d]++; d++ } next }
        if (l ~ /^[]}]$/) { if (d > 0) d--; next }
        if (l ~ /^"[^"]*"[ \t]*:/) {
            v = l; sub(/^"[^"]*"[ \t]*:[ \t]*/, "", v); gsub(/"/, "", v)
            print (d > 0 ? path() "." : "") key(l) "=" v
        }
    }'
}

# Value of flattened key $1 in /tmp/fio.flat (empty if absent).
fio_get() { awk -v k="$1" 'index($0, k "=") == 1 { print substr($0, length(k) + 2); exit }' /tmp/fio.flat; }

# fio's exit status $1 and /tmp/fio.json (and .err) as fio_rc, fio_errors and, when it
# failed, fio_error (the errno) and fio_stderr; leaves /tmp/fio.flat for fio_get.
fio_outcome() {
    local rc=$1 err total
    out "fio_rc=$rc"
    flatten_json </tmp/fio.json >/tmp/fio.flat 2>/dev/null
    err=$(fio_get jobs.0.error)
    total=$(fio_get jobs.0.total_err)
    [ -n "$total" ] || { [ "${err:-0}" = 0 ] && total=0 || total=1; }
    out "fio_errors=$total"
    if [ "$rc" != 0 ] || [ "${err:-0}" != 0 ]; then
        out "fio_error=${err:-none}"
        out "fio_stderr=$(first_line /tmp/fio.err)"
    fi
}

# Prints the results of one direction (read|write) if it did any I/O.
fio_report_dir() {
    local d=$1 ios p
    ios=$(fio_get "jobs.0.$d.total_ios")
    [ -n "$ios" ] && [ "$ios" != 0 ] || return 0
    out "fio_${d}_iops=$(fio_get "jobs.0.$d.iops" | awk '{ printf "%.0f", $1 }')"
    out "fio_${d}_bw_kib=$(fio_get "jobs.0.$d.bw")"
    for p in 50:p50 99:p99 99.9:p999; do
        out "fio_${d}_clat_${p#*:}_us=$(fio_get "jobs.0.$d.clat_ns.percentile.$(printf '%f' "${p%:*}")" | awk '{ printf "%.1f", $1 / 1000 }')"
    done
}

scenario_fio() {
    pick_disk || return 0
    local rw=$FIO_RW rc err
    set -- --name=blkswarm "--filename=/dev/$DISK" "--bs=$FIO_BS" "--iodepth=$FIO_QD" \
        "--numjobs=$FIO_JOBS" "--ioengine=$FIO_ENGINE" "--direct=$FIO_DIRECT" \
        --group_reporting --output-format=json --output=/tmp/fio.json
    if [ -n "$FIO_VERIFY" ]; then
        # Write, then read everything back and check it; the first bad block fails the job.
        case $rw in write | randwrite) ;; *) rw="write" ;; esac
        set -- "$@" "--verify=$FIO_VERIFY" --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
            "--size=${FIO_SIZE:-16m}"
        # Each job verifies only what it wrote: jobs sharing blocks would overwrite each
        # other's headers and fail verification with no fault in the device.
        if [ "$FIO_JOBS" -gt 1 ]; then set -- "$@" "--offset_increment=${FIO_SIZE:-16m}"; fi
        if [ -n "$FIO_RUNTIME" ]; then set -- "$@" "--runtime=$FIO_RUNTIME"; fi
    else
        if [ -n "$FIO_SIZE" ]; then set -- "$@" "--size=$FIO_SIZE"; fi
        if [ -n "$FIO_RUNTIME" ] || [ -z "$FIO_SIZE" ]; then
            set -- "$@" --time_based "--runtime=${FIO_RUNTIME:-5}"
        fi
    fi
    set -- "$@" "--rw=$rw"
    fio "$@" >/dev/null 2>/tmp/fio.err
    rc=$?
    fio_outcome "$rc"
    err=$(fio_get jobs.0.error)
    fio_report_dir read
    fio_report_dir write
    if [ -n "$FIO_VERIFY" ]; then
        if [ "$rc" = 0 ] && [ "${err:-0}" = 0 ]; then out "fio_verify=ok"; else out "fio_verify=failed"; fi
    fi
    # Controller resets the kernel logged (NVMe: "controller is down; will reset", "I/O ...
    # timeout, reset controller", "resetting controller").
    out "kernel_resets=$(dmesg | grep -c -i 'will reset\|reset controller\|resetting controller')"
    out "kernel_timeouts=$(dmesg | grep -c -i 'timeout, ')"
    # Whatever fio met, the disk must serve I/O now.
    if dd "if=/dev/$DISK" of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null; then
        out "read_after=ok"
    else
        out "read_after=failed"
    fi
    disk_accounting "$DISK"
}

# fio's size syntax (32m, 1g, 64MiB, 4096; k, m, g, t are powers of 1024 as fio reads
# them) in bytes; 0 if it is not that.
size_bytes() {
    local v=$1 m=1
    v=${v%[iI][bB]}; v=${v%[bB]}
    case $v in
        *[kK]) m=1024 ;;
        *[mM]) m=1048576 ;;
        *[gG]) m=1073741824 ;;
        *[tT]) m=1099511627776 ;;
    esac
    v=${v%[kKmMgGtT]}
    case $v in '' | *[!0-9]*) echo 0 ;; *) echo $((v * m)) ;; esac
}

# One stress phase, $1: verify | randrw, for $2 seconds at iodepth $3: one fio, one job
# (a thread) per line "NAME BYTES" of /tmp/stress.disks, all at once, no group_reporting.
# Prints the phase's summary line, one line per failed job and, if anything failed, fio's
# first stderr line.
stress_phase() {
    local phase=$1 runtime=$2 qd=$3 n bytes rc
    set -- --thread --output-format=json --output=/tmp/stress.json --ioengine=libaio \
        --direct=1 --bs=4k "--iodepth=$qd" --time_based "--runtime=$runtime"
    if [ "$phase" = verify ]; then
        # fio 3.33 time_based: a write job reaches its verify phase only after issuing
        # 2 x size (writes and backlog reads), and the last round's verify never runs (the
        # runtime ends the job): verify_backlog reads back and checks every 32 blocks as
        # soon as they are written (a 10-s run in the lab writes a few hundred per disk).
        set -- "$@" --rw=randwrite --verify=crc32c --verify_backlog=32 --verify_fatal=1 \
            --verify_state_save=0
    else
        set -- "$@" --rw=randrw --rwmixread=70
    fi
    while read -r n bytes; do
        set -- "$@" "--name=$n" "--filename=/dev/$n" "--size=$bytes"
    done </tmp/stress.disks
    : >/tmp/stress.json
    fio "$@" >/dev/null 2>/tmp/stress.err
    rc=$?
    flatten_json </tmp/stress.json >/tmp/stress.flat 2>/dev/null
    # Per job (jobs.K.*): its name (the disk), errno, I/Os by direction and how long it ran.
    # IOPS are I/Os over job_runtime: fio's read.iops of a time_based verify job is 0 (the
    # read runtime is only counted after a verify phase, which the runtime's end skips). A
    # verify job that read nothing back verified nothing: it fails too (error=no-reads).
    awk -v phase="$phase" -v rc="$rc" -v want="$(wc -l </tmp/stress.disks)" '
    {
        eq = index($0, "="); k = substr($0, 1, eq - 1); v = substr($0, eq + 1)
        if (k !~ /^jobs\.[0-9]+\./) next
        j = k; sub(/^jobs\./, "", j); sub(/\..*/, "", j)
        f = substr(k, length(j) + 7)
        if (!(j in seen)) { seen[j] = 1; order[++n] = j }
        if (f == "jobname") name[j] = v
        else if (f == "error") err[j] = v
        else if (f == "read.total_ios") rios[j] = v
        else if (f == "write.total_ios") wios[j] = v
        else if (f == "job_runtime") ms[j] = v
    }
    END {
        for (i = 1; i <= n; i++) {
            j = order[i]
            r += rios[j]; w += wios[j]
            if (ms[j] + 0 > 0) { ri += rios[j] * 1000 / ms[j]; wi += wios[j] * 1000 / ms[j] }
            e = err[j] + 0 ? err[j] : ""
            if (e == "" && phase == "verify" && rios[j] + 0 == 0) e = "no-reads"
            if (e != "") bad[++failed] = "@@guest stress_failed=" name[j] " error=" e
        }
        verify = "none"
        if (phase == "verify") verify = (rc == 0 && !failed && n == want) ? "ok" : "failed"
        printf "@@guest stress_phase=%s fio_rc=%s jobs=%d jobs_ok=%d jobs_failed=%d", \
            phase, rc, n, n - failed, failed
        printf " read_ios=%.0f write_ios=%.0f read_iops=%.0f write_iops=%.0f verify=%s\n", \
            r, w, ri, wi, verify
        for (i = 1; i <= failed; i++) print bad[i]
        exit (rc != 0 || failed || n != want)
    }' /tmp/stress.flat ||
        out "stress_fio_stderr=$(first_line /tmp/stress.err)"
}

# fio at full rate on every disk (or the first blkswarm.stress_disks) at once, one job per
# disk in one fio: crc32c-verified random writes (verify), 70/30 random reads and writes
# (randrw), or both in turn; then what the kernel logged and whether each disk still reads.
scenario_stress() {
    wait_disks
    local runtime=${FIO_RUNTIME:-60} qd=8 size n sectors bytes failed=0
    # blkswarm.iodepth=, if given; FIO_QD's default (1) is the fio scenario's.
    case " $CMDLINE " in *" blkswarm.iodepth="*) qd=$FIO_QD ;; esac
    case $STRESS in
        verify | randrw | both) ;;
        *) out "error=unknown-stress-mode"; return 0 ;;
    esac
    size=$(size_bytes "${FIO_SIZE:-32m}")
    if [ "$size" -lt 4096 ]; then
        out "error=bad-size size=$FIO_SIZE"
        return 0
    fi
    : >/tmp/stress.disks
    for n in $(list_disks | head -n "${STRESS_DISKS:-100000}"); do
        # size per disk, capped at the disk's size, in whole 4-KiB blocks.
        read -r sectors <"/sys/block/$n/size"
        bytes=$((sectors * 512))
        [ "$bytes" -le "$size" ] || bytes=$size
        echo "$n $((bytes / 4096 * 4096))" >>/tmp/stress.disks
    done
    out "stress_mode=$STRESS"
    out "stress_disks=$(wc -l </tmp/stress.disks)"
    if [ ! -s /tmp/stress.disks ]; then
        out "error=no-disk disk=none have=$(count_disks)"
        return 0
    fi
    out "stress_runtime_s=$runtime"
    case $STRESS in verify | both) stress_phase verify "$runtime" "$qd" ;; esac
    case $STRESS in randrw | both) stress_phase randrw "$runtime" "$qd" ;; esac
    # The whole ring buffer (100 disks log more than busybox reads by default).
    dmesg -s 4194304 >/tmp/stress.dmesg 2>/dev/null
    out "kernel_io_errors=$(grep -c 'I/O error\|critical' /tmp/stress.dmesg)"
    out "kernel_resets=$(grep -c -i 'will reset\|reset controller\|resetting controller' /tmp/stress.dmesg)"
    out "kernel_timeouts=$(grep -c -i 'timeout, ' /tmp/stress.dmesg)"
    # Whatever fio met, every disk must serve I/O now.
    while read -r n bytes; do
        if ! dd "if=/dev/$n" of=/dev/null bs=65536 count=1 iflag=direct 2>/dev/null; then
            failed=$((failed + 1))
            out "stress_read_failed=$n"
        fi
    done </tmp/stress.disks
    out "read_after_failed=$failed"
}

# Value of flattened key $1 in file $2 (empty if absent).
json_get() { awk -v k="$1" 'index($0, k "=") == 1 { print substr($0, length(k) + 2); exit }' "$2"; }

# nvme_json OUT ARGS...: runs `nvme ARGS -o json`, flattens its output into OUT; a failure
# is printed as nvme_error=..., never ignored.
nvme_json() {
    local f=$1 rc; shift
    nvme "$@" -o json >"$f.json" 2>"$f.err"
    rc=$?
    if [ "$rc" != 0 ]; then
        out "nvme_error=$1 rc=$rc msg=$(first_line "$f.err")"
        return 1
    fi
    flatten_json <"$f.json" >"$f"
}

# What nvme-cli and sysfs say about every NVMe controller and namespace.
scenario_nvme_info() {
    wait_disks
    local c n=0 ns lbaf value
    out "nvme_cli_version=$(nvme version 2>&1 | head -n 1)"
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c" ] || continue
        c=${c##*/}
        n=$((n + 1))
        if nvme_json /tmp/idctrl id-ctrl "/dev/$c"; then
            out "nvme_ctrl=$c serial=$(json_get sn /tmp/idctrl | tr -d ' ') mdts=$(json_get mdts /tmp/idctrl) nn=$(json_get nn /tmp/idctrl) vwc=$(json_get vwc /tmp/idctrl) oacs=$(json_get oacs /tmp/idctrl) fr=$(json_get fr /tmp/idctrl | tr -d ' ')"
            out "nvme_model=$(json_get mn /tmp/idctrl | sed 's/ *$//')"
        fi
        if nvme_json /tmp/smart smart-log "/dev/$c"; then
            out "nvme_smart_ok=1"
            out "nvme_smart_temperature=$(json_get temperature /tmp/smart)"
        fi
        # Number of Queues: nvme-cli prints "... Current value:0x00030003".
        value=$(nvme get-feature "/dev/$c" -f 7 2>/tmp/feature.err | sed -n 's/.*Current value: *\(0x[0-9a-fA-F]*\).*/\1/p')
        if [ -n "$value" ]; then out "nvme_feature7=$value"; else out "nvme_error=get-feature-7 msg=$(first_line /tmp/feature.err)"; fi
    done
    out "nvme_ctrls=$n"
    for ns in $(list_disks | grep '^nvme'); do
        if nvme_json /tmp/idns id-ns "/dev/$ns"; then
            lbaf=$(( $(json_get flbas /tmp/idns) & 15 ))
            out "nvme_ns=$ns nsze=$(json_get nsze /tmp/idns) ncap=$(json_get ncap /tmp/idns) lbads=$(json_get "lbafs.$lbaf.ds" /tmp/idns) nguid=$(json_get nguid /tmp/idns)"
        fi
        set -- "/sys/block/$ns/mq/"*
        if [ -e "$1" ]; then out "nvme_mq_queues=$#"; else out "nvme_mq_queues=0"; fi
        for c in "$@"; do
            [ -e "$c/cpu_list" ] && out "nvme_mq=$ns hctx=${c##*/} cpus=$(cat "$c/cpu_list")"
        done
    done
    if nvme_json /tmp/list list; then
        out "nvme_list_count=$(grep -c '^Devices\.[0-9]*\.DevicePath=' /tmp/list)"
    fi
    irq_counts | awk '$1 ~ /^nvme/ { printf "@@guest nvme_irq=%s count=%s\n", $1, $2 }'
}

# Writes blkswarm-pattern SEED SECTORS (guests/pattern.sh) to the first SECTORS sectors
# with O_DIRECT, fsyncs (a device flush), drops the page cache and reads it back.
scenario_pattern_write() {
    pick_disk || return 0
    local bytes=$((SECTORS * 512)) want got rc
    want=$(blkswarm-pattern "$SEED" "$SECTORS" | sha256sum); want=${want%% *}
    blkswarm-pattern "$SEED" "$SECTORS" |
        dd "of=/dev/$DISK" bs=64k iflag=fullblock oflag=direct conv=notrunc,fsync 2>/tmp/dd.err
    rc=$?
    if [ "$rc" != 0 ]; then
        out "error=pattern-write rc=$rc $(first_line /tmp/dd.err)"
        return 0
    fi
    sync
    blockdev --flushbufs "/dev/$DISK" 2>/dev/null
    echo 3 >/proc/sys/vm/drop_caches
    out "pattern_written=$SECTORS"
    out "pattern_seed=$SEED"
    out "pattern_sha256=$want"
    got=$(dd "if=/dev/$DISK" bs=64k iflag=direct,count_bytes "count=$bytes" 2>/dev/null | sha256sum)
    got=${got%% *}
    if [ "$got" = "$want" ]; then out "pattern_readback=ok"; else out "pattern_readback=mismatch"; fi
}

# Tries to write one logical block (its own current contents, so nothing changes if the
# write is wrongly accepted) with O_DIRECT + fsync.
scenario_ro_check() {
    pick_disk || return 0
    local lbs
    lbs=$(cat "/sys/block/$DISK/queue/logical_block_size")
    out "ro_flag=$(cat "/sys/block/$DISK/ro")"
    dd "if=/dev/$DISK" of=/tmp/block0 "bs=$lbs" count=1 iflag=direct 2>/dev/null
    if dd if=/tmp/block0 "of=/dev/$DISK" "bs=$lbs" count=1 oflag=direct conv=notrunc,fsync 2>/tmp/dd.err; then
        out "ro_write=accepted"
    else
        out "ro_write=rejected"
        out "ro_write_error=$(first_line /tmp/dd.err)"
    fi
}

# Reads the first 16 4-KiB blocks of the disk one by one with O_DIRECT (one request each,
# no readahead, no retries by the block layer), then writes them back the same way: what
# failed, and the I/O errors the kernel logged for the disk, for a host that injects faults.
scenario_fault_io() {
    pick_disk || return 0
    local block failed_reads=0 failed_writes=0 logged
    for block in $(seq 0 15); do
        if ! dd "if=/dev/$DISK" of=/tmp/block "bs=4096" count=1 "skip=$block" iflag=direct 2>/dev/null; then
            failed_reads=$((failed_reads + 1))
            out "read_failed=$block"
            dd if=/dev/zero of=/tmp/block bs=4096 count=1 2>/dev/null
        fi
        if ! dd if=/tmp/block "of=/dev/$DISK" "bs=4096" count=1 "seek=$block" oflag=direct conv=notrunc 2>/dev/null; then
            failed_writes=$((failed_writes + 1))
            out "write_failed=$block"
        fi
    done
    out "failed_reads=$failed_reads"
    out "failed_writes=$failed_writes"
    # virtio-blk: "I/O error, dev vda, sector ..."; NVMe: "critical medium error, dev
    # nvme0n1, ..." (reads) and "critical target error" or "I/O error" (writes).
    logged=$(dmesg | grep -c "error, dev $DISK, sector")
    out "kernel_io_errors=$logged"
    disk_accounting "$DISK"
}

# Writes the pattern in 64-KiB chunks, each with O_DIRECT and an fsync (a flush the device
# must complete only once the chunk is durable), printing after each completed flush how
# many sectors are acknowledged; a host that kills the VMM at any moment must find at least
# those sectors in the image.
scenario_durability() {
    pick_disk || return 0
    local chunk=0 chunks=$((SECTORS / 128))
    while [ "$chunk" -lt "$chunks" ]; do
        blkswarm-pattern "$SEED" 128 $((chunk * 128)) |
            dd "of=/dev/$DISK" bs=65536 count=1 "seek=$chunk" iflag=fullblock oflag=direct \
                conv=notrunc,fsync 2>/tmp/dd.err || {
            out "error=durability-write $(first_line /tmp/dd.err)"
            return 0
        }
        chunk=$((chunk + 1))
        out "flushed_sectors=$((chunk * 128))"
    done
    out "durability_done=$((chunks * 128))"
}

# S4 (../shared/SCENARIOS.md): mq-deadline, a direct random-read flood on the first half of
# the disk, and a buffered writer (dd, then fsync) whose writeback must get through the
# reads: on the raw disk's second half, or (s4_fs=ext4) as a file in an ext4 filesystem on
# the whole disk, beside a committer that appends 4 KiB to a log file and fsyncs it every
# s4_commit_ms (a database's log: small, synchronous, and behind everything the writer
# dirtied). Once a second: what the guest's block layer holds (allocated, not yet
# completed: in the scheduler or on the device) by direction, and dirty and writeback
# memory. At the end: the flood's results, the writer's and the committer's times, and the
# hung-task warnings with each task's stack (the detector's timeout is lowered to
# blkswarm.hung_secs). The host's report of the same run has per-request timing and
# in-flight depth over time beside it. docs/s4-writeback-starvation.md.
scenario_writeback_starvation() {
    pick_disk || return 0
    local q="/sys/block/$DISK/queue" size_mb flood_mb start flood= rc err r w dirty wb writer
    local committer= target seek=0 t0 n=0
    echo mq-deadline >"$q/scheduler" 2>/dev/null
    out "s4_scheduler=$(sed 's/.*\[\(.*\)\].*/\1/' "$q/scheduler")"
    if [ -d "$q/iosched" ]; then
        out "s4_iosched_read_expire_ms=$(cat "$q/iosched/read_expire") write_expire_ms=$(cat "$q/iosched/write_expire") writes_starved=$(cat "$q/iosched/writes_starved") fifo_batch=$(cat "$q/iosched/fifo_batch")"
    fi
    out "s4_nr_requests=$(cat "$q/nr_requests") max_sectors_kb=$(cat "$q/max_sectors_kb")"
    echo "$HUNG_SECS" >/proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
    out "s4_hung_task_timeout_secs=$(cat /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null || echo none)"
    [ -z "$DIRTY_BG_KIB" ] || echo $((DIRTY_BG_KIB * 1024)) >/proc/sys/vm/dirty_background_bytes
    [ -z "$DIRTY_KIB" ] || echo $((DIRTY_KIB * 1024)) >/proc/sys/vm/dirty_bytes
    out "s4_dirty_background_bytes=$(cat /proc/sys/vm/dirty_background_bytes) dirty_background_ratio=$(cat /proc/sys/vm/dirty_background_ratio) dirty_bytes=$(cat /proc/sys/vm/dirty_bytes) dirty_ratio=$(cat /proc/sys/vm/dirty_ratio)"
    size_mb=$(($(cat "/sys/block/$DISK/size") / 2048))
    flood_mb=$((size_mb / 2))
    if [ "$S4_FS" = ext4 ]; then
        load_ondemand_modules
        t0=$(uptime_ms)
        # Lazy inode-table and journal init, and no background init after mounting: the
        # only writes are the test's own.
        # Debian's mke2fs (guests/build.sh), by path: a bare `mke2fs` is busybox's, ext2 only.
        /usr/sbin/mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "/dev/$DISK" \
            >/tmp/mkfs.err 2>&1 || { out "error=s4-mkfs $(first_line /tmp/mkfs.err)"; return 0; }
        mkdir -p /mnt/s4
        mount -t ext4 -o noinit_itable "/dev/$DISK" /mnt/s4 2>/tmp/mount.err \
            || { out "error=s4-mount $(first_line /tmp/mount.err)"; return 0; }
        out "s4_fs=ext4 mkfs_ms=$(($(uptime_ms) - t0)) options=$(awk -v d="/dev/$DISK" '$1 == d { print $4 }' /proc/mounts)"
        target=/mnt/s4/bulk
        if [ "$WRITE_MB" -gt $((size_mb * 3 / 4)) ]; then WRITE_MB=$((size_mb * 3 / 4)); fi
    else
        out "s4_fs=raw"
        target="/dev/$DISK"
        seek=$flood_mb
        if [ "$WRITE_MB" -gt $((size_mb - flood_mb)) ]; then WRITE_MB=$((size_mb - flood_mb)); fi
    fi
    out "s4_flood_mb=$flood_mb write_mb=$WRITE_MB iodepth=$FIO_QD numjobs=$FIO_JOBS runtime_s=${FIO_RUNTIME:-30} flood=$S4_FLOOD commit_ms=$S4_COMMIT_MS"
    start=$(uptime_ms)
    if [ "$S4_FLOOD" != 0 ]; then
        fio --name=flood "--filename=/dev/$DISK" --rw=randread --bs=4k "--iodepth=$FIO_QD" \
            "--numjobs=$FIO_JOBS" --ioengine=libaio --direct=1 "--size=${flood_mb}m" \
            --time_based "--runtime=${FIO_RUNTIME:-30}" --group_reporting \
            --output-format=json --output=/tmp/fio.json >/dev/null 2>/tmp/fio.err &
        flood=$!
    fi
    sleep 1
    (
        t0=$(uptime_ms)
        dd if=/dev/zero "of=$target" bs=1M "count=$WRITE_MB" "seek=$seek" conv=notrunc,fsync \
            2>/tmp/dd.err
        echo "$? $(($(uptime_ms) - t0)) $(($(uptime_ms) - start))" >/tmp/writer.done
    ) &
    writer=$!
    rm -f /tmp/s4.stop /tmp/commits
    if [ "$S4_FS" = ext4 ] && [ "$S4_COMMIT_MS" -gt 0 ]; then
        (
            i=0
            while [ ! -e /tmp/s4.stop ]; do
                t0=$(uptime_ms)
                if [ "$S4_COMMIT" = sync ]; then
                    dd if=/dev/zero of=/mnt/s4/log bs=4k count=1 "seek=$i" conv=notrunc 2>/dev/null && sync
                else
                    dd if=/dev/zero of=/mnt/s4/log bs=4k count=1 "seek=$i" conv=notrunc,fsync 2>/dev/null
                fi
                rc=$?
                echo "$((t0 - start)) $(($(uptime_ms) - t0)) $rc" >>/tmp/commits
                i=$((i + 1))
                sleep "$(awk -v ms="$S4_COMMIT_MS" 'BEGIN { printf "%.3f", ms / 1000 }')"
            done
        ) &
        committer=$!
    fi
    while { [ -n "$flood" ] && kill -0 "$flood" 2>/dev/null; } || kill -0 "$writer" 2>/dev/null; do
        read -r r w </sys/block/$DISK/inflight
        dirty=$(awk '/^Dirty:/ { print $2 }' /proc/meminfo)
        wb=$(awk '/^Writeback:/ { print $2 }' /proc/meminfo)
        n=$((n + 1))
        out "s4_sample=$n t_ms=$(($(uptime_ms) - start)) flood=$([ -n "$flood" ] && kill -0 "$flood" 2>/dev/null && echo 1 || echo 0) inflight_reads=$r inflight_writes=$w dirty_kib=$dirty writeback_kib=$wb"
        sleep 1
    done
    if [ -n "$flood" ]; then
        wait "$flood"
        rc=$?
        out "s4_flood_rc=$rc"
        flatten_json </tmp/fio.json >/tmp/fio.flat 2>/dev/null
        err=$(fio_get jobs.0.error)
        if [ "$rc" != 0 ] || [ "${err:-0}" != 0 ]; then
            out "s4_flood_error=${err:-none} $(first_line /tmp/fio.err)"
        fi
        fio_report_dir read
    fi
    wait "$writer"
    read -r rc w r </tmp/writer.done
    out "s4_writer_rc=$rc ms=$w finished_at_ms=$r"
    [ "$rc" = 0 ] || out "s4_writer_error=$(first_line /tmp/dd.err)"
    if [ -n "$committer" ]; then
        : >/tmp/s4.stop
        wait "$committer"
        # Each commit: start (ms after the flood began), duration, exit status.
        awk -v hung_ms=$((HUNG_SECS * 1000)) '
            { n++; if ($2 > max) { max = $2; at = $1 } if ($2 > hung_ms) over++; if ($3 != 0) failed++ }
            END { printf "@@guest s4_commits=%d max_ms=%d max_at_ms=%d over_hung_timeout=%d failed=%d\n", n, max, at, over, failed }' /tmp/commits
    fi
    out "s4_hung_task_warnings=$(dmesg | grep -c 'blocked for more than')"
    # The first warnings' tasks and where they slept: the first frames of each stack
    # below the scheduler's own.
    dmesg | awk '
        /blocked for more than/ {
            if (shown >= 5) { on = 0; next }
            task = $0; sub(/.*INFO: task /, "", task); sub(/ blocked for more than /, " blocked_s=", task)
            sub(/ seconds\.?$/, "", task); frames = ""; nf = 0; on = 1; next
        }
        on && /<\/TASK>/ { printf "@@guest s4_hung_task=%s stack=%s\n", task, frames; shown++; on = 0; next }
        on && /\+0x/ && !/ \? / {
            f = $0; sub(/^\[[^]]*\] */, "", f); sub(/^ */, "", f); sub(/\+0x.*/, "", f)
            if (f ~ /^(__schedule|schedule|schedule_timeout|schedule_preempt_disabled|io_schedule|io_schedule_timeout)$/) next
            if (nf < 6) { frames = frames (nf ? "<" : "") f; nf++ }
        }'
    [ "$S4_FS" != ext4 ] || umount /mnt/s4 2>/dev/null || out "error=s4-umount"
    disk_accounting "$DISK"
}

# Every NVMe path disk (nvme<S>c<C>n<N>): its ANA state and its controller's state.
mp_paths() {
    local p c line=
    for p in /sys/block/nvme*c*n*; do
        [ -e "$p" ] || continue
        c=${p##*/}; c=nvme${c#*c}; c=${c%n*}
        line="$line ${p##*/}=$(cat "$p/ana_state" 2>/dev/null || echo none)/$(cat "/sys/class/nvme/$c/state" 2>/dev/null)"
    done
    echo "${line# }"
}

# What nvme-cli says of the subsystems and each controller's ANA log, as one line each.
mp_nvme_cli() {
    local when=$1 c
    if nvme list-subsys -o json >/tmp/lss.json 2>/tmp/lss.err; then
        out "mp_list_subsys_$when=$(grep -o '"\(NQN\|Name\|Address\|State\|ANAState\)" *: *"[^"]*"' /tmp/lss.json | tr -d ' "' | tr '\n' ' ')"
    else
        out "nvme_error=list-subsys msg=$(first_line /tmp/lss.err)"
    fi
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c" ] || continue
        c=${c##*/}
        # Groups and states only: nvme-cli 2.3 leaves the NSID lists out of the length it
        # asks for when ANACAP bit 6 (group ids never change) is set, then prints them from
        # past its buffer. Linux's own view of each namespace's group is mp_path_group.
        if nvme ana-log "/dev/$c" -o json >/tmp/ana.json 2>/tmp/ana.err; then
            out "mp_ana_log_$when=$c $(grep -o '"\(grpid\|state\)" *: *"*[^",}]*' /tmp/ana.json | tr -d ' "' | tr '\n' ' ')"
        else
            out "nvme_error=ana-log-$c msg=$(first_line /tmp/ana.err)"
        fi
    done
}

# Resets (reset_controller in sysfs) the NVMe controller at PCI address $1; prints how long
# the guest's reset took (the write returns when the controller is live again).
mp_guest_reset() {
    local c start
    for c in /sys/class/nvme/nvme*; do
        [ "$(cat "$c/address" 2>/dev/null)" = "$1" ] || continue
        start=$(uptime_ms)
        echo 1 >"$c/reset_controller" 2>/dev/null
        out "mp_guest_reset=${c##*/} pci=$1 rc=$? took_ms=$(($(uptime_ms) - start)) state=$(cat "$c/state")"
        return 0
    done
    out "error=no-controller-at-$1"
}

# S3 (../shared/SCENARIOS.md): fio writes and verifies (crc32c, checked every 128 writes)
# on the first NVMe multipath disk while the host flips ANA states and fails controllers
# through its control socket; the guest prints the topology before and after, its paths'
# states once a second, and what its kernel logged about paths, ANA and resets.
scenario_multipath() {
    wait_disks
    local s disk start fiopid rc n=0
    for s in /sys/class/nvme-subsystem/nvme-subsys*; do
        [ -e "$s" ] || continue
        # Spread I/O over every optimized path, so that a failing one has requests on it.
        echo round-robin >"$s/iopolicy" 2>/dev/null
        # Controllers are nvme<N>; the namespace heads beside them are nvme<S>n<N>.
        n=$(ls "$s" | grep -c '^nvme[0-9]*$')
        out "mp_subsys=${s##*/} nqn=$(cat "$s/subsysnqn") iopolicy=$(cat "$s/iopolicy" 2>/dev/null) controllers=$n"
    done
    n=0
    # Linux logs the ANA states it reads ("ANA group 1: inaccessible.") at debug level only.
    echo 'file multipath.c +p' >/proc/dynamic_debug/control 2>/dev/null ||
        out "error=no-dynamic-debug"
    out "nvme_io_timeout=$(cat /sys/module/nvme_core/parameters/io_timeout 2>/dev/null)"
    out "mp_paths_before=$(mp_paths)"
    mp_nvme_cli before
    disk=$(list_disks | grep '^nvme' | head -n 1)
    if [ -z "$disk" ]; then
        out "error=no-nvme-disk"
        return 0
    fi
    out "disk=$disk"
    start=$(uptime_ms)
    if [ -n "$MP_WATCH" ]; then
        # Null namespaces hold no data to verify: only watch the paths.
        sleep "${FIO_RUNTIME:-20}" &
        fiopid=$!
    else
        fio --name=multipath "--filename=/dev/$disk" --rw=randwrite --bs=4k "--iodepth=$FIO_QD" \
            --ioengine=libaio --direct=1 --size=16m --time_based "--runtime=${FIO_RUNTIME:-20}" \
            "--rate_iops=$FIO_RATE_IOPS" --verify=crc32c --verify_backlog=128 --verify_fatal=1 \
            --verify_state_save=0 \
            --output-format=json --output=/tmp/fio.json >/dev/null 2>/tmp/fio.err &
        fiopid=$!
    fi
    while kill -0 "$fiopid" 2>/dev/null; do
        n=$((n + 1))
        out "mp_sample=$n t_ms=$(($(uptime_ms) - start)) $(mp_paths)"
        # By the clock, not the sample count: at full rate a sample takes longer than 1 s.
        if [ -n "$RESET_AT" ] && [ $(($(uptime_ms) - start)) -ge $((${RESET_AT#*@} * 1000)) ]; then
            mp_guest_reset "${RESET_AT%@*}"
            RESET_AT=
        fi
        sleep 1
    done
    wait "$fiopid"
    rc=$?
    if [ -z "$MP_WATCH" ]; then
        fio_outcome "$rc"
        fio_report_dir write
        fio_report_dir read
    fi
    out "mp_paths_after=$(mp_paths)"
    # Which namespace each path is and the ANA group Linux read for it (Identify ANAGRPID).
    for s in /sys/block/nvme*c*n*; do
        [ -e "$s" ] || continue
        out "mp_path_group=${s##*/} nsid=$(cat "$s/nsid" 2>/dev/null) grpid=$(cat "$s/ana_grpid" 2>/dev/null)"
    done
    mp_nvme_cli after
    dmesg | grep 'nvme' | grep -v -i 'command line' |
        grep -i 'ana\|reset\|path\|fail\|timeout\|ready\|down' | head -n 40 |
        while read -r s; do out "mp_kernel=$(echo "$s" | cut -c1-200)"; done
    out "kernel_resets=$(dmesg | grep -c -i 'will reset\|reset controller\|resetting controller')"
    # Requests each path's block layer completed (reads, writes, discards, flushes).
    for s in /sys/block/nvme*c*n*; do
        [ -e "$s" ] || continue
        out "mp_path_requests=${s##*/} $(awk '{ print $1 + $5 + $12 + $16 }' "$s/stat")"
    done
}

# run: the user's command (/etc/blkswarm/run, put into the image by the runner's overlay,
# tests/src/overlay.rs) once the disks are up, in /root, with sh. Each line it prints
# (stdout and stderr) comes out as "@@run LINE", its exit status as run_status=N. Then each
# file named in /etc/blkswarm/fetch goes back over the console: "@@fetch begin path=P",
# gzip'd and in base64 in "@@fetch data=" lines, "@@guest fetched=P size=N sha256=H
# encoding=gzip" (the host checks both); fetch_missing=P or fetch_too_big=P size=N (over
# 1 MiB: the serial console is slow in the lab).
scenario_run() {
    local rc p size
    out "kernel=$(uname -r)"
    wait_disks
    out "disks=$(count_disks)"
    if [ ! -f /etc/blkswarm/run ]; then
        out "error=no-run-command"
        return 1
    fi
    cd /root || return 1
    # The status goes through a file: in a pipeline $? is sed's.
    { sh /etc/blkswarm/run </dev/null 2>&1; echo "$?" >/tmp/run.status; } | sed 's/^/@@run /'
    rc=$(cat /tmp/run.status 2>/dev/null)
    out "run_status=${rc:-none}"
    [ -f /etc/blkswarm/fetch ] || return 0
    while read -r p; do
        [ -n "$p" ] || continue
        if [ ! -f "$p" ]; then out "fetch_missing=$p"; continue; fi
        size=$(wc -c <"$p")
        if [ "$size" -gt 1048576 ]; then out "fetch_too_big=$p size=$size"; continue; fi
        echo "@@fetch begin path=$p"
        gzip -9c "$p" | base64 | sed 's/^/@@fetch data=/'
        out "fetched=$p size=$size sha256=$(sha256sum "$p" | cut -d' ' -f1) encoding=gzip"
    done </etc/blkswarm/fetch
}

main() {
    load_modules
    out "scenario=$SCEN"
    case $SCEN in
        boot) scenario_boot ;;
        disks) scenario_disks ;;
        disk-info) scenario_disk_info ;;
        fio) scenario_fio ;;
        pattern-write) scenario_pattern_write ;;
        ro-check) scenario_ro_check ;;
        fault-io) scenario_fault_io ;;
        durability) scenario_durability ;;
        writeback-starvation) scenario_writeback_starvation ;;
        multipath) scenario_multipath ;;
        stress) scenario_stress ;;
        probe) scenario_probe ;;
        nvme-info) scenario_nvme_info ;;
        run) scenario_run ;;
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
