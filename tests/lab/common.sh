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

# tcp_listening PORT [SECS]: something listens on 127.0.0.1:PORT (TCP; /proc/net/tcp, state
# 0A), waiting at most SECS (default 30; 0: only now). False when nothing does.
tcp_listening() {
    local hex i
    hex=$(printf '0100007F:%04X 00000000:0000 0A' "$1")
    for i in $(seq 0 $((${2:-30} * 5))); do
        grep -q "$hex" /proc/net/tcp && return 0
        [ "$i" = $((${2:-30} * 5)) ] || sleep 0.2
    done
    return 1
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

# package_versions PKG... : "package PKG VERSION" per installed package (a fixture's stamp
# lines); a package that is not installed is fatal.
package_versions() {
    local p v
    for p in "$@"; do
        v=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null) || die "package $p is not installed"
        echo "package $p $v"
    done
}
