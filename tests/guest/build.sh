#!/usr/bin/env bash
# Builds the test guest into build/guest/: vmlinuz (Debian's bzImage), vmlinux (its ELF, for
# the PVH entry), initramfs.cpio.gz (busybox + virtio modules + tests/guest/init.sh and udhcpc.script) and VERSION.
# Usage: tests/guest/build.sh
set -euo pipefail
. "$(dirname "$0")/../lab/common.sh"
. "$REPO/tests/guest/kernel.sh"

GUEST_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    virtio_blk rng_core virtio_rng button evdev virtio_net)
# Loaded on demand (actions load:gpu, load:input), so that tests see the guest before and
# after its display and input drivers.
GPU_MODULES=(virtio-gpu)
INPUT_MODULES=(virtio_input)

main() {
    require_tools busybox cpio gzip find ldd
    local t0 out=$BUILD/guest
    t0=$(now_ms)
    kernel_prepare
    mkdir -p "$out"

    cmp -s "$KROOT/boot/vmlinuz-$KVER" "$out/vmlinuz" ||
        { cp "$KROOT/boot/vmlinuz-$KVER" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"; }
    if [ ! -f "$out/vmlinux" ] || [ "$out/vmlinux" -ot "$out/vmlinuz" ]; then
        "$PYTHON" "$REPO/tests/guest/kerneltool.py" extract-vmlinux "$out/vmlinuz" "$out/vmlinux.tmp"
        mv "$out/vmlinux.tmp" "$out/vmlinux"
    fi
    if pvh=$("$PYTHON" "$REPO/tests/guest/kerneltool.py" pvh-note "$out/vmlinux"); then
        echo "vmlinux has a PVH entry note: $pvh"
    else
        echo "vmlinux has NO PVH entry note"
    fi
    echo "${pvh#pvh-entry=}" >"$out/PVH"

    STAGE=$(mktemp -d "$BUILD/guest-stage.XXXXXX")
    trap 'rm -rf "$STAGE"' EXIT
    local stage=$STAGE
    initramfs_busybox "$stage"
    initramfs_add_modules "$stage" "${GUEST_MODULES[@]}"
    initramfs_add_modules "$stage" gpu.list "${GPU_MODULES[@]}"
    initramfs_add_modules "$stage" input.list "${INPUT_MODULES[@]}"
    install -m 0755 "$REPO/tests/guest/init.sh" "$stage/init"
    install -m 0755 "$REPO/tests/guest/udhcpc.script" "$stage/etc/udhcpc.script"
    initramfs_pack "$stage" "$out/initramfs.cpio.gz"

    echo "$KVER" >"$out/VERSION"
    echo "guest: kernel $KVER, modules: $(sed 's,.*/,,' "$stage/lib/modules/load.list" | tr '\n' ' ')"
    echo "guest: $(ls -l "$out" | awk 'NR>1{printf "%s(%s) ", $9, $5}')"
    echo "guest: built in $(($(now_ms) - t0)) ms"
}

main "$@"
