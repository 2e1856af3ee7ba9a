//! Consistency check: rebuilds every cluster's refcount from the on-disk header, L1/L2
//! tables, refcount structures and snapshot tables, and compares with the stored refcounts.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{self, inside, Header};
use super::meta::rc_get;
use super::{decode_entry, Mapping, COPIED, L1_OFFSET_MASK};
use crate::bytes::{be64_table, Fields};
use crate::DiskError;

/// Most detail messages kept in a report.
const MAX_MESSAGES: usize = 50;
/// Most snapshots looked at (QEMU's limit).
const MAX_SNAPSHOTS: u32 = 65536;

/// What [`super::Qcow2::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// References the refcounts do not cover, or metadata pointing outside the file.
    pub corruptions: u64,
    /// Clusters with a refcount but no reference (wasted space, harmless).
    pub leaked_clusters: u64,
    /// Details of the first problems found.
    pub messages: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaked_clusters == 0
    }

    /// One line per kind of problem, for `hutch disk info`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.corruptions > 0 {
            out.push(format!("{} corruption(s)", self.corruptions));
        }
        if self.leaked_clusters > 0 {
            out.push(format!("{} leaked cluster(s)", self.leaked_clusters));
        }
        out
    }

    fn error(&mut self, msg: String) {
        self.corruptions += 1;
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }
}

struct Checker<'a> {
    file: &'a File,
    cs: u64,
    cluster_bits: u32,
    version: u32,
    file_len: u64,
    expected: Vec<u32>,
    report: CheckReport,
    /// Active clusters whose L1/L2 entry claims refcount 1 (COPIED) or not.
    copied: Vec<(u64, bool)>,
}

impl Checker<'_> {
    fn read(&mut self, len: u64, offset: u64, what: &str) -> Option<Vec<u8>> {
        if !inside(offset, len, self.file_len) {
            self.report.error(format!("{what} at {offset:#x} lies outside the file"));
            return None;
        }
        let mut buf = vec![0u8; len as usize];
        match self.file.read_exact_at(&mut buf, offset) {
            Ok(()) => Some(buf),
            Err(e) => {
                self.report.error(format!("{what} at {offset:#x} unreadable: {e}"));
                None
            }
        }
    }

    /// Counts one reference to every cluster in `[offset, offset + len)`.
    fn reference(&mut self, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset / self.cs;
        // A hostile table can point anywhere: an end past u64 is past the end of the file.
        let Some(end) = offset.checked_add(len - 1) else {
            self.report.error(format!("{what} at {offset:#x} runs past the end of the file"));
            return;
        };
        let last = end / self.cs;
        for c in first..=last {
            match self.expected.get_mut(c as usize) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    self.report.error(format!(
                        "{what} cluster {:#x} is past the end of the file",
                        c * self.cs
                    ));
                    return;
                }
            }
        }
    }

    fn walk_l1(&mut self, l1: &[u64], active: bool) {
        for &e in l1 {
            let off = e & L1_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(self.cs) {
                self.report.error(format!("L2 table at {off:#x} is misaligned"));
                continue;
            }
            self.reference(off, self.cs, "L2 table");
            if active {
                self.copied.push((off, e & COPIED != 0));
            }
            let Some(raw) = self.read(self.cs, off, "L2 table") else {
                continue;
            };
            for entry in be64_table(&raw) {
                match decode_entry(entry, self.cluster_bits, self.version, self.file_len) {
                    Ok(Mapping::Data { host, copied }) => {
                        self.reference(host, self.cs, "data");
                        if active {
                            self.copied.push((host, copied));
                        }
                    }
                    Ok(Mapping::Zero(Some(host))) => {
                        self.reference(host, self.cs, "preallocated zero");
                        if active {
                            self.copied.push((host, entry & COPIED != 0));
                        }
                    }
                    Ok(Mapping::Compressed { offset, end }) => {
                        self.reference(offset, end.max(offset + 1) - offset, "compressed data");
                    }
                    Ok(_) => {}
                    Err(at) => self.report.error(format!(
                        "L2 entry {entry:#x} in table {off:#x} points to {at:#x} outside the file"
                    )),
                }
            }
        }
    }

    fn walk_snapshots(&mut self, h: &Header) {
        let mut pos = h.snapshots_offset;
        let start = pos;
        for _ in 0..h.nb_snapshots.min(MAX_SNAPSHOTS) {
            let Some(fixed) = self.read(40, pos, "snapshot table") else {
                return;
            };
            let fixed = Fields::new(&fixed, "read the qcow2 snapshot table");
            let (Ok(l1_offset), Ok(l1_size), Ok(id_len), Ok(name_len), Ok(extra)) =
                (fixed.be64(0), fixed.be32(8), fixed.be16(12), fixed.be16(14), fixed.be32(36))
            else {
                self.report.error(format!("snapshot table entry at {pos:#x} is truncated"));
                return;
            };
            let len = 40 + u64::from(extra) + u64::from(id_len) + u64::from(name_len);
            pos += len.div_ceil(8) * 8;
            let bytes = u64::from(l1_size) * 8;
            if bytes > header::MAX_L1_BYTES || !l1_offset.is_multiple_of(self.cs) {
                self.report.error(format!("snapshot L1 table at {l1_offset:#x} is invalid"));
                continue;
            }
            if let Some(raw) = self.read(bytes, l1_offset, "snapshot L1 table") {
                self.reference(l1_offset, bytes, "snapshot L1 table");
                self.walk_l1(&be64_table(&raw).collect::<Vec<_>>(), false);
            }
        }
        self.reference(start, pos - start, "snapshot table");
    }
}

pub(super) fn check(file: &File, path: &Path) -> Result<CheckReport, DiskError> {
    // Everything comes from the file, not from caches: the point is what a crash would leave.
    let (h, _, file_len) = super::read_header(file, path)?;
    let cs = h.cluster_size();
    let nclusters = file_len.div_ceil(cs);
    let mut ck = Checker {
        file,
        cs,
        cluster_bits: h.cluster_bits,
        version: h.version,
        file_len,
        expected: vec![0; nclusters as usize],
        report: CheckReport::default(),
        copied: Vec::new(),
    };
    ck.reference(0, cs, "header");
    let l1_bytes = u64::from(h.l1_size) * 8;
    ck.reference(h.l1_table_offset, l1_bytes, "L1 table");
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    ck.reference(h.refcount_table_offset, rt_bytes, "refcount table");
    let table = ck
        .read(rt_bytes, h.refcount_table_offset, "refcount table")
        .map(|r| be64_table(&r).collect::<Vec<_>>());
    let table = table.unwrap_or_default();
    for &e in &table {
        let off = e & !(cs - 1);
        if off != 0 {
            ck.reference(off, cs, "refcount block");
        }
    }
    if h.nb_snapshots > 0 {
        ck.walk_snapshots(&h);
    }
    if let Some(raw) = ck.read(l1_bytes, h.l1_table_offset, "L1 table") {
        ck.walk_l1(&be64_table(&raw).collect::<Vec<_>>(), true);
    }
    // Compare with the stored refcounts.
    let epb = (cs * 8) >> h.refcount_order;
    let mut stored = vec![0u64; nclusters as usize];
    for (b, &e) in table.iter().enumerate() {
        let off = e & !(cs - 1);
        if off == 0 {
            continue;
        }
        let Some(block) = ck.read(cs, off, "refcount block") else {
            continue;
        };
        for i in 0..epb {
            let c = b as u64 * epb + i;
            let r = rc_get(&block, h.refcount_order, i);
            match stored.get_mut(c as usize) {
                Some(s) => *s = r,
                None if r > 0 => ck.report.leaked_clusters += 1,
                None => {}
            }
        }
    }
    for (c, (&e, &r)) in ck.expected.iter().zip(&stored).enumerate() {
        let e = u64::from(e);
        if r < e {
            ck.report.error(format!(
                "cluster {:#x} has refcount {r} but {e} reference(s)",
                c as u64 * cs
            ));
        } else if r > e {
            ck.report.leaked_clusters += 1;
        }
    }
    for (host, copied) in std::mem::take(&mut ck.copied) {
        let r = stored.get((host / cs) as usize).copied().unwrap_or(0);
        if copied != (r == 1) {
            ck.report.error(format!("cluster {host:#x}: COPIED flag disagrees with refcount {r}"));
        }
    }
    Ok(ck.report)
}
