#!/bin/sh
# blkswarm disk test pattern generator (POSIX sh + awk: busybox, mawk and gawk agree).
#
#   pattern.sh SEED SECTORS [FIRST]
#
# Writes SECTORS 512-byte sectors to stdout: the pattern of sectors FIRST ..
# FIRST+SECTORS-1 (FIRST defaults to 0). The same file is /bin/blkswarm-pattern in the
# test guest and in the lab (L1) initramfs, where it writes the pattern to a disk
# (scenario pattern-write) and checks an image (`check_pattern`), and it can be run on
# the host to compute the expected bytes of an image.
#
# Byte layout: sector number L (counted from the start of the disk, 512-byte units)
# consists of 16 records of 32 ASCII bytes; record K (0..15) is
#
#     printf 'blkswp %010d %010d %02d\n' SEED L K
#
# i.e. "blkswp " + SEED as 10 decimal digits + " " + L as 10 decimal digits + " " + K as
# 2 decimal digits + "\n" (7 + 10 + 1 + 10 + 1 + 2 + 1 = 32 bytes). Every 32 bytes thus
# name the seed, their sector and their place in it, so lost, misplaced, stale or torn
# writes show up, and `cmp` gives the first bad byte. SEED and L must be in 0..2^31-1.
set -eu
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 SEED SECTORS [FIRST]" >&2
    exit 2
fi
for v in "$@"; do
    case $v in '' | *[!0-9]*) echo "$0: $v: not a decimal number" >&2; exit 2 ;; esac
    if [ ${#v} -gt 10 ] || [ "$v" -gt 2147483647 ]; then echo "$0: $v: above 2^31-1" >&2; exit 2; fi
done
first=${3:-0}
if [ $((first + $2)) -gt 2147483648 ]; then echo "$0: sectors beyond 2^31" >&2; exit 2; fi
awk -v seed="$1" -v n="$2" -v first="$first" 'BEGIN {
    for (l = first; l < first + n; l++) {
        p = sprintf("blkswp %010d %010d ", seed, l)
        printf "%s00\n%s01\n%s02\n%s03\n%s04\n%s05\n%s06\n%s07\n%s08\n%s09\n%s10\n%s11\n%s12\n%s13\n%s14\n%s15\n", p, p, p, p, p, p, p, p, p, p, p, p, p, p, p, p
    }
}'
