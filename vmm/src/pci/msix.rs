//! MSI-X for any PCI function (PCI Local Bus 3.0 section 6.8.2): the capability's bytes, the
//! vector table and the pending-bit array (PBA), and which message a raised vector sends.
//!
//! ```text
//!  capability (config space)  message control: enable, function mask; table/PBA offset + BIR
//!  table (in a BAR)           per vector: address low, address high, data, vector control
//!  PBA   (in a BAR)           one bit per vector raised while masked
//!  trigger(v) ─ masked? ─yes─▶ pending[v]      unmask ─▶ take_ready() ─▶ messages to send
//!              └─no──▶ MsixMessage to send
//! ```
//! A function with bus mastering off may send no message (an MSI is a memory write): its
//! vectors pend as if masked and go out once it is on again ([`MsixTable::set_bus_master`]).
//! The table knows nothing of who raises vectors or how messages reach the interrupt
//! controller: the device maps its events to vectors and sends what [`MsixTable::trigger`]
//! and [`MsixTable::take_ready`] return, outside its own locks.

use serde::{Deserialize, Serialize};

use super::PciError;

/// The MSI-X capability id.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control bits (the high half of the capability's first dword).
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// The capability body after id and next pointer: message control (table size - 1), table
/// offset | BIR, PBA offset | BIR. Offsets must be 8-aligned; `bar` is the BAR index holding
/// both. Enable and function mask are the bits the driver may write: [`CONTROL_ENABLE`] |
/// [`CONTROL_FUNCTION_MASK`] in the high half of the capability's first dword.
pub fn capability_body(vectors: u16, bar: u8, table_offset: u32, pba_offset: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(10);
    body.extend_from_slice(&vectors.saturating_sub(1).to_le_bytes());
    body.extend_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
    body.extend_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
    body
}

/// One message to send: write `data` to `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }

    fn message(&self) -> MsixMessage {
        MsixMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// The table, the PBA and the capability's enable and function-mask bits, saved. Each entry
/// is address low, address high, data, vector control.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixTableState {
    pub entries: Vec<[u32; 4]>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_mask: bool,
}

/// An MSI-X table of a fixed number of vectors, every one masked at reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_mask: bool,
    /// Bus mastering is off (the command register's, not saved with the table).
    no_bus_master: bool,
}

impl MsixTable {
    pub fn new(vectors: usize) -> MsixTable {
        MsixTable {
            entries: vec![Entry { control: ENTRY_MASKED, ..Default::default() }; vectors],
            pending: vec![false; vectors],
            enabled: false,
            function_mask: false,
            no_bus_master: false,
        }
    }

    /// The number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Takes the enable and function-mask bits of the capability's message control word.
    /// Unmasking may make pending vectors ready: see [`MsixTable::take_ready`].
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_mask = control & CONTROL_FUNCTION_MASK != 0;
    }

    /// Follows the function's bus-master enable (command bit 2): while it is off, raised
    /// vectors pend; once it is on, pending unmasked ones are ready
    /// ([`MsixTable::take_ready`]).
    pub fn set_bus_master(&mut self, on: bool) {
        self.no_bus_master = !on;
    }

    /// Raises `vector`: its message to send now, or None when MSI-X is off, the vector does
    /// not exist, or it is masked or bus mastering is off (then it is pending until both
    /// are undone).
    pub fn trigger(&mut self, vector: u16) -> Option<MsixMessage> {
        if !self.enabled {
            return None;
        }
        let v = usize::from(vector);
        let entry = *self.entries.get(v)?;
        if self.function_mask || self.no_bus_master || entry.masked() {
            self.pending[v] = true;
            return None;
        }
        Some(entry.message())
    }

    /// The messages of pending vectors that are no longer masked, their pending bits cleared.
    pub fn take_ready(&mut self) -> Vec<MsixMessage> {
        if !self.enabled || self.function_mask || self.no_bus_master {
            return Vec::new();
        }
        let mut ready = Vec::new();
        for (entry, pending) in self.entries.iter().zip(self.pending.iter_mut()) {
            if *pending && !entry.masked() {
                *pending = false;
                ready.push(entry.message());
            }
        }
        ready
    }

    /// Forgets every pending vector (a device reset).
    pub fn clear_pending(&mut self) {
        self.pending.fill(false);
    }

    /// A dword or aligned qword read at `offset` in the table; anything else reads 0.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(e) = usize::try_from(offset / ENTRY_SIZE).ok().and_then(|i| self.entries.get(i))
        else {
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let word = ((offset % ENTRY_SIZE) / 4) as usize;
        match data.len() {
            4 if offset & 3 == 0 => data.copy_from_slice(&words[word].to_le_bytes()),
            8 if offset & 7 == 0 => {
                data[..4].copy_from_slice(&words[word].to_le_bytes());
                data[4..].copy_from_slice(&words[word + 1].to_le_bytes());
            }
            _ => {}
        }
    }

    /// A dword or aligned qword write at `offset` in the table; anything else is ignored.
    /// Unmasking may make pending vectors ready: see [`MsixTable::take_ready`].
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let word = ((offset % ENTRY_SIZE) / 4) as usize;
        let dword = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let values: Vec<u32> = match data.len() {
            4 if offset & 3 == 0 => vec![dword(data)],
            8 if offset & 7 == 0 => vec![dword(&data[..4]), dword(&data[4..])],
            _ => return,
        };
        let Some(e) =
            usize::try_from(offset / ENTRY_SIZE).ok().and_then(|i| self.entries.get_mut(i))
        else {
            return;
        };
        for (i, v) in values.into_iter().enumerate() {
            match word + i {
                0 => e.addr_lo = v,
                1 => e.addr_hi = v,
                2 => e.data = v,
                // Only the mask bit of vector control is writable.
                _ => e.control = v & ENTRY_MASKED,
            }
        }
    }

    /// A read at `offset` in the PBA: one bit per vector, little-endian; past the end 0.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, byte) in data.iter_mut().enumerate() {
            for bit in 0..8u64 {
                let pending = offset
                    .checked_add(i as u64)
                    .and_then(|b| b.checked_mul(8))
                    .and_then(|v| usize::try_from(v + bit).ok())
                    .and_then(|v| self.pending.get(v).copied())
                    .unwrap_or(false);
                if pending {
                    *byte |= 1 << bit;
                }
            }
        }
    }

    pub fn save(&self) -> MsixTableState {
        MsixTableState {
            entries: self
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_mask: self.function_mask,
        }
    }

    /// The table again from untrusted saved state, which must have this table's size.
    pub fn restored(&self, saved: &MsixTableState) -> Result<MsixTable, PciError> {
        if saved.entries.len() != self.len() || saved.pending.len() != self.len() {
            let ours = self.len();
            let saved = [saved.entries.len(), saved.pending.len()].into_iter().find(|&n| n != ours);
            return Err(PciError::MsixTableSize { saved: saved.unwrap_or(ours), ours });
        }
        Ok(MsixTable {
            entries: saved
                .entries
                .iter()
                .map(|e| Entry {
                    addr_lo: e[0],
                    addr_hi: e[1],
                    data: e[2],
                    control: e[3] & ENTRY_MASKED,
                })
                .collect(),
            pending: saved.pending.clone(),
            enabled: saved.enabled,
            function_mask: saved.function_mask,
            no_bus_master: self.no_bus_master,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    const ADDR: u64 = 0x1_fee0_1000;

    /// A two-vector table, enabled, vector 1 programmed with `data` and unmasked.
    fn table(data: u32) -> MsixTable {
        let mut t = MsixTable::new(2);
        t.set_control(CONTROL_ENABLE);
        t.write_table(ENTRY_SIZE, &ADDR.to_le_bytes());
        t.write_table(ENTRY_SIZE + 8, &data.to_le_bytes());
        t.write_table(ENTRY_SIZE + 12, &0u32.to_le_bytes());
        t
    }

    fn pba(t: &MsixTable) -> u64 {
        let mut b = [0u8; 8];
        t.read_pba(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn capability_body_has_size_minus_one_and_bir_in_both_offsets() {
        let body = capability_body(3, 2, 0x3000, 0x3800);
        assert_eq!(body, [2, 0, 0x02, 0x30, 0, 0, 0x02, 0x38, 0, 0]);
    }

    #[test]
    fn unmasked_vector_sends_its_message() {
        let mut t = table(0x41);
        assert_eq!(t.trigger(1), Some(MsixMessage { address: ADDR, data: 0x41 }));
        assert_eq!(pba(&t), 0);
    }

    #[test]
    fn vectors_start_masked_and_masked_vectors_are_pending_until_unmasked() {
        let mut t = table(0x41);
        assert_eq!(t.trigger(0), None, "vector 0 was never unmasked");
        assert_eq!(pba(&t), 0b01);
        t.write_table(12, &0u32.to_le_bytes());
        assert_eq!(t.take_ready(), vec![MsixMessage { address: 0, data: 0 }]);
        assert_eq!(pba(&t), 0);
        assert!(t.take_ready().is_empty(), "sent once");
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let mut t = table(0x41);
        t.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(t.trigger(1), None);
        assert!(t.take_ready().is_empty());
        t.set_control(CONTROL_ENABLE);
        assert_eq!(t.take_ready(), vec![MsixMessage { address: ADDR, data: 0x41 }]);
    }

    #[test]
    fn without_bus_mastering_vectors_pend_and_are_sent_once_it_is_on() {
        let mut t = table(0x41);
        t.set_bus_master(false);
        assert_eq!(t.trigger(1), None, "no message without bus mastering");
        assert_eq!(pba(&t), 0b10);
        assert!(t.take_ready().is_empty(), "unmasked, but still no bus mastering");
        t.set_bus_master(true);
        assert_eq!(t.take_ready(), vec![MsixMessage { address: ADDR, data: 0x41 }]);
        assert_eq!(t.trigger(1), Some(MsixMessage { address: ADDR, data: 0x41 }));
    }

    #[test]
    fn disabled_msix_and_missing_vectors_send_nothing() {
        let mut t = table(0x41);
        assert_eq!(t.trigger(2), None);
        assert_eq!(t.trigger(0xffff), None);
        t.set_control(0);
        assert_eq!(t.trigger(1), None);
        assert_eq!(pba(&t), 0, "nothing pends while MSI-X is off");
    }

    #[test]
    fn table_reads_dwords_and_qwords_and_ignores_odd_accesses() {
        let mut t = table(0x41);
        let mut q = [0u8; 8];
        t.read_table(ENTRY_SIZE, &mut q);
        assert_eq!(u64::from_le_bytes(q), ADDR);
        let mut d = [0u8; 4];
        t.read_table(ENTRY_SIZE + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x41);
        t.write_table(ENTRY_SIZE + 12, &0xffff_ffffu32.to_le_bytes());
        t.read_table(ENTRY_SIZE + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "only the mask bit is writable");
        t.write_table(ENTRY_SIZE + 1, &[0xff; 4]);
        t.write_table(ENTRY_SIZE, &[0xff; 2]);
        t.write_table(100 * ENTRY_SIZE, &[0xff; 4]);
        t.write_table(u64::MAX - 3, &[0xff; 4]);
        t.read_table(ENTRY_SIZE, &mut q);
        assert_eq!(u64::from_le_bytes(q), ADDR);
        t.read_table(u64::MAX - 7, &mut q);
        assert_eq!(q, [0; 8]);
        t.read_pba(u64::MAX, &mut q);
        assert_eq!(q, [0; 8]);
    }

    #[test]
    fn saved_table_comes_back_and_one_of_another_size_is_refused() {
        let mut t = table(0x41);
        t.trigger(0);
        let saved = t.save();
        assert_eq!(MsixTable::new(2).restored(&saved).unwrap(), t);
        assert!(MsixTable::new(3).restored(&saved).is_err());
        let mut short = saved.clone();
        short.pending.pop();
        assert!(MsixTable::new(2).restored(&short).is_err());
        let mut wild = saved;
        wild.entries[1][3] = 0xffff_fffe;
        let restored = MsixTable::new(2).restored(&wild).unwrap();
        assert_eq!(restored.save().entries[1][3], 0, "reserved control bits are dropped");
    }
}
