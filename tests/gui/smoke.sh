#!/usr/bin/env bash
# GUI smoke test under Xvfb (no window manager, Mesa software GL): a temp library with one VM,
# `hutch gui`, screenshots of the library view, the create dialog (with a validation message)
# and a VM view fed by the frame_feed example (no guest can boot here). Checks that the
# window exists and the screenshots are not blank, that the guest's cursor is drawn, and that
# the relative (grabbed) pointer mode sends relative motion, and that the snapshot menu, panel,
# shortcuts (not sent to the guest) and error toast work, and that the network panel adds and
# removes a port forward; the PNGs stay in $OUT for a human
# to look at.
#
#   tests/gui/smoke.sh [OUT_DIR]     (HUTCH=path/to/hutch to test a given binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-$(mktemp -d /tmp/hutch-gui-smoke.XXXXXX)}
mkdir -p "$OUT"
TARGET=${CARGO_TARGET_DIR:-target}
cargo build -q --release -p hutch --example frame_feed
HUTCH=${HUTCH:-$TARGET/release/hutch}
FEED=$TARGET/release/examples/frame_feed

for tool in Xvfb xdotool import; do
    command -v $tool >/dev/null || { echo "smoke: $tool is missing (apt-get install xvfb xdotool imagemagick)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/hutch-gui-work.XXXXXX)
export HUTCH_HOME=$WORK/home XDG_RUNTIME_DIR=$WORK/run HUTCH_DEMO_DIR=$WORK/no-demo
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
echo kernel >"$WORK/vmlinuz"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

DISPLAY_NUM=:99
Xvfb $DISPLAY_NUM -screen 0 1280x800x24 -nolisten tcp >"$OUT/xvfb.log" 2>&1 &
PIDS+=($!)
export DISPLAY=$DISPLAY_NUM
for _ in $(seq 50); do xdotool getmouselocation >/dev/null 2>&1 && break; sleep 0.1; done

"$HUTCH" create web --kernel "$WORK/vmlinuz" --cpus 2 --memory 1024 >/dev/null
"$HUTCH" create screen --kernel "$WORK/vmlinuz" --cpus 1 --memory 256 >/dev/null

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

# colour_pixels PNG RGB FUZZ: how many pixels of PNG are within FUZZ of the colour RGB.
colour_pixels() {
    convert "$1" -fuzz "$3" -fill black +opaque "$2" -fill white -opaque "$2" \
        -format '%[fx:int(mean*w*h+0.5)]' info:
}

# Pixels of the fake guest's cursor colour (frame_feed's CURSOR_RGB) in a screenshot.
cursor_pixels() {
    colour_pixels "$1" 'rgb(255,20,147)' 4%
}

# A screenshot must show more than a handful of colours (a blank or black window has ~1).
check_png() {
    local png=$1 min=$2 colours
    colours=$(convert "$png" -format %k info:)
    echo "smoke: $(basename "$png"): $colours colours"
    [ "$colours" -ge "$min" ] || fail "$png looks blank ($colours colours)"
}

start_gui() {
    "$HUTCH" gui >"$OUT/gui-$1.log" 2>&1 &
    GUI=$!
    PIDS+=($GUI)
    WID=$(timeout 30 xdotool search --sync --name '^Hutch$' | head -1) || fail "no Hutch window"
    sleep 2
    kill -0 $GUI 2>/dev/null || fail "hutch gui exited: $(cat "$OUT/gui-$1.log")"
}

# web_menu_item LOG MENU_X ITEM_X ITEM_Y: the GUI opened on the VM "web"; a click on the menu
# bar at MENU_X, then on the item at (ITEM_X, ITEM_Y), in window coordinates.
web_menu_item() {
    printf '{"window_width":1000,"window_height":700,"open_vm":"web","one_to_one":false}\n' \
        >"$HUTCH_HOME/gui-state.json"
    start_gui "$1"
    eval "$(xdotool getwindowgeometry --shell "$WID")"
    xdotool windowfocus --sync "$WID"
    xdotool mousemove --sync $((X + $2)) $((Y + 12)) click 1
    sleep 0.5
    xdotool mousemove --sync $((X + $3)) $((Y + $4)) click 1
    sleep 1
}

# 1. Library view.
start_gui library
eval "$(xdotool getwindowgeometry --shell "$WID")"
echo "smoke: window $WID at $X,$Y size ${WIDTH}x$HEIGHT"
[ "$WIDTH" -ge 320 ] && [ "$HEIGHT" -ge 240 ] || fail "window too small"
import -window root "$OUT/library.png"
check_png "$OUT/library.png" 20

# 2. The create dialog (Install from an ISO first): Machine → New… then Create with the form
# empty (validation messages).
xdotool mousemove --sync $((X + 30)) $((Y + 12)) click 1
sleep 0.5
xdotool mousemove --sync $((X + 40)) $((Y + 38)) click 1
sleep 1
# The dialog is centred: its Create button sits left of the centre, near its bottom.
xdotool mousemove --sync $((X + WIDTH / 2 - 221)) $((Y + HEIGHT / 2 + 186)) click 1
sleep 1
import -window root "$OUT/create-dialog.png"
check_png "$OUT/create-dialog.png" 20
# The empty "Install from an ISO" form is refused with messages in egui's LIGHT_RED (name, ISO).
form_px=$(colour_pixels "$OUT/create-dialog.png" 'rgb(255,128,128)' 15%)
echo "smoke: the create dialog's error messages cover $form_px pixels"
[ "$form_px" -ge 100 ] || fail "Create on an empty form showed no error message"
[ -f "$HUTCH_HOME/gui-state.json" ] || fail "gui-state.json was not written"
kill $GUI; wait $GUI 2>/dev/null || true

# 2b. The network panel of the stopped VM "web": Network → its panel; a forward typed and
# entered lands in vm.toml, its Remove button takes it out again.
web_menu_item network 207 260 37
# The panel (300 points wide) is on the right: with no forwards, its entry field is the
# first row under "None".
xdotool mousemove --sync $((X + WIDTH - 210)) $((Y + 178)) click 1
sleep 0.3
xdotool type --delay 30 'tcp::2222-:22'
xdotool key Return
sleep 2
import -window root "$OUT/vm-network-panel.png"
check_png "$OUT/vm-network-panel.png" 8
web_toml=$HUTCH_HOME/vms/web/vm.toml
[ -f "$web_toml" ] || web_toml=$(find "$HUTCH_HOME" -path '*/web/vm.toml' | head -1)
grep -q '"tcp:127.0.0.1:2222-:22"' "$web_toml" ||
    fail "the forward added in the network panel is not in vm.toml: $(grep forwards "$web_toml")"
xdotool mousemove --sync $((X + WIDTH - 80)) $((Y + 147)) click 1
sleep 2
import -window root "$OUT/vm-network-removed.png"
if grep -q '2222' "$web_toml"; then fail "Remove left the forward in vm.toml"; fi
echo "smoke: the network panel added and removed a forward"
kill $GUI; wait $GUI 2>/dev/null || true

# 2c. The CD menu of the stopped VM "web": Insert ISO… opens a dialog whose field takes the
# typing at once; Enter puts the ISO in vm.toml and the menu names it; Eject takes it out.
head -c 1M /dev/zero >"$WORK/tools.iso"
web_menu_item cd 253 285 66
xdotool type --delay 20 "$WORK/tools.iso"
xdotool key Return
sleep 2
grep -q "^iso = \"$WORK/tools.iso\"" "$web_toml" ||
    fail "the ISO typed in the Insert ISO dialog is not in vm.toml: $(grep iso "$web_toml")"
xdotool mousemove --sync $((X + 253)) $((Y + 12)) click 1
sleep 0.5
import -window root "$OUT/vm-cd-menu.png"
check_png "$OUT/vm-cd-menu.png" 8
xdotool mousemove --sync $((X + 266)) $((Y + 89)) click 1
sleep 2
if grep -q '^iso' "$web_toml"; then fail "Eject left the ISO in vm.toml"; fi
echo "smoke: the CD menu inserted and ejected an ISO"
kill $GUI; wait $GUI 2>/dev/null || true

# 3. VM view of "screen", fed by frame_feed playing a running VM, reopened from the saved state.
"$FEED" --fake-vm screen 60 >"$OUT/feed.log" 2>&1 &
PIDS+=($!)
sleep 1
printf '{"window_width":1000,"window_height":700,"open_vm":"screen","one_to_one":false}\n' \
    >"$HUTCH_HOME/gui-state.json"
start_gui vm
import -window root "$OUT/vm-view-1.png"
sleep 1
import -window root "$OUT/vm-view-2.png"
check_png "$OUT/vm-view-1.png" 8
# The moving square: two screenshots a second apart differ.
diff_px=$(compare -metric AE "$OUT/vm-view-1.png" "$OUT/vm-view-2.png" null: 2>&1 || true)
echo "smoke: the VM view changed in ${diff_px} pixels"
[ "${diff_px%%.*}" -gt 100 ] 2>/dev/null || fail "the guest screen does not update"
# The guest's cursor (a 24×24 pink arrow, ~300 pixels) is drawn over its screen.
px=$(cursor_pixels "$OUT/vm-view-1.png")
echo "smoke: the guest cursor covers $px pixels"
[ "$px" -ge 150 ] || fail "the guest's cursor is not drawn ($px pixels of its colour)"

# 3b. Snapshots (the fake VM speaks no snapshot protocol): the Snapshots menu, its panel
# (an error or "No snapshots"), and Ctrl+Alt+S uncaptured ends in an error toast that stays.
eval "$(xdotool getwindowgeometry --shell "$WID")"
xdotool windowfocus --sync "$WID"
xdotool mousemove --sync $((X + 145)) $((Y + 12)) click 1
sleep 0.5
import -window root "$OUT/vm-snapshots-menu.png"
xdotool mousemove --sync $((X + 170)) $((Y + 96)) click 1
sleep 1.5
import -window root "$OUT/vm-snapshots-panel.png"
check_png "$OUT/vm-snapshots-panel.png" 8
xdotool mousemove --sync $((X + 300)) $((Y + 300))
xdotool key ctrl+alt+s
sleep 4
import -window root "$OUT/vm-snapshot-toast.png"
# The error toast's fill (toast.rs) covers a good area and outlives a note's 3 s.
toast_px=$(colour_pixels "$OUT/vm-snapshot-toast.png" 'rgb(90,30,30)' 2%)
echo "smoke: the error toast covers $toast_px pixels"
[ "$toast_px" -ge 1000 ] || fail "no error toast after Ctrl+Alt+S"

# 4. Capture: click the screen, type with Shift held, release with Right Ctrl. (xdotool
# presses Control_L along with any Control_R it types, so the guest sees Left Ctrl go down
# and then come up with the release.)
eval "$(xdotool getwindowgeometry --shell "$WID")"
xdotool windowfocus --sync "$WID"
xdotool mousemove --sync $((X + WIDTH / 2)) $((Y + HEIGHT / 2)) click 1
sleep 0.5
xdotool mousemove --sync $((X + WIDTH / 2 + 10)) $((Y + HEIGHT / 2 + 10))
xdotool keydown Shift_L key a
sleep 0.5
import -window root "$OUT/vm-captured.png"
xdotool keyup Shift_L
# A snapshot shortcut while captured is Hutch's: S never reaches the guest, Ctrl and Alt
# are released in it.
xdotool key ctrl+alt+s
sleep 0.5
xdotool keydown Shift_L
xdotool key Control_R
sleep 0.5
xdotool keyup Shift_L key b
sleep 1
# 5. Back to the library: the running VM has a thumbnail of its screen.
xdotool mousemove --sync $((X + 35)) $((Y + 35)) click 1
sleep 2.5
import -window root "$OUT/library-running.png"
check_png "$OUT/library-running.png" 20
kill $GUI; wait $GUI 2>/dev/null || true

# 6. Relative (grabbed) pointer, as saved in the GUI state: a capture click grabs the pointer,
# motion reaches the guest as relative counts only, Right Ctrl frees the pointer.
printf '{"window_width":1000,"window_height":700,"open_vm":"screen","pointer_mode":"relative"}\n' \
    >"$HUTCH_HOME/gui-state.json"
before=$(wc -l <"$OUT/feed.log")
start_gui relative
eval "$(xdotool getwindowgeometry --shell "$WID")"
xdotool windowfocus --sync "$WID"
xdotool mousemove --sync $((X + WIDTH / 2)) $((Y + HEIGHT / 2)) click 1
sleep 0.5
for _ in $(seq 8); do xdotool mousemove_relative -- -15 -10; sleep 0.05; done
sleep 0.5
import -window root "$OUT/vm-relative.png"
xdotool key Control_R
sleep 0.5
# Freed: the pointer can leave the window again (a confined one stops at its edge).
right=$((X + WIDTH))
xdotool mousemove $((right + 100)) $((Y + HEIGHT / 2))
sleep 0.3
px_x=$(xdotool getmouselocation --shell | sed -n 's/^X=//p')
echo "smoke: pointer after the release at x=$px_x (window's right edge $right)"
kill $GUI; wait $GUI 2>/dev/null || true
tail -n +$((before + 1)) "$OUT/feed.log" >"$OUT/feed-relative.log"
grep -q '"type":"pointer_rel"' "$OUT/feed-relative.log" ||
    fail "no relative motion reached the guest (feed: $(tr '\n' ' ' <"$OUT/feed-relative.log"))"
if grep -q '"type":"pointer_abs"' "$OUT/feed-relative.log"; then
    fail "tablet positions reached the guest in relative mode"
fi
[ "$px_x" -gt "$right" ] || fail "the pointer stayed grabbed after the release"
# The guest moved as far as the host pointer did (8 × -15), not twice that (winit doubles raw
# motion while X11 confines the pointer).
sum_dx=$(grep -o '"type":"pointer_rel","dx":-\?[0-9]*' "$OUT/feed-relative.log" | sed 's/.*://' | paste -sd+ | bc)
echo "smoke: relative motion sent: dx total $sum_dx"
[ "$sum_dx" -ge -130 ] && [ "$sum_dx" -le -110 ] || fail "relative motion adds up to dx $sum_dx, not -120"
has() { grep -q -- "$1" "$OUT/feed.log" || fail "the guest never got $2 (feed.log: $(tr '\n' ' ' <"$OUT/feed.log"))"; }
has '"code":42,"down":true' "Shift down"
has '"code":30,"down":true' "A down"
has '"code":30,"down":false' "A up"
has '"code":42,"down":false' "Shift up from the release key"
has '"type":"pointer_abs"' "pointer positions"
has '"cmd":"display_size"' "a display size"
if grep -q '"code":48' "$OUT/feed.log"; then fail "B reached the guest after the release"; fi
if grep -q '"code":31' "$OUT/feed.log"; then fail "the S of Ctrl+Alt+S reached the guest"; fi
has '"code":56,"down":true' "Alt down (before Ctrl+Alt+S)"
has '"code":56,"down":false' "Alt up (Ctrl+Alt+S)"
if grep -q '"code":97' "$OUT/feed.log"; then fail "Right Ctrl reached the guest"; fi
echo "smoke: OK ($OUT)"
