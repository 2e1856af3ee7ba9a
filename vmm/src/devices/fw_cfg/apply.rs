//! Test-only: runs a table-loader script the way OVMF (`QemuFwCfgAcpi.c`) and SeaBIOS
//! (`romfile_loader.c`) do, through the real device's ports and DMA into real guest memory, so
//! tests can walk the RSDP → XSDT → tables chain the guest OS would find.
#![allow(clippy::unwrap_used)] // A firmware that cannot go on fails the test.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress};

use super::dma::{DMA_CTL_READ, DMA_CTL_SELECT, DMA_CTL_SKIP, DMA_CTL_WRITE};
use super::loader::{AllocZone, LoaderCommand, LOADER_ENTRY_SIZE};
use super::{keys, FwCfg, FILE_NAME_SIZE};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

/// The F segment SeaBIOS allocates FSEG files from.
pub const FSEG_START: u64 = 0xe0000;
pub const FSEG_END: u64 = 0x100000;

/// A firmware's view of fw_cfg: the directory, and where it put each allocated file.
pub struct FakeFirmware<'a> {
    pub fw_cfg: &'a mut FwCfg,
    pub memory: GuestMemory,
    /// The DMA control structure and a small bounce buffer live here.
    scratch: u64,
    high_next: u64,
    fseg_next: u64,
    /// Allocated files: guest address and length.
    pub placed: BTreeMap<String, (u64, usize)>,
}

impl<'a> FakeFirmware<'a> {
    /// `high` is where HIGH allocations start; `scratch` 4 KiB the firmware owns.
    pub fn new(fw_cfg: &'a mut FwCfg, memory: GuestMemory, high: u64, scratch: u64) -> Self {
        FakeFirmware {
            fw_cfg,
            memory,
            scratch,
            high_next: high,
            fseg_next: FSEG_START,
            placed: BTreeMap::new(),
        }
    }

    /// One DMA transfer; returns the control word the device stored back.
    pub fn dma(&mut self, control: u32, length: u32, address: u64) -> u32 {
        let mut access = [0u8; 16];
        access[0..4].copy_from_slice(&control.to_be_bytes());
        access[4..8].copy_from_slice(&length.to_be_bytes());
        access[8..16].copy_from_slice(&address.to_be_bytes());
        self.memory.write_slice(&access, GuestAddress(self.scratch)).unwrap();
        // OVMF writes both halves; the high one is 0 here.
        self.fw_cfg.write(4, &((self.scratch >> 32) as u32).to_be_bytes());
        self.fw_cfg.write(8, &(self.scratch as u32).to_be_bytes());
        let stored: [u8; 4] = self.memory.read_obj(GuestAddress(self.scratch)).unwrap();
        u32::from_be_bytes(stored)
    }

    /// (key, size) of a file, from the directory read over DMA.
    pub fn find_file(&mut self, name: &str) -> Option<(u16, usize)> {
        let buf = self.scratch + 0x100;
        assert_eq!(
            self.dma((u32::from(keys::FILE_DIR) << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 4, buf),
            0
        );
        let count: [u8; 4] = self.memory.read_obj(GuestAddress(buf)).unwrap();
        for _ in 0..u32::from_be_bytes(count) {
            assert_eq!(self.dma(DMA_CTL_READ, 64, buf), 0);
            let mut entry = [0u8; 64];
            self.memory.read_slice(&mut entry, GuestAddress(buf)).unwrap();
            let size = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]) as usize;
            let key = u16::from_be_bytes([entry[4], entry[5]]);
            let field = &entry[8..8 + FILE_NAME_SIZE];
            let len = field.iter().position(|&b| b == 0).unwrap();
            if &field[..len] == name.as_bytes() {
                return Some((key, size));
            }
        }
        None
    }

    /// Downloads `etc/table-loader` into the host and runs it.
    pub fn run_table_loader(&mut self) {
        let (key, size) = self.find_file("etc/table-loader").expect("no etc/table-loader");
        let buf = self.high_next;
        assert_eq!(
            self.dma((u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_READ, size as u32, buf),
            0
        );
        let mut script = vec![0u8; size];
        self.memory.read_slice(&mut script, GuestAddress(buf)).unwrap();
        self.high_next += size as u64;
        for chunk in script.chunks_exact(LOADER_ENTRY_SIZE) {
            let entry: &[u8; LOADER_ENTRY_SIZE] = chunk.try_into().unwrap();
            match LoaderCommand::decode(entry) {
                Some(command) => self.execute(&command),
                None => continue,
            }
        }
    }

    fn execute(&mut self, command: &LoaderCommand) {
        match command {
            LoaderCommand::Allocate { file, align, zone } => {
                let (key, size) = self.find_file(file).expect("allocated file is missing");
                let next = match zone {
                    AllocZone::High => &mut self.high_next,
                    AllocZone::FSeg => &mut self.fseg_next,
                };
                let addr = next.next_multiple_of(u64::from(*align));
                *next = addr + size as u64;
                if *zone == AllocZone::FSeg {
                    assert!(*next <= FSEG_END, "FSEG is full");
                }
                let control = (u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
                assert_eq!(self.dma(control, size as u32, addr), 0);
                assert!(self.placed.insert(file.clone(), (addr, size)).is_none());
            }
            LoaderCommand::AddPointer { dest_file, src_file, offset, size } => {
                let (dest, dest_len) = self.placed[dest_file];
                let (src, src_len) = self.placed[src_file];
                let size = usize::from(*size);
                assert!(*offset as usize + size <= dest_len);
                let at = GuestAddress(dest + u64::from(*offset));
                let mut value = [0u8; 8];
                self.memory.read_slice(&mut value[..size], at).unwrap();
                let relative = u64::from_le_bytes(value);
                // OVMF refuses a pointer that does not point into its pointee.
                assert!(relative < src_len as u64, "pointer outside {src_file}");
                let absolute = (src + relative).to_le_bytes();
                if size < 8 {
                    assert!(src + relative < 1u64 << (8 * size), "pointer does not fit");
                }
                self.memory.write_slice(&absolute[..size], at).unwrap();
            }
            LoaderCommand::AddChecksum { file, result_offset, start, length } => {
                let (base, len) = self.placed[file];
                assert!(*start as usize + *length as usize <= len);
                let mut range = vec![0u8; *length as usize];
                self.memory.read_slice(&mut range, GuestAddress(base + u64::from(*start))).unwrap();
                // CalculateCheckSum8(): the result byte is assumed zero within the range.
                let sum = range.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
                let at = GuestAddress(base + u64::from(*result_offset));
                self.memory.write_obj(0u8.wrapping_sub(sum), at).unwrap();
            }
            LoaderCommand::WritePointer { dest_file, src_file, offset, src_offset, size } => {
                let (key, _) = self.find_file(dest_file).expect("write-pointer file is missing");
                let (src, _) = self.placed[src_file];
                let value = (src + u64::from(*src_offset)).to_le_bytes();
                let buf = self.scratch + 0x200;
                self.memory.write_slice(&value[..usize::from(*size)], GuestAddress(buf)).unwrap();
                let select = (u32::from(key) << 16) | DMA_CTL_SELECT;
                assert_eq!(self.dma(select | DMA_CTL_SKIP, *offset, 0), 0);
                assert_eq!(self.dma(DMA_CTL_WRITE, u32::from(*size), buf), 0);
            }
        }
    }
}
