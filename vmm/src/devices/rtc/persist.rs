//! Saved state of the CMOS RTC (the snapshot's `pc/rtc`), in two formats.
//!
//! Format 1 ([`RtcStateV1`]) is what Hutch wrote before the RTC had interrupts and a SET
//! freeze; snapshots of both formats hold it under `pc/rtc` (format 1's positional machine
//! state too). bincode is not self-describing, so format 2 ([`RtcState`]) starts with a tag
//! byte, [`FORMAT_2_TAG`], that format 1 cannot start with: its first byte is the register
//! index, at most 0x7f in any state the RTC accepts. [`RtcState`]'s decoder reads either and
//! maps format 1 to format 2; it always writes format 2.

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The first byte of a format-2 RTC state.
pub const FORMAT_2_TAG: u8 = 0x82;

/// Format 1 of the RTC's saved state, field for field (read only: old snapshots).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RtcStateV1 {
    pub index: u8,
    /// 128 bytes.
    pub nvram: Vec<u8>,
    pub offset_secs: i64,
}

/// Saved state of the RTC: the selected register, the CMOS bytes, the pending interrupt
/// flags and the guest's offset from the host clock (the time itself is read live from the
/// host after a restore). Encoded as [`FORMAT_2_TAG`] and then the fields in order.
#[derive(Debug, Clone, PartialEq)]
pub struct RtcState {
    pub index: u8,
    /// Bit 7 of the index port.
    pub nmi_masked: bool,
    /// 128 bytes (registers A and B, the alarm, the CMOS RAM).
    pub nvram: Vec<u8>,
    /// Register C.
    pub flags: u8,
    /// Guest time minus host time, in nanoseconds.
    pub offset_ns: i128,
    /// The time shown while updates are stopped (register B's SET), in Unix seconds.
    pub frozen_secs: Option<i64>,
}

impl From<RtcStateV1> for RtcState {
    fn from(v1: RtcStateV1) -> Self {
        RtcState {
            index: v1.index,
            nmi_masked: false,
            nvram: v1.nvram,
            // Format 1 never flagged an interrupt (register C always read 0).
            flags: 0,
            offset_ns: i128::from(v1.offset_secs) * 1_000_000_000,
            frozen_secs: None,
        }
    }
}

/// Elements of format 2, the tag included.
const FORMAT_2_LEN: usize = 7;

impl Serialize for RtcState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(FORMAT_2_LEN)?;
        t.serialize_element(&FORMAT_2_TAG)?;
        t.serialize_element(&self.index)?;
        t.serialize_element(&self.nmi_masked)?;
        t.serialize_element(&self.nvram)?;
        t.serialize_element(&self.flags)?;
        t.serialize_element(&self.offset_ns)?;
        t.serialize_element(&self.frozen_secs)?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for RtcState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EitherFormat;

        impl<'de> Visitor<'de> for EitherFormat {
            type Value = RtcState;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RTC state of format 1 or 2")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RtcState, A::Error> {
                let first: u8 = element(&mut seq, 0)?;
                if first != FORMAT_2_TAG {
                    // Format 1: that byte was the register index.
                    let nvram = element(&mut seq, 1)?;
                    let offset_secs = element(&mut seq, 2)?;
                    return Ok(RtcState::from(RtcStateV1 { index: first, nvram, offset_secs }));
                }
                Ok(RtcState {
                    index: element(&mut seq, 1)?,
                    nmi_masked: element(&mut seq, 2)?,
                    nvram: element(&mut seq, 3)?,
                    flags: element(&mut seq, 4)?,
                    offset_ns: element(&mut seq, 5)?,
                    frozen_secs: element(&mut seq, 6)?,
                })
            }
        }

        fn element<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(
            seq: &mut A,
            at: usize,
        ) -> Result<T, A::Error> {
            seq.next_element()?.ok_or_else(|| de::Error::invalid_length(at, &"an RTC state"))
        }

        // bincode reads a tuple element by element, so the visitor reads format 1's three
        // or format 2's seven; trailing bytes are refused by `state::decode`.
        deserializer.deserialize_tuple(FORMAT_2_LEN, EitherFormat)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::{RtcState, RtcStateV1};
    use crate::devices::bus::BusDevice;
    use crate::devices::rtc::tests::fake_rtc;
    use crate::devices::rtc::Rtc;
    use crate::state::{self, StateError};
    use crate::testing::{assert_golden, assert_hostile_state_is_refused_or_runs};

    /// Format 1, as Hutch wrote `pc/rtc` before format 2.
    const RTC_STATE_V1_HEX: &str = concat!(
        "0b8000000000000000000102030405060708090a0b0c0d0e0f101112131415161718",
        "191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a",
        "3b3c3d3e3f404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c",
        "5d5e5f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e",
        "7ff0f1ffffffffffff",
    );

    /// Format 2: the tag, index, NMI mask, the CMOS bytes (length first), register C, the
    /// offset (i128) and the stopped time (an option).
    const RTC_STATE_HEX: &str = concat!(
        "820b01",
        "8000000000000000",
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
        "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f",
        "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f",
        "d0",
        "ff5f47cfb9fcffffffffffffffffffff",
        "01c086fd6a00000000",
    );

    fn sample_rtc_state_v1() -> RtcStateV1 {
        RtcStateV1 { index: 0x0b, nvram: (0..128).collect(), offset_secs: -3600 }
    }

    fn sample_rtc_state() -> RtcState {
        RtcState {
            index: 0x0b,
            nmi_masked: true,
            nvram: (0..128).collect(),
            flags: 0xd0,
            offset_ns: -3_600_000_000_001,
            frozen_secs: Some(1_795_000_000),
        }
    }

    fn hex_bytes(hex: &str) -> Vec<u8> {
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn rtc_state_bytes_are_unchanged() {
        assert_golden(&sample_rtc_state(), RTC_STATE_HEX);
    }

    #[test]
    fn format_1_rtc_state_bytes_are_unchanged() {
        assert_golden(&sample_rtc_state_v1(), RTC_STATE_V1_HEX);
    }

    #[test]
    fn format_1_bytes_decode_as_the_current_state() {
        let state: RtcState = state::decode("rtc", &hex_bytes(RTC_STATE_V1_HEX)).unwrap();
        assert_eq!(state, RtcState::from(sample_rtc_state_v1()));
        assert_eq!(state.offset_ns, -3_600_000_000_000);
        assert_eq!((state.flags, state.nmi_masked, state.frozen_secs), (0, false, None));
    }

    #[test]
    fn a_format_1_rtc_restores_with_its_offset_and_cmos() {
        // What an older Hutch saved for a fresh RTC whose guest set the clock back an hour
        // and wrote 0xab at CMOS 0x40.
        let mut nvram = vec![0; 128];
        nvram[0x0a] = 0x26;
        nvram[0x0b] = 0x02;
        nvram[0x0d] = 0x80;
        nvram[0x40] = 0xab;
        let old = RtcStateV1 { index: 0x40, nvram, offset_secs: -3600 };
        let bytes = state::encode("rtc", &old).unwrap();
        let (mut rtc, _) = fake_rtc();
        restore(&mut rtc, &bytes).unwrap();
        let restored = rtc.save_state();
        assert_eq!(restored.offset_ns, -3_600_000_000_000);
        let mut b = [0];
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0xab, "the selected register and its byte");
        rtc.write(0, &[0x04]);
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0x10, "11:06 UTC an hour back, in BCD");
        rtc.write(0, &[0x0d]);
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0x80);
    }

    /// What restoring the snapshot's `pc/rtc` bytes does.
    fn restore(dev: &mut Rtc, bytes: &[u8]) -> Result<(), StateError> {
        dev.restore_state(&state::decode("rtc", bytes)?)
    }

    /// What the checks let through must still run: every register, read and set.
    fn exercise(dev: &mut Rtc) {
        let mut b = [0u8];
        for index in 0..0x80 {
            dev.write(0, &[index]);
            dev.read(1, &mut b);
            dev.write(1, &b);
        }
        dev.service();
    }

    #[test]
    fn truncated_or_garbled_rtc_state_is_an_error_not_a_panic() {
        let fresh = || fake_rtc().0;
        for bytes in [
            state::encode("rtc", &sample_rtc_state()).unwrap(),
            state::encode("rtc", &RtcState { frozen_secs: None, ..sample_rtc_state() }).unwrap(),
            hex_bytes(RTC_STATE_V1_HEX),
        ] {
            assert_hostile_state_is_refused_or_runs(
                &bytes,
                fresh,
                Rtc::save_state,
                restore,
                exercise,
            );
        }
    }
}
