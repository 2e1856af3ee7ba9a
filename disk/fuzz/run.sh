#!/usr/bin/env bash
# Builds every disk parser fuzz target and runs each for SECONDS (default 20), seeded with small
# images qemu-img makes (when it is installed). Fails if any target crashes, hangs (-timeout)
# or runs away with memory (-rss_limit_mb). Usage: disk/fuzz/run.sh [SECONDS]
#
# cargo-fuzz needs nightly features: on a stable toolchain RUSTC_BOOTSTRAP=1 unlocks them.
# Installs cargo-fuzz (crates.io) when it is missing. Crash inputs are kept in
# disk/fuzz/artifacts/<target>/ for reproduction: cargo fuzz run <target> <file>. Inputs that
# once crashed a target live in disk/fuzz/regressions/<target>/ and seed every run.
set -euo pipefail

SECONDS_PER_TARGET=${1:-20}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$here/target}-fuzz}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "Installing cargo-fuzz ..."
    cargo install --locked cargo-fuzz
fi

TARGETS=(qcow2 vmdk vdi vhd vhdx parallels ova detect)
work=$(mktemp -d "${TMPDIR:-/tmp}/hutch-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Seeds: one small image per format, with data, zero and unallocated areas.
seeds=$work/seeds
mkdir -p "$seeds"
if command -v qemu-img >/dev/null && command -v qemu-io >/dev/null; then
    qemu-img create -q -f qcow2 "$seeds/base.qcow2" 1M
    qemu-io -c 'write -P 0x5a 0 64k' -c 'write -z 256k 64k' -c 'write -P 0x33 700k 4k' \
        "$seeds/base.qcow2" >/dev/null
    qemu-img convert -O raw "$seeds/base.qcow2" "$seeds/base.raw"
    qemu-img convert -O vmdk "$seeds/base.qcow2" "$seeds/sparse.vmdk"
    qemu-img convert -O vmdk -o subformat=streamOptimized "$seeds/base.qcow2" "$seeds/stream.vmdk"
    qemu-img convert -O vdi "$seeds/base.qcow2" "$seeds/base.vdi"
    qemu-img convert -O vpc "$seeds/base.qcow2" "$seeds/dynamic.vhd"
    qemu-img convert -O vpc -o subformat=fixed "$seeds/base.qcow2" "$seeds/fixed.vhd"
    qemu-img convert -O vhdx "$seeds/base.qcow2" "$seeds/base.vhdx"
    qemu-img convert -O parallels "$seeds/base.qcow2" "$seeds/base.parallels"
    qemu-img convert -c -O qcow2 "$seeds/base.qcow2" "$seeds/compressed.qcow2"
    if command -v python3 >/dev/null; then
        python3 - "$seeds" <<'PY'
import io, os, sys, tarfile
d = sys.argv[1]
ovf = b"""<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
<References><File ovf:id="f1" ovf:href="disk1.vmdk"/></References>
<DiskSection><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^20"/></DiskSection>
<VirtualSystem ovf:id="vm"><Name>seed</Name><VirtualHardwareSection>
<Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
<Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>256</rasd:VirtualQuantity></Item>
</VirtualHardwareSection></VirtualSystem></Envelope>"""
with tarfile.open(os.path.join(d, "seed.ova"), "w", format=tarfile.USTAR_FORMAT) as t:
    info = tarfile.TarInfo("seed.ovf"); info.size = len(ovf); t.addfile(info, io.BytesIO(ovf))
    t.add(os.path.join(d, "stream.vmdk"), arcname="disk1.vmdk")
PY
    fi
else
    echo "note: qemu-img not found; fuzzing from empty corpora"
fi

seed_for() {
    case $1 in
        qcow2) echo "$seeds"/*.qcow2 ;;
        vmdk) echo "$seeds"/*.vmdk ;;
        vdi) echo "$seeds"/*.vdi ;;
        vhd) echo "$seeds"/*.vhd ;;
        vhdx) echo "$seeds"/*.vhdx ;;
        parallels) echo "$seeds"/*.parallels ;;
        ova) echo "$seeds"/*.ova ;;
        detect) echo "$seeds"/* ;;
    esac
}

echo "Building ${#TARGETS[@]} fuzz targets ..."
cargo fuzz build

failed=()
for t in "${TARGETS[@]}"; do
    corpus=$work/corpus-$t
    mkdir -p "$corpus"
    for f in $(seed_for "$t") "$here"/regressions/"$t"/*; do
        if [ -f "$f" ]; then cp "$f" "$corpus/"; fi
    done
    echo "== $t (${SECONDS_PER_TARGET}s)"
    if ! cargo fuzz run "$t" "$corpus" -- -max_total_time="$SECONDS_PER_TARGET" \
        -timeout=10 -rss_limit_mb=2048 -max_len=1048576 -print_final_stats=1 \
        >"$work/$t.log" 2>&1; then
        echo "FAILED: $t (artifacts in $here/artifacts/$t)"
        grep -E "ERROR|panicked|SUMMARY|Test unit written" "$work/$t.log" | head -20 || true
        failed+=("$t")
    else
        grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$work/$t.log" | tail -1 || true
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: ${#failed[@]} target(s) crashed: ${failed[*]}"
    exit 1
fi
echo "fuzz: all ${#TARGETS[@]} targets ran ${SECONDS_PER_TARGET}s without a crash"
