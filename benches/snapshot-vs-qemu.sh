#!/usr/bin/env bash
# Snapshot save and restore of a running guest: Hutch against QEMU's savevm/loadvm, in one run.
# Runs INSIDE the nested lab (benches/snapshot.sh wraps it with tests/lab/lab.sh): only the
# ratios mean something there.
#
# The same guest for both: 1 vCPU, BENCH_MEM MiB (default 1024), the test kernel + initramfs,
# which first fills BENCH_FILL MiB (default 450: its initramfs tmpfs holds at most half the RAM)
# of its RAM with non-zero data, then runs its
# command loop on the serial console. One 64 MiB qcow2 disk (QEMU's savevm needs one).
# Per VMM, BENCH_REPS repetitions (default 3, medians):
#   save    — Hutch: `hutch snapshot take` (CLI wall time: pause, state, RAM, fsync, resume);
#             QEMU: HMP `savevm` over QMP (RAM and state into the qcow2, synchronous).
#   restore — from a stopped VM to a guest that answers on serial: Hutch: `hutch snapshot
#             restore` of the stopped VM, then a command echoed back; QEMU: a new process with
#             `-loadvm`, then the same command echoed back.
# Output: a table, then save_ratio= and restore_ratio= (hutch/qemu) with their targets
# (<= 1.0 and <= 0.1).
# Environment: HUTCH (default ${CARGO_TARGET_DIR:-$REPO/target}/release/hutch), BENCH_REPS,
#   BENCH_MEM, BENCH_FILL, BENCH_VM_TIMEOUT (s, default 300).
set -euo pipefail
. "$(dirname "$0")/../tests/lab/common.sh"

HUTCH=${HUTCH:-${CARGO_TARGET_DIR:-$REPO/target}/release/hutch}
REPS=${BENCH_REPS:-3}
MEM=${BENCH_MEM:-1024}
FILL=${BENCH_FILL:-450}
VM_TIMEOUT=${BENCH_VM_TIMEOUT:-300}
KERNEL=$BUILD/guest/vmlinuz
INITRD=$BUILD/guest/initramfs.cpio.gz
CMDLINE="console=ttyS0 quiet hutch.actions=fill:$FILL,cmdloop"

require_tools qemu-system-x86_64 qemu-img socat python3 timeout
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hutch-snapbench.XXXXXX")
export HUTCH_HOME=$WORK/home HUTCH_CACHE_DIR=$WORK/kcache
trap 'pkill -f "$WORK" 2>/dev/null || true' EXIT

# wait_line FILE PATTERN SECS
wait_line() {
    local i=0
    until grep -aq -- "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -le $(($3 * 20)) ] || die "no '$2' in $1 within $3 s"
        sleep 0.05
    done
}

# ask_until_answer SEND-CMD LOG TAG: sends `echo TAG` into the guest's command loop (again every
# 2 s) until the answer is in LOG.
ask_until_answer() {
    local send=$1 log=$2 tag=$3 t=0
    while ! grep -aq "^$tag" "$log" 2>/dev/null; do
        if [ $((t % 40)) = 0 ]; then
            eval "$send" "'echo $tag'" || true
        fi
        t=$((t + 1))
        [ "$t" -le $((VM_TIMEOUT * 20)) ] || die "the guest did not answer $tag"
        sleep 0.05
    done
}

# The running VM process's control socket, from its pid.json. Read once per restore, not per
# send: a Python start per attempt costs seconds under the lab's emulation, which QEMU's side
# (a plain socat) does not pay.
hutch_socket() {
    sed -n 's/.*"socket" *: *"\([^"]*\)".*/\1/p' "$HUTCH_HOME/vms/bench/pid.json"
}

hutch_send() {
    printf '{"cmd":"hello","version":2}\n{"cmd":"console"}\n%s\n' "$1" | timeout 5 socat -t 0.5 - "UNIX-CONNECT:$HSOCK" >/dev/null 2>&1
}

hutch_rep() {
    local rep=$1 serial=$HUTCH_HOME/vms/bench/serial.log t0 t1
    "$HUTCH" delete bench >/dev/null 2>&1 || true
    qemu-img create -q -f qcow2 "$WORK/h-disk.qcow2" 64M
    "$HUTCH" create bench --kernel "$KERNEL" --initrd "$INITRD" --cpus 1 --memory "$MEM" \
        --disk "$WORK/h-disk.qcow2" --cmdline "$CMDLINE" --net none >/dev/null
    "$HUTCH" start bench >/dev/null
    wait_line "$serial" 'HUTCH-RESULT cmdloop=ready' "$VM_TIMEOUT"
    t0=$(now_ms)
    "$HUTCH" snapshot take bench "s$rep" >"$WORK/h-take.log" 2>&1 || die "take: $(cat "$WORK/h-take.log")"
    t1=$(now_ms)
    local save=$((t1 - t0))
    "$HUTCH" stop bench --force >/dev/null
    sync
    t0=$(now_ms)
    "$HUTCH" snapshot restore bench "s$rep" >"$WORK/h-restore.log" 2>&1 ||
        die "restore: $(cat "$WORK/h-restore.log")"
    HSOCK=$(hutch_socket)
    [ -n "$HSOCK" ] || die "no control socket in pid.json after the restore"
    ask_until_answer hutch_send "$serial" "HUTCH-BACK-$rep"
    t1=$(now_ms)
    local restore=$((t1 - t0)) size
    size=$(du -k "$HUTCH_HOME"/vms/bench/snapshots/*.hsnap | awk '{s += $1} END {print s}')
    "$HUTCH" stop bench --force >/dev/null
    echo "$save $restore $size"
}

qemu_cmd() {
    QCMD=(qemu-system-x86_64 -enable-kvm -cpu host -M q35 -m "$MEM" -smp 1 -nodefaults
        -no-user-config -display none -no-reboot
        -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE"
        -drive "file=$WORK/q-disk.qcow2,if=none,id=d0,format=qcow2" -device virtio-blk-pci,drive=d0
        -chardev "socket,id=s0,path=$WORK/q-serial.sock,server=on,wait=off,logfile=$1"
        -serial chardev:s0 -qmp "unix:$WORK/qmp.sock,server=on,wait=off")
}

# qmp JSON: sends one command after the handshake; prints its reply (events are skipped).
qmp() {
    timeout "$VM_TIMEOUT" python3 - "$WORK/qmp.sock" "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
def reply():
    while True:
        line = f.readline()
        if not line:  # the VMM went away (quit)
            return {}
        msg = json.loads(line)
        if "return" in msg or "error" in msg:
            return msg
f.readline()  # greeting
f.write('{"execute":"qmp_capabilities"}\n'); f.flush(); reply()
f.write(sys.argv[2] + "\n"); f.flush()
print(json.dumps(reply()))
PY
}

qemu_send() {
    printf '%s\n' "$1" | timeout 5 socat -t 0.5 - "UNIX-CONNECT:$WORK/q-serial.sock" >/dev/null 2>&1
}

qemu_wait_gone() {
    local i=0
    while kill -0 "$1" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -le 200 ] || { kill -9 "$1"; break; }
        sleep 0.05
    done
}

qemu_rep() {
    local rep=$1 log=$WORK/q-serial-$rep.log t0 t1 pid reply
    rm -f "$WORK/q-disk.qcow2" "$WORK"/*.sock
    qemu-img create -q -f qcow2 "$WORK/q-disk.qcow2" 64M
    qemu_cmd "$log"
    "${QCMD[@]}" </dev/null >"$WORK/q-$rep.out" 2>&1 &
    pid=$!
    wait_line "$log" 'HUTCH-RESULT cmdloop=ready' "$VM_TIMEOUT"
    t0=$(now_ms)
    reply=$(qmp '{"execute":"human-monitor-command","arguments":{"command-line":"savevm s1"}}')
    t1=$(now_ms)
    contains_ok "$reply" || die "savevm: $reply"
    local save=$((t1 - t0))
    qmp '{"execute":"quit"}' >/dev/null || true
    qemu_wait_gone "$pid"
    sync
    local log2=$WORK/q-serial-$rep-restored.log
    rm -f "$WORK"/*.sock
    qemu_cmd "$log2"
    t0=$(now_ms)
    "${QCMD[@]}" -loadvm s1 </dev/null >"$WORK/q-$rep-restore.out" 2>&1 &
    pid=$!
    until [ -S "$WORK/q-serial.sock" ]; do sleep 0.01; done
    ask_until_answer qemu_send "$log2" "HUTCH-BACK-$rep"
    t1=$(now_ms)
    local restore=$((t1 - t0)) size
    size=$(qemu-img info -U --output=json "$WORK/q-disk.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["actual-size"] // 1024)')
    qmp '{"execute":"quit"}' >/dev/null || true
    qemu_wait_gone "$pid"
    echo "$save $restore $size"
}

contains_ok() {
    grep -q '"return"' <<<"$1" && ! grep -qi 'error' <<<"$1"
}

median() {
    printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END { if (NR % 2) print v[(NR + 1) / 2];
        else printf "%d\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

declare -a hs hr qs qr
for rep in $(seq "$REPS"); do
    log "rep $rep: qemu"
    r=$(qemu_rep "$rep") || die "qemu repetition $rep failed"
    set -- $r
    qs+=("$1"); qr+=("$2"); qsize=$3
    log "  qemu savevm ${1} ms, loadvm to answer ${2} ms, qcow2 ${3} KiB"
    log "rep $rep: hutch"
    r=$(hutch_rep "$rep") || die "hutch repetition $rep failed"
    set -- $r
    hs+=("$1"); hr+=("$2"); hsize=$3
    log "  hutch take ${1} ms, restore to answer ${2} ms, snapshot ${3} KiB"
done
HS=$(median "${hs[@]}"); HR=$(median "${hr[@]}"); QS=$(median "${qs[@]}"); QR=$(median "${qr[@]}")
printf '%-34s %10s %10s\n' metric hutch qemu
printf '%-34s %10s %10s\n' "save (ms, median of $REPS)" "$HS" "$QS"
printf '%-34s %10s %10s\n' "restore to answer (ms)" "$HR" "$QR"
printf '%-34s %10s %10s\n' "on disk (KiB, last rep)" "$hsize" "$qsize"
echo "guest: ${MEM} MiB, ${FILL} MiB filled, 1 vCPU; hutch saves: ${hs[*]}; restores: ${hr[*]}; qemu saves: ${qs[*]}; restores: ${qr[*]}"
python3 -c 'import sys; hs,qs,hr,qr=map(float,sys.argv[1:]); print(f"save_ratio={hs/qs:.3f} (target <= 1.0)"); print(f"restore_ratio={hr/qr:.3f} (target <= 0.1)")' \
    "$HS" "$QS" "$HR" "$QR"
