//! Saved state of the ACPI PM1a registers and PM timer (the snapshot's `pc/acpi-pm`).

use serde::{Deserialize, Serialize};

/// Saved state of the PM1a registers and the PM timer. `timer_ticks` is the full (not yet
/// masked) tick count at save time; the restored timer counts on from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
    pub timer_ticks: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::Arc;

    use super::AcpiPmState;
    use crate::arch::x86_64::layout;
    use crate::devices::acpi_pm::{AcpiPm, PWRBTN, SLP_TYP_SHIFT};
    use crate::devices::bus::BusDevice;
    use crate::hypervisor::InterruptSink;
    use crate::state::{self, StateError};

    const ACPI_PM_STATE_HEX: &str = "0001000100145634120000000000";

    fn sample_acpi_pm_state() -> AcpiPmState {
        AcpiPmState {
            status: PWRBTN,
            enable: PWRBTN,
            control: 5 << SLP_TYP_SHIFT,
            timer_ticks: 0x12_3456,
        }
    }

    #[test]
    fn acpi_pm_state_bytes_are_unchanged() {
        crate::virtio::golden::assert_golden(&sample_acpi_pm_state(), ACPI_PM_STATE_HEX);
    }

    struct NoIrq;

    impl InterruptSink for NoIrq {
        fn set_irq_line(&self, _gsi: u32, _active: bool) -> crate::hypervisor::Result<()> {
            Ok(())
        }
        fn signal_msi(&self, _address: u64, _data: u32) -> crate::hypervisor::Result<()> {
            Ok(())
        }
    }

    fn device() -> AcpiPm {
        AcpiPm::new(Arc::new(NoIrq), Box::new(|| {}))
    }

    /// What restoring the snapshot's `pc/acpi-pm` bytes does.
    fn restore(dev: &mut AcpiPm, bytes: &[u8]) -> Result<(), StateError> {
        dev.restore_state(&state::decode("ACPI PM", bytes)?)
    }

    /// The saved registers; the timer runs on, so it is left out.
    fn registers(dev: &AcpiPm) -> (u16, u16, u16) {
        let s = dev.save_state();
        (s.status, s.enable, s.control)
    }

    #[test]
    fn truncated_or_garbled_acpi_pm_state_is_an_error_not_a_panic() {
        let bytes = state::encode("ACPI PM", &sample_acpi_pm_state()).unwrap();
        let mut dev = device();
        let before = registers(&dev);
        for len in 0..bytes.len() {
            assert!(restore(&mut dev, &bytes[..len]).is_err(), "{len} of {} bytes", bytes.len());
            assert_eq!(registers(&dev), before);
        }
        for at in 0..bytes.len() {
            let mut garbled = bytes.clone();
            garbled[at] = 0xff;
            let mut dev = device();
            match restore(&mut dev, &garbled) {
                Err(_) => assert_eq!(registers(&dev), before, "refused byte {at} changed it"),
                // What the checks let through must still run: the whole block, any width.
                Ok(()) => {
                    for width in [1, 2, 4] {
                        let mut data = vec![0u8; width];
                        for offset in 0..u64::from(layout::ACPI_PM_LEN) {
                            dev.read(offset, &mut data);
                            dev.write(offset, &data);
                        }
                    }
                }
            }
        }
    }
}
