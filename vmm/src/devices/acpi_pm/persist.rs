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
    use crate::state::{self, StateError};
    use crate::testing::{assert_golden, assert_hostile_state_is_refused_or_runs, IrqLog};

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
        assert_golden(&sample_acpi_pm_state(), ACPI_PM_STATE_HEX);
    }

    fn device() -> AcpiPm {
        AcpiPm::new(Arc::new(IrqLog::default()), Box::new(|| {}))
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
        // What the checks let through must still run: the whole block, any width.
        let exercise = |dev: &mut AcpiPm| {
            for width in [1, 2, 4] {
                let mut data = vec![0u8; width];
                for offset in 0..u64::from(layout::ACPI_PM_LEN) {
                    dev.read(offset, &mut data);
                    dev.write(offset, &data);
                }
            }
        };
        assert_hostile_state_is_refused_or_runs(&bytes, device, registers, restore, exercise);
    }
}
