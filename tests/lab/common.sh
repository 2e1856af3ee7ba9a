# Shared helpers for the guest fixtures, the nested lab, the e2e harness and the benches.
# Sourced, never run. Sets REPO (the checkout root) and BUILD ($REPO/build).
# shellcheck shell=bash

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
BUILD=${BUILD:-$REPO/build}

die() {
    echo "error: $*" >&2
    exit 1
}

log() {
    echo "[$(date +%T)] $*" >&2
}

# Milliseconds since the epoch (GNU date on the host side).
now_ms() {
    date +%s%3N
}

# tcp_listening PORT [SECS]: something listens on 127.0.0.1:PORT (TCP; /proc/net/tcp, state
# 0A), waiting at most SECS (default 30; 0: only now). False when nothing does.
tcp_listening() {
    local hex i
    hex=$(printf '0100007F:%04X 00000000:0000 0A' "$1")
    for i in $(seq 0 $((${2:-30} * 5))); do
        grep -q "$hex" /proc/net/tcp && return 0
        [ "$i" = $((${2:-30} * 5)) ] || sleep 0.2
    done
    return 1
}

# require_tools CMD... : fail with the package hint if a tool is missing.
require_tools() {
    local missing=()
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        die "missing tools: ${missing[*]} (run: $REPO/tests/lab/deps.sh)"
    fi
}

# A python3 from Debian's own package; stdlib only.
PYTHON=${PYTHON:-python3}

# The host's firmware, from Debian's ovmf and seabios packages.
OVMF_CODE=${OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
OVMF_VARS=${OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}
SEABIOS=${SEABIOS:-/usr/share/seabios/bios.bin}

# qemu_firmware_args uefi|bios VARS_COPY [BIOS_IMAGE] : QEMU's firmware options, in the array
# QEMU_FIRMWARE. UEFI: OVMF's CODE read-only and a fresh copy of its VARS template at
# VARS_COPY (as Hutch keeps one per VM). BIOS: -bios BIOS_IMAGE, or none for QEMU's own default.
qemu_firmware_args() {
    QEMU_FIRMWARE=()
    if [ "$1" = uefi ]; then
        [ -f "$OVMF_CODE" ] && [ -f "$OVMF_VARS" ] ||
            die "no $OVMF_CODE / $OVMF_VARS (Debian package ovmf)"
        cp "$OVMF_VARS" "$2"
        QEMU_FIRMWARE=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
            -drive "if=pflash,format=raw,unit=1,file=$2")
    elif [ -n "${3:-}" ]; then
        [ -f "$3" ] || die "no $3 (Debian package seabios)"
        QEMU_FIRMWARE=(-bios "$3")
    fi
}

# package_versions PKG... : "package PKG VERSION" per installed package (a fixture's stamp
# lines); a package that is not installed is fatal.
package_versions() {
    local p v
    for p in "$@"; do
        v=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null) || die "package $p is not installed"
        echo "package $p $v"
    done
}
