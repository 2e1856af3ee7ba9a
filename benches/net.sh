#!/usr/bin/env bash
# User-mode networking, Hutch vs QEMU (-netdev user + virtio-net-pci, the same libslirp 4.7), the
# same guest in one run of the nested lab: only ratios are meaningful there.
#
#   HUTCH=… LAB_ENV=HUTCH bash benches/net.sh     # builds the guest, runs itself in the lab
#
# Per VMM, BENCH_REPS boots (default 3, medians, the VMMs interleaved) of the test guest with
# 1 vCPU, BENCH_MEM MiB (default 1024) and the NAT's DHCP. In each boot:
#   up      the guest sends 256 MiB (BENCH_NET_MIB) of random bytes on one TCP connection it
#           opens to 10.0.2.2:9000 (a socat sink on 127.0.0.1): guest→host, timed by the guest;
#   pull    this side fetches the same file from the guest's busybox httpd through the forward
#           tcp:127.0.0.1:10080-:8000: guest→host through a port forward, timed here;
#   down    the guest fetches 256 MiB from busybox httpd on 127.0.0.1:8080 (its 10.0.2.2:8080):
#           host→guest, timed by the guest;
#   rr      BENCH_RR (default 500) request/answer round trips of a short line over one TCP
#           connection to a socat echo on 127.0.0.1:9001: latency per round trip, in µs.
# Every figure counts only if the bytes arrived intact (sha256 on both ends; else the run fails).
# Files stay in RAM (tmpfs) on both sides, and are hashed outside the timed part.
#
# THE NETWORK RULE: it runs only inside the lab's L1, which has no NIC; there /etc/resolv.conf is
# set to 127.0.0.1 (no DNS is used here anyway) and every server binds 127.0.0.1.
#
# Environment: HUTCH (default ${CARGO_TARGET_DIR:-$REPO/target}/release/hutch; hutch must have
#   `run --net user --forward tcp:127.0.0.1:10080-:8000`), BENCH_REPS, BENCH_MEM, BENCH_NET_MIB,
#   BENCH_RR, BENCH_VM_TIMEOUT (s per boot, default 1200), BENCH_ONLY=qemu|hutch, BENCH_LOGS.
# Output: a table, then net_up_ratio=, net_pull_ratio=, net_down_ratio= (hutch/qemu throughput,
#   target >= 1.5) and net_rr_ratio= (hutch/qemu latency, lower is better; target <= 1.0);
#   "n/a" (and a failing exit) when a VMM could not be measured.
set -euo pipefail
. "$(dirname "$0")/../tests/lab/common.sh"

HUTCH=${HUTCH:-${CARGO_TARGET_DIR:-$REPO/target}/release/hutch}
REPS=${BENCH_REPS:-3}
MEM=${BENCH_MEM:-1024}
MIB=${BENCH_NET_MIB:-256}
RR=${BENCH_RR:-500}
VM_TIMEOUT=${BENCH_VM_TIMEOUT:-1200}
KERNEL=$BUILD/guest/vmlinuz
INITRD=$BUILD/guest/initramfs.cpio.gz
HOST_HTTP=8080 FORWARD_PORT=10080 GUEST_HTTP=8000 SINK_PORT=9000 ECHO_PORT=9001

# Outside the lab: build the guest and run this script in the lab (as benches/run.sh does).
if [ "${LAB:-}" != 1 ]; then
    "$REPO/tests/guest/build.sh"
    out=$BUILD/bench-net
    mkdir -p "$out"
    BENCH_LOGS=${BENCH_LOGS:-$out/logs} exec "$REPO/tests/lab/lab.sh" --out "$out" -- \
        bash "$REPO/benches/net.sh" "$@"
fi

# vm_cmd VMM CMDLINE : the command line of one boot, into the array CMD.
vm_cmd() {
    local vmm=$1 cmdline=$2 fwd=tcp:127.0.0.1:$FORWARD_PORT-:$GUEST_HTTP
    if [ "$vmm" = qemu ]; then
        CMD=(qemu-system-x86_64 -enable-kvm -cpu host -M q35 -m "$MEM" -smp 1
            -nodefaults -no-user-config -display none -serial stdio -no-reboot
            -kernel "$KERNEL" -initrd "$INITRD" -append "$cmdline"
            -netdev "user,id=n0,hostfwd=$fwd" -device virtio-net-pci,netdev=n0,romfile=)
    else
        CMD=("$HUTCH" run --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$cmdline" --cpus 1
            --memory "$MEM" --net user --forward "$fwd")
    fi
}

# THE NETWORK RULE: only where nothing can leave.
check_isolated() {
    [ -c /dev/kvm ] || die "no /dev/kvm: run inside the lab (bash benches/net.sh)"
    local nics
    nics=$(ls /sys/class/net | grep -vx lo || true)
    [ -z "$nics" ] || die "refusing to run: interfaces other than lo here ($(echo $nics))"
    rm -f /etc/resolv.conf
    printf 'nameserver 127.0.0.1\n' >/etc/resolv.conf
    ip link set lo up 2>/dev/null || true
}

SERVER_PIDS=()
stop_servers() {
    local p
    for p in ${SERVER_PIDS[@]+"${SERVER_PIDS[@]}"}; do
        kill "$p" 2>/dev/null || true
    done
    SERVER_PIDS=()
}

# wait_listen PORT: until something listens on 127.0.0.1:PORT (TCP).
wait_listen() {
    tcp_listening "$1" || die "nothing listens on 127.0.0.1:$1 after 30 s"
}

# value LOG KEY: the last "HUTCH-RESULT KEY=value".
value() {
    sed -n "s/.*HUTCH-RESULT $2=//p" "$1" | tr -d '\r' | tail -n 1
}

# net_once VMM LOG WORK: one boot; prints "UP_KIBPS PULL_KIBPS DOWN_KIBPS RR_US", fails (with a
# message on stderr) when a transfer is short, corrupt or missing.
net_once() {
    local vmm=$1 log=$2 work=$3 acts
    rm -f "$work/up.bin" "$work/pull.bin" "$work/srv/pulled"
    # One-shot servers for this boot's upload and round trips.
    timeout "$VM_TIMEOUT" socat -u "TCP-LISTEN:$SINK_PORT,bind=127.0.0.1,reuseaddr" \
        "OPEN:$work/up.bin,creat,trunc" 2>>"$work/socat.err" &
    SERVER_PIDS+=($!)
    timeout "$VM_TIMEOUT" socat "TCP-LISTEN:$ECHO_PORT,bind=127.0.0.1,reuseaddr" PIPE \
        2>>"$work/socat.err" &
    SERVER_PIDS+=($!)
    wait_listen "$SINK_PORT"
    wait_listen "$ECHO_PORT"
    acts="dhcp,mkbig:$MIB,put:10.0.2.2:$SINK_PORT,httpd:$GUEST_HTTP"
    acts+=",waitfor:$((VM_TIMEOUT / 2)):http://10.0.2.2:$HOST_HTTP/pulled"
    acts+=",wget:http://10.0.2.2:$HOST_HTTP/big,rr:$RR:10.0.2.2:$ECHO_PORT,poweroff"
    vm_cmd "$vmm" "console=ttyS0 quiet hutch.actions=$acts"
    timeout -k 5 "$VM_TIMEOUT" "${CMD[@]}" </dev/null >"$log" 2>&1 &
    local pid=$! i=0 rc=0 t0 t1 pull_ms=''
    # The pull: once the guest's httpd is up, through the forward; then let the guest go on.
    until grep -qa 'HUTCH-RESULT httpd=' "$log"; do
        kill -0 "$pid" 2>/dev/null || break
        i=$((i + 1))
        [ $i -le $((VM_TIMEOUT * 5)) ] || break
        sleep 0.2
    done
    if [ "$(value "$log" httpd)" = ready ]; then
        t0=$(now_ms)
        timeout "$((VM_TIMEOUT / 2))" busybox wget -Y off -q -O "$work/pull.bin" \
            "http://127.0.0.1:$FORWARD_PORT/big" 2>>"$work/pull.err" && t1=$(now_ms) &&
            pull_ms=$((t1 - t0))
    fi
    touch "$work/srv/pulled"
    wait "$pid" || rc=$?
    stop_servers
    [ "$rc" = 0 ] || { log "$vmm: exit $rc (log: $log)"; return 1; }
    local bytes=$((MIB * 1048576)) sent
    sent=$(value "$log" big_sha256)
    [ "$(value "$log" put)" = ok ] && [ "$(stat -c %s "$work/up.bin" 2>/dev/null)" = "$bytes" ] &&
        [ "$(sha256sum <"$work/up.bin" | cut -d' ' -f1)" = "$sent" ] ||
        { log "$vmm: the upload is missing or corrupt (log: $log)"; return 1; }
    [ -n "$pull_ms" ] && [ "$(stat -c %s "$work/pull.bin" 2>/dev/null)" = "$bytes" ] &&
        [ "$(sha256sum <"$work/pull.bin" | cut -d' ' -f1)" = "$sent" ] ||
        { log "$vmm: the pull through the forward is missing or corrupt (log: $log)"; return 1; }
    [ "$(value "$log" fetched)" = "sha256:$WANT_DOWN" ] && [ "$(value "$log" fetched_bytes)" = "$bytes" ] ||
        { log "$vmm: the download is missing or corrupt (log: $log)"; return 1; }
    [ "$(value "$log" rr_count)" = "$RR" ] ||
        { log "$vmm: $(value "$log" rr_count) of $RR round trips (log: $log)"; return 1; }
    rm -f "$work/up.bin" "$work/pull.bin"
    [ "$pull_ms" -gt 0 ] || pull_ms=1
    echo "$(value "$log" put_kibps) $((bytes * 1000 / pull_ms / 1024)) $(value "$log" fetched_kibps) $(value "$log" rr_us)"
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

main() {
    require_tools qemu-system-x86_64 timeout awk sort seq head socat busybox sha256sum
    check_isolated
    [ -f "$KERNEL" ] && [ -f "$INITRD" ] || die "no guest fixtures (run tests/guest/build.sh)"
    local work logs vmm i out
    work=$(mktemp -d "${TMPDIR:-/tmp}/hutch-bench-net.XXXXXX")
    logs=${BENCH_LOGS:-$work}
    mkdir -p "$logs" "$work/srv"
    trap 'stop_servers; kill "$HTTPD_PID" 2>/dev/null || true' EXIT
    log "bench-net: logs in $logs, $REPS reps, $MIB MiB each way, $RR round trips, guest RAM $MEM MiB"
    head -c "${MIB}M" /dev/urandom >"$work/srv/big"
    WANT_DOWN=$(sha256sum <"$work/srv/big" | cut -d' ' -f1)
    timeout "$((VM_TIMEOUT * REPS * 2 + 600))" busybox httpd -f -p "127.0.0.1:$HOST_HTTP" \
        -h "$work/srv" &
    HTTPD_PID=$!
    wait_listen "$HOST_HTTP"

    local vmms=()
    for vmm in hutch qemu; do
        [ -z "${BENCH_ONLY:-}" ] || [ "$BENCH_ONLY" = "$vmm" ] || continue
        if [ "$vmm" = hutch ]; then
            if [ ! -x "$HUTCH" ]; then
                log "hutch: not available (no binary at $HUTCH)"
                HUTCH_MISSING=1
                continue
            fi
            # Hutch's user-mode networking: the guest must see a NIC with --net user.
            vm_cmd hutch "console=ttyS0 quiet hutch.actions=nonet,poweroff"
            timeout -k 5 120 "${CMD[@]}" </dev/null >"$logs/hutch-probe.log" 2>&1 || true
            if [ "$(value "$logs/hutch-probe.log" nics)" != eth0 ]; then
                log "hutch: not available (no NIC with --net user; log: $logs/hutch-probe.log)"
                HUTCH_MISSING=1
                continue
            fi
        fi
        vmms+=("$vmm")
    done
    declare -A UP PULL DOWN RTT broken=()
    for i in $(seq "$REPS"); do
        for vmm in ${vmms[@]+"${vmms[@]}"}; do
            [ -z "${broken[$vmm]:-}" ] || continue
            if out=$(net_once "$vmm" "$logs/$vmm-net-$i.log" "$work"); then
                set -- $out
                UP[$vmm]+=" $1" PULL[$vmm]+=" $2" DOWN[$vmm]+=" $3" RTT[$vmm]+=" $4"
                log "$vmm #$i: up $1 KiB/s, pull $2 KiB/s, down $3 KiB/s, round trip $4 µs"
            else
                broken[$vmm]=1
            fi
        done
    done
    for vmm in hutch qemu; do
        if [ -n "${broken[$vmm]:-}" ]; then
            UP[$vmm]="" PULL[$vmm]="" DOWN[$vmm]="" RTT[$vmm]=""
        fi
        UP[$vmm]=$(median ${UP[$vmm]:-})
        PULL[$vmm]=$(median ${PULL[$vmm]:-})
        DOWN[$vmm]=$(median ${DOWN[$vmm]:-})
        RTT[$vmm]=$(median ${RTT[$vmm]:-})
    done
    rm -rf "$work/srv"
    printf '%-30s %12s %12s %8s  %s\n' metric hutch qemu ratio target
    printf '%-30s %12s %12s %8s  %s\n' "up_guest_to_host_kibps" "${UP[hutch]}" "${UP[qemu]}" \
        "$(ratio "${UP[hutch]}" "${UP[qemu]}")" ">= 1.5"
    printf '%-30s %12s %12s %8s  %s\n' "pull_through_forward_kibps" "${PULL[hutch]}" "${PULL[qemu]}" \
        "$(ratio "${PULL[hutch]}" "${PULL[qemu]}")" ">= 1.5"
    printf '%-30s %12s %12s %8s  %s\n' "down_host_to_guest_kibps" "${DOWN[hutch]}" "${DOWN[qemu]}" \
        "$(ratio "${DOWN[hutch]}" "${DOWN[qemu]}")" ">= 1.5"
    printf '%-30s %12s %12s %8s  %s\n' "round_trip_us" "${RTT[hutch]}" "${RTT[qemu]}" \
        "$(ratio "${RTT[hutch]}" "${RTT[qemu]}")" "<= 1.0"
    echo "net_up_ratio=$(ratio "${UP[hutch]}" "${UP[qemu]}") (target >= 1.5)"
    echo "net_pull_ratio=$(ratio "${PULL[hutch]}" "${PULL[qemu]}") (target >= 1.5)"
    echo "net_down_ratio=$(ratio "${DOWN[hutch]}" "${DOWN[qemu]}") (target >= 1.5)"
    echo "net_rr_ratio=$(ratio "${RTT[hutch]}" "${RTT[qemu]}") (target <= 1.0; latency)"
    echo "bench logs: $logs"
    [ -z "${broken[qemu]:-}" ] && [ -z "${broken[hutch]:-}" ] && [ -z "${HUTCH_MISSING:-}" ]
}

main "$@"
