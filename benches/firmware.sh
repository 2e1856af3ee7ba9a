#!/usr/bin/env bash
# Firmware boot, Hutch vs QEMU (`-enable-kvm -cpu host -M q35`), the same firmware binary and
# the same installer ISO in one run of the nested lab: only ratios are meaningful there.
#
#   HUTCH=… LAB_ENV=HUTCH bash benches/firmware.sh     # builds the ISO, runs itself in the lab
#
# Per VMM, BENCH_REPS boots (default 2, medians, the VMMs interleaved) of build/guest/installer.iso
# (tests/guest/installer-iso.sh: Debian 12's installer behind GRUB, all on the serial console)
# as a read-only virtio-blk disk, 1 vCPU, BENCH_MEM MiB (default 1024), no NIC, under
# BENCH_FIRMWARE (bios, the default: Debian's SeaBIOS bios.bin; uefi: OVMF_CODE_4M.fd with a
# fresh VARS copy; an OVMF guest crashes the lab's own emulator about half the time, FIRMWARE.md
# §7.1). Seconds from launch to each milestone on serial:
#   byte     the first byte (the firmware's banner)
#   grub     GRUB's menu
#   kernel   the kernel's first line ("Linux version")
#   screen   the installer's first screen ("Select a language")
# and the VMM's peak RSS (VmHWM) at the screen.
# BENCH_MEDIA=disk boots the installed Debian instead (tests/guest/installed-disk.sh:
# debian-bios.img or debian-uefi.img, through a fresh qcow2 overlay per boot so every boot
# starts from the same disk), and the last milestone is
#   login    the installed system's login prompt ("hutch-debian login:")
# Output: a table, then fw_<milestone>_ratio= (hutch/qemu time, lower is better; the issue's
#   target is <= 0.5 to the installed system's login prompt) and fw_rss_ratio=; "n/a" (and a
#   failing exit) when a VMM could not be measured.
set -euo pipefail
. "$(dirname "$0")/../tests/lab/common.sh"

HUTCH=${HUTCH:-${CARGO_TARGET_DIR:-$REPO/target}/release/hutch}
REPS=${BENCH_REPS:-2}
MEM=${BENCH_MEM:-1024}
FIRMWARE=${BENCH_FIRMWARE:-bios}
VM_TIMEOUT=${BENCH_VM_TIMEOUT:-600}
MEDIA=${BENCH_MEDIA:-iso}
ISO=$BUILD/guest/installer.iso
DISK=$BUILD/guest/debian-$FIRMWARE.img
case $MEDIA in
iso) MILESTONES=(byte grub kernel screen) ;;
disk) MILESTONES=(byte grub kernel login) ;;
*) die "BENCH_MEDIA must be iso or disk, not $MEDIA" ;;
esac

if [ "${LAB:-}" != 1 ]; then
    "$REPO/tests/guest/build.sh"
    if [ "$MEDIA" = iso ]; then
        "$REPO/tests/guest/installer-iso.sh"
    else
        "$REPO/tests/guest/installed-disk.sh"
    fi
    out=$BUILD/bench-firmware
    mkdir -p "$out"
    BENCH_LOGS=${BENCH_LOGS:-$out/logs} exec "$REPO/tests/lab/lab.sh" --out "$out" -- \
        bash "$REPO/benches/firmware.sh" "$@"
fi
. "$REPO/tests/guest/installer-iso-check.sh"

# vm_cmd VMM SERIAL WORK : the command line of one boot, into the array CMD.
vm_cmd() {
    local vmm=$1 serial=$2 work=$3
    local media=(-drive "file=$ISO,if=virtio,format=raw,readonly=on") hutch_media=(--iso "$ISO")
    if [ "$MEDIA" = disk ]; then
        qemu-img create -q -f qcow2 -b "$DISK" -F raw "$work/disk.qcow2"
        media=(-drive "file=$work/disk.qcow2,if=virtio,format=qcow2")
        hutch_media=(--disk "$work/disk.qcow2")
    fi
    if [ "$vmm" = qemu ]; then
        CMD=(qemu-system-x86_64 -enable-kvm -cpu host -M q35 -m "$MEM" -smp 1
            -nodefaults -no-user-config -display none -serial "file:$serial" -no-reboot
            "${media[@]}")
        qemu_firmware_args "$FIRMWARE" "$work/vars.fd" "$SEABIOS"
        CMD+=("${QEMU_FIRMWARE[@]}")
    else
        CMD=("$HUTCH" run --firmware "$FIRMWARE" "${hutch_media[@]}" --cpus 1 --memory "$MEM"
            --net none --serial "$serial")
        if [ "$FIRMWARE" = uefi ]; then
            cp "$OVMF_VARS" "$work/vars.fd"
            CMD+=(--vars "$work/vars.fd")
        fi
    fi
}

# last_milestone SERIAL : the final milestone is on serial (the installer's screen, or login).
last_milestone() {
    if [ "$MEDIA" = iso ]; then
        installer_first_screen "$1" >/dev/null
    else
        grep -a -q 'hutch-debian login:' "$1"
    fi
}

# boot_once VMM : one boot; prints "byte grub kernel screen|login rss_kib".
boot_once() {
    local vmm=$1 work t0 now pid serial got=() rss=
    work=$(mktemp -d "${TMPDIR:-/tmp}/fw-bench.XXXXXX")
    serial=$work/serial.log
    : >"$serial"
    vm_cmd "$vmm" "$serial" "$work"
    t0=$(now_ms)
    HUTCH_FIRMWARE_DIR=$(dirname "$([ "$FIRMWARE" = uefi ] && echo "$OVMF_CODE" || echo "$SEABIOS")") \
        "${CMD[@]}" </dev/null >"$work/vmm.log" 2>&1 &
    pid=$!
    local byte= grub= kernel= screen=
    while [ -z "$screen" ]; do
        now=$((($(now_ms) - t0)))
        if ! kill -0 "$pid" 2>/dev/null || [ "$now" -gt $((VM_TIMEOUT * 1000)) ]; then
            echo "$vmm: no ${MILESTONES[3]} milestone (log ${BENCH_LOGS:-$work}/$vmm.*)" >&2
            save_logs "$vmm" "$work"
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 1
        fi
        [ -n "$byte" ] || { [ -s "$serial" ] && byte=$now; }
        [ -n "$grub" ] || { installer_strip_ansi "$serial" | grep -q -E 'GNU GRUB|Booting .Debian' && grub=$now; }
        [ -n "$kernel" ] || { grep -a -q 'Linux version' "$serial" && kernel=$now; }
        last_milestone "$serial" && screen=$now
        [ -n "$screen" ] || sleep 0.2
    done
    rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    save_logs "$vmm" "$work"
    rm -rf "$work"
    echo "$byte $grub $kernel $screen $rss"
}

save_logs() {
    [ -n "${BENCH_LOGS:-}" ] || return 0
    mkdir -p "$BENCH_LOGS"
    cp "$2/serial.log" "$BENCH_LOGS/$1.$FIRMWARE.$MEDIA.serial.log" 2>/dev/null || true
    cp "$2/vmm.log" "$BENCH_LOGS/$1.$FIRMWARE.$MEDIA.vmm.log" 2>/dev/null || true
}

median() {
    sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b + 0 == 0) print "n/a"; else printf "%.2f\n", a / b }'
}

main() {
    require_tools qemu-system-x86_64 timeout awk sort
    if [ "$MEDIA" = iso ]; then
        [ -f "$ISO" ] || die "no $ISO (tests/guest/installer-iso.sh)"
    else
        [ -f "$DISK" ] || die "no $DISK (tests/guest/installed-disk.sh)"
        require_tools qemu-img
    fi
    [ -x "$HUTCH" ] || die "no hutch at $HUTCH"
    local rep vmm line failed=0
    declare -A samples=()
    for rep in $(seq 1 "$REPS"); do
        for vmm in qemu hutch; do
            if line=$(boot_once "$vmm"); then
                log "rep $rep $vmm ($FIRMWARE, $MEDIA): ${MILESTONES[*]} ms, peak KiB: $line"
                samples[$vmm]+="$line"$'\n'
            else
                failed=1
            fi
        done
    done
    local i name q h
    printf '\n%-8s %12s %12s %8s\n' "$FIRMWARE" "qemu" "hutch" "ratio"
    for i in 0 1 2 3 4; do
        name=$([ "$i" -lt 4 ] && echo "${MILESTONES[$i]}" || echo rss)
        q=$(printf '%s' "${samples[qemu]:-}" | awk -v f=$((i + 1)) 'NF { print $f }' | median)
        h=$(printf '%s' "${samples[hutch]:-}" | awk -v f=$((i + 1)) 'NF { print $f }' | median)
        printf '%-8s %12s %12s %8s\n' "$name" "$q" "$h" "$(ratio "$h" "$q")"
        echo "fw_${name}_ratio=$(ratio "$h" "$q")"
        [ "$(ratio "$h" "$q")" != n/a ] || failed=1
    done
    echo "(times in ms from launch, medians of $REPS; rss = peak KiB at the ${MILESTONES[3]} milestone)"
    return "$failed"
}

main "$@"
