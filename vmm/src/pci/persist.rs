//! Saved state of the PCI root's configuration-port adapter, and the PCI bus as format-1
//! snapshots hold it.
//!
//! Format 2 saves each function under its own id (`pci/00:03.0`, the board's choice) with
//! the function's own encoding; [`PciRootStateV1`] is the positional form of format 1 (one
//! entry per device number on bus 0), read by `board::pc::v1`. Neither layout may change,
//! or old snapshots stop restoring.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Saved state of bus 0 in v1 snapshots: slot `i` holds function 00:i.0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PciRootStateV1 {
    /// Each device's own encoded state (bytes, not a sequence: large states decode fast).
    pub slots: Vec<Option<ByteBuf>>,
}

/// Saved state of the configuration port adapter: the latched CONFIG_ADDRESS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    pub address: u32,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;
    use crate::state;

    /// `sample_v1()` encoded by the code before the state was keyed (captured from it).
    const V1_GOLDEN: &str = "20000000000000000104000000000000008680570d0000010300000000000000\
                             01020300000000000000000000000000000000000000000000000000000000";
    const CONFIG_IO_GOLDEN: &str = "10180080";

    fn sample_v1() -> PciRootStateV1 {
        let mut slots = vec![None; 32];
        slots[0] = Some(ByteBuf::from(vec![0x86, 0x80, 0x57, 0x0d]));
        slots[3] = Some(ByteBuf::from(vec![1, 2, 3]));
        PciRootStateV1 { slots }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn v1_state_encodes_to_the_bytes_old_snapshots_hold() {
        assert_eq!(hex(&state::encode("pci", &sample_v1()).unwrap()), V1_GOLDEN);
        let decoded: PciRootStateV1 = state::decode("pci", &unhex(V1_GOLDEN)).unwrap();
        assert_eq!(decoded, sample_v1());
        let io = PciConfigIoState { address: 0x8000_1810 };
        assert_eq!(hex(&state::encode("pci", &io).unwrap()), CONFIG_IO_GOLDEN);
        let decoded: PciConfigIoState = state::decode("pci", &unhex(CONFIG_IO_GOLDEN)).unwrap();
        assert_eq!(decoded, io);
    }
}
