#!/usr/bin/env bash
# Runs benches/snapshot-vs-qemu.sh inside the nested lab. Usage: benches/snapshot.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../tests/guest/build.sh"
out=$(cd "$here/.." && pwd)/build/bench-snapshot
mkdir -p "$out"
# Each repetition boots and fills two 1 GiB guests under emulation (~15 min): 3 need time.
export LAB_TIMEOUT=${LAB_TIMEOUT:-5400}
exec "$here/../tests/lab/lab.sh" --out "$out" -- "$here/snapshot-vs-qemu.sh" "$@"
