#!/usr/bin/env bash
# Disk image conversion speed: `hutch disk convert` against `qemu-img convert`, same inputs,
# same file system, interleaved runs. Prints a table and the geometric mean of the ratios
# (hutch MB/s / qemu-img MB/s; target >= 1.5). No timed assertions: it always exits 0 unless
# a tool fails or an output differs from its source.
#
# Inputs (made with qemu-img and Python in a temporary directory on the same file system):
#   sparse: 2 GiB virtual, ~300 MiB of random data in 2 MiB pieces scattered over the disk;
#   full:   1 GiB of random data.
# each as VMDK (monolithicSparse), VDI and VHDX; each converted to qcow2 and to raw.
# MB/s = virtual size / wall time of "convert + sync" (the sync makes both tools pay for
# their writes, whatever cache mode they use). Median of BENCH_REPS runs (default 3). Page
# cache dropped before every run when /proc/sys/vm/drop_caches is writable (root), else noted.
# qemu-img runs with its defaults, as a user would type it. "CPU s" is the converter's user +
# system time (median), the sync excluded: what the conversion costs a laptop's battery, and a
# figure the storage's speed does not blur. On a disk, Hutch's figure includes starting the
# write-back of its output (it hints every 32 MiB and fsyncs before the rename, so that its
# progress bar means written), work that qemu-img's figure leaves to the final sync.
#
# Where the storage is slow (a virtual disk writing a few hundred MB/s), "convert + sync" is
# its write speed for both tools; BENCH_DIR=/dev/shm takes the storage out and measures the
# converters themselves (the case of a fast SSD). Needs ~8 GiB free there.
#
# Environment: HUTCH (default ${CARGO_TARGET_DIR:-target}/release/hutch), BENCH_REPS,
#   BENCH_DIR (where the temporary directory goes; default $TMPDIR or /tmp),
#   BENCH_QEMU_ARGS (extra qemu-img convert options, e.g. "-W -m 16").
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HUTCH=${HUTCH:-${CARGO_TARGET_DIR:-$REPO/target}/release/hutch}
REPS=${BENCH_REPS:-3}
QEMU_ARGS=${BENCH_QEMU_ARGS:-}

for tool in qemu-img python3; do
    command -v "$tool" >/dev/null || { echo "SKIP: $tool not found"; exit 0; }
done
[ -x "$HUTCH" ] || { echo "error: no hutch binary at $HUTCH (cargo build --release -p hutch)" >&2; exit 1; }

WORK=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/hutch-convert.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

drop_caches() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then
        echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    fi
}
FS=$(stat -f -c %T "$WORK")
if [ "$FS" = tmpfs ]; then
    # Nothing to drop or sync: what is measured is the converters themselves.
    CACHE_NOTE="files in memory (tmpfs): no storage in the way"
elif [ -w /proc/sys/vm/drop_caches ] && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
    CACHE_NOTE="files on $FS, page cache dropped before every run"
else
    CACHE_NOTE="files on $FS, page cache NOT dropped (not root): inputs are read from memory"
fi

echo "Making inputs in $WORK ..."
python3 - <<'EOF'
import random
r = random.Random(4)
size = 2 << 30
with open("sparse.raw", "wb") as f:
    f.truncate(size)
    piece = 2 << 20
    slots = sorted(r.sample(range(size // piece), 150))
    for s in slots:
        f.seek(s * piece)
        f.write(r.randbytes(piece))
with open("full.raw", "wb") as f:
    for _ in range(1024):
        f.write(r.randbytes(1 << 20))
EOF
for src in sparse full; do
    qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse "$src.raw" "$src.vmdk"
    qemu-img convert -f raw -O vdi "$src.raw" "$src.vdi"
    qemu-img convert -f raw -O vhdx "$src.raw" "$src.vhdx"
done

now() { date +%s.%N; }

# run TOOL IN_FMT IN OUT_FMT OUT -> "WALL CPU" seconds on stdout
run() {
    local tool=$1 in_fmt=$2 in=$3 out_fmt=$4 out=$5 t0 t1 cpu TIMEFORMAT='%3U %3S'
    rm -f "$out"
    drop_caches
    t0=$(now)
    if [ "$tool" = hutch ]; then
        cpu=$({ time "$HUTCH" disk convert --format "$out_fmt" "$in" "$out" >/dev/null 2>err.txt; } 2>&1) ||
            { cat err.txt >&2; return 1; }
    else
        # shellcheck disable=SC2086
        cpu=$({ time qemu-img convert $QEMU_ARGS -f "$in_fmt" -O "$out_fmt" "$in" "$out" 2>err.txt; } 2>&1) ||
            { cat err.txt >&2; return 1; }
    fi
    sync
    t1=$(now)
    echo "$t0 $t1 $cpu" | awk '{ printf "%.4f %.3f\n", $2 - $1, $3 + $4 }'
}

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

printf '%-8s %-5s %-6s %12s %12s %8s %12s %12s\n' input from to "hutch MB/s" "qemu MB/s" ratio "hutch CPU s" "qemu CPU s"
ratios=() h_cpu=0 q_cpu=0
for src in sparse full; do
    vsize=$(stat -c %s "$src.raw")
    for in_fmt in vmdk vdi vhdx; do
        for out_fmt in qcow2 raw; do
            h_times=() q_times=()
            for _ in $(seq "$REPS"); do
                h_times+=("$(run hutch "$in_fmt" "$src.$in_fmt" "$out_fmt" "out-h.$out_fmt")")
                q_times+=("$(run qemu "$in_fmt" "$src.$in_fmt" "$out_fmt" "out-q.$out_fmt")")
            done
            # Both outputs must hold exactly the source's bytes.
            for o in "out-h.$out_fmt" "out-q.$out_fmt"; do
                if ! qemu-img compare -q -f raw -F "$out_fmt" "$src.raw" "$o"; then
                    echo "error: $o differs from $src.raw" >&2
                    exit 1
                fi
            done
            h=$(printf '%s\n' "${h_times[@]}" | cut -d' ' -f1 | median)
            q=$(printf '%s\n' "${q_times[@]}" | cut -d' ' -f1 | median)
            hc=$(printf '%s\n' "${h_times[@]}" | cut -d' ' -f2 | median)
            qc=$(printf '%s\n' "${q_times[@]}" | cut -d' ' -f2 | median)
            read -r hm qm ratio < <(awk -v v="$vsize" -v h="$h" -v q="$q" \
                'BEGIN { hm = v / 1e6 / h; qm = v / 1e6 / q; printf "%.0f %.0f %.2f\n", hm, qm, hm / qm }')
            ratios+=("$ratio")
            h_cpu=$(awk -v a="$h_cpu" -v b="$hc" 'BEGIN { print a + b }')
            q_cpu=$(awk -v a="$q_cpu" -v b="$qc" 'BEGIN { print a + b }')
            printf '%-8s %-5s %-6s %12s %12s %8s %12s %12s\n' "$src" "$in_fmt" "$out_fmt" "$hm" "$qm" "$ratio" "$hc" "$qc"
            rm -f "out-h.$out_fmt" "out-q.$out_fmt"
        done
    done
done
geo=$(printf '%s\n' "${ratios[@]}" | awk '{ s += log($1) } END { printf "%.2f", exp(s / NR) }')
echo "geometric mean ratio (hutch/qemu-img): $geo (target >= 1.5)"
echo "CPU time over all cases: hutch $h_cpu s, qemu-img $q_cpu s"
echo "note: $CACHE_NOTE; median of $REPS runs; MB/s of virtual size; qemu-img $(qemu-img --version | head -1 | awk '{print $3}')${QEMU_ARGS:+ with $QEMU_ARGS}"
