#!/usr/bin/env bash
# Host-side check (NOT in the lab): this host's /dev/kvm is not hardware-assisted and can't run
# a real kernel (KVM-LAB.md). `hutch run` of the Debian guest kernel must end on its own with a
# non-zero status and a message containing "could not emulate guest code", never hang.
#
# Usage: tests/e2e/host-kvm.sh
# Environment: HUTCH (default ${CARGO_TARGET_DIR:-$REPO/target}/release/hutch), HOST_KVM_TIMEOUT (s, default 600),
#   HOST_KVM_KERNEL (default build/guest/vmlinux when it has a PVH note, else vmlinuz: under
#   this host's emulating KVM the bzImage's decompressor alone runs for minutes, while QEMU with
#   the PVH vmlinux reached the failing `lock cmpxchg16b` in under 3 minutes).
# Prints PASS/FAIL and "N passed, M failed" like tests/e2e/run.sh.
set -euo pipefail
. "$(dirname "$0")/../lab/common.sh"

HUTCH=${HUTCH:-${CARGO_TARGET_DIR:-$REPO/target}/release/hutch}
LIMIT=${HOST_KVM_TIMEOUT:-600}
if [ "$(cat "$BUILD/guest/PVH" 2>/dev/null || echo none)" != none ]; then
    KERNEL=${HOST_KVM_KERNEL:-$BUILD/guest/vmlinux}
else
    KERNEL=${HOST_KVM_KERNEL:-$BUILD/guest/vmlinuz}
fi
NAME=host_kvm_real_kernel_is_a_clear_error

main() {
    require_tools timeout
    [ -x "$HUTCH" ] || die "no hutch binary at $HUTCH (cargo build --release, or set HUTCH)"
    [ -c /dev/kvm ] || die "no /dev/kvm on this host"
    [ -f "$KERNEL" ] || die "no guest kernel at $KERNEL (run tests/guest/build.sh)"
    if [ -d /sys/module/kvm_amd ] || [ -d /sys/module/kvm_intel ]; then
        echo "note: /dev/kvm here is hardware-assisted; this check expects the emulating host" >&2
    fi

    local log rc=0 t0 reason=
    log=$(mktemp "${TMPDIR:-/tmp}/hutch-host-kvm.XXXXXX")
    t0=$(now_ms)
    timeout -k 10 "$LIMIT" "$HUTCH" run --kernel "$KERNEL" --initrd "$BUILD/guest/initramfs.cpio.gz" \
        --cmdline "console=ttyS0 hutch.actions=poweroff" --memory 256 </dev/null >"$log" 2>&1 || rc=$?
    local secs=$(( ($(now_ms) - t0) / 1000 ))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        reason="still running after $LIMIT s"
    elif [ "$rc" = 0 ]; then
        reason="exit status 0"
    elif ! grep -q "could not emulate guest code" "$log"; then
        reason="exit $rc without 'could not emulate guest code': $(tail -c 300 "$log")"
    fi
    if [ -z "$reason" ]; then
        echo "PASS $NAME (exit $rc after $secs s)"
        rm -f "$log"
        echo "1 passed, 0 failed"
    else
        echo "FAIL $NAME: $reason (log: $log)"
        echo "0 passed, 1 failed"
        exit 1
    fi
}

main "$@"
