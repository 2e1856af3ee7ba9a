#!/usr/bin/env bash
# Runs benches/snapshot-vs-qemu.sh inside the nested lab. Usage: benches/snapshot.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../tests/guest/build.sh"
out=$(cd "$here/.." && pwd)/build/bench-snapshot
mkdir -p "$out"
exec "$here/../tests/lab/lab.sh" --out "$out" -- "$here/snapshot-vs-qemu.sh" "$@"
