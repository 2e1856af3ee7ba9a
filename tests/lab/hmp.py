#!/usr/bin/env python3
"""Runs QEMU human-monitor commands over the lab's monitor socket and prints their output.

Usage: hmp.py SOCKET COMMAND...   (each COMMAND one monitor line, e.g. "info lapic")
Exit 0 when every command got its prompt back, 1 otherwise. Bounded: 5 s per reply.
"""

import socket
import sys

PROMPT = b"(qemu) "
REPLY_TIMEOUT_S = 5.0


def read_to_prompt(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(PROMPT):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the monitor closed the connection")
        data += chunk
    return data[: -len(PROMPT)]


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, commands = sys.argv[1], sys.argv[2:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(REPLY_TIMEOUT_S)
            sock.connect(path)
            read_to_prompt(sock)  # the banner
            for command in commands:
                sock.sendall(command.encode() + b"\n")
                reply = read_to_prompt(sock).decode(errors="replace")
                # The monitor echoes the command line first (with terminal escapes).
                lines = reply.replace("\r", "").split("\n")[1:]
                print(f"--- {command}")
                print("\n".join(line for line in lines if line.strip()))
    except (OSError, ConnectionError) as e:
        print(f"hmp: {path}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
