//! Saved state of the CMOS RTC (the snapshot's `pc/rtc`).

use serde::{Deserialize, Serialize};

/// Saved state of the RTC: the selected register, the CMOS bytes and the guest's offset
/// from the host clock (the time itself is read live from the host after a restore).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RtcState {
    pub index: u8,
    /// 128 bytes.
    pub nvram: Vec<u8>,
    pub offset_secs: i64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::RtcState;
    use crate::devices::bus::BusDevice;
    use crate::devices::rtc::Rtc;
    use crate::state::{self, StateError};
    use crate::testing::{assert_golden, assert_hostile_state_is_refused_or_runs};

    const RTC_STATE_HEX: &str = concat!(
        "0b8000000000000000000102030405060708090a0b0c0d0e0f101112131415161718",
        "191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a",
        "3b3c3d3e3f404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c",
        "5d5e5f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e",
        "7ff0f1ffffffffffff",
    );

    fn sample_rtc_state() -> RtcState {
        RtcState { index: 0x0b, nvram: (0..128).collect(), offset_secs: -3600 }
    }

    #[test]
    fn rtc_state_bytes_are_unchanged() {
        assert_golden(&sample_rtc_state(), RTC_STATE_HEX);
    }

    /// What restoring the snapshot's `pc/rtc` bytes does.
    fn restore(dev: &mut Rtc, bytes: &[u8]) -> Result<(), StateError> {
        dev.restore_state(&state::decode("rtc", bytes)?)
    }

    #[test]
    fn truncated_or_garbled_rtc_state_is_an_error_not_a_panic() {
        let bytes = state::encode("rtc", &sample_rtc_state()).unwrap();
        // What the checks let through must still run: every register, read and set.
        let exercise = |dev: &mut Rtc| {
            let mut b = [0u8];
            for index in 0..0x80 {
                dev.write(0, &[index]);
                dev.read(1, &mut b);
                dev.write(1, &b);
            }
        };
        assert_hostile_state_is_refused_or_runs(
            &bytes,
            Rtc::new,
            Rtc::save_state,
            restore,
            exercise,
        );
    }
}
