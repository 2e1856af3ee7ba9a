//! qcow2 metadata in memory: the L1 table, a bounded write-back cache of L2 tables, and the
//! refcount table and blocks with the cluster allocator.
//!
//! Crash safety rests on the order of writes (the page cache keeps that order for a killed
//! process; fsync happens only at flush): a cluster's refcount is written before any table
//! entry that points at it, a new table's contents before the entry that points at the table,
//! and an L2 entry that drops a reference before the refcount is decremented. Clusters are
//! always allocated at the end of the file, so a freed cluster is never reused while an old
//! on-disk pointer to it could still be read back.

use std::collections::HashMap;

use super::{fail, Io, Qcow2Error, L1_OFFSET_MASK};
use crate::bytes::be64_table;
use crate::{DiskError, DiskErrorKind};

/// An L2 table in memory.
pub(super) struct L2Table {
    pub entries: Vec<u64>,
    pub dirty: bool,
    last_use: u64,
}

/// A refcount block in memory; `dirty` is the byte range not yet written.
struct RefBlock {
    offset: u64,
    data: Vec<u8>,
    dirty: Option<(usize, usize)>,
}

/// Refcount state (only kept for writable images).
pub(super) struct Refcounts {
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u64,
    order: u32,
    blocks: HashMap<u64, RefBlock>,
    /// First byte past every allocated cluster: where the next allocation goes.
    pub end: u64,
}

/// Most clean refcount blocks kept in memory.
const MAX_CACHED_REFBLOCKS: usize = 64;

pub(super) struct Meta {
    pub cluster_bits: u32,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub file_len: u64,
    pub l2: HashMap<u64, L2Table>,
    pub l2_cap: usize,
    tick: u64,
    pub rc: Option<Refcounts>,
}

fn corrupt(op: &'static str, offset: u64, e: Qcow2Error) -> DiskError {
    fail(DiskErrorKind::CorruptImage, op, e).with_offset(offset)
}

impl Refcounts {
    pub fn new(
        table: Vec<u64>,
        table_offset: u64,
        table_clusters: u64,
        order: u32,
        end: u64,
    ) -> Self {
        Refcounts { table, table_offset, table_clusters, order, blocks: HashMap::new(), end }
    }
}

/// Reads refcount entry `idx` of a block with `1 << order`-bit entries.
pub(super) fn rc_get(data: &[u8], order: u32, idx: u64) -> u64 {
    let bits = 1u64 << order;
    let bit = idx * bits;
    let byte = (bit / 8) as usize;
    if bits < 8 {
        let shift = bit % 8;
        u64::from(data[byte] >> shift) & ((1 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        data[byte..byte + n].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

pub(super) fn rc_set(data: &mut [u8], order: u32, idx: u64, value: u64) -> (usize, usize) {
    let bits = 1u64 << order;
    let bit = idx * bits;
    let byte = (bit / 8) as usize;
    if bits < 8 {
        let shift = bit % 8;
        let mask = (((1u16 << bits) - 1) << shift) as u8;
        data[byte] = (data[byte] & !mask) | (((value << shift) as u8) & mask);
        (byte, byte + 1)
    } else {
        let n = (bits / 8) as usize;
        for i in 0..n {
            data[byte + i] = (value >> (8 * (n - 1 - i))) as u8;
        }
        (byte, byte + n)
    }
}

impl Meta {
    pub fn new(cluster_bits: u32, l1: Vec<u64>, l1_offset: u64, file_len: u64) -> Meta {
        // About 32 MiB of L2 tables, at least 16.
        let l2_cap = ((32usize << 20) >> cluster_bits).max(16);
        Meta {
            cluster_bits,
            l1,
            l1_offset,
            file_len,
            l2: HashMap::new(),
            l2_cap,
            tick: 0,
            rc: None,
        }
    }

    pub fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cs() / 8
    }

    /// The L2 table offset for L1 entry `index`, validated; None when unallocated.
    pub fn l2_offset(&self, index: u64) -> Result<Option<u64>, DiskError> {
        let Some(&entry) = self.l1.get(index as usize) else {
            return Ok(None);
        };
        let off = entry & L1_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) || !super::header::inside(off, self.cs(), self.file_len) {
            return Err(corrupt("read", off, Qcow2Error::L2OutsideFile));
        }
        Ok(Some(off))
    }

    /// Makes sure the L2 table at `off` is cached.
    pub fn load_l2(&mut self, io: &Io<'_>, off: u64) -> Result<(), DiskError> {
        self.tick += 1;
        let tick = self.tick;
        if let Some(t) = self.l2.get_mut(&off) {
            t.last_use = tick;
            return Ok(());
        }
        if self.l2.len() >= self.l2_cap {
            self.evict_l2(io)?;
        }
        let mut raw = vec![0u8; self.cs() as usize];
        io.read_exact(&mut raw, off)?;
        let entries = be64_table(&raw).collect();
        self.l2.insert(off, L2Table { entries, dirty: false, last_use: tick });
        Ok(())
    }

    fn evict_l2(&mut self, io: &Io<'_>) -> Result<(), DiskError> {
        let Some((&victim, _)) = self.l2.iter().min_by_key(|(_, t)| t.last_use) else {
            return Ok(());
        };
        self.write_l2(io, victim)?;
        self.l2.remove(&victim);
        Ok(())
    }

    /// The L2 entry of guest cluster `gc` (0 when its L2 table is unallocated).
    pub fn l2_entry(&mut self, io: &Io<'_>, gc: u64) -> Result<u64, DiskError> {
        let per = self.l2_entries();
        let Some(off) = self.l2_offset(gc / per)? else {
            return Ok(0);
        };
        self.load_l2(io, off)?;
        Ok(self.l2.get(&off).map(|t| t.entries[(gc % per) as usize]).unwrap_or(0))
    }

    /// Sets the L2 entry of guest cluster `gc` in the cache (written back later); the L2
    /// table must exist (see [`Meta::l2_for_write`]). Returns the table's offset.
    pub fn set_l2_entry(&mut self, io: &Io<'_>, gc: u64, value: u64) -> Result<u64, DiskError> {
        let per = self.l2_entries();
        let off = self.l2_for_write(io, gc / per)?;
        self.load_l2(io, off)?;
        if let Some(t) = self.l2.get_mut(&off) {
            t.entries[(gc % per) as usize] = value;
            t.dirty = true;
        }
        Ok(off)
    }

    /// The L2 table for L1 entry `index`, allocating it when missing.
    pub fn l2_for_write(&mut self, io: &Io<'_>, index: u64) -> Result<u64, DiskError> {
        if let Some(off) = self.l2_offset(index)? {
            return Ok(off);
        }
        if index as usize >= self.l1.len() {
            return Err(corrupt(
                "write",
                self.l1_offset,
                Qcow2Error::L1TooSmall { entries: self.l1.len() as u32, needed: index + 1 },
            ));
        }
        let off = self.alloc(io, 1)?;
        // The zeroed table reaches the file before the L1 entry that points at it.
        io.write(&vec![0u8; self.cs() as usize], off)?;
        let per = self.l2_entries() as usize;
        self.tick += 1;
        if self.l2.len() >= self.l2_cap {
            self.evict_l2(io)?;
        }
        self.l2.insert(off, L2Table { entries: vec![0; per], dirty: false, last_use: self.tick });
        let entry = off | super::COPIED;
        self.l1[index as usize] = entry;
        io.write(&entry.to_be_bytes(), self.l1_offset + index * 8)?;
        Ok(off)
    }

    /// Writes the L2 table at `off` to the file if it changed.
    pub fn write_l2(&mut self, io: &Io<'_>, off: u64) -> Result<(), DiskError> {
        let Some(t) = self.l2.get_mut(&off) else {
            return Ok(());
        };
        if !t.dirty {
            return Ok(());
        }
        let raw: Vec<u8> = t.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        io.write(&raw, off)?;
        t.dirty = false;
        Ok(())
    }

    /// Writes every changed L2 table, in file order.
    pub fn write_all_l2(&mut self, io: &Io<'_>) -> Result<(), DiskError> {
        let mut dirty: Vec<u64> =
            self.l2.iter().filter(|(_, t)| t.dirty).map(|(&o, _)| o).collect();
        dirty.sort_unstable();
        for off in dirty {
            self.write_l2(io, off)?;
        }
        Ok(())
    }

    fn rc(&mut self) -> Result<&mut Refcounts, DiskError> {
        self.rc.as_mut().ok_or_else(|| fail(DiskErrorKind::Io, "write", Qcow2Error::ReadOnly))
    }

    fn entries_per_block(&self) -> u64 {
        let order = self.rc.as_ref().map(|r| r.order).unwrap_or(4);
        (self.cs() * 8) >> order
    }

    /// Loads refcount block `b`; false when it is not allocated.
    fn load_block(&mut self, io: &Io<'_>, b: u64) -> Result<bool, DiskError> {
        let cs = self.cs();
        let file_len = self.file_len;
        let rc = self.rc()?;
        if rc.blocks.contains_key(&b) {
            return Ok(true);
        }
        let Some(&entry) = rc.table.get(b as usize) else {
            return Ok(false);
        };
        let off = entry & !(cs - 1);
        if off == 0 {
            return Ok(false);
        }
        if !super::header::inside(off, cs, file_len.max(rc.end)) {
            return Err(corrupt("write", off, Qcow2Error::RefcountBlockOutsideFile));
        }
        if rc.blocks.len() >= MAX_CACHED_REFBLOCKS {
            // Blocks are written through, so every cached one is clean here.
            rc.blocks.retain(|_, blk| blk.dirty.is_some());
        }
        let mut data = vec![0u8; cs as usize];
        io.read_exact(&mut data, off)?;
        let rc = self.rc()?;
        rc.blocks.insert(b, RefBlock { offset: off, data, dirty: None });
        Ok(true)
    }

    /// The refcount of the cluster at host offset `host`.
    pub fn refcount(&mut self, io: &Io<'_>, host: u64) -> Result<u64, DiskError> {
        let epb = self.entries_per_block();
        let c = host >> self.cluster_bits;
        if !self.load_block(io, c / epb)? {
            return Ok(0);
        }
        let rc = self.rc()?;
        let order = rc.order;
        Ok(rc.blocks.get(&(c / epb)).map(|blk| rc_get(&blk.data, order, c % epb)).unwrap_or(0))
    }

    /// Sets a refcount in memory (the block must exist); write with `write_blocks`.
    fn set_refcount_mem(&mut self, host: u64, value: u64) -> Result<(), DiskError> {
        let epb = self.entries_per_block();
        let c = host >> self.cluster_bits;
        let rc = self.rc()?;
        let order = rc.order;
        let Some(blk) = rc.blocks.get_mut(&(c / epb)) else {
            return Err(corrupt("write", host, Qcow2Error::RefcountBlockMissing));
        };
        let (lo, hi) = rc_set(&mut blk.data, order, c % epb, value);
        blk.dirty = Some(match blk.dirty {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
        Ok(())
    }

    /// Sets a refcount, creating its refcount block if needed, and writes it.
    fn set_refcount(&mut self, io: &Io<'_>, host: u64, value: u64) -> Result<(), DiskError> {
        let b = (host >> self.cluster_bits) / self.entries_per_block();
        if !self.load_block(io, b)? {
            self.create_block(io, b)?;
        }
        self.set_refcount_mem(host, value)?;
        self.write_blocks(io)
    }

    /// Writes the changed parts of every refcount block.
    fn write_blocks(&mut self, io: &Io<'_>) -> Result<(), DiskError> {
        let rc = self.rc()?;
        let mut dirty: Vec<u64> =
            rc.blocks.iter().filter(|(_, blk)| blk.dirty.is_some()).map(|(&b, _)| b).collect();
        dirty.sort_unstable();
        for b in dirty {
            if let Some(blk) = rc.blocks.get_mut(&b) {
                if let Some((lo, hi)) = blk.dirty.take() {
                    io.write(&blk.data[lo..hi], blk.offset + lo as u64)?;
                }
            }
        }
        Ok(())
    }

    /// Allocates refcount block `b` at the end of the file and hooks it into the table.
    fn create_block(&mut self, io: &Io<'_>, b: u64) -> Result<(), DiskError> {
        let cs = self.cs();
        let epb = self.entries_per_block();
        if b as usize >= self.rc()?.table.len() {
            self.grow_table(io, b + 1)?;
            if self.load_block(io, b)? {
                return Ok(());
            }
        }
        let rc = self.rc()?;
        let at = rc.end;
        rc.end += cs;
        rc.table[b as usize] = at;
        rc.blocks.insert(b, RefBlock { offset: at, data: vec![0; cs as usize], dirty: None });
        // The new block's own refcount lives in itself or in another (maybe new) block.
        let own = (at >> self.cluster_bits) / epb;
        if own != b && !self.load_block(io, own)? {
            self.create_block(io, own)?;
        }
        self.set_refcount_mem(at, 1)?;
        let rc = self.rc()?;
        if let Some(blk) = rc.blocks.get_mut(&b) {
            blk.dirty = Some((0, cs as usize));
        }
        let table_offset = rc.table_offset;
        self.write_blocks(io)?;
        io.write(&at.to_be_bytes(), table_offset + b * 8)?;
        self.file_len = self.file_len.max(at + cs);
        Ok(())
    }

    /// Moves the refcount table to a bigger one at the end of the file.
    fn grow_table(&mut self, io: &Io<'_>, min_entries: u64) -> Result<(), DiskError> {
        let cs = self.cs();
        let rc = self.rc()?;
        let per_cluster = cs / 8;
        let entries =
            min_entries.max(rc.table.len() as u64 * 2).div_ceil(per_cluster) * per_cluster;
        let clusters = entries / per_cluster;
        if clusters * cs > super::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(fail(
                DiskErrorKind::UnsupportedFeature,
                "write",
                Qcow2Error::ImageTooLarge,
            ));
        }
        let old_offset = rc.table_offset;
        let old_clusters = rc.table_clusters;
        let new_offset = rc.end;
        rc.end += clusters * cs;
        rc.table.resize(entries as usize, 0);
        rc.table_offset = new_offset;
        rc.table_clusters = clusters;
        // Refcounts for the new table (may create blocks, whose entries land in the new table).
        for i in 0..clusters {
            self.set_refcount(io, new_offset + i * cs, 1)?;
        }
        let rc = self.rc()?;
        let raw: Vec<u8> = rc.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        io.write(&raw, new_offset)?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        io.write(&hdr, super::header::field::REFCOUNT_TABLE)?;
        self.file_len = self.file_len.max(new_offset + clusters * cs);
        for i in 0..old_clusters {
            self.decref(io, old_offset + i * cs, false)?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters at the end of the file with refcount 1 (written
    /// before returning). The caller writes them before pointing anything at them.
    pub fn alloc(&mut self, io: &Io<'_>, n: u64) -> Result<u64, DiskError> {
        let cs = self.cs();
        let epb = self.entries_per_block();
        // Create the refcount blocks the run needs first: they go at the end, before it.
        loop {
            let start = self.rc()?.end;
            let first = (start >> self.cluster_bits) / epb;
            let last = ((start + (n - 1) * cs) >> self.cluster_bits) / epb;
            let mut missing = None;
            for b in first..=last {
                if !self.load_block(io, b)? {
                    missing = Some(b);
                    break;
                }
            }
            match missing {
                Some(b) => self.create_block(io, b)?,
                None => break,
            }
        }
        let start = self.rc()?.end;
        for i in 0..n {
            self.set_refcount_mem(start + i * cs, 1)?;
        }
        self.rc()?.end = start + n * cs;
        self.write_blocks(io)?;
        // The caller writes every allocated cluster before anything points at it.
        self.file_len = self.file_len.max(start + n * cs);
        Ok(start)
    }

    /// Drops one reference to the cluster at `host`; punches a hole when it becomes free and
    /// `punch` is set. The caller has already written the table entry that dropped it.
    pub fn decref(&mut self, io: &Io<'_>, host: u64, punch: bool) -> Result<(), DiskError> {
        let host = host & !(self.cs() - 1);
        let count = self.refcount(io, host)?;
        if count == 0 {
            return Err(corrupt("write", host, Qcow2Error::RefcountUnderflow));
        }
        self.set_refcount_mem(host, count - 1)?;
        self.write_blocks(io)?;
        if count == 1 && punch {
            io.punch(host, self.cs());
        }
        Ok(())
    }
}
