//! The machine's saved state (snapshot format 2): vCPUs, the VM's backend state, and a map
//! from stable device id (`pc/com1`, `pci/00:03.0`, ...) to that device's own encoded state.
//! The board and the architecture are named in the snapshot file's header.
//!
//! A device missing from a snapshot (one added to the board after the snapshot was taken) is
//! a clear error or its reset state, by the device's choice ([`crate::board::WhenMissing`]);
//! state for a device this machine does not have is refused. Format 1 snapshots (one
//! positional struct of the PC board) are read by `board::pc::v1` and mapped to this form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::MachineError;
use crate::board::{SavedDevice, WhenMissing};
use crate::hypervisor::{VcpuState, VmState};
use crate::snapshot::SnapshotFile;
use crate::state::{self, StateError};

/// Everything a snapshot holds besides guest RAM (encoded with `state::encode`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    pub cpus: u32,
    pub memory_mib: u64,
    pub display: bool,
    pub disks: usize,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// Each device's own encoded state, by device id.
    pub devices: BTreeMap<String, ByteBuf>,
}

impl MachineState {
    /// The state in `snapshot`, of either format, checked to be of `board` on `arch`.
    pub fn read(
        snapshot: &SnapshotFile,
        board: &str,
        arch: &str,
    ) -> Result<MachineState, MachineError> {
        let header = &snapshot.header;
        if header.board != board || header.arch != arch {
            return Err(MachineError::SnapshotMismatch(format!(
                "the snapshot is of a {} machine on {}, this is a {board} machine on {arch}",
                header.board, header.arch
            )));
        }
        match header.version {
            1 => legacy_v1(snapshot.state()),
            _ => Ok(state::decode("machine", snapshot.state())?),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        state::encode("machine", self)
    }
}

#[cfg(target_arch = "x86_64")]
fn legacy_v1(bytes: &[u8]) -> Result<MachineState, MachineError> {
    Ok(crate::board::pc::v1::decode(bytes)?)
}

#[cfg(not(target_arch = "x86_64"))]
fn legacy_v1(_bytes: &[u8]) -> Result<MachineState, MachineError> {
    Err(MachineError::SnapshotMismatch("format 1 snapshots are of x86_64 PCs".into()))
}

/// Saves every device under its id.
pub(crate) fn save_devices(
    devices: &[SavedDevice],
) -> Result<BTreeMap<String, ByteBuf>, StateError> {
    devices.iter().map(|d| Ok((d.id.clone(), ByteBuf::from((d.save)()?)))).collect()
}

/// Puts every device back where the snapshot left it (before any vCPU runs), in the board's
/// order. Checks the whole map against the devices first, so a snapshot that does not fit
/// changes nothing; a device refusing its state part-way leaves a machine to discard.
pub(crate) fn restore_devices(
    devices: &[SavedDevice],
    saved: &BTreeMap<String, ByteBuf>,
) -> Result<(), MachineError> {
    if let Some(extra) = saved.keys().find(|id| !devices.iter().any(|d| &d.id == *id)) {
        return Err(MachineError::SnapshotMismatch(format!(
            "the snapshot holds state for device {extra}, which this machine does not have"
        )));
    }
    for device in devices {
        if device.when_missing == WhenMissing::Refuse && !saved.contains_key(&device.id) {
            return Err(MachineError::SnapshotMismatch(format!(
                "the snapshot has no state for device {}",
                device.id
            )));
        }
    }
    for device in devices {
        match saved.get(&device.id) {
            Some(bytes) => (device.restore)(bytes)?,
            None => {
                log::info!("snapshot: {} keeps its reset state (not in the snapshot)", device.id)
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn sample() -> MachineState {
        let mut devices = BTreeMap::new();
        devices.insert("pc/com1".to_string(), ByteBuf::from(vec![1, 2, 3]));
        devices.insert("pci/00:01.0".to_string(), ByteBuf::from(vec![0xaa]));
        MachineState {
            cpus: 2,
            memory_mib: 512,
            display: true,
            disks: 1,
            vcpus: vec![],
            vm: VmState { backend: "kvm".into(), blobs: BTreeMap::new() },
            devices,
        }
    }

    /// The bytes of format 2's machine state: a change here is a format change, which needs
    /// a new version and a reader for the old one.
    const SAMPLE_BYTES: &str = "\
        020000000002000000000000010100000000000000000000000000000003000000000000006b766d00000000\
        000000000200000000000000070000000000000070632f636f6d3103000000000000000102030b0000000000\
        00007063692f30303a30312e300100000000000000aa";

    #[test]
    fn machine_state_bytes_are_the_format() {
        let bytes = sample().encode().unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, SAMPLE_BYTES);
        let decoded: MachineState = state::decode("machine", &bytes).unwrap();
        assert_eq!(decoded, sample());
    }

    fn counter_device(id: &str, when_missing: WhenMissing) -> (SavedDevice, Arc<Mutex<u32>>) {
        let value = Arc::new(Mutex::new(7u32));
        let mut device = SavedDevice::of(
            id,
            &value,
            |v| *v,
            |v, s: &u32| {
                if *s > 100 {
                    return Err(StateError::invalid("counter", "too big"));
                }
                *v = *s;
                Ok(())
            },
        );
        device.when_missing = when_missing;
        (device, value)
    }

    #[test]
    fn devices_restore_by_id_and_unknown_or_missing_ones_are_refused() {
        let (a, a_value) = counter_device("a", WhenMissing::Refuse);
        let (b, b_value) = counter_device("b", WhenMissing::Reset);
        let devices = vec![a, b];
        *a_value.lock().unwrap() = 42;
        let saved = save_devices(&devices).unwrap();
        *a_value.lock().unwrap() = 1;
        restore_devices(&devices, &saved).unwrap();
        assert_eq!(*a_value.lock().unwrap(), 42);

        // b was added after the snapshot: it keeps its reset state.
        let mut without_b = saved.clone();
        without_b.remove("b");
        *b_value.lock().unwrap() = 9;
        restore_devices(&devices, &without_b).unwrap();
        assert_eq!(*b_value.lock().unwrap(), 9);

        // a refuses to start from nothing; nothing is changed.
        let mut without_a = saved.clone();
        without_a.remove("a");
        *a_value.lock().unwrap() = 5;
        let err = restore_devices(&devices, &without_a).unwrap_err().to_string();
        assert!(err.contains("no state for device a"), "{err}");
        assert_eq!(*a_value.lock().unwrap(), 5);

        let mut extra = saved.clone();
        extra.insert("c".into(), ByteBuf::from(vec![0]));
        let err = restore_devices(&devices, &extra).unwrap_err().to_string();
        assert!(err.contains("device c"), "{err}");
        assert_eq!(*a_value.lock().unwrap(), 5);
    }
}
