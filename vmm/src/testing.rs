//! Test scaffolding shared by the crate's unit tests: an interrupt sink that records what
//! devices raise, golden bytes of saved-state structs, and the hostile-state check of a
//! device's restore.
#![allow(clippy::unwrap_used)] // Test scaffolding fails loudly on purpose.

use std::fmt::Debug;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::hypervisor::{self, InterruptSink};
use crate::state::{self, StateError};

/// Records interrupt-line changes, in order; MSIs are accepted and dropped.
#[derive(Default)]
pub struct IrqLog(Mutex<Vec<(u32, bool)>>);

impl IrqLog {
    /// The line changes (GSI, level) so far.
    pub fn lines(&self) -> Vec<(u32, bool)> {
        self.0.lock().unwrap().clone()
    }
}

impl InterruptSink for IrqLog {
    fn set_irq_line(&self, gsi: u32, active: bool) -> hypervisor::Result<()> {
        self.0.lock().unwrap().push((gsi, active));
        Ok(())
    }
    fn signal_msi(&self, _address: u64, _data: u32) -> hypervisor::Result<()> {
        Ok(())
    }
}

/// Checks that `value` encodes to exactly `hex` and that `hex` decodes back to `value`: a
/// state struct's encoding is the snapshot format, so a field change must show up as a
/// failing test, not as snapshots that no longer restore.
pub fn assert_golden<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T, hex: &str) {
    let bytes = state::encode("golden", value).unwrap();
    let got: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got, hex, "the saved-state format changed");
    let raw: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(&state::decode::<T>("golden", &raw).unwrap(), value);
}

/// A device's restore given untrusted bytes: every truncation of `bytes` (a good state) must
/// be refused and leave the device as it was; with each byte in turn set to 0xff, the restore
/// must be refused leaving the device unchanged, or accepted and leave a device that still
/// runs (`exercise` drives it and must not panic). `observe` is what "unchanged" compares.
pub fn assert_hostile_state_is_refused_or_runs<D, S: PartialEq + Debug>(
    bytes: &[u8],
    fresh: impl Fn() -> D,
    observe: impl Fn(&D) -> S,
    restore: impl Fn(&mut D, &[u8]) -> Result<(), StateError>,
    exercise: impl Fn(&mut D),
) {
    let mut dev = fresh();
    let before = observe(&dev);
    for len in 0..bytes.len() {
        assert!(restore(&mut dev, &bytes[..len]).is_err(), "{len} of {} bytes", bytes.len());
        assert_eq!(observe(&dev), before, "a refused truncation changed the device");
    }
    for at in 0..bytes.len() {
        let mut garbled = bytes.to_vec();
        garbled[at] = 0xff;
        let mut dev = fresh();
        match restore(&mut dev, &garbled) {
            Err(_) => assert_eq!(observe(&dev), before, "refused byte {at} changed it"),
            Ok(()) => exercise(&mut dev),
        }
    }
}
