//! fw_cfg DMA: the guest writes the guest-physical address of a control structure
//! {BE u32 control, BE u32 length, BE u64 address}; the device selects, reads, skips or writes
//! as the control word says, then stores the control word back as 0 or ERROR.
//!
//! QEMU's engine (`fw_cfg_dma_transfer`) with one difference on purpose: the whole guest range
//! is checked before any byte moves, so a refused transfer writes nothing (QEMU may have
//! written part of it). A read past the item's end fills zeros, a write past a writable
//! file's end or into a read-only item is an ERROR, as in QEMU.

use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use super::FwCfg;

pub const DMA_CTL_ERROR: u32 = 0x01;
pub const DMA_CTL_READ: u32 = 0x02;
pub const DMA_CTL_SKIP: u32 = 0x04;
pub const DMA_CTL_SELECT: u32 = 0x08;
pub const DMA_CTL_WRITE: u32 = 0x10;

/// Size of the control structure in guest memory.
pub const DMA_ACCESS_LEN: u64 = 16;

/// Zeros are written in chunks of this size (a read far past an item's end may be long).
const ZERO_CHUNK: usize = 4096;

enum Direction {
    Read,
    Write,
    Skip,
}

impl FwCfg {
    /// Runs the transfer whose control structure `dma_address` names; the latch is cleared
    /// first, as QEMU does (SeaBIOS writes only the low half next time).
    pub(super) fn dma_transfer(&mut self) {
        let access_addr = std::mem::take(&mut self.dma_address);
        if !self.guest_range_fits(access_addr, DMA_ACCESS_LEN) {
            // QEMU tries to report the ERROR at the control word anyway; it lands only if
            // those four bytes are memory.
            self.store_control(access_addr, DMA_CTL_ERROR);
            return;
        }
        let mut raw = [0u8; DMA_ACCESS_LEN as usize];
        if self.memory.read_slice(&mut raw, GuestAddress(access_addr)).is_err() {
            self.store_control(access_addr, DMA_CTL_ERROR);
            return;
        }
        let control = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let length = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let mut address = [0u8; 8];
        address.copy_from_slice(&raw[8..16]);
        let address = u64::from_be_bytes(address);

        if control & DMA_CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        // QEMU's precedence when several bits are set.
        let direction = if control & DMA_CTL_READ != 0 {
            Direction::Read
        } else if control & DMA_CTL_WRITE != 0 {
            Direction::Write
        } else if control & DMA_CTL_SKIP != 0 {
            Direction::Skip
        } else {
            // Only a selection (or nothing): done.
            self.store_control(access_addr, 0);
            return;
        };
        let result = match direction {
            Direction::Read => self.dma_read(address, length),
            Direction::Write => self.dma_write(address, length),
            Direction::Skip => {
                let remaining = self.remaining();
                self.offset += length.min(remaining);
                0
            }
        };
        self.store_control(access_addr, result);
    }

    /// Bytes of the selected item after the offset (0 for a key that names nothing).
    fn remaining(&self) -> u32 {
        let len = self.selected().map_or(0, |d| d.len() as u32);
        len.saturating_sub(self.offset)
    }

    /// Copies item bytes to guest memory, then zeros for whatever lies past the item's end.
    fn dma_read(&mut self, address: u64, length: u32) -> u32 {
        if !self.guest_range_fits(address, u64::from(length)) {
            return DMA_CTL_ERROR;
        }
        let copied = length.min(self.remaining());
        let start = self.offset as usize;
        if copied > 0 {
            let Some(bytes) = self.selected().and_then(|d| d.get(start..start + copied as usize))
            else {
                return DMA_CTL_ERROR;
            };
            if self.memory.write_slice(bytes, GuestAddress(address)).is_err() {
                return DMA_CTL_ERROR;
            }
            self.offset += copied;
        }
        let zeros = [0u8; ZERO_CHUNK];
        let mut at = address + u64::from(copied);
        let mut left = (length - copied) as usize;
        while left > 0 {
            let n = left.min(ZERO_CHUNK);
            if self.memory.write_slice(&zeros[..n], GuestAddress(at)).is_err() {
                return DMA_CTL_ERROR;
            }
            at += n as u64;
            left -= n;
        }
        0
    }

    /// Copies guest memory into the selected file: only a writable file, only within it.
    fn dma_write(&mut self, address: u64, length: u32) -> u32 {
        if length == 0 {
            return 0;
        }
        if !self.guest_range_fits(address, u64::from(length)) {
            return DMA_CTL_ERROR;
        }
        let start = self.offset as usize;
        let Some(file) = Self::file_index(self.selector).and_then(|i| self.files.get_mut(i)) else {
            return DMA_CTL_ERROR;
        };
        if !file.writable {
            return DMA_CTL_ERROR;
        }
        let Some(target) =
            start.checked_add(length as usize).and_then(|end| file.data.get_mut(start..end))
        else {
            return DMA_CTL_ERROR;
        };
        if self.memory.read_slice(target, GuestAddress(address)).is_err() {
            return DMA_CTL_ERROR;
        }
        self.offset += length;
        0
    }

    /// `len` bytes at `addr` are all guest memory, and the range does not wrap.
    fn guest_range_fits(&self, addr: u64, len: u64) -> bool {
        if addr.checked_add(len).is_none() {
            return false;
        }
        // `check_range` walks contiguous regions; a hole in between fails it.
        len == 0 || self.memory.check_range(GuestAddress(addr), len as usize)
    }

    /// Writes the control word back, big-endian; a control word outside memory is dropped.
    fn store_control(&self, access_addr: u64, control: u32) {
        if self.guest_range_fits(access_addr, 4) {
            let _ = self.memory.write_slice(&control.to_be_bytes(), GuestAddress(access_addr));
        }
    }
}
