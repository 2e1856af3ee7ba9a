//! Snapshot format 1: the PC's whole machine state as one positional struct, as Hutch wrote it
//! before device state was keyed. Read only: each field maps to the device id format 2 keeps
//! it under, so a snapshot taken by an older Hutch restores.
//!
//! The device state types named here are format-1 types too: a device whose state struct
//! changes must keep a copy of its old struct for this reader (the golden-bytes tests beside
//! each device make such a change visible).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{pci_id, ACPI_PM_ID, BOOT_FB_ID, COM1_ID, I8042_ID, PCI_CONFIG_IO_ID, RTC_ID};
use crate::hypervisor::{VcpuState, VmState};
use crate::machine::MachineState;
use crate::pci::Bdf;
use crate::state::{self, StateError};

/// The machine state of snapshot format 1, field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineStateV1 {
    pub cpus: u32,
    pub memory_mib: u64,
    pub display: bool,
    pub disks: usize,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: crate::devices::serial::SerialDeviceState,
    pub i8042: crate::devices::i8042::I8042StateV1,
    pub rtc: crate::devices::rtc::RtcStateV1,
    pub acpi_pm: crate::devices::acpi_pm::AcpiPmState,
    pub pci: crate::pci::PciRootStateV1,
    pub pci_config_io: crate::pci::root::PciConfigIoState,
    /// The boot framebuffer's memory, when the machine has a display.
    #[serde(with = "serde_bytes")]
    pub framebuffer: Option<Vec<u8>>,
}

/// Decodes a format-1 machine state and maps it to format 2's keyed form.
pub fn decode(bytes: &[u8]) -> Result<MachineState, StateError> {
    let v1: MachineStateV1 = state::decode("machine (format 1)", bytes)?;
    v1.into_keyed()
}

impl MachineStateV1 {
    pub fn into_keyed(self) -> Result<MachineState, StateError> {
        let mut devices = BTreeMap::new();
        let mut put =
            |id: &str, bytes: Vec<u8>| devices.insert(id.to_string(), ByteBuf::from(bytes));
        put(COM1_ID, state::encode(COM1_ID, &self.serial)?);
        put(I8042_ID, state::encode(I8042_ID, &self.i8042)?);
        put(RTC_ID, state::encode(RTC_ID, &self.rtc)?);
        put(ACPI_PM_ID, state::encode(ACPI_PM_ID, &self.acpi_pm)?);
        put(PCI_CONFIG_IO_ID, state::encode(PCI_CONFIG_IO_ID, &self.pci_config_io)?);
        if let Some(framebuffer) = self.framebuffer {
            put(BOOT_FB_ID, framebuffer);
        }
        for (slot, bytes) in self.pci.slots.into_iter().enumerate() {
            let bdf = u8::try_from(slot).ok().and_then(|device| Bdf::new(0, device, 0));
            let bdf = bdf.ok_or_else(|| {
                StateError::invalid("PCI bus", format!("slot {slot} does not exist"))
            })?;
            if let Some(bytes) = bytes {
                put(&pci_id(bdf), bytes.into_vec());
            }
        }
        Ok(MachineState {
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            display: self.display,
            disks: self.disks,
            vcpus: self.vcpus,
            vm: self.vm,
            devices,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::devices::acpi_pm::AcpiPm;
    use crate::devices::rtc::RtcStateV1;
    use crate::devices::serial::{IrqEdge, SerialDevice};
    use crate::hypervisor::InterruptSink;
    use crate::testing::IrqLog;

    fn v1_state() -> MachineStateV1 {
        let irq: Arc<dyn InterruptSink> = Arc::new(IrqLog::default());
        let serial = SerialDevice::new(IrqEdge::new(irq.clone(), 4), Box::new(std::io::sink()));
        MachineStateV1 {
            cpus: 1,
            memory_mib: 64,
            display: true,
            disks: 0,
            vcpus: vec![VcpuState::default()],
            vm: VmState::default(),
            serial: serial.save_state(),
            // The keyboard-only i8042 at power-on, in its first form.
            i8042: crate::devices::i8042::I8042StateV1 {
                ctr: 0x45,
                output: None,
                last_read: 0,
                controller: vec![],
                keyboard: crate::devices::i8042::KeyboardState {
                    responses: vec![],
                    scancodes: vec![],
                    pending: None,
                    scanning: true,
                    scancode_set: 2,
                    leds: 0,
                    last_sent: 0,
                },
                pending_command: None,
                last_was_command: false,
            },
            // A fresh RTC as format 1 saved it.
            rtc: {
                let mut nvram = vec![0; 128];
                (nvram[0x0a], nvram[0x0b], nvram[0x0d]) = (0x26, 0x02, 0x80);
                RtcStateV1 { index: 0, nvram, offset_secs: 0 }
            },
            // The PM timer runs from the device's creation: pinned, so the bytes are fixed.
            acpi_pm: crate::devices::acpi_pm::AcpiPmState {
                timer_ticks: 0,
                ..AcpiPm::new(irq, Box::new(|| {})).save_state()
            },
            pci: crate::pci::PciRootStateV1 {
                slots: vec![Some(ByteBuf::from(vec![1])), None, Some(ByteBuf::from(vec![3]))],
            },
            pci_config_io: crate::pci::root::PciConfigIoState { address: 0x8000_0810 },
            framebuffer: Some(vec![0xfe; 16]),
        }
    }

    /// Format 1 as the previous release wrote it, with the PC devices' state structs inside:
    /// a change to any of them breaks old snapshots unless this reader keeps the old struct.
    const V1_SAMPLE: &str = "\
        0100000040000000000000000100000000000000000100000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        000000000000000000000000000000000000000000000000000c000001036008b00000000000000000000000\
        0000000000004500000000000000000000000000000000000000000000000000000001020000000000800000\
        0000000000000000000000000000002602008000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
        0000000000000000000000000000000000000000000000030000000000000001010000000000000001000101\
        000000000000000310080080011000000000000000fefefefefefefefefefefefefefefefe";

    #[test]
    fn format_1_bytes_and_the_pc_device_states_in_it_are_frozen() {
        let bytes = state::encode("machine", &v1_state()).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, V1_SAMPLE);
        let back: MachineStateV1 = state::decode("machine", &bytes).unwrap();
        assert_eq!(back, v1_state());
    }

    #[test]
    fn format_1_fields_map_to_their_device_ids() {
        let v1 = v1_state();
        let bytes = state::encode("machine", &v1).unwrap();
        let keyed = decode(&bytes).unwrap();
        let ids: Vec<&str> = keyed.devices.keys().map(String::as_str).collect();
        assert_eq!(
            ids,
            [
                "display/boot-fb",
                "pc/acpi-pm",
                "pc/com1",
                "pc/i8042",
                "pc/pci-config-io",
                "pc/rtc",
                "pci/00:00.0",
                "pci/00:02.0"
            ]
        );
        assert_eq!(keyed.devices["pci/00:02.0"].as_ref(), &[3]);
        assert_eq!(keyed.devices["display/boot-fb"].as_ref(), &[0xfe; 16]);
        let serial: crate::devices::serial::SerialDeviceState =
            state::decode("com1", &keyed.devices["pc/com1"]).unwrap();
        assert_eq!(serial, v1.serial);
        let rtc: crate::devices::rtc::RtcState =
            state::decode("rtc", &keyed.devices["pc/rtc"]).unwrap();
        assert_eq!(rtc, v1.rtc.into());
        assert_eq!((keyed.cpus, keyed.memory_mib, keyed.display), (1, 64, true));
    }

    #[test]
    fn a_garbled_format_1_state_is_an_error() {
        let mut bytes = state::encode("machine", &v1_state()).unwrap();
        bytes.truncate(bytes.len() / 2);
        assert!(decode(&bytes).is_err());
    }
}
