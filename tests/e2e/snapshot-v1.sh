#!/usr/bin/env bash
# Host-side: snapshots taken by the v1 release (tests/fixtures/snapshot-v1/counter.*) restore
# with this hutch and the counter guest counts on from the saved count.
#   HUTCH=path/to/hutch tests/e2e/snapshot-v1.sh     (SNAPV1_FIXTURES: another fixture dir)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
HUTCH=$(realpath "${HUTCH:-${CARGO_TARGET_DIR:-$REPO/target}/release/hutch}")
FIX=${SNAPV1_FIXTURES:-$REPO/tests/fixtures/snapshot-v1}
export HUTCH_ALLOW_EMULATED_KVM=1
WORK=$(mktemp -d /tmp/hutch-snapv1.XXXXXX)
export HUTCH_HOME=$WORK/home XDG_RUNTIME_DIR=$WORK/run
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
tar -C "$WORK" -xJf "$FIX/counter.tar.xz"
prefix=$(sed -n 's/.*prefix=//p' "$FIX/counter.txt")
sed -i "s|$prefix|$WORK|g" "$WORK"/home/vms/*/vm.toml "$WORK"/home/vms/*/snapshots/index.json
trap '"$HUTCH" stop --force counter >/dev/null 2>&1; "$HUTCH" stop --force counter-nodisplay >/dev/null 2>&1; rm -rf "$WORK"' EXIT
passed=0 failed=0
check() { # VM COUNT
    local vm=$1 want=$2 log=$HUTCH_HOME/vms/$1/serial.log
    "$HUTCH" snapshot restore "$vm" snap1 >"$WORK/$vm.out" 2>&1 || { echo "restore failed: $(cat "$WORK/$vm.out")"; return 1; }
    local i counts
    for i in $(seq 150); do
        counts=$(grep -aE '^[0-9a-f]{8}$' "$log" 2>/dev/null | while read -r h; do echo $((16#$h)); done)
        [ "$(echo "$counts" | grep -c .)" -ge 10 ] && break
        sleep 0.2
    done
    local first prev c
    first=$(echo "$counts" | head -1)
    [ -n "$first" ] || { echo "no counts after the restore"; return 1; }
    [ "$first" = "$want" ] || [ "$first" = $((want + 1)) ] || { echo "counted from $first, the snapshot holds $want"; return 1; }
    prev=$((first - 1))
    for c in $counts; do [ "$c" = $((prev + 1)) ] || { echo "count jumped $prev -> $c"; return 1; }; prev=$c; done
    [ "$prev" -ge $((want + 9)) ] || { echo "only counted to $prev"; return 1; }
    "$HUTCH" stop --force "$vm" >/dev/null 2>&1
}
for vm in counter counter-nodisplay; do
    want=$(sed -n "s/^vm=$vm snapshot=snap1 count=//p" "$FIX/counter.txt")
    if reason=$(check "$vm" "$want"); then echo "PASS v1_snapshot_of_${vm//-/_}_restores_and_counts_on"; passed=$((passed+1))
    else echo "FAIL v1_snapshot_of_${vm//-/_}_restores_and_counts_on: $reason"; failed=$((failed+1)); fi
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
