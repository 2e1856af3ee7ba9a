#!/usr/bin/env bash
# The newcomer's path: tools/demo.sh as a user runs it in a real terminal. It runs under a
# pseudo-terminal (util-linux `script`), so the demo's interactive parts (the nested lab's
# QEMU reading the terminal, `hutch console` in raw mode) meet a tty as they would at a desk.
# Waits for the demo guest's shell prompt, types a command whose answer only the guest can
# compute, then `poweroff -f`, and expects the demo to end by itself with status 0.
# Without hardware virtualization this goes through the nested lab (a few minutes).
#
# Usage: tests/e2e/demo-pty.sh [LOG]    (LOG: the terminal transcript; default a temp file)
# Environment: DEMO_PTY_TIMEOUT (s, default 1200: build, fixtures and the lab's boot), DEMO_PROMPT_TIMEOUT
#   (s after the console attaches, default 300).
# Prints PASS/FAIL and "N passed, M failed" like tests/e2e/run.sh.
set -euo pipefail
. "$(dirname "$0")/../lab/common.sh"

NAME=demo_in_a_terminal_reaches_the_guest_shell_and_ends_on_poweroff
LIMIT=${DEMO_PTY_TIMEOUT:-1200}
PROMPT_LIMIT=${DEMO_PROMPT_TIMEOUT:-300}
ATTACHED="Attached to the demo VM's console"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hutch-demo-pty.XXXXXX")
LOG=${1:-$WORK/terminal.log}
DEMO_PID=

cleanup() {
    exec 3>&- 2>/dev/null || true
    if [ -n "$DEMO_PID" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
        # setsid made the demo's timeout the leader of its own process group: end the group;
        # script's pty then hangs up, which ends what runs on it (the lab's QEMU).
        kill -TERM -- "-$DEMO_PID" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-$DEMO_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK/fifo"
}
trap cleanup EXIT

result() {
    if [ "$1" = PASS ]; then
        echo "PASS $NAME ($2)"
        echo "1 passed, 0 failed"
        exit 0
    fi
    echo "FAIL $NAME: $2 (terminal transcript: $LOG)"
    tail -c 2000 "$LOG" | tr -d '\r' | sed 's/^/    | /' >&2
    echo "0 passed, 1 failed"
    exit 1
}

# Terminal control sequences out of a transcript: busybox's line editor asks the terminal for
# the cursor position (ESC [6n) after every prompt, which no one answers under `script`.
plain() {
    tr -d '\r' | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g'
}

# The transcript with the terminal's carriage returns and control sequences gone.
transcript() {
    plain <"$LOG"
}

# wait_for REGEX SECONDS [FROM_BYTE]: true once the transcript (from FROM_BYTE on) matches.
wait_for() {
    local regex=$1 deadline=$(($(date +%s) + $2)) from=${3:-0}
    while [ "$(date +%s)" -lt "$deadline" ]; do
        tail -c +"$((from + 1))" "$LOG" | plain | grep -qE "$regex" && return 0
        kill -0 "$DEMO_PID" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}

type_line() {
    printf '%s\r' "$1" >&3
}

main() {
    require_tools script setsid timeout
    mkfifo "$WORK/fifo"
    : >"$LOG"
    local t0=$SECONDS
    # The demo's own library (direct mode) and no window: this is the console path.
    env -u DISPLAY -u WAYLAND_DISPLAY HUTCH_HOME="$WORK/home" \
        setsid -w timeout -k 10 "$LIMIT" script -qfec "bash '$REPO/tools/demo.sh'" /dev/null \
        <"$WORK/fifo" >"$LOG" 2>&1 &
    DEMO_PID=$!
    # Held open for the whole run: an EOF on script's input would end the session early.
    exec 3>"$WORK/fifo"

    wait_for "$ATTACHED" "$LIMIT" ||
        result FAIL "the demo never attached to the VM's console (after $((SECONDS - t0)) s)"
    local attached_at
    attached_at=$(grep -boF "$ATTACHED" "$LOG" | tail -n 1 | cut -d: -f1)
    # busybox sh's prompt ends in "# "; an Enter brings a fresh one if it came before attaching.
    local tries=0
    until wait_for '# $|# *$' 15 "$attached_at"; do
        tries=$((tries + 1))
        [ $((tries * 15)) -lt "$PROMPT_LIMIT" ] && kill -0 "$DEMO_PID" 2>/dev/null ||
            result FAIL "no guest shell prompt within $PROMPT_LIMIT s of attaching"
        type_line ""
    done

    local a=$((RANDOM + 1000)) b=$((RANDOM + 1000))
    local answer="demo-$((a + b))-ok"
    type_line "echo demo-\$(($a + $b))-ok"
    wait_for "^$answer\$" 120 "$attached_at" ||
        result FAIL "the guest did not answer '$answer' to a typed command"
    type_line "poweroff -f"

    local rc=0
    wait "$DEMO_PID" || rc=$?
    DEMO_PID=
    local secs=$((SECONDS - t0))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        result FAIL "still running after $LIMIT s"
    elif [ "$rc" != 0 ]; then
        result FAIL "tools/demo.sh exited $rc after poweroff -f"
    fi
    transcript | grep -q "running Hutch inside the nested KVM lab\|VM 'demo' started" ||
        result FAIL "the transcript does not show the demo VM starting"
    result PASS "guest answered $answer; demo ended after $secs s"
}

main "$@"
