#!/usr/bin/env bash
# Builds build/guest/installer.iso for the firmware-boot tests and benchmark: a hybrid BIOS+UEFI
# image (grub-mkrescue) holding Debian 12's text installer (the netboot kernel and initrd of
# debian-installer-12-netboot-amd64), with GRUB and the installer both on the serial console.
# Booted from a virtio-blk disk (512-byte sectors, as Hutch attaches it), OVMF finds GRUB through
# the image's MBR partition table (an EFI system partition) and SeaBIOS through its MBR boot code.
# Cached: rebuilt only when its inputs change (the d-i, GRUB, xorriso and mtools package versions,
# this script); the inputs are kept in installer.iso.stamp next to the image.
# Installs nothing: tests/lab/deps.sh installs the packages it names.
# Usage: tests/guest/installer-iso.sh
set -euo pipefail
. "$(dirname "$0")/../lab/common.sh"

DI_PKG=debian-installer-12-netboot-amd64
DI_DIR=/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64
# Packages whose versions shape the image (DI_PKG first).
INPUT_PKGS=("$DI_PKG" grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools)

# need_path PATH PACKAGE: PATH exists, or fail naming the package that provides it.
need_path() {
    [ -e "$1" ] || die "missing $1 (Debian package $2; run: $REPO/tests/lab/deps.sh)"
}

# need_tool CMD PACKAGE: CMD is on PATH, or fail naming the package that provides it.
need_tool() {
    command -v "$1" >/dev/null 2>&1 || die "missing $1 (Debian package $2; run: $REPO/tests/lab/deps.sh)"
}

check_tools() {
    need_tool grub-mkrescue grub-common
    need_tool xorriso xorriso
    need_tool mformat mtools
    need_tool dpkg-query dpkg
    need_tool sha256sum coreutils
    need_path /usr/lib/grub/i386-pc/boot_hybrid.img grub-pc-bin
    need_path /usr/lib/grub/x86_64-efi/linux.mod grub-efi-amd64-bin
    need_path "$DI_DIR/linux" "$DI_PKG"
    need_path "$DI_DIR/initrd.gz" "$DI_PKG"
}

# inputs: what the image is made of, one line each; a change in any line means a rebuild.
inputs() {
    package_versions "${INPUT_PKGS[@]}"
    echo "script $(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)"
}

# GRUB and the installer on COM1. No quiet: the kernel's log on serial shows where a boot stops
# and when the kernel starts. d-i's own defaults otherwise (priority high: the first screen is
# "Select a language").
# The second entry is the installer on the screen, as a user sees it: a key pressed before the
# 1 s countdown ends (End picks the last entry) stops it there, and the VM's display and
# keyboard carry the installer from there (a framebuffer mode for Linux; its log stays on COM1).
write_grub_cfg() {
    cat >"$1" <<'EOF'
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
set default=0
menuentry 'Debian 12 installer (serial console)' {
    linux /install/vmlinuz console=ttyS0,115200n8
    initrd /install/initrd.gz
}
menuentry 'Debian 12 installer (on the screen)' {
    insmod all_video
    set gfxpayload=1024x768x32,1024x768,auto
    linux /install/vmlinuz console=ttyS0,115200n8 console=tty0
    initrd /install/initrd.gz
}
EOF
}

main() {
    check_tools
    local t0 out=$BUILD/guest
    t0=$(now_ms)
    local iso=$out/installer.iso stamp=$out/installer.iso.stamp want
    want=$(inputs)
    if [ -f "$iso" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        echo "installer-iso: reused the cached $iso ($(stat -c %s "$iso") bytes; inputs unchanged," \
            "$(($(now_ms) - t0)) ms)"
        return 0
    fi
    mkdir -p "$out"
    rm -f "$stamp"

    STAGE=$(mktemp -d "$BUILD/installer-iso-stage.XXXXXX")
    trap 'rm -rf "$STAGE"' EXIT
    local tree=$STAGE/tree
    mkdir -p "$tree/install" "$tree/boot/grub"
    cp "$DI_DIR/linux" "$tree/install/vmlinuz"
    cp "$DI_DIR/initrd.gz" "$tree/install/initrd.gz"
    write_grub_cfg "$tree/boot/grub/grub.cfg"
    # Fixed file times, so that they do not depend on when the image was built.
    find "$tree" -exec touch -h -d @0 {} +

    # No fonts, locales or themes: a serial-only GRUB needs none of them.
    log "installer-iso: grub-mkrescue ($(dpkg-query -W -f='${Version}' "$DI_PKG") d-i)"
    grub-mkrescue --fonts= --locales= --themes= -o "$STAGE/installer.iso" "$tree" \
        >"$STAGE/mkrescue.log" 2>&1 || {
        cat "$STAGE/mkrescue.log" >&2
        die "grub-mkrescue failed"
    }
    # Into place only complete: the image first, then the stamp that vouches for it.
    # (Temp names per process: two builds at once do not mix their files.)
    mv "$STAGE/installer.iso" "$iso.$$.tmp"
    sync "$iso.$$.tmp"
    mv "$iso.$$.tmp" "$iso"
    echo "$want" >"$stamp.$$.tmp"
    mv "$stamp.$$.tmp" "$stamp"
    echo "installer-iso: built $iso ($(stat -c %s "$iso") bytes, sha256" \
        "$(sha256sum "$iso" | cut -d' ' -f1)) in $(($(now_ms) - t0)) ms"
}

main "$@"
