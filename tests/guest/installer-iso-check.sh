#!/usr/bin/env bash
# Boots build/guest/installer.iso (tests/guest/installer-iso.sh) under QEMU with one firmware and
# waits for the Debian installer's first screen on the serial console. The ISO is attached as a
# virtio-blk disk (512-byte sectors), the way Hutch attaches it, so the firmware must find the
# boot loader through the image's partition table (UEFI: the GPT's EFI system partition; BIOS:
# the MBR boot code), not through El Torito. TCG, no NIC: nothing leaves the machine.
# Usage: tests/guest/installer-iso-check.sh uefi|bios [TIMEOUT_SECONDS (default 300)]
# Exits 0 once the first screen is on serial, non-zero with the serial log's tail otherwise.
# The serial log stays in $BUILD/installer-check/FIRMWARE.serial.log.
#
# Sourced (by the lab's e2e cases and the benchmark), it only defines the functions below:
#   installer_strip_ansi FILE    FILE's text without terminal escapes, one line per line
#   installer_first_screen FILE  true once FILE holds d-i's first screen; prints the line matched
# shellcheck shell=bash

# installer_strip_ansi FILE: d-i's newt UI draws with ANSI/VT100 escapes (colours, the
# line-drawing character set, cursor positioning instead of newlines). A cursor positioning starts
# a new line (so a screen row reads as one line), other cursor moves become a space (they may
# stand for blanks in the screen's text), every other escape and control character goes, and
# carriage returns end lines.
installer_strip_ansi() {
    LC_ALL=C sed -E \
        -e 's/\x1b\[[0-9;]*[Hf]/\n/g' \
        -e 's/\x1b\[[0-9;?]*[ABCDGd]/ /g' \
        -e 's/\x1b\[[0-9;?]*[ -\/]*[@-~]//g' \
        -e 's/\x1b[()*+][0-9A-Za-z]//g' \
        -e 's/\x1b[=>78DEHMNOZc]//g' \
        -e 's/\r/\n/g' \
        -e 's/[\x00-\x08\x0b-\x1f\x7f]//g' \
        "$1" 2>/dev/null
}

# installer_first_screen FILE: the Debian installer's first screen ("[!!] Select a language",
# whose text reads "Choose the language to be used for the installation process") is in the
# serial log FILE. Prints the first line that matched. Blanks are matched loosely because newt
# may move the cursor over them instead of writing spaces.
# (grep reads to the end, without -m: an early exit would fail the pipeline under pipefail.)
installer_first_screen() {
    local lines
    lines=$(installer_strip_ansi "$1" |
        LC_ALL=C grep -E 'Select[[:space:]]+a[[:space:]]+language|Choose[[:space:]]+the[[:space:]]+language') ||
        return 1
    printf '%s\n' "${lines%%$'\n'*}" | sed -E 's/^[[:space:]]+//; s/[[:space:]]+$//; s/[[:space:]]{2,}/ /g'
}

# The first time (seconds since launch) each boot milestone showed up on serial.
installer_check_milestones() {
    local log=$1 t=$2
    if [ -z "${M_BYTE:-}" ] && [ -s "$log" ]; then
        M_BYTE=$t
        echo "  ${t}s first serial byte"
    fi
    if [ -z "${M_GRUB:-}" ] && installer_strip_ansi "$log" | grep -q -m 1 -E 'GNU GRUB|Booting .Debian'; then
        M_GRUB=$t
        echo "  ${t}s GRUB"
    fi
    if [ -z "${M_KERNEL:-}" ] && grep -a -q -m 1 'Linux version' "$log"; then
        M_KERNEL=$t
        echo "  ${t}s kernel: $(grep -a -m 1 -o 'Linux version [^ ]*' "$log")"
    fi
}

installer_check_main() {
    set -euo pipefail
    . "$(dirname "${BASH_SOURCE[0]}")/../lab/common.sh"
    local fw=${1:-} timeout=${2:-300}
    case $fw in
    uefi | bios) ;;
    *) die "usage: $0 uefi|bios [TIMEOUT_SECONDS]" ;;
    esac
    require_tools qemu-system-x86_64 sed grep
    local iso=$BUILD/guest/installer.iso
    [ -f "$iso" ] || die "no $iso (run: $REPO/tests/guest/installer-iso.sh)"
    local dir=$BUILD/installer-check
    mkdir -p "$dir"
    local log=$dir/$fw.serial.log
    : >"$log"

    # BIOS: QEMU's default -bios (SeaBIOS).
    qemu_firmware_args "$fw" "$dir/uefi.vars.fd"
    qemu-system-x86_64 -accel tcg -M q35 -m 1024 -smp 1 -nodefaults -nic none -nographic \
        -monitor none -serial "file:$log" "${QEMU_FIRMWARE[@]}" \
        -drive "file=$iso,if=virtio,format=raw,readonly=on" </dev/null >"$dir/$fw.qemu.log" 2>&1 &
    local qemu=$!
    # shellcheck disable=SC2064 # the pid is meant to be fixed now
    trap "kill $qemu 2>/dev/null; wait $qemu 2>/dev/null || true" EXIT

    local t0 t line=
    t0=$(now_ms)
    echo "installer-check $fw: QEMU pid $qemu, serial log $log (bound ${timeout}s)"
    M_BYTE= M_GRUB= M_KERNEL=
    while :; do
        t=$(($(now_ms) - t0))
        t=$((t / 1000)).$(printf '%01d' $((t % 1000 / 100)))
        installer_check_milestones "$log" "$t"
        if line=$(installer_first_screen "$log"); then
            echo "  ${t}s first screen: $line"
            echo "installer-check $fw: PASS, d-i's first screen after ${t}s"
            return 0
        fi
        if ! kill -0 "$qemu" 2>/dev/null; then
            echo "installer-check $fw: FAIL, QEMU exited after ${t}s: $(tail -n 5 "$dir/$fw.qemu.log")" >&2
            break
        fi
        if [ "${t%.*}" -ge "$timeout" ]; then
            echo "installer-check $fw: FAIL, no first screen within ${timeout}s" >&2
            break
        fi
        sleep 0.5
    done
    echo "--- the serial log's tail ($log, escapes stripped):" >&2
    installer_strip_ansi "$log" | grep -v '^[[:space:]]*$' | tail -n 40 >&2
    return 1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    installer_check_main "$@"
fi
