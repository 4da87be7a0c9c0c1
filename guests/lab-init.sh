#!/bin/sh
# shellcheck shell=dash disable=SC2317
# (busybox ash, checked as dash; SC2317: the helpers are called by the sourced plan)
# blkswarm lab (L1) /init (busybox sh). Built into lab/l1-base.cpio.gz by guests/build.sh.
#
# Runs inside QEMU TCG (-cpu max: emulated AMD SVM). Loads kvm-amd, checks /dev/kvm,
# then sources /lab/plan.sh (delivered by a second cpio archive appended to the base
# initramfs) in a subshell, with the function run_guest defined:
#
#   run_guest NAME CMD [ARGS...]
#     prints "@@lab guest-begin name=NAME", runs CMD with stdin from /dev/null and
#     stdout+stderr to the console, then "@@lab guest-end name=NAME rc=RC wall_ms=MS";
#     returns RC.
#
# and helpers that a plan can run as guests (`run_guest NAME HELPER ARGS...`); they
# print "@@guest" result lines ending in "@@guest done", so the harness turns their
# output into an ordinary guest outcome:
#
#   make_image PATH SIZE              creates a sparse image file (truncate -s SIZE)
#   report_file PATH [BYTES]          file_size= and file_sha256= (of the first BYTES)
#   check_pattern PATH SEED SECTORS [FIRST]
#                                     compares sectors FIRST.. of PATH with
#                                     blkswarm-pattern SEED (guests/pattern.sh)
#
# and, for L2 triple faults, L1's kernel trace of KVM (see "KVM tracing" below), which the
# plan runs itself (not as guests):
#
#   lab_trace_clear                   empties the trace buffer (before each guest)
#   lab_trace_dump NAME               prints "@@lab trace name=NAME # lines=..." and the
#                                     buffer's last lines as "@@lab trace name=NAME LINE",
#                                     then empties it
#
# Output lines: "@@lab kvm=ok" | "@@lab error=REASON", "@@lab tracing=on events=..." |
# "@@lab tracing=off why=...", "@@lab ready uptime_ms=N",
# guest-begin/guest-end pairs, "@@lab plan-end rc=N", "@@lab done"; then power-off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root

lab() { echo "@@lab $*"; }

# Milliseconds since boot: ns resolution from /proc/timer_list ("now at N nsecs"),
# else /proc/uptime (10 ms resolution). (busybox date has no %N.)
now_ms() {
    local ns up s c
    ns=$(sed -n '/^now at /{s/^now at \([0-9]*\) nsecs.*/\1/p;q}' /proc/timer_list 2>/dev/null)
    if [ -n "$ns" ]; then echo $((ns / 1000000)); return; fi
    read -r up _ </proc/uptime
    s=${up%.*}; c=${up#*.}; c=${c#0}
    echo $((s * 1000 + ${c:-0} * 10))
}

run_guest() {
    local name=$1 t0 t1 rc
    shift
    lab "guest-begin name=$name"
    t0=$(now_ms)
    "$@" </dev/null 2>&1
    rc=$?
    t1=$(now_ms)
    lab "guest-end name=$name rc=$rc wall_ms=$((t1 - t0))"
    return "$rc"
}

# Plan helpers (see the header). Each ends with "@@guest done" and returns 0 only when
# it could do its job.
make_image() {
    local p=$1 size=$2
    if ! mkdir -p "$(dirname "$p")" || ! truncate -s "$size" "$p"; then echo "@@guest error=make-image"; return 1; fi
    echo "@@guest image=$p"
    echo "@@guest image_size=$(stat -c %s "$p")"
    echo "@@guest done"
}

report_file() {
    local p=$1 n=${2:-} size sum
    if [ ! -f "$p" ]; then echo "@@guest error=no-file"; return 1; fi
    size=$(stat -c %s "$p")
    if [ -n "$n" ]; then sum=$(head -c "$n" "$p" | sha256sum); else sum=$(sha256sum <"$p"); fi
    echo "@@guest file=$p"
    echo "@@guest file_size=$size"
    echo "@@guest file_sha256_bytes=${n:-$size}"
    echo "@@guest file_sha256=${sum%% *}"
    echo "@@guest done"
}

check_pattern() {
    local p=$1 seed=$2 n=$3 first=${4:-0} r c bad
    if [ ! -f "$p" ]; then echo "@@guest error=no-file"; return 1; fi
    blkswarm-pattern "$seed" "$n" "$first" >/tmp/pattern.expect || { echo "@@guest error=pattern-args"; return 1; }
    r=$(dd "if=$p" bs=512 "skip=$first" "count=$n" 2>/dev/null | cmp /tmp/pattern.expect - 2>&1)
    rm -f /tmp/pattern.expect
    echo "@@guest pattern_sectors=$n"
    if [ -z "$r" ]; then
        echo "@@guest pattern_check=ok"
        echo "@@guest done"
        return 0
    fi
    echo "@@guest pattern_check=mismatch"
    c=$(echo "$r" | sed -n 's/.* differ: char \([0-9]*\).*/\1/p')
    if [ -n "$c" ]; then
        bad=$((first + (c - 1) / 512))
        echo "@@guest pattern_first_bad_sector=$bad"
        echo "@@guest pattern_first_bad_record=$(dd "if=$p" bs=32 "skip=$(( (first * 512 + c - 1) / 32 ))" count=1 2>/dev/null | tr -c '[:print:]' '.')"
    else
        echo "@@guest pattern_cmp=$r"
    fi
    echo "@@guest done"
    return 1
}

# KVM tracing. On SVM, KVM re-initialises the vCPU at a SHUTDOWN intercept (an L2 triple
# fault) before blkswarm sees KVM_EXIT_SHUTDOWN, so blkswarm's fault dump holds reset state;
# the kvm:kvm_exit tracepoint fires before that and records the guest's rip. Only low-rate
# events are traced (every exit would slow the lab under heavy I/O):
#   kvm/kvm_exit           filtered to the SHUTDOWN exit (exit_reason == 0x7f, SVM's
#                          SVM_EXIT_SHUTDOWN; if the kernel refuses the filter: every
#                          exit, noisy and slower); its rip is the guest's at the exit, and
#                          its intr_info SVM's EXITINTINFO, the event being delivered
#                          (0x80000306: an exception, vector 6 = #UD)
#   kvm/kvm_inj_exception  every exception KVM injects into L2
#   kvm/kvm_inj_virq       only with blkswarm.lab_trace=virq on L1's command line: every
#                          interrupt KVM injects (no vCPU number; the line's task names it)
# blkswarm.lab_trace=0 turns tracing off. One per-CPU ring buffer of LAB_TRACE_KB KiB (old
# entries are overwritten); lab_trace_dump prints at most LAB_TRACE_LINES lines: the last
# ones, or, when a shutdown exit is in the buffer, those up to LAB_TRACE_AFTER lines past
# the last one.
LAB_TRACE_DIR= LAB_TRACE_KB=1024 LAB_TRACE_LINES=60 LAB_TRACE_AFTER=10

lab_trace_setup() {
    local mode=on w t ev events=
    for w in $(cat /proc/cmdline); do
        case $w in blkswarm.lab_trace=*) mode=${w#*=} ;; esac
    done
    case $mode in 0|off|no) lab "tracing=off why=cmdline"; return 0 ;; esac
    t=/sys/kernel/tracing
    [ -f "$t/trace" ] || mount -t tracefs tracefs "$t" 2>/dev/null
    if [ ! -f "$t/trace" ]; then
        mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
        t=/sys/kernel/debug/tracing
    fi
    if [ ! -f "$t/trace" ]; then lab "tracing=off why=no-tracefs"; return 0; fi
    if [ ! -d "$t/events/kvm/kvm_exit" ]; then lab "tracing=off why=no-kvm-events"; return 0; fi
    echo "$LAB_TRACE_KB" >"$t/buffer_size_kb" 2>/dev/null || lab "tracing-note buffer_size_kb=refused"
    if echo 'exit_reason == 127' >"$t/events/kvm/kvm_exit/filter" 2>/dev/null; then
        ev="kvm_exit(exit_reason==0x7f)"
    else
        ev="kvm_exit(unfiltered)"
    fi
    echo 1 >"$t/events/kvm/kvm_exit/enable" 2>/dev/null && events=$ev
    echo 1 >"$t/events/kvm/kvm_inj_exception/enable" 2>/dev/null && events="$events${events:+,}kvm_inj_exception"
    if [ "$mode" = virq ]; then
        echo 1 >"$t/events/kvm/kvm_inj_virq/enable" 2>/dev/null && events="$events${events:+,}kvm_inj_virq"
    fi
    if [ -z "$events" ]; then lab "tracing=off why=enable-refused"; return 0; fi
    echo 1 >"$t/tracing_on" 2>/dev/null
    : >"$t/trace" 2>/dev/null
    LAB_TRACE_DIR=$t
    lab "tracing=on events=$events buffer_kb=$(cat "$t/buffer_size_kb" 2>/dev/null) dir=$t"
}

lab_trace_clear() {
    [ -n "$LAB_TRACE_DIR" ] || return 0
    : >"$LAB_TRACE_DIR/trace" 2>/dev/null
    return 0
}

lab_trace_dump() {
    local name=$1
    if [ -z "$LAB_TRACE_DIR" ]; then
        lab "trace name=$name # tracing off"
        return 0
    fi
    awk -v name="$name" -v max="$LAB_TRACE_LINES" -v after="$LAB_TRACE_AFTER" '
        $0 ~ /^#/ {
            if ($0 ~ /entries-in-buffer/) { e = $0; sub(/.*written: */, "", e); sub(/[ \t].*/, "", e) }
            next
        }
        {
            sub(/^[ \t]+/, "")
            if ($0 == "") next
            n++; l[n] = $0
            if ($0 ~ / kvm_exit: .*reason shutdown/) { s++; last = n }
        }
        END {
            end = n
            if (last > 0 && end > last + after) end = last + after
            start = end - max + 1
            if (start < 1) start = 1
            printf "@@lab trace name=%s # lines=%d shown=%d shutdown_exits=%d entries_in_buffer/written=%s\n", name, n, end - start + 1, s, (e == "" ? "?" : e)
            for (i = start; i <= end; i++) printf "@@lab trace name=%s %s\n", name, l[i]
        }' "$LAB_TRACE_DIR/trace"
    lab_trace_clear
}

mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null

# Module parameters come from L1's command line as MODULE.PARAM=VALUE (kvm_amd.vgif=0), as
# modprobe would pass them; busybox insmod needs them spelled out.
module_params() {
    local w prefix
    prefix="$(echo "$1" | tr - _)."
    for w in $(cat /proc/cmdline); do
        case $w in "$prefix"*=*) echo "${w#"$prefix"}" ;; esac
    done
}

while read -r m; do
    [ -n "$m" ] || continue
    # shellcheck disable=SC2046 # one word per parameter
    insmod "/lib/modules/$m.ko" $(module_params "$m") >/dev/null 2>&1 || lab "error=insmod-$m"
done </etc/modules

# /dev/kvm: the misc device must be registered (kvm-amd loaded); devtmpfs normally
# creates the node, mknod it from /proc/misc if not.
minor=$(awk '$2 == "kvm" { print $1 }' /proc/misc 2>/dev/null)
if [ -z "$minor" ]; then
    lab "error=no-kvm-misc-device"
else
    [ -c /dev/kvm ] || mknod -m 660 /dev/kvm c 10 "$minor"
    if [ -c /dev/kvm ]; then lab "kvm=ok"; else lab "error=no-dev-kvm"; fi
fi

ulimit -n 65536 2>/dev/null || lab "error=ulimit-n"
lab_trace_setup
lab "ready uptime_ms=$(now_ms)"

if [ -f /lab/plan.sh ]; then
    # Conveniences for the plan (paths inside the appended payload).
    export LAB_GUEST_KERNEL=/lab/guest/vmlinuz LAB_GUEST_INITRD=/lab/guest/initramfs.cpio.gz
    # shellcheck source=/dev/null
    (cd /lab && . /lab/plan.sh)
    lab "plan-end rc=$?"
else
    lab "error=no-plan"
fi
lab "done"
poweroff -f
exit 1
