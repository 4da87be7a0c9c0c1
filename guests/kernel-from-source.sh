#!/usr/bin/env bash
# Build a small Linux kernel tree from Debian bookworm's linux-source-6.1 package,
# configured with guests/kernel-minimal.config: what a test uses as "a user's kernel tree"
# (`blkswarm-guest --kernel <tree>`).
#
# Usage: bash guests/kernel-from-source.sh [--install-modules]
#
#   The last line of stdout is the tree's path, $CACHE/src/linux-source-6.1 (built:
#   arch/x86/boot/bzImage, the modules in the tree, .config); progress goes to stderr:
#     tree=$(bash guests/kernel-from-source.sh | tail -1)
#   --install-modules  also `make modules_install INSTALL_MOD_PATH=$CACHE/src/linux-source-6.1-modules`
#                      (by default the modules stay in the tree, for the caller's own
#                      modules_install)
#
# Steps (one `[build] <step> cached/built ...` line each, on stderr):
#   1. apt-installs whichever build dependencies are missing (`apt-get update` at most
#      once, and only if an install fails);
#   2. `apt-get download linux-source-6.1` into $CACHE/debs (reused if present);
#   3. in a temp dir: `dpkg -x`, untar usr/src/linux-source-6.1.tar.xz (the .deb's
#      extraction is removed right after); the pristine tree then replaces
#      $CACHE/src/linux-source-6.1;
#   4. there: `make tinyconfig`, merge the fragment (`scripts/kconfig/merge_config.sh -m`),
#      `make olddefconfig`, check that every option of the fragment stuck, `make bzImage
#      modules`; then the stamp and the .complete marker.
#   The build runs at the tree's final path, not in the temp dir: kbuild's objtool build
#   records absolute paths, and every object depends on objtool, so a `make` in a tree
#   moved after its build recompiles all of it (5.5 min on 2 cores). A tree without
#   .complete is never taken as built; an interrupted build (its stamp in
#   .blkswarm-kernel.building) is resumed by the next run, anything else re-extracted.
#   A re-run whose stamp (sha256 of the fragment, the source package version and the build
#   functions) matches prints a `cached` line and exits in well under a second.
#
# Environment:
#   BLKSWARM_CACHE  cache directory (default: <repo>/.cache)
#   BLKSWARM_JOBS   parallel make jobs (default: nproc)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BLKSWARM_CACHE:-$REPO/.cache}
FRAGMENT="$REPO/guests/kernel-minimal.config"
PKG=linux-source-6.1
TREE="$CACHE/src/linux-source-6.1"
MODS="$CACHE/src/linux-source-6.1-modules"
STAMP_NAME=.blkswarm-kernel.stamp
VERSION_NAME=.blkswarm-kernel.version
BUILDING_NAME=.blkswarm-kernel.building

# Quiet apt, no "_apt cannot access" sandbox warnings for downloads into the cache.
APT_OPTS=(-q -o APT::Sandbox::User=root -o Dpkg::Use-Pty=0)

step() { printf '[build] %-18s %s\n' "$1" "$2" >&2; }
die() { printf '[build] error: %s\n' "$*" >&2; exit 1; }

INSTALL_MODULES=0
for arg in "$@"; do
    case $arg in
        --install-modules) INSTALL_MODULES=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--install-modules])" ;;
    esac
done
[ -f "$FRAGMENT" ] || die "no config fragment $FRAGMENT"

mkdir -p "$CACHE/src"
# One build at a time per cache: concurrent callers wait, then find the tree cached.
exec 9>"$CACHE/.kernel-src.lock"
flock 9

# Temp and old dirs are $CACHE/src/.kernel-src.* (same file system as the tree: mv is
# atomic). Not $CACHE/.tmp.*: guests/build.sh removes those under its own lock, which
# does not exclude this script. With our lock held, every .kernel-src.* is ours or a
# leftover of a killed run.
cleanup() { rm -rf "$CACHE"/src/.kernel-src.*; }
trap cleanup EXIT
cleanup
mktmp() { local d; d=$(mktemp -d "$CACHE/src/.kernel-src.$1.XXXXXX"); chmod 755 "$d"; echo "$d"; }

# Replace directory $2 with directory $1: the old one is moved aside first, so $2 is
# either the whole old or the whole new directory, never a mix.
replace_dir() {
    local new=$1 dst=$2 old
    if [ -e "$dst" ]; then old="$CACHE/src/.kernel-src.old.$(basename "$dst").$$"; mv "$dst" "$old"; fi
    mv "$new" "$dst"
    if [ -n "${old:-}" ]; then rm -rf "$old"; fi
}

# The first existing path among $@ (unmatched globs stay literal), else status 1.
first_match() { local f; for f in "$@"; do if [ -e "$f" ]; then echo "$f"; return 0; fi; done; return 1; }

APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    apt-get "${APT_OPTS[@]}" update >/dev/null
    APT_UPDATED=1
}

# Run "$@" (an apt-get command); on failure `apt-get update` once and retry.
apt_retry() {
    if ! "$@" >/dev/null 2>&1; then
        apt_update_once
        "$@" >/dev/null
    fi
}

# ---------------------------------------------------------------------------------
# Build dependencies: package:command-or-file, installed only if missing.
# libelf-dev: objtool (x86_64 with retpolines/rethunks); libc6-dev: the host programs of
# kbuild; kmod: depmod for modules_install; xz-utils: the source tarball and KERNEL_XZ;
# cpio: kheaders/initramfs tooling; bc: timeconst.h; gzip: IKCONFIG's config_data.gz.
# ---------------------------------------------------------------------------------
BUILD_DEPS=(gcc:gcc make:make flex:flex bison:bison bc:bc binutils:ld libc6-dev:/usr/include/stdio.h
            libelf-dev:/usr/include/libelf.h cpio:cpio xz-utils:xz kmod:depmod gzip:gzip tar:tar)
build_deps() {
    local need=() pair pkg what
    for pair in "${BUILD_DEPS[@]}"; do
        pkg=${pair%%:*}; what=${pair#*:}
        case $what in
            /*) [ -e "$what" ] || need+=("$pkg") ;;
            *) command -v "$what" >/dev/null 2>&1 || need+=("$pkg") ;;
        esac
    done
    if [ ${#need[@]} -eq 0 ]; then step kernel-deps "cached (all build dependencies present)"; return; fi
    [ "$(id -u)" = 0 ] || die "must run as root to apt-get install: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt_retry apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${need[@]}"
    hash -r
    step kernel-deps "installed ${need[*]}"
}

# Download package $1 into $CACHE/debs (reused if there; apt-get update once on failure).
download_deb() {
    local pkg=$1 f t
    mkdir -p "$CACHE/debs"
    f=$(first_match "$CACHE/debs/${pkg}"_*.deb || true)
    if [ -n "$f" ]; then echo "$f"; return; fi
    t=$(mktmp deb)
    (cd "$t" && apt_retry apt-get "${APT_OPTS[@]}" download "$pkg") || die "apt-get download $pkg failed"
    f=$(first_match "$t/${pkg}"_*.deb) || die "apt-get download $pkg gave no .deb"
    mv "$f" "$CACHE/debs/"
    echo "$CACHE/debs/$(basename "$f")"
}

# The source package version: that of the .deb in $CACHE/debs, else the one the tree
# was built from (a cleaned debs/ does not force a rebuild), else empty.
source_version() {
    local deb
    deb=$(first_match "$CACHE/debs/${PKG}"_*.deb || true)
    if [ -n "$deb" ]; then dpkg-deb -f "$deb" Version; return; fi
    cat "$TREE/$VERSION_NAME" 2>/dev/null || true
}

stamp_for() {
    { cat "$FRAGMENT"; echo "$1"; declare -f extract_source configure_kernel build_kernel; } | sha256sum | cut -d' ' -f1
}

# ---------------------------------------------------------------------------------
# Configure in tree $1: tinyconfig + fragment + olddefconfig, then every option of the
# fragment must be in .config as written.
# ---------------------------------------------------------------------------------
configure_kernel() {
    local tree=$1 log=$2 line opt val bad=()
    (cd "$tree" && make tinyconfig >"$log" 2>&1 \
        && scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >>"$log" 2>&1 \
        && make olddefconfig >>"$log" 2>&1) \
        || { tail -30 "$log" >&2; die "kernel configuration failed (log: $log)"; }
    while IFS= read -r line; do
        case $line in
            CONFIG_*=*)
                opt=${line%%=*}; val=${line#*=}
                grep -qxF "$opt=$val" "$tree/.config" \
                    || bad+=("$opt=$val (.config: $(grep -E "^(# )?$opt[= ]" "$tree/.config" || echo "absent"))") ;;
            "# CONFIG_"*" is not set")
                opt=${line#\# }; opt=${opt%% *}
                ! grep -q "^$opt=" "$tree/.config" || bad+=("$line (.config: $(grep "^$opt=" "$tree/.config"))") ;;
        esac
    done <"$FRAGMENT"
    if [ ${#bad[@]} -gt 0 ]; then
        printf '[build] error: option did not stick: %s\n' "${bad[@]}" >&2
        die "${#bad[@]} option(s) of $(basename "$FRAGMENT") did not stick (missing dependency?)"
    fi
}

# Extract the source from .deb $1 in a temp dir; the pristine tree replaces $TREE (the old
# tree and its installed modules are stale), marked as being built for stamp $2.
extract_source() {
    local deb=$1 want=$2 t t0=$SECONDS
    t=$(mktmp source)
    dpkg -x "$deb" "$t/pkg"
    [ -f "$t/pkg/usr/src/$PKG.tar.xz" ] || die "no usr/src/$PKG.tar.xz in $deb"
    tar -xJf "$t/pkg/usr/src/$PKG.tar.xz" -C "$t"
    rm -rf "$t/pkg"
    [ -f "$t/$PKG/Makefile" ] || die "the tarball has no $PKG/Makefile"
    echo "$want" >"$t/$PKG/$BUILDING_NAME"
    rm -rf "$MODS"
    replace_dir "$t/$PKG" "$TREE"
    step kernel-source "extracted $(basename "$deb") ($((SECONDS - t0)) s)"
}

# Configure and build $TREE in place.
build_kernel() {
    local log="$CACHE/src/linux-source-6.1.log" jobs=${BLKSWARM_JOBS:-$(nproc)} t0=$SECONDS
    configure_kernel "$TREE" "$log"
    step kernel-config "tinyconfig + $(basename "$FRAGMENT"): every option set ($((SECONDS - t0)) s)"
    t0=$SECONDS
    (cd "$TREE" && make -j"$jobs" bzImage modules >>"$log" 2>&1) \
        || { tail -40 "$log" >&2; die "kernel build failed (log: $log)"; }
    [ -f "$TREE/arch/x86/boot/bzImage" ] || die "the build made no arch/x86/boot/bzImage"
    step kernel-build "bzImage + modules ($((SECONDS - t0)) s, $jobs jobs; log: $log)"
}

# modules_install of $TREE into $MODS (stamped like the tree).
install_modules() {
    local want=$1 t
    if [ -f "$MODS/.complete" ] && [ "$(cat "$MODS/$STAMP_NAME" 2>/dev/null)" = "$want" ]; then
        step kernel-modules "cached ($MODS)"
        return
    fi
    t=$(mktmp modules)
    (cd "$TREE" && make modules_install INSTALL_MOD_PATH="$t/out" >"$t/install.log" 2>&1) \
        || { tail -20 "$t/install.log" >&2; die "make modules_install failed"; }
    echo "$want" >"$t/out/$STAMP_NAME"
    : >"$t/out/.complete"
    replace_dir "$t/out" "$MODS"
    step kernel-modules "installed into $MODS ($(find "$MODS" -name '*.ko' | wc -l) modules)"
}

main() {
    local ver want release deb start=$SECONDS
    ver=$(source_version)
    want=$(stamp_for "$ver")
    if [ -n "$ver" ] && [ -f "$TREE/.complete" ] && [ -f "$TREE/arch/x86/boot/bzImage" ] \
        && [ "$(cat "$TREE/$STAMP_NAME" 2>/dev/null)" = "$want" ]; then
        release=$(cat "$TREE/include/config/kernel.release" 2>/dev/null || echo "?")
        step kernel-tree "cached ($release from $PKG $ver, $TREE)"
    else
        build_deps
        deb=$(download_deb "$PKG")
        ver=$(dpkg-deb -f "$deb" Version)
        want=$(stamp_for "$ver")
        if [ ! -f "$TREE/.complete" ] && [ "$(cat "$TREE/$BUILDING_NAME" 2>/dev/null)" = "$want" ]; then
            rm -rf "$MODS"
            step kernel-source "resuming the interrupted build in $TREE"
        else
            extract_source "$deb" "$want"
        fi
        build_kernel
        echo "$ver" >"$TREE/$VERSION_NAME"
        echo "$want" >"$TREE/$STAMP_NAME"
        rm -f "$TREE/$BUILDING_NAME"
        : >"$TREE/.complete"
        release=$(cat "$TREE/include/config/kernel.release")
        step kernel-tree "built $release from $PKG $ver in $((SECONDS - start)) s, bzImage $(du -k "$TREE/arch/x86/boot/bzImage" | cut -f1) KiB ($TREE)"
    fi
    if [ "$INSTALL_MODULES" = 1 ]; then install_modules "$want"; fi
    echo "$TREE"
}

main "$@"
