//! The VMDK descriptor: the text naming the disk's extents and its parent.
//!
//! ```text
//!   # Disk DescriptorFile            comments start with '#'
//!   version=1                        key=value, value optionally "quoted"
//!   CID=fffffffe / parentCID=ffffffff / createType="monolithicSparse"
//!   parentFileNameHint="base.vmdk"
//!   RW 4192256 SPARSE "disk-s001.vmdk"       access, size in sectors, type, file
//!   RW 4192256 FLAT "disk-flat.vmdk" 0       ... and a start sector for flat extents
//!   RW 2048 ZERO
//! ```

use crate::DiskErrorKind;

/// A descriptor problem: what, and the byte offset of the offending line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    pub kind: DiskErrorKind,
    pub op: &'static str,
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExtentType {
    Flat,
    Sparse,
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExtentLine {
    pub sectors: u64,
    pub kind: ExtentType,
    pub file: Option<String>,
    /// Start sector inside a flat extent's file.
    pub start: u64,
    /// Byte offset of the line in the descriptor.
    pub offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub cid: Option<u32>,
    pub parent_cid: Option<u32>,
    pub create_type: Option<String>,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
}

/// No descriptor has anywhere near this many extents (2 TiB in 2 GiB pieces is 1024).
const MAX_EXTENTS: usize = 16 * 1024;
/// The parent CID value meaning "no parent".
pub(crate) const NO_PARENT: u32 = 0xffff_ffff;

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

/// Splits an extent line into words, a quoted word keeping its spaces.
fn words(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        if let Some(q) = rest.strip_prefix('"') {
            let end = q.find('"').unwrap_or(q.len());
            out.push(&q[..end]);
            rest = q.get(end + 1..).unwrap_or("").trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            out.push(&rest[..end]);
            rest = rest[end..].trim_start();
        }
    }
    out
}

/// Parses descriptor text (NULs, as padding an embedded descriptor, end it).
pub(crate) fn parse(bytes: &[u8]) -> Result<Descriptor, ParseError> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..end]);
    let mut d = Descriptor::default();
    let mut line_start = 0u64;
    for raw in text.split('\n') {
        let offset = line_start;
        line_start += raw.len() as u64 + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |kind, op| ParseError { kind, op, offset };
        let w = words(line);
        let access = w.first().map(|a| a.to_ascii_uppercase()).unwrap_or_default();
        if matches!(access.as_str(), "RW" | "RDONLY" | "NOACCESS") && w.len() >= 3 {
            if access == "NOACCESS" {
                let e = DiskErrorKind::UnsupportedFeature;
                return Err(bad(e, "use a NOACCESS VMDK extent"));
            }
            if d.extents.len() >= MAX_EXTENTS {
                return Err(bad(DiskErrorKind::UnsupportedFeature, "use this many VMDK extents"));
            }
            let corrupt = DiskErrorKind::CorruptImage;
            let sectors = w[1]
                .parse::<u64>()
                .map_err(|_| bad(corrupt, "read a VMDK extent size (not a number)"))?;
            let kind = match w[2].to_ascii_uppercase().as_str() {
                "FLAT" | "VMFS" => ExtentType::Flat,
                "SPARSE" => ExtentType::Sparse,
                "ZERO" => ExtentType::Zero,
                _ => {
                    let e = DiskErrorKind::UnsupportedFeature;
                    return Err(bad(e, "use this VMDK extent type"));
                }
            };
            let file = w.get(3).map(|f| f.to_string());
            if kind != ExtentType::Zero && file.as_deref().is_none_or(str::is_empty) {
                return Err(bad(corrupt, "find the VMDK extent's file name"));
            }
            let start = match (kind, w.get(4)) {
                (ExtentType::Flat, Some(s)) => s
                    .parse::<u64>()
                    .map_err(|_| bad(corrupt, "read a VMDK extent offset (not a number)"))?,
                _ => 0,
            };
            d.extents.push(ExtentLine { sectors, kind, file, start, offset });
        } else if let Some((key, value)) = line.split_once('=') {
            let value = unquote(value);
            let hex = |v: &str| u32::from_str_radix(v, 16).ok();
            match key.trim().to_ascii_lowercase().as_str() {
                "cid" => d.cid = hex(value),
                "parentcid" => d.parent_cid = hex(value),
                "createtype" => d.create_type = Some(value.to_string()),
                "parentfilenamehint" if !value.is_empty() => {
                    d.parent_hint = Some(value.to_string());
                }
                _ => {}
            }
        }
    }
    if d.extents.is_empty() {
        return Err(ParseError {
            kind: DiskErrorKind::InvalidFormat,
            op: "find any extent in the VMDK descriptor",
            offset: 0,
        });
    }
    Ok(d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    #[test]
    fn descriptor_with_crlf_comments_and_quotes_parses() {
        let text =
            "# Disk DescriptorFile\r\nversion=1\r\nCID=1234abcd\r\n  parentCID = \"ffffffff\"\r\n\
            createType=\"twoGbMaxExtentFlat\"\r\n# Extent description\r\n\
            RW 100 FLAT \"my disk-f001.vmdk\" 0\r\nRDONLY 50 FLAT \"b.vmdk\" 7\r\nRW 8 ZERO\r\n\
            ddb.adapterType = \"ide\"\r\n\0\0\0";
        let d = parse(text.as_bytes()).unwrap();
        assert_eq!(d.cid, Some(0x1234_abcd));
        assert_eq!(d.parent_cid, Some(NO_PARENT));
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentFlat"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("my disk-f001.vmdk"));
        assert_eq!(d.extents[1].start, 7);
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.extents[2].sectors, 8);
    }

    #[test]
    fn bad_extent_size_names_its_line() {
        let text = "# Disk DescriptorFile\nversion=1\nRW lots SPARSE \"x.vmdk\"\n";
        let e = parse(text.as_bytes()).unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::CorruptImage);
        assert_eq!(e.offset, 32);
    }

    #[test]
    fn descriptor_without_extents_is_invalid() {
        let e = parse(b"# Disk DescriptorFile\nversion=1\n").unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::InvalidFormat);
    }

    #[test]
    fn unknown_extent_type_is_unsupported() {
        let e = parse(b"RW 10 VMFSSPARSE \"x.vmdk\"\n").unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::UnsupportedFeature);
    }
}
