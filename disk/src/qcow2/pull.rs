//! Merging a qcow2 image's backing layer into it, so the layer can be deleted: the guest
//! clusters the backing layer P allocates itself, and the child does not, are copied into the
//! child; then the child's header is switched to P's own backing file.
//!
//! ```text
//!   before:  G ◀── P ◀── child        after:  G ◀── child (holds P's clusters)
//! ```
//! Crash safety: every cluster copied holds exactly what the child read through P, so until
//! the header switch the child reads the same whatever was copied; the copies and their
//! metadata are fsynced before the header is rewritten (one write), then fsynced again.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{
    fail, header, is_qcow2, read_header, resolve_backing, with_path, Mapping, Qcow2, Qcow2Error,
    ZERO,
};
use crate::bytes::be64_table;
use crate::{BlockBackend, DiskError, DiskErrorKind, OpenOptions};

const OP: &str = "pull the backing layer into";
/// Largest run of clusters copied with one read and one write.
const CHUNK_BYTES: u64 = 8 << 20;

/// What [`pull_backing_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// Child clusters filled (data and zero clusters).
    pub clusters_copied: u64,
    /// Bytes of data written (zero clusters write none).
    pub bytes_copied: u64,
    /// The child's backing file now (as resolved from the child), or None.
    pub new_backing: Option<PathBuf>,
}

/// How a child cluster gets filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Data,
    Zero,
}

/// The backing file of the qcow2 image at `path` as resolved from it (a relative name is
/// relative to the image's directory), without opening the backing chain; None when it has
/// none. Fails when `path` is not a qcow2 image.
pub fn qcow2_backing(path: &Path) -> Result<Option<PathBuf>, DiskError> {
    let file = File::open(path).map_err(|e| DiskError::io("open", e).with_path(path))?;
    let (h, _, _) = read_header(&file, path)?;
    Ok(h.backing_file.as_deref().map(|name| resolve_backing(path, name)))
}

/// Copies into the qcow2 image `child` every guest cluster its backing image P (which must be
/// qcow2) allocates itself (data, compressed or zero clusters, not what P inherits) and the
/// child does not, then makes P's backing file (or none) the child's. The child reads the same
/// guest content throughout; afterwards P is no longer needed by it.
///
/// The child must not be open elsewhere (a running VM) while this runs.
pub fn pull_backing_layer(child: &Path) -> Result<PullReport, DiskError> {
    let refuse = |kind, e| fail(kind, OP, e).with_path(child);
    if !is_qcow2(child)? {
        return Err(refuse(DiskErrorKind::InvalidFormat, Qcow2Error::BadMagic));
    }
    let (ch, first, _) = {
        let file = File::open(child).map_err(|e| DiskError::io("open", e).with_path(child))?;
        read_header(&file, child)?
    };
    let Some(name) = ch.backing_file.as_deref() else {
        return Err(refuse(DiskErrorKind::UnsupportedFeature, Qcow2Error::NoBacking));
    };
    let parent_path = resolve_backing(child, name);
    let stated_qcow2 = matches!(ch.backing_format.as_deref(), None | Some("qcow2"));
    if !stated_qcow2 || !is_qcow2(&parent_path)? {
        return Err(refuse(
            DiskErrorKind::UnsupportedFeature,
            Qcow2Error::BackingNotQcow2(parent_path),
        ));
    }
    let parent = Qcow2::open(&parent_path, OpenOptions { writable: false })?;
    let new_backing = match parent.header.backing_file.as_deref() {
        Some(stored) => {
            let (name, resolved) = name_for_child(child, &parent_path, stored)?;
            Some((name, parent.header.backing_format.clone(), resolved))
        }
        None => None,
    };
    let switch = |first: &[u8], h: &header::Header| {
        let b = new_backing.as_ref().map(|(n, f, _)| (n.as_str(), f.as_deref()));
        header::with_backing(first, h, b)
            .ok_or_else(|| refuse(DiskErrorKind::InvalidFormat, Qcow2Error::BackingNameTooLong))
    };
    // Fail before copying anything when the new name cannot fit.
    switch(&first, &ch)?;

    let image = Qcow2::open(child, OpenOptions { writable: true })?;
    let mut report = PullReport {
        clusters_copied: 0,
        bytes_copied: 0,
        new_backing: new_backing.as_ref().map(|(_, _, p)| p.clone()),
    };
    let mut ranges = allocated_ranges(&parent, parent.size().min(image.size()))?;
    // Past P's end the child read zeroes; a larger grandparent would show through there.
    if let Some(grand) = &parent.backing {
        let end = image.size().min(grand.disk.size());
        if end > parent.size() {
            ranges.push((parent.size(), end, Fill::Zero));
        }
    }
    for (first_gc, last_gc, fill) in child_runs(&image, &ranges)? {
        copy_run(&image, first_gc, last_gc, fill, &mut report)?;
    }
    image.flush()?;

    // The header switch, from the header as it is now (opening may have changed it).
    let (h, first, _) = read_header(&image.file, child)?;
    let new_first = switch(&first, &h)?;
    image.io().write(&new_first, 0)?;
    image.file.sync_all().map_err(|e| DiskError::io("flush", e).with_path(child))?;
    Ok(report)
}

/// The name to store in the child for P's backing name `stored`, so it resolves from the
/// child's directory to the same file; and that file's path.
fn name_for_child(
    child: &Path,
    parent: &Path,
    stored: &str,
) -> Result<(String, PathBuf), DiskError> {
    let resolved = resolve_backing(parent, stored);
    if Path::new(stored).is_absolute() {
        return Ok((stored.to_string(), resolved));
    }
    let dir = |p: &Path| {
        let d = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        d.canonicalize().map_err(|e| DiskError::io("open", e).with_path(d))
    };
    let parent_dir = dir(parent)?;
    if dir(child)? == parent_dir {
        return Ok((stored.to_string(), resolved));
    }
    // The real directory of P plus the name opens the same file the chain read.
    let absolute = parent_dir.join(stored);
    match absolute.to_str() {
        Some(s) => Ok((s.to_string(), absolute.clone())),
        None => {
            Err(fail(DiskErrorKind::InvalidFormat, OP, Qcow2Error::BackingName).with_path(child))
        }
    }
}

/// The guest byte ranges below `limit` that `p` allocates itself, merged, in order; walks the
/// L1 table and reads each allocated L2 table once.
fn allocated_ranges(p: &Qcow2, limit: u64) -> Result<Vec<(u64, u64, Fill)>, DiskError> {
    let meta = p.lock();
    let io = p.io();
    let cs = p.cs();
    let per = cs / 8;
    let clusters = limit.div_ceil(cs);
    let mut raw = vec![0u8; cs as usize];
    let mut out: Vec<(u64, u64, Fill)> = Vec::new();
    for t in 0..clusters.div_ceil(per) {
        let Some(off) = meta.l2_offset(t).map_err(|e| with_path(e, &p.path))? else {
            continue;
        };
        io.read_exact(&mut raw, off)?;
        for (i, entry) in be64_table(&raw).enumerate() {
            let gc = t * per + i as u64;
            if gc >= clusters {
                break;
            }
            let fill = match p.decode(entry, meta.file_len)? {
                Mapping::Unallocated => continue,
                Mapping::Zero(_) => Fill::Zero,
                Mapping::Data { .. } | Mapping::Compressed { .. } => Fill::Data,
            };
            let (start, end) = (gc * cs, ((gc + 1) * cs).min(limit));
            match out.last_mut() {
                Some((_, e, f)) if *e == start && *f == fill => *e = end,
                _ => out.push((start, end, fill)),
            }
        }
    }
    Ok(out)
}

/// The runs of child clusters `[first, last)` to fill: those unallocated in `image` that meet
/// one of `ranges` (ordered, disjoint). A cluster becomes a zero cluster only when zero ranges
/// cover all of it; otherwise it gets the data it reads now.
fn child_runs(
    image: &Qcow2,
    ranges: &[(u64, u64, Fill)],
) -> Result<Vec<(u64, u64, Fill)>, DiskError> {
    let cs = image.cs();
    let size = image.size();
    let mut meta = image.lock();
    let io = image.io();
    let mut runs: Vec<(u64, u64, Fill)> = Vec::new();
    // The child cluster being looked at: its index and the bytes of it zero ranges cover.
    let mut current: Option<(u64, u64, bool)> = None;
    let mut finish = |meta: &mut super::meta::Meta,
                      (gc, zero_bytes, data): (u64, u64, bool)|
     -> Result<(), DiskError> {
        let entry = meta.l2_entry(&io, gc).map_err(|e| with_path(e, &image.path))?;
        if image.decode(entry, meta.file_len)? != Mapping::Unallocated {
            return Ok(());
        }
        let span = ((gc + 1) * cs).min(size) - gc * cs;
        let fill = if !data && zero_bytes >= span { Fill::Zero } else { Fill::Data };
        match runs.last_mut() {
            Some((_, last, f)) if *last == gc && *f == fill => *last += 1,
            _ => runs.push((gc, gc + 1, fill)),
        }
        Ok(())
    };
    for &(start, end, fill) in ranges {
        let mut pos = start;
        while pos < end {
            let gc = pos / cs;
            let stop = ((gc + 1) * cs).min(end);
            match current {
                Some(c) if c.0 == gc => {}
                Some(c) => {
                    finish(&mut meta, c)?;
                    current = Some((gc, 0, false));
                }
                None => current = Some((gc, 0, false)),
            }
            if let Some(c) = current.as_mut() {
                match fill {
                    Fill::Zero => c.1 += stop - pos,
                    Fill::Data => c.2 = true,
                }
            }
            pos = stop;
        }
    }
    if let Some(c) = current {
        finish(&mut meta, c)?;
    }
    Ok(runs)
}

/// Fills child clusters `[first, last)` with what they read now (through the backing chain).
fn copy_run(
    image: &Qcow2,
    first: u64,
    last: u64,
    fill: Fill,
    report: &mut PullReport,
) -> Result<(), DiskError> {
    let cs = image.cs();
    if fill == Fill::Zero && image.header.version >= 3 {
        let mut meta = image.lock();
        image
            .replace_entries(&mut meta, first, last, ZERO, false)
            .map_err(|e| with_path(e, &image.path))?;
        report.clusters_copied += last - first;
        return Ok(());
    }
    let per_chunk = (CHUNK_BYTES / cs).max(1);
    let mut buf = Vec::new();
    let mut gc = first;
    while gc < last {
        let n = per_chunk.min(last - gc);
        buf.resize((n * cs) as usize, 0);
        match fill {
            Fill::Data => image.read_backing(&mut buf, gc * cs)?,
            // v2 has no zero flag: real zeroes.
            Fill::Zero => buf.fill(0),
        }
        let mut meta = image.lock();
        image.write_locked(&mut meta, &buf, gc * cs).map_err(|e| with_path(e, &image.path))?;
        report.clusters_copied += n;
        report.bytes_copied += n * cs;
        gc += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

    use super::header::{build_first_cluster, with_backing, Header};
    use std::path::Path;

    fn parse(first: &[u8]) -> Header {
        Header::parse(first, 1 << 20, Path::new("t.qcow2")).unwrap()
    }

    #[test]
    fn header_switch_rewrites_name_and_format_of_any_length() {
        let first = build_first_cluster(12, 4096, Some(("mid.qcow2", "qcow2")));
        let h = parse(&first);
        let long = "a-much-longer-name-for-the-grandparent-layer.img";
        let mut new = first.clone();
        let part = with_backing(&first, &h, Some((long, Some("raw")))).unwrap();
        new[..part.len()].copy_from_slice(&part);
        let h2 = parse(&new);
        assert_eq!(h2.backing_file.as_deref(), Some(long));
        assert_eq!(h2.backing_format.as_deref(), Some("raw"));

        // Back to a short name without format: the old tail is cleared.
        let part = with_backing(&new, &h2, Some(("b", None))).unwrap();
        assert!(part.len() >= 112 + 16 + 8 + long.len());
        new[..part.len()].copy_from_slice(&part);
        let h3 = parse(&new);
        assert_eq!(h3.backing_file.as_deref(), Some("b"));
        assert_eq!(h3.backing_format, None);
        assert!(!new.windows(long.len()).any(|w| w == long.as_bytes()));

        let part = with_backing(&new, &h3, None).unwrap();
        new[..part.len()].copy_from_slice(&part);
        let h4 = parse(&new);
        assert_eq!((h4.backing_file, h4.backing_format), (None, None));
    }

    #[test]
    fn header_switch_refuses_a_name_past_the_cluster() {
        let first = build_first_cluster(9, 512, Some(("mid.qcow2", "qcow2")));
        let h = parse(&first);
        let fits = "n".repeat(512 - 112 - 16 - 8);
        assert!(with_backing(&first, &h, Some((&fits, Some("qcow2")))).is_some());
        let long = "n".repeat(fits.len() + 1);
        assert!(with_backing(&first, &h, Some((&long, Some("qcow2")))).is_none());
        assert!(with_backing(&first, &h, Some(("", None))).is_none());
    }
}
