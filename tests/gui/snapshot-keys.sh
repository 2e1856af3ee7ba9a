#!/usr/bin/env bash
# The VM window's snapshot shortcuts against a running guest on this host's /dev/kvm, under
# Xvfb: Ctrl+Alt+S takes a snapshot of the running VM, Ctrl+Alt+R brings the machine back to
# it. The guest is tests/e2e/pvh-kernel.py's counter (no OS boots on the emulating /dev/kvm of
# these hosts, KVM-LAB.md): it prints a count kept in its RAM on the serial port, so after the
# restore serial.log goes on, in the same file, from the count the snapshot held. Then the same
# VM without a display device: its window says so, and Ctrl+Alt+S still works. Screenshots
# stay in OUT_DIR for a human to look at.
#
#   tests/gui/snapshot-keys.sh [OUT_DIR]      (HUTCH=path/to/hutch to skip the build)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-$(mktemp -d /tmp/hutch-gui-snapkeys.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${HUTCH:-}" ]; then
    cargo build -q --release -p hutch
    HUTCH=${CARGO_TARGET_DIR:-target}/release/hutch
fi
HUTCH=$(realpath "$HUTCH")

fail() { echo "snapshot-keys: FAIL: $*" >&2; exit 1; }
for tool in Xvfb xdotool import convert tesseract python3; do
    command -v $tool >/dev/null || fail "$tool is missing (apt-get install xvfb xdotool imagemagick tesseract-ocr python3)"
done
[ -c /dev/kvm ] || fail "no /dev/kvm on this host"

WORK=$(mktemp -d /tmp/hutch-gui-snapkeys-work.XXXXXX)
export HUTCH_HOME=$WORK/home XDG_RUNTIME_DIR=$WORK/run HUTCH_DEMO_DIR=$WORK/no-demo
# The counter is hand-assembled and runs on an emulating /dev/kvm, which hutch otherwise
# refuses as not hardware-assisted.
export HUTCH_ALLOW_EMULATED_KVM=1
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
PIDS=()
cleanup() {
    "$HUTCH" stop --force counter >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

python3 tests/e2e/pvh-kernel.py counter "$WORK/counter.elf"
"$HUTCH" create counter --kernel "$WORK/counter.elf" --memory 64 >/dev/null
LOG=$HUTCH_HOME/vms/counter/serial.log
"$HUTCH" start counter >/dev/null

# The counts in serial.log, one decimal per line (the guest prints eight hex digits).
counts() { grep -aE '^[0-9a-f]{8}$' "$LOG" | while read -r h; do echo $((16#$h)); done; }
last_count() { counts | tail -1; }
# wait_for SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    for _ in $(seq $((secs * 5))); do "$@" && return 0; sleep 0.2; done
    fail "$what (after $secs s); serial.log ends: $(tail -3 "$LOG" | tr '\n' ' ')"
}
count_at_least() { [ "$(last_count)" -ge "$1" ] 2>/dev/null; }
# ("No snapshots" is printed too, so the list is counted from its JSON.)
snapshots_at_least() {
    [ "$("$HUTCH" snapshot list counter --json 2>/dev/null |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["snapshots"]))' 2>/dev/null)" \
        -ge "$1" ] 2>/dev/null
}
wait_for 30 "the guest does not count" count_at_least 3

# A free display, chosen by the server itself, which names it once it is ready (a busy CI
# host once took over 5 s to bring up a fixed-number server).
exec 3>"$WORK/display"
Xvfb -displayfd 3 -screen 0 1280x800x24 -nolisten tcp >"$OUT/xvfb.log" 2>&1 &
PIDS+=($!)
exec 3>&-
display_named() { [ -s "$WORK/display" ]; }
wait_for 60 "Xvfb did not start (see $OUT/xvfb.log)" display_named
export DISPLAY=:$(head -1 "$WORK/display")
x_answers() { xdotool getmouselocation >/dev/null 2>&1; }
wait_for 30 "the X server on $DISPLAY does not answer" x_answers
printf '{"window_width":1000,"window_height":700,"open_vm":"counter","one_to_one":false}\n' \
    >"$HUTCH_HOME/gui-state.json"
RUST_LOG=info "$HUTCH" gui >"$OUT/gui.log" 2>&1 &
GUI=$!
PIDS+=($GUI)
WID=$(timeout 30 xdotool search --sync --name '^Hutch$' | head -1) || fail "no Hutch window"
sleep 2
kill -0 $GUI 2>/dev/null || fail "hutch gui exited: $(cat "$OUT/gui.log")"
xdotool windowfocus --sync "$WID"
import -window root "$OUT/1-vm-view.png"

# Ctrl+Alt+S: a snapshot of the running VM. Its count lies between the last one printed
# before the key and the last one printed once the snapshot exists.
before=$(last_count)
xdotool key ctrl+alt+s
wait_for 60 "no snapshot after Ctrl+Alt+S" snapshots_at_least 1
wait_for 30 "the GUI did not report the snapshot" grep -q "Snapshot '.*' taken" "$OUT/gui.log"
after=$(last_count)
"$HUTCH" snapshot list counter >"$OUT/snapshots.txt"
echo "snapshot-keys: snapshot taken between counts $before and $after"
import -window root "$OUT/2-after-take.png"

# Let the guest count well past the snapshot, then Ctrl+Alt+R.
wait_for 60 "the guest stopped counting after the snapshot" count_at_least $((after + 10))
peak=$(last_count)
lines=$(counts | wc -l)
xdotool key ctrl+alt+r
wait_for 60 "the GUI did not report the restore" grep -q "Snapshot '.*' restored" "$OUT/gui.log"
# After the restore the same serial.log goes on from the snapshot's count, and keeps going.
first_back() { counts | tail -n +$((lines + 1)) | awk -v p="$peak" '$1 <= p { print; exit }'; }
went_back() { [ -n "$(first_back)" ]; }
wait_for 60 "serial.log did not go back to the snapshot's count" went_back
first_back=$(first_back)
echo "snapshot-keys: counted to $peak, then after Ctrl+Alt+R from $first_back"
[ "$first_back" -gt "$before" ] && [ "$first_back" -le $((after + 1)) ] ||
    fail "after the restore the guest counted from $first_back, not from the snapshot's $before..$after"
wait_for 30 "the restored guest does not count on" count_at_least $((first_back + 3))
"$HUTCH" list | tee "$OUT/list.txt" | grep -q 'counter.*running' || fail "the VM is not running after the restore"
import -window root "$OUT/3-after-restore.png"

# The same VM without a display device: the window says so (not a missing-file error), and
# the shortcut still works.
"$HUTCH" stop --force counter >/dev/null
sed -i 's/^display = true$/display = false/' "$HUTCH_HOME/vms/counter/vm.toml"
grep -q '^display = false$' "$HUTCH_HOME/vms/counter/vm.toml" || fail "vm.toml has no display line"
"$HUTCH" start counter >/dev/null
xdotool key ctrl+alt+s
wait_for 60 "no snapshot of the VM without a display" snapshots_at_least 2
taken_twice() { [ "$(grep -c "Snapshot '.*' taken" "$OUT/gui.log")" -ge 2 ]; }
wait_for 30 "the GUI did not report the second snapshot" taken_twice
import -window root "$OUT/4-no-display.png"
convert "$OUT/4-no-display.png" -crop 1000x700+0+0 -resize 200% -negate "$OUT/4-no-display-ocr.png"
tesseract "$OUT/4-no-display-ocr.png" - 2>/dev/null >"$OUT/4-no-display.txt" || true
grep -q "has no display" "$OUT/4-no-display.txt" ||
    fail "the window of a VM without a display does not say so: $(tr '\n' ' ' <"$OUT/4-no-display.txt")"
grep -a 'ERROR' "$OUT/gui.log" && fail "the GUI logged errors"
echo "snapshot-keys: OK (screenshots in $OUT)"
