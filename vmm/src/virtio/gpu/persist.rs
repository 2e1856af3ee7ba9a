//! Saved state of virtio-gpu: resources with their pixels, scanout, cursor, the offered
//! mode (its queues are the transport's).

use serde::{Deserialize, Serialize};

/// A saved 2D resource: its id, virtio format code, size, backing (guest address, length)
/// and the host copy of its pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuResourceState {
    pub id: u32,
    pub format: u32,
    pub width: u32,
    pub height: u32,
    pub backing: Vec<(u64, u32)>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// The cursor image shown, as saved (`format` is a virtio format code).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuCursorState {
    pub width: u32,
    pub height: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    pub format: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub x: u32,
    pub y: u32,
}

/// Saved state of the GPU: resources, scanout 0, cursor, the offered mode and pending
/// display event, and whether it runs. The sink (the screen) is host-side, not state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuState {
    pub resources: Vec<GpuResourceState>,
    pub scanout_resource: u32,
    /// x, y, width, height.
    pub scanout_rect: [u32; 4],
    pub cursor: Option<GpuCursorState>,
    pub cursor_hot: (u32, u32),
    pub preferred: (u32, u32),
    pub events_read: u32,
    pub active: bool,
}

#[cfg(test)]
mod tests {
    use super::{GpuCursorState, GpuResourceState, GpuState};
    use crate::testing::assert_golden;

    const GPU_STATE_HEX: &str = concat!(
        "0100000000000000070000000200000002000000010000000200000000000000",
        "0000200000000000001000000000000001000000080000000800000000000000",
        "0102030405060708070000000000000000000000020000000100000001010000",
        "00010000000000000001000000860000000400000000000000aabbccdd800200",
        "00e0010000030000000400000000050000200300000100000001",
    );

    #[test]
    fn gpu_state_bytes_are_unchanged() {
        let state = GpuState {
            resources: vec![GpuResourceState {
                id: 7,
                format: 2,
                width: 2,
                height: 1,
                backing: vec![(0x20_0000, 4096), (0x1_0000_0000, 8)],
                data: vec![1, 2, 3, 4, 5, 6, 7, 8],
            }],
            scanout_resource: 7,
            scanout_rect: [0, 0, 2, 1],
            cursor: Some(GpuCursorState {
                width: 1,
                height: 1,
                hot_x: 0,
                hot_y: 1,
                format: 134,
                data: vec![0xaa, 0xbb, 0xcc, 0xdd],
                x: 640,
                y: 480,
            }),
            cursor_hot: (3, 4),
            preferred: (1280, 800),
            events_read: 1,
            active: true,
        };
        assert_golden(&state, GPU_STATE_HEX);
    }
}
