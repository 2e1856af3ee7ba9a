//! Saved state of bochs-display: configuration space, the DISPI registers, the framebuffer
//! byte order and the framebuffer up to its last used page. The EDID and the ROM come back
//! from the board's construction.

use serde::{Deserialize, Serialize};

use super::dispi::{DispiRegisters, NUM_REGISTERS};
use super::BochsDisplay;
use crate::devices::bus::lock;
use crate::state::StateError;

pub(super) const DEVICE: &str = "bochs-display";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BochsDisplayState {
    pub config: Vec<u32>,
    /// ID through Y_OFFSET, as the guest wrote them.
    pub dispi: Vec<u16>,
    pub big_endian_framebuffer: bool,
    #[serde(with = "serde_bytes")]
    pub framebuffer: Vec<u8>,
}

impl BochsDisplay {
    /// Read the framebuffer part only while the guest is paused (vCPUs write it unlocked).
    pub fn save(&self) -> BochsDisplayState {
        BochsDisplayState {
            config: self.config.registers(),
            dispi: self.dispi.registers().to_vec(),
            big_endian_framebuffer: self.big_endian_framebuffer,
            framebuffer: lock(&self.scanout.framebuffer).used_contents().to_vec(),
        }
    }

    /// Checks everything before it changes anything; then shows the restored mode (the sink
    /// hears of it) and rescans the framebuffer in full.
    pub fn restore(&mut self, state: &BochsDisplayState) -> Result<(), StateError> {
        let registers: [u16; NUM_REGISTERS] = state.dispi.as_slice().try_into().map_err(|_| {
            StateError::invalid(
                DEVICE,
                format!("{} DISPI registers, not {NUM_REGISTERS}", state.dispi.len()),
            )
        })?;
        let mut framebuffer = lock(&self.scanout.framebuffer);
        let (saved, have) = (state.framebuffer.len(), framebuffer.len());
        if saved > have {
            let reason = format!("{saved} framebuffer bytes saved, it has {have}");
            return Err(StateError::invalid(DEVICE, reason));
        }
        self.config
            .restore_registers(&state.config)
            .map_err(|e| StateError::rejected(DEVICE, e))?;
        framebuffer.restore_contents(&state.framebuffer)?;
        drop(framebuffer);
        self.dispi = DispiRegisters::from_registers(registers);
        self.big_endian_framebuffer = state.big_endian_framebuffer;
        self.shown = None;
        self.scanout.live.store(false, std::sync::atomic::Ordering::SeqCst);
        self.update_mode();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_golden;

    #[test]
    fn state_encodes_to_fixed_bytes() {
        let state = BochsDisplayState {
            config: vec![0x1111_1234, 0x0000_0002],
            dispi: vec![0xb0c5, 1024, 768, 32, 0x41, 0, 1024, 768, 0, 0],
            big_endian_framebuffer: false,
            framebuffer: vec![0xff, 0x00, 0x80],
        };
        assert_golden(&state, GOLDEN);
    }

    const GOLDEN: &str = "020000000000000034121111020000000a00000000000000c5b0000400032000410000000004000300000000000300000000000000ff0080";
}
