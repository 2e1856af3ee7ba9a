#!/usr/bin/env bash
# Runs benches/boot-vs-qemu.sh inside the nested lab. Usage: benches/run.sh
# The serial log of the run is kept in build/bench/lab-serial.log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../tests/guest/build.sh"
exec "$here/../tests/lab/lab.sh" --out "$here/../build/bench" -- "$here/boot-vs-qemu.sh" "$@"
