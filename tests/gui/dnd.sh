#!/usr/bin/env bash
# Drag and drop import under Xvfb (no window manager, Mesa software GL), with real XDND drops
# made by tools/xdnd-drop:
#   1. a VMDK (made by qemu-img from a raw pattern) → the sheet (format, sizes, name) → Enter
#      imports it → the VM is listed and its disk equals the pattern (qemu-img compare);
#   2. a text file and the VMDK again, in one drop → "Not a disk image" for the text, the VMDK
#      named "disk-2" (the name is taken) → Escape closes, nothing is created;
#   3. a 16 GiB sparse raw image → Enter, then Escape while it converts → no VM directory and no
#      file left behind.
# Screenshots (and their OCR text) stay in OUT_DIR for a human to look at.
#
#   tests/gui/dnd.sh [OUT_DIR]      (HUTCH=path/to/hutch, XDND_DROP=path/to/xdnd-drop to skip builds)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-$(mktemp -d /tmp/hutch-gui-dnd.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TARGET=$(realpath -m "${CARGO_TARGET_DIR:-target}")
if [ -z "${HUTCH:-}" ]; then
    cargo build -q --release -p hutch
    HUTCH=$TARGET/release/hutch
fi
if [ -z "${XDND_DROP:-}" ]; then
    # An excluded crate has its own default target dir: name ours so the binary is where we look.
    cargo build -q --release --manifest-path tools/xdnd-drop/Cargo.toml --target-dir "$TARGET"
    XDND_DROP=$TARGET/release/xdnd-drop
fi
HUTCH=$(realpath "$HUTCH")
XDND_DROP=$(realpath "$XDND_DROP")

for tool in Xvfb xdotool import convert qemu-img tesseract; do
    command -v $tool >/dev/null || { echo "dnd: $tool is missing (apt-get install xvfb xdotool imagemagick qemu-utils tesseract-ocr)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/hutch-gui-dnd-work.XXXXXX)
export HUTCH_HOME=$WORK/home XDG_RUNTIME_DIR=$WORK/run HUTCH_DEMO_DIR=$WORK/no-demo
# Imported VMs boot the "demo guest" by default: dummy files are enough to create them.
export HUTCH_GUEST_DIR=$WORK/guest
mkdir -p "$XDG_RUNTIME_DIR" "$HUTCH_HOME" "$HUTCH_GUEST_DIR" "$WORK/files"
chmod 700 "$XDG_RUNTIME_DIR"
echo kernel >"$HUTCH_GUEST_DIR/vmlinuz"
echo initrd >"$HUTCH_GUEST_DIR/initramfs.cpio.gz"
# Not a first run (no demo VM), and a known window size.
printf '{"window_width":1000,"window_height":700,"open_vm":null,"one_to_one":false}\n' \
    >"$HUTCH_HOME/gui-state.json"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "dnd: FAIL: $*" >&2; exit 1; }

# A free display, chosen by the server itself.
exec 3>"$WORK/display"
Xvfb -displayfd 3 -screen 0 1280x800x24 -nolisten tcp >"$OUT/xvfb.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -s "$WORK/display" ] && break; sleep 0.1; done
export DISPLAY=:$(head -1 "$WORK/display")
for _ in $(seq 50); do xdotool getmouselocation >/dev/null 2>&1 && break; sleep 0.1; done

# The files: an 8 MiB raw pattern (data, zeros, data) → VMDK; a text file; a big image whose
# 16 GiB are mapped as data but read as zeroes: a qcow2 with preallocated metadata, each cluster
# pointing into a hole of its file. (A sparse raw file no longer serves: its holes are skipped;
# should qcow2 clusters over holes ever be skipped too, this needs an image with real data.)
F=$WORK/files
python3 - "$F/pattern.raw" <<'EOF'
import sys
with open(sys.argv[1], "wb") as f:
    for i in range(8 * 256):             # 8 MiB in 4 KiB blocks
        f.write(bytes([(i * 7 + j) % 251 for j in range(16)]) * 256 if i % 3 != 1 else bytes(4096))
EOF
qemu-img convert -f raw -O vmdk "$F/pattern.raw" "$F/disk.vmdk"
echo "These are my notes, not a disk." >"$F/notes.txt"
qemu-img create -q -f qcow2 -o preallocation=metadata "$F/big.qcow2" 16G

vms() { "$HUTCH" list --json | python3 -c 'import json,sys; print(" ".join(v["name"] for v in json.load(sys.stdin)))'; }
shot() { import -window root "$OUT/$1.png"; }
# OCR of the window (inverted and enlarged: egui's dark theme reads badly as is).
ocr() {
    convert "$OUT/$1.png" -crop "${WIDTH}x${HEIGHT}+${X}+${Y}" -negate -resize 200% "$WORK/ocr.png"
    tesseract "$WORK/ocr.png" - 2>/dev/null >"$OUT/$1.txt" || true
}
expect_text() {
    grep -qi -- "$2" "$OUT/$1.txt" || fail "'$2' is not on screen in $1.png (OCR: $(tr '\n' ' ' <"$OUT/$1.txt"))"
}
drop() { "$XDND_DROP" --window "$WID" "$@" || fail "the drop of $* failed"; }
# Everything under HUTCH_HOME but the GUI's own state, to prove nothing was left behind.
files_in_home() { (cd "$HUTCH_HOME" && find . -mindepth 1 ! -name gui-state.json | sort); }

"$HUTCH" gui >"$OUT/gui.log" 2>&1 &
GUI=$!
PIDS+=($GUI)
WID=$(timeout 30 xdotool search --sync --name '^Hutch$' | head -1) || fail "no Hutch window"
sleep 2
kill -0 $GUI 2>/dev/null || fail "hutch gui exited: $(cat "$OUT/gui.log")"
eval "$(xdotool getwindowgeometry --shell "$WID")"
echo "dnd: window $WID at $X,$Y size ${WIDTH}x$HEIGHT on $DISPLAY"
xdotool windowfocus --sync "$WID"
[ -z "$(vms)" ] || fail "the library is not empty: $(vms)"

# 1. Drop the VMDK (held over the window for a moment: the drop hint), then Enter imports it.
"$XDND_DROP" --window "$WID" --hold 1.5 "$F/disk.vmdk" >"$OUT/drop1.log" 2>&1 &
DROP=$!
sleep 1
shot 1-hover
wait $DROP || fail "the VMDK drop failed: $(cat "$OUT/drop1.log")"
cat "$OUT/drop1.log"
sleep 1
shot 2-sheet
ocr 1-hover
expect_text 1-hover "Drop this file"
ocr 2-sheet
expect_text 2-sheet "VMDK"
expect_text 2-sheet "disk.vmdk"
expect_text 2-sheet "Convert to qcow2"
[ -z "$(vms)" ] || fail "a VM exists before Import was pressed"
xdotool key Return
for _ in $(seq 100); do [ "$(vms)" = disk ] && break; sleep 0.2; done
[ "$(vms)" = disk ] || fail "the VM 'disk' did not appear (VMs: '$(vms)'; gui.log: $(cat "$OUT/gui.log"))"
sleep 1
shot 3-imported
ocr 3-imported
expect_text 3-imported "Imported as VM"
qemu-img compare -f raw -F qcow2 "$F/pattern.raw" "$HUTCH_HOME/vms/disk/disk.qcow2" \
    || fail "the imported disk differs from the pattern"
echo "dnd: imported VM 'disk'; its disk equals the pattern"
xdotool key Escape
sleep 1
shot 4-library
ocr 4-library
expect_text 4-library "disk"

# 2. A text file and the VMDK in one drop: a refusal, and a fresh name for the VMDK.
before=$(files_in_home)
drop "$F/notes.txt" "$F/disk.vmdk"
sleep 1
shot 5-notes
ocr 5-notes
expect_text 5-notes "disk image: notes.txt"
expect_text 5-notes "disk-2"
xdotool key Escape
sleep 1
[ "$(vms)" = disk ] || fail "closing the sheet created VMs: $(vms)"
[ "$(files_in_home)" = "$before" ] || fail "the refused drop changed the library"

# 3. Cancel: 16 GiB of zeroes take many seconds to read; Escape once the VM directory exists.
drop "$F/big.qcow2"
sleep 1
xdotool key Return
for _ in $(seq 50); do [ -d "$HUTCH_HOME/vms/big" ] && break; sleep 0.1; done
[ -d "$HUTCH_HOME/vms/big" ] || fail "the import of big.qcow2 did not start"
sleep 1
shot 6-importing
[ -d "$HUTCH_HOME/vms/big" ] || fail "big.qcow2 was imported before it could be cancelled"
xdotool key Escape
for _ in $(seq 50); do [ ! -e "$HUTCH_HOME/vms/big" ] && break; sleep 0.1; done
sleep 0.5
shot 7-cancelled
ocr 6-importing
expect_text 6-importing "Importing"
ocr 7-cancelled
expect_text 7-cancelled "Cancelled"
[ ! -e "$HUTCH_HOME/vms/big" ] || fail "the cancelled import left $HUTCH_HOME/vms/big"
[ "$(vms)" = disk ] || fail "the cancelled import left a VM: $(vms)"
[ "$(files_in_home)" = "$before" ] || fail "the cancelled import left files: $(diff <(echo "$before") <(files_in_home))"
xdotool key Escape
sleep 0.5
kill -0 $GUI 2>/dev/null || fail "hutch gui died: $(cat "$OUT/gui.log")"
kill $GUI; wait $GUI 2>/dev/null || true
echo "dnd: OK ($OUT)"
