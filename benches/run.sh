#!/usr/bin/env bash
# Runs benches/boot-vs-qemu.sh inside the nested lab. Usage: benches/run.sh
# The serial log of the run is kept in build/bench/lab-serial.log, the boot logs in build/bench/logs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../tests/guest/build.sh"
out=$(cd "$here/.." && pwd)/build/bench
mkdir -p "$out"
BENCH_LOGS=$out/logs exec "$here/../tests/lab/lab.sh" --out "$out" -- "$here/boot-vs-qemu.sh" "$@"
