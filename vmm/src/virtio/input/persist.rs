//! Saved state of virtio-input: kind, configuration selector and the events the driver
//! has not taken yet (its queues are the transport's).

use serde::{Deserialize, Serialize};

use super::device::EVENT_SIZE;

/// Saved state of a virtio-input device: its kind (checked), the configuration selector,
/// the events the driver has not taken yet, and whether it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputState {
    pub kind: u8,
    pub select: u8,
    pub subsel: u8,
    pub backlog: Vec<[u8; EVENT_SIZE]>,
    pub active: bool,
}

#[cfg(test)]
mod tests {
    use super::InputState;
    use crate::testing::assert_golden;

    const INPUT_STATE_HEX: &str = "011103020000000000000001001e0001000000000000000000000001";

    #[test]
    fn input_state_bytes_are_unchanged() {
        let state = InputState {
            kind: 1,
            select: 0x11,
            subsel: 3,
            // KEY_A down, SYN_REPORT: type, code (u16), value (u32), little-endian.
            backlog: vec![[1, 0, 30, 0, 1, 0, 0, 0], [0; 8]],
            active: true,
        };
        assert_golden(&state, INPUT_STATE_HEX);
    }
}
