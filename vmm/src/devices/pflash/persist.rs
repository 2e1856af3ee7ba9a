//! Saved state of the pflash device.
//!
//! The flash contents are part of the state, on purpose. OVMF's variable driver keeps a copy
//! of the store in guest RAM and appends at the offset it remembers there; NOR programming
//! only clears bits. Restoring guest RAM from time T over a `vars.fd` from a later time would
//! make the driver program new variables over ones written after T: a corrupt store. So a
//! snapshot carries the contents (540 KiB for OVMF's 4 MiB build) and a restore writes them
//! back to the file, as QEMU does (its flash is RAM in the migration stream, rewritten to the
//! drive after loading).

use serde::{Deserialize, Serialize};

/// Where the command state machine is (what the next read returns and the next write means).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PflashMode {
    /// Reads return the array; writes are commands.
    ReadArray,
    /// Reads return the status register; writes are commands. Also the mode after a program
    /// or an erase, until the guest asks for read-array (QEMU's cfi01 does the same).
    ReadStatus,
    /// 0x10/0x40 seen: the next write is the data to program.
    Program,
    /// 0x20 seen at the block starting at `block`: the next write must confirm (0xD0).
    EraseSetup { block: u64 },
}

/// Saved state of the pflash device: its mode, status register and contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PflashState {
    pub mode: PflashMode,
    pub status: u8,
    #[serde(with = "serde_bytes")]
    pub contents: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::{PflashMode, PflashState};
    use crate::testing::assert_golden;

    // mode: variant 3 (u32) + block (u64); status; contents: length (u64) + bytes.
    const PFLASH_STATE_HEX: &str = "030000000010000000000000800200000000000000dead";

    #[test]
    fn pflash_state_bytes_are_unchanged() {
        let state = PflashState {
            mode: PflashMode::EraseSetup { block: 0x1000 },
            status: 0x80,
            contents: vec![0xde, 0xad],
        };
        assert_golden(&state, PFLASH_STATE_HEX);
    }
}
