#!/usr/bin/env bash
# Installs the Debian packages the guest fixtures, the lab, the e2e harness and the benches need.
# Run as root. Idempotent: quick when everything is already present.
set -euo pipefail

PKGS=(qemu-system-x86 qemu-utils busybox-static cpio kmod socat python3 xz-utils zstd gzip
    coreutils time procps acpica-tools
    # The GUI and screen tests: a real X server, input, screenshots, OCR of the guest console.
    xvfb xauth xdotool imagemagick tesseract-ocr libgl1-mesa-dri libegl1 libxkbcommon-x11-0
    libxcursor1 libxrandr2 libxi6
    # Disk image fixtures (ISO 9660).
    genisoimage)

if [ "$(id -u)" -ne 0 ]; then
    echo "error: deps.sh must run as root" >&2
    exit 1
fi

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

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
V=$(apt-cache policy qemu-system-x86 | awk '/Candidate/{print $2}')
[ -n "$V" ] && [ "$V" != "(none)" ] || { echo "error: no qemu-system-x86 candidate" >&2; exit 1; }
others=()
for p in "${PKGS[@]}"; do
    case $p in qemu-system-x86 | qemu-utils) ;; *) others+=("$p") ;; esac
done
apt-get install -y -q --allow-downgrades --no-install-recommends \
    "qemu-system-x86=$V" "qemu-utils=$V" "qemu-block-extra=$V" "qemu-system-common=$V" \
    "${others[@]}"
echo "deps: installed (qemu $V)"
