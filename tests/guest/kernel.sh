# Fetches and unpacks the Debian kernel that linux-image-amd64 depends on. Sourced (after
# tests/lab/common.sh). kernel_prepare sets KVER, KROOT (the unpacked package) and KMODDIR.
# shellcheck shell=bash

kernel_prepare() {
    require_tools apt-get apt-cache dpkg-deb depmod "$PYTHON"
    local debdir=$BUILD/kernel/debs
    mkdir -p "$debdir"
    local pkg deb
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    if [ -n "$pkg" ]; then
        deb=$(ls "$debdir/${pkg}_"*.deb 2>/dev/null | tail -n 1 || true)
        if [ -z "$deb" ]; then
            log "downloading $pkg"
            # apt's _apt user must be able to write here; fall back to root quietly.
            (cd "$debdir" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
                die "apt-get download $pkg failed (try apt-get update)"
            deb=$(ls "$debdir/${pkg}_"*.deb | tail -n 1)
        fi
    else
        # No apt index (offline, no apt-get update): use the newest cached package.
        deb=$(ls "$debdir"/linux-image-*.deb 2>/dev/null | sort -V | tail -n 1 || true)
        [ -n "$deb" ] || die "can't resolve linux-image-amd64 (run apt-get update) and no cached .deb"
    fi
    KROOT=$BUILD/kernel/root
    local stamp=$BUILD/kernel/unpacked
    if [ "$(cat "$stamp" 2>/dev/null)" != "$(basename "$deb")" ]; then
        log "unpacking $(basename "$deb")"
        rm -rf "$KROOT"
        mkdir -p "$KROOT"
        dpkg-deb -x "$deb" "$KROOT"
        KVER=$(ls "$KROOT/lib/modules" | head -n 1)
        depmod -b "$KROOT" "$KVER"
        basename "$deb" >"$stamp"
    fi
    KVER=$(ls "$KROOT/lib/modules" | head -n 1)
    KMODDIR=$KROOT/lib/modules/$KVER
    [ -f "$KROOT/boot/vmlinuz-$KVER" ] || die "no vmlinuz-$KVER in $deb"
}

# initramfs_add_modules STAGE [LIST] NAME... : copies the modules (and their dependencies) into
# STAGE/lib/modules and writes STAGE/lib/modules/load.list in insmod order.
# LIST (default load.list) names the list file, for modules loaded later on demand.
initramfs_add_modules() {
    local stage=$1
    shift
    local listfile=load.list
    case ${1:-} in
    *.list)
        listfile=$1
        shift
        ;;
    esac
    local list ko
    list=$("$PYTHON" "$REPO/tests/guest/kerneltool.py" modorder "$KMODDIR" "$@") ||
        die "module resolution failed"
    mkdir -p "$stage/lib/modules"
    : >"$stage/lib/modules/$listfile"
    for ko in $list; do
        cp "$KMODDIR/$ko" "$stage/lib/modules/"
        echo "/lib/modules/$(basename "$ko")" >>"$stage/lib/modules/$listfile"
    done
}

# initramfs_busybox STAGE : a busybox-static with its applet links and the usual directories.
initramfs_busybox() {
    local stage=$1 bb
    bb=$(command -v busybox) || die "busybox not found (apt-get install busybox-static)"
    file_is_static "$bb" || die "$bb is not static (apt-get install busybox-static)"
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,etc,mnt,root}
    cp "$bb" "$stage/bin/busybox"
    local a
    for a in $("$bb" --list); do
        [ "$a" = busybox ] || ln -sf busybox "$stage/bin/$a"
    done
}

file_is_static() {
    # A static ELF has no PT_INTERP; ldd says "not a dynamic executable".
    ! LC_ALL=C ldd "$1" >/dev/null 2>&1
}

# initramfs_pack STAGE OUT : a reproducible newc cpio, gzip'd.
initramfs_pack() {
    local stage=$1 out=$2
    require_tools cpio gzip find
    find "$stage" -exec touch -h -d @0 {} +
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc --reproducible -R 0:0) | gzip -n -9 >"$out.tmp"
    mv "$out.tmp" "$out"
}
