#!/usr/bin/env bash
# Host-side checks (NOT in the lab): this host's /dev/kvm is not hardware-assisted and can't run
# a real kernel (KVM-LAB.md).
#  - `hutch run` and `hutch start` of the Debian guest kernel are refused up front, with a
#    message containing "not hardware-assisted" (and what to do), instead of a minute of
#    emulation; "up front" is checked loosely (within HOST_KVM_REFUSE_TIMEOUT, 30 s), not timed;
#  - with the opt-in HUTCH_ALLOW_EMULATED_KVM=1, `hutch run` of that kernel ends on its own with
#    a non-zero status and a message containing "could not emulate guest code", never hangs.
#
# Usage: tests/e2e/host-kvm.sh
# Environment: HUTCH (default ${CARGO_TARGET_DIR:-$REPO/target}/release/hutch), HOST_KVM_TIMEOUT (s, default 600),
#   HOST_KVM_KERNEL (default build/guest/vmlinux when it has a PVH note, else vmlinuz: under
#   this host's emulating KVM the bzImage's decompressor alone runs for minutes, while QEMU with
#   the PVH vmlinux reached the failing `lock cmpxchg16b` in under 3 minutes).
# Prints PASS/FAIL per case and "N passed, M failed" like tests/e2e/run.sh.
set -euo pipefail
. "$(dirname "$0")/../lab/common.sh"

HUTCH=${HUTCH:-${CARGO_TARGET_DIR:-$REPO/target}/release/hutch}
LIMIT=${HOST_KVM_TIMEOUT:-600}
REFUSE_LIMIT=${HOST_KVM_REFUSE_TIMEOUT:-30}
if [ "$(cat "$BUILD/guest/PVH" 2>/dev/null || echo none)" != none ]; then
    KERNEL=${HOST_KVM_KERNEL:-$BUILD/guest/vmlinux}
else
    KERNEL=${HOST_KVM_KERNEL:-$BUILD/guest/vmlinuz}
fi
INITRD=$BUILD/guest/initramfs.cpio.gz
CMDLINE="console=ttyS0 hutch.actions=poweroff"

PASSED=0
FAILED=0
WORK=

# check NAME LIMIT NEEDLE -- COMMAND...: COMMAND must end within LIMIT s, non-zero, saying NEEDLE.
check() {
    local name=$1 limit=$2 needle=$3
    shift 4
    local log rc=0 t0 reason=
    log=$WORK/$name.log
    t0=$(now_ms)
    timeout -k 10 "$limit" "$@" </dev/null >"$log" 2>&1 || rc=$?
    local secs=$(( ($(now_ms) - t0) / 1000 ))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        reason="still running after $limit s"
    elif [ "$rc" = 0 ]; then
        reason="exit status 0"
    elif ! grep -q "$needle" "$log"; then
        reason="exit $rc without '$needle': $(tail -c 300 "$log")"
    fi
    if [ -z "$reason" ]; then
        echo "PASS $name (exit $rc after $secs s)"
        PASSED=$((PASSED + 1))
    else
        cp "$log" "${TMPDIR:-/tmp}/hutch-host-kvm-$name.log"
        echo "FAIL $name: $reason (log: ${TMPDIR:-/tmp}/hutch-host-kvm-$name.log)"
        FAILED=$((FAILED + 1))
    fi
}

main() {
    require_tools timeout
    [ -x "$HUTCH" ] || die "no hutch binary at $HUTCH (cargo build --release, or set HUTCH)"
    [ -c /dev/kvm ] || die "no /dev/kvm on this host"
    [ -f "$KERNEL" ] || die "no guest kernel at $KERNEL (run tests/guest/build.sh)"
    if [ -d /sys/module/kvm_amd ] || [ -d /sys/module/kvm_intel ]; then
        echo "note: /dev/kvm here is hardware-assisted; this check expects the emulating host" >&2
    fi
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/hutch-host-kvm.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    export HUTCH_HOME=$WORK/home XDG_RUNTIME_DIR=$WORK/run
    mkdir -p "$HUTCH_HOME" "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

    check host_kvm_run_of_a_real_kernel_is_refused_up_front "$REFUSE_LIMIT" "not hardware-assisted" -- \
        env -u HUTCH_ALLOW_EMULATED_KVM "$HUTCH" run --kernel "$KERNEL" --initrd "$INITRD" \
        --cmdline "$CMDLINE" --memory 256

    "$HUTCH" create real --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$CMDLINE" \
        --memory 256 >/dev/null
    check host_kvm_start_of_a_real_kernel_is_refused_up_front "$REFUSE_LIMIT" "not hardware-assisted" -- \
        env -u HUTCH_ALLOW_EMULATED_KVM "$HUTCH" start real

    check host_kvm_opted_in_real_kernel_is_a_clear_error "$LIMIT" "could not emulate guest code" -- \
        env HUTCH_ALLOW_EMULATED_KVM=1 "$HUTCH" run --kernel "$KERNEL" --initrd "$INITRD" \
        --cmdline "$CMDLINE" --memory 256

    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" = 0 ]
}

main "$@"
