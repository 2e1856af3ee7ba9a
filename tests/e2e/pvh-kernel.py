#!/usr/bin/env python3
"""Writes a tiny PVH "kernel": an ELF64 with a Xen PHYS32_ENTRY note, entered in 32-bit
protected mode with paging off, its code loaded at 1 MiB.

  crash    loads an empty IDT and executes ud2 (#UD -> #GP -> #DF -> shutdown): a triple fault.
  counter  counts forever: adds one to a dword in its own page, prints it on COM1 as eight hex
           digits and a newline, spins a while, repeats. Enough guest for the emulating /dev/kvm
           of a CI host, and its RAM says how far it got (a restored snapshot counts on from
           the snapshot's value). It has a 32-bit PVH entry and, as its ELF entry, the same loop
           in 64-bit code: Hutch enters a machine with a display through the 64-bit entry (PVH's
           start info cannot describe a framebuffer).

Usage: pvh-kernel.py crash|counter OUT [SPIN]   (SPIN: counter's delay loop count, default 0x40000)
"""
import struct
import sys

LOAD_ADDR = 0x100000
CODE_OFFSET = 0x1000
XEN_ELFNOTE_PHYS32_ENTRY = 18


def crash():
    idtr_addr = LOAD_ADDR + 0x10
    code = b"\x0f\x01\x1d" + struct.pack("<I", idtr_addr)  # lidt [idtr_addr]
    code += b"\x0f\x0b"  # ud2
    return code.ljust(0x10, b"\x90") + bytes(6)  # the IDTR: limit 0, base 0


def counter(spin):
    count = LOAD_ADDR + 0x800
    digits = LOAD_ADDR + 0x810
    code32 = (
        b"\xff\x05" + struct.pack("<I", count)  # 0x00 top: inc dword [count]
        + b"\xa1" + struct.pack("<I", count)  # 0x06 mov eax, [count]
        + b"\x66\xba\xf8\x03"  # 0x0b mov dx, 0x3f8
        + b"\xb9\x08\x00\x00\x00"  # 0x0f mov ecx, 8
        + b"\xc1\xc0\x04"  # 0x14 digit: rol eax, 4
        + b"\x89\xc3"  # 0x17 mov ebx, eax
        + b"\x83\xe3\x0f"  # 0x19 and ebx, 15
        + b"\x8a\x9b" + struct.pack("<I", digits)  # 0x1c mov bl, [digits + ebx]
        + b"\x93\xee\x93"  # 0x22 xchg eax, ebx; out dx, al; xchg eax, ebx
        + b"\x49\x75\xec"  # 0x25 dec ecx; jnz digit
        + b"\xb0\x0a\xee"  # 0x28 mov al, 10; out dx, al
        + b"\xb9" + struct.pack("<I", spin)  # 0x2b mov ecx, spin
        + b"\x49\x75\xfd"  # 0x30 spin: dec ecx; jnz spin
        + b"\xeb\xcb"  # 0x33 jmp top
    )
    # The same loop in 64-bit code at +0x100 (RIP-relative: count and digits are 0x700 and
    # 0x710 bytes past its start).
    code64 = (
        b"\xff\x05\xfa\x06\x00\x00"  # 0x00 top: inc dword [rip + count]
        + b"\x8b\x05\xf4\x06\x00\x00"  # 0x06 mov eax, [rip + count]
        + b"\x66\xba\xf8\x03"  # 0x0c mov dx, 0x3f8
        + b"\xb9\x08\x00\x00\x00"  # 0x10 mov ecx, 8
        + b"\x48\x8d\x35\xf4\x06\x00\x00"  # 0x15 lea rsi, [rip + digits]
        + b"\xc1\xc0\x04"  # 0x1c digit: rol eax, 4
        + b"\x89\xc3"  # 0x1f mov ebx, eax
        + b"\x83\xe3\x0f"  # 0x21 and ebx, 15
        + b"\x8a\x1c\x1e"  # 0x24 mov bl, [rsi + rbx]
        + b"\x93\xee\x93"  # 0x27 xchg eax, ebx; out dx, al; xchg eax, ebx
        + b"\xff\xc9\x75\xee"  # 0x2a dec ecx; jnz digit
        + b"\xb0\x0a\xee"  # 0x2e mov al, 10; out dx, al
        + b"\xb9" + struct.pack("<I", spin)  # 0x31 mov ecx, spin
        + b"\xff\xc9\x75\xfc"  # 0x36 spin: dec ecx; jnz spin
        + b"\xeb\xc4"  # 0x3a jmp top
    )
    image = code32.ljust(0x100, b"\x90") + code64
    return image.ljust(count - LOAD_ADDR, b"\x90") + bytes(16) + b"0123456789abcdef"


def write_elf(out, image, entry):
    note = struct.pack("<III", 4, 8, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
    note += struct.pack("<Q", LOAD_ADDR)
    note_offset = 64 + 2 * 56
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    # One read-write-execute segment: the counter keeps its count next to its code.
    load = struct.pack("<IIQQQQQQ", 1, 7, CODE_OFFSET, LOAD_ADDR, LOAD_ADDR, len(image),
                       len(image), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(note), len(note), 4)
    with open(out, "wb") as f:
        f.write((ehdr + load + pnote + note).ljust(CODE_OFFSET, b"\0") + image)


def main(argv):
    if len(argv) < 3 or argv[1] not in ("crash", "counter"):
        sys.exit(__doc__)
    if argv[1] == "crash":
        write_elf(argv[2], crash(), LOAD_ADDR)
    else:
        spin = int(argv[3], 0) if len(argv) > 3 else 0x40000
        write_elf(argv[2], counter(spin), LOAD_ADDR + 0x100)


if __name__ == "__main__":
    main(sys.argv)
