#!/usr/bin/env python3
"""Small kernel helpers for the guest fixtures (stdlib only).

  modorder MODDIR NAME...      print the .ko paths (relative to MODDIR) to insmod, dependencies
                               first, from MODDIR/modules.dep; built-in names are skipped
  extract-vmlinux BZIMAGE OUT  write the uncompressed ELF kernel inside a bzImage
  pvh-note ELF                 print the PVH entry (Xen ELF note 18); exit 1 if there is none
"""

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
import sys
import zlib


def norm(name):
    return name.replace("-", "_")


def modname(path):
    base = os.path.basename(path)
    for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(ext):
            return norm(base[: -len(ext)])
    return norm(base)


def modorder(moddir, names):
    deps = {}
    paths = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            if ":" not in line:
                continue
            mod, rest = line.split(":", 1)
            n = modname(mod)
            paths[n] = mod
            deps[n] = [modname(d) for d in rest.split()]
    builtin = set()
    bpath = os.path.join(moddir, "modules.builtin")
    if os.path.exists(bpath):
        with open(bpath) as f:
            builtin = {modname(line.strip()) for line in f if line.strip()}

    order = []
    seen = set()

    def visit(n, stack):
        if n in seen:
            return
        if n in stack:
            raise SystemExit(f"modorder: dependency loop at {n}")
        for d in deps[n]:
            visit(d, stack | {n})
        seen.add(n)
        order.append(paths[n])

    for raw in names:
        n = norm(raw)
        if n in deps:
            visit(n, set())
        elif n in builtin:
            print(f"modorder: {raw} is built in", file=sys.stderr)
        else:
            raise SystemExit(f"modorder: no module or built-in named {raw}")
    for p in order:
        print(p)


ELF_MAGIC = b"\x7fELF"
# Compressed payload magics, as scripts/extract-vmlinux looks for them.
MAGICS = [
    (b"\x1f\x8b\x08", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
]


def decompress(kind, blob):
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(blob)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(blob)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(blob)
    tool = {"zstd": ["zstd", "-dc"], "lz4": ["lz4", "-dc"], "lzo": ["lzop", "-dc"]}[kind]
    if not shutil.which(tool[0]):
        raise ValueError(f"{tool[0]} not installed")
    r = subprocess.run(tool, input=blob, capture_output=True)
    return r.stdout


def extract_vmlinux(src, dst):
    data = open(src, "rb").read()
    candidates = []
    # Prefer the payload the boot header points at (boot protocol >= 2.08).
    if len(data) > 0x250 and data[0x202:0x206] == b"HdrS":
        setup_sects = data[0x1F1] or 4
        pm_start = (setup_sects + 1) * 512
        off, length = struct.unpack_from("<II", data, 0x248)
        if length:
            candidates.append(pm_start + off)
    for magic, _ in MAGICS:
        i = data.find(magic)
        while i != -1:
            candidates.append(i)
            i = data.find(magic, i + 1)
    for pos in candidates:
        for magic, kind in MAGICS:
            if not data.startswith(magic, pos):
                continue
            try:
                out = decompress(kind, data[pos:])
            except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):
                continue
            if out[:4] == ELF_MAGIC:
                with open(dst, "wb") as f:
                    f.write(out)
                print(f"extract-vmlinux: {kind} payload at offset {pos}, {len(out)} bytes")
                return
    raise SystemExit(f"extract-vmlinux: no compressed ELF kernel found in {src}")


def iter_notes(blob):
    off = 0
    while off + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
        off += 12
        name = blob[off : off + namesz].rstrip(b"\0")
        off += (namesz + 3) & ~3
        desc = blob[off : off + descsz]
        off += (descsz + 3) & ~3
        yield name, ntype, desc


def pvh_note(path):
    data = open(path, "rb").read()
    if data[:4] != ELF_MAGIC or data[4] != 2:
        raise SystemExit(f"pvh-note: {path} is not a 64-bit ELF")
    e_phoff = struct.unpack_from("<Q", data, 0x20)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        for name, ntype, desc in iter_notes(data[p_offset : p_offset + p_filesz]):
            if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                entry = struct.unpack_from("<I" if len(desc) == 4 else "<Q", desc)[0]
                print(f"pvh-entry=0x{entry:x}")
                return 0
    print("pvh-entry=none")
    return 1


def main(argv):
    if len(argv) >= 3 and argv[1] == "modorder":
        modorder(argv[2], argv[3:])
        return 0
    if len(argv) == 4 and argv[1] == "extract-vmlinux":
        extract_vmlinux(argv[2], argv[3])
        return 0
    if len(argv) == 3 and argv[1] == "pvh-note":
        return pvh_note(argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
