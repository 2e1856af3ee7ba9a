#!/usr/bin/env python3
"""A one-zone DNS responder for the network e2e tests (stdlib only, UDP).

It answers A queries for the names given with --answer NAME=IPV4, answers other query types
for those names with no records (NODATA: busybox nslookup also asks for AAAA), and REFUSES
every other name: it is not a resolver and forwards nothing. It binds a loopback address only
(THE NETWORK RULE: tests contact nothing but 127.0.0.0/8), and it stops by itself after
--max-seconds or --max-queries, so a forgotten responder cannot linger.

    dns-responder.py --answer web.hutch.test=10.0.2.2 [--listen 127.0.0.1] [--port 53]
                     [--log FILE] [--ready FILE] [--max-seconds 900] [--max-queries 1000]

--log gets one line per query: "NAME TYPE RCODE" (TYPE and RCODE as numbers). --ready is
written once the socket is bound.
"""

import argparse
import ipaddress
import socket
import struct
import sys
import time

TYPE_A = 1
CLASS_IN = 1
RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_REFUSED = 5
FLAG_QR = 0x8000
FLAG_AA = 0x0400
OPCODE_MASK = 0x7800
FLAG_RD = 0x0100
MAX_LABELS = 64


class Malformed(Exception):
    pass


def parse_question(packet):
    """Returns (id, flags, qname, qtype, qclass, end of the question) of a query."""
    if len(packet) < 12:
        raise Malformed("short header")
    qid, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if flags & FLAG_QR or qdcount != 1:
        raise Malformed("not a single-question query")
    labels, pos = [], 12
    while True:
        if pos >= len(packet) or len(labels) > MAX_LABELS:
            raise Malformed("name runs off the packet")
        n = packet[pos]
        pos += 1
        if n == 0:
            break
        if n & 0xC0 or pos + n > len(packet):
            raise Malformed("compressed or truncated label in a question")
        labels.append(packet[pos : pos + n].decode("ascii", "replace").lower())
        pos += n
    if pos + 4 > len(packet):
        raise Malformed("no type and class")
    qtype, qclass = struct.unpack("!HH", packet[pos : pos + 4])
    return qid, flags, ".".join(labels), qtype, qclass, pos + 4


def reply(packet, answers):
    """The response to one query packet, and (name, type, rcode) for the log."""
    try:
        qid, flags, name, qtype, qclass, end = parse_question(packet)
    except Malformed:
        if len(packet) < 2:
            return None, ("?", 0, RCODE_FORMERR)
        qid = struct.unpack("!H", packet[:2])[0]
        header = struct.pack("!HHHHHH", qid, FLAG_QR | RCODE_FORMERR, 0, 0, 0, 0)
        return header, ("?", 0, RCODE_FORMERR)
    question = packet[12:end]
    rd = flags & FLAG_RD
    opcode = flags & OPCODE_MASK
    addr = answers.get(name) if qclass == CLASS_IN and opcode == 0 else None
    if addr is None:
        header = struct.pack("!HHHHHH", qid, FLAG_QR | opcode | rd | RCODE_REFUSED, 1, 0, 0, 0)
        return header + question, (name, qtype, RCODE_REFUSED)
    records = b""
    if qtype == TYPE_A:
        # A pointer to the question's name (offset 12), IN A, TTL 60, 4 bytes.
        records = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 60, 4) + addr.packed
    header = struct.pack(
        "!HHHHHH", qid, FLAG_QR | FLAG_AA | rd | RCODE_NOERROR, 1, 1 if records else 0, 0, 0
    )
    return header + question + records, (name, qtype, RCODE_NOERROR)


def parse_answer(text):
    name, sep, addr = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=IPV4, got {text!r}")
    try:
        return name.rstrip(".").lower(), ipaddress.IPv4Address(addr)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answer", action="append", type=parse_answer, required=True)
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--log")
    ap.add_argument("--ready")
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--max-queries", type=int, default=1000)
    args = ap.parse_args()
    if not ipaddress.IPv4Address(args.listen).is_loopback:
        sys.exit(f"dns-responder: refusing to listen on {args.listen}: loopback only")
    answers = dict(args.answer)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.listen, args.port))
    log = open(args.log, "a", buffering=1) if args.log else None
    if args.ready:
        with open(args.ready, "w") as f:
            f.write(f"{args.listen}:{sock.getsockname()[1]}\n")
    deadline = time.monotonic() + args.max_seconds
    for _ in range(args.max_queries):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            packet, peer = sock.recvfrom(4096)
        except socket.timeout:
            break
        # Only loopback peers get an answer (they are the only ones there can be).
        if not ipaddress.ip_address(peer[0]).is_loopback:
            continue
        response, (name, qtype, rcode) = reply(packet, answers)
        if response is not None:
            sock.sendto(response, peer)
        if log:
            log.write(f"{name} {qtype} {rcode}\n")
    sock.close()


if __name__ == "__main__":
    main()
