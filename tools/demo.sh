#!/usr/bin/env bash
# Runs Hutch on a fresh Debian/Ubuntu machine: installs the system packages (tests/lab/deps.sh:
# as root directly, else through sudo), builds Hutch and the demo guest as the invoking user,
# creates the "demo" VM in the library, and
# - on a desktop (DISPLAY set) with hardware virtualization: opens the Hutch window on it
#   (click Start; click the screen to type into the guest, Right Ctrl releases);
# - otherwise: boots it with its serial console attached (a busybox shell; `poweroff -f` or
#   Ctrl+] ends it). Without hardware virtualization (vmx/svm absent, as on our CI hosts) the
#   VM runs inside the nested KVM lab (tests/lab/), where no window can be shown.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
command -v cargo >/dev/null || { echo "demo: cargo (Rust 1.85 or newer) is needed: https://rustup.rs" >&2; exit 1; }
bash tests/lab/deps.sh
cargo build --release --locked -p hutch
bash tests/guest/build.sh
HUTCH=${CARGO_TARGET_DIR:-$REPO/target}/release/hutch
G=$REPO/build/guest

direct=false
# Hardware-assisted: the CPU's extension and its vendor's KVM module (as Hutch checks).
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ] &&
    { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
    direct=true
fi
# The demo has its own library unless HUTCH_HOME says otherwise; in the lab it lives on the lab's
# tmpfs (file locks and sockets don't work on the lab's 9p shares).
if $direct; then
    export HUTCH_HOME=${HUTCH_HOME:-$REPO/build/demo-home}
else
    export HUTCH_HOME=/run/hutch-home
fi
script=$REPO/build/demo-inside.sh
cat >"$script" <<INSIDE
set -e
export HUTCH_HOME="$HUTCH_HOME" XDG_RUNTIME_DIR=\${XDG_RUNTIME_DIR:-/run/hutch-demo}
mkdir -p "\$XDG_RUNTIME_DIR" && chmod 700 "\$XDG_RUNTIME_DIR"
"$HUTCH" status demo >/dev/null 2>&1 || "$HUTCH" create demo --kernel "$G/vmlinuz" \
    --initrd "$G/initramfs.cpio.gz" --cpus 2 --memory 512 \
    --cmdline "console=ttyS0 quiet hutch.actions=cpus,mem,shell"
"$HUTCH" list
"$HUTCH" start demo
echo "Attached to the demo VM's console: try 'uname -a', 'cat /proc/cpuinfo'; 'poweroff -f' ends it."
"$HUTCH" console demo
"$HUTCH" status demo || true
INSIDE

if $direct && [ -n "${DISPLAY:-}" ]; then
    "$HUTCH" status demo >/dev/null 2>&1 || "$HUTCH" create demo --kernel "$G/vmlinuz" \
        --initrd "$G/initramfs.cpio.gz" --cpus 2 --memory 512 \
        --cmdline "console=tty0 console=ttyS0 hutch.actions=cpus,mem,shell"
    # Not a first run any more: the GUI would otherwise add its own copy of the demo VM.
    [ -f "$HUTCH_HOME/gui-state.json" ] ||
        echo '{"window_width":1100,"window_height":800,"open_vm":null,"one_to_one":false}' \
            >"$HUTCH_HOME/gui-state.json"
    exec "$HUTCH" gui
fi
if $direct; then
    exec bash "$script"
fi
echo "demo: this CPU has no hardware virtualization; running Hutch inside the nested KVM lab"
exec bash tests/lab/lab.sh --interactive -- bash "$script"
