//! Disk images: inspect, convert, compact and resize, with progress and cancel (for `hutch
//! disk ...` and the importer), plus human sizes.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context};
use disk::convert::{self, ConvertOptions, ConvertStats, NewImage};
use disk::qcow2::{CheckReport, Qcow2};
use disk::{BlockBackend, DiskError, DiskErrorKind, ImageFormat, ImageInfo, OpenOptions};
use serde::Serialize;

/// Longest backing chain `info` follows.
const MAX_CHAIN: usize = 64;

/// What [`convert`], [`compact`] (and the importer) report as they go: `progress(done,
/// total)` in bytes; returning `false` cancels (the operation then leaves nothing behind,
/// or for a raw compact, the same data).
pub type Progress<'a> = &'a dyn Fn(u64, u64) -> bool;

/// `1536` → "1.5 KiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A disk error as the user should read it: cancelled conversions say so plainly.
pub fn is_cancelled(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<DiskError>().is_some_and(|d| d.kind() == DiskErrorKind::Cancelled)
    })
}

/// Opens an image for reading, with a pointer to `import` for appliances.
pub fn open_source(path: &Path) -> anyhow::Result<(ImageFormat, Box<dyn BlockBackend>)> {
    let format = disk::detect(path).with_context(|| format!("Cannot read {}", path.display()))?;
    if format == ImageFormat::Ova {
        bail!(
            "{} is an OVA appliance, not a disk image; use `hutch import` to make a VM of it",
            path.display()
        );
    }
    let image = disk::open_image(path, OpenOptions { writable: false })
        .with_context(|| format!("Cannot open {} ({} image)", path.display(), format.name()))?;
    Ok((format, image))
}

// ---- info ----

/// An image, its backing chain and its problems (what `hutch disk info --json` prints).
#[derive(Debug, Serialize)]
pub struct InfoView {
    #[serde(flatten)]
    pub image: ImageInfo,
    /// The backing images, nearest first.
    pub backing_chain: Vec<ImageInfo>,
    /// qcow2 consistency check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckView>,
}

#[derive(Debug, Serialize)]
pub struct CheckView {
    pub corruptions: u64,
    pub leaked_clusters: u64,
    pub messages: Vec<String>,
}

impl From<CheckReport> for CheckView {
    fn from(r: CheckReport) -> CheckView {
        CheckView {
            corruptions: r.corruptions,
            leaked_clusters: r.leaked_clusters,
            messages: r.messages,
        }
    }
}

/// Reads `path`'s header and backing chain, and checks a qcow2 image.
pub fn info(path: &Path) -> anyhow::Result<InfoView> {
    let mut image =
        disk::image_info(path).with_context(|| format!("Cannot read {}", path.display()))?;
    let mut check = None;
    if image.format == ImageFormat::Qcow2 {
        let report = Qcow2::open(path, OpenOptions::default())
            .and_then(|q| q.check())
            .with_context(|| format!("Cannot check {}", path.display()))?;
        image.problems.extend(report.problems());
        check = Some(CheckView::from(report));
    }
    let mut chain: Vec<ImageInfo> = Vec::new();
    let mut next = image.backing.clone();
    while let Some(parent) = next {
        if chain.len() >= MAX_CHAIN {
            image.problems.push(format!("backing chain longer than {MAX_CHAIN} images"));
            break;
        }
        match disk::image_info(&parent) {
            Ok(p) => {
                next = p.backing.clone();
                chain.push(p);
            }
            Err(e) => {
                image.problems.push(format!("backing image {}: {e}", parent.display()));
                break;
            }
        }
    }
    Ok(InfoView { image, backing_chain: chain, check })
}

// ---- convert ----

/// Converts `input` (any readable format) into a new `format` image at `output`, which
/// appears only once complete (replacing an existing file only with `force`). Returns the
/// input's format and what was copied.
pub fn convert(
    input: &Path,
    output: &Path,
    format: ImageFormat,
    force: bool,
    progress: Progress<'_>,
) -> anyhow::Result<(ImageFormat, ConvertStats)> {
    if output.exists() && !force {
        bail!("{} already exists; use --force to replace it", output.display());
    }
    let (in_format, src) = open_source(input)?;
    let dst = NewImage::create(output, format, src.size())
        .with_context(|| format!("Cannot create {}", output.display()))?;
    let result = convert::convert_into(src.as_ref(), &dst, &ConvertOptions::default(), progress);
    let stats = match result {
        Ok(s) => s,
        Err(e) if e.kind() == DiskErrorKind::Cancelled => {
            drop(dst);
            bail!("Cancelled; {} was not written", output.display());
        }
        Err(e) => {
            return Err(anyhow::Error::from(e).context(format!(
                "Cannot convert {} to {}",
                input.display(),
                output.display()
            )))
        }
    };
    dst.commit(force).with_context(|| format!("Cannot write {}", output.display()))?;
    Ok((in_format, stats))
}

// ---- compact ----

/// Gives back the host space zeroed data of a qcow2 or raw image takes; returns the bytes
/// allocated before and after.
pub fn compact(path: &Path, progress: Progress<'_>) -> anyhow::Result<(u64, u64)> {
    let format = disk::detect(path).with_context(|| format!("Cannot read {}", path.display()))?;
    let before = convert::allocated_bytes(path)?;
    match format {
        ImageFormat::Qcow2 => {
            let src = Qcow2::open(path, OpenOptions::default())
                .with_context(|| format!("Cannot open {}", path.display()))?;
            if let Some(b) = src.backing_path() {
                bail!(
                    "{} has a backing file ({}); compacting it would merge the two. Use \
                     `hutch disk convert` to make a standalone copy",
                    path.display(),
                    b.display()
                );
            }
            let dst = NewImage::create(path, ImageFormat::Qcow2, src.size())
                .with_context(|| format!("Cannot create a new image next to {}", path.display()))?;
            let perms = fs::metadata(path)?.permissions();
            let result = convert::convert_into(&src, &dst, &ConvertOptions::default(), progress);
            match result {
                Err(e) if e.kind() == DiskErrorKind::Cancelled => {
                    bail!("Cancelled; {} is unchanged", path.display())
                }
                r => r.with_context(|| format!("Cannot compact {}", path.display()))?,
            };
            fs::set_permissions(dst.temp_path(), perms)?;
            drop(src);
            dst.commit(true).with_context(|| format!("Cannot replace {}", path.display()))?;
        }
        ImageFormat::Raw => {
            match convert::punch_zero_blocks(path, progress) {
                Err(e) if e.kind() == DiskErrorKind::Cancelled => {
                    // Holes punched so far are harmless: the content is unchanged.
                    bail!("Cancelled; {} holds the same data, partly compacted", path.display())
                }
                Err(e) if e.kind() == DiskErrorKind::UnsupportedFeature => {
                    bail!("The file system holding {} cannot punch holes", path.display())
                }
                r => r.with_context(|| format!("Cannot compact {}", path.display()))?,
            };
        }
        other => bail!(
            "{} is a {} image; compact works on qcow2 and raw images: convert it to qcow2 first \
             (hutch disk convert {} NEW.qcow2)",
            path.display(),
            other.name(),
            path.display()
        ),
    }
    let after = convert::allocated_bytes(path)?;
    Ok((before, after))
}

// ---- resize ----

/// A `resize` argument: an absolute size or a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

impl SizeSpec {
    /// The new size for a disk of `current` bytes.
    pub fn apply(self, current: u64) -> anyhow::Result<u64> {
        match self {
            SizeSpec::Absolute(n) => Ok(n),
            SizeSpec::Grow(n) => current.checked_add(n).context("The new size is too large"),
            SizeSpec::Shrink(n) => current.checked_sub(n).context("Cannot shrink below zero"),
        }
    }
}

/// Parses `20G`, `512M`, `1.5G`, `4096`, `+1G`, `-512M` (binary units: K, M, G, T, with or
/// without `iB`/`B`).
pub fn parse_size(text: &str) -> anyhow::Result<SizeSpec> {
    let bad = || anyhow::anyhow!("Invalid size '{text}' (expected e.g. 20G, 512M, +1G)");
    let t = text.trim();
    let (sign, rest) = match t.as_bytes().first() {
        Some(b'+') => (1, &t[1..]),
        Some(b'-') => (-1, &t[1..]),
        _ => (0, t),
    };
    let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    let (number, unit) = rest.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    if number.is_empty() {
        return Err(bad());
    }
    let bytes = if number.contains('.') {
        let value: f64 = number.parse().map_err(|_| bad())?;
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
            return Err(bad());
        }
        bytes as u64
    } else {
        let value: u64 = number.parse().map_err(|_| bad())?;
        value.checked_mul(1u64 << shift).ok_or_else(bad)?
    };
    Ok(match sign {
        1 => SizeSpec::Grow(bytes),
        -1 => SizeSpec::Shrink(bytes),
        _ => SizeSpec::Absolute(bytes),
    })
}

/// Changes a qcow2 or raw image's virtual size (smaller only with `shrink`); returns the old
/// and new sizes.
pub fn resize(path: &Path, spec: SizeSpec, shrink: bool) -> anyhow::Result<(u64, u64)> {
    let format = disk::detect(path).with_context(|| format!("Cannot read {}", path.display()))?;
    let (old, new) = match format {
        ImageFormat::Qcow2 => {
            let image = Qcow2::open(path, OpenOptions { writable: true })
                .with_context(|| format!("Cannot open {} for writing", path.display()))?;
            let old = image.size();
            let new = checked_new_size(spec, old, shrink)?;
            image.resize(new).with_context(|| format!("Cannot resize {}", path.display()))?;
            image.flush()?;
            (old, new)
        }
        ImageFormat::Raw => {
            let file = fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("Cannot open {} for writing", path.display()))?;
            let old = file.metadata()?.len();
            let new = checked_new_size(spec, old, shrink)?;
            file.set_len(new).with_context(|| format!("Cannot resize {}", path.display()))?;
            file.sync_all()?;
            (old, new)
        }
        other => bail!(
            "{} is a {} image; resize works on qcow2 and raw images: convert it to qcow2 first",
            path.display(),
            other.name()
        ),
    };
    Ok((old, new))
}

fn checked_new_size(spec: SizeSpec, old: u64, shrink: bool) -> anyhow::Result<u64> {
    let new = spec.apply(old)?;
    if new == 0 || new % 512 != 0 {
        bail!("The new size must be a positive multiple of 512 bytes (got {new})");
    }
    if new < old && !shrink {
        bail!(
            "{} is smaller than the current {}; shrinking loses the data past the new end: \
             add --shrink to do it anyway",
            human(new),
            human(old)
        );
    }
    Ok(new)
}

/// A new disk's size: `20G`, `512M`... (not a change such as `+1G`).
pub fn parse_new_size(s: &str) -> Result<u64, String> {
    match parse_size(s) {
        Ok(SizeSpec::Absolute(bytes)) => Ok(bytes),
        Ok(_) => Err(format!("a size such as 20G, not a change ({s})")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_and_signs() {
        assert_eq!(parse_size("20G").unwrap(), SizeSpec::Absolute(20 << 30));
        assert_eq!(parse_size("512M").unwrap(), SizeSpec::Absolute(512 << 20));
        assert_eq!(parse_size("512MiB").unwrap(), SizeSpec::Absolute(512 << 20));
        assert_eq!(parse_size("+1G").unwrap(), SizeSpec::Grow(1 << 30));
        assert_eq!(parse_size("-4k").unwrap(), SizeSpec::Shrink(4096));
        assert_eq!(parse_size("1.5G").unwrap(), SizeSpec::Absolute(3 << 29));
        assert_eq!(parse_size("4096").unwrap(), SizeSpec::Absolute(4096));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        for s in ["", "G", "+", "12X", "1..5G", "99999999999T", "0.3B", "-"] {
            assert!(parse_size(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn shrinking_needs_the_flag_and_sizes_are_sector_multiples() {
        assert!(checked_new_size(SizeSpec::Absolute(1 << 20), 2 << 20, false).is_err());
        assert_eq!(checked_new_size(SizeSpec::Absolute(1 << 20), 2 << 20, true).unwrap(), 1 << 20);
        assert!(checked_new_size(SizeSpec::Grow(100), 1 << 20, false).is_err());
        assert!(checked_new_size(SizeSpec::Shrink(4 << 20), 1 << 20, true).is_err());
        assert_eq!(checked_new_size(SizeSpec::Grow(1 << 20), 1 << 20, false).unwrap(), 2 << 20);
    }

    #[test]
    fn human_sizes_pick_the_largest_unit() {
        assert_eq!(human(0), "0 bytes");
        assert_eq!(human(1023), "1023 bytes");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(20 << 30), "20 GiB");
    }
}
