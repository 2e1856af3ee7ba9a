#!/usr/bin/env bash
# Boots the same kernel + initramfs with Hutch and with QEMU+KVM in one run and compares them.
# Runs INSIDE the nested lab (benches/run.sh wraps it with tests/lab/lab.sh): only ratios are
# meaningful there, not absolute times.
#
# Per VMM, BENCH_REPS repetitions (default 3; medians reported) of two boots:
#   1. hutch.actions=poweroff: launch -> guest poweroff -> process exit wall time (ms), and the
#      VMM's peak RSS (GNU time's %M, i.e. ru_maxrss; VmHWM sampling without it);
#      Hutch boots twice here, each repetition with a fresh, empty decompressed-kernel cache
#      (HUTCH_CACHE_DIR in the work directory, never the user's): first cold (it decompresses
#      the bzImage and fills the cache), then warm (it boots the cached vmlinux through PVH).
#      The headline boot_time_ratio is the warm median; boot_time_ratio_cold the cold one.
#      QEMU has no such cache: its one boot per repetition is the reference for both;
#   2. hutch.actions=ddread:/dev/vda,sleep:4,poweroff with a 256 MiB raw image: the guest's
#      sequential read MB/s (dd bs=1M iflag=direct), and while the guest sleeps, the VMM's own
#      memory overhead = total Rss - Rss of the guest RAM mapping(s), from /proc/PID/smaps.
#      Guest RAM is identified as the anonymous mapping(s) at least half the guest RAM size:
#      QEMU's pc.ram block (RAM size plus alignment) and Hutch's GuestMemoryMmap region(s); no
#      other anonymous mapping of a VMM is that large (glibc's arenas reserve 64 MiB at most).
# Both use --memory 512 (BENCH_MEM) so the guest's page cache can't hold the whole story, 1 vCPU.
#
# QEMU's configuration is its fastest sensible one for this guest: -enable-kvm -cpu host, q35
# (BENCH_QEMU_MACHINE), -nodefaults -no-user-config, no display, serial on stdio, virtio-blk-pci.
#
# Environment: HUTCH (default ${CARGO_TARGET_DIR:-$REPO/target}/release/hutch), BENCH_REPS, BENCH_MEM,
#   BENCH_QEMU_MACHINE, BENCH_VM_TIMEOUT (s per boot, default 180), BENCH_ONLY=qemu|hutch,
#   BENCH_LOGS (a directory for the boot logs; default: the temporary work directory).
# Output: a table, then boot_time_ratio= (warm), boot_time_ratio_cold=, memory_overhead_ratio=,
#   disk_read_ratio= (hutch/qemu, "n/a" when Hutch can't boot yet) with their targets (<= 0.5,
#   <= 0.25, >= 1.0).
set -euo pipefail
. "$(dirname "$0")/../tests/lab/common.sh"

HUTCH=${HUTCH:-${CARGO_TARGET_DIR:-$REPO/target}/release/hutch}
REPS=${BENCH_REPS:-3}
MEM=${BENCH_MEM:-512}
MACHINE=${BENCH_QEMU_MACHINE:-q35}
VM_TIMEOUT=${BENCH_VM_TIMEOUT:-180}
KERNEL=$BUILD/guest/vmlinuz
INITRD=$BUILD/guest/initramfs.cpio.gz

# vm_cmd VMM CMDLINE [DISK] : the command line of one boot, into the array CMD.
vm_cmd() {
    local vmm=$1 cmdline=$2 disk=${3:-}
    if [ "$vmm" = qemu ]; then
        CMD=(qemu-system-x86_64 -enable-kvm -cpu host -M "$MACHINE" -m "$MEM" -smp 1
            -nodefaults -no-user-config -display none -serial stdio -no-reboot
            -kernel "$KERNEL" -initrd "$INITRD" -append "$cmdline")
        [ -z "$disk" ] || CMD+=(-drive "file=$disk,if=none,id=d0,format=raw"
            -device virtio-blk-pci,drive=d0)
    else
        CMD=(env "HUTCH_CACHE_DIR=$KCACHE" "$HUTCH" run --kernel "$KERNEL" --initrd "$INITRD"
            --cmdline "$cmdline" --cpus 1 --memory "$MEM" --net none)
        [ -z "$disk" ] || CMD+=(--disk "$disk")
    fi
}

# The VMM process and its descendants (in case the CLI runs the VM in a child).
pid_tree() {
    local p
    echo "$1"
    for p in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        pid_tree "$p"
    done
}

# smaps_kib PID... : "TOTAL_RSS GUEST_RAM_RSS" in KiB over the processes.
smaps_kib() {
    local ram_kib=$((MEM * 1024)) p
    for p in "$@"; do cat "/proc/$p/smaps" 2>/dev/null || true; done | awk -v ram="$ram_kib" '
        /^[0-9a-f]+-[0-9a-f]+ / { anon = (NF < 6 || $6 ~ /^\[anon/) }
        /^Size:/ { size = $2 }
        /^Rss:/ { total += $2; if (anon && size * 2 >= ram) guest += $2 }
        END { printf "%d %d\n", total, guest }'
}

# hwm_kib PID... : the largest VmHWM among the processes.
hwm_kib() {
    local p max=0 v
    for p in "$@"; do
        v=$(awk '/^VmHWM:/{print $2}' "/proc/$p/status" 2>/dev/null || true)
        [ -z "$v" ] || [ "$v" -le "$max" ] || max=$v
    done
    echo "$max"
}

# boot_once VMM LOG : boot to poweroff; prints "WALL_MS PEAK_RSS_KIB", fails on a bad boot.
boot_once() {
    local vmm=$1 log=$2 t0 t1 rc=0 peak
    vm_cmd "$vmm" "console=ttyS0 quiet hutch.actions=poweroff"
    if [ -x /usr/bin/time ]; then
        t0=$(now_ms)
        timeout -k 5 "$VM_TIMEOUT" /usr/bin/time -f '%M' -o "$log.rss" "${CMD[@]}" </dev/null \
            >"$log" 2>&1 || rc=$?
        t1=$(now_ms)
        peak=$(tail -n 1 "$log.rss")
    else
        t0=$(now_ms)
        "${CMD[@]}" </dev/null >"$log" 2>&1 &
        local pid=$! v pids
        peak=0
        while kill -0 "$pid" 2>/dev/null; do
            mapfile -t pids < <(pid_tree "$pid")
            v=$(hwm_kib "${pids[@]}")
            [ "$v" -le "$peak" ] || peak=$v
            [ $(($(now_ms) - t0)) -lt $((VM_TIMEOUT * 1000)) ] || kill "$pid"
            sleep 0.05
        done
        wait "$pid" || rc=$?
        t1=$(now_ms)
    fi
    [ "$rc" = 0 ] && grep -qaF HUTCH-GUEST-READY "$log" || return 1
    echo "$((t1 - t0)) $peak"
}

# disk_once VMM LOG IMAGE : prints "MBPS OVERHEAD_KIB TOTAL_RSS_KIB GUEST_RSS_KIB".
disk_once() {
    local vmm=$1 log=$2 image=$3 t0 pid rc=0 sample='' pids
    vm_cmd "$vmm" "console=ttyS0 quiet hutch.actions=ddread:/dev/vda,sleep:4,poweroff" "$image"
    t0=$(now_ms)
    "${CMD[@]}" </dev/null >"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ -z "$sample" ] && grep -qaF 'HUTCH-RESULT sleep=' "$log"; then
            mapfile -t pids < <(pid_tree "$pid")
            sample=$(smaps_kib "${pids[@]}")
        fi
        if [ $(($(now_ms) - t0)) -gt $((VM_TIMEOUT * 1000)) ]; then
            kill "$pid"
            break
        fi
        sleep 0.1
    done
    wait "$pid" || rc=$?
    local mbps
    mbps=$(sed -n 's/.*HUTCH-RESULT ddread_mbps=//p' "$log" | tr -d '\r' | tail -n 1)
    [ "$rc" = 0 ] && [ -n "$mbps" ] && [ -n "$sample" ] || return 1
    set -- $sample
    echo "$mbps $(($1 - $2)) $1 $2"
}

median() {
    [ $# -gt 0 ] || { echo n/a; return; }
    printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {
        if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2];
        else printf "%d\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

ratio() {
    if [ "$1" = n/a ] || [ "$2" = n/a ] || [ "$2" = 0 ]; then
        echo n/a
    else
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", a / b }'
    fi
}

declare -A BOOT BOOT_COLD RSS OVER MBPS
# The decompressed-kernel cache directory Hutch uses (set per repetition).
KCACHE=""

# bench_rep VMM LOGS IMAGE I : one repetition; appends to the lists in BOOT RSS OVER MBPS.
bench_rep() {
    local vmm=$1 logs=$2 image=$3 i=$4 out boot rss cold=''
    if [ "$vmm" = hutch ]; then
        KCACHE=$(dirname "$image")/kcache-$i
        rm -rf "$KCACHE"
        out=$(boot_once hutch "$logs/hutch-cold-$i.log") ||
            { log "hutch: cold boot $i failed (log: $logs/hutch-cold-$i.log)"; return 1; }
        read -r cold rss <<<"$out"
        BOOT_COLD[$vmm]+=" $cold"
    fi
    out=$(boot_once "$vmm" "$logs/$vmm-boot-$i.log") ||
        { log "$vmm: boot $i failed (log: $logs/$vmm-boot-$i.log)"; return 1; }
    read -r boot rss <<<"$out"
    out=$(disk_once "$vmm" "$logs/$vmm-disk-$i.log" "$image") ||
        { log "$vmm: disk run $i failed (log: $logs/$vmm-disk-$i.log)"; return 1; }
    set -- $out
    BOOT[$vmm]+=" $boot" RSS[$vmm]+=" $rss" MBPS[$vmm]+=" $1" OVER[$vmm]+=" $2"
    log "$vmm #$i: boot $boot ms${cold:+ (cold $cold ms)}, peak rss $rss KiB, read $1 MB/s, overhead $2 KiB (rss $3 - guest ram $4)"
}

main() {
    require_tools qemu-system-x86_64 timeout awk sort seq head
    [ -c /dev/kvm ] || die "no /dev/kvm: run inside the lab (benches/run.sh)"
    [ -f "$KERNEL" ] && [ -f "$INITRD" ] || die "no guest fixtures (run tests/guest/build.sh)"
    local work vmm
    work=$(mktemp -d "${TMPDIR:-/tmp}/hutch-bench.XXXXXX")
    local logs=${BENCH_LOGS:-$work}
    mkdir -p "$logs"
    log "bench: logs in $logs, $REPS reps, guest RAM $MEM MiB, kernel $(cat "$BUILD/guest/VERSION")"
    head -c 256M /dev/urandom >"$work/disk.img"

    local vmms=() i
    for vmm in hutch qemu; do
        [ -z "${BENCH_ONLY:-}" ] || [ "$BENCH_ONLY" = "$vmm" ] || continue
        if [ "$vmm" = hutch ]; then
            if [ ! -x "$HUTCH" ]; then
                log "hutch: not available (no binary at $HUTCH)"
                continue
            fi
            KCACHE=$work/kcache-probe
            if ! boot_once hutch "$logs/hutch-probe.log" >/dev/null; then
                log "hutch: not available (it does not boot the guest yet; log: $logs/hutch-probe.log)"
                continue
            fi
        fi
        vmms+=("$vmm")
    done
    # Interleaved, so that a slow phase of the emulated machine hits both VMMs alike.
    local -A broken=()
    for i in $(seq "$REPS"); do
        for vmm in ${vmms[@]+"${vmms[@]}"}; do
            [ -z "${broken[$vmm]:-}" ] || continue
            bench_rep "$vmm" "$logs" "$work/disk.img" "$i" || broken[$vmm]=1
        done
    done
    for vmm in hutch qemu; do
        if [ -n "${broken[$vmm]:-}" ]; then
            BOOT[$vmm]="" BOOT_COLD[$vmm]="" RSS[$vmm]="" OVER[$vmm]="" MBPS[$vmm]=""
        fi
        BOOT[$vmm]=$(median ${BOOT[$vmm]:-})
        BOOT_COLD[$vmm]=$(median ${BOOT_COLD[$vmm]:-})
        RSS[$vmm]=$(median ${RSS[$vmm]:-})
        OVER[$vmm]=$(median ${OVER[$vmm]:-})
        MBPS[$vmm]=$(median ${MBPS[$vmm]:-})
    done
    rm -f "$work/disk.img"
    rm -rf "$work"/kcache-*
    [ "$logs" = "$work" ] || rmdir "$work"

    printf '%-28s %12s %12s %8s  %s\n' metric hutch qemu ratio target
    printf '%-28s %12s %12s %8s  %s\n' "boot_to_exit_ms (median)" "${BOOT[hutch]}" "${BOOT[qemu]}" \
        "$(ratio "${BOOT[hutch]}" "${BOOT[qemu]}")" "<= 0.5"
    printf '%-28s %12s %12s %8s  %s\n' "boot_to_exit_ms_cold" "${BOOT_COLD[hutch]}" "${BOOT[qemu]}" \
        "$(ratio "${BOOT_COLD[hutch]}" "${BOOT[qemu]}")" ""
    printf '%-28s %12s %12s %8s  %s\n' "peak_rss_kib" "${RSS[hutch]}" "${RSS[qemu]}" \
        "$(ratio "${RSS[hutch]}" "${RSS[qemu]}")" ""
    printf '%-28s %12s %12s %8s  %s\n' "vmm_overhead_kib" "${OVER[hutch]}" "${OVER[qemu]}" \
        "$(ratio "${OVER[hutch]}" "${OVER[qemu]}")" "<= 0.25"
    printf '%-28s %12s %12s %8s  %s\n' "disk_read_mbps" "${MBPS[hutch]}" "${MBPS[qemu]}" \
        "$(ratio "${MBPS[hutch]}" "${MBPS[qemu]}")" ">= 1.0"
    echo "boot_time_ratio=$(ratio "${BOOT[hutch]}" "${BOOT[qemu]}") (target <= 0.5; warm kernel cache)"
    echo "boot_time_ratio_cold=$(ratio "${BOOT_COLD[hutch]}" "${BOOT[qemu]}") (empty kernel cache)"
    echo "memory_overhead_ratio=$(ratio "${OVER[hutch]}" "${OVER[qemu]}") (target <= 0.25)"
    echo "disk_read_ratio=$(ratio "${MBPS[hutch]}" "${MBPS[qemu]}") (target >= 1.0)"
    echo "bench logs: $logs"
}

main "$@"
