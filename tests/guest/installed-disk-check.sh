#!/usr/bin/env bash
# Boots an installed Debian disk (tests/guest/installed-disk.sh) under QEMU with one firmware,
# waits for the login prompt on the serial console, logs in as root, runs poweroff and checks that
# QEMU exits (ACPI power-off). The disk is a virtio-blk disk, as Hutch attaches it. TCG, no NIC:
# nothing leaves the machine.
# Usage: tests/guest/installed-disk-check.sh bios|uefi [IMAGE [TIMEOUT_SECONDS (default 600)]]
#   IMAGE defaults to build/guest/debian-FIRMWARE.img; its format follows its name (.img raw,
#   .vdi, .vmdk, .vhdx, .qcow2). The image is not written: QEMU runs it with -snapshot.
# Prints the seconds from launch to GRUB, to the kernel, to "login:", to the shell and to the
# power-off. Exits 0 when all came, non-zero with the serial log's tail otherwise.
# The serial log stays in $BUILD/installed-disk-check/IMAGE-NAME.serial.log.
set -euo pipefail
. "$(dirname "$0")/../lab/common.sh"

ROOT_PASSWORD=hutch
POWEROFF_TIMEOUT=180

# The serial log without terminal escapes and carriage returns.
plain() {
    LC_ALL=C sed -E -e 's/\x1b\[[0-9;?]*[ -\/]*[@-~]//g' -e 's/\x1b[()][0-9A-Za-z]//g' \
        -e 's/\r//g' "$1" 2>/dev/null
}

# seen LOG REGEX: the serial log has a line matching REGEX (extended).
seen() {
    plain "$1" | LC_ALL=C grep -a -q -E "$2"
}

elapsed() {
    local t=$(($(now_ms) - T0))
    echo "$((t / 1000)).$((t % 1000 / 100))"
}

# send TEXT: types TEXT and Enter on the guest's serial console.
send() {
    printf '%s\r' "$1" >&"$SERIAL_IN"
}

fail() {
    echo "installed-disk-check $FW: FAIL, $* after $(elapsed)s" >&2
    echo "--- the serial log's tail ($LOG, escapes stripped):" >&2
    plain "$LOG" | grep -a -v '^[[:space:]]*$' | tail -n 40 >&2
    exit 1
}

main() {
    FW=${1:-}
    case $FW in
    uefi | bios) ;;
    *) die "usage: $0 uefi|bios [IMAGE [TIMEOUT_SECONDS]]" ;;
    esac
    local img=${2:-$BUILD/guest/debian-$FW.img} timeout=${3:-600} format
    require_tools qemu-system-x86_64 sed grep mkfifo
    [ -f "$img" ] || die "no $img (run: $REPO/tests/guest/installed-disk.sh)"
    case $img in
    *.img | *.raw) format=raw ;;
    *.vdi) format=vdi ;;
    *.vmdk) format=vmdk ;;
    *.vhdx) format=vhdx ;;
    *.qcow2) format=qcow2 ;;
    *) die "can't tell the format of $img from its name" ;;
    esac
    local dir=$BUILD/installed-disk-check
    mkdir -p "$dir"
    local name
    name=$(basename "$img")
    LOG=$dir/$name.serial.log
    : >"$LOG"

    qemu_firmware_args "$FW" "$dir/$name.vars.fd" "$SEABIOS"

    # The serial port on a FIFO pair, so that the check can type: QEMU opens both ends read-write,
    # so neither open waits for the other side.
    local fifo=$dir/$name.serial
    rm -f "$fifo.in" "$fifo.out"
    mkfifo "$fifo.in" "$fifo.out"
    qemu-system-x86_64 -accel tcg -M q35 -m 1024 -smp 1 -nodefaults -nic none -nographic \
        -monitor none -serial "pipe:$fifo" "${QEMU_FIRMWARE[@]}" -snapshot \
        -drive "file=$img,if=virtio,format=$format" </dev/null >"$dir/$name.qemu.log" 2>&1 &
    local qemu=$!
    cat "$fifo.out" >"$LOG" &
    local reader=$!
    exec {SERIAL_IN}<>"$fifo.in"
    # The processes may be gone already: under set -e a failed kill in the trap would turn a
    # PASS into exit 1.
    # shellcheck disable=SC2064 # the pids are meant to be fixed now
    trap "kill $qemu 2>/dev/null || true; wait $qemu 2>/dev/null || true; kill $reader 2>/dev/null || true; rm -f '$fifo.in' '$fifo.out'" EXIT

    T0=$(now_ms)
    echo "installed-disk-check $FW: $img ($format), QEMU pid $qemu, serial log $LOG (bound ${timeout}s)"
    local grub= kernel= login= shell= sent_user= sent_password= sent_poweroff= t
    while :; do
        t=$(elapsed)
        if [ -z "$grub" ] && seen "$LOG" 'GNU GRUB|Loading Linux|Booting .Debian'; then
            grub=$t
            echo "  ${t}s GRUB"
        fi
        if [ -z "$kernel" ] && seen "$LOG" 'Linux version'; then
            kernel=$t
            echo "  ${t}s kernel: $(plain "$LOG" | grep -a -m 1 -o 'Linux version [^ ]*')"
        fi
        if [ -z "$login" ] && seen "$LOG" 'login: *$'; then
            login=$t
            echo "  ${t}s login: $(plain "$LOG" | grep -a -m 1 -o '[^ ]* login:')"
            # agetty flushes its input when it prints the prompt: type only after it.
            sleep 1
            send root
            sent_user=$t
        fi
        if [ -n "$sent_user" ] && [ -z "$sent_password" ] && seen "$LOG" 'Password: *$'; then
            sleep 0.5
            send "$ROOT_PASSWORD"
            sent_password=$t
        fi
        if [ -n "$sent_user" ] && [ -z "$shell" ] && seen "$LOG" 'root@[^ ]+:[^ ]*# *$'; then
            shell=$t
            echo "  ${t}s root shell"
            send poweroff
            sent_poweroff=$t
        fi
        if ! kill -0 "$qemu" 2>/dev/null; then
            wait "$qemu" || fail "QEMU failed ($(tail -n 3 "$dir/$name.qemu.log"))"
            [ -n "$sent_poweroff" ] || fail "QEMU exited before poweroff"
            echo "  ${t}s powered off (QEMU exited)"
            echo "installed-disk-check $FW: PASS, GRUB ${grub:-?}s, kernel ${kernel:-?}s," \
                "login: ${login}s, shell ${shell}s, powered off ${t}s"
            return 0
        fi
        if [ -n "$sent_poweroff" ]; then
            [ "${t%.*}" -lt $((${sent_poweroff%.*} + POWEROFF_TIMEOUT)) ] ||
                fail "QEMU still runs ${POWEROFF_TIMEOUT}s after poweroff"
        elif [ "${t%.*}" -ge "$timeout" ]; then
            if [ -n "$login" ]; then
                fail "no root shell after login: (${login}s)"
            fi
            fail "no login: within ${timeout}s"
        fi
        sleep 0.5
    done
}

main "$@"
