#!/usr/bin/env bash
# Build the blkswarm test guest (L2) and the lab (L1) images from Debian packages.
#
# Everything goes into the git-ignored cache ${BLKSWARM_CACHE:-<repo>/.cache}; see
# guests/README.md for the layout. Idempotent: a re-run with a complete cache downloads
# nothing and takes about a second. Every artifact is built in a temporary directory
# inside the cache and moved into place atomically, so an interrupted run never leaves a
# half-built artifact that a later run would trust.
#
# Environment:
#   BLKSWARM_CACHE         cache directory (default: <repo>/.cache)
#   BLKSWARM_KERNEL_VERSION  kernel to use (default: 6.12.117+deb12-amd64; if apt no
#                          longer has it, the newest 6.12 unsigned amd64 image is used)
#   BLKSWARM_JOBS          parallel make jobs for the fio build (default: nproc)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUESTS="$REPO/guests"
CACHE=${BLKSWARM_CACHE:-$REPO/.cache}
WANT_KVER=${BLKSWARM_KERNEL_VERSION:-6.12.117+deb12-amd64}

# Modules (plus what `modprobe --show-depends` adds) per initramfs.
GUEST_MODULES=(virtio_blk nvme)
# Loaded by the scenarios that need them (load_ondemand_modules in guest-init.sh), not at
# every boot: S4 mounts ext4.
GUEST_ONDEMAND_MODULES=(ext4)
LAB_MODULES=(kvm-amd)

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Quiet apt, no "_apt cannot access" sandbox warnings for downloads into the cache.
APT_OPTS=(-q -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0)

step() { printf '[build] %-18s %s\n' "$1" "$2"; }
die() { printf '[build] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, mknod)"
mkdir -p "$CACHE"

# One build at a time per cache (tests may call this script concurrently): the others
# wait, then find everything cached.
exec 9>"$CACHE/.lock"
flock 9

# Temporary work dirs live inside the cache (same file system: mv is atomic). With the
# lock held, every .tmp.* is ours or a leftover of a killed run: remove them at start
# and on exit.
cleanup() { rm -rf "$CACHE"/.tmp.* "$CACHE"/.old.* "$CACHE"/*/*.tmp.* "$CACHE"/*/.*.tmp; }
trap cleanup EXIT
cleanup
mktmp() { local d; d=$(mktemp -d "$CACHE/.tmp.$1.XXXXXX"); chmod 755 "$d"; echo "$d"; }

# Replace directory $2 with directory $1 atomically enough: the old one is moved aside
# first, so $2 is either the complete old or the complete new tree.
replace_dir() {
    local new=$1 dst=$2 old
    if [ -e "$dst" ]; then old="$CACHE/.old.$(basename "$dst").$$"; mv "$dst" "$old"; fi
    mv "$new" "$dst"
    if [ -n "${old:-}" ]; then rm -rf "$old"; fi
}
# Write stdin to file $1 atomically.
put_file() { local t; t=$(mktemp "$1.tmp.XXXXXX"); cat >"$t"; chmod 644 "$t"; mv -f "$t" "$1"; }

# The first existing path among $@ (unmatched globs stay literal), else status 1.
first_match() { local f; for f in "$@"; do if [ -e "$f" ]; then echo "$f"; return 0; fi; done; return 1; }

APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    apt-get "${APT_OPTS[@]}" update >/dev/null
    APT_UPDATED=1
}

# ---------------------------------------------------------------------------------
# 1. Host tools
# ---------------------------------------------------------------------------------
host_tools() {
    local need=() pkg cmd
    for pair in kmod:depmod cpio:cpio xz-utils:xz zstd:zstd gzip:gzip; do
        pkg=${pair%%:*}; cmd=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -eq 0 ]; then step host-tools "cached (kmod cpio xz zstd gzip present)"; return; fi
    if ! apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
        apt_update_once
        apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${need[@]}" >/dev/null
    fi
    step host-tools "installed ${need[*]}"
}

# The mirror URI of the apt stanza whose Suites has exactly the word $1, from the
# machine's own deb822 sources (or the classic one-line sources.list as a fallback).
mirror_uri() {
    local want=$1 uri=""
    shopt -s nullglob
    local files=(/etc/apt/sources.list.d/*.sources)
    shopt -u nullglob
    if [ ${#files[@]} -gt 0 ]; then
        uri=$(awk -v want="$want" '
            BEGIN { RS = "" }
            {
                uris = ""; suites = ""
                n = split($0, L, "\n")
                for (i = 1; i <= n; i++) {
                    if (L[i] ~ /^URIs:/)   { s = L[i]; sub(/^URIs:[ \t]*/, "", s); uris = s }
                    if (L[i] ~ /^Suites:/) { s = L[i]; sub(/^Suites:[ \t]*/, "", s); suites = s }
                }
                ns = split(suites, S, /[ \t]+/)
                for (j = 1; j <= ns; j++) if (S[j] == want) { split(uris, U, /[ \t]+/); print U[1]; exit }
            }' "${files[@]}")
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk -v want="$want" '$1 == "deb" { u = ""; for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; continue } if (u == "") { u = $i; continue } if ($i == want) { print u; exit } break } }' /etc/apt/sources.list)
    fi
    printf '%s\n' "$uri"
}

qemu_major() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
    qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9][0-9]*\)\..*/\1/p' | grep . || echo 0
}

install_qemu() {
    local major; major=$(qemu_major)
    if [ "$major" -ge 10 ]; then
        step qemu "cached ($(qemu-system-x86_64 --version | head -1))"
        return
    fi
    local main sec dir
    main=$(mirror_uri bookworm)
    [ -n "$main" ] || die "no apt source with suite 'bookworm' found in /etc/apt"
    sec=$(mirror_uri bookworm-security)
    dir="$CACHE/apt"
    mkdir -p "$dir/lists/partial"
    {
        echo "deb [signed-by=$KEYRING] $main bookworm main"
        echo "deb [signed-by=$KEYRING] $main bookworm-updates main"
        echo "deb [signed-by=$KEYRING] $main bookworm-backports main"
        if [ -n "$sec" ]; then echo "deb [signed-by=$KEYRING] $sec bookworm-security main"; fi
    } | put_file "$dir/sources.list"
    local priv=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$dir/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
    apt-get "${APT_OPTS[@]}" "${priv[@]}" update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" "${priv[@]}" install -y \
        --no-install-recommends -t bookworm-backports qemu-system-x86 >"$dir/install.log" 2>&1 \
        || { tail -20 "$dir/install.log" >&2; die "qemu-system-x86 install from bookworm-backports failed"; }
    hash -r
    major=$(qemu_major)
    [ "$major" -ge 10 ] || die "installed qemu-system-x86_64 is not 10.x: $(qemu-system-x86_64 --version | head -1)"
    step qemu "installed from bookworm-backports: $(qemu-system-x86_64 --version | head -1)"
}

# ---------------------------------------------------------------------------------
# 2. Debian packages: download + extract (kernel, busybox)
# ---------------------------------------------------------------------------------
# Download package $1 into $CACHE/debs (apt-get update once if apt does not know it).
download_deb() {
    local pkg=$1 f
    mkdir -p "$CACHE/debs"
    f=$(first_match "$CACHE/debs/${pkg}"_*.deb || true)
    if [ -n "$f" ]; then echo "$f"; return; fi
    local t; t=$(mktmp deb)
    if ! (cd "$t" && apt-get "${APT_OPTS[@]}" download "$pkg" >/dev/null 2>&1); then
        apt_update_once
        (cd "$t" && apt-get "${APT_OPTS[@]}" download "$pkg" >/dev/null)
    fi
    f=$(first_match "$t/${pkg}"_*.deb) || die "apt-get download $pkg gave no .deb"
    mv "$f" "$CACHE/debs/"
    echo "$CACHE/debs/$(basename "$f")"
}

apt_has() { apt-cache show "$1" >/dev/null 2>&1; }

# Decide which kernel package to use: the wanted one, else the newest 6.12 unsigned.
resolve_kernel() {
    if apt_has "linux-image-$WANT_KVER"; then echo "linux-image-$WANT_KVER $WANT_KVER"; return; fi
    apt_update_once
    if apt_has "linux-image-$WANT_KVER"; then echo "linux-image-$WANT_KVER $WANT_KVER"; return; fi
    local pkg
    pkg=$(apt-cache pkgnames linux-image-6.12 | grep -E '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' | sort -V | tail -1)
    [ -n "$pkg" ] || die "no linux-image-6.12*-amd64-unsigned package known to apt"
    local v=${pkg#linux-image-}; v=${v%-unsigned}
    echo "$pkg $v"
}

KVER=""
KROOT="$CACHE/kernel/root"
kernel() {
    if [ -f "$CACHE/kernel/.complete" ] && [ -f "$CACHE/guest/vmlinuz" ] && [ -s "$CACHE/guest/kernel-version" ]; then
        KVER=$(cat "$CACHE/guest/kernel-version")
        if [ -f "$KROOT/lib/modules/$KVER/modules.dep" ]; then
            step kernel "cached ($KVER)"
            return
        fi
    fi
    local pkg deb t
    read -r pkg KVER < <(resolve_kernel)
    deb=$(download_deb "$pkg")
    t=$(mktmp kernel)
    dpkg -x "$deb" "$t/root"
    local vml; vml=$(first_match "$t/root/boot/vmlinuz-"* || true)
    [ -f "$vml" ] || die "no boot/vmlinuz-* in $deb"
    depmod -b "$t/root" "$KVER"
    : >"$t/.complete"
    mkdir -p "$CACHE/guest"
    rm -f "$CACHE/guest/kernel-version"
    replace_dir "$t" "$CACHE/kernel"
    cp "$KROOT/boot/vmlinuz-$KVER" "$CACHE/guest/.vmlinuz.tmp" && mv -f "$CACHE/guest/.vmlinuz.tmp" "$CACHE/guest/vmlinuz"
    echo "$KVER" | put_file "$CACHE/guest/kernel-version"
    step kernel "extracted $(basename "$deb"), depmod done ($KVER)"
}

lab_kernel() {
    mkdir -p "$CACHE/lab"
    if [ -f "$CACHE/lab/l1-vmlinuz" ] && cmp -s "$CACHE/lab/l1-vmlinuz" "$CACHE/guest/vmlinuz"; then
        step lab-kernel "cached (same kernel as the guest)"
        return
    fi
    cp "$CACHE/guest/vmlinuz" "$CACHE/lab/.l1-vmlinuz.tmp" && mv -f "$CACHE/lab/.l1-vmlinuz.tmp" "$CACHE/lab/l1-vmlinuz"
    step lab-kernel "copied guest kernel to lab/l1-vmlinuz"
}

BUSYBOX="$CACHE/busybox/bin/busybox"
busybox() {
    if [ -f "$CACHE/busybox/.complete" ] && [ -x "$BUSYBOX" ]; then
        step busybox "cached ($(cat "$CACHE/busybox/.version"))"
        return
    fi
    local deb t
    deb=$(download_deb busybox-static)
    t=$(mktmp busybox)
    dpkg -x "$deb" "$t/pkg"
    mkdir -p "$t/out/bin"
    cp "$t/pkg/bin/busybox" "$t/out/bin/busybox"
    dpkg-deb -f "$deb" Version >"$t/out/.version"
    : >"$t/out/.complete"
    replace_dir "$t/out" "$CACHE/busybox"
    step busybox "extracted $(basename "$deb")"
}

# ---------------------------------------------------------------------------------
# 2b. fio: a small static build from the Debian source package
# ---------------------------------------------------------------------------------
# Debian's fio binary links ~85 MB of libraries (ceph, gluster, ...); this build is a
# ~2.8 MB stripped static binary with the libaio and io_uring engines.
FIO_CONFIGURE=(--build-static --disable-native --disable-numa --disable-rdma --disable-gfapi
               --disable-http --disable-rados --disable-rbd --disable-libnfs --disable-xnvme
               --disable-tcmalloc --disable-dfs --disable-pmem --disable-libzbc)
FIO="$CACHE/fio/fio"

# Build tools and libaio-dev, installed only if missing.
fio_build_deps() {
    local need=() pair
    for pair in gcc:gcc make:make dpkg-dev:dpkg-source binutils:strip; do
        command -v "${pair#*:}" >/dev/null 2>&1 || need+=("${pair%%:*}")
    done
    [ -f /usr/include/libaio.h ] || need+=(libaio-dev)
    [ ${#need[@]} -gt 0 ] || return 0
    if ! apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
        apt_update_once
        apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${need[@]}" >/dev/null
    fi
    FIO_INSTALLED=" (installed ${need[*]})"
}

# Downloads the fio source package into $CACHE/src/fio (once) through a private
# deb-src list derived from the machine's own apt sources; /etc/apt is not touched.
fio_source() {
    local dir="$CACHE/src/fio" dsc
    dsc=$(first_match "$dir"/fio_*.dsc || true)
    if [ -n "$dsc" ] && [ -f "$dir/.complete" ]; then echo "$dsc"; return; fi
    local main apt="$CACHE/apt-src" t
    main=$(mirror_uri bookworm)
    [ -n "$main" ] || die "no apt source with suite 'bookworm' found in /etc/apt (needed for a deb-src line)"
    mkdir -p "$apt/lists/partial"
    echo "deb-src [signed-by=$KEYRING] $main bookworm main" | put_file "$apt/sources.list"
    local priv=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$apt/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
    apt-get "${APT_OPTS[@]}" "${priv[@]}" update >/dev/null
    t=$(mktmp fio-src)
    (cd "$t" && apt-get "${APT_OPTS[@]}" "${priv[@]}" source --download-only fio >/dev/null) \
        || die "apt-get source --download-only fio failed"
    : >"$t/.complete"
    mkdir -p "$CACHE/src"
    replace_dir "$t" "$dir"
    first_match "$dir"/fio_*.dsc || die "no fio_*.dsc in the downloaded source package"
}

fio_step() {
    local want
    want=$( { printf '%s\n' "${FIO_CONFIGURE[@]}"; declare -f fio_step fio_build_deps; } | sha256sum | cut -d' ' -f1)
    if [ -f "$CACHE/fio/.complete" ] && [ -x "$FIO" ] && [ "$(cat "$CACHE/fio/.stamp" 2>/dev/null)" = "$want" ]; then
        step fio "cached (fio $(cat "$CACHE/fio/.version"), $(du -k "$FIO" | cut -f1) KiB static)"
        return
    fi
    FIO_INSTALLED=""
    fio_build_deps
    local dsc t
    dsc=$(fio_source)
    t=$(mktmp fio)
    dpkg-source --no-check -x "$dsc" "$t/src" >/dev/null
    (cd "$t/src" && ./configure "${FIO_CONFIGURE[@]}" >"$t/configure.log" 2>&1 \
        && make -j"${BLKSWARM_JOBS:-$(nproc)}" fio >"$t/make.log" 2>&1) \
        || { tail -20 "$t/configure.log" "$t/make.log" >&2 2>/dev/null; die "fio build failed"; }
    grep -q '^Linux AIO support *yes' "$t/configure.log" || die "fio configure found no libaio (libaio-dev?)"
    mkdir -p "$t/out"
    strip -o "$t/out/fio" "$t/src/fio"
    "$t/out/fio" --enghelp | grep -qw libaio || die "built fio lacks the libaio engine"
    "$t/out/fio" --enghelp | grep -qw io_uring || die "built fio lacks the io_uring engine"
    "$t/out/fio" --version | sed 's/^fio-//' >"$t/out/.version"
    echo "$want" >"$t/out/.stamp"
    : >"$t/out/.complete"
    replace_dir "$t/out" "$CACHE/fio"
    step fio "built fio $(cat "$CACHE/fio/.version") from $(basename "$dsc") ($(du -k "$FIO" | cut -f1) KiB static, stripped)$FIO_INSTALLED"
}

# ---------------------------------------------------------------------------------
# 2c. Debian tools with their shared libraries: nvme-cli, mke2fs
# ---------------------------------------------------------------------------------
# The guest has no libc (busybox and fio are static), so the dynamic loader and the
# library closure of each tool come along (appended raw like fio). nvme-cli (~12 MB with
# its libraries) for the NVMe scenarios; mke2fs (~2 MB) for the scenarios that need a
# journalling filesystem (S4's ext4: busybox's mke2fs makes only ext2, without a journal).
NVME_CLI_PACKAGES=(nvme-cli libnvme1 libjson-c5 zlib1g libc6 libssl3 libdbus-1-3 libsystemd0
                   libcap2 libgcrypt20 liblzma5 libzstd1 liblz4-1 libgpg-error0)
MKE2FS_PACKAGES=(e2fsprogs libext2fs2 libcom-err2 libblkid1 libuuid1 libc6)
LIB_DIRS=(lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu)

# The library file (relative to root $1) providing soname $2.
find_library() {
    local d
    for d in "${LIB_DIRS[@]}"; do
        if [ -e "$1/$d/$2" ]; then echo "$d/$2"; return 0; fi
    done
    return 1
}

# debian_tool_step LABEL BINARY GUEST_PATH CHECK_ARG PACKAGES...: Debian's BINARY (its path
# in the first package, e.g. usr/sbin/nvme), as GUEST_PATH, and exactly the shared
# libraries it loads, from PACKAGES, into $CACHE/LABEL, with the /etc files named in
# TOOL_ETC_FILES. `GUEST_PATH CHECK_ARG` must run with only these files, as in the guest.
# GUEST_PATH must not be a busybox applet's name: busybox's shell runs its own applet for
# such a name whatever PATH says.
debian_tool_step() {
    local label=$1 bin=$2 guest_bin=$3 check=$4; shift 4
    local dir="$CACHE/$label" t pkg want queue f n lib
    local -A seen=()
    want=$( { for pkg in "$@"; do basename "$(download_deb "$pkg")"; done; echo "$bin $guest_bin $check";
              printf '%s\n' "${TOOL_ETC_FILES[@]}"; declare -f debian_tool_step find_library; } \
            | sha256sum | cut -d' ' -f1)
    if [ -f "$dir/.complete" ] && [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$want" ]; then
        step "$label" "cached ($1 $(cat "$dir/.version"), $(du -sk "$dir" | cut -f1) KiB with libraries)"
        return
    fi
    t=$(mktmp "$label")
    for pkg in "$@"; do
        dpkg-deb -x "$(download_deb "$pkg")" "$t/pkg"
    done
    mkdir -p "$t/out/$(dirname "$guest_bin")" "$t/out/lib/x86_64-linux-gnu" "$t/out/lib64"
    cp "$t/pkg/$bin" "$t/out/$guest_bin"
    for f in "${TOOL_ETC_FILES[@]}"; do
        install -D -m 644 "$t/pkg/$f" "$t/out/$f"
    done
    # Breadth-first over DT_NEEDED: every library the binary loads, directly or not.
    queue=("$bin")
    while [ ${#queue[@]} -gt 0 ]; do
        f=${queue[0]}; queue=("${queue[@]:1}")
        for n in $(readelf -d "$t/pkg/$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            [ -n "${seen[$n]:-}" ] && continue
            lib=$(find_library "$t/pkg" "$n") || die "$label needs $n, which none of its packages ($*) has"
            seen[$n]=1
            cp -L "$t/pkg/$lib" "$t/out/lib/x86_64-linux-gnu/$n"
            queue+=("$lib")
        done
    done
    cp -L "$t/pkg/lib64/ld-linux-x86-64.so.2" "$t/out/lib64/ld-linux-x86-64.so.2"
    # No host library may fill a gap.
    "$t/out/lib64/ld-linux-x86-64.so.2" --inhibit-cache --library-path "$t/out/lib/x86_64-linux-gnu" \
        "$t/out/$guest_bin" "$check" >"$t/check.txt" 2>&1 \
        || { cat "$t/check.txt" >&2; die "the extracted $label does not run"; }
    dpkg-deb -f "$(download_deb "$1")" Version >"$t/out/.version"
    echo "$want" >"$t/out/.stamp"
    : >"$t/out/.complete"
    replace_dir "$t/out" "$dir"
    step "$label" "extracted $1 $(cat "$dir/.version") with ${#seen[@]} libraries ($(du -sk "$dir" | cut -f1) KiB)"
}

# RAW_FILES entries for the tools in $CACHE/LABEL...: each file under it (binary, /etc
# files, loader, libraries) at the same path in the guest, once.
debian_tool_files() {
    local label
    for label in "$@"; do
        (cd "$CACHE/$label" && find . -type f ! -name '.*' | sed 's|^\./||')
    done | sort -u | while read -r f; do
        for label in "$@"; do
            if [ -f "$CACHE/$label/$f" ]; then echo "$CACHE/$label/$f:/$f"; break; fi
        done
    done
}

# ---------------------------------------------------------------------------------
# 3. Initramfs images
# ---------------------------------------------------------------------------------
# Module files (absolute, .ko.xz) for modules $@, in load order, deduplicated.
module_files() {
    local m
    for m in "$@"; do
        modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++'
}

# make_initramfs NAME INIT_SCRIPT OUTPUT MODULES...
# Staging tree: busybox + applet links, /dev/console, decompressed modules in
# /lib/modules/*.ko with their load order in /etc/modules (those of ONDEMAND_MODULES that
# the boot list lacks in /etc/modules.ondemand: a scenario loads them), /init, and the files of
# the EXTRA_FILES array ("HOST_PATH:/ABS/PATH/IN/IMAGE", mode 755), all gzip'd. The
# files of RAW_FILES (same syntax) follow in a second, uncompressed newc archive: the
# kernel unpacks both into one rootfs. Used for fio: a static binary that gzip shrinks
# only 2.8 -> 0.9 MB, while inflating it costs the L2 guest boot time under TCG (see
# guests/README.md); copying 2.8 MB more costs next to nothing.
make_initramfs() {
    local name=$1 init=$2 out=$3; shift 3
    local t root f base
    t=$(mktmp "$name")
    root="$t/root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root,lib/modules}
    cp "$BUSYBOX" "$root/bin/busybox"
    "$BUSYBOX" --list-full | while read -r f; do
        [ "$f" = bin/busybox ] || ln -sf /bin/busybox "$root/$f"
    done
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
    : >"$root/etc/modules"
    : >"$root/etc/modules.ondemand"
    local list=modules
    for f in $(module_files "$@") - $(module_files "${ONDEMAND_MODULES[@]}"); do
        if [ "$f" = - ]; then list=modules.ondemand; continue; fi
        base=$(basename "$f"); base=${base%.xz}; base=${base%.zst}; base=${base%.gz}
        [ -e "$root/lib/modules/$base" ] && continue
        case $f in
            *.xz)  xz -dc "$f" >"$root/lib/modules/$base" ;;
            *.zst) zstd -qdc "$f" >"$root/lib/modules/$base" ;;
            *.gz)  gzip -dc "$f" >"$root/lib/modules/$base" ;;
            *)     cp "$f" "$root/lib/modules/$base" ;;
        esac
        echo "${base%.ko}" >>"$root/etc/$list"
    done
    echo "$KVER" >"$root/etc/kernel-version"
    install -m 755 "$init" "$root/init"
    for f in "${EXTRA_FILES[@]}"; do
        install -D -m 755 "${f%%:*}" "$root${f#*:}"
    done
    find "$root" -exec touch -h -d @0 {} +   # reproducible archive
    (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
        | cpio --null -o -H newc --owner=0:0 --reproducible --quiet) | gzip -9n >"$t/out.cpio.gz"
    # Zero-pad to a multiple of 4 bytes: the kernel accepts an uncompressed newc archive
    # appended after a compressed one only at a 4-byte-aligned offset ("invalid magic at
    # start of compressed archive" otherwise); zero bytes between archives are skipped.
    local size; size=$(stat -c %s "$t/out.cpio.gz")
    head -c $(( (4 - size % 4) % 4 )) /dev/zero >>"$t/out.cpio.gz"
    if [ ${#RAW_FILES[@]} -gt 0 ]; then
        mkdir -p "$t/raw"
        for f in "${RAW_FILES[@]}"; do
            install -D -m 755 "${f%%:*}" "$t/raw${f#*:}"
        done
        find "$t/raw" -exec touch -h -d @0 {} +
        # GNU cpio pads the archive to 512 bytes, so anything appended later stays aligned.
        (cd "$t/raw" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
            | cpio --null -o -H newc --owner=0:0 --reproducible --quiet) >>"$t/out.cpio.gz"
    fi
    mv -f "$t/out.cpio.gz" "$out"
    MODLIST=$(tr '\n' ' ' <"$root/etc/modules")
    if [ -s "$root/etc/modules.ondemand" ]; then
        MODLIST="$MODLIST(on demand: $(tr '\n' ' ' <"$root/etc/modules.ondemand" | sed 's/ $//')) "
    fi
}

# Rebuild $out when its stamp (hash of the init script, kernel, busybox, module list
# and this build function) differs.
initramfs_step() {
    local label=$1 init=$2 out=$3; shift 3
    local stamp="$out.stamp" want
    want=$( { cat "$init"; echo "$KVER"; cat "$CACHE/busybox/.version"; echo "$* - ${ONDEMAND_MODULES[*]}";
              for f in "${EXTRA_FILES[@]}" - "${RAW_FILES[@]}"; do
                  [ "$f" = - ] && { echo raw; continue; }
                  echo "${f#*:}"; sha256sum <"${f%%:*}"
              done
              declare -f make_initramfs module_files; } | sha256sum | cut -d' ' -f1)
    if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        step "$label" "cached ($(basename "$out"), $(du -k "$out" | cut -f1) KiB)"
        return
    fi
    mkdir -p "$(dirname "$out")"
    rm -f "$stamp"
    MODLIST=""
    make_initramfs "$label" "$init" "$out" "$@"
    echo "$want" | put_file "$stamp"
    step "$label" "built $(basename "$out") ($(du -k "$out" | cut -f1) KiB; modules: ${MODLIST% })"
}

host_tools
install_qemu
kernel
lab_kernel
busybox
fio_step
TOOL_ETC_FILES=()
debian_tool_step nvme-cli usr/sbin/nvme usr/sbin/nvme version "${NVME_CLI_PACKAGES[@]}"
TOOL_ETC_FILES=(etc/mke2fs.conf)
debian_tool_step mke2fs sbin/mke2fs usr/sbin/mkfs.ext4 -V "${MKE2FS_PACKAGES[@]}"
EXTRA_FILES=("$GUESTS/pattern.sh:/bin/blkswarm-pattern")
mapfile -t RAW_FILES < <(echo "$FIO:/usr/bin/fio"; debian_tool_files nvme-cli mke2fs)
ONDEMAND_MODULES=("${GUEST_ONDEMAND_MODULES[@]}")
initramfs_step guest-initramfs "$GUESTS/guest-init.sh" "$CACHE/guest/initramfs.cpio.gz" "${GUEST_MODULES[@]}"
RAW_FILES=()
ONDEMAND_MODULES=()
initramfs_step lab-initramfs "$GUESTS/lab-init.sh" "$CACHE/lab/l1-base.cpio.gz" "${LAB_MODULES[@]}"
