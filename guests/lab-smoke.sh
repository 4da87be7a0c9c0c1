#!/usr/bin/env bash
# Manual smoke check of the guest images (not CI). Needs guests/build.sh's cache.
#
# 1. lab: boots L1 (QEMU TCG, -cpu max: emulated AMD SVM) from lab/l1-base.cpio.gz with a
#    tiny payload cpio appended uncompressed (as the harness does): plan.sh runs a few
#    run_guest commands (echo, svm count, a dynamically linked host binary with its glibc
#    libraries from the payload, a failing command). Checks kvm=ok and the markers.
# 2. guest: boots the L2 test initramfs directly under QEMU TCG (no KVM, -smp 2): scenario
#    boot, scenario disks (QEMU null virtio-blk + NVMe disks), an unknown scenario.
#    Checks the @@guest lines and that the guest powers off by itself.
#
# 3. l2qemu (opt-in, ~60 MiB payload): the L2 test guest under real nested KVM inside
#    the lab, with the host's QEMU (+ its libraries) as the L2 VMM: boot and disks.
# 4. l2storage (opt-in): the same, with the storage scenarios: pattern-write into a raw
#    image in L1's tmpfs then check_pattern/report_file in L1, ro-check, disk-info,
#    fio (null-co, QD1/QD32) and fio with crc32c verify.
#
# Prints timings: L1 launch -> "@@lab ready", and launch -> exit of each TCG guest boot.
# Usage: guests/lab-smoke.sh [lab|guest|l2qemu|l2storage]...   (default: lab guest)
#   BLKSWARM_SMOKE_FIRMWARE=qboot uses QEMU's qboot.rom instead of SeaBIOS.
#   BLKSWARM_SMOKE_KEEP=1 keeps the work dir (console logs) and prints its path.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BLKSWARM_CACHE:-$REPO/.cache}
"$REPO/guests/build.sh" >/dev/null

WORK=$(mktemp -d /tmp/blkswarm-smoke.XXXXXX)
if [ "${BLKSWARM_SMOKE_KEEP:-0}" = 1 ]; then echo "work dir: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

# shellcheck disable=SC2054 # commas are inside QEMU options
QEMU_COMMON=(qemu-system-x86_64 -accel tcg,thread=multi,tb-size=512 -cpu max -smp 2
             -nographic -no-reboot -nic none)
if [ "${BLKSWARM_SMOKE_FIRMWARE:-seabios}" = qboot ]; then
    QEMU_COMMON+=(-bios /usr/share/qemu/qboot.rom)
fi

FAILS=0
check() { # check LOG REGEX DESCRIPTION
    if grep -qE "$2" "$1"; then echo "  ok   $3"; else echo "  FAIL $3 (no line matching /$2/)"; FAILS=$((FAILS + 1)); fi
}

# run_qemu LOG TIMEOUT ARGS...: console (CR stripped) to LOG, each line prefixed by the
# wall-clock ms since launch; returns QEMU's exit code (124 on timeout).
run_qemu() {
    local log=$1 to=$2; shift 2
    local t0=${EPOCHREALTIME/./} rc=0
    { timeout "$to" "$@" </dev/null 2>&1 || echo "@@smoke qemu-rc=$?"; } |
        while IFS= read -r line; do
            line=${line//$'\r'/}
            # Firmware (SeaBIOS) terminal resets: ESC c, ESC [ ... letter.
            line=$(sed 's/\x1bc//g; s/\x1b\[[0-9;?]*[a-zA-Z]//g' <<<"$line")
            printf '%d %s\n' $(( (${EPOCHREALTIME/./} - t0) / 1000 )) "$line"
        done >"$log"
    printf '%d @@smoke exit\n' $(( (${EPOCHREALTIME/./} - t0) / 1000 )) >>"$log"
    grep -q '@@smoke qemu-rc=' "$log" && rc=$(sed -n 's/.*@@smoke qemu-rc=//p' "$log")
    return "$rc"
}
at_ms() { awk -v re="$2" '$0 ~ re { print $1; exit }' "$1"; }

smoke_lab() {
    echo "== lab: L1 boot (QEMU TCG, base + appended payload cpio)"
    local p="$WORK/payload" bin lib
    mkdir -p "$p/lab/guest" "$p/lab/bin"
    cp "$CACHE/guest/vmlinuz" "$CACHE/guest/initramfs.cpio.gz" "$p/lab/guest/"
    # A dynamically linked host binary with its shared libraries at their absolute
    # paths, the way the harness ships the VMM binary.
    bin=$(command -v uname)
    cp "$bin" "$p/lab/bin/uname"
    for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
        mkdir -p "$p$(dirname "$lib")"
        cp -L "$lib" "$p$lib"
    done
    cat >"$p/lab/plan.sh" <<'EOF'
run_guest hello echo hi
run_guest svm sh -c 'grep -c svm /proc/cpuinfo'
run_guest dynlib /lab/bin/uname -r
run_guest payload sh -c 'ls -l $LAB_GUEST_KERNEL $LAB_GUEST_INITRD | wc -l; ulimit -n'
run_guest fail sh -c 'exit 3'
EOF
    (cd "$p" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet) >"$WORK/payload.cpio"
    cat "$CACHE/lab/l1-base.cpio.gz" "$WORK/payload.cpio" >"$WORK/l1.cpio"
    echo "  initrd: base $(stat -c %s "$CACHE/lab/l1-base.cpio.gz") B (gzip) + payload $(stat -c %s "$WORK/payload.cpio") B (uncompressed newc)"
    local log="$WORK/lab.log" rc=0
    run_qemu "$log" 300 "${QEMU_COMMON[@]}" -m 3072 -kernel "$CACHE/lab/l1-vmlinuz" \
        -initrd "$WORK/l1.cpio" -append "console=ttyS0 panic=-1 quiet" || rc=$?
    grep '@@' "$log" | sed 's/^/  | /'
    check "$log" '@@lab kvm=ok' "kvm=ok"
    check "$log" '@@lab ready uptime_ms=[0-9]+' "ready"
    check "$log" '@@lab guest-end name=hello rc=0 wall_ms=[0-9]+' "run_guest hello rc=0"
    check "$log" '^[0-9]+ hi$' "hello output"
    check "$log" '^[0-9]+ [1-9][0-9]*$' "svm flag count > 0"
    check "$log" "^[0-9]+ $(sed 's/[+.]/\\&/g' "$CACHE/guest/kernel-version")\$" "dynamically linked payload binary ran"
    check "$log" '@@lab guest-end name=fail rc=3 ' "failing command reports rc=3"
    check "$log" '@@lab done' "done"
    if ! grep -q '@@lab error' "$log"; then echo "  ok   no @@lab error lines"; else echo "  FAIL @@lab error lines"; FAILS=$((FAILS + 1)); fi
    if [ "$rc" = 0 ]; then echo "  ok   QEMU exited by itself (power-off)"; else echo "  FAIL QEMU rc=$rc"; FAILS=$((FAILS + 1)); fi
    echo "  timing: L1 launch -> @@lab ready: $(at_ms "$log" '@@lab ready') ms wall" \
         "(L1 uptime $(sed -n 's/.*@@lab ready uptime_ms=\([0-9]*\).*/\1/p' "$log") ms);" \
         "launch -> exit: $(at_ms "$log" '@@smoke exit') ms"
}

guest_boot() { # guest_boot NAME SCENARIO [QEMU ARGS...]
    local name=$1 scen=$2 log="$WORK/guest-$1.log" rc=0; shift 2
    run_qemu "$log" 120 "${QEMU_COMMON[@]}" -m 512 -kernel "$CACHE/guest/vmlinuz" \
        -initrd "$CACHE/guest/initramfs.cpio.gz" \
        -append "console=ttyS0 quiet panic=-1 blkswarm.scenario=$scen" "$@" || rc=$?
    echo "-- guest $name (scenario=$scen): launch -> exit $(at_ms "$log" '@@smoke exit') ms," \
         "guest uptime at result $(sed -n 's/.*@@guest uptime_ms=//p' "$log" | head -1) ms, qemu rc=$rc"
    grep '@@guest' "$log" | sed 's/^/  | /'
    check "$log" "@@guest scenario=$scen\$" "scenario line"
    check "$log" '@@guest done$' "done"
    if grep -q "@@guest error=insmod" "$log"; then echo "  FAIL module load errors"; FAILS=$((FAILS + 1)); fi
    if [ "$rc" = 0 ]; then echo "  ok   powered off by itself"; else echo "  FAIL QEMU rc=$rc"; FAILS=$((FAILS + 1)); fi
    # Anything on the console besides result lines and the kernel's power-down message?
    local noise
    noise=$(sed -n '/@@guest scenario=/,$p' "$log" | { grep -vE '^[0-9]+ (@@guest |@@smoke |\[ *[0-9.]+\] reboot: Power down$)' || true; } | wc -l)
    [ "$noise" = 0 ] && echo "  ok   quiet (no other console lines after start)" || echo "  WARN $noise other console lines"
    LAST_LOG=$log
}

smoke_guest() {
    echo "== guest: L2 initramfs booted directly under QEMU TCG (no KVM)"
    guest_boot boot boot
    check "$LAST_LOG" '@@guest cpus_online=0-1$' "cpus_online=0-1"
    check "$LAST_LOG" '@@guest nproc=2$' "nproc=2"
    check "$LAST_LOG" "@@guest kernel=$(sed 's/[+.]/\\&/g' "$CACHE/guest/kernel-version")\$" "kernel version"
    guest_boot disks disks \
        -blockdev null-co,node-name=b0,size=1073741824 -device virtio-blk-pci,drive=b0 \
        -blockdev null-co,node-name=b1,size=2147483648 -device virtio-blk-pci,drive=b1 \
        -blockdev null-co,node-name=b2,size=4294967296 -device nvme,serial=smoke0,drive=b2
    check "$LAST_LOG" '@@guest disk=vda size_sectors=2097152$' "vda 1 GiB"
    check "$LAST_LOG" '@@guest disk=vdb size_sectors=4194304$' "vdb 2 GiB"
    check "$LAST_LOG" '@@guest disk=nvme0n1 size_sectors=8388608$' "nvme0n1 4 GiB"
    check "$LAST_LOG" '@@guest disks=3$' "disks=3"
    guest_boot unknown no-such-scenario
    check "$LAST_LOG" '@@guest error=unknown-scenario$' "unknown scenario reported"
}

# l2_payload DIR: the host's QEMU (+ its libraries and the firmware files it needs for
# qboot + direct kernel boot) and the guest kernel + initramfs, at their lab paths.
l2_payload() {
    local p=$1 q lib f
    q=$(command -v qemu-system-x86_64)
    mkdir -p "$p/lab/guest" "$p/lab/bin" "$p/usr/share/qemu"
    cp "$CACHE/guest/vmlinuz" "$CACHE/guest/initramfs.cpio.gz" "$p/lab/guest/"
    cp "$q" "$p/lab/bin/qemu-system-x86_64"
    for lib in $(ldd "$q" | grep -oE '/[^ ]+'); do
        mkdir -p "$p$(dirname "$lib")"
        cp -L "$lib" "$p$lib"
    done
    for f in qboot.rom linuxboot_dma.bin kvmvapic.bin; do cp "/usr/share/qemu/$f" "$p/usr/share/qemu/"; done
}

# The plan's l2 function: l2 NAME SCENARIO "EXTRA CMDLINE" [QEMU ARGS...]
# shellcheck disable=SC2016 # expanded in L1, not here
L2_FUNC='l2() {
    local name=$1 scen=$2 extra=$3; shift 3
    run_guest "$name" /lab/bin/qemu-system-x86_64 -L /usr/share/qemu -bios qboot.rom \
        -accel kvm -cpu host -smp 2 -m 512 -nographic -no-reboot -nic none -vga none \
        -kernel "$LAB_GUEST_KERNEL" -initrd "$LAB_GUEST_INITRD" \
        -append "console=ttyS0 quiet panic=-1 blkswarm.scenario=$scen $extra" "$@"
}'

# run_l2_lab NAME: boots the lab with $WORK/payload-NAME (plan already written) into
# $WORK/NAME.log; sets LAST_LOG and L2_RC.
run_l2_lab() {
    local name=$1 p="$WORK/payload-$1"
    (cd "$p" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet) >"$WORK/payload-$name.cpio"
    cat "$CACHE/lab/l1-base.cpio.gz" "$WORK/payload-$name.cpio" >"$WORK/l1-$name.cpio"
    echo "  initrd: base + payload $(( $(stat -c %s "$WORK/payload-$name.cpio") / 1048576 )) MiB (QEMU + libs + guest)"
    LAST_LOG="$WORK/$name.log"
    L2_RC=0
    run_qemu "$LAST_LOG" 900 "${QEMU_COMMON[@]}" -m 3072 -kernel "$CACHE/lab/l1-vmlinuz" \
        -initrd "$WORK/l1-$name.cpio" -append "console=ttyS0 panic=-1 quiet" || L2_RC=$?
    grep '@@' "$LAST_LOG" | sed 's/^/  | /'
}

smoke_l2qemu() {
    echo "== l2qemu: L2 test guest under real (nested) KVM in the lab, QEMU as the L2 VMM"
    local p="$WORK/payload-l2qemu"
    l2_payload "$p"
    cat >"$p/lab/plan.sh" <<PLAN
$L2_FUNC
l2 l2-boot boot ""
l2 l2-disks disks "" -blockdev null-co,node-name=b0,size=1073741824 -device virtio-blk-pci,drive=b0 \\
    -blockdev null-co,node-name=b1,size=4294967296 -device nvme,serial=smoke0,drive=b1
PLAN
    run_l2_lab l2qemu
    local log=$LAST_LOG
    check "$log" '@@lab kvm=ok' "kvm=ok"
    check "$log" '@@lab guest-end name=l2-boot rc=0 ' "L2 boot guest exited rc=0"
    check "$log" '@@guest nproc=2$' "L2 nproc=2"
    check "$log" '@@guest disk=vda size_sectors=2097152$' "L2 vda"
    check "$log" '@@guest disk=nvme0n1 size_sectors=8388608$' "L2 nvme0n1"
    check "$log" '@@lab guest-end name=l2-disks rc=0 ' "L2 disks guest exited rc=0"
    check "$log" '@@lab done' "done"
    if [ "$L2_RC" = 0 ]; then echo "  ok   QEMU exited by itself (power-off)"; else echo "  FAIL QEMU rc=$L2_RC"; FAILS=$((FAILS + 1)); fi
    echo "  timing: L1 launch -> @@lab ready: $(at_ms "$log" '@@lab ready') ms;" \
         "L2 wall (launch -> exit, in L1):" \
         "$(sed -n 's/.*guest-end name=\(l2-[a-z]*\) .*wall_ms=\([0-9]*\).*/\1 \2 ms/p' "$log" | paste -sd, -)"
}

# The storage scenarios (fio, pattern-write + check in L1, ro-check, disk-info) with
# QEMU as the L2 VMM: a raw image in L1's tmpfs and null-co disks.
smoke_l2storage() {
    echo "== l2storage: storage scenarios under nested KVM, QEMU as the L2 VMM"
    local p="$WORK/payload-l2storage"
    l2_payload "$p"
    cat >"$p/lab/plan.sh" <<PLAN
$L2_FUNC
IMG=/tmp/disk0.img
VBLK="-device virtio-blk-pci,drive=d0,num-queues=2"
run_guest mkimg make_image \$IMG 64M
l2 pattern pattern-write "blkswarm.seed=42 blkswarm.sectors=4096" -drive file=\$IMG,if=none,id=d0,format=raw \$VBLK
run_guest check check_pattern \$IMG 42 4096
run_guest sum report_file \$IMG 2097152
run_guest check-wrong-seed check_pattern \$IMG 43 4096
l2 ro ro-check "" -drive file=\$IMG,if=none,id=d0,format=raw,readonly=on \$VBLK
run_guest check-after-ro check_pattern \$IMG 42 4096
l2 info disk-info "" -drive driver=null-co,size=1G,if=none,id=d0 \$VBLK \
    -drive driver=null-co,size=2G,if=none,id=d1 -device nvme,serial=s1,drive=d1
l2 fio-qd1 fio "blkswarm.runtime=3" -drive driver=null-co,size=1G,if=none,id=d0 \$VBLK
l2 fio-qd32 fio "blkswarm.runtime=3 blkswarm.iodepth=32 blkswarm.ioengine=io_uring" -drive driver=null-co,size=1G,if=none,id=d0 \$VBLK
l2 fio-verify fio "blkswarm.verify=crc32c blkswarm.size=8m blkswarm.rw=randwrite blkswarm.iodepth=8" -drive file=\$IMG,if=none,id=d0,format=raw \$VBLK
PLAN
    run_l2_lab l2storage
    local log=$LAST_LOG
    check "$log" '@@lab kvm=ok' "kvm=ok"
    check "$log" '@@guest pattern_written=4096$' "pattern written by the guest"
    check "$log" '@@guest pattern_readback=ok$' "guest read the pattern back"
    check "$log" '@@lab guest-end name=check rc=0 ' "L1 found the pattern in the image (check_pattern rc=0)"
    check "$log" "@@guest file_sha256=$("$REPO/guests/pattern.sh" 42 4096 | sha256sum | cut -d' ' -f1)\$" "image sha256 (report_file) = host-side generator"
    check "$log" '@@guest pattern_first_bad_sector=0$' "wrong seed: mismatch at sector 0"
    check "$log" '@@lab guest-end name=check-wrong-seed rc=1 ' "wrong seed: check_pattern rc=1"
    check "$log" '@@guest ro_flag=1$' "ro-check: ro flag"
    check "$log" '@@guest ro_write=rejected$' "ro-check: write rejected"
    check "$log" '@@lab guest-end name=check-after-ro rc=0 ' "image unchanged after ro-check"
    check "$log" '@@guest disk=vda size_sectors=2097152 mq=2 lbs=512 ro=0 dev=virtio0 vectors=3$' "disk-info vda"
    check "$log" '@@guest disk=nvme0n1 size_sectors=4194304 mq=2 lbs=512 ro=0 dev=nvme0 vectors=3$' "disk-info nvme0n1"
    check "$log" '@@guest irq=virtio0-req\.[0-9]+ count=[1-9]' "disk-info irq line with a count"
    check "$log" '@@guest fio_read_iops=[1-9]' "fio read iops"
    check "$log" '@@guest fio_read_clat_p999_us=[0-9.]+$' "fio p99.9"
    check "$log" '@@guest fio_verify=ok$' "fio verify ok"
    if grep -q '@@guest fio_rc=[1-9]' "$log"; then echo "  FAIL a fio run failed"; FAILS=$((FAILS + 1)); fi
    check "$log" '@@lab done' "done"
    if [ "$L2_RC" = 0 ]; then echo "  ok   QEMU exited by itself (power-off)"; else echo "  FAIL QEMU rc=$L2_RC"; FAILS=$((FAILS + 1)); fi
    echo "  timing: L1 launch -> @@lab ready: $(at_ms "$log" '@@lab ready') ms; wall (in L1):" \
         "$(sed -n 's/.*guest-end name=\([a-z0-9-]*\) .*wall_ms=\([0-9]*\).*/\1 \2 ms/p' "$log" | paste -sd, -)"
}

[ $# -gt 0 ] || set -- lab guest
for what in "$@"; do
    case $what in
        lab) smoke_lab ;;
        guest) smoke_guest ;;
        l2qemu) smoke_l2qemu ;;
        l2storage) smoke_l2storage ;;
        *) echo "usage: $0 [lab|guest|l2qemu|l2storage]..." >&2; exit 2 ;;
    esac
done
if [ "$FAILS" = 0 ]; then echo "== smoke: all checks passed"; else echo "== smoke: $FAILS check(s) FAILED"; exit 1; fi
