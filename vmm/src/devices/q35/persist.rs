//! Saved state of the Q35 chipset functions. Each layout is a snapshot format: the golden
//! tests below fail on any change.

use serde::{Deserialize, Serialize};

/// The MCH's configuration space (64 dwords).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MchState {
    pub registers: Vec<u32>,
}

/// The LPC bridge's configuration space (64 dwords).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ich9LpcState {
    pub registers: Vec<u32>,
}

/// The ICH9 PM block. `timer_ticks` is the count within the 24-bit wrap at save time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ich9PmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
    pub timer_ticks: u64,
    pub tmr_sts: bool,
    pub gpe_status: [u8; 8],
    pub gpe_enable: [u8; 8],
    pub smi_en: u32,
    pub smi_sts: u32,
}

/// RST_CNT's kept bits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResetControlState {
    pub value: u8,
}

/// Port 0x92's storage bits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Port92State {
    pub value: u8,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::q35::{Ich9Lpc, Ich9Pm, Mch, Port92, ResetControl};
    use crate::pci::PciDevice;
    use crate::state::{self, StateError};
    use crate::testing::{assert_golden, assert_hostile_state_is_refused_or_runs, IrqLog};

    fn registers_sample() -> Vec<u32> {
        let mut registers = vec![0u32; 64];
        registers[0] = 0x29c0_8086;
        registers[24] = 0xb000_0001;
        registers[63] = 0x1234_5678;
        registers
    }

    const REGISTERS_HEX: &str = "4000000000000000\
        8680c02900000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000\
        010000b000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000078563412";

    #[test]
    fn mch_and_lpc_state_bytes_are_unchanged() {
        assert_golden(&MchState { registers: registers_sample() }, REGISTERS_HEX);
        assert_golden(&Ich9LpcState { registers: registers_sample() }, REGISTERS_HEX);
    }

    fn pm_sample() -> Ich9PmState {
        Ich9PmState {
            status: 0x0100,
            enable: 0x0101,
            control: 0x0001,
            timer_ticks: 0x12_3456,
            tmr_sts: true,
            gpe_status: [1, 2, 3, 4, 5, 6, 7, 8],
            gpe_enable: [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88],
            smi_en: 0x20,
            smi_sts: 0x8000_0001,
        }
    }

    const PM_HEX: &str = "0001010101005634120000000000\
        01\
        01020304050607081122334455667788\
        2000000001000080";

    #[test]
    fn pm_and_reset_state_bytes_are_unchanged() {
        assert_golden(&pm_sample(), PM_HEX);
        assert_golden(&ResetControlState { value: 0x0a }, "0a");
        assert_golden(&Port92State { value: 0xf0 }, "f0");
    }

    #[test]
    fn mch_state_round_trips_and_republishes_ecam() {
        let mut mch = Mch::new(Box::new(|_| {}));
        mch.write_config_register(0x60 / 4, 0, &0xb000_0001u32.to_le_bytes());
        mch.write_config_register(0x90 / 4, 1, &[0x33]);
        let bytes = mch.save_state().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let mut fresh = Mch::new(Box::new(move |w| log.lock().unwrap().push(w)));
        fresh.restore_state(&bytes).unwrap();
        assert_eq!(fresh.ecam_window(), mch.ecam_window());
        assert_eq!(*seen.lock().unwrap(), [mch.ecam_window()], "the board hears of it");
        assert_eq!(fresh.pam(), mch.pam());
    }

    #[test]
    fn hostile_mch_state_is_refused_or_runs() {
        let mut mch = Mch::new(Box::new(|_| {}));
        mch.write_config_register(0x60 / 4, 0, &0xb000_0001u32.to_le_bytes());
        let bytes = mch.save_state().unwrap();
        assert_hostile_state_is_refused_or_runs(
            &bytes,
            || Mch::new(Box::new(|_| {})),
            |d| d.save(),
            |d, b| d.restore_state(b),
            |d| {
                for reg in 0..64 {
                    d.write_config_register(reg, 0, &[0xff; 4]);
                }
                let _ = d.ecam_window();
            },
        );
    }

    #[test]
    fn lpc_state_round_trips_and_republishes_the_pm_decode() {
        let mut lpc = Ich9Lpc::new(Box::new(|_| {}));
        lpc.write_config_register(0x40 / 4, 0, &0x601u32.to_le_bytes());
        lpc.write_config_register(0x44 / 4, 0, &[0x80]);
        lpc.write_config_register(0x60 / 4, 0, &[0x0a, 0x0a, 0x0b, 0x0b]);
        let bytes = lpc.save_state().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let mut fresh = Ich9Lpc::new(Box::new(move |d| log.lock().unwrap().push(d)));
        fresh.restore_state(&bytes).unwrap();
        assert_eq!(*seen.lock().unwrap(), [lpc.pm_decode()]);
        assert_eq!(fresh.view().pirq_routes(), lpc.view().pirq_routes());
    }

    #[test]
    fn hostile_lpc_state_is_refused_or_runs() {
        let mut lpc = Ich9Lpc::new(Box::new(|_| {}));
        lpc.write_config_register(0x40 / 4, 0, &0x601u32.to_le_bytes());
        let bytes = lpc.save_state().unwrap();
        assert_hostile_state_is_refused_or_runs(
            &bytes,
            || Ich9Lpc::new(Box::new(|_| {})),
            |d| d.save(),
            |d, b| d.restore_state(b),
            |d| {
                for reg in 0..64 {
                    d.write_config_register(reg, 0, &[0xff; 4]);
                }
                let _ = d.view().pirq_routes();
            },
        );
    }

    fn pm() -> Ich9Pm {
        let mut pm = Ich9Pm::new(Arc::new(IrqLog::default()), 9, Box::new(|| {}));
        pm.set_decoding(true);
        pm
    }

    fn restore_pm(pm: &mut Ich9Pm, bytes: &[u8]) -> Result<(), StateError> {
        pm.restore(&state::decode("ICH9 PM", bytes)?)
    }

    #[test]
    fn pm_state_round_trips_and_drives_the_sci() {
        let irq = Arc::new(IrqLog::default());
        let mut fresh = Ich9Pm::new(irq.clone(), 9, Box::new(|| {}));
        fresh.restore(&pm_sample()).unwrap();
        assert_eq!(irq.lines(), [(9, true)], "PWRBTN is enabled and set");
        let again = fresh.save();
        assert_eq!((again.status, again.enable, again.control), (0x0100, 0x0101, 0x0001));
        assert!(again.tmr_sts, "a latched TMR_STS stays set until cleared");
        assert_eq!(
            (again.gpe_status, again.smi_en, again.smi_sts),
            ([1, 2, 3, 4, 5, 6, 7, 8], 0x20, 0x8000_0001)
        );
        let wide = Ich9PmState { timer_ticks: 1 << 24, ..pm_sample() };
        assert!(fresh.restore(&wide).is_err());
    }

    #[test]
    fn hostile_pm_state_is_refused_or_runs() {
        let bytes = state::encode("ICH9 PM", &pm_sample()).unwrap();
        let registers = |d: &Ich9Pm| {
            let s = d.save();
            (s.status, s.enable, s.control, s.gpe_status, s.gpe_enable, s.smi_en, s.smi_sts)
        };
        let exercise = |d: &mut Ich9Pm| {
            for width in [1, 2, 4] {
                let mut data = vec![0u8; width];
                for offset in 0..128 {
                    d.read(offset, &mut data);
                    d.write(offset, &data);
                }
            }
        };
        assert_hostile_state_is_refused_or_runs(&bytes, pm, registers, restore_pm, exercise);
    }

    #[test]
    fn reset_port_states_round_trip_and_foreign_bits_are_refused() {
        let mut rcr = ResetControl::new(Box::new(|| {}));
        rcr.write(0, &[0x0a]);
        let mut fresh = ResetControl::new(Box::new(|| {}));
        fresh.restore(&rcr.save()).unwrap();
        assert_eq!(fresh.save(), ResetControlState { value: 0x0a });
        assert!(fresh.restore(&ResetControlState { value: 0x04 }).is_err());
        assert_eq!(fresh.save().value, 0x0a, "a refused state changes nothing");

        let mut port = Port92::new(Box::new(|| {}));
        port.write(0, &[0xf2]);
        let mut fresh = Port92::new(Box::new(|| {}));
        fresh.restore(&port.save()).unwrap();
        assert_eq!(fresh.save(), Port92State { value: 0xf0 });
        assert!(fresh.restore(&Port92State { value: 0x01 }).is_err());
    }
}
