//! A small ACPI Machine Language (AML) encoder: just the objects the Hutch DSDT needs (names,
//! integers, strings, packages, buffers, scopes, devices) and the resource descriptors of a
//! `ResourceTemplate`. Encodings follow ACPI 6.x chapter 20 (AML) and 6.4 (resource data).
//!
//! Each function returns the encoded bytes of one term; callers nest them by concatenation.
//! Inputs are our own constants, never guest data.

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const STRING_PREFIX: u8 = 0x0d;
const QWORD_PREFIX: u8 = 0x0e;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const ONES_OP: u8 = 0xff;
const ROOT_CHAR: u8 = b'\\';
const PARENT_PREFIX: u8 = b'^';
const DUAL_NAME_PREFIX: u8 = 0x2e;
const MULTI_NAME_PREFIX: u8 = 0x2f;
const NULL_NAME: u8 = 0x00;

/// Encodes a PkgLength for `content_len` bytes that follow it. The length counts itself, so
/// the number of length bytes (1..=4) is chosen first.
pub fn pkg_length(content_len: usize) -> Vec<u8> {
    if content_len + 1 < 0x40 {
        return vec![(content_len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = content_len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut out = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            out.extend((0..extra).map(|i| (total >> (4 + 8 * i)) as u8));
            return out;
        }
    }
    // 2^28 bytes of AML: far beyond anything a table region can hold.
    panic!("AML package of {content_len} bytes is too large to encode");
}

/// Encodes a NameString: `\` and `^` prefixes, then dot-separated segments of up to four
/// characters, padded with `_` (e.g. `\_SB.PCI0`).
pub fn name_string(path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = path;
    if let Some(stripped) = rest.strip_prefix('\\') {
        out.push(ROOT_CHAR);
        rest = stripped;
    }
    while let Some(stripped) = rest.strip_prefix('^') {
        out.push(PARENT_PREFIX);
        rest = stripped;
    }
    let segments: Vec<[u8; 4]> =
        if rest.is_empty() { Vec::new() } else { rest.split('.').map(name_seg).collect() };
    match segments.len() {
        0 => out.push(NULL_NAME),
        1 => {}
        2 => out.push(DUAL_NAME_PREFIX),
        n => out.extend([MULTI_NAME_PREFIX, n as u8]),
    }
    for seg in segments {
        out.extend(seg);
    }
    out
}

fn name_seg(seg: &str) -> [u8; 4] {
    assert!(
        (1..=4).contains(&seg.len())
            && seg.bytes().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
            && !seg.as_bytes()[0].is_ascii_digit(),
        "invalid AML name segment {seg:?}"
    );
    let mut out = [b'_'; 4];
    out[..seg.len()].copy_from_slice(seg.as_bytes());
    out
}

/// Encodes an integer in its shortest form.
pub fn integer(value: u64) -> Vec<u8> {
    match value {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        u64::MAX => vec![ONES_OP],
        v if v <= 0xff => vec![BYTE_PREFIX, v as u8],
        v if v <= 0xffff => {
            let mut out = vec![WORD_PREFIX];
            out.extend((v as u16).to_le_bytes());
            out
        }
        v if v <= 0xffff_ffff => dword(v as u32),
        v => {
            let mut out = vec![QWORD_PREFIX];
            out.extend(v.to_le_bytes());
            out
        }
    }
}

/// A DWordConst, whatever the value (what `EisaId` compiles to).
fn dword(value: u32) -> Vec<u8> {
    let mut out = vec![DWORD_PREFIX];
    out.extend(value.to_le_bytes());
    out
}

/// Encodes an ASCII string constant.
pub fn string(s: &str) -> Vec<u8> {
    assert!(s.is_ascii() && !s.contains('\0'), "invalid AML string {s:?}");
    let mut out = vec![STRING_PREFIX];
    out.extend(s.as_bytes());
    out.push(0);
    out
}

/// `EisaId("PNP0A08")`: three letters of 5 bits each and four hex digits, as a DWordConst.
pub fn eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    assert!(
        b.len() == 7
            && b[..3].iter().all(u8::is_ascii_uppercase)
            && b[3..].iter().all(u8::is_ascii_hexdigit),
        "invalid EISA id {id:?}"
    );
    let letters = b[..3].iter().fold(0u16, |acc, &c| (acc << 5) | u16::from(c - b'@'));
    let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
    let bytes = [
        (letters >> 8) as u8,
        letters as u8,
        (hex(b[3]) << 4) | hex(b[4]),
        (hex(b[5]) << 4) | hex(b[6]),
    ];
    dword(u32::from_le_bytes(bytes))
}

/// `Name(path, object)`.
pub fn name(path: &str, object: &[u8]) -> Vec<u8> {
    let mut out = vec![NAME_OP];
    out.extend(name_string(path));
    out.extend(object);
    out
}

/// `Package() { elements }`.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    assert!(elements.len() <= 0xff, "AML package with more than 255 elements");
    let mut body = vec![elements.len() as u8];
    for e in elements {
        body.extend(e);
    }
    op_with_length(&[PACKAGE_OP], &body)
}

/// `Buffer() { bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut body = integer(bytes.len() as u64);
    body.extend(bytes);
    op_with_length(&[BUFFER_OP], &body)
}

/// `Scope(path) { terms }`.
pub fn scope(path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    named_block(&[SCOPE_OP], path, terms)
}

/// `Device(path) { terms }`.
pub fn device(path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    named_block(&[EXT_OP_PREFIX, DEVICE_OP], path, terms)
}

fn named_block(op: &[u8], path: &str, terms: &[Vec<u8>]) -> Vec<u8> {
    let mut body = name_string(path);
    for t in terms {
        body.extend(t);
    }
    op_with_length(op, &body)
}

fn op_with_length(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(body.len()));
    out.extend(body);
    out
}

/// Resource descriptors for `_CRS` buffers (ACPI 6.x section 6.4).
pub mod resource {
    const IO_TAG: u8 = 0x47; // small item 0x08, length 7
    const IRQ_NO_FLAGS_TAG: u8 = 0x22; // small item 0x04, length 2
    const END_TAG: u8 = 0x79; // small item 0x0f, length 1
    const MEMORY32_FIXED_TAG: u8 = 0x86;
    const DWORD_ADDRESS_TAG: u8 = 0x87;
    const WORD_ADDRESS_TAG: u8 = 0x88;
    const QWORD_ADDRESS_TAG: u8 = 0x8a;

    const SPACE_MEMORY: u8 = 0;
    const SPACE_IO: u8 = 1;
    const SPACE_BUS: u8 = 2;
    /// General flags: producer, positive decode, minimum and maximum fixed.
    const PRODUCER_MIN_MAX_FIXED: u8 = 0x0c;
    /// I/O specific flags: decodes both ISA and non-ISA ranges.
    const IO_ENTIRE_RANGE: u8 = 0x03;
    /// Memory specific flags: read/write, non-cacheable.
    const MEM_RW_NON_CACHEABLE: u8 = 0x01;

    /// `IO(Decode16, min, max, align, len)`.
    pub fn io(min: u16, max: u16, align: u8, len: u8) -> Vec<u8> {
        let mut out = vec![IO_TAG, 0x01];
        out.extend(min.to_le_bytes());
        out.extend(max.to_le_bytes());
        out.extend([align, len]);
        out
    }

    /// `IRQNoFlags() { irq }`: edge-triggered, active-high, exclusive.
    pub fn irq_no_flags(irq: u8) -> Vec<u8> {
        assert!(irq < 16, "ISA IRQ {irq} out of range");
        let mut out = vec![IRQ_NO_FLAGS_TAG];
        out.extend((1u16 << irq).to_le_bytes());
        out
    }

    /// `Memory32Fixed(ReadWrite, base, len)`.
    pub fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
        let mut out = vec![MEMORY32_FIXED_TAG, 9, 0, 0x01];
        out.extend(base.to_le_bytes());
        out.extend(len.to_le_bytes());
        out
    }

    fn word_address(space: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
        let mut out = vec![WORD_ADDRESS_TAG, 13, 0, space, PRODUCER_MIN_MAX_FIXED, type_flags];
        let len = u32::from(max) - u32::from(min) + 1;
        // A 64 KiB range does not fit the 16-bit length field; 0 is what iasl emits then too.
        for v in [0, min, max, 0, len as u16] {
            out.extend(v.to_le_bytes());
        }
        out
    }

    /// `WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len)`.
    pub fn word_bus_number(min: u16, max: u16) -> Vec<u8> {
        word_address(SPACE_BUS, 0, min, max)
    }

    /// `WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0,
    /// len)`.
    pub fn word_io(min: u16, max: u16) -> Vec<u8> {
        word_address(SPACE_IO, IO_ENTIRE_RANGE, min, max)
    }

    /// `DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
    /// 0, min, max, 0, len)`.
    pub fn dword_memory(min: u32, max: u32) -> Vec<u8> {
        let mut out = vec![
            DWORD_ADDRESS_TAG,
            23,
            0,
            SPACE_MEMORY,
            PRODUCER_MIN_MAX_FIXED,
            MEM_RW_NON_CACHEABLE,
        ];
        for v in [0, min, max, 0, max - min + 1] {
            out.extend(v.to_le_bytes());
        }
        out
    }

    /// `QWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
    /// 0, min, max, 0, len)`: a window above 4 GiB.
    pub fn qword_memory(min: u64, max: u64) -> Vec<u8> {
        let mut out = vec![
            QWORD_ADDRESS_TAG,
            43,
            0,
            SPACE_MEMORY,
            PRODUCER_MIN_MAX_FIXED,
            MEM_RW_NON_CACHEABLE,
        ];
        for v in [0, min, max, 0, max - min + 1] {
            out.extend(v.to_le_bytes());
        }
        out
    }

    /// `ResourceTemplate() { descriptors }`: a buffer ending with the end tag.
    pub fn template(descriptors: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes: Vec<u8> = descriptors.concat();
        // Checksum 0: "the resource data is treated as if the checksum operation succeeded".
        bytes.extend([END_TAG, 0]);
        super::buffer(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkg_length_picks_the_shortest_encoding_that_counts_itself() {
        assert_eq!(pkg_length(0), vec![0x01]);
        assert_eq!(pkg_length(0x3e), vec![0x3f]);
        // 0x3f + 1 = 0x40 needs two bytes: total 0x41.
        assert_eq!(pkg_length(0x3f), vec![0x41, 0x04]);
        assert_eq!(pkg_length(0xffd), vec![0x4f, 0xff]);
        // 0xffe + 2 = 0x1000 does not fit 12 bits: three bytes, total 0x1001.
        assert_eq!(pkg_length(0xffe), vec![0x81, 0x00, 0x01]);
        assert_eq!(pkg_length(0x10_0000), vec![0xc4, 0x00, 0x00, 0x01]);
    }

    #[test]
    fn name_strings_use_root_dual_and_multi_prefixes() {
        assert_eq!(name_string("_S5"), b"_S5_".to_vec());
        assert_eq!(name_string("\\_SB"), b"\\_SB_".to_vec());
        assert_eq!(name_string("\\_SB.PCI0"), b"\\\x2e_SB_PCI0".to_vec());
        assert_eq!(name_string("_SB.PCI0.ISA"), b"\x2f\x03_SB_PCI0ISA_".to_vec());
        assert_eq!(name_string("^^FOO"), b"^^FOO_".to_vec());
        assert_eq!(name_string("\\"), vec![b'\\', 0]);
    }

    #[test]
    fn integers_use_the_shortest_prefix() {
        assert_eq!(integer(0), vec![0x00]);
        assert_eq!(integer(1), vec![0x01]);
        assert_eq!(integer(5), vec![0x0a, 5]);
        assert_eq!(integer(0x3f8), vec![0x0b, 0xf8, 0x03]);
        assert_eq!(integer(0xc000_0000), vec![0x0c, 0, 0, 0, 0xc0]);
        assert_eq!(integer(1 << 32), vec![0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(integer(u64::MAX), vec![0xff]);
    }

    #[test]
    fn eisa_ids_compress_like_iasl() {
        // iasl: EisaId("PNP0A03") == 0x030AD041.
        assert_eq!(eisa_id("PNP0A03"), vec![0x0c, 0x41, 0xd0, 0x0a, 0x03]);
        assert_eq!(eisa_id("PNP0501"), vec![0x0c, 0x41, 0xd0, 0x05, 0x01]);
    }

    #[test]
    fn s5_package_encodes_as_iasl_does() {
        let s5 = name("_S5", &package(&[integer(5), integer(5), integer(0), integer(0)]));
        assert_eq!(s5, b"\x08_S5_\x12\x08\x04\x0a\x05\x0a\x05\x00\x00".to_vec());
    }

    #[test]
    fn device_and_scope_wrap_their_terms() {
        let dev = device("COM1", &[name("_UID", &integer(1))]);
        assert_eq!(dev, b"\x5b\x82\x0bCOM1\x08_UID\x01".to_vec());
        let sc = scope("\\_SB", &[]);
        assert_eq!(sc, b"\x10\x06\\_SB_".to_vec());
        assert_eq!(string("ab"), b"\x0dab\x00".to_vec());
    }

    #[test]
    fn resource_templates_end_with_the_end_tag() {
        let crs =
            resource::template(&[resource::io(0x3f8, 0x3f8, 0, 8), resource::irq_no_flags(4)]);
        let expected: &[u8] = &[
            0x11, 0x10, 0x0a, 0x0d, // Buffer, PkgLength, size 13
            0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08, // IO
            0x22, 0x10, 0x00, // IRQNoFlags {4}
            0x79, 0x00, // end tag
        ];
        assert_eq!(crs, expected);
    }

    #[test]
    fn address_descriptors_carry_their_ranges() {
        let io = resource::word_io(0x0d00, 0xffff);
        assert_eq!(io.len(), 16);
        assert_eq!(&io[..6], &[0x88, 13, 0, 1, 0x0c, 0x03]);
        assert_eq!(&io[8..12], &[0x00, 0x0d, 0xff, 0xff]);
        assert_eq!(&io[14..16], &0xf300u16.to_le_bytes());
        let mem = resource::dword_memory(0xc000_0000, 0xdfff_ffff);
        assert_eq!(mem.len(), 26);
        assert_eq!(&mem[22..26], &0x2000_0000u32.to_le_bytes());
        let fixed = resource::memory32_fixed(0xe000_0000, 0x10_0000);
        assert_eq!(fixed, vec![0x86, 9, 0, 1, 0, 0, 0, 0xe0, 0, 0, 0x10, 0]);
    }
}
