#!/usr/bin/env bash
# Runs Hutch's whole test suite on a fresh Debian/Ubuntu machine (as root, for apt-get):
# system packages, lints, unit and backend-conformance tests, guest fixtures, the host-KVM
# check, and the end-to-end tests against a real Linux guest in the nested KVM lab.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }

step "system packages"
bash tests/lab/deps.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build (release)"
cargo build --release --locked -p hutch

mkdir -p build
step "unit, integration and backend conformance tests"
cargo test --workspace --locked --release 2>&1 | tee build/cargo-test.log
# A test that could not find its prerequisite (/dev/kvm, iasl) says SKIP; in CI that is a failure.
if [ "${CI:-}" = true ] && grep -q "SKIP" build/cargo-test.log; then
    echo "tests were skipped in CI:" >&2
    grep "SKIP" build/cargo-test.log >&2
    exit 1
fi

step "disk image parsers: fuzzing (each target briefly)"
FUZZ_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}/fuzz" bash disk/fuzz/run.sh "${FUZZ_SECONDS:-10}"

step "GUI under Xvfb (library, create dialog, VM view, capture and release; drag and drop import; snapshot keys on a running guest)"
bash tests/gui/smoke.sh "$REPO/build/gui-smoke"
bash tests/gui/dnd.sh "$REPO/build/gui-dnd"
bash tests/gui/snapshot-keys.sh "$REPO/build/gui-snapshot-keys"

step "old snapshots (format v1) restore: counter fixture on the host's /dev/kvm"
HUTCH="${CARGO_TARGET_DIR:-$REPO/target}/release/hutch" bash tests/e2e/snapshot-v1.sh

step "guest fixtures"
bash tests/guest/build.sh

step "host /dev/kvm: a real kernel fails with a clear error"
HUTCH="${CARGO_TARGET_DIR:-$REPO/target}/release/hutch" bash tests/e2e/host-kvm.sh

step "end-to-end tests in the nested KVM lab"
mkdir -p build/e2e
E2E_LOGS="$REPO/build/e2e" \
    bash tests/lab/lab.sh --out "$REPO/build/e2e" -- bash tests/e2e/run.sh
