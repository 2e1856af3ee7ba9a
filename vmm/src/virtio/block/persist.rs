//! Saved state of virtio-blk (its queue is the transport's).

use serde::{Deserialize, Serialize};

/// Saved state of a block device: what the guest was told about the disk (checked against
/// the disk of the restored machine) and whether it runs. The queue is the transport's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub id: Vec<u8>,
    pub active: bool,
}

#[cfg(test)]
mod tests {
    use super::BlockState;
    use crate::testing::assert_golden;

    const BLOCK_STATE_HEX: &str =
        "200000000100000001140000000000000068757463682d6469736b2d30000000000000000001";

    #[test]
    fn block_state_bytes_are_unchanged() {
        let mut id = b"hutch-disk-0".to_vec();
        id.resize(20, 0);
        let state =
            BlockState { capacity_sectors: 0x1_0000_0020, read_only: true, id, active: true };
        assert_golden(&state, BLOCK_STATE_HEX);
    }
}
