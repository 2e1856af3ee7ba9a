#!/usr/bin/env python3
"""Writes a tiny PVH "kernel" (ELF64 with a Xen PHYS32_ENTRY note) that triple-faults at once:
it loads an empty IDT and executes ud2 (#UD -> #GP -> #DF -> shutdown).

Usage: crashing-kernel.py OUT
"""
import struct
import sys

LOAD_ADDR = 0x100000
CODE_OFFSET = 0x1000
XEN_ELFNOTE_PHYS32_ENTRY = 18


def main(out):
    idtr_addr = LOAD_ADDR + 0x10
    code = b"\x0f\x01\x1d" + struct.pack("<I", idtr_addr)  # lidt [idtr_addr]
    code += b"\x0f\x0b"  # ud2
    code = code.ljust(0x10, b"\x90") + bytes(6)  # the IDTR: limit 0, base 0
    note = struct.pack("<III", 4, 8, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
    note += struct.pack("<Q", LOAD_ADDR)
    note_offset = 64 + 2 * 56
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, LOAD_ADDR, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, CODE_OFFSET, LOAD_ADDR, LOAD_ADDR, len(code), len(code),
                       0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(note), len(note), 4)
    image = (ehdr + load + pnote + note).ljust(CODE_OFFSET, b"\0") + code
    with open(out, "wb") as f:
        f.write(image)


if __name__ == "__main__":
    main(sys.argv[1])
