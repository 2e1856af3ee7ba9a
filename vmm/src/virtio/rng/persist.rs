//! Saved state of virtio-rng (its queue is the transport's).

use serde::{Deserialize, Serialize};

/// Saved state of the entropy device: only whether it runs (its queue is the transport's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub active: bool,
}

#[cfg(test)]
mod tests {
    use super::RngState;
    use crate::testing::assert_golden;

    const RNG_STATE_HEX: &str = "01";

    #[test]
    fn rng_state_bytes_are_unchanged() {
        assert_golden(&RngState { active: true }, RNG_STATE_HEX);
    }
}
