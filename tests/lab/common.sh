# Shared helpers for the guest fixtures, the nested lab, the e2e harness and the benches.
# Sourced, never run. Sets REPO (the checkout root) and BUILD ($REPO/build).
# shellcheck shell=bash

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
BUILD=${BUILD:-$REPO/build}

die() {
    echo "error: $*" >&2
    exit 1
}

log() {
    echo "[$(date +%T)] $*" >&2
}

# Milliseconds since the epoch (GNU date on the host side).
now_ms() {
    date +%s%3N
}

# require_tools CMD... : fail with the package hint if a tool is missing.
require_tools() {
    local missing=()
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        die "missing tools: ${missing[*]} (run: $REPO/tests/lab/deps.sh)"
    fi
}

# A python3 from Debian's own package; stdlib only.
PYTHON=${PYTHON:-python3}
