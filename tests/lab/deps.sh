#!/usr/bin/env bash
# Installs the Debian packages the guest fixtures, the lab, the e2e harness and the benches need.
# Idempotent: quick when everything is already present. Installing needs root: as root it runs
# apt-get directly (a fresh Debian has no sudo), otherwise through sudo.
set -euo pipefail

PKGS=(qemu-system-x86 qemu-utils busybox-static cpio kmod socat python3 xz-utils zstd gzip
    coreutils time procps acpica-tools
    # The GUI and screen tests: a real X server, input, screenshots, OCR of the guest console.
    xvfb xauth xdotool imagemagick tesseract-ocr libgl1-mesa-dri libegl1 libxkbcommon-x11-0
    libxcursor1 libxrandr2 libxi6
    # Disk image fixtures (ISO 9660).
    genisoimage
    # Firmware: OVMF (and its variable template for the pflash tests), SeaBIOS and its VGA BIOSes.
    ovmf seabios
    # User-mode networking (net/): libslirp to link and run against.
    libslirp-dev libslirp0
    # Firmware-boot fixture (tests/guest/installer-iso.sh): d-i's netboot kernel and initrd in a
    # hybrid BIOS+UEFI ISO made by grub-mkrescue (its i386-pc and x86_64-efi modules, xorriso, mtools).
    debian-installer-12-netboot-amd64 grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools
    # Installed-disk fixture (tests/guest/installed-disk.sh): a debootstrap'd Debian 12 on MBR and
    # GPT disk images (sfdisk), its file systems made in files (mkfs.ext4 -d, mkfs.fat + mtools).
    debootstrap fdisk e2fsprogs dosfstools)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# qemu-utils from backports (10.x) conflicts with Debian's qemu-system-x86 7.2: both must be
# the same version (KVM-LAB.md, "Package pitfall").
qsys=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
qutl=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)

if [ ${#missing[@]} -eq 0 ] && [ "$qsys" = "$qutl" ]; then
    echo "deps: all present (qemu $qsys)"
    exit 0
fi

# apt-get as root: directly, or through sudo for a user (asked only when something is missing).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo DEBIAN_FRONTEND=noninteractive "$@"
    else
        echo "error: installing Debian packages needs root, and there is no sudo: run" \
            "tests/lab/deps.sh as root once (missing: ${missing[*]:-matching qemu-utils})" >&2
        exit 1
    fi
}

echo "deps: installing ${missing[*]:-qemu-utils $qsys}"
export DEBIAN_FRONTEND=noninteractive
as_root apt-get update -qq
V=$(apt-cache policy qemu-system-x86 | awk '/Candidate/{print $2}')
[ -n "$V" ] && [ "$V" != "(none)" ] || { echo "error: no qemu-system-x86 candidate" >&2; exit 1; }
others=()
for p in "${PKGS[@]}"; do
    case $p in qemu-system-x86 | qemu-utils) ;; *) others+=("$p") ;; esac
done
as_root apt-get install -y -q --allow-downgrades --no-install-recommends \
    "qemu-system-x86=$V" "qemu-utils=$V" "qemu-block-extra=$V" "qemu-system-common=$V" \
    "${others[@]}"
echo "deps: installed (qemu $V)"
