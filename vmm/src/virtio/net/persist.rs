//! Saved state of virtio-net (its queues are the transport's).

use serde::{Deserialize, Serialize};

/// Saved state of a network device: what the guest was told (MAC and MTU, checked against
/// the restored machine's device; link status), the features it accepted, whether it runs,
/// the frame received from the host but not yet given to the guest (empty: none; a frame
/// is at least 14 bytes), and the backend's own opaque state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub mtu: u16,
    pub link_up: bool,
    pub acked_features: u64,
    pub active: bool,
    #[serde(with = "serde_bytes")]
    pub pending_rx: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub backend_state: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::NetState;
    use crate::testing::assert_golden;

    const NET_STATE_HEX: &str = concat!(
        "525400123456dc0501208000000100000001",
        "0e00000000000000ffffffffffff5254001234560800",
        "0300000000000000010203",
    );

    #[test]
    fn net_state_bytes_are_unchanged() {
        let mut pending_rx = vec![0xff; 6];
        pending_rx.extend([0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x00]);
        let state = NetState {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: 1500,
            link_up: true,
            acked_features: 0x1_0000_8020,
            active: true,
            pending_rx,
            backend_state: vec![1, 2, 3],
        };
        assert_golden(&state, NET_STATE_HEX);
    }
}
